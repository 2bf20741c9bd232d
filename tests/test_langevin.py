"""Langevin integrator: equipartition, symplectic limit, reproducibility, exact resume, hot start."""

import math
import re

import pytest
import torch

from lattice_lab.common.errors import ConfigError
from lattice_lab.dynamics import LangevinIntegrator, LangevinParams, LangevinState, random_hot_start
from lattice_lab.dynamics.harmonic import HarmonicForce
from lattice_lab.dynamics.initial import hot_start_variance
from lattice_lab.physics import ExactForces, HolsteinParams


def _run_averages(force, params, R=64, L=8, burn=300, steps=1500, seed=0, dtype=torch.float64, native="auto"):
    """Per-replica time averages of m v^2 and Q.(-F) (virial: both equal T per degree of freedom)."""
    gen = torch.Generator().manual_seed(seed)
    integ = LangevinIntegrator(force, params, generator=gen, native=native)
    state = integ.init_state(torch.zeros(R, L, L, dtype=dtype))
    integ.step(state, burn)
    kin = torch.zeros(R, dtype=torch.float64)
    vir = torch.zeros(R, dtype=torch.float64)
    for _ in range(steps):
        integ.step(state)
        kin += params.mass * state.V.double().pow(2).mean(dim=(-2, -1))
        vir += -(state.Q * state.F).double().mean(dim=(-2, -1))
    return kin / steps, vir / steps


@pytest.mark.parametrize("kappa, native, mass", [(0.0, True, 1.0), (0.2, True, 1.0), (0.0, False, 1.0),
                                                 (0.2, False, 1.0), (0.0, True, 5.0), (0.0, False, 5.0)])
def test_equipartition_on_harmonic_lattice(kappa, native, mass):
    """Both noise sources: the native step's Philox noise and torch's generator. With the papers'
    m = 5 too: at m = 1 a noise amplitude without its 1/m (or with m instead) would go unnoticed."""
    T = 0.7
    params = LangevinParams(mass=mass, gamma=1.0, dt=0.05, temperature=T)
    kin, vir = _run_averages(HarmonicForce(k=1.0, kappa=kappa), params, native=native)
    for name, x in (("m v^2", kin), ("virial", vir)):
        mean, err = float(x.mean()), float(x.std() / math.sqrt(len(x)))
        # statistical error (replicas are independent) plus the O(dt^2) discretisation bias (~0.1%)
        assert abs(mean - T) < 5 * err + 0.003 * T, f"{name}: {mean} vs T={T} (+-{err})"
    if kappa == 0.0:  # <k Q^2> = T with k = 1
        assert abs(float(vir.mean()) - T) < 0.02 * T


def test_wrong_noise_amplitude_would_be_detected():
    # sanity of the statistical test above: doubling T in the bath changes <m v^2> far beyond the tolerance
    params = LangevinParams(mass=1.0, gamma=1.0, dt=0.05, temperature=1.4)
    kin, _ = _run_averages(HarmonicForce(), params, R=32, steps=400)
    assert abs(float(kin.mean()) - 0.7) > 0.5


def _max_energy_error(force, dt, total_time, Q0, V0, mass):
    integ = LangevinIntegrator(force, LangevinParams(mass=mass, gamma=0.0, dt=dt, temperature=0.0))
    state = integ.init_state(Q0, V0)

    def energy(s):
        return force.energy(s.Q) + 0.5 * mass * s.V.pow(2).sum(dim=(-2, -1)) if hasattr(force, "energy") \
            else force.free_energy(s.Q) + 0.5 * mass * s.V.pow(2).sum(dim=(-2, -1))

    e0 = energy(state)
    worst = torch.zeros_like(e0)
    for _ in range(round(total_time / dt)):
        integ.step(state)
        worst = torch.maximum(worst, (energy(state) - e0).abs())
    return float(worst.max())


