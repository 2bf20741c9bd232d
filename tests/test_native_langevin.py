"""The native CPU Langevin step (``native/langevin_step.cpp``): Philox noise, fused updates, integration."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from lattice_lab.common.errors import ConfigError
from lattice_lab.dynamics import LangevinIntegrator, LangevinParams
from lattice_lab.dynamics.harmonic import HarmonicForce
from lattice_lab.native import langevin as native

# Random123's published known answers for Philox4x32-10 (its tests/kat_vectors)
KAT = [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
       ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
       ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]


@pytest.mark.parametrize("counter, key, expected", KAT)
def test_philox_known_answers(counter, key, expected):
    assert native.philox4x32_10(counter, key) == expected


def test_noise_is_standard_normal_and_independent():
    z = native.normal((1 << 20,), seed=7, step=3, dtype=torch.float64).numpy()
    n = z.size
    assert abs(z.mean()) < 5 / math.sqrt(n)
    assert abs(z.var() - 1) < 5 * math.sqrt(2 / n)
    assert abs(stats.kurtosis(z)) < 5 * math.sqrt(24 / n) and abs(stats.skew(z)) < 5 * math.sqrt(6 / n)
    assert stats.kstest(z[:200_000], "norm").pvalue > 1e-3
    assert abs((np.abs(z) > 3).mean() - 2 * stats.norm.sf(3)) < 5 * math.sqrt(0.0027 / n)
    for other in (native.normal((1 << 20,), 7, 4, torch.float64), native.normal((1 << 20,), 8, 3, torch.float64)):
        assert abs(np.corrcoef(z, other.numpy())[0, 1]) < 5 / math.sqrt(n)
    assert abs(np.corrcoef(z[:-1], z[1:])[0, 1]) < 5 / math.sqrt(n)  # neighbouring sites
    assert abs(np.corrcoef(z[:-16], z[16:])[0, 1]) < 5 / math.sqrt(n)  # the words of one counter


def _philox_reference(counters: np.ndarray, key: tuple[int, int]) -> np.ndarray:
    """Philox4x32-10 of many counters [n, 4] in numpy (uint64 products), the words [n, 4]."""
    c = counters.astype(np.uint64)
    k0, k1 = np.uint64(key[0]), np.uint64(key[1])
    mask = np.uint64(0xFFFFFFFF)
    for _ in range(10):
        p0, p1 = np.uint64(0xD2511F53) * c[:, 0], np.uint64(0xCD9E8D57) * c[:, 2]
        c = np.stack([((p1 >> np.uint64(32)) ^ c[:, 1] ^ k0) & mask, p1 & mask,
                      ((p0 >> np.uint64(32)) ^ c[:, 3] ^ k1) & mask, p0 & mask], axis=1)
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & mask, (k1 + np.uint64(0xBB67AE85)) & mask
    return c


def _reference_normals(n: int, seed: int, step: int) -> np.ndarray:
    """The noise of sites 0..n-1 in numpy (exact log, sqrt, cos, sin of the kernel's float32 uniforms
    (x >> 8 + 1/2) / 2^24): counter j = 16 c + l of 64-site chunk c gives sites 64 c + 16 m + l through
    two Box-Muller pairs."""
    j = np.arange((n + 63) // 64 * 16, dtype=np.uint64)
    counters = np.stack([j, np.full_like(j, step & 0xFFFFFFFF), np.full_like(j, step >> 32), 0 * j], axis=1)
    words = _philox_reference(counters, (seed & 0xFFFFFFFF, seed >> 32))
    u = (((words >> np.uint64(8)).astype(np.float32) + np.float32(0.5)) * np.float32(2.0**-24)).astype(np.float64)
    z = np.empty((len(j), 4))
    for pair in range(2):
        rad, phi = np.sqrt(-2 * np.log(u[:, 2 * pair])), 2 * np.pi * u[:, 2 * pair + 1]
        z[:, 2 * pair], z[:, 2 * pair + 1] = rad * np.cos(phi), rad * np.sin(phi)
    chunk, lane = j // 16, j % 16
    expected = np.empty(len(j) * 4)
    for m in range(4):
        expected[(64 * chunk + 16 * m + lane).astype(np.int64)] = z[:, m]
    return expected[:n]


def _check_against_reference(n: int, seed: int, step: int) -> np.ndarray:
    """native.normal of n sites against :func:`_reference_normals` (float32 polynomials: < 2e-6); the reference."""
    expected = _reference_normals(n, seed, step)
    got = native.normal((n,), seed, step, torch.float64).numpy()
    assert np.all(np.abs(got - expected) < 2e-6 * np.maximum(1.0, np.abs(expected)))
    return expected


def test_noise_is_philox_box_muller_of_seed_step_and_site():
    """An independent numpy reference: counter j = 16 c + l of 64-site chunk c gives sites 64 c + 16 m + l
    through two Box-Muller pairs, whatever the CPU's vector width."""
    for counter, key, expected in KAT:  # the reference itself
        assert tuple(_philox_reference(np.array([counter], dtype=np.uint64), key)[0]) == expected
    _check_against_reference(4 * 64 + 37, (5 << 32) | 12345, (3 << 32) | 77)


