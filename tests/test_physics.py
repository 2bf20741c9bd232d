"""Exact diagonalisation of the Holstein model: forces, filling, symmetry, parameter validation."""

import math

import numpy as np
import pytest
import torch
from scipy.optimize import brentq

from lattice_lab.common.errors import ConfigError
from lattice_lab.lattice import nn_sum, translate
from lattice_lab.physics import (
    ExactForces,
    HolsteinParams,
    density_from_force,
    elastic_energy,
    elastic_force,
    hopping_matrix,
)
from lattice_lab.physics.timing import ed_timing_table
from lattice_lab.physics.timing import main as timing_main
from lattice_lab.symmetry.field_ops import apply_group_element


def _configs(B, L, seed=1, scale=0.8):
    """Random distortions around a checkerboard CDW (the physically relevant region) plus noise."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.arange(L)
    cb = (1 - 2 * ((x[:, None] + x[None, :]) % 2)).double()
    return 1.2 * cb * torch.rand(B, 1, 1, generator=gen, dtype=torch.float64) \
        + scale * torch.randn(B, L, L, generator=gen, dtype=torch.float64)


def _reference_density(Q, p: HolsteinParams, mode="canonical"):
    """Independent numpy/scipy reference for one configuration [L, L]."""
    L = Q.shape[-1]
    N = L * L
    h = np.zeros((N, N))
    for x in range(L):
        for y in range(L):
            s = x * L + y
            for dx, dy in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                h[s, ((x + dx) % L) * L + (y + dy) % L] -= p.t
    h -= np.diag(p.g * Q.reshape(-1))
    eps, V = np.linalg.eigh(h)
    if p.temperature == 0:
        occ = (np.arange(N) < N // 2).astype(float)
    else:
        def count(mu):
            return (0.5 * (1 - np.tanh((eps - mu) / (2 * p.temperature)))).sum() - N / 2
        mu = brentq(count, eps[0] - 1, eps[-1] + 1, xtol=1e-15) if mode == "canonical" \
            else 0.5 * (eps[N // 2 - 1] + eps[N // 2])
        occ = 0.5 * (1 - np.tanh((eps - mu) / (2 * p.temperature)))
    return (V ** 2 @ occ).reshape(L, L), eps


# -- forces are exact gradients of the free energy -----------------------------------------------
@pytest.mark.parametrize("L", [4, 6])
@pytest.mark.parametrize("T", [0.1, 0.5])
def test_forces_are_minus_free_energy_gradient(L, T):
    ed = ExactForces(HolsteinParams(temperature=T))
    Q = _configs(2, L, seed=L)
    res = ed.compute(Q)
    N, h = L * L, 1e-5
    eye = torch.eye(N, dtype=torch.float64).reshape(N, L, L)
    for b in range(Q.shape[0]):
        plus = ed.free_energy(Q[b] + h * eye)
        minus = ed.free_energy(Q[b] - h * eye)
        fd = -(plus - minus).reshape(L, L) / (2 * h)
        assert torch.allclose(fd, res.forces[b], atol=1e-7, rtol=0), (fd - res.forces[b]).abs().max()


def test_zero_temperature_forces_and_integer_occupations():
    p = HolsteinParams(temperature=0.0)
    ed = ExactForces(p)
    L, N, h = 4, 16, 1e-5
    Q = _configs(1, L, seed=7)[0]
    res = ed.compute(Q, return_eigenvalues=True)
    # free energy = sum of the lowest N/2 levels (integer occupations) + (g/2) sum Q + elastic
    eps = res.eigenvalues
    expected = eps[: N // 2].sum() + 0.5 * p.g * Q.sum() + elastic_energy(Q, p)
    assert abs(float(res.free_energy - expected)) < 1e-12
    ref, _ = _reference_density(Q.numpy(), p)
    assert np.allclose(res.density.numpy(), ref, atol=1e-12)
    assert abs(float(res.density.sum()) - N / 2) < 1e-12
    eye = torch.eye(N, dtype=torch.float64).reshape(N, L, L)
    fd = -(ed.free_energy(Q + h * eye) - ed.free_energy(Q - h * eye)).reshape(L, L) / (2 * h)
    assert torch.allclose(fd, res.forces, atol=1e-7, rtol=0)
    # T -> 0 limit of the canonical ensemble
    cold = ExactForces(HolsteinParams(temperature=1e-4))(Q)
    assert torch.allclose(cold, res.forces, atol=1e-8)


def test_zero_temperature_degenerate_shell_is_filled_fractionally():
    # Q = 0, L = 4: levels -4 (x1), -2 (x4), 0 (x6), 2 (x4), 4 (x1). 8 electrons fill 5 levels below
    # and half of the 6-fold shell at the Fermi energy; the uniform fraction 1/2 makes the density
    # basis independent, hence uniform (= 1/2 by particle-hole symmetry)
    res = ExactForces(HolsteinParams(temperature=0.0)).compute(torch.zeros(2, 4, 4, dtype=torch.float64))
    assert torch.allclose(res.density, torch.full_like(res.density, 0.5), atol=1e-12)
    assert torch.allclose(res.forces, torch.zeros_like(res.forces), atol=1e-11)


def test_zero_temperature_shell_without_particle_hole_symmetry():
    # one impurity Q[0, 0] = 0.5 on L = 4 breaks particle-hole symmetry: the shell at the Fermi energy is
    # 5-fold and needs 2 of the 8 electrons (fraction 2/5, not 1/2); the density is the T -> 0 limit
    Q = torch.zeros(4, 4, dtype=torch.float64)
    Q[0, 0] = 0.5
    res = ExactForces(HolsteinParams(temperature=0.0)).compute(Q, return_eigenvalues=True)
    eps = res.eigenvalues
    shell = (eps - eps[7]).abs() < 1e-9
    assert int(shell.sum()) == 5 and int((eps < eps[7] - 1e-9).sum()) == 6  # the case this test is about
    assert abs(float(res.density.sum()) - 8) < 1e-12
    cold = ExactForces(HolsteinParams(temperature=1e-3)).compute(Q)
    assert torch.allclose(cold.density, res.density, atol=1e-6)
    assert torch.allclose(cold.forces, res.forces, atol=1e-5)


def test_zero_temperature_chemical_potential_is_midgap():
    # datasets store mu: at T = 0 it is the middle of the gap between the levels N/2 and N/2 + 1
    Q = _configs(3, 4, seed=0)
    res = ExactForces(HolsteinParams(temperature=0.0)).compute(Q, return_eigenvalues=True)
    assert torch.allclose(res.mu, 0.5 * (res.eigenvalues[:, 7] + res.eigenvalues[:, 8]), atol=1e-14, rtol=0)


# -- filling ------------------------------------------------------------------------------------
@pytest.mark.parametrize("T", [0.01, 0.1, 0.5, 3.0])
def test_canonical_electron_count_is_exact(T):
    p = HolsteinParams(temperature=T)
    L = 6
    Q = torch.cat([_configs(3, L, seed=3), 5.3 * torch.randn(2, L, L, dtype=torch.float64)])
    res = ExactForces(p).compute(Q)
    count = res.density.sum(dim=(-2, -1))
    assert (count - L * L / 2).abs().max() < 1e-12
    for b in range(Q.shape[0]):
        ref, _ = _reference_density(Q[b].numpy(), p)
        assert np.allclose(res.density[b].numpy(), ref, atol=1e-10)


def test_midgap_filling_matches_reference():
    p = HolsteinParams(temperature=0.5, filling="midgap")
    L = 4
    Q = _configs(3, L, seed=5) + 0.7  # a uniform shift breaks particle-hole symmetry
    res = ExactForces(p).compute(Q, return_eigenvalues=True)
    eps = res.eigenvalues
    assert torch.allclose(res.mu, 0.5 * (eps[:, 7] + eps[:, 8]), atol=1e-14)
    for b in range(3):
        ref, _ = _reference_density(Q[b].numpy(), p, mode="midgap")
        assert np.allclose(res.density[b].numpy(), ref, atol=1e-12)
    canon = ExactForces(HolsteinParams(temperature=0.5)).compute(Q)
    assert (res.density.sum(dim=(-2, -1)) - canon.density.sum(dim=(-2, -1))).abs().max() > 1e-3


# -- symmetry -----------------------------------------------------------------------------------
def test_forces_are_d4_and_translation_equivariant():
    ed = ExactForces(HolsteinParams(temperature=0.1))
    Q = _configs(2, 6, seed=11, scale=1.0)
    F = ed(Q)
    for i in range(8):
        gQ = apply_group_element(Q, i)
        assert torch.allclose(ed(gQ), apply_group_element(F, i), atol=1e-10), f"D4 element {i}"
    for shift in [(1, 0), (0, 1), (2, 3), (5, 5)]:
        assert torch.allclose(ed(translate(Q, shift)), translate(F, shift), atol=1e-10)


def test_batch_equals_per_configuration_and_shapes():
    ed = ExactForces(HolsteinParams(), chunk_size=2)
    Q = _configs(5, 4, seed=2)
    res = ed.compute(Q)
    for b in range(5):
        single = ed.compute(Q[b])
        assert single.forces.shape == (4, 4) and single.mu.shape == ()
        assert torch.allclose(single.forces, res.forces[b], atol=1e-12)
        assert torch.allclose(single.free_energy, res.free_energy[b], atol=1e-12)
    assert res.forces.dtype == torch.float64 and res.free_energy.shape == (5,)
    assert ed(Q.float()).dtype == torch.float64


def test_multithreaded_batch_equals_single_threaded_bitwise():
    """With several torch threads a CPU batch is diagonalised in pieces, one configuration group per
    thread: every output must equal the single-threaded evaluation bit for bit."""
    ed = ExactForces(HolsteinParams(temperature=0.1))
    Q = _configs(7, 6, seed=3)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        ref = ed.compute(Q, return_eigenvalues=True)
        torch.set_num_threads(2)
        for B in (7, 2):  # B >= threads: the pieces path
            res = ed.compute(Q[:B], return_eigenvalues=True)
            for name in ("forces", "density", "free_energy", "mu", "eigenvalues"):
                assert torch.equal(getattr(res, name), getattr(ref, name)[:B]), (B, name)
    finally:
        torch.set_num_threads(previous)


def test_density_from_force_inverts_the_force():
    p = HolsteinParams()
    Q = _configs(2, 6, seed=4)
    res = ExactForces(p).compute(Q)
    assert torch.allclose(density_from_force(res.forces, Q, p), res.density, atol=1e-13)
    assert torch.allclose(density_from_force(res.forces, Q, p.as_dict()), res.density, atol=1e-13)


def test_elastic_force_is_gradient_of_elastic_energy():
    p = HolsteinParams(kappa=-0.21)
    Q = torch.randn(3, 5, 5, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(elastic_energy(Q, p).sum(), Q)
    assert torch.allclose(elastic_force(Q.detach(), p), -grad, atol=1e-13)
    # each bond once: a single displaced pair of neighbours costs k Q^2/2 * 2 + kappa Q^2
    Q2 = torch.zeros(5, 5, dtype=torch.float64)
    Q2[1, 1] = Q2[1, 2] = 1.0
    assert abs(float(elastic_energy(Q2, p)) - (p.k + p.kappa)) < 1e-14


@pytest.mark.parametrize("L", [2, 3, 4])
def test_hopping_matrix_is_consistent_with_nn_sum(L):
    hop = hopping_matrix(L, t=1.7)
    f = torch.randn(L, L, dtype=torch.float64)
    assert torch.allclose(hop @ f.reshape(-1), -1.7 * nn_sum(f).reshape(-1), atol=1e-13)
    assert torch.equal(hop, hop.T)
    assert torch.allclose(hop.sum(0), torch.full((L * L,), -4 * 1.7, dtype=torch.float64))


def _band(L, t):
    """Free-electron levels -2t (cos kx + cos ky), k = 2 pi n / L, ascending."""
    c = torch.cos(2 * math.pi * torch.arange(L, dtype=torch.float64) / L)
    return torch.sort((-2 * t * (c[:, None] + c[None, :])).reshape(-1)).values


@pytest.mark.parametrize("L", [2, 3, 4, 5])
def test_hopping_spectrum_is_the_tight_binding_band(L):
    # for odd L the band is not symmetric about 0, so the sign of the hopping shows (L = 2: double bonds)
    assert torch.allclose(torch.linalg.eigvalsh(hopping_matrix(L, t=1.3)), _band(L, 1.3), atol=1e-12)


@pytest.mark.parametrize("T", [0.0, 0.3])
def test_uniform_distortion_shifts_every_level_by_minus_g_q(T):
    """Q = 0: the free band, mu = 0 (particle-hole symmetry), A = the free-electron grand potential. A uniform
    Q0 shifts every level and mu by -g Q0: the density stays 1/2, the force is the elastic -(k + 4 kappa) Q0
    and A(Q0) - A(0) = N (k/2 + 2 kappa) Q0^2 (2N bonds, each once)."""
    p = HolsteinParams(t=1.3, g=2.5, k=1.1, kappa=0.2, temperature=T)
    L, N, Q0 = 4, 16, 0.7
    ed = ExactForces(p)
    zero = ed.compute(torch.zeros(L, L, dtype=torch.float64), return_eigenvalues=True)
    band = _band(L, p.t)
    assert torch.allclose(zero.eigenvalues, band, atol=1e-12) and abs(float(zero.mu)) < 1e-12
    free = band[: N // 2].sum() if T == 0 else -T * torch.log1p(torch.exp(-band / T)).sum()
    assert abs(float(zero.free_energy - free)) < 1e-12
    res = ed.compute(torch.full((L, L), Q0, dtype=torch.float64), return_eigenvalues=True)
    assert torch.allclose(res.eigenvalues, band - p.g * Q0, atol=1e-12)
    assert abs(float(res.mu) + p.g * Q0) < 1e-12
    assert torch.allclose(res.density, torch.full_like(res.density, 0.5), atol=1e-12)
    assert torch.allclose(res.forces, torch.full_like(res.forces, -(p.k + 4 * p.kappa) * Q0), atol=1e-12)
    assert abs(float(res.free_energy - zero.free_energy) - N * (p.k / 2 + 2 * p.kappa) * Q0 ** 2) < 1e-11


# -- parameters ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, fragment", [
    ({"kappa": 0.3}, "hamiltonian.kappa=0.3"),
    ({"kappa": -0.25}, "hamiltonian.kappa=-0.25"),
    ({"k": 0.0}, "hamiltonian.k=0.0"),
    ({"t": -1.0}, "hamiltonian.t=-1.0"),
    ({"t": 0.0}, "hamiltonian.t=0.0"),
    ({"temperature": -1.0}, "temperature=-1.0"),
    ({"filling": "grand"}, "hamiltonian.filling='grand'"),
    ({"g": float("nan")}, "hamiltonian.g=nan"),
])
def test_bad_parameters_raise_config_error(kwargs, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(".", r"\.")):
        HolsteinParams(**kwargs)


def test_from_config():
    p = HolsteinParams.from_config({"t": 1, "g": 2.0, "k": 1.0, "kappa": 0.1, "filling": "midgap"},
                                   temperature=0.3)
    assert p == HolsteinParams(t=1.0, g=2.0, k=1.0, kappa=0.1, temperature=0.3, filling="midgap")
    assert HolsteinParams.from_config(p.as_dict()) == p
    with pytest.raises(ConfigError, match="hamiltonian.lam=2"):
        HolsteinParams.from_config({"lam": 2})
    assert math.isclose(HolsteinParams().coupling_lambda, 3.5 ** 2 / 8)


def test_ed_rejects_odd_sites_and_bad_shapes():
    ed = ExactForces()
    with pytest.raises(ConfigError, match="L=5"):
        ed(torch.zeros(1, 5, 5))
    with pytest.raises(ConfigError, match="shape"):
        ed(torch.zeros(1, 4, 6))


def test_timing_table_structure():
    rows = ed_timing_table([4, 6], repeats=1)
    assert [r["L"] for r in rows] == [4, 6]
    for r in rows:
        assert r["N"] == r["L"] ** 2
        for key in ("ed_force_s", "torch_eigh_s", "numpy_eigh_s", "overhead_pct"):
            assert math.isfinite(r[key]) and (key == "overhead_pct" or r[key] > 0)
        assert r["overhead_pct"] == pytest.approx(100 * (r["ed_force_s"] / r["torch_eigh_s"] - 1), rel=1e-12)


def test_timing_table_times_the_matrix_ed_diagonalises(monkeypatch):
    """The overhead compares like with like: the bare eigensolver gets the Hamiltonian of the ED call, coupling
    included."""
    seen, eigh = [], torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda h, *a, **k: seen.append(h.clone()) or eigh(h, *a, **k))
    ed_timing_table([4], repeats=1)
    ed_matrices = [h[0] for h in seen if h.dim() == 3]  # ExactForces diagonalises a batch [1, N, N]
    bare = [h for h in seen if h.dim() == 2]
    assert ed_matrices and bare and all(torch.equal(h, ed_matrices[0]) for h in bare + ed_matrices)


def test_timing_command_prints_the_table_and_refuses_a_bad_size_in_one_line(capsys):
    """``python -m lattice_lab.physics.timing L ...`` (docs/physics.md): an odd L is an ``error:`` line, not a
    traceback."""
    assert timing_main(["4"]) == 0
    assert "| 4 | 16 |" in capsys.readouterr().out
    assert timing_main(["5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: L=5") and len(err.strip().splitlines()) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():  # pragma: no cover - runs on GPU machines only
    Q = _configs(3, 6, seed=9)
    cpu = ExactForces(HolsteinParams()).compute(Q)
    gpu = ExactForces(HolsteinParams(), device="cuda").compute(Q.cuda())
    assert gpu.forces.device.type == "cuda"
    assert torch.allclose(gpu.forces.cpu(), cpu.forces, atol=1e-10)
    assert (gpu.density.sum(dim=(-2, -1)) - 18).abs().max() < 1e-12
