"""The retrain flow end to end on real components on loopback: Prefect (test harness server),
a local Ray cluster with 2 Train workers, MLflow on sqlite, and S3 over HTTP (moto), on digits.

One flow run trains the VAE and the PixelRNN (the two kinds of sampler graphs); the module's
tests then check what it left behind, and that running it again adds nothing.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow

FAMILIES = ("vae", "pixelrnn")
# Every digit (1,293) in batches of 32: ~80 steps over the two epochs, which the quick preset's
# conv VAE needs to beat a coin flip per pixel (256 images gave it 4 steps: 45.9 nats).
TINY = {"epochs": 2, "max_train_examples": None, "batch_size": 32, "max_val_examples": 128}


@pytest.fixture(scope="module")
def stack(tmp_path_factory, s3_endpoint):
    """Prefect, Ray and MLflow for the module; storage in a fresh bucket on the moto server."""
    import boto3
    from prefect.testing.utilities import prefect_test_harness

    from genmodels.ray_runtime import ensure_ray, stop_ray

    work = tmp_path_factory.mktemp("work")
    bucket = "genmodels-flow"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    with pytest.MonkeyPatch.context() as mp, prefect_test_harness(server_startup_timeout=120):
        mp.setenv("GENMODELS_WORK_DIR", str(work))
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{work}/mlflow.db")
        mp.delenv("MLFLOW_S3_ENDPOINT_URL", raising=False)
        ensure_ray(num_cpus=2)
        try:
            yield {"storage": f"s3://{bucket}/store", "bucket": bucket, "work": work}
        finally:
            stop_ray()


def _retrain(stack, **kwargs):
    from pipelines.flows import retrain

    return retrain(families=",".join(FAMILIES), dataset="digits", preset="quick", workers=2, overrides=TINY,
                   storage=stack["storage"], **kwargs)


@pytest.fixture(scope="module")
def first_run(stack):
    return _retrain(stack)


def _s3_objects(bucket: str, prefix: str) -> dict[str, bytes]:
    import boto3

    s3 = boto3.client("s3")
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            for o in page.get("Contents", [])]
    return {k: s3.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


def test_every_family_is_registered_with_metrics_tags_and_artifacts(stack, first_run, tmp_path):
    from mlflow import MlflowClient

    from genmodels import records, registry, runs
    from genmodels.evaluation import evaluation_settings
    from genmodels.evaluation.classifier import load_classifier
    from genmodels.models import weights_digest
    from genmodels.storage import open_storage

    def cached_network(tags) -> str:
        key = f"classifiers/{tags['genmodels.snapshot_hash'][:16]}.pt"
        return weights_digest(load_classifier(open_storage(stack["storage"]).get_bytes(key))[0])

    client = MlflowClient()
    assert set(first_run) == set(FAMILIES)
    # What `genmodels status` shows: the run's outcome record, in the storage.
    last = records.last_retrain(stack["storage"])
    assert last["status"] == "succeeded" and set(last["outcomes"]) == set(FAMILIES)
    assert {o["status"] for o in last["outcomes"].values()} == {"registered"}
    for family, outcome in first_run.items():
        reg = outcome["registered"]
        assert reg["name"] == f"digits-{family}" and reg["created"]
        assert outcome["promotion"]["alias"] == "champion"
        mv = client.get_model_version_by_alias(reg["name"], "champion")
        assert str(mv.version) == reg["version"]
        run = client.get_run(mv.run_id)
        # Every evaluation metric, the full config as params, the provenance as tags.
        for key, value in outcome["metrics"].items():
            assert run.data.metrics[key] == pytest.approx(value)
        assert 0 < run.data.metrics["nll_nats"] < 64 * 0.6932
        assert json.loads(run.data.params["train.epochs"]) == 2
        assert run.data.params["family"] == family
        tags = run.data.tags
        assert tags["genmodels.snapshot_hash"] == outcome["registered"]["snapshot_hash"]
        assert len(tags["genmodels.git_commit"]) >= 7
        epochs_logged = client.get_metric_history(mv.run_id, "epoch_train_loss")
        assert [m.step for m in epochs_logged] == [1, 2]
        # The domain classifier the figures were measured with: the one cached in the storage.
        record_path = client.download_artifacts(mv.run_id, runs.EVALUATION_RECORD, str(tmp_path))
        record = json.loads(Path(record_path).read_text())
        assert mv.tags[registry.FEATURE_NETWORK_TAG] == record["feature_network"] == cached_network(tags)
        assert record["settings"] == evaluation_settings("quick") and record["seed"] == 0
        artifacts = {a.path for a in client.list_artifacts(mv.run_id)}
        assert {"samples.png", "model.pt", "metrics.json", runs.EVALUATION_RECORD, "history.json", "onnx"} <= artifacts
        assert ("interpolation.png" in artifacts) == (family == "vae")  # latent families only
        onnx_logged = {Path(a.path).name for a in client.list_artifacts(mv.run_id, "onnx")}
        assert onnx_logged == {Path(u).name for u in outcome["onnx"]}


def test_the_families_side_by_side_are_reported_and_logged(stack, first_run):
    import io

    from mlflow import MlflowClient
    from PIL import Image

    objects = _s3_objects(stack["bucket"], "store/reports/")
    picture = objects["store/reports/digits-quick.png"]
    assert b"| vae |" in objects["store/reports/digits-quick.md"]
    with Image.open(io.BytesIO(picture)) as grid:
        width, height = grid.size
    assert width > 4 * height  # one row of 10 samples per family, two families
    client = MlflowClient()
    for outcome in first_run.values():
        run_id = outcome["registered"]["run_id"]
        assert "comparison.png" in {a.path for a in client.list_artifacts(run_id)}


def test_champion_pyfunc_samples_what_torch_samples(stack, first_run):
    import mlflow
    import pandas as pd

    from genmodels.models import load_checkpoint, model_from_checkpoint
    from genmodels.storage import open_storage

    for family, outcome in first_run.items():
        pyfunc = mlflow.pyfunc.load_model(f"models:/digits-{family}@champion")
        model = model_from_checkpoint(load_checkpoint(open_storage(outcome["train"]["run"]).get_bytes("model.pt")))
        with torch.no_grad():
            want = model.sample(6, seed=11, temperature=0.9).numpy()
        (got,) = pyfunc.predict(pd.DataFrame({"seed": [11], "n": [6], "temperature": [0.9]}))["images"]
        assert got.shape == want.shape == (6, 1, 8, 8)
        assert np.abs(got - want).max() <= 1e-4, family
        # Also through the ONNX flavor: the version carries its graphs as ONNX models.
        assert mlflow.onnx.load_model(f"models:/digits-{family}@champion").graph.node


def test_everything_lands_in_s3_and_reads_back_identical(stack, first_run):
    from mlflow import MlflowClient

    objects = _s3_objects(stack["bucket"], "store/")
    keys = set(objects)
    # The snapshot, with its manifest's checksums matching the objects.
    (manifest_key,) = [k for k in keys if k.startswith("store/snapshots/digits/") and k.endswith("manifest.json")]
    manifest = json.loads(objects[manifest_key])
    base = manifest_key.rsplit("/", 1)[0]
    for name, entry in manifest["files"].items():
        assert hashlib.sha256(objects[f"{base}/{name}"]).hexdigest() == entry["sha256"]
    for family, outcome in first_run.items():
        run = f"store/runs/digits/{family}-quick"
        # Ray Train checkpoints went to the same bucket.
        assert any(k.startswith(f"store/ray/digits/{family}-quick-") and k.endswith("/checkpoint.pt") for k in keys)
        # MLflow artifacts live under the store too, byte-identical to the run's files.
        mv = MlflowClient().get_model_version(outcome["registered"]["name"], outcome["registered"]["version"])
        logged = {k.rsplit("/", 1)[-1]: v for k, v in objects.items()
                  if k.startswith("store/mlflow/digits/") and f"/{mv.run_id}/artifacts/" in k}
        assert logged["model.pt"] == objects[f"{run}/model.pt"]
        assert logged["samples.png"] == objects[f"{run}/samples.png"]
        for url in outcome["onnx"]:
            name = url.rsplit("/", 1)[-1]
            assert logged[name] == objects[f"{run}/onnx/{name}"]


def test_running_again_adds_no_version(stack, first_run, monkeypatch):
    from mlflow import MlflowClient

    logged, log_artifact = [], MlflowClient.log_artifact
    monkeypatch.setattr(MlflowClient, "log_artifact",
                        lambda self, run_id, path, *a, **k: logged.append((run_id, Path(path).name))
                        or log_artifact(self, run_id, path, *a, **k))
    again = _retrain(stack)
    # The versions found registered keep the comparison picture of the retrain that made them.
    assert ("comparison.png" not in {name for _, name in logged}), logged
    client = MlflowClient()
    for family in FAMILIES:
        name = f"digits-{family}"
        assert again[family]["registered"]["created"] is False
        assert again[family]["registered"]["version"] == first_run[family]["registered"]["version"]
        assert [str(mv.version) for mv in client.search_model_versions(f"name='{name}'")] == ["1"]
        assert again[family]["promotion"]["alias"] == "champion"
        # Training resumed the finished run: the model is the same bytes.
        assert again[family]["train"]["epochs"] == 2
    # With champions in place, if_no_champion has nothing to do.
    assert _retrain(stack, if_no_champion=True) == {}


def test_a_family_its_time_budget_stopped_is_neither_evaluated_nor_registered(stack, first_run):
    from mlflow import MlflowClient

    from genmodels import records
    from pipelines.flows import retrain

    out = retrain(families="gan", dataset="digits", preset="quick", workers=2,
                  overrides={**TINY, "epochs": 3, "max_seconds": 0.0, "max_train_examples": 64}, storage=stack["storage"])
    assert out == {}
    assert MlflowClient().search_registered_models(filter_string="name='digits-gan'") == []
    outcome = records.last_retrain(stack["storage"])["outcomes"]["gan"]
    assert outcome == {"status": "skipped", "reason": "the time budget stopped training after epoch 1 of 3; the "
                                                      "same retrain resumes it"}


def test_failed_parity_fails_the_family_and_registers_nothing(stack, first_run, monkeypatch):
    from mlflow import MlflowClient

    from genmodels import export
    from pipelines.flows import RetrainFailed, retrain

    def disagree(model, files, **kwargs):
        raise export.ExportParityError(f"{model.family} graph 'sampler': ONNX and torch disagree (test)")

    monkeypatch.setattr(export, "check_parity", disagree)
    with pytest.raises(RetrainFailed) as failure:
        retrain(families="mixture", dataset="digits", preset="quick", workers=2, overrides=TINY,
                storage=stack["storage"])
    assert set(failure.value.failed) == {"mixture"}
    assert "ExportParityError" in failure.value.failed["mixture"]
    assert MlflowClient().search_registered_models(filter_string="name='digits-mixture'") == []
    assert not _s3_objects(stack["bucket"], "store/runs/digits/mixture-quick/onnx/")
