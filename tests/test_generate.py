"""`python -m lattice_lab.generate`: the tiny preset end to end, exact resume, overwrite protection, errors."""

import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from lattice_lab.common.cli import CONFIG_DIR
from lattice_lab.common.errors import ConfigError
from lattice_lab.data import generation, read_force_dataset
from lattice_lab.dynamics import LangevinIntegrator, LangevinParams, random_hot_start
from lattice_lab.generate import run
from lattice_lab.physics import ExactForces, HolsteinParams

REPO = Path(CONFIG_DIR).parent


def _cfg(path, *extra):
    with initialize_config_dir(config_dir=CONFIG_DIR):
        return compose("generate", overrides=["dataset=holstein_L8_tiny", f"dataset.path={path}", "device=cpu",
                                              *extra])


def _file_contents(path):
    """Every dataset and attribute of an HDF5 file (attribute `created` excluded)."""
    out = {}
    with h5py.File(path, "r") as f:
        for name in f:
            out[name] = f[name][()]
        for key, value in f.attrs.items():
            if key != "created":
                out[f"@{key}"] = value
    return out


def _assert_same_file(a, b):
    ca, cb = _file_contents(a), _file_contents(b)
    assert sorted(ca) == sorted(cb)
    for key in ca:
        if isinstance(ca[key], np.ndarray):
            assert np.array_equal(ca[key], cb[key]), key  # bit for bit
        else:
            assert ca[key] == cb[key], key


def test_tiny_preset_writes_a_valid_consistent_file(tmp_path):
    path = run(_cfg(tmp_path / "tiny.h5"))
    d = read_force_dataset(path)
    cfg = d.attrs
    assert d.L == 8 and len(d) == 24
    assert np.array_equal(d.kind, [0] * 12 + [1] * 12)
    assert np.array_equal(d.is_val, np.arange(24) % 3 == 2)
    assert cfg["name"] == "holstein_L8_tiny" and "holstein_L8_tiny" in cfg["config"] and cfg["seed"] == 0
    assert (cfg["n_random"], cfg["n_quench"]) == (12, 12)
    p = d.hamiltonian()
    assert (p.g, p.kappa, p.temperature, p.filling) == (3.5, 0.18, 0.1, "canonical")
    # the stored forces and densities are the exact ones for the stored configurations
    res = ExactForces(p).compute(torch.from_numpy(d.Q))
    assert np.allclose(res.forces.numpy(), d.F, atol=1e-12, rtol=0)
    assert np.allclose(res.density.numpy(), d.n, atol=1e-12, rtol=0)
    assert np.allclose(d.n.sum(axis=(1, 2)), 32, atol=1e-11)
    # random configurations follow the hot-start distribution (variance T_init / kappa = 27.8)
    assert 15 < d.split("random").Q.var() < 45
    # the first quench snapshot is the ED Langevin state after burn_in steps from the seed + 1 hot start
    gen = torch.Generator().manual_seed(1)
    Q0, V0 = random_hot_start(4, 8, p, 5.0, 5.0, gen, dtype=torch.float64)
    integ = LangevinIntegrator(ExactForces(p), LangevinParams(temperature=0.1), gen)
    state = integ.step(integ.init_state(Q0, V0), 6)
    assert np.array_equal(state.Q.numpy(), d.Q[12:16])
    state = integ.step(state, 3)
    assert np.array_equal(state.Q.numpy(), d.Q[16:20])
    assert not generation.partial_path(path).exists()
    # the file's schedule gives each snapshot's time after the quench: steps 6, 9, 12 (as integrated above) x dt
    t = generation.quench_times(d)
    assert np.isnan(t[:12]).all() and np.array_equal(t[12:], np.repeat([6, 9, 12], 4) * 0.05)
    # not the whole file in its order (a subset, or kinds that are not random-then-quench): no schedule to read
    assert generation.quench_times(d.subset(np.arange(1, 24))) is None
    assert generation.quench_times(d.subset(np.r_[12:24, 0:12])) is None


