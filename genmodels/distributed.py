"""Distributed training on Ray Train: the same loop as local training, under DDP.

:func:`train_on_ray` runs a ``TorchTrainer`` whose ``train_loop_per_worker`` is
:func:`ray_train_loop`: each worker reads the dataset snapshot from object storage (nothing
depends on the driver's disk), trains with :class:`RayTrainContext`, and reports a checkpoint
every ``checkpoint_every`` epochs (1 by default; the mixture's presets 4-10) to
``<storage>/ray/<dataset>/<run name>`` (file or S3, the same store as everything else). When a
worker dies, Ray Train (``FailureConfig(max_failures=N)``) restarts the group, which resumes from
the last reported checkpoint: at most the epochs since it are lost, none is counted twice.
Running the same plan again resumes (or finds it finished) instead of retraining.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit

import torch

from genmodels.data.loader import check_global_batch
from genmodels.storage import FileStorage, S3Storage, Storage
from genmodels.training import (CHECKPOINT_KEY, RESUME_FREE_TRAIN_FIELDS, TrainingContext, TrainResult,
                                early_stop_reached, load_resume_state, load_training_state, shipped_model)

log = logging.getLogger(__name__)


class RayTrainContext(TrainingContext):
    """A worker of a Ray Train group: DDP wrapping, collectives, checkpoints as reports."""

    def __init__(self) -> None:
        import ray.train

        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()

    def _dist(self):
        import torch.distributed as dist

        return dist if self.world_size > 1 and dist.is_initialized() else None

    def wrap(self, model):
        if self._dist() is None:
            return model
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [torch.cuda.current_device()] if next(model.parameters()).is_cuda else None
        # Multi-player models (the GAN) leave one player's parameters out of the other's graph.
        return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=len(model.players()) > 1)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        dist = self._dist()
        if dist is not None:
            dist.all_reduce(tensor)
        return tensor

    def broadcast_(self, tensor: torch.Tensor) -> None:
        dist = self._dist()
        if dist is not None:
            dist.broadcast(tensor, src=0)

    def load_state(self) -> dict[str, Any] | None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as directory:
            with open(os.path.join(directory, CHECKPOINT_KEY), "rb") as f:
                return load_resume_state(f.read(), checkpoint_url(checkpoint))

    def state_url(self) -> str | None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        return None if checkpoint is None else checkpoint_url(checkpoint)

    def save_state(self, state_bytes: bytes, epoch: int, metrics: Mapping[str, float]) -> None:
        import ray.train

        # Every worker reports (Ray Train V2 needs all of them); only the chief ships a checkpoint.
        if not self.is_chief:
            ray.train.report(dict(metrics))
            return
        with tempfile.TemporaryDirectory() as directory:
            with open(os.path.join(directory, CHECKPOINT_KEY), "wb") as f:
                f.write(state_bytes)
            ray.train.report(dict(metrics), checkpoint=ray.train.Checkpoint.from_directory(directory),
                             checkpoint_dir_name=f"epoch-{epoch:05d}")

    def report(self, metrics: Mapping[str, float]) -> None:
        import ray.train

        ray.train.report(dict(metrics))


def checkpoint_url(checkpoint) -> str:
    """Where a Ray Train checkpoint's training state lives, as a URL: ``as_directory`` may hand
    over a temporary copy, whose path would lead nobody to the damaged object."""
    path = f"{checkpoint.path.rstrip('/')}/{CHECKPOINT_KEY}"
    kind = getattr(checkpoint.filesystem, "type_name", None)
    if kind == "s3":
        return f"s3://{path}"  # pyarrow's S3 paths are bucket/key, without the scheme
    if kind == "local":
        return Path(path).as_uri()
    return path


def ray_train_loop(config: Mapping[str, Any], context_class: type[RayTrainContext] = RayTrainContext) -> None:
    """Per-worker entry point. ``config``: storage_url, snapshot_prefix, family,
    model_config (dict), train_config (dict), meta (dict); optional threads_per_worker and
    deadline (a :func:`time.time` instant: the end of the driver's ``max_seconds``)."""
    from genmodels.data import read_snapshot
    from genmodels.models import initial_model
    from genmodels.storage import open_storage
    from genmodels.training import TrainConfig, train

    import ray.train.torch

    torch.set_num_threads(max(1, int(config.get("threads_per_worker", 1))))
    snapshot = read_snapshot(open_storage(config["storage_url"]), config["snapshot_prefix"])
    train_cfg = TrainConfig.from_dict({**config["train_config"], "device": str(ray.train.torch.get_device())})
    if config.get("deadline") is not None:
        # A worker group Ray restarts after a failure enters here again: the budget is the
        # invocation's, counted from the driver's start, not a fresh one per restart. Past it, one
        # epoch still runs (the loop checks after each), as in a run started with no time left.
        train_cfg = dataclasses.replace(train_cfg, max_seconds=max(0.0, config["deadline"] - time.time()))
    model = initial_model(config["family"], snapshot.image, config["model_config"], train_cfg.seed)
    context = context_class()
    # The driver keeps the checkpoint's weights, not this process's model: it finishes them itself.
    train(model, snapshot, train_cfg, context, meta=config.get("meta"), finish=False)


# --- the driver side ---------------------------------------------------------------------------
#: Worker-group starts Ray Train retries before the run fails (each waits up to
#: ``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S``, 60 s by default, for its resources).
WORKER_GROUP_START_TRIES = 5

@dataclass(frozen=True)
class RayScaling:
    """How a run uses the Ray cluster. ``num_workers=None``: the preset's ``TrainConfig.workers``,
    as many of them as the cluster holds (:func:`fitting_workers`); more than it holds are
    refused (:func:`train_on_ray`). ``cpus_per_worker=None``
    shares the cluster's CPUs evenly between the workers (each uses that many torch threads)."""

    num_workers: int | None = None
    use_gpu: bool | None = None  # None: GPUs when the cluster has one per worker
    cpus_per_worker: int | None = None
    max_failures: int = 2

    def __post_init__(self) -> None:
        if self.num_workers is not None and self.num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {self.num_workers}")
        if self.cpus_per_worker is not None and self.cpus_per_worker < 1:
            raise ValueError(f"cpus_per_worker must be >= 1, got {self.cpus_per_worker}")
        if self.max_failures < 0:
            raise ValueError(f"max_failures must be >= 0, got {self.max_failures}")


def worker_room(resources: Mapping[str, float], use_gpu: bool | None = None) -> int:
    """How many data-parallel workers the cluster places at once: one per GPU of a cluster that
    has GPUs (unless ``use_gpu`` is False), else one per CPU."""
    gpus = int(resources.get("GPU", 0)) if use_gpu is not False else 0
    return gpus if gpus else int(resources.get("CPU", 1))


def fitting_workers(wanted: int, resources: Mapping[str, float], batch_size: int, use_gpu: bool | None = None) -> int:
    """At most ``wanted`` data-parallel workers, as many as the cluster places
    (:func:`worker_room`), and a number that divides the global batch: a worker group larger
    than the cluster would wait for resources forever."""
    workers = max(1, min(wanted, worker_room(resources, use_gpu)))
    while batch_size % workers:
        workers -= 1
    return workers


def ray_storage(storage: Storage) -> tuple[str, Any]:
    """(``storage_path``, ``storage_filesystem``) for Ray Train's ``RunConfig`` on ``storage``.

    S3 goes through pyarrow's S3 filesystem so that a custom endpoint (MinIO, moto) is honoured;
    its path is ``bucket/prefix`` without the scheme."""
    if isinstance(storage, FileStorage):
        return str(storage.root), None
    if isinstance(storage, S3Storage):
        from pyarrow import fs

        endpoint = storage.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        options: dict[str, Any] = {"region": os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
                                   or "us-east-1"}
        if endpoint:
            parts = urlsplit(endpoint)
            options.update(endpoint_override=parts.netloc or parts.path, scheme=parts.scheme or "https")
        path = f"{storage.bucket}/{storage.prefix}" if storage.prefix else storage.bucket
        return path, fs.S3FileSystem(**options)
    raise TypeError(f"no Ray Train storage for {type(storage).__name__}")


def ray_run_name(family: str, preset: str, model_config: Mapping[str, Any], train_config: Mapping[str, Any],
                 snapshot_hash: str, num_workers: int) -> str:
    """A run's Ray Train name: the same plan (config, data, world size) maps to the same name and
    so resumes; any change starts a new run instead of resuming an incompatible checkpoint. The
    invocation's budget, device and checkpoint cadence are not the plan (as for a local run)."""
    train_plan = {k: v for k, v in train_config.items() if k not in RESUME_FREE_TRAIN_FIELDS}
    plan = {"family": family, "model": model_config, "train": train_plan, "snapshot": snapshot_hash,
            "workers": num_workers}
    if num_workers > 1:
        # Until 80df1d9 each of several workers took a whole batch_size: a run of that meaning
        # must not resume under this one (one worker's batches did not change).
        plan["batch"] = "global"
    plan = json.dumps(plan, sort_keys=True, default=str)
    return f"{family}-{preset}-{hashlib.sha256(plan.encode()).hexdigest()[:12]}"


def train_on_ray(
    storage: Storage,
    snapshot,
    family: str,
    preset: str,
    *,
    scaling: RayScaling = RayScaling(),
    overrides: Mapping[str, Any] | None = None,
    model_overrides: Mapping[str, Any] | None = None,
    fresh: bool = False,
    keep_checkpoints: int | None = 2,
    train_loop: Callable[[Mapping[str, Any]], None] = ray_train_loop,
):
    """Train one family on the Ray cluster (``ensure_ray`` first) and write the run's model and
    history where :func:`genmodels.runs.train_family` would; returns a ``TrainOutcome``.

    The snapshot must already be in ``storage`` (``genmodels.runs.snapshot_for``). Ray keeps
    the last ``keep_checkpoints`` epoch checkpoints of the run (None: all). ``train_loop``: the
    per-worker entry point, :func:`ray_train_loop` or a wrapper of it (tests inject faults so)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from genmodels.runs import TrainOutcome, finish_run, plan_run, run_prefix

    model, train_cfg, meta = plan_run(snapshot, family, preset, overrides=overrides, model_overrides=model_overrides)
    model_config = {k: v for k, v in model.config.to_dict().items() if k != "image"}
    resources = ray.cluster_resources()
    workers = scaling.num_workers or fitting_workers(train_cfg.workers, resources, train_cfg.batch_size,
                                                     scaling.use_gpu)
    use_gpu = scaling.use_gpu if scaling.use_gpu is not None else resources.get("GPU", 0) >= workers
    if workers > worker_room(resources, use_gpu):
        # Ray Train would wait for the group forever, saying nothing (only an asked-for count can
        # exceed the room: fitting_workers stays within it).
        gpus = f" and {resources.get('GPU', 0):g} GPUs" if use_gpu else ""
        raise ValueError(f"{workers} workers asked for, but the Ray cluster has {resources.get('CPU', 0):g} CPUs"
                         f"{gpus}: it places at most {worker_room(resources, use_gpu)} "
                         f"(one per {'GPU' if use_gpu else 'CPU'})")
    check_global_batch(train_cfg.batch_size, workers)
    # The run records the workers it got, not the preset's wish (a smaller cluster gets fewer;
    # a run resumes only on as many as it started with: they are part of its name).
    train_cfg = dataclasses.replace(train_cfg, workers=workers)
    log.info("%s (%s): %d data-parallel worker(s) for the global batch of %d", family, preset, workers,
             train_cfg.batch_size)
    cpus = scaling.cpus_per_worker or max(1, int(resources.get("CPU", 1)) // workers)
    name = ray_run_name(family, preset, model_config, train_cfg.to_dict(), snapshot.hash, workers)
    ray_root = storage.child(f"ray/{snapshot.dataset}")
    if fresh:
        for key in ray_root.list(f"{name}/"):
            ray_root.delete(key)
    storage_path, filesystem = ray_storage(ray_root)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "storage_url": storage.url, "snapshot_prefix": snapshot.prefix, "family": family,
            "model_config": model_config, "train_config": train_cfg.to_dict(), "meta": meta,
            "threads_per_worker": cpus,
            "deadline": None if train_cfg.max_seconds is None else time.time() + train_cfg.max_seconds,
        },
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cpus}),
        run_config=RunConfig(
            name=name, storage_path=storage_path, storage_filesystem=filesystem,
            # A worker group that cannot start (its resources taken meanwhile, a node lost) is a
            # controller failure, which Ray retries without end by default: a few, then the error.
            failure_config=FailureConfig(max_failures=scaling.max_failures,
                                         controller_failure_limit=WORKER_GROUP_START_TRIES),
            checkpoint_config=CheckpointConfig(num_to_keep=keep_checkpoints),
        ),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError(f"Ray Train run {name} finished without a checkpoint")
    where = checkpoint_url(result.checkpoint)
    with result.checkpoint.as_directory() as directory:
        with open(os.path.join(directory, CHECKPOINT_KEY), "rb") as f:
            state = load_training_state(f.read(), where)
    ts = state["train_state"]
    # The workers' models die with them: finish the checkpoint's weights here, on the driver's
    # CPU (it may hold no accelerator, and the fit is one pass of inference).
    history = list(ts["history"])
    train_result = TrainResult(
        model=shipped_model(state, snapshot, torch.device("cpu"), where=where), history=history,
        epochs_completed=len(history),
        best_val_loss=None if ts["best_val"] == float("inf") else float(ts["best_val"]),
        stopped_early=early_stop_reached(train_cfg, ts.get("best_state_dict"), int(ts["bad_epochs"])),
        resumed_from_epoch=int(ts.get("resumed_from_epoch", 0)),
    )
    run = storage.child(run_prefix(snapshot.dataset, family, preset))
    finish_run(run, train_result, train_cfg, meta)
    return TrainOutcome(result=train_result, run=run, train_config=train_cfg)
