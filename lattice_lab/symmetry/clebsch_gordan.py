"""Clebsch-Gordan coefficients of D4, derived numerically from the irrep matrices.

For irreps ``ir1`` (dim d1) and ``ir2`` (dim d2) the product representation is
``kron(rho1(g), rho2(g))`` acting on ``x (x) y``. Projecting it with the matrix-element projectors of
:mod:`lattice_lab.symmetry.group` gives, for every irrep ``out`` it contains, a map
``C [d_out, d1, d2]`` with

    z_c = sum_ab C[c, a, b] x_a y_b   transforming exactly by ``irrep_matrices(out)``.

The basis inside a 2-d (E) copy is fixed by the projector ``P^E_00`` and its partner
``P^E_10`` (no sign tables copied from elsewhere); each C, viewed as a [d_out, d1*d2] map, has
orthonormal rows. In D4 every product contains each irrep at most once.
"""

from __future__ import annotations

from functools import cache

import numpy as np

from lattice_lab.symmetry.group import IRREP_DIM, IRREPS, _check_irrep, adapted_basis, irrep_matrices


def product_representation(ir1: str, ir2: str) -> np.ndarray:
    """``kron(rho1(g), rho2(g))`` as ``[8, d1*d2, d1*d2]``."""
    r1, r2 = irrep_matrices(ir1), irrep_matrices(ir2)
    return np.stack([np.kron(a, b) for a, b in zip(r1, r2)])


@cache
def _cg(ir1: str, ir2: str) -> tuple[tuple[str, np.ndarray], ...]:
    d1, d2 = IRREP_DIM[ir1], IRREP_DIM[ir2]
    basis = adapted_basis(product_representation(ir1, ir2))
    out = []
    for name in IRREPS:
        if name not in basis:
            continue
        C = basis[name]
        if C.shape[0] != 1:  # pragma: no cover - D4 products are multiplicity free
            raise RuntimeError(f"{ir1} x {ir2} contains {name} {C.shape[0]} times")
        C = C[0].reshape(IRREP_DIM[name], d1, d2)
        C[np.abs(C) < 1e-14] = 0.0
        C.setflags(write=False)
        out.append((name, C))
    return tuple(out)


def product_decomposition(ir1: str, ir2: str) -> list[str]:
    """Irreps contained in ``ir1 x ir2`` (each once), in ``IRREPS`` order."""
    _check_irrep(ir1)
    _check_irrep(ir2)
    return [name for name, _ in _cg(ir1, ir2)]


def clebsch_gordan(ir1: str, ir2: str) -> dict[str, np.ndarray]:
    """``{out: C [d_out, d1, d2]}`` for every irrep ``out`` in ``ir1 x ir2`` (float64 copies)."""
    _check_irrep(ir1)
    _check_irrep(ir2)
    return {name: C.copy() for name, C in _cg(ir1, ir2)}
