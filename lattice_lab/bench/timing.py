"""Wall-clock timing and peak-memory measurement of one callable, honest on CPU and CUDA.

Timing: ``warmup`` untimed calls, then ``repeats`` timed calls, each bracketed by
:func:`lattice_lab.common.device.synchronize` so queued CUDA kernels are included; the median is
the reported time (robust to the noise of a shared machine), min and max are kept.

Peak memory (bytes needed by one call above what was resident before it):

- CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus the memory
  allocated before the call (the caching allocator's own view, exact for tensors);
- CPU on Linux: the kernel's resident-set high-water mark. Freed heap memory is first returned to
  the OS (glibc ``malloc_trim``), the high-water mark is reset to the current RSS by writing ``5``
  to ``/proc/self/clear_refs``, and after the call ``VmHWM - VmRSS(before)`` is the peak growth of
  the process's resident memory: every tensor and temporary the call touched, including the
  allocator's slack, at page granularity. torch has no CPU allocator statistics, and an RSS delta
  without the reset would miss peaks that fall below an earlier high-water mark.
- elsewhere: not measured (``None``, method ``"unavailable"``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from lattice_lab.common.device import synchronize


@dataclass
class Timing:
    """Median, min and max wall time of ``repeats`` calls (seconds) after ``warmup`` calls."""

    median: float
    min: float
    max: float
    repeats: int
    warmup: int
    times: list[float] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def time_call(fn: Callable[[], object], device: torch.device, *, warmup: int = 1, repeats: int = 3) -> Timing:
    """Time ``fn()`` (no arguments): ``warmup`` untimed calls, then the median of ``repeats``."""
    repeats = max(1, int(repeats))
    warmup = max(0, int(warmup))
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return Timing(median=statistics.median(times), min=min(times), max=max(times), repeats=repeats,
                  warmup=warmup, times=times)


MAX_REPEATS = 1000  # cap of the repeats that min_seconds adds to cheap calls


def plan_repeats(estimate_s: float | None, max_seconds: float, repeats: int, warmup: int,
                 min_seconds: float = 0.0) -> tuple[int, int]:
    """Repeats and warm-up calls that fit ``max_seconds`` given an estimated time per call.

    At least one warm-up call (the first call at a new size allocates) and one timed call; warm-up
    gets at most a quarter of the calls that fit. Cheap calls are repeated until about
    ``min_seconds`` are timed (at most ``MAX_REPEATS``), after a quarter of that as warm-up, so that
    the median of a ~1 ms call is not decided by five samples of a noisy machine, nor by the first
    calls after a thread pool started (new threads take a while to spread over the cores).
    """
    repeats, warmup = max(1, int(repeats)), max(1, int(warmup))
    if not estimate_s or estimate_s <= 0:
        return repeats, warmup
    repeats = max(repeats, min(MAX_REPEATS, math.ceil(min_seconds / estimate_s)))
    warmup = max(warmup, min(MAX_REPEATS // 4, math.ceil(0.25 * min_seconds / estimate_s)))
    fit = int(max_seconds // estimate_s)
    warmup = min(warmup, max(1, fit // 4))
    return max(1, min(repeats, fit - warmup)), warmup


# ------------------------------------------------------------------------------------ memory
_LIBC = None


def _libc():
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        except OSError:
            _LIBC = False
    return _LIBC


def _proc_status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def memory_method(device: torch.device) -> str:
    """Which peak-memory method :func:`peak_memory` uses on ``device``."""
    if device.type == "cuda":
        return "cuda.max_memory_allocated"
    if _proc_status_kb("VmHWM") is not None and _reset_hwm():
        return "linux VmHWM reset (clear_refs=5) after malloc_trim"
    return "unavailable"


def peak_memory(fn: Callable[[], object], device: torch.device) -> int | None:
    """Peak memory in bytes that one call of ``fn()`` needs above what was in use before it."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        out = fn()
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        del out
        return int(max(peak, 0))
    libc = _libc()
    if libc:
        libc.malloc_trim(0)
    before = _proc_status_kb("VmRSS")
    if before is None or not _reset_hwm():
        return None
    out = fn()
    hwm = _proc_status_kb("VmHWM")
    del out
    if hwm is None:
        return None
    return int(max(hwm - before, 0) * 1024)
