"""Seeded noise, one independent stream per sample.

Sample ``i`` of seed ``s`` always gets the same noise, whatever else is in its batch, how
many samples were asked for, or which shard of a bulk job it falls in. That is what makes
"same seed -> same images" hold online, batched and in bulk. Each row draws from a Philox
counter-based generator keyed by the seed, with the sample index in the counter's high
word, so streams never overlap and row ``i`` costs the same whatever ``start`` is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping

import numpy as np
import torch

Distribution = Literal["normal", "uniform"]
MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class NoiseField:
    """One named noise input of a sampler: per-sample shape and distribution."""

    shape: tuple[int, ...]
    distribution: Distribution


NoiseSpec = Mapping[str, NoiseField]


def check_seed(seed: int) -> int:
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
        raise TypeError(f"seed must be an integer, got {type(seed).__name__}")
    if not 0 <= int(seed) <= MAX_SEED:
        raise ValueError(f"seed must be in [0, 2**63-1], got {seed}")
    return int(seed)


def derive_seed(*key: int) -> int:
    """A well-mixed 32-bit seed from a tuple of integers (seed, epoch, rank, ...)."""
    return int(np.random.SeedSequence(list(key)).generate_state(1)[0])


def sample_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of sample ``index`` under ``seed``."""
    return np.random.Generator(np.random.Philox(key=check_seed(seed), counter=[0, 0, 0, int(index)]))


def make_noise(spec: NoiseSpec, seed: int, count: int, start: int = 0) -> dict[str, torch.Tensor]:
    """Noise for samples ``start .. start+count-1`` of ``seed``, as float32 tensors [count, *shape].

    Fields are drawn in sorted name order from each sample's own stream, so adding rows
    before or after never changes a row.
    """
    if count < 0 or start < 0:
        raise ValueError(f"count and start must be >= 0, got count={count}, start={start}")
    names = sorted(spec)
    out = {name: np.empty((count, *spec[name].shape), dtype=np.float32) for name in names}
    for row in range(count):
        rng = sample_rng(seed, start + row)
        for name in names:
            field = spec[name]
            if field.distribution == "normal":
                out[name][row] = rng.standard_normal(field.shape, dtype=np.float32)
            elif field.distribution == "uniform":
                out[name][row] = rng.random(field.shape, dtype=np.float32)
            else:
                raise ValueError(f"noise field {name!r}: unknown distribution {field.distribution!r}")
    return {name: torch.from_numpy(arr) for name, arr in out.items()}


def concat_noise(parts: list[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack the noise of several requests into one batch (same fields in each)."""
    if not parts:
        raise ValueError("concat_noise needs at least one part")
    return {name: torch.cat([p[name] for p in parts], dim=0) for name in parts[0]}
