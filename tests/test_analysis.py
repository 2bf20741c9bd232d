"""Analysis functions on synthetic fields with known answers (DESIGN.md section 6)."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch

from lattice_lab.analysis import (
    cdw_order_parameter,
    cdw_peak,
    circular_average,
    compare_curves,
    correlation_function,
    correlation_length,
    distance_bins,
    domain_size,
    domain_wall_fraction,
    fit_power_law,
    growth_exponent,
    normalized_correlation,
    replica_mean_sem,
    structure_factor,
)
from lattice_lab.analysis.growth import describe_exponent
from lattice_lab.analysis.pipeline import analyze_trajectory, compare_trajectories, select_frames
from lattice_lab.analysis.scaling import collapse_correlation, collapse_quality, collapse_structure_factor
from lattice_lab.analysis.stats import jackknife_error, leave_one_out_means
from lattice_lab.analysis.structure_factor import distance_from_Q
from lattice_lab.common.errors import ConfigError


def checkerboard_np(L):
    x = np.arange(L)
    return (1 - 2 * ((x[:, None] + x[None, :]) % 2)).astype(np.float64)


def wall_density(L, profile):
    """n = 1/2 + (1/2) s(x) (-1)^(x+y) for a domain profile s(x) along x."""
    return 0.5 + 0.5 * np.asarray(profile, dtype=np.float64)[:, None] * checkerboard_np(L)


def brute_force_correlation(f, r_bins_r2):
    """Mean of f_i f_j over all ordered pairs at each minimum-image r^2 (O(N^2) reference)."""
    L = f.shape[-1]
    x, y = np.meshgrid(np.arange(L), np.arange(L), indexing="ij")
    x, y = x.ravel(), y.ravel()
    dx = np.abs(x[:, None] - x[None, :])
    dy = np.abs(y[:, None] - y[None, :])
    dx, dy = np.minimum(dx, L - dx), np.minimum(dy, L - dy)
    r2 = dx**2 + dy**2
    prod = f.reshape(-1)[:, None] * f.reshape(-1)[None, :]
    return np.array([prod[r2 == v].mean() for v in r_bins_r2])


def smooth_field(rng, R, L, s):
    """Gaussian-filtered white noise (kernel exp(-r^2 / 2 s^2)): correlation exp(-r^2 / 4 s^2)."""
    white = rng.standard_normal((R, L, L))
    k = 2 * np.pi * np.fft.fftfreq(L)
    kern = np.exp(-0.5 * s**2 * (k[:, None] ** 2 + k[None, :] ** 2))
    return np.fft.ifft2(np.fft.fft2(white) * kern).real


# ---------------------------------------------------------------------------------------- C(r)
def test_correlation_matches_brute_force_random_field():
    rng = np.random.default_rng(1)
    f = rng.standard_normal((3, 8, 8))
    r, C = correlation_function(f)
    bins = distance_bins(8)
    assert np.allclose(r**2, np.round(r**2))
    for b in range(3):
        ref = brute_force_correlation(f[b], np.round(r**2).astype(int))
        np.testing.assert_allclose(C[b], ref, rtol=0, atol=1e-12)
    # shells: r^2 = 0 (1), 1 (4), 2 (4), 4 (4), 5 (8), 8 (4), 9 (4), 10 (8), 13 (8), 16 (2 at dx or dy = 4)...
    assert bins.counts[:5].tolist() == [1, 4, 4, 4, 8]
    assert r.max() <= 4 + 1e-12


def test_correlation_integer_bins_and_torch_input():
    rng = np.random.default_rng(2)
    f = rng.standard_normal((2, 10, 10))
    r_e, C_e = correlation_function(f, binning="exact")
    r_i, C_i = correlation_function(torch.as_tensor(f), binning="integer")
    bins_e, bins_i = distance_bins(10), distance_bins(10, binning="integer")
    # integer bins are count-weighted averages of the exact shells they contain
    key = np.floor(r_e + 0.5).astype(int)
    for j, kval in enumerate(np.unique(key)):
        sel = key == kval
        ref = (C_e[:, sel] * bins_e.counts[sel]).sum(-1) / bins_e.counts[sel].sum()
        np.testing.assert_allclose(C_i[:, j], ref, atol=1e-12)
        np.testing.assert_allclose(r_i[j], (r_e[sel] * bins_e.counts[sel]).sum() / bins_e.counts[sel].sum())
    assert bins_i.counts.sum() == bins_e.counts.sum()
    with pytest.raises(ConfigError, match="correlation.binning"):
        distance_bins(10, binning="log")


def test_correlation_plane_wave_analytic():
    L, m = 12, 2
    x = np.arange(L)
    f = np.cos(2 * np.pi * m * x / L)[:, None] * np.ones(L)[None, :]  # cos(k x), k = 2 pi m / L
    r, C = correlation_function(f)
    k = 2 * np.pi * m / L
    assert C[0] == pytest.approx(0.5, abs=1e-12)  # <cos^2> = 1/2
    assert C[1] == pytest.approx(0.25 * (np.cos(k) + 1), abs=1e-12)  # shell (+-1, 0), (0, +-1)
    assert C[2] == pytest.approx(0.5 * np.cos(k), abs=1e-12)  # shell (+-1, +-1)
    # every displacement d: A(d) = cos(k dx) / 2, so the shell average is analytic
    bins = distance_bins(L)
    dx = np.minimum(np.arange(L), L - np.arange(L))
    A = 0.5 * np.cos(k * dx)[:, None] * np.ones(L)[None, :]
    expected = np.bincount(bins.index, weights=A.ravel(), minlength=bins.nbins + 1)[:-1] / bins.counts
    np.testing.assert_allclose(C, expected, atol=1e-12)


def test_replica_error_bars_shrink_like_inverse_sqrt_R():
    rng = np.random.default_rng(3)
    f = rng.standard_normal((256, 8, 8))
    _, C = correlation_function(f)
    _, sem16 = replica_mean_sem(C[:16])
    _, sem64 = replica_mean_sem(C[:64])
    _, sem256 = replica_mean_sem(C)
    ratio1 = np.mean(sem16[1:]) / np.mean(sem64[1:])
    ratio2 = np.mean(sem64[1:]) / np.mean(sem256[1:])
    assert ratio1 == pytest.approx(2.0, rel=0.2)
    assert ratio2 == pytest.approx(2.0, rel=0.2)
    mean, sem = replica_mean_sem(np.array([[1.0], [3.0]]))
    assert mean[0] == 2.0 and sem[0] == pytest.approx(1.0)  # std(ddof=1) = sqrt(2), / sqrt(2)


# ---------------------------------------------------------------------------------- phi, walls
def test_checkerboard_order_parameter_and_structure_factor():
    L = 8
    cb = checkerboard_np(L)
    for sign in (1, -1):
        n = 0.5 + 0.5 * sign * cb
        phi = cdw_order_parameter(n)
        np.testing.assert_allclose(phi, sign * np.ones((L, L)), atol=1e-14)
        assert domain_wall_fraction(phi) == 0.0
        S = structure_factor(n)
        assert cdw_peak(S) == pytest.approx(L * L / 4, abs=1e-10)  # N/4
        assert S.sum() == pytest.approx(L * L / 4, abs=1e-10)  # all weight at Q
        assert np.abs(np.delete(S.ravel(), (L // 2) * L + L // 2)).max() < 1e-20
        assert np.isinf(domain_size(S))  # a single perfect domain
    # without subtracting the mean, S(0) = N nbar^2 = N/4 appears
    S0 = structure_factor(0.5 + 0.5 * cb, subtract_mean=False)
    assert S0[0, 0] == pytest.approx(L * L / 4)
    assert np.isnan(domain_size(np.zeros((L, L))))


def test_site_centred_domain_wall():
    L = 8
    # domains s = +1 (x = 1..3), wall row x = 4 (n = 1/2), s = -1 (x = 5..7), wall row x = 0
    profile = np.array([0, 1, 1, 1, 0, -1, -1, -1])
    n = wall_density(L, profile)
    phi = cdw_order_parameter(n)
    expected_rows = np.array([0, 7 / 8, 1, 7 / 8, 0, -7 / 8, -1, -7 / 8])
    np.testing.assert_allclose(phi, expected_rows[:, None] * np.ones(L), atol=1e-14)
    assert domain_wall_fraction(phi, 0.5) == pytest.approx(2 / L)
    S = structure_factor(n)
    off_line = np.delete(S, L // 2, axis=1)
    assert np.abs(off_line).max() < 1e-20  # all weight on the line k_y = pi
    line = S[:, L // 2]
    assert line[L // 2] == pytest.approx(0.0, abs=1e-20)  # balanced domains: nothing at Q itself
    assert np.argmax(line) in (L // 2 - 1, L // 2 + 1)  # peaks at k_x = pi +- 2 pi / L


def test_sharp_domain_wall():
    L = 10
    profile = np.where(np.arange(L) < L // 2, 1, -1)  # walls between x = 4|5 and 9|0
    phi = cdw_order_parameter(wall_density(L, profile))
    expected = np.array([0.75, 1, 1, 1, 0.75, -0.75, -1, -1, -1, -0.75])
    np.testing.assert_allclose(phi, expected[:, None] * np.ones(L), atol=1e-14)
    assert domain_wall_fraction(phi, 0.8) == pytest.approx(4 / L)
    S = structure_factor(wall_density(L, profile))
    assert np.abs(np.delete(S, L // 2, axis=1)).max() < 1e-20
    line = S[:, L // 2]
    m = np.arange(L) - L // 2  # k_x - pi in units of 2 pi / L
    # square wave: only odd harmonics around Q
    assert np.abs(line[(m % 2) == 0]).max() < 1e-20
    assert np.all(line[(m % 2) == 1] > 0)
    assert np.argmax(line) in (L // 2 - 1, L // 2 + 1)


# ------------------------------------------------------------------------------ S(k), L(t)
def test_domain_size_of_a_single_modulation_is_wavelength_over_2pi():
    L = 12
    for lam in (12, 6, 4):
        n = 0.5 + 0.3 * np.cos(2 * np.pi * np.arange(L) / lam)[:, None] * checkerboard_np(L)
        S = structure_factor(n)
        assert domain_size(S) == pytest.approx(lam / (2 * np.pi), rel=1e-12)
    # Parseval: sum_k S(k) = sum_r (n - nbar)^2 for any field; translation invariance
    rng = np.random.default_rng(4)
    n = rng.random((3, L, L))
    S = structure_factor(n)
    np.testing.assert_allclose(S.sum((-2, -1)), ((n - n.mean((-2, -1), keepdims=True)) ** 2).sum((-2, -1)))
    np.testing.assert_allclose(structure_factor(np.roll(n, (2, 5), (-2, -1))), S, atol=1e-12)
    dq = distance_from_Q(L)
    assert dq[L // 2, L // 2] == 0 and dq[0, 0] == pytest.approx(np.pi * np.sqrt(2))
    assert dq.max() <= np.pi * np.sqrt(2) + 1e-12


def test_circular_average():
    L = 10
    q, Sq = circular_average(np.full((2, L, L), 3.0))
    np.testing.assert_allclose(Sq, 3.0)
    assert q[0] == 0 and len(q) == L // 2 + 1
    np.testing.assert_allclose(np.diff(q) > 0, True)
    # S = |k - Q|^2 averages to the mean of q^2 in each shell (>= q^2 by Jensen)
    dq = distance_from_Q(L)
    q, Sq = circular_average(dq)
    np.testing.assert_allclose(Sq, q, atol=1e-12)


# ------------------------------------------------------------------------------ G(r), xi
def test_correlation_length_on_analytic_curves():
    r = np.arange(0, 10, 0.5)
    G = np.exp(-r / 3.0)  # G = 1/2 at r = 3 ln 2
    xi, ok = correlation_length(G, r)
    assert ok
    # linear interpolation between the bracketing bins (2.0, 2.5)
    expected = 2.0 + (np.exp(-2 / 3) - 0.5) * 0.5 / (np.exp(-2 / 3) - np.exp(-2.5 / 3))
    assert xi == pytest.approx(expected, abs=1e-12)
    assert xi == pytest.approx(3 * np.log(2), abs=0.02)
    # batch: one never crosses, one NaN, one crosses
    Gb = np.stack([np.ones_like(r), np.full_like(r, np.nan), G])
    xi, ok = correlation_length(Gb, r)
    assert ok.tolist() == [False, False, True]
    assert np.isnan(xi[0]) and np.isnan(xi[1]) and np.isfinite(xi[2])
    # a curve that starts below the level has no crossing (not an extrapolation from its end)
    xi, ok = correlation_length(np.array([0.4, 0.3, 0.2]), np.array([0.0, 1.0, 2.0]))
    assert not ok and np.isnan(xi)


@pytest.mark.parametrize("L, last_r2", [(6, 9), (7, 10), (8, 16), (9, 20)])
def test_distance_bins_reach_half_the_lattice(L, last_r2):
    """The default range is r <= L/2 (not L//2): odd L keeps its outermost shells (L = 7: r^2 = 10)."""
    assert round(distance_bins(L).r[-1] ** 2) == last_r2


def test_correlation_length_recovers_planted_length():
    rng = np.random.default_rng(5)
    s = 2.5  # C(r) = exp(-r^2 / 4 s^2) -> G = 1/2 at r = 2 s sqrt(ln 2)
    phi = smooth_field(rng, 8, 64, s)
    r, G = normalized_correlation(phi)
    np.testing.assert_allclose(G[:, 0], 1.0, atol=1e-12)
    Gm, _ = replica_mean_sem(G)
    xi, ok = correlation_length(Gm, r)
    assert ok
    assert xi == pytest.approx(2 * s * np.sqrt(np.log(2)), rel=0.08)
    r_uniform, G_uniform = normalized_correlation(np.ones((1, 8, 8)))
    assert np.isnan(G_uniform).all()


def test_jackknife_of_mean_equals_standard_error():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((20, 3))
    _, sem = replica_mean_sem(x)
    # for the plain mean the delete-one jackknife reproduces std(ddof=1)/sqrt(R) exactly
    np.testing.assert_allclose(jackknife_error(leave_one_out_means(x)), sem, rtol=1e-12)


# ---------------------------------------------------------------------------------- growth
def test_power_law_fit_exact_and_noisy():
    t = np.geomspace(1, 1000, 30)
    fit = fit_power_law(t, 2.0 * t**0.3)
    assert fit.alpha == pytest.approx(0.3, abs=1e-12)
    assert fit.amplitude == pytest.approx(2.0, rel=1e-12)
    assert fit.alpha_err < 1e-10
    assert fit.t_min == pytest.approx(100.0) and fit.n_points == 10  # default window: last decade
    rng = np.random.default_rng(7)
    R, a = 12, 0.155
    reps = 1.5 * t**a * np.exp(0.05 * rng.standard_normal((R, t.size)))
    res = growth_exponent(t, reps.mean(0), reps, t_min=10, t_max=1000)
    for key in ("alpha_fit_err", "alpha_replica_err"):
        assert 0 < res[key] < 0.05
    assert abs(res["alpha"] - a) < 4 * res["alpha_err"]
    assert abs(res["alpha_replica_mean"] - a) < 4 * res["alpha_replica_err"]
    assert res["n_replicas_fitted"] == R
    with pytest.raises(ConfigError, match="fit.t_min"):
        fit_power_law(t, t**0.5, t_min=900, t_max=1000)


def test_growth_exponent_of_one_replica_has_no_error_bar():
    """One replica: the fit error of its autocorrelated time points is no error bar of alpha (it is
    ~10x too small for a coarsening run), so alpha_err is NaN with a note, not the fit error."""
    t = np.geomspace(1, 1000, 30)
    rng = np.random.default_rng(3)
    one = 1.5 * t**0.2 * np.exp(0.05 * rng.standard_normal((1, t.size)))
    res = growth_exponent(t, one[0], one, t_min=10, t_max=1000)
    assert np.isfinite(res["alpha"]) and res["alpha_fit_err"] > 0
    assert np.isnan(res["alpha_err"]) and "2 replicas" in res["alpha_err_note"]
    text = describe_exponent(res)
    assert text.startswith(f"{res['alpha']:.4g} (") and "2 replicas" in text
    two = np.concatenate([one, one * np.exp(0.05 * rng.standard_normal((1, t.size)))])
    res2 = growth_exponent(t, two.mean(0), two, t_min=10, t_max=1000)
    assert np.isfinite(res2["alpha_err"]) and "alpha_err_note" not in res2
    assert "+-" in describe_exponent(res2)


# --------------------------------------------------------------------------------- scaling
def test_scaling_collapse_quality():
    q = np.linspace(0, np.pi, 40)
    Ls = np.array([3.0, 5.0, 8.0, 12.0])
    S = Ls[:, None] ** 2 / (1 + (q[None, :] * Ls[:, None]) ** 2) ** 1.5  # S = L^2 f(qL)
    x, y = collapse_structure_factor(q, S, Ls)
    assert collapse_quality(x, y, log_y=True) < 0.02
    x_bad, y_bad = collapse_structure_factor(q, S, Ls**0.5)
    assert collapse_quality(x_bad, y_bad, log_y=True) > 0.15
    r = np.arange(0, 20, 0.5)
    xis = np.array([2.0, 3.0, 5.0])
    G = np.exp(-r[None, :] / xis[:, None])
    xr, yr = collapse_correlation(r, G, xis)
    assert collapse_quality(xr, yr, x_range=(0, 3)) < 0.01
    xr, yr = collapse_correlation(r, G, np.ones(3))
    assert collapse_quality(xr, yr, x_range=(0, 3)) > 0.05  # 0.12: ten times the exact collapse


# --------------------------------------------------------------------------------- compare
def test_compare_statistic():
    rng = np.random.default_rng(8)
    a = rng.standard_normal((30, 10))
    res = compare_curves(a, a.copy())
    assert res["max_abs_z"] == 0.0 and res["chi2"] == 0.0
    shifted = compare_curves(a, a + 1.0)  # shift of ~5.5 combined standard errors
    assert shifted["max_abs_z"] > 4.5
    np.testing.assert_allclose(np.abs(shifted["z"]), 1.0 / shifted["combined_se"])
    same_dist = compare_curves(a, rng.standard_normal((30, 10)))
    assert same_dist["max_abs_z"] < 4.0
    with pytest.raises(ValueError):
        compare_curves(a[:1], a)


def test_compare_paired_replicas_use_the_error_of_the_difference():
    """ED and ML runs of simulate_compare share hot starts and noise: replica j of one is strongly
    correlated with replica j of the other (C(r) correlation ~0.999 at step 200 for ED at g vs 1.02 g),
    so sqrt(sem_a^2 + sem_b^2) hides a systematic difference that the paired error sees."""
    rng = np.random.default_rng(12)
    a = 1.0 + 0.3 * rng.standard_normal((8, 6))  # large replica-to-replica spread
    b = 1.02 * a + 0.001 * rng.standard_normal((8, 6))  # a 2% systematic error, replica by replica
    assert compare_curves(a, b)["max_abs_z"] < 1.0  # independent formula: "indistinguishable"
    paired = compare_curves(a, b, paired=True)
    assert paired["paired"] and paired["max_abs_z"] > 10
    assert paired["max_abs_z_unpaired"] == compare_curves(a, b)["max_abs_z"]  # kept for reference
    assert "max_abs_z_unpaired" not in compare_curves(a, b)
    d = a - b
    np.testing.assert_allclose(paired["z"], d.mean(0) / (d.std(0, ddof=1) / np.sqrt(8)))
    with pytest.raises(ValueError, match="paired"):
        compare_curves(a, b[:5], paired=True)


# ------------------------------------------------------------------------------ pipeline
def write_trajectory(path, Q, n, steps, dt=0.05, **attrs):
    """A trajectory file in the docs/ARCHITECTURE.md format, written directly with h5py."""
    S, R, L, _ = n.shape
    with h5py.File(path, "w") as f:
        for key, val in (("Q", Q), ("n", n)):
            f.create_dataset(key, data=val.astype(np.float32), chunks=(1, R, L, L), compression="gzip")
        f["step"] = np.asarray(steps, dtype=np.int64)
        f["time"] = np.asarray(steps, dtype=np.float64) * dt
        base = {"L": L, "R": R, "dt": dt, "mass": 5.0, "gamma": 0.2, "temperature": 0.1, "init_temperature": 5.0,
                "force_source": "ml", "model_path": "", "model_run_id": "abc123", "seed": 0, "version": 1,
                "config": "{}", "t": 1.0, "g": 3.5, "k": 1.0, "kappa": 0.18}
        for k, v in {**base, **attrs}.items():
            f.attrs[k] = v
    return path


def coarsening_frames(rng, R, L, steps, dt=0.05, a=0.5, c=0.6):
    """Domains of size ~ c t^a: sign of a smoothed random field times the checkerboard."""
    white = rng.standard_normal((R, L, L))
    k = 2 * np.pi * np.fft.fftfreq(L)
    k2 = k[:, None] ** 2 + k[None, :] ** 2
    n, Q = [], []
    for s in steps:
        ell = c * max(s * dt, 1.0) ** a
        field = np.fft.ifft2(np.fft.fft2(white) * np.exp(-0.5 * ell**2 * k2)).real
        amp = np.tanh(field / field.std())
        n.append(0.5 + 0.5 * amp * checkerboard_np(L))
        Q.append(-3.5 * 0.5 * amp * checkerboard_np(L))
    return np.stack(Q), np.stack(n)


def test_pipeline_on_synthetic_trajectory(tmp_path):
    rng = np.random.default_rng(9)
    steps = [0, 100, 200, 400, 800, 1200, 1600]  # planted domain size 0.6 t^0.5 < L/6
    Q, n = coarsening_frames(rng, 4, 32, steps)
    (tmp_path / "run").mkdir()
    path = write_trajectory(tmp_path / "run" / "trajectory.h5", Q, n, steps)
    cfg = {"correlation_steps": [200, 1000, 1600], "fit": {"t_min": 4}, "device": "cpu",
           "tracking": {"enabled": False}}
    summary = analyze_trajectory(path, cfg)
    out = tmp_path / "run" / "analysis"
    for name in ("L_t.csv", "xi_t.csv", "order_t.csv", "C_r.csv", "S_q_collapse.csv", "G_r_collapse.csv",
                 "phi_snapshots.png", "S_k_maps.png", "C_r.png", "growth.png", "collapse_S.png", "collapse_G.png",
                 "summary.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["alpha"] == pytest.approx(summary["alpha"])
    assert on_disk["L"] == 32 and on_disk["R"] == 4 and on_disk["T"] == 0.1 and on_disk["model_run_id"] == "abc123"
    assert on_disk["fit_window"] == [4.0, 80.0]
    # 1000 is not saved: nearest frame (800) is used and reported
    used = {s["requested"]: (s["step"], s["exact"]) for s in on_disk["correlation_steps"]}
    assert used == {200: (200, True), 1000: (800, False), 1600: (1600, True)}
    Lt = np.genfromtxt(out / "L_t.csv", delimiter=",", names=True)
    assert Lt.shape == (len(steps),)
    assert np.all(np.diff(Lt["L"]) > 0)  # domains grow
    assert 0.3 < summary["alpha"] < 0.6  # planted domain size ~ t^0.5 (0.41 here: finite L, few frames)
    assert summary["growth_L"]["n_points"] == 6
    for key in ("alpha_fit_err", "alpha_replica_err", "alpha_jackknife_err"):
        assert np.isfinite(summary["growth_L"][key]) and summary["growth_L"][key] > 0
    C = np.genfromtxt(out / "C_r.csv", delimiter=",", names=True)
    assert set(C["step"].astype(int)) == {200, 800, 1600}
    assert np.all(C["C_sem"] >= 0)
    # C(0) = <Q^2> from the replicas directly
    c0 = C["C"][(C["step"] == 1600) & (C["r"] == 0)][0]
    assert c0 == pytest.approx(float((Q[-1].astype(np.float32).astype(np.float64) ** 2).mean()), rel=1e-6)


def test_pipeline_numbers_equal_an_independent_recomputation(tmp_path, monkeypatch):
    """(The CSVs hold 10 significant digits.) L(t) is the domain size of the replica-averaged S(k), its error the jackknife over delete-one
    replica means, S(Q) the replica mean at (pi, pi), xi(t) from the replica-averaged G(r), and the wall
    fraction uses the configured threshold: all recomputed here with numpy from the stored densities."""
    rng = np.random.default_rng(14)
    steps = [0, 100, 200, 400, 800]
    L, R = 12, 3
    Q, n = coarsening_frames(rng, R, L, steps)
    (tmp_path / "run").mkdir()
    path = write_trajectory(tmp_path / "run" / "trajectory.h5", Q, n, steps)
    import matplotlib.pyplot as plt

    from lattice_lab.analysis import pipeline

    def no_png(fig, p):  # the numbers only: rendering the figures is most of the time
        plt.close(fig)
        return p

    monkeypatch.setattr(pipeline, "save_figure", no_png)
    analyze_trajectory(path, {"correlation_steps": [200], "device": "cpu", "tracking": {"enabled": False},
                              "order_parameter": {"wall_threshold": 0.3}})
    out = tmp_path / "run" / "analysis"
    Lt = np.genfromtxt(out / "L_t.csv", delimiter=",", names=True)
    xit = np.genfromtxt(out / "xi_t.csv", delimiter=",", names=True)
    order = np.genfromtxt(out / "order_t.csv", delimiter=",", names=True)
    nf = n.astype(np.float32).astype(np.float64)  # what the file holds
    kq = 2 * np.pi * np.arange(L) / L - np.pi
    dq = np.sqrt(kq[:, None] ** 2 + kq[None, :] ** 2)

    def dom(S):  # sum_k S / sum_k S |k - Q|
        return S.sum((-2, -1)) / (S * dq).sum((-2, -1))

    r = distance_bins(L).r
    for i in range(len(steps)):
        d = nf[i] - nf[i].mean((-2, -1), keepdims=True)
        S = np.abs(np.fft.fft2(d)) ** 2 / L**2  # [R, L, L]
        assert Lt["L"][i] == pytest.approx(dom(S.mean(0)), rel=1e-8)
        jk = np.array([dom(np.delete(S, j, 0).mean(0)) for j in range(R)])
        assert Lt["L_err"][i] == pytest.approx(np.sqrt((R - 1) / R * ((jk - jk.mean()) ** 2).sum()), rel=1e-8)
        assert Lt["S_Q"][i] == pytest.approx(S[:, L // 2, L // 2].mean(), rel=1e-8)
        cb = checkerboard_np(L)
        phi = cb * (nf[i] - 0.25 * (np.roll(nf[i], 1, -1) + np.roll(nf[i], -1, -1) + np.roll(nf[i], 1, -2)
                                    + np.roll(nf[i], -1, -2)))
        assert order["wall_fraction"][i] == pytest.approx((np.abs(phi) < 0.3).mean(), rel=1e-8)
        _, G = normalized_correlation(phi)
        xi, _ = correlation_length(G.mean(0), r)
        if np.isfinite(xi):
            assert xit["xi"][i] == pytest.approx(float(xi), rel=1e-8)
        else:
            assert np.isnan(xit["xi"][i])
    assert np.isfinite(xit["xi"]).sum() >= 3


def test_select_frames_and_compare_trajectories(tmp_path):
    assert select_frames([0, 10, 20], [9, 11, 20]) == [{"requested": 9, "step": 10, "index": 1, "exact": False},
                                                        {"requested": 20, "step": 20, "index": 2, "exact": True}]
    rng = np.random.default_rng(10)
    steps = [0, 200, 1000]
    Q, n = coarsening_frames(rng, 6, 12, steps)
    (tmp_path / "ed").mkdir()
    (tmp_path / "ml").mkdir()
    (tmp_path / "ml2").mkdir()
    ed = write_trajectory(tmp_path / "ed" / "trajectory.h5", Q, n, steps, force_source="ed")
    ml = write_trajectory(tmp_path / "ml" / "trajectory.h5", Q, n, steps)
    shifted = write_trajectory(tmp_path / "ml2" / "trajectory.h5", Q + 2.0, n, steps)  # C(r) -> C(r) + 4
    same = compare_trajectories(ed, ml, [200, 1000], {"tracking": {"enabled": False}, "device": "cpu"})
    assert same["max_abs_z"] == 0.0
    assert (tmp_path / "ml" / "analysis" / "compare" / "compare_C_r.png").is_file()
    diff = compare_trajectories(ed, shifted, [200, 1000], {"tracking": {"enabled": False}, "device": "cpu"})
    assert diff["max_abs_z"] > 8
    assert [s["step_b"] for s in diff["steps"]] == [200, 1000]


def test_compare_trajectories_pairs_replicas_with_shared_hot_starts(tmp_path):
    rng = np.random.default_rng(13)
    steps = [0, 200, 1000]
    Q, n = coarsening_frames(rng, 6, 12, steps)
    Q = Q + 0.3 * rng.standard_normal(Q.shape)  # replica spread of C(r)
    Q_ml = Q.copy()
    Q_ml[1:] *= 1.01  # same hot start, C(r) 2% larger later on in every replica
    Q_indep = Q_ml.copy()
    Q_indep[0] += 1e-3  # another hot start: independent ensembles
    for name, q in (("ed", Q), ("ml", Q_ml), ("other", Q_indep)):
        (tmp_path / name).mkdir()
        write_trajectory(tmp_path / name / "trajectory.h5", q, n, steps)
    cfg = {"tracking": {"enabled": False}, "device": "cpu"}
    ed, ml, other = (tmp_path / name / "trajectory.h5" for name in ("ed", "ml", "other"))
    res = compare_trajectories(ed, ml, [200, 1000], cfg)
    assert res["paired"] is True and "paired" in res["statistic"]
    assert res["max_abs_z"] > 10
    assert all(s["max_abs_z_unpaired"] < s["max_abs_z"] for s in res["steps"])
    res = compare_trajectories(ed, other, [200, 1000], cfg)
    assert res["paired"] is False and res["max_abs_z"] < 2
    assert all("max_abs_z_unpaired" not in s for s in res["steps"])


def test_compare_pairs_frames_by_requested_step_when_save_grids_differ(tmp_path):
    """A coarser save grid in one run maps two requested steps onto one frame; the comparison must
    still pair each requested step with the nearest frame of *both* runs, never step 1000 with 9000."""
    rng = np.random.default_rng(11)
    Q_fine, n_fine = coarsening_frames(rng, 4, 8, [0, 200, 1000, 9000])
    (tmp_path / "fine").mkdir()
    (tmp_path / "coarse").mkdir()
    fine = write_trajectory(tmp_path / "fine" / "trajectory.h5", Q_fine, n_fine, [0, 200, 1000, 9000],
                            force_source="ed")
    coarse = write_trajectory(tmp_path / "coarse" / "trajectory.h5", Q_fine[[0, 3]], n_fine[[0, 3]], [0, 9000])
    res = compare_trajectories(fine, coarse, [200, 1000, 9000], {"tracking": {"enabled": False}, "device": "cpu"})
    pairs = [(s["requested"], s["step_a"], s["step_b"]) for s in res["steps"]]
    assert pairs == [(200, 200, 0), (1000, 1000, 0), (9000, 9000, 9000)]
    assert res["steps"][-1]["max_abs_z"] == 0.0  # the same frame on both sides


def test_select_frames_warns_only_inside_the_run(caplog):
    """A step between saved frames is a mismatch worth a warning; one past the end (the paper's 9000 in
    a shorter run, as the defaults ask) uses the last frame, reported as information."""
    with caplog.at_level("INFO", logger="lattice_lab.analysis.pipeline"):
        got = select_frames([0, 10, 20], [200, 9])
    assert [(s["requested"], s["step"]) for s in got] == [(200, 20), (9, 10)]
    levels = {r.getMessage().split()[2]: r.levelname for r in caplog.records}
    assert levels == {"200": "INFO", "9": "WARNING"}


def test_growth_exponent_is_logged_with_sensible_digits_or_why_it_is_missing(tmp_path, caplog):
    from lattice_lab.analysis.growth import format_with_error

    assert format_with_error(0.0893456789012345, 0.006123456789) == "0.0893 +- 0.0061"
    assert format_with_error(0.2281234, 0.0131) == "0.228 +- 0.013"
    assert format_with_error(123.456, 45.6) == "123 +- 46"
    assert format_with_error(0.0893456789, float("nan")) == "0.08935"
    assert describe_exponent({"alpha": 0.41234567, "alpha_err": 0.0234567}) == "0.412 +- 0.023"
    assert describe_exponent({"alpha": None, "alpha_err": None, "fit_error": "only 2 saved frames"}) == \
        "not fitted (only 2 saved frames)"
    assert describe_exponent(None) == "not fitted (no fit result)"

    rng = np.random.default_rng(3)
    steps = [0, 100, 200]  # the default window (the last decade of time) holds only 2 frames: no fit
    Q, n = coarsening_frames(rng, 2, 16, steps)
    (tmp_path / "run").mkdir()
    path = write_trajectory(tmp_path / "run" / "trajectory.h5", Q, n, steps)
    with caplog.at_level("INFO", logger="lattice_lab.analysis.pipeline"):
        analyze_trajectory(path, {"correlation_steps": [200], "device": "cpu", "tracking": {"enabled": False}})
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("analysis of"))
    assert "alpha = not fitted (fit.t_min=1, fit.t_max=10: only 2 saved frames in the window" in line
    assert "None" not in line


def test_log_axes_over_a_narrow_range_get_several_labels():
    """A domain size growing from 0.5 to 1.5 over two decades of time used to show the single y label 1.0."""
    import matplotlib.pyplot as plt

    from lattice_lab.common.figures import plain_log_ticks

    fig, ax = plt.subplots()
    ax.plot([5.0, 200.0], [0.52, 1.5])
    ax.set_xscale("log")
    ax.set_yscale("log")
    plain_log_ticks(ax)
    fig.canvas.draw()

    def labels(axis, lim):
        lo, hi = lim
        return [float(v) for v in axis.get_majorticklocs() if lo <= v <= hi]

    assert len(labels(ax.yaxis, ax.get_ylim())) >= 3
    assert {10.0, 20.0, 50.0, 100.0} <= set(labels(ax.xaxis, ax.get_xlim()))  # wide ranges: 1, 2, 5 x 10^k
    plt.close(fig)


def _visible_tick_labels(ax, axis):
    lo, hi = sorted(axis.get_view_interval())
    return [t for t in axis.get_majorticklabels() if t.get_visible() and t.get_text() and lo <= t.get_position()[
        0 if axis is ax.xaxis else 1] <= hi]


def test_log_axes_over_many_decades_have_readable_labels():
    """A run with log-spaced frames spans t = 0.05..1250: the growth plot labelled 0.05, 0.1, 0.2, 0.5 all as "0"
    and ran 500, 1000 and 2000 into one another ("5001000 2000")."""
    import matplotlib.pyplot as plt

    from lattice_lab.analysis.plots import growth_plot

    t = np.concatenate([[0.05, 0.1, 0.15, 0.3, 0.5, 0.9, 1.6], np.linspace(5, 1250, 250)])
    L = 0.5 + 0.35 * t**0.35
    fig = growth_plot(t, {"L(t)": (L, 0.01 * L)}, {}, "T = 0.1, L = 200, R = 30")
    fig.canvas.draw()
    ax = fig.axes[0]
    for axis in (ax.xaxis, ax.yaxis):
        labels = _visible_tick_labels(ax, axis)
        assert len(labels) >= 3
        for lab in labels:  # each label reads as its tick's value
            where = lab.get_position()[0 if axis is ax.xaxis else 1]
            assert float(lab.get_text().replace("\N{MINUS SIGN}", "-")) == pytest.approx(where, rel=1e-3), lab
        boxes = sorted((lab.get_window_extent() for lab in labels), key=lambda b: b.x0 if axis is ax.xaxis else b.y0)
        for a, b in zip(boxes, boxes[1:]):  # no two labels overlap
            assert (a.x1 <= b.x0) if axis is ax.xaxis else (a.y1 <= b.y0), (a, b)
    plt.close(fig)


def test_growth_plot_shows_its_fits_and_keeps_the_guide_near_the_data():
    """At paper scale (hundreds of frames) a fit drawn in its series' colour vanished into the markers, and the
    t^(1/2) guide, drawn over all times through the last point, stretched the length axis 1.5 decades below
    the data (t = 0.05..1250)."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_rgba

    from lattice_lab.analysis.growth import PowerLawFit
    from lattice_lab.analysis.plots import growth_plot

    t = np.concatenate([[0.05, 0.1, 0.2, 0.5, 1.0, 2.0], np.linspace(5, 1250, 250)])
    L = 0.5 + 0.35 * t**0.35
    fit = PowerLawFit(0.33, 0.001, 0.6, 125.0, 1250.0, 225)
    fig = growth_plot(t, {"L(t) from S(k)": (L, 0.01 * L)}, {"L(t) from S(k)": (fit, 0.01, None)}, "T = 0.1")
    ax = fig.axes[0]
    markers = next(line for line in ax.get_lines() if line.get_marker() == "o")
    fit_line = next(line for line in ax.get_lines() if line.get_linestyle() == "-" and line.get_marker() == "None")
    assert to_rgba(fit_line.get_color()) != to_rgba(markers.get_color())
    assert fit_line.get_zorder() > markers.get_zorder()
    lo, hi = ax.get_ylim()
    assert lo > 0.5 * L.min() and hi < 2 * L.max()
    plt.close(fig)


def test_collapse_frames_are_log_spaced_in_time(tmp_path):
    """The collapse plots take late frames "log-spaced": spacing the frame indices picked near-duplicates from a
    run's linearly spaced frames (t = 125, 130, 158, 235, 485, 1250 at paper scale)."""
    steps = list(range(0, 1201, 20))  # t = 0..60, the default fit window t = 6..60 holds 55 frames
    Q, n = coarsening_frames(np.random.default_rng(4), 2, 12, steps)
    (tmp_path / "run").mkdir()
    path = write_trajectory(tmp_path / "run" / "trajectory.h5", Q, n, steps)
    summary = analyze_trajectory(path, {"correlation_steps": [1200], "device": "cpu", "tracking": {"enabled": False}})
    t = 0.05 * np.asarray(summary["collapse"]["steps"], dtype=float)
    assert len(t) == 6 and t[0] == pytest.approx(6.0) and t[-1] == pytest.approx(60.0)
    ratios = t[1:] / t[:-1]
    assert ratios.min() > 1.4, t  # 10^(1/5) = 1.58 each for perfect log spacing


def test_saved_plots_cut_off_no_label_or_title(tmp_path, inked_edges):
    """At paper scale a row of four 200 x 200 snapshot panels lost the bottom of its x labels, and the collapse
    plot's title (with T, L, R and the force source) ran past the right edge."""
    import matplotlib.pyplot as plt

    from lattice_lab.analysis import plots
    from lattice_lab.analysis.pipeline import save_figure

    label = "T = 0.1, L = 200, R = 30, ml"
    rng = np.random.default_rng(0)
    x = [np.linspace(0, 16, 200)] * 3
    figures = {
        "phi": plots.phi_snapshots([rng.uniform(-1, 1, (200, 200))] * 4, [200, 1000, 9000, 25000],
                                   [10, 50, 450, 1250], label),
        "collapse": plots.collapse_plot(x, [np.exp(-v) for v in x], [1.0, 2.0, 3.0], r"$r / \xi(t)$", r"$G(r, t)$",
                                        f"order-parameter correlation collapse ({label})\nspread: 0.00541"),
    }
    for name, fig in figures.items():
        save_figure(fig, tmp_path / f"{name}.png")
        assert inked_edges(tmp_path / f"{name}.png") == {}, name
    plt.close("all")


def test_correlation_collapse_plot_shows_where_the_curves_collapse(tmp_path, monkeypatch):
    """G(r, t) against r / xi reaches r / xi = L / (2 xi) ~ 16 on a 200 x 200 lattice: the collapse (r / xi < 3)
    was squeezed into the left fifth of collapse_G.png, hidden under the latest curve's thousands of points."""
    from lattice_lab.analysis import pipeline

    steps = [0, 100, 200, 400, 800]
    Q, n = coarsening_frames(np.random.default_rng(5), 2, 32, steps, c=0.15)  # small domains: xi ~ 1
    (tmp_path / "run").mkdir()
    path = write_trajectory(tmp_path / "run" / "trajectory.h5", Q, n, steps)
    seen = {}
    real = pipeline.save_figure

    def keep_limits(fig, where):
        if where.name == "collapse_G.png":
            ax = fig.axes[0]
            xs = [line.get_xdata() for line in ax.get_lines()]
            seen[where.name] = (ax.get_xlim(), max(map(np.nanmax, xs)), min(map(np.nanmin, xs)))
        return real(fig, where)

    monkeypatch.setattr(pipeline, "save_figure", keep_limits)
    analyze_trajectory(path, {"correlation_steps": [800], "fit": {"t_min": 4}, "device": "cpu",
                              "tracking": {"enabled": False}})
    (lo, hi), reach, start = seen["collapse_G.png"]
    assert reach > 8  # the curves reach far out ...
    assert 3 <= hi <= 6  # ... the plot shows the collapse
    assert start - 0.1 * (hi - start) <= lo <= start  # from r = 0, not from negative r / xi (was -1.6 at L = 96)


def test_structure_factor_maps_leave_the_peak_at_Q_uncovered():
    """A marker drawn at Q = (pi, pi) covered the whole late-time peak of a 200 x 200 run (~10 pixels wide);
    the axes name Q instead (ticks in units of pi)."""
    import matplotlib.pyplot as plt

    from lattice_lab.analysis.plots import structure_factor_maps

    L = 200
    k = 2 * np.pi * np.arange(L) / L - np.pi
    S = 1e-3 + 300 * np.exp(-(k[:, None] ** 2 + k[None, :] ** 2) / (2 * 0.05**2))  # a sharp peak at Q
    fig = structure_factor_maps([S, S], [9000, 25000], [450, 1250], "T = 0.1")
    fig.canvas.draw()
    for ax in fig.axes[:2]:
        assert ax.get_lines() == [] and not ax.collections  # nothing drawn over the map
        ticks = dict(zip(ax.get_xticks(), (t.get_text() for t in ax.get_xticklabels())))
        assert ticks[np.pi] == r"$\pi$"
    plt.close(fig)


# ------------------------------------------------------------------- mutation-audit additions
@pytest.mark.parametrize("L", [7, 9])
def test_correlation_matches_brute_force_on_odd_lattices(L):
    """Odd L: the minimum image of an index offset d is d for d <= L//2 and d - L above (never -L//2 - 1)."""
    rng = np.random.default_rng(L)
    f = rng.standard_normal((2, L, L))
    r, C = correlation_function(f)
    assert r.max() <= L / 2
    for b in range(2):
        np.testing.assert_allclose(C[b], brute_force_correlation(f[b], np.round(r**2).astype(int)), rtol=0, atol=1e-12)
    # every displacement binned (r_max = L): each at its own minimum-image distance
    r_all, C_all = correlation_function(f, r_max=L)
    assert distance_bins(L, r_max=L).counts.sum() == L * L and r_all.max() == pytest.approx(np.sqrt(2) * (L // 2))
    for b in range(2):
        np.testing.assert_allclose(C_all[b], brute_force_correlation(f[b], np.round(r_all**2).astype(int)),
                                   rtol=0, atol=1e-12)
    # connected: the site mean squared subtracted per configuration
    _, Cc = correlation_function(f, connected=True)
    np.testing.assert_allclose(Cc, C - f.mean((-2, -1))[:, None] ** 2, rtol=0, atol=1e-12)


@pytest.mark.parametrize("L", [8, 10])
def test_circular_shells_around_Q_by_brute_force(L):
    """Shell m holds the k with round(|k - Q| L / 2 pi) = m (|k - Q| <= pi): counts, mean q and averages."""
    rng = np.random.default_rng(L)
    S = rng.random((2, L, L))
    q, Sq = circular_average(S)
    kx = 2 * np.pi * np.arange(L) / L - np.pi  # k - Q, every component in [-pi, pi)
    dist = np.sqrt(kx[:, None] ** 2 + kx[None, :] ** 2)
    shell = np.rint(dist * L / (2 * np.pi)).astype(int)
    assert len(q) == L // 2 + 1
    for m in range(L // 2 + 1):
        sel = shell == m
        assert q[m] == pytest.approx(dist[sel].mean(), abs=1e-12), m
        np.testing.assert_allclose(Sq[:, m], S[:, sel].mean(-1), rtol=0, atol=1e-12)


def test_slope_errors_match_scipy_and_the_quoted_error_is_the_largest():
    from scipy.stats import linregress

    rng = np.random.default_rng(21)
    t = np.geomspace(1, 1000, 25)
    R = 6
    reps = 1.3 * t**0.2 * np.exp(0.1 * rng.standard_normal((R, t.size)))
    jk = leave_one_out_means(reps)
    res = growth_exponent(t, reps.mean(0), reps, jk, t_min=10, t_max=1000)
    sel = (t >= 10) & (t <= 1000)
    x = np.log(t[sel])
    ref = linregress(x, np.log(reps.mean(0)[sel]))
    assert res["alpha"] == pytest.approx(ref.slope, abs=1e-12)
    assert res["alpha_fit_err"] == pytest.approx(ref.stderr, rel=1e-10)  # RSS / (n - 2)
    slopes = np.array([linregress(x, np.log(y[sel])).slope for y in reps])
    assert res["alpha_replica_mean"] == pytest.approx(slopes.mean(), abs=1e-12)
    assert res["alpha_replica_err"] == pytest.approx(slopes.std(ddof=1) / np.sqrt(R), rel=1e-10)
    jk_slopes = np.array([linregress(x, np.log(y[sel])).slope for y in jk])
    dev = jk_slopes - jk_slopes.mean()
    assert res["alpha_jackknife_err"] == pytest.approx(np.sqrt((R - 1) / R * (dev**2).sum()), rel=1e-10)
    errs = [res[k] for k in ("alpha_fit_err", "alpha_replica_err", "alpha_jackknife_err")]
    assert len(set(errs)) == 3 and res["alpha_err"] == max(errs)


def test_domain_wall_threshold_is_strict():
    """|phi| < threshold counts as wall: the rows at +-3/4 of a sharp wall are walls above 3/4, not at it."""
    L = 10
    phi = cdw_order_parameter(wall_density(L, np.where(np.arange(L) < L // 2, 1, -1)))
    assert domain_wall_fraction(phi, 0.75 + 1e-9) == pytest.approx(4 / L)
    assert domain_wall_fraction(phi, 0.75) == 0.0
