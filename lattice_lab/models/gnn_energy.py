"""Energy-based (conservative) graph network (gnn_paper Sec. V, DESIGN.md section 5).

The network predicts a local energy e_i per site; the total energy is E = sum_i e_i and the force
is its exact negative gradient, F_i = -dE/dQ_i, by automatic differentiation. Forces are therefore
conservative by construction (curl-free, energy conserved by the dynamics at gamma = T = 0).

Architecture, all per-site maps shared across sites (translation invariance) and one neighbour
weight for all four neighbours (D4 invariance):

    x_i   = (Q_i - q_mean) / q_std,      h_i^0 = x_i W_embed + b
    block: m_i   = MLP_self(h_i) + AGG_{j in nn(i)} MLP_nn(h_j)      (messages before aggregation)
           h_i' = LayerNorm(h_i P + MLP_update(m_i))                 (P: residual projection)
    e_i   = f_std q_std MLP_readout(h_i) - f_mean Q_i  [+ k Q_i^2/2 + (kappa/2) Q_i sum_nn Q_j]

Each block reaches one hop further, so e_i depends on Q within ``blocks`` hops and F_i (a sum of
derivatives of the e_j around i) within ``2 * blocks`` hops: the receptive field.

The optional elastic prior adds the exact elastic energy of the Holstein lattice
(``physics.holstein.elastic_energy``, each bond once), so the network only learns the electronic
part; the model still outputs the total force. The output scaling is chosen so that the learned
part of the force is ``f_std * (-d readout / dx) + f_mean``, with ``f_mean``/``f_std`` fitted on
the force minus its elastic part.

CPU inference (no graph kept for training, ``Q`` not requiring grad, float32/float64, SiLU) runs
the whole force, forward pass and hand-written backward pass, in one call of a C++ kernel
(:mod:`lattice_lab.native.gnn_energy`, option ``native_kernel``); it computes the same function as
the autograd path (tests compare them to floating-point precision), and ``compute_forces`` (the
TorchScript export) keeps autograd.
"""

from __future__ import annotations

import torch
from torch import nn

from lattice_lab.common.errors import ConfigError
from lattice_lab.common.switch import check_flag
from lattice_lab.lattice import nn_sum
from lattice_lab.models.base import ForceField
from lattice_lab.models.gnn import check_aggregation, make_activation, nn_sum_channels_last
from lattice_lab.native.policy import applicable, build_or_fallback, check_setting
from lattice_lab.physics.holstein import linear_elastic_force
from lattice_lab.symmetry.field_ops import ring_index

# ``native_kernel: auto`` runs the C++ kernel up to this width (channels); wider models, not measured,
# keep the torch path. Measured (float32, B = 1, dynamics' force provider, us per site, native / torch,
# L = 32 and 64): width 16 (gnn_energy_small) 0.19 / 1.0 and 0.18 / 0.6 on 1 thread; blocks 4, readout
# [64] on 2 threads: width 32 0.65 / 2.5, 0.64 / 1.9; width 64 2.1 / 6.0, 2.2 / 4.7; width 128 (the
# gnn_energy preset) 7.1 / 14.0, 6.8 / 12.7 (1 thread: 11.6 / 23.9, 11.8 / 24.9); width 256 on 1 thread
# 71 / 137 at L = 32. The kernel's dense maps reach ~150 GFLOP/s on one AVX-512 core, about twice the
# MKL matrix products of the eager path, whose autograd overhead adds the rest for narrow models.
NATIVE_AUTO_MAX_WIDTH = 256


def _positive_int(value, key: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{key}={value!r}: expected a positive integer")
    return int(value)


def mlp(sizes: list[int], activation: str, last_bias: bool = True) -> nn.Sequential:
    """Linear layers ``sizes[0] -> ... -> sizes[-1]`` with the activation between them (not after the last)."""
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1], bias=last_bias or i < len(sizes) - 2))
        if i < len(sizes) - 2:
            layers.append(make_activation(activation))
    return nn.Sequential(*layers)


