"""ED-vs-ML agreement of per-replica curves (enn_paper Fig. 5: C(r) at chosen steps).

Given per-replica curves a [Ra, n] and b [Rb, n] (e.g. C(r) of ED-driven and ML-driven runs), the
per-point z-score is the mean difference over its standard error:

- independent ensembles:  z(r) = (mean_a(r) - mean_b(r)) / sqrt(sem_a(r)^2 + sem_b(r)^2)
- ``paired=True`` (Ra = Rb, replica j of a and of b share their hot start and bath noise, as in
  ``simulate_compare``):  z(r) = mean_j(a_j - b_j)(r) / sem_j(a_j - b_j)(r)

Paired runs are strongly correlated (replica correlation of C(r) ~0.999 at step 200 and ~0.95 at
step 1000 for ED dynamics at g and 1.02 g), so the independent formula would overstate the error of
the difference by an order of magnitude and hide a systematic force error; the paired form is the
standard error of the difference itself (and remains valid, with R - 1 degrees of freedom, for
independent runs). The agreement statistic is max_r |z(r)| (``max_abs_z``). Also reported: chi2 =
sum_r z^2 with its number of points, and the fraction of points with |z| > 2 (about 5% when the
ensembles agree). Points at different r are strongly correlated and the standard errors come from
few replicas (z is t-distributed with ~R - 1 paired or ~Ra + Rb - 2 independent degrees of
freedom), so chi2 is not chi2-distributed and no p-value is claimed; two ensembles from the same
dynamics give max|z| of a few, a systematic difference gives a large one. Points with zero
standard error count as z = 0 when the means agree exactly and are left out (NaN) otherwise.
Paired comparisons also report ``max_abs_z_unpaired``: the same difference in units of the two
ensembles' own standard errors (how far apart the curves are on the scale of their error bars).
"""

from __future__ import annotations

import numpy as np

from lattice_lab.analysis.stats import replica_mean_sem


def compare_curves(a, b, paired: bool = False) -> dict:
    """z-scores and max |z| between replica ensembles a [Ra, n] and b [Rb, n] (Ra, Rb >= 2).

    ``paired``: replica j of ``a`` and of ``b`` are one pair (same hot start and noise; Ra = Rb), and
    the error is the standard error of the per-pair differences (see the module doc).
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"expected per-replica curves [R, n] of equal n, got {a.shape} and {b.shape}")
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError("need at least 2 replicas on each side for an error bar")
    if paired and a.shape != b.shape:
        raise ValueError(f"paired comparison needs the same replicas on both sides, got {a.shape} and {b.shape}")
    ma, sa = replica_mean_sem(a)
    mb, sb = replica_mean_sem(b)
    diff = ma - mb
    unpaired_se = np.sqrt(sa**2 + sb**2)
    se = replica_mean_sem(a - b)[1] if paired else unpaired_se
    z = _z_scores(diff, se)
    valid = np.isfinite(z)
    chi2 = float((z[valid] ** 2).sum())
    dof = int(valid.sum())
    out = {
        "z": z, "diff": diff, "combined_se": se, "paired": bool(paired),
        "mean_a": ma, "sem_a": sa, "mean_b": mb, "sem_b": sb,
        "max_abs_z": _max_abs(z), "chi2": chi2, "dof": dof,
        "frac_abs_z_gt_2": float((np.abs(z[valid]) > 2).mean()) if dof else float("nan"),
        "max_abs_diff": float(np.abs(diff).max()),
    }
    if paired:  # for reference: the difference in units of the two ensembles' own errors
        out["max_abs_z_unpaired"] = _max_abs(_z_scores(diff, unpaired_se))
    return out


def _z_scores(diff: np.ndarray, se: np.ndarray) -> np.ndarray:
    """diff / se; where se = 0: 0 if diff = 0 too, else NaN (left out)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(se > 0, diff / np.where(se > 0, se, 1.0), np.where(diff == 0, 0.0, np.nan))


def _max_abs(z: np.ndarray) -> float:
    valid = np.isfinite(z)
    return float(np.abs(z[valid]).max()) if valid.any() else float("nan")
