"""A harmonic lattice: the elastic part of the Holstein model alone, as an exactly solvable test force.

    E(Q) = sum_i k Q_i^2 / 2 + kappa sum_<ij> Q_i Q_j,      F = -k Q - kappa sum_nn Q

Used to check integrators (equipartition, energy conservation) without electrons.
"""

from __future__ import annotations

import torch

from lattice_lab.common.errors import ConfigError
from lattice_lab.lattice import nn_sum


class HarmonicForce:
    """Force provider ``Q [R, L, L] -> -k Q - kappa nn_sum(Q)`` with :meth:`energy` per replica."""

    conservative = False

    def __init__(self, k: float = 1.0, kappa: float = 0.0):
        if not k > 0 or abs(kappa) >= k / 4:
            raise ConfigError(f"harmonic force k={k}, kappa={kappa}: need k > 0 and |kappa| < k/4")
        self.k, self.kappa = float(k), float(kappa)

    def __call__(self, Q: torch.Tensor) -> torch.Tensor:
        F = Q * (-self.k)
        if self.kappa:
            F.add_(nn_sum(Q), alpha=-self.kappa)
        return F

    def energy(self, Q: torch.Tensor) -> torch.Tensor:
        """Potential energy per replica [R]."""
        return (0.5 * self.k * Q * Q + 0.5 * self.kappa * Q * nn_sum(Q)).sum(dim=(-2, -1))
