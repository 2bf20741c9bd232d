"""Whether this process runs one trial of an Optuna sweep, and how the trial's outputs say so.

A trial's train run is an ordinary run folder and MLflow run; so that neither is mistaken for a run
of its own, the folder gets ``sweep_trial.yaml`` (study, sweep folder, Hydra job number), which
``resume=true`` without ``run_name`` skips, and the MLflow run the tags ``run_kind=sweep_trial`` and
``sweep_study=<study>`` (``compare_runs --filter "tags.sweep_study IS NULL"`` leaves trials out).
"""

from __future__ import annotations

from pathlib import Path

TRIAL_FILE = "sweep_trial.yaml"


def study_name(sweeper) -> str:
    """The Optuna study of a sweeper config (``hydra.sweeper``); "default" when unnamed."""
    return str(sweeper.get("study_name") or "default")


def current_trial() -> dict | None:
    """``{"study", "sweep_dir", "job"}`` when called inside a trial of an Optuna sweep, else None
    (a single run, or a multirun of Hydra's basic sweeper: seeds or presets, runs in their own right)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
            return None
        hc = HydraConfig.get()
        if "optuna" not in str(hc.sweeper.get("_target_", "")).lower():
            return None
        return {"study": study_name(hc.sweeper), "sweep_dir": str(hc.sweep.dir), "job": int(hc.job.num)}
    except Exception:  # noqa: BLE001 - not running under Hydra
        return None


def is_trial_dir(run_dir: str | Path) -> bool:
    """True for the run folder of a sweep trial (one that holds ``sweep_trial.yaml``)."""
    return (Path(run_dir) / TRIAL_FILE).is_file()
