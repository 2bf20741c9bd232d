"""``python -m lattice_lab.evaluate``: a saved force field scored on a dataset, overall and per kind, with errors."""

import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir

from lattice_lab.common.cli import CONFIG_DIR
from lattice_lab.common.errors import ConfigError
from lattice_lab.data.h5io import write_force_dataset
from lattice_lab.evaluate import run
from lattice_lab.models.checkpoint import export_force_field, save_checkpoint
from lattice_lab.models.registry import build_model, load_preset
from lattice_lab.physics.ed import ExactForces
from lattice_lab.physics.holstein import HolsteinParams

L = 10  # gnn_small reaches 4 sites: L >= 9
SCHEDULE = "dataset:\n  n_random: 3\n  n_quench: 6\n  replicas: 2\n  burn_in: 4\n  snapshot_every: 2\n  dt: 0.05\n"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A 10x10 dataset (3 random + 6 quench configurations, the build schedule in its attrs) and a gnn_small
    checkpoint (float64, untrained: its errors are large, which is all scoring needs)."""
    root = tmp_path_factory.mktemp("eval")
    ham = HolsteinParams(temperature=0.1)
    gen = torch.Generator().manual_seed(5)
    Q = torch.randn(9, L, L, generator=gen, dtype=torch.float64) * torch.tensor([4.0] * 3 + [1.5] * 6)[:, None, None]
    res = ExactForces(ham).compute(Q)
    data = root / "d.h5"
    write_force_dataset(data, {"Q": Q.numpy(), "F": res.forces.numpy(), "n": res.density.numpy(),
                               "kind": np.array([0] * 3 + [1] * 6, np.uint8), "is_val": np.arange(9) % 3 == 2},
                        attrs={**ham.as_dict(), "name": "d", "config": SCHEDULE})
    torch.manual_seed(0)
    model = build_model(load_preset("gnn_small"), ham.as_dict()).double()
    ckpt = save_checkpoint(root / "run_a" / "best.pt", model, extra={"dataset_name": "d"})
    return {"data": data, "ckpt": ckpt, "model": model, "Q": Q, "F": res.forces, "root": root}


def _cfg(files, *extra):
    with initialize_config_dir(config_dir=CONFIG_DIR):
        return compose("evaluate", overrides=[f"checkpoint={files['ckpt']}", f"dataset.path={files['data']}",
                                              "device=cpu", "tracking.enabled=false", *extra])


def test_scores_overall_and_per_kind_against_an_independent_computation(files, tmp_path):
    metrics = run(_cfg(files, f"out_dir={tmp_path / 'out'}"))
    with torch.no_grad():
        err = (files["model"](files["Q"]) - files["F"]).numpy()
    assert metrics["n_configs"] == 9 and metrics["lattice_L"] == L
    assert metrics["eval/sigma"] == pytest.approx(np.std(err), rel=1e-10)
    assert metrics["eval/rmse"] == pytest.approx(np.sqrt(np.mean(err ** 2)), rel=1e-10)
    assert metrics["eval/random_sigma"] == pytest.approx(np.std(err[:3]), rel=1e-10)
    assert metrics["eval/quench_max_err"] == pytest.approx(np.abs(err[3:]).max(), rel=1e-10)
    assert yaml.safe_load((tmp_path / "out" / "metrics.yaml").read_text()) == pytest.approx(metrics)
    assert 0 < metrics["eval/quench_wall_fraction"] < 1 and "eval/quench_domain_sigma" in metrics
    for name in ("parity.png", "error_hist.png", "error_by_config.png", "error_vs_order.png", "evaluate_config.yaml"):
        assert (tmp_path / "out" / name).is_file(), name
    # a split scores only its configurations
    val = run(_cfg(files, "split=val", f"out_dir={tmp_path / 'val'}", "plots=false"))
    assert val["n_configs"] == 3 and val["eval/sigma"] == pytest.approx(np.std(err[2::3]), rel=1e-10)
    assert not (tmp_path / "val" / "parity.png").exists()
    quench = run(_cfg(files, "split=quench", f"out_dir={tmp_path / 'q'}", "plots=false"))
    assert "eval/random_sigma" not in quench and quench["eval/sigma"] == pytest.approx(np.std(err[3:]), rel=1e-10)


def test_default_output_folder_names_the_run_the_data_and_the_split(files, monkeypatch):
    monkeypatch.chdir(files["root"])
    run(_cfg(files, "split=val", "plots=false"))
    assert (files["root"] / "runs" / "evaluations" / "run_a_on_d_val" / "metrics.yaml").is_file()


def test_a_torchscript_export_scores_the_same(files, tmp_path):
    exported = export_force_field(files["model"], tmp_path / "model.ts", example_L=L)
    a = run(_cfg(files, f"out_dir={tmp_path / 'a'}", "plots=false"))
    b = run(_cfg(files, f"checkpoint={exported}", f"out_dir={tmp_path / 'b'}", "plots=false"))
    assert b["eval/sigma"] == pytest.approx(a["eval/sigma"], rel=1e-9)


def test_logged_to_mlflow_with_its_checkpoint(files, tmp_path, tmp_mlflow):
    from mlflow.tracking import MlflowClient

    metrics = run(_cfg(files, f"out_dir={tmp_path / 'o'}", "tracking.enabled=true"))
    client = MlflowClient(tmp_mlflow)
    (r,) = client.search_runs([client.get_experiment_by_name("lattice_lab/evaluate").experiment_id])
    assert r.data.metrics["eval/quench_sigma"] == metrics["eval/quench_sigma"]
    assert r.data.tags["checkpoint"] == str(files["ckpt"]) and r.data.tags["train_run"] == "run_a"
    assert r.data.tags["split"] == "all" and r.data.tags["task"] == "evaluate"
    arts = {a.path for a in client.list_artifacts(r.info.run_id, "plots")}
    assert arts == {"plots/parity.png", "plots/error_hist.png", "plots/error_by_config.png", "plots/error_vs_order.png"}
    # compare_runs lines evaluations up by their own columns (every default column is logged)
    from lattice_lab.compare_runs import DEFAULT_COLUMNS, runs_table

    columns, rows = runs_table("lattice_lab/evaluate", tracking_uri=tmp_mlflow)
    assert columns[2:] == [c.split(".", 1)[1] for c in DEFAULT_COLUMNS["lattice_lab/evaluate"]] and len(rows) == 1
    assert "-" not in rows[0] and None not in rows[0]
    assert rows[0][columns.index("eval/quench_sigma")] == f"{metrics['eval/quench_sigma']:.4g}"  # formatted


@pytest.mark.parametrize(("overrides", "fragment"), [
    (["split=test"], "split='test'"),
    (["batch_size=0"], "batch_size=0"),
    (["batch_size=abc"], "batch_size='abc'"),
    (["dtype=float16"], "dtype"),
    (["plots=maybe"], "plots"),
    (["checkpoint=/nonexistent/best.pt"], "/nonexistent"),
    (["dataset.path=/nonexistent.h5"], "/nonexistent.h5"),
])
def test_bad_settings_are_named(files, tmp_path, overrides, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[")):
        run(_cfg(files, f"out_dir={tmp_path / 'x'}", *overrides))
    assert not (tmp_path / "x").exists()


def test_a_force_field_of_another_hamiltonian_is_refused(files, tmp_path):
    model = build_model(load_preset("gnn_small"), HolsteinParams(g=2.0, temperature=0.1).as_dict())
    ckpt = save_checkpoint(tmp_path / "g2" / "best.pt", model)
    with pytest.raises(ConfigError, match="g=3.5: this force field was trained for g=2.0"):
        run(_cfg(files, f"checkpoint={ckpt}", f"out_dir={tmp_path / 'x'}"))
    assert not (tmp_path / "x").exists()


def test_entrypoint_prints_one_line(files, tmp_path):
    ok = subprocess.run([sys.executable, "-m", "lattice_lab.evaluate", f"checkpoint={files['ckpt']}",
                         f"dataset.path={files['data']}", f"out_dir={tmp_path / 'o'}", "device=cpu",
                         "tracking.enabled=false", "plots=false"], capture_output=True, text=True, timeout=120,
                        cwd=tmp_path)  # Hydra's run folder, runs/hydra/evaluate/<time>, goes under the working directory
    assert ok.returncode == 0, ok.stderr
    assert "[evaluate] run_a on d (all, 9 configurations of 10x10): RMSE" in ok.stdout and "; quench " in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "lattice_lab.evaluate", f"dataset.path={files['data']}"],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: checkpoint=???")


def test_scoring_the_training_data_beyond_its_validation_split_warns(files, tmp_path, caplog):
    from lattice_lab.data.h5io import read_force_dataset
    from lattice_lab.training.trainer import data_fingerprint

    sha = data_fingerprint(read_force_dataset(files["data"]))
    ckpt = save_checkpoint(tmp_path / "trained_here" / "best.pt", files["model"], extra={"data_sha256": sha})
    with caplog.at_level("WARNING", logger="lattice_lab.evaluate"):
        run(_cfg(files, f"checkpoint={ckpt}", f"out_dir={tmp_path / 'a'}", "plots=false"))
    assert "is the data this model was trained on: split=all includes its training configurations" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="lattice_lab.evaluate"):
        run(_cfg(files, f"checkpoint={ckpt}", f"out_dir={tmp_path / 'b'}", "plots=false", "split=val"))
        run(_cfg(files, f"out_dir={tmp_path / 'c'}", "plots=false"))  # trained on other data
    assert "trained on" not in caplog.text


def test_a_checkpoint_without_a_data_hash_is_matched_to_its_training_data_by_path(files, tmp_path, caplog):
    """A checkpoint from before the data's content hash was stored: the training data is recognised by its path."""
    ckpt = save_checkpoint(tmp_path / "older" / "best.pt", files["model"],
                           extra={"dataset_path": str(files["data"])})
    with caplog.at_level("WARNING", logger="lattice_lab.evaluate"):
        run(_cfg(files, f"checkpoint={ckpt}", f"out_dir={tmp_path / 'a'}", "plots=false"))
    assert "is the data this model was trained on: split=all includes its training configurations" in caplog.text


