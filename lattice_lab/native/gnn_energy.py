"""Forces of the energy-based graph network in one native call (``gnn_energy_forward.cpp``): plan and call.

:class:`EnergyGNNForces` holds, for one :class:`~lattice_lab.models.gnn_energy.EnergyGNN` (SiLU activation)
and one dtype, the packed weights (each Linear both transposed, for the forward pass, and as stored, for
the backward pass), the scalars (input/output normalisation, elastic constants, aggregation weight,
LayerNorm eps) and a scratch buffer (per thread: a tile's stored activations; a halo buffer). Weights
are repacked only when a parameter or a normalisation buffer changes (data pointer or version counter).
A call is one ctypes call: the lattices are cut into tiles (:func:`tile_plan`), each tile runs the forward
and backward pass layer by layer on one thread, tiles on torch's OpenMP team (dynamic schedule, no
barrier inside a call), so the time per site hardly depends on L.

Measured (gnn_energy_small, float32, B = 1, through the dynamics' force provider, 2-core AVX-512 machine
when no other job ran; median us per site at L = 32 / 64 / 128 / 256 / 512):

    2 threads  native 0.112 0.095 0.093 0.100 0.100   torch path 0.93 0.41 0.40 0.44 0.40
    1 thread   native 0.181 0.171 0.182 0.194 0.192   torch path 0.97 0.61 0.65 0.76 0.66

L = 32 on 2 threads pays the halo of its two tiles and ~15 us of Python per call; L >= 256 the halo of
2-d tiles. With another job on one core (2 threads): native 0.13 / 0.24 / 0.15 us per site at L = 32 /
128 / 512 (a call waits for a late thread once), the torch path 1.1 / 1.7 at L = 32 / 128.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from lattice_lab.native.build import load
from lattice_lab.native.policy import LiveTensors, threads

MAX_BLOCKS = 16  # limits of the kernel (gnn_energy_forward.cpp)
MAX_READOUT = 16
# Sites of one tile, halo included: its stored activations (~0.8 kB per site for gnn_energy_small in
# float32, ~4 MB per tile) stay in the caches; a tile cut from a larger lattice recomputes a halo of
# `blocks` rows / columns. Wider models have more bytes per site but also more work per byte.
TILE_SITES = 5000
TILE_OVERHEAD_SITES = 64  # fixed cost of a tile in site-stage units (tile set-up, halo copies)
_SYMBOLS = {torch.float32: "ll_gnn_energy_forces_f32", torch.float64: "ll_gnn_energy_forces_f64"}
_P, _I = ctypes.c_void_p, ctypes.c_int64


def _library():
    lib = load("gnn_energy_forward")
    if lib.ll_gnn_energy_scratch.argtypes is None:
        lib.ll_gnn_energy_scratch.argtypes = [_P, _I, _I, _P, _I, _I]
        lib.ll_gnn_energy_scratch.restype = _I
        lib.ll_gnn_energy_n_params.argtypes = [_P]
        lib.ll_gnn_energy_n_params.restype = _I
        lib.ll_gnn_energy_lanes.argtypes = [_I]
        lib.ll_gnn_energy_lanes.restype = _I
    return lib


def _even(L: int, n: int) -> list[int]:
    return [i * L // n for i in range(n + 1)]


def _aligned(L: int, n: int, halo: int, lanes: int) -> list[int] | None:
    """Column bounds of ``n`` tiles whose widths with the halo (``own + 2 halo``) are whole multiples of
    ``lanes`` but for one tile: the fewest SIMD vectors per row. None if a tile would be empty."""
    total = L + 2 * halo * n
    vectors = -(-total // lanes)
    if vectors < n:
        return None
    per = [vectors // n + (i < vectors % n) for i in range(n)]
    widths = [k * lanes - 2 * halo for k in per]
    widths[0] -= vectors * lanes - total  # the excess comes off the widest tile
    if min(widths) < 1:
        return None
    widths.sort(reverse=True)
    return [sum(widths[:i]) for i in range(n + 1)]


def tile_plan(B: int, L: int, nt: int, blocks: int, lanes: int,
              tile_sites: int | None = None) -> tuple[list[int], list[int]]:
    """Row and column bounds of the tiles of a lattice (``[0, ..., L]`` each) for ``[B, L, L]`` on
    ``nt`` threads.

    Modelled time: every stage (the embedding, ``blocks`` forward and ``blocks`` backward stages) runs
    over the rows and columns of the tile it needs (own sites plus what is left of the halo), columns in
    whole SIMD vectors of ``lanes`` sites, plus a fixed cost per tile; threads take tiles as they go (at
    least the total over the threads, the largest tile, and whole rounds of tiles). Rows are split
    evenly; columns so that a tile with its halo is a whole number of vectors wide. Memory: a tile's
    sites, halo and ghosts included (its stored activations). The plan is the fastest one within ``tile_sites``
    (:data:`TILE_SITES`) or, where that costs more than 30 % over the fastest plan at all (a halo of
    many blocks), within the smallest multiple (2, 4, ...) of it that does not.

    No plan shares a tile between threads (stage by stage, with barriers): measured, that saves ~9 % at
    L = 32 on 2 idle cores, but each barrier waits for the slowest thread, and with one other job on the
    cores a call then took ~12 ms instead of ~0.13 ms (tiles: one wait per call, at the end).
    """
    rows, cols = _tile_plan(B, L, nt, blocks, lanes, TILE_SITES if tile_sites is None else tile_sites)
    return list(rows), list(cols)


@functools.lru_cache(maxsize=256)
def _tile_plan(B: int, L: int, nt: int, blocks: int, lanes: int, tile_sites: int) -> tuple[tuple, tuple]:
    shrinks = [0] + [b + 1 for b in range(blocks)] + list(range(blocks))

    def cost(extents: list[int], n: int, vectors: bool) -> list[list[int]]:
        """Per tile, per stage: rows (or lanes) the stage runs over."""
        out = []
        for own in extents:
            full = own + 2 * blocks if n > 1 else own
            out.append([(-(-(full - 2 * s) // lanes) * lanes if vectors else full - 2 * s) if n > 1
                        else (-(-own // lanes) * lanes if vectors else own) for s in shrinks])
        return out

    plans = []  # (time, memory, bounds)
    for nrt in range(1, L + 1):
        if nrt > 1 and L // nrt < max(2, 2 * blocks):  # tiles thinner than their halo: never worth it
            break
        rows = _even(L, nrt)
        row_cost = cost([b - a for a, b in zip(rows, rows[1:])], nrt, False)
        row_kinds = {tuple(c): row_cost.count(c) for c in row_cost}
        for nct in range(1, L // lanes + 2):
            cols = _even(L, 1) if nct == 1 else _aligned(L, nct, blocks, lanes)
            if cols is None:
                continue
            col_cost = cost([b - a for a, b in zip(cols, cols[1:])], nct, True)
            col_kinds = {tuple(c): col_cost.count(c) for c in col_cost}
            works = [(TILE_OVERHEAD_SITES + sum(r * c for r, c in zip(rk, ck)), rn * cn)
                     for rk, rn in row_kinds.items() for ck, cn in col_kinds.items()]
            total = B * sum(w * m for w, m in works)
            rounds = -(-B * nrt * nct // nt)  # tiles per thread, at least
            time = max(total / nt, max(w for w, _ in works), rounds * min(w for w, _ in works))
            mem = (max(r[0] for r in row_kinds) + 2) * (max(c[0] for c in col_kinds) + 2)
            plans.append((time, mem, (rows, cols)))
    fastest = min(p[0] for p in plans)
    budget = tile_sites
    while True:
        fits = [p for p in plans if p[1] <= budget]
        if fits and min(p[0] for p in fits) <= 1.3 * fastest:
            rows, cols = min(fits, key=lambda p: (p[0], p[1]))[2]
            return tuple(rows), tuple(cols)
        budget *= 2


def _function(dtype: torch.dtype):
    fn = getattr(_library(), _SYMBOLS[dtype])
    if fn.argtypes is None:
        fn.argtypes = [_P, _P, _I, _I, _P, _P, _I, _P, _P, _I, _P, ctypes.c_int]
        fn.restype = ctypes.c_int
    return fn


def _linears(seq) -> list:
    return [m for m in seq if isinstance(m, torch.nn.Linear)]


def architecture(model) -> tuple[int, int, int, list[int]]:
    """(width, hidden, blocks, readout hidden widths) of an EnergyGNN, read from its modules."""
    width = model.embed.out_features
    hidden = model.blocks[0].self_mlp[0].out_features
    readout = [lin.out_features for lin in _linears(model.readout)[:-1]]
    return width, hidden, len(model.blocks), readout


def unsupported(model) -> str | None:
    """Why the kernel cannot run ``model`` (None if it can)."""
    seqs = [model.readout, *(s for block in model.blocks for s in (block.self_mlp, block.neighbour_mlp, block.update_mlp))]
    bad = sorted({type(m).__name__ for seq in seqs for m in seq if not isinstance(m, (torch.nn.Linear, torch.nn.SiLU))})
    if bad:
        return f"activation {bad[0]} (the kernel implements silu)"
    _, _, blocks, readout = architecture(model)
    if blocks > MAX_BLOCKS:
        return f"{blocks} blocks (the kernel supports up to {MAX_BLOCKS})"
    if len(readout) > MAX_READOUT:
        return f"{len(readout)} readout layers (the kernel supports up to {MAX_READOUT})"
    return None


def pack_parameters(model, dtype: torch.dtype) -> torch.Tensor:
    """All weights in the kernel's order (see ``Net::bind`` in gnn_energy_forward.cpp)."""
    parts = [model.embed.weight[:, 0], model.embed.bias]
    for block in model.blocks:
        for seq in (block.self_mlp, block.neighbour_mlp, block.update_mlp):
            l1, l2 = _linears(seq)
            parts += [l1.weight.t(), l1.bias, l2.weight.t(), l2.bias, l1.weight, l2.weight]
        P = block.residual.weight
        parts += [P.t(), P]
        if isinstance(block.norm, torch.nn.LayerNorm):
            parts += [block.norm.weight, block.norm.bias]
        else:
            parts += [torch.ones_like(P[0]), torch.zeros_like(P[0])]
    layers = _linears(model.readout)
    for lin in layers[:-1]:
        parts += [lin.weight.t(), lin.bias, lin.weight]
    parts.append(layers[-1].weight[0])
    with torch.no_grad():
        return torch.cat([p.detach().to(device="cpu", dtype=dtype).reshape(-1) for p in parts]).contiguous()


