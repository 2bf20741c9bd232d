"""Local CDW order parameter of the half-filled Holstein model (DESIGN.md section 6).

    phi_i = (-1)^(x_i + y_i) (n_i - (1/4) sum_{j in nn(i)} n_j)

For the checkerboard densities n = 1/2 +- (1/2)(-1)^(x+y) it is +1 / -1 everywhere; it is ~0 on a
domain wall between the two: exactly 0 on a row where n = 1/2 separating opposite domains, and
+-3/4 on the two rows of an atomically sharp (bond-centred) wall. A site counts as a domain-wall
site when |phi_i| < threshold (default 1/2).
"""

from __future__ import annotations

import numpy as np
import torch

from lattice_lab.analysis.correlation import as_field
from lattice_lab.common.errors import ConfigError, number_or_nan
from lattice_lab.lattice import checkerboard, nn_sum

WALL_THRESHOLD = 0.5  # a site is a domain-wall site when |phi_i| < this (order_parameter.wall_threshold's default)


def cdw_order_parameter_t(n: torch.Tensor) -> torch.Tensor:
    """phi [..., L, L] from the density n [..., L, L] (torch in, torch out)."""
    cb = checkerboard(n.shape[-1], dtype=n.dtype, device=n.device)
    return cb * (n - 0.25 * nn_sum(n))


def cdw_order_parameter(n, device=None) -> np.ndarray:
    """Local CDW order parameter phi_i of densities n [..., L, L] (numpy out)."""
    return cdw_order_parameter_t(as_field(n, device)).cpu().numpy()


def check_wall_threshold(threshold) -> float:
    """``order_parameter.wall_threshold`` as a number in (0, 1]; a ConfigError naming it otherwise."""
    value = number_or_nan(threshold)
    if not 0 < value <= 1:
        raise ConfigError(f"order_parameter.wall_threshold={threshold!r}: expected 0 < threshold <= 1")
    return value


def domain_wall_fraction_t(phi: torch.Tensor, threshold: float = WALL_THRESHOLD) -> torch.Tensor:
    return (phi.abs() < check_wall_threshold(threshold)).to(phi.dtype).mean(dim=(-2, -1))


def domain_wall_fraction(phi, threshold: float = WALL_THRESHOLD) -> np.ndarray:
    """Fraction of sites with |phi_i| < threshold, per configuration [...]."""
    return domain_wall_fraction_t(as_field(phi), threshold).cpu().numpy()


def order_parameter_mean(phi) -> np.ndarray:
    """Site average <phi> per configuration [...] (signed: +-1 in the two CDW ground states)."""
    return as_field(phi).mean(dim=(-2, -1)).cpu().numpy()
