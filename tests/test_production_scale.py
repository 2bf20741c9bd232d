"""Production-scale behaviour of simulate and analyze, checked on tiny lattices: memory held per frame,
analysis of unfinished runs, several runs together, storage estimates."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lattice_lab.analysis.correlation import as_field, distance_bins
from lattice_lab.analysis.pipeline import frame_observables
from lattice_lab.common.errors import ConfigError


def _held_bytes(array: np.ndarray) -> int:
    """Bytes kept alive by ``array``: its own, or those of the torch storage it is a view of."""
    base = array
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    if isinstance(base, torch.Tensor):
        return base.untyped_storage().nbytes()
    return base.nbytes if isinstance(base, np.ndarray) else array.nbytes


def test_frame_observables_keep_no_whole_frame_alive():
    """The analysis keeps the per-replica results of every frame; on the CPU a numpy view of a slice
    (S at Q, replica 0's phi) kept the whole [R, L, L] float64 tensor alive: the S(k) of every frame,
    ~9.6 MB per frame at 200 x 200 x 30 (~1 GB for the papers' 101 frames, 10 GB with save_every=25)."""
    R, L = 4, 16
    n = as_field(np.random.default_rng(0).random((R, L, L)))
    obs = frame_observables(n, distance_bins(L), 0.5)
    for key, value in obs.items():
        if isinstance(value, np.ndarray):
            assert _held_bytes(value) <= value.nbytes, f"{key} {value.shape} holds {_held_bytes(value)} bytes"


def _trajectory(path, R=3, L=8, frames=6, dt=0.05, **attrs):
    from lattice_lab.dynamics.trajectory import TrajectoryWriter

    rng = np.random.default_rng(1)
    w = TrajectoryWriter(path, L, R, {"dt": dt, "temperature": 0.1, "force_source": "ml", **attrs})
    for i in range(frames):
        w.append(10 * i, 10 * i * dt, rng.normal(size=(R, L, L)), rng.random((R, L, L)))
    return w


def test_analysis_keeps_no_per_frame_objects(tmp_path, monkeypatch):
    """Thousands of small per-frame arrays kept in lists between the frames' large temporaries fragmented the
    heap: the RSS grew by ~14 MB per frame at 200 x 200 x 30 (2 GB after 120 frames, flat at 0.4 GB when the
    results go into arrays allocated once). The arrays a frame returns must be dead two frames later."""
    import weakref

    from lattice_lab.analysis import pipeline

    path = _trajectory(tmp_path / "t.h5").finalize()
    refs, alive = [], []
    real = pipeline.frame_observables

    def watched(*args, **kwargs):
        if len(refs) >= 2:
            alive.append(sum(r() is not None for r in refs[-2]))
        obs = real(*args, **kwargs)
        refs.append([weakref.ref(v) for v in obs.values() if isinstance(v, np.ndarray)])
        return obs

    monkeypatch.setattr(pipeline, "frame_observables", watched)
    pipeline.analyze_trajectory(path, {"tracking": {"enabled": False}, "device": "cpu"}, out_dir=tmp_path / "a")
    assert alive and max(alive) == 0, f"arrays of earlier frames still alive: {alive}"


WRITER = """
import sys
import numpy as np
from lattice_lab.dynamics.trajectory import TrajectoryWriter
w = TrajectoryWriter(sys.argv[1], 8, 3, {"dt": 0.05, "temperature": 0.1})
rng = np.random.default_rng(0)
for i in range(4):
    w.append(10 * i, 0.5 * i, rng.normal(size=(3, 8, 8)), rng.random((3, 8, 8)))
w.flush()  # as at a checkpoint
w.append(40, 2.0, rng.normal(size=(3, 8, 8)), rng.random((3, 8, 8)))  # not flushed yet
print("ready", flush=True)
sys.stdin.readline()
w.close()
"""


def test_a_running_simulations_trajectory_can_be_analysed(tmp_path, caplog):
    """A running simulation holds its trajectory.h5.partial open for writing (HDF5 file lock): the analysis
    of a run in progress (is L(t) on track after 3 of 6 hours?) failed with 'not a readable trajectory file
    (BlockingIOError: unable to lock file)'. It now reads the frames flushed at the last checkpoint."""
    import os
    import subprocess
    import sys

    from lattice_lab.analysis.pipeline import analyze_trajectory
    from lattice_lab.dynamics.trajectory import partial_path, read_trajectory

    path = tmp_path / "trajectory.h5"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "ready"
        with read_trajectory(partial_path(path)) as traj:
            assert len(traj) >= 4 and traj.Q.shape[0] == len(traj)
        summary = analyze_trajectory(partial_path(path), {"tracking": {"enabled": False}, "device": "cpu"},
                                     out_dir=tmp_path / "a")
        assert summary["n_frames"] >= 4
        assert "being written" in caplog.text
    finally:
        proc.communicate("\n", timeout=30)


def test_a_full_disk_stops_the_run_with_a_checkpoint_and_resume_continues(tmp_path, monkeypatch):
    """On a full disk HDF5 lost frames silently (its chunk-write errors are printed from destructors and
    ignored: 1,700 lines of tracebacks), then torch.save failed with 'enforce fail at inline_container.cc'
    and the process segfaulted. The run now checks the room for each frame and a checkpoint beforehand and
    stops with one clear error and a consistent checkpoint; resume=true then completes the same run."""
    import pytest
    from hydra import compose, initialize_config_dir

    from lattice_lab.common.cli import CONFIG_DIR
    from lattice_lab.common.errors import DiskFull
    from lattice_lab.dynamics import runner
    from lattice_lab.simulate import run

    over = ["device=cpu", "tracking.enabled=false", "analyze=false", "dynamics.L=8", "dynamics.replicas=2",
            "dynamics.steps=20", "dynamics.save_every=5", "force=ed", "seed=3"]

    def cfg(root, *extra):
        with initialize_config_dir(config_dir=CONFIG_DIR):
            return compose(config_name="simulate", overrides=[f"output_root={root}", *over, *extra])

    whole = run(cfg(tmp_path / "a"))
    frames_seen = []
    real_append = runner.TrajectoryWriter.append

    def append(self, *args):
        frames_seen.append(args[0])
        return real_append(self, *args)

    monkeypatch.setattr(runner.TrajectoryWriter, "append", append)
    # after 3 frames: room for a checkpoint (3 x 128 float64 + 1 MiB) but not for it and a frame (1 kB) as well
    monkeypatch.setattr(runner, "_free_bytes", lambda folder: 10**12 if len(frames_seen) < 3 else 1_052_000)
    with pytest.raises(DiskFull, match=r"MB free.*stopped at step 14 of 20, saved .*checkpoint.pt at step 14.*resume=true"):
        run(cfg(tmp_path / "b"))
    # a checkpoint due between frames (checkpoint_every_steps=2 here) that does not fit: the last one is kept
    monkeypatch.setattr(runner, "_free_bytes", lambda folder: 10**12 if len(frames_seen) < 4 else 1000)
    with pytest.raises(DiskFull, match=r"MB of a checkpoint: stopped at step 16 of 20, the last checkpoint \(step 14\)"):
        run(cfg(tmp_path / "b", "resume=true", "checkpoint_every_steps=2"))
    assert torch.load(tmp_path / "b" / "ed_L8_R2_T0.1_seed3" / "checkpoint.pt", weights_only=False)["state"]["step"] == 14
    monkeypatch.setattr(runner, "_free_bytes", lambda folder: 10**12)
    done = run(cfg(tmp_path / "b", "resume=true"))
    import h5py

    with h5py.File(whole["trajectory"]) as a, h5py.File(done["trajectory"]) as b:
        np.testing.assert_array_equal(a["step"][...], b["step"][...])
        np.testing.assert_array_equal(a["Q"][...], b["Q"][...])


def test_default_snapshots_include_the_end_of_the_run(tmp_path):
    """The snapshots defaulted to correlation_steps [200, 1000, 9000]: a papers' run of 25,000 steps never
    showed its late domains (t = 450..1250). The last frame is now among them."""
    from lattice_lab.analysis.pipeline import analyze_trajectory

    path = _trajectory(tmp_path / "t.h5", frames=8).finalize()  # steps 0..70
    summary = analyze_trajectory(path, {"tracking": {"enabled": False}, "device": "cpu", "correlation_steps": [10, 30]},
                                 out_dir=tmp_path / "a")
    assert [s["step"] for s in summary["snapshot_steps"]] == [10, 30, 70]
    assert [s["step"] for s in summary["correlation_steps"]] == [10, 30]


def test_several_runs_are_compared_on_one_growth_plot(tmp_path):
    """The papers' study is three quenches (T = 0.1, 0.2, 0.3): each had its own analysis folder, but no L(t)
    of the runs together and no table of alpha(T). `analyze runs=[...]` writes both."""
    from hydra import compose, initialize_config_dir

    from lattice_lab.analyze import run
    from lattice_lab.common.cli import CONFIG_DIR

    folders = []
    for T in (0.1, 0.3):
        folder = tmp_path / f"T{T}"
        _trajectory(folder / "trajectory.h5", frames=8, temperature=T).finalize()
        folders.append(str(folder))
    with initialize_config_dir(config_dir=CONFIG_DIR):
        cfg = compose(config_name="analyze", overrides=[f"runs=[{','.join(folders)}]", "tracking.enabled=false",
                                                         "device=cpu"])
    result = run(cfg)
    out = tmp_path / "growth_runs"
    assert result["out_dir"] == str(out.resolve())
    assert (out / "growth_runs.png").stat().st_size > 0
    assert "runs:" in (out / "analyze_config.yaml").read_text()
    lines = (out / "growth_runs.csv").read_text().splitlines()
    assert lines[0].startswith("T,L,R,last_step,alpha,alpha_err") and len(lines) == 3
    assert [float(line.split(",")[0]) for line in lines[1:]] == [0.1, 0.3]
    assert all((tmp_path / f"T{T}" / "analysis" / "summary.json").exists() for T in (0.1, 0.3))
    # a run's own analysis is reused, unless its trajectory changed since (a resumed run)
    import json
    import os

    done = tmp_path / "T0.1" / "analysis" / "summary.json"
    marked = json.loads(done.read_text()) | {"alpha": 99.0}
    done.write_text(json.dumps(marked))
    run(cfg)
    assert (out / "growth_runs.csv").read_text().splitlines()[1].split(",")[4] == "99"
    traj = tmp_path / "T0.1" / "trajectory.h5"
    os.utime(done, (traj.stat().st_mtime - 10,) * 2)
    run(cfg)
    assert (out / "growth_runs.csv").read_text().splitlines()[1].split(",")[4] != "99"
    # other analysis settings: analysed again into the comparison's folder, the runs' own are left alone
    own = done.read_text()
    with initialize_config_dir(config_dir=CONFIG_DIR):
        other = compose(config_name="analyze", overrides=[f"runs=[{','.join(folders)}]", "tracking.enabled=false",
                                                           "device=cpu", "fit.t_min=0.1"])
    run(other)
    assert done.read_text() == own
    fresh = json.loads((out / "run0_T0.1" / "summary.json").read_text())
    assert fresh["settings"]["fit"]["t_min"] == 0.1 and fresh["fit_window"][0] >= 0.1


@pytest.mark.parametrize("bad, message", [("missing", "neither a run folder with trajectory.h5 nor a trajectory file"),
                                          ("not_a_trajectory.h5", "not a readable trajectory file"),
                                          ("order_parameter.wall_threshold=abc", "wall_threshold='abc'")])
def test_several_runs_are_all_checked_before_the_first_is_analysed(tmp_path, bad, message):
    """A missing or foreign last entry of runs=[...] (or a bad setting) failed only after the runs before it
    were analysed."""
    from hydra import compose, initialize_config_dir

    from lattice_lab.analyze import run
    from lattice_lab.common.cli import CONFIG_DIR

    good = tmp_path / "T0.1"
    _trajectory(good / "trajectory.h5", frames=8, temperature=0.1).finalize()
    (tmp_path / "not_a_trajectory.h5").write_text("not hdf5")
    runs = [str(good)] + ([] if "=" in bad else [str(tmp_path / bad)])
    with initialize_config_dir(config_dir=CONFIG_DIR):
        cfg = compose(config_name="analyze", overrides=[f"runs=[{','.join(runs)}]", "tracking.enabled=false",
                                                         "device=cpu", *([bad] if "=" in bad else [])])
    with pytest.raises(ConfigError, match=message):
        run(cfg)
    assert not (good / "analysis").exists() and not (tmp_path / "growth_runs").exists()


def test_several_runs_log_their_exponents_with_sensible_digits(tmp_path, caplog):
    """`analyze runs=[...]` logged 'T = 0.1: alpha = 0.2982432606346053' (16 digits, no error bar)."""
    from lattice_lab.analysis.pipeline import compare_growth

    folders = []
    for T in (0.1, 0.3):
        _trajectory(tmp_path / f"T{T}" / "trajectory.h5", frames=8, temperature=T).finalize()
        folders.append(tmp_path / f"T{T}")
    with caplog.at_level("INFO", logger="lattice_lab.analysis.pipeline"):
        result = compare_growth(folders, {"tracking": {"enabled": False}, "device": "cpu", "fit": {"t_min": 0.4}},
                                out_dir=tmp_path / "growth_runs")
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("growth of 2 runs"))
    for row in result["runs"]:
        assert f"T = {row['T']}: alpha = " in line
        assert str(row["alpha"]) not in line  # the float's every digit
    assert line.count(" +- ") == 2
