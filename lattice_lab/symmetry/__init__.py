"""D4 point-group symmetry of the square lattice: group, irreps, Clebsch-Gordan coefficients,
the symmetry-adapted environment basis and the group action on periodic fields."""

from lattice_lab.symmetry.clebsch_gordan import clebsch_gordan, product_decomposition
from lattice_lab.symmetry.environment import EnvironmentBasis, environment_offsets
from lattice_lab.symmetry.field_ops import all_transforms, apply_group_element, periodic_correlate
from lattice_lab.symmetry.group import (
    D4_ELEMENTS,
    IRREP_DIM,
    IRREPS,
    characters,
    inverse,
    irrep_matrices,
    multiplication_table,
    projector,
)

__all__ = [
    "D4_ELEMENTS", "IRREPS", "IRREP_DIM", "EnvironmentBasis", "all_transforms", "apply_group_element",
    "characters", "clebsch_gordan", "environment_offsets", "inverse", "irrep_matrices",
    "multiplication_table", "periodic_correlate", "product_decomposition", "projector",
]
