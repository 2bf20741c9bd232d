"""The fused CPU kernel of a quadratic irrep layer (``quadratic_layer.cpp``): plan and call.

:class:`QuadraticKernel` turns a :class:`~lattice_lab.models.layers_equivariant.QuadraticIrrepLayer`
into the kernel's tables: per output irrep a group of *terms*, one per product block, each with its
weights in the kernel's layout and its Clebsch-Gordan coefficients folded into row indices and signs.
Features are sites-last, ``X [rows_in * cp, n]`` -> ``Y [rows_out * kp, n]`` (the packed rows of
:func:`~lattice_lab.models.layers_equivariant.packed_rows`, zero-padded channels), any row stride.

Two evaluation orders, each the cheaper one for its blocks (FLOPs counted per site):
- kind 0, a one-dimensional left irrep: ``T[j, k] = sum_i x_a[i] W[i, j, k]`` once, shared by both
  components of an E output, then contracted with the right features (``2 c_a c_b k`` FLOPs, half
  of the auxiliary-layer count for 1-d x E -> E);
- kind 1, E x E -> 1-d: the product ``x_0[i] y_0[j] +- x_1[i] y_1[j]`` once per pair, then ``k``
  multiply-adds (the auxiliary-layer count; the bilinear form would do two T products).
Same-irrep blocks run over pairs i < j only. The weights are gathered from the parameters (detached)
and cached until a parameter changes, like :meth:`QuadraticIrrepLayer.packed_weights`.
"""

from __future__ import annotations

import ctypes
import threading

import numpy as np
import torch

from lattice_lab.models.layers_equivariant import NORM_EPS
from lattice_lab.native.build import load
from lattice_lab.native.policy import SUPPORTED_DTYPES, LiveTensors, change_key
from lattice_lab.symmetry.group import IRREP_DIM, IRREPS

_SYMBOLS = {torch.float32: "ll_quadratic_f32", torch.float64: "ll_quadratic_f64"}
_P, _I = ctypes.c_void_p, ctypes.c_int64


def _kernel_function(dtype: torch.dtype):
    lib = load("quadratic_layer")
    fn = getattr(lib, _SYMBOLS[dtype])
    if fn.argtypes is None:
        fn.argtypes = [_P, _I, _P, _I, _I, _P, _P, _P, _P, _P, _P, _P, _P, ctypes.c_double]
        fn.restype = ctypes.c_int
    return fn


def channel_chunk(kp: int) -> int:
    """Output channels accumulated in registers at once (the kernel has 8, 4, 2 and 1)."""
    return next(c for c in (8, 4, 2, 1) if kp % c == 0)


def _single_entry(C: np.ndarray, what: str) -> tuple[int, float]:
    nz = np.nonzero(np.abs(C) > 1e-14)[0]
    if len(nz) > 1:  # pragma: no cover - every D4 Clebsch-Gordan slice is monomial
        raise NotImplementedError(f"{what}: Clebsch-Gordan slice with {len(nz)} entries")
    return (int(nz[0]), float(C[nz[0]])) if len(nz) else (0, 0.0)


