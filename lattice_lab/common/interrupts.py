"""Stop a long run cleanly on Ctrl-C or SIGTERM (a cluster's preemption): at the next safe point.

Inside ``with StopRequests() as stop:`` the first SIGINT / SIGTERM only sets ``stop.signal`` (the
loop checks it between steps, saves its state and raises
:class:`~lattice_lab.common.errors.Interrupted`); a second one interrupts at once, as Python would
(KeyboardInterrupt). Outside the main thread signals cannot be caught, and nothing changes there.
:func:`interrupts_as` turns a KeyboardInterrupt into that one line for loops that save as they go.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Callable

from lattice_lab.common.errors import Interrupted


class StopRequests:
    """Turns SIGINT / SIGTERM into a request the running loop honours at its next safe point."""

    SIGNALS = ("SIGINT", "SIGTERM")

    def __init__(self):
        self.signal: str | None = None  # the name of the first signal received
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                sig = getattr(signal, name)
                if interruptible(signal.getsignal(sig)):
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, _frame) -> None:
        if self.signal is not None:  # asked twice: stop now, as the handler before this one would
            self.__exit__()
            signal.raise_signal(signum)
            return
        self.signal, self.signum = signal.Signals(signum).name, signum
        print(f"\n{self.signal}: stopping at the next safe point and saving (again to stop at once)",
              file=sys.stderr, flush=True)


def interrupting(handler):
    """Mark ``handler`` as one that turns its signal into a KeyboardInterrupt (as Python's SIGINT handler
    does): :class:`StopRequests` may stand in for it, and gives the signal back to it when asked twice."""
    handler._lattice_lab_interrupts = True
    return handler


def interruptible(handler) -> bool:
    """Whether a signal with this handler may be turned into a stop request: the default action, Python's
    Ctrl-C handler or one marked by :func:`interrupting` -- not an ignored signal (a job started with ``&``
    from a script ignores Ctrl-C) nor someone else's handler (submitit's SIGTERM handling)."""
    return (handler is signal.SIG_DFL or handler is signal.default_int_handler
            or getattr(handler, "_lattice_lab_interrupts", False))


@contextlib.contextmanager
def interrupts_as(message: Callable[[], str]):
    """A KeyboardInterrupt (Ctrl-C; SIGTERM under :func:`lattice_lab.common.cli.friendly_errors`) inside
    becomes :class:`Interrupted` with ``message()``: what the run has saved and how to continue."""
    try:
        yield
    except KeyboardInterrupt:
        raise Interrupted(message()) from None
