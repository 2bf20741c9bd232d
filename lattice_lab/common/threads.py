"""Parallel CPU work over independent pieces: one Python thread per core, one torch thread each.

Models made of many medium-sized operations (the ENN: ~10 GEMMs and gathers per cache-sized
sub-chunk) scale badly with torch's intra-op (OpenMP) threads: every operation is split across the
threads and joined again, and an operation of ~50 us gains little from that. Splitting the lattice
into independent pieces (bands of rows with a halo) and running one piece per thread, each with a
single intra-op thread, parallelises at the coarsest grain instead. Torch kernels release the GIL,
so the threads run concurrently; only the Python glue between operations is serialised.

Torch's thread settings are per thread (OpenMP's thread count, MKL's local thread count) once a
thread is initialised, so the pool's threads are set to one intra-op thread each *once*, when the
pool is created, and the calling thread's own setting is restored right after: no per-call
switching (which would also flush oneDNN's primitive cache every call). :func:`run_pieces` also
propagates the caller's grad / inference mode (thread-local in torch) to the workers.

GNU OpenMP counts every thread that has run an OpenMP region; while more such threads exist than
cores it shortens its spin-waits, which slows the *calling* thread's own multi-threaded operations.
:func:`shutdown_pool` ends the workers (the benchmark calls it between models).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

_lock = threading.Lock()
_pool: dict = {"executor": None, "workers": 0}


def _forget_pool_in_child() -> None:
    """A forked child has none of the parent's threads: start a fresh pool there when needed."""
    global _lock
    _lock = threading.Lock()
    _pool["executor"], _pool["workers"] = None, 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_in_child)


def _init_worker(barrier: threading.Barrier) -> None:
    torch.get_num_threads()  # torch's lazy per-thread initialisation first (it reads the global count)
    torch.set_num_threads(1)  # then this thread's OpenMP / MKL thread counts
    barrier.wait()  # one initialisation per thread: nobody takes two


def _executor(workers: int) -> ThreadPoolExecutor:
    if _pool["executor"] is not None and _pool["workers"] == workers:
        return _pool["executor"]
    shutdown_pool()
    previous = torch.get_num_threads()
    executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lattice_lab_piece")
    barrier = threading.Barrier(workers)
    try:
        for f in [executor.submit(_init_worker, barrier) for _ in range(workers)]:
            f.result()
    finally:
        torch.set_num_threads(previous)  # the global count and this thread's own settings
    _pool["executor"], _pool["workers"] = executor, workers
    return executor


def shutdown_pool() -> None:
    """End the worker threads (a later :func:`run_pieces` starts new ones)."""
    with _lock:
        if _pool["executor"] is not None:
            _pool["executor"].shutdown(wait=True)
        _pool["executor"], _pool["workers"] = None, 0


def run_pieces(pieces: list[Callable[[], None]], workers: int) -> None:
    """Run the callables ``pieces`` (independent, results written by the callables themselves) on a
    pool of ``workers`` threads with one torch intra-op thread each (also a single piece); in the
    calling thread when ``workers <= 1``. The first exception raised by a piece is re-raised here,
    after every piece has finished."""
    if workers <= 1:
        for piece in pieces:
            piece()
        return
    grad = torch.is_grad_enabled()
    inference = torch.is_inference_mode_enabled()

    def call(piece):
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            piece()

    executor = _executor(workers)
    futures = [executor.submit(call, p) for p in pieces]
    errors = [f.exception() for f in futures]
    for exc in errors:
        if exc is not None:
            raise exc