def test_symplectic_limit_energy_error_scales_as_dt_squared():
    gen = torch.Generator().manual_seed(3)
    Q0 = torch.randn(4, 6, 6, generator=gen, dtype=torch.float64)
    V0 = torch.randn(4, 6, 6, generator=gen, dtype=torch.float64)
    force = HarmonicForce(k=1.0, kappa=0.18)
    e1 = _max_energy_error(force, 0.1, 20.0, Q0, V0, mass=5.0)
    e2 = _max_energy_error(force, 0.05, 20.0, Q0, V0, mass=5.0)
    assert e1 > 1e-6
    assert 3.6 < e1 / e2 < 4.4, (e1, e2)


def test_ed_driven_dynamics_conserves_total_free_energy():
    """gamma = 0, T_bath = 0: kinetic energy + electronic free energy A(Q) is conserved to O(dt^2)."""
    ed = ExactForces(HolsteinParams(temperature=0.1))
    gen = torch.Generator().manual_seed(5)
    Q0 = 0.8 * torch.randn(2, 4, 4, generator=gen, dtype=torch.float64)
    V0 = 0.3 * torch.randn(2, 4, 4, generator=gen, dtype=torch.float64)
    e1 = _max_energy_error(ed, 0.04, 2.0, Q0, V0, mass=5.0)
    e2 = _max_energy_error(ed, 0.02, 2.0, Q0, V0, mass=5.0)
    assert e1 < 1e-2
    assert 3.0 < e1 / e2 < 5.0, (e1, e2)


def test_reproducible_and_resumable_bit_for_bit():
    params = LangevinParams(temperature=0.3)
    force = HarmonicForce(k=1.0, kappa=0.18)
    Q0, V0 = random_hot_start(3, 6, 0.18, 5.0, 5.0, torch.Generator().manual_seed(1))

    def fresh(seed=42):
        return LangevinIntegrator(force, params, generator=torch.Generator().manual_seed(seed))

    a = fresh()
    sa = a.step(a.init_state(Q0, V0), 40)
    b = fresh()
    sb = b.step(b.init_state(Q0, V0), 40)
    assert torch.equal(sa.Q, sb.Q) and torch.equal(sa.V, sb.V) and sa.step == 40
    c = fresh(seed=43)
    assert not torch.equal(c.step(c.init_state(Q0, V0), 40).Q, sa.Q)
    # interrupted after 17 steps, checkpointed, restored into a new integrator with a new generator
    d = fresh()
    sd = d.step(d.init_state(Q0, V0), 17)
    ckpt = {"state": sd.to_dict(), "rng": d.rng_state()}
    e = fresh(seed=999)
    e.set_rng_state(ckpt["rng"])
    se = e.step(LangevinState.from_dict(ckpt["state"]), 23)
    assert se.step == 40
    assert torch.equal(se.Q, sa.Q) and torch.equal(se.V, sa.V) and torch.equal(se.F, sa.F)


def test_init_state_copies_inputs_and_float32_state():
    force = HarmonicForce()
    integ = LangevinIntegrator(force, LangevinParams(temperature=0.1), torch.Generator().manual_seed(0))
    Q = torch.randn(2, 5, 5)
    Q_copy = Q.clone()
    s = integ.step(integ.init_state(Q), 5)
    assert torch.equal(Q, Q_copy)  # caller's tensor untouched
    assert s.Q.dtype == torch.float32 and s.F.dtype == torch.float32 and s.V.dtype == torch.float32
    # a float64 force provider (ED) drives a float32 state
    ed = ExactForces(HolsteinParams())
    integ_ed = LangevinIntegrator(ed, LangevinParams(), torch.Generator().manual_seed(0))
    s_ed = integ_ed.step(integ_ed.init_state(torch.randn(1, 4, 4)), 2)
    assert s_ed.F.dtype == torch.float32


def test_grad_needing_force_provider_gets_grad_mode():
    class EnergyForce:
        conservative = True

        def __call__(self, Q):
            assert torch.is_grad_enabled()
            x = Q.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(0.5 * (x * x).sum(), x)
            return -g

    integ_a = LangevinIntegrator(EnergyForce(), LangevinParams(), torch.Generator().manual_seed(0))
    integ_b = LangevinIntegrator(HarmonicForce(), LangevinParams(), torch.Generator().manual_seed(0))
    Q = torch.randn(2, 4, 4, dtype=torch.float64)
    sa = integ_a.step(integ_a.init_state(Q), 10)
    sb = integ_b.step(integ_b.init_state(Q), 10)
    assert torch.allclose(sa.Q, sb.Q, atol=1e-14) and not sa.Q.requires_grad