def test_noise_of_the_smallest_uniform_is_its_box_muller_value():
    """Seed 1, step 172321: the first word of counter 10 is 174 (< 2^8), so sites 10 and 26 take the
    smallest uniform (0 + 1/2) / 2^24, never 0: the radius is sqrt(50 ln 2) = 5.89, the largest there is."""
    expected = _check_against_reference(64, 1, 172321)
    assert np.isclose(np.hypot(expected[10], expected[26]), math.sqrt(50 * math.log(2)))


def test_noise_of_a_site_does_not_depend_on_the_lattice_size_or_dtype():
    a = native.normal((1000,), 1, 2)
    b = native.normal((3, 1000), 1, 2)
    assert torch.equal(a, b[0]) and not torch.equal(b[0], b[1])
    assert torch.equal(native.normal((1000,), 1, 2, torch.float64), a.double())


def test_kick_and_drift_compute_the_update_and_ignore_the_thread_count():
    gen = torch.Generator().manual_seed(0)
    V, F, Q = (torch.randn(5, 70, 70, generator=gen, dtype=torch.float64) for _ in range(3))
    k = native.LangevinKernel(torch.float64)
    out = []
    for t in (1, 2):
        old = torch.get_num_threads()
        torch.set_num_threads(t)
        try:
            v = V.clone()
            k.kick(v, F, 0.9, 0.05, 0.3, seed=11, step=5)
            out.append(v)
        finally:
            torch.set_num_threads(old)
    assert torch.equal(out[0], out[1])
    expected = 0.9 * V + 0.05 * F + 0.3 * native.normal(V.shape, 11, 5, torch.float64)
    assert torch.allclose(out[0], expected, atol=1e-14)
    v, q = V.clone(), Q.clone()
    k.kick(v, F, 0.9, 0.05, 0.0, seed=11, step=5)  # no bath: no noise
    assert torch.allclose(v, 0.9 * V + 0.05 * F, atol=1e-15)
    v = V.clone()
    k.drift(q, v, F, 0.01, 0.05)
    assert torch.allclose(v, V + 0.01 * F, atol=1e-15) and torch.allclose(q, Q + 0.05 * (V + 0.01 * F), atol=1e-15)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_native_step_equals_torch_step_without_bath(dtype):
    """gamma = T = 0: both paths integrate the same deterministic dynamics."""
    params = LangevinParams(mass=2.0, gamma=0.0, dt=0.05, temperature=0.0)
    Q0 = torch.randn(2, 9, 9, generator=torch.Generator().manual_seed(1), dtype=dtype)
    states = []
    for flag in (True, False):
        integ = LangevinIntegrator(HarmonicForce(k=1.0, kappa=0.2), params, native=flag)
        st = integ.init_state(Q0)
        integ.step(st, 40)
        states.append((st, integ.noise_source(st)))
    (a, src_a), (b, src_b) = states
    assert (src_a, src_b) == ("philox", "torch")
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert torch.allclose(a.Q, b.Q, atol=tol) and torch.allclose(a.V, b.V, atol=tol)


def test_native_noise_follows_seed_and_step_not_threads_or_the_generator_state():
    params = LangevinParams(temperature=0.1)
    Q0 = torch.randn(2, 8, 8, generator=torch.Generator().manual_seed(2))

    def run(seed, threads=None, draw_before=False):
        gen = torch.Generator().manual_seed(seed)
        if draw_before:
            torch.randn(5, generator=gen)  # the generator's state does not enter the native noise
        integ = LangevinIntegrator(HarmonicForce(), params, generator=gen)
        st = integ.init_state(Q0)
        old = torch.get_num_threads()
        torch.set_num_threads(threads or old)
        try:
            integ.step(st, 10)
        finally:
            torch.set_num_threads(old)
        return st.Q

    ref = run(3)
    assert torch.equal(ref, run(3, threads=1)) and torch.equal(ref, run(3, draw_before=True))
    assert not torch.equal(ref, run(4))


