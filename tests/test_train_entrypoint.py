"""``python -m lattice_lab.train`` end to end on a tiny dataset: outputs, MLflow contents, resume, errors."""

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir

from lattice_lab import load_force_field
from lattice_lab.common.cli import CONFIG_DIR
from lattice_lab.common.errors import ConfigError
from lattice_lab.data.h5io import read_force_dataset, write_force_dataset
from lattice_lab.physics.ed import ExactForces
from lattice_lab.physics.holstein import HolsteinParams
from lattice_lab.tracking import mlflow_utils as mu
from lattice_lab.train import run
from lattice_lab.training.metrics import force_metrics

REPO = Path(CONFIG_DIR).parent
L = 10  # gnn_small has a receptive field of 4 hops: needs L >= 9


@pytest.fixture(scope="module")
def dataset_file(tmp_path_factory):
    """6 configurations of 10x10 with ED forces (2 for validation), written in the dataset format."""
    ham = HolsteinParams(temperature=0.1)
    gen = torch.Generator().manual_seed(2)
    Q = torch.randn(6, L, L, generator=gen, dtype=torch.float64) * 1.5
    res = ExactForces(ham).compute(Q)
    path = tmp_path_factory.mktemp("data") / "tiny.h5"
    write_force_dataset(path, {"Q": Q.numpy(), "F": res.forces.numpy(), "n": res.density.numpy(),
                               "kind": np.array([0, 1, 0, 1, 0, 1], np.uint8), "is_val": np.arange(6) >= 4},
                        attrs={**ham.as_dict(), "name": "tiny"})
    return path


@pytest.fixture(scope="module")
def _empty_store(tmp_path_factory):
    """An MLflow sqlite store with its schema migrated once (creating one costs ~5-10 s)."""
    db = tmp_path_factory.mktemp("mlflow_template") / "mlflow.db"
    mu.get_or_create_experiment("Default-init", mu.setup_tracking({"uri": f"sqlite:///{db}"}))
    return db


@pytest.fixture
def store(tmp_mlflow, _empty_store):
    shutil.copy(_empty_store, tmp_mlflow[len("sqlite:///"):])
    return tmp_mlflow


def _cfg(dataset_path, out_root, *extra):
    overrides = ["model=gnn_small", "dataset=holstein_L8_tiny", f"dataset.path={dataset_path}", "trainer=quick",
                 "trainer.max_epochs=3", "trainer.progress=false", "trainer.lr=3e-3", "device=cpu",
                 "dtype=float64", f"output_root={out_root}", *extra]
    with initialize_config_dir(config_dir=CONFIG_DIR):
        return compose(config_name="train", overrides=overrides)


def test_defaults_compose():
    with initialize_config_dir(config_dir=CONFIG_DIR):
        cfg = compose(config_name="train")
    assert cfg.model.name == "enn" and cfg.dataset.name == "holstein_L16" and cfg.trainer.lr == 1e-3
    assert cfg.trainer.batch_size == 4 and cfg.trainer.max_epochs == 200 and cfg.tracking.enabled