class EnergyGNNForces:
    """``F = -dE/dQ - k Q - kappa nn_sum(Q)`` of an EnergyGNN for CPU inference, in one native call."""

    def __init__(self, model, dtype: torch.dtype):
        why = unsupported(model)
        if why is not None:
            raise ValueError(f"native energy GNN: {why}")
        self.fn = _function(dtype)
        lib = _library()
        self.model, self.dtype = model, dtype
        width, hidden, blocks, readout = architecture(model)
        norms = [b.norm for b in model.blocks if isinstance(b.norm, torch.nn.LayerNorm)]
        self.eps = float(norms[0].eps) if norms else 1e-5
        if any(float(n.eps) != self.eps for n in norms) or len(norms) not in (0, blocks):
            raise ValueError("native energy GNN: LayerNorm differs between blocks")
        self.dims = torch.tensor([width, hidden, blocks, int(bool(norms)), len(readout), *readout], dtype=torch.int64)
        self.n_params = int(lib.ll_gnn_energy_n_params(self.dims.data_ptr()))
        self.lanes = int(lib.ll_gnn_energy_lanes(dtype.itemsize))
        self.blocks = blocks
        self.neighbour_scale = float(model.blocks[0].neighbour_scale)
        self._lib = lib
        # looked up in the modules every call: model.to() replaces the buffers, load_state_dict(assign=True) all
        self._watched = LiveTensors.of(model, ("q_mean", "q_std", "f_mean", "e_scale"))
        self._scalars_key = None
        self._plans: dict = {}  # (B, L, threads) -> (tile table, scratch elements)
        self._free: list[torch.Tensor] = []  # scratch buffers not in use (a concurrent call takes another)

    def prepare(self) -> None:
        """Repack the parameters if one changed since the last call."""
        if not self._watched.changed():
            return
        params = pack_parameters(self.model, self.dtype)
        if params.numel() != self.n_params:  # pragma: no cover - layout mismatch is a bug
            raise RuntimeError(f"native energy GNN: packed {params.numel()} parameters, kernel expects {self.n_params}")
        self.params = params

    def plan(self, B: int, L: int, nt: int) -> tuple[torch.Tensor, int]:
        """(tile table ``[n_rt, n_ct, row bounds..., column bounds...]``, scratch elements) for
        ``[B, L, L]`` on ``nt`` threads (cached)."""
        key = (B, L, nt)
        got = self._plans.get(key)
        if got is None:
            got = self.table(B, L, nt, *tile_plan(B, L, nt, self.blocks, self.lanes))
            self._plans[key] = got
        return got

    def table(self, B: int, L: int, nt: int, rows: list[int], cols: list[int]) -> tuple[torch.Tensor, int]:
        tiles = torch.tensor([len(rows) - 1, len(cols) - 1, *rows, *cols], dtype=torch.int64)
        size = self._lib.ll_gnn_energy_scratch(self.dims.data_ptr(), B, L, tiles.data_ptr(), nt, self.dtype.itemsize)
        if size < 0:
            raise ValueError(f"native energy GNN: bad tiles {rows} x {cols} for L={L}")
        return tiles, int(size)

    def __call__(self, Q: torch.Tensor, k: float = 0.0, kappa: float = 0.0, out: torch.Tensor | None = None,
                 check: bool = True) -> torch.Tensor:
        """Forces ``[B, L, L]`` of ``Q [B, L, L]`` (CPU, this object's dtype); ``k``, ``kappa``: an extra
        elastic force ``-k Q - kappa nn_sum(Q)`` on top of the model's own (its prior, if on); written into
        ``out`` (contiguous, like ``Q``) when given. ``check=False``: skip the check that the weights have
        not changed (a frozen force provider's calls, after one check)."""
        if check:
            self.prepare()
        if not Q.is_contiguous():
            Q = Q.contiguous()
        B, L = Q.shape[0], Q.shape[-1]
        if B == 0:
            return torch.empty_like(Q) if out is None else out
        key = (self._watched.key, float(k), float(kappa))
        if key != self._scalars_key:
            m = self.model
            self._scalars = torch.tensor([float(m.q_mean), 1.0 / float(m.q_std), float(m.f_mean), float(m.e_scale),
                                          m.elastic_k + float(k), m.elastic_kappa + float(kappa),
                                          self.neighbour_scale, self.eps], dtype=torch.float64)
            self._scalars_key = key
        nt = threads()
        tiles, size = self.plan(B, L, nt)
        try:
            scratch = self._free.pop()  # list.pop / append are atomic: concurrent calls take different buffers
        except IndexError:
            scratch = None
        if scratch is None or scratch.numel() < size:
            scratch = torch.zeros(size, dtype=self.dtype)  # zeros: no garbage in the halo of a first tile
        F = torch.empty_like(Q) if out is None else out
        try:
            rc = self.fn(Q.data_ptr(), F.data_ptr(), B, L, self.dims.data_ptr(), self.params.data_ptr(), self.n_params,
                         self._scalars.data_ptr(), scratch.data_ptr(), scratch.numel(), tiles.data_ptr(), nt)
        finally:
            self._free.append(scratch)
        if rc != 0:
            raise RuntimeError(f"native energy GNN forces failed (code {rc})")
        return F
