"""The whole direct-force GNN in one native call (``gnn_forward.cpp``): plan and call.

:class:`GNNForces` holds, for one :class:`~lattice_lab.models.gnn.GNN`, the layer widths and the
activation code, a table of pointers to the model's own parameters and normalisation buffers
(``[q_mean, q_std, f_mean, f_std]``, then per layer ``w_self [c_in, c_out]``, ``w_nn`` and ``bias``:
the kernel reads the weights where torch keeps them, so in-place updates -- optimizer steps,
``load_state_dict`` -- are followed without any per-call check; the table is rebuilt only when a
tensor moves, e.g. ``model.to()``; layers wider than :data:`PACK_ABOVE` outputs read a copy packed
per chunk of outputs instead, rebuilt when their weights' version counters change), and a
workspace per lattice size. A call is one ctypes call that computes
``F = GNN(Q) - k Q - kappa nn_sum(Q)``: every row of every layer exactly once, a wavefront of rows
per thread with a few rows per layer in cache (see the C++ file). The per-call Python work -- the
policy check in the model, the pointer check (one ``data_ptr`` per tensor, ~1 us), the output
allocation and the argument list -- is ~5 us (measured; about 1/6 of a gnn_small call at L = 32); a
force provider calls the closure of :meth:`bind` instead, without the policy check and the dispatch.
"""

from __future__ import annotations

import ctypes
import operator
import threading

import torch

from lattice_lab.native.build import load
from lattice_lab.native.policy import _COUNT, SUPPORTED_DTYPES, LiveTensors, threads

ACTIVATION_CODES = {"relu": 1, "tanh": 2, "silu": 3, "softplus": 4}  # the kernel's; gelu: torch path
PACK_ABOVE = 32  # layers with more outputs read a packed copy of their weights (contiguous per output chunk)
_SYMBOLS = {torch.float32: ("ll_gnn_forces_f32", "ll_gnn_workspace_f32"),
            torch.float64: ("ll_gnn_forces_f64", "ll_gnn_workspace_f64")}
_P, _I, _D = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double
_DATA_PTR = torch.Tensor.data_ptr
_VERSION = operator.attrgetter("_version")


def _failed(rc: int):
    """A kernel call's nonzero return code (a workspace that does not fit the call) as an error."""
    raise RuntimeError(f"native GNN forces failed (code {rc})")


def packed_chunk(c_out: int, widest: int = 16) -> int:
    """Output channels per register chunk of a packed layer (its weights' layout): the widest power of 2
    up to ``widest`` (the kernel's own, :func:`widest_chunk`) that divides ``c_out``. With AVX-512, chunks
    of 8 or 4, which read each weight for 2 or 4 vectors of sites, measured no faster than 16 on the paper
    preset; with AVX2, 8 made it 12-34% faster (docs/bench.md)."""
    return next(kc for kc in (16, 8, 4, 2, 1) if kc <= widest and c_out % kc == 0)


def widest_chunk() -> int:
    """The kernel's widest register chunk of output channels on this CPU: 16 with AVX-512's 32 vector
    registers, 8 with 16 (AVX2), where 16 accumulators spill (measured in docs/bench.md)."""
    fn = load("gnn_forward").ll_gnn_max_chunk
    fn.argtypes, fn.restype = [], ctypes.c_int64
    return int(fn())


class _Args(ctypes.Structure):
    """The kernel's arguments that do not change from call to call (``struct Args`` in the C++ file)."""

    _fields_ = [("L", _I), ("nt", _I), ("n_work", _I), ("work", _P), ("dims", _P), ("ptrs", _P), ("scale", _D)]  # noqa: RUF012


def _functions(dtype: torch.dtype):
    lib = load("gnn_forward")
    fn, ws = (getattr(lib, name) for name in _SYMBOLS[dtype])
    if fn.argtypes is None:
        fn.argtypes = [_P, _P, _I, _P, _D, _D]  # Q, F, B, &args, k, kappa
        fn.restype = ctypes.c_int
        ws.argtypes = [_P, _I, _I]
        ws.restype = ctypes.c_int64
    return fn, ws


