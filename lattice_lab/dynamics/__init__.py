"""Langevin dynamics of lattice fields, generic over force providers ``[R, L, L] -> [R, L, L]``."""

from lattice_lab.dynamics.initial import random_hot_start
from lattice_lab.dynamics.langevin import LangevinIntegrator, LangevinParams, LangevinState

__all__ = ["LangevinIntegrator", "LangevinParams", "LangevinState", "random_hot_start"]
