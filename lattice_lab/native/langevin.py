"""The Langevin integrator's drift and kick on the CPU in one native pass each (``langevin_step.cpp``).

:class:`LangevinKernel` serves :class:`lattice_lab.dynamics.langevin.LangevinIntegrator` on CPU
states: ``drift`` (v += half F, Q += dt v) and ``kick`` (v = a v + b F + c xi) with the bath noise
xi drawn from a counter-based generator (Philox4x32-10 + Box-Muller), a fixed function of
(seed, step, site). Drawing it costs ~0.65 ns per site and core with AVX-512 (1.9 ns with AVX2), on
every thread, against 2.6-3.9 ns per site for torch's single-threaded CPU ``normal_``: on a model costing
13-30 ns per site that was the whole Langevin overhead. :func:`normal` returns the noise itself (tests,
documentation).
"""

from __future__ import annotations

import ctypes

import torch

from lattice_lab.native.build import load
from lattice_lab.native.policy import SUPPORTED_DTYPES, threads

_P, _I, _D, _U = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double, ctypes.c_uint64
_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}
SEED_MASK = (1 << 64) - 1


def _library() -> ctypes.CDLL:
    lib = load("langevin_step")
    for sfx in _SUFFIX.values():
        for name, args in ((f"ll_langevin_drift_{sfx}", [_P, _P, _P, _I, _D, _D, _I]),
                           (f"ll_langevin_kick_{sfx}", [_P, _P, _I, _D, _D, _D, _U, _U, _I]),
                           (f"ll_normal_{sfx}", [_P, _I, _U, _U])):
            fn = getattr(lib, name)
            if fn.argtypes is None:
                fn.argtypes, fn.restype = args, None
    fn = lib.ll_philox4x32_10
    if fn.argtypes is None:
        fn.argtypes, fn.restype = [_P, _P, _P], None
    return lib


def check(*tensors: torch.Tensor) -> None:
    """The kernel's requirements: CPU tensors of one shape and a supported dtype, contiguous."""
    first = tensors[0]
    for t in tensors:
        if t.device.type != "cpu" or t.dtype != first.dtype or not t.is_contiguous() or t.shape != first.shape:
            raise ValueError("native Langevin step: CPU tensors of one dtype and shape, contiguous")
    if first.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"native Langevin step: dtype {first.dtype} not supported (float32 or float64)")


class LangevinKernel:
    """Drift and kick of one Langevin step, in place, for CPU tensors of ``dtype``. The calls do not
    check their arguments (a few us a call): the caller checks a state once with :func:`check`."""

    def __init__(self, dtype: torch.dtype):
        if dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"native Langevin step: dtype {dtype} not supported (float32 or float64)")
        lib = _library()  # raises NativeUnavailable without a compiler
        self.dtype = dtype
        self._drift = getattr(lib, f"ll_langevin_drift_{_SUFFIX[dtype]}")
        self._kick = getattr(lib, f"ll_langevin_kick_{_SUFFIX[dtype]}")

    def drift(self, Q: torch.Tensor, V: torch.Tensor, F: torch.Tensor, half: float, dt: float) -> None:
        """v <- v + half F;  Q <- Q + dt v."""
        self._drift(Q.data_ptr(), V.data_ptr(), F.data_ptr(), Q.numel(), half, dt, threads())

    def kick(self, V: torch.Tensor, F: torch.Tensor, a: float, b: float, c: float, seed: int, step: int) -> None:
        """v <- a v + b F + c xi(seed, step, site)."""
        self._kick(V.data_ptr(), F.data_ptr(), V.numel(), a, b, c, seed & SEED_MASK, step & SEED_MASK, threads())


def normal(shape, seed: int, step: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The bath noise xi of step ``step`` for a state of ``shape`` (row-major site order)."""
    out = torch.empty(shape, dtype=dtype)
    getattr(_library(), f"ll_normal_{_SUFFIX[dtype]}")(out.data_ptr(), out.numel(), int(seed) & SEED_MASK,
                                                       int(step) & SEED_MASK)
    return out


def philox4x32_10(counter: tuple[int, int, int, int], key: tuple[int, int]) -> tuple[int, ...]:
    """One Philox4x32-10 block (four 32-bit words), for known-answer tests."""
    c = (ctypes.c_uint32 * 4)(*counter)
    k = (ctypes.c_uint32 * 2)(*key)
    out = (ctypes.c_uint32 * 4)()
    _library().ll_philox4x32_10(c, k, out)
    return tuple(out)
