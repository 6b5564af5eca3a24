"""The registered MLflow model on its own: ``mlflow models serve --env-manager local`` from a
temporary directory, in a Python environment where ``import genmodels`` fails, answers the
sampling API's requests (a seed/n/label/temperature table) with the API's images, bit for bit
those of :class:`genmodels.sampling.OnnxSampler` over the same registered graphs.

Tiny VAE (unconditional) and CVAE (conditional) models are trained and registered once for the
module (``serving_fixtures.register_champions``); one scoring server serves the CVAE.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from registry_fixtures import registry_env
from serving_fixtures import free_port, register_champions

httpx = pytest.importorskip("httpx")
pytestmark = pytest.mark.slow

DATASET = "standalone"
REPO = Path(__file__).resolve().parents[2]
SERVER_START_S = 60.0


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """The tracking URI of a registry holding ``standalone-vae`` and ``standalone-cvae`` v1."""
    root = tmp_path_factory.mktemp("standalone")
    with registry_env(root) as uri:
        register_champions(root, DATASET, ["vae", "cvae"], metrics={"vae": {"nll_nats": 1.0},
                                                                    "cvae": {"nll_nats": 1.0}})
        yield uri


@pytest.fixture(scope="module")
def samplers(registry):
    """The library's runtime over the registered graphs: what the served images must equal."""
    from genmodels import registry as reg

    return {family: reg.load_sampler(f"{DATASET}-{family}").sampler for family in ("vae", "cvae")}


def _isolated_env(root: Path, tracking_uri: str) -> tuple[Path, dict[str, str]]:
    """A venv that sees this venv's packages but not genmodels, and the environment to run it in.

    This venv's site-packages is put on the new one's path by a plain .pth line, which does not
    run the .pth files found there: the editable install's import hook for genmodels stays off,
    as on a machine that never installed it."""
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    site = Path(sysconfig.get_paths(vars={"base": str(venv), "platbase": str(venv)})["purelib"])
    (site / "this_venv_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # `mlflow models serve --env-manager local` execs `uvicorn` from PATH.
    (venv / "bin" / "uvicorn").write_text(f"#!{venv}/bin/python\nimport sys\nfrom uvicorn.main import main\n"
                                          "sys.exit(main())\n")
    (venv / "bin" / "uvicorn").chmod(0o755)
    here = str(Path(sys.executable).parent)
    path = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and p != here and not p.startswith(str(REPO))]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(PATH=os.pathsep.join([str(venv / "bin"), *path]), MLFLOW_TRACKING_URI=tracking_uri,
               PYTHONUNBUFFERED="1")
    return venv / "bin" / "python", env


@pytest.fixture(scope="module")
def outside(registry, tmp_path_factory):
    """``(python, env, work)``: a Python and its environment where ``import genmodels`` fails,
    and a working directory outside the checkout."""
    work = tmp_path_factory.mktemp("outside")
    python, env = _isolated_env(work, registry)
    assert REPO not in work.parents and not env.get("PYTHONPATH")
    probe = subprocess.run([str(python), "-c", "import genmodels"], cwd=work, env=env, capture_output=True,
                           text=True, timeout=60)
    assert probe.returncode != 0 and "No module named 'genmodels'" in probe.stderr, probe.stderr
    return python, env, work


