"""Mini-batches for training and evaluation, sharded across distributed workers.

Binary snapshots keep training images as grey levels and binarize them afresh every epoch
(dynamic binarization); validation and test use the split's one-time binarization so their
likelihoods compare across runs. Everything is a deterministic function of (seed, epoch,
rank), which is what lets a resumed run see exactly the batches it would have seen.
"""

from __future__ import annotations

from typing import Iterator, Literal

import numpy as np
import torch

from genmodels.models.base import ImageSpec
from genmodels.noise import derive_seed

InputKind = Literal["quantized", "intensity"]


def _rng(*key: int) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*key))


def model_input(split, image: ImageSpec, kind: InputKind = "quantized") -> torch.Tensor:
    """The whole split as model input. Binary training images have no fixed binarization:
    use :func:`batches` for those."""
    if kind == "intensity" or image.levels == 256:
        return torch.from_numpy(split.x).float().div_(255.0)
    if split.x_binary is None:
        raise ValueError("this split has no fixed binarization (training split): iterate it with batches()")
    return torch.from_numpy(split.x_binary).float()


def shard_indices(n: int, *, seed: int, epoch: int, shuffle: bool, rank: int, world_size: int) -> np.ndarray:
    """This worker's example indices for one epoch. Every worker gets the same count (the
    permutation wraps around), because DDP needs all workers to run the same number of steps."""
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    per_worker = -(-n // world_size)
    order = np.resize(order, per_worker * world_size)
    return order[rank::world_size]


def batches(
    split,
    image: ImageSpec,
    *,
    batch_size: int,
    kind: InputKind = "quantized",
    seed: int = 0,
    epoch: int = 0,
    shuffle: bool = False,
    rank: int = 0,
    world_size: int = 1,
    limit: int | None = None,
    device: torch.device | str = "cpu",
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield ``{"x": float [B,C,H,W], "y": int64 [B]}`` batches of ``split`` for one epoch."""
    n = len(split.y) if limit is None else min(limit, len(split.y))
    if n == 0:
        raise ValueError("cannot iterate an empty split")
    idx = shard_indices(n, seed=seed, epoch=epoch, shuffle=shuffle, rank=rank, world_size=world_size)
    dynamic = kind == "quantized" and image.levels == 2 and split.x_binary is None
    fixed_binary = kind == "quantized" and image.levels == 2 and split.x_binary is not None
    source = split.x_binary if fixed_binary else split.x
    gen = _rng(seed, epoch, rank) if dynamic else None
    for start in range(0, len(idx), batch_size):
        sel = np.sort(idx[start : start + batch_size]) if not shuffle else idx[start : start + batch_size]
        x = torch.from_numpy(source[sel]).float()
        if dynamic:
            x = torch.bernoulli(x / 255.0, generator=gen)
        elif not fixed_binary:
            x = x / 255.0
        yield {"x": x.to(device), "y": torch.from_numpy(split.y[sel]).long().to(device)}


def num_batches(n: int, batch_size: int, world_size: int = 1) -> int:
    per_worker = -(-n // world_size)
    return -(-per_worker // batch_size)
