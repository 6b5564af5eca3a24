"""Mixture model fit by EM: Bernoulli components for binary images, discretized diagonal
Gaussians for 8-bit images.

Likelihood. ``log_likelihood`` is exact, in nats, for the discrete image. Binary: a mixture
of products of Bernoullis. 8-bit: each component is a diagonal Gaussian over a continuous
intensity ``v``, and level ``k`` is the bin ``[k/256, (k+1)/256)`` with the outer edges moved
to -inf/+inf, so ``P(k) = Phi(hi_k) - Phi(lo_k)`` sums to one over the 256 levels. The
log-difference of normal CDFs is taken in float64, reflected into the lower tail, because in
float32 (or in the upper tail) ``Phi(hi) - Phi(lo)`` rounds to 0 for levels far from the mean.

Fitting. The usual recipe is EM on dequantized data ``(k + u) / 256``. We run the exact EM of
the discrete likelihood instead, which treats the continuous intensity ``v`` as a second
latent variable (interval-censored EM): the E-step replaces ``v`` and ``v**2`` by their
moments under the component's normal truncated to the observed bin, instead of under a
uniform draw inside it. That is what dequantized EM approximates, but it is deterministic
(no dequantization noise to seed across workers) and provably never decreases the very
log-likelihood we report and evaluate, not a continuous surrogate of it.

EM contract of the training loop: ``em_initialize`` once, then every epoch the sum over
batches (and workers) of ``em_accumulate`` goes to ``em_update`` (the M-step). Statistics are
float64 sums, so they add up exactly whatever the batching.

Sampling: ``component`` noise (one uniform per sample) picks the component by inverse CDF of
the mixing weights; ``pixels`` noise draws the image (uniform ``u`` for Bernoulli: bit =
``u < p``; standard normal ``eps`` for Gaussian: ``v = mean + std * eps``, level
``floor(256 v)`` clamped to [0, 255], which is an exact draw of the discretized component).
Temperature ``T`` divides the mixing logits and either divides the Bernoulli logits or
multiplies the Gaussian std; ``T -> 0`` tends to the most likely component's mode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch
from torch import nn

from genmodels.checks import check_temperature
from genmodels.models.base import GenerativeModel, ModelConfig, inverse_cdf_pick
from genmodels.noise import NoiseField, NoiseSpec

__all__ = ["MixtureConfig", "MixtureModel"]

INIT_METHODS = ("kmeans++", "random")
# Bernoulli probabilities stay inside [eps, 1 - eps]: a pixel never seen "on" in a component's
# data would otherwise get p = 0 and a held-out image with it on gets log p = -inf. Clamping
# is the exact constrained M-step (the objective is concave in p), so EM stays monotone.
_PROB_EPS = 1e-6
# Below this total responsibility a component keeps its previous parameters: with no data the
# M-step has no answer, and keeping the old values still never lowers EM's objective.
_MIN_MASS = 1e-12
# Elements per E-step chunk (rows x pixels x components): bounds each gathered float64 table
# slice, and each table-building temporary, to ~32 MB.
_CHUNK_ELEMENTS = 1 << 22
_LEVELS_8BIT = 256


@dataclass(frozen=True)
class MixtureConfig(ModelConfig):
    """Mixture of ``n_components`` product distributions over pixels.

    conditional: one independent mixture of ``n_components`` per class (``log p(x | y)``;
        sampling and likelihood then need labels).
    min_std: floor of each Gaussian component's std, in intensity units (8-bit only). The
        discrete likelihood is bounded, so this is not needed for stability but regularizes
        components that saw a single level at a pixel (0.01 is about 2.5 grey levels).
    prior_count: smoothing pseudo-count ``a`` (MAP-EM): mixing weights
        ``(N_k + a) / (N + K a)`` (no component dies), Bernoulli ``p = (sum r x + a) /
        (N_k + 2 a)``. With ``a > 0`` EM maximizes log-likelihood + log-prior; ``a = 0`` is
        plain maximum likelihood.
    init: "kmeans++" (components start from D^2-sampled seed images, then one hard-assignment
        M-step) or "random" (uniformly random hard assignment).
    """

    n_components: int = 30
    conditional: bool = False
    min_std: float = 0.01
    prior_count: float = 1.0
    init: str = "kmeans++"

    def __post_init__(self) -> None:
        if self.n_components < 1:
            raise ValueError(f"MixtureConfig.n_components must be >= 1, got {self.n_components}")
        if not 0 < self.min_std < 1:
            raise ValueError(f"MixtureConfig.min_std must be in (0, 1), got {self.min_std}")
        if self.prior_count < 0:
            raise ValueError(f"MixtureConfig.prior_count must be >= 0, got {self.prior_count}")
        if self.init not in INIT_METHODS:
            raise ValueError(f"MixtureConfig.init must be one of {INIT_METHODS}, got {self.init!r}")
        if self.conditional and self.image.num_classes < 1:
            raise ValueError("a conditional mixture needs image.num_classes >= 1")


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate on both sides of -log 2 (Maechler's switch)."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _truncated_normal_stats(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For standard-normal edges ``lo < hi`` (may be -inf / +inf): log(Phi(hi) - Phi(lo)),
    and E[t], E[t^2] of the standard normal truncated to [lo, hi]. float64 in, float64 out."""
    # Reflect intervals centred above 0 into the lower tail, where log_ndtr keeps full
    # relative precision (Phi(40) rounds to exactly 1 and the difference would be lost).
    flip = (lo + hi) > 0
    a = torch.where(flip, -hi, lo)
    b = torch.where(flip, -lo, hi)
    log_cdf_b = torch.special.log_ndtr(b)
    log_mass = log_cdf_b + _log1mexp(torch.special.log_ndtr(a) - log_cdf_b)

    half_log_2pi = 0.5 * math.log(2 * math.pi)

    def pdf_over_mass(t: torch.Tensor) -> torch.Tensor:  # phi(t) / Z, 0 at infinite edges
        return torch.exp(-0.5 * t * t - half_log_2pi - log_mass)

    p_lo, p_hi = pdf_over_mass(lo), pdf_over_mass(hi)
    # t * phi(t) -> 0 at +-inf, but inf * 0 is nan in floating point.
    t_p_lo = torch.where(torch.isfinite(lo), lo * p_lo, torch.zeros_like(lo))
    t_p_hi = torch.where(torch.isfinite(hi), hi * p_hi, torch.zeros_like(hi))
    mean = p_lo - p_hi
    second = 1.0 + t_p_lo - t_p_hi
    return log_mass, mean, second


