"""The retrain flow: prepare_data -> (train -> evaluate -> export_onnx -> register -> promote)
for each family, on the embedded defaults unless pointed elsewhere:

- compute: a local Ray started by the process, or the cluster at ``RAY_ADDRESS``;
- orchestration: Prefect's ephemeral server, or ``PREFECT_API_URL``;
- tracking/registry: ``sqlite:///<work dir>/mlflow.db``, or ``MLFLOW_TRACKING_URI``;
- storage: ``file://<work dir>/store``, or ``GENMODELS_STORAGE`` (``s3://bucket/prefix``, with
  ``AWS_ENDPOINT_URL`` for MinIO-style endpoints).

Everything is checked before any training starts (families, preset, storage reachable, dataset
readable). Families run ``parallel`` at a time on the shared cluster, longest first, each with
its share of the CPUs (:func:`plan_lanes`); one family's failure does not stop the others, and
the flow fails at the end naming each failed family.

However it ends (past the input checks), the run leaves an outcome record under
``<storage>/retrains/`` (:class:`genmodels.records.RetrainRecorder`), read by ``genmodels status``.
"""

from __future__ import annotations

import contextvars
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Iterator

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from genmodels.config import get_settings
from genmodels.lease import Lease
from genmodels.models import parse_families
from genmodels.records import RetrainRecorder
from pipelines import tasks

#: A retrain that stopped renewing its lease (killed) blocks the next one of its family this long.
RETRAIN_LEASE_TTL_S = 300.0


#: Start order when families share the cluster: the longest to train first, so that no long one
#: is left running alone on its share of the CPUs at the end (measured on 2 cores: the quick GAN
#: ~550 s, CVAE ~490 s and PixelRNN ~320 s with their evaluations, VAE ~300 s, mixture ~160 s;
#: the cpu preset's PixelRNN ~6,500 s).
START_ORDER = ("gan", "pixelrnn", "cvae", "vae", "mixture")