def test_build_uses_its_own_mass_temperatures_and_counts(tmp_path):
    """mass and init_temperature are both 5 in the presets, temperature the Hamiltonian's default 0.1 and n_quench a
    multiple of replicas: here a hot start that swapped mass and init_temperature (random or quench), a bath or
    Hamiltonian that ignored dataset.temperature, a last snapshot time that kept every replica, or attributes
    that swapped the two counts give other numbers."""
    path = run(_cfg(tmp_path / "t.h5", "dataset.n_random=3", "dataset.n_quench=6", "dataset.mass=2.0",
                    "dataset.init_temperature=3.0", "dataset.gamma=0.5", "dataset.dt=0.04", "dataset.temperature=0.2"))
    d = read_force_dataset(path)
    p = d.hamiltonian()
    assert p.temperature == 0.2 and (d.attrs["n_random"], d.attrs["n_quench"]) == (3, 6)
    assert np.array_equal(d.kind, [0] * 3 + [1] * 6)
    Q_random, _ = random_hot_start(3, 8, p, 2.0, 3.0, torch.Generator().manual_seed(0), dtype=torch.float64)
    assert np.array_equal(d.Q[:3], Q_random.numpy())
    gen = torch.Generator().manual_seed(1)
    Q0, V0 = random_hot_start(4, 8, p, 2.0, 3.0, gen, dtype=torch.float64)
    integ = LangevinIntegrator(ExactForces(p), LangevinParams(mass=2.0, gamma=0.5, dt=0.04, temperature=0.2), gen)
    state = integ.step(integ.init_state(Q0, V0), 6)
    np.testing.assert_allclose(d.Q[3:7], state.Q.numpy(), rtol=0, atol=1e-12)
    state = integ.step(state, 3)
    np.testing.assert_allclose(d.Q[7:], state.Q[:2].numpy(), rtol=0, atol=1e-12)  # the first 2 of 4 replicas
    np.testing.assert_allclose(d.F, ExactForces(p)(torch.from_numpy(d.Q)).numpy(), rtol=0, atol=1e-12)


def test_every_setting_that_decides_the_numbers_is_in_the_resume_fingerprint(tmp_path):
    """A resume whose fingerprint missed one of these would mix two builds in one file."""
    ds, params = generation.validate_generate_config(_cfg(tmp_path / "f.h5"))
    cpu = torch.device("cpu")
    base = generation._fingerprint(ds, params, 0, cpu)
    for key in ("L", "n_random", "n_quench", "replicas", "burn_in", "snapshot_every", "init_temperature", "mass",
                "gamma", "dt"):
        assert generation._fingerprint({**ds, key: ds[key] + 1}, params, 0, cpu) != base, key
    for other in ({"g": 3.0}, {"temperature": 0.3}, {"filling": "midgap"}):
        assert generation._fingerprint(ds, HolsteinParams(**{**params.as_dict(), **other}), 0, cpu) != base, other
    assert generation._fingerprint(ds, params, 1, cpu) != base