def test_one_force_evaluation_per_step():
    calls = []

    def force(Q):
        calls.append(1)
        return -Q

    integ = LangevinIntegrator(force, LangevinParams())
    s = integ.init_state(torch.zeros(1, 4, 4))
    integ.step(s, 25)
    assert len(calls) == 26  # one at init + one per step


@pytest.mark.parametrize("kwargs, fragment", [
    ({"mass": 0.0}, "dynamics.mass=0.0"), ({"gamma": -1.0}, "dynamics.gamma=-1.0"),
    ({"dt": 0.0}, "dynamics.dt=0.0"), ({"temperature": -1.0}, "dynamics.temperature=-1.0"),
])
def test_bad_langevin_params(kwargs, fragment):
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.")):
        LangevinParams(**kwargs)


def test_random_hot_start_distribution():
    p = HolsteinParams()
    Q, V = random_hot_start(40, 16, p, mass=5.0, init_temperature=5.0,
                            generator=torch.Generator().manual_seed(0))
    assert Q.shape == V.shape == (40, 16, 16) and Q.dtype == torch.float64
    n = Q.numel()
    # sample variances within 5 standard errors (relative s.e. sqrt(2/n) ~ 0.9%)
    assert abs(float(Q.var()) / (5.0 / 0.18) - 1) < 5 * math.sqrt(2 / n)
    assert abs(float(V.var()) / (5.0 / 5.0) - 1) < 5 * math.sqrt(2 / n)
    Q2, V2 = random_hot_start(40, 16, 0.18, 5.0, 5.0, torch.Generator().manual_seed(0))
    assert torch.equal(Q, Q2) and torch.equal(V, V2)


def test_checked_params_name_their_config_section():
    assert LangevinParams.checked({"dt": 0.1}, "langevin").dt == 0.1
    with pytest.raises(ConfigError, match=r"^dataset.gamma=-1: must be >= 0"):
        LangevinParams.checked({"gamma": -1}, "dataset")
    with pytest.raises(ConfigError, match=r"^langevin.tau: unknown setting"):
        LangevinParams.checked({"tau": 1.0}, "langevin")


def test_native_step_asked_for_off_the_cpu_is_an_error():
    integ = LangevinIntegrator(HarmonicForce(1.0), LangevinParams(), torch.Generator(), native=True)
    Q = torch.zeros(1, 4, 4, device="meta")
    with pytest.raises(ConfigError, match="native_integrator=true: the native Langevin step runs on the CPU only"):
        integ.noise_source(LangevinState(Q=Q, V=Q.clone(), F=Q.clone()))


@pytest.mark.parametrize("native", [True, False])
def test_friction_decays_free_velocities_at_rate_gamma(native):
    """No force, no bath: v(t) = v0 exp(-gamma t) and Q(t) follows from the scheme exactly. Equipartition
    cannot see the friction rate (a doubled gamma with its noise to match still samples the Boltzmann
    distribution), but the coarsening dynamics depend on it."""
    gamma, dt, n = 0.7, 0.05, 40
    integ = LangevinIntegrator(lambda Q: torch.zeros_like(Q), LangevinParams(mass=2.0, gamma=gamma, dt=dt,
                                                                               temperature=0.0),
                               torch.Generator().manual_seed(0), native=native)
    V0 = torch.linspace(-1.0, 1.0, 2 * 4 * 4, dtype=torch.float64).reshape(2, 4, 4)
    state = integ.step(integ.init_state(torch.zeros_like(V0), V0), n)
    a = math.exp(-gamma * dt)
    torch.testing.assert_close(state.V, V0 * math.exp(-gamma * dt * n), rtol=1e-12, atol=0)
    # drift before decay: Q = dt v0 (1 + a + ... + a^(n-1))
    torch.testing.assert_close(state.Q, V0 * dt * (1 - a**n) / (1 - a), rtol=1e-12, atol=0)


