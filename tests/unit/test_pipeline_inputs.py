"""What the retrain pipeline does with failures and bad input, before and around training.

- ``is_transient`` separates failures worth a retry (connections, throttling, 5xx, a busy
  database) from those that would fail the same way again (bad data, missing objects, denied
  access, invalid requests), following exception chains;
- the project's Prefect retry policy retries only the former;
- the scheduled deployment carries its cron and parameters, and refuses bad ones;
- ``genmodels retrain`` / ``schedule`` turn bad input into exit code 2 and one clear line,
  before any training (no Ray, no run written).

Prefect runs against its test harness server (one per module); nothing here trains a model.
"""

from __future__ import annotations

import re
import sqlite3
import time
from types import SimpleNamespace

import pytest
from botocore.exceptions import (
    ClientError,
    EndpointConnectionError,
    IncompleteReadError,
    ReadTimeoutError,
    ResponseStreamingError,
)
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, TEMPORARILY_UNAVAILABLE
from typer.testing import CliRunner

from genmodels.cli import app
from genmodels.data.errors import DataError
from genmodels.export import ExportParityError
from genmodels.storage import StorageError
from pipelines.tasks import TRANSIENT_RETRIES, is_transient

runner = CliRunner()


def client_error(code: str, status: int, operation: str = "PutObject") -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": f"{code} (test)"},
                        "ResponseMetadata": {"HTTPStatusCode": status}}, operation)


def raised_from(cause: BaseException, outer: BaseException) -> BaseException:
    """``outer`` as actually raised ``from cause`` (so ``__cause__`` is set the way code sets it)."""
    try:
        try:
            raise cause
        except type(cause) as exc:
            raise outer from exc
    except type(outer) as exc:
        return exc


# --- is_transient ---------------------------------------------------------------------------------
TRANSIENT = {
    "endpoint connection": EndpointConnectionError(endpoint_url="http://127.0.0.1:9"),
    "http 503": client_error("ServiceUnavailable", 503),
    "slow down": client_error("SlowDown", 503),
    "slow down without 5xx status": client_error("SlowDown", 0),
    "storage error from a 503": raised_from(client_error("ServiceUnavailable", 503),
                                            StorageError("cannot write s3://b/k: ServiceUnavailable")),
    "storage error from a lost connection": raised_from(EndpointConnectionError(endpoint_url="http://127.0.0.1:9"),
                                                        StorageError("cannot reach s3://b")),
    "mlflow temporarily unavailable": MlflowException("db busy", error_code=TEMPORARILY_UNAVAILABLE),
    "sqlite locked": sqlite3.OperationalError("database is locked"),
    "connection error": ConnectionError("reset by peer"),
    "connection refused": ConnectionRefusedError(111, "Connection refused"),
    "read timeout": ReadTimeoutError(endpoint_url="http://127.0.0.1:9"),
    "body cut off mid-download": raised_from(ResponseStreamingError(error="Connection reset by peer"),
                                             StorageError("cannot read s3://b/k")),
    "incomplete read": IncompleteReadError(actual_bytes=10, expected_bytes=20),
    "s3 request timeout": client_error("RequestTimeout", 400),
}
PERMANENT = {
    "value error": ValueError("bad config"),
    "data error": DataError("/data/x.npz: labels out of range"),
    "export parity": ExportParityError("sampler: max abs diff 0.3"),
    "no such key": client_error("NoSuchKey", 404, "GetObject"),
    "access denied": client_error("AccessDenied", 403),
    "storage error from a 404": raised_from(client_error("NoSuchBucket", 404),
                                            StorageError("cannot write s3://b/k: no such bucket 'b'")),
    "mlflow invalid parameter": MlflowException("bad name", error_code=INVALID_PARAMETER_VALUE),
    "sqlite other": sqlite3.OperationalError("no such table: runs"),
    "none": None,
}


@pytest.mark.parametrize("exc", TRANSIENT.values(), ids=TRANSIENT.keys())
def test_transient_failures_are_retried(exc):
    assert is_transient(exc) is True


@pytest.mark.parametrize("exc", PERMANENT.values(), ids=PERMANENT.keys())
def test_permanent_failures_are_not_retried(exc):
    assert is_transient(exc) is False


def test_exception_chain_with_a_cycle_terminates():
    a, b = ValueError("a"), ValueError("b")
    a.__cause__, b.__cause__ = b, a
    assert is_transient(a) is False


