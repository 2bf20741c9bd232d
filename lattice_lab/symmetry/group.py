"""The point group D4 (C4v) of the square lattice and its five irreducible representations.

Elements are 2x2 integer matrices acting on lattice offsets (x, y). Index 0 is the identity,
1-3 the rotations by 90, 180, 270 degrees (counter-clockwise), 4-7 the mirrors
(x-axis: y -> -y, y-axis: x -> -x, diagonal: x <-> y, anti-diagonal: (x, y) -> (-y, -x)).

Irreps (DESIGN.md section 4): A1 trivial; A2 = det (rotations +1, mirrors -1); B1 like x^2 - y^2
(+1 on elements that keep the axes, -1 on those that swap them); B2 = A2 * B1 (like xy);
E = the defining 2x2 representation, i.e. ``D4_ELEMENTS`` itself.
"""

from __future__ import annotations

from functools import cache

import numpy as np

from lattice_lab.common.errors import ConfigError

D4_ELEMENTS = np.array(
    [
        [[1, 0], [0, 1]],  # identity
        [[0, -1], [1, 0]],  # rotation by 90 degrees
        [[-1, 0], [0, -1]],  # rotation by 180 degrees
        [[0, 1], [-1, 0]],  # rotation by 270 degrees
        [[1, 0], [0, -1]],  # mirror across the x-axis (y -> -y)
        [[-1, 0], [0, 1]],  # mirror across the y-axis (x -> -x)
        [[0, 1], [1, 0]],  # mirror across the diagonal (x <-> y)
        [[0, -1], [-1, 0]],  # mirror across the anti-diagonal
    ],
    dtype=np.int64,
)
D4_ELEMENTS.setflags(write=False)

ELEMENT_NAMES = ("e", "C4", "C2", "C4^3", "sigma_x", "sigma_y", "sigma_d", "sigma_d'")
ORDER = 8
IRREPS = ("A1", "A2", "B1", "B2", "E")
IRREP_DIM = {"A1": 1, "A2": 1, "B1": 1, "B2": 1, "E": 2}


def _check_irrep(name: str) -> None:
    if name not in IRREP_DIM:
        raise ConfigError(f"irrep={name!r}: expected one of {list(IRREPS)}")


def element_index(matrix) -> int:
    """Index of a 2x2 integer matrix in ``D4_ELEMENTS``."""
    m = np.asarray(matrix, dtype=np.int64)
    for i, g in enumerate(D4_ELEMENTS):
        if np.array_equal(g, m):
            return i
    raise ValueError(f"{m.tolist()} is not an element of D4")


@cache
def _table() -> np.ndarray:
    return np.array([[element_index(D4_ELEMENTS[i] @ D4_ELEMENTS[j]) for j in range(ORDER)]
                     for i in range(ORDER)], dtype=np.int64)


def multiplication_table() -> np.ndarray:
    """``T[i, j] = k`` with ``g_i @ g_j = g_k``."""
    return _table().copy()


def inverse(i: int) -> int:
    """Index of the inverse of element ``i``."""
    return int(np.nonzero(_table()[i] == 0)[0][0])


@cache
def _irrep(name: str) -> np.ndarray:
    g = D4_ELEMENTS.astype(np.float64)
    det = np.round(np.linalg.det(g))
    keeps_axes = (D4_ELEMENTS[:, 0, 1] == 0).astype(np.float64) * 2.0 - 1.0  # +1 diag, -1 off-diag
    if name == "A1":
        out = np.ones((ORDER, 1, 1))
    elif name == "A2":
        out = det.reshape(ORDER, 1, 1)
    elif name == "B1":
        out = keeps_axes.reshape(ORDER, 1, 1)
    elif name == "B2":
        out = (det * keeps_axes).reshape(ORDER, 1, 1)
    else:
        out = g.copy()
    out.setflags(write=False)
    return out


def irrep_matrices(name: str) -> np.ndarray:
    """float64 ``[8, d, d]`` matrices of irrep ``name`` (a homomorphism of D4)."""
    _check_irrep(name)
    return _irrep(name).copy()


def characters() -> dict[str, np.ndarray]:
    """Character ``chi_ir[8]`` (trace of the irrep matrices) for every irrep."""
    return {name: np.trace(_irrep(name), axis1=1, axis2=2).copy() for name in IRREPS}


