"""Force fields (periodic Q [B, L, L] -> total force [B, L, L]): ENN, graph networks, descriptor MLP.

``build_model(model_cfg, hamiltonian)`` builds any of them from ``conf/model/<preset>.yaml``;
``load_force_field(path_or_run_id)`` loads a trained one (checkpoint, export or MLflow run).
"""

from lattice_lab.models.base import ForceField
from lattice_lab.models.checkpoint import (
    export_force_field,
    load_checkpoint,
    load_force_field,
    save_checkpoint,
)
from lattice_lab.models.flops import flops_per_site
from lattice_lab.models.registry import MODEL_NAMES, available_presets, build_model, count_parameters

__all__ = [
    "MODEL_NAMES",
    "ForceField",
    "available_presets",
    "build_model",
    "count_parameters",
    "export_force_field",
    "flops_per_site",
    "load_checkpoint",
    "load_force_field",
    "save_checkpoint",
]
