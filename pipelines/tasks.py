"""The steps of a retrain, as Prefect tasks over `genmodels`.

Tasks take and return small JSON-able values (URLs, prefixes, hashes, metrics), never arrays,
so Prefect records every input and output. Retries, with exponential backoff, only where a
failure can be transient: object storage and the MLflow registry. Training, evaluation and
export are deterministic: retrying them would fail the same way (Ray restarts dead workers
itself)."""

from __future__ import annotations

import functools
import json
import sqlite3
import tempfile
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.tasks import exponential_backoff

from genmodels import registry, runs
from genmodels.data import PrepConfig
from genmodels.storage import open_storage


def is_transient(exc: BaseException | None) -> bool:
    """Connection trouble, throttling, server-side errors, a busy database: worth a retry.
    A bad request, a missing object or bucket, denied access, invalid data: not."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        try:
            from botocore.exceptions import (
                ClientError,
                ConnectionError as BotoConnectionError,
                IncompleteReadError,
                ReadTimeoutError,
                ResponseStreamingError,
            )

            # A read that timed out or a body cut off mid-download: botocore retries neither (the
            # response had begun), so the task's retry is the only one.
            if isinstance(exc, (BotoConnectionError, ReadTimeoutError, ResponseStreamingError, IncompleteReadError)):
                return True
            if isinstance(exc, ClientError):
                status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
                # RequestTimeout: S3's 400 for a connection idle too long mid-request.
                return status >= 500 or exc.response.get("Error", {}).get("Code") in (
                    "SlowDown", "Throttling", "RequestTimeout")
        except ImportError:
            pass
        try:
            from mlflow.exceptions import MlflowException

            if isinstance(exc, MlflowException):
                # Not INTERNAL_ERROR: the sqlite store wraps every unexpected exception, bugs
                # included, in it; MLflow's REST client already retries HTTP 5xx itself.
                return exc.error_code in ("TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED")
        except ImportError:
            pass
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return True
        if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
            return True
        # Only explicit chaining (raise ... from exc): an error raised while handling a
        # transient one is a different failure.
        exc = exc.__cause__
    return False


def _retry_if_transient(task, task_run, state) -> bool:
    return is_transient(state.data if isinstance(state.data, BaseException) else None)


TRANSIENT_RETRIES: dict[str, Any] = {
    "retries": 3, "retry_delay_seconds": exponential_backoff(backoff_factor=2), "retry_jitter_factor": 0.5,
    "retry_condition_fn": _retry_if_transient,
}


@functools.lru_cache(maxsize=2)
def _snapshot(storage_url: str, prefix: str):
    """Snapshots are immutable (content-addressed): one read per flow process is enough."""
    return runs.load_snapshot(open_storage(storage_url), prefix)


@task(name="prepare_data", **TRANSIENT_RETRIES)
def prepare_data(storage_url: str, dataset: str, source: str | None, quantization: str, seed: int,
                 image_size: int | None = None, channels: str = "L") -> dict[str, Any]:
    """Validate, quantize and split the source; store the content-hashed snapshot (once)."""
    storage = open_storage(storage_url)
    prep = PrepConfig(quantization=quantization, seed=seed, image_size=image_size, channels=channels)
    snapshot = runs.snapshot_for(storage, dataset, source, prep)
    sizes = {name: len(split.y) for name, split in snapshot.splits.items()}
    get_run_logger().info("snapshot %s of %s: %s", snapshot.hash[:16], dataset, sizes)
    return {"prefix": snapshot.prefix, "hash": snapshot.hash, "dataset": snapshot.dataset, "sizes": sizes}


@task(name="train")
def train(storage_url: str, snapshot_prefix: str, family: str, preset: str, workers: int | None,
          overrides: dict[str, Any] | None = None, fresh: bool = False) -> dict[str, Any]:
    """Distributed training on Ray Train; resumes the same plan's checkpoints. ``workers=None``:
    the preset's, as many as the cluster holds."""
    from genmodels.distributed import RayScaling, train_on_ray
    from genmodels.ray_runtime import ensure_ray

    ensure_ray()
    storage = open_storage(storage_url)
    outcome = train_on_ray(storage, _snapshot(storage_url, snapshot_prefix), family, preset,
                           scaling=RayScaling(num_workers=workers), overrides=overrides, fresh=fresh)
    r = outcome.result
    get_run_logger().info("%s: %d epochs, best val loss %s", family, r.epochs_completed, r.best_val_loss)
    return {"run": outcome.run.url, "epochs": r.epochs_completed, "planned_epochs": outcome.train_config.epochs,
            "finished": outcome.finished, "best_val_loss": r.best_val_loss, "stopped_early": r.stopped_early,
            "seconds": sum(h.get("seconds", 0.0) for h in r.history)}