class GNNForces:
    """``F = GNN(Q) - k Q - kappa nn_sum(Q)`` for CPU inference in one native call, ``Q`` in the dtype
    of the model's parameters (float32 or float64)."""

    def __init__(self, model, dtype: torch.dtype):
        if dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"native GNN: dtype {dtype} not supported (float32 or float64)")
        if model.activation not in ACTIVATION_CODES:
            raise ValueError(f"native GNN: activation {model.activation!r} not supported "
                             f"(one of {sorted(ACTIVATION_CODES)})")
        self.fn, self._ws_fn = _functions(dtype)
        self.model, self.dtype = model, dtype
        widths = list(model.widths)
        self.packed = [layer.c_out > PACK_ABOVE for layer in model.layers]
        self.widest = widest_chunk()
        strides = []
        for layer, packed in zip(model.layers, self.packed):
            kc = packed_chunk(layer.c_out, self.widest)
            strides += [2 * layer.c_in, 2 * kc, kc] if packed else [1, layer.c_out, 0]
        self.dims = torch.tensor([len(widths) - 1, ACTIVATION_CODES[model.activation], *widths, *strides],
                                 dtype=torch.int64)
        self._dims_ptr = self.dims.data_ptr()
        self.scale = float(model.layers[0].neighbour_scale)
        # looked up in the modules every call: model.to() replaces the buffers, load_state_dict(assign=True) all
        slots = [(model, name) for name in ("q_mean", "q_std", "f_mean", "f_std")]
        copied = []  # parameters read through a packed copy: their in-place updates are watched
        for layer, packed in zip(model.layers, self.packed):
            slots += [(layer, name) for name in ("w_self", "w_nn", "bias")]
            if packed:
                copied += [(layer, "w_self"), (layer, "w_nn")]
        self._tensors = LiveTensors(slots, owner=model)
        self._copied = LiveTensors(copied, owner=model) if copied else None
        self._kept: list[torch.Tensor] = []
        self._ptr_key = None
        self._work: dict[tuple[int, int], tuple[torch.Tensor, _Args, int]] = {}  # (L, threads) -> (scratch, args, &args)
        self._busy = threading.Lock()  # the cached workspace serves one call at a time

    def ready(self) -> bool:
        """Whether the kernel can read the model's tensors directly (same dtype, contiguous, CPU);
        refreshes the pointer table when a tensor has moved (``model.to()``, ``p.data = ...``) or after
        :meth:`~lattice_lab.models.base.ForceField.weights_changed` (packed copies)."""
        tensors = self._tensors()
        key = (self.model.__dict__.get(_COUNT, 0), *map(_DATA_PTR, tensors))  # policy.write_count, inlined
        if self._copied is not None:
            key += tuple(map(_VERSION, self._copied()))
        if key == self._ptr_key:
            return True
        ok = all(t.dtype == self.dtype and t.device.type == "cpu" and t.is_contiguous() for t in tensors)
        if ok:
            self._table = (ctypes.c_void_p * len(tensors))(*self._pointers(tensors))
            self._ptr_key = key
            self._kept = [t.detach() for t in tensors]  # their memory cannot be reused by a successor
            for _buf, args, _addr in self._work.values():
                args.ptrs = ctypes.addressof(self._table)
        return ok

    def _pointers(self, tensors: list[torch.Tensor]) -> list[int]:
        """The kernel's pointer table; packs the weights of the wide layers (kept in ``self._packs``)."""
        ptrs = [t.data_ptr() for t in tensors[:4]]
        self._packs = []
        with torch.no_grad():
            for layer, packed in zip(self.model.layers, self.packed):
                if packed:  # [c_in, 2, c_out] -> [c_out / kc, c_in, 2, kc]
                    kc = packed_chunk(layer.c_out, self.widest)
                    w = torch.stack([layer.w_self, layer.w_nn], 1).view(layer.c_in, 2, layer.c_out // kc, kc)
                    w = w.permute(2, 0, 1, 3).contiguous()
                    self._packs.append(w)
                    ptrs += [w.data_ptr(), w.data_ptr() + kc * w.element_size(), layer.bias.data_ptr()]
                else:
                    ptrs += [layer.w_self.data_ptr(), layer.w_nn.data_ptr(), layer.bias.data_ptr()]
        return ptrs

    def workspace(self, L: int, nt: int, cached: bool = True, owner: int | None = None
                  ) -> tuple[torch.Tensor, _Args, int]:
        """Scratch memory and the argument block for lattice size ``L`` on ``nt`` threads (kept for the
        next call unless ``cached=False``): ``(scratch tensor, args, address of args)``. ``owner``: the
        scratch of one :meth:`bind` closure's thread (key ``(L, nt, owner)``), apart from the one that
        :meth:`__call__` takes under its lock (key ``(L, nt)``)."""
        key = (L, nt) if owner is None else (L, nt, owner)
        got = self._work.get(key) if cached else None
        if got is None:
            n = int(self._ws_fn(self._dims_ptr, L, nt))
            if n < 0:
                raise ValueError(f"native GNN: lattice L={L} too small for {int(self.dims[0])} layers")
            buf = torch.zeros(max(n, 1), dtype=self.dtype)  # zeros: the kernel never reads uninitialised memory
            args = _Args(L, nt, n, buf.data_ptr(), self._dims_ptr, ctypes.addressof(self._table), self.scale)
            got = (buf, args, ctypes.addressof(args))
            if cached:
                if len(self._work) >= 8:
                    self._work.clear()
                self._work[key] = got
        return got

    def bind(self, k: float = 0.0, kappa: float = 0.0, frozen: bool = False):
        """``f(Q, out=None) -> F`` (None once :meth:`ready` fails): :meth:`ready` and this call in one
        closure, the per-step path of a force provider; ``out`` (a contiguous tensor like ``Q``) receives
        the forces instead of a new tensor. Its common case -- the workspace of this size cached, ``Q``
        contiguous, the thread that bound it -- skips the method dispatch and lookups (~1.4 us of a
        ~50 us ``gnn_small`` call at L = 32 on an AVX2 VM); every other case is :meth:`__call__`.

        ``frozen``: the caller promises that the model's weights no longer change (a force provider of
        ``simulate``, whose model was loaded for the run): :meth:`ready` runs here once instead of at
        every call (~2.5 us of a 39-us ``gnn_small`` call at L = 32). Whatever happens to the model
        afterwards, the kernel reads memory kept alive for it (``_kept``, the packed copies), never
        freed memory; but a change made anyway is not reliably seen."""
        fn, ready, work, call = self.fn, self.ready, self._work, self.__call__
        empty_like, data_ptr, n_threads, ident = torch.empty_like, _DATA_PTR, torch.get_num_threads, threading.get_ident
        owner = ident()  # this thread's calls use a workspace of their own, other threads' go to __call__
        if frozen and not ready():
            return None

        def forces(Q: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor | None:
            if not (frozen or ready()):
                return None
            if ident() != owner or not Q.is_contiguous():
                return call(Q, k, kappa, out)
            shape, nt = Q.shape, max(1, n_threads())
            got = work.get((shape[-1], nt, owner)) or self.workspace(shape[-1], nt, owner=owner)
            F = empty_like(Q) if out is None else out
            rc = fn(data_ptr(Q), data_ptr(F), shape[0], got[2], k, kappa)
            if rc != 0:
                _failed(rc)
            return F

        return forces

    def __call__(self, Q: torch.Tensor, k: float = 0.0, kappa: float = 0.0,
                 out: torch.Tensor | None = None) -> torch.Tensor:
        """Forces ``[B, L, L]`` of ``Q [B, L, L]`` (CPU, this object's dtype; the caller has checked
        :meth:`ready`), elastic part included; written into ``out`` (contiguous, like ``Q``) when given."""
        if not Q.is_contiguous():
            Q = Q.contiguous()
        key = (Q.shape[-1], threads())
        F = torch.empty_like(Q) if out is None else out
        if self._busy.acquire(blocking=False):
            try:
                got = self._work.get(key) or self.workspace(*key)
                rc = self.fn(Q.data_ptr(), F.data_ptr(), Q.shape[0], got[2], k, kappa)
            finally:
                self._busy.release()
        else:  # another thread is in a call of this model: private scratch memory
            got = self.workspace(*key, cached=False)
            rc = self.fn(Q.data_ptr(), F.data_ptr(), Q.shape[0], got[2], k, kappa)
        if rc != 0:
            _failed(rc)
        return F