def test_steps_that_touch_storage_or_registry_retry_and_deterministic_steps_do_not():
    from pipelines import tasks

    for step in (tasks.prepare_data, tasks.register, tasks.promote, tasks.report):
        assert step.retries == TRANSIENT_RETRIES["retries"] == 3, step.name
        assert step.retry_condition_fn is TRANSIENT_RETRIES["retry_condition_fn"], step.name
    for step in (tasks.train, tasks.evaluate, tasks.export_onnx):
        assert step.retries == 0, step.name


# --- the retry policy in Prefect ------------------------------------------------------------------
@pytest.fixture(scope="module")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def _counting_task(failures: list[BaseException]):
    """A task with the project's retry policy (no delay) that raises ``failures`` in turn, then
    returns "ok"; and the list of its calls."""
    from prefect import task

    calls: list[int] = []

    @task(name="flaky", **TRANSIENT_RETRIES)
    def flaky() -> str:
        calls.append(len(calls))
        if len(calls) <= len(failures):
            raise failures[len(calls) - 1]
        return "ok"

    fast = flaky.with_options(retry_delay_seconds=0)
    assert fast.retry_condition_fn is TRANSIENT_RETRIES["retry_condition_fn"]  # with_options keeps it
    return fast, calls


def _in_flow(step):
    from prefect import flow

    @flow(name="retry-policy-test")
    def run_it():
        return step()

    return run_it()


def test_transient_failure_is_retried_until_success(prefect_server):
    step, calls = _counting_task([
        EndpointConnectionError(endpoint_url="http://127.0.0.1:9"),
        raised_from(client_error("SlowDown", 503), StorageError("cannot write s3://b/k: SlowDown")),
    ])
    assert _in_flow(step) == "ok"
    assert len(calls) == 3


def test_transient_failure_gives_up_after_the_retries(prefect_server):
    step, calls = _counting_task([ConnectionError(f"attempt {i}") for i in range(10)])
    with pytest.raises(ConnectionError, match="attempt 3"):
        _in_flow(step)
    assert len(calls) == 1 + TRANSIENT_RETRIES["retries"]


def test_permanent_failure_is_not_retried(prefect_server):
    step, calls = _counting_task([ValueError("bad input"), ValueError("never reached")])
    with pytest.raises(ValueError, match="bad input"):
        _in_flow(step)
    assert len(calls) == 1


# --- the scheduled deployment ---------------------------------------------------------------------
def test_deployment_carries_cron_timezone_and_parameters():
    from prefect.client.schemas.schedules import CronSchedule

    from pipelines.flows import deployment

    params = {"families": "vae,cvae", "dataset": "digits", "preset": "quick", "workers": 2}
    dep = deployment("nightly", "0 3 * * *", params, timezone="Europe/Paris")
    assert dep.name == "nightly" and dep.flow_name == "retrain"
    assert dep.parameters == params
    (sched,) = dep.schedules
    assert isinstance(sched.schedule, CronSchedule)
    assert (sched.schedule.cron, sched.schedule.timezone, sched.active) == ("0 3 * * *", "Europe/Paris", True)
    # As infra/prefect.yaml's nightly run: one at a time, a run due meanwhile cancelled.
    assert dep.concurrency_limit == 1 and dep.concurrency_options.collision_strategy == "CANCEL_NEW"


@pytest.mark.parametrize("cron", ["not a cron", "61 3 * * *", "0 3 * *"])
def test_deployment_rejects_an_invalid_cron(cron):
    from pipelines.flows import deployment

    with pytest.raises(ValueError, match="cron"):
        deployment("nightly", cron, {"families": "vae"})


def test_deployment_rejects_an_unknown_parameter():
    from prefect.exceptions import SignatureMismatchError

    from pipelines.flows import deployment

    with pytest.raises(SignatureMismatchError, match="bogus"):
        deployment("nightly", "0 3 * * *", {"families": "vae", "bogus": 1})


def test_deployment_rejects_a_parameter_of_the_wrong_type():
    from prefect.exceptions import ParameterTypeError

    from pipelines.flows import deployment

    with pytest.raises(ParameterTypeError, match="workers"):
        deployment("nightly", "0 3 * * *", {"workers": "two"})


