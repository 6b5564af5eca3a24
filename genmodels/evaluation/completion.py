"""Image completion in evaluation: the lecture's occluded-image figure and an exact metric.

- :func:`completion_figures`: ``completion_nll_nats``, the NLL of the hidden bottom half of
  each test image given its visible top half (:func:`visible_rows`), ``-(log p(x) - log p(top))``,
  exact for both families that complete: log p(top) is the sum of the prefix's conditionals
  (PixelRNN) or the marginal over the known pixels (mixture). Beside the unconditional
  ``nll_nats`` it says how much the visible half tells the model about the rest. The sums come
  from the likelihood pass (:func:`genmodels.evaluation.likelihood.likelihood_metrics`), which
  scores log p(x) and log p(top) of each batch together: for the PixelRNN one forward pass.
- :func:`completion_png`: one row per test image: the occluded image (hidden pixels grey),
  its completions, the original (the PixelRNN paper's Figure 1).
"""

from __future__ import annotations

import math

import torch

from genmodels.data.loader import model_input
from genmodels.evaluation._common import evaluating, head, module_device, split_of
from genmodels.images import grid_png
from genmodels.models.base import GenerativeModel, ImageSpec


def _labels(model: GenerativeModel, split, n: int) -> torch.Tensor | None:
    return torch.as_tensor(split.y[:n], dtype=torch.long) if model.conditional else None


def visible_rows(image: ImageSpec) -> int:
    """Rows of a test image that completion shows the model: the top half."""
    return image.height // 2


def completion_figures(hidden_nll_sum: float, count: int, image: ImageSpec) -> dict[str, float]:
    """``completion_nll_nats`` (hidden bottom half | visible top half, nats per image),
    ``completion_bits_per_dim`` (per hidden sub-pixel) and ``completion_examples``, from the sum
    over ``count`` images of ``log p(top) - log p(x)``."""
    nll = hidden_nll_sum / count
    hidden = image.channels * (image.height - visible_rows(image)) * image.width
    return {"completion_nll_nats": nll, "completion_bits_per_dim": nll / (hidden * math.log(2.0)),
            "completion_examples": float(count)}


def completion_images(model: GenerativeModel, x: torch.Tensor, labels: torch.Tensor | None, known: int,
                      n: int, seed: int) -> torch.Tensor:
    """[B * (n + 2), C, H, W]: per image, the occluded image, n completions, the original."""
    mask = model.completion_mask(known).to(x.device)
    with evaluating(model):
        completions = model.complete(x, known, n, seed=seed, labels=labels)  # [B, n, C, H, W]
    occluded = torch.where(mask, x, torch.full_like(x, 0.5))
    return torch.cat([occluded[:, None], completions.to(x), x[:, None]], dim=1).flatten(0, 1)


def completion_png(model: GenerativeModel, snapshot, seed: int = 0, images: int = 8, n: int = 6) -> bytes:
    """The completion figure of ``images`` test images (top half known), ``n`` completions each."""
    data = head(split_of(snapshot, "test"), images)
    device = module_device(model)
    x = model_input(data, model.image, kind="quantized").to(device)
    labels = _labels(model, data, len(x))
    rows = completion_images(model, x, None if labels is None else labels.to(device), visible_rows(model.image), n,
                             seed)
    return grid_png(rows.cpu(), nrow=n + 2)