def test_train_end_to_end_with_mlflow_and_resume(dataset_file, tmp_path, store):
    from mlflow.tracking import MlflowClient

    best = run(_cfg(dataset_file, tmp_path, "run_name=e2e"))
    assert isinstance(best, float) and np.isfinite(best)
    run_dir = tmp_path / "e2e"
    for name in ("best.pt", "last.pt", "config.yaml", "metrics.csv", "parity.png", "error_hist.png", "learning_curve.png",
                 "error_by_config.png", "error_vs_order.png"):
        assert (run_dir / name).is_file(), name
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    assert len(rows) == 3 and best == min(float(r["val/rmse"]) for r in rows)

    # MLflow: params, per-epoch history, final metrics, artifacts
    client = MlflowClient(store)
    exp = client.get_experiment_by_name("lattice_lab/train")
    (r,) = client.search_runs([exp.experiment_id])
    assert r.info.run_name == "e2e" and r.info.status == "FINISHED"
    p = r.data.params
    assert p["model.widths"] == "[1, 16, 32, 16, 1]" and p["trainer.max_epochs"] == "3" and p["dtype"] == "float64"
    assert r.data.tags["task"] == "train" and r.data.tags["model_family"] == "gnn"
    assert r.data.tags["run_kind"] == "single" and "sweep_study" not in r.data.tags
    assert not (run_dir / "sweep_trial.yaml").exists()
    assert r.data.tags["dataset_sha256"] == mu.file_sha256(dataset_file)[:12]
    # the content hash (Q, F, split) names the data itself: equal for a rebuilt file with another timestamp
    from lattice_lab.training.trainer import data_fingerprint

    assert r.data.tags["data_content_sha256"] == data_fingerprint(read_force_dataset(dataset_file))[:16]
    hist = client.get_metric_history(r.info.run_id, "val/rmse")
    assert [m.step for m in hist] == [1, 2, 3] and min(m.value for m in hist) == best
    for key in ("train/rmse", "train/mae", "train/sigma", "train/max_err", "val/mae", "val/sigma",
                "val/max_err", "lr", "epoch_time", "final/val_sigma", "final/train_rmse", "n_params"):
        assert key in r.data.metrics, key
    assert r.data.metrics["final/val_rmse"] == pytest.approx(best, rel=1e-12)
    # metric L is the domain size L(t) in simulate and analyze runs; the training lattice is lattice_L
    assert r.data.metrics["lattice_L"] == read_force_dataset(dataset_file).L and "L" not in r.data.metrics
    arts = {a.path for d in ("", "plots", "checkpoints") for a in client.list_artifacts(r.info.run_id, d or None)}
    assert {"config.yaml", "metrics.csv", "checkpoints/best.pt", "plots/parity.png", "plots/error_hist.png",
            "plots/learning_curve.png", "plots/error_by_config.png", "plots/error_vs_order.png"} <= arts

    # the checkpoint fetched by MLflow run id reproduces the validation RMSE
    ff = load_force_field(r.info.run_id, device="cpu")
    val = read_force_dataset(dataset_file).split("val")
    with torch.no_grad():
        rmse = force_metrics(ff(torch.from_numpy(val.Q)), torch.from_numpy(val.F))["rmse"]
    assert rmse == pytest.approx(best, rel=1e-12)
    # the errors per kind of configuration (random hot starts, quench snapshots), recomputed from the checkpoint
    final = yaml.safe_load((run_dir / "final_metrics.yaml").read_text())
    with torch.no_grad():
        err = (ff(torch.from_numpy(val.Q)) - torch.from_numpy(val.F)).numpy()
    for code, name in enumerate(("random", "quench")):
        e = err[val.kind == code]
        assert final[f"final/val_{name}_sigma"] == pytest.approx(np.std(e), rel=1e-9)
        assert final[f"final/val_{name}_max_err"] == pytest.approx(np.abs(e).max(), rel=1e-12)
        assert r.data.metrics[f"final/val_{name}_sigma"] == final[f"final/val_{name}_sigma"]
        assert f"final/train_{name}_rmse" in r.data.metrics
    for key in ("final/val_quench_wall_sigma", "final/val_quench_domain_sigma", "final/val_quench_wall_fraction"):
        assert r.data.metrics[key] == final[key], key

    # an existing run is not overwritten; resume continues it (same MLflow run, more epochs)
    with pytest.raises(ConfigError, match="resume=true"):
        run(_cfg(dataset_file, tmp_path, "run_name=e2e"))
    best2 = run(_cfg(dataset_file, tmp_path, "run_name=e2e", "resume=true", "trainer.max_epochs=5"))
    assert best2 <= best
    (r2,) = client.search_runs([exp.experiment_id])
    assert r2.info.run_id == r.info.run_id and r2.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(r.info.run_id, "val/rmse")] == [1, 2, 3, 4, 5]
    assert len(list(csv.DictReader((run_dir / "metrics.csv").open()))) == 5


