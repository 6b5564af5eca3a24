"""Variational autoencoder (Kingma & Welling): an encoder q(z|x), a decoder p(x|z), a N(0, I) prior.

Trained by maximizing the ELBO  E_q[log p(x|z)] - KL(q(z|x) || N(0, I))  with one
reparameterized z per image and the KL in closed form; log p(x) is estimated with the
importance-weighted bound (IWAE, Burda et al.), which tightens towards log p(x) as k grows.

Decoders, by the image's quantization:
- binary: independent Bernoulli pixels (logits);
- 8-bit: a per-pixel *discretized logistic* (as in PixelCNN++): the probability of level
  k is the logistic CDF mass of its bin, the outer bins extended to -inf/+inf, so it is an
  exact discrete likelihood comparable with the other families' nats. Chosen over a 256-way
  categorical because it costs 2 outputs per pixel instead of 256 (a 784-pixel MLP decoder
  would otherwise end in a 200k-wide layer) and it knows that neighbouring levels are close,
  which a categorical must learn from data for each of the 256 levels.

Samples: z from the prior, or, with ``latent_mixture``, from a Gaussian mixture fit to the
training set's posteriors once training ends (``latent_mixture.py``): the decoder then draws
from the latent region it was trained on, not from the prior's holes.

The class-conditional variant lives in ``cvae.py``; the network code here takes an optional
one-hot label so both families share it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from genmodels.models.base import GenerativeModel, ModelConfig
from genmodels.models.latent_mixture import fit_gaussian_mixture, mixture_draw, mixture_log_prob
from genmodels.noise import NoiseField, NoiseSpec, derive_seed

__all__ = ["VAE", "VAEConfig", "discretized_logistic_log_prob", "discretized_logistic_mean", "gaussian_kl"]

ARCHITECTURES = ("mlp", "conv")
_LOG_2PI = math.log(2.0 * math.pi)
# Floor of the logistic log-scale (PixelCNN++'s): below it a bin already holds ~100% of the
# mass, and a still smaller scale only makes gradients spikier.
_MIN_LOG_SCALE = -7.0
# Decoder batch (images x importance samples) of one IWAE step, by device. On CPU the smallest
# batch the evaluation's 256 images allow measured fastest, as its activations stay in cache: 1.5x
# the decoder samples/s of 1,024 for the `full` nets, 1.05-1.4x for the others
# (benchmarks/iwae_throughput.py); a GPU wants as many as fit.
IWAE_DECODER_BATCH = {"cpu": 256, "other": 32768}
# derive_seed key of the latent mixture's fit (posterior draws), apart from every epoch's.
_LATENT_MIXTURE_STREAM = 2**31 - 1


@dataclass(frozen=True)
class VAEConfig(ModelConfig):
    latent_dim: int = 20
    architecture: str = "mlp"  # "mlp" | "conv"
    #: MLP: the encoder's hidden widths (the decoder mirrors them). conv: the dense layers
    #: between the flattened conv features and the latent.
    hidden: tuple[int, ...] = (512, 512)
    #: conv only: channels of the stride-2 conv stages (the decoder mirrors them).
    conv_channels: tuple[int, ...] = (32, 64)
    #: conv only: residual blocks (two 3x3 convs and a skip) after each encoder stage and
    #: before each decoder stage.
    res_blocks: int = 0
    #: default importance samples of ``log_likelihood``; reported figures need >= 1000.
    iwae_k: int = 1000
    #: beta of the KL term ramps linearly 0 -> 1 over this many epochs (0: always 1).
    kl_warmup_epochs: int = 0
    conditional: bool = False
    #: conditional models only: a learned prior N(mu_y, diag sigma_y^2) per class instead of
    #: N(0, I). Whatever class information the posterior keeps in z, sampling z from its own
    #: class's prior region keeps samples of the asked-for class.
    class_prior: bool = False
    #: conditional conv models only: the label also scales and shifts the channels of every
    #: decoder stage (FiLM, Perez et al. 2018): h * (1 + gamma_y) + beta_y, from a learned
    #: per-class table (zero-initialized: training starts from the plain label-map decoder).
    label_film: bool = False
    #: conditional conv models only: the label as constant feature maps into every encoder
    #: stage as well (not only beside the flattened features).
    label_encoder_maps: bool = False
    #: Gaussian components (full covariance; per class for a conditional model) fit by EM to
    #: posterior draws of the training set once training ends; sampling draws z from them
    #: instead of the prior (``latent_mixture.py`` says why). 0: sample the prior. The
    #: likelihood (IWAE) is of the model that samples: this mixture prior and the decoder.
    latent_mixture: int = 0

    def __post_init__(self) -> None:
        # JSON / MLflow round trips turn tuples into lists; keep the config hashable.
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        object.__setattr__(self, "conv_channels", tuple(int(c) for c in self.conv_channels))
        if self.latent_dim < 1:
            raise ValueError(f"latent_dim must be >= 1, got {self.latent_dim}")
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {self.architecture!r}")
        if any(h < 1 for h in self.hidden):
            raise ValueError(f"hidden widths must be >= 1, got {self.hidden}")
        if self.architecture == "conv" and (not self.conv_channels or any(c < 1 for c in self.conv_channels)):
            raise ValueError(f"conv architecture needs conv_channels >= 1, got {self.conv_channels}")
        if self.res_blocks < 0 or (self.res_blocks and self.architecture != "conv"):
            raise ValueError(f"res_blocks must be >= 0 and needs the conv architecture, got {self.res_blocks}")
        if self.iwae_k < 1:
            raise ValueError(f"iwae_k must be >= 1, got {self.iwae_k}")
        if self.latent_mixture < 0:
            raise ValueError(f"latent_mixture must be >= 0 components, got {self.latent_mixture}")
        if self.kl_warmup_epochs < 0:
            raise ValueError(f"kl_warmup_epochs must be >= 0, got {self.kl_warmup_epochs}")
        if self.conditional and self.image.num_classes < 1:
            raise ValueError("a conditional model needs image.num_classes >= 1")
        if self.class_prior and not self.conditional:
            raise ValueError("class_prior needs a conditional model (the prior is per class)")
        for name in ("label_film", "label_encoder_maps"):
            if getattr(self, name) and not (self.conditional and self.architecture == "conv"):
                raise ValueError(f"{name} needs a conditional model with the conv architecture")


# --- likelihood pieces (module level so tests and evaluation can use them directly) -----------
def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor, prior_mu: torch.Tensor | None = None,
                prior_logvar: torch.Tensor | None = None) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(prior_mu, exp(prior_logvar))) summed over the last dim, in
    nats; the prior is N(0, I) when not given."""
    if prior_mu is None:
        return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1)
    return 0.5 * ((mu - prior_mu).pow(2) * torch.exp(-prior_logvar) + torch.exp(logvar - prior_logvar)
                  - 1.0 + prior_logvar - logvar).sum(-1)