def test_without_compiler_auto_falls_back_and_true_refuses(no_compiler):
    Q0 = torch.zeros(1, 6, 6)
    with pytest.warns(UserWarning, match="Langevin step"):
        integ = LangevinIntegrator(HarmonicForce(), LangevinParams())
        assert integ.noise_source(integ.init_state(Q0)) == "torch"
    integ = LangevinIntegrator(HarmonicForce(), LangevinParams(), native=True)
    with pytest.raises(ConfigError, match="native_integrator=true"):
        integ.step(integ.init_state(Q0))
    with pytest.raises(ConfigError, match="native_integrator='sometimes'"):
        LangevinIntegrator(HarmonicForce(), LangevinParams(), native="sometimes")


def test_kick_writes_only_its_sites_and_takes_64_bit_seed_and_step():
    """A state that ends inside a chunk of 64 sites: the sites past it are not written (V is a view of a
    longer buffer); the seed and the step enter the noise with all 64 bits."""
    n, seed, step = 3 * 64 + 21, (5 << 32) | 3, (7 << 32) | 2
    buf = torch.randn(n + 64, dtype=torch.float64)
    V, F, past = buf[:n], torch.randn(n, dtype=torch.float64), buf[n:].clone()
    expected = 0.9 * V + 0.05 * F + 0.3 * native.normal((n,), seed, step, torch.float64)
    native.LangevinKernel(torch.float64).kick(V, F, 0.9, 0.05, 0.3, seed, step)
    torch.testing.assert_close(V, expected, atol=1e-14, rtol=0)
    assert torch.equal(buf[n:], past)


def test_native_steps_with_bath_are_the_documented_update():
    """Two native steps from step 41, against the formulas with friction, mass and bath: drift
    v += half F, Q += dt v; kick v = a v + a half F(Q) + c xi(seed, s) with s the step number reached
    (half = dt / 2m, a = exp(-gamma dt), c = sqrt((1 - a^2) T / m), seed: the generator's initial seed)."""
    params = LangevinParams(mass=2.0, gamma=0.7, dt=0.05, temperature=0.3)
    force = HarmonicForce(k=1.0, kappa=0.2)
    gen = torch.Generator().manual_seed(1)
    Q, V = (torch.randn(2, 7, 7, generator=gen, dtype=torch.float64) for _ in range(2))
    integ = LangevinIntegrator(force, params, torch.Generator().manual_seed(9), native=True)
    st = integ.init_state(Q, V, step=41)
    integ.step(st, 2)
    assert integ.noise_source(st) == "philox" and st.step == 43
    half, a, c = 0.5 * params.dt / params.mass, params.ou_decay, params.ou_noise
    assert a < 0.99 and c > 0.05
    for s in (42, 43):
        V = V + half * force(Q)
        Q = Q + params.dt * V
        V = a * V + a * half * force(Q) + c * native.normal(Q.shape, 9, s, torch.float64)
    torch.testing.assert_close(st.Q, Q, atol=1e-14, rtol=0)
    torch.testing.assert_close(st.V, V, atol=1e-14, rtol=0)


def _gnn_provider():
    from lattice_lab.dynamics.forces import MLForceProvider
    from lattice_lab.models.registry import build_model, load_preset
    from lattice_lab.physics.holstein import HolsteinParams

    torch.manual_seed(3)
    model = build_model(load_preset("gnn_small"), HolsteinParams().as_dict()).double().eval()
    return MLForceProvider(HolsteinParams(), "cpu", torch.float64, checkpoint=None, model=model, frozen=True)


def _spied_gnn_provider():
    """:func:`_gnn_provider` whose ``forces_into`` records every ``out`` it is handed (in ``outs``)."""
    provider, outs = _gnn_provider(), []
    real = provider.forces_into
    provider.forces_into = lambda Q, out=None: outs.append(out) or real(Q, out)
    return provider, outs


