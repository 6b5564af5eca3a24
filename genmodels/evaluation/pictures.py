"""Pictures of a model: sample grids, latent interpolations, style analogies, 2-D manifolds.

Everything returns PNG bytes (:mod:`genmodels.images`) so callers write them through storage
or log them to MLflow.
"""

from __future__ import annotations

from typing import Sequence

import torch

from genmodels.data.loader import model_input
from genmodels.evaluation._common import evaluating, module_device, split_of
from genmodels.images import MIN_TILE_PX, grid_png, image_pngs
from genmodels.models.base import GenerativeModel, noise_tensors
from genmodels.noise import interpolation_ends, interpolation_noise, latent_walk, slerp

# Drawn here, owned by genmodels.images (encoding) and genmodels.noise (the latent walk).
__all__ = ["MIN_TILE_PX", "analogies", "analogy_png", "grid_png", "image_pngs", "interpolate", "interpolation_png",
           "manifold_images", "manifold_png", "render_pictures", "slerp"]

def _require_latent(model: GenerativeModel) -> None:
    if not model.has_latent or "z" not in model.noise_spec():
        raise ValueError(f"the {model.family} family has no latent noise 'z' to interpolate")


def interpolate(
    model: GenerativeModel,
    seed_a: int,
    seed_b: int,
    steps: int = 10,
    label: int | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Images [steps, C, H, W] decoded along the slerp from seed_a's latent to seed_b's.

    The endpoints are exactly ``model.sample(1, seed=seed_a)`` and ``seed_b``'s sample. A model
    with a latent mixture (VAE, CVAE) walks between the two samples' standardized latents
    (``model.standardized_latent`` of each seed's noise at ``temperature`` with ``label``: the
    mixture draw, each seed's own component) and decodes every point
    (``model.decode_standardized``), so the walk is as smooth as the decoder. Other models (GAN,
    VAE without a mixture) slerp the noise ``z`` (:func:`genmodels.noise.interpolation_noise`).
    """
    _require_latent(model)
    device = module_device(model)
    if getattr(model, "has_latent_mixture", False):
        ends = interpolation_ends(model.noise_spec(), seed_a, seed_b, steps)
        labels = model.check_labels(label, steps)
        with evaluating(model):
            z = model.standardized_latent(noise_tensors(ends, device), None if labels is None else labels[[0, -1]],
                                          temperature).cpu().numpy()
            path = torch.from_numpy(latent_walk(z[0], z[1], steps)).to(device)
            return model.decode_standardized(path, labels).cpu()
    noise = interpolation_noise(model.noise_spec(), seed_a, seed_b, steps)
    labels = model.check_labels(label, steps)
    with evaluating(model):
        return model.sample_from_noise(noise_tensors(noise, device), labels, temperature).cpu()


def interpolation_png(
    model: GenerativeModel, seed_a: int, seed_b: int, steps: int = 10, label: int | None = None
) -> bytes:
    """One row of ``steps`` images walking the latent space from seed_a's sample to seed_b's."""
    return grid_png(interpolate(model, seed_a, seed_b, steps, label), nrow=steps)


def analogies(cvae: GenerativeModel, x: torch.Tensor, labels: torch.Tensor | Sequence[int]) -> torch.Tensor:
    """[B, 1 + num_classes, C, H, W]: each input image, then its style rendered in every class."""
    if not callable(getattr(cvae, "analogies", None)):
        raise ValueError(f"the {cvae.family} family has no analogies (it needs a conditional VAE)")
    device = module_device(cvae)
    x = torch.as_tensor(x).float()
    labels = cvae.check_labels(labels, len(x))
    with evaluating(cvae):
        out = cvae.analogies(x.to(device), labels).cpu()
    expected = (len(x), cvae.image.num_classes, *cvae.image.shape)
    if tuple(out.shape) != expected:
        raise ValueError(f"{cvae.family}.analogies returned shape {tuple(out.shape)}, expected {expected}")
    return torch.cat([x.cpu()[:, None], out], dim=1)


def analogy_png(cvae: GenerativeModel, x: torch.Tensor, labels: torch.Tensor | Sequence[int]) -> bytes:
    """Rows = input images; first column the input, then one column per class."""
    rows = analogies(cvae, x, labels)
    return grid_png(rows.flatten(0, 1), nrow=rows.shape[1])


def manifold_images(vae: GenerativeModel, n: int = 20, label: int | None = None) -> torch.Tensor:
    """[n*n, C, H, W] decodes of a 2-D latent grid, row-major, z2 decreasing down the rows.

    Grid points are the standard-normal quantiles of ``(i + 0.5) / n``, so equal areas of
    prior mass get equal room in the picture.
    """
    latent_dim = getattr(vae, "latent_dim", None)
    if not callable(getattr(vae, "decode", None)) or latent_dim is None:
        raise ValueError(f"the {vae.family} family has no latent decoder to draw a manifold of")
    if latent_dim != 2:
        raise ValueError(f"a latent manifold picture needs latent_dim == 2, this {vae.family} has latent_dim={latent_dim}")
    if n < 2:
        raise ValueError(f"manifold grid size n must be >= 2, got {n}")
    q = torch.distributions.Normal(0.0, 1.0).icdf((torch.arange(n, dtype=torch.float64) + 0.5) / n).float()
    z1, z2 = q.repeat(n), q.flip(0).repeat_interleave(n)
    z = torch.stack([z1, z2], dim=1)
    labels = vae.check_labels(label, n * n)
    device = module_device(vae)
    with evaluating(vae):
        return vae.decode(z.to(device), labels).cpu()


def manifold_png(vae: GenerativeModel, n: int = 20, label: int | None = None) -> bytes:
    """The decoded 2-D latent space of a VAE with ``latent_dim == 2`` as an n x n grid."""
    return grid_png(manifold_images(vae, n, label), nrow=n)


def _sample_grid(model: GenerativeModel, seed: int, per_row: int = 8) -> bytes:
    if model.conditional:
        k = model.image.num_classes
        images = model.sample(k * per_row, labels=torch.arange(k).repeat_interleave(per_row), seed=seed)
    else:
        images = model.sample(per_row * per_row, seed=seed)
    return grid_png(images, nrow=per_row)


def render_pictures(model: GenerativeModel, snapshot, seed: int = 0) -> dict[str, bytes]:
    """The pictures that apply to ``model``'s family, by file name:

    - ``samples.png`` (every family): 8x8 samples, or one row of 8 per class if conditional;
    - ``interpolation.png`` (families with a latent ``z``): 4 slerp rows between seed pairs,
      or one row per class (up to 10) along the same latent walk if conditional;
    - ``analogies.png`` (conditional VAEs): 8 test images, each re-rendered in every class;
    - ``manifold.png`` (VAEs with a 2-D latent; class 0 if conditional);
    - ``completion.png`` (PixelRNN, mixture): 8 test images with the bottom half hidden, 6
      completions each and the original.
    """
    steps = 10
    with evaluating(model):
        out = {"samples.png": _sample_grid(model, seed)}
        if model.has_latent and "z" in model.noise_spec():
            if model.conditional:
                rows = [interpolate(model, seed, seed + 1, steps, label=c) for c in range(min(model.image.num_classes, 10))]
            else:
                rows = [interpolate(model, seed + 2 * r, seed + 2 * r + 1, steps) for r in range(4)]
            out["interpolation.png"] = grid_png(torch.cat(rows), nrow=steps)
        if model.conditional and callable(getattr(model, "analogies", None)):
            test = split_of(snapshot, "test")
            x = model_input(test, model.image, kind=model.train_input)[:8]
            out["analogies.png"] = analogy_png(model, x, torch.as_tensor(test.y[: len(x)], dtype=torch.long))
        if getattr(model, "latent_dim", None) == 2 and callable(getattr(model, "decode", None)):
            out["manifold.png"] = manifold_png(model, 20, label=0 if model.conditional else None)
        if model.can_complete:
            from genmodels.evaluation.completion import completion_png  # it imports this module

            out["completion.png"] = completion_png(model, snapshot, seed=seed)
    return out