@task(name="evaluate")
def evaluate(storage_url: str, snapshot_prefix: str, run_url: str, preset: str, seed: int) -> dict[str, float]:
    """Likelihoods, domain FID/KID, precision/recall, class accuracy; pictures into the run."""
    metrics = runs.evaluate_run(open_storage(storage_url), open_storage(run_url),
                                _snapshot(storage_url, snapshot_prefix), preset, seed=seed)
    get_run_logger().info("metrics: %s", json.dumps({k: round(v, 4) for k, v in metrics.items()}))
    return metrics


@task(name="export_onnx")
def export_onnx(run_url: str) -> list[str]:
    """ONNX graphs of the sampler, checked against torch; a disagreement fails the run here."""
    run = open_storage(run_url)
    return [run.url_for(key) for key in runs.export_run(run)]


@task(name="register", **TRANSIENT_RETRIES)
def register(run_url: str, preset: str, metrics: dict[str, float], artifact_root: str) -> dict[str, Any]:
    """An MLflow run with everything needed to reproduce and judge the model, registered as a
    version of ``<dataset>-<family>`` (the same model twice: the existing version)."""
    run = open_storage(run_url)
    checkpoint = run.get_bytes("model.pt")
    model, meta = runs.load_model(run)
    model_config = {k: v for k, v in model.config.to_dict().items() if k != "image"}
    pictures = {key: run.get_bytes(key) for key in runs.picture_keys(run)}
    artifacts = {**pictures, **{key: run.get_bytes(key) for key in ("metrics.json", "history.json")}}
    evaluation = runs.evaluation_record(run)  # empty for a run evaluated before it was written
    if evaluation:
        artifacts[runs.EVALUATION_RECORD] = json.dumps(evaluation, indent=2, sort_keys=True).encode()
    with tempfile.TemporaryDirectory() as tmp:
        registered = registry.register(
            dataset=meta["dataset"], family=model.family, preset=preset, checkpoint=checkpoint,
            onnx_files=runs.fetch_onnx(run, tmp), metrics=metrics,
            params={"family": model.family, "preset": preset, "dataset": meta["dataset"], "model": model_config,
                    "image": model.config.to_dict()["image"], "train": meta["train_config"]},
            snapshot_hash=meta["snapshot_hash"], artifact_root=artifact_root,
            artifacts=artifacts, history=json.loads(artifacts["history.json"]),
            feature_network=evaluation.get("feature_network"),
        )
    get_run_logger().info("%s version %s (%s)", registered.name, registered.version,
                          "new" if registered.created else "already registered")
    return registered.to_dict()


@task(name="report", **TRANSIENT_RETRIES)
def report(storage_url: str, snapshot_prefix: str, preset: str, seed: int, run_ids: dict[str, str]) -> str | None:
    """The families side by side: ``reports/<dataset>-<preset>.png`` (one row of samples per
    family, same seed) and the metrics table beside it, the picture also logged to the MLflow
    runs of ``run_ids`` (those the retrain registered)."""
    from mlflow.tracking import MlflowClient

    storage = open_storage(storage_url)
    report = runs.write_report(storage, _snapshot(storage_url, snapshot_prefix), preset, seed=seed)
    if report.picture is None:
        return None
    client = MlflowClient()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "comparison.png"
        path.write_bytes(report.picture)
        for run_id in run_ids.values():
            client.log_artifact(run_id, str(path))
    return storage.url_for(report.picture_key)


@task(name="promote", **TRANSIENT_RETRIES)
def promote(storage_url: str, snapshot_prefix: str, name: str, version: str, preset: str, seed: int) -> dict[str, Any]:
    """``champion`` moves to this version only if its gate metric beats the champion's."""
    from mlflow import MlflowClient

    def reevaluate(champion) -> float | None:
        candidate = MlflowClient().get_model_version(name, version)
        value, why_not = runs.reevaluate_champion(
            open_storage(storage_url), _snapshot(storage_url, snapshot_prefix), registry.download_checkpoint(champion),
            champion.tags, preset, seed=seed, feature_network=candidate.tags.get(registry.FEATURE_NETWORK_TAG),
            where=f"models:/{name}/{champion.version}", read_snapshot_at=functools.partial(_snapshot, storage_url))
        if why_not:
            get_run_logger().warning("champion v%s of %s cannot be compared with v%s: %s", champion.version, name,
                                     version, why_not)
        return value

    # The lease in the platform storage serializes promotions of one model across processes.
    decision = registry.promote(name, version, reevaluate=reevaluate, lease_storage=storage_url)
    get_run_logger().info("%s v%s -> %s: %s", name, version, decision.alias, decision.reason)
    return decision.to_dict()