def test_without_a_stored_schedule_the_snapshots_are_placed_at_their_position_in_the_file(files, tmp_path,
                                                                                            monkeypatch):
    """A file not written by generate has no schedule (quench_times is None): error_by_config.png places the
    snapshots by their index in the file, not by their index among the split's configurations."""
    from lattice_lab.data.h5io import read_force_dataset
    from lattice_lab.tracking import plots

    data = read_force_dataset(files["data"])
    data.attrs["config"] = ""
    bare = write_force_dataset(tmp_path / "bare.h5", data)
    seen = {}

    def spy(configs, title="", **kw):
        seen["fig"] = fig = plots_error_by_configuration(configs, title=title, **kw)
        return fig

    plots_error_by_configuration = plots.error_by_configuration
    monkeypatch.setattr(plots, "error_by_configuration", spy)
    run(_cfg(files, f"dataset.path={bare}", "split=val", f"out_dir={tmp_path / 'o'}"))
    quench_panel = seen["fig"].axes[-1]
    assert quench_panel.get_xlabel() == "quench snapshot (file order)"
    assert sorted(np.concatenate([c.get_offsets()[:, 0] for c in quench_panel.collections])) == [5, 8]
    assert (tmp_path / "o" / "error_by_config.png").is_file()


def test_a_rerun_into_the_same_folder_leaves_none_of_the_earlier_results(files, tmp_path):
    """out_dir is replaced: a plot the new evaluation does not draw (no quench snapshots scored, plots=false)
    is not left from the earlier one beside the new metrics."""
    out = tmp_path / "o"
    run(_cfg(files, f"out_dir={out}"))
    assert (out / "error_vs_order.png").is_file()
    run(_cfg(files, f"out_dir={out}", "split=random"))
    assert not (out / "error_vs_order.png").exists() and (out / "parity.png").is_file()
    run(_cfg(files, f"out_dir={out}", "plots=false"))
    assert sorted(p.name for p in out.iterdir()) == ["evaluate_config.yaml", "metrics.yaml"]


