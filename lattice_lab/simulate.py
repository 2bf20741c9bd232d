"""Entrypoint: Langevin quench dynamics driven by a trained force field or by exact diagonalisation.

    python -m lattice_lab.simulate dynamics=quench_small force=ml force.checkpoint=PATH|RUN_ID
    python -m lattice_lab.simulate force=ed dynamics.L=16            # exact forces (small L only)
    python -m lattice_lab.simulate ... resume=true                   # continue from the checkpoint
    python -m lattice_lab.simulate --config-name simulate_compare force.checkpoint=...  # ED vs ML

Writes ``runs/trajectories/<run_name>/{trajectory.h5, checkpoint.pt, config.yaml}``, logs to the
MLflow experiment ``lattice_lab/simulate`` and, with ``analyze=true``, analyses the trajectory.
A config with a ``compare`` section (``conf/simulate_compare.yaml``) runs the ED-vs-ML comparison.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from lattice_lab.common.cli import CONFIG_DIR, friendly_errors, hydra_errors


def run(cfg: DictConfig) -> dict:
    """Run the simulation (or, when ``cfg.compare`` is set, the ED-vs-ML comparison)."""
    if cfg.get("compare"):
        from lattice_lab.dynamics.compare_run import run_comparison

        return run_comparison(cfg)
    from lattice_lab.dynamics.runner import run_simulation

    return run_simulation(cfg)


@hydra_errors
@hydra.main(config_path=CONFIG_DIR, config_name="simulate")
@friendly_errors
def main(cfg: DictConfig) -> None:
    result = run(cfg)
    if cfg.get("compare"):
        print(f"ED vs ML comparison: {result.get('summary_path')}")
        return
    state = "finished" if result["completed"] else f"stopped at step {result['step']} (resume=true continues)"
    print(f"{state}: {result['trajectory']}  ({result['steps_per_s']:.3g} steps/s, "
          f"{result['site_steps_per_s']:.3g} site-steps/s)")


if __name__ == "__main__":
    main()
