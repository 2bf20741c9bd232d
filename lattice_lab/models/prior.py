"""Exact elastic prior: total force = the known elastic force + a learned electronic force.

The Holstein force splits into an exactly known linear part and the part that needs the electrons,

    F_i = g (<n_i> - 1/2)  +  [ -k Q_i - kappa sum_{j in nn(i)} Q_j ],

and only the first term (bounded by |g|/2) needs learning. :class:`ElasticPrior` wraps any
direct-force network so that it learns F - F_elastic while the model as a whole still predicts the
**total** force (the quantity datasets store and integrators use). The elastic term is D4- and
translation-equivariant, so the wrapped model keeps every symmetry of the network. Energy models
(``gnn_energy``) add the elastic *energy* themselves instead (their own ``elastic_prior`` option).

No ``from __future__ import annotations`` here: TorchScript must read the annotations.
"""

import torch

from lattice_lab.models.base import ForceField
from lattice_lab.physics.holstein import linear_elastic_force


class ElasticPrior(ForceField):
    """``forward(Q) = network(Q) - k Q - kappa nn_sum(Q)``; the network is fitted to the remainder."""

    def __init__(self, network: ForceField):
        super().__init__(network.hamiltonian, network.cutoff, max(network.receptive_field, 1))
        self.network = network
        # python floats, not buffers: exact in any dtype (a float32 buffer would round kappa)
        self.k = float(network.hamiltonian["k"])
        self.kappa = float(network.hamiltonian["kappa"])

    __jit_unused_properties__ = ["name"]  # noqa: RUF012 - TorchScript reads this list

    @property
    def name(self) -> str:
        """The wrapped network's model family (``enn``, ``gnn``, ``mlp``)."""
        return self.network.name

    @torch.jit.unused
    def __getattr__(self, attr: str):
        """Architecture attributes (``widths``, ``hidden``, ``layers``, ...) come from the network."""
        try:
            return super().__getattr__(attr)
        except AttributeError:
            if attr == "network":
                raise
            return getattr(super().__getattr__("network"), attr)

    @torch.jit.unused
    def native_function(self, Q: torch.Tensor, k: float = 0.0, kappa: float = 0.0, frozen: bool = False):
        """The network's native function with this prior's elastic force fused in."""
        return self.network.native_function(Q, self.k + k, self.kappa + kappa, frozen)

    def elastic_force(self, Q: torch.Tensor) -> torch.Tensor:
        return linear_elastic_force(Q, self.k, self.kappa)

    @torch.no_grad()
    def fit_normalization(self, Q: torch.Tensor, F: torch.Tensor) -> None:
        Q = torch.as_tensor(Q)
        F = torch.as_tensor(F)
        self.network.fit_normalization(Q, F - self.elastic_force(Q.to(F.dtype)))

    def compute_forces(self, Q: torch.Tensor) -> torch.Tensor:
        """TorchScript-compatible forces (needs the network's own ``compute_forces``)."""
        return self.network.compute_forces(Q) + self.elastic_force(Q)

    @torch.jit.unused
    def forward(self, Q: torch.Tensor) -> torch.Tensor:
        self.check_input(Q)
        F = self.network.native_forces(Q, self.k, self.kappa)  # one native call for both parts, if any
        if F is not None:
            return F
        return self.network(Q) + self.elastic_force(Q)