def test_tracking_disabled_still_trains_and_resumes_newest_run(dataset_file, tmp_path, monkeypatch):
    db = tmp_path / "unused.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    off = ("tracking.enabled=false", "plots=false")
    best = run(_cfg(dataset_file, tmp_path, *off, "trainer.max_epochs=1"))
    assert isinstance(best, float) and not db.exists()
    # composed without Hydra's runtime the preset name is unknown: the run is named after the model family, and
    # after the dataset file's own name (tiny), not the preset's (holstein_L8_tiny)
    (run_dir,) = tmp_path.glob("gnn_tiny_*")
    assert (run_dir / "best.pt").is_file() and not (run_dir / "parity.png").exists()
    run(_cfg(dataset_file, tmp_path, *off, "resume=true", "trainer.max_epochs=2"))  # newest run of model+data
    assert [p.name for p in tmp_path.glob("gnn_tiny_*")] == [run_dir.name]
    assert len(list(csv.DictReader((run_dir / "metrics.csv").open()))) == 2
    assert (run_dir / "config_resume.yaml").is_file()


def test_missing_dataset_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"python -m lattice_lab.generate dataset=holstein_L8_tiny"):
        run(_cfg(tmp_path / "nope.h5", tmp_path))


@pytest.mark.parametrize("name", ["..", ".", "../x", "a/b"])
def test_run_name_must_be_one_folder_inside_output_root(dataset_file, tmp_path, name):
    with pytest.raises(ConfigError, match="run_name=.*one folder name"):
        run(_cfg(dataset_file, tmp_path / "out", f"run_name={name}", "tracking.enabled=false"))
    assert not (tmp_path / "config.yaml").exists() and not (tmp_path / "out" / "config.yaml").exists()


def test_bad_seed_is_a_config_error(dataset_file, tmp_path):
    with pytest.raises(ConfigError, match=r"seed='abc': expected a non-negative integer"):
        run(_cfg(dataset_file, tmp_path, "seed=abc", "tracking.enabled=false"))
    assert not any(tmp_path.iterdir())
    with pytest.raises(ConfigError, match=r"seed=99999999999999999999999: too large \(seeds are 64-bit"):
        run(_cfg(dataset_file, tmp_path, "seed=99999999999999999999999", "tracking.enabled=false"))
    assert not any(tmp_path.iterdir())


def test_dataset_smaller_than_the_receptive_field_is_refused_before_the_run(dataset_file, tmp_path):
    # 6 message-passing layers reach 6 hops: a 10 x 10 dataset cannot hold one environment
    with pytest.raises(ConfigError, match=r"model=gnn on dataset .*lattice L=10 is smaller .*needs L >= 13"):
        run(_cfg(dataset_file, tmp_path, "model.widths=[1,4,4,4,4,4,1]", "tracking.enabled=false"))
    assert not any(tmp_path.iterdir())  # no run folder holding just a config


def test_a_cutoff_beyond_the_dataset_is_refused_before_the_model_is_built(dataset_file, tmp_path, monkeypatch):
    """model.cutoff=100 (an ENN's size grows as cutoff^4) was built until memory ran out, and only then compared
    with the 10 x 10 dataset."""
    import lattice_lab.models.registry as registry

    monkeypatch.setattr(registry, "build_model", lambda *a, **k: pytest.fail("the model was built"))
    with pytest.raises(ConfigError, match=r"model=enn on dataset .*: model.cutoff=100: lattice L=10 is smaller "
                                          r"than the model's receptive field \(needs L >= 201\)"):
        run(_cfg(dataset_file, tmp_path, "model=enn_small", "model.cutoff=100", "tracking.enabled=false"))
    assert not any(tmp_path.iterdir())


