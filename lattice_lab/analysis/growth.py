"""Growth exponent: least-squares power-law fit L(t) = A t^alpha on log-log axes.

    log L = log A + alpha log t,   fitted over the late-time window t_min <= t <= t_max.

Two error bars are reported (DESIGN.md section 6):
- the fit's standard error, sqrt(RSS / (n - 2) / sum (log t - mean)^2), from the scatter of the
  replica-averaged curve about the straight line;
- the replica-to-replica error: each replica's L_r(t) fitted separately, standard error of the
  mean of the R slopes; and, when delete-one curves are given, the jackknife error of alpha.
The error quoted with alpha (``alpha_err``) is the largest of them; with one replica it is NaN (see
``alpha_err_note``): the fit error alone, from one curve's autocorrelated time points, understates it.
Allen-Cahn (non-conserved Ising) coarsening gives alpha = 1/2.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from lattice_lab.analysis.stats import jackknife_error, replica_mean_sem
from lattice_lab.common.errors import ConfigError


@dataclass(frozen=True)
class PowerLawFit:
    alpha: float
    alpha_err: float  # standard error of the slope from the fit residuals
    amplitude: float  # A in L = A t^alpha
    t_min: float
    t_max: float
    n_points: int

    def predict(self, t) -> np.ndarray:
        return self.amplitude * np.asarray(t, dtype=np.float64) ** self.alpha

    def as_dict(self) -> dict:
        return asdict(self)


def fit_window(t, t_min: float | None = None, t_max: float | None = None) -> tuple[np.ndarray, float, float]:
    """Mask of the frames in the fit window and the window actually used.

    Defaults: t_max = the last time, t_min = t_max / 10 (the last decade). Times <= 0 are never
    used (log t). Raises ConfigError if fewer than 3 frames fall in the window.
    """
    t = np.asarray(t, dtype=np.float64)
    positive = t[t > 0]
    if positive.size == 0:
        raise ConfigError("fit: no frame with time > 0 to fit a power law")
    hi = float(positive.max()) if t_max is None else float(t_max)
    lo = hi / 10 if t_min is None else float(t_min)
    if not (hi > 0 and lo < hi):
        raise ConfigError(f"fit.t_min={t_min}, fit.t_max={t_max}: need 0 <= t_min < t_max")
    mask = (t > 0) & (t >= lo) & (t <= hi)
    if mask.sum() < 3:
        raise ConfigError(f"fit.t_min={lo:g}, fit.t_max={hi:g}: only {int(mask.sum())} saved frames in the "
                          f"window (saved times {t.min():g}..{t.max():g}); need >= 3")
    return mask, lo, hi


def _slopes(x: np.ndarray, Y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Least-squares slope, intercept and slope standard error of Y[..., n] vs x[n] (vectorised)."""
    n = x.size
    xm = x.mean()
    sxx = ((x - xm) ** 2).sum()
    Ym = Y.mean(axis=-1, keepdims=True)
    slope = ((x - xm) * (Y - Ym)).sum(axis=-1) / sxx
    intercept = Ym[..., 0] - slope * xm
    resid = Y - (intercept[..., None] + slope[..., None] * x)
    with np.errstate(invalid="ignore", divide="ignore"):
        se = np.sqrt((resid**2).sum(axis=-1) / (n - 2) / sxx) if n > 2 else np.full(slope.shape, np.nan)
    return slope, intercept, se


