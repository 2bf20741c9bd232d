"""How entrypoints end: Hydra's own errors and a multirun's failed job are one line and exit 2; Optuna records
a failed trial and goes on; genuine bugs keep Hydra's traceback (exit 1)."""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

APP = '''
import hydra

from lattice_lab.common.cli import friendly_errors, hydra_errors
from lattice_lab.common.errors import ConfigError


@hydra_errors
@hydra.main(config_path="conf", config_name="app")
@friendly_errors
def main(cfg):
    if cfg.x < 0:
        raise ConfigError(f"x={cfg.x}: must be >= 0")
    if cfg.x == 99:
        raise ZeroDivisionError("a bug, not the user's mistake")
    print(f"ran x={cfg.x}", flush=True)
    return float(cfg.x)


if __name__ == "__main__":
    main()
'''


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """A minimal Hydra app decorated like the entrypoints (`x` picks what the job does)."""
    root = tmp_path_factory.mktemp("app")
    (root / "conf" / "group").mkdir(parents=True)
    (root / "app.py").write_text(APP)
    (root / "conf" / "app.yaml").write_text(textwrap.dedent("""\
        defaults:
          - group: one
          - _self_
        x: 1
        """))
    (root / "conf" / "group" / "one.yaml").write_text("y: 1\n")
    (root / "conf" / "group" / "two.yaml").write_text("y: 2\n")
    (root / "conf" / "extra").mkdir()  # a group outside the defaults list: +extra=on adds it
    (root / "conf" / "extra" / "on.yaml").write_text("z: 1\n")
    return root


def _run(app, tmp_path, *args, env=None):
    env = {**{k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), **(env or {})}
    cmd = [sys.executable, str(app / "app.py"), f"hydra.run.dir={tmp_path / 'run'}",
           f"hydra.sweep.dir={tmp_path / 'sweep'}", *args]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_hydra_composition_errors_are_one_line_and_exit_2(app, tmp_path):
    proc = _run(app, tmp_path, "group=tow")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == ("error: group=tow: no such config in group 'group'; did you mean two? "
                           "(options: one, two)\n")
    proc = _run(app, tmp_path, "x=range(0,")
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("error: x=range(0,: cannot parse this override (")
    proc = _run(app, tmp_path, "nosuchkey=1")  # Hydra's own hint, +nosuchkey=1, would be refused next
    assert proc.returncode == 2
    assert proc.stderr == ("error: nosuchkey=1: no such setting ('nosuchkey' is not in this command's config; "
                           "--cfg job prints its settings)\n")
    proc = _run(app, tmp_path, "group.nosuchkey=1")  # inside a section Hydra's hint is right: +group.nosuchkey=1
    assert proc.returncode == 2
    assert proc.stderr == ("error: Could not override 'group.nosuchkey'. "
                           "To append to your config use +group.nosuchkey=1\n")


def test_a_top_level_setting_added_with_plus_is_refused_a_group_or_section_key_is_not(app, tmp_path):
    """``+seed=1`` to an entrypoint without a seed: nothing would read it, so the run would silently go on
    without it. ``+group=option`` and ``+section.key=value`` add what the config's own parts read."""
    proc = _run(app, tmp_path, "+nosuchkey=1")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == ("error: +nosuchkey=1: app has no setting 'nosuchkey', so nothing would read it "
                           "(its settings: group, x)\n")
    proc = _run(app, tmp_path, "+extra=on", "+group.z=3", "++w=4")
    assert proc.returncode == 0 and "ran x=1" in proc.stdout, proc.stderr
    proc = _run(app, tmp_path, "-m", "+nosuchkey=1", "x=1,2")  # in a multirun: the failed job's line
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[-1].startswith("error: job 0 (+nosuchkey=1 x=1): +nosuchkey=1: app has no setting")


def test_hydra_flags_that_do_not_go_together_are_one_line_and_exit_2(app, tmp_path):
    # -m with --cfg job (to look at a multirun experiment's config): Hydra raises a ValueError of its own
    proc = _run(app, tmp_path, "-m", "--cfg", "job")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == "error: Only one of --run, --multirun, --cfg, --info and --shell_completion can be specified\n"
    proc = _run(app, tmp_path, "--resolve")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == "error: The --resolve flag can only be used in conjunction with --cfg or --help\n"


def test_a_bug_keeps_hydras_traceback_and_exit_1(app, tmp_path):
    proc = _run(app, tmp_path, "x=99")
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "ZeroDivisionError: a bug" in proc.stderr
    assert "error:" not in proc.stderr
    full = _run(app, tmp_path, "x=99", env={"HYDRA_FULL_ERROR": "1"})  # the user's own setting still works
    assert full.returncode == 1 and "hydra/_internal" in full.stderr
    # a process started by a run (a demo stage, a submitit job) inherits hydra_errors' HYDRA_FULL_ERROR=1,
    # which is not the user's: it still reports like Hydra
    child = _run(app, tmp_path, "x=99", env={"HYDRA_FULL_ERROR": "1", "LATTICE_LAB_USER_HYDRA_FULL_ERROR": ""})
    assert child.returncode == 1 and "ZeroDivisionError: a bug" in child.stderr
    assert "hydra/_internal" not in child.stderr


