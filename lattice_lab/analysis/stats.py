"""Replica statistics: mean and standard error over independent replicas, and the jackknife.

Replicas are statistically independent runs, so the standard error of a replica mean is
std(ddof=1) / sqrt(R). For non-linear estimators built from a replica-averaged curve (the domain
size from the averaged S(k), xi from the averaged G(r)) the error comes from the delete-one
jackknife: sigma^2 = (R - 1)/R * sum_j (theta_(j) - theta_bar)^2, theta_(j) the estimator on the
mean of all replicas but j.
"""

from __future__ import annotations

import numpy as np
import torch


def to_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def replica_mean_sem(x, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard error of the mean along ``axis`` (the replica axis); NaN-aware.

    The standard error is std(ddof=1)/sqrt(R_valid); with a single valid replica it is NaN.
    """
    x = np.asarray(to_numpy(x), dtype=np.float64)
    valid = np.isfinite(x)
    count = valid.sum(axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(valid, x, 0.0).sum(axis=axis) / count
        dev = np.where(valid, x - np.expand_dims(mean, axis), 0.0)
        var = (dev**2).sum(axis=axis) / (count - 1)
        sem = np.sqrt(var / count)
    mean = np.where(count > 0, mean, np.nan)
    sem = np.where(count > 1, sem, np.nan)
    return mean, sem


def leave_one_out_means(x, axis: int = 0):
    """Delete-one means: out[j] = mean of all samples except j (same type as the input)."""
    R = x.shape[axis]
    if R < 2:
        raise ValueError("the jackknife needs at least 2 replicas")
    total = x.sum(axis, keepdims=True) if isinstance(x, np.ndarray) else x.sum(axis, keepdim=True)
    return (total - x) / (R - 1)


def jackknife_error(estimates, axis: int = 0) -> np.ndarray:
    """Jackknife standard error from the R delete-one estimates (NaN if any is non-finite)."""
    e = np.asarray(to_numpy(estimates), dtype=np.float64)
    R = e.shape[axis]
    if R < 2:
        return np.full(np.delete(np.array(e.shape), axis), np.nan)
    dev = e - e.mean(axis=axis, keepdims=True)
    with np.errstate(invalid="ignore"):
        return np.sqrt((R - 1) / R * (dev**2).sum(axis=axis))
