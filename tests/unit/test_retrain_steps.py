"""What a retrain does around its steps when something other than training goes wrong.

- A retrain that lost its family's run lease (it stalled past the TTL and another retrain took
  the run over) publishes nothing more: the family fails naming ``LeaseLost``, and the steps
  after the loss (evaluate, register, promote) do not run; the same holds for the `genmodels`
  commands that write a run (``train``, ``evaluate``, ``run``): one line, exit code 2.
- The comparison report failing (storage, MLflow) leaves the families' outcome as it is: the
  flow fails only if a family failed, and the CLI still prints the outcome table.

The flow runs as a plain function (``retrain.fn``) over faked steps: no Prefect, Ray or MLflow.
"""

from __future__ import annotations

import logging
import re
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from genmodels import records
from genmodels.cli import app
from genmodels.lease import Lease
from genmodels.storage import FileStorage

runner = CliRunner()

TRAINED = {"epochs": 2, "planned_epochs": 2, "finished": True, "best_val_loss": 1.0, "stopped_early": False,
           "seconds": 1.0}
PROMOTION = {"alias": "champion", "previous_champion": None, "candidate_value": 1.0, "champion_value": None,
             "reason": "no champion yet"}


def flat(output: str) -> str:
    return " ".join(re.sub(r"[\u2500-\u257f]", " ", output).split())


def take_over(store, dataset: str, family: str) -> Lease:
    """What another retrain does once this one stalled past the lease's TTL: the current
    generation reads as expired, and the other takes the next one."""
    storage = FileStorage(store)
    key = max(storage.list(f"leases/retrain/{dataset}/{family}/"))
    held = storage.get_json(key)
    storage.put_json(key, {**held, "expires_at": 0})
    return Lease(storage, f"retrain/{dataset}/{family}", owner="other-host:42").acquire()


@pytest.fixture
def flow_env(tmp_path, monkeypatch):
    """The retrain flow with every step faked; ``env.calls`` lists the steps run, ``env.during``
    maps a step name to what to do while it runs (e.g. lose the lease)."""
    from genmodels import registry
    from pipelines import flows, tasks

    monkeypatch.setenv("GENMODELS_WORK_DIR", str(tmp_path / "work"))
    monkeypatch.setattr(flows, "get_run_logger", lambda: logging.getLogger("test-retrain"))
    monkeypatch.setattr(registry, "configure", lambda *a, **k: "sqlite://")
    env = SimpleNamespace(store=tmp_path / "store", calls=[], during={}, others=[])
    env.url = env.store.resolve().as_uri()

    def step(name, result):
        def run(*args, **kwargs):
            env.calls.append((name, args[2] if name == "train" else None))
            if name in env.during:
                env.during[name](*args)
            return result(*args) if callable(result) else result
        return run

    def registered(run_url, *_):
        family = run_url.rsplit("/", 1)[-1]
        return {"name": f"digits-{family}", "version": "1", "run_id": f"run-{family}", "model_digest": "d",
                "gate_metric": "nll_nats", "gate_value": 1.0, "snapshot_hash": "h", "created": True}

    monkeypatch.setattr(tasks, "prepare_data", step("prepare", {"prefix": "snapshots/digits/h", "hash": "h",
                                                                "dataset": "digits", "sizes": {}}))
    monkeypatch.setattr(tasks, "train", step("train", lambda s, p, family, *a: {**TRAINED, "run": f"file:///{family}"}))
    monkeypatch.setattr(tasks, "evaluate", step("evaluate", {"nll_nats": 1.0}))
    monkeypatch.setattr(tasks, "export_onnx", step("export", []))
    monkeypatch.setattr(tasks, "register", step("register", registered))
    monkeypatch.setattr(tasks, "promote", step("promote", {**PROMOTION, "name": "n", "version": "1"}))
    monkeypatch.setattr(tasks, "report", step("report", None))
    yield env
    for other in env.others:
        other.release()


def steps(env) -> list[str]:
    return [name for name, _ in env.calls]


# --- the run lease ---------------------------------------------------------------------------------
@pytest.mark.parametrize("lost_during, ran", [
    ("train", ["prepare", "train"]),
    ("evaluate", ["prepare", "train", "evaluate", "export"]),
    ("register", ["prepare", "train", "evaluate", "export", "register"]),
])
def test_a_retrain_that_lost_its_lease_fails_the_family_and_publishes_nothing_more(flow_env, lost_during, ran):
    from pipelines.flows import RetrainFailed, retrain

    flow_env.during[lost_during] = lambda *a: flow_env.others.append(take_over(flow_env.store, "digits", "vae"))
    with pytest.raises(RetrainFailed, match="vae \\(LeaseLost: ") as failed:
        retrain.fn(families="vae", dataset="digits", storage=flow_env.url)
    assert steps(flow_env) == ran  # never promoted (nor registered, unless lost during registration)
    assert failed.value.outcomes == {}
    (record,) = records.list_retrains(flow_env.url)
    assert record["status"] == "failed"
    assert record["outcomes"]["vae"]["status"] == "failed" and "LeaseLost" in record["outcomes"]["vae"]["error"]
    # The run is the other retrain's now: its lease is left as it took it.
    assert flow_env.others[0].holder()["owner"] == "other-host:42"


