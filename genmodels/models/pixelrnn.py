"""PixelRNN (van den Oord, Kalchbrenner & Kavukcuoglu, 2016): an exact autoregressive model.

p(x) = prod over pixels in raster order, and over sub-pixels R, G, B within a pixel, of a
categorical over ``image.levels`` given everything before. The network: a 7x7 mask-A input
convolution (or 7 rows by ``input_width`` columns), ``num_layers`` Row LSTM or Diagonal BiLSTM
layers (mask-B semantics, optional residual connections), and a two-layer 1x1 mask-B output
head giving logits [B, levels, C, H, W]. Class conditioning adds a learned per-class bias to
every layer's gates and to the head's hidden layer. On dynamically binarized training batches the
loss is the NLL's expectation over each pixel's own binarization (``_training_log_likelihood``).

Sampling. ``sample_from_noise`` runs the cached sampler: explicit state tensors advanced by
pure step functions, so a pixel costs the same whatever the image size:

- ``pixel_step`` computes every layer at one pixel from a bounded window of sampled pixels
  (the mask-A kernel's upper half) and cached neighbour states, and returns that pixel's
  logits and its new states;
- ``row_step`` (Diagonal BiLSTM only) runs the right-to-left direction over a finished row;
  the output needs it only from the next row on, because of its one-row shift.

The driver (``_drive_cached``, under ``sample_cached`` and ``complete_prefix_cached``) only slices windows out of and writes results into row
buffers, the same work a runtime over exported step graphs does. With C = 3, each pixel
takes C steps (R, then G given R, then B given R and G); the states of the last one are
kept, since no state at a pixel depends on its last channel. ``sample_naive`` recomputes the
whole network per sub-pixel: slow, and the reference the cached sampler is tested against.
A sub-pixel's level is the inverse CDF of softmax(logits / temperature) at its uniform
noise ``u``, so images are a deterministic function of (weights, noise, labels, temperature).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from genmodels.models._pixelrnn_layers import (
    GATES,
    DiagonalBiLSTMLayer,
    MaskedConv2d,
    RowLSTMLayer,
    full_precision,
)
from genmodels.checks import check_temperature
from genmodels.models.base import GenerativeModel, ModelConfig
from genmodels.noise import NoiseField, NoiseSpec

LAYER_KINDS = ("row", "diagonal")


@dataclass(frozen=True)
class PixelRNNConfig(ModelConfig):
    layer: str = "row"  # "row" (Row LSTM) | "diagonal" (Diagonal BiLSTM)
    num_layers: int = 2
    hidden_channels: int = 32  # LSTM state size = width of every feature map between layers
    residual: bool = True
    head_hidden: int = 64  # hidden width of the 1x1 output head
    input_kernel: int = 7  # side of the mask-A input convolution
    # Its width (None: square), at most 2W-1 (wider taps would only read padding). The Row LSTM
    # sees its own row only through 1x3 taps, one pixel further left per layer; 2W-1 columns
    # show the first layer everything to the pixel's left for the price of a C-channel conv.
    input_width: int | None = None
    # A learned bias on the first feature map at every pixel: where it is on the image. Zero
    # padding shows the input conv only the borders it touches and a black background looks the
    # same everywhere, so without it a Row LSTM must count rows and columns in its state.
    position_bias: bool = False
    conditional: bool = False

    def __post_init__(self) -> None:
        if self.layer not in LAYER_KINDS:
            raise ValueError(f"PixelRNNConfig.layer must be one of {list(LAYER_KINDS)}, got {self.layer!r}")
        for name in ("num_layers", "hidden_channels", "head_hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"PixelRNNConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.input_kernel < 3 or self.input_kernel % 2 == 0:
            raise ValueError(f"PixelRNNConfig.input_kernel must be odd and >= 3, got {self.input_kernel}")
        if self.input_width is not None and (self.input_width < 3 or self.input_width % 2 == 0):
            raise ValueError(f"PixelRNNConfig.input_width must be odd and >= 3 (or None), got {self.input_width}")
        c = self.image.channels
        if c not in (1, 3):
            raise ValueError(
                f"PixelRNN supports images with 1 or 3 channels (R|G|B channel-group masks), got {c}"
            )
        if c == 3:
            for name in ("hidden_channels", "head_hidden"):
                if getattr(self, name) % 3:
                    raise ValueError(
                        f"PixelRNNConfig.{name} must be divisible by 3 for 3-channel images "
                        f"(one group of features per colour), got {getattr(self, name)}"
                    )
        if self.conditional and self.image.num_classes < 1:
            raise ValueError("a conditional PixelRNN needs image.num_classes >= 1")

    @property
    def input_columns(self) -> int:
        """Width of the mask-A input kernel: ``input_width`` capped at 2W-1, or square."""
        if self.input_width is None:
            return self.input_kernel
        return min(self.input_width, 2 * self.image.width - 1)

    @property
    def input_pad(self) -> tuple[int, int]:
        """Rows above and columns either side of a pixel that the mask-A input kernel reads."""
        return self.input_kernel // 2, self.input_columns // 2


def categorical_inverse_cdf(logits: torch.Tensor, u: torch.Tensor, temperature: float | torch.Tensor) -> torch.Tensor:
    """Level index whose CDF interval holds ``u``: logits [B, levels], u [B] -> int64 [B].

    In float64 and unnormalized (u scaled by the total instead), as its numpy twin
    ``sampling.categorical_inverse_cdf_np``: the float32 softmax and cumsum of torch's kernels and
    numpy's differed in the last bits of 81% of the CDF's entries, enough to pick another of 256
    levels for 1 pixel in 50,000 and so another image from there on (the ONNX runtime's images
    were not torch's; export's exact parity check failed at random).
    """
    z = logits.double() / temperature
    cdf = torch.exp(z - z.amax(dim=1, keepdim=True)).cumsum(dim=1)
    # Level k holds [cdf[k-1], cdf[k]) of u * total: `<=`, or a u of exactly 0 would pick level 0
    # where it has no mass. A u of 1 (or rounding) would count every level: it means the last one.
    return (cdf <= u.double()[:, None] * cdf[:, -1:]).sum(dim=1).clamp(max=logits.shape[1] - 1)


class PixelRNN(GenerativeModel):
    family = "pixelrnn"
    config_class = PixelRNNConfig
    has_likelihood = True
    has_latent = False
    samples_on_grid = True
    train_input = "quantized"
    can_complete = True  # everything after a raster-order prefix (known rows)
    presets: ClassVar[dict[str, dict[str, dict[str, Any]]]] = {
        # `make run`: one pass over the 54k training images, 4-6 minutes on 2 CPU cores. A
        # learning rate annealed every step from 6e-3 and a wider head took it from 244.3 nats
        # (16k images at a constant 2e-3) to 236.4, below the quick VAE's 237.0 (benchmarks/RESULTS.md).
        # Its small ops leave one process's second thread idle: on Ray, two workers of 16 images
        # each train the same batches of 32 1.23x as fast (benchmarks/ray_overhead.py).
        # A 7x55 input kernel (on 28x28 images, the whole row to the pixel's left and the 3 rows
        # above in full; capped at 2W-1 on smaller images) took the same training from 236.46
        # nats (FID 11.0) to 231.87 (FID 1.3); the expected loss over each pixel's binarization
        # (628cd41) to 231.39. bf16 where the CPU computes it, the cells and residual stream in fp32:
        # within a fifth of a nat (-0.10 and +0.19 in two pairs on 10,000 test images) at 1.25-1.40x
        # the images/s of fp32. A position bias: -1.04 nats paired on 10,000, at no cost.
        "quick": {
            "model": {"layer": "row", "num_layers": 3, "hidden_channels": 32, "head_hidden": 128,
                      "input_width": 55, "position_bias": True},
            "train": {"epochs": 1, "batch_size": 32, "lr": 6e-3, "scheduler": "cosine_steps", "grad_clip": 1.0,
                      "max_train_examples": None, "max_val_examples": 1000, "workers": 2, "autocast": "auto"},
        },
        # 2 CPU cores, at most 90 minutes: a deeper Row LSTM over the whole training set with the
        # quick screen's per-step schedule and the 7x55 input kernel. Depth over width: 6 layers of
        # 48 train as fast as 4 of 64 and reached 227.34 nats in 62 minutes on 2 Zen 4 cores, what
        # 4x64 reached only in 8 epochs (227.33; 4 epochs: 227.64; benchmarks/RESULTS.md). The
        # deeper net wants a lower peak than the 1-epoch quick screens picked: 3e-3 beat 4e-3 by
        # 0.43 nats and 6e-3 by 1.95 on the same 10,000 test images, paired (2e-3: 0.06 more, flat);
        # this preset's own retrain at 3e-3 reached 226.97 in 58 minutes of epochs, and 226.59 in
        # 56 with the loss's expectation over each pixel's binarization (628cd41). bf16 convolutions
        # (the cells and residual stream fp32) bought 4 more layers: 10x48 trained in 70 minutes
        # on Zen 4's bf16 units to 225.96, 0.63 nats better than 6x48 in fp32 (about 80 minutes
        # with a 6-minute evaluation; where "auto" stays fp32 its step costs 1.55x 6x48's). Two processes of one
        # thread at 16 images trained 1.24-1.34x the images of one of two threads at 32 (the 4x64
        # net; train_throughput.py, no Ray): on Ray, two workers split its batches of 32. The position
        # bias: 225.96 -> 225.82 here (unpaired; 0.69 ahead after the first epoch, 0.2 at the end).
        "cpu": {
            "model": {"layer": "row", "num_layers": 10, "hidden_channels": 48, "head_hidden": 128,
                      "input_width": 55, "position_bias": True},
            "train": {"epochs": 4, "batch_size": 32, "lr": 3e-3, "scheduler": "cosine_steps", "grad_clip": 1.0,
                      "early_stopping_patience": 2, "max_val_examples": 2000, "workers": 2, "autocast": "auto"},
        },
        # GPU: the paper's MNIST model (7 Diagonal BiLSTM layers, residual), trained to early stop.
        "full": {
            "model": {"layer": "diagonal", "num_layers": 7, "hidden_channels": 64, "head_hidden": 128},
            "train": {"epochs": 60, "batch_size": 64, "lr": 1e-3, "scheduler": "cosine", "grad_clip": 1.0,
                      "early_stopping_patience": 5},
        },
    }

    def __init__(self, config: PixelRNNConfig) -> None:
        if not isinstance(config, PixelRNNConfig):
            raise TypeError(f"PixelRNN needs a PixelRNNConfig, got {type(config).__name__}")
        super().__init__(config)
        self.conditional = config.conditional
        img = config.image
        c, hid = img.channels, config.hidden_channels
        self.directions = 2 if config.layer == "diagonal" else 1
        kernel = (config.input_kernel, config.input_columns)
        self.input_conv = MaskedConv2d(c, hid, kernel, "A", c, c, hid)
        layer_cls = DiagonalBiLSTMLayer if config.layer == "diagonal" else RowLSTMLayer
        self.layers = nn.ModuleList(layer_cls(hid, c, config.residual) for _ in range(config.num_layers))
        if config.position_bias:
            self.position_bias = nn.Parameter(torch.zeros(hid, img.height, img.width))
        hh = config.head_hidden
        self.head_hidden = MaskedConv2d(hid, hh, (1, 1), "B", c, hid, hh)
        self.head_out = MaskedConv2d(hh, c * img.levels, (1, 1), "B", c, hh, c * img.levels)
        if config.conditional:
            # Zero init: training starts from the unconditional model and learns the offsets.
            self.gate_class_bias = nn.Parameter(
                torch.zeros(config.num_layers, self.directions, img.num_classes, GATES * hid)
            )
            self.head_class_bias = nn.Parameter(torch.zeros(img.num_classes, hh))

    # --- shared pieces --------------------------------------------------------------------
    @staticmethod
    def network_input(x: torch.Tensor) -> torch.Tensor:
        """Grid values in [0, 1] -> [-1, 1]; the zero padding of the convs is then mid-grey."""
        return x * 2.0 - 1.0

    def _ref(self) -> torch.Tensor:
        return self.input_conv.weight

    def _check_images(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or tuple(x.shape[1:]) != self.image.shape:
            raise ValueError(f"expected images [B, {', '.join(map(str, self.image.shape))}], got {tuple(x.shape)}")

    def conditioning(self, labels: torch.Tensor | None, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample class biases: gates [n, L, directions, 4h] and head [n, head_hidden].

        Zeros for an unconditional model, so the step functions keep one signature. Labels
        are checked strictly: required by a conditional model, refused by an unconditional one.
        """
        cfg = self.config
        labels = self.check_labels(labels, n)
        if labels is None:
            ref = self._ref()
            return (
                ref.new_zeros(n, cfg.num_layers, self.directions, GATES * cfg.hidden_channels),
                ref.new_zeros(n, cfg.head_hidden),
            )
        return self.gate_class_bias[:, :, labels].permute(2, 0, 1, 3), self.head_class_bias[labels]

    # --- full forward ---------------------------------------------------------------------
    def logits(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, levels, C, H, W] of every sub-pixel given all before it (and the label)."""
        self._check_images(x)
        b = x.shape[0]
        gate_bias = head_bias = None
        # Unconditional models ignore labels here: training batches always carry "y".
        if self.conditional:
            gate_bias, head_bias = self.conditioning(labels, b)
        feat = full_precision(self.input_conv(self.network_input(x)))  # the residual stream
        if self.config.position_bias:
            feat = feat + self.position_bias
        for idx, layer in enumerate(self.layers):
            gb = None
            if gate_bias is not None:
                gb = gate_bias[:, idx, 0] if self.directions == 1 else gate_bias[:, idx]
            feat = layer(feat, gb)
        z = self.head_hidden(F.relu(feat))
        if head_bias is not None:
            z = z + head_bias[:, :, None, None]
        out = self.head_out(F.relu(z))
        c, h, w = self.image.shape
        return out.view(b, c, self.image.levels, h, w).transpose(1, 2)

    def _subpixel_log_probs(self, x: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """log p(x_i | x_<i, label) of every sub-pixel, [B, C, H, W]."""
        logp = F.log_softmax(self.logits(x, labels), dim=1)
        return logp.gather(1, self.to_levels(x).unsqueeze(1)).squeeze(1)

    def log_likelihood(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Exact log p(x | label) in nats, [B]."""
        return self._subpixel_log_probs(x, labels).flatten(1).sum(dim=1)

    def _training_log_likelihood(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """log p(x) of a training batch, [B]; for a dynamically binarized batch, its expectation
        over each pixel's own binarization.

        A pixel is binarized independently of the pixels before it, and its prediction reads
        only those, so E[log p(x_i | x_<i)] over x_i ~ Bernoulli(grey_i) is exactly
        grey_i log p(1 | x_<i) + (1 - grey_i) log p(0 | x_<i): the same objective in expectation,
        without the variance of drawing each target (Rao-Blackwellization). The context x_<i stays
        the drawn binary image, as at test time."""
        probability = batch.get("x_probability")
        if probability is None or self.image.levels != 2:
            return self.log_likelihood(batch["x"], batch.get("y"))
        logp = F.log_softmax(self.logits(batch["x"], batch.get("y")), dim=1)
        expected = probability * logp[:, 1] + (1.0 - probability) * logp[:, 0]
        return expected.flatten(1).sum(dim=1)

    def loss(self, batch: Mapping[str, torch.Tensor], player: str = "model") -> dict[str, torch.Tensor]:
        if player != "model":
            raise ValueError(f"PixelRNN has one player, 'model'; got {player!r}")
        nll = -self._training_log_likelihood(batch).mean()
        return {
            "loss": nll,
            "nll": nll.detach(),
            "bits_per_dim": nll.detach() / (self.image.dims * math.log(2.0)),
        }

    # --- sampling -------------------------------------------------------------------------
    def noise_spec(self) -> NoiseSpec:
        return {"u": NoiseField(self.image.shape, "uniform")}

    def _check_noise(self, noise: Mapping[str, torch.Tensor], temperature: float) -> torch.Tensor:
        if "u" not in noise:
            raise ValueError(f"PixelRNN noise needs field 'u', got {sorted(noise)}")
        u = noise["u"]
        if u.ndim != 4 or tuple(u.shape[1:]) != self.image.shape:
            raise ValueError(
                f"noise 'u' must be [n, {', '.join(map(str, self.image.shape))}], got {tuple(u.shape)}"
            )
        check_temperature(temperature)
        return u.to(self._ref())

    def sample_from_noise(
        self,
        noise: Mapping[str, torch.Tensor],
        labels: torch.Tensor | None = None,
        temperature: float = 1.0,
    ) -> torch.Tensor:
        return self.sample_cached(noise, labels, temperature)

    def pixel_step(self, window: torch.Tensor, *states: torch.Tensor,
                   pixel: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """All layers at one pixel from cached states; pure, fixed-size inputs (rows of B).

        window [B, C, pad_h+1, 2*pad_w+1] (``config.input_pad``): network-input values of the
        mask-A kernel's upper half around the pixel (zeros outside the image and at
        not-yet-sampled sub-pixels).
        Row LSTM ``states``: above_h [B, L, h, 3] (h of the row above at j-1, j, j+1),
        above_c [B, L, h] (c above), left_inp [B, L, h] (each layer's input at (i, j-1)),
        gate_bias [B, L, 1, 4h], head_bias [B, head_hidden].
        Diagonal BiLSTM ``states``: left_h, left_c [B, L, h] (left-to-right state at
        (i, j-1)), above_h [B, L, h] (left-to-right h at (i-1, j)), rl_above [B, L, h]
        (right-to-left h at (i-1, j)), gate_bias [B, L, 2, 4h], head_bias.
        ``pixel``: an int64 scalar, the pixel's raster index i * W + j; required exactly when the model
        has a ``position_bias``.
        Returns (logits [B, levels, C], h [B, L, h], c [B, L, h], layer_inp [B, L, h]), the
        last being each layer's input at (i, j).
        """
        w = self.input_conv.masked_weight[:, :, : window.shape[2]]
        feat = F.linear(window.flatten(1), w.flatten(1), self.input_conv.bias)
        if self.config.position_bias:
            if pixel is None:
                raise ValueError("this PixelRNN has a position bias: pixel_step needs the pixel's raster index")
            feat = feat + self.position_bias.flatten(1).index_select(1, pixel.reshape(1)).transpose(0, 1)
        hs, cs, inps = [], [], []
        if self.directions == 1:
            above_h, above_c, left_inp, gate_bias, head_bias = states
            for idx, layer in enumerate(self.layers):
                inps.append(feat)
                h, c, feat = layer.step(feat, left_inp[:, idx], above_h[:, idx], above_c[:, idx], gate_bias[:, idx, 0])
                hs.append(h)
                cs.append(c)
        else:
            left_h, left_c, above_h, rl_above, gate_bias, head_bias = states
            for idx, layer in enumerate(self.layers):
                inps.append(feat)
                h, c, feat = layer.step(
                    feat, left_h[:, idx], left_c[:, idx], above_h[:, idx], rl_above[:, idx], gate_bias[:, idx, 0]
                )
                hs.append(h)
                cs.append(c)
        z = F.linear(F.relu(feat), self.head_hidden.masked_weight[:, :, 0, 0], self.head_hidden.bias) + head_bias
        out = F.linear(F.relu(z), self.head_out.masked_weight[:, :, 0, 0], self.head_out.bias)
        logits = out.view(out.shape[0], self.image.channels, self.image.levels).transpose(1, 2)
        return logits, torch.stack(hs, 1), torch.stack(cs, 1), torch.stack(inps, 1)

    def row_step(self, row_inp: torch.Tensor, rl_above: torch.Tensor, gate_bias: torch.Tensor) -> torch.Tensor:
        """Diagonal BiLSTM: right-to-left h of every layer over a finished row.

        row_inp [B, L, h, W]: each layer's input along the row; rl_above [B, L, h, W]: the
        same direction's h on the row above; gate_bias [B, L, 2, 4h]. Returns [B, L, h, W].
        Layers are independent here: their inputs along the row are already known.
        """
        if self.directions != 2:
            raise RuntimeError("row_step exists only for the Diagonal BiLSTM (layer='diagonal')")
        rows = [
            layer.rl_row(row_inp[:, idx], rl_above[:, idx], gate_bias[:, idx, 1])
            for idx, layer in enumerate(self.layers)
        ]
        return torch.stack(rows, dim=1)

    @torch.no_grad()
    def sample_cached(
        self,
        noise: Mapping[str, torch.Tensor],
        labels: torch.Tensor | None = None,
        temperature: float = 1.0,
        return_logits: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Pixel-by-pixel sampling with cached recurrent state (see the module docstring): the
        cached driver with nothing known, one sample per noise row.

        With ``return_logits``, also returns the logits [n, levels, C, H, W] each sub-pixel
        was drawn from (they equal ``self.logits`` of the returned images).
        """
        u = self._check_noise(noise, temperature)
        n = u.shape[0]
        gate_bias, head_bias = self.conditioning(labels, n)
        blank = torch.zeros(n, *self.image.shape, dtype=torch.long, device=u.device)
        out, logits = self._drive_cached(blank, 0, u, 1, gate_bias, head_bias, temperature, return_logits)
        images = self.from_levels(out).to(u)
        return (images, logits) if return_logits else images

    @torch.no_grad()
    def sample_naive(
        self,
        noise: Mapping[str, torch.Tensor],
        labels: torch.Tensor | None = None,
        temperature: float = 1.0,
    ) -> torch.Tensor:
        """Reference sampler: a full forward pass per sub-pixel (O((C*H*W)^2) work)."""
        u = self._check_noise(noise, temperature)
        n, C, H, W = u.shape
        labels = self.check_labels(labels, n)
        x = u.new_zeros(n, C, H, W)
        for i in range(H):
            for j in range(W):
                for ch in range(C):
                    logits = self.logits(x, labels)[:, :, ch, i, j]
                    level = categorical_inverse_cdf(logits, u[:, ch, i, j], temperature)
                    x[:, ch, i, j] = self.from_levels(level).to(u)
        return x

    # --- completion -------------------------------------------------------------------------
    def complete_from_noise(
        self,
        x: torch.Tensor,
        known: Any,
        noise: Mapping[str, torch.Tensor],
        labels: torch.Tensor | None = None,
        temperature: float = 1.0,
    ) -> torch.Tensor:
        """Completions [B, n, C, H, W] after ``known`` rows (see ``GenerativeModel.complete``)."""
        mask = self.completion_mask(known)
        return self.complete_prefix_cached(x, int(mask[:, 0].sum()) * self.image.width, noise, labels, temperature)

    def _check_completion(
        self, x: torch.Tensor, prefix: int, noise: Mapping[str, torch.Tensor], temperature: float
    ) -> tuple[torch.Tensor, int]:
        self._check_images(x)
        u = self._check_noise(noise, temperature)
        b, H, W = x.shape[0], self.image.height, self.image.width
        if b < 1 or u.shape[0] % b:
            raise ValueError(f"noise rows ({u.shape[0]}) must be a multiple of the {b} image(s): n per image")
        if not 0 <= prefix <= H * W:
            raise ValueError(f"the known prefix must be 0..{H * W} pixels, got {prefix}")
        return u, u.shape[0] // b

    @torch.no_grad()
    def complete_prefix_cached(
        self,
        x: torch.Tensor,
        prefix: int,
        noise: Mapping[str, torch.Tensor],
        labels: torch.Tensor | None = None,
        temperature: float = 1.0,
    ) -> torch.Tensor:
        """Completions [B, n, C, H, W] of ``x`` [B, C, H, W] after its first ``prefix`` pixels in
        raster order; noise row ``b * n + j`` draws completion ``j`` of image ``b``.

        The cached states are warmed over the known pixels once per image (one ``pixel_step``
        per known pixel: every channel is known, and no state depends on a pixel's last
        channel), then copied to the ``n`` completions, which step only the unknown pixels.
        One driver with ``sample_cached``: with ``prefix=0`` it gives exactly its images for the
        same noise.
        """
        u, n = self._check_completion(x, prefix, noise, temperature)
        B = x.shape[0]
        gate_bias, head_bias = self.conditioning(labels, B)
        out, _ = self._drive_cached(self.to_levels(x), prefix, u, n, gate_bias, head_bias, temperature, False)
        return self.from_levels(out).to(u).view(B, n, *self.image.shape)

    def _drive_cached(
        self,
        known: torch.Tensor,
        prefix: int,
        u: torch.Tensor,
        per_image: int,
        gate_bias: torch.Tensor,
        head_bias: torch.Tensor,
        temperature: float,
        return_logits: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The one cached-state driver of sampling and completion. ``known`` [B, C, H, W] levels,
        of which the first ``prefix`` pixels (raster order) are kept; the states are warmed over
        them once per image, then every row is repeated ``per_image`` times and the unknown
        pixels are drawn from ``u`` (row ``b * per_image + j``). Returns the levels
        [B * per_image, C, H, W] and, with ``return_logits``, the logits of the drawn sub-pixels
        [B * per_image, levels, C, H, W] (zeros at known pixels)."""
        B, (C, H, W) = known.shape[0], self.image.shape
        L, hid = self.config.num_layers, self.config.hidden_channels
        pad_h, pad_w = self.config.input_pad
        diagonal = self.directions == 2
        # Everything indexed by batch row lives in ``s``: at the first unknown pixel each
        # entry is repeated per_image times, from B warmed images to B * per_image rows.
        s: dict[str, torch.Tensor] = {
            # Network-input values of the image so far, zero-padded like the input conv's input.
            "canvas": u.new_zeros(B, C, H + pad_h, W + 2 * pad_w),
            "out": known.clone(),
            "gate_bias": gate_bias,
            "head_bias": head_bias,
        }
        if return_logits:
            s["logits"] = u.new_zeros(B, self.image.levels, C, H, W)
        # Row buffers are [B, L, W, h]: a pixel reads and writes one column of them, runs of h
        # contiguous floats (in [B, L, h, W] each of its B * L * h elements is a cache line apart).
        if diagonal:
            s["above_h"] = u.new_zeros(B, L, W, hid)
            s["rl_above"] = u.new_zeros(B, L, W, hid)
        else:
            s["above_h"] = u.new_zeros(B, L, W + 2, hid)  # one zero column each side for the 1x3 conv
            s["above_c"] = u.new_zeros(B, L, W, hid)
        expanded = False

        def expand() -> None:
            for key, value in s.items():
                s[key] = value.repeat_interleave(per_image, dim=0)

        for i in range(H):
            rows = s["above_h"].shape[0]
            s["row_h"] = torch.zeros_like(s["above_h"])
            if diagonal:
                s["left_h"] = u.new_zeros(rows, L, hid)
                s["left_c"] = u.new_zeros(rows, L, hid)
                s["row_inp"] = u.new_zeros(rows, L, W, hid)
            else:
                s["row_c"] = torch.zeros_like(s["above_c"])
                s["left_inp"] = u.new_zeros(rows, L, hid)
            for j in range(W):
                # Every channel of a known pixel is known and no state depends on a pixel's last
                # channel, so one step per known pixel warms the states.
                is_known = i * W + j < prefix
                if not is_known and not expanded:
                    expand()
                    expanded = True
                canvas = s["canvas"]
                # A view: sub-pixels written below are visible to this pixel's next channel.
                window = canvas[:, :, i : i + pad_h + 1, j : j + 2 * pad_w + 1]
                if is_known:
                    canvas[:, :, i + pad_h, j + pad_w] = self.network_input(self.from_levels(s["out"][:, :, i, j]).to(u))
                pixel = torch.tensor(i * W + j, device=u.device) if self.config.position_bias else None
                for ch in range(1 if is_known else C):
                    if diagonal:
                        logits, h, c, inp = self.pixel_step(
                            window, s["left_h"], s["left_c"], s["above_h"][:, :, j], s["rl_above"][:, :, j],
                            s["gate_bias"], s["head_bias"], pixel=pixel,
                        )
                    else:
                        logits, h, c, inp = self.pixel_step(
                            window, s["above_h"][:, :, j : j + 3].transpose(-1, -2), s["above_c"][:, :, j],
                            s["left_inp"], s["gate_bias"], s["head_bias"], pixel=pixel,
                        )
                    if not is_known:
                        level = categorical_inverse_cdf(logits[:, :, ch], u[:, ch, i, j], temperature)
                        s["out"][:, ch, i, j] = level
                        canvas[:, ch, i + pad_h, j + pad_w] = self.network_input(self.from_levels(level).to(u))
                        if return_logits:
                            s["logits"][:, :, ch, i, j] = logits[:, :, ch]
                if diagonal:
                    s["left_h"], s["left_c"] = h, c
                    s["row_h"][:, :, j] = h
                    s["row_inp"][:, :, j] = inp
                else:
                    s["left_inp"] = inp
                    s["row_h"][:, :, j + 1] = h
                    s["row_c"][:, :, j] = c
            s["above_h"] = s["row_h"]
            if diagonal:
                if i + 1 < H:  # the last row's right-to-left states would never be read
                    rl_above = self.row_step(s["row_inp"].transpose(-1, -2), s["rl_above"].transpose(-1, -2),
                                             s["gate_bias"])
                    s["rl_above"] = rl_above.transpose(-1, -2).contiguous()
            else:
                s["above_c"] = s["row_c"]
        if not expanded:  # every pixel was known
            expand()
        return s["out"], s.get("logits")

    @torch.no_grad()
    def complete_prefix_naive(
        self,
        x: torch.Tensor,
        prefix: int,
        noise: Mapping[str, torch.Tensor],
        labels: torch.Tensor | None = None,
        temperature: float = 1.0,
    ) -> torch.Tensor:
        """Reference for ``complete_prefix_cached``: a full forward pass per unknown sub-pixel."""
        u, n = self._check_completion(x, prefix, noise, temperature)
        B, (C, H, W) = x.shape[0], self.image.shape
        labels = self.check_labels(labels, B)
        if labels is not None:
            labels = labels.repeat_interleave(n)
        xs = self.from_levels(self.to_levels(x)).to(u).repeat_interleave(n, dim=0)
        xs.view(B * n, C, H * W)[:, :, prefix:] = 0.0  # nothing unknown may leak into a logit
        for p in range(prefix, H * W):
            i, j = divmod(p, W)
            for ch in range(C):
                logits = self.logits(xs, labels)[:, :, ch, i, j]
                level = categorical_inverse_cdf(logits, u[:, ch, i, j], temperature)
                xs[:, ch, i, j] = self.from_levels(level).to(u)
        return xs.view(B, n, C, H, W)

    def log_marginal(self, x: torch.Tensor, known: Any, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Exact log p(known rows of x) in nats, [B]: the sum of the prefix's conditionals, which
        by causality depend on the prefix alone (one forward pass)."""
        return self.log_likelihood_and_marginal(x, known, labels)[1]

    def log_likelihood_and_marginal(
        self, x: torch.Tensor, known: Any, labels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(log p(x), log p(known rows of x)), [B] each, from one forward pass: the marginal's
        terms are the prefix's own conditionals."""
        mask = self.completion_mask(known)
        per_sub = self._subpixel_log_probs(x, labels)
        return per_sub.flatten(1).sum(dim=1), (per_sub * mask.to(per_sub)).flatten(1).sum(dim=1)
