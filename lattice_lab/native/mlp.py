"""The whole descriptor + MLP force field in one native call (``mlp_forward.cpp``): plan and call.

:class:`MLPForces` holds, for one :class:`~lattice_lab.models.mlp.DescriptorMLP` and one dtype,
everything the C++ function needs in one int64 *plan* (sizes and the addresses of its tables):

- the environment projection as a sparse table: per irrep channel its non-zeros of the
  :class:`~lattice_lab.models.layers_equivariant.EnvironmentProjection` kernel (offset (dy, dx) and
  coefficient, rounded from the float64 master copy like ``kernel(dtype)``; 213 for sqrt(13));
- the descriptor layout (channel starts / counts and reference channels of
  :class:`~lattice_lab.models.descriptor.D4Descriptor`);
- the MLP weights arranged for broadcast, ``[out / KO][in][KO]`` per hidden layer (widths zero-padded
  to a multiple of KO), the feature standardisation folded into the first layer
  (``W / feat_std``, ``b - W feat_mean / feat_std``, computed in float64), and the output scalars.

Weights are rebuilt only when a parameter or a normalisation buffer changes (data pointer or
version counter). A call is one ctypes call: tiles of sites over torch's OpenMP team
(:func:`lattice_lab.native.policy.threads`), so the time per site does not depend on L.
"""

from __future__ import annotations

import ctypes
import operator
import threading

import numpy as np
import torch
from torch import nn

from lattice_lab.native.build import load
from lattice_lab.native.policy import SUPPORTED_DTYPES, change_key, threads

_SYMBOLS = {torch.float32: "ll_mlp_forces_f32", torch.float64: "ll_mlp_forces_f64"}
_P, _I = ctypes.c_void_p, ctypes.c_int64
# prepare() runs every call: C-level getters (module attribute access costs ~0.5 us per tensor)
_BUFFERS = operator.itemgetter("feat_mean", "feat_std", "out_scale", "out_shift")
_WEIGHT_BIAS = operator.itemgetter("weight", "bias")
# plan slots (enum in mlp_forward.cpp)
(P_M, P_RADIUS, P_NENT, P_DYDX, P_CHPTR, P_COEF, P_NA1, P_SA1, P_1D) = range(9)
(P_SE, P_NE, P_RE1, P_RE2, P_NFEAT, P_NLAYERS, P_LAYERS, P_W, P_SCAL, P_ROWS_A, P_ROWS_B, P_KO, P_TV,
 P_TS, P_SIZE) = range(P_1D + 9, P_1D + 9 + 15)
STREAMED_WEIGHT_BYTES = 16 << 20  # weights larger than this (~L3) are streamed from memory: bigger tiles


def _library():
    lib = load("mlp_forward")
    for name in _SYMBOLS.values():
        fn = getattr(lib, name)
        if fn.argtypes is None:
            fn.argtypes = [_P, _P, _I, _I, _P, ctypes.c_double, ctypes.c_double, _I]
            fn.restype = ctypes.c_int
    return lib


