"""Progress bars with rates (tqdm), one style for every long loop in the project."""

from __future__ import annotations

import os

from tqdm.auto import tqdm


def progress(iterable=None, *, total=None, desc: str = "", unit: str = "it", initial: int = 0, **kw):
    """A tqdm bar showing the rate in ``unit``/s. Set LATTICE_LAB_NO_PROGRESS=1 to silence it."""
    disable = os.environ.get("LATTICE_LAB_NO_PROGRESS", "") not in ("", "0")
    return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, dynamic_ncols=True,
                mininterval=0.5, disable=disable, **kw)
