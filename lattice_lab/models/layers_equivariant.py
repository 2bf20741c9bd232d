"""D4-equivariant building blocks for irrep-valued features on lattice sites.

Features of one layer are a dict ``{irrep: x [N, c, d]}`` (N sites as the batch dim, c channels,
d = 1 for A1, A2, B1, B2 and d = 2 for E), or, on the fast path, one *packed* tensor
``X [N, R, cp]``: one row per irrep component in the order A1, A2, B1, B2, E_0, E_1 (irreps with
channels only, see :func:`packed_rows`), each row zero-padded to ``cp`` channels. A
:class:`QuadraticIrrepLayer` implements one layer of the equivariant network (enn_paper,
DESIGN.md section 5):

    auxiliary = copies of the input features
              + every symmetry-allowed product of two features coupled with Clebsch-Gordan
                coefficients (same irrep: pairs i < j only; E x E -> A1, A2, B1, B2 over i < j;
                1-d x E -> E and distinct 1-d irreps over all pairs),
    output_o  = W_o^copy x_o + sum_blocks bilinear_{a b -> o}(x_a, x_b) (+ bias for A1),

with one weight per (auxiliary channel, output channel), shared by both components of E. The
auxiliary layer is never materialised: each (a, b -> o) block is the bilinear form
``y[n, k, g] = sum_{i j a b} W[i, j, k] C[g, a, b] x_a[n, i, a] x_b[n, j, b]``, evaluated for all
blocks of a layer at once by one batched matmul and one per-site contraction per output irrep
(:meth:`QuadraticIrrepLayer.forward_packed`). Same-irrep blocks store only the strictly
upper-triangular weights, so parameter counts equal (auxiliary count) x (output width).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lattice_lab.common.errors import ConfigError
from lattice_lab.native.policy import write_count
from lattice_lab.symmetry.clebsch_gordan import clebsch_gordan, product_decomposition
from lattice_lab.symmetry.field_ops import periodic_pad
from lattice_lab.symmetry.group import IRREP_DIM, IRREPS

NORM_EPS = 1e-8  # guards every vector norm (gradient finite at v = 0)
ACTIVATIONS = ("gate", "tanh", "authors")
LAYER_MODES = ("auto", "bilinear", "explicit")


def product_blocks() -> list[tuple[str, str, str]]:
    """All (a, b, out) with a <= b in ``IRREPS`` order and ``out`` in ``a x b``."""
    return [(a, b, o) for ia, a in enumerate(IRREPS) for b in IRREPS[ia:] for o in product_decomposition(a, b)]


def n_pairs(a: str, b: str, counts: dict[str, int]) -> int:
    """Number of channel pairs feeding a product block (i < j for the same irrep)."""
    ca, cb = counts.get(a, 0), counts.get(b, 0)
    return ca * (ca - 1) // 2 if a == b else ca * cb


def auxiliary_layer_counts(counts: dict[str, int]) -> dict[str, int]:
    """Channels per irrep of the auxiliary layer built from features with ``counts``."""
    aux = {ir: int(counts.get(ir, 0)) for ir in IRREPS}
    for a, b, o in product_blocks():
        aux[o] += n_pairs(a, b, counts)
    return aux


def packed_rows(counts: dict[str, int]) -> list[tuple[str, int]]:
    """Rows ``(irrep, component)`` of the packed layout: A1, A2, B1, B2, E_0, E_1 (present irreps only)."""
    return [(ir, g) for ir in IRREPS if counts.get(ir, 0) for g in range(IRREP_DIM[ir])]


def pack_features(x: dict[str, torch.Tensor], counts: dict[str, int], cp: int) -> torch.Tensor:
    """``{irrep: [N, c, d]}`` -> packed ``[N, R, cp]`` (rows of :func:`packed_rows`, zero padding)."""
    rows = [F.pad(x[ir][:, :, g], (0, cp - counts[ir])) for ir, g in packed_rows(counts)]
    return torch.stack(rows, 1)


def unpack_features(X: torch.Tensor, counts: dict[str, int]) -> dict[str, torch.Tensor]:
    """Packed ``[N, R, cp]`` -> ``{irrep: [N, c, d]}`` (inverse of :func:`pack_features`)."""
    out, r = {}, 0
    for ir in IRREPS:
        c, d = counts.get(ir, 0), IRREP_DIM[ir]
        if c:
            out[ir] = X[:, r:r + d, :c].transpose(1, 2)
            r += d
    return out


def keep_float64(module: nn.Module, names, apply, fn, *args, **kwargs):
    """``apply(fn, ...)`` (a module's ``nn.Module._apply``: ``.to()``, ``.float()``, ``.cuda()``) that
    moves the float64 constant buffers ``names`` (Clebsch-Gordan coefficients, projection kernels,
    converted to the input's dtype where they are used) to the new device but keeps them float64:
    ``.float()`` would round them for good, and a later ``.double()`` would not restore them."""
    masters = {n: module._buffers[n] for n in names if module._buffers.get(n) is not None}
    out = apply(fn, *args, **kwargs)
    for name, master in masters.items():
        moved = module._buffers[name]
        module._buffers[name] = master if moved.device == master.device else master.to(moved.device)
    return out


class QuadraticIrrepLayer(nn.Module):
    """Copies + CG-coupled quadratic products, then one linear map per irrep (bias on A1 only).

    Parameters (names and shapes are the checkpoint format): ``copy[o] [c_o, out_o]``, one
    ``weights[k]`` per product block ``blocks[k] = (a, b, o)`` (``[c_a * (c_a - 1) / 2, out_o]`` for
    a == b, pairs i < j in ``triu_indices`` order; ``[c_a, c_b, out_o]`` otherwise) and ``bias [out_A1]``.

    **Packed evaluation** (:meth:`forward_packed`). Features are one tensor ``X [n, R, cp]``: one row
    per irrep component (A1, A2, B1, B2, E_0, E_1, present irreps only), each zero-padded to
    ``cp = max(c_a)`` channels. Every block (a, b -> o) and left component alpha is a *term*
    ``t = (a_alpha, b, o)``; the layer is

        T_t[n, j, k]   = sum_i X[n, a_alpha, i] W_t[i, j, k]                 (batched GEMM over terms)
        Z[n, g, t, j]  = C_o[g, alpha, beta] X[n, b_beta, j]                   (signed gather)
        y[n, o_g, k]   = b_o + sum_i X[n, o_g, i] Wcopy_o[i, k] + sum_{t in o} sum_j Z[n, g, t, j] T_t[n, j, k]

    For D4 every Clebsch-Gordan slice ``C_o[g, alpha, :]`` has a single non-zero entry beta (a
    signed permutation, times 1/sqrt(2) for E x E), so Z is a gather of rows times a constant. The
    first step is ONE ``bmm`` over all terms (the CG-free block weights packed as ``W_t [cp, cp * kp]``,
    strict upper triangle for a == b, zeros in the padding), written straight into a sites-first
    buffer ``[n, terms, cp * kp]``; the second is one per-site ``baddbmm`` per output irrep
    (terms of one output are contiguous; both E components share T, as they share the weights).
    The auxiliary layer ``[n, sum aux]`` is never materialised and the largest intermediate, T,
    is ``cp * kp`` per term and site; sites are processed in sub-chunks of ``cache_bytes`` of T so
    it stays in cache. The packed weights are built from the parameters once per forward (by an
    index gather, so gradients flow to the parameters) and cached in eval mode without autograd.
    """

    cache_bytes = 1 << 21  # sub-chunk size: T of one sub-chunk ~ this many bytes (CPU cache)
    # Python-only state that TorchScript must not try to convert (export scripts this module)
    __jit_ignored_attributes__ = ["_packed_cache", "_cg_np", "blocks", "terms"]  # noqa: RUF012

    def __init__(self, in_counts: dict[str, int], out_counts: dict[str, int], mode: str = "auto"):
        super().__init__()
        if mode not in LAYER_MODES:
            raise ConfigError(f"model.layer_mode={mode!r}: expected one of {list(LAYER_MODES)}")
        self.in_counts = {ir: int(in_counts.get(ir, 0)) for ir in IRREPS}
        self.out_counts = {ir: int(out_counts.get(ir, 0)) for ir in IRREPS}
        aux = auxiliary_layer_counts(self.in_counts)
        self.copy = nn.ParameterDict()
        for o in IRREPS:
            if self.out_counts[o] and self.in_counts[o]:
                self.copy[o] = nn.Parameter(torch.randn(self.in_counts[o], self.out_counts[o]) / math.sqrt(aux[o]))
        self.blocks: list[tuple[str, str, str]] = []
        self._cg_np: list = []
        self.weights = nn.ParameterList()
        for k, (a, b, o) in enumerate(
                [blk for blk in product_blocks() if self.out_counts[blk[2]] and n_pairs(blk[0], blk[1], self.in_counts)]):
            self.blocks.append((a, b, o))
            shape = (n_pairs(a, b, self.in_counts),) if a == b else (self.in_counts[a], self.in_counts[b])
            self.weights.append(nn.Parameter(torch.randn(*shape, self.out_counts[o]) / math.sqrt(aux[o])))
            self._cg_np.append(clebsch_gordan(a, b)[o])  # float64
            if a == b:
                iu = torch.triu_indices(self.in_counts[a], self.in_counts[a], offset=1)
                self.register_buffer(f"triu{k}", iu, persistent=False)
        self.bias = nn.Parameter(torch.zeros(self.out_counts["A1"])) if self.out_counts["A1"] else None
        self._build_plan()
        self._build_explicit_plan()
        self.mode = self.auto_mode() if mode == "auto" else mode
        self._packed_cache: tuple | None = None
        # TorchScript path (export): packed weights frozen by freeze_for_export (non-persistent)
        self.group_dims = [IRREP_DIM[g[0]] for g in self.groups]
        self._ts_cache_bytes = int(self.cache_bytes)
        for i in range(4):
            self.register_buffer(f"_ts_packed{i}", torch.zeros(0), persistent=False)

    def blocks_of_output(self, o: str) -> list[tuple[int, str, str]]:
        """``(k, a, b)`` of the product blocks ``blocks[k] = (a, b, o)`` feeding output irrep ``o``, in order."""
        return [(k, a, b) for k, (a, b, oo) in enumerate(self.blocks) if oo == o]

    # -- packing plan (index tables, built once) --------------------------------------------------
    def _build_plan(self) -> None:
        self.in_rows = packed_rows(self.in_counts)
        self.out_rows = packed_rows(self.out_counts)
        row_in = {r: n for n, r in enumerate(self.in_rows)}
        self.cp = max([c for c in self.in_counts.values()] + [1])
        self.kp = max([c for c in self.out_counts.values()] + [1])
        cp, kp = self.cp, self.kp
        offsets = np.cumsum([0] + [w.numel() for w in self.weights])  # + 1 below: slot 0 is the zero
        terms, left, zrow, zcoef, self.groups = [], [], [], [], []
        w_index = []  # per term: [cp, cp, kp] index into 1 + cat(weights) (0 = zero)
        for o in IRREPS:
            if not self.out_counts[o]:
                continue
            t0 = len(terms)
            for k, a, b in self.blocks_of_output(o):
                ca, cb, co = self.in_counts[a], self.in_counts[b], self.out_counts[o]
                raw = np.zeros((cp, cp, kp), dtype=np.int64)
                if a == b:
                    iu = np.triu_indices(ca, 1)
                    raw[iu[0], iu[1], :co] = 1 + offsets[k] + np.arange(len(iu[0]) * co).reshape(-1, co)
                else:
                    raw[:ca, :cb, :co] = 1 + offsets[k] + np.arange(ca * cb * co).reshape(ca, cb, co)
                for alpha in range(IRREP_DIM[a]):
                    terms.append((k, alpha))
                    left.append(row_in[(a, alpha)])
                    w_index.append(raw)
            t1 = len(terms)
            z0 = len(zrow)
            for g in range(IRREP_DIM[o]):
                for k, alpha in terms[t0:t1]:
                    C = self._cg_np[k][g, alpha]
                    nz = np.nonzero(np.abs(C) > 1e-14)[0]
                    if len(nz) > 1:  # pragma: no cover - D4 Clebsch-Gordan slices are monomial
                        raise NotImplementedError(f"CG slice {self.blocks[k]}[{g}, {alpha}] has {len(nz)} entries")
                    beta = int(nz[0]) if len(nz) else 0
                    zrow.append(row_in[(self.blocks[k][1], beta)])
                    zcoef.append(float(C[beta]) if len(nz) else 0.0)
            self.groups.append((o, t0, t1, z0, len(zrow), self.out_rows.index((o, 0))))
        self.terms = terms
        self.n_terms = len(terms)
        # copy weights: one [cp, kp] matrix per output row (input row of the same irrep component)
        copy_index, copy_in = [], []
        offs = self._flat_offsets()
        poffs = {o: offs[("copy", o)] for o in self.copy}
        start = offs["bias"]
        for (o, g) in self.out_rows:
            raw = np.zeros((cp, kp), dtype=np.int64)
            if o in poffs:
                co = self.out_counts[o]
                raw[:self.in_counts[o], :co] = poffs[o] + np.arange(self.in_counts[o] * co).reshape(-1, co)
            copy_index.append(raw)
            copy_in.append(row_in.get((o, g), 0))
        bias_index = np.zeros((len(self.out_rows), kp), dtype=np.int64)
        if self.bias is not None:  # after the copy weights in the same flat vector; A1 is output row 0
            bias_index[0, :self.out_counts["A1"]] = start + np.arange(self.out_counts["A1"])
        as_t = lambda a: torch.as_tensor(np.asarray(a, dtype=np.int64))  # noqa: E731
        self.register_buffer("_left_rows", as_t(left), persistent=False)
        self.register_buffer("_z_rows", as_t(zrow), persistent=False)
        self.register_buffer("_z_coef", torch.tensor(zcoef, dtype=torch.float64), persistent=False)
        self.register_buffer("_w_index", as_t(np.stack(w_index) if w_index else np.zeros((0, cp, cp, kp))).reshape(-1),
                             persistent=False)
        self.register_buffer("_copy_index", as_t(np.stack(copy_index)).reshape(-1), persistent=False)
        self.register_buffer("_copy_rows", as_t(copy_in), persistent=False)
        self.register_buffer("_bias_index", as_t(bias_index).reshape(-1), persistent=False)

    def _flat_offsets(self) -> dict:
        """Offsets of every parameter in ``cat([0], weights..., copy..., bias)`` (index 0 = zero)."""
        offs, start = {}, 1
        for k, w in enumerate(self.weights):
            offs[("w", k)] = start
            start += w.numel()
        for o, p in self.copy.items():
            offs[("copy", o)] = start
            start += p.numel()
        offs["bias"] = start
        return offs

    def _build_explicit_plan(self) -> None:
        """Index tables of the explicit auxiliary layer (see :meth:`_forward_explicit`).

        Per output irrep o, one column per auxiliary product ``x[left] * (+-x[right])`` with a weight
        row ``scale * param[src : src + out_o]``: copies (right = the constant 1), the A1 bias
        (constant x constant) and every CG-coupled pair; an E x E -> 1-d channel is the sum of two
        products (alpha = 0, 1), so it gets two columns with the same weight row. E outputs have one
        column list per component g, with identical weight rows (shared weights).
        """
        cp, kp = self.cp, self.kp
        row_in = {r: n for n, r in enumerate(self.in_rows)}
        const = len(self.in_rows) * cp  # slot of the constant 1 in [X.flatten(), 1]
        neg = const + 1  # right slots >= neg index the negated copy
        slot = lambda ir, g, i: row_in[(ir, g)] * cp + i  # noqa: E731
        offs = self._flat_offsets()
        self.explicit_groups = []  # (o, d_o, column start, columns per component)
        left, right, wsrc, wscale = [], [], [], []
        for o in IRREPS:
            co = self.out_counts[o]
            if not co:
                continue
            start = len(left)
            for g in range(IRREP_DIM[o]):
                rows = []  # (left slot, signed right slot, param src, scale)
                if o in self.copy:
                    rows += [(slot(o, g, i), const, offs[("copy", o)] + i * co, 1.0) for i in range(self.in_counts[o])]
                if o == "A1" and self.bias is not None:
                    rows.append((const, const, offs["bias"], 1.0))
                for k, a, b in self.blocks_of_output(o):
                    ca, cb = self.in_counts[a], self.in_counts[b]
                    pairs = zip(*np.triu_indices(ca, 1)) if a == b else ((i, j) for i in range(ca) for j in range(cb))
                    C = self._cg_np[k][g]
                    for p, (i, j) in enumerate(pairs):
                        for alpha in range(IRREP_DIM[a]):
                            for beta in np.nonzero(np.abs(C[alpha]) > 1e-14)[0]:
                                c = float(C[alpha, beta])
                                r = slot(b, int(beta), j) + (neg if c < 0 else 0)
                                rows.append((slot(a, alpha, i), r, offs[("w", k)] + p * co, abs(c)))
                for lt, rt, s, sc in rows:
                    left.append(lt)
                    right.append(rt)
                    wsrc.append(s)
                    wscale.append(sc)
            self.explicit_groups.append((o, IRREP_DIM[o], start, (len(left) - start) // IRREP_DIM[o]))
        self.n_explicit = len(left)
        w_index = np.zeros((len(wsrc), kp), dtype=np.int64)
        for o, d, s, m in self.explicit_groups:  # weight rows: those of component 0 (g = 1 is identical)
            if d == 2 and (wsrc[s:s + m] != wsrc[s + m:s + 2 * m] or wscale[s:s + m] != wscale[s + m:s + 2 * m]):
                raise RuntimeError(f"E output {o}: the two components need the same weight rows")  # pragma: no cover
            w_index[s:s + m, :self.out_counts[o]] = np.asarray(wsrc[s:s + m], dtype=np.int64)[:, None] + np.arange(
                self.out_counts[o])
        as_t = lambda a: torch.as_tensor(np.asarray(a, dtype=np.int64))  # noqa: E731
        self.register_buffer("_x_left", as_t(left), persistent=False)
        self.register_buffer("_x_right", as_t(right), persistent=False)
        self.register_buffer("_xw_index", as_t(w_index), persistent=False)
        self.register_buffer("_xw_scale", torch.tensor(wscale, dtype=torch.float64)[:, None], persistent=False)

    def auto_mode(self) -> str:
        """Cheaper evaluation for this layer's shape, by a simple cost model (flops + memory traffic).

        Units: flops, memory traffic converted at the rates measured on CPU (float32, see docs/enn_speed.md).
        bilinear: GEMM ``2 terms cp^2 kp`` + the intermediate T (``terms cp kp``) written and read
        + a fixed per-site cost of the small per-site contractions (one per output irrep);
        explicit: GEMM ``2 columns kp`` + building the product columns (two gathers and a multiply).
        Wide inputs / narrow outputs (the 32 -> 8 layer) favour bilinear, narrow inputs / wide
        outputs (the first layer) and small layers explicit.
        """
        bilinear = (2 * self.n_terms * self.cp ** 2 * self.kp + 12 * self.n_terms * self.cp * self.kp
                    + 6000 * len(self.groups))
        explicit = 2 * self.n_explicit * self.kp + 24 * self.n_explicit
        return "explicit" if explicit < bilinear else "bilinear"

    # -- weights --------------------------------------------------------------------------------
    def cg(self, k: int, like: torch.Tensor) -> torch.Tensor:
        """Clebsch-Gordan tensor ``C [d_o, d_a, d_b]`` of block k in the dtype/device of ``like``."""
        return torch.as_tensor(self._cg_np[k], dtype=like.dtype, device=like.device)

    def dense_weight(self, k: int) -> torch.Tensor:
        """Weights of block k as ``[c_a, c_b, out]`` (zero on and below the diagonal for a == b)."""
        a, b, o = self.blocks[k]
        W = self.weights[k]
        if a != b:
            return W
        c = self.in_counts[a]
        iu = getattr(self, f"triu{k}")
        dense = W.new_zeros(c, c, self.out_counts[o])
        return dense.index_put((iu[0], iu[1]), W)

    def packed_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(W_t [terms, cp, cp * kp], Wcopy [rows_out, cp, kp], bias [rows_out, 1, kp], zcoef [nz])``.

        One gather from the concatenated parameters (differentiable). In eval mode without
        autograd the result is cached and rebuilt when any parameter changes (version counter);
        after writing to ``p.data`` directly call the model's
        :meth:`~lattice_lab.models.base.ForceField.weights_changed` (or this layer's :meth:`clear_cache`).
        """
        params = list(self.parameters())
        ref = params[0]
        cacheable = not self.training and not (torch.is_grad_enabled() and any(p.requires_grad for p in params))
        key = (ref.dtype, ref.device, write_count(self), tuple((p.data_ptr(), p._version) for p in params))
        if cacheable and self._packed_cache is not None and self._packed_cache[0] == key:
            return self._packed_cache[1]
        flat = torch.cat([ref.new_zeros(1)] + [w.reshape(-1) for w in self.weights]
                         + [p.reshape(-1) for p in self.copy.values()] + ([self.bias] if self.bias is not None else []))
        if self.mode == "explicit":
            out = (flat[self._xw_index] * self._xw_scale.to(ref.dtype),)
        else:
            Wt = flat[self._w_index].view(self.n_terms, self.cp, self.cp * self.kp)
            Wc = flat[self._copy_index].view(len(self.out_rows), self.cp, self.kp)
            bias = flat[self._bias_index].view(len(self.out_rows), 1, self.kp)
            out = (Wt, Wc, bias, self._z_coef.to(ref.dtype))
        if cacheable:
            self._packed_cache = (key, out)
        return out

    def clear_cache(self) -> None:
        self._packed_cache = None

    @torch.no_grad()
    def freeze_for_export(self) -> None:
        """Store the current packed weights (and ``cache_bytes``) in the buffers the TorchScript
        path reads (``torch.jit.script`` cannot gather from a ParameterDict). Export only: the
        frozen copy does not follow later parameter updates."""
        packed = list(self.packed_weights())
        for i in range(4):
            setattr(self, f"_ts_packed{i}", packed[i].detach().clone() if i < len(packed) else torch.zeros(0))
        self._ts_cache_bytes = int(self.cache_bytes)

    def frozen_weights(self) -> list[torch.Tensor]:
        """The weights frozen by :meth:`freeze_for_export`, in the form of :meth:`packed_weights`."""
        if self.mode == "explicit":
            return [self._ts_packed0]
        return [self._ts_packed0, self._ts_packed1, self._ts_packed2, self._ts_packed3]

    def _cache_bytes(self) -> int:
        if torch.jit.is_scripting():
            return self._ts_cache_bytes
        return int(self.cache_bytes)

    def _apply(self, fn, *args, **kwargs):  # .to() / .double() / .cuda(): drop cached packed weights
        self._packed_cache = None
        return keep_float64(self, ("_z_coef", "_xw_scale"), super()._apply, fn, *args, **kwargs)

    # -- evaluation -----------------------------------------------------------------------------
    def sub_chunk(self, X: torch.Tensor) -> int:
        """Sites per sub-chunk: T ``[sites, terms, cp * kp]`` of about ``cache_bytes`` on CPU; all on GPU."""
        if X.device.type != "cpu":
            return max(1, X.shape[0])
        per_site = max(1, self.n_terms * self.cp * self.kp * X.element_size())
        return max(16, self._cache_bytes() // per_site)

    def forward_packed(self, X: torch.Tensor, packed: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Packed features ``X [n, rows_in, cp]`` -> ``Y [n, rows_out, kp]`` (see the class docstring).

        TorchScript-compatible; scripted without ``packed`` it uses the frozen export weights.
        """
        if packed is not None:
            pw = packed
        elif torch.jit.is_scripting():
            pw = self.frozen_weights()
        else:
            pw = list(self.packed_weights())
        if self.mode == "explicit":
            return self._forward_explicit(X, pw[0])
        Wt, Wc, bias, zcoef = pw[0], pw[1], pw[2], pw[3]
        base = torch.baddbmm(bias, X.index_select(1, self._copy_rows).transpose(0, 1), Wc)  # [rows_out, n, kp]
        if not self.n_terms:
            return base.transpose(0, 1).contiguous()
        need_grad = torch.is_grad_enabled() and (X.requires_grad or Wt.requires_grad)
        step = self.sub_chunk(X)
        cp, kp, nt = self.cp, self.kp, self.n_terms
        # split, not slices: under autograd the backward of a slice fills a zero tensor of the whole
        # source per piece; split's backward concatenates the pieces' gradients once. The groups
        # partition the terms, the Z rows and the output rows in order.
        t_sizes = [g[2] - g[1] for g in self.groups]
        z_sizes = [g[4] - g[3] for g in self.groups]
        pieces: list[torch.Tensor] = []
        for Xs, base_c in zip(X.split(step), base.split(step, 1)):
            m = Xs.shape[0]
            XL = Xs.index_select(1, self._left_rows).transpose(0, 1)  # [terms, m, cp]
            if need_grad:  # autograd cannot record out=: same product, then a sites-first copy
                T = torch.bmm(XL, Wt).transpose(0, 1).contiguous()
            else:
                T = X.new_empty(m, nt, cp * kp)
                torch.bmm(XL, Wt, out=T.transpose(0, 1))  # [m, terms, cp * kp], no copy
            Z = Xs.index_select(1, self._z_rows) * zcoef[:, None]  # [m, nz, cp]
            base_s = base_c.transpose(0, 1)  # [m, rows_out, kp]
            ys: list[torch.Tensor] = []
            for gi, (Tg, Zg, bg) in enumerate(zip(T.split(t_sizes, 1), Z.split(z_sizes, 1),
                                                  base_s.split(self.group_dims, 1))):
                d = self.group_dims[gi]
                Tt = Tg.reshape(m, t_sizes[gi] * cp, kp)
                Zt = Zg.reshape(m, d, t_sizes[gi] * cp)
                ys.append(torch.baddbmm(bg, Zt, Tt))
            pieces.append(torch.cat(ys, 1) if len(ys) > 1 else ys[0])
        return torch.cat(pieces, 0) if len(pieces) > 1 else pieces[0]

    def _forward_explicit(self, X: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
        """Explicit auxiliary layer, chunk by chunk, sites last: the product columns
        ``P^T = x[left] * (+-x[right])`` are two row gathers from ``[X^T; 1; -X^T; -1]`` (contiguous
        rows of sites, so the products vectorise over sites), then one matmul per output irrep
        ``W_o^T @ P_o^T`` (both E components in one batched matmul with the shared weights).
        Cheaper than the bilinear form when the inputs are narrow and the outputs wide (first layer).
        """
        n = X.shape[0]
        # the three [columns, sites] tensors of a chunk: about 2 cache_bytes together
        step = n if X.device.type != "cpu" else max(16, 2 * self._cache_bytes() // (3 * self.n_explicit * X.element_size()))
        WT = W.t()
        need_grad = torch.is_grad_enabled() and (X.requires_grad or W.requires_grad)
        # split, not slices (see forward_packed): the groups partition the columns in order
        sizes = [g[1] * g[3] for g in self.explicit_groups]
        pieces: list[torch.Tensor] = []
        for Xs in X.split(step):
            XT = Xs.reshape(-1, len(self.in_rows) * self.cp).t()
            m = XT.shape[1]
            Xe = torch.cat([XT, XT.new_ones(1, m)], 0)  # [slots + 1, m]
            PT = Xe.index_select(0, self._x_left)
            right = torch.cat([Xe, -Xe], 0).index_select(0, self._x_right)
            PT = PT * right if need_grad else PT.mul_(right)  # in place: saves an allocation per chunk
            ys: list[torch.Tensor] = []
            for (_, d, c0, mcols), P in zip(self.explicit_groups, PT.split(sizes)):
                Wo = WT[:, c0:c0 + mcols]  # [kp, columns]
                ys.append((Wo @ P)[None] if d == 1 else Wo @ P.view(d, mcols, m))
            pieces.append((torch.cat(ys, 0) if len(ys) > 1 else ys[0]).permute(2, 0, 1))  # [m, rows_out, kp]
        return torch.cat(pieces, 0) if len(pieces) > 1 else pieces[0].contiguous()

    @torch.jit.unused
    def forward(self, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{irrep: [N, c, d]}`` -> ``{irrep: [N, out, d]}`` (packs, :meth:`forward_packed`, unpacks)."""
        Y = self.forward_packed(pack_features(x, self.in_counts, self.cp))
        return unpack_features(Y, self.out_counts)


def odd_tanh(y: torch.Tensor) -> torch.Tensor:
    """``tanh(y)`` as ``copysign(2 sigmoid(2|y|) - 1, y)``: exactly odd, within 2e-7 of ``torch.tanh``
    in float32, and ~2.5x faster on CPU, where ``torch.tanh`` is not vectorised (2.5 ns/element
    against 0.2 for ``sigmoid``, measured). Inference only (its derivative at y = 0 is 0)."""
    return torch.copysign(torch.sigmoid(y.abs().mul_(2.0)).mul_(2.0).sub_(1.0), y)


class IrrepActivation(nn.Module):
    """Equivariant amplitude nonlinearity on ``{irrep: [N, c, d]}``.

    ``gate`` (default): A1 -> SiLU(y); A2, B1, B2 -> y * sigmoid(|y| + b) (odd, so it commutes with
    the sign flips of a 1-d irrep, and continuous); E -> v * sigmoid(||v|| + b) with
    ||v|| = sqrt(v.v + eps) (commutes with the orthogonal E matrices). ``authors``: the authors'
    sign(y) * sigmoid(|y| + b) for every 1-d irrep (A1 included) and the same norm gate for E; it is
    equivariant but jumps by 2 sigmoid(b) at y = 0, so the predicted force is a discontinuous
    function of Q (bad for Langevin dynamics and for gradient-based training), hence not the default.
    ``tanh``: bounded and smooth, no parameters: tanh(y) for every 1-d irrep (odd) and
    v * tanh(||v||) / ||v|| for E. Bounded hidden features keep the quadratic layers from growing
    like a high-degree polynomial on inputs far outside the training distribution.
    """

    def __init__(self, counts: dict[str, int], kind: str = "gate"):
        super().__init__()
        if kind not in ACTIVATIONS:
            raise ConfigError(f"model.activation={kind!r}: expected one of {list(ACTIVATIONS)}")
        self.kind = kind
        self.counts = {ir: int(counts.get(ir, 0)) for ir in IRREPS}
        gated = [ir for ir in IRREPS if counts.get(ir, 0) and (ir != "A1" or kind == "authors") and kind != "tanh"]
        self.gate_bias = nn.ParameterDict({ir: nn.Parameter(torch.zeros(counts[ir])) for ir in gated})
        # packed layout: 1-d rows [0, n1) (A1 first if present), then the two E rows
        self.kp = max(list(self.counts.values()) + [1])
        self.n1 = sum(1 for ir in IRREPS if ir != "E" and self.counts[ir])
        self.has_a1 = bool(self.counts["A1"])
        self.has_e = bool(self.counts["E"])
        self.n_odd = sum(1 for ir in IRREPS[1:4] if self.counts[ir])
        self.norm_eps = NORM_EPS  # instance attribute: TorchScript cannot read a global float
        # TorchScript path (export): gate-bias rows frozen by freeze_for_export (non-persistent)
        self.register_buffer("_ts_b1", torch.zeros(0), persistent=False)
        self.register_buffer("_ts_bE", torch.zeros(0), persistent=False)

    def _row_bias(self, irreps: list[str], like: torch.Tensor) -> torch.Tensor:
        """Gate biases of ``irreps`` as ``[len, kp]`` rows (zero-padded, differentiable)."""
        return torch.stack([F.pad(self.gate_bias[ir], (0, self.kp - self.counts[ir])) for ir in irreps]).to(like.dtype)

    def _gated_irreps(self) -> tuple[list[str], list[str]]:
        """Irreps whose gate biases are used on the 1-d rows and on the E rows."""
        if self.kind == "tanh":
            return [], []
        one_d = IRREPS[:4] if self.kind == "authors" else IRREPS[1:4]
        return [ir for ir in one_d if self.counts[ir]], (["E"] if self.has_e else [])

    def _gate_rows(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gate-bias rows ``([n_gated_1d, kp], [1, kp])`` (frozen copies when scripted)."""
        if torch.jit.is_scripting():
            return self._ts_b1.to(like.dtype), self._ts_bE.to(like.dtype)
        one_d, e = self._gated_irreps()
        empty = like.new_zeros(0, self.kp)
        return (self._row_bias(one_d, like) if one_d else empty), (self._row_bias(e, like) if e else empty)

    @torch.no_grad()
    def freeze_for_export(self) -> None:
        """Store the gate-bias rows for the TorchScript path (export only, see QuadraticIrrepLayer)."""
        p = next(iter(self.gate_bias.values()), None)
        like = p if p is not None else self._ts_b1
        self._ts_b1, self._ts_bE = (t.detach().clone() for t in self._gate_rows(like))

    def forward_packed(self, Y: torch.Tensor) -> torch.Tensor:
        """The same nonlinearity on packed features ``[N, R, kp]`` (:func:`packed_rows` layout).

        Padded channels are zero and stay zero (every activation maps 0 to 0). TorchScript-compatible.
        Without autograd, ``tanh`` is evaluated in place with :func:`odd_tanh` (~2.5x faster on CPU).
        """
        if self.kind == "tanh" and not (torch.is_grad_enabled() and Y.requires_grad):
            return self._tanh_inplace(Y)
        parts: list[torch.Tensor] = []
        one_d = Y[:, :self.n1]
        b1, bE = self._gate_rows(Y)
        if self.n1 > 0:
            if self.kind == "tanh":
                parts.append(torch.tanh(one_d))
            elif self.kind == "authors":
                parts.append(torch.sign(one_d) * torch.sigmoid(one_d.abs() + b1))
            else:  # gate: SiLU on A1, odd gate on A2, B1, B2
                if self.has_a1:
                    parts.append(F.silu(Y[:, :1]))
                if self.n_odd > 0:
                    y = Y[:, int(self.has_a1):self.n1]
                    parts.append(y * torch.sigmoid(y.abs() + b1))
        if self.has_e:
            y = Y[:, self.n1:self.n1 + 2]
            norm = torch.sqrt((y * y).sum(1, keepdim=True) + self.norm_eps)
            if self.kind == "tanh":
                parts.append(y * (torch.tanh(norm) / norm))
            else:
                parts.append(y * torch.sigmoid(norm + bE))
        return torch.cat(parts, 1) if len(parts) > 1 else parts[0]

    def _tanh_inplace(self, Y: torch.Tensor) -> torch.Tensor:
        """The ``tanh`` activation written into ``Y`` (inference only: no autograd through it)."""
        if self.n1 > 0:
            one_d = Y[:, :self.n1]
            one_d.copy_(odd_tanh(one_d))
        if self.has_e:
            y = Y[:, self.n1:self.n1 + 2]
            norm = torch.sqrt((y * y).sum(1, keepdim=True) + self.norm_eps)
            y.mul_(odd_tanh(norm).div_(norm))
        return Y

    @torch.jit.unused
    def forward(self, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for ir, y in x.items():
            if self.kind == "tanh":
                if ir == "E":
                    norm = torch.sqrt((y * y).sum(-1, keepdim=True) + NORM_EPS)
                    out[ir] = y * (torch.tanh(norm) / norm)
                else:
                    out[ir] = torch.tanh(y)
            elif ir == "E":
                norm = torch.sqrt((y * y).sum(-1, keepdim=True) + NORM_EPS)
                out[ir] = y * torch.sigmoid(norm + self.gate_bias[ir][:, None])
            elif ir == "A1" and self.kind == "gate":
                out[ir] = F.silu(y)
            elif self.kind == "authors":
                out[ir] = torch.sign(y) * torch.sigmoid(y.abs() + self.gate_bias[ir][:, None])
            else:
                out[ir] = y * torch.sigmoid(y.abs() + self.gate_bias[ir][:, None])
        return out


class EnvironmentProjection(nn.Module):
    """Q [B, L, L] -> all irrep channels of every site's environment, channels last ``[B*L*L, M]``.

    One periodic ``conv2d`` with the fixed kernels of :class:`~lattice_lab.symmetry.EnvironmentBasis`
    (built from a float64 master copy in the dtype / on the device of the input). An optional per-channel
    affine map ``(x - shift) / scale`` is folded into the kernel and a conv bias.
    """

    __jit_ignored_attributes__ = ["_kernel_cache", "kernel_np", "basis", "layout"]  # noqa: RUF012 - Python-only
    __jit_unused_properties__ = ["counts"]  # noqa: RUF012

    def __init__(self, cutoff: float):
        super().__init__()
        from lattice_lab.symmetry.environment import EnvironmentBasis

        self.basis = EnvironmentBasis(cutoff)
        self.layout = self.basis.layout
        K = 2 * self.basis.radius + 1
        self.kernel_np = np.zeros((self.basis.M, 1, K, K))  # float64 master copy
        self.kernel_np[:] = self.basis.kernels(torch.float64)[0].numpy()
        self._kernel_cache: dict = {}
        # the same kernels as a (non-persistent) float64 buffer for the TorchScript path, rounded
        # where used exactly like kernel() does (.to() moves it, keeping float64: keep_float64)
        self.register_buffer("_ts_kernel", torch.as_tensor(self.kernel_np.copy()), persistent=False)

    def _apply(self, fn, *args, **kwargs):
        return keep_float64(self, ("_ts_kernel",), super()._apply, fn, *args, **kwargs)

    def kernel(self, dtype: torch.dtype, device) -> torch.Tensor:
        """Conv weights ``[M, 1, K, K]`` in ``dtype`` on ``device`` (exactly rounded from float64)."""
        key = (dtype, torch.device(device))
        if key not in self._kernel_cache:
            self._kernel_cache[key] = torch.as_tensor(self.kernel_np, dtype=dtype, device=device)
        return self._kernel_cache[key]

    @property
    def counts(self) -> dict[str, int]:
        return dict(self.basis.counts)

    def project(self, Q: torch.Tensor) -> torch.Tensor:
        """``Q [B, L, L]`` -> unnormalised channels ``[B*L*L, M]`` (TorchScript-compatible)."""
        if torch.jit.is_scripting():
            w = self._ts_kernel.to(Q.dtype)
        else:
            w = self.kernel(Q.dtype, Q.device)
        x = F.conv2d(periodic_pad(Q.unsqueeze(1), w.shape[-1] // 2), w)  # [B, M, L, L]
        return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])

    @torch.jit.unused
    def forward(self, Q: torch.Tensor, shift: torch.Tensor | None = None,
                scale: torch.Tensor | None = None) -> torch.Tensor:
        w = self.kernel(Q.dtype, Q.device)
        bias = None
        if scale is not None:
            w = w / scale.to(Q.dtype)[:, None, None, None]
        if shift is not None:
            bias = -shift.to(Q.dtype) / (scale.to(Q.dtype) if scale is not None else 1.0)
        x = F.conv2d(periodic_pad(Q.unsqueeze(1), w.shape[-1] // 2), w, bias)  # [B, M, L, L]
        return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])

    def packed_index(self, cp: int) -> np.ndarray:
        """Source channel of every slot of the packed layout ``[R * cp]`` (:func:`packed_rows`,
        rows padded to ``cp``); ``M`` marks a zero-padding slot."""
        counts = self.counts
        idx = []
        for ir, g in packed_rows(counts):
            d, start = IRREP_DIM[ir], self.layout[ir].start
            idx.extend([start + ch * d + g for ch in range(counts[ir])] + [self.basis.M] * (cp - counts[ir]))
        return np.asarray(idx, dtype=np.int64)

    def split(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``[N, M]`` -> ``{irrep: [N, c, d]}`` (views)."""
        return {ir: x[:, self.layout[ir]].reshape(x.shape[0], self.basis.counts[ir], IRREP_DIM[ir])
                for ir in IRREPS if self.basis.counts[ir]}

    @torch.no_grad()
    def moments(self, Q: torch.Tensor, chunk: int = 16, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel mean and mean square ``[M]`` (float64) over all sites of ``Q [C, L, L]``."""
        Q = torch.as_tensor(Q)
        dev = device if device is not None else Q.device
        s1 = torch.zeros(self.basis.M, dtype=torch.float64, device=dev)
        s2 = torch.zeros_like(s1)
        n = 0
        for start in range(0, Q.shape[0], chunk):
            x = self(Q[start:start + chunk].to(device=dev, dtype=torch.float64))
            s1 += x.sum(0)
            s2 += (x * x).sum(0)
            n += x.shape[0]
        return s1 / n, s2 / n


def force_moments(F_: torch.Tensor) -> tuple[float, float]:
    """Mean and standard deviation (epsilon-guarded) of a force dataset, in float64."""
    F_ = torch.as_tensor(F_).to(torch.float64)
    mean = float(F_.mean())
    std = float(torch.sqrt(F_.var(unbiased=False) + NORM_EPS))
    return mean, std