def test_an_out_dir_that_cannot_be_made_is_named(files, tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(ConfigError, match="out_dir=.*f/sub"):
        run(_cfg(files, f"out_dir={tmp_path / 'f' / 'sub'}"))


def test_a_model_giving_non_finite_forces_is_refused_before_anything_is_written(files, tmp_path):
    """NaN forces made every metric NaN and the log-scale plots fail with a matplotlib traceback."""
    import copy

    model = copy.deepcopy(files["model"])
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    ckpt = save_checkpoint(tmp_path / "nan" / "best.pt", model)
    with pytest.raises(ConfigError, match=r"checkpoint=.*nan.*NaN or inf forces on 9 of 9 configurations"):
        run(_cfg(files, f"checkpoint={ckpt}", f"out_dir={tmp_path / 'x'}"))
    # the configuration is named by its place in the file, not in the split (val: configurations 2, 5, 8)
    with pytest.raises(ConfigError, match=r"on 3 of 3 configurations of d.h5 \(first: configuration 2 of the file\)"):
        run(_cfg(files, f"checkpoint={ckpt}", "split=val", f"out_dir={tmp_path / 'x'}"))
    assert not (tmp_path / "x").exists()


def test_a_checkpoint_given_by_mlflow_run_id_is_named_by_its_run(files, tmp_path, tmp_mlflow, monkeypatch,
                                                                 log_train_run):
    """checkpoint=<run id>: the evaluation is named after the training run (it was the temporary download
    folder, lattice_lab_ckpt_<random>, a new default out_dir at every call) and tagged with the id."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tmp_mlflow)
    train = log_train_run(tmp_mlflow, files["ckpt"], "run_a")
    monkeypatch.chdir(tmp_path)
    run(_cfg(files, f"checkpoint={train}", "split=val", "plots=false", "tracking.enabled=true"))
    assert (tmp_path / "runs" / "evaluations" / "run_a_on_d_val" / "metrics.yaml").is_file()
    (r,) = client.search_runs([client.get_experiment_by_name("lattice_lab/evaluate").experiment_id])
    assert r.data.tags["train_run"] == "run_a" and r.data.tags["checkpoint"] == train
    assert r.data.tags["train_run_id"] == train  # the checkpoint itself records none: the run it came from


def test_a_run_id_is_looked_up_in_the_store_of_tracking_uri(files, tmp_path, monkeypatch, log_train_run):
    """``checkpoint=<run id> tracking.uri=<store>``: the run is fetched from that store (it was looked up only in
    $MLFLOW_TRACKING_URI or runs/mlflow.db, which do not hold it) and the evaluation is named after it."""
    uri = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    train = log_train_run(uri, files["ckpt"], "run_b")
    (tmp_path / "work" / "runs").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "work")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    metrics = run(_cfg(files, f"checkpoint={train}", f"tracking.uri={uri}", "split=val", "plots=false"))
    assert metrics["n_configs"] == 3
    assert (tmp_path / "work" / "runs" / "evaluations" / "run_b_on_d_val" / "metrics.yaml").is_file()
    assert not (tmp_path / "work" / "runs" / "mlflow.db").exists()


def test_a_run_name_that_is_no_folder_name_is_replaced_by_the_run_id(files, tmp_path, log_train_run):
    """The training run's MLflow name names the evaluation's folder: a name with a slash (or '..') would put it
    elsewhere, so the run id stands in; a plain name is used as it is."""
    from lattice_lab.evaluate import _mlflow_run_name

    uri = f"sqlite:///{tmp_path / 'store.db'}"
    for name in ("a/b", ".."):
        assert _mlflow_run_name(run_id := log_train_run(uri, files["ckpt"], name), uri) == run_id
    assert _mlflow_run_name(log_train_run(uri, files["ckpt"], "run_c"), uri) == "run_c"


def test_a_run_id_where_there_is_no_tracking_store_says_so_and_creates_none(files, tmp_path, monkeypatch):
    """``checkpoint=<run id> tracking.enabled=false`` created runs/mlflow.db (MLflow makes an empty store where it
    opens a missing one) and then said only that the run was not found."""
    import re

    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_id, db = "0123456789abcdef0123456789abcdef", (tmp_path / "runs" / "mlflow.db").resolve()
    with pytest.raises(ConfigError, match=rf"^checkpoint='{run_id}' \(an MLflow run id, looked up in "
                                          rf"sqlite:///{re.escape(str(db))}\): no database {re.escape(str(db))} "):
        run(_cfg(files, f"checkpoint={run_id}", f"out_dir={tmp_path / 'out'}"))
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["runs"]  # no store, no output


def test_an_export_is_tagged_with_its_training_run_and_data(files, tmp_path, tmp_mlflow):
    """The export's metadata carries the training run id and the training data's name (train_run_id was not
    tagged; train_dataset read a metadata key that no export had)."""
    from mlflow.tracking import MlflowClient

    from lattice_lab.models.checkpoint import load_force_field

    ckpt = save_checkpoint(tmp_path / "run_b" / "best.pt", files["model"],
                           extra={"dataset_name": "d", "mlflow_run_id": "0123456789abcdef0123456789abcdef"})
    exported = export_force_field(load_force_field(ckpt, device="cpu"), tmp_path / "run_b.ts")
    run(_cfg(files, f"checkpoint={exported}", "split=val", "plots=false", f"out_dir={tmp_path / 'o'}",
             "tracking.enabled=true"))
    client = MlflowClient(tmp_mlflow)
    (r,) = client.search_runs([client.get_experiment_by_name("lattice_lab/evaluate").experiment_id])
    assert r.data.tags["train_run_id"] == "0123456789abcdef0123456789abcdef"
    assert r.data.tags["train_dataset"] == "d" and r.data.tags["train_run"] == "run_b"


def test_last_pt_is_not_taken_for_best_pt(files, tmp_path, monkeypatch):
    """best.pt and last.pt of one run were both named after the run: the second evaluation replaced the first
    (same default folder, same title and MLflow run name)."""
    save_checkpoint(files["root"] / "run_a" / "last.pt", files["model"])
    monkeypatch.chdir(tmp_path)
    for name in ("best.pt", "last.pt"):
        run(_cfg(files, f"checkpoint={files['root'] / 'run_a' / name}", "split=val", "plots=false"))
    assert sorted(p.name for p in (tmp_path / "runs" / "evaluations").iterdir()) == ["run_a_last_on_d_val",
                                                                                     "run_a_on_d_val"]
