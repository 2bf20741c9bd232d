"""Entrypoint helpers: user errors become one line on stderr (exit code 2), not a traceback."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

from lattice_lab.common.allocator import tune_malloc
from lattice_lab.common.errors import LatticeLabError

CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "conf")


def _in_multirun() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    except Exception:  # noqa: BLE001 - outside Hydra
        return False


def friendly_errors(fn):
    """Decorate a Hydra task function: a :class:`LatticeLabError` prints ``error: ...`` and exits 2.

    So does an ``OSError`` that names a file (an output folder that cannot be created, a read-only
    disk, no space left): ``error: <path>: <reason>``.
    In multirun (sweeps) the exception propagates so the sweeper records the trial as failed.
    Also tunes glibc malloc for tensor workloads (:mod:`lattice_lab.common.allocator`).
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        tune_malloc()
        try:
            return fn(*args, **kwargs)
        except LatticeLabError as exc:
            if _in_multirun():
                raise
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)
        except OSError as exc:
            if exc.filename is None or _in_multirun():
                raise
            print(f"error: {exc.filename}: {exc.strerror or exc}", file=sys.stderr)
            sys.exit(2)

    return wrapper
