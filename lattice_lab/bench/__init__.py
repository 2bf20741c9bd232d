"""Speed benchmark of the force fields: ``python -m lattice_lab.bench`` (config ``conf/bench.yaml``).

Measures, in one run on one machine: the dense-matmul GFLOP/s ceiling, every model preset's force
and full-Langevin-step time, memory and achieved GFLOP/s vs lattice size, exact diagonalisation
vs L, and checks the project's speed targets. See ``docs/bench.md``.
"""

from lattice_lab.bench.runner import run

__all__ = ["run"]
