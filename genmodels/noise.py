"""Seeded noise, one independent stream per sample.

Sample ``i`` of seed ``s`` always gets the same noise, whatever else is in its batch, how
many samples were asked for, or which shard of a bulk job it falls in. That is what makes
"same seed -> same images" hold online, batched and in bulk. Each row draws from a Philox
counter-based generator keyed by the seed, with the sample index in the counter's high
word, so streams never overlap and row ``i`` costs the same whatever ``start`` is.

numpy only: the ONNX runtime, bulk writers and the MLflow model draw the noise without torch;
torch models take it through :func:`genmodels.models.base.make_noise_tensors`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping

import numpy as np

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


def make_noise(spec: NoiseSpec, seed: int, count: int, start: int = 0) -> dict[str, np.ndarray]:
    """Noise for samples ``start .. start+count-1`` of ``seed``, as float32 arrays [count, *shape].

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
    return out


def concat_noise(parts: list[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Stack the noise of several requests into one batch (same fields in each)."""
    if not parts:
        raise ValueError("concat_noise needs at least one part")
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def slerp(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Spherical interpolation between vectors ``a`` and ``b`` [D] at fractions ``t`` [S] -> [S, D].

    Gaussian latents concentrate near a sphere; a straight line between two of them passes
    through low-norm points the decoder never saw, slerp stays at typical norms. Falls back
    to a straight line when the two directions (almost) coincide. Computed in float64, returned
    in ``a``'s dtype.
    """
    a = np.asarray(a)
    a64, b64 = a.astype(np.float64).ravel(), np.asarray(b, np.float64).ravel()
    t64 = np.asarray(t, np.float64)[:, None]
    cos = np.dot(a64, b64) / max(float(np.linalg.norm(a64) * np.linalg.norm(b64)), 1e-12)
    omega = np.arccos(np.clip(cos, -1.0, 1.0))
    if np.sin(omega) < 1e-6:
        out = (1.0 - t64) * a64 + t64 * b64
    else:
        out = (np.sin((1.0 - t64) * omega) * a64 + np.sin(t64 * omega) * b64) / np.sin(omega)
    return out.reshape(len(t64), *a.shape).astype(a.dtype)


def _check_walk(spec: NoiseSpec, steps: int) -> None:
    if "z" not in spec:
        raise ValueError(f"noise fields {sorted(spec)} have no latent 'z' to interpolate")
    if steps < 2:
        raise ValueError(f"an interpolation needs steps >= 2, got {steps}")


def interpolation_noise(spec: NoiseSpec, seed_a: int, seed_b: int, steps: int) -> dict[str, np.ndarray]:
    """Noise [steps, ...] for a walk along the slerp from sample 0 of ``seed_a``'s latent ``z`` to
    ``seed_b``'s, other fields at ``seed_a``'s for the first half of the steps and ``seed_b``'s for
    the rest: the ends are exactly those two samples. The walk of the torch pictures and the ONNX
    samplers (served interpolations) for models without a latent mixture (GAN, plain VAE), and
    for graphs exported before the mixture's walk (:func:`interpolation_ends`)."""
    _check_walk(spec, steps)
    a, b = make_noise(spec, seed_a, 1), make_noise(spec, seed_b, 1)
    first = (steps + 1) // 2
    noise = {name: np.concatenate([np.repeat(value, first, axis=0), np.repeat(b[name], steps - first, axis=0)])
             for name, value in a.items()}
    noise["z"] = slerp(a["z"][0], b["z"][0], np.linspace(0.0, 1.0, steps))
    return noise


def interpolation_ends(spec: NoiseSpec, seed_a: int, seed_b: int, steps: int) -> dict[str, np.ndarray]:
    """Noise [2, ...] of sample 0 of ``seed_a`` and of ``seed_b``: the ends of the walk of a model
    with a latent mixture (VAE, CVAE). Its noise picks a component per seed, so a walk in the
    noise would jump from one component to the other; the model maps these two rows to their
    standardized latents z_a, z_b instead and decodes :func:`latent_walk` (z_a, z_b, steps)."""
    _check_walk(spec, steps)
    return concat_noise([make_noise(spec, seed_a, 1), make_noise(spec, seed_b, 1)])


def latent_walk(z_a: np.ndarray, z_b: np.ndarray, steps: int) -> np.ndarray:
    """[steps, D]: the slerp from latent ``z_a`` [D] to ``z_b`` at evenly spaced fractions 0 .. 1;
    its ends are exactly ``z_a`` and ``z_b``."""
    return slerp(z_a, z_b, np.linspace(0.0, 1.0, steps))
