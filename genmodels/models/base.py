"""The one interface every generative family implements.

Data convention (shared by every family, the training loop and evaluation):
- images are float tensors ``x`` of shape [B, C, H, W] whose values lie on the
  quantization grid ``k / (levels - 1)`` for ``k = 0 .. levels-1``: {0, 1} for binary data,
  ``level / 255`` for 8-bit data;
- labels ``y`` are int64 class indices in ``[0, num_classes)``;
- a training batch is ``{"x": x, "y": y}``.

Sampling is a pure function of (weights, noise, labels, temperature): ``sample_from_noise``
never draws random numbers itself. ``sample(n, seed=...)`` derives the noise with
:func:`genmodels.noise.make_noise`, one stream per sample, so a seed gives the same images
however requests are batched. Models sample in ``eval()`` mode and row-independently
(no batch statistics), which is what makes that hold.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Iterable, Mapping

import numpy as np
import torch
from torch import nn

from genmodels.checks import check_labels_array, check_temperature, completion_mask_array, require_completion
from genmodels.config import dataclass_from_dict
from genmodels.noise import NoiseSpec, make_noise


def make_noise_tensors(spec: NoiseSpec, seed: int, count: int, start: int = 0,
                       device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """:func:`genmodels.noise.make_noise` as float32 tensors on ``device``: the torch models' noise."""
    return noise_tensors(make_noise(spec, seed, count, start=start), device)


