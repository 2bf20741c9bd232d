"""Periodic square-lattice helpers shared by physics, models and analysis."""

from lattice_lab.lattice.periodic import checkerboard, gather_offsets, nn_sum, site_coordinates, translate

__all__ = ["checkerboard", "gather_offsets", "nn_sum", "site_coordinates", "translate"]
