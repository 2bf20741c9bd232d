"""D4 group, irreps, Clebsch-Gordan coefficients, environment basis and the action on fields."""

import itertools
import math

import numpy as np
import pytest
import torch

from lattice_lab.common.errors import ConfigError
from lattice_lab.lattice import translate
from lattice_lab.symmetry import (
    D4_ELEMENTS,
    IRREP_DIM,
    IRREPS,
    EnvironmentBasis,
    all_transforms,
    apply_group_element,
    characters,
    clebsch_gordan,
    environment_offsets,
    inverse,
    irrep_matrices,
    multiplication_table,
    product_decomposition,
    projector,
)
from lattice_lab.symmetry.clebsch_gordan import product_representation
from lattice_lab.symmetry.group import ELEMENT_NAMES, adapted_basis, multiplicity


def test_group_structure():
    assert np.array_equal(D4_ELEMENTS[0], np.eye(2, dtype=int))
    assert len({tuple(g.ravel()) for g in D4_ELEMENTS}) == 8
    T = multiplication_table()
    for i, j in itertools.product(range(8), repeat=2):
        assert np.array_equal(D4_ELEMENTS[i] @ D4_ELEMENTS[j], D4_ELEMENTS[T[i, j]])
    for i in range(8):
        assert sorted(T[i]) == list(range(8))  # Latin square
        assert np.array_equal(D4_ELEMENTS[i] @ D4_ELEMENTS[inverse(i)], np.eye(2, dtype=int))
    dets = np.round(np.linalg.det(D4_ELEMENTS.astype(float)))
    assert list(dets) == [1, 1, 1, 1, -1, -1, -1, -1]  # rotations then mirrors


@pytest.mark.parametrize("ir", IRREPS)
def test_irreps_are_homomorphisms(ir):
    D = irrep_matrices(ir)
    assert D.dtype == np.float64 and D.shape == (8, IRREP_DIM[ir], IRREP_DIM[ir])
    T = multiplication_table()
    for i, j in itertools.product(range(8), repeat=2):
        np.testing.assert_allclose(D[i] @ D[j], D[T[i, j]], atol=1e-15)
    np.testing.assert_array_equal(D[0], np.eye(IRREP_DIM[ir]))


def test_E_is_defining_rep_and_character_orthogonality():
    np.testing.assert_array_equal(irrep_matrices("E"), D4_ELEMENTS.astype(float))
    chi = characters()
    G = np.array([chi[ir] for ir in IRREPS])
    np.testing.assert_allclose(G @ G.T / 8, np.eye(5), atol=1e-14)  # Schur orthogonality
    assert sum(IRREP_DIM[ir] ** 2 for ir in IRREPS) == 8
    # B1 ~ x^2 - y^2 and B2 ~ xy: f(g^-1 r) = chi(g) f(r)
    rng = np.random.default_rng(0)
    r = rng.normal(size=2)
    for g in range(8):
        s = D4_ELEMENTS[inverse(g)] @ r
        assert math.isclose(s[0] ** 2 - s[1] ** 2, chi["B1"][g] * (r[0] ** 2 - r[1] ** 2))
        assert math.isclose(s[0] * s[1], chi["B2"][g] * r[0] * r[1])


def test_projectors_on_regular_representation():
    T = multiplication_table()
    reg = np.zeros((8, 8, 8))
    for g in range(8):
        reg[g, T[g], np.arange(8)] = 1.0
    total = np.zeros((8, 8))
    for ir in IRREPS:
        P = projector(ir, reg)
        np.testing.assert_allclose(P @ P, P, atol=1e-14)
        assert round(np.trace(P)) == IRREP_DIM[ir] ** 2
        assert multiplicity(ir, reg) == IRREP_DIM[ir]  # each irrep d times in the regular representation
        total += P
    np.testing.assert_allclose(total, np.eye(8), atol=1e-14)


