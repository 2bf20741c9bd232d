"""How a trial finds the MLflow parent run of the sweep it belongs to.

The sweep callback (:mod:`lattice_lab.sweeps.callback`) creates the parent run in the launching
process and publishes its id twice: in the environment (in-process and local launchers inherit it)
and as a file in the sweep folder (cluster launchers share the file system, not the environment).
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "LATTICE_LAB_MLFLOW_PARENT_RUN_ID"
FILE_NAME = "mlflow_parent_run_id.txt"


def publish_parent_run_id(run_id: str, sweep_dir: str | os.PathLike) -> None:
    from lattice_lab.common.io import atomic_write_text

    os.environ[ENV_VAR] = run_id
    atomic_write_text(Path(sweep_dir) / FILE_NAME, run_id + "\n")


def current_parent_run_id() -> str | None:
    """The sweep's parent run id when called inside a multirun trial, else None."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
            return None
        path = Path(HydraConfig.get().sweep.dir) / FILE_NAME
    except Exception:  # noqa: BLE001 - not running under Hydra
        return None
    if path.is_file():
        return path.read_text().strip() or None
    return os.environ.get(ENV_VAR) or None
