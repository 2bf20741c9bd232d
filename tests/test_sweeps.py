"""Optuna sweeps through Hydra multirun: persistent study, resume, failed trials, one MLflow parent."""

import os
import re
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import optuna
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from lattice_lab.common.cli import CONFIG_DIR
from lattice_lab.common.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def _sweep_config(tmp_path, study: str, *overrides: str):
    """The composed config, Hydra's part included, of an ``mlp_optuna`` sweep whose study ``study`` is kept in
    ``tmp_path/optuna.db``."""
    with initialize_config_dir(config_dir=CONFIG_DIR):
        return compose("train", overrides=["hparams_search=mlp_optuna",
                                           f"hydra.sweeper.storage=sqlite:///{tmp_path / 'optuna.db'}",
                                           f"hydra.sweeper.study_name={study}", *overrides],
                       return_hydra_config=True)


def _write_tiny_dataset(path):
    """6 configurations of 8x8 with exact ED forces, in the documented HDF5 format."""
    import torch

    from lattice_lab.data.h5io import ForceData, write_force_dataset
    from lattice_lab.physics.ed import ExactForces
    from lattice_lab.physics.holstein import HolsteinParams

    params = HolsteinParams(temperature=0.1)
    Q = torch.randn(6, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 1.5
    res = ExactForces(params).compute(Q)
    data = ForceData(Q=Q.numpy(), F=res.forces.numpy(), n=res.density.numpy(),
                     kind=np.zeros(6, np.uint8), is_val=(np.arange(6) % 3 == 2), attrs={})
    write_force_dataset(path, data, {**params.as_dict(), "L": 8, "seed": 0, "name": "tiny"})
    with h5py.File(path) as f:
        assert f["F"].shape == (6, 8, 8)
    return path


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    return _write_tiny_dataset(tmp_path_factory.mktemp("data") / "tiny.h5")


def _sweep(tmp, dataset, n_trials, tag):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}", "LATTICE_LAB_NO_PROGRESS": "1",
           "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}
    cmd = [sys.executable, "-m", "lattice_lab.train", "-m", "hparams_search=enn_optuna", "model=enn_small",
           "model.hidden=[2,2,2]", f"dataset.path={dataset}", "dataset.name=tiny", "trainer=quick",
           "trainer.max_epochs=1", "plots=false", f"output_root={tmp / 'ckpt'}",
           f"hydra.sweeper.storage=sqlite:///{tmp / 'optuna.db'}", "hydra.sweeper.study_name=test_study",
           f"hydra.sweeper.n_trials={n_trials}", "hydra/sweeper/sampler=grid", "hydra.sweeper.params=null",
           "trainer.lr=choice(0.001,-1.0)", "trainer.batch_size=choice(1,2)",
           f"hydra.sweep.dir={tmp / ('sweep_' + tag)}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # the sweep callback is built as a trusted target (Hydra warned of it at every sweep, and 1.5 refuses it)
    assert "_execution_whitelist_" not in proc.stderr, proc.stderr[-3000:]
    return tmp / ("sweep_" + tag)


def test_sweep_records_trials_failures_resumes_and_shares_parent(tmp_path, tiny_dataset):
    import mlflow

    # grid of 4 points (lr in {1e-3, -1} x batch in {1, 2}); 3 trials must contain a failing lr = -1
    sweep1 = _sweep(tmp_path, tiny_dataset, 3, "a")
    study = optuna.load_study(study_name="test_study", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    states = [t.state for t in study.trials]
    assert len(states) == 3
    assert optuna.trial.TrialState.FAIL in states, "the invalid lr must be recorded as a failed trial"
    assert optuna.trial.TrialState.COMPLETE in states, "the sweep must go on after a failure"
    for t in study.trials:
        assert (t.state == optuna.trial.TrialState.FAIL) == (t.params["trainer.lr"] < 0)
    table = (sweep1 / "trials.csv").read_text().splitlines()
    assert len(table) == 4 and table[0].startswith("number,state,value,mlflow_run_id")
    # best_config.yaml names one run that retrains the best trial: the sweep's settings + the best values
    best = OmegaConf.load(sweep1 / "best_config.yaml")
    assert "model=enn_small" in best.overrides and "dataset.name=tiny" in best.overrides
    assert f"trainer.lr={best.params['trainer.lr']}" in best.overrides and not any(
        "choice(" in o or o.startswith("hparams_search") for o in best.overrides)
    assert best.command.startswith("python -m lattice_lab.train ")
    with initialize_config_dir(config_dir=CONFIG_DIR):
        rerun = compose("train", overrides=list(best.overrides))
    assert rerun.model.hidden == [2, 2, 2] and rerun.trainer.lr == best.params["trainer.lr"]

    # resume: the same study gets one more trial (the last grid point)
    sweep2 = _sweep(tmp_path, tiny_dataset, 1, "b")
    study = optuna.load_study(study_name="test_study", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert len(study.trials) == 4
    parent = (sweep1 / "mlflow_parent_run_id.txt").read_text().strip()
    assert (sweep2 / "mlflow_parent_run_id.txt").read_text().strip() == parent, "resume reuses the parent run"

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    children = client.search_runs([client.get_run(parent).info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
    n_complete = sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    finished = [r for r in children if r.info.status == "FINISHED"]
    assert len(finished) == n_complete, "every completed trial is an MLflow child of the one parent"
    # trials say they are trials: tags (compare_runs --filter) and a marker in the run folder (resume=true)
    assert all(r.data.tags["run_kind"] == "sweep_trial" and r.data.tags["sweep_study"] == "test_study"
               for r in finished)
    folders = sorted((tmp_path / "ckpt").iterdir())
    assert len(folders) == n_complete
    assert all(OmegaConf.load(f / "sweep_trial.yaml").study == "test_study" for f in folders)
    linked = [line.split(",")[3] for line in (sweep2 / "trials.csv").read_text().splitlines()[1:]
              if ",COMPLETE," in line]
    assert linked and all(rid in {r.info.run_id for r in finished} for rid in linked)
    parent_run = client.get_run(parent)
    assert parent_run.data.metrics["n_trials_complete"] == n_complete
    assert parent_run.info.status == "FINISHED"
    assert parent_run.data.tags["run_kind"] == "sweep" and parent_run.data.tags["sweep_study"] == "test_study"
    # what docs/platform.md gives compare_runs to leave sweeps out
    exp_id = parent_run.info.experiment_id
    assert not client.search_runs([exp_id], filter_string="tags.sweep_study IS NULL")


def test_resumed_study_gets_a_new_sampler_seed_so_it_does_not_repeat_its_trials(tmp_path):
    """A seeded sampler restarts its random stream: a resumed sweep must not draw its first points again."""
    from hydra.utils import instantiate

    from lattice_lab.sweeps.callback import offset_sampler_seed

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    cfg = _sweep_config(tmp_path, "resume_seed")
    assert offset_sampler_seed(cfg) is None, "a new study keeps the configured seed"
    seed0 = int(cfg.hydra.sweeper.sampler.seed)

    def first_draws(sampler_cfg, study_name, n=2):
        study = optuna.create_study(study_name=study_name, storage=storage, load_if_exists=True,
                                    sampler=instantiate(sampler_cfg, _execution_whitelist_=["optuna.samplers.TPESampler"]))
        trials = [study.ask({"x": optuna.distributions.FloatDistribution(0.0, 1.0)}) for _ in range(n)]
        for t in trials:
            study.tell(t, t.params["x"])
        return [t.params["x"] for t in trials]

    first = first_draws(cfg.hydra.sweeper.sampler, "resume_seed")
    assert offset_sampler_seed(cfg) == seed0 + 2
    assert cfg.hydra.overrides.hydra[-1] == f"hydra.sweeper.sampler.seed={seed0 + 2}", \
        "the trials' configs are composed from the overrides and must see the same sweeper"
    again = first_draws(cfg.hydra.sweeper.sampler, "resume_seed")
    assert set(again).isdisjoint(first)


def test_sampler_seed_is_a_32_bit_seed_and_a_resumed_study_wraps_it(tmp_path):
    """Optuna's samplers take seeds below 2^32: a larger or negative seed is refused naming it (it failed in
    Optuna with a traceback), and the offset of a resumed study wraps around instead of leaving that range."""

    from lattice_lab.sweeps.callback import offset_sampler_seed

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"

    def cfg(seed):
        return _sweep_config(tmp_path, "wrap", f"seed={seed}")

    for bad, why in ((2**32, "too large (seeds are 32-bit: at most 2^32 - 1 = 4294967295)"),
                     (-1, "expected a non-negative integer")):
        with pytest.raises(ConfigError, match=rf"^hydra\.sweeper\.sampler\.seed={bad}: {re.escape(why)}; "
                                              r"the search files set it to the run's seed: give seed="):
            offset_sampler_seed(cfg(bad))
    study = optuna.create_study(study_name="wrap", storage=storage)
    for x in (0.1, 0.2):
        study.add_trial(optuna.trial.create_trial(
            params={"x": x}, distributions={"x": optuna.distributions.FloatDistribution(0, 1)}, value=x))
    assert offset_sampler_seed(cfg(2**32 - 1)) == 1


def test_a_sweep_with_a_seed_optuna_cannot_take_stops_with_one_line(tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    proc = subprocess.run([sys.executable, "-m", "lattice_lab.train", "-m", "hparams_search=mlp_optuna",
                           "seed=4294967296", f"hydra.sweeper.storage=sqlite:///{tmp_path / 'optuna.db'}",
                           f"hydra.sweep.dir={tmp_path / 'sweep'}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.splitlines()[-1].startswith(
        "error: hydra.sweeper.sampler.seed=4294967296: too large (seeds are 32-bit"), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Record does not exist" not in proc.stderr


def _enn_trials(storage=None):
    """Two completed trials of enn_optuna's search space (list elements model.hidden.0/1 among them)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    dists = {"trainer.lr": FloatDistribution(1e-4, 3e-3, log=True),
             "trainer.batch_size": CategoricalDistribution([2, 4, 8]),
             "model.hidden.0": CategoricalDistribution([8, 16, 32]), "model.hidden.1": CategoricalDistribution([4, 8]),
             "model.activation": CategoricalDistribution(["gate", "tanh"])}
    points = [{"trainer.lr": 1e-3, "trainer.batch_size": 2, "model.hidden.0": 16, "model.hidden.1": 8,
               "model.activation": "tanh"},
              {"trainer.lr": 2e-4, "trainer.batch_size": 2, "model.hidden.0": 32, "model.hidden.1": 8,
               "model.activation": "tanh"}]
    study = optuna.create_study(direction="minimize", storage=storage, study_name="enn")
    for value, params in zip((0.5, 0.4), points):
        study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=value))
    return study, points


def test_trials_are_linked_to_their_mlflow_runs_when_list_elements_are_searched():
    """MLflow logs model.hidden='[16, 8, 2]', not model.hidden.0: enn trials were left without a run id."""
    from lattice_lab.sweeps.report import trials_table
    from lattice_lab.tracking.mlflow_utils import flatten_config

    study, points = _enn_trials()
    run_params = {}
    with initialize_config_dir(config_dir=CONFIG_DIR):
        for i, params in enumerate(points):  # what each trial's train run logs: its flattened config
            cfg = compose("train", overrides=["hparams_search=enn_optuna", *(f"{k}={v}" for k, v in params.items())])
            run_params[f"run{i}"] = flatten_config(cfg)
    assert "model.hidden.0" not in run_params["run0"] and run_params["run0"]["model.hidden"] == "[16, 8, 2]"
    rows = trials_table(study, run_params)
    assert [r["mlflow_run_id"] for r in rows] == ["run0", "run1"]
    # a run that differs in one list element is not the trial's
    assert [r["mlflow_run_id"] for r in trials_table(study, {"run1": run_params["run1"]})] == ["", "run1"]
    # nested below a list, missing, or not readable back (a value cut at MLflow's length limit)
    from lattice_lab.sweeps.report import logged_value

    assert logged_value({"a.b": "[{'c': [1, None]}]"}, "a.b.0.c.1") == "null"
    assert logged_value({"a.b": "[1, 2]"}, "a.b.2") is None and logged_value({}, "a.b.0") is None
    assert logged_value({"a.b": "[1, 2, ..."}, "a.b.0") is None


def test_best_config_command_composes_the_best_trials_whole_config(tmp_path):
    """The command kept the presets and the command line but dropped what the search config sets itself
    (optuna_base: trainer.max_epochs 60, patience 15): it trained another schedule than the trial's."""
    import shlex

    from lattice_lab.sweeps.callback import fixed_overrides
    from lattice_lab.sweeps.report import write_study_report

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    _, points = _enn_trials(storage)
    sweep = ["hparams_search=enn_optuna", "dataset.name=tiny", "trainer.lr_patience=3"]
    with initialize_config_dir(config_dir=CONFIG_DIR):
        sweep_cfg = compose("train", overrides=sweep, return_hydra_config=True)
    write_study_report(storage, "enn", tmp_path, fixed_overrides=fixed_overrides(sweep_cfg))
    best = OmegaConf.load(tmp_path / "best_config.yaml")
    assert best.trial == 1 and shlex.split(best.command)[3:] == list(best.overrides)
    assert not any("hparams_search" in o for o in best.overrides), "one plain run, not a search"
    with initialize_config_dir(config_dir=CONFIG_DIR):
        rerun = compose("train", overrides=shlex.split(best.command)[3:])
        trial = compose("train", overrides=[*sweep, *(f"{k}={v}" for k, v in points[1].items())])
    assert rerun.trainer.max_epochs == 60 and rerun.trainer.patience == 15 and rerun.trainer.lr_patience == 3
    assert rerun.model.hidden == [32, 8, 2] and rerun.trainer.lr == 2e-4
    assert OmegaConf.to_container(rerun) == OmegaConf.to_container(trial)
    # a config that cannot be composed alone costs the command its completeness, never the report
    from omegaconf import open_dict

    with open_dict(sweep_cfg):
        sweep_cfg.hydra.job.config_name = "no_such_config"
    assert fixed_overrides(sweep_cfg)[:3] == ["dataset=holstein_L16", "model=enn_small", "trainer=default"]


def test_a_sqlite_study_storage_in_a_new_folder_is_created(tmp_path):
    """The default storage sqlite:///runs/optuna.db is relative to the working directory: a sweep started
    where there is no runs/ failed with 'unable to open database file'."""
    from lattice_lab.sweeps.callback import MlflowSweepCallback

    db = tmp_path / "new" / "studies" / "optuna.db"
    with initialize_config_dir(config_dir=CONFIG_DIR):
        cfg = compose("train", overrides=["hparams_search=mlp_optuna", f"hydra.sweeper.storage=sqlite:///{db}",
                                          f"hydra.sweep.dir={tmp_path / 'sweep'}"], return_hydra_config=True)
    MlflowSweepCallback(enabled=False).on_multirun_start(cfg)
    assert db.parent.is_dir()
    optuna.create_study(study_name="s", storage=f"sqlite:///{db}")  # what the sweeper does next


def test_sweep_callback_switch_is_true_or_false():
    from lattice_lab.common.errors import ConfigError
    from lattice_lab.sweeps.callback import MlflowSweepCallback

    assert MlflowSweepCallback(enabled=False).enabled is False
    with pytest.raises(ConfigError, match=r"^hydra.callbacks.mlflow_sweep.enabled='no': expected true or false$"):
        MlflowSweepCallback(enabled="no")


def test_sweep_parent_records_the_sampler_and_each_invocations_seed(tmp_path, tmp_mlflow):
    """The sampler seed decides which trials a sweep draws (offset when a study is resumed): the parent run
    records the sampler and the seed of every invocation."""
    import mlflow

    from lattice_lab.sweeps.callback import MlflowSweepCallback

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"

    def start():
        cfg = _sweep_config(tmp_path, "seeded", "hydra.job.name=train", f"hydra.sweep.dir={tmp_path / 'sweep'}")
        cb = MlflowSweepCallback()
        cb.on_multirun_start(cfg)
        return cb.parent_run_id, int(cfg.hydra.sweeper.sampler.seed)

    parent, seed0 = start()
    study = optuna.create_study(study_name="seeded", storage=storage, load_if_exists=True)
    for x in (0.1, 0.2):
        study.add_trial(optuna.trial.create_trial(params={"x": x}, value=x,
                                                  distributions={"x": optuna.distributions.FloatDistribution(0, 1)}))
    again, seed1 = start()
    assert again == parent and seed1 == seed0 + 2
    client = mlflow.MlflowClient(tracking_uri=tmp_mlflow)
    assert client.get_run(parent).data.tags["sampler"] == "optuna.samplers.TPESampler"
    history = sorted((m.step, m.value) for m in client.get_metric_history(parent, "sampler_seed"))
    assert history == [(0, seed0), (1, seed0 + 2)]


def test_only_a_resumed_seeded_sampler_with_a_storage_gets_an_offset_seed(tmp_path):
    """A grid sampler finds its place in the stored trials (its order depends on the seed), a sampler without a
    seed has nothing to offset, a sweep without a storage no stored trials: each keeps its configuration."""
    from lattice_lab.sweeps.callback import offset_sampler_seed

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="kept", storage=storage)
    for x in (0.1, 0.2):
        study.add_trial(optuna.trial.create_trial(
            params={"x": x}, distributions={"x": optuna.distributions.FloatDistribution(0, 1)}, value=x))

    def cfg(*overrides):
        return _sweep_config(tmp_path, "kept", "seed=5", *overrides)

    assert offset_sampler_seed(cfg()) == 7  # the resumed study itself
    for overrides in (["hydra/sweeper/sampler=grid"], ["hydra.sweeper.sampler.seed=null"],
                      ["hydra.sweeper.storage=null"]):
        config = cfg(*overrides)
        before = list(config.hydra.overrides.hydra)
        assert offset_sampler_seed(config) is None, overrides
        assert list(config.hydra.overrides.hydra) == before, overrides


def test_override_value_is_read_back_by_hydra_as_the_same_value():
    """best_config.yaml's overrides: ``true`` (not Python's ``True``, a string to Hydra), quoted text with quotes.
    Every backslash was doubled, but Hydra halves only a run of them before a quote or at the end of a quoted
    value: ``C:\\data x`` came back as ``C:\\\\data x``."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from lattice_lab.sweeps.report import override_value

    assert [override_value(v) for v in (None, True, False, 3, 1e-5, "gate", [16, 8, True], {"a": 1})] == [
        "null", "true", "false", "3", "1e-05", "gate", "[16,8,true]", "{a:1}"]
    parser = OverridesParser.create()
    for value in (True, False, "a b", "it's", "back\\slash 'q'", "C:\\data x", "ends in \\", "a\\'b", "x\\\\\\'y\\\\",
                  [1, "x y"], 0.5, None):
        text = override_value(value)
        assert parser.parse_override(f"k={text}").value() == value, (value, text)


def test_a_trial_matching_several_runs_or_of_several_objectives_is_left_empty():
    """``mlflow_run_id`` is a trial's run only where exactly one run logged its values; the ``value`` of a
    multi-objective trial is no single number."""
    from lattice_lab.sweeps.report import match_run, trials_table

    params = {"trainer.lr": 0.001}
    runs = {"a": {"trainer.lr": "0.001"}, "b": {"trainer.lr": "0.001"}, "c": {"trainer.lr": "0.01"}}
    assert match_run(params, runs) == "" and match_run(params, {"a": runs["a"], "c": runs["c"]}) == "a"
    study = optuna.create_study(directions=["minimize", "minimize"])
    study.add_trial(optuna.trial.create_trial(
        params={"x": 0.5}, distributions={"x": optuna.distributions.FloatDistribution(0, 1)}, values=[1.0, 2.0]))
    (row,) = trials_table(study)
    assert row["value"] is None and row["param.x"] == 0.5 and row["state"] == "COMPLETE"


def test_study_report_counts_failed_trials_and_lists_the_params_of_every_trial(tmp_path):
    """A trial that failed before it drew anything has no params: trials.csv's columns still cover the later
    trials' params; a study whose trials all failed has no best_config.yaml."""
    import csv

    from lattice_lab.sweeps.report import write_study_report

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="s", storage=storage)
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL, params={}, distributions={}))
    report = write_study_report(storage, "s", tmp_path / "failed")
    assert (report["n_complete"], report["n_failed"], report["best_value"]) == (0, 1, None)
    assert not (tmp_path / "failed" / "best_config.yaml").exists()
    study.add_trial(optuna.trial.create_trial(
        params={"x": 0.25}, distributions={"x": optuna.distributions.FloatDistribution(0, 1)}, value=0.5))
    report = write_study_report(storage, "s", tmp_path / "out")
    assert (report["n_complete"], report["n_failed"], report["best_value"]) == (1, 1, 0.5)
    with open(tmp_path / "out" / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["state"], r["param.x"]) for r in rows] == [("FAIL", ""), ("COMPLETE", "0.25")]
    assert OmegaConf.load(tmp_path / "out" / "best_config.yaml").overrides == ["x=0.25"]


def test_sweep_end_on_another_callback_closes_the_parent_with_the_counts_and_a_resume_reopens_it(tmp_path,
                                                                                                tmp_mlflow):
    """Hydra may call the start and the end of a multirun on different callback instances: the end finds the
    parent run through the sweep folder's file, logs the report and the trial counts and closes the run; the
    next invocation of the study sets that parent RUNNING again."""
    import mlflow

    from lattice_lab.sweeps.callback import MlflowSweepCallback

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    cfg = _sweep_config(tmp_path, "ends", "hydra.job.name=train", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    start = MlflowSweepCallback()
    start.on_multirun_start(cfg)
    study = optuna.create_study(study_name="ends", storage=storage, load_if_exists=True)
    dist = {"trainer.lr": optuna.distributions.FloatDistribution(1e-4, 1e-2)}
    study.add_trial(optuna.trial.create_trial(params={"trainer.lr": 1e-3}, distributions=dist, value=0.3))
    for _ in range(2):
        study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL, params={}, distributions={}))
    MlflowSweepCallback().on_multirun_end(cfg)
    client = mlflow.MlflowClient(tracking_uri=tmp_mlflow)
    run = client.get_run(start.parent_run_id)
    assert run.info.status == "FINISHED"
    assert (run.data.metrics["n_trials_complete"], run.data.metrics["n_trials_failed"]) == (1, 2)
    assert run.data.metrics["best/value"] == 0.3
    assert {a.path for a in client.list_artifacts(start.parent_run_id, "sweep")} == {"sweep/trials.csv",
                                                                                    "sweep/best_config.yaml"}
    again = MlflowSweepCallback()
    again.on_multirun_start(cfg)
    assert again.parent_run_id == start.parent_run_id
    assert client.get_run(start.parent_run_id).info.status == "RUNNING"


def test_a_trial_finds_its_parent_run_and_knows_whether_it_is_an_optuna_trial(tmp_path, monkeypatch):
    """Inside a multirun job the sweep folder's file names the parent (cluster launchers share files, not the
    environment), else the environment; a single run has no parent even where the variable is set (a run
    started from a sweep's process). Only an Optuna sweeper's jobs are trials (not a multirun over seeds)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import open_dict

    from lattice_lab.sweeps import parent, trial

    sweep = tmp_path / "sweep"
    monkeypatch.setenv(parent.ENV_VAR, "from-env")
    monkeypatch.setattr(HydraConfig.instance(), "cfg", None)

    def job(mode, *overrides):
        with initialize_config_dir(config_dir=CONFIG_DIR):
            cfg = compose("train", overrides=[f"hydra.sweep.dir={sweep}", "hydra.job.num=3", *overrides],
                          return_hydra_config=True)
        with open_dict(cfg):
            cfg.hydra.mode = RunMode[mode]
        HydraConfig.instance().set_config(cfg)

    assert parent.current_parent_run_id() is None and trial.current_trial() is None  # outside Hydra
    job("RUN", "hparams_search=mlp_optuna")
    assert parent.current_parent_run_id() is None and trial.current_trial() is None
    job("MULTIRUN", "hparams_search=mlp_optuna", "hydra.sweeper.study_name=s")
    assert parent.current_parent_run_id() == "from-env"
    parent.publish_parent_run_id("from-file", sweep)
    monkeypatch.setenv(parent.ENV_VAR, "from-env")  # publishing set it: another launcher's environment
    assert parent.current_parent_run_id() == "from-file"
    assert trial.current_trial() == {"study": "s", "sweep_dir": str(sweep), "job": 3}
    job("MULTIRUN", "seed=1")  # Hydra's basic sweeper: runs in their own right
    assert trial.current_trial() is None
    assert trial.study_name({"study_name": None}) == "default"


def test_best_config_keeps_a_searched_key_fixed_on_the_command_line_and_drops_every_sweep(tmp_path):
    """``hparams_search=enn_optuna trainer.batch_size=4``: Optuna takes a plain value of a searched key as fixed
    (it leaves the search space and every trial trains with it), but best_config.yaml dropped it with the searched
    keys, so its command retrained with the default batch size; a comma list (``2,3``, a sweep as much as
    ``choice(2,3)``) was kept, a command a plain run refuses."""
    from omegaconf import open_dict

    from lattice_lab.sweeps.callback import fixed_overrides

    sweep = ["hparams_search=enn_optuna", "trainer.batch_size=4", "dataset.name=tiny"]
    with initialize_config_dir(config_dir=CONFIG_DIR):
        cfg = compose("train", overrides=sweep, return_hydra_config=True)
    assert "trainer.batch_size" in cfg.hydra.sweeper.params
    with open_dict(cfg):  # as Hydra's multirun holds them: the sweeps stay in the task overrides
        cfg.hydra.overrides.task = [*sweep, "trainer.lr_patience=2,3", "trainer.patience=range(1,3)"]
    fixed = fixed_overrides(cfg)
    assert "trainer.batch_size=4" in fixed and "dataset.name=tiny" in fixed
    assert not any(o.startswith(("trainer.lr_patience=", "trainer.patience=range")) for o in fixed), fixed
    with initialize_config_dir(config_dir=CONFIG_DIR):
        rerun = compose("train", overrides=[*fixed, "trainer.lr=0.001", "model.hidden.0=16", "model.hidden.1=8",
                                             "model.activation=tanh"])
    assert rerun.trainer.batch_size == 4 and rerun.trainer.max_epochs == 60


def test_search_config_settings_add_keys_a_plain_run_lacks_and_delete_keys_it_has_too_many():
    """A search config may add a key (``+key=...`` in the rerun) or remove one (``~key``): the plain run composed
    with those overrides is the sweep's config."""
    from omegaconf import open_dict

    from lattice_lab.sweeps.callback import search_config_settings

    with initialize_config_dir(config_dir=CONFIG_DIR):
        cfg = compose("train", overrides=["hparams_search=mlp_optuna"], return_hydra_config=True)
    with open_dict(cfg):
        cfg.trainer.warmup_note = "added"
        del cfg.trainer["lr_patience"]
    extra = search_config_settings(cfg, ["model=mlp_small"])
    assert "+trainer.warmup_note=added" in extra and "~trainer.lr_patience" in extra, extra
    with initialize_config_dir(config_dir=CONFIG_DIR):
        rerun = compose("train", overrides=["model=mlp_small", *extra])
    assert rerun.trainer.warmup_note == "added" and "lr_patience" not in rerun.trainer
