import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("LATTICE_LAB_NO_PROGRESS", "1")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield


REPO = Path(__file__).resolve().parent.parent
OUTPUT_DIRS = ("mlruns", "mlartifacts", "outputs", "multirun", "runs")


def _checkout_outputs() -> set[str]:
    """What the suite could leave in the checkout: its top-level entries and three levels of each output folder."""
    found = {p.name for p in REPO.iterdir()}
    for name in OUTPUT_DIRS:
        for pattern in ("*", "*/*", "*/*/*"):
            found |= {str(p.relative_to(REPO)) for p in (REPO / name).glob(pattern)}
    return found


@pytest.fixture(autouse=True, scope="session")
def _checkout_left_clean():
    """Tests write under tmp_path only: a file they leave in the checkout (an MLflow artifact in ./mlruns,
    a Hydra output folder) fails the run, naming it."""
    before = _checkout_outputs()
    yield
    left = sorted(_checkout_outputs() - before)
    assert not left, f"the tests left files in the checkout {REPO}: {left[:10]}"


def _log_train_run(uri: str, checkpoint, run_name: str | None = None) -> str:
    """A training run in the store ``uri`` holding ``checkpoint`` as ``checkpoints/best.pt``; its artifacts go
    beside the store (MLflow's default, ./mlruns, is the working directory: the checkout)."""
    import shutil
    import tempfile

    from mlflow.tracking import MlflowClient

    from lattice_lab.tracking.mlflow_utils import get_or_create_experiment

    client = MlflowClient(uri)
    run_id = client.create_run(get_or_create_experiment("lattice_lab/train", uri), run_name=run_name).info.run_id
    with tempfile.TemporaryDirectory() as tmp:
        best = Path(tmp) / "best.pt"
        shutil.copyfile(checkpoint, best)
        client.log_artifact(run_id, str(best), "checkpoints")
    return run_id


@pytest.fixture
def log_train_run():
    """``log_train_run(uri, checkpoint, run_name=None) -> run id``: a training run holding the checkpoint."""
    return _log_train_run


@pytest.fixture
def tmp_mlflow(tmp_path, monkeypatch):
    """An isolated MLflow tracking store in a temporary folder."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture
def no_compiler(monkeypatch):
    """No C++ compiler on this machine (and no kernel built yet): native kernels are unavailable."""
    from lattice_lab.native import build

    def missing():
        raise build.NativeUnavailable("no C++ compiler found (test)")

    monkeypatch.setattr(build, "compiler", missing)
    monkeypatch.setattr(build, "_loaded", {})


def _inked_edges(path) -> dict:
    """Non-white pixels in the outermost 2 pixel rows / columns of a PNG: text or lines cut off by its edge."""
    from PIL import Image

    with Image.open(path) as im:
        grey = np.asarray(im.convert("L"))
    edges = {"left": grey[:, :2], "right": grey[:, -2:], "top": grey[:2], "bottom": grey[-2:]}
    return {k: int((v < 200).sum()) for k, v in edges.items() if (v < 200).any()}


@pytest.fixture
def inked_edges():
    """``inked_edges(png_path) -> {edge: n_pixels}``, empty when nothing touches the image border."""
    return _inked_edges
