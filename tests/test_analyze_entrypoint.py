"""`python -m lattice_lab.analyze`: config composition, errors, outputs, MLflow logging."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from test_analysis import coarsening_frames, write_trajectory  # tests/ is on sys.path (rootdir conftest)

from lattice_lab.analyze import run
from lattice_lab.common.cli import CONFIG_DIR
from lattice_lab.common.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def make_cfg(*overrides):
    with initialize_config_dir(config_dir=CONFIG_DIR):
        return compose(config_name="analyze", overrides=list(overrides))


@pytest.fixture
def trajectories(tmp_path):
    steps = [0, 100, 200, 400, 800, 1200]
    Q, n = coarsening_frames(np.random.default_rng(0), 3, 16, steps)
    Q2, n2 = coarsening_frames(np.random.default_rng(1), 3, 16, steps)
    (tmp_path / "ml").mkdir()
    (tmp_path / "ed").mkdir()
    ml = write_trajectory(tmp_path / "ml" / "trajectory.h5", Q, n, steps)
    ed = write_trajectory(tmp_path / "ed" / "trajectory.h5", Q2, n2, steps, force_source="ed", model_run_id="")
    return ml, ed


def test_missing_or_invalid_trajectory_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="trajectory="):
        run(make_cfg())  # trajectory=??? not given
    with pytest.raises(ConfigError, match="no such file"):
        run(make_cfg(f"trajectory={tmp_path / 'nope.h5'}", "tracking.enabled=false"))
    junk = tmp_path / "junk.h5"
    junk.write_text("not hdf5")
    with pytest.raises(ConfigError, match="not a readable trajectory"):
        run(make_cfg(f"trajectory={junk}", "tracking.enabled=false"))
    import h5py

    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["F"] = np.zeros(3)
    with pytest.raises(ConfigError, match="not a trajectory"):
        run(make_cfg(f"trajectory={tmp_path / 'other.h5'}", "tracking.enabled=false"))


def test_corrupted_frame_is_a_config_error(trajectories):
    import h5py

    ml, _ = trajectories
    with h5py.File(ml, "r") as f:
        info = f["n"].id.get_chunk_info(3)  # the compressed chunk of frame 3
    with open(ml, "r+b") as fh:
        fh.seek(info.byte_offset)
        fh.write(b"\xff" * info.size)
    with pytest.raises(ConfigError, match=r"trajectory=.*: frame 3 \(step 400\) cannot be read, the file is corrupted"):
        run(make_cfg(f"trajectory={ml}", "tracking.enabled=false", "device=cpu"))


@pytest.mark.parametrize("value", ["-2", "0", "abc"])
def test_bad_collapse_frames_is_a_config_error(trajectories, value):
    with pytest.raises(ConfigError, match=r"collapse_frames=.*: expected an integer >= 1"):
        run(make_cfg(f"trajectory={trajectories[0]}", f"collapse_frames={value}", "tracking.enabled=false"))


@pytest.mark.parametrize("bad, message", [
    ("order_parameter.wall_threshold=abc", "order_parameter.wall_threshold='abc': expected 0 < threshold <= 1"),
    ("order_parameter.wall_threshold=0", "order_parameter.wall_threshold=0: expected 0 < threshold <= 1"),
    ("correlation.r_max=abc", "correlation.r_max='abc': expected a number >= 0 or null"),
    ("tracking.enabled=maybe", "tracking.enabled='maybe': expected true or false"),
])
def test_bad_settings_are_refused_before_anything_is_written(trajectories, tmp_path, bad, message):
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}"):
        run(make_cfg(f"trajectory={trajectories[0]}", f"out_dir={out}", bad, "device=cpu"))
    assert not out.exists()


@pytest.mark.parametrize(("key", "frame", "value"), [("n", 3, np.nan), ("Q", 1, np.nan), ("Q", 3, -np.inf),
                                                 ("time", 2, np.inf)])
def test_nan_or_inf_in_a_frame_is_refused_before_anything_is_written(trajectories, tmp_path, key, frame, value):
    """One site of n set to NaN in one frame gave exit 0, NaN rows in L_t.csv, a dropped replica and another alpha;
    NaN in Q (read only at the C(r) steps: 200 and 800 here, not 100 or 400) went unnoticed."""
    import h5py

    ml, _ = trajectories
    with h5py.File(ml, "r+") as f:
        if key == "time":
            f[key][frame] = value
        else:
            f[key][frame, 1, 2, 3] = value
    out = tmp_path / "out"
    step = [0, 100, 200, 400, 800, 1200][frame]
    with pytest.raises(ConfigError, match=rf"^trajectory=.*: {key} holds NaN/inf at frame {frame} \(step {step}\)$"):
        run(make_cfg(f"trajectory={ml}", f"out_dir={out}", "tracking.enabled=false", "device=cpu"))
    assert not out.exists()


def test_nan_in_the_trajectory_compared_with_is_refused(trajectories, tmp_path):
    import h5py

    ml, ed = trajectories
    with h5py.File(ed, "r+") as f:
        f["Q"][2, 0, 0, 0] = np.nan  # step 200, a C(r) step of the comparison
    with pytest.raises(ConfigError, match=r"^trajectory=.*ed/trajectory.h5: Q holds NaN/inf at frame 2 \(step 200\)$"):
        run(make_cfg(f"trajectory={ml}", f"compare_with={ed}", f"out_dir={tmp_path / 'out'}",
                     "correlation_steps=[200,1000]", "tracking.enabled=false", "device=cpu"))


@pytest.mark.parametrize(("bad", "message"), [
    ("correlation_steps=[-5]", "correlation_steps=[-5]: step -5 is negative; MD steps count from 0"),
    ("snapshot_steps=[200,-1]", "snapshot_steps=[200, -1]: step -1 is negative; MD steps count from 0"),
])
def test_negative_steps_are_refused_before_anything_is_written(trajectories, tmp_path, bad, message):
    """correlation_steps=[-5] only warned and analysed step 0 in its place."""
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        run(make_cfg(f"trajectory={trajectories[0]}", f"out_dir={out}", bad, "tracking.enabled=false", "device=cpu"))
    assert not out.exists()


def test_bad_fit_window_is_a_config_error(trajectories):
    ml, _ = trajectories
    with pytest.raises(ConfigError, match="fit.t_min"):
        run(make_cfg(f"trajectory={ml}", "fit.t_min=59", "tracking.enabled=false", "device=cpu"))


def test_run_with_comparison_and_mlflow(trajectories, tmp_mlflow, tmp_path):
    ml, ed = trajectories
    out = tmp_path / "out"
    summary = run(make_cfg(f"trajectory={ml}", f"compare_with={ed}", f"out_dir={out}", "fit.t_min=4",
                           "correlation_steps=[200,1000]", "device=cpu", "tracking.enabled=true"))
    assert (out / "summary.json").is_file() and (out / "analyze_config.yaml").is_file()
    assert (out / "compare" / "compare_C_r.png").is_file() and (out / "compare" / "compare.json").is_file()
    comp = summary["comparison"]
    assert comp["names"] == ["ED", "ML"]  # the ED run is the reference even when given as compare_with
    assert [s["step_b"] for s in comp["steps"]] == [200, 800]  # 1000: tie between 800 and 1200 -> earlier
    assert np.isfinite(comp["max_abs_z"])
    assert np.isfinite(summary["alpha"]) and summary["fit_window"] == [4.0, 60.0]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tmp_mlflow)
    run_ = client.get_run(summary["mlflow_run_id"])
    assert run_.data.tags["model_run_id"] == "abc123"
    assert run_.data.metrics["alpha"] == pytest.approx(summary["alpha"])
    assert "alpha_replica_err" in run_.data.metrics
    history = client.get_metric_history(run_.info.run_id, "L")
    assert sorted(m.step for m in history) == [0, 100, 200, 400, 800, 1200]
    assert sorted(m.step for m in client.get_metric_history(run_.info.run_id, "xi")) == [0, 100, 200, 400, 800, 1200]
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(
        np.loadtxt(out / "L_t.csv", delimiter=",", skiprows=1, usecols=2))  # L(t) logged = L(t) written (column L)
    assert run_.data.metrics["alpha_err"] == pytest.approx(summary["alpha_err"])
    assert client.get_experiment(run_.info.experiment_id).name == "lattice_lab/analyze"
    assert run_.info.status == "FINISHED"
    names = {a.path for a in client.list_artifacts(run_.info.run_id, "analysis")}
    assert {"analysis/growth.png", "analysis/L_t.csv", "analysis/xi_t.csv", "analysis/summary.json"} <= names
    assert json.loads((out / "summary.json").read_text())["mlflow_run_id"] == run_.info.run_id
    # compare_runs lines analysis runs up by the trajectory's settings (its seed too) and exponents
    from lattice_lab.compare_runs import runs_table

    assert run_.data.tags["seed"] == "0" and summary["seed"] == 0
    header, rows = runs_table("lattice_lab/analyze", tracking_uri=tmp_mlflow)
    assert {"seed", "T", "alpha", "alpha_err", "final_L", "model_run_id"} <= set(header)
    row = next(r for r in rows if r[0] == run_.info.run_id)  # (the comparison is a run of its own)
    assert row[header.index("seed")] == "0" and row[header.index("model_run_id")] == "abc123"

    # nested under tracking.parent_run_id (a parent that is not active in this process)
    parent = client.create_run(client.create_experiment("sweep_parent")).info.run_id
    child = run(make_cfg(f"trajectory={ed}", f"out_dir={tmp_path / 'out2'}", "fit.t_min=4", "device=cpu",
                         "tracking.enabled=true", f"tracking.parent_run_id={parent}"))
    crun = client.get_run(child["mlflow_run_id"])
    assert crun.data.tags["mlflow.parentRunId"] == parent
    assert client.get_experiment(crun.info.experiment_id).name == "lattice_lab/analyze"
    assert len(client.get_metric_history(crun.info.run_id, "xi")) == 6 and "alpha" in crun.data.metrics
    assert "analysis/growth.png" in {a.path for a in client.list_artifacts(crun.info.run_id, "analysis")}


def test_cli_missing_file_exits_cleanly(tmp_path):
    env = {**os.environ, "LATTICE_LAB_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    res = subprocess.run([sys.executable, "-m", "lattice_lab.analyze", f"trajectory={tmp_path / 'missing.h5'}",
                          "tracking.enabled=false"], cwd=tmp_path, capture_output=True, text=True, env=env,
                         timeout=120)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1].startswith("error: trajectory=")
    assert "Traceback" not in res.stderr


def test_inverted_fit_window_is_refused_before_any_frame_is_read(trajectories, monkeypatch):
    from lattice_lab.analysis import pipeline

    monkeypatch.setattr(pipeline, "select_frames", lambda *a, **k: pytest.fail("frames were selected"))
    with pytest.raises(ConfigError, match=r"fit.t_min=50 >= fit.t_max=10: the fit window is empty"):
        run(make_cfg(f"trajectory={trajectories[0]}", "fit.t_min=50", "fit.t_max=10", "tracking.enabled=false"))


def test_default_output_folders(trajectories, tmp_path):
    """Without out_dir: one trajectory is analysed into ``analysis/`` beside it; ``runs=<one folder>`` (a string,
    not a list) is one run, written to ``growth_runs/`` beside the run folders."""
    ml, _ = trajectories
    summary = run(make_cfg(f"trajectory={ml}", "fit.t_min=4", "device=cpu", "tracking.enabled=false"))
    assert summary["out_dir"] == str(ml.parent / "analysis")
    assert (ml.parent / "analysis" / "summary.json").is_file() and (ml.parent / "analysis" / "analyze_config.yaml").is_file()
    result = run(make_cfg(f"runs={ml.parent}", "fit.t_min=4", "device=cpu", "tracking.enabled=false"))
    assert len(result["runs"]) == 1 and result["out_dir"] == str((tmp_path / "growth_runs").resolve())
