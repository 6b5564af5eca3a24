"""A full-covariance Gaussian mixture over a trained VAE's latent space, fit by EM.

A VAE samples z from its prior, but its decoder only learned to draw from the region the
encoder's posteriors cover (the aggregate posterior). Where the two differ ("prior holes"), the
decoder draws blurred blends of classes. Fitting a Gaussian mixture to posterior draws of the
training set after training and sampling z from it instead (ex-post density estimation: Ghosh
et al. 2020; Dai & Wipf's two-stage VAE) measured on Fashion-MNIST here: quick VAE domain FID
41.9 -> 18.1, quick CVAE class accuracy 81.4% -> 88.5% (benchmarks/RESULTS.md).

The mixture lives in the prior's standardized coordinates u = (z - mu_y) / sigma_y, so the
unfitted mixture (one standard normal, repeated) is exactly the trained prior.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from genmodels.models.base import inverse_cdf_pick

__all__ = ["GaussianMixture", "fit_gaussian_mixture", "mixture_draw", "mixture_log_prob", "points_per_component"]

# Added to every covariance's diagonal: keeps a component fit to a tight cluster invertible.
COVARIANCE_FLOOR = 1e-4
# A component whose responsibilities sum below this keeps its parameters (it would divide by ~0).
MIN_COMPONENT_MASS = 1e-3
# Rows of the data per step of the E- and M-step passes: their [rows, M * D] blocks stay in cache.
_ROWS_PER_CHUNK = 1024


@dataclass(frozen=True)
class GaussianMixture:
    """weights [M], means [M, D], scale_tril [M, D, D] (lower Cholesky factors of the covariances)."""

    weights: torch.Tensor
    means: torch.Tensor
    scale_tril: torch.Tensor


def mixture_log_prob(x: torch.Tensor, weights: torch.Tensor, means: torch.Tensor,
                     scale_tril: torch.Tensor) -> torch.Tensor:
    """log sum_m w_m N(x; mu_m, L_m L_m^T) in nats, [N] for x [N, D] (plain tensor ops)."""
    return torch.logsumexp(_component_log_probs(x, means, scale_tril) + torch.log(weights), dim=1)


def _component_log_probs(x: torch.Tensor, means: torch.Tensor, scale_tril: torch.Tensor) -> torch.Tensor:
    """[N, M]: log N(x_n; mu_m, L_m L_m^T). Whitening every component is one matmul
    x @ [L_1^-T ... L_M^-T] (a triangular solve per component measured 10x slower here)."""
    m, dim = means.shape
    eye = torch.eye(dim, dtype=x.dtype, device=x.device).expand(m, dim, dim)
    inverse = torch.linalg.solve_triangular(scale_tril, eye, upper=False)  # L^-1 [M, D, D]
    project = inverse.transpose(1, 2).permute(1, 0, 2).reshape(dim, m * dim)  # columns: rows of each L^-1
    shift = (inverse @ means.unsqueeze(-1)).reshape(1, m * dim)
    log_det = torch.log(torch.diagonal(scale_tril, dim1=-2, dim2=-1)).sum(-1)  # [M]: 0.5 log|Sigma|
    const = log_det + 0.5 * dim * math.log(2 * math.pi)
    # Rows in chunks: the whitened [rows, M * D] block stays in cache.
    out = [torch.addmm(-shift, rows, project).square().view(-1, m, dim).sum(-1) for rows in x.split(_ROWS_PER_CHUNK)]
    return -0.5 * torch.cat(out) - const if out else x.new_zeros(0, m)


def _weighted_covariances(x: torch.Tensor, resp: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """[M, D, D]: sum_n resp[n, m] (x_n - mu_m)(x_n - mu_m)^T, every component in one batched
    matmul per chunk of rows (a loop over components measured 3.4x slower here)."""
    m, dim = means.shape
    out = x.new_zeros(m, dim, dim)
    for start in range(0, len(x), _ROWS_PER_CHUNK):
        diff = x[start : start + _ROWS_PER_CHUNK].unsqueeze(0) - means.unsqueeze(1)  # [M, rows, D]
        weights = resp[start : start + _ROWS_PER_CHUNK].T.unsqueeze(-1)  # [M, rows, 1]
        out.baddbmm_((diff * weights).transpose(1, 2), diff)
    return out


def mixture_draw(eps: torch.Tensor, uniform: torch.Tensor, weights: torch.Tensor, means: torch.Tensor,
                 scale_tril: torch.Tensor) -> torch.Tensor:
    """Draws [N, D] of per-row mixtures: the component by inverse CDF of ``uniform`` [N, 1] on
    ``weights`` [N, M], then mu + L eps with eps [N, D] and ``means`` [N, M, D], ``scale_tril``
    [N, M, D, D]. Plain tensor ops (it exports): a pure function of its inputs."""
    comp = inverse_cdf_pick(weights, uniform)
    rows = torch.arange(eps.shape[0], device=eps.device)
    return means[rows, comp] + (scale_tril[rows, comp] @ eps.unsqueeze(-1)).squeeze(-1)


def fit_gaussian_mixture(x: torch.Tensor, components: int, *, seed: int = 0, max_iterations: int = 100,
                         tolerance: float = 1e-3) -> GaussianMixture:
    """EM for a full-covariance Gaussian mixture on ``x`` [N, D] (float64 inside), from means at
    k-means++ seeds, every covariance the data's; stops when the mean log-likelihood per point
    gains less than ``tolerance`` nats. Deterministic for a seed.

    At most one component per :func:`points_per_component` points: with fewer, components
    shrink onto a handful of training points and the density of held-out latents collapses
    (20 components per class on sklearn's 130 digits a class: test NLL 1,176 nats)."""
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"fit_gaussian_mixture needs x [N >= 2, D], got {tuple(x.shape)}")
    if components < 1:
        raise ValueError(f"components must be >= 1, got {components}")
    x = x.detach().to(torch.float64)
    n, dim = x.shape
    components = max(1, min(components, n // points_per_component(dim)))
    floor = COVARIANCE_FLOOR * torch.eye(dim, dtype=x.dtype)
    generator = torch.Generator().manual_seed(seed)
    means = _kmeans_plus_plus(x, components, generator)
    covariance = torch.cov(x.T).reshape(dim, dim) + floor
    scale_tril = torch.linalg.cholesky(covariance).expand(components, dim, dim).clone()
    weights = torch.full((components,), 1.0 / components, dtype=x.dtype)
    previous = -math.inf
    for _ in range(max_iterations):
        joint = _component_log_probs(x, means, scale_tril) + torch.log(weights)  # E-step
        log_px = torch.logsumexp(joint, dim=1, keepdim=True)
        resp = torch.exp(joint - log_px)  # [N, M]
        mass = resp.sum(0)
        alive = mass > MIN_COMPONENT_MASS
        weights = mass / n  # M-step
        new_means = (resp.T @ x) / mass.clamp_min(MIN_COMPONENT_MASS).unsqueeze(1)
        means = torch.where(alive.unsqueeze(1), new_means, means)
        covariances = _weighted_covariances(x, resp, means)
        for m in torch.nonzero(alive).flatten().tolist():
            scale_tril[m] = torch.linalg.cholesky(covariances[m] / mass[m] + floor)
        mean_log_px = float(log_px.mean())
        if mean_log_px - previous < tolerance:
            break
        previous = mean_log_px
    weights = weights.clamp_min(1e-12)
    return GaussianMixture(weights=weights / weights.sum(), means=means, scale_tril=scale_tril)


def points_per_component(dim: int) -> int:
    """Training points a full-covariance component needs: as many as its free parameters
    (weight, mean, covariance), so that its covariance is estimated, not interpolated."""
    return 1 + dim + dim * (dim + 1) // 2


def _kmeans_plus_plus(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k seed points, each drawn with probability proportional to its squared distance from the
    nearest seed already drawn (Arthur & Vassilvitskii)."""
    first = int(torch.randint(len(x), (1,), generator=generator))
    seeds = [x[first]]
    nearest = (x - x[first]).pow(2).sum(1)
    for _ in range(1, k):
        pick = int(torch.multinomial(nearest / nearest.sum(), 1, generator=generator)) if nearest.sum() > 0 \
            else int(torch.randint(len(x), (1,), generator=generator))
        seeds.append(x[pick])
        nearest = torch.minimum(nearest, (x - x[pick]).pow(2).sum(1))
    return torch.stack(seeds)