class MLPForces:
    """``F = DescriptorMLP(Q) - k Q - kappa nn_sum(Q)`` for CPU inference in one native call."""

    def __init__(self, model, dtype: torch.dtype, tile_slots: int | None = None):
        if dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"native MLP: dtype {dtype} not supported (float32 or float64)")
        lib = _library()
        self.fn = getattr(lib, _SYMBOLS[dtype])
        self.ko, self.tv = int(lib.ll_mlp_block()), int(lib.ll_mlp_group())
        self.vector_bytes = int(lib.ll_mlp_vector_bytes())  # 64 with AVX-512
        self.model, self.dtype = model, dtype
        desc = model.descriptor
        proj = desc.proj
        radius = int(proj.basis.radius)
        kern = proj.kernel_np[:, 0]  # [M, K, K] float64, cross-correlation over Q padded by radius
        M = kern.shape[0]
        ch, a, b = np.nonzero(kern)  # row-major: grouped by channel
        self.dydx = torch.as_tensor(np.stack([a - radius, b - radius], 1).astype(np.int64)).contiguous()
        chptr = np.zeros(M + 1, dtype=np.int64)
        chptr[1:] = np.cumsum(np.bincount(ch, minlength=M))
        self.chptr = torch.as_tensor(chptr)
        self.coef = torch.as_tensor(kern[ch, a, b]).to(dtype).contiguous()  # rounded like kernel(dtype)
        self.linears = [m for m in model.net if isinstance(m, nn.Linear)]
        if self.linears[-1].out_features != 1:  # pragma: no cover - DescriptorMLP always ends in width 1
            raise ValueError("native MLP: the last layer must have one output")
        start, count = desc.channel_start, desc.channel_count
        one_d = []
        for ir in ("A2", "B1", "B2"):
            one_d += [start[ir], count[ir], desc.ref[ir][0]] if count[ir] else [0, 0, 0]
        n_e = count.get("E", 0)
        ref_e = desc.ref["E"] if n_e else [0, 0]
        self.nfeat = desc.n_features
        # widths: hidden padded to a multiple of KO (zero weights and bias: ReLU(0) = 0), output 1
        pad = [-(-lin.out_features // self.ko) * self.ko for lin in self.linears[:-1]] + [1]
        self.widths_in = [self.nfeat, *pad[:-1]]
        self.widths_out = pad
        rows_a = max([self.nfeat] + pad[1:-1:2])  # features, then the outputs of hidden layers 1, 3, ...
        rows_b = max([M] + pad[0:-1:2])  # projection, then the outputs of hidden layers 0, 2, ...
        self.layers = torch.zeros(len(pad), 4, dtype=torch.int64)
        self.scal = torch.zeros(4, dtype=torch.float64)
        self.scal[0], self.scal[1] = float(desc.norm_eps), float(desc.phase_eps)
        plan = torch.zeros(P_SIZE, dtype=torch.int64)
        plan[P_M], plan[P_RADIUS], plan[P_NENT] = M, radius, len(ch)
        plan[P_DYDX], plan[P_CHPTR], plan[P_COEF] = self.dydx.data_ptr(), self.chptr.data_ptr(), self.coef.data_ptr()
        plan[P_NA1], plan[P_SA1] = count["A1"], start["A1"]
        plan[P_1D:P_1D + 9] = torch.tensor(one_d, dtype=torch.int64)
        plan[P_SE], plan[P_NE], plan[P_RE1], plan[P_RE2] = start.get("E", 0), n_e, ref_e[0], ref_e[1]
        plan[P_NFEAT], plan[P_NLAYERS], plan[P_LAYERS] = self.nfeat, len(pad), self.layers.data_ptr()
        plan[P_SCAL], plan[P_ROWS_A], plan[P_ROWS_B] = self.scal.data_ptr(), rows_a, rows_b
        n_weights = sum(i * o for i, o in zip(self.widths_in, self.widths_out))
        self.ts = tile_slots or self.default_tile_slots(n_weights * (4 if dtype == torch.float32 else 8))
        plan[P_KO], plan[P_TV], plan[P_TS] = self.ko, self.tv, self.ts
        self.plan = plan
        self._plan_ptr = plan.data_ptr()
        self._param_dicts = [lin._parameters for lin in self.linears]  # watched by prepare()
        self.W = None
        self._key = None
        self._lock = threading.Lock()

    def default_tile_slots(self, weight_bytes: int) -> int:
        """Slots (vectors of sites) per tile. TV (32 sites in float32 with AVX-512): the tile's
        features stay in L1 (17 kB for mlp_small) and the weights come from L1 / L2 / L3; measured
        fastest up to hidden [2048, 1024] (8.8 MB of weights). Weights beyond the last-level cache
        (the paper preset: 42 MB) are streamed from memory once per tile, so there 4 TV slots
        (measured: 1.8x faster than TV at L = 32, one thread)."""
        return self.tv * (4 if weight_bytes > STREAMED_WEIGHT_BYTES else 1)

    def prepare(self) -> None:
        """Rebuild the weights if a parameter or buffer changed since the last call (version counter:
        in-place updates; data pointer: ``.data`` / ``.to()`` replacements). The tensors are looked up
        in the modules' own dicts every call, as ``.to()`` / ``.cuda()`` may replace them (~1.5 us)."""
        ts = [*_BUFFERS(self.model._buffers)]
        for params in self._param_dicts:
            ts += _WEIGHT_BIAS(params)
        key = change_key(ts, self.model)
        if key != self._key:
            with self._lock:
                if key != self._key:
                    self._build_weights(key)

    def _build_weights(self, key: list) -> None:
        m, ko = self.model, self.ko
        flat, offsets = [], []
        size = 0
        with torch.no_grad():
            for n, lin in enumerate(self.linears):
                W = lin.weight.detach().to(torch.float64)
                b = lin.bias.detach().to(torch.float64)
                if n == 0:  # (d - mean) / std folded into the first layer
                    std = m.feat_std.detach().to(torch.float64)
                    mean = m.feat_mean.detach().to(torch.float64)
                    W = W / std
                    b = b - W @ mean
                nin, nout = self.widths_in[n], self.widths_out[n]
                Wp = torch.zeros(nout, nin, dtype=torch.float64)
                Wp[:W.shape[0], :W.shape[1]] = W
                bp = torch.zeros(nout, dtype=torch.float64)
                bp[:b.shape[0]] = b
                k = ko if n + 1 < len(self.linears) else 1
                blocked = Wp.view(nout // k, k, nin).permute(0, 2, 1).reshape(-1)  # [out / k][in][k]
                offsets.append((nin, nout, size, size + blocked.numel()))
                flat += [blocked, bp]
                size += blocked.numel() + bp.numel()
            W = torch.cat(flat).to(self.dtype).contiguous()
            self.layers.copy_(torch.tensor(offsets, dtype=torch.int64))
            self.scal[2] = float(m.out_scale)
            self.scal[3] = float(m.out_shift)
            self.W = W
            self.plan[P_W] = W.data_ptr()
        self._key = key

    def __call__(self, Q: torch.Tensor, k: float = 0.0, kappa: float = 0.0) -> torch.Tensor:
        """Forces ``[B, L, L]`` of a CPU tensor ``Q [B, L, L]`` in this kernel's dtype."""
        if Q.dtype != self.dtype or Q.device.type != "cpu" or Q.dim() != 3 or Q.shape[1] != Q.shape[2]:
            raise ValueError(f"native MLP: expected a CPU {self.dtype} tensor [B, L, L], got {Q.dtype} "
                             f"{tuple(Q.shape)} on {Q.device}")
        return self.run(Q.contiguous(), k, kappa)

    def run(self, Q: torch.Tensor, k: float = 0.0, kappa: float = 0.0, out: torch.Tensor | None = None,
            check: bool = True) -> torch.Tensor:
        """:meth:`__call__` without the input checks: ``Q`` is a contiguous CPU ``[B, L, L]`` tensor
        in this kernel's dtype (the model's ``native_forces`` guarantees it); the forces go into ``out``
        (contiguous, like ``Q``) when given. ``check=False``: skip :meth:`prepare` (a frozen force
        provider's calls, after one check)."""
        B, L, L2 = Q.shape  # a ValueError unless 3-D
        if L != L2:
            raise ValueError(f"native MLP: expected a square lattice [B, L, L], got {tuple(Q.shape)}")
        if check:
            self.prepare()
        F = torch.empty_like(Q) if out is None else out
        rc = self.fn(Q.data_ptr(), F.data_ptr(), B, L, self._plan_ptr, k, kappa, threads())
        if rc != 0:
            raise RuntimeError(f"native MLP kernel failed (code {rc})")
        return F
