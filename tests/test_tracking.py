"""MLflow tracking helpers (temporary store) and the force-accuracy plots."""

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

from lattice_lab.common.errors import ConfigError, Interrupted
from lattice_lab.tracking import mlflow_utils as mu
from lattice_lab.tracking.plots import (
    error_by_configuration,
    error_histogram,
    error_vs_order,
    learning_curve,
    parity_plot,
    save_figure,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def _empty_store(tmp_path_factory):
    """An MLflow sqlite store with its schema migrated once (creating one costs ~5-10 s)."""
    db = tmp_path_factory.mktemp("mlflow_template") / "mlflow.db"
    mu.setup_tracking({"uri": f"sqlite:///{db}"})
    mu.get_or_create_experiment("Default-init", f"sqlite:///{db}")
    return db


@pytest.fixture
def store(tmp_mlflow, _empty_store):
    """``tmp_mlflow`` pre-filled with the migrated empty schema; returns the tracking URI."""
    shutil.copy(_empty_store, tmp_mlflow[len("sqlite:///"):])
    return tmp_mlflow


def test_flatten_config_dotted_keys_lists_and_limits():
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"model": {"name": "enn", "hidden": [32, 8, 4], "opt": None},
                            "trainer": {"lr": 1e-3, "nested": {"deep": True}}, "empty": {},
                            "long": "x" * 7000, "hydra": {"run": {"dir": "ignored"}}})
    flat = mu.flatten_config(cfg)
    assert flat["model.name"] == "enn" and flat["model.hidden"] == "[32, 8, 4]"
    assert flat["model.opt"] == "null" and flat["trainer.lr"] == "0.001"
    assert flat["trainer.nested.deep"] == "True" and flat["empty"] == "{}"
    assert len(flat["long"]) == mu.MAX_PARAM_LENGTH and flat["long"].endswith("...")
    assert not any(k.startswith("hydra") for k in flat)


