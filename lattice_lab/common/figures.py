"""Figures of every entrypoint: PNGs written atomically and cropped to their artists, and readable log ticks.

One implementation for the analysis, training and benchmark plots (``analysis/plots.py``,
``tracking/plots.py``, ``bench/report.py``). Importing this module selects matplotlib's Agg backend
(no display) unless a backend is already in use.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg", force=False)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from lattice_lab.common.io import atomic_path  # noqa: E402

DPI = 120


def save_figure(fig, path: str | os.PathLike, close: bool = True) -> Path:
    """Write ``fig`` as a PNG (atomically: temp file + rename) and, by default, close it. The image is cropped /
    grown to the figure's artists (``bbox_inches="tight"``): constrained layout alone let the x labels of square
    snapshot panels fall below a row of four, and a long title run past the edge."""
    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=DPI, format="png", bbox_inches="tight", pad_inches=0.05)
    if close:
        plt.close(fig)
    return path


def plain_log_ticks(ax) -> None:
    """Readable labels on log axes (call after plotting), plain numbers (0.05, 1, 2000; no 10^k, no "0.00"):
    at 1, 2, 5 x 10^k over up to ~2.5 decades; at 10^k only over wider ranges (a run's log-spaced frames span
    t = 0.05..1250, where 1, 2, 5 x 10^k gave 15 labels that ran into each other); where fewer than 3 of
    those fall inside the axis, ~6 evenly spaced round values (a domain size growing from 0.5 to 1.5 would
    otherwise show the single label 1.0). Minor ticks are unlabelled. Linear axes are left as they are."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    for axis, lim in ((ax.xaxis, ax.get_xlim()), (ax.yaxis, ax.get_ylim())):
        lo, hi = sorted(lim)
        if axis.get_scale() != "log" or not (lo > 0 and np.isfinite(hi)):
            continue
        decades = math.log10(hi / lo)
        subs = (1.0, 2.0, 5.0) if decades <= 2.5 else (1.0,)
        exps = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
        inside = [m * 10.0**e for e in exps for m in subs if lo <= m * 10.0**e <= hi]
        if len(inside) < 3:
            ticks = MaxNLocator(nbins=6).tick_values(lo, hi)
            inside = [v for v in ticks if lo <= v <= hi and v > 0]
        step = max(1, math.ceil(len(inside) / 8))  # more than ~6 decades: every other decade, ...
        axis.set_major_locator(FixedLocator(inside[::step]))
        axis.set_major_formatter(FuncFormatter(plain_number))
        axis.set_minor_locator(LogLocator(base=10, subs=np.arange(2, 10) * 1.0, numticks=100))
        axis.set_minor_formatter(NullFormatter())


def plain_number(value: float, _pos=None) -> str:
    """A tick value as a plain number with no trailing zeros: 0.05, 0.5, 1, 20, 2000 (1e+05 beyond)."""
    return f"{value:.6g}"
