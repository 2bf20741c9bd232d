"""Equivariant neural network (ENN) force field for the square lattice (enn_paper, DESIGN.md section 5).

The environment of every site (offsets within ``cutoff``, default sqrt(13): 45 sites) is projected
on the D4 irrep channels (9 A1, 3 A2, 6 B1, 5 B2, 11 E) by one fixed periodic convolution and
normalised equivariantly (one scale per irrep channel, shared by both E components; a shift only
on A1 channels). Each layer forms the auxiliary layer (copies + every Clebsch-Gordan-coupled
quadratic product) and maps it linearly per irrep to the next hidden widths, followed by an
equivariant amplitude nonlinearity; the last auxiliary layer is read out linearly on A1. The force
(an A1 scalar) is ``out * F_std + F_mean``. Sites are the batch dimension; one environment, no
message passing, so the model is exactly D4- and translation-equivariant and transfers to any L.

Evaluation is chunked over sites (``chunk_sites``): the lattice is cut into bands of rows (or groups
of whole configurations), each band is projected by the convolution (with a halo of ``radius``
rows) straight into the packed feature layout of :mod:`lattice_lab.models.layers_equivariant`
(one row per irrep component, zero-padded channels) and pushed through all layers, so memory is
O(chunk) besides Q and F, and the time per site does not depend on L.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lattice_lab.common.errors import ConfigError
from lattice_lab.common.switch import check_flag
from lattice_lab.models.base import ForceField
from lattice_lab.models.flops import enn_flops
from lattice_lab.models.layers_equivariant import (
    NORM_EPS,
    EnvironmentProjection,
    IrrepActivation,
    QuadraticIrrepLayer,
    auxiliary_layer_counts,
    force_moments,
    packed_rows,
)
from lattice_lab.native.policy import applicable, build_or_fallback, check_setting, write_count
from lattice_lab.symmetry.field_ops import periodic_band, periodic_pad
from lattice_lab.symmetry.group import IRREP_DIM, IRREPS

DEFAULT_CHUNK_SITES = 1 << 14  # sites per chunk in forward: bounds peak memory, independent of L
NATIVE_SUB_CHUNK = 4096  # sites per pass through the native layers (bounds the per-layer features of a
                         # pass to ~3 MB; 128-4096 measured within noise of each other)
MIN_PIECE_FLOPS = 1e8  # smallest piece worth a thread of its own (cpu_parallel): ~1 ms of work,
                       # against ~0.5 ms of Python glue per piece (enn: 255 sites, enn_small: 3400)


def lattice_pieces(B: int, L: int, workers: int, chunk_sites: int) -> list[tuple[int, int, int, int]]:
    """Cut ``B`` configurations of ``L x L`` sites into pieces ``(i0, i1, r0, r1)`` (configurations
    ``i0:i1``, rows ``r0:r1``) of at most ``chunk_sites`` sites (or one row each), their number a
    multiple of ``workers`` where possible so that every thread gets the same work: groups of whole
    configurations when they divide evenly, else bands of rows of each configuration."""
    workers = max(1, workers)
    n = max(workers, -(-B * L * L // max(1, chunk_sites)))
    n = -(-n // workers) * workers
    if B >= n and (B % n == 0 or B >= 4 * n):
        edges = [round(k * B / n) for k in range(n + 1)]
        return [(edges[k], edges[k + 1], 0, L) for k in range(n)]
    bands = max(-(-n // B), -(-L * L // max(1, chunk_sites)))
    while (B * bands) % workers and bands < L:
        bands += 1
    bands = min(bands, L)
    edges = [round(k * L / bands) for k in range(bands + 1)]
    return [(i, i + 1, edges[k], edges[k + 1]) for i in range(B) for k in range(bands)]


def auxiliary_counts(input_counts: dict[str, int], hidden: list[int]) -> list[dict[str, int]]:
    """Auxiliary-layer channel counts per irrep for every layer (enn_paper Table I).

    ``[aux_1, ..., aux_{len(hidden)+1}]``: aux_1 is built from ``input_counts``, aux_{l+1} from
    hidden layer l (``hidden[l-1]`` channels of every irrep); the last feeds the A1 readout.
    """
    out = [auxiliary_layer_counts(input_counts)]
    for h in hidden:
        out.append(auxiliary_layer_counts({ir: int(h) for ir in IRREPS}))
    return out


def _check_chunk(chunk_sites) -> int:
    try:
        ok = int(chunk_sites) == float(chunk_sites) and int(chunk_sites) >= 1
    except (TypeError, ValueError):
        ok = False
    if not ok or isinstance(chunk_sites, bool):
        raise ConfigError(f"model.chunk_sites={chunk_sites!r}: expected a positive integer (sites per chunk)")
    return int(chunk_sites)


def _check_cutoff(cutoff) -> float:
    try:
        value = float(cutoff)
    except (TypeError, ValueError):
        value = math.nan
    if isinstance(cutoff, bool) or not math.isfinite(value) or value < 1.0:
        raise ConfigError(f"model.cutoff={cutoff!r}: need a finite cutoff >= 1 (nearest neighbours)")
    return value


def _check_hidden(hidden) -> list[int]:
    try:
        widths = [int(h) for h in hidden]
    except (TypeError, ValueError):
        raise ConfigError(f"model.hidden={hidden!r}: expected a list of positive integers") from None
    if not widths or any(h <= 0 for h in widths) or any(float(h) != float(g) for h, g in zip(widths, hidden)):
        raise ConfigError(f"model.hidden={list(hidden)!r}: expected a non-empty list of positive integers")
    return widths


class ENN(ForceField):
    """D4-equivariant network on irrep features of the local environment (direct force model)."""

    name = "enn"
    conservative = False
    __jit_ignored_attributes__ = ["_proj_cache", "_native", "_native_whole"]  # noqa: RUF012 - Python-only caches

    def __init__(self, hamiltonian: dict, cutoff: float = math.sqrt(13.0), hidden: list[int] = (32, 8, 4),
                 activation: str = "gate", chunk_sites: int = DEFAULT_CHUNK_SITES, cpu_parallel: bool = True,
                 native_kernel: str | bool = "auto"):
        cutoff = _check_cutoff(cutoff)
        chunk_sites = _check_chunk(chunk_sites)
        widths = _check_hidden(hidden)
        proj = EnvironmentProjection(cutoff)
        # receptive field = largest |dx| or |dy| of an environment offset (= floor(cutoff)): the
        # periodic window never overlaps itself when L >= 2 * receptive_field + 1
        super().__init__(hamiltonian, cutoff, receptive_field=proj.basis.radius)
        self.hidden = widths
        self.activation = activation
        self.chunk_sites = chunk_sites
        self._proj_cache: tuple | None = None  # (key, (w, b)) of packed_projection (normalisation is a buffer)
        self.cpu_parallel = check_flag(cpu_parallel, "model.cpu_parallel")
        self.native_kernel = check_setting(native_kernel)
        self._native: dict = {}  # dtype -> [QuadraticKernel per layer + readout] or the reason it is unavailable
        self._native_whole: dict = {}  # dtype -> ENNForces (tanh: the whole model in one call) or the reason
        self.proj = proj
        counts = proj.counts
        self.input_counts = counts
        self.aux_counts = auxiliary_counts(counts, self.hidden)
        layers, acts = [], []
        prev = counts
        for h in self.hidden:
            nxt = {ir: h for ir in IRREPS}
            layers.append(QuadraticIrrepLayer(prev, nxt))
            acts.append(IrrepActivation(nxt, activation))
            prev = nxt
        self.flops_per_site = float(enn_flops(counts, self.hidden))
        self.layers = torch.nn.ModuleList(layers)
        self.acts = torch.nn.ModuleList(acts)
        self.readout = QuadraticIrrepLayer(prev, {"A1": 1})
        # equivariant input normalisation and output scale (fit_normalization)
        for ir in IRREPS:
            self.register_buffer(f"in_scale_{ir}", torch.ones(counts[ir]))
        self.register_buffer("in_shift_A1", torch.zeros(counts["A1"]))
        self.register_buffer("out_scale", torch.tensor(1.0))
        self.register_buffer("out_shift", torch.tensor(0.0))
        # packed input layout (rows A1, A2, B1, B2, E_0, E_1, padded to cp_in channels)
        self.in_rows = packed_rows(counts)
        self.cp_in = self.layers[0].cp
        self.register_buffer("_pack_src", torch.as_tensor(proj.packed_index(self.cp_in)), persistent=False)
        self.radius = int(proj.basis.radius)
        self.n_in_rows = len(self.in_rows)
        # TorchScript path (export): packed, normalised conv weights frozen by freeze_for_export
        self.register_buffer("_ts_conv_w", torch.zeros(0), persistent=False)
        self.register_buffer("_ts_conv_b", torch.zeros(0), persistent=False)

    def __getstate__(self):  # copies / pickles (the export's private copy) drop the native kernel caches (ctypes objects)
        state = dict(super().__getstate__())
        state["_native"], state["_native_whole"] = {}, {}
        return state

    # -- normalisation -----------------------------------------------------------------------------
    @torch.jit.unused
    def normalization_buffers(self) -> list[torch.Tensor]:
        """The buffers :meth:`fit_normalization` sets (the input scales / shift and the force scale)."""
        return [*(getattr(self, f"in_scale_{ir}") for ir in IRREPS), self.in_shift_A1, self.out_scale, self.out_shift]

    def _flat_norm(self) -> tuple[torch.Tensor, torch.Tensor]:
        scale = torch.cat([getattr(self, f"in_scale_{ir}").repeat_interleave(IRREP_DIM[ir]) for ir in IRREPS])
        shift = torch.cat([self.in_shift_A1, scale.new_zeros(scale.shape[0] - self.in_shift_A1.shape[0])])
        return shift, scale

    @torch.no_grad()
    def fit_normalization(self, Q: torch.Tensor, F: torch.Tensor) -> None:
        """Set the equivariant input normalisation and the force scale/shift from training data.

        A1 channel c: shift = mean, scale = sqrt(var + eps); A2, B1, B2: scale = sqrt(<y^2> + eps)
        (no shift: a shift would break the sign flips); E: scale = sqrt(<|v|^2>/2 + eps), shared by
        both components. Force: F = out * std(F) + mean(F) (allowed: the force is an A1 scalar).
        """
        mean, sq = self.proj.moments(torch.as_tensor(Q), device=self.out_scale.device)
        layout = self.proj.layout
        for ir in IRREPS:
            m, s = mean[layout[ir]], sq[layout[ir]]
            if ir == "A1":
                self.in_shift_A1.copy_(m)
                var = s - m * m
            elif ir == "E":
                var = s.view(-1, 2).mean(-1)
            else:
                var = s
            getattr(self, f"in_scale_{ir}").copy_(torch.sqrt(var.clamp_min(0) + NORM_EPS))
        f_mean, f_std = force_moments(F)
        self.out_shift.fill_(f_mean)
        self.out_scale.fill_(f_std)

    # -- forward -----------------------------------------------------------------------------------
    def packed_projection(self, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Conv weights ``[R * cp_in, 1, K, K]`` and bias mapping Q to normalised packed input rows
        (cached until a normalisation buffer changes).

        The equivariant normalisation ``(x - shift) / scale`` is folded into the environment kernels
        (built from their float64 master copy), which are then permuted into the packed layout;
        padding channels get zero kernels, so they are exactly zero.
        """
        bufs = self.normalization_buffers()[:-2]
        key = (dtype, torch.device(device), write_count(self), tuple((t.data_ptr(), t._version) for t in bufs))
        if self._proj_cache is not None and self._proj_cache[0] == key:
            return self._proj_cache[1]
        # built from buffers only (no gradient); normal tensors even when called in inference mode,
        # so the cached copy also serves training
        with torch.inference_mode(False), torch.no_grad():
            shift, scale = self._flat_norm()
            scale = scale.to(dtype=dtype, device=device)
            w = self.proj.kernel(dtype, device) / scale[:, None, None, None]
            b = -shift.to(dtype=dtype, device=device) / scale
            w = torch.cat([w, w.new_zeros(1, *w.shape[1:])])[self._pack_src]
            b = torch.cat([b, b.new_zeros(1)])[self._pack_src]
        self._proj_cache = (key, (w, b))
        return w, b

    def packed_weights(self) -> list:
        """Packed weights of every layer and the readout (built once per forward, cached in eval)."""
        return [layer.packed_weights() for layer in self.layers] + [self.readout.packed_weights()]

    def packed_forward(self, X: torch.Tensor, packed: list | None = None) -> torch.Tensor:
        """Packed normalised input rows ``[n, R, cp_in]`` -> network output ``[n]`` (before the force scale)."""
        packed = self.packed_weights() if packed is None else packed
        for layer, act, pw in zip(self.layers, self.acts, packed):
            X = act.forward_packed(layer.forward_packed(X, pw))
        return self.readout.forward_packed(X, packed[-1])[:, 0, 0]

    def site_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised irrep channels ``[N, M]`` (basis layout) -> network output ``[N]`` (before the force scale)."""
        X = torch.cat([x, x.new_zeros(x.shape[0], 1)], 1)[:, self._pack_src]
        return self.packed_forward(X.view(x.shape[0], len(self.in_rows), self.cp_in))

    @torch.no_grad()
    def freeze_for_export(self) -> None:
        """Freeze the packed projection (and every layer's packed weights) for the TorchScript
        export: ``torch.jit.script`` runs :meth:`compute_forces` from these buffers."""
        p = self.out_scale
        dtype = next(iter(self.parameters())).dtype
        w, b = self.packed_projection(dtype, p.device)
        self._ts_conv_w, self._ts_conv_b = w.detach().clone(), b.detach().clone()
        for m in [*self.layers, self.readout, *self.acts]:
            m.freeze_for_export()

    def _run_band(self, q: torch.Tensor, w: torch.Tensor, b: torch.Tensor,
                  packed: list[list[torch.Tensor]]) -> torch.Tensor:
        """Padded band ``[b, 1, h + 2R, L + 2R]`` -> network output ``[b, h, L]``."""
        x = F.conv2d(q, w, b)  # [b, R * cp, h, L]: packed channels of every site of the band
        nb, h, width = x.shape[0], x.shape[2], x.shape[3]
        X = x.permute(0, 2, 3, 1).reshape(nb * h * width, self.n_in_rows, self.cp_in)
        i = 0
        for layer, act in zip(self.layers, self.acts):
            X = act.forward_packed(layer.forward_packed(X, packed[i]))
            i += 1
        return self.readout.forward_packed(X, packed[i])[:, 0, 0].view(nb, h, width)

    def compute_forces(self, Q: torch.Tensor) -> torch.Tensor:
        """Forces ``[B, L, L]`` without input checks (TorchScript-compatible, any L and B).

        Chunked over whole configurations (or bands of rows with a halo of R rows when one
        configuration exceeds ``chunk_sites``). Scripted (export), the packed weights are the ones
        frozen by :meth:`freeze_for_export`.
        """
        B, L = Q.shape[0], Q.shape[-1]
        packed: list[list[torch.Tensor]] = []
        if torch.jit.is_scripting():
            w, b = self._ts_conv_w.to(Q.dtype), self._ts_conv_b.to(Q.dtype)
            for layer in self.layers:
                packed.append(layer.frozen_weights())
            packed.append(self.readout.frozen_weights())
        else:
            w, b = self.packed_projection(Q.dtype, Q.device)
            packed = [list(pw) for pw in self.packed_weights()]
        R = self.radius
        Qp = periodic_pad(Q.unsqueeze(1), R)  # [B, 1, L + 2R, L + 2R]
        chunk = self.chunk_sites
        if L * L <= chunk:  # whole configurations per chunk
            per = max(1, chunk // (L * L))
            if B > per:
                ys: list[torch.Tensor] = []
                for i in range(0, B, per):
                    ys.append(self._run_band(Qp[i:i + per], w, b, packed))
                y = torch.cat(ys)
            else:
                y = self._run_band(Qp, w, b, packed)
        else:  # bands of rows (with a halo of R rows) of one configuration per chunk
            rows = max(1, chunk // L)
            outs: list[torch.Tensor] = []
            for i in range(B):
                bands: list[torch.Tensor] = []
                for r in range(0, L, rows):
                    bands.append(self._run_band(Qp[i:i + 1, :, r:min(r + rows, L) + 2 * R], w, b, packed))
                outs.append(torch.cat(bands, 1)[0])
            y = torch.stack(outs)
        return y * self.out_scale.to(y.dtype) + self.out_shift.to(y.dtype)

    @torch.jit.unused
    def forward(self, Q: torch.Tensor) -> torch.Tensor:
        """Forces ``[B, L, L]``. CPU inference: native kernels and/or lattice pieces on the thread
        pool; otherwise (autograd, GPU) :meth:`compute_forces`. All paths give the same forces."""
        self.check_input(Q)
        F = self.native_forces(Q)
        if F is not None:
            return F
        kernels = self.native_kernels(Q)
        threads = self.pool_threads(Q)
        workers = self.parallel_pieces(Q, threads)
        if kernels is not None and workers == 1:
            threads = 1  # one piece with the native kernels: in the calling thread (no pool wake-up, ~0.15 ms)
        if threads > 1 or kernels is not None:
            return self._forces_in_pieces(Q, threads, workers, kernels)
        return self.compute_forces(Q)

    # -- native CPU kernels (lattice_lab.native) ---------------------------------------------------
    @torch.jit.unused
    def native_function(self, Q: torch.Tensor, k: float = 0.0, kappa: float = 0.0, frozen: bool = False):
        """See :meth:`ForceField.native_function`: :class:`lattice_lab.native.enn.ENNForces` (tiles of
        sites over torch's OpenMP threads), for CPU inference with the ``tanh`` activation."""
        if self.activation != "tanh" or not applicable(self.native_kernel, Q):
            return None
        got = self._native_whole.get(Q.dtype)
        if got is None:
            from lattice_lab.native.enn import ENNForces

            got = build_or_fallback(self.native_kernel, "ENN", lambda: ENNForces(self, Q.dtype))
            self._native_whole[Q.dtype] = got
        if isinstance(got, Exception):
            return None
        if frozen:
            got.prepare()
        check = not frozen
        return lambda Q, out=None: got(Q, k, kappa, out, check)

    @torch.jit.unused
    def native_kernels(self, Q: torch.Tensor) -> list | None:
        """The fused C++ kernels of every layer and the readout for CPU inference in Q's dtype, or
        None (autograd, GPU, ``native_kernel: false``, the environment variable ``LATTICE_LAB_NATIVE=0``,
        or, with ``auto``, no working compiler). Built on first use (``lattice_lab.native.build``);
        their weights follow parameter updates. Used for activations other than ``tanh`` (applied
        in torch between the kernels); with ``tanh``, :meth:`native_forces` runs the whole model."""
        from lattice_lab.native.quadratic import QuadraticKernel

        if not applicable(self.native_kernel, Q):
            return None
        got = self._native.get(Q.dtype)
        if got is None:
            def build():
                fused = self.activation == "tanh"  # applied in the kernel; other activations run after it
                kernels = [QuadraticKernel(layer, Q.dtype, tanh=fused) for layer in self.layers]
                return [*kernels, QuadraticKernel(self.readout, Q.dtype)]

            got = build_or_fallback(self.native_kernel, "ENN", build)
            self._native[Q.dtype] = got
        if isinstance(got, Exception):
            return None
        for kernel in got:
            kernel.prepare()
        return got

    @torch.jit.unused
    def _run_band_native(self, q: torch.Tensor, w: torch.Tensor, b: torch.Tensor, kernels: list) -> torch.Tensor:
        """:meth:`_run_band` with the native kernels: features sites-last ``[rows * channels, sites]``
        (the conv's own layout), passes of ``NATIVE_SUB_CHUNK`` sites through all layers."""
        x = F.conv2d(q, w, b)  # [b, R * cp, h, L]
        nb, h, width = x.shape[0], x.shape[2], x.shape[3]
        X = x.view(nb, x.shape[1], h * width)
        X = X[0] if nb == 1 else X.transpose(0, 1).reshape(x.shape[1], nb * h * width)
        n = X.shape[1]
        out = x.new_empty(1, n)
        for s in range(0, n, NATIVE_SUB_CHUNK):
            Xs = X[:, s:s + NATIVE_SUB_CHUNK]
            for kernel, act in zip(kernels, self.acts):
                Xs = kernel(Xs)
                if not kernel.tanh:  # the activation in the packed layout, on a sites-last view
                    m = Xs.shape[1]
                    Z = act.forward_packed(Xs.view(kernel.rows_out, kernel.kp, m).permute(2, 0, 1))
                    Xs = Z.permute(1, 2, 0).contiguous().view(Xs.shape)
            kernels[-1](Xs, out=out[:, s:s + NATIVE_SUB_CHUNK])
        return out.view(nb, h, width)

    # -- CPU parallelism over pieces of the lattice --------------------------------------------------
    @torch.jit.unused
    def pool_threads(self, Q: torch.Tensor) -> int:
        """Threads for :meth:`_forces_in_pieces`: torch's intra-op thread count on CPU inference with
        ``cpu_parallel`` (no autograd); 1 (the plain path) otherwise."""
        if not self.cpu_parallel or Q.device.type != "cpu" or torch.is_grad_enabled():
            return 1
        return torch.get_num_threads()

    @torch.jit.unused
    def parallel_pieces(self, Q: torch.Tensor, threads: int) -> int:
        """How many threads get a piece: at most ``threads``, each piece at least ``MIN_PIECE_FLOPS``
        of work (1: too small to split). A single piece runs in the calling thread with the native
        kernels, and on one pool thread on the torch path, since torch's own OpenMP threads are
        unreliable for the ENN's medium-sized operations (docs/enn_speed.md)."""
        min_sites = max(1, math.ceil(MIN_PIECE_FLOPS / self.flops_per_site))
        return max(1, min(threads, Q.shape[0] * Q.shape[-1] ** 2 // min_sites))

    @torch.jit.unused
    def _forces_in_pieces(self, Q: torch.Tensor, threads: int, workers: int,
                          kernels: list | None = None) -> torch.Tensor:
        """The forces of :meth:`compute_forces`, evaluated as independent pieces for ``workers``
        threads (groups of whole configurations, or bands of rows with a halo of ``radius`` rows) on a
        pool of ``threads`` threads with one torch thread each
        (:func:`lattice_lab.common.threads.run_pieces`; in the calling thread when ``threads`` is 1),
        each piece through the native ``kernels`` when given; identical results.
        Everything but the dispatch runs in the workers: an OpenMP region in the calling thread
        would leave its own OpenMP threads spinning on the cores the workers need."""
        from lattice_lab.common.threads import run_pieces

        B, L = Q.shape[0], Q.shape[-1]
        w, b = self.packed_projection(Q.dtype, Q.device)
        packed = [list(pw) for pw in self.packed_weights()] if kernels is None else []
        R = self.radius
        y = Q.new_empty(B, L, L)
        scale, shift = self.out_scale.to(Q.dtype), self.out_shift.to(Q.dtype)

        def piece(i0: int, i1: int, r0: int, r1: int):
            def run():
                band = periodic_band(Q[i0:i1].unsqueeze(1), r0, r1, R)
                if kernels is not None:
                    out = self._run_band_native(band, w, b, kernels)
                else:
                    out = self._run_band(band, w, b, packed)
                torch.addcmul(shift, out, scale, out=y[i0:i1, r0:r1])
            return run

        pieces = [piece(*p) for p in lattice_pieces(B, L, workers, self.chunk_sites)]
        run_pieces(pieces, threads)
        return y
