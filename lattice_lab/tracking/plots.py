"""Force-accuracy figures: parity plot (F_ML vs F_ED) and error histogram, matplotlib Agg.

Each function returns the figure; :func:`save_figure` writes it as PNG atomically (and the caller
logs it to MLflow with ``Tracker.log_figure``).
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import matplotlib.ticker
import numpy as np

from lattice_lab.analysis.order_parameter import WALL_THRESHOLD

# selects the Agg backend (no display); save_figure is re-exported for the callers of this module
from lattice_lab.common.figures import plain_log_ticks, save_figure  # noqa: F401

MAX_SCATTER_POINTS = 200_000  # per split; a seeded subsample keeps the PNG light
FORCE_UNITS = r"(model units, $t_{hop} = 1$)"  # F_i = -dE/dQ_i, E in units of the hopping t, Q as in the model


SPLIT_COLORS = {"train": "tab:blue", "val": "tab:orange"}  # any other set scored (evaluate's split): tab:green


def split_color(name: str) -> str:
    """The colour of a set of configurations in every force-accuracy figure."""
    return SPLIT_COLORS.get(name, "tab:green")


def _np(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64).ravel()


def _subsample(n: int, seed: int = 0) -> np.ndarray:
    if n <= MAX_SCATTER_POINTS:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, MAX_SCATTER_POINTS, replace=False))


def parity_plot(splits: dict, title: str = ""):
    """Predicted vs exact force, one colour per split, y = x line, sigma = std(F_ML - F_ED) in the legend.

    ``splits``: ``{"train": (pred, exact), "val": (pred, exact)}`` (arrays or tensors of any shape).
    The frame spans the exact forces (plus 10 %); predictions beyond it are drawn clipped to the
    edge as crosses and counted in the legend, so a few wild outliers do not hide the bulk.
    """
    fig, ax = plt.subplots(figsize=(5.2, 5.0), dpi=120)
    data = {name: (_np(pred), _np(exact)) for name, (pred, exact) in splits.items()}
    lo = min(float(e.min()) for _, e in data.values())
    hi = max(float(e.max()) for _, e in data.values())
    pad = 0.1 * (hi - lo if hi > lo else 1.0)
    lo, hi = lo - pad, hi + pad
    n_out = 0
    for name, (pred, exact) in data.items():
        err = pred - exact
        idx = _subsample(pred.size)
        p, e = pred[idx], exact[idx]
        inside = (p >= lo) & (p <= hi)
        n_out += int(((pred < lo) | (pred > hi)).sum())
        ax.scatter(e[inside], p[inside], s=2, alpha=0.35, lw=0, color=split_color(name),
                   label=f"{name}: $\\sigma$ = {err.std():.4g}, RMSE = {np.sqrt(np.mean(err ** 2)):.4g}",
                   rasterized=True)
        if (~inside).any():
            ax.scatter(e[~inside], np.clip(p[~inside], lo, hi), s=14, marker="x", lw=0.8, color=split_color(name),
                       clip_on=False)
    ax.plot([lo, hi], [lo, hi], "k-", lw=0.8, label="$y = x$")
    if n_out:
        ax.plot([], [], "kx", ms=1.5, label=f"{n_out} predictions outside the frame (clipped)")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_aspect("equal")
    ax.set_xlabel(r"exact force $F_\mathrm{ED}$ " + FORCE_UNITS)
    ax.set_ylabel(r"predicted force $F_\mathrm{ML}$ " + FORCE_UNITS)
    ax.set_title(title or "force parity", fontsize=10, wrap=True)
    leg = ax.legend(loc="upper left", fontsize=8, markerscale=4)
    for h in leg.legend_handles:
        h.set_alpha(1.0)
    fig.tight_layout()
    return fig


def error_histogram(splits: dict, bins: int = 200, title: str = ""):
    """Histogram of F_ML - F_ED per split (log y), sigma in the legend.

    The legend sits below the axes: on a log scale the tails reach every corner of the frame, so no
    place inside it is free of data."""
    fig, ax = plt.subplots(figsize=(5.6, 4.6), dpi=120, layout="constrained")
    errs = {name: _np(pred) - _np(exact) for name, (pred, exact) in splits.items()}
    m = max(float(np.abs(e).max()) for e in errs.values()) or 1.0
    edges = np.linspace(-m, m, bins + 1)
    for name, err in errs.items():
        ax.hist(err, bins=edges, histtype="step", lw=1.2, color=split_color(name),
                label=f"{name}: $\\sigma$ = {err.std():.4g}, max |err| = {np.abs(err).max():.3g}")
    ax.set_yscale("log")
    ax.set_xlabel(r"force error $F_\mathrm{ML} - F_\mathrm{ED}$ " + FORCE_UNITS)
    ax.set_ylabel("sites per bin")
    ax.set_title(title or "force error distribution", fontsize=10, wrap=True)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=1, frameon=False)
    return fig


def learning_curve(history: list[dict], best_epoch: int | None = None, title: str = ""):
    """Train and validation force RMSE vs epoch (log y), the best epoch marked with its validation RMSE,
    the learning rate on a second log axis (dotted). ``history``: the trainer's per-epoch rows
    (``epoch``, ``train/rmse``, ``val/rmse``, ``lr``), as in ``metrics.csv``."""
    fig, ax = plt.subplots(figsize=(5.6, 4.6), dpi=120, layout="constrained")
    epochs = [int(r["epoch"]) for r in history]
    for key, color in (("train/rmse", "tab:blue"), ("val/rmse", "tab:orange")):
        ax.plot(epochs, [float(r[key]) for r in history], "-", lw=1.2, color=color, marker="." if len(epochs) < 30 else None,
                label=key.split("/")[0] + " RMSE")
    if best_epoch is not None and best_epoch in epochs:
        best = float(history[epochs.index(best_epoch)]["val/rmse"])
        ax.axvline(best_epoch, color="0.4", ls="--", lw=0.8)
        ax.plot([best_epoch], [best], "o", color="tab:orange", mfc="none", ms=8,
                label=f"best: epoch {best_epoch}, val RMSE = {best:.4g}")
    ax.set_yscale("log")
    plain_log_ticks(ax)  # 0.3, 0.5, 1, 2: not 3 x 10^-1 over the few decades a training spans
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(r"force RMSE " + FORCE_UNITS)
    ax.set_title(title or "learning curve", fontsize=10, wrap=True)
    handles, labels = ax.get_legend_handles_labels()
    if all("lr" in r for r in history):
        lx = ax.twinx()
        lrs = [float(r["lr"]) for r in history]
        (lr_line,) = lx.plot(epochs, lrs, ":", color="0.3", lw=1.2)
        lx.set_yscale("log")
        lx.margins(y=0.08)
        levels = sorted(set(lrs))
        if len(levels) <= 6:  # the plateau scheduler's few steps, labelled as they are (not log minor ticks)
            lx.set_yticks(levels, [f"{v:.3g}" for v in levels])
            lx.yaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        lx.set_ylabel("learning rate")
        handles.append(lr_line)
        labels.append("learning rate (right axis)")
    ax.legend(handles, labels, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, frameon=False)
    return fig


def error_by_configuration(configs: dict, title: str = "", positions: dict | None = None):
    """Force RMSE of every configuration (log y), random hot starts and quench snapshots apart.

    ``configs``: ``{"train": (rmse, kind, t), "val": ...}`` per split, each ``[C]``: the configuration's RMSE,
    its kind (0 random, 1 quench) and the time after the quench of a snapshot (NaN for random ones; ``t``
    None when the dataset does not record its schedule: snapshots are then placed in file order, at
    ``positions[split]``, each configuration's index in the file, so that the splits share one axis; default
    its index in ``configs``).
    Random configurations are a strip on the left; quench snapshots are drawn against time, with the
    median of each split's snapshots at each time as a line, so the error along the ordering dynamics
    the model is to drive can be read off."""
    data = {name: (_np(rmse), np.asarray(kind).ravel(), None if t is None else np.asarray(t, np.float64).ravel())
            for name, (rmse, kind, t) in configs.items()}
    has_random = any((k == 0).any() for _, k, _ in data.values())
    has_quench = any((k == 1).any() for _, k, _ in data.values())
    panels = [p for p, present in (("random", has_random), ("quench", has_quench)) if present]
    fig, axes = plt.subplots(1, len(panels), figsize=(7.2 if len(panels) == 2 else 5.6, 4.6), dpi=120, sharey=True,
                             layout="constrained", squeeze=False,
                             gridspec_kw={"width_ratios": [1, 4] if len(panels) == 2 else [1]})
    axes = dict(zip(panels, axes[0]))
    jitter = np.random.default_rng(0)
    timed = all(t is not None for _, _, t in data.values())
    for i, (name, (rmse, kind, t)) in enumerate(data.items()):
        color = split_color(name)
        if "random" in axes and (kind == 0).any():
            r = rmse[kind == 0]
            axes["random"].scatter(i + jitter.uniform(-0.25, 0.25, r.size), r, s=9, alpha=0.6, lw=0, color=color)
            axes["random"].plot([i - 0.35, i + 0.35], [np.median(r)] * 2, "-", color=color, lw=1.5)
        if "quench" in axes and (kind == 1).any():
            q = rmse[kind == 1]
            where = np.arange(kind.size) if positions is None else np.asarray(positions[name]).ravel()
            x = t[kind == 1] if timed else where[kind == 1].astype(np.float64)
            label = f"{name}: median {np.median(q):.3g}"
            axes["quench"].scatter(x, q, s=9, alpha=0.6, lw=0, color=color, label=label)
            xs = np.unique(x)
            if xs.size < x.size:  # several replicas per time: the median across them
                axes["quench"].plot(xs, [np.median(q[x == v]) for v in xs], "-", lw=1.0, color=color)
    if "random" in axes:
        ax = axes["random"]
        ax.set_xticks(range(len(data)), list(data))
        ax.set_xlim(-0.6, len(data) - 0.4)
        ax.set_xlabel("random\n(hot start)")
    if "quench" in axes:
        ax = axes["quench"]
        ax.set_xlabel("time after the quench $t$" if timed else "quench snapshot (file order)")
        if not timed:
            ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.legend(fontsize=8, loc="upper right", markerscale=2)
    first = axes[panels[0]]
    first.set_yscale("log")
    plain_log_ticks(first)
    first.set_ylabel(r"force RMSE per configuration " + FORCE_UNITS)
    fig.suptitle(title or "force error by configuration", fontsize=10)
    return fig


def error_vs_order(sets: dict, wall_threshold: float = WALL_THRESHOLD, bins: int = 20, title: str = ""):
    """Force RMSE against the local CDW order |phi_i| of the exact density, over the quench snapshots' sites.

    ``sets``: ``{"val": (error, abs_phi), ...}``, arrays of any shape with one entry per site (F_ML - F_ED
    and |phi_i|). Top: the RMSE in each bin of |phi| (log y; marker area ~ the bin's share of the sites), the
    domain-wall threshold dashed; bottom: the fraction of each set's sites in the bin, so the errors can be
    weighed by how many sites carry them; the legend (RMSE on walls and in domains) below.
    |phi| = 1 is the ordered checkerboard, 0 the core of a wall between the two CDW domains."""
    fig, (ax, ax_n) = plt.subplots(2, 1, figsize=(5.6, 5.9), dpi=120, sharex=True, layout="constrained",
                                   gridspec_kw={"height_ratios": [3, 1.2]})
    edges = np.linspace(0.0, 1.0, bins + 1)
    centres = 0.5 * (edges[1:] + edges[:-1])
    for name, (err, phi) in sets.items():
        err, phi = _np(err), np.minimum(_np(phi), 1.0)  # |phi| <= 1 for densities in [0, 1]; rounding aside
        which = np.clip(np.digitize(phi, edges) - 1, 0, bins - 1)
        count = np.bincount(which, minlength=bins)
        sq = np.bincount(which, weights=err ** 2, minlength=bins)
        shown = count > 0
        wall = phi < wall_threshold
        label = (f"{name}: RMSE {np.sqrt(np.mean(err[wall] ** 2)) if wall.any() else float('nan'):.3g} on walls, "
                 f"{np.sqrt(np.mean(err[~wall] ** 2)) if (~wall).any() else float('nan'):.3g} in domains")
        rmse = np.sqrt(sq[shown] / count[shown])
        ax.plot(centres[shown], rmse, "-", lw=0.8, alpha=0.6, color=split_color(name))
        # marker area ~ the bin's share of the sites: a few wall-core sites do not look like a domain's many
        ax.scatter(centres[shown], rmse, s=6 + 200 * count[shown] / count.sum(), color=split_color(name), zorder=3,
                   label=label)
        ax_n.step(edges, np.r_[count / max(count.sum(), 1), 0.0], where="post", lw=1.2, color=split_color(name))
    for a in (ax, ax_n):
        a.axvline(wall_threshold, color="0.4", ls="--", lw=0.8)
    ax.set_yscale("log")
    plain_log_ticks(ax)
    ax.set_ylabel(r"force RMSE " + FORCE_UNITS, fontsize=9)
    ax.text(wall_threshold, 1.0, " domain walls | domains ", transform=ax.get_xaxis_transform(), ha="center",
            va="bottom", fontsize=8, color="0.3")
    ax_n.set_ylabel("fraction\nof sites", fontsize=9)
    ax_n.set_xlabel(r"local CDW order $|\phi_i|$ of the exact density (quench snapshots)")
    ax_n.set_xlim(0, 1)
    # below the axes: a trained model's errors reach every corner of the frame (the walls high on the left, the
    # sharp walls' rows at |phi| ~ 0.7 high in the middle)
    ax_n.legend(*ax.get_legend_handles_labels(), fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.42),
                frameon=False)
    fig.suptitle(title or "force error against the local order", fontsize=10)
    return fig


def configuration_error_figures(sets: dict, times=None, title: str = "") -> dict:
    """``{"error_by_config.png": fig, "error_vs_order.png": fig}`` (the second only with quench snapshots) of
    sets of configurations ``{name: (pred, exact, kind, density, positions)}``: forces ``[C, L, L]``, their
    kinds, exact densities and positions in the file; ``times``: :func:`~lattice_lab.data.generation.quench_times`
    of the whole file (None: snapshots in file order). What train and evaluate draw."""
    from lattice_lab.training.metrics import per_config_rmse, quench_order

    configs, positions, orders = {}, {}, {}
    for name, (pred, exact, kind, density, where) in sets.items():
        configs[name] = (per_config_rmse(pred, exact).cpu(), kind, None if times is None else times[where])
        positions[name] = where
        quench, abs_phi = quench_order(kind, density)  # site errors against the local order of the exact density
        if abs_phi is not None:
            orders[name] = ((pred - exact)[quench.to(pred.device)].cpu(), abs_phi)
    figures = {"error_by_config.png": error_by_configuration(configs, title=title, positions=positions)}
    if orders:
        figures["error_vs_order.png"] = error_vs_order(orders, title=title)
    return figures
