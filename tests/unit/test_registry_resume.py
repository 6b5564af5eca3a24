"""Re-running a registration that was killed part way (genmodels.registry.register) on a real
MLflow (sqlite in a temp dir) with one tiny real VAE: it resumes with what the killed attempt
logged, and leaves one run per checkpoint, never a duplicate or a run RUNNING forever."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from genmodels import registry, runs
from genmodels.data import PrepConfig
from genmodels.storage import open_storage
from registry_fixtures import registry_env

DIGEST_TAG = "genmodels.model_digest"


class Killed(BaseException):
    """Stands in for SIGKILL: no ``except Exception`` on the way catches it, so nothing the code
    under test does on an error runs (the context managers' exits do, as they would not on a
    real kill: where that matters, the test builds the state a kill leaves by hand)."""


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("registry-resume")
    with registry_env(root):
        store = open_storage(root / "store")
        snapshot = runs.snapshot_for(store, "digits", None, PrepConfig(seed=0))
        outcome = runs.train_family(store.child("models/vae"), snapshot, "vae", "quick",
                                    overrides={"epochs": 1, "max_train_examples": 64, "seed": 0},
                                    model_overrides={"latent_dim": 3, "hidden": (16,)})
        runs.export_run(outcome.run)
        yield {"run": outcome.run, "snapshot_hash": snapshot.hash, "artifact_root": (root / "mlflow").as_uri()}


def register(work, dataset: str) -> registry.Registered:
    run = work["run"]
    with tempfile.TemporaryDirectory() as tmp:
        return registry.register(
            dataset=dataset, family="vae", preset="quick", checkpoint=run.get_bytes("model.pt"),
            onnx_files=runs.fetch_onnx(run, tmp), metrics={"nll_nats": 123.0}, params={"family": "vae"},
            snapshot_hash=work["snapshot_hash"], artifact_root=work["artifact_root"],
        )


def digest_runs(dataset: str, digest: str) -> dict[str, str]:
    """{run id: status} of every run of the dataset's experiment logged for this checkpoint."""
    from mlflow import MlflowClient

    client = MlflowClient()
    experiment = client.get_experiment_by_name(dataset)
    found = client.search_runs([experiment.experiment_id], filter_string=f"tags.`{DIGEST_TAG}` = '{digest}'")
    return {r.info.run_id: r.info.status for r in found}


def versions(name: str) -> dict[str, str]:
    """{version: run id} of a registered model."""
    from mlflow import MlflowClient

    return {str(mv.version): mv.run_id for mv in MlflowClient().search_model_versions(f"name='{name}'")}


def test_a_registration_killed_after_logging_its_run_registers_that_run_when_run_again(work, monkeypatch):
    import mlflow
    from mlflow import MlflowClient

    digest = registry.model_digest(work["run"].get_bytes("model.pt"))

    def killed(*args, **kwargs):
        raise Killed()

    with monkeypatch.context() as mp:
        mp.setattr(mlflow, "register_model", killed)
        with pytest.raises(Killed):
            register(work, "killed-late")
    left = digest_runs("killed-late", digest)
    assert list(left.values()) == ["FINISHED"] and versions("killed-late-vae") == {}
    (first,) = left

    reg = register(work, "killed-late")
    assert (reg.created, reg.version, reg.run_id) == (True, "1", first)
    assert digest_runs("killed-late", digest) == {first: "FINISHED"}  # no second run of the checkpoint
    assert versions("killed-late-vae") == {"1": first}
    experiment = MlflowClient().get_experiment_by_name("killed-late").experiment_id
    assert len(MlflowClient().search_logged_models([experiment])) == 1  # the model was not logged again

    again = register(work, "killed-late")
    assert (again.created, again.version, again.run_id) == (False, "1", first)
    assert digest_runs("killed-late", digest) == {first: "FINISHED"}


@pytest.mark.parametrize("left_as", ["RUNNING", "FINISHED"])
def test_a_run_a_killed_registration_left_without_its_model_is_marked_failed_and_not_reused(work, left_as):
    from mlflow import MlflowClient

    dataset = f"killed-early-{left_as.lower()}"
    checkpoint = work["run"].get_bytes("model.pt")
    digest = registry.model_digest(checkpoint)
    client = MlflowClient()
    # What a registration killed while logging leaves: the run with its tags and part of its
    # artifacts, no model; RUNNING forever after a SIGKILL (FINISHED: ended without a model).
    experiment = registry.experiment_id(dataset, work["artifact_root"])
    left = client.create_run(experiment, tags={DIGEST_TAG: digest, "genmodels.family": "vae"}).info.run_id
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "model.pt").write_bytes(checkpoint)
        client.log_artifact(left, str(Path(tmp) / "model.pt"))
    if left_as == "FINISHED":
        client.set_terminated(left, "FINISHED")
    assert digest_runs(dataset, digest) == {left: left_as}

    reg = register(work, dataset)
    assert reg.created and reg.version == "1" and reg.run_id != left
    assert digest_runs(dataset, digest) == {left: "FAILED", reg.run_id: "FINISHED"}
    assert versions(f"{dataset}-vae") == {"1": reg.run_id}