def test_dataset_path_that_is_a_folder_is_named(tmp_path, dataset_file):
    with pytest.raises(ConfigError, match=r"^dataset.path=.*: is a folder; name the dataset's HDF5 file"):
        run(_cfg(dataset_file, tmp_path / "out", f"dataset.path={tmp_path}", "tracking.enabled=false"))
    assert not (tmp_path / "out").exists()


def test_the_run_records_the_dataset_file_it_read_not_the_preset(dataset_file, tmp_path, caplog):
    """``dataset=holstein_L8_tiny dataset.path=<another file>`` trained on the file and recorded the preset's name
    and L (checkpoint dataset_name, saved config, run name): the file's own name, L and build settings win."""
    import logging

    data = read_force_dataset(dataset_file)
    built = tmp_path / "data" / "ref10.h5"  # as generate writes one: its build settings stored with it
    stored = "seed: 0\ndataset:\n  name: ref10\n  path: somewhere/ref10.h5\n  L: 10\n  temperature: 0.1\n  n_random: 3\n"
    write_force_dataset(built, data, {"name": "ref10", "config": stored})
    off = ("tracking.enabled=false", "plots=false", "trainer.max_epochs=1")
    for path, name, expected in [(dataset_file, "plain", {"name": "tiny", "path": str(dataset_file), "L": L,
                                                           "temperature": 0.1}),
                                 (built, "built", {"name": "ref10", "path": str(built), "L": L, "temperature": 0.1,
                                                   "n_random": 3})]:
        with caplog.at_level(logging.WARNING, logger="lattice_lab.train"):
            run(_cfg(path, tmp_path, *off, f"run_name={name}"))
        assert f"holds dataset {expected['name']} (L={L}), not the preset's holstein_L8_tiny (L=8)" in caplog.text
        for saved in (yaml.safe_load((tmp_path / name / "config.yaml").read_text()),
                      yaml.safe_load(torch.load(tmp_path / name / "best.pt", weights_only=False)["config"])):
            assert saved["dataset"] == expected
        assert torch.load(tmp_path / name / "best.pt", weights_only=False)["dataset_name"] == expected["name"]


@pytest.mark.parametrize("override, message", [
    ("dataset.temperature=0.2", r"dataset\.temperature=0\.2: the dataset file \S+tiny\.h5 \(tiny\) holds forces for "
                                r"temperature=0\.1, .*\(use the dataset preset it was built with, or "
                                r"dataset\.temperature=0\.1\)$"),
    ("+hamiltonian.g=3.0", r"hamiltonian\.g=3\.0: the dataset file \S+ \(tiny\) holds forces for g=3\.5, "),
])
def test_a_hamiltonian_other_than_the_dataset_files_is_refused(dataset_file, tmp_path, override, message):
    with pytest.raises(ConfigError, match="^" + message):
        run(_cfg(dataset_file, tmp_path, override, "tracking.enabled=false"))
    assert not any(tmp_path.iterdir())


