"""Trajectory HDF5 writer/reader: format, atomic finalisation, truncation for resume."""

import h5py
import numpy as np
import pytest
import torch

from lattice_lab.common.errors import ConfigError
from lattice_lab.dynamics.trajectory import TrajectoryWriter, partial_path, read_trajectory

L, R = 6, 2


def _frames(k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(R, L, L, generator=g, dtype=torch.float64),
             torch.rand(R, L, L, generator=g, dtype=torch.float64)) for _ in range(k)]


@pytest.mark.parametrize("compression", ["gzip", "lzf", "none"])
def test_write_read_format(tmp_path, compression):
    path = tmp_path / "trajectory.h5"
    frames = _frames(4)
    w = TrajectoryWriter(path, L, R, {"dt": 0.05, "force_source": "ed", "model_path": None, "seed": 3},
                         compression=compression)
    for i, (Q, n) in enumerate(frames):
        assert w.append(10 * i, 0.5 * i, Q, n) == i + 1
    assert partial_path(path).exists() and not path.exists()
    assert w.finalize() == path
    assert path.exists() and not partial_path(path).exists()

    with h5py.File(path, "r") as f:
        assert f["Q"].dtype == np.float32 and f["n"].dtype == np.float32
        assert f["Q"].shape == (4, R, L, L) and f["Q"].chunks == (1, R, L, L)
        assert f["step"].dtype == np.int64 and f["time"].dtype == np.float64
        assert (f["Q"].compression or "none") == compression
    with read_trajectory(path) as tr:
        assert len(tr) == 4 and tr.L == L and tr.R == R
        assert tr.attrs["dt"] == 0.05 and tr.attrs["force_source"] == "ed" and tr.attrs["model_path"] == ""
        assert tr.attrs["seed"] == 3 and tr.attrs["version"] == 1
        np.testing.assert_array_equal(tr.step, [0, 10, 20, 30])
        np.testing.assert_array_equal(tr.time, [0.0, 0.5, 1.0, 1.5])
        Q2, n2 = tr.frame(2)
        np.testing.assert_array_equal(Q2, frames[2][0].numpy().astype(np.float32))
        np.testing.assert_array_equal(tr.n[3], frames[3][1].numpy().astype(np.float32))
        assert tr.index_of_step(20) == 2
        with pytest.raises(ConfigError, match="step=5"):
            tr.index_of_step(5)
        assert [s for s, _, _ in tr] == [0, 10, 20, 30]


def test_reopen_truncates_and_continues_identically(tmp_path):
    frames = _frames(5, seed=1)
    full, cut = tmp_path / "full.h5", tmp_path / "cut.h5"
    w = TrajectoryWriter(full, L, R, {"dt": 0.1})
    for i, (Q, n) in enumerate(frames):
        w.append(i, 0.1 * i, Q, n)
    w.finalize()

    w = TrajectoryWriter(cut, L, R, {"dt": 0.1})
    for i, (Q, n) in enumerate(frames[:4]):  # frame 3 is written after the "checkpoint" at 2 frames
        w.append(i, 0.1 * i, Q, n)
    w.close()
    w = TrajectoryWriter.reopen(cut, 2)
    assert w.n_frames == 2
    for i, (Q, n) in enumerate(frames[2:], start=2):
        w.append(i, 0.1 * i, Q, n)
    w.finalize()
    with read_trajectory(full) as a, read_trajectory(cut) as b:
        for key in ("Q", "n"):
            np.testing.assert_array_equal(getattr(a, key)[...], getattr(b, key)[...])
        np.testing.assert_array_equal(a.step, b.step)
        np.testing.assert_array_equal(a.time, b.time)