def _check_rep(rep) -> np.ndarray:
    rep = np.asarray(rep, dtype=np.float64)
    if rep.ndim != 3 or rep.shape[0] != ORDER or rep.shape[1] != rep.shape[2]:
        raise ValueError(f"a representation must have shape [8, n, n], got {rep.shape}")
    return rep


def projector(name: str, rep) -> np.ndarray:
    """Isotypic projector ``P = d/|G| sum_g chi(g) rep(g)`` onto the ``name`` part of ``rep [8, n, n]``.

    All D4 irreps are real, so no complex conjugation is needed.
    """
    _check_irrep(name)
    rep = _check_rep(rep)
    chi = np.trace(_irrep(name), axis1=1, axis2=2)
    return IRREP_DIM[name] / ORDER * np.einsum("g,gij->ij", chi, rep)


def matrix_element_projector(name: str, i: int, j: int, rep) -> np.ndarray:
    """``P_ij = d/|G| sum_g D_ij(g) rep(g)``: maps the j-th partner of each copy of ``name`` to the i-th.

    ``P_ii`` projects onto the i-th basis function of every copy; ``P_ij v`` generates from a vector
    ``v`` in the range of ``P_jj`` its partner that transforms exactly by ``irrep_matrices(name)``.
    """
    _check_irrep(name)
    rep = _check_rep(rep)
    D = _irrep(name)
    return IRREP_DIM[name] / ORDER * np.einsum("g,gab->ab", D[:, i, j], rep)


def orthonormal_range(P: np.ndarray, tol: float = 1e-9) -> np.ndarray:
    """Orthonormal basis (columns) of the range of a projector, canonical and deterministic.

    Gram-Schmidt over the columns of ``P`` in order (``P e_0, P e_1, ...``), skipping dependent
    ones; each vector's sign is fixed by making its first non-negligible entry positive.
    """
    vecs: list[np.ndarray] = []
    for k in range(P.shape[1]):
        v = P[:, k].astype(np.float64).copy()
        for u in vecs:
            v -= (u @ v) * u
        for u in vecs:  # second pass for numerical orthogonality
            v -= (u @ v) * u
        n = np.linalg.norm(v)
        if n > tol:
            v /= n
            lead = np.nonzero(np.abs(v) > 1e-9)[0][0]
            vecs.append(v if v[lead] > 0 else -v)
    if not vecs:
        return np.zeros((P.shape[0], 0))
    return np.stack(vecs, axis=1)


def multiplicity(name: str, rep) -> int:
    """How often irrep ``name`` occurs in ``rep [8, n, n]`` (from characters)."""
    rep = _check_rep(rep)
    chi_rep = np.trace(rep, axis1=1, axis2=2)
    chi = np.trace(_irrep(name), axis1=1, axis2=2)
    return int(round(float(chi @ chi_rep) / ORDER))


def adapted_basis(rep, tol: float = 1e-9) -> dict[str, np.ndarray]:
    """Symmetry-adapted orthonormal basis of an orthogonal representation ``rep [8, n, n]``.

    Returns ``{irrep: C [m, d, n]}`` (``m`` copies, empty irreps omitted) such that for every element
    ``C[k] @ rep(g) = irrep_matrices(irrep)(g) @ C[k]``: the coordinates ``C[k] @ z`` of a vector ``z``
    transform exactly by the irrep matrices when ``z -> rep(g) z``. The columns ``v_c = C[k, c]``
    are standard partners, ``rep(h) v_c = sum_c' D_c'c(h) v_c'``: ``v_0`` spans the range of the
    matrix-element projector ``P_00`` (canonical Gram-Schmidt), ``v_1 = P_10 v_0``. All rows
    together form an orthonormal set (a complete one: ``sum_ir m_ir d_ir = n``).
    """
    rep = _check_rep(rep)
    n = rep.shape[1]
    if not np.allclose(np.einsum("gij,gik->gjk", rep, rep), np.eye(n)[None], atol=1e-10):
        raise ValueError("adapted_basis needs an orthogonal representation")
    out: dict[str, np.ndarray] = {}
    for name in IRREPS:
        d = IRREP_DIM[name]
        first = orthonormal_range(matrix_element_projector(name, 0, 0, rep), tol=tol)  # [n, m]
        m = first.shape[1]
        if m == 0:
            continue
        partners = [first] + [matrix_element_projector(name, c, 0, rep) @ first for c in range(1, d)]
        C = np.stack(partners, axis=1).transpose(2, 1, 0)  # [m, d, n]
        out[name] = np.ascontiguousarray(C)
    return out
