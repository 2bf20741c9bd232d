import os

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