def test_plain_multirun_runs_every_job_then_ends_with_the_failed_one(app, tmp_path):
    proc = _run(app, tmp_path, "-m", "x=1,-1,2,-3")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "ran x=1" in proc.stdout and "ran x=2" in proc.stdout, "the other jobs must still run"
    assert "Traceback" not in proc.stderr
    assert proc.stderr.splitlines()[-1] == ("error: job 1 (x=-1): x=-1: must be >= 0; "
                                            "1 more failed (job 3, see above)")


def test_multirun_bug_keeps_its_traceback(app, tmp_path):
    proc = _run(app, tmp_path, "-m", "x=1,99")
    assert proc.returncode == 1
    assert "ZeroDivisionError: a bug" in proc.stderr and "\nerror:" not in proc.stderr


def test_optuna_sweep_records_a_failed_trial_and_goes_on(app, tmp_path):
    import optuna

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    sweep = ["-m", "hydra/sweeper=optuna", "hydra/sweeper/sampler=grid", "hydra.sweeper.n_jobs=1",
             f"hydra.sweeper.storage={storage}", "hydra.sweeper.study_name=s", "hydra.sweeper.max_failure_rate=1.0"]
    # 3 of a 4-point grid (exhausting the grid on a failed trial trips the sweeper's Study.stop): both kinds happen
    proc = _run(app, tmp_path, *sweep, "hydra.sweeper.n_trials=3", "x=choice(-2,-1,2,3)")
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = optuna.load_study(study_name="s", storage=storage).trials
    assert len(trials) == 3 and {t.state for t in trials} == {optuna.trial.TrialState.FAIL,
                                                              optuna.trial.TrialState.COMPLETE}
    for t in trials:
        assert (t.state == optuna.trial.TrialState.FAIL) == (t.params["x"] < 0)
    # every trial failing leaves no best trial: one line naming a failure, exit 2
    proc = _run(app, tmp_path, *sweep[:-2], "hydra.sweeper.study_name=t", "hydra.sweeper.max_failure_rate=1.0",
                "hydra.sweeper.n_trials=2", "x=choice(-1,-2,-3)")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert proc.stderr.splitlines()[-1].startswith("error: every trial failed; job ")


@pytest.mark.parametrize("storage", ["sqlite:///{tmp}/not_a_database.db", "nosuchdialect://x"])
def test_a_study_storage_that_cannot_be_opened_is_one_line(app, tmp_path, storage):
    (tmp_path / "not_a_database.db").write_text("not sqlite")
    proc = _run(app, tmp_path, "-m", "hydra/sweeper=optuna", f"hydra.sweeper.storage={storage.format(tmp=tmp_path)}",
                "hydra.sweeper.n_trials=1", "x=choice(1,2)")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert proc.stderr.splitlines()[-1].startswith("error: hydra.sweeper.storage: the Optuna study storage cannot be "
                                                   "opened (")


@pytest.mark.skipif(shutil.which("srun") is not None, reason="on a SLURM machine the launcher would submit jobs")
def test_slurm_launcher_without_slurm_is_one_line(app, tmp_path):
    proc = _run(app, tmp_path, "-m", "hydra/launcher=submitit_slurm", "x=1,2")
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: hydra/launcher=submitit_slurm (+launcher=slurm): no SLURM here")
    assert len(proc.stderr.splitlines()) == 1


def test_every_entrypoint_reports_through_hydra_errors():
    import importlib

    from lattice_lab.common import cli

    for name in ("generate", "train", "evaluate", "simulate", "analyze", "demo", "bench.__main__"):
        main = importlib.import_module(f"lattice_lab.{name}").main
        assert main.__code__.co_filename == cli.__file__ and main.__code__.co_qualname == "hydra_errors.<locals>.wrapper", \
            f"lattice_lab.{name}.main must be decorated @hydra_errors (outermost), @hydra.main, @friendly_errors"


def test_an_entrypoint_reports_a_hydra_error_in_one_line():
    proc = subprocess.run([sys.executable, "-m", "lattice_lab.simulate", "dynamics=quench_smal"], cwd=REPO,
                          capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"})
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: dynamics=quench_smal: no such config in group 'dynamics'; did you mean "
                                  "quench_small? (options: ") and len(proc.stderr.splitlines()) == 1, proc.stderr