def plan_lanes(parallel: int | None, families: int, workers: int) -> tuple[int, int | None]:
    """(families trained at once, CPUs per Ray Train worker; None = the whole cluster's share).

    ``parallel=None`` picks: one at a time on a cluster with GPUs (each run wants the GPU),
    else as many as the cluster's CPUs give every worker one. Two 1-thread trainings on 2
    cores do 1.1-1.5x the images/s of one 2-thread training (benchmarks/RESULTS.md): the small
    nets' per-op overheads do not split across threads."""
    import ray

    from genmodels.ray_runtime import ensure_ray

    ensure_ray()
    resources = ray.cluster_resources()
    cpus = max(1, int(resources.get("CPU", 1)))
    if parallel is None:
        parallel = 1 if resources.get("GPU", 0) > 0 else cpus // workers
    lanes = max(1, min(parallel, families))
    return lanes, (None if lanes == 1 else max(1, cpus // (lanes * workers)))


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """What runs in this process beside the other lanes' work (exports, a promotion's
    re-evaluation of the champion) keeps to one lane's share of threads."""
    if threads is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def check_plan(families: list[str], preset: str, workers: int, storage_url: str,
               parallel: int | None = None) -> None:
    """Bad input fails here, before data is prepared or a Ray worker starts."""
    from genmodels.storage import check_reachable
    from genmodels.training import preset_configs

    for family in families:
        preset_configs(family, preset)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if parallel is not None and parallel < 1:
        raise ValueError(f"parallel must be >= 1 (families trained at once), got {parallel}")
    check_reachable(storage_url)


@flow(name="retrain", validate_parameters=True)
def retrain(
    families: str = "all",
    dataset: str = "fashion-mnist",
    preset: str = "quick",
    workers: int = 1,
    parallel: int | None = None,
    source: str | None = None,
    quantization: str = "binary",
    seed: int = 0,
    if_no_champion: bool = False,
    fresh: bool = False,
    overrides: dict[str, Any] | None = None,
    storage: str | None = None,
) -> dict[str, dict[str, Any]]:
    """Retrain ``families`` ("all" or a comma list) on ``dataset``; register each model and
    promote it where it beats the champion. ``if_no_champion``: skip families that already have
    one. ``overrides``: TrainConfig fields over the preset (e.g. ``{"epochs": 2}``).
    ``parallel``: families trained at once (None: :func:`plan_lanes` decides). Returns, per
    family, the outputs of its steps, in the order the families were asked for."""
    from genmodels import registry

    settings = get_settings()
    names = parse_families(families)
    storage_url = storage or settings.storage_url
    if dataset == "fashion-mnist" and source is None:
        source = settings.fashion_mnist_dir
    check_plan(names, preset, workers, storage_url, parallel)
    registry.configure()
    logger = get_run_logger()
    params = {"workers": workers, "parallel": parallel, "source": source, "quantization": quantization, "seed": seed,
              "if_no_champion": if_no_champion, "fresh": fresh, "overrides": overrides}
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

        snapshot = tasks.prepare_data(storage_url, dataset, source, quantization, seed)
        record.snapshot(snapshot)
        artifact_root = f"{storage_url.rstrip('/')}/mlflow"
        outcomes: dict[str, dict[str, Any]] = {}
        failed: dict[str, str] = {}
        # Export and the registry steps one family at a time: the ONNX exporter traces with
        # process-global state (two exports at once fail), the embedded sqlite tracking store
        # takes one writer, and a promotion may re-evaluate the champion in this process (on
        # torch's global RNG).
        one_at_a_time = threading.Lock()
        lanes, cpus_per_worker = plan_lanes(parallel, len(names), workers)

        def retrain_family(family: str) -> None:
            try:
                # One retrain of a (dataset, family) at a time, whoever starts it (CLI, deployments):
                # they share its run directory and Ray run name, so a second one would mix its
                # checkpoint with the first one's graphs and metrics. It fails at once, saying who holds it.
                with Lease(storage_url, f"retrain/{dataset}/{family}", ttl_s=RETRAIN_LEASE_TTL_S):
                    trained = tasks.train(storage_url, snapshot["prefix"], family, preset, workers,
                                          overrides={"seed": seed, **(overrides or {})}, fresh=fresh,
                                          cpus_per_worker=cpus_per_worker)
                    metrics = tasks.evaluate(storage_url, snapshot["prefix"], trained["run"], preset, seed,
                                             cpus=None if lanes == 1 else cpus_per_worker * workers)
                    with one_at_a_time:
                        onnx = tasks.export_onnx(trained["run"])
                        registered = tasks.register(trained["run"], preset, metrics, artifact_root)
                        promotion = tasks.promote(storage_url, snapshot["prefix"], registered["name"],
                                                  registered["version"], preset, seed)
            except Exception as exc:  # noqa: BLE001 - reported per family, then the flow fails below
                logger.error("%s failed: %s: %s", family, type(exc).__name__, exc)
                failed[family] = f"{type(exc).__name__}: {exc}"
                record.failed(family, failed[family])
                return
            outcomes[family] = {"train": trained, "metrics": metrics, "onnx": onnx, "registered": registered,
                                "promotion": promotion}
            record.done(family, outcomes[family])

        start = sorted(names, key=lambda f: START_ORDER.index(f) if f in START_ORDER else len(START_ORDER))
        if lanes > 1:
            logger.info("%d families at a time, %d CPU(s) per Ray worker: %s", lanes, cpus_per_worker,
                        ", ".join(start))
        with torch_threads(None if lanes == 1 else max(1, (os.cpu_count() or 1) // lanes)), \
                ThreadPoolExecutor(max_workers=lanes, thread_name_prefix="retrain") as pool:
            # Each lane runs in a copy of this context: Prefect's run context lives in contextvars.
            for future in [pool.submit(contextvars.copy_context().run, retrain_family, f) for f in start]:
                future.result()
        outcomes = {f: outcomes[f] for f in names if f in outcomes}
        if outcomes:
            tasks.report(storage_url, snapshot["prefix"], preset, seed,
                         {family: out["registered"]["run_id"] for family, out in outcomes.items()})
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
    """The retrain deployment on a cron schedule, for ``prefect.serve`` (``genmodels schedule``)."""
    from prefect.client.schemas.schedules import CronSchedule

    schedule = CronSchedule(cron=cron, timezone=timezone)  # validates the cron string
    retrain.validate_parameters(parameters)
    return retrain.to_deployment(name=name, schedule=schedule, parameters=parameters,
                                 description="Retrain, evaluate, export, register and promote genmodels families.")