def test_uri_precedence_and_artifact_root(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert mu.resolve_tracking_uri().startswith("sqlite:///") and mu.resolve_tracking_uri().endswith("runs/mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////env/x.db")
    assert mu.resolve_tracking_uri() == "sqlite:////env/x.db"
    assert mu.resolve_tracking_uri("sqlite:////cfg/y.db") == "sqlite:////cfg/y.db"  # config wins
    assert mu.default_artifact_root(f"sqlite:///{tmp_path}/m.db") == (tmp_path / "mlartifacts").as_uri()
    assert mu.default_artifact_root("http://host:5000") is None
    assert mu.default_artifact_root("sqlite:///:memory:") is None


def test_local_store_names_the_database_or_folder():
    assert mu.local_store("sqlite:////a/m.db") == ("sqlite", Path("/a/m.db"))
    assert mu.local_store("sqlite:///runs/m.db?mode=ro") == ("sqlite", Path("runs/m.db"))  # relative to the cwd
    assert mu.local_store("file:///a/ml%20runs") == ("file", Path("/a/ml runs"))
    assert mu.local_store("mlruns") == ("file", Path("mlruns"))
    for remote in ("sqlite:///:memory:", "http://host:5000", "databricks", "postgresql://u@h/db"):
        assert mu.local_store(remote) is None, remote
    assert mu.experiment_name("simulate") == "lattice_lab/simulate"
    assert mu.experiment_name("simulate", {"tracking": {"experiment": "mine"}}) == "mine"


def test_run_with_params_metrics_artifacts_and_nesting(store, tmp_path):
    from mlflow.tracking import MlflowClient

    cfg = {"model": {"name": "gnn", "widths": [1, 4, 1]}, "seed": 0,
           "tracking": {"enabled": True, "tags": {"who": "test"}}}
    tags = mu.standard_tags("train", model_family="gnn", dataset_path=__file__, device="cpu")
    assert {"task", "model_family", "dataset_sha256", "device", "torch_version", "host"} <= set(tags)
    assert tags["dataset_sha256"] == mu.file_sha256(__file__)[:12] and len(tags["dataset_sha256"]) == 12

    with mu.start_run(task="train", cfg=cfg, run_name="parent", tags=tags) as parent:
        assert parent.enabled
        parent.log_params(cfg)
        for step in range(1, 4):
            parent.log_metrics({"val/rmse": 1.0 / step, "lr": 1e-3, "note": "not a number"}, step=step)
        fig = parity_plot({"train": (np.arange(5.0), np.arange(5.0) + 0.1)})
        parent.log_figure(fig, "plots/parity.png")
        parent.log_dict_csv({"r": [0, 1, 2], "C": [1.0, 0.5, 0.25]}, "tables/corr.csv")
        parent.log_dict_csv([{"a": 1, "b": 2}, {"a": 3, "b": 4}], "tables/rows.csv")
        (tmp_path / "note.txt").write_text("hello")
        parent.log_artifact(tmp_path / "note.txt", "files")
    with mu.start_run(task="train", cfg=cfg, run_name="child", parent_run_id=parent.run_id) as child:
        child.log_metrics({"x": 1.0}, step=0)

    client = MlflowClient(store)
    exp = client.get_experiment_by_name("lattice_lab/train")
    db_dir = Path(store[len("sqlite:///"):]).parent
    assert exp.artifact_location == (db_dir / "mlartifacts").as_uri()
    run = client.get_run(parent.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "parent"
    assert run.data.params["model.widths"] == "[1, 4, 1]" and run.data.params["seed"] == "0"
    assert run.data.tags["who"] == "test" and run.data.tags["task"] == "train"
    hist = client.get_metric_history(parent.run_id, "val/rmse")
    assert [(m.step, m.value) for m in hist] == [(1, 1.0), (2, 0.5), (3, 1.0 / 3)]
    assert "note" not in run.data.metrics
    arts = {a.path for d in ("plots", "tables", "files") for a in client.list_artifacts(parent.run_id, d)}
    assert arts == {"plots/parity.png", "tables/corr.csv", "tables/rows.csv", "files/note.txt"}
    local = client.download_artifacts(parent.run_id, "tables/corr.csv", str(tmp_path))
    assert Path(local).read_text().splitlines() == ["r,C", "0,1.0", "1,0.5", "2,0.25"]
    assert client.get_run(child.run_id).data.tags["mlflow.parentRunId"] == parent.run_id

    # resume: same run continues; unchanged params are fine, a changed one becomes a tag
    with mu.start_run(task="train", cfg=cfg, run_id=parent.run_id) as again:
        assert again.run_id == parent.run_id
        again.log_params({**cfg, "seed": 1})
        again.log_metrics({"val/rmse": 0.25}, step=4)
    run = client.get_run(parent.run_id)
    assert run.data.params["seed"] == "0" and run.data.tags["param_changed.seed"] == "1"
    assert len(client.get_metric_history(parent.run_id, "val/rmse")) == 4


def test_failed_body_marks_run_failed(store):
    from mlflow.tracking import MlflowClient

    with pytest.raises(RuntimeError, match="boom"):
        with mu.start_run(task="bench", run_name="bad") as tr:
            raise RuntimeError("boom")
    assert MlflowClient(store).get_run(tr.run_id).info.status == "FAILED"


def test_disabled_tracking_is_a_no_op(tmp_path, monkeypatch):
    db = tmp_path / "never.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    with mu.start_run(task="train", cfg={"tracking": {"enabled": False}}) as tr:
        assert not tr.enabled and tr.run_id is None
        tr.log_params({"a": 1})
        tr.log_metrics({"b": 2.0}, step=1)
        tr.log_artifact(__file__)
    assert not db.exists()


def test_tracking_enabled_null_leaves_the_choice_to_the_caller(store):
    # analyze's default (null: only under a parent run) is decided by analyze, which then opens the run
    # with enabled=True: the null in its tracking section is not a wrong flag
    with mu.start_run(task="analyze", cfg={"tracking": {"enabled": None, "parent_run_id": None}}, enabled=True) as tr:
        assert tr.enabled
    assert mu.TrackingSettings.from_config({"enabled": None}).enabled is False


def test_tracking_failures_warn_and_the_run_goes_on(store, monkeypatch):
    with mu.start_run(task="train") as tr:
        def broken(*a, **k):
            raise ConnectionError("store down")

        monkeypatch.setattr(tr.client, "log_batch", broken)
        with pytest.warns(RuntimeWarning, match="log_metrics failed"):
            tr.log_metrics({"a": 1.0}, step=1)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # warned once per kind of call, not on every call
            tr.log_metrics({"a": 2.0}, step=2)
    monkeypatch.setattr(mu, "get_or_create_experiment", lambda *a, **k: (_ for _ in ()).throw(OSError("no db")))
    ran = False
    with pytest.warns(RuntimeWarning, match="running without tracking"):
        with mu.start_run(task="train") as tr2:
            ran = True
            assert not tr2.enabled
            tr2.log_metrics({"a": 1.0})
    assert ran


BOGUS = r"MLflow has no tracking store for the scheme 'bogus' \(known: .*sqlite"


def test_a_uri_of_a_scheme_mlflow_has_no_store_for_is_a_config_error(tmp_path, monkeypatch):
    """``tracking.uri=bogus://x`` only warned ('MLflow tracking unavailable ...; running without tracking'), while
    compare_runs refused it: a wrong setting, refused wherever the tracking section is read."""
    with pytest.raises(ConfigError, match=rf"^tracking\.uri='bogus://x': {BOGUS}"):
        mu.TrackingSettings.from_config({"tracking": {"uri": "bogus://x"}})
    assert not mu.TrackingSettings.from_config({"tracking": {"enabled": False, "uri": "bogus://x"}}).enabled
    # analyze's null, opened with enabled=True by the caller: refused before the body, not warned about
    ran = []
    with pytest.raises(ConfigError, match=rf"^tracking\.uri='bogus://x': {BOGUS}"):
        with mu.start_run(task="analyze", cfg={"tracking": {"enabled": None, "uri": "bogus://x"}}, enabled=True):
            ran.append(True)
    assert not ran
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "bogus://y")  # where the URI comes from is named
    with pytest.raises(ConfigError, match=rf"^MLFLOW_TRACKING_URI='bogus://y': {BOGUS}"):
        mu.TrackingSettings.from_config({"tracking": {}})
    for uri in (f"sqlite:///{tmp_path}/m.db", str(tmp_path / "mlruns"), "http://127.0.0.1:9", "postgresql://u@h/db"):
        assert mu.check_tracking_uri(uri) == uri  # only the scheme is checked: nothing opened, nothing created
    assert list(tmp_path.iterdir()) == []


def test_every_entrypoint_refuses_a_bad_uri_before_the_run_does_any_work(tmp_path):
    """``simulate ... tracking.uri=bogus://x`` ran (without tracking) and exited 0; simulate opens its MLflow run
    only after it has made its run folder and hot start, so the entrypoint checks the section first."""
    import os
    import subprocess
    import sys

    repo = Path(mu.__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(repo), "LATTICE_LAB_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "lattice_lab.simulate", "force=ed", "dynamics.L=4",
                           "dynamics.replicas=1", "dynamics.steps=2", "dynamics.save_every=1", "analyze=false",
                           "tracking.uri=bogus://x", f"hydra.run.dir={tmp_path / 'hydra'}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]  # one line
    assert proc.stderr.startswith("error: tracking.uri='bogus://x': MLflow has no tracking store for the scheme 'bogus'")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hydra"]  # no runs/trajectories, no store


def test_plots_are_pngs(tmp_path):
    rng = np.random.default_rng(0)
    exact = rng.normal(size=(3, 6, 6))
    splits = {"train": (exact + 0.01 * rng.normal(size=exact.shape), exact),
              "val": (exact[:1] + 0.02 * rng.normal(size=(1, 6, 6)), exact[:1])}
    fig = parity_plot(splits, title="tiny")
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    sigma_val = float(np.std(splits["val"][0] - splits["val"][1]))
    assert any(f"{sigma_val:.4g}" in s and s.startswith("val") for s in labels) and "$y = x$" in labels
    for name, f in (("parity.png", fig), ("hist.png", error_histogram(splits))):
        path = save_figure(f, tmp_path / name, close=True)
        assert path.read_bytes()[:8] == PNG_MAGIC
    assert error_histogram(splits).axes[0].get_yscale() == "log"


def test_tags_say_whether_the_code_had_uncommitted_changes(tmp_path):
    import subprocess

    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                       check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    git("add", "a.py")
    git("commit", "-qm", "a")
    (tmp_path / "untracked.txt").write_text("outputs are not code\n")
    assert mu.git_dirty(tmp_path) is False
    (tmp_path / "a.py").write_text("x = 2\n")
    assert mu.git_dirty(tmp_path) is True
    assert mu.git_dirty(tmp_path / "not_a_repo_sub") is None
    assert mu.standard_tags("train")["git_dirty"] in ("True", "False")


def test_tracking_enabled_must_be_a_flag():
    from lattice_lab.tracking.mlflow_utils import TrackingSettings

    assert TrackingSettings.from_config({"tracking": {"enabled": False}}).enabled is False
    with pytest.raises(ConfigError, match=r"^tracking.enabled='no': expected true or false"):
        TrackingSettings.from_config({"tracking": {"enabled": "no"}})


@pytest.mark.parametrize(("raised", "status"), [(KeyboardInterrupt, "KILLED"), (Interrupted, "KILLED"),
                                                 (ValueError, "FAILED")])
def test_run_status_says_interrupted_or_failed(tmp_mlflow, raised, status):
    """Ctrl-C -- bare, or as Interrupted after the run saved its state -- ends the MLflow run KILLED."""
    from mlflow.tracking import MlflowClient

    with pytest.raises(raised), mu.start_run(task="simulate", cfg={"tracking": {"enabled": True}}) as tracker:
        run_id = tracker.run_id
        raise raised("stop")
    assert MlflowClient(tracking_uri=tmp_mlflow).get_run(run_id).info.status == status


def _splits(seed: int = 0, noise: float = 0.01):
    rng = np.random.default_rng(seed)
    exact = 5.0 * rng.normal(size=(8, 8, 8))
    return {"train": (exact[:6] + noise * rng.standard_t(3, size=(6, 8, 8)), exact[:6]),
            "val": (exact[6:] + noise * rng.standard_t(3, size=(2, 8, 8)), exact[6:])}


def test_force_axes_say_what_they_show_and_in_which_units():
    import matplotlib.pyplot as plt

    splits = _splits()
    ax = parity_plot(splits).axes[0]
    assert "exact force" in ax.get_xlabel() and "predicted force" in ax.get_ylabel()
    hx = error_histogram(splits).axes[0]
    assert "force error" in hx.get_xlabel()
    for label in (ax.get_xlabel(), ax.get_ylabel(), hx.get_xlabel()):
        assert "model units" in label and "t_{hop}" in label, label
    plt.close("all")


def test_error_histogram_legend_covers_no_bins_and_nothing_is_cut_off(tmp_path, inked_edges):
    """On a log scale the tails of a trained model's errors reach every corner of the frame: the legend
    (with sigma, the key number) drawn inside covered the bins at the level of 1-10 sites."""
    import matplotlib.pyplot as plt

    fig = error_histogram(_splits(noise=0.3), title="gnn_small on holstein_L16")
    path = save_figure(fig, tmp_path / "hist.png", close=False)
    ax = fig.axes[0]
    renderer = fig.canvas.get_renderer()
    legend, frame = ax.get_legend().get_window_extent(renderer), ax.get_window_extent(renderer)
    assert not legend.overlaps(frame), (legend, frame)
    assert inked_edges(path) == {}
    plt.close("all")


def test_a_long_run_title_is_wrapped_not_cut_off(tmp_path, inked_edges):
    """The training plots' titles name the run; a default run name of a multirun job is ~50 characters."""
    import matplotlib.pyplot as plt

    title = ("gnn_energy_small on holstein_L40\n"
             "run gnn_energy_small_holstein_L40_20261123-013440_12, best epoch 145 of 150")
    for name, fn in (("parity", parity_plot), ("hist", error_histogram)):
        path = save_figure(fn(_splits(noise=0.1), title=title), tmp_path / f"{name}.png", close=True)
        assert inked_edges(path) == {}, name
    plt.close("all")


def test_learning_curve_log_rmse_best_epoch_and_lr(tmp_path, inked_edges):
    """metrics.csv had no plot: train / val RMSE vs epoch on a log axis, the best epoch and its RMSE named."""
    import matplotlib.pyplot as plt

    hist = [{"epoch": e, "train/rmse": 2.0 / e, "val/rmse": 2.1 / e + (0.05 if e == 9 else 0.0),
             "lr": 1e-3 if e < 6 else 5e-4} for e in range(1, 10)]
    fig = learning_curve(hist, best_epoch=8, title="gnn_small on holstein_L16\nrun x, best epoch 8 of 9")
    ax = fig.axes[0]
    assert ax.get_yscale() == "log" and ax.get_xlabel() == "epoch" and "RMSE" in ax.get_ylabel()
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "best: epoch 8, val RMSE = 0.2625" in labels and "learning rate (right axis)" in labels, labels
    assert fig.axes[1].get_yscale() == "log"
    fig.canvas.draw()
    shown = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
    assert len(shown) >= 3 and not any("times" in t or "^" in t for t in shown), shown  # 0.5, 1, 2: not 2 x 10^0
    epochs = [v for v in ax.get_xticks() if ax.get_xlim()[0] <= v <= ax.get_xlim()[1]]
    assert epochs and all(float(v).is_integer() for v in epochs), epochs  # no epoch 1.5
    r = fig.canvas.get_renderer()
    assert not ax.get_legend().get_window_extent(r).overlaps(ax.get_window_extent(r))
    assert inked_edges(save_figure(fig, tmp_path / "lc.png", close=True)) == {}
    plt.close("all")


def test_error_by_configuration_separates_random_and_quench_and_plots_snapshots_against_time(tmp_path, inked_edges):
    import matplotlib.pyplot as plt

    kind = np.array([0, 0, 1, 1, 1, 1])
    t = np.array([np.nan, np.nan, 2.0, 2.0, 4.0, 4.0])
    rmse = np.array([0.5, 0.4, 0.3, 0.2, 0.02, 0.01])
    fig = error_by_configuration({"train": (rmse, kind, t), "val": (rmse[::2] * 2, kind[::2], t[::2])}, title="x")
    rnd, qu = fig.axes
    assert rnd.get_yscale() == "log" and qu.get_xlabel() == "time after the quench $t$"
    # the random strip holds the random configurations only, the quench panel the snapshots at their times
    pts = {ax: np.concatenate([c.get_offsets() for c in ax.collections]) for ax in (rnd, qu)}
    assert sorted(pts[rnd][:, 1]) == sorted([0.5, 0.4, 1.0])
    assert sorted(pts[qu][:, 0]) == [2.0, 2.0, 2.0, 4.0, 4.0, 4.0]
    assert np.allclose(sorted(pts[qu][:, 1]), [0.01, 0.02, 0.04, 0.2, 0.3, 0.6])
    # the train median per time: (0.3, 0.2) at t = 2, (0.02, 0.01) at t = 4
    (train_line,) = [ln for ln in qu.get_lines() if len(ln.get_xdata()) == 2 and ln.get_color() == "tab:blue"]
    assert np.allclose(train_line.get_ydata(), [0.25, 0.015])
    assert [t.get_text() for t in qu.get_legend().get_texts()] == ["train: median 0.11", "val: median 0.32"]
    assert inked_edges(save_figure(fig, tmp_path / "e.png", close=True)) == {}
    # one kind only, and no schedule in the file: one panel, snapshots in file order
    fig = error_by_configuration({"val": (rmse[2:], kind[2:], None)})
    assert len(fig.axes) == 1 and fig.axes[0].get_xlabel() == "quench snapshot (file order)"
    plt.close("all")


def test_error_vs_order_bins_the_site_errors_by_the_local_order(tmp_path, inked_edges):
    import matplotlib.pyplot as plt

    phi = np.array([0.02, 0.03, 0.97, 0.98, 0.99, 0.72])
    err = np.array([0.6, -0.8, 0.01, -0.01, 0.01, 0.1])
    fig = error_vs_order({"val": (err, phi)}, title="x")
    ax, ax_n = fig.axes
    (pts,) = ax.collections
    xy = pts.get_offsets()
    assert np.allclose(xy[:, 0], [0.025, 0.725, 0.975])  # the centres of the occupied bins of width 0.05
    assert np.allclose(xy[:, 1], [np.sqrt(0.5), 0.1, 0.01])  # RMSE per bin
    assert [t.get_text() for t in ax_n.get_legend().get_texts()] == ["val: RMSE 0.707 on walls, 0.0507 in domains"]
    assert ax.get_yscale() == "log" and ax_n.get_xlim() == (0.0, 1.0)
    assert inked_edges(save_figure(fig, tmp_path / "o.png", close=True)) == {}
    plt.close("all")


def test_error_vs_order_legend_covers_no_bin(tmp_path, inked_edges):
    """A trained model's two sets reach the upper right of the frame (val RMSE 0.5 at |phi| ~ 0.6 for enn on
    holstein_L24): the legend drawn inside covered those bins; it goes below the axes."""
    import matplotlib.pyplot as plt

    phi = np.linspace(0.0, 1.0, 400)
    err = np.full(400, 0.5)
    fig = error_vs_order({"train": (err * 0.2, phi), "val": (err, phi)}, title="enn on holstein_L24")
    path = save_figure(fig, tmp_path / "o.png", close=False)
    ax, ax_n = fig.axes
    legend = ax_n.get_legend() or ax.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["train: RMSE 0.1 on walls, 0.1 in domains",
                                                          "val: RMSE 0.5 on walls, 0.5 in domains"]
    renderer = fig.canvas.get_renderer()
    for a in (ax, ax_n):
        assert not legend.get_window_extent(renderer).overlaps(a.get_window_extent(renderer)), a
    assert inked_edges(path) == {}
    plt.close("all")


def test_error_by_configuration_without_a_schedule_places_each_split_at_its_position_in_the_file():
    """No stored schedule (a file not written by generate): the snapshots go in file order. Numbered within
    each split, train's and val's k-th snapshots were drawn at one x though they are different configurations
    (val's third of the snapshots squeezed onto the first third of the axis)."""
    import matplotlib.colors
    import matplotlib.pyplot as plt

    kind = np.array([0, 1, 1, 1, 1, 1, 1, 1])
    val = np.arange(8) % 3 == 2
    rmse = np.linspace(0.1, 0.8, 8)
    idx = {"train": np.flatnonzero(~val), "val": np.flatnonzero(val)}
    fig = error_by_configuration({s: (rmse[i], kind[i], None) for s, i in idx.items()}, positions=idx)
    qu = fig.axes[-1]
    assert qu.get_xlabel() == "quench snapshot (file order)"
    xs = {tuple(c.get_facecolor()[0][:3]): sorted(c.get_offsets()[:, 0]) for c in qu.collections}
    assert xs[matplotlib.colors.to_rgb("tab:blue")] == [1, 3, 4, 6, 7]
    assert xs[matplotlib.colors.to_rgb("tab:orange")] == [2, 5]
    assert all(float(x).is_integer() for x in qu.get_xticks())  # configurations, not fractions of one
    plt.close("all")


def test_flatten_config_keeps_a_nested_hydra_key_and_writes_tuples_as_lists():
    """Only the top-level ``hydra`` section is Hydra's own; a plain dict's tuple is logged like a config's list
    (what :func:`lattice_lab.sweeps.report.logged_value` reads back); an empty config logs nothing."""
    flat = mu.flatten_config({"launcher": {"hydra": {"x": 1}}, "shape": (16, 8), "hydra": {"run": 1}})
    assert flat == {"launcher.hydra.x": "1", "shape": "[16, 8]"}
    assert mu.flatten_config({}) == {} and mu.flatten_config(None) == {}


def test_explicit_artifact_root_and_a_new_store_folder(tmp_path):
    """``tracking.artifact_root`` wins over ``mlartifacts/`` beside the database; a sqlite store in a folder that
    does not exist yet gets its folder (MLflow fails with 'unable to open database file')."""
    uri = f"sqlite:///{tmp_path}/new/sub/m.db"
    assert mu.default_artifact_root(uri, str(tmp_path / "arts")) == (tmp_path / "arts").as_uri()
    assert mu.setup_tracking({"uri": uri}) == uri
    assert (tmp_path / "new" / "sub").is_dir()


def test_file_sha256_hashes_the_whole_file_short_or_in_full(tmp_path):
    import hashlib

    data = bytes(range(256)) * (3 * 4096 + 1)  # beyond the 1 MiB chunks it reads
    (tmp_path / "d.h5").write_bytes(data)
    full = hashlib.sha256(data).hexdigest()
    assert mu.file_sha256(tmp_path / "d.h5", short=None) == full
    assert mu.file_sha256(tmp_path / "d.h5") == full[:12] and mu.file_sha256(tmp_path / "d.h5", 8) == full[:8]


def test_git_commit_is_the_head_commit_and_none_without_one(tmp_path):
    """``git rev-parse HEAD`` in a repository without a commit prints ``HEAD`` and fails: no commit to tag."""
    import subprocess

    def git(*args):
        return subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                              check=True, capture_output=True, text=True).stdout.strip()

    assert mu.git_commit(tmp_path / "not_a_repo") is None
    git("init", "-q")
    assert mu.git_commit(tmp_path) is None
    (tmp_path / "a.py").write_text("x = 1\n")
    git("add", "a.py")
    git("commit", "-qm", "a")
    assert mu.git_commit(tmp_path) == git("rev-parse", "HEAD") and len(mu.git_commit(tmp_path)) == 40


def test_a_deleted_experiment_is_restored_and_runs_go_on_in_it(store):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store)
    exp = mu.get_or_create_experiment("lattice_lab/gone", store)
    client.delete_experiment(exp)
    assert mu.get_or_create_experiment("lattice_lab/gone", store) == exp
    assert client.get_experiment(exp).lifecycle_stage == "active"


