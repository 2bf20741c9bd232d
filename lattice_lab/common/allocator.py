"""glibc ``malloc`` tuning for CPU inference: keep freed tensor memory in the process for reuse.

PyTorch's CPU allocator calls ``malloc``. glibc serves every block above ``M_MMAP_THRESHOLD``
(128 KiB at start, adapting upwards only after such a block is freed) with a fresh ``mmap`` and
returns it to the OS on ``free``, so a model that creates megabyte-sized intermediates in a loop
(the ENN's cache-sized sub-chunks, ~1-2 MB each) page-faults every one of them in again, on every
call: measured on the 2-core benchmark VM, ``enn_small`` took 4.5 us/site at L = 32 instead of
2.1 us/site (the cost per site fell with L only because larger calls ran long enough for glibc's
adaptive threshold to kick in). Raising the mmap and trim thresholds makes freed blocks stay in
the heap, where the next sub-chunk reuses them (the same effect people get by preloading jemalloc
or tcmalloc, without a dependency). Memory is still returned to the OS above ``TRIM_BYTES``.

:func:`tune_malloc` is called by every entrypoint (``common.cli.friendly_errors``) and by the
benchmark; set ``LATTICE_LAB_MALLOC=default`` to keep glibc's defaults. It is a no-op where the C
library is not glibc (macOS, Windows, musl).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD = -1  # glibc <malloc.h> parameter numbers
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3

MMAP_BYTES = 32 << 20  # glibc's upper limit for M_MMAP_THRESHOLD on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_BYTES = 512 << 20
TOP_PAD_BYTES = 16 << 20

_state: dict = {"tuned": None}


def tune_malloc() -> bool:
    """Raise glibc's mmap / trim thresholds once per process; True when applied (see module doc)."""
    if _state["tuned"] is not None:
        return _state["tuned"]
    ok = False
    if os.environ.get("LATTICE_LAB_MALLOC", "tuned").lower() != "default":
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            mallopt = libc.mallopt
        except (OSError, AttributeError):  # not glibc: nothing to tune
            mallopt = None
        if mallopt is not None:
            mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
            mallopt.restype = ctypes.c_int
            ok = all(mallopt(p, v) == 1 for p, v in ((M_MMAP_THRESHOLD, MMAP_BYTES),
                                                     (M_TRIM_THRESHOLD, TRIM_BYTES),
                                                     (M_TOP_PAD, TOP_PAD_BYTES)))
    _state["tuned"] = ok
    return ok
