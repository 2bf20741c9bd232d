"""Makefile targets that need no installed environment (``clean``)."""

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_clean_keeps_runs_outputs_unless_confirmed(tmp_path):
    """``make clean`` removes caches, but datasets, checkpoints and the MLflow store only when the user says so."""
    shutil.copy(REPO / "Makefile", tmp_path / "Makefile")
    runs = tmp_path / "runs"
    (runs / "data").mkdir(parents=True)
    (runs / "data" / "holstein_L40.h5").write_text("hours of ED")
    (runs / "mlflow.db").write_text("every run")
    (runs / "README.md").write_text("kept")
    (tmp_path / ".pytest_cache").mkdir()

    def clean(*args, answer=None):
        return subprocess.run(["make", "-s", "clean", *args], cwd=tmp_path, input=answer, text=True,
                              stdin=None if answer is not None else subprocess.DEVNULL,
                              capture_output=True, timeout=60, check=True)

    clean()  # no terminal, no answer: nothing of runs/ goes
    assert (runs / "data" / "holstein_L40.h5").is_file() and (runs / "mlflow.db").is_file()
    assert not (tmp_path / ".pytest_cache").exists()
    clean(answer="n\n")
    assert (runs / "mlflow.db").is_file()
    clean(answer="y\n")
    assert sorted(p.name for p in runs.iterdir()) == ["README.md"]
    (runs / "checkpoints").mkdir()
    clean("YES=1")
    assert sorted(p.name for p in runs.iterdir()) == ["README.md"]


def _fake_env(tmp_path):
    """The Makefile in a folder whose .venv/bin/python is a stand-in: ``--cfg job`` prints the dataset path
    generate would write; other calls are recorded in calls.txt."""
    shutil.copy(REPO / "Makefile", tmp_path / "Makefile")
    (tmp_path / "pyproject.toml").write_text("")
    python = tmp_path / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text('#!/bin/sh\ncase " $* " in\n'
                      '  *" --cfg job "*) case " $* " in *" dataset.name=holstein_L40_test "*) '
                      'echo runs/data/holstein_L40_test.h5;; *" dataset=holstein_L40 "*) echo runs/data/holstein_L40.h5;; '
                      '*) echo runs/data/holstein_L16.h5;; esac;;\n'
                      '  *) echo "$*" >> calls.txt;;\nesac\n')
    python.chmod(0o755)
    (tmp_path / ".venv" / ".installed").touch()  # newer than pyproject.toml: nothing to install

    def make(*args):
        proc = subprocess.run(["make", "-s", *args], cwd=tmp_path, capture_output=True, text=True, timeout=60)
        calls = (tmp_path / "calls.txt").read_text().splitlines() if (tmp_path / "calls.txt").exists() else []
        (tmp_path / "calls.txt").unlink(missing_ok=True)
        return proc, calls

    return make


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_data_and_paper_skip_a_dataset_that_is_already_built(tmp_path):
    """README's order: ``make demo`` builds holstein_L16, then ``make data`` must not fail on the existing file."""
    make = _fake_env(tmp_path)
    proc, calls = make("data")
    assert proc.returncode == 0, proc.stderr
    assert calls == ["-m lattice_lab.generate"], "no dataset yet: generate runs (and resumes a partial build)"
    (tmp_path / "runs" / "data").mkdir(parents=True)
    (tmp_path / "runs" / "data" / "holstein_L16.h5").write_text("built by make demo")
    proc, calls = make("data")
    assert proc.returncode == 0, proc.stderr
    assert calls == [] and "runs/data/holstein_L16.h5 exists, nothing to generate" in proc.stdout
    proc, calls = make("data", "ARGS=overwrite=true")
    assert calls == ["-m lattice_lab.generate overwrite=true"]
    proc, calls = make("data", "ARGS=dataset=holstein_L40")
    assert calls == ["-m lattice_lab.generate dataset=holstein_L40"], "another dataset is still built"
    (tmp_path / "runs" / "data" / "holstein_L40.h5").write_text("hours of ED")
    proc, calls = make("paper")
    assert proc.returncode == 0, proc.stderr
    # the training set exists; the independent test build (seed 1) is made, and the four models are scored on it
    assert [c for c in calls if "lattice_lab.generate" in c] == [
        "-m lattice_lab.generate dataset=holstein_L40 seed=1 dataset.name=holstein_L40_test"], calls
    (evaluate,) = [c for c in calls if "lattice_lab.evaluate" in c]
    assert evaluate == ("-m lattice_lab.evaluate -m checkpoint=runs/checkpoints/paper_enn,runs/checkpoints/paper_gnn,"
                        "runs/checkpoints/paper_gnn_energy,runs/checkpoints/paper_mlp dataset=holstein_L40 "
                        "dataset.path=runs/data/holstein_L40_test.h5")
    assert calls.index(evaluate) > calls.index("-m lattice_lab.train -m +experiment=paper_force_accuracy")
    (tmp_path / "runs" / "data" / "holstein_L40_test.h5").write_text("hours of ED")
    proc, calls = make("paper")
    assert proc.returncode == 0, proc.stderr
    assert not any("lattice_lab.generate" in c for c in calls) and len(calls) == 4, calls