def test_cli_reports_config_errors_in_one_line(tmp_path):
    env = {**os.environ, "LATTICE_LAB_NO_PROGRESS": "1"}
    proc = subprocess.run([sys.executable, "-m", "lattice_lab.train", "dataset=holstein_L8_tiny",
                           f"dataset.path={tmp_path / 'missing.h5'}", f"hydra.run.dir={tmp_path / 'hydra'}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: dataset.path=")
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("override", ["resume=maybe", "plots=no", "tracking.enabled=no", "trainer.progress=1",
                                      "model.elastic_prior=yes"])
def test_true_false_settings_refuse_other_values_before_the_run(dataset_file, tmp_path, tmp_mlflow, override):
    key, value = override.split("=")
    with pytest.raises(ConfigError, match=rf"^{key}='?{value}'?: expected true or false$"):
        run(_cfg(dataset_file, tmp_path / "out", override))
    assert not (tmp_path / "out").exists() and not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_is_refused_before_training(dataset_file, tmp_path, dtype):
    # bfloat16 crashed in the plots after training; float16 diverged and the error blamed the learning rate
    with pytest.raises(ConfigError, match=rf"^dtype='{dtype}': expected one of \['float32', 'float64'\]$"):
        run(_cfg(dataset_file, tmp_path, f"dtype={dtype}", "tracking.enabled=false"))
    assert not any(tmp_path.iterdir())


def test_resume_without_run_name_skips_sweep_trials_and_names_the_run_it_picked(dataset_file, tmp_path, caplog):
    import logging

    off = ("tracking.enabled=false", "plots=false", "trainer.max_epochs=1")
    run(_cfg(dataset_file, tmp_path, *off, "run_name=gnn_tiny_mine"))
    run(_cfg(dataset_file, tmp_path, *off, "run_name=gnn_tiny_other", "model.widths=[1,4,4,4,1]"))
    # the newest run of this model and dataset is another size: the refusal names the folder it picked
    with pytest.raises(ConfigError, match=r"^model\.widths=.*: the run being resumed \(\S+/gnn_tiny_other\) "
                                          r"was trained with .*; resume=true without run_name picked it .*run_name="):
        run(_cfg(dataset_file, tmp_path, *off[:2], "resume=true"))
    # ... and is not picked once it is marked as an Optuna trial, as a sweep's trials are
    (tmp_path / "gnn_tiny_other" / "sweep_trial.yaml").write_text("study: s\n")
    with caplog.at_level(logging.INFO, logger="lattice_lab.train"):
        run(_cfg(dataset_file, tmp_path, *off[:2], "resume=true", "trainer.max_epochs=2"))
    assert "gnn_tiny_mine is the newest run" in caplog.text and "1 sweep trial folders skipped" in caplog.text
    assert len(list(csv.DictReader((tmp_path / "gnn_tiny_mine" / "metrics.csv").open()))) == 2


def test_resume_with_another_seed_is_refused_and_changes_nothing(dataset_file, tmp_path):
    """``resume=true run_name=ok1 seed=9`` on a run started with seed 0 was accepted, and best.pt and
    config_resume.yaml then recorded seed 9 (the continuation draws from last.pt's RNG states, not from seed 9)."""
    off = ("tracking.enabled=false", "plots=false")
    run(_cfg(dataset_file, tmp_path, *off, "run_name=ok1", "trainer.max_epochs=1"))
    before = {p.name: p.read_bytes() for p in (tmp_path / "ok1").iterdir()}
    with pytest.raises(ConfigError, match=r"^seed=9: the run being resumed \(\S+/ok1\) was trained with seed=0$"):
        run(_cfg(dataset_file, tmp_path, *off, "resume=true", "run_name=ok1", "seed=9", "trainer.max_epochs=2"))
    assert {p.name: p.read_bytes() for p in (tmp_path / "ok1").iterdir()} == before  # no config_resume.yaml


def _ctrl_c_in_epoch(n):
    """A Trainer._train_epoch that is interrupted (Ctrl-C) inside epoch ``n``."""
    from lattice_lab.training.trainer import Trainer

    train_epoch = Trainer._train_epoch

    def epoch(self, i):
        if i == n:
            raise KeyboardInterrupt
        return train_epoch(self, i)

    return epoch


def test_ctrl_c_names_the_checkpoint_of_the_last_finished_epoch_and_the_resume(dataset_file, tmp_path, monkeypatch):
    from lattice_lab.common.errors import Interrupted
    from lattice_lab.models.checkpoint import load_checkpoint
    from lattice_lab.training.trainer import Trainer

    off = ("tracking.enabled=false", "plots=false", "run_name=cut")
    monkeypatch.setattr(Trainer, "_train_epoch", _ctrl_c_in_epoch(1))
    with pytest.raises(Interrupted, match=r"before the first epoch finished: nothing to resume \(\S+/cut holds no"):
        run(_cfg(dataset_file, tmp_path, *off))
    monkeypatch.undo()
    monkeypatch.setattr(Trainer, "_train_epoch", _ctrl_c_in_epoch(3))
    with pytest.raises(Interrupted, match=r"^\S+/cut/last\.pt holds the last finished epoch \(epoch 2; .*\); "
                                          r"rerun with resume=true run_name=cut to continue$"):
        run(_cfg(dataset_file, tmp_path, *off))
    assert load_checkpoint(tmp_path / "cut" / "last.pt")["epoch"] == 2
    monkeypatch.undo()
    run(_cfg(dataset_file, tmp_path, *off, "resume=true"))
    assert len(list(csv.DictReader((tmp_path / "cut" / "metrics.csv").open()))) == 3


def test_cli_reports_ctrl_c_in_one_line(dataset_file, tmp_path):
    script = ("import sys, test_train_entrypoint as t\n"
              "from lattice_lab.training.trainer import Trainer\n"
              "Trainer._train_epoch = t._ctrl_c_in_epoch(2)\n"
              "from lattice_lab.train import main\n"
              "sys.argv = ['train', *sys.argv[1:]]\n"
              "main()\n")
    args = ["model=gnn_small", "dataset=holstein_L8_tiny", f"dataset.path={dataset_file}", "trainer=quick",
            "trainer.progress=false", "device=cpu", "dtype=float64", f"output_root={tmp_path}", "run_name=cut",
            "tracking.enabled=false", "plots=false", f"hydra.run.dir={tmp_path / 'hydra'}"]
    env = {**os.environ, "LATTICE_LAB_NO_PROGRESS": "1", "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", script, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 130 and "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]  # printed by common.cli.friendly_errors
    assert last.startswith(f"interrupted: {tmp_path / 'cut' / 'last.pt'} holds the last finished epoch (epoch 1;")
    assert last.endswith("rerun with resume=true run_name=cut to continue")


def test_plot_titles_name_the_run_and_its_best_epoch(dataset_file, tmp_path, monkeypatch):
    """Two runs of one model on one dataset (another seed, more epochs) had plots with the same title."""
    from lattice_lab.tracking import plots

    titles = []
    for name in ("parity_plot", "error_histogram"):
        fn = getattr(plots, name)
        monkeypatch.setattr(plots, name, lambda splits, title="", _fn=fn: titles.append(title) or _fn(splits, title=title))
    run(_cfg(dataset_file, tmp_path, "run_name=seed7", "seed=7", "tracking.enabled=false"))
    best_epoch = int(min(csv.DictReader((tmp_path / "seed7" / "metrics.csv").open()),
                         key=lambda r: float(r["val/rmse"]))["epoch"])
    assert len(titles) == 2
    for title in titles:
        assert " on tiny\nrun seed7," in title, title
        assert f"best epoch {best_epoch} of 3" in title, title


def test_error_by_config_places_train_and_val_snapshots_at_their_position_in_the_file(dataset_file, tmp_path,
                                                                                       monkeypatch):
    """The file has no stored schedule: the snapshots go in file order on one axis for both splits (numbered
    within each split, val's snapshot 5 was drawn at 1, beside train's snapshot 1)."""
    from lattice_lab.tracking import plots

    seen = {}
    real = plots.error_by_configuration

    def spy(configs, title="", **kw):
        seen["fig"] = fig = real(configs, title=title, **kw)
        return fig

    monkeypatch.setattr(plots, "error_by_configuration", spy)
    run(_cfg(dataset_file, tmp_path, "run_name=order", "trainer.max_epochs=1", "tracking.enabled=false"))
    quench_panel = seen["fig"].axes[-1]
    assert quench_panel.get_xlabel() == "quench snapshot (file order)"
    xs = {tuple(c.get_facecolor()[0][:3]): sorted(c.get_offsets()[:, 0]) for c in quench_panel.collections}
    assert sorted(xs.values()) == [[1, 3], [5]]  # train: configurations 1 and 3; val: 5 (kind 0 1 0 1 0 1)