class EnergyBlock(nn.Module):
    """One message-passing block on channels-last features ``[B, L, L, C]`` (see module docstring)."""

    def __init__(self, width: int, hidden: int, neighbour_scale: float, activation: str, layer_norm: bool):
        super().__init__()
        self.neighbour_scale = float(neighbour_scale)
        self.self_mlp = mlp([width, hidden, width], activation)
        self.neighbour_mlp = mlp([width, hidden, width], activation)
        self.update_mlp = mlp([width, hidden, width], activation)
        self.residual = nn.Linear(width, width, bias=False)
        self.norm = nn.LayerNorm(width) if layer_norm else nn.Identity()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        m = self.self_mlp(h) + self.neighbour_scale * nn_sum_channels_last(self.neighbour_mlp(h))
        return self.norm(self.residual(h) + self.update_mlp(m))


class EnergyGNN(ForceField):
    """Conservative message-passing network: site energies, forces = -dE/dQ (autograd).

    Args:
        hamiltonian: Holstein parameters (t, g, k, kappa, ...); ``k`` and ``kappa`` feed the elastic prior.
        cutoff: interaction range recorded for compatibility checks; default = receptive field
            (``2 * blocks`` hops).
        width: feature width of every block.
        blocks: number of message-passing blocks.
        hidden: hidden width of the message/update MLPs (default ``width``).
        readout: hidden widths of the site-energy readout MLP (``width -> *readout -> 1``).
        aggregation: ``"sum"`` or ``"mean"`` over the four nearest neighbours.
        activation: smooth nonlinearity (default SiLU; forces are its derivative).
        layer_norm: LayerNorm after every block.
        elastic_prior: add the exact elastic energy k Q^2/2 + kappa sum_<ij> Q_i Q_j.
        chunk_sites: sites per autograd graph at CPU inference on the torch path.
        native_kernel: ``auto`` (default), ``true`` or ``false``: CPU inference (no graph kept for
            training) through the C++ kernel (``lattice_lab.native.gnn_energy``: forward and
            hand-written backward pass in one call); see :mod:`lattice_lab.native.policy`. ``auto``
            uses it for SiLU models up to :data:`NATIVE_AUTO_MAX_WIDTH` channels (the torch path
            otherwise, silently); ``true`` always (a model it cannot run is a ConfigError).
    """

    name = "gnn_energy"
    conservative = True
    __jit_ignored_attributes__ = ["_native"]  # noqa: RUF012 - Python-only cache

    def __init__(self, hamiltonian: dict, cutoff: float | None = None, width: int = 128, blocks: int = 4,
                 hidden: int | None = None, readout=(64,), aggregation: str = "sum",
                 activation: str = "silu", layer_norm: bool = True, elastic_prior: bool = True,
                 chunk_sites: int = 32768, native_kernel: str | bool = "auto"):
        width = _positive_int(width, "model.width")
        blocks = _positive_int(blocks, "model.blocks")
        hidden = width if hidden is None else _positive_int(hidden, "model.hidden")
        readout = list(readout) if isinstance(readout, (list, tuple)) else readout
        if not isinstance(readout, list):
            raise ConfigError(f"model.readout={readout!r}: expected a list of hidden widths")
        for w in readout:
            _positive_int(w, "model.readout[]")
        scale = check_aggregation(aggregation)
        make_activation(activation)
        for key, flag in (("layer_norm", layer_norm), ("elastic_prior", elastic_prior)):
            check_flag(flag, f"model.{key}")
        chunk_sites = _positive_int(chunk_sites, "model.chunk_sites")
        native_kernel = check_setting(native_kernel)
        receptive_field = 2 * blocks
        if cutoff is None:
            cutoff = float(receptive_field)
        if not isinstance(cutoff, (int, float)) or isinstance(cutoff, bool) or not cutoff > 0:
            raise ConfigError(f"model.cutoff={cutoff!r}: expected a positive number (or null)")
        super().__init__(hamiltonian, float(cutoff), receptive_field)
        k, kappa = 0.0, 0.0
        if elastic_prior:
            missing = [key for key in ("k", "kappa") if key not in self.hamiltonian]
            if missing:
                raise ConfigError(f"hamiltonian.{missing[0]} is missing: model.elastic_prior=true needs k and kappa")
            k, kappa = float(self.hamiltonian["k"]), float(self.hamiltonian["kappa"])
        self.elastic_k = k
        self.elastic_kappa = kappa
        self.use_elastic_prior = bool(elastic_prior)
        self.model_cfg = {"name": self.name, "cutoff": float(cutoff), "width": width, "blocks": blocks,
                          "hidden": hidden, "readout": list(readout), "aggregation": aggregation,
                          "activation": activation, "layer_norm": layer_norm, "elastic_prior": elastic_prior,
                          "chunk_sites": chunk_sites, "native_kernel": native_kernel}
        self.chunk_sites = chunk_sites
        self.native_kernel = native_kernel
        self._native: dict = {}  # (dtype, setting) -> EnergyGNNForces, or the reason the kernel is unavailable
        self.embed = nn.Linear(1, width)
        self.blocks = nn.ModuleList(
            [EnergyBlock(width, hidden, scale, activation, layer_norm) for _ in range(blocks)])
        # no bias on the energy output: a constant energy per site does not change the forces
        self.readout = mlp([width, *readout, 1], activation, last_bias=False)
        for name in ("q_mean", "f_mean"):
            self.register_buffer(name, torch.tensor(0.0))
        for name in ("q_std", "f_std"):
            self.register_buffer(name, torch.tensor(1.0))
        # readout scale: f_std * q_std, so that -d(e_scale * r)/dQ = -f_std * dr/dx
        self.register_buffer("e_scale", torch.tensor(1.0))
        if native_kernel is True:
            from lattice_lab.native.gnn_energy import unsupported

            why = unsupported(self)
            if why is not None:
                raise ConfigError(f"model.native_kernel=true: the native energy GNN kernel cannot run {why}; "
                                  "use native_kernel: auto or false")

    def __getstate__(self):  # copies / pickles drop the native kernel cache (ctypes objects)
        state = dict(super().__getstate__())
        state["_native"] = {}
        return state

    # -- energies ---------------------------------------------------------------------------
    def elastic_site_energy(self, Q: torch.Tensor) -> torch.Tensor:
        """k Q_i^2 / 2 + (kappa / 2) Q_i sum_nn Q_j: sums to ``physics.holstein.elastic_energy``."""
        return 0.5 * self.elastic_k * Q * Q + 0.5 * self.elastic_kappa * Q * nn_sum(Q)

    def site_energy(self, Q: torch.Tensor) -> torch.Tensor:
        """Local energies e_i ``[B, L, L]``; E = sum_i e_i."""
        h = self.embed(((Q - self.q_mean) / self.q_std).unsqueeze(-1))
        for block in self.blocks:
            h = block(h)
        e = self.e_scale * self.readout(h).squeeze(-1) - self.f_mean * Q
        if self.use_elastic_prior:
            e = e + self.elastic_site_energy(Q)
        return e

    def energy(self, Q: torch.Tensor) -> torch.Tensor:
        """Total energy per configuration ``[B]``."""
        return self.site_energy(Q).sum(dim=(-2, -1))

    # -- forces -----------------------------------------------------------------------------
    def compute_forces(self, Q: torch.Tensor) -> torch.Tensor:
        """F = -dE/dQ without input checks (TorchScript-compatible; used by the exported module).

        Enables grad locally (works under ``torch.no_grad()``). In training mode (and with grad
        enabled by the caller) the graph of the gradient is kept (``create_graph=True``) so a force
        loss can be back-propagated to the weights; in eval mode or under ``no_grad`` it is not, and
        the returned forces carry no graph.
        """
        previous = torch.is_grad_enabled()
        torch.set_grad_enabled(True)
        F = self._autograd_forces(Q, self.training and previous)
        torch.set_grad_enabled(previous)
        return F

    def _autograd_forces(self, Q: torch.Tensor, create_graph: bool) -> torch.Tensor:
        q = Q if Q.requires_grad else Q.detach().requires_grad_(True)
        E = self.site_energy(q).sum()
        grad = torch.autograd.grad([E], [q], create_graph=create_graph)[0]
        if grad is None:  # cannot happen (the readout always depends on Q); needed by TorchScript
            return torch.zeros_like(Q)
        return -grad

    @torch.jit.unused
    def forward(self, Q: torch.Tensor) -> torch.Tensor:
        self.check_input(Q)
        create_graph = self.training and torch.is_grad_enabled()
        if not create_graph and not Q.requires_grad:
            F = self.native_forces(Q)
            if F is not None:
                return F
        with torch.enable_grad():  # restores the caller's grad mode even if autograd raises
            if (create_graph or Q.requires_grad or Q.device.type != "cpu"
                    or Q.shape[0] * Q.shape[-1] ** 2 <= self.chunk_sites):
                return self._autograd_forces(Q, create_graph)
            return self._chunked_forces(Q)

    # -- native CPU inference (lattice_lab.native.gnn_energy) -----------------------------------
    @torch.jit.unused
    def native_function(self, Q: torch.Tensor, k: float = 0.0, kappa: float = 0.0, frozen: bool = False):
        """See :meth:`ForceField.native_function`: the forward and hand-written backward pass of
        :class:`lattice_lab.native.gnn_energy.EnergyGNNForces`. Not where autograd must see the forces
        (training with grad enabled, or ``Q.requires_grad``); grad mode itself does not matter (the
        dynamics calls conservative models under ``torch.enable_grad()``). With ``auto`` not for a
        model the kernel cannot run or one wider than :data:`NATIVE_AUTO_MAX_WIDTH`."""
        if ((self.training and torch.is_grad_enabled()) or Q.requires_grad
                or not applicable(self.native_kernel, Q, grad_free=False)):
            return None
        key = (Q.dtype, self.native_kernel)
        got = self._native.get(key)
        if got is None:
            got = self._build_native(Q.dtype)
            self._native[key] = got
        if isinstance(got, Exception):
            return None
        if frozen:
            got.prepare()
        check = not frozen
        return lambda Q, out=None: got(Q, k, kappa, out, check)

    @torch.jit.unused
    def _build_native(self, dtype: torch.dtype):
        from lattice_lab.native import NativeUnavailable
        from lattice_lab.native.gnn_energy import EnergyGNNForces, unsupported

        if self.native_kernel == "auto":
            why = unsupported(self)
            if why is None and self.embed.out_features > NATIVE_AUTO_MAX_WIDTH:
                why = f"width {self.embed.out_features} > {NATIVE_AUTO_MAX_WIDTH} (not measured: the torch path)"
            if why is not None:
                return NativeUnavailable(why)  # silently the torch path
        return build_or_fallback(self.native_kernel, "energy GNN", lambda: EnergyGNNForces(self, dtype))

    @torch.jit.unused
    def _chunked_forces(self, Q: torch.Tensor) -> torch.Tensor:
        """The same forces on CPU inference, evaluated in pieces of about ``chunk_sites`` sites so that
        the autograd graph stays cache-sized (L = 256, 2 threads: 14.5 us/site against 30.8 for one
        graph of the whole lattice; a GPU runs one graph): groups of whole configurations, or, for a
        large configuration, bands of rows. A band carries a halo of ``blocks`` rows on each side (the reach of a site energy);
        only the energies of its own rows are summed, and the gradient with respect to the whole
        padded band (halo included) is added back at the periodic row indices. The total is exactly
        -dE/dQ: every site energy is counted once, by the band that owns its row."""
        B, L = Q.shape[0], Q.shape[-1]
        if L * L <= self.chunk_sites:
            per = max(1, self.chunk_sites // (L * L))
            return torch.cat([self._autograd_forces(Q[i:i + per], False) for i in range(0, B, per)])
        H = len(self.blocks)
        rows = max(1, self.chunk_sites // L)
        ring = ring_index(L, H, Q.device)
        out = torch.zeros_like(Q)
        for i in range(B):
            for r0 in range(0, L, rows):
                h = min(rows, L - r0)
                idx = ring[r0:r0 + h + 2 * H]
                q = Q[i:i + 1].index_select(-2, idx).detach().requires_grad_(True)
                e = self.site_energy(q)[:, H:H + h].sum()
                out[i:i + 1].index_add_(-2, idx, torch.autograd.grad([e], [q])[0], alpha=-1.0)
        return out

    @torch.no_grad()
    def fit_normalization(self, Q, F) -> None:
        """Input shift/scale from Q; output shift/scale from F minus its elastic part (if the prior is on)."""
        Q = torch.as_tensor(Q).detach().to(device="cpu", dtype=torch.float64)
        F = torch.as_tensor(F).detach().to(device="cpu", dtype=torch.float64)
        if Q.shape != F.shape or Q.dim() < 2:
            raise ConfigError(f"fit_normalization: Q {tuple(Q.shape)} and F {tuple(F.shape)} must be equal [..., L, L]")
        residual = F
        if self.use_elastic_prior:
            residual = F - linear_elastic_force(Q, self.elastic_k, self.elastic_kappa)
        q_std, f_std = self.fill_scalar_normalization(Q, residual)
        self.e_scale.fill_(f_std * q_std)
