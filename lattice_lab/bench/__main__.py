"""Entrypoint: ``python -m lattice_lab.bench [bench_preset=quick] [presets=[enn,gnn]] [sizes=[32,64]] ...``."""

import hydra
from omegaconf import DictConfig

from lattice_lab.bench.runner import run
from lattice_lab.common.cli import CONFIG_DIR, friendly_errors, hydra_errors


@hydra_errors
@hydra.main(config_path=CONFIG_DIR, config_name="bench")
@friendly_errors
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
