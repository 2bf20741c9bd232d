"""demo: its presets can be chosen on the command line and reach the stages."""

import pytest
from hydra import compose, initialize_config_dir

from lattice_lab import demo
from lattice_lab.common.cli import CONFIG_DIR


class _Stop(Exception):
    pass


def test_presets_are_overridable_and_passed_to_the_stages(monkeypatch, tmp_path):
    with initialize_config_dir(config_dir=CONFIG_DIR):
        cfg = compose("demo", overrides=["dataset_preset=no_such_set_for_test", "model_preset=gnn_small",
                                         "trainer_preset=default", "seed=4"])
    calls = []

    def fake_stage(name, overrides):
        calls.append((name, list(overrides)))
        if name == "simulate":
            raise _Stop
        return 0.0

    monkeypatch.setattr(demo, "_stage", fake_stage)
    with pytest.raises(_Stop):
        demo.run(cfg)
    (gen, g_over), (train, t_over), (sim, _) = calls
    assert (gen, train, sim) == ("generate", "train", "simulate")
    assert "dataset=no_such_set_for_test" in g_over and "seed=4" in g_over
    assert {"model=gnn_small", "dataset=no_such_set_for_test", "trainer=default"} <= set(t_over)


_CHILD = """
import pathlib, signal, sys, time
ready, marker = map(pathlib.Path, sys.argv[1:3])
got = []
for sig in (signal.SIGINT, signal.SIGTERM):
    signal.signal(sig, lambda s, f: got.append(s))
ready.write_text("1")
while not got:
    time.sleep(0.01)
time.sleep(0.6)  # saving takes a while: longer than subprocess.run's 0.25 s grace before SIGKILL
marker.write_text(f"{signal.Signals(got[0]).name} {len(got)}")
sys.exit(130)
"""

_PARENT = """
import sys
from lattice_lab import demo
from lattice_lab.common.cli import friendly_errors

@friendly_errors
def main():
    demo.run_stage([sys.executable, sys.argv[1], sys.argv[2], sys.argv[3]], "fake")

main()
"""


@pytest.mark.parametrize(("signame", "code"), [("SIGINT", 130), ("SIGTERM", 143)])
def test_an_interrupted_stage_gets_one_signal_and_time_to_save(tmp_path, signame, code):
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    child, parent = tmp_path / "child.py", tmp_path / "parent.py"
    child.write_text(_CHILD)
    parent.write_text(_PARENT)
    ready, marker = tmp_path / "ready", tmp_path / "marker"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(demo.__file__).parents[1]),
                                                         os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, str(parent), str(child), str(ready), str(marker)], env=env,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the stage did not start"
        time.sleep(0.02)
    proc.send_signal(getattr(signal, signame))  # only to the demo: the stage is in its own session
    _, err = proc.communicate(timeout=60)
    assert marker.read_text() == f"{signame} 1"  # passed on once, and the stage finished saving
    assert proc.returncode == code
    assert "interrupted" in err and "`fake` stage (exit code 130)" in err and "Traceback" not in err


def test_summary_gives_the_force_error_per_kind_of_configuration(capsys):
    with initialize_config_dir(config_dir=CONFIG_DIR):
        cfg = compose("demo")
    s = {"val_sigma": 0.4577, "val_rmse": 0.458, "val_random_sigma": 0.7114, "val_quench_sigma": 0.2475,
         "steps_per_s": 200.0, "site_steps_per_s": 7e6, "times_s": {"train": 50.0}, "trajectory_run": "t",
         "train_run": "r"}
    demo._print_summary(cfg, s, {"growth_L": {"alpha": 0.228, "alpha_err": 0.013}, "fit_window": [20.0, 200.0]})
    out = capsys.readouterr().out
    assert "validation force sigma = 0.4577" in out
    assert "by kind: random hot starts 0.7114, quench snapshots 0.2475" in out
    # a dataset without one of the kinds says so instead of failing
    demo._print_summary(cfg, {**s, "val_random_sigma": None}, {"growth_L": None, "fit_window": [None, None]})
    assert "random hot starts n/a, quench snapshots 0.2475" in capsys.readouterr().out