def test_element_conventions():
    """The labels mean what ELEMENT_NAMES says: C4 turns x into y (counter-clockwise), sigma_x keeps x
    and flips y, sigma_d swaps x and y. The group-summed quantities above cannot see a relabelling."""
    x, y = np.array([1, 0]), np.array([0, 1])
    names = dict(zip(ELEMENT_NAMES, D4_ELEMENTS))
    assert (names["C4"] @ x).tolist() == y.tolist() and (names["C4"] @ y).tolist() == (-x).tolist()
    assert (names["C4^3"] @ x).tolist() == (-y).tolist()
    assert (names["sigma_x"] @ y).tolist() == (-y).tolist() and (names["sigma_x"] @ x).tolist() == x.tolist()
    assert (names["sigma_d"] @ x).tolist() == y.tolist()


def test_translate_moves_content_by_the_shift():
    """translate(f, s)[x] = f[x - s]: a delta at the origin lands at s (periodically)."""
    f = torch.zeros(5, 5)
    f[0, 0] = 1.0
    assert torch.nonzero(translate(f, (1, 2))).tolist() == [[1, 2]]
    assert torch.nonzero(translate(f, (-1, 7))).tolist() == [[4, 2]]


def test_clebsch_gordan_of_two_doublets_follows_design():
    """E x E in the (x, y) basis (DESIGN.md): A1 ~ x1y1 + x2y2, A2 ~ x1y2 - x2y1, B1 ~ x1y1 - x2y2,
    B2 ~ x1y2 + x2y1, each normalised by 1/sqrt(2) with this sign (the sign of a learned product's weight)."""
    cg = clebsch_gordan("E", "E")
    expected = {"A1": [[1, 0], [0, 1]], "A2": [[0, 1], [-1, 0]], "B1": [[1, 0], [0, -1]], "B2": [[0, 1], [1, 0]]}
    assert list(cg) == list(expected)
    for name, C in expected.items():
        np.testing.assert_allclose(cg[name][0], np.array(C) / math.sqrt(2), atol=1e-15)


@pytest.mark.parametrize("ir1,ir2", list(itertools.product(IRREPS, IRREPS)))
def test_clebsch_gordan_intertwines(ir1, ir2):
    cg = clebsch_gordan(ir1, ir2)
    d1, d2 = IRREP_DIM[ir1], IRREP_DIM[ir2]
    assert sum(IRREP_DIM[o] for o in cg) == d1 * d2
    assert list(cg) == product_decomposition(ir1, ir2)
    R = product_representation(ir1, ir2)
    rows = []
    for out, C in cg.items():
        assert C.shape == (IRREP_DIM[out], d1, d2)
        Cm = C.reshape(IRREP_DIM[out], d1 * d2)
        np.testing.assert_allclose(Cm @ Cm.T, np.eye(IRREP_DIM[out]), atol=1e-14)
        D = irrep_matrices(out)
        for g in range(8):
            np.testing.assert_allclose(Cm @ R[g], D[g] @ Cm, atol=1e-14)
        rows.append(Cm)
    full = np.concatenate(rows)
    np.testing.assert_allclose(full @ full.T, np.eye(d1 * d2), atol=1e-14)
    # on random vectors: the coupled product of transformed inputs is the transformed output
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=d1), rng.normal(size=d2)
    for g in range(8):
        gx, gy = irrep_matrices(ir1)[g] @ x, irrep_matrices(ir2)[g] @ y
        for out, C in cg.items():
            np.testing.assert_allclose(np.einsum("cab,a,b->c", C, gx, gy),
                                       irrep_matrices(out)[g] @ np.einsum("cab,a,b->c", C, x, y), atol=1e-14)


def test_product_table_matches_design():
    one_d = ["A1", "A2", "B1", "B2"]
    expected = {("A2", "A2"): "A1", ("B1", "B1"): "A1", ("B2", "B2"): "A1", ("A2", "B1"): "B2",
                ("A2", "B2"): "B1", ("B1", "B2"): "A2"}
    for (a, b), out in expected.items():
        assert product_decomposition(a, b) == [out] == product_decomposition(b, a)
    for a in one_d:
        assert product_decomposition(a, "E") == ["E"]
    assert product_decomposition("E", "E") == ["A1", "A2", "B1", "B2"]
    # E x E in the (x, y) basis (DESIGN.md section 4), each up to the overall sign fixed by the
    # projector construction: A1 ~ x1y1 + x2y2, A2 ~ x1y2 - x2y1, B1 ~ x1y1 - x2y2, B2 ~ x1y2 + x2y1.
    # Relative signs matter: abs() alone cannot tell A1 from B1, or A2 from B2.
    C = clebsch_gordan("E", "E")
    forms = {"A1": [[1, 0], [0, 1]], "A2": [[0, 1], [-1, 0]], "B1": [[1, 0], [0, -1]], "B2": [[0, 1], [1, 0]]}
    for out, form in forms.items():
        ref = np.array(form, dtype=np.float64) / math.sqrt(2)
        sign = np.sign(np.sum(C[out][0] * ref))
        np.testing.assert_allclose(C[out][0], sign * ref, atol=1e-15, err_msg=out)