def test_errors(tmp_path):
    with pytest.raises(ConfigError, match="compression"):
        TrajectoryWriter(tmp_path / "x.h5", L, R, compression="zstd")
    with pytest.raises(ConfigError, match="missing"):
        TrajectoryWriter.reopen(tmp_path / "nothing.h5", 0)
    w = TrajectoryWriter(tmp_path / "t.h5", L, R)
    with pytest.raises(ValueError, match="shape"):
        w.append(0, 0.0, torch.zeros(R, L + 1, L), torch.zeros(R, L, L))
    w.append(0, 0.0, torch.zeros(R, L, L), torch.zeros(R, L, L))
    w.close()
    with pytest.raises(ConfigError, match="unfinished"):
        read_trajectory(tmp_path / "t.h5")
    with pytest.raises(ConfigError, match="holds 1 frames"):
        TrajectoryWriter.reopen(tmp_path / "t.h5", 3)


def test_datasets_of_different_lengths_are_named(tmp_path):
    """A finished trajectory whose datasets disagree (11 frames of Q and n, 8 steps) is damaged: the message says
    so and names the counts. Only for an unfinished .partial file is a writer caught between two flushes likely."""
    w = TrajectoryWriter(tmp_path / "t.h5", L, R)
    for i, (Q, n) in enumerate(_frames(11)):
        w.append(i, 0.1 * i, Q, n)
    path = w.finalize()
    with h5py.File(path, "r+") as f:
        for key in ("step", "time"):
            f[key].resize(8, axis=0)
    counts = r"its datasets hold different numbers of frames \(Q: 11, n: 11, step: 8, time: 8\)"
    with pytest.raises(ConfigError, match=rf"^trajectory=.*t.h5: {counts}: a finished trajectory has one count, "
                                          r"so this file is inconsistent \(damaged or edited\)$"):
        read_trajectory(path)
    part = path.rename(partial_path(path))
    with pytest.raises(ConfigError, match=rf"^trajectory=.*t.h5.partial: {counts}: a simulation is writing it right now"):
        read_trajectory(part)


@pytest.mark.parametrize(("compression", "at_most"), [("gzip", 0.85), ("lzf", 0.95)])
def test_compressed_frames_are_byte_shuffled(tmp_path, compression, at_most):
    """float32 frames of noisy distortions and densities: gzip alone saved ~10% (0.89 of the raw size at the
    papers' 200 x 200 x 30, lzf nothing) and took 0.3 s per 9.6 MB frame; with HDF5's byte shuffle the sign
    and exponent bytes compress (0.77, and the frame is written twice as fast)."""
    rng = np.random.default_rng(0)
    Lb, Rb = 32, 2
    x = np.arange(Lb)
    cb = (-1.0) ** (x[:, None] + x[None, :])
    n = 0.5 + 0.45 * np.sign(rng.standard_normal((Rb, 1, 1))) * cb + 0.04 * rng.standard_normal((Rb, Lb, Lb))
    Q = -3.5 * (2 * n - 1) + 0.3 * rng.standard_normal((Rb, Lb, Lb))
    w = TrajectoryWriter(tmp_path / "t.h5", Lb, Rb, {"dt": 0.05}, compression=compression)
    w.append(0, 0.0, Q, n)
    path = w.finalize()
    with h5py.File(path, "r") as f:
        assert f["Q"].shuffle and f["n"].shuffle
        stored = f["Q"].id.get_storage_size() + f["n"].id.get_storage_size()
        assert stored < at_most * (f["Q"].nbytes + f["n"].nbytes)  # without the shuffle: 0.89 (gzip), 1.0 (lzf)
        np.testing.assert_array_equal(f["n"][0], n.astype(np.float32))


def test_reopen_never_truncates_a_finished_trajectory(tmp_path):
    """reopen continues only an unfinished ``.partial`` file: a finished trajectory.h5 is not cut back to a
    checkpoint's frame count (a resume extending a finished run first moves it to .partial itself), while
    check_reopen accepts it as the file such a resume continues."""
    path = tmp_path / "trajectory.h5"
    w = TrajectoryWriter(path, L, R)
    for i, (Q, n) in enumerate(_frames(3)):
        w.append(i, 0.1 * i, Q, n)
    w.finalize()
    with pytest.raises(ConfigError, match=r"the unfinished trajectory .*trajectory.h5.partial is missing"):
        TrajectoryWriter.reopen(path, 1)
    with read_trajectory(path) as tr:
        assert len(tr) == 3
    assert TrajectoryWriter.check_reopen(path, 2) == path