def test_hot_start_draws_q_then_v_from_the_generator():
    """The documented recipe, value for value: Q = sqrt(T_init / kappa) xi_1, then V = sqrt(T_init / m) xi_2 from
    the same generator (a start drawn in another order is another run for the same seed)."""
    Q, V = random_hot_start(2, 4, 0.18, mass=2.0, init_temperature=3.0, generator=torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(5)
    xi_q = torch.randn(2, 4, 4, generator=gen, dtype=torch.float64)
    xi_v = torch.randn(2, 4, 4, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(Q, xi_q * math.sqrt(3.0 / 0.18), rtol=1e-15, atol=0)
    torch.testing.assert_close(V, xi_v * math.sqrt(3.0 / 2.0), rtol=1e-15, atol=0)


def test_hot_start_of_a_negative_kappa_uses_its_magnitude():
    assert hot_start_variance(-0.5, 2.0) == hot_start_variance(0.5, 2.0) == 4.0


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"mass": 0.0}, "mass=0.0: must be > 0"), ({"mass": -1.0}, "mass=-1.0: must be > 0"),
    ({"init_temperature": -1.0}, "init_temperature=-1.0: must be >= 0"),
    ({"init_temperature": math.nan}, "init_temperature=nan: must be >= 0"),
    ({"R": 0}, "need R >= 1 and L >= 1, got R=0"), ({"L": 0}, "need R >= 1 and L >= 1, got R=2, L=0"),
])
def test_bad_hot_start_settings_are_named(kwargs, message):
    args = {"R": 2, "L": 4, "params": 0.18, "mass": 5.0, "init_temperature": 5.0, **kwargs}
    with pytest.raises(ConfigError, match=re.escape(message)):
        random_hot_start(**args)


def test_hot_start_without_neighbour_coupling_uses_the_on_site_stiffness():
    """kappa = 0: Q ~ N(0, T_init / k) (the documented fallback), not T_init / 1."""
    p = HolsteinParams(k=4.0, kappa=0.0)
    Q, _ = random_hot_start(40, 16, p, mass=5.0, init_temperature=2.0, generator=torch.Generator().manual_seed(0))
    assert abs(float(Q.var()) / (2.0 / 4.0) - 1) < 5 * math.sqrt(2 / Q.numel())


@pytest.mark.parametrize("native", [True, False])
def test_bath_noise_is_independent_across_replicas_and_sites(native):
    """From rest without forces one step gives V = c xi: each replica's noise is its own (uncorrelated with
    the others', not a shared draw), unit-variance and uncorrelated between neighbouring sites."""
    R, L = 4, 32
    p = LangevinParams(mass=2.0, gamma=0.5, dt=0.05, temperature=0.8)
    integ = LangevinIntegrator(lambda Q: torch.zeros_like(Q), p, torch.Generator().manual_seed(3), native=native)
    state = integ.step(integ.init_state(torch.zeros(R, L, L, dtype=torch.float64)))
    xi = (state.V / p.ou_noise).reshape(R, -1)
    n = xi.shape[1]
    tol = 5 / math.sqrt(n)
    corr = torch.corrcoef(xi)
    assert (corr - torch.eye(R, dtype=corr.dtype)).abs().max() < tol, corr
    assert (xi.var(dim=1) - 1).abs().max() < 5 * math.sqrt(2 / n)
    nb = (state.V * state.V.roll(1, -1)).mean() / state.V.pow(2).mean()
    assert abs(float(nb)) < tol / 2


def test_kinetic_temperature_is_m_mean_v_squared():
    """Equipartition of one degree of freedom: <m v^2 / 2> = T / 2, so T_kin = m <v^2> (not m <v^2> / 2)."""
    V = torch.tensor([[[1.0, -2.0], [0.5, 0.0]]], dtype=torch.float32)
    state = LangevinState(Q=torch.zeros_like(V), V=V, F=torch.zeros_like(V))
    assert state.kinetic_temperature(5.0) == pytest.approx(5.0 * (1 + 4 + 0.25) / 4, rel=1e-12)
