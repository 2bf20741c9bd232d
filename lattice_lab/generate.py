"""Entrypoint: build an exact-diagonalisation force dataset (``runs/data/<name>.h5``).

    python -m lattice_lab.generate                         # dataset=holstein_L16 (about a minute on CPU)
    python -m lattice_lab.generate dataset=holstein_L40    # the papers' set (hours on CPU, see docs/physics.md)
    python -m lattice_lab.generate dataset=holstein_L8_tiny dataset.path=/tmp/tiny.h5 overwrite=true

Random configurations and snapshots of ED-driven Langevin quenches, with exact forces and densities
(:mod:`lattice_lab.data.generation`). An interrupted build resumes when rerun with the same settings.
"""

from __future__ import annotations

import logging
import time

import hydra
from omegaconf import DictConfig

from lattice_lab.common.cli import CONFIG_DIR, friendly_errors, hydra_errors

log = logging.getLogger(__name__)


def run(cfg: DictConfig):
    """Validate ``cfg`` (a composed ``generate`` config), build the dataset, return its path."""
    from lattice_lab.data.generation import build_dataset, validate_generate_config

    validate_generate_config(cfg)
    t0 = time.perf_counter()
    path = build_dataset(cfg)
    log.info("dataset %s written in %.1f s", path, time.perf_counter() - t0)
    print(f"wrote {path}")
    return path


@hydra_errors
@hydra.main(config_path=CONFIG_DIR, config_name="generate")
@friendly_errors
def main(cfg: DictConfig):
    return run(cfg)


if __name__ == "__main__":
    main()