def _interrupted_build(monkeypatch, path, fail_after_calls, *overrides):
    """Run the tiny build with ED failing after ``fail_after_calls`` calls (an interruption), then restore ED."""
    original = ExactForces.compute
    calls = {"n": 0}

    def flaky(self, Q, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > fail_after_calls:
            raise RuntimeError("injected interruption")
        return original(self, Q, *args, **kwargs)

    monkeypatch.setattr(ExactForces, "compute", flaky)
    with pytest.raises(RuntimeError, match="injected"):
        run(_cfg(path, *overrides))
    monkeypatch.setattr(ExactForces, "compute", original)


# ED calls of the tiny build: 3 random chunks of 4, the quench initial force, then one per Langevin step
# (snapshots after steps 6, 9, 12). Interrupt in the random phase, at the start of the quench, and in the
# middle of the quench (resumes from the saved integrator state and noise generator). With checkpoint_every=8
# the random phase's last 4 configurations fall between two checkpoints: they are saved when the phase ends.
@pytest.mark.parametrize("fail_after_calls, expect_done, extra", [
    (2, 8, []), (5, 12, []), (12, 16, []), (5, 12, ["dataset.checkpoint_every=8"])])
def test_interrupted_build_resumes_to_the_identical_file(tmp_path, monkeypatch, fail_after_calls, expect_done,
                                                         extra):
    ref = run(_cfg(tmp_path / "ds.h5", *extra))
    os.replace(ref, tmp_path / "reference.h5")

    _interrupted_build(monkeypatch, tmp_path / "ds.h5", fail_after_calls, *extra)
    partial = generation.partial_path(tmp_path / "ds.h5")
    assert partial.exists() and not (tmp_path / "ds.h5").exists()
    done = len(torch.load(partial, weights_only=False)["kind"])
    assert done == expect_done
    path = run(_cfg(tmp_path / "ds.h5", *extra))
    _assert_same_file(path, tmp_path / "reference.h5")
    assert not partial.exists()


def test_quench_noise_source_is_recorded_and_a_resume_with_another_is_refused(tmp_path, monkeypatch):
    from lattice_lab.dynamics.langevin import LangevinIntegrator

    _interrupted_build(monkeypatch, tmp_path / "ds.h5", 12)  # in the middle of the quench (see the test above)
    partial = generation.partial_path(tmp_path / "ds.h5")
    used = torch.load(partial, weights_only=False)["quench"]["noise"]
    assert used in ("philox", "torch")
    other = "torch" if used == "philox" else "philox"
    monkeypatch.setattr(LangevinIntegrator, "noise_source", lambda self, state: other)
    with pytest.raises(ConfigError, match=f"drew its quench noise from the {used} generator, this machine would use {other}"):
        run(_cfg(tmp_path / "ds.h5"))
    monkeypatch.undo()
    path = run(_cfg(tmp_path / "ds.h5"))
    assert read_force_dataset(path).attrs["quench_noise"] == used


def test_existing_file_is_not_overwritten(tmp_path):
    path = run(_cfg(tmp_path / "x.h5"))
    before = path.read_bytes()
    with pytest.raises(ConfigError, match=f"dataset.path='{path}': file exists"):
        run(_cfg(path))
    assert path.read_bytes() == before
    run(_cfg(path, "overwrite=true", "seed=3"))
    assert read_force_dataset(path).attrs["seed"] == 3


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_folder_as_output_path_is_refused_before_any_ed_work(tmp_path, monkeypatch, overwrite):
    calls = []
    monkeypatch.setattr(generation.ExactForces, "__init__", lambda *a, **k: calls.append(1) or None)
    folder = tmp_path / "gendir"
    folder.mkdir()
    with pytest.raises(ConfigError, match=f"^dataset.path='{folder}': '{folder}' is a directory"):
        run(_cfg(folder, f"overwrite={str(overwrite).lower()}"))
    generation.partial_path(tmp_path / "d.h5").mkdir()  # the progress file's path, too
    with pytest.raises(ConfigError, match=f"'{tmp_path}/d.h5.partial.pt' is a directory"):
        run(_cfg(tmp_path / "d.h5", f"overwrite={str(overwrite).lower()}"))
    assert calls == [] and sorted(p.name for p in tmp_path.iterdir()) == ["d.h5.partial.pt", "gendir"]


def test_unwritable_folder_is_refused_before_any_ed_work(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(generation.ExactForces, "__init__", lambda *a, **k: calls.append(1) or None)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # root ignores the mode bits: use a path under a file instead
            locked = tmp_path / "a_file"
            locked.write_text("")
        with pytest.raises(ConfigError, match=r"dataset.path=.*cannot write to"):
            run(_cfg(locked / "ds.h5"))
    finally:
        (tmp_path / "locked").chmod(0o700)
    assert calls == []  # refused before the exact-diagonalisation engine was even built


def test_partial_build_with_other_settings_is_not_mixed_in(tmp_path):
    target = tmp_path / "p.h5"
    torch.save({"fingerprint": {"other": 1}, "kind": [0]}, generation.partial_path(target))
    with pytest.raises(ConfigError, match="unfinished build with different settings"):
        run(_cfg(target))
    run(_cfg(target, "overwrite=true"))
    assert len(read_force_dataset(target)) == 24


@pytest.mark.parametrize("other", ["seed=1", "dataset.burn_in=3"])
def test_interrupted_build_is_not_resumed_with_another_seed_or_schedule(tmp_path, monkeypatch, other):
    """The seed and the quench schedule decide the numbers: a resume with another one would mix two
    builds in one file."""
    _interrupted_build(monkeypatch, tmp_path / "ds.h5", 5)  # in the quench, after the random phase was saved
    assert generation.partial_path(tmp_path / "ds.h5").exists()
    with pytest.raises(ConfigError, match="unfinished build with different settings"):
        run(_cfg(tmp_path / "ds.h5", other))


def test_corrupted_partial_build_is_a_config_error(tmp_path):
    target = tmp_path / "c.h5"
    generation.partial_path(target).write_bytes(b"not a torch file")
    with pytest.raises(ConfigError, match=r"unfinished build='.*c.h5.partial.pt': not a readable.*overwrite=true"):
        run(_cfg(target))
    run(_cfg(target, "overwrite=true"))
    assert len(read_force_dataset(target)) == 24


@pytest.mark.parametrize("overrides, fragment", [
    (["hamiltonian.kappa=0.3"], "hamiltonian.kappa=0.3: need |kappa| < k/4"),
    (["dataset.L=7"], "dataset.L=7: half filling needs an even number of sites"),
    (["dataset.L=6"], "dataset.L=6: must be >= 2 * min_cutoff = 7.21"),
    (["dataset.temperature=-1"], "dataset.temperature=-1.0: must be >= 0"),
    (["+dataset.n_snapshots=5"], "dataset.n_snapshots=5: unknown key"),
    (["+hamiltonian.lam=2"], "hamiltonian.lam=2: unknown key"),
    (["+replicas=3"], "replicas=3: unknown key"),
    (["dataset.replicas=0"], "dataset.replicas=0: expected an integer >= 1"),
    (["dataset.dt=0"], "dataset.dt=0.0: must be > 0"),
    (["dataset.mass=-1"], "dataset.mass=-1.0: must be > 0"),
    # the quench draws from seed + 1: 2^64 - 1 would overflow torch's 64-bit seed after the random phase
    (["seed=18446744073709551615"], "seed=18446744073709551615: too large (seeds are 64-bit: at most 2^64 - 2"),
    (["seed=99999999999999999999999"], "seed=99999999999999999999999: too large"),
])
def test_bad_inputs_raise_one_line_config_errors(tmp_path, overrides, fragment):
    with pytest.raises(ConfigError) as exc:
        run(_cfg(tmp_path / "bad.h5", *overrides))
    assert fragment in str(exc.value) and "\n" not in str(exc.value)
    assert not (tmp_path / "bad.h5").exists()


def test_a_build_too_large_for_memory_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    """The kept configurations (Q, F, n and the hot starts) plus one ED call's 3 N^2 float64 matrices are
    checked against the available memory up front (here 100 kB: holstein_L8_tiny with ed_batch=4 needs
    4 x 98 kB of ED matrices, and 43 kB for its 24 configurations)."""
    from lattice_lab.common import memory

    fake = tmp_path / "meminfo"
    fake.write_text("MemAvailable:    100 kB\n")
    monkeypatch.setattr(memory, "MEMINFO", str(fake))
    out = tmp_path / "data" / "big.h5"
    with pytest.raises(ConfigError, match=r"^dataset.L=8, dataset.n_random=12, dataset.n_quench=12: needs ~0.000436 GB "
                                          r"on cpu for the configurations kept .* and one ED call's matrices, "
                                          r"0.000102 GB available$"):
        run(_cfg(out, "dataset.ed_batch=4"))
    assert not out.parent.exists()
    fake.write_text("MemAvailable:    100000 kB\n")  # 100 MB: the same build fits
    run(_cfg(out))
    assert out.is_file()


def test_entrypoint_prints_one_line_error_without_traceback(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LATTICE_LAB_NO_PROGRESS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "lattice_lab.generate", "dataset=holstein_L8_tiny", "hamiltonian.kappa=0.3",
         f"dataset.path={tmp_path / 'e.h5'}", f"hydra.run.dir={tmp_path / 'hydra'}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip() == ("error: hamiltonian.kappa=0.3: need |kappa| < k/4 = 0.25 "
                                   "(otherwise the elastic energy is unbounded below)")


@pytest.mark.parametrize("interrupt_at_call, kept", [(1, "nothing was saved yet"),
                                                     (6, r"ds\.h5\S* holds the configurations saved so far")])
def test_ctrl_c_says_what_was_saved_and_the_build_resumes(tmp_path, monkeypatch, interrupt_at_call, kept):
    from lattice_lab.common.errors import Interrupted

    original = ExactForces.compute
    calls = {"n": 0}

    def interrupted(self, Q, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == interrupt_at_call:
            raise KeyboardInterrupt
        return original(self, Q, *args, **kwargs)

    monkeypatch.setattr(ExactForces, "compute", interrupted)
    with pytest.raises(Interrupted, match=rf"{kept}.*the same command resumes the build"):
        run(_cfg(tmp_path / "ds.h5"))
    monkeypatch.setattr(ExactForces, "compute", original)
    assert read_force_dataset(run(_cfg(tmp_path / "ds.h5"))).Q.shape[0] == 24