def test_native_steps_write_forces_into_buffers_no_caller_holds():
    """With a provider that has ``forces_into``, the native steps write the forces into two buffers of
    their own: the trajectory is bitwise that of new tensors every step, state.F on entry and the
    force handed out at the end of each call are never written again, and the buffers alternate."""
    provider, outs = _spied_gnn_provider()
    params = LangevinParams(dt=0.05, temperature=0.2, gamma=0.5)
    gen = torch.Generator().manual_seed(2)
    Q, V = (torch.randn(2, 11, 11, generator=gen, dtype=torch.float64) for _ in range(2))
    into = LangevinIntegrator(provider, params, torch.Generator().manual_seed(4), native=True)
    same = _gnn_provider()  # the same weights, called without buffers
    fresh = LangevinIntegrator(lambda Q: same(Q), params, torch.Generator().manual_seed(4), native=True)
    a, b = into.init_state(Q, V), fresh.init_state(Q, V)
    handed_out = []
    for n in (1, 4, 3, 1):
        handed_out.append((a.F, a.F.clone()))
        into.step(a, n)
        fresh.step(b, n)
        for t in ("Q", "V", "F"):
            assert torch.equal(getattr(a, t), getattr(b, t)), t
    assert all(torch.equal(F, copy) for F, copy in handed_out)  # never written after it was handed out
    assert outs[0] is None  # init_state
    assert a.F is not into._spare and len(outs) == 10 and all(out is not None for out in outs[1:])
    assert len({id(out) for out in outs}) <= 2 + 4  # two buffers, plus one new one per call


def test_native_steps_ignore_forces_into_of_another_dtype():
    """An integrator state in another dtype than the provider's: the provider converts, the out
    buffer is not used, and the steps equal those without buffers."""
    provider = _gnn_provider()
    params = LangevinParams(dt=0.05, temperature=0.2)
    Q = torch.randn(1, 11, 11, dtype=torch.float32)
    into = LangevinIntegrator(provider, params, torch.Generator().manual_seed(4), native=True)
    fresh = LangevinIntegrator(lambda Q: provider(Q), params, torch.Generator().manual_seed(4), native=True)
    a, b = into.init_state(Q), fresh.init_state(Q)
    into.step(a, 3)
    fresh.step(b, 3)
    assert a.F.dtype == torch.float32 and torch.equal(a.Q, b.Q) and torch.equal(a.F, b.F)


def test_reuse_forces_alternates_two_buffers_and_never_writes_a_force_of_the_caller():
    """``reuse_forces=True`` (simulate's loop): steps of one call each alternate two force buffers, the
    force handed out by one call being written by a later one; the trajectory is bitwise that of new
    tensors every step; a state.F the caller put there itself (init_state's, or its own tensor) is
    never written."""
    provider, outs = _spied_gnn_provider()
    params = LangevinParams(dt=0.05, temperature=0.2, gamma=0.5)
    gen = torch.Generator().manual_seed(5)
    Q, V = (torch.randn(2, 11, 11, generator=gen, dtype=torch.float64) for _ in range(2))
    reuse = LangevinIntegrator(provider, params, torch.Generator().manual_seed(4), native=True, reuse_forces=True)
    same = _gnn_provider()
    fresh = LangevinIntegrator(lambda Q: same(Q), params, torch.Generator().manual_seed(4), native=True)
    a, b = reuse.init_state(Q, V), fresh.init_state(Q, V)
    callers = [(a.F, a.F.clone())]  # init_state's force: the caller's
    for i in range(8):
        if i == 4:  # the caller puts a force of its own there: it is read, never written
            a.F = a.F.clone()
            callers.append((a.F, a.F.clone()))
        reuse.step(a, 1)
        fresh.step(b, 1)
        for t in ("Q", "V", "F"):
            assert torch.equal(getattr(a, t), getattr(b, t)), (i, t)
    assert all(torch.equal(F, copy) for F, copy in callers)
    buffers = [out.data_ptr() for out in outs[1:]]  # outs[0]: init_state, no buffer
    assert len(buffers) == 8 and all(out is not None for out in outs[1:])
    # x, y: one new buffer in each of the first two calls, then they alternate. The caller's own force
    # (5th call) is not one of them: that call writes the spare x and cannot free another, so the next
    # call allocates z, and x, z alternate.
    x, y, z = buffers[0], buffers[1], buffers[5]
    assert x != y and x != z and buffers == [x, y, x, y, x, z, x, z]


def test_step_leaves_autograd_as_it_found_it():
    """step() runs without autograd whether or not the caller disabled it, and restores the mode."""
    integ = LangevinIntegrator(lambda Q: -Q, LangevinParams(dt=0.05), torch.Generator().manual_seed(1))
    state = integ.init_state(torch.randn(1, 5, 5, dtype=torch.float64))
    integ.step(state, 2)
    assert torch.is_grad_enabled() and not state.F.requires_grad and not state.Q.requires_grad
    with torch.no_grad():
        integ.step(state, 2)
        assert not torch.is_grad_enabled()
    assert state.step == 4
