"""Mini-batches for training and evaluation, sharded across distributed workers.

Binary snapshots keep training images as grey levels and binarize them afresh every epoch
(dynamic binarization); validation and test use the split's one-time binarization so their
likelihoods compare across runs. A step's batch and its binarization are a deterministic
function of (seed, epoch), and a worker's part of it of its rank: a resumed run sees exactly the
batches it would have seen, and N data-parallel workers the batches of one process.
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


def global_batches(n: int, *, seed: int, epoch: int, shuffle: bool, rank: int, world_size: int, batch_size: int,
                   pad: bool = True) -> Iterator[tuple[np.ndarray, int, int]]:
    """Each step of an epoch: (the global batch's example indices, and where this worker's part
    of it starts and ends).

    ``batch_size`` is the global batch: worker ``rank`` takes the ``rank``-th of ``world_size``
    contiguous parts of each, so the workers of one step together see the batch one process
    would have seen. ``pad=True`` (gradient steps: DDP needs every worker to run the same steps
    on equal parts) wraps the permutation around to a multiple of ``world_size``, so where
    ``world_size`` does not divide ``n`` the last step repeats up to ``world_size - 1`` examples;
    ``pad=False`` (sums reduced once at the end: validation, EM statistics) repeats none, and its
    parts may differ in size by one or be empty."""
    check_global_batch(batch_size, world_size)
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    if pad:
        order = np.resize(order, _padded(n, world_size))
    for start in range(0, len(order), batch_size):
        step = order[start : start + batch_size]
        if pad:
            part = len(step) // world_size
            yield step, rank * part, (rank + 1) * part
        else:
            yield step, len(step) * rank // world_size, len(step) * (rank + 1) // world_size


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
    pad: bool = True,
    device: torch.device | str = "cpu",
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield this worker's ``{"x": float [b,C,H,W], "y": int64 [b]}`` batches of ``split`` for
    one epoch, ``b = batch_size / world_size``: the workers' batches of a step are the global
    batch one process would see, images and binarization alike, so the worker count changes
    speed, not the data (``pad``: see :func:`global_batches`; an empty part is not yielded).
    Dynamically binarized batches also carry ``"x_probability"``, float [b,C,H,W]: the grey level
    each pixel of ``x`` was drawn from, P(x = 1)."""
    n = len(split.y) if limit is None else min(limit, len(split.y))
    if n == 0:
        raise ValueError("cannot iterate an empty split")
    dynamic = kind == "quantized" and image.levels == 2 and split.x_binary is None
    fixed_binary = kind == "quantized" and image.levels == 2 and split.x_binary is not None
    source = split.x_binary if fixed_binary else split.x
    # One stream per epoch, drawn over each whole global batch, whichever worker runs it (the
    # key is rank 0's, which every single-process run has always used).
    gen = _rng(seed, epoch, 0) if dynamic else None
    for step, lo, hi in global_batches(n, seed=seed, epoch=epoch, shuffle=shuffle, rank=rank, world_size=world_size,
                                       batch_size=batch_size, pad=pad):
        batch = {}
        if dynamic:
            probability = torch.from_numpy(source[step]).float() / 255.0
            x = torch.bernoulli(probability, generator=gen)[lo:hi]
            batch["x_probability"] = probability[lo:hi]
        else:
            x = torch.from_numpy(source[step[lo:hi]]).float()
            if not fixed_binary:
                x = x / 255.0
        if hi > lo:
            batch.update(x=x, y=torch.from_numpy(split.y[step[lo:hi]]).long())
            yield {key: _to_device(value, device) for key, value in batch.items()}


def _to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    # A copy to the GPU from pageable memory waits for the GPU's queued work: from pinned memory,
    # without waiting, the host prepares the next step while the GPU runs this one.
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _padded(n: int, world_size: int) -> int:
    """``n`` rounded up to a multiple of ``world_size``: an epoch's examples with the padding of
    :func:`global_batches`."""
    return -(-n // world_size) * world_size


def num_batches(n: int, batch_size: int, world_size: int = 1) -> int:
    """Steps of an epoch over ``n`` examples in global batches of ``batch_size``."""
    return -(-_padded(n, world_size) // batch_size)
