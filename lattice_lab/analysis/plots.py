"""PNG figures of the coarsening analysis (matplotlib, Agg backend).

Each function returns a matplotlib Figure (the caller saves / logs it and closes it). Titles carry
the run's temperature T, lattice size L and replica count R (``title_suffix``).
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import LogNorm

from lattice_lab.analysis.growth import NO_REPLICA_ERROR
from lattice_lab.common.figures import plain_log_ticks  # selects the Agg backend (no display)


def run_label(T=None, L=None, R=None, extra: str = "") -> str:
    parts = []
    if T is not None:
        parts.append(f"T = {T:g}")
    if L is not None:
        parts.append(f"L = {L}")
    if R is not None:
        parts.append(f"R = {R}")
    if extra:
        parts.append(extra)
    return ", ".join(parts)


def _row(n: int, size: float = 3.6):
    fig, axes = plt.subplots(1, n, figsize=(size * n + 0.8, size), squeeze=False, constrained_layout=True)
    return fig, axes[0]


def phi_snapshots(phis, steps, times, label: str = ""):
    """Local CDW order parameter phi of one replica at several times (diverging map, [-1, 1])."""
    fig, axes = _row(len(phis))
    im = None
    for ax, phi, s, t in zip(axes, phis, steps, times):
        im = ax.imshow(np.asarray(phi).T, origin="lower", cmap="RdBu_r", vmin=-1, vmax=1,
                       interpolation="nearest")
        ax.set_title(f"step {s} (t = {t:g})")
        ax.set_xlabel("x (lattice spacings)")
        ax.set_ylabel("y (lattice spacings)")
    fig.colorbar(im, ax=list(axes), label=r"$\phi_i$", shrink=0.85)
    fig.suptitle(f"local CDW order parameter, replica 0 ({label})")
    return fig


def structure_factor_maps(S_maps, steps, times, label: str = ""):
    """Replica-averaged S(k) over the Brillouin zone [0, 2pi)^2 (Q = (pi, pi) at the centre), log colour.

    Q is marked by the axis ticks (0, pi/2, pi, 3pi/2, 2pi), not by a marker on the map: a late peak of a
    200 x 200 run is ~10 pixels wide, the size of a marker, which hid it."""
    from matplotlib.ticker import FixedFormatter, FixedLocator

    pi_ticks = np.pi * np.array([0.0, 0.5, 1.0, 1.5, 2.0])
    pi_labels = ["0", r"$\pi/2$", r"$\pi$", r"$3\pi/2$", r"$2\pi$"]
    fig, axes = _row(len(S_maps))
    positive = np.concatenate([np.asarray(S)[np.asarray(S) > 0].ravel() for S in S_maps] + [np.array([1.0])])
    vmax = positive.max()
    vmin = max(positive.min(), vmax * 1e-6)
    im = None
    for ax, S, s, t in zip(axes, S_maps, steps, times):
        S = np.asarray(S)
        L = S.shape[-1]
        extent = (-0.5 * 2 * np.pi / L, 2 * np.pi - 0.5 * 2 * np.pi / L) * 2
        im = ax.imshow(np.clip(S.T, vmin, None), origin="lower", cmap="magma",
                       norm=LogNorm(vmin=vmin, vmax=vmax), extent=extent, interpolation="nearest")
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_locator(FixedLocator(pi_ticks))
            axis.set_major_formatter(FixedFormatter(pi_labels))
        ax.set_title(f"step {s} (t = {t:g})")
        ax.set_xlabel(r"$k_x$ (rad / lattice spacing)")
        ax.set_ylabel(r"$k_y$ (rad / lattice spacing)")
    fig.colorbar(im, ax=list(axes), label=r"$S(\mathbf{k}) = \langle|n_\mathbf{k}|^2\rangle / N$", shrink=0.85)
    fig.suptitle(rf"structure factor around $Q = (\pi, \pi)$ ({label})")
    return fig


def correlation_curves(r, curves: dict, ylabel: str, title: str):
    """Curves with error bars: ``curves[name] = (mean [nr], sem [nr])``."""
    fig, ax = plt.subplots(figsize=(6, 4.2), constrained_layout=True)
    for name, (mean, sem) in curves.items():
        ax.errorbar(r, mean, yerr=sem, fmt="o", ms=3, capsize=2, elinewidth=0.8, label=name)
    ax.axhline(0, color="0.6", lw=0.7)
    ax.set_xlabel("distance r (lattice spacings)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    return fig


def growth_plot(t, series: dict, fits: dict, label: str = ""):
    """L(t), xi(t) on log-log axes with fitted power laws and an Allen-Cahn t^(1/2) guide.

    ``series[name] = (y [S], yerr [S])``; ``fits[name] = (PowerLawFit, alpha_err, alpha_err_note)``.
    The fits are black lines above the markers (in the series' own colour they vanished into a run's hundreds
    of frames); the guide spans the fit window (else the last decade), just below the lowest curve, so that it
    does not stretch the length axis over decades where there are no data.
    """
    t = np.asarray(t, dtype=np.float64)
    fig, ax = plt.subplots(figsize=(6.2, 4.5), constrained_layout=True)
    ok_t = t > 0
    ends, window = [], None
    for i, (name, (y, yerr)) in enumerate(series.items()):
        y = np.asarray(y, dtype=np.float64)
        ok = ok_t & np.isfinite(y) & (y > 0)
        if not ok.any():
            continue
        color = f"C{i}"
        yerr_ok = None if yerr is None else np.nan_to_num(np.asarray(yerr)[ok])
        ax.errorbar(t[ok], y[ok], yerr=yerr_ok, fmt="o", ms=3, capsize=2, color=color, label=name, zorder=2)
        if name in fits and fits[name] is not None:
            fit, err, note = fits[name]
            tt = np.geomspace(fit.t_min, fit.t_max, 50)
            ax.plot(tt, fit.predict(tt), "-", color="k", lw=1.3, zorder=4,
                    label=f"fit to {name.split(' from ')[0]}: {alpha_label(fit.alpha, err, note)}")
            window = window or (fit.t_min, fit.t_max)
        ends.append((t[ok][-1], y[ok][-1]))
    if ends:
        t_end, y_end = max(e[0] for e in ends), min(e[1] for e in ends)
        lo, hi = window or (t_end / 10, t_end)
        tt = np.geomspace(max(lo, t[ok_t].min()), hi, 50)
        ax.plot(tt, 0.6 * y_end * (tt / t_end) ** 0.5, "k--", lw=1, zorder=3, label=r"Allen-Cahn $t^{1/2}$")
    ax.set_xscale("log")
    ax.set_yscale("log")
    plain_log_ticks(ax)
    ax.set_xlabel(r"time $t$ = step $\times$ dt (model units, $\hbar = t_{hop} = 1$)")
    ax.set_ylabel("length (lattice spacings)")
    ax.set_title(f"domain growth ({label})")
    ax.legend(fontsize=8)
    return fig


def collapse_plot(x, y, times, xlabel: str, ylabel: str, title: str, logy: bool = False, logx: bool = False,
                  x_max: float | None = None):
    """Rescaled curves (x[i], y[i]) of several times, coloured by time. ``x_max``: the x axis ends there when the
    curves reach further (G(r / xi) of a 200 x 200 run reaches r / xi ~ 16, its collapse happens below ~3)."""
    fig, ax = plt.subplots(figsize=(6, 4.2), constrained_layout=True)
    cmap = plt.get_cmap("viridis")
    n = len(times)
    for i, (xx, yy, t) in enumerate(zip(x, y, times)):
        ax.plot(xx, yy, "o", ms=2.5, color=cmap(i / max(n - 1, 1)), label=f"t = {t:g}")
    if logy:
        ax.set_yscale("log")
    if logx:
        ax.set_xscale("log")
    shown = [np.asarray(xx, dtype=np.float64) for xx in x if np.size(xx)]
    reach = max((np.nanmax(xx) for xx in shown), default=np.nan)
    if x_max is not None and reach > x_max:  # both ends: autoscaling the left end alone keeps the margin of all data
        start = min(np.nanmin(xx) for xx in shown)
        ax.set_xlim(start / 1.1 if logx else start - 0.03 * (x_max - start), x_max)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    return fig


def comparison_plot(r, per_step: dict, names=("ED", "ML"), label: str = ""):
    """ED vs ML C(r) at several steps: ``per_step[step] = compare_curves(...) result``; z below."""
    fig, (ax, az) = plt.subplots(2, 1, figsize=(6.4, 6.2), sharex=True, height_ratios=[3, 1.3],
                                 constrained_layout=True)
    for i, (step, res) in enumerate(per_step.items()):
        c = f"C{i}"
        ax.errorbar(r, res["mean_a"], yerr=res["sem_a"], fmt="o", ms=4, mfc="none", color=c, capsize=2,
                    label=f"{names[0]}, step {step}")
        ax.errorbar(r, res["mean_b"], yerr=res["sem_b"], fmt="x", ms=4, elinewidth=0.8, color=c, capsize=2,
                    label=f"{names[1]}, step {step} (max|z| = {res['max_abs_z']:.2f})")
        az.plot(r, res["z"], "o", ms=2.5, color=c)
    ax.axhline(0, color="0.6", lw=0.7)
    ax.set_ylabel(r"$C(r) = \langle Q_i Q_j \rangle$")
    ax.set_title(f"{names[0]} vs {names[1]} correlation ({label})")
    ax.legend(fontsize=7)
    for v in (-2, 2):
        az.axhline(v, color="0.6", ls=":", lw=0.8)
    az.axhline(0, color="0.6", lw=0.7)
    az.set_xlabel("distance r (lattice spacings)")
    az.set_ylabel("z-score")
    return fig


def growth_runs_plot(runs: list[dict]):
    """L(t) of several runs (temperatures) on one log-log plot, each with its fitted power law.

    ``runs[i]``: ``label``, ``t``, ``L``, ``L_err`` (arrays) and ``fit`` (``(PowerLawFit, alpha_err, alpha_err_note)`` or None).
    """
    fig, ax = plt.subplots(figsize=(6.4, 4.6), constrained_layout=True)
    for i, run in enumerate(runs):
        t, y = np.asarray(run["t"], dtype=np.float64), np.asarray(run["L"], dtype=np.float64)
        ok = (t > 0) & np.isfinite(y) & (y > 0)
        color = f"C{i}"
        label = run["label"]
        if run.get("fit") is not None:
            fit, err, note = run["fit"]
            tt = np.geomspace(fit.t_min, fit.t_max, 50)
            ax.plot(tt, fit.predict(tt), "-", color="k", lw=1.2, zorder=5)
            label += f": {alpha_label(fit.alpha, err, note)}"
        yerr = np.nan_to_num(np.asarray(run["L_err"], dtype=np.float64)[ok])
        ax.errorbar(t[ok], y[ok], yerr=yerr, fmt="o", ms=2.5, capsize=1.5, elinewidth=0.7, color=color, label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    plain_log_ticks(ax)
    ax.set_xlabel(r"time $t$ = step $\times$ dt (model units, $\hbar = t_{hop} = 1$)")
    ax.set_ylabel("domain size L(t) (lattice spacings)")
    ax.set_title("domain growth of several runs (black: fitted power laws)")
    ax.legend(fontsize=8)
    return fig


def alpha_label(alpha: float, err: float, note: str | None = None) -> str:
    """A fitted exponent for a legend: alpha +- err, or alpha alone and why it has no error bar."""
    if np.isfinite(err):
        return rf"$\alpha = {alpha:.3f} \pm {err:.3f}$"
    why = "< 2 replicas" if note == NO_REPLICA_ERROR else (note or "no error")
    return rf"$\alpha = {alpha:.3f}$ ({why}: no error bar)"
