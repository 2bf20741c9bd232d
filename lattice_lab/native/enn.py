"""The whole ENN force field in one native call (``enn_forward.cpp``): plan and call.

:class:`ENNForces` holds, for one :class:`~lattice_lab.models.enn.ENN` with the ``tanh``
activation and one dtype, everything the C++ function needs: the environment projection as a
sparse table (taken from the model's own packed, normalised convolution weights: every irrep
channel lives on one orbit of the environment: 213 non-zeros for the sqrt(13) cutoff instead of
45 x 66), the tables and weights of every layer's :class:`~lattice_lab.native.quadratic.QuadraticKernel`
(fused tanh) and the readout, and the output scale. Tables are rebuilt only when a parameter or a
normalisation buffer changes. A call is one ctypes call: tiles of sites over torch's OpenMP team,
so there is no per-call Python work beyond the argument list (~10 us), and the time per site does
not depend on L (docs/enn_speed.md).
"""

from __future__ import annotations

import ctypes

import torch

from lattice_lab.native.build import load
from lattice_lab.native.policy import LiveTensors, threads
from lattice_lab.native.quadratic import QuadraticKernel
from lattice_lab.symmetry.group import IRREPS

TILE_SITES = 256  # sites per tile: its features (~0.1-0.3 MB for the enn preset) stay in L2
_SYMBOLS = {torch.float32: "ll_enn_forces_f32", torch.float64: "ll_enn_forces_f64"}
_P, _I = ctypes.c_void_p, ctypes.c_int64


def _function(dtype: torch.dtype):
    fn = getattr(load("enn_forward"), _SYMBOLS[dtype])
    if fn.argtypes is None:
        fn.argtypes = [_P, _I, _I, _P, _I, _P, _I, _P, _P, _P, _P, _I, _P, _P, _I, ctypes.c_int]
        fn.restype = ctypes.c_int
    return fn


def tile_size(sites: int, workers: int, max_tile: int = TILE_SITES) -> int:
    """Sites per tile: at most ``max_tile``, a multiple of 16 (one AVX-512 register of floats), and
    the number of tiles a multiple of ``workers`` where the sites allow, so every thread gets the same work."""
    workers = max(1, workers)
    n_tiles = workers * -(-sites // (workers * max_tile))
    per_tile = -(-sites // n_tiles)  # ceil
    return max(16, -(-per_tile // 16) * 16)


def sparse_projection(w: torch.Tensor, b: torch.Tensor, radius: int):
    """Conv weights ``[rows, 1, K, K]`` (cross-correlation over the input padded by ``radius``) as a
    sparse table: offsets ``[M, 2]`` (dx, dy) that occur, row pointers ``[rows + 1]``, per non-zero
    its offset index and coefficient, and the bias ``[rows]``."""
    rows = w.shape[0]
    flat = w.reshape(rows, -1)
    r_idx, k_idx = flat.nonzero(as_tuple=True)  # row-major: grouped by row
    K = w.shape[-1]
    used, poff = torch.unique(k_idx, return_inverse=True)
    offsets = torch.stack([used // K - radius, used % K - radius], 1).to(torch.int64).contiguous()
    prow = torch.zeros(rows + 1, dtype=torch.int64)
    prow[1:] = torch.cumsum(torch.bincount(r_idx, minlength=rows), 0)
    return offsets, prow, poff.to(torch.int64).contiguous(), flat[r_idx, k_idx].contiguous(), b.contiguous()


class ENNForces:
    """``F = ENN(Q) - k Q - kappa nn_sum(Q)`` for CPU inference, in one native call (tanh activation)."""

    def __init__(self, model, dtype: torch.dtype):
        if model.activation != "tanh":
            raise ValueError(f"native ENN forces: activation {model.activation!r} (only tanh is fused)")
        self.fn = _function(dtype)
        self.model, self.dtype = model, dtype
        self.kernels = [QuadraticKernel(layer, dtype, tanh=True) for layer in model.layers]
        self.kernels.append(QuadraticKernel(model.readout, dtype))
        self._tables_key = None
        self._proj_src = None
        # one cheap check per call (~8 us for the 79 parameters of enn_small) instead of one per kernel;
        # looked up in the modules every call (model.to() replaces the buffers)
        self._watched = LiveTensors.of(model, [*(f"in_scale_{ir}" for ir in IRREPS), "in_shift_A1",
                                               "out_scale", "out_shift"])
        self._scalars_key = None

    def prepare(self) -> None:
        """Rebuild the kernels' weight tables if a watched parameter or buffer changed since the last call."""
        if not self._watched.changed():
            return
        for kernel in self.kernels:
            kernel.prepare()
        key = tuple(id(k.W) for k in self.kernels)  # a kernel rebuilds W (a new tensor) on parameter change
        if key != self._tables_key:
            ptrs = []
            for k in self.kernels:
                ptrs += [t.data_ptr() for t in (k.dims, k.groups, k.terms, k.copies, k.W, k.Wc, k.bias, k.coefs)]
            self._tables = (ctypes.c_void_p * len(ptrs))(*ptrs)
            self._tables_key = key
        w, b = self.model.packed_projection(self.dtype, torch.device("cpu"))  # cached: same objects until a buffer changes
        if self._proj_src is None or self._proj_src[0] is not w or self._proj_src[1] is not b:
            self._proj = sparse_projection(w, b, self.model.radius)
            self._proj_src = (w, b)

    def __call__(self, Q: torch.Tensor, k: float = 0.0, kappa: float = 0.0, out: torch.Tensor | None = None,
                 check: bool = True) -> torch.Tensor:
        """Forces ``[B, L, L]`` of ``Q [B, L, L]`` (CPU, this object's dtype), elastic part included;
        written into ``out`` (contiguous, like ``Q``) when given. ``check=False``: skip the check that the
        weights have not changed (~8 us; a frozen force provider's calls, after one check)."""
        if check:
            self.prepare()
        Q = Q.contiguous()
        B, L = Q.shape[0], Q.shape[-1]
        F = torch.empty_like(Q) if out is None else out
        offsets, prow, poff, pcoef, pbias = self._proj
        key = (self._watched.key, float(k), float(kappa))
        if key != self._scalars_key:
            m = self.model
            self._scalars = torch.tensor([float(m.out_scale), float(m.out_shift), float(k), float(kappa),
                                          self.kernels[0].eps], dtype=torch.float64)
            self._scalars_key = key
        scalars = self._scalars
        nt = threads()
        rc = self.fn(Q.data_ptr(), B, L, F.data_ptr(), offsets.shape[0], offsets.data_ptr(), prow.shape[0] - 1,
                     prow.data_ptr(), poff.data_ptr(), pcoef.data_ptr(), pbias.data_ptr(), len(self.kernels),
                     self._tables, scalars.data_ptr(), tile_size(B * L * L, nt), nt)
        if rc != 0:
            raise RuntimeError(f"native ENN forces failed (code {rc})")
        return F
