"""Sample-quality distances between feature sets: Fréchet distance (FID), unbiased kernel
distance (KID) and k-NN precision/recall.

These take feature matrices rather than images (as torchmetrics' FID/KID metrics do) so one
embedding of the real test set serves every distance and the real-vs-real floor; and KID
here is the full unbiased U-statistic over all pairs, computed in blocks, instead of an
average over random subsets drawn from torch's global RNG, so it is deterministic.
"""

from __future__ import annotations

import numpy as np

#: Block size of the pairwise computations: bounds memory at ~BLOCK x N float64.
BLOCK = 1024


def _as_features(f: np.ndarray, name: str, min_rows: int = 2) -> np.ndarray:
    f = np.asarray(f, dtype=np.float64)
    if f.ndim != 2:
        raise ValueError(f"{name} must be a [N, D] feature matrix, got shape {f.shape}")
    if len(f) < min_rows:
        raise ValueError(f"{name} needs at least {min_rows} rows, got {len(f)}")
    if not np.all(np.isfinite(f)):
        raise ValueError(f"{name} contains NaN or inf")
    return f


def _check_pair(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean [D], unbiased covariance [D, D]) of the rows of ``features``."""
    f = _as_features(features, "features")
    return f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False))


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a PSD matrix; round-off negative eigenvalues count as 0."""
    w, v = np.linalg.eigh((matrix + matrix.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Squared 2-Wasserstein distance between N(mu1, sigma1) and N(mu2, sigma2):
    ``|mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2))``.

    ``tr (sigma1 sigma2)^(1/2)`` is computed as ``tr (s sigma2 s)^(1/2)`` with
    ``s = sigma1^(1/2)``: the same eigenvalues, but of a symmetric PSD matrix, so eigh gives
    them real and stable even for the rank-deficient covariances of ReLU features, where a
    general ``sqrtm(sigma1 @ sigma2)`` returns complex round-off.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(
            f"shapes do not match: mu1 {mu1.shape}, mu2 {mu2.shape}, sigma1 {sigma1.shape}, sigma2 {sigma2.shape}"
        )
    s1 = _psd_sqrt(sigma1)
    inner = s1 @ sigma2 @ s1
    cross = np.linalg.eigvalsh((inner + inner.T) / 2)
    tr_sqrt = float(np.sqrt(np.clip(cross, 0.0, None)).sum())
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_sqrt)
    # The true value is >= 0; only round-off makes it slightly negative (e.g. a set with itself).
    return max(value, 0.0)


def fid(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets."""
    a, b = _as_features(features_a, "features_a"), _as_features(features_b, "features_b")
    _check_pair(a, b)
    return frechet_distance(*gaussian_stats(a), *gaussian_stats(b))


def _kernel_sum(x: np.ndarray, y: np.ndarray, degree: int, gamma: float, coef: float, same: bool) -> float:
    """Sum of ``(gamma x.y + coef)^degree`` over all pairs (off-diagonal only when ``same``)."""
    total = 0.0
    for start in range(0, len(x), BLOCK):
        block = (x[start : start + BLOCK] @ y.T * gamma + coef) ** degree
        total += float(block.sum())
        if same:
            rows = np.arange(block.shape[0])
            total -= float(block[rows, start + rows].sum())
    return total


def kid(
    features_a: np.ndarray,
    features_b: np.ndarray,
    degree: int = 3,
    gamma: float | None = None,
    coef: float = 1.0,
) -> float:
    """Unbiased estimate of MMD^2 with the polynomial kernel ``(gamma x.y + coef)^degree``
    (``gamma = 1/D`` by default, as in the KID paper). Set sizes may differ. Unbiased means it
    averages to 0 over draws from one distribution, so single values can be slightly negative.
    """
    a, b = _as_features(features_a, "features_a"), _as_features(features_b, "features_b")
    _check_pair(a, b)
    gamma = 1.0 / a.shape[1] if gamma is None else gamma
    m, n = len(a), len(b)
    k_aa = _kernel_sum(a, a, degree, gamma, coef, same=True) / (m * (m - 1))
    k_bb = _kernel_sum(b, b, degree, gamma, coef, same=True) / (n * (n - 1))
    k_ab = _kernel_sum(a, b, degree, gamma, coef, same=False) / (m * n)
    return k_aa + k_bb - 2.0 * k_ab


def _sq_dists(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    d = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2.0 * x @ y.T
    return np.maximum(d, 0.0)


def _knn_radii(f: np.ndarray, k: int) -> np.ndarray:
    """Squared distance of each row to its k-th nearest other row."""
    radii = np.empty(len(f))
    for start in range(0, len(f), BLOCK):
        d = _sq_dists(f[start : start + BLOCK], f)
        # Column 0 of the sorted row is the point itself (distance 0), hence index k.
        radii[start : start + BLOCK] = np.partition(d, k, axis=1)[:, k]
    return radii


def _coverage(query: np.ndarray, support: np.ndarray, radii: np.ndarray) -> float:
    """Fraction of ``query`` rows inside at least one support point's k-NN ball."""
    inside = 0
    for start in range(0, len(query), BLOCK):
        d = _sq_dists(query[start : start + BLOCK], support)
        inside += int(np.any(d <= radii[None, :], axis=1).sum())
    return inside / len(query)


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of ``fake`` against ``real``.

    Precision: fraction of fake samples within the k-NN manifold of the reals (fidelity);
    recall: fraction of reals within the k-NN manifold of the fakes (coverage/diversity).
    """
    r = _as_features(real, "real", min_rows=k + 1)
    f = _as_features(fake, "fake", min_rows=k + 1)
    _check_pair(r, f)
    return _coverage(f, r, _knn_radii(r, k)), _coverage(r, f, _knn_radii(f, k))