def fit_power_law(t, y, t_min: float | None = None, t_max: float | None = None) -> PowerLawFit:
    """Fit y(t) = A t^alpha over the window (see :func:`fit_window`); non-finite / y <= 0 points dropped."""
    t = np.asarray(t, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    mask, lo, hi = fit_window(t, t_min, t_max)
    mask &= np.isfinite(y) & (y > 0)
    if mask.sum() < 3:
        raise ConfigError(f"fit.t_min={lo:g}, fit.t_max={hi:g}: fewer than 3 finite positive values to fit")
    slope, intercept, se = _slopes(np.log(t[mask]), np.log(y[mask]))
    return PowerLawFit(alpha=float(slope), alpha_err=float(se), amplitude=float(np.exp(intercept)),
                       t_min=lo, t_max=hi, n_points=int(mask.sum()))


NO_REPLICA_ERROR = ("no error bar: it needs >= 2 replicas (the fit error of one curve's autocorrelated "
                    "time points, alpha_fit_err, understates it)")


def growth_exponent(t, y_mean, y_replicas=None, y_jackknife=None,
                    t_min: float | None = None, t_max: float | None = None) -> dict:
    """alpha of the replica-averaged curve with its fit error and the replica errors.

    ``y_mean`` [S] is the ensemble curve (e.g. L(t) from the replica-averaged S(k));
    ``y_replicas`` [R, S] the per-replica curves (each fitted separately: mean and standard
    error of the R slopes); ``y_jackknife`` [R, S] the delete-one ensemble curves (jackknife
    error of alpha). Replicas with non-finite values in the window are left out of the spread.
    """
    fit = fit_power_law(t, y_mean, t_min, t_max)
    out = {"alpha": fit.alpha, "alpha_fit_err": fit.alpha_err, "amplitude": fit.amplitude,
           "t_min": fit.t_min, "t_max": fit.t_max, "n_points": fit.n_points}
    mask, _, _ = fit_window(t, fit.t_min, fit.t_max)
    x = np.log(np.asarray(t, dtype=np.float64)[mask])
    if y_replicas is not None:
        Y = np.asarray(y_replicas, dtype=np.float64)[..., mask]
        with np.errstate(invalid="ignore", divide="ignore"):
            slopes = _slopes(x, np.log(Y))[0]
        slopes = np.where(np.isfinite(Y).all(-1) & (Y > 0).all(-1), slopes, np.nan)
        mean, sem = replica_mean_sem(slopes)
        out.update(alpha_replica_mean=float(mean), alpha_replica_err=float(sem),
                   n_replicas_fitted=int(np.isfinite(slopes).sum()))
    if y_jackknife is not None:
        Y = np.asarray(y_jackknife, dtype=np.float64)[..., mask]
        with np.errstate(invalid="ignore", divide="ignore"):
            slopes = _slopes(x, np.log(Y))[0]
        out["alpha_jackknife_err"] = float(jackknife_error(slopes))
    errs = [out.get(k, np.nan) for k in ("alpha_replica_err", "alpha_jackknife_err")]
    errs = [e for e in errs if np.isfinite(e)]
    # the error quoted with alpha: the larger of the fit error and the replica error(s). Without a
    # replica error there is none: the points of one curve are autocorrelated in time, so the fit
    # error alone understates the error of alpha (~10x for one replica of a coarsening run)
    if errs and np.isfinite(fit.alpha_err):
        out["alpha_err"] = float(max([fit.alpha_err, *errs]))
    else:
        out["alpha_err"] = float("nan")
        out["alpha_err_note"] = NO_REPLICA_ERROR if not errs else "too few points for a fit error"
    return out



def format_with_error(value: float, err: float | None, digits: int = 2) -> str:
    """``value +- err`` for a log line: the error to ``digits`` significant digits and the value to the same
    decimal place (``0.0893 +- 0.0061``); without a usable error, the value to 4 significant digits."""
    if err is None or not math.isfinite(err) or err <= 0:
        return f"{value:.4g}"
    decimals = max(0, digits - 1 - math.floor(math.log10(err)))
    return f"{value:.{decimals}f} +- {err:.{decimals}f}"


def describe_exponent(growth: dict | None) -> str:
    """A growth exponent from :func:`growth_exponent`'s result (or a summary's ``growth_L`` / ``growth_xi``)
    for a log line: ``0.0893 +- 0.0061``, or ``not fitted (<reason>)``."""
    growth = growth or {}
    alpha = growth.get("alpha")
    if alpha is None or not math.isfinite(alpha):
        return f"not fitted ({growth.get('fit_error') or 'no fit result'})"
    text = format_with_error(float(alpha), growth.get("alpha_err"))
    note = growth.get("alpha_err_note")
    return f"{text} ({note})" if note else text
