"""GAN: a DCGAN generator and discriminator, unconditional or class-conditional.

Shapes. Both networks work for any small image size: ``n`` stride-2 stages are chosen so the
coarsest grid is at most 7x7 (8x8 -> 1 stage from 4x4, 28x28 -> 2 from 7x7, 32 -> 3 and
64 -> 4 from 4x4). The generator paints a canvas of ``base * 2**n`` pixels a side and crops
its centre to the image; the discriminator zero-pads images back onto that canvas, so every
stage halves exactly.

Stability choices (measured on Fashion-MNIST: the earlier DCGAN with transposed convolutions,
the non-saturating loss and Adam(0.5, 0.999) collapsed to a few checkerboard modes):
- the hinge loss (``loss="hinge"``; ``"nonsaturating"`` stays available) with spectral
  normalization on every discriminator layer (Miyato et al., 2018): it bounds D's Lipschitz
  constant for one cheap power iteration per layer, with no double backward (an R1 penalty
  costs one; ``r1_gamma`` turns it on as well for harder data);
- G upsamples by nearest-neighbour resize followed by a 3x3 convolution: a transposed
  convolution whose kernel does not divide by its stride paints checkerboards;
- an exponential moving average of G's weights (``ema_decay``; Karras et al. / Yazici et
  al.) is what samples, exports and gets evaluated: it averages out the oscillation of the
  two-player game at no training cost;
- two time-scale learning rates (D faster than G) and Adam betas (0, 0.9), set by the presets;
- no BatchNorm in the generator: GroupNorm normalizes each sample on its own, so the images
  the discriminator was trained against in train mode are exactly the ones ``eval()``
  sampling produces, and sampling is row-independent by construction;
- class conditioning by a label embedding concatenated to ``z`` in G and a projection
  discriminator (Miyato & Koyama, 2018) in D;
- real images are grey levels / 255 (``train_input = "intensity"``) and G ends in a sigmoid,
  so D cannot tell fakes from the quantization alone.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.parametrizations import spectral_norm

from genmodels.models.base import GenerativeModel, ModelConfig
from genmodels.noise import NoiseField, NoiseSpec

__all__ = ["GANConfig", "GAN", "Generator", "Discriminator", "stage_plan"]

_MAX_BASE = 7  # coarsest grid side: small enough for a dense layer, large enough for 7x7 (28 = 7*4)
_MAX_MULT = 8  # channel multiplier cap at coarse stages (DCGAN doubles per stage)
LOSSES = ("hinge", "nonsaturating")
MBSTD_GROUP = 4  # images per minibatch-std group (ProGAN's)


@dataclass(frozen=True)
class GANConfig(ModelConfig):
    """latent_dim: size of z. g_width / d_width: channels of the full-resolution stage of G /
    D, doubled per coarser stage up to 8x. d_features: width of D's dense feature layer (the
    projection's inner-product space). embed_dim: G's label embedding (conditional only).
    r1_gamma: weight of the R1 gradient penalty on real images (0 = off). r1_every: the penalty
    is computed on every ``r1_every``-th discriminator step only, weighted by ``r1_every`` so its
    average pull is unchanged (StyleGAN2's lazy regularization: the double backward is the
    costly part of a step; tried on the quick preset at 4: 1.26x the images/s, but FID/recall
    worse on 2 of 3 seeds, one near collapse; in no preset). loss: "hinge" or
    "nonsaturating". ema_decay: decay of the moving average of G's weights that sampling
    uses (0 = sample from the trained G itself). minibatch_std: D sees, as one more feature map
    of its last conv stage, the standard deviation of those features across groups of
    ``MBSTD_GROUP`` images (Karras et al., 2018), so that a generator drawing alike images can
    be caught (tried on the quick preset: worse on its one seed; in no preset)."""

    latent_dim: int = 64
    conditional: bool = False
    g_width: int = 32
    d_width: int = 32
    d_features: int = 128
    embed_dim: int = 32
    r1_gamma: float = 0.0
    r1_every: int = 1
    loss: str = "hinge"
    ema_decay: float = 0.999
    minibatch_std: bool = False

    def __post_init__(self) -> None:
        for name in ("latent_dim", "g_width", "d_width", "d_features", "embed_dim", "r1_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"GANConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.r1_gamma < 0:
            raise ValueError(f"GANConfig.r1_gamma must be >= 0, got {self.r1_gamma}")
        if self.loss not in LOSSES:
            raise ValueError(f"GANConfig.loss must be one of {list(LOSSES)}, got {self.loss!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"GANConfig.ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.conditional and self.image.num_classes < 1:
            raise ValueError("a conditional GAN needs image.num_classes >= 1")


def stage_plan(height: int, width: int) -> tuple[int, int, int]:
    """(stride-2 stages n, base height, base width) with max(base) <= 7 and base * 2**n >= size."""
    n = 0
    while math.ceil(max(height, width) / 2**n) > _MAX_BASE:
        n += 1
    return n, math.ceil(height / 2**n), math.ceil(width / 2**n)


def _groups(channels: int) -> int:
    return math.gcd(channels, 8)


class Generator(nn.Module):
    def __init__(self, cfg: GANConfig) -> None:
        super().__init__()
        img = cfg.image
        self.image = img
        self.n, self.base_h, self.base_w = stage_plan(img.height, img.width)
        widths = [cfg.g_width * min(2 ** (self.n - i), _MAX_MULT) for i in range(self.n + 1)]
        self.embed = nn.Embedding(img.num_classes, cfg.embed_dim) if cfg.conditional else None
        in_dim = cfg.latent_dim + (cfg.embed_dim if cfg.conditional else 0)
        self.fc = nn.Linear(in_dim, widths[0] * self.base_h * self.base_w)
        self.fc_norm = nn.GroupNorm(_groups(widths[0]), widths[0])
        self.ups = nn.ModuleList(
            nn.Sequential(
                nn.Upsample(scale_factor=2, mode="nearest"),
                nn.Conv2d(c_in, c_out, 3, padding=1),
                nn.GroupNorm(_groups(c_out), c_out),
                nn.ReLU(),
            )
            for c_in, c_out in zip(widths[:-1], widths[1:])
        )
        self.to_image = nn.Conv2d(widths[-1], img.channels, 3, padding=1)
        canvas_h, canvas_w = self.base_h * 2**self.n, self.base_w * 2**self.n
        self.top, self.left = (canvas_h - img.height) // 2, (canvas_w - img.width) // 2

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.embed is not None:
            z = torch.cat([z, self.embed(labels)], dim=1)
        h = self.fc(z).view(z.shape[0], -1, self.base_h, self.base_w)
        h = F.relu(self.fc_norm(h))
        for up in self.ups:
            h = up(h)
        x = torch.sigmoid(self.to_image(h))
        return x[:, :, self.top : self.top + self.image.height, self.left : self.left + self.image.width]


class Discriminator(nn.Module):
    def __init__(self, cfg: GANConfig) -> None:
        super().__init__()
        img = cfg.image
        self.image = img
        self.n, base_h, base_w = stage_plan(img.height, img.width)
        canvas_h, canvas_w = base_h * 2**self.n, base_w * 2**self.n
        top, left = (canvas_h - img.height) // 2, (canvas_w - img.width) // 2
        # F.pad order: (left, right, top, bottom); the inverse of the generator's crop.
        self.pad = (left, canvas_w - img.width - left, top, canvas_h - img.height - top)
        widths = [img.channels] + [cfg.d_width * min(2**i, _MAX_MULT) for i in range(self.n)]
        self.downs = nn.ModuleList(
            spectral_norm(nn.Conv2d(c_in, c_out, 4, stride=2, padding=1))
            for c_in, c_out in zip(widths[:-1], widths[1:])
        )
        self.minibatch_std = cfg.minibatch_std
        self.features = spectral_norm(nn.Linear((widths[-1] + cfg.minibatch_std) * base_h * base_w, cfg.d_features))
        self.head = spectral_norm(nn.Linear(cfg.d_features, 1))
        self.embed = spectral_norm(nn.Embedding(img.num_classes, cfg.d_features)) if cfg.conditional else None

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None, parts: int = 1) -> torch.Tensor:
        """Logits [B]: real vs. fake (given the class, for a conditional D). ``parts``: the
        batch is that many equal blocks (real, then fake) whose images must not share a
        minibatch-std group."""
        h = F.pad(x, self.pad) if any(self.pad) else x
        for down in self.downs:
            h = F.leaky_relu(down(h), 0.2)
        if self.minibatch_std:
            h = _with_minibatch_std(h, math.gcd(MBSTD_GROUP, h.shape[0] // parts))
        phi = F.leaky_relu(self.features(h.flatten(1)), 0.2)
        logit = self.head(phi).squeeze(1)
        if self.embed is not None:
            logit = logit + (self.embed(labels) * phi).sum(1)
        return logit


def _with_minibatch_std(h: torch.Tensor, group: int) -> torch.Tensor:
    """``h`` [B, C, H, W] plus one channel: the mean over (C, H, W) of each feature's standard
    deviation within consecutive groups of ``group`` images (``group`` divides B). Consecutive,
    so a group never straddles the real and fake blocks of a batch; a group of 1 carries no
    information (the channel is constant)."""
    b, c, height, width = h.shape
    std = (h.float().view(b // group, group, c, height, width).var(dim=1, unbiased=False) + 1e-8).sqrt()
    stat = std.mean(dim=(1, 2, 3)).to(h.dtype).repeat_interleave(group)
    return torch.cat([h, stat.view(b, 1, 1, 1).expand(b, 1, height, width)], dim=1)


def _forget_host_steps(module: "GAN", _incompatible_keys) -> None:
    module._host_steps = None


class GAN(GenerativeModel):
    family: ClassVar[str] = "gan"
    config_class: ClassVar[type[ModelConfig]] = GANConfig
    has_likelihood: ClassVar[bool] = False
    has_latent: ClassVar[bool] = True
    samples_on_grid: ClassVar[bool] = False
    train_input: ClassVar[str] = "intensity"
    # D(G(z)) rises and falls with the two-player game, not with sample quality: the
    # lowest one once picked epoch 6 of 8 of the `cpu` run.
    validation_selects_weights: ClassVar[bool] = False
    # Hinge loss, spectral-norm D, EMA of G, resize-conv G, D at twice G's learning rate with
    # Adam betas (0, 0.9) (the SNGAN/BigGAN family's recipe), and an R1 penalty on D: across
    # 3 seeds of the quick preset it turned {FID 61/19/35, recall 0.04/0.46/0.30} (one collapse)
    # into {21/17/27, 0.35/0.39/0.28}; batches of 64 (twice the steps for the same images) into
    # {11.9/11.5/9.4, 0.50/0.63/0.59} (fp32, benchmarks/RESULTS.md). GAN losses do not measure
    # sample quality, so nothing watches them for early stopping.
    presets: ClassVar[dict[str, dict[str, dict[str, Any]]]] = {
        # About 8 minutes on 2 CPU cores: 3,000 steps of 64 (R1 costs ~35% of a step). The step
        # count, not the images seen, limits this short run: 1,500 steps of 128 reached FID 17.7-19.5
        # (fp32), a cosine decay of the rates 45 (seed 0), 64 at 2/3 the rates 15.3 (seed 0).
        "quick": {
            "model": {"latent_dim": 64, "g_width": 16, "d_width": 32, "d_features": 128, "ema_decay": 0.999,
                      "r1_gamma": 1.0},
            "train": {"epochs": 4, "batch_size": 64, "lr": 3e-4, "player_lr": {"discriminator": 6e-4},
                      "betas": (0.0, 0.9), "max_train_examples": 48000, "early_stopping_patience": None,
                      "checkpoint_every": 1, "max_val_examples": 1000,
                      # bf16 where the CPU has it: 1.7x the images/s at batch 128, FID 17.6 / recall 0.41
                      # in make run (fp32: 18.5 / 0.42; ninth session); fp32 elsewhere.
                      "autocast": "auto"},
        },
        # 2 CPU cores in <= 90 minutes: the full preset's nets and rates cut to 20 epochs of 54k.
        # Width 64 without R1 in bf16 where the CPU has it: 364 images/s against 209 in fp32
        # (channels-last both; benchmarks/RESULTS.md, fifteenth session), which buys 20 epochs
        # where fp32 fit 8 (FID 7.18).
        "cpu": {
            "model": {"latent_dim": 128, "g_width": 64, "d_width": 64, "d_features": 512, "ema_decay": 0.9995},
            "train": {"epochs": 20, "batch_size": 128, "lr": 2e-4, "player_lr": {"discriminator": 4e-4},
                      "betas": (0.0, 0.9), "early_stopping_patience": None, "checkpoint_every": 1,
                      "max_val_examples": 2000, "autocast": "auto"},
        },
        # GPU: a long schedule of the wide nets. bf16 where the hardware has it, as the `cpu` cut
        # (whose FID 3.56 was trained so): on 2 Zen 5 cores 415 images/s against 155 in fp32, so
        # its 60 epochs take hours there, not most of a day (133 min of epochs to FID 0.82, recall 0.82).
        "full": {
            "model": {"latent_dim": 128, "g_width": 64, "d_width": 64, "d_features": 512, "ema_decay": 0.9995},
            "train": {"epochs": 60, "batch_size": 128, "lr": 2e-4, "player_lr": {"discriminator": 4e-4},
                      "betas": (0.0, 0.9), "max_train_examples": None, "early_stopping_patience": None,
                      "checkpoint_every": 1, "autocast": "auto"},
        },
    }

    config: GANConfig

    def __init__(self, config: GANConfig) -> None:
        if not isinstance(config, GANConfig):
            raise TypeError(f"GAN needs a GANConfig, got {type(config).__name__}")
        super().__init__(config)
        self.conditional = config.conditional
        self.generator = Generator(config)
        self.discriminator = Discriminator(config)
        # The averaged generator: not a player (no optimizer, no gradient), updated after
        # each generator step, saved in the state_dict so a resumed run keeps its average.
        self.generator_ema = copy.deepcopy(self.generator).requires_grad_(False)
        # Generator steps taken (kept under its first name so older checkpoints load): the EMA's
        # warm-up and the lazy R1's clock, so a resumed run keeps both.
        self.register_buffer("ema_steps", torch.zeros((), dtype=torch.long))
        # Its value on the host, read from the buffer once after construction or a load: reading
        # a GPU buffer every step would make the host wait for the GPU every step.
        self._host_steps: int | None = None
        self.register_load_state_dict_post_hook(_forget_host_steps)
        # Channels-last conv weights put oneDNN on its NHWC kernels: 1.24-1.28x per training
        # step of the quick preset here (benchmarks/RESULTS.md).
        self.to(memory_format=torch.channels_last)

    @property
    def sampler(self) -> Generator:
        """The generator that samples, exports and gets evaluated."""
        return self.generator_ema if self.config.ema_decay > 0 else self.generator

    # --- training -------------------------------------------------------------------------
    def players(self) -> dict[str, list[nn.Parameter]]:
        return {
            "discriminator": list(self.discriminator.parameters()),
            "generator": list(self.generator.parameters()),
        }

    def generator_steps(self) -> int:
        """Generator steps taken (the ``ema_steps`` buffer), without a device read each step."""
        if self._host_steps is None:
            self._host_steps = int(self.ema_steps)
        return self._host_steps

    @torch.no_grad()
    def after_step(self, player: str) -> None:
        if player != "generator":
            return
        steps = self.generator_steps() + 1
        self._host_steps = steps
        self.ema_steps.add_(1)
        if self.config.ema_decay == 0:
            return
        # Early on the average follows G closely (1/10 .. decay), so a short run is not
        # dominated by the random initialization.
        decay = min(self.config.ema_decay, (1.0 + steps) / (10.0 + steps))
        for avg, live in zip(self.generator_ema.parameters(), self.generator.parameters()):
            avg.lerp_(live, 1.0 - decay)

    def loss(self, batch: Mapping[str, torch.Tensor], player: str = "discriminator") -> dict[str, torch.Tensor]:
        x = batch["x"]
        if x.ndim != 4 or tuple(x.shape[1:]) != self.image.shape:
            raise ValueError(f"GAN expects images [B, {', '.join(map(str, self.image.shape))}], got {tuple(x.shape)}")
        labels = batch["y"] if self.conditional else None
        z = torch.randn(x.shape[0], self.config.latent_dim, device=x.device)
        if player == "discriminator":
            return self._discriminator_loss(x, labels, z)
        if player == "generator":
            return self._generator_loss(z, labels)
        raise ValueError(f"GAN players are 'discriminator' and 'generator', got {player!r}")

    def _discriminator_loss(self, x, labels, z) -> dict[str, torch.Tensor]:
        with torch.no_grad():  # G gets no gradient from D's step
            fake = self.generator(z, labels)
        # D and G alternate one step each, so the generator steps done count D's steps too.
        r1 = self.config.r1_gamma > 0 and self.generator_steps() % self.config.r1_every == 0
        if r1:
            x = x.detach().requires_grad_(True)
        n = x.shape[0]
        # One forward over real and fake: one spectral-norm power iteration, not two.
        both = self.discriminator(torch.cat([x, fake.to(x.dtype)]),
                                  None if labels is None else torch.cat([labels, labels]), parts=2).float()
        real_logit, fake_logit = both[:n], both[n:]
        if self.config.loss == "hinge":
            loss = F.relu(1.0 - real_logit).mean() + F.relu(1.0 + fake_logit).mean()
        else:
            loss = F.softplus(-real_logit).mean() + F.softplus(fake_logit).mean()
        out = {
            "d_real": torch.sigmoid(real_logit).mean().detach(),
            "d_fake": torch.sigmoid(fake_logit).mean().detach(),
        }
        if r1:
            (grad,) = torch.autograd.grad(real_logit.sum(), x, create_graph=True)
            penalty = grad.pow(2).flatten(1).sum(1).mean()
            loss = loss + 0.5 * self.config.r1_gamma * self.config.r1_every * penalty
            out["r1"] = penalty.detach()
        return {"loss": loss, **out}

    def _generator_loss(self, z, labels) -> dict[str, torch.Tensor]:
        logit = self.discriminator(self.generator(z, labels), labels).float()
        loss = -logit.mean() if self.config.loss == "hinge" else F.softplus(-logit).mean()
        return {"loss": loss, "d_fake": torch.sigmoid(logit).mean().detach()}

    @torch.no_grad()
    def validation_loss(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """-log D(G(z)) with a fixed z per batch size, so it is reproducible and comparable
        across losses (a logged diagnostic: nothing early-stops on it)."""
        x = batch["x"]
        gen = torch.Generator(device=x.device).manual_seed(0)
        z = torch.randn(x.shape[0], self.config.latent_dim, generator=gen, device=x.device)
        labels = batch["y"] if self.conditional else None
        return F.softplus(-self.discriminator(self.generator(z, labels), labels)).mean()

    # --- sampling -------------------------------------------------------------------------
    def noise_spec(self) -> NoiseSpec:
        return {"z": NoiseField((self.config.latent_dim,), "normal")}

    def sample_from_noise(
        self,
        noise: Mapping[str, torch.Tensor],
        labels: torch.Tensor | None = None,
        temperature: float = 1.0,
    ) -> torch.Tensor:
        """G_ema(temperature * z): intensities in [0, 1]. Temperature < 1 shrinks z towards the
        mode of its prior (the truncation trick's trade of diversity for fidelity)."""
        if self.conditional and labels is None:
            raise ValueError("gan model is class-conditional: labels are required")
        if not self.conditional and labels is not None:
            raise ValueError("gan model is unconditional: it takes no labels")
        return self.sampler(noise["z"] * temperature, labels)

    def log_likelihood(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError(
            "the gan family defines no likelihood (an implicit model: it can sample but not "
            "evaluate p(x)); compare GANs by sample metrics such as FID"
        )