def noise_tensors(noise: Mapping[str, Any], device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """Noise arrays (``make_noise``, ``interpolation_noise``) as tensors on ``device``."""
    return {k: torch.as_tensor(np.asarray(v, dtype=np.float32)).to(device) for k, v in noise.items()}


def inverse_cdf_pick(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """int64 [N]: the category of each row of ``probs`` [N, M] (not necessarily normalized)
    whose CDF interval holds that row's ``uniform`` ([N] or [N, 1], in [0, 1)). Plain tensor
    ops, so it exports: how every sampler turns its uniform noise into a component."""
    cdf = torch.cumsum(probs, dim=1)
    cdf = cdf / cdf[:, -1:]  # exactly 1 at the end, so u < 1 always finds a category
    # Category k holds [cdf[k-1], cdf[k]): `<=`, or a u of exactly 0 (one draw in 2**24) would pick
    # category 0 even where it has no mass (a tempered-away component).
    return (cdf <= uniform.reshape(-1, 1).to(cdf.dtype)).to(torch.int64).sum(1).clamp(max=probs.shape[1] - 1)


@dataclass(frozen=True)
class ImageSpec:
    """What a model's images look like."""

    channels: int = 1
    height: int = 28
    width: int = 28
    levels: int = 2  # 2 = binary, 256 = 8-bit
    num_classes: int = 10

    def __post_init__(self) -> None:
        for name in ("channels", "height", "width"):
            if getattr(self, name) < 1:
                raise ValueError(f"ImageSpec.{name} must be >= 1, got {getattr(self, name)}")
        if self.levels not in (2, 256):
            raise ValueError(f"ImageSpec.levels must be 2 (binary) or 256 (8-bit), got {self.levels}")
        if self.num_classes < 0:
            raise ValueError(f"ImageSpec.num_classes must be >= 0, got {self.num_classes}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.height, self.width)

    @property
    def dims(self) -> int:
        return self.channels * self.height * self.width

    @property
    def quantization(self) -> str:
        return "binary" if self.levels == 2 else "8bit"


@dataclass(frozen=True)
class ModelConfig:
    """Base of every family's config: with the image spec, it fully rebuilds the network."""

    image: ImageSpec = dataclasses.field(default_factory=ImageSpec)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ModelConfig":
        kwargs = dict(data)
        if isinstance(kwargs.get("image"), Mapping):
            kwargs["image"] = ImageSpec(**kwargs["image"])
        return dataclass_from_dict(cls, kwargs)


class GenerativeModel(nn.Module):
    """Base class of every family. Subclasses set the class attributes and implement the methods."""

    family: ClassVar[str]
    config_class: ClassVar[type[ModelConfig]]
    #: "gradient": optimized by the training loop through ``loss``; "em": fit by
    #: ``em_accumulate``/``em_update`` (the mixture model).
    fit_method: ClassVar[str] = "gradient"
    has_likelihood: ClassVar[bool] = True
    #: Whether the lowest validation loss picks the weights training returns (and early
    #: stopping watches it). False where the validation loss is a diagnostic that does not
    #: measure sample quality (the GAN's): training returns the last epoch's weights.
    validation_selects_weights: ClassVar[bool] = True
    #: Whether ``noise_spec()`` has a latent field ``"z"`` that can be interpolated.
    has_latent: ClassVar[bool] = False
    #: Whether the model can take class labels (``config.conditional``).
    conditional: bool = False
    #: True when samples lie on the quantization grid (PixelRNN, mixture); False when they
    #: are continuous values in [0, 1] (VAE decoder means, GAN outputs). Evaluation compares
    #: samples with real images of the same kind.
    samples_on_grid: ClassVar[bool] = True
    #: What the training loop feeds ``batch["x"]``: "quantized" (binary data binarized
    #: dynamically each epoch; those batches also carry ``"x_probability"``, the grey levels
    #: drawn from) or "intensity" (grey levels / 255, for the GAN, whose discriminator would
    #: otherwise tell binary real images from continuous fakes).
    train_input: ClassVar[str] = "quantized"
    #: {"quick": {"model": {...}, "train": {...}}, "full": {...}}: model-config and
    #: TrainConfig overrides of each preset.
    presets: ClassVar[dict[str, dict[str, dict[str, Any]]]] = {}

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config

    @property
    def image(self) -> ImageSpec:
        return self.config.image

    # --- training -------------------------------------------------------------------
    def players(self) -> dict[str, list[nn.Parameter]]:
        """Parameter groups, each with its own optimizer, stepped in this order every batch.

        One player ("model") for most families; the GAN has "discriminator" then "generator".
        """
        return {"model": list(self.parameters())}

    def loss(self, batch: Mapping[str, torch.Tensor], player: str = "model") -> dict[str, torch.Tensor]:
        """Losses of one batch for ``player``: key ``"loss"`` is minimized, the rest are logged."""
        raise NotImplementedError

    def begin_epoch(self, epoch: int, total_epochs: int) -> None:
        """Called by the training loop before each epoch (warm-up schedules and the like)."""

    def after_step(self, player: str) -> None:
        """Called by the training loop after each optimizer step of ``player`` (weight averages)."""

    def after_training(self, batches: Iterable[Mapping[str, torch.Tensor]], seed: int) -> None:
        """Called once by the training loop with the final weights in place: fits that read the
        trained networks (a VAE's latent mixture). ``batches`` is one pass over the training set."""

    def forward(self, batch: Mapping[str, torch.Tensor], player: str = "model") -> dict[str, torch.Tensor]:
        # DDP wraps ``forward``; routing the loss through it keeps gradient sync correct.
        return self.loss(batch, player)

    def validation_loss(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Per-batch mean of the quantity early stopping watches (lower is better)."""
        players = self.players()
        return self.loss(batch, next(iter(players)) if players else "model")["loss"]

    # --- sampling -------------------------------------------------------------------
    def noise_spec(self) -> NoiseSpec:
        raise NotImplementedError

    def sample_from_noise(
        self,
        noise: Mapping[str, torch.Tensor],
        labels: torch.Tensor | None = None,
        temperature: float = 1.0,
    ) -> torch.Tensor:
        """Images [n, C, H, W] on the quantization grid (or decoder means in [0, 1] for VAEs)."""
        raise NotImplementedError

    @torch.no_grad()
    def sample(
        self,
        n: int,
        labels: torch.Tensor | Iterable[int] | int | None = None,
        seed: int = 0,
        temperature: float = 1.0,
        start: int = 0,
    ) -> torch.Tensor:
        check_temperature(temperature)
        noise = make_noise_tensors(self.noise_spec(), seed, n, start=start, device=next(self.parameters()).device)
        return self.sample_from_noise(noise, self.check_labels(labels, n), temperature)

    # --- completion -----------------------------------------------------------------
    #: Whether ``complete`` draws exactly from p(unknown | known) (PixelRNN, mixture).
    can_complete: ClassVar[bool] = False
    #: Whether ``known`` may be any boolean mask [H, W] (mixture) rather than known rows only.
    completes_any_mask: ClassVar[bool] = False

    def completion_mask(self, known: Any) -> torch.Tensor:
        """``known`` (a number of known rows, or a boolean mask [H, W] where the family takes
        one) -> bool [H, W] on CPU, True = known. Refuses what the family cannot complete."""
        require_completion(self.family, self.can_complete)
        return torch.from_numpy(completion_mask_array(known, family=self.family, height=self.image.height,
                                                      width=self.image.width, any_mask=self.completes_any_mask))

    def complete_from_noise(
        self,
        x: torch.Tensor,
        known: Any,
        noise: Mapping[str, torch.Tensor],
        labels: torch.Tensor | None = None,
        temperature: float = 1.0,
    ) -> torch.Tensor:
        """Completions [B, n, C, H, W] of images ``x`` [B, C, H, W]: noise row ``b * n + j``
        (fields of ``noise_spec``, [B * n, ...]) draws completion ``j`` of image ``b``."""
        require_completion(self.family, self.can_complete)
        raise NotImplementedError

    @torch.no_grad()
    def complete(
        self,
        x: torch.Tensor,
        known: Any,
        n: int,
        seed: int = 0,
        temperature: float = 1.0,
        labels: torch.Tensor | Iterable[int] | int | None = None,
        start: int = 0,
    ) -> torch.Tensor:
        """``n`` draws from p(unknown pixels | known pixels) of each image ``x`` ([C, H, W] ->
        [n, C, H, W]; [B, C, H, W] -> [B, n, C, H, W]). Known pixels come back exactly as given
        (rounded to the model's grid). Completion ``j`` of every image uses noise stream
        ``start + j`` of ``seed``, so it is the same whatever else is in the batch."""
        require_completion(self.family, self.can_complete)
        check_temperature(temperature)
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
            raise ValueError(f"n must be an int >= 1, got {n!r}")
        single = x.ndim == 3
        xb = x[None] if single else x
        if xb.ndim != 4 or tuple(xb.shape[1:]) != self.image.shape:
            raise ValueError(f"expected an image [{', '.join(map(str, self.image.shape))}] or a batch of them, "
                             f"got {tuple(x.shape)}")
        b = xb.shape[0]
        device = next(self.parameters()).device
        labels = self.check_labels(labels, b)
        noise = make_noise_tensors(self.noise_spec(), seed, int(n), start=start)
        # Every image gets the same streams: completion j of an image never depends on its batch.
        noise = {k: v.repeat(b, *([1] * (v.ndim - 1))).to(device) for k, v in noise.items()}
        out = self.complete_from_noise(xb.to(device), known, noise, labels, temperature)
        return out[0] if single else out

    # --- likelihood -----------------------------------------------------------------
    def log_likelihood(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """log p(x) in nats per image, [B], for the discrete (quantized) image ``x``."""
        raise NotImplementedError(f"the {self.family} family defines no likelihood")

    def log_likelihood_and_marginal(
        self, x: torch.Tensor, known: Any, labels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(log p(x), log p(the known pixels of x)) in nats per image, [B] each: the two terms of
        the completion NLL, for families that complete. A family whose marginal comes out of the
        same network pass as its likelihood (PixelRNN) overrides this to pay for that pass once."""
        require_completion(self.family, self.can_complete)
        return self.log_likelihood(x, labels), self.log_marginal(x, known, labels)

    # --- helpers ---------------------------------------------------------------------
    def check_labels(self, labels: Any, n: int, field: str = "labels") -> torch.Tensor | None:
        """Validate labels against the model (:func:`check_labels_array`) -> int64 [n] on the
        model's device, or None; a refusal calls them ``field``."""
        arr = check_labels_array(labels, n, family=self.family, conditional=self.conditional,
                                 num_classes=self.image.num_classes, field=field)
        return None if arr is None else torch.from_numpy(arr).to(next(self.parameters()).device)

    def to_levels(self, x: torch.Tensor) -> torch.Tensor:
        """Float grid values -> int64 level indices in [0, levels)."""
        return torch.round(x * (self.image.levels - 1)).long().clamp_(0, self.image.levels - 1)

    def from_levels(self, k: torch.Tensor) -> torch.Tensor:
        return k.float() / (self.image.levels - 1)

    # EM families override these; gradient families never call them.
    def em_accumulate(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def em_update(self, stats: Mapping[str, torch.Tensor]) -> None:
        raise NotImplementedError
