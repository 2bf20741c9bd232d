"""Core-to-core latency of the CPU threads the native kernels run on, and the state it reveals.

:func:`round_trip_ns` times the round trip of one cache line between the two threads of the OpenMP
team that torch and the native kernels share (``lattice_lab/native/core_latency.cpp``). On the 2-vCPU
VM of our benchmarks it takes one of two values, and the host switches between them every few
seconds: ~85 ns when the two vCPUs run on cores that share a cache, ~360 ns when they run on distant
ones. A multi-threaded call pays a few round trips per fork, join and barrier, and one per cache line
it reads from the other thread, so the small calls of the small presets at L = 32 (20-110 us) are up
to ~40% slower in the distant state, while single-threaded calls and large lattices are not
(docs/bench.md, "Two states of the VM").

The benchmark probes the latency before and after every force timing, and :func:`near_cores` tells
which timings ran with both probes near the run's fastest round trip.
"""

from __future__ import annotations

import ctypes
import os

import torch

ITERS = 4000            # round trips per probe (~0.35 ms at 85 ns, ~1.5 ms at 360 ns)
MAX_SECONDS = 0.05      # a probe stops after this long (a team squeezed onto one CPU)
PROBE_KEY = "core_rt_ns"  # a benchmark row's probes (before, after) of its force timing; per round: + "_rounds"
FAR_FACTOR = 2.0       # a probe more than this times the run's fastest one: the threads on distant cores


def _function():
    from lattice_lab.native.build import load

    fn = load("core_latency").ll_core_round_trip_ns
    if fn.argtypes is None:
        fn.argtypes = [ctypes.c_int64, ctypes.c_double, ctypes.POINTER(ctypes.c_int64)]
        fn.restype = ctypes.c_double
    return fn


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def round_trip_ns(iters: int = ITERS, max_seconds: float = MAX_SECONDS) -> float | None:
    """Mean round trip (ns) of one cache line between threads 0 and 1 of the OpenMP team, or None
    where it is not meaningful or not measurable: fewer than 2 torch threads or CPUs, no compiler
    (:class:`~lattice_lab.native.build.NativeUnavailable`), a build without OpenMP."""
    from lattice_lab.native.build import NativeUnavailable

    if torch.get_num_threads() < 2 or available_cpus() < 2:
        return None
    try:
        fn = _function()
    except NativeUnavailable:
        return None
    done = ctypes.c_int64(0)
    ns = fn(int(iters), float(max_seconds) * 1e9, ctypes.byref(done))
    return float(ns) if ns > 0 and done.value > 0 else None


def probe_pairs(row: dict) -> list[tuple]:
    """The probes (before, after) of each round's force timing of a benchmark row, in round order
    (``[]`` where none were taken: CUDA, one thread, no compiler)."""
    pairs = row.get(f"{PROBE_KEY}_rounds") or ([row[PROBE_KEY]] if row.get(PROBE_KEY) else [])
    return [tuple(p) for p in pairs]


def near_cores(pair, fastest: float | None, factor: float = FAR_FACTOR) -> bool | None:
    """True when both probes of a timing are within ``factor`` of the run's ``fastest`` round trip,
    False when either is beyond it, None when there is nothing to compare."""
    if not fastest or any(p is None for p in pair):
        return None
    return all(p <= factor * fastest for p in pair)