@pytest.fixture(scope="module")
def served(outside):
    """``http://127.0.0.1:<port>``: ``mlflow models serve`` of ``standalone-cvae`` v1, started
    outside the checkout; killed (its whole process group) at the end of the module."""
    python, env, work = outside
    port = free_port()
    log = (work / "server.log").open("w")
    proc = subprocess.Popen([str(python), "-m", "mlflow", "models", "serve", "-m", f"models:/{DATASET}-cvae/1",
                             "--env-manager", "local", "-p", str(port), "-h", "127.0.0.1", "-w", "1"],
                            cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow models serve exited with {proc.returncode}:\n{(work / 'server.log').read_text()}")
            try:
                if httpx.get(f"{url}/ping", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"no answer on {url}/ping in {SERVER_START_S} s:\n{(work / 'server.log').read_text()}")
            time.sleep(0.25)
        yield url
    finally:
        _kill_group(proc, signal.SIGTERM)  # the CLI and the uvicorn it started
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            _kill_group(proc, signal.SIGKILL)
            proc.wait(timeout=15)
        log.close()


def _kill_group(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # the group is gone already (the server failed)
        os.killpg(proc.pid, sig)


def invoke(url: str, columns: list[str], rows: list[list]) -> httpx.Response:
    return httpx.post(f"{url}/invocations", json={"dataframe_split": {"columns": columns, "data": rows}},
                      timeout=60)


def test_served_model_gives_the_api_array_images_of_the_sampler(served, samplers):
    from serving.api import encode_images

    sampler = samplers["cvae"]
    asked = invoke(served, ["seed", "n", "label", "temperature"], [[7, 3, 2, 0.8], [2**63 - 1, 2, 0, 1.0]])
    assert asked.status_code == 200, asked.text
    rows = asked.json()["predictions"]
    wants = [sampler.sample(3, 7, labels=2, temperature=0.8), sampler.sample(2, 2**63 - 1, labels=0)]
    assert len(rows) == 2
    for row, want in zip(rows, wants):
        assert row["images"] == encode_images(want, "array")  # the API's "array" answer, number for number
        got = np.asarray(row["images"], dtype=np.float64)
        assert got.shape == want.shape
        assert got.astype(np.float32).tobytes() == want.tobytes()
        np.testing.assert_array_equal(got, want.astype(np.float64))  # no rounding on the way through JSON

    # Same seed, same bytes; and the row's place in the table changes nothing.
    again = invoke(served, ["seed", "n", "label", "temperature"], [[7, 3, 2, 0.8]])
    assert again.status_code == 200
    first = invoke(served, ["seed", "n", "label", "temperature"], [[7, 3, 2, 0.8]])
    assert again.content == first.content
    assert again.json()["predictions"][0] == rows[0]


def test_served_conditional_model_without_labels_walks_the_classes_as_the_api_does(served, samplers):
    sampler = samplers["cvae"]
    asked = invoke(served, ["seed", "n"], [[5, 4]])
    assert asked.status_code == 200, asked.text
    (row,) = asked.json()["predictions"]
    want = sampler.sample(4, 5, labels=np.arange(4) % sampler.num_classes)
    assert np.asarray(row["images"], dtype=np.float32).tobytes() == want.tobytes()


@pytest.mark.parametrize(("columns", "rows", "message"), [
    (["n", "label"], [[2, 1]], "missing inputs ['seed']"),
    (["seed", "n"], [[1, 0]], "row 0: n must be in [1, 256], got 0"),
    (["seed", "n"], [[1, 2], [1, 257]], "row 1: n must be in [1, 256], got 257"),
    (["seed", "n", "label"], [[1, 2, 10]], "row 0: label must lie in [0, 10), got 10"),
    (["seed", "n", "labels"], [[1, 2, 3]], "the class column is 'label' (one class per row), not 'labels'"),
    (["seed", "n"], [[-1, 2]], "row 0: seed must be in [0, 2**63-1]"),
    (["seed", "n", "temperature"], [[1, 2, 0.0]], "row 0: temperature must be in [0.001, 100], got 0.0"),
    (["seed", "n", "temperature"], [[1, 2, 1e-40]], "row 0: temperature must be in [0.001, 100], got 1e-40"),
], ids=["no-seed", "n-zero", "n-too-large", "label-out-of-range", "the-apis-labels", "negative-seed", "zero-temperature",
        "underflowing-temperature"])
def test_served_model_refuses_bad_input_with_a_400_naming_the_defect(served, columns, rows, message):
    asked = invoke(served, columns, rows)
    assert asked.status_code == 400, asked.text
    assert message in asked.json()["message"]


def test_unconditional_pyfunc_samples_what_the_sampler_does_and_refuses_a_label(registry, samplers):
    import mlflow
    from mlflow.exceptions import MlflowException

    model = mlflow.pyfunc.load_model(f"models:/{DATASET}-vae/1")
    sampler = samplers["vae"]
    out = model.predict(pd.DataFrame({"seed": [3, 4], "n": [2, 1]}))
    assert list(out.columns) == ["images"] and len(out) == 2
    for images, (n, seed) in zip(out["images"], [(2, 3), (1, 4)]):
        assert images.dtype == np.float32
        assert images.tobytes() == sampler.sample(n, seed).tobytes()  # temperature 1.0 when left out
    with pytest.raises(MlflowException, match=r"row 0: vae model is unconditional: it takes no label$"):
        model.predict(pd.DataFrame({"seed": [3], "n": [2], "label": [1]}))
    # Dropped by MLflow (a log line) when the signature declared no params: temperature-1.0 images.
    with pytest.raises(MlflowException, match=r"^params \['temperature'\]: give seed, n, label and temperature "
                                               r"as columns of the input table"):
        model.predict(pd.DataFrame({"seed": [3], "n": [2]}), params={"temperature": 5.0})


def test_logged_model_ships_only_its_imports_and_pins_that_resolve_from_an_index(registry):
    import mlflow
    import yaml

    from genmodels import registry as reg

    local = Path(mlflow.artifacts.download_artifacts(f"models:/{DATASET}-cvae/1"))
    package = REPO / "genmodels"
    files, requirements = reg.pyfunc_code()
    shipped = sorted(p.relative_to(local / "code" / "genmodels") for p in (local / "code" / "genmodels").rglob("*.py"))
    assert shipped == sorted(f.relative_to(package) for f in files)
    assert Path("sampling.py") in shipped and Path("registry.py") not in shipped  # no MLflow/registry code
    pinned = [line for line in (local / "requirements.txt").read_text().splitlines() if line.strip()]
    assert set(pinned) == set(requirements)
    names = {line.partition("==")[0] for line in pinned}
    assert {"mlflow", "numpy", "onnxruntime", "pandas"} <= names and "genmodels" not in names
    assert all("==" in line and "+" not in line for line in pinned)  # no local labels (+cpu)
    assert "torch" not in names  # the runtime samples from the graphs with numpy and onnxruntime alone
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    assert set(mlmodel["flavors"]) == {"python_function", "onnx"}
    assert mlmodel["flavors"]["python_function"]["code"] == "code"
    meta = mlmodel["metadata"]["genmodels"]
    assert (meta["family"], meta["conditional"], meta["num_classes"], meta["max_n"]) == ("cvae", True, 10, 256)  # digits
    inputs = json.loads(mlmodel["signature"]["inputs"])
    assert [(c["name"], c["type"], c["required"]) for c in inputs] == [
        ("seed", "long", True), ("n", "long", True), ("label", "long", False), ("temperature", "double", False),
        ("labels", "long", False)]
    assert [c["name"] for c in json.loads(mlmodel["signature"]["outputs"])] == ["images"]


def test_the_shipped_code_is_what_the_runtime_imports_outside_the_checkout(outside):
    import mlflow

    python, env, work = outside
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{DATASET}-cvae/1", dst_path=str(work / "model")))
    code = local / "code"
    shipped = {".".join(p.relative_to(code).with_suffix("").parts).removesuffix(".__init__")
               for p in code.rglob("*.py")}
    listing = ("import json, sys\nsys.path.insert(0, sys.argv[1])\nimport genmodels.sampling\n"
               "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'genmodels')))\n")
    done = subprocess.run([str(python), "-c", listing, str(code)], cwd=work, env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert set(json.loads(done.stdout)) == shipped  # each shipped module is needed, none is missing
    assert "genmodels.sampling" in shipped and "genmodels.registry" not in shipped


def test_pyfunc_limits_are_the_apis():
    from pydantic import ValidationError

    from genmodels import checks, mlflow_model
    from serving.api import SampleRequest

    SampleRequest(n=mlflow_model.MAX_SAMPLES, temperature=checks.MAX_TEMPERATURE)
    SampleRequest(temperature=checks.MIN_TEMPERATURE)
    with pytest.raises(ValidationError):
        SampleRequest(n=mlflow_model.MAX_SAMPLES + 1)
    for outside in (np.nextafter(checks.MAX_TEMPERATURE, np.inf), np.nextafter(checks.MIN_TEMPERATURE, 0)):
        with pytest.raises(ValidationError):
            SampleRequest(temperature=outside)
        with pytest.raises(ValueError, match="temperature must be in"):
            checks.check_temperature(outside)
