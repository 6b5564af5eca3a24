"""The retrain flow: prepare_data -> (train -> evaluate -> export_onnx -> register -> promote)
for each family, on the embedded defaults unless pointed elsewhere:

- compute: a local Ray started by the process, or the cluster at ``RAY_ADDRESS``;
- orchestration: Prefect's ephemeral server, or ``PREFECT_API_URL``;
- tracking/registry: ``sqlite:///<work dir>/mlflow.db``, or ``MLFLOW_TRACKING_URI``;
- storage: ``file://<work dir>/store``, or ``GENMODELS_STORAGE`` (``s3://bucket/prefix``, with
  ``AWS_ENDPOINT_URL`` for MinIO-style endpoints).

Everything is checked before any training starts (families, preset, storage reachable, dataset
readable). Families run one after another on the shared cluster; one family's failure does not
stop the others, and the flow fails at the end naming each failed family.

However it ends (past the input checks), the run leaves an outcome record under
``<storage>/retrains/`` (:class:`genmodels.records.RetrainRecorder`), read by ``genmodels status``.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from genmodels import runs
from genmodels.config import get_settings
from genmodels.models import parse_families
from genmodels.records import RetrainRecorder
from pipelines import tasks

#: Datasets whose readers have no default location: without a source every run of them fails.
NEEDS_SOURCE = ("folder", "npz")


def check_plan(families: list[str], preset: str, workers: int | None, storage_url: str,
               overrides: dict[str, Any] | None = None, *, dataset: str | None = None,
               source: str | None = None) -> None:
    """Bad input fails here, before data is prepared or a Ray worker starts. ``workers=None``:
    each family's preset says (``TrainConfig.workers``). ``overrides``: TrainConfig fields over
    each preset, refused as training would refuse them. ``dataset``/``source``: a dataset that
    cannot be read without a source is refused."""
    from genmodels.data.loader import check_global_batch
    from genmodels.storage import check_reachable
    from genmodels.training import TrainConfig, check_shared_examples, preset_configs

    if workers is not None and workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if dataset in NEEDS_SOURCE and not source:
        raise ValueError(f"the {dataset} dataset needs a source (--source: "
                         f"{'a directory or an s3:// prefix' if dataset == 'folder' else 'a .npz path or URL'})")
    for family in families:
        _, preset_cfg = preset_configs(family, preset)
        try:
            # The config tasks.train builds (runs.plan_run): its own checks, not a copy of them.
            cfg = TrainConfig.from_dict({**preset_cfg.to_dict(), **(overrides or {})})
            if workers is not None:
                check_global_batch(cfg.batch_size, workers)
                if cfg.max_train_examples is not None:
                    # The split may hold fewer still (checked by the workers); a cap below the
                    # workers fails whatever the data, retried by Ray until it gives up.
                    check_shared_examples(cfg.max_train_examples, workers)
        except ValueError as exc:
            raise ValueError(f"{family} ({preset} preset): {exc}") from None
    check_reachable(storage_url)


@flow(name="retrain", validate_parameters=True)
def retrain(
    families: str = "all",
    dataset: str = "fashion-mnist",
    preset: str = "quick",
    workers: int | None = None,
    source: str | None = None,
    quantization: str = "binary",
    seed: int = 0,
    if_no_champion: bool = False,
    image_size: int | None = None,
    channels: str = "L",
    fresh: bool = False,
    overrides: dict[str, Any] | None = None,
    storage: str | None = None,
) -> dict[str, dict[str, Any]]:
    """Retrain ``families`` ("all" or a comma list) on ``dataset``; register each model and
    promote it where it beats the champion. ``if_no_champion``: skip families that already have
    one. ``overrides``: TrainConfig fields over the preset (e.g. ``{"epochs": 2}``).
    ``image_size`` / ``channels``: how a folder source is read (resized to a square; L or RGB). Returns,
    per family, the outputs of its steps."""
    from genmodels import registry

    settings = get_settings()
    names = parse_families(families)
    storage_url = storage or settings.storage_url
    if dataset == "fashion-mnist" and source is None:
        source = settings.fashion_mnist_dir
    check_plan(names, preset, workers, storage_url, overrides, dataset=dataset, source=source)
    registry.configure()
    registry.check_experiment(dataset)
    logger = get_run_logger()
    params = {"workers": workers, "source": source, "quantization": quantization, "seed": seed,
              "image_size": image_size, "channels": channels, "if_no_champion": if_no_champion, "fresh": fresh,
              "overrides": overrides}
    # The outcome record (<storage>/retrains/) is written however the block below ends.
    with RetrainRecorder(storage_url, run_id=str(flow_run.id or "local"), dataset=dataset, preset=preset,
                         families=names, parameters=params) as record:
        if if_no_champion:
            have = [f for f in names if registry.champion(registry.registered_name(dataset, f)) is not None]
            if have:
                logger.info("champions exist for %s: not retrained", ", ".join(have))
            for family in have:
                record.skipped(family, "a champion exists (if_no_champion)")
            names = [f for f in names if f not in have]
            if not names:
                return {}

        snapshot = tasks.prepare_data(storage_url, dataset, source, quantization, seed, image_size, channels)
        record.snapshot(snapshot)
        artifact_root = f"{storage_url.rstrip('/')}/mlflow"
        outcomes: dict[str, dict[str, Any]] = {}
        failed: dict[str, str] = {}
        for family in names:
            try:
                # One retrain of a (dataset, family) at a time, whoever starts it (CLI, deployments):
                # they share its run directory and Ray run name, so a second one would mix its
                # checkpoint with the first one's graphs and metrics. It fails at once, saying who holds it.
                with runs.run_lease(storage_url, dataset, family) as lease:
                    trained = tasks.train(storage_url, snapshot["prefix"], family, preset, workers,
                                          overrides={"seed": seed, **(overrides or {})}, fresh=fresh)
                    # A holder that stalled past the lease's TTL may have been superseded by another
                    # retrain of this family, now writing the same run directory: the model here
                    # may be the other's or half of it. Checked before each step that publishes it.
                    lease.check()
                    if not trained["finished"]:
                        # A time budget (max_seconds) stopped it with epochs left: a model the next
                        # run trains on is neither evaluated nor registered as a version.
                        why = (f"the time budget stopped training after epoch {trained['epochs']} of "
                               f"{trained['planned_epochs']}; the same retrain resumes it")
                        logger.warning("%s: %s", family, why)
                        record.skipped(family, why)
                        continue
                    metrics = tasks.evaluate(storage_url, snapshot["prefix"], trained["run"], preset, seed)
                    onnx = tasks.export_onnx(trained["run"])
                    lease.check()
                    registered = tasks.register(trained["run"], preset, metrics, artifact_root)
                    lease.check()
                    promotion = tasks.promote(storage_url, snapshot["prefix"], registered["name"],
                                              registered["version"], preset, seed)
            except Exception as exc:  # noqa: BLE001 - reported per family, then the flow fails below
                logger.error("%s failed: %s: %s", family, type(exc).__name__, exc)
                failed[family] = f"{type(exc).__name__}: {exc}"
                record.failed(family, failed[family])
                continue
            outcomes[family] = {"train": trained, "metrics": metrics, "onnx": onnx, "registered": registered,
                                "promotion": promotion}
            record.done(family, outcomes[family])
        if outcomes:
            try:
                # Logged only to the MLflow runs this retrain made: a version found registered
                # already keeps the picture of its own retrain, not one of models that came after.
                tasks.report(storage_url, snapshot["prefix"], preset, seed,
                             {family: out["registered"]["run_id"] for family, out in outcomes.items()
                              if out["registered"]["created"]})
            except Exception as exc:  # noqa: BLE001 - the families' outcome stands either way
                # The comparison picture is derived from what is already registered and promoted;
                # after its retries, a storage or MLflow outage here must not turn those into a
                # failed retrain (nor, in the CLI, into an input error that hides the outcomes).
                # The record has no field for it: the warning is the trace.
                logger.warning("the comparison report was not written (the families' outcomes stand): %s: %s",
                               type(exc).__name__, exc)
        if failed:
            raise RetrainFailed(failed, outcomes)
        return outcomes


class RetrainFailed(RuntimeError):
    """Some families failed; the others finished and are registered."""

    def __init__(self, failed: dict[str, str], outcomes: dict[str, dict[str, Any]]) -> None:
        self.failed, self.outcomes = failed, outcomes
        done = f"; done: {', '.join(outcomes)}" if outcomes else ""
        super().__init__("retrain failed for " + "; ".join(f"{f} ({why})" for f, why in failed.items()) + done)


def deployment(name: str, cron: str, parameters: dict[str, Any], timezone: str = "UTC"):
    """The retrain deployment on a cron schedule, for ``prefect.serve`` (``genmodels schedule``).
    One run at a time, as infra/prefect.yaml's nightly deployment: a run due while the last one
    still goes is cancelled, not started beside it (its families would only meet the runs'
    leases held and fail)."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.client.schemas.schedules import CronSchedule

    schedule = CronSchedule(cron=cron, timezone=timezone)  # validates the cron string
    retrain.validate_parameters(parameters)
    one_at_a_time = ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW)
    return retrain.to_deployment(name=name, schedule=schedule, parameters=parameters, concurrency_limit=one_at_a_time,
                                 description="Retrain, evaluate, export, register and promote genmodels families.")
