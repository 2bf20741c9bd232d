"""Progress bars with rates (tqdm), one style for every long loop in the project."""

from __future__ import annotations

import os

from tqdm.auto import tqdm


def progress(iterable=None, *, total=None, desc: str = "", unit: str = "it", initial: int = 0, **kw):
    """A tqdm bar showing the rate in ``unit``/s. Set LATTICE_LAB_NO_PROGRESS=1 to silence it."""
    disable = os.environ.get("LATTICE_LAB_NO_PROGRESS", "") not in ("", "0")
    return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, dynamic_ncols=True,
                mininterval=0.5, disable=disable, **kw)


def start_phase(bar, desc: str, total: int, done: int = 0) -> None:
    """Turn ``bar`` into the bar of a new phase of the same loop: its description (name the phase), total and
    count start afresh, so its rate and time left are those of this phase only (a slower phase after a fast
    one would otherwise be promised the fast one's rate). ``done``: of ``total``, already done (a resume)."""
    bar.reset(total=total)
    bar.set_description_str(desc, refresh=False)
    bar.set_postfix_str("", refresh=False)
    bar.initial = bar.n = bar.last_print_n = done
    bar.refresh()
