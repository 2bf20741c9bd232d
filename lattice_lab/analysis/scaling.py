"""Dynamical scaling: collapse data and a collapse quality number (DESIGN.md section 6).

If coarsening has a single length scale, S(q, t) = L(t)^2 f(q L(t)) in two dimensions and
G(r, t) = g(r / xi(t)): the rescaled curves of different times fall on one curve.

Quality: the curves are interpolated onto a common grid spanning the range where all of them
are defined, and at each grid point the spread across curves (standard deviation, ddof=1) is
taken; the number returned is its average over the grid divided by the largest |mean curve|
(0 = perfect collapse, O(1) = none; for G(r/xi) the scale is G(0) = 1). For S(q) use
``log_y=True``: the average spread of log S, i.e. the typical relative deviation.
"""

from __future__ import annotations

import numpy as np


def collapse_structure_factor(q, S_q, L) -> tuple[np.ndarray, np.ndarray]:
    """x = q L(t), y = S(q, t) / L(t)^2 for curves S_q [T, nq] and lengths L [T]."""
    q = np.asarray(q, dtype=np.float64)
    S_q = np.asarray(S_q, dtype=np.float64)
    L = np.asarray(L, dtype=np.float64)[:, None]
    return q[None, :] * L, S_q / L**2


def collapse_correlation(r, G, xi) -> tuple[np.ndarray, np.ndarray]:
    """x = r / xi(t), y = G(r, t) for curves G [T, nr] and correlation lengths xi [T]."""
    r = np.asarray(r, dtype=np.float64)
    xi = np.asarray(xi, dtype=np.float64)[:, None]
    return r[None, :] / xi, np.asarray(G, dtype=np.float64)


def collapse_quality(x, y, log_y: bool = False, n_grid: int = 64, x_range=None) -> float:
    """Mean relative spread of the curves (x[i], y[i]) after rescaling (see module doc).

    ``x``, ``y`` are [T, n] (or lists of 1-d arrays); non-finite points (and y <= 0 with
    ``log_y``) are ignored. ``x_range`` restricts the comparison window. NaN if fewer than two
    curves or no common x range.
    """
    curves = []
    for xi_, yi_ in zip(x, y):
        xi_, yi_ = np.asarray(xi_, dtype=np.float64), np.asarray(yi_, dtype=np.float64)
        ok = np.isfinite(xi_) & np.isfinite(yi_)
        if log_y:
            ok &= yi_ > 0
        if ok.sum() >= 2:
            order = np.argsort(xi_[ok])
            yy = np.log(yi_[ok][order]) if log_y else yi_[ok][order]
            curves.append((xi_[ok][order], yy))
    if len(curves) < 2:
        return float("nan")
    lo = max(c[0][0] for c in curves)
    hi = min(c[0][-1] for c in curves)
    if x_range is not None:
        lo, hi = max(lo, x_range[0]), min(hi, x_range[1])
    if not hi > lo:
        return float("nan")
    grid = np.linspace(lo, hi, n_grid)
    Y = np.stack([np.interp(grid, cx, cy) for cx, cy in curves])
    spread = Y.std(axis=0, ddof=1)
    if log_y:
        return float(spread.mean())
    scale = np.abs(Y.mean(axis=0)).max()  # pointwise scaling would blow up where the curves cross 0
    return float(spread.mean() / scale) if scale > 0 else float("nan")