def discretized_logistic_log_prob(
    x: torch.Tensor, loc: torch.Tensor, log_scale: torch.Tensor, levels: int = 256
) -> torch.Tensor:
    """Elementwise log P(x) of a logistic(loc, exp(log_scale)) discretized to ``levels`` bins.

    ``x`` lies on the grid k/(levels-1); bin k is [x - h, x + h] with h = 0.5/(levels-1), and
    the first and last bins extend to -inf and +inf, so the probabilities of the ``levels``
    values sum to exactly 1. Every branch stays finite everywhere (no NaN gradients through
    ``torch.where``): log(sigmoid(a) - sigmoid(b)) is written as
    logsigmoid(a) - softplus(b) + log(1 - exp(b - a)), stable for any a > b.
    """
    half = 0.5 / (levels - 1)
    inv_scale = torch.exp(-log_scale)
    a = (x - loc + half) * inv_scale  # upper edge of the bin, standardized
    b = (x - loc - half) * inv_scale  # lower edge
    interior = F.logsigmoid(a) - F.softplus(b) + torch.log(-torch.expm1(-2.0 * half * inv_scale))
    lowest = F.logsigmoid(a)  # P(X < x + h)
    highest = -F.softplus(b)  # P(X > x - h) = sigmoid(-b)
    return torch.where(x < half, lowest, torch.where(x > 1.0 - half, highest, interior))


def discretized_logistic_mean(loc: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """E[clip(X, 0, 1)] for X ~ logistic(loc, exp(log_scale)), in closed form.

    The discretized distribution's mean is the midpoint-rule sum of this same integral
    (int_0^1 P(X > t) dt) over the bin edges, so the two differ by under half a grey level,
    and this needs no [.., levels] tensor (which would not fit for large sample batches).
    """
    scale = log_scale.exp()
    return (scale * (F.softplus(loc / scale) - F.softplus((loc - 1.0) / scale))).clamp(0.0, 1.0)


# --- networks ---------------------------------------------------------------------------------
def _mlp(sizes: list[int]) -> nn.Sequential:
    """Linear layers with ELU between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(nn.ELU())
    return nn.Sequential(*layers)


def _conv_sizes(size: int, stages: int) -> list[int]:
    """Spatial sizes after each stride-2 stage (kernel 3, padding 1: s -> ceil(s/2))."""
    sizes = [size]
    for _ in range(stages):
        sizes.append((sizes[-1] + 1) // 2)
    return sizes


class _ResBlock(nn.Module):
    """x + conv(elu(conv(elu(x)))), 3x3, same width: depth at a fixed resolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.elu(self.conv1(F.elu(x))))


