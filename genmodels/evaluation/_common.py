"""Small helpers shared by the evaluation modules."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace
from typing import Iterator

import torch
from torch import nn


def module_device(module: nn.Module) -> torch.device:
    """The device of a module's first parameter or buffer (CPU for a module with neither)."""
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


@contextlib.contextmanager
def evaluating(module: nn.Module) -> Iterator[None]:
    """``eval()`` and ``no_grad`` for the block, then the module's previous train/eval mode.

    Evaluation is called on models a caller may keep training; leaving them in eval mode
    would silently change their dropout/batch-norm behaviour afterwards.
    """
    was_training, tf32 = module.training, torch.backends.cudnn.allow_tf32
    module.eval()
    # fp32 convolutions on a GPU too: cuDNN's default is TF32 (10-bit mantissas), which moved
    # likelihoods and sampled pixels away from the CPU's and the ONNX runtime's figures.
    torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.no_grad():
            yield
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
        module.train(was_training)


@contextlib.contextmanager
def seeded_torch(seed: int) -> Iterator[None]:
    """Seed torch's global RNG for the block without disturbing the caller's RNG stream.

    VAEs draw their reparameterized latents from the global RNG; seeding it makes ELBO/IWAE
    estimates reproducible, and forking keeps that from leaking into the caller's training.
    """
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def head(split, n: int | None):
    """The first ``n`` examples of a split (all when None), without copying the rest."""
    if n is None or n >= len(split.y):
        return split
    x_binary = getattr(split, "x_binary", None)
    return SimpleNamespace(x=split.x[:n], y=split.y[:n], x_binary=None if x_binary is None else x_binary[:n])


def split_of(snapshot, name: str):
    """``snapshot.splits[name]`` with an error that names what the snapshot has."""
    try:
        return snapshot.splits[name]
    except KeyError:
        raise KeyError(
            f"snapshot {getattr(snapshot, 'dataset', '?')!r} has no split {name!r}; it has {sorted(snapshot.splits)}"
        ) from None
