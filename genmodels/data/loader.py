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


def global_batches(n: int, *, seed: int, epoch: int, shuffle: bool, rank: int, world_size: int,
                   batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Example indices of each step of an epoch: (the global batch, this worker's part of it).

    ``batch_size`` is the global batch: worker ``rank`` takes the ``rank``-th of ``world_size``
    equal contiguous parts of each, so the workers of one step together see exactly the batch
    one process would have seen."""
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    order = np.resize(order, -(-n // world_size) * world_size)
    for start in range(0, len(order), batch_size):
        step = order[start : start + batch_size]
        # Every worker runs the same number of steps (DDP needs it): the permutation wraps around
        # to a multiple of world_size, and so every step's batch divides by it too.
        part = len(step) // world_size
        yield step, step[rank * part : (rank + 1) * part]


def check_global_batch(batch_size: int, world_size: int) -> None:
    """Refuse a global batch that data-parallel workers cannot split into equal parts."""
    if batch_size % world_size:
        raise ValueError(f"batch_size {batch_size} is the global batch of {world_size} data-parallel workers "
                         f"and must divide evenly between them")


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
    """Yield this worker's ``{"x": float [b,C,H,W], "y": int64 [b]}`` batches of ``split`` for
    one epoch, ``b = batch_size / world_size``: the workers' batches of a step are the global
    batch one process would see, images and binarization alike, so the worker count changes
    speed, not the data."""
    check_global_batch(batch_size, world_size)
    n = len(split.y) if limit is None else min(limit, len(split.y))
    if n == 0:
        raise ValueError("cannot iterate an empty split")
    dynamic = kind == "quantized" and image.levels == 2 and split.x_binary is None
    fixed_binary = kind == "quantized" and image.levels == 2 and split.x_binary is not None
    source = split.x_binary if fixed_binary else split.x
    # One stream per epoch, drawn over each whole global batch, whichever worker runs it (the
    # key is rank 0's, which every single-process run has always used).
    gen = _rng(seed, epoch, 0) if dynamic else None
    for step, mine in global_batches(n, seed=seed, epoch=epoch, shuffle=shuffle, rank=rank, world_size=world_size,
                                     batch_size=batch_size):
        if dynamic:
            drawn = torch.bernoulli(torch.from_numpy(source[step]).float() / 255.0, generator=gen)
            lo = rank * len(mine)
            x = drawn[lo : lo + len(mine)]
        else:
            x = torch.from_numpy(source[mine]).float()
            if not fixed_binary:
                x = x / 255.0
        yield {"x": x.to(device), "y": torch.from_numpy(split.y[mine]).long().to(device)}


def num_batches(n: int, batch_size: int, world_size: int = 1) -> int:
    """Steps of an epoch over ``n`` examples in global batches of ``batch_size``."""
    return -(-(-(-n // world_size) * world_size) // batch_size)