# --- the CLI ---------------------------------------------------------------------------------------
@pytest.fixture
def cli_env(tmp_path, monkeypatch):
    """A fresh work dir; no tracking, storage or Prefect server inherited from the environment."""
    for name in ("MLFLOW_TRACKING_URI", "GENMODELS_STORAGE", "PREFECT_API_URL", "RAY_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("GENMODELS_WORK_DIR", str(tmp_path))
    return tmp_path


def flat(output: str) -> str:
    """CLI output without rich's box drawing and line wrapping, for matching whole phrases."""
    return " ".join(re.sub(r"[\u2500-\u257f]", " ", output).split())


def invoke(*args, env=None):
    return runner.invoke(app, [str(a) for a in args], env=env)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--family", "vae,flow"], "unknown family 'flow'"),
        (["--family", "vae", "--preset", "huge"], "unknown preset 'huge'"),
    ],
    ids=["unknown family", "unknown preset"],
)
def test_retrain_bad_plan_exits_2_naming_it(cli_env, args, message):
    result = invoke("retrain", "--dataset", "digits", *args)
    assert result.exit_code == 2, result.output
    assert "error:" in result.output and message in flat(result.output)
    assert not (cli_env / "store").exists()  # refused before any storage was written


def test_retrain_zero_workers_is_refused(cli_env):
    result = invoke("retrain", "--family", "vae", "--dataset", "digits", "--workers", "0")
    assert result.exit_code == 2, result.output  # a usage error, from the option's min=1
    assert "Invalid value for '--workers'" in flat(result.output)
    assert not (cli_env / "store").exists()


def test_flow_check_plan_refuses_zero_workers(tmp_path):
    # The flow's own check, for callers that bypass the CLI (deployments, Python).
    from pipelines.flows import check_plan

    with pytest.raises(ValueError, match="workers must be >= 1, got 0"):
        check_plan(["vae"], "quick", 0, tmp_path.as_uri())
    # Workers take equal parts of the preset's global batch (the quick VAE's: 128).
    with pytest.raises(ValueError, match=r"vae \(quick preset\): batch_size 128 is the global batch of 3"):
        check_plan(["vae"], "quick", 3, tmp_path.as_uri())
    with pytest.raises(ValueError, match="batch_size 100 is the global batch of 8"):
        check_plan(["vae"], "quick", 8, tmp_path.as_uri(), overrides={"batch_size": 100})
    check_plan(["vae"], "quick", 4, tmp_path.as_uri())
    check_plan(["vae", "pixelrnn"], "quick", None, tmp_path.as_uri())  # each preset's own


def test_retrain_fewer_training_examples_than_workers_is_refused_before_any_work(cli_env):
    from pipelines.flows import check_plan

    # The workers' own refusal, said before Prefect and Ray start instead of after Ray's retries.
    result = invoke("retrain", "--family", "vae", "--dataset", "digits", "--max-train-examples", 1, "--workers", 2)
    assert result.exit_code == 2, result.output
    assert "vae (quick preset): 1 training examples cannot be shared by 2 workers" in flat(result.output)
    assert not (cli_env / "store").exists()
    check_plan(["vae"], "quick", 2, cli_env.as_uri(), overrides={"max_train_examples": 2})
    check_plan(["vae"], "quick", None, cli_env.as_uri(), overrides={"max_train_examples": 1})  # the cluster's count


def test_flow_check_plan_refuses_overrides_training_would_refuse(tmp_path):
    # The TrainConfig each family's train task would build, built here before any work.
    from pipelines.flows import check_plan

    with pytest.raises(ValueError, match=r"vae \(quick preset\): epochs must be >= 1, got 0"):
        check_plan(["vae"], "quick", None, tmp_path.as_uri(), overrides={"epochs": 0})
    with pytest.raises(ValueError, match="unknown keys \\['epoch'\\]"):
        check_plan(["vae"], "quick", None, tmp_path.as_uri(), overrides={"epoch": 2})
    check_plan(["vae", "gan"], "quick", None, tmp_path.as_uri(), overrides={"epochs": 1, "max_train_examples": 64})


