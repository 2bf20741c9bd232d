"""Entrypoint: coarsening analysis of a Langevin trajectory (DESIGN.md section 6).

    python -m lattice_lab.analyze trajectory=runs/trajectories/<run>/trajectory.h5 \
        [out_dir=...] [fit.t_min=100] [correlation_steps=[200,1000,9000]] \
        [compare_with=runs/trajectories/<ed_run>/trajectory.h5] [tracking.enabled=false]
    python -m lattice_lab.analyze 'runs=[<run folder>,<run folder>,...]'   # L(t) and alpha of several runs

Writes PNGs, CSVs and summary.json (see :mod:`lattice_lab.analysis.pipeline`); with
``compare_with`` also the ED-vs-ML comparison of C(r) (``compare/`` inside the output folder).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from lattice_lab.common.cli import CONFIG_DIR, friendly_errors, hydra_errors
from lattice_lab.common.errors import ConfigError
from lattice_lab.common.io import atomic_write_text

log = logging.getLogger(__name__)


def _abs(path) -> Path:
    try:
        return Path(hydra.utils.to_absolute_path(str(path)))
    except ValueError:  # Hydra not initialised (plain call from tests / scripts)
        return Path(path).resolve()


def run(cfg: DictConfig) -> dict:
    """Analyse ``cfg.trajectory`` (and compare with ``cfg.compare_with``); returns the summary."""
    from lattice_lab.analysis.growth import describe_exponent
    from lattice_lab.analysis.pipeline import (
        analyze_trajectory,
        check_config,
        compare_trajectories,
        open_trajectory,
    )

    if cfg.get("runs"):  # several runs together: L(t) on one plot, alpha per run in one table
        return _compare_runs(cfg)
    if OmegaConf.is_missing(cfg, "trajectory") or cfg.get("trajectory") in (None, ""):
        raise ConfigError("trajectory=???: give the trajectory file, e.g. "
                          "trajectory=runs/trajectories/<run>/trajectory.h5")
    traj = _abs(cfg.trajectory)
    open_trajectory(traj).close()  # ConfigError early if missing / not a trajectory
    other = _abs(cfg.compare_with) if cfg.get("compare_with") else None
    if other is not None:
        open_trajectory(other).close()
    out = _abs(cfg.out_dir) if cfg.get("out_dir") else traj.parent / "analysis"
    acfg = OmegaConf.to_container(cfg, resolve=True)
    acfg.pop("hydra", None)
    for key in ("trajectory", "compare_with", "out_dir"):
        acfg.pop(key, None)
    check_config(acfg)  # every setting, before anything is written
    summary = analyze_trajectory(traj, acfg, out_dir=out)  # every frame read and checked before it writes
    atomic_write_text(out / "analyze_config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    if other is not None:
        from lattice_lab.analysis.pipeline import _attr

        with open_trajectory(traj) as t_a, open_trajectory(other) as t_b:
            src_a, src_b = _attr(t_a.attrs, "force_source", ""), _attr(t_b.attrs, "force_source", "")
        ed, ml = (other, traj) if (src_a != "ed" and src_b == "ed") else (traj, other)
        summary["comparison"] = compare_trajectories(ed, ml, list(cfg.correlation_steps), acfg,
                                                     out_dir=out / "compare")
    window = [t for t in summary.get("fit_window") or [] if t is not None]
    log.info("alpha = %s%s; outputs in %s", describe_exponent(summary.get("growth_L")),
             f" (fit window t = {window[0]:.3g}..{window[1]:.3g})" if len(window) == 2 else "", out)
    print(json.dumps({k: summary.get(k) for k in ("alpha", "alpha_err", "alpha_xi", "fit_window", "out_dir")}))
    return summary


def _compare_runs(cfg: DictConfig) -> dict:
    import os

    from lattice_lab.analysis.pipeline import compare_growth

    runs = [cfg.runs] if isinstance(cfg.runs, str) else list(cfg.runs)
    paths = [_abs(p) for p in runs]
    out = _abs(cfg.out_dir) if cfg.get("out_dir") else Path(os.path.commonpath([p.parent for p in paths])) / "growth_runs"
    acfg = OmegaConf.to_container(cfg, resolve=True)
    for key in ("hydra", "trajectory", "compare_with", "out_dir", "runs"):
        acfg.pop(key, None)
    result = compare_growth(paths, acfg, out_dir=out)  # checks the settings and every run first
    atomic_write_text(out / "analyze_config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    print(json.dumps({"out_dir": result["out_dir"],
                      "runs": [{k: r[k] for k in ("run", "T", "alpha", "alpha_err")} for r in result["runs"]]}))
    return result


@hydra_errors
@hydra.main(config_path=CONFIG_DIR, config_name="analyze")
@friendly_errors
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