def test_adapted_basis_rejects_non_orthogonal():
    rep = np.tile(np.array([[1.0, 1.0], [0.0, 1.0]]), (8, 1, 1))
    with pytest.raises(ValueError):
        adapted_basis(rep)


def test_default_environment():
    b = EnvironmentBasis()
    assert b.M == 45 and len(environment_offsets()) == 45
    assert sorted(set(b.shell_r2.tolist())) == [0, 1, 2, 4, 5, 8, 9, 10, 13]
    assert b.counts == {"A1": 9, "A2": 3, "B1": 6, "B2": 5, "E": 11}
    assert np.all(np.diff(b.shell_r2) >= 0)
    mat = b.matrix()
    np.testing.assert_allclose(mat @ mat.T, np.eye(45), atol=1e-13)
    P = b.permutation_matrices()
    for ir in IRREPS:
        C = b.coeffs[ir].reshape(b.counts[ir], IRREP_DIM[ir], 45)
        D = irrep_matrices(ir)
        for g in range(8):
            np.testing.assert_allclose(C @ P[g], np.einsum("ab,kbm->kam", D[g], C), atol=1e-14)
        # grouped by shell, increasing radius
        assert np.all(np.diff(b.channel_shell_r2[ir]) >= 0)
    assert list(b.channel_shell_r2["E"]).count(5) == 2
    for ir in ("A2", "B1", "B2"):
        assert list(b.channel_shell_r2[ir]).count(5) == 1
    # shell-wise decomposition: axis shells A1+B1+E, diagonal A1+B2+E, 8-site shells all + 2E
    for r2, expect in [(1, (1, 0, 1, 0, 1)), (2, (1, 0, 0, 1, 1)), (5, (1, 1, 1, 1, 2))]:
        got = tuple(int((b.channel_shell_r2[ir] == r2).sum()) for ir in IRREPS)
        assert got == expect


def _rotate_features(feat: torch.Tensor, g: int, ir: str) -> torch.Tensor:
    """rho(g) applied to the channel dims of a feature field [B, L, L, n] or [B, L, L, n, 2],
    after moving site r to g r."""
    moved = feat.movedim((1, 2), (-2, -1))
    moved = apply_group_element(moved, g).movedim((-2, -1), (1, 2))
    D = torch.as_tensor(irrep_matrices(ir), dtype=feat.dtype)
    if IRREP_DIM[ir] == 1:
        return D[g, 0, 0] * moved
    return torch.einsum("ab,...b->...a", D[g], moved)


@pytest.mark.parametrize("cutoff", [math.sqrt(13.0), math.sqrt(5.0), 5.0])
def test_environment_features_equivariant_on_fields(cutoff):
    b = EnvironmentBasis(cutoff)
    L = 2 * b.radius + 3
    Q = torch.randn(2, L, L, dtype=torch.float64)
    f = b.project(Q)
    # direct evaluation for comparison: env_m(r) = Q(r + d_m)
    from lattice_lab.lattice import gather_offsets

    env = gather_offsets(Q, torch.as_tensor(b.offsets))
    for ir in IRREPS:
        C = torch.as_tensor(b.coeffs[ir])
        direct = torch.einsum("...m,km->...k", env, C) if IRREP_DIM[ir] == 1 else \
            torch.einsum("...m,kam->...ka", env, C)
        torch.testing.assert_close(f[ir], direct, atol=1e-12, rtol=0)
    for g in range(8):
        fg = b.project(apply_group_element(Q, g))
        for ir in IRREPS:
            torch.testing.assert_close(fg[ir], _rotate_features(f[ir], g, ir), atol=1e-12, rtol=0)
    # translations commute with the projection
    ft = b.project(translate(Q, (2, -1)))
    for ir in IRREPS:
        torch.testing.assert_close(ft[ir], translate(f[ir].movedim((1, 2), (-2, -1)), (2, -1))
                                   .movedim((-2, -1), (1, 2)), atol=1e-12, rtol=0)