def _with_label_maps(h: torch.Tensor, onehot: torch.Tensor | None) -> torch.Tensor:
    """Append the one-hot label as constant feature maps: every decoder stage sees the class,
    so no stage can learn to ignore it (a label fed only at the input was ignored half the time)."""
    if onehot is None:
        return h
    maps = onehot[:, :, None, None].expand(-1, -1, h.shape[2], h.shape[3])
    return torch.cat([h, maps], dim=1)


class _FiLM(nn.Module):
    """Per-channel scale and shift chosen by the label: h * (1 + gamma_y) + beta_y. A one-hot
    row times a table (plain tensor ops: exports to ONNX); zero init is the identity."""

    def __init__(self, cond_dim: int, channels: int) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.zeros(cond_dim, 2 * channels))

    def forward(self, h: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        gamma, beta = (onehot @ self.table).chunk(2, dim=1)
        return h * (1.0 + gamma[:, :, None, None]) + beta[:, :, None, None]


class _Encoder(nn.Module):
    """x [B,C,H,W] (+ one-hot label) -> (mu, logvar) [B, latent]."""

    def __init__(self, cfg: VAEConfig, cond_dim: int) -> None:
        super().__init__()
        img = cfg.image
        self.latent_dim = cfg.latent_dim
        # Label maps into every conv stage (label_encoder_maps): one module per stage.
        self.stages = None
        if cfg.architecture == "conv":
            chans = [img.channels, *cfg.conv_channels]
            if cfg.label_encoder_maps:
                self.stages = nn.ModuleList(
                    nn.Sequential(nn.Conv2d(c_in + cond_dim, c_out, kernel_size=3, stride=2, padding=1), nn.ELU(),
                                  *(_ResBlock(c_out) for _ in range(cfg.res_blocks)))
                    for c_in, c_out in zip(chans[:-1], chans[1:])
                )
                self.features = nn.Flatten()
            else:
                convs: list[nn.Module] = []
                for c_in, c_out in zip(chans[:-1], chans[1:]):
                    convs += [nn.Conv2d(c_in, c_out, kernel_size=3, stride=2, padding=1), nn.ELU()]
                    convs += [_ResBlock(c_out) for _ in range(cfg.res_blocks)]
                convs.append(nn.Flatten())
                self.features = nn.Sequential(*convs)
            h = _conv_sizes(img.height, len(cfg.conv_channels))[-1]
            w = _conv_sizes(img.width, len(cfg.conv_channels))[-1]
            feat_dim = chans[-1] * h * w
            # ELU after the last dense layer too: the head below is the final linear map.
            self.dense = nn.Sequential(_mlp([feat_dim + cond_dim, *cfg.hidden]), nn.ELU())
        else:
            self.features = nn.Flatten()
            self.dense = nn.Sequential(_mlp([img.dims + cond_dim, *cfg.hidden]), nn.ELU())
        self.head = nn.Linear(cfg.hidden[-1], 2 * cfg.latent_dim)

    def forward(self, x: torch.Tensor, onehot: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        h = 2.0 * x - 1.0  # centred input: better conditioned first layer
        if self.stages is not None:
            for stage in self.stages:
                h = stage(_with_label_maps(h, onehot))
        h = self.features(h)
        if onehot is not None:
            h = torch.cat([h, onehot], dim=1)
        mu, logvar = self.head(self.dense(h)).chunk(2, dim=1)
        return mu, logvar


class _Decoder(nn.Module):
    """z [B, latent] (+ one-hot label) -> distribution parameters [B, P, C, H, W]."""

    def __init__(self, cfg: VAEConfig, cond_dim: int, n_params: int) -> None:
        super().__init__()
        img = cfg.image
        self.n_params = n_params
        self.shape = img.shape
        widths = list(reversed(cfg.hidden))
        if cfg.architecture == "conv":
            stages = len(cfg.conv_channels)
            hs, ws = _conv_sizes(img.height, stages), _conv_sizes(img.width, stages)
            self.start = (cfg.conv_channels[-1], hs[-1], ws[-1])
            self.dense = nn.Sequential(
                _mlp([cfg.latent_dim + cond_dim, *widths, math.prod(self.start)]), nn.ELU()
            )
            # Kernel 4, stride 2, padding 1 doubles the size exactly; an odd H or W comes out
            # one pixel larger per odd stage and is cropped (the encoder rounded it up).
            chans = [*reversed(cfg.conv_channels), img.channels * n_params]
            # Stage i: residual blocks at its input resolution, then a transposed conv that
            # doubles it, its input widened by the label maps (cond_dim of them).
            self.blocks = nn.ModuleList(
                nn.Sequential(*(_ResBlock(c_in) for _ in range(cfg.res_blocks))) for c_in in chans[:-1]
            )
            self.ups = nn.ModuleList(
                nn.ConvTranspose2d(c_in + cond_dim, c_out, kernel_size=4, stride=2, padding=1)
                for c_in, c_out in zip(chans[:-1], chans[1:])
            )
            # label_film: the label also scales and shifts each stage's input channels.
            self.films = nn.ModuleList(_FiLM(cond_dim, c) for c in chans[:-1]) if cfg.label_film else None
        else:
            self.start = None
            self.dense = _mlp([cfg.latent_dim + cond_dim, *widths, img.dims * n_params])
            self.ups = None
            self.films = None

    def forward(self, z: torch.Tensor, onehot: torch.Tensor | None) -> torch.Tensor:
        h = z if onehot is None else torch.cat([z, onehot], dim=1)
        h = self.dense(h)
        c, height, width = self.shape
        if self.ups is not None:
            h = h.reshape(-1, *self.start)
            for i, (blocks, up) in enumerate(zip(self.blocks, self.ups)):
                if self.films is not None:
                    h = self.films[i](h, onehot)
                h = up(_with_label_maps(blocks(h), onehot))
                if i < len(self.ups) - 1:
                    h = F.elu(h)
            h = h[:, :, :height, :width]
        return h.reshape(-1, self.n_params, c, height, width)


# --- the family -------------------------------------------------------------------------------
class VAE(GenerativeModel):
    family: ClassVar[str] = "vae"
    config_class: ClassVar[type[ModelConfig]] = VAEConfig
    has_latent: ClassVar[bool] = True
    samples_on_grid: ClassVar[bool] = False
    #: the value ``config.conditional`` must have in this family.
    _requires_conditional: ClassVar[bool] = False

    presets: ClassVar[dict[str, dict[str, dict[str, Any]]]] = {
        # `make run`: about 3 minutes on 2 CPU cores. A conv encoder/decoder (label maps at every
        # decoder stage for the CVAE); IWAE k=100 keeps the training-time estimate cheap, the
        # reported figure uses the evaluation's k (250 for quick: genmodels.evaluation.effort).
        # No KL warm-up here: over 4 epochs a warm-up epoch cost ~3 nats (val -ELBO 243.8 with
        # one, 240.6 without after 3 epochs).
        "quick": {
            "model": {"latent_dim": 32, "architecture": "conv", "hidden": (512,), "conv_channels": (32, 64),
                      "iwae_k": 100, "latent_mixture": 20},
            # bf16 where the CPU has it: 1.45-1.49x the images/s, the same nats and class accuracy
            # (benchmarks/RESULTS.md, ninth session); fp32 on CPUs without it.
            "train": {"epochs": 4, "batch_size": 128, "lr": 1e-3, "scheduler": "cosine",
                      "max_train_examples": None, "early_stopping_patience": None, "max_val_examples": 2000,
                      "autocast": "auto"},
        },
        # 2 CPU cores, about 90 minutes: residual blocks at both resolutions, KL warm-up, a
        # cosine schedule; early stopping guards against overfitting.
        "cpu": {
            "model": {"latent_dim": 32, "architecture": "conv", "hidden": (512,), "conv_channels": (32, 64),
                      "res_blocks": 1, "iwae_k": 5000, "kl_warmup_epochs": 5, "latent_mixture": 50},
            "train": {"epochs": 40, "batch_size": 128, "lr": 1e-3, "scheduler": "cosine",
                      "early_stopping_patience": 8, "grad_clip": 100.0},
        },
        # GPU: wider residual conv nets, a long schedule. bf16 where the hardware has it: on 2 Zen 5
        # cores 1.71x the images/s, validation -ELBO within seed noise (paired bf16 - fp32 over 3
        # seeds +0.42/+0.33/-0.32 nats; benchmarks/RESULTS.md, forty-third session).
        "full": {
            "model": {"latent_dim": 32, "architecture": "conv", "hidden": (512,), "conv_channels": (64, 128),
                      "res_blocks": 2, "iwae_k": 5000, "kl_warmup_epochs": 10, "latent_mixture": 50},
            "train": {"epochs": 150, "batch_size": 128, "lr": 1e-3, "scheduler": "cosine",
                      "early_stopping_patience": 20, "grad_clip": 100.0, "autocast": "auto"},
        },
    }

    def __init__(self, config: VAEConfig) -> None:
        if not isinstance(config, VAEConfig):
            raise TypeError(f"{type(self).__name__} needs a VAEConfig, got {type(config).__name__}")
        if config.conditional != self._requires_conditional:
            kind = "class-conditional" if self._requires_conditional else "unconditional (use cvae for labels)"
            raise ValueError(
                f"the {self.family} family is {kind}: config.conditional must be {self._requires_conditional}"
            )
        super().__init__(config)
        self.conditional = config.conditional
        self.latent_dim = config.latent_dim
        self.n_params = 1 if config.image.levels == 2 else 2  # Bernoulli logits | logistic loc, log-scale
        cond_dim = config.image.num_classes if config.conditional else 0
        self.encoder = _Encoder(config, cond_dim)
        self.decoder = _Decoder(config, cond_dim, self.n_params)
        if config.class_prior:
            # Zero init: training starts from the N(0, I) prior and moves each class's.
            self.prior_mu = nn.Parameter(torch.zeros(config.image.num_classes, config.latent_dim))
            self.prior_logvar = nn.Parameter(torch.zeros(config.image.num_classes, config.latent_dim))
        if config.latent_mixture:
            # Until after_training fits it: every component the standard normal, i.e. the prior.
            groups, m, d = config.image.num_classes if config.conditional else 1, config.latent_mixture, config.latent_dim
            self.register_buffer("mixture_weights", torch.full((groups, m), 1.0 / m))
            self.register_buffer("mixture_means", torch.zeros(groups, m, d))
            self.register_buffer("mixture_scale_tril", torch.eye(d).expand(groups, m, d, d).clone())
        # Weight of the KL term in the training loss only (warm-up); 1 unless begin_epoch lowers it.
        self.beta = 1.0
        # Channels-last conv weights put oneDNN on its NHWC kernels: measured here 1.32x on the
        # residual preset's training step and 1.7x on the IWAE decoder (benchmarks/RESULTS.md).
        self.to(memory_format=torch.channels_last)

    # --- input checks -------------------------------------------------------------------
    def _check_x(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or tuple(x.shape[1:]) != self.image.shape:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{self.family}: x must be [B, {', '.join(map(str, self.image.shape))}], got {got}")
        return x.to(next(self.parameters()).dtype)

    def _onehot(self, labels: torch.Tensor | None) -> torch.Tensor | None:
        """One-hot rows by comparison (plain tensor ops: exports to ONNX; no value checks)."""
        if labels is None:
            return None
        classes = torch.arange(self.image.num_classes, device=labels.device)
        return (labels.reshape(-1, 1) == classes).to(next(self.parameters()).dtype)

    def _inputs(self, x: torch.Tensor, labels: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = self._check_x(x)
        return x, self._onehot(self.check_labels(labels, x.shape[0]))

    # --- networks -----------------------------------------------------------------------
    def encode(self, x: torch.Tensor, labels: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior q(z|x[, y]) = N(mu, exp(logvar)): (mu, logvar), each [B, latent_dim]."""
        return self.encoder(*self._inputs(x, labels))

    def decode(self, z: torch.Tensor, labels: Any = None) -> torch.Tensor:
        """Mean of p(x|z[, y]), [B, C, H, W] in [0, 1]."""
        if not isinstance(z, torch.Tensor) or z.ndim != 2 or z.shape[1] != self.latent_dim:
            got = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(f"{self.family}: z must be [B, {self.latent_dim}], got {got}")
        return self._mean(self.decoder(z, self._onehot(self.check_labels(labels, z.shape[0]))))

    def _mean(self, params: torch.Tensor) -> torch.Tensor:
        if self.n_params == 1:
            return torch.sigmoid(params[:, 0])
        return discretized_logistic_mean(*self._logistic(params))

    @staticmethod
    def _logistic(params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # loc offset by 0.5 so a freshly initialized decoder starts mid-range.
        return params[:, 0] + 0.5, params[:, 1].clamp(min=_MIN_LOG_SCALE)

    def _log_px(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """log p(x|z) [B] in nats, summed over pixels, from decoder parameters [B, P, C, H, W]."""
        if self.n_params == 1:
            logp = -F.binary_cross_entropy_with_logits(params[:, 0], x, reduction="none")
        else:
            logp = discretized_logistic_log_prob(x, *self._logistic(params), levels=self.image.levels)
        return logp.flatten(1).sum(1)

    def recon_log_prob(self, x: torch.Tensor, z: torch.Tensor, labels: Any = None) -> torch.Tensor:
        """log p(x|z[, y]) [B] in nats for given latents z [B, latent_dim]."""
        x, onehot = self._inputs(x, labels)
        return self._log_px(x, self.decoder(z, onehot))

    # --- ELBO -----------------------------------------------------------------------------
    def prior(self, onehot: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(mu, logvar) [B, latent] of p(z|y) for a class prior (one-hot rows in: plain tensor
        ops, so it exports), None for the N(0, I) prior."""
        if not self.config.class_prior or onehot is None:
            return None
        return onehot @ self.prior_mu, onehot @ self.prior_logvar

    def kl(self, mu: torch.Tensor, logvar: torch.Tensor, onehot: torch.Tensor | None = None) -> torch.Tensor:
        """KL(q(z|x[, y]) || p(z[|y])) [B] in nats, closed form."""
        prior = self.prior(onehot)
        return gaussian_kl(mu, logvar) if prior is None else gaussian_kl(mu, logvar, *prior)

    def _elbo_terms(self, x: torch.Tensor, onehot: torch.Tensor | None) -> dict[str, torch.Tensor]:
        mu, logvar = self.encoder(x, onehot)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)  # reparameterized: gradients flow
        recon = self._log_px(x, self.decoder(z, onehot))
        kl = self.kl(mu, logvar, onehot)
        return {"elbo": recon - kl, "recon": recon, "kl": kl}

    def elbo_terms(self, x: torch.Tensor, labels: Any = None) -> dict[str, torch.Tensor]:
        """{"elbo", "recon", "kl"}, each [B] nats, from one reparameterized z per image
        (torch's global RNG); elbo == recon - kl."""
        return self._elbo_terms(*self._inputs(x, labels))

    def elbo(self, x: torch.Tensor, labels: Any = None) -> torch.Tensor:
        """ELBO [B] in nats, one reparameterized z per image (torch's global RNG)."""
        return self.elbo_terms(x, labels)["elbo"]

    # --- training -------------------------------------------------------------------------
    def _batch_labels(self, batch: Mapping[str, torch.Tensor]) -> Any:
        # The training batch always carries "y"; only a conditional model reads it.
        if not self.conditional:
            return None
        if "y" not in batch:
            raise ValueError(f"{self.family}: the batch has no 'y' labels, which a conditional model needs")
        return batch["y"]

    def loss(self, batch: Mapping[str, torch.Tensor], player: str = "model") -> dict[str, torch.Tensor]:
        if player != "model":
            raise ValueError(f"{self.family} has one player, 'model'; got {player!r}")
        terms = self.elbo_terms(batch["x"], self._batch_labels(batch))
        loss = -(terms["recon"] - self.beta * terms["kl"]).mean()
        return {"loss": loss, **{k: v.mean().detach() for k, v in terms.items()}}

    def begin_epoch(self, epoch: int, total_epochs: int) -> None:
        warmup = self.config.kl_warmup_epochs
        self.beta = 1.0 if warmup == 0 else min(1.0, epoch / warmup)

    def validation_loss(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """-ELBO (beta = 1, whatever the warm-up) per image, batch mean."""
        return -self.elbo(batch["x"], self._batch_labels(batch)).mean()

    # --- likelihood ---------------------------------------------------------------------------
    @torch.no_grad()
    def iwae(self, x: torch.Tensor, labels: Any = None, k: int = 1000, chunk: int | None = None,
             with_elbo: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """IWAE bound log (1/k) sum_i p(x, z_i) / q(z_i|x), z_i ~ q(z|x): [B] nats, <= log p(x).

        ``chunk`` importance samples per image go through the decoder at a time (a decoder
        batch of B * chunk; by default near ``IWAE_DECODER_BATCH`` for the device). All
        B*k*latent_dim normal draws are taken up front from torch's global RNG, so the draws do
        not depend on ``chunk``; the result only in its last bits (~1e-7 nats), as kernels of
        another batch size sum in another order.

        ``with_elbo``: also the mean of the same log-weights, a k-sample estimate of the ELBO
        against this model's prior (the latent mixture's once fitted, which has no closed-form
        KL); per image it is <= the IWAE bound (Jensen). Returns (iwae, elbo) then.
        """
        if int(k) < 1 or (chunk is not None and int(chunk) < 1):
            raise ValueError(f"iwae needs k >= 1 and chunk >= 1, got k={k}, chunk={chunk}")
        x, onehot = self._inputs(x, labels)
        labels = None if onehot is None else onehot.argmax(1)
        mu, logvar = self.encoder(x, onehot)
        batch, dim = mu.shape
        if chunk is None:
            chunk = max(1, IWAE_DECODER_BATCH.get(mu.device.type, IWAE_DECODER_BATCH["other"]) // batch)
        k, chunk = int(k), int(chunk)
        eps = torch.randn(batch, k, dim, device=mu.device, dtype=mu.dtype)
        std = torch.exp(0.5 * logvar).unsqueeze(1)
        # log q(z|x) at z = mu + std*eps, without the constant shared with log p(z).
        log_q_base = -0.5 * logvar.sum(1, keepdim=True)
        prior = self.prior(onehot)
        log_w = torch.empty(batch, k, device=mu.device, dtype=mu.dtype)
        for start in range(0, k, chunk):
            e = eps[:, start : start + chunk]
            c = e.shape[1]
            z = mu.unsqueeze(1) + std * e  # [B, c, latent]
            log_pz = self._log_prior(z, prior, labels)
            log_pz_minus_qz = log_pz + 0.5 * e.pow(2).sum(-1) - log_q_base
            rep_onehot = None if onehot is None else onehot.repeat_interleave(c, dim=0)
            params = self.decoder(z.reshape(batch * c, dim), rep_onehot)
            log_px = self._log_px(x.repeat_interleave(c, dim=0), params).view(batch, c)
            log_w[:, start : start + c] = log_px + log_pz_minus_qz
        bound = torch.logsumexp(log_w, dim=1) - math.log(k)
        return (bound, log_w.mean(dim=1)) if with_elbo else bound

    def _log_prior(self, z: torch.Tensor, prior: tuple[torch.Tensor, torch.Tensor] | None,
                   labels: torch.Tensor | None) -> torch.Tensor:
        """log p(z[|y]) [B, c] of z [B, c, latent] without the constant -latent/2 log(2 pi) (IWAE's
        log q leaves it out too): the prior's, or its latent mixture's once one is configured."""
        if prior is None:
            u, log_scale = z, 0.0
        else:
            p_mu, p_logvar = (t.unsqueeze(1) for t in prior)
            u, log_scale = (z - p_mu) * torch.exp(-0.5 * p_logvar), 0.5 * p_logvar.sum(-1)
        if not self.config.latent_mixture:
            return -0.5 * u.pow(2).sum(-1) - log_scale
        groups = torch.zeros(z.shape[0], dtype=torch.long, device=z.device) if labels is None else labels
        log_pu = torch.empty(z.shape[:2], dtype=z.dtype, device=z.device)
        for group in groups.unique().tolist():
            rows = groups == group
            flat = u[rows].reshape(-1, z.shape[-1])
            log_pu[rows] = mixture_log_prob(flat, self.mixture_weights[group], self.mixture_means[group],
                                            self.mixture_scale_tril[group]).reshape(-1, z.shape[1]).to(z.dtype)
        return log_pu + 0.5 * z.shape[-1] * _LOG_2PI - log_scale

    def log_likelihood(
        self, x: torch.Tensor, labels: Any = None, k: int | None = None, chunk: int | None = None
    ) -> torch.Tensor:
        """log p(x[|y]) [B] in nats, estimated by IWAE with ``config.iwae_k`` samples by default
        (a lower bound whose expectation rises to log p(x) as k grows)."""
        return self.iwae(x, labels, k=self.config.iwae_k if k is None else k, chunk=chunk)

    # --- sampling -------------------------------------------------------------------------------
    def noise_spec(self) -> NoiseSpec:
        spec = {"z": NoiseField((self.latent_dim,), "normal")}
        if self.config.latent_mixture:
            # Named to sort after "z": the seed's z noise is drawn first, as without a mixture.
            spec["z_component"] = NoiseField((1,), "uniform")
        return spec

    @property
    def has_latent_mixture(self) -> bool:
        """Whether samples draw z from a latent mixture (``config.latent_mixture``): interpolations
        then walk between the two seeds' latents (:meth:`standardized_latent`), not their noise."""
        return bool(self.config.latent_mixture)

    def sample_from_noise(
        self,
        noise: Mapping[str, torch.Tensor],
        labels: torch.Tensor | None = None,
        temperature: float = 1.0,
    ) -> torch.Tensor:
        """Decoder means [n, C, H, W] in [0, 1] at z = noise["z"] * temperature (plus the class
        prior's mean and scale). With a latent mixture, ``noise["z_component"]`` picks the
        component (of the class's mixture) and z = its mean + its Cholesky factor @ that noise:
        the temperature narrows each component, not the spread between them.

        ``decode_standardized(standardized_latent(noise, labels, temperature), labels)``, the
        same images bit for bit. Export path: no checks of tensor values here (``sample``
        validated the labels).
        """
        return self.decode_standardized(self.standardized_latent(noise, labels, temperature), labels)

    def _check_conditioning(self, labels: torch.Tensor | None) -> None:
        if self.conditional and labels is None:
            raise ValueError(f"{self.family} model is class-conditional: labels are required")
        if not self.conditional and labels is not None:
            raise ValueError(f"{self.family} model is unconditional: it takes no labels")

    def standardized_latent(
        self,
        noise: Mapping[str, torch.Tensor],
        labels: torch.Tensor | None = None,
        temperature: float = 1.0,
    ) -> torch.Tensor:
        """The latents [n, latent_dim] of ``sample_from_noise`` in the prior's standardized
        coordinates (the latent mixture's: after its draw, before a class prior's mean and
        scale). Export path: no checks of tensor values."""
        self._check_conditioning(labels)
        z = noise["z"] * temperature
        if self.config.latent_mixture:
            z = mixture_draw(z, noise["z_component"], *self._mixture_rows(labels, z.shape[0]))
        return z

    def decode_standardized(self, u: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Decoder means [n, C, H, W] in [0, 1] of standardized latents ``u`` [n, latent_dim]:
        z = the class prior's mean + its scale * u (z = u for the N(0, I) prior), then the
        decoder. Export path: no checks of tensor values."""
        self._check_conditioning(labels)
        onehot = self._onehot(labels)
        prior = self.prior(onehot)
        if prior is not None:  # the class's own prior: z = mu_y + sigma_y * u
            u = prior[0] + torch.exp(0.5 * prior[1]) * u
        return self._mean(self.decoder(u, onehot))

    def _mixture_rows(self, labels: torch.Tensor | None, n: int) -> tuple[torch.Tensor, ...]:
        """(weights [n, M], means [n, M, D], scale_tril [n, M, D, D]) of each row's mixture."""
        tables = (self.mixture_weights, self.mixture_means, self.mixture_scale_tril)
        if labels is None:
            return tuple(t.expand(n, *t.shape[1:]) for t in tables)
        return tuple(t[labels] for t in tables)

    @torch.no_grad()
    def after_training(self, batches: Iterable[Mapping[str, torch.Tensor]], seed: int) -> None:
        """Fit the latent mixture (``config.latent_mixture`` components) to one posterior draw
        per training image, in the prior's standardized coordinates; deterministic for a seed."""
        if not self.config.latent_mixture:
            return
        was_training = self.training
        self.eval()
        generator = torch.Generator().manual_seed(derive_seed(seed, _LATENT_MIXTURE_STREAM))
        draws, groups = [], []
        for batch in batches:
            x, onehot = self._inputs(batch["x"], self._batch_labels(batch))
            mu, logvar = self.encoder(x, onehot)
            eps = torch.randn(mu.shape, generator=generator).to(mu.device, mu.dtype)
            z = mu + torch.exp(0.5 * logvar) * eps
            prior = self.prior(onehot)
            draws.append((z if prior is None else (z - prior[0]) * torch.exp(-0.5 * prior[1])).double().cpu())
            groups.append(onehot.argmax(1).cpu() if onehot is not None else torch.zeros(len(z), dtype=torch.long))
        u, group_of = torch.cat(draws), torch.cat(groups)
        for group in range(self.mixture_weights.shape[0]):
            members = u[group_of == group]
            if len(members) < 2:
                raise ValueError(f"{self.family}: the latent mixture of class {group} needs >= 2 training images, "
                                 f"got {len(members)}")
            fit = fit_gaussian_mixture(members, self.config.latent_mixture, seed=derive_seed(seed, group))
            m = len(fit.weights)  # fewer images than components: the rest stay unused copies
            self.mixture_weights[group].zero_()[:m] = fit.weights
            self.mixture_means[group, :m] = fit.means
            self.mixture_scale_tril[group, :m] = fit.scale_tril
        self.train(was_training)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, labels: Any = None) -> torch.Tensor:
        """decode(posterior mean): [B, C, H, W] in [0, 1]."""
        x, onehot = self._inputs(x, labels)
        mu, _ = self.encoder(x, onehot)
        return self._mean(self.decoder(mu, onehot))
