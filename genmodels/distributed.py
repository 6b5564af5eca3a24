"""Distributed training on Ray Train: the same loop as local training, under DDP.

:func:`ray_train_loop` is the ``train_loop_per_worker`` of a ``TorchTrainer``; each worker
reads the dataset snapshot from object storage (nothing depends on the driver's disk),
trains with :class:`RayTrainContext`, and reports a checkpoint every epoch. When a worker
dies, Ray Train (``FailureConfig(max_failures=N)``) restarts the group, which resumes from
the last reported checkpoint: at most the epoch in progress is lost, none is counted twice.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Mapping

import torch

from genmodels.training import CHECKPOINT_KEY, TrainingContext, load_training_state


class RayTrainContext(TrainingContext):
    """``fail_once_at_epoch`` / ``fail_marker`` are a test hook for fault tolerance: rank 1
    (rank 0 in a one-worker group) raises when about to report epoch ``fail_once_at_epoch``
    (1-based), unless the file ``fail_marker`` exists, which it creates first, so that only the
    first attempt fails and the restarted group runs through."""

    def __init__(self, fail_once_at_epoch: int | None = None, fail_marker: str | None = None) -> None:
        import ray.train

        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        if (fail_once_at_epoch is None) != (fail_marker is None):
            raise ValueError("fail_once_at_epoch and fail_marker go together (a test hook)")
        self.fail_once_at_epoch, self.fail_marker = fail_once_at_epoch, fail_marker

    def _maybe_fail(self, metrics: Mapping[str, float]) -> None:
        if self.fail_once_at_epoch is None or self.rank != min(1, self.world_size - 1):
            return
        if int(metrics["epoch"]) == self.fail_once_at_epoch and not os.path.exists(self.fail_marker):
            with open(self.fail_marker, "w") as f:
                f.write(f"rank {self.rank} failed at epoch {self.fail_once_at_epoch}\n")
            raise RuntimeError(f"injected failure (test hook) on rank {self.rank} at epoch {self.fail_once_at_epoch}")

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
                return load_training_state(f.read())

    def save_state(self, state_bytes: bytes, epoch: int, metrics: Mapping[str, float]) -> None:
        import ray.train

        self._maybe_fail(metrics)
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

        self._maybe_fail(metrics)
        ray.train.report(dict(metrics))


def ray_train_loop(config: Mapping[str, Any]) -> None:
    """Per-worker entry point. ``config``: storage_url, snapshot_prefix, family,
    model_config (dict), train_config (dict), meta (dict); optional threads_per_worker, and
    the test hook fail_once_at_epoch + fail_marker (see :class:`RayTrainContext`)."""
    from genmodels.data import read_snapshot
    from genmodels.models import family_class
    from genmodels.storage import open_storage
    from genmodels.training import TrainConfig, train

    import ray.train.torch

    torch.set_num_threads(max(1, int(config.get("threads_per_worker", 1))))
    snapshot = read_snapshot(open_storage(config["storage_url"]), config["snapshot_prefix"])
    cls = family_class(config["family"])
    model = cls(cls.config_class.from_dict({**config["model_config"], "image": snapshot.image}))
    train_cfg = TrainConfig.from_dict({**config["train_config"], "device": str(ray.train.torch.get_device())})
    context = RayTrainContext(config.get("fail_once_at_epoch"), config.get("fail_marker"))
    train(model, snapshot, train_cfg, context, meta=config.get("meta"))