def test_more_params_tags_and_metrics_than_one_mlflow_batch_are_all_logged(store):
    """MLflow takes at most 100 params or tags and 1000 metrics per log_batch: the tracker splits them, and logs
    no None tag and no bool metric; a metric without a step is at step 0."""
    from mlflow.tracking import MlflowClient

    with mu.start_run(task="train") as tr:
        tr.log_params({f"p{i:03d}": i for i in range(250)})
        tr.set_tags({**{f"t{i:03d}": i for i in range(150)}, "none": None})
        tr.log_metrics({**{f"m{i:04d}": float(i) for i in range(1200)}, "flag": True})
    run = MlflowClient(store).get_run(tr.run_id)
    assert len(run.data.params) == 250 and run.data.params["p249"] == "249"
    assert {f"t{i:03d}" for i in range(150)} <= set(run.data.tags) and "none" not in run.data.tags
    assert len(run.data.metrics) == 1200 and "flag" not in run.data.metrics
    assert [m.step for m in MlflowClient(store).get_metric_history(tr.run_id, "m1199")] == [0]


def test_a_folder_artifact_uploads_its_files(store, tmp_path):
    from mlflow.tracking import MlflowClient

    folder = tmp_path / "plots"
    folder.mkdir()
    for name in ("a.txt", "b.txt"):
        (folder / name).write_text(name)
    with mu.start_run(task="train") as tr:
        tr.log_artifact(folder, "figures")
    assert {a.path for a in MlflowClient(store).list_artifacts(tr.run_id, "figures")} == {"figures/a.txt",
                                                                                         "figures/b.txt"}