def test_flow_check_plan_refuses_a_dataset_without_its_source(tmp_path):
    from pipelines.flows import check_plan

    for dataset in ("folder", "npz"):
        with pytest.raises(ValueError, match=f"the {dataset} dataset needs a source \\(--source"):
            check_plan(["vae"], "quick", None, tmp_path.as_uri(), dataset=dataset)
        check_plan(["vae"], "quick", None, tmp_path.as_uri(), dataset=dataset, source=str(tmp_path))
    check_plan(["vae"], "quick", None, tmp_path.as_uri(), dataset="digits")


@pytest.mark.parametrize("command, args, option", [
    ("retrain", ["--family", "vae", "--epochs", "-1"], "--epochs"),
    ("retrain", ["--family", "vae", "--epochs", "0"], "--epochs"),
    ("retrain", ["--family", "vae", "--max-train-examples", "-5"], "--max-train-examples"),
    ("train", ["--family", "vae", "--epochs", "0"], "--epochs"),
    ("train", ["--family", "vae", "--batch-size", "0"], "--batch-size"),
    ("run", ["--families", "vae", "--epochs", "-1"], "--epochs"),
    # The flow's prepare step refused it, after Prefect started (and every scheduled run would).
    ("retrain", ["--family", "vae", "--image-size", "0"], "--image-size"),
], ids=["retrain epochs -1", "retrain epochs 0", "retrain max examples -5", "train epochs 0", "train batch 0",
        "run epochs -1", "retrain image size 0"])
def test_bad_training_overrides_are_refused_before_any_work(cli_env, monkeypatch, command, args, option):
    import genmodels.cli as cli
    import pipelines.flows as flows

    started = []
    monkeypatch.setattr(flows, "retrain", lambda **kw: started.append(("retrain", kw)) or {})
    monkeypatch.setattr(cli, "_snapshot", lambda *a, **k: started.append(("prepare", a)) or pytest.fail("prepared"))
    result = invoke(command, "--dataset", "digits", *args)
    assert result.exit_code == 2, result.output
    assert f"Invalid value for '{option}'" in flat(result.output)
    assert started == [] and not (cli_env / "store").exists()


def test_retrain_missing_folder_fails_in_prepare_data_before_training(cli_env, prefect_server):
    import ray

    missing = "/nonexistent/genmodels-test-dir"
    result = invoke("retrain", "--family", "vae", "--dataset", "folder", "--source", missing)
    assert result.exit_code == 2, result.output
    assert "error:" in result.output and missing in flat(result.output)
    store = cli_env / "store"
    assert not (store / "runs").exists() and not (store / "snapshots").exists()
    assert not ray.is_initialized()
    # The failed run still left its outcome record, for `genmodels status`.
    from genmodels import records
    from genmodels.storage import FileStorage

    record = records.last_retrain(FileStorage(store))
    assert (record["status"], record["dataset"], record["outcomes"]) == ("failed", "folder", {"vae": {"status": "not_run"}})
    assert missing in record["error"] and len(record["run_id"]) == 36  # the Prefect flow run's UUID


def test_retrain_unreachable_storage_fails_fast_naming_bucket_and_endpoint(cli_env, closed_port):
    endpoint = f"http://127.0.0.1:{closed_port}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_MAX_ATTEMPTS": "1", "AWS_EC2_METADATA_DISABLED": "true"}
    t0 = time.perf_counter()
    result = invoke("retrain", "--family", "vae", "--dataset", "digits", "--out", "s3://somebucket/x", env=env)
    elapsed = time.perf_counter() - t0
    assert result.exit_code == 2, result.output
    assert "s3://somebucket/x" in flat(result.output) and endpoint in flat(result.output)
    assert elapsed < 30


def test_schedule_without_prefect_server_says_to_start_one(cli_env):
    result = invoke("schedule", "--cron", "0 3 * * *", "--family", "vae")
    assert result.exit_code == 2, result.output
    assert "prefect server start" in flat(result.output) and "PREFECT_API_URL" in flat(result.output)


def test_schedule_bad_cron_fails_before_contacting_the_server(cli_env, closed_port):
    env = {"PREFECT_API_URL": f"http://127.0.0.1:{closed_port}/api"}
    t0 = time.perf_counter()
    result = invoke("schedule", "--cron", "every night", "--family", "vae", env=env)
    assert result.exit_code == 2, result.output
    assert "error:" in result.output and "Invalid cron string" in flat(result.output)
    assert time.perf_counter() - t0 < 30


