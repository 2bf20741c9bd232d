"""The semiclassical Holstein model: parameters, elastic terms and exact-diagonalisation forces."""

from lattice_lab.physics.ed import EDResult, ExactForces
from lattice_lab.physics.holstein import (
    HolsteinParams,
    density_from_force,
    elastic_energy,
    elastic_force,
    hopping_matrix,
)

__all__ = ["EDResult", "ExactForces", "HolsteinParams", "density_from_force", "elastic_energy",
           "elastic_force", "hopping_matrix"]
