"""Entrypoint helpers: user errors become one line on stderr (exit code 2), not a traceback.

An interruption (Ctrl-C, SIGTERM) prints one line ``interrupted...`` and exits 130 (143 after a
SIGTERM): a run that saved its state raises :class:`~lattice_lab.common.errors.Interrupted`, whose
message says where and how to continue.
"""

from __future__ import annotations

import contextlib
import functools
import signal
import sys
import threading
from pathlib import Path

from lattice_lab.common.allocator import tune_malloc
from lattice_lab.common.errors import Interrupted, LatticeLabError

CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "conf")

EXIT_USER_ERROR = 2

# How to continue after an interruption that the run itself did not describe (a plain KeyboardInterrupt),
# by Hydra job name (the entrypoint's module).
_RESUME_HINTS = {
    "generate": "rerun the same command to resume from the last saved progress",
    "train": "rerun with resume=true to continue from the last finished epoch (if one finished)",
    "simulate": "rerun with resume=true to continue from the last checkpoint (if one was written)",
}

_received: dict = {"signal": None}  # the last SIGTERM turned into a KeyboardInterrupt by _sigterm_interrupts


def _hydra_job():
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get() if HydraConfig.initialized() else None
    except Exception:  # noqa: BLE001 - outside Hydra
        return None


def _in_multirun() -> bool:
    try:
        from hydra.types import RunMode

        hc = _hydra_job()
        return hc is not None and hc.mode == RunMode.MULTIRUN
    except Exception:  # noqa: BLE001 - outside Hydra
        return False


def _job_name() -> str | None:
    hc = _hydra_job()
    try:
        return str(hc.job.name) if hc is not None else None
    except Exception:  # noqa: BLE001
        return None


def _exit_code() -> int:
    return 128 + int(_received["signal"] or signal.SIGINT)


def _interrupted(detail: str | None) -> None:
    """Print ``interrupted[ (SIGTERM)][: detail]`` and exit 130 (143 after a SIGTERM)."""
    signum = _received["signal"]
    head = "interrupted" if signum in (None, signal.SIGINT) else f"interrupted ({signal.Signals(signum).name})"
    print(f"{head}: {detail}" if detail else head, file=sys.stderr, flush=True)
    sys.exit(_exit_code())


def _raise_keyboard_interrupt(signum, frame):
    _received["signal"] = signum
    raise KeyboardInterrupt(signal.Signals(signum).name)


@contextlib.contextmanager
def _sigterm_interrupts():
    """While inside: SIGTERM raises KeyboardInterrupt in the main thread, as Ctrl-C does, so runs save their
    state and stop the same way. Only where nobody else handles SIGTERM (e.g. submitit's job handlers do);
    the previous handler is restored on the way out."""
    installed = False
    if threading.current_thread() is threading.main_thread():
        with contextlib.suppress(ValueError, OSError):
            if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
                signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
                installed = True
    try:
        yield
    finally:
        if installed:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def friendly_errors(fn):
    """Decorate a Hydra task function: a :class:`LatticeLabError` prints ``error: ...`` and exits 2.

    So does an ``OSError`` that names a file (an output folder that cannot be created, a read-only
    disk, no space left): ``error: <path>: <reason>``.
    Ctrl-C (or SIGTERM) prints ``interrupted: <how to continue>`` and exits 130 (143 after SIGTERM);
    :class:`Interrupted`, raised by a run that saved its state, prints ``interrupted: <its message>``.
    In multirun (sweeps) user errors propagate so the sweeper records the trial as failed.
    Also tunes glibc malloc for tensor workloads (:mod:`lattice_lab.common.allocator`).
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        tune_malloc()
        _received["signal"] = None
        try:
            with _sigterm_interrupts():
                return fn(*args, **kwargs)
        except KeyboardInterrupt:
            _interrupted(_RESUME_HINTS.get(_job_name() or ""))
        except Interrupted as exc:  # before LatticeLabError: an interruption is not a user error
            _interrupted(str(exc))
        except LatticeLabError as exc:
            if _in_multirun():
                raise
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(EXIT_USER_ERROR)
        except OSError as exc:
            if exc.filename is None or _in_multirun():
                raise
            print(f"error: {exc.filename}: {exc.strerror or exc}", file=sys.stderr)
            sys.exit(EXIT_USER_ERROR)

    return wrapper