def test_to_csv_takes_rows_with_other_keys_numpy_columns_and_refuses_ragged_columns():
    assert mu.to_csv([{"a": 1}, {"a": 2, "b": 3}]).splitlines() == ["a,b", "1,", "2,3"]
    assert mu.to_csv({"x": np.arange(2), "y": [0.5, 1.5]}).splitlines() == ["x,y", "0,0.5", "1,1.5"]
    with pytest.raises(ValueError, match=r"^to_csv: columns have different lengths \[2, 3\]$"):
        mu.to_csv({"a": [1, 2], "b": [1, 2, 3]})


def test_resume_reopens_the_run_and_a_run_id_not_in_the_store_starts_a_new_one(store):
    """A resumed run is RUNNING again while it runs and tagged ``resumed``; an unknown run id warns and a new
    run starts (the body runs, tracked)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store)
    with mu.start_run(task="train", run_name="first") as first:
        pass
    with mu.start_run(task="train", run_id=first.run_id, tags={"extra": "1"}) as again:
        run = client.get_run(first.run_id)
        assert run.info.status == "RUNNING"
        assert run.data.tags["resumed"] == "true" and run.data.tags["extra"] == "1"
    assert again.run_id == first.run_id and client.get_run(first.run_id).info.status == "FINISHED"
    missing = "0" * 32
    with pytest.warns(RuntimeWarning, match=rf"MLflow run {missing} not found in .*; starting a new run"):
        with mu.start_run(task="train", run_id=missing) as new:
            assert new.enabled and new.run_id not in (missing, first.run_id)
    assert client.get_run(new.run_id).info.status == "FINISHED"


def test_parent_from_the_config_or_the_active_run_and_call_tags_over_config_tags(store):
    """``tracking.parent_run_id`` nests a run as the argument does (analyze under a simulate run); ``nested=True``
    nests under this process's active run; the caller's tags win over ``tracking.tags``."""
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store)
    with mu.start_run(task="simulate") as parent:
        pass
    cfg = {"tracking": {"parent_run_id": parent.run_id, "tags": {"who": "config", "kept": "yes"}}}
    with mu.start_run(task="analyze", cfg=cfg, tags={"who": "caller"}) as child:
        pass
    tags = client.get_run(child.run_id).data.tags
    assert tags["mlflow.parentRunId"] == parent.run_id and tags["who"] == "caller" and tags["kept"] == "yes"
    with mlflow.start_run(experiment_id=mu.get_or_create_experiment("lattice_lab/simulate", store)) as active:
        with mu.start_run(task="simulate", nested=True) as inner:
            pass
    assert client.get_run(inner.run_id).data.tags["mlflow.parentRunId"] == active.info.run_id


def test_parity_plot_counts_and_clips_predictions_outside_the_frame():
    """The frame spans the exact forces: predictions far above and below are drawn at its edge and counted."""
    import matplotlib.pyplot as plt

    exact = np.linspace(-1.0, 1.0, 9)
    pred = exact.copy()
    pred[0], pred[-1] = -50.0, 80.0
    ax = parity_plot({"val": (pred, exact)}).axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "2 predictions outside the frame (clipped)" in labels, labels
    lo, hi = ax.get_ylim()
    crosses = ax.collections[1].get_offsets()
    assert sorted(crosses[:, 1]) == [lo, hi]
    plt.close("all")


def test_parity_plot_subsamples_the_points_but_counts_every_outlier(monkeypatch):
    import matplotlib.pyplot as plt

    from lattice_lab.tracking import plots

    monkeypatch.setattr(plots, "MAX_SCATTER_POINTS", 10)
    exact = np.linspace(-1.0, 1.0, 100)
    pred = exact.copy()
    pred[::4] = 10.0  # 25 outliers, more than are drawn
    ax = plots.parity_plot({"train": (pred, exact)}).axes[0]
    assert sum(len(c.get_offsets()) for c in ax.collections) == 10
    assert "25 predictions outside the frame (clipped)" in [t.get_text() for t in ax.get_legend().get_texts()]
    plt.close("all")


def test_error_histogram_of_a_perfect_model_and_a_learning_curve_without_its_best_epoch():
    """All-zero errors (a model scored on its own labels) still give a histogram; a best epoch that is not in
    the history (a resumed run's rows) is not marked; the plateau scheduler's few learning rates are labelled."""
    import matplotlib.pyplot as plt

    x = np.arange(6.0)
    hx = error_histogram({"val": (x, x)}).axes[0]
    assert hx.patches and np.allclose(hx.get_xlim(), (-1.05, 1.05), atol=0.2)
    hist = [{"epoch": e, "train/rmse": 1.0 / e, "val/rmse": 1.1 / e, "lr": 1e-3 if e < 3 else 5e-4}
            for e in range(1, 5)]
    fig = learning_curve(hist, best_epoch=9)
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert not any(s.startswith("best") for s in labels), labels
    assert [t.get_text() for t in fig.axes[1].get_yticklabels()] == ["0.0005", "0.001"]
    plt.close("all")


def test_error_by_configuration_draws_a_median_line_only_where_a_time_has_several_snapshots():
    """One replica per time: the points are the snapshots, no line joins them as if it were a median."""
    import matplotlib.pyplot as plt

    fig = error_by_configuration({"val": (np.array([0.3, 0.2, 0.1]), np.ones(3, int), np.array([2.0, 4.0, 6.0]))})
    (ax,) = fig.axes
    assert ax.get_lines() == [] and len(ax.collections[0].get_offsets()) == 3
    plt.close("all")
