"""Pictures of a model: sample grids, latent interpolations, style analogies, 2-D manifolds.

Everything returns PNG bytes so callers write them through storage or log them to MLflow.
Tiny images (8x8 digits, 28x28 clothes) are upscaled with nearest-neighbour so the
pixels stay crisp and visible.
"""

from __future__ import annotations

import io
import math
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from genmodels.data.loader import model_input
from genmodels.evaluation._common import evaluating, module_device, split_of
from genmodels.models.base import GenerativeModel
from genmodels.noise import make_noise

#: Tiles are upscaled by an integer factor until their longer side reaches this many pixels.
MIN_TILE_PX = 64
#: Grey between tiles: visible against both the black and the white of binary images.
BACKGROUND = 0.5


def _grid_array(images: torch.Tensor | np.ndarray, nrow: int, scale: int | None, padding: int) -> np.ndarray:
    x = torch.as_tensor(images).detach().cpu().float()
    if x.ndim != 4 or x.shape[0] == 0:
        raise ValueError(f"images must be a non-empty [N, C, H, W] batch, got shape {tuple(x.shape)}")
    n, c, h, w = x.shape
    if c not in (1, 3):
        raise ValueError(f"images must have 1 (grey) or 3 (RGB) channels to be drawn, got {c}")
    if torch.isnan(x).any():
        raise ValueError("images contain NaN")
    if nrow < 1:
        raise ValueError(f"nrow (images per row) must be >= 1, got {nrow}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    scale = max(1, math.ceil(MIN_TILE_PX / max(h, w))) if scale is None else scale
    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    cols, rows = min(nrow, n), math.ceil(n / nrow)
    th, tw = h * scale, w * scale
    tiles = x.clamp(0.0, 1.0).repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    canvas = torch.full((c, rows * th + (rows + 1) * padding, cols * tw + (cols + 1) * padding), BACKGROUND)
    for i in range(n):
        r, col = divmod(i, cols)
        top, left = padding + r * (th + padding), padding + col * (tw + padding)
        canvas[:, top : top + th, left : left + tw] = tiles[i]
    return (canvas * 255.0).round().to(torch.uint8).permute(1, 2, 0).numpy()


def grid_png(images: torch.Tensor | np.ndarray, nrow: int = 8, *, scale: int | None = None, padding: int = 2) -> bytes:
    """PNG of ``images`` [N, C, H, W] in [0, 1] (clamped), ``nrow`` images per row.

    Size: ``cols*W*s + (cols+1)*padding`` by ``rows*H*s + (rows+1)*padding`` with
    ``cols = min(nrow, N)``, ``rows = ceil(N / nrow)`` and ``s`` the upscale factor (default:
    the smallest integer making tiles at least ``MIN_TILE_PX`` pixels on their longer side).
    """
    array = _grid_array(images, nrow, scale, padding)
    # uint8 [H, W] infers mode "L", uint8 [H, W, 3] infers "RGB".
    picture = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    return buf.getvalue()


def image_pngs(images: torch.Tensor | np.ndarray) -> list[bytes]:
    """One PNG per image of ``images`` [N, C, H, W] in [0, 1] (clamped), each at its own size:
    the bytes of ``grid_png(image[None], nrow=1, scale=1, padding=0)``, without the canvas.

    The serving hot path: the batch is quantized to uint8 in one vectorized step, so encoding
    costs little more than zlib itself."""
    x = np.asarray(images.detach().cpu() if isinstance(images, torch.Tensor) else images, dtype=np.float32)
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"images must be an [N, C, H, W] batch with 1 (grey) or 3 (RGB) channels, got shape "
                         f"{x.shape}")
    if np.isnan(x).any():
        raise ValueError("images contain NaN")
    # The same float32 arithmetic and round-half-to-even as _grid_array: identical pixels.
    pixels = np.round(np.clip(x, 0.0, 1.0) * np.float32(255.0)).astype(np.uint8).transpose(0, 2, 3, 1)
    out = []
    for p in pixels:
        buf = io.BytesIO()
        Image.fromarray(p[:, :, 0] if p.shape[2] == 1 else p).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation between vectors ``a`` and ``b`` [D] at fractions ``t`` [S] -> [S, D].

    Gaussian latents concentrate near a sphere; a straight line between two of them passes
    through low-norm points the decoder never saw, slerp stays at typical norms. Falls back
    to a straight line when the two directions (almost) coincide.
    """
    a64, b64, t64 = a.double().flatten(), b.double().flatten(), t.double()[:, None]
    cos = torch.dot(a64, b64) / (a64.norm() * b64.norm()).clamp_min(1e-12)
    omega = torch.arccos(cos.clamp(-1.0, 1.0))
    if float(torch.sin(omega)) < 1e-6:
        out = (1.0 - t64) * a64 + t64 * b64
    else:
        out = (torch.sin((1.0 - t64) * omega) * a64 + torch.sin(t64 * omega) * b64) / torch.sin(omega)
    return out.reshape(len(t), *a.shape).to(a.dtype)


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

    The endpoints are exactly ``model.sample(1, seed=seed_a)`` and ``seed_b``'s sample. Noise
    fields other than ``z`` (if a family has any) are held at seed_a's values.
    """
    _require_latent(model)
    if steps < 2:
        raise ValueError(f"an interpolation needs steps >= 2, got {steps}")
    spec = model.noise_spec()
    noise_a, noise_b = make_noise(spec, seed_a, 1), make_noise(spec, seed_b, 1)
    t = torch.linspace(0.0, 1.0, steps)
    noise = {name: value.expand(steps, *value.shape[1:]).clone() for name, value in noise_a.items()}
    noise["z"] = slerp(noise_a["z"][0], noise_b["z"][0], t)
    labels = model.check_labels(label, steps)
    device = module_device(model)
    with evaluating(model):
        return model.sample_from_noise({k: v.to(device) for k, v in noise.items()}, labels, temperature).cpu()


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