def test_schedule_unknown_family_exits_2(cli_env, closed_port):
    env = {"PREFECT_API_URL": f"http://127.0.0.1:{closed_port}/api"}
    result = invoke("schedule", "--cron", "0 3 * * *", "--family", "flow", env=env)
    assert result.exit_code == 2, result.output
    assert "unknown family 'flow'" in flat(result.output)


@pytest.fixture
def served(cli_env, closed_port, monkeypatch):
    """`genmodels schedule` against a Prefect server URL, with what it would serve recorded
    instead of served (``prefect.serve`` blocks)."""
    import prefect

    import pipelines.flows as flows

    monkeypatch.setenv("PREFECT_API_URL", f"http://127.0.0.1:{closed_port}/api")
    calls = SimpleNamespace(deployments=[], served=[])
    real = flows.deployment
    monkeypatch.setattr(flows, "deployment", lambda *a, **k: calls.deployments.append(a) or real(*a, **k))
    monkeypatch.setattr(prefect, "serve", lambda *d, **k: calls.served.append(d))
    return calls


@pytest.mark.parametrize("args, message", [
    (["--family", "vae", "--workers", "3"],
     "vae (quick preset): batch_size 128 is the global batch of 3 data-parallel workers"),
    (["--family", "vae", "--dataset", "folder"], "the folder dataset needs a source (--source"),
    (["--family", "vae", "--dataset", "npz"], "the npz dataset needs a source (--source"),
], ids=["workers 3", "folder without source", "npz without source"])
def test_schedule_refuses_a_plan_every_run_would_fail(served, args, message):
    result = invoke("schedule", "--cron", "0 3 * * *", *args)
    assert result.exit_code == 2, result.output
    assert "error:" in result.output and message in flat(result.output)
    assert served.deployments == [] and served.served == []


def test_schedule_refuses_an_image_size_every_run_would_refuse(served):
    result = invoke("schedule", "--cron", "0 3 * * *", "--family", "vae", "--image-size", "0")
    assert result.exit_code == 2, result.output
    assert "Invalid value for '--image-size'" in flat(result.output)
    assert served.deployments == [] and served.served == []


def test_schedule_passes_the_source_of_a_folder_to_its_runs(served, tmp_path):
    result = invoke("schedule", "--cron", "0 3 * * *", "--family", "vae", "--dataset", "folder",
                    "--source", tmp_path, "--image-size", 8, "--channels", "RGB", "--workers", 2)
    assert result.exit_code == 0, result.output
    ((dep,),) = served.served
    assert dep.parameters == {"families": "vae", "dataset": "folder", "preset": "quick", "workers": 2,
                              "source": str(tmp_path), "image_size": 8, "channels": "RGB"}


def _rgb_folder(root):
    """Two classes of RGB images of two sizes: readable only with --image-size, and grey unless
    --channels RGB."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i, size in enumerate([(6, 6), (7, 5)] * 10):
            Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8), "RGB").save(root / cls / f"{i}.png")
    return root


def test_run_and_the_retrain_flow_read_a_folder_with_its_size_and_channels(cli_env, tmp_path, monkeypatch):
    from genmodels import runs
    from genmodels.storage import FileStorage
    from pipelines import tasks

    source = _rgb_folder(tmp_path / "pictures")
    seen = []

    def stop_after_the_snapshot(storage, snapshot, *args, **kwargs):
        seen.append(snapshot.image)
        raise ValueError("stopped after the snapshot")

    monkeypatch.setattr(runs, "train_family", stop_after_the_snapshot)
    result = invoke("run", "--families", "mixture", "--dataset", "folder", "--source", source,
                    "--image-size", 8, "--channels", "RGB", "--out", tmp_path / "store")
    assert "stopped after the snapshot" in flat(result.output), result.output
    assert (seen[0].channels, seen[0].height, seen[0].width) == (3, 8, 8)

    monkeypatch.setattr(tasks, "get_run_logger", lambda: __import__("logging").getLogger("test"))
    prepared = tasks.prepare_data.fn((tmp_path / "store").as_uri(), "folder", str(source), "binary", 0, 8, "RGB")
    snapshot = runs.load_snapshot(FileStorage(tmp_path / "store"), prepared["prefix"])
    assert (snapshot.image.channels, snapshot.image.height, snapshot.image.width) == (3, 8, 8)
    from pipelines.flows import retrain

    assert {"image_size", "channels"} <= set(retrain.parameters.properties)