def test_environment_offsets_order():
    """By |d|^2, then counter-clockwise from +x; r^2 = 4 is inside a cutoff of exactly 2. The order fixes the
    channel basis, so a trained ENN's weights depend on it."""
    assert environment_offsets(2.0).tolist() == [[0, 0], [1, 0], [0, 1], [-1, 0], [0, -1], [1, 1], [-1, 1],
                                                 [-1, -1], [1, -1], [2, 0], [0, 2], [-2, 0], [0, -2]]


def test_projection_in_two_dtypes_with_one_basis():
    b = EnvironmentBasis(math.sqrt(2.0))
    Q = torch.randn(1, 5, 5, dtype=torch.float64)
    f64 = b.project(Q)["E"]
    f32 = b.project(Q.float())["E"]
    assert f32.dtype == torch.float32
    torch.testing.assert_close(f32, f64.float())


def test_other_cutoffs():
    b = EnvironmentBasis(math.sqrt(5.0))
    assert b.M == 21 and b.counts == {"A1": 5, "A2": 1, "B1": 3, "B2": 2, "E": 5}
    b5 = EnvironmentBasis(5.0)  # r^2 = 25 has two orbits: (5, 0) and (3, 4)
    assert b5.M == 81 and b5.n_orbits == 15
    mat = b5.matrix()
    np.testing.assert_allclose(mat @ mat.T, np.eye(81), atol=1e-13)
    assert EnvironmentBasis(0.0).counts == {"A1": 1, "A2": 0, "B1": 0, "B2": 0, "E": 0}
    with pytest.raises(ConfigError, match="cutoff"):
        EnvironmentBasis(-1.0)


def test_projection_when_lattice_smaller_than_kernel():
    b = EnvironmentBasis(math.sqrt(13.0))
    Q = torch.randn(1, 3, 3, dtype=torch.float64)  # kernel reach 3 wraps around more than once
    from lattice_lab.lattice import gather_offsets

    env = gather_offsets(Q, torch.as_tensor(b.offsets))
    direct = torch.einsum("...m,km->...k", env, torch.as_tensor(b.coeffs["A1"]))
    torch.testing.assert_close(b.project(Q)["A1"], direct, atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.int64])
def test_field_ops_group_action(dtype):
    L = 7
    Q = (torch.randn(3, L, L) * 10).to(dtype)
    T = multiplication_table()
    imgs = all_transforms(Q)
    assert imgs.shape == (8, 3, L, L) and imgs.dtype == dtype
    assert torch.equal(imgs[0], Q)
    for i, j in itertools.product(range(8), repeat=2):
        assert torch.equal(apply_group_element(apply_group_element(Q, j), i), imgs[T[i, j]])
    # explicit definition (g.Q)(r) = Q(g^-1 r mod L) on a few sites
    for g in range(8):
        ginv = D4_ELEMENTS[inverse(g)]
        for r in [(1, 2), (0, 5), (6, 3)]:
            s = (ginv @ np.array(r)) % L
            assert imgs[g][0, r[0], r[1]] == Q[0, s[0], s[1]]


def test_field_ops_dont_mix_batch_and_support_autograd():
    Q = torch.randn(2, 5, 5, dtype=torch.float64, requires_grad=True)
    out = apply_group_element(Q, 1)
    assert torch.equal(out[1], apply_group_element(Q[1], 1))
    (out * torch.arange(25.0, dtype=torch.float64).reshape(5, 5)).sum().backward()
    assert Q.grad is not None and torch.count_nonzero(Q.grad[0]) == 24
    for bad in (-1, 8):  # -1 would otherwise index the last element
        with pytest.raises(ValueError, match="not in 0..7"):
            apply_group_element(Q, bad)