def test_losing_one_familys_lease_leaves_the_others_to_finish(flow_env):
    from pipelines.flows import RetrainFailed, retrain

    def lose_vae(storage_url, prefix, family, *a):
        if family == "vae":
            flow_env.others.append(take_over(flow_env.store, "digits", "vae"))

    flow_env.during["train"] = lose_vae
    with pytest.raises(RetrainFailed) as failed:
        retrain.fn(families="vae,cvae", dataset="digits", storage=flow_env.url)
    assert list(failed.value.failed) == ["vae"] and list(failed.value.outcomes) == ["cvae"]
    assert [family for name, family in flow_env.calls if name == "train"] == ["vae", "cvae"]
    assert steps(flow_env).count("promote") == 1


@pytest.fixture
def cli_store(tmp_path, monkeypatch):
    """`genmodels train|evaluate|run` over a faked snapshot (no data prepared); the lease taken
    over by ``take_over`` is released afterwards."""
    import genmodels.cli as cli

    monkeypatch.setenv("GENMODELS_WORK_DIR", str(tmp_path / "work"))
    monkeypatch.setattr(cli, "_snapshot", lambda storage, dataset, *a: SimpleNamespace(dataset=dataset))
    env = SimpleNamespace(store=tmp_path / "store", others=[], calls=[])
    yield env
    for other in env.others:
        other.release()


def _fake_outcome(storage):
    result = SimpleNamespace(resumed_from_epoch=0, epochs_completed=2, stopped_early=False, best_val_loss=1.0)
    run = storage.child("runs/digits/vae-quick")
    return SimpleNamespace(result=result, run=run, finished=True, train_config=SimpleNamespace(epochs=2))


@pytest.mark.parametrize("command", ["train", "run"])
def test_cli_training_that_lost_its_lease_stops_before_evaluating(cli_store, monkeypatch, command):
    from genmodels import runs

    def train_family(storage, snap, family, *a, **k):
        cli_store.calls.append("train")
        cli_store.others.append(take_over(cli_store.store, "digits", family))
        return _fake_outcome(storage)

    monkeypatch.setattr(runs, "train_family", train_family)
    monkeypatch.setattr(runs, "evaluate_run", lambda *a, **k: cli_store.calls.append("evaluate") or {})
    monkeypatch.setattr(runs, "write_report", lambda *a, **k: cli_store.calls.append("report"))
    family_opt = "--family" if command == "train" else "--families"
    result = runner.invoke(app, [command, family_opt, "vae", "--dataset", "digits", "--out", str(cli_store.store)])
    assert result.exit_code == 2, result.output
    out = flat(result.output)
    assert "error: vae: lease 'retrain/digits/vae' is no longer held" in out and "took the run over" in out
    assert "Traceback" not in result.output
    assert cli_store.calls == ["train"]


def test_cli_evaluation_that_lost_its_lease_does_not_report_its_metrics(cli_store, monkeypatch):
    from genmodels import runs

    def evaluate_run(storage, run, snap, *a, **k):
        cli_store.others.append(take_over(cli_store.store, "digits", "vae"))
        return {"nll_nats": 1.0}

    monkeypatch.setattr(runs, "evaluate_run", evaluate_run)
    result = runner.invoke(app, ["evaluate", "--family", "vae", "--dataset", "digits", "--out", str(cli_store.store)])
    assert result.exit_code == 2, result.output
    assert "no longer held" in flat(result.output) and "nll_nats" not in result.output


# --- the comparison report -------------------------------------------------------------------------
def _report_fails(flow_env, monkeypatch):
    from pipelines import tasks

    def report(*a, **k):
        flow_env.calls.append(("report", None))
        raise ConnectionError("connection reset by peer writing reports/digits-quick.png")

    monkeypatch.setattr(tasks, "report", report)


def test_a_failed_report_does_not_fail_a_retrain_whose_families_succeeded(flow_env, monkeypatch, caplog):
    from pipelines.flows import retrain

    _report_fails(flow_env, monkeypatch)
    with caplog.at_level(logging.WARNING, logger="test-retrain"):
        outcomes = retrain.fn(families="vae", dataset="digits", storage=flow_env.url)
    assert list(outcomes) == ["vae"] and steps(flow_env)[-1] == "report"
    assert "comparison report was not written" in caplog.text and "connection reset" in caplog.text
    (record,) = records.list_retrains(flow_env.url)
    assert record["status"] == "succeeded"


@pytest.mark.parametrize("families, exit_code", [("vae", 0), ("vae,gan", 1)])
def test_cli_retrain_with_a_failed_report_exits_by_the_families_and_prints_the_table(
        flow_env, monkeypatch, families, exit_code):
    from pipelines import flows, tasks

    _report_fails(flow_env, monkeypatch)

    def export(run_url):
        if run_url.endswith("gan"):
            raise RuntimeError("ExportParityError: generator max abs diff 0.3")
        return []

    monkeypatch.setattr(tasks, "export_onnx", export)
    monkeypatch.setattr(flows, "retrain", flows.retrain.fn)
    monkeypatch.setenv("COLUMNS", "200")
    result = runner.invoke(app, ["retrain", "--family", families, "--dataset", "digits", "--out", flow_env.url])
    assert result.exit_code == exit_code, result.output
    out = flat(result.output)
    assert "digits-vae 1 nll_nats 1.0000 champion no champion yet" in out  # the outcome table
    assert "connection reset" not in out  # not an error of the retrain
    if exit_code:
        assert "error: retrain failed for gan" in out and "done: vae" in out

