"""The compose stack (docker-compose.yml, infra/Dockerfile, .env.example) agrees with the code.

There is no Docker engine here, so what a `docker compose up` would find out late is checked
from the files: every command a service runs parses against the real CLI it names (`genmodels`
with its entry-point plugins, `ray`, `prefect`, `mlflow`), every variable the code reads is
documented in README.md and set where the stack needs it, pointing at a service that listens
there, every `${VAR}` has a value in .env.example, host ports are unique, and the image
installs CPU torch first and runs as a non-root user.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
ENV_EXAMPLE = REPO / ".env.example"
DOCKERFILE = REPO / "infra" / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
README = REPO / "README.md"
PREFECT_FILE = REPO / "infra" / "prefect.yaml"
CODE_DIRS = ("genmodels", "pipelines", "serving")

IMAGE = "genmodels:latest"
ONE_SHOT = {"minio-init"}  # run to completion; every other service must stay up and be healthy
RAY_NODES = {"ray-head", "ray-worker"}
DRIVERS = {"prefect-worker", "serve"}  # run our drivers, joined to the cluster as Ray nodes

#: Every environment variable the code reads, or sets for the libraries it drives, and those the
#: libraries read for it. README.md's "Configuration" table has a row for each, and
#: test_every_variable_the_code_reads_is_listed keeps this list complete.
ENVIRONMENT = {
    "GENMODELS_WORK_DIR", "GENMODELS_STORAGE", "GENMODELS_FASHION_MNIST_DIR", "GENMODELS_API_KEY",
    "GENMODELS_GIT_COMMIT", "GENMODELS_JOB_OUTPUT_ROOTS", "GENMODELS_MAX_ACTIVE_JOBS", "GENMODELS_MAX_QUEUED_JOBS",
    "GENMODELS_JOB_MAX_SAMPLES", "GENMODELS_JOB_MAX_SHARDS", "GENMODELS_JOB_MAX_BYTES", "GENMODELS_JOB_MAX_SHARD_BYTES",
    "GENMODELS_JOBS_KEPT_IN_MEMORY", "GENMODELS_LOCAL_RAY_CLUSTER",
    "RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S",
    "RAY_SERVE_THROUGHPUT_OPTIMIZED", "RAY_SERVE_ENABLE_DIRECT_INGRESS", "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE",
    "RAY_SERVE_ENABLE_HA_PROXY", "RAY_SERVE_HAPROXY_BINARY_PATH", "RAY_SERVE_HAPROXY_STATS_PORT",
    "RAY_SERVE_HAPROXY_METRICS_PORT",
    "MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL", "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
    "MLFLOW_HTTP_REQUEST_TIMEOUT",
    "PREFECT_API_URL", "PREFECT_SERVER_ANALYTICS_ENABLED", "PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS",
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
    "AWS_DEFAULT_REGION", "AWS_REGION",
}

#: What every Ray node and driver of the stack must have: tasks and actors (Train workers, Serve
#: replicas, bulk-job writers) read the settings of the node they land on, not the driver's.
STACK_SETTINGS = {
    "GENMODELS_STORAGE", "GENMODELS_WORK_DIR", "MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL",
    "PREFECT_API_URL", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
    "RAY_AUTH_MODE", "RAY_AUTH_TOKEN",
}

# Console scripts the services run, from the packages the image installs.
CONSOLE_SCRIPTS = {"genmodels", "ray", "serve", "prefect", "mlflow"}

_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


# ---------------------------------------------------------------------------------------------
# Reading the files as compose would


def _read_env_file(path: Path) -> dict[str, str]:
    values = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Z_][A-Z0-9_]*", key), f"{path.name}:{number}: not KEY=VALUE: {line!r}"
        assert key not in values, f"{path.name}:{number}: {key} defined twice"
        values[key] = value
    return values


def _interpolate(value: str, env: dict[str, str], seen: set[str]) -> str:
    """Compose's interpolation of one string: ${VAR}, ${VAR:-default}, ${VAR:?error}, $$."""

    def replace(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(4)
        seen.add(name)
        op, arg = m.group(2), m.group(3)
        have = env.get(name)
        if op in (":-", "-") and (have is None or (op == ":-" and have == "")):
            return arg
        if op in (":?", "?") and (have is None or (op == ":?" and have == "")):
            raise AssertionError(f"${{{name}}} is required ({arg}) and has no value")
        return have if have is not None else ""

    return _VAR.sub(replace, value)


def _walk(node: Any, env: dict[str, str], seen: set[str]) -> Any:
    if isinstance(node, dict):
        return {k: _walk(v, env, seen) for k, v in node.items()}
    if isinstance(node, list):
        return [_walk(v, env, seen) for v in node]
    if isinstance(node, str):
        return _interpolate(node, env, seen)
    return node


@pytest.fixture(scope="module")
def env_example() -> dict[str, str]:
    return _read_env_file(ENV_EXAMPLE)


@pytest.fixture(scope="module")
def compose_raw() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def interpolated(compose_raw: dict, env_example: dict[str, str]) -> tuple[dict, set[str]]:
    seen: set[str] = set()
    return _walk(compose_raw, env_example, seen), seen


@pytest.fixture(scope="module")
def services(interpolated) -> dict[str, dict]:
    return interpolated[0]["services"]


def _env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # KEY=VALUE form
        env = dict(item.partition("=")[::2] for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def _argv(service: dict) -> list[str]:
    command = service.get("command")
    if command is None:
        return []
    return shlex.split(command) if isinstance(command, str) else [str(a) for a in command]


def _simple_commands(argv: list[str]) -> Iterator[list[str]]:
    """The commands a service runs: its argv, or each command of a `bash -c` / `sh -c` script."""
    if len(argv) >= 3 and Path(argv[0]).name in {"bash", "sh"} and argv[1] == "-c":
        for part in re.split(r"&&|\|\||;", argv[2]):
            words = shlex.split(part)
            if words and words[0] == "exec":
                words = words[1:]
            if words:
                yield words
    elif argv:
        yield argv


def _our_services(services: dict) -> dict[str, dict]:
    return {name: s for name, s in services.items() if s.get("image") == IMAGE}


def _listen_ports(service: dict) -> set[int]:
    """Ports a service listens on: its published container ports and any --port in its command."""
    ports = {int(str(p).rsplit(":", 1)[-1].split("/")[0]) for p in service.get("ports", [])}
    for words in _simple_commands(_argv(service)):
        for i, word in enumerate(words):
            if word.startswith("--port="):
                ports.add(int(word.split("=", 1)[1]))
            elif word == "--port" and i + 1 < len(words):
                ports.add(int(words[i + 1]))
    return ports


# ---------------------------------------------------------------------------------------------
# The file itself


def test_every_interpolated_variable_is_in_env_example_and_none_is_unused(interpolated, env_example):
    _, seen = interpolated
    assert seen, "docker-compose.yml interpolates nothing: credentials would be hard-coded"
    assert seen <= set(env_example), f".env.example lacks {sorted(seen - set(env_example))}"
    assert set(env_example) <= seen, f".env.example defines unused {sorted(set(env_example) - seen)}"


def test_env_example_documents_each_variable_with_a_comment():
    lines = ENV_EXAMPLE.read_text().splitlines()
    for i, line in enumerate(lines):
        if line and not line.startswith("#"):
            # A comment right above, or above the variables grouped with it (no blank line between).
            j = i - 1
            while j >= 0 and lines[j] and not lines[j].startswith("#"):
                j -= 1
            assert j >= 0 and lines[j].startswith("#"), f".env.example: {line.split('=')[0]} has no comment above it"


def test_secrets_come_only_from_env(compose_raw: dict, env_example: dict[str, str]):
    # Raw (uninterpolated) values: a credential must be a ${VAR}, never a literal in the file.
    secretive = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|API_KEY")
    for name, service in compose_raw["services"].items():
        for key, value in _env(service).items():
            if secretive.search(key):
                assert re.fullmatch(r"\$\{[A-Z_]+(:?[-?][^}]*)?\}", value), f"{name}: {key} is not taken from .env"
    # Shipped values work out of the box (`cp .env.example .env`) but must read as placeholders.
    for key, value in env_example.items():
        if re.search(r"PASSWORD|SECRET|TOKEN", key):
            assert "change-me" in value, f".env.example: {key} must be an obvious placeholder, got {value!r}"


def test_every_service_has_an_image_or_a_build(services: dict):
    assert services
    for name, service in services.items():
        assert service.get("image") or service.get("build"), name
    # One image for our code, built from infra/Dockerfile with the repository as context.
    for name, service in _our_services(services).items():
        build = service["build"]
        assert (REPO / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE, name
    assert set(_our_services(services)) >= RAY_NODES | DRIVERS


def test_long_running_services_have_healthchecks_and_dependencies_wait_for_them(services: dict):
    assert ONE_SHOT <= set(services)
    for name, service in services.items():
        if name in ONE_SHOT:
            assert service.get("restart", "no") == "no", f"{name} is one-shot: it must not be restarted"
            continue
        check = service.get("healthcheck") or {}
        assert check.get("test") and not check.get("disable"), f"{name}: no health check"
        assert service.get("restart") in {"unless-stopped", "always", "on-failure"}, f"{name}: no restart policy"
        for dep, how in (service.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            expected = "service_completed_successfully" if dep in ONE_SHOT else "service_healthy"
            assert how.get("condition") == expected, f"{name} -> {dep}: condition {how.get('condition')}"


def test_no_two_services_publish_the_same_host_port_and_all_bind_loopback(services: dict):
    owners: dict[int, str] = {}
    for name, service in services.items():
        for mapping in service.get("ports", []):
            parts = str(mapping).split(":")
            assert len(parts) == 3, f"{name}: {mapping!r} must be HOST_IP:HOST_PORT:CONTAINER_PORT"
            # No login on MLflow, Prefect, the dashboard (job submission = code execution): loopback.
            assert parts[0] == "127.0.0.1", f"{name}: {mapping!r} listens beyond this machine"
            port = int(parts[1])
            assert port not in owners, f"host port {port} published by {owners[port]} and {name}"
            owners[port] = name
    # The URLs README.md sends people to.
    assert {owners.get(p) for p in (5000, 4200, 8265, 8000, 9001)} == {
        "mlflow", "prefect-server", "ray-head", "minio"}


def test_named_volumes_are_declared_and_hold_the_state(interpolated, services: dict):
    declared = set(interpolated[0].get("volumes") or {})
    used = set()
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source, _, target = str(volume).partition(":")
            if source.startswith((".", "/")):
                assert (REPO / source).exists(), f"{name} mounts missing {source}"
                continue
            assert source in declared, f"{name}: volume {source} is not declared"
            used.add((name, target.split(":")[0]))
    assert {("minio", "/data"), ("postgres", "/var/lib/postgresql/data")} <= used


# ---------------------------------------------------------------------------------------------
# Commands: each names a real entry point and parses


def _check_genmodels(argv: list[str]) -> None:
    import typer.main

    from genmodels.cli import app  # loads the genmodels.cli entry-point plugins too

    root = typer.main.get_command(app)
    assert argv[1] in root.commands, f"`genmodels {argv[1]}` does not exist; commands: {sorted(root.commands)}"
    root.commands[argv[1]].make_context(argv[1], argv[2:])  # raises on an unknown option or a bad value


def _check_click(group, argv: list[str]) -> None:
    assert argv[1] in group.commands, f"`{argv[0]} {argv[1]}` does not exist"
    group.commands[argv[1]].make_context(argv[1], argv[2:])


def _check_prefect(argv: list[str]) -> None:
    # Prefect's CLI is cyclopts: parse_args binds the arguments without running anything. Root
    # options (--no-prompt) belong to the meta app.
    from prefect.cli._app import _app

    _, bound, *_ = _app.meta.parse_args(argv[1:], exit_on_error=False, print_error=False)
    _app.parse_args(list(bound.arguments.get("tokens", ())), exit_on_error=False, print_error=False)


def _check_command(argv: list[str]) -> None:
    import importlib.metadata

    program = argv[0]
    scripts = {e.name for e in importlib.metadata.entry_points(group="console_scripts")}
    assert program in scripts, f"no console script {program!r} is installed"
    if program == "genmodels":
        _check_genmodels(argv)
    elif program == "ray":
        from ray.scripts.scripts import cli

        _check_click(cli, argv)
    elif program == "mlflow":
        from mlflow.cli import cli

        _check_click(cli, argv)
    elif program == "prefect":
        _check_prefect(argv)


def test_every_command_of_our_image_names_a_real_entry_point_and_parses(services: dict):
    checked = set()
    for name, service in _our_services(services).items():
        commands = list(_simple_commands(_argv(service)))
        assert commands, f"{name} runs the image's default command"
        for argv in commands:
            assert argv[0] in CONSOLE_SCRIPTS, f"{name} runs {argv[0]!r}, not one of {sorted(CONSOLE_SCRIPTS)}"
            try:
                _check_command(argv)
            except Exception as exc:  # click/cyclopts usage errors: the message names the bad argument
                pytest.fail(f"{name}: `{shlex.join(argv)}` does not parse: {type(exc).__name__}: {exc}")
            checked.add((name, argv[0], argv[1]))
    assert {("serve", "genmodels", "serve"), ("ray-head", "ray", "start"), ("mlflow", "mlflow", "server"),
            ("prefect-worker", "prefect", "worker")} <= checked


def test_readme_compose_commands_name_real_services_and_parse(services: dict):
    text = README.read_text().replace("\\\n", " ")
    commands = re.findall(r"^docker compose exec (\S+) ([^#\n]+)", text, flags=re.M)
    assert len(commands) >= 4, "README's compose section shows how to retrain and run a bulk job"
    for service, command in commands:
        assert service in services, f"README: `docker compose exec {service}`: no such service"
        argv = shlex.split(command)
        try:
            _check_command(argv)
        except Exception as exc:
            pytest.fail(f"README: `{command.strip()}` does not parse: {type(exc).__name__}: {exc}")
        # Commands that talk to the servers must run where the stack's settings are.
        assert STACK_SETTINGS <= set(_env(services[service])), service


def test_prefect_worker_deploys_infra_prefect_yaml_to_the_pool_it_polls(services: dict):
    commands = list(_simple_commands(_argv(services["prefect-worker"])))
    pools = {d["work_pool"]["name"] for d in yaml.safe_load(PREFECT_FILE.read_text())["deployments"]}
    assert len(pools) == 1
    (pool,) = pools
    joined = [shlex.join(c) for c in commands]
    assert any(c.startswith(f"prefect work-pool create {pool} --type process") for c in joined), joined
    assert any("deploy --prefect-file infra/prefect.yaml --all" in c for c in joined), joined
    assert joined[-1].startswith(f"prefect worker start --pool {pool}"), joined


def test_drivers_join_the_cluster_at_the_head_gcs_port(services: dict):
    head_port = _listen_ports(services["ray-head"])
    for name in DRIVERS | {"ray-worker"}:
        starts = [c for c in _simple_commands(_argv(services[name])) if c[:2] == ["ray", "start"]]
        assert len(starts) == 1, f"{name} must join the cluster (one `ray start --address`)"
        (address,) = [w.split("=", 1)[1] for w in starts[0] if w.startswith("--address=")]
        host, port = address.split(":")
        assert host == "ray-head" and int(port) in head_port, f"{name}: {address}"
        if name in DRIVERS:
            # Zero CPUs: a driver's container takes no Train workers or sampler replicas.
            assert "--num-cpus=0" in starts[0], name
            assert _env(services[name]).get("RAY_ADDRESS") == address, name


# ---------------------------------------------------------------------------------------------
# Environment: one list, documented, set where needed, pointing at real services


def _code_reads() -> set[str]:
    names = set()
    read = re.compile(r"""(?:environ(?:\.get|\.setdefault|\.pop)?\s*[(\[]|getenv\()\s*["']([A-Z][A-Z0-9_]+)["']""")
    literal = re.compile(r"""["']((?:GENMODELS|MLFLOW|PREFECT|RAY|AWS)_[A-Z0-9_]+)["']""")
    for directory in CODE_DIRS:
        for path in (REPO / directory).rglob("*.py"):
            text = path.read_text()
            names |= set(read.findall(text)) | set(literal.findall(text))
    from genmodels.config import Settings

    prefix = Settings.model_config["env_prefix"]
    names |= {f"{prefix}{field}".upper() for field in Settings.model_fields}
    return names


def test_every_variable_the_code_reads_is_listed():
    missing = _code_reads() - ENVIRONMENT
    assert not missing, f"the code reads {sorted(missing)}: add them to ENVIRONMENT and README's Configuration table"


def test_readme_configuration_table_documents_every_variable():
    text = README.read_text()
    assert "## Configuration" in text
    section = text.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    rows = set(re.findall(r"^\|\s*`([A-Z][A-Z0-9_]+)`", section, flags=re.M))
    assert ENVIRONMENT <= rows, f"README's Configuration table lacks {sorted(ENVIRONMENT - rows)}"


def test_every_ray_node_and_driver_gets_the_platform_settings(services: dict):
    for name in RAY_NODES | DRIVERS:
        env = _env(services[name])
        missing = STACK_SETTINGS - {k for k, v in env.items() if v}
        assert not missing, f"{name}: settings missing or empty: {sorted(missing)}"
        assert env["RAY_AUTH_MODE"] == "token", name
        assert env["GENMODELS_STORAGE"].startswith("s3://"), name
        if name in RAY_NODES:
            # A node's own address comes from `ray start`; RAY_ADDRESS there would only mislead.
            assert "RAY_ADDRESS" not in env, name
            # Serve's processes read these at start: the same settings as `genmodels serve`.
            from serving.app import SERVE_ENV

            assert {k: env.get(k) for k in SERVE_ENV} == SERVE_ENV, name
    tokens = {_env(services[n])["RAY_AUTH_TOKEN"] for n in RAY_NODES | DRIVERS}
    assert len(tokens) == 1, "every Ray node must share one token"


def test_service_urls_point_at_services_that_listen_there(services: dict, env_example: dict[str, str]):
    for name, service in _our_services(services).items():
        for key, value in _env(service).items():
            if not value.startswith(("http://", "https://", "postgresql")):
                continue
            url = urlsplit(value)
            assert url.hostname in services, f"{name}: {key}={value} names no service"
            assert url.port in _listen_ports(services[url.hostname]) or (url.hostname == "postgres" and
                                                                         url.port == 5432), (
                f"{name}: {key}={value}, but {url.hostname} listens on {sorted(_listen_ports(services[url.hostname]))}")
    # The platform's storage is the bucket minio-init creates.
    bucket = env_example["MINIO_BUCKET"]
    for name in RAY_NODES | DRIVERS:
        assert urlsplit(_env(services[name])["GENMODELS_STORAGE"]).netloc == bucket, name
    assert _env(services["minio-init"])["MINIO_BUCKET"] == bucket


def test_prefect_server_runs_the_prefect_version_of_the_image(services: dict):
    import importlib.metadata

    image, _, tag = services["prefect-server"]["image"].partition(":")
    assert image == "prefecthq/prefect"
    # Workers and clients talk to the server through its REST API: keep them on one release.
    assert tag.split("-")[0] == importlib.metadata.version("prefect") == yaml.safe_load(
        PREFECT_FILE.read_text())["prefect-version"]


def test_mlflow_server_has_a_postgres_store_and_s3_artifacts(services: dict):
    mlflow = services["mlflow"]
    env = _env(mlflow)
    assert env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg2://")
    assert urlsplit(env["MLFLOW_BACKEND_STORE_URI"]).path == "/" + _env(services["postgres"])["POSTGRES_DB"]
    (argv,) = _simple_commands(_argv(mlflow))
    assert any(a.startswith("--artifacts-destination=s3://") for a in argv), argv
    # MLflow rejects Host headers it does not know: the name the other containers use must be one.
    (hosts,) = [a.split("=", 1)[1].split(",") for a in argv if a.startswith("--allowed-hosts=")]
    assert {"mlflow:5000", "localhost:5000"} <= set(hosts)


# ---------------------------------------------------------------------------------------------
# The image


def _instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def test_dockerfile_installs_cpu_torch_first_and_runs_as_a_non_root_user():
    steps = _instructions()
    runs = [rest for keyword, rest in steps if keyword == "RUN"]
    torch_at = next(i for i, r in enumerate(runs) if "pip install torch==" in r)
    package_at = next(i for i, r in enumerate(runs) if re.search(r"pip install \S*/app\[", r))
    assert torch_at < package_at, "torch must be installed before the package, or pip resolves a CUDA build"
    assert "--index-url https://download.pytorch.org/whl/cpu" in runs[torch_at]
    pinned = re.search(r"torch==(\S+)", runs[torch_at]).group(1)
    makefile_pin = re.search(r"pip install -q torch==(\S+)", (REPO / "Makefile").read_text()).group(1)
    assert pinned == makefile_pin == "2.13.0"
    assert re.search(r"\[all,server\]", runs[package_at]), "the image needs the server extra (MLflow's psycopg2)"
    users = [rest for keyword, rest in steps if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in {"0", "root"}, f"last USER is {users[-1:]}"
    last_user = max(i for i, (k, _) in enumerate(steps) if k == "USER")
    assert all(k in {"CMD", "ENTRYPOINT", "EXPOSE", "LABEL", "HEALTHCHECK"} for k, _ in steps[last_user + 1:])
    assert any("wget" in r and "bash" in r for r in runs), "KubeRay's probes need bash and wget"
    assert steps[0][0] == "ARG" and "python:3.11-slim" in steps[0][1]


def test_dockerfile_and_build_context_hold_no_secrets():
    secretive = re.compile(r"(PASSWORD|SECRET|TOKEN|ACCESS_KEY|API_KEY)", re.I)
    for keyword, rest in _instructions():
        if keyword in {"ENV", "ARG"}:
            assert not secretive.search(rest), f"{keyword} {rest}: credentials come from the environment at run time"
    rules = [r.strip() for r in DOCKERIGNORE.read_text().splitlines() if r.strip() and not r.startswith("#")]
    assert rules[0] == "*", ".dockerignore must start by excluding everything (an allow-list)"
    allowed = [r[1:].rstrip("/") for r in rules if r.startswith("!")]
    assert not [a for a in allowed if a.startswith((".env", "infra/k8s", ".git", ".venv"))], allowed
    # What the build needs is let through: pyproject's readme, the packages, the Prefect file.
    for needed in ("pyproject.toml", "README.md", "genmodels", "pipelines", "serving", "infra/prefect.yaml"):
        assert needed in allowed, needed


# ---------------------------------------------------------------------------------------------
# `genmodels serve --wait-for-champion`: what lets the serve service start before any retrain


def test_serve_waits_for_a_champion_then_fails_with_the_reason(monkeypatch):
    from typer.testing import CliRunner

    import serving.cli
    from genmodels import ray_runtime, registry
    from genmodels.cli import app

    answers = iter([[], [], ["digits-vae"]])
    monkeypatch.setattr(registry, "configure", lambda *a, **k: "sqlite:///unused")
    monkeypatch.setattr(registry, "served_models", lambda *a, **k: next(answers, ["digits-vae"]))
    monkeypatch.setattr(registry, "current_version", lambda name, *a, **k: "3")
    monkeypatch.setattr(serving.cli, "CHAMPION_POLL_S", 0.01)

    class Started(Exception):
        pass

    def ensure_ray(**kwargs):
        raise Started

    monkeypatch.setattr(ray_runtime, "ensure_ray", ensure_ray)
    # A champion appears on the third look: serving goes on (to Ray, stopped here).
    result = CliRunner().invoke(app, ["serve", "--wait-for-champion", "5"])
    assert isinstance(result.exception, Started), result.output

    # None ever: after the wait, the same one-line error as without waiting, exit code 2.
    monkeypatch.setattr(registry, "served_models", lambda *a, **k: [])
    result = CliRunner().invoke(app, ["serve", "--wait-for-champion", "0.05"])
    assert result.exit_code == 2 and "no registered model has a champion yet" in result.output

    # A named model without a champion is named in the error.
    monkeypatch.setattr(registry, "current_version", lambda name, *a, **k: None)
    result = CliRunner().invoke(app, ["serve", "--models", "digits-gan", "--wait-for-champion", "0.05"])
    assert result.exit_code == 2 and "digits-gan" in result.output


def test_the_slim_serving_stage_installs_the_serving_extra_alone_and_serves_on_every_interface():
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    stages = re.split(r"^FROM ", text, flags=re.M)[1:]
    build = next(s for s in stages if s.split()[2:3] == ["serving-build"])
    final = next(s for s in stages if s.split()[2:3] == ["serving"])
    assert re.search(r'pip install "/app\[serving\]" -c /app/constraints.txt', build)
    assert "torch" not in re.sub(r"#.*", "", build).replace('! python -c "import torch"', "")
    # The sed of the stage, applied to the real config: the proxy listens beyond loopback there.
    sed = re.search(r"sed '(s/[^']+)'", build).group(1)
    _, old, new, _ = sed.split("/")
    config = (REPO / "serving" / "config.yaml").read_text()
    served = re.sub(old.replace("^", "(?m)^", 1), new, config)
    assert yaml.safe_load(served)["http_options"]["host"] == "0.0.0.0"
    assert yaml.safe_load(served)["applications"] == yaml.safe_load(config)["applications"]
    assert 'CMD ["serve", "run", "/app/serve.yaml"]' in final and "USER 1000:1000" in final
    # `genmodels serve`'s throughput settings, which Serve reads when Ray starts: in the image's
    # environment and in the command the Serve config documents.
    from serving.app import SERVE_ENV

    env = dict(re.findall(r"\b(RAY_SERVE_\w+)=(\S+)", final))
    assert env == SERVE_ENV
    documented = dict(re.findall(r"\b(RAY_SERVE_\w+)=(\S+)", config))
    assert documented == SERVE_ENV
