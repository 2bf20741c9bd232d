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