class MixtureModel(GenerativeModel):
    family: ClassVar[str] = "mixture"
    config_class: ClassVar[type[ModelConfig]] = MixtureConfig
    fit_method: ClassVar[str] = "em"
    has_likelihood: ClassVar[bool] = True
    has_latent: ClassVar[bool] = False
    samples_on_grid: ClassVar[bool] = True
    train_input: ClassVar[str] = "quantized"
    can_complete: ClassVar[bool] = True
    completes_any_mask: ClassVar[bool] = True
    # One EM iteration per epoch; the loop sums em_accumulate over the epoch's batches.
    presets: ClassVar[dict[str, dict[str, dict[str, Any]]]] = {
        "quick": {
            "model": {"n_components": 30, "init": "kmeans++"},
            "train": {"epochs": 8, "batch_size": 500, "max_train_examples": 20000,
                      "early_stopping_patience": None, "checkpoint_every": 4},
        },
        # 2 CPU cores: a few minutes of EM over the whole training set.
        "cpu": {
            "model": {"n_components": 100, "init": "kmeans++"},
            "train": {"epochs": 30, "batch_size": 1000, "max_train_examples": None,
                      "early_stopping_patience": 3, "checkpoint_every": 5},
        },
        "full": {
            "model": {"n_components": 200, "init": "kmeans++"},
            "train": {"epochs": 100, "batch_size": 1000, "max_train_examples": None,
                      "early_stopping_patience": 5, "checkpoint_every": 10},
        },
    }

    config: MixtureConfig

    def __init__(self, config: MixtureConfig) -> None:
        if not isinstance(config, MixtureConfig):
            raise TypeError(f"MixtureModel needs a MixtureConfig, got {type(config).__name__}")
        super().__init__(config)
        self.conditional = config.conditional
        self.groups = config.image.num_classes if config.conditional else 1
        self.k = config.n_components
        self.dims = config.image.dims
        self.binary = config.image.levels == 2
        shape = (self.groups, self.k, self.dims)
        # Parameters (not buffers) so that base.sample finds the device through
        # self.parameters(); EM sets them, so no gradient. float64 keeps the M-step exact
        # enough that EM's monotonicity holds to the last digit.
        f64 = torch.float64

        def fixed(t: torch.Tensor) -> nn.Parameter:
            return nn.Parameter(t, requires_grad=False)

        self.log_weights = fixed(torch.full((self.groups, self.k), -math.log(self.k), dtype=f64))
        if self.binary:
            self.probs = fixed(torch.full(shape, 0.5, dtype=f64))
        else:
            self.means = fixed(torch.full(shape, 0.5, dtype=f64))
            self.stds = fixed(torch.full(shape, 0.25, dtype=f64))
        self.register_buffer("initialized", torch.tensor(False))
        self._table_cache: tuple[tuple[Any, ...], tuple[torch.Tensor, ...]] | None = None

    # --- training contract ----------------------------------------------------------------
    def players(self) -> dict[str, list[nn.Parameter]]:
        return {}  # fit by EM: no optimizer

    def loss(self, batch: Mapping[str, torch.Tensor], player: str = "model") -> dict[str, torch.Tensor]:
        ll = self.log_likelihood(batch["x"], self._batch_labels(batch))
        nll = -ll.mean()
        return {"loss": nll.float(), "bits_per_dim": (nll / (self.dims * math.log(2))).float()}

    @torch.no_grad()
    def em_initialize(self, x: torch.Tensor, seed: int, y: torch.Tensor | None = None) -> None:
        """Deterministic start from training images ``x`` (a few thousand are plenty: the
        k-means++ seeding costs N x K x D).

        Every component first gets the whole data's fit (so one left without members still
        has sensible parameters), then a hard-assignment M-step: images go to the nearest
        k-means++ seed image (``init="kmeans++"``) or to a random component (``"random"``).
        A conditional mixture needs the labels ``y`` and initializes each class separately.
        """
        levels = self._levels(x)
        groups = self._groups(y, levels.shape[0], required_for="em_initialize")
        gen = torch.Generator().manual_seed(int(seed))
        values = self._grid_values(levels)  # float64 [N, D]
        n = levels.shape[0]
        assign = torch.empty(n, dtype=torch.long, device=levels.device)
        for g in range(self.groups):
            rows = (groups == g).nonzero().squeeze(1)
            if rows.numel() == 0:
                raise ValueError(f"em_initialize: class {g} has no images; a conditional mixture "
                                 f"initializes each class from its own images")
            if self.config.init == "random":
                assign[rows] = torch.randint(self.k, (rows.numel(),), generator=gen).to(assign.device)
            else:
                assign[rows] = self._kmeanspp_assign(values[rows], gen)
        self.log_weights.fill_(-math.log(self.k))
        uniform = torch.full((n, self.k), 1.0, dtype=torch.float64, device=levels.device)
        self.em_update(self._hard_stats(levels, values, groups, uniform))  # every component = all data
        hard = torch.nn.functional.one_hot(assign, self.k).double()
        self.em_update(self._hard_stats(levels, values, groups, hard))
        self.initialized.fill_(True)

    @torch.no_grad()
    def em_accumulate(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """E-step sufficient statistics of one batch (float64 sums; add them up key by key)."""
        if not bool(self.initialized):
            raise RuntimeError("mixture model is not initialized: call em_initialize(x, seed) before EM")
        levels = self._levels(batch["x"])
        groups = self._groups(self._batch_labels(batch), levels.shape[0], required_for="em_accumulate")
        dev, f64 = levels.device, torch.float64
        stats = {
            "resp_sum": torch.zeros(self.groups, self.k, dtype=f64, device=dev),
            "sum_x": torch.zeros(self.groups, self.k, self.dims, dtype=f64, device=dev),
            "loglik_sum": torch.zeros((), dtype=f64, device=dev),
            "count": torch.zeros((), dtype=f64, device=dev),
        }
        if not self.binary:
            # Summed as [G, D, K], the layout the gathered tables come in; transposed once below.
            sums = {key: torch.zeros(self.groups, self.dims, self.k, dtype=f64, device=dev)
                    for key in ("sum_x", "sum_xx")}
        for lv, gr in self._chunks(levels, groups):
            comp_ll = self._component_loglik(lv, gr)
            joint = self.log_weights[gr] + comp_ll
            ll = torch.logsumexp(joint, dim=1)
            resp = torch.exp(joint - ll[:, None])  # [b, K]
            stats["resp_sum"] += torch.zeros_like(stats["resp_sum"]).index_add_(0, gr, resp)
            if self.binary:
                # Scatter each row's responsibilities into its class's slot: [b, G*K].
                w = torch.zeros(lv.shape[0], self.groups, self.k, dtype=f64, device=dev)
                w[torch.arange(lv.shape[0], device=dev), gr] = resp
                stats["sum_x"] += (w.reshape(lv.shape[0], -1).T @ lv.to(f64)).view_as(stats["sum_x"])
            else:
                rows = self._table_rows(lv, gr)
                # Sum rows into their class by a one-hot matmul: index_add_ over a few
                # classes is a serial scatter on CPU, several times slower.
                onehot = torch.nn.functional.one_hot(gr, self.groups).to(f64).T  # [G, b]
                for key, table in zip(("sum_x", "sum_xx"), self._gaussian_tables()[1:]):
                    moment = table.index_select(0, rows).view(lv.shape[0], -1, self.k).mul_(resp[:, None, :])
                    sums[key] += (onehot @ moment.view(lv.shape[0], -1)).view_as(sums[key])
            stats["loglik_sum"] += ll.sum()
            stats["count"] += lv.shape[0]
        if not self.binary:
            stats.update({key: value.transpose(1, 2).contiguous() for key, value in sums.items()})
        return stats

    @torch.no_grad()
    def em_update(self, stats: Mapping[str, torch.Tensor]) -> None:
        """M-step from summed statistics (MAP with ``prior_count``; std floored at ``min_std``)."""
        needed = {"resp_sum": (self.groups, self.k), "sum_x": (self.groups, self.k, self.dims)}
        if not self.binary:
            needed["sum_xx"] = needed["sum_x"]
        for key, shape in needed.items():
            if key not in stats:
                raise KeyError(f"em_update: statistics lack {key!r} (have {sorted(stats)})")
            if tuple(stats[key].shape) != shape:
                raise ValueError(f"em_update: stats[{key!r}] has shape {tuple(stats[key].shape)}, "
                                 f"this model expects {shape}")
        a = self.config.prior_count
        mass = stats["resp_sum"].to(self.log_weights)  # [G, K]
        group_mass = mass.sum(1, keepdim=True)
        weights = (mass + a) / (group_mass + self.k * a)
        # A class absent from these statistics (a conditional model on a partial epoch) keeps
        # its weights; with a = 0 they would be 0 / 0.
        self.log_weights.copy_(torch.where(group_mass > _MIN_MASS, torch.log(weights), self.log_weights))
        has_data = (mass > _MIN_MASS)[..., None]
        sum_x = stats["sum_x"].to(mass)
        if self.binary:
            p = ((sum_x + a) / (mass[..., None] + 2 * a).clamp_min(_MIN_MASS)).clamp(_PROB_EPS, 1 - _PROB_EPS)
            self.probs.copy_(torch.where(has_data, p, self.probs))
        else:
            m = mass[..., None].clamp_min(_MIN_MASS)
            mean = sum_x / m
            var = (stats["sum_xx"].to(mass) / m - mean * mean).clamp_min(self.config.min_std**2)
            self.means.copy_(torch.where(has_data, mean, self.means))
            self.stds.copy_(torch.where(has_data, var.sqrt(), self.stds))

    # --- likelihood -----------------------------------------------------------------------
    @torch.no_grad()
    def log_likelihood(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Exact log p(x) (log p(x | y) when conditional) in nats, float64 [B].

        Labels are ignored by an unconditional mixture (batches always carry them)."""
        levels = self._levels(x)
        groups = self._groups(labels if self.conditional else None, levels.shape[0],
                              required_for="log_likelihood")
        out = []
        for lv, gr in self._chunks(levels, groups):
            comp_ll = self._component_loglik(lv, gr)
            out.append(torch.logsumexp(self.log_weights[gr] + comp_ll, dim=1))
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64, device=levels.device)

    # --- sampling -------------------------------------------------------------------------
    def noise_spec(self) -> NoiseSpec:
        return {
            "component": NoiseField((1,), "uniform"),
            "pixels": NoiseField(self.image.shape, "uniform" if self.binary else "normal"),
        }

    def sample_from_noise(
        self,
        noise: Mapping[str, torch.Tensor],
        labels: torch.Tensor | None = None,
        temperature: float = 1.0,
    ) -> torch.Tensor:
        check_temperature(temperature)
        if self.conditional and labels is None:
            raise ValueError("mixture model is class-conditional: labels are required")
        if not self.conditional and labels is not None:
            raise ValueError("mixture model is unconditional: it takes no labels")
        u = noise["component"]
        pixels = noise["pixels"]
        n, dtype = pixels.shape[0], pixels.dtype
        log_w = self.log_weights.to(dtype)
        log_w = log_w[labels] if self.conditional else log_w.expand(n, self.k)
        comp = inverse_cdf_pick(torch.softmax(log_w / temperature, dim=1), u)
        flat = labels * self.k + comp if self.conditional else comp
        eps = pixels.reshape(n, self.dims)
        if self.binary:
            p = self.probs.reshape(-1, self.dims).to(dtype)[flat]
            p = torch.sigmoid(torch.logit(p) / temperature)
            img = (eps < p).to(dtype)
        else:
            mean = self.means.reshape(-1, self.dims).to(dtype)[flat]
            std = self.stds.reshape(-1, self.dims).to(dtype)[flat]
            v = mean + std * temperature * eps
            img = torch.clamp(torch.floor(v * _LEVELS_8BIT), 0, _LEVELS_8BIT - 1) / (_LEVELS_8BIT - 1)
        return img.reshape(n, *self.image.shape)

    # --- completion -------------------------------------------------------------------------
    def complete_from_noise(
        self,
        x: torch.Tensor,
        known: Any,
        noise: Mapping[str, torch.Tensor],
        labels: torch.Tensor | None = None,
        temperature: float = 1.0,
    ) -> torch.Tensor:
        """Completions [B, n, C, H, W] given the pixels ``known`` marks (rows or a bool mask
        [H, W], every channel of a marked pixel): the component is drawn from its posterior
        given the known pixels, then the unknown pixels from that component."""
        check_temperature(temperature)
        mask = self.completion_mask(known).to(self.log_weights.device)
        levels = self._levels(x)
        b, m = levels.shape[0], noise["pixels"].shape[0]
        if b < 1 or m % b or noise["component"].shape[0] != m:
            raise ValueError(f"noise rows ({m}) must be a multiple of the {b} image(s): n per image")
        n = m // b
        if self.conditional:
            labels = self._groups(labels, b, required_for="complete").repeat_interleave(n)
        elif labels is not None:
            raise ValueError("mixture model is unconditional: it takes no labels")
        known_d = mask.expand(self.image.channels, -1, -1).reshape(1, self.dims).expand(m, -1)
        x_rows = self.from_levels(levels.repeat_interleave(n, dim=0)).reshape(m, *self.image.shape)
        out = self.complete_rows(x_rows, known_d.reshape(m, *self.image.shape).to(x_rows.dtype),
                                 noise["component"], noise["pixels"], labels, temperature)
        return out.reshape(b, n, *self.image.shape)

    @torch.no_grad()
    def log_marginal(self, x: torch.Tensor, known: Any, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Exact log p(the known pixels of x) in nats, float64 [B]: the unknown pixels summed out
        (a product distribution per component marginalizes by leaving them out)."""
        mask = self.completion_mask(known).to(self.log_weights.device)
        levels = self._levels(x)
        groups = self._groups(labels if self.conditional else None, levels.shape[0], required_for="log_marginal")
        m = levels.shape[0]
        keep = mask.expand(self.image.channels, -1, -1).reshape(1, self.dims).expand(m, -1).to(torch.float64)
        if self.binary:
            logp = torch.log(self.probs).reshape(-1, self.dims)
            log1mp = torch.log1p(-self.probs).reshape(-1, self.dims)
            all_ll = (keep * levels.double()) @ (logp - log1mp).T + keep @ log1mp.T
            comp_ll = all_ll.view(m, self.groups, self.k)[torch.arange(m), groups]
        else:
            picked = self._gaussian_tables()[0].index_select(0, self._table_rows(levels, groups))
            comp_ll = (picked.view(m, self.dims, self.k) * keep[..., None]).sum(1)
        return torch.logsumexp(self.log_weights[groups] + comp_ll, dim=1)

    def complete_rows(
        self,
        x: torch.Tensor,
        known: torch.Tensor,
        component: torch.Tensor,
        pixels: torch.Tensor,
        labels: torch.Tensor | None,
        temperature: float | torch.Tensor,
        log_mass_table: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One completion per row, plain tensor ops (the exported ``complete`` graph): ``x``
        [m, C, H, W] on the grid, ``known`` [m, C, H, W] 1 = known, the sampler's noise fields,
        labels [m] (conditional) -> [m, C, H, W]. The posterior is float64, like the
        likelihood: a sum over hundreds of pixels must not decide the component by rounding.
        ``log_mass_table``: the 8-bit log P(level) table (the export passes it as a constant)."""
        m = x.shape[0]
        levels = torch.round(x * (self.image.levels - 1)).to(torch.int64).clamp(0, self.image.levels - 1)
        levels = levels.reshape(m, self.dims)
        mask = known.reshape(m, self.dims).to(torch.float64)
        group = labels if self.conditional else torch.zeros(m, dtype=torch.int64, device=x.device)
        if self.binary:
            logp = torch.log(self.probs).reshape(-1, self.dims)
            log1mp = torch.log1p(-self.probs).reshape(-1, self.dims)
            all_ll = (mask * levels.to(torch.float64)) @ (logp - log1mp).T + mask @ log1mp.T  # [m, G*K]
            comp_ll = torch.gather(all_ll.view(m, self.groups, self.k), 1,
                                   group.view(m, 1, 1).expand(m, 1, self.k)).view(m, self.k)
        else:
            table = self._gaussian_tables()[0] if log_mass_table is None else log_mass_table
            pixel = torch.arange(self.dims, device=x.device) * _LEVELS_8BIT
            rows = ((pixel + levels) * self.groups + group[:, None]).reshape(-1)
            comp_ll = (table.index_select(0, rows).view(m, self.dims, self.k) * mask[..., None]).sum(1)
        post = self.log_weights.index_select(0, group) + comp_ll
        comp = inverse_cdf_pick(torch.softmax(post / temperature, dim=1), component)
        flat = group * self.k + comp
        dtype = pixels.dtype
        eps = pixels.reshape(m, self.dims)
        if self.binary:
            p = self.probs.reshape(-1, self.dims).to(dtype)[flat]
            p = torch.sigmoid(torch.logit(p) / temperature)
            drawn = (eps < p).to(dtype)
        else:
            mean = self.means.reshape(-1, self.dims).to(dtype)[flat]
            std = self.stds.reshape(-1, self.dims).to(dtype)[flat]
            v = mean + std * temperature * eps
            drawn = torch.clamp(torch.floor(v * _LEVELS_8BIT), 0, _LEVELS_8BIT - 1) / (_LEVELS_8BIT - 1)
        given = levels.to(dtype) / (self.image.levels - 1)
        return torch.where(mask > 0, given, drawn).reshape(m, *self.image.shape)

    # --- internals --------------------------------------------------------------------------
    def _batch_labels(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        return batch.get("y") if self.conditional else None

    def _levels(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or tuple(x.shape[1:]) != self.image.shape:
            raise ValueError(f"mixture model expects images [B, {', '.join(map(str, self.image.shape))}], "
                             f"got {tuple(x.shape)}")
        return self.to_levels(x).reshape(x.shape[0], self.dims)

    def _groups(self, y: torch.Tensor | None, n: int, required_for: str) -> torch.Tensor:
        device = self.log_weights.device
        if not self.conditional:
            return torch.zeros(n, dtype=torch.long, device=device)
        if y is None:
            raise ValueError(f"conditional mixture: {required_for} needs class labels y")
        y = torch.as_tensor(y, dtype=torch.long, device=device).reshape(-1)
        if y.shape[0] != n:
            raise ValueError(f"{required_for}: {y.shape[0]} labels for {n} images")
        if n and (int(y.min()) < 0 or int(y.max()) >= self.groups):
            raise ValueError(f"{required_for}: labels must lie in [0, {self.groups}), "
                             f"got {int(y.min())}..{int(y.max())}")
        return y

    def _chunks(self, levels: torch.Tensor, groups: torch.Tensor):
        per_row = self.dims * self.k
        step = max(1, _CHUNK_ELEMENTS // per_row)
        for i in range(0, levels.shape[0], step):
            yield levels[i : i + step], groups[i : i + step]

    def _grid_values(self, levels: torch.Tensor) -> torch.Tensor:
        """What EM treats as each pixel's value before any E-step: the bit, or the bin centre."""
        if self.binary:
            return levels.double()
        return (levels.double() + 0.5) / _LEVELS_8BIT

    def _hard_stats(self, levels, values, groups, resp) -> dict[str, torch.Tensor]:
        """Sufficient statistics for given responsibilities, with the intensity uniform in its
        bin (mean = centre, second moment = centre^2 + 1/(12 * 256^2)): the initial M-step."""
        w = torch.zeros(levels.shape[0], self.groups, self.k, dtype=torch.float64, device=levels.device)
        w[torch.arange(levels.shape[0], device=levels.device), groups] = resp
        flat_w = w.reshape(levels.shape[0], -1).T
        stats = {"resp_sum": w.sum(0), "sum_x": (flat_w @ values).view(self.groups, self.k, self.dims)}
        if not self.binary:
            second = values * values + 1.0 / (12 * _LEVELS_8BIT**2)
            stats["sum_xx"] = (flat_w @ second).view(self.groups, self.k, self.dims)
        return stats

    def _kmeanspp_assign(self, values: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """k-means++ seeding (D^2 sampling) of K seed images, then nearest-seed assignment."""
        n = values.shape[0]
        first = int(torch.randint(n, (1,), generator=gen))
        centers = [first]
        dist = ((values - values[first]) ** 2).sum(1)
        for _ in range(1, self.k):
            total = float(dist.sum())
            # Fewer distinct images than components: the rest repeat a seed and stay empty,
            # keeping the whole-data fit they got first.
            if total <= 0:
                break
            nxt = int(torch.multinomial((dist / total).cpu(), 1, generator=gen))
            centers.append(nxt)
            dist = torch.minimum(dist, ((values - values[nxt]) ** 2).sum(1))
        c = values[centers]
        d2 = (values * values).sum(1, keepdim=True) - 2 * values @ c.T + (c * c).sum(1)
        return d2.argmin(1)

    def _component_loglik(self, levels: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        """log p(x | component) over the components of each row's class: float64 [b, K]."""
        if self.binary:
            logp = torch.log(self.probs).reshape(-1, self.dims)
            log1mp = torch.log1p(-self.probs).reshape(-1, self.dims)
            all_ll = levels.double() @ (logp - log1mp).T + log1mp.sum(1)  # [b, G*K]
            return all_ll.view(-1, self.groups, self.k)[torch.arange(levels.shape[0]), groups]
        log_mass = self._gaussian_tables()[0]
        picked = log_mass.index_select(0, self._table_rows(levels, groups))
        return picked.view(levels.shape[0], self.dims, self.k).sum(1)

    def _table_rows(self, levels: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        """Flat row of each (image, pixel) in the Gaussian tables: (d * 256 + level) * G + g."""
        pixel = torch.arange(self.dims, device=levels.device) * _LEVELS_8BIT
        return ((pixel + levels) * self.groups + groups[:, None]).reshape(-1)

    def _gaussian_tables(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per (pixel, level, class) row and component column, float64 [D * 256 * G, K]:
        log P(level), E[v | bin] and E[v^2 | bin], each contiguous so one gather is one copy.

        They depend only on the parameters, so they are cached until those change. The key
        holds the parameter tensors themselves (kept alive, so ids cannot be reused) and their
        in-place version counters, which ``em_update`` and ``load_state_dict`` bump."""
        key = tuple((t, t._version) for t in (self.means, self.stds))
        cached = self._table_cache
        if cached is not None and all(
            a is b and va == vb for (a, va), (b, vb) in zip(cached[0], key, strict=True)
        ):
            return cached[1]
        with torch.no_grad():
            tables = self._compute_gaussian_tables()
        self._table_cache = (key, tables)
        return tables

    def _compute_gaussian_tables(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        f64, dev = torch.float64, self.means.device
        edges = torch.arange(_LEVELS_8BIT + 1, dtype=f64, device=dev) / _LEVELS_8BIT
        edges[0], edges[-1] = -math.inf, math.inf
        lo_edge, hi_edge = edges[:-1].view(1, -1, 1, 1), edges[1:].view(1, -1, 1, 1)
        means = self.means.to(f64).permute(2, 0, 1)  # [D, G, K]
        stds = self.stds.to(f64).permute(2, 0, 1)
        step = max(1, _CHUNK_ELEMENTS // (_LEVELS_8BIT * self.groups * self.k))
        parts: list[tuple[torch.Tensor, ...]] = []
        for d0 in range(0, self.dims, step):
            mu = means[d0 : d0 + step, None]  # [c, 1, G, K]
            sd = stds[d0 : d0 + step, None]
            log_mass, t1, t2 = _truncated_normal_stats((lo_edge - mu) / sd, (hi_edge - mu) / sd)
            m1 = mu + sd * t1
            m2 = mu * mu + 2 * mu * sd * t1 + sd * sd * t2
            parts.append(tuple(t.reshape(-1, self.k) for t in (log_mass, m1, m2)))
        return tuple(torch.cat(column) for column in zip(*parts))  # type: ignore[return-value]

    def _apply(self, fn, *args, **kwargs):
        self._table_cache = None  # device / dtype moves make a stale table useless
        return super()._apply(fn, *args, **kwargs)

    def extra_repr(self) -> str:
        kind = "bernoulli" if self.binary else "discretized-gaussian"
        return f"{kind}, groups={self.groups}, components={self.k}, dims={self.dims}"

