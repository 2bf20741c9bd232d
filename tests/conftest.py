import os

import numpy as np
import pytest
import torch

os.environ.setdefault("LATTICE_LAB_NO_PROGRESS", "1")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield


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
