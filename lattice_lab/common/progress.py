"""Progress bars with rates (tqdm), one style for every long loop in the project.

On a terminal a bar redraws at most every 0.5 s. Into a file (a cluster job's log) every redraw is
a new line, so there it prints at most once a minute (a 10-hour run: ~600 lines, not ~70,000); the
loops' status texts go through :func:`set_status`, which waits for the next redraw instead of forcing one.
``LATTICE_LAB_PROGRESS_INTERVAL=<seconds>`` sets the interval for both; ``LATTICE_LAB_NO_PROGRESS=1``
silences the bars.
"""

from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm

from lattice_lab.common.errors import ConfigError

TERMINAL_INTERVAL_S = 0.5
LOG_INTERVAL_S = 60.0


def update_interval(stream=None) -> float:
    """Seconds between two redraws of a bar on ``stream`` (default ``sys.stderr``, where tqdm writes)."""
    value = os.environ.get("LATTICE_LAB_PROGRESS_INTERVAL", "")
    if value:
        try:
            seconds = float(value)
        except ValueError:
            seconds = -1.0
        if not seconds >= 0:
            raise ConfigError(f"LATTICE_LAB_PROGRESS_INTERVAL={value!r}: expected a number of seconds >= 0")
        return seconds
    stream = sys.stderr if stream is None else stream
    try:
        terminal = stream.isatty()
    except (AttributeError, ValueError):  # no stream, or a closed one
        terminal = False
    return TERMINAL_INTERVAL_S if terminal else LOG_INTERVAL_S


def progress(iterable=None, *, total=None, desc: str = "", unit: str = "it", initial: int = 0, **kw):
    """A tqdm bar showing the rate in ``unit``/s (see the module doc for how often it redraws)."""
    disable = os.environ.get("LATTICE_LAB_NO_PROGRESS", "") not in ("", "0")
    kw.setdefault("mininterval", update_interval(kw.get("file")))
    kw.setdefault("maxinterval", max(10.0, kw["mininterval"]))  # tqdm's monitor would redraw every 10 s
    return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, dynamic_ncols=True,
                disable=disable, **kw)


def set_status(bar, text: str) -> None:
    """The text after a bar's counts (a rate, a loss, a phase): shown at the bar's next redraw."""
    bar.set_postfix_str(text, refresh=False)


def start_phase(bar, desc: str, total: int, done: int = 0) -> None:
    """Turn ``bar`` into the bar of a new phase of the same loop: its description (name the phase), total and
    count start afresh, so its rate and time left are those of this phase only (a slower phase after a fast
    one would otherwise be promised the fast one's rate). ``done``: of ``total``, already done (a resume)."""
    bar.set_description_str(desc, refresh=False)
    set_status(bar, "")
    bar.initial = 0  # reset() redraws at n = 0: with a resumed bar's initial its rate read negative
    bar.reset(total=total)
    bar.initial = bar.n = bar.last_print_n = done
    bar.refresh()