class QuadraticKernel:
    """One layer's kernel tables and weights in ``dtype``; call it on sites-last features.

    ``tanh=True`` applies the ``tanh`` activation of :class:`~lattice_lab.models.layers_equivariant.IrrepActivation`
    in the kernel, before the output is stored (``eps`` is its norm guard).
    """

    def __init__(self, layer, dtype: torch.dtype, tanh: bool = False, eps: float = NORM_EPS):
        if dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"native kernel: dtype {dtype} not supported (float32 or float64)")
        self.fn = _kernel_function(dtype)
        self.dtype = dtype
        self.layer = layer
        self.rows_in, self.rows_out = len(layer.in_rows), len(layer.out_rows)
        self.cp, self.kp = layer.cp, layer.kp
        self.kc = channel_chunk(self.kp)
        self.tanh, self.eps = bool(tanh), float(eps)
        row_in = {r: n for n, r in enumerate(layer.in_rows)}
        groups, terms, coefs, self._blocks = [], [], [], []  # _blocks: (block k, kind) per term, in order
        for o in IRREPS:
            if not layer.out_counts[o]:
                continue
            t0 = len(terms)
            for k, a, b in layer.blocks_of_output(o):
                C = layer._cg_np[k]  # [d_o, d_a, d_b]
                ca, cb, tri = layer.in_counts[a], layer.in_counts[b], int(a == b)
                if IRREP_DIM[a] == 1:  # kind 0: left row shared by the output components
                    z = [_single_entry(C[g, 0], f"{(a, b, o)}[{g}]") for g in range(IRREP_DIM[o])]
                    zr = [row_in[(b, beta)] for beta, _ in z] + [0]
                    terms.append([0, tri, ca, cb, 0, row_in[(a, 0)], zr[0], zr[1] if len(z) > 1 else zr[0], 0])
                    coefs.append([z[0][1], z[1][1] if len(z) > 1 else 0.0])
                    self._blocks.append((k, 0))
                elif IRREP_DIM[o] == 1:  # kind 1: E x E -> 1-d, both left components summed per pair
                    pairs = [_single_entry(C[0, alpha], f"{(a, b, o)}[0, {alpha}]") for alpha in range(2)]
                    terms.append([1, tri, ca, cb, 0, row_in[(a, 0)], row_in[(b, pairs[0][0])],
                                  row_in[(a, 1)], row_in[(b, pairs[1][0])]])
                    coefs.append([pairs[0][1], pairs[1][1]])
                    self._blocks.append((k, 1))
                else:  # pragma: no cover - E x E contains no E for D4
                    raise NotImplementedError(f"native kernel: block {(a, b, o)}")
            groups.append([IRREP_DIM[o], layer.out_rows.index((o, 0)), t0, len(terms)])
        copies = []
        for o, g in layer.out_rows:
            copies.append([row_in[(o, g)], layer.in_counts[o]] if o in layer.copy else [0, 0])
        as_i64 = lambda a: torch.as_tensor(np.asarray(a, dtype=np.int64).reshape(-1, len(a[0]) if len(a) else 1))  # noqa: E731
        self.dims = torch.tensor([self.rows_in, self.cp, self.rows_out, self.kp, self.kc, len(groups),
                                  int(self.tanh)], dtype=torch.int64)
        self.groups = as_i64(groups)
        self.terms = as_i64(terms) if terms else torch.zeros(1, 9, dtype=torch.int64)
        self.copies = as_i64(copies)
        self.coefs = torch.tensor(coefs if coefs else [[0.0, 0.0]], dtype=dtype)
        self._params = LiveTensors.of(layer)  # looked up every call: load_state_dict(assign=True) replaces them
        self._key = None
        self._lock = threading.Lock()
        self.flops_per_site = self._flops(terms)

    def _flops(self, terms: list) -> float:
        """FLOPs per site this kernel executes (a multiply-add counts 2; activation not counted)."""
        kp, total = self.kp, 0
        for d, _r0, t0, t1 in self.groups.tolist():
            for kind, tri, ca, cb, *_ in terms[t0:t1]:
                pairs = ca * (ca - 1) // 2 if tri else ca * cb
                total += 2 * pairs * kp + (2 * d * cb * kp + d * cb if kind == 0 else 3 * pairs)
        total += sum(2 * cnt * kp for _row, cnt in self.copies.tolist())
        return float(total)

    # -- weights (rebuilt when a parameter changes) --------------------------------------------------
    def prepare(self) -> None:
        """Gather the weights into the kernel's layout unless no parameter changed since the last call
        (checked by data pointer and version counter, like the layer's own packed-weight cache)."""
        params = self._params()
        key = change_key(params, self.layer)
        if key != self._key:
            with self._lock:
                if key != self._key:
                    self._build_weights(key)
                    self._kept = [p.detach() for p in params]  # their memory cannot be reused by a successor

    def _build_weights(self, key: tuple) -> None:
        layer = self.layer
        kp, kc, cp = self.kp, self.kc, self.cp
        with torch.no_grad():
            flat = []
            offsets = []
            for k, kind in self._blocks:
                dense = layer.dense_weight(k).detach().to(self.dtype)  # [ca, cb, out]
                ca, cb, out = dense.shape
                dense = torch.nn.functional.pad(dense, (0, kp - out)).view(ca, cb, kp // kc, kc)
                # kind 0: [chunk, j, i, kc] (inner loop over i); kind 1: [chunk, i, j, kc] (inner loop over j)
                flat.append((dense.permute(2, 1, 0, 3) if kind == 0 else dense.permute(2, 0, 1, 3)).reshape(-1))
                offsets.append(sum(f.numel() for f in flat[:-1]))
            self.W = torch.cat(flat).contiguous() if flat else torch.zeros(1, dtype=self.dtype)
            if len(offsets):
                self.terms[:, 4] = torch.tensor(offsets, dtype=torch.int64)
            Wc = torch.zeros(self.rows_out, cp, kp, dtype=self.dtype)
            bias = torch.zeros(self.rows_out, kp, dtype=self.dtype)
            for r, (o, _g) in enumerate(layer.out_rows):
                if o in layer.copy:
                    w = layer.copy[o].detach()
                    Wc[r, :w.shape[0], :w.shape[1]] = w
            if layer.bias is not None:
                bias[0, :layer.bias.shape[0]] = layer.bias.detach()
            self.Wc, self.bias = Wc, bias
        self._key = key

    def __call__(self, X: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``X [rows_in * cp, n]`` (unit stride along sites) -> ``Y [rows_out * kp, n]`` (or into ``out``)."""
        n = X.shape[1]
        if X.dtype != self.dtype or X.device.type != "cpu" or X.shape[0] != self.rows_in * self.cp or (n > 1 and X.stride(1) != 1):
            raise ValueError(f"native kernel: expected a CPU {self.dtype} tensor [{self.rows_in * self.cp}, n] with "
                             f"unit stride along sites, got {X.dtype} {tuple(X.shape)} strides {X.stride()}")
        if self._key is None:
            self.prepare()  # later parameter changes: the caller calls prepare() (the ENN, every forward)
        Y = X.new_empty(self.rows_out * self.kp, n) if out is None else out
        if Y.shape != (self.rows_out * self.kp, n) or (n > 1 and Y.stride(1) != 1) or Y.dtype != self.dtype:
            raise ValueError(f"native kernel: bad output {tuple(Y.shape)} strides {Y.stride()}")
        rc = self.fn(X.data_ptr(), X.stride(0), Y.data_ptr(), Y.stride(0), n, self.dims.data_ptr(),
                     self.groups.data_ptr(), self.terms.data_ptr(), self.copies.data_ptr(), self.W.data_ptr(),
                     self.Wc.data_ptr(), self.bias.data_ptr(), self.coefs.data_ptr(), self.eps)
        if rc != 0:
            raise RuntimeError(f"native quadratic kernel failed (code {rc})")
        return Y
