"""FID and KID of two feature sets, computed by clean-fid's own functions in float64.

FID (Heusel et al. 2017): ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) of the two
Gaussians fitted to the features (clean-fid's ``frechet_distance``, sample covariances).
KID (Binkowski et al. 2018): the unbiased MMD^2 with the kernel k(x, y) = (x.y / d + 1)^3,
averaged over random subsets (clean-fid's ``kernel_distance``; 100 subsets of at most 1000).
clean-fid draws the subsets from numpy's global RNG: here it is seeded and then restored, so a
score is a function of its inputs and the caller's RNG is left alone.
"""
from __future__ import annotations

import threading
import warnings

import numpy as np

from genscale.errors import UserError

_GLOBAL_RNG = threading.Lock()
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000


def _check(a: np.ndarray, b: np.ndarray, minimum: int) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise UserError(f"feature sets must be N x D with the same D, got {a.shape} and {b.shape}.")
    if min(len(a), len(b)) < minimum:
        raise UserError(f"FID/KID need at least {minimum} images on each side, got {len(a)} and {len(b)}.")
    return a, b


def gaussian_stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and sample covariance (float64), as clean-fid computes them."""
    feats = np.asarray(feats, np.float64)
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """FID between feature sets ``a`` and ``b`` (N x D each)."""
    from cleanfid.fid import frechet_distance as clean_frechet

    from scipy.linalg import LinAlgWarning

    a, b = _check(a, b, 2)
    mu_a, sigma_a = gaussian_stats(a)
    mu_b, sigma_b = gaussian_stats(b)
    with warnings.catch_warnings():
        # Judge features have dead ReLU units, so the covariances are singular and scipy warns
        # on every call; the trace of the square root stays accurate (checked against an
        # eigendecomposition in tests/test_fid.py).
        warnings.simplefilter("ignore", LinAlgWarning)
        warnings.filterwarnings("ignore", message=".*`disp` argument is deprecated", category=DeprecationWarning)
        return float(clean_frechet(mu_a, sigma_a, mu_b, sigma_b))


def kernel_distance(a: np.ndarray, b: np.ndarray, seed: int = 0, num_subsets: int = KID_SUBSETS,
                    max_subset_size: int = KID_SUBSET_SIZE) -> float:
    """KID between feature sets ``a`` and ``b``; subsets drawn from ``seed``."""
    from cleanfid.fid import kernel_distance as clean_kernel

    a, b = _check(a, b, 2)
    with _GLOBAL_RNG:  # the seed-draw-restore dance must not interleave with another thread's
        state = np.random.get_state()
        np.random.seed(seed % 2**32)
        try:
            return float(clean_kernel(a, b, num_subsets=num_subsets, max_subset_size=max_subset_size))
        finally:
            np.random.set_state(state)


def distance(metric: str, a: np.ndarray, b: np.ndarray, seed: int = 0) -> float:
    """``metric`` is "fid" or "kid"."""
    if metric == "fid":
        return frechet_distance(a, b)
    if metric == "kid":
        return kernel_distance(a, b, seed)
    raise ValueError(f"unknown distance {metric!r}")
