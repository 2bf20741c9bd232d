"""Build any force field from its config (``conf/model/<preset>.yaml``) and count its parameters.

A model config is a mapping with ``name`` (one of :data:`MODEL_NAMES`) plus exactly the keyword
arguments of that model's constructor; the Hamiltonian parameters come separately (from the
dataset the model is trained on). Model classes are imported lazily, inside each factory, so a
broken or missing model module only affects that model.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from pathlib import Path

from lattice_lab.common.errors import ConfigError
from lattice_lab.common.switch import check_flag
from lattice_lab.models.base import ForceField


def _enn():
    from lattice_lab.models.enn import ENN

    return ENN


def _gnn():
    from lattice_lab.models.gnn import GNN

    return GNN


def _gnn_energy():
    from lattice_lab.models.gnn_energy import EnergyGNN

    return EnergyGNN


def _mlp():
    from lattice_lab.models.mlp import DescriptorMLP

    return DescriptorMLP


_FACTORIES = {"enn": _enn, "gnn": _gnn, "gnn_energy": _gnn_energy, "mlp": _mlp}
MODEL_NAMES = tuple(_FACTORIES)


def model_class(name: str) -> type[ForceField]:
    """The ForceField subclass registered as ``name``."""
    if name not in _FACTORIES:
        raise ConfigError(f"model.name={name!r}: unknown model (expected one of {list(MODEL_NAMES)})")
    return _FACTORIES[name]()


def to_plain(obj):
    """DictConfig/ListConfig -> plain dict/list (interpolations resolved); anything else unchanged."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        return obj
    if isinstance(obj, (DictConfig, ListConfig)):
        return OmegaConf.to_container(obj, resolve=True)
    return obj


def hamiltonian_dict(hamiltonian) -> dict:
    """A Hamiltonian given as dict, DictConfig or ``physics.holstein.HolsteinParams`` -> plain dict."""
    if hasattr(hamiltonian, "as_dict"):
        return dict(hamiltonian.as_dict())
    hamiltonian = to_plain(hamiltonian)
    if not isinstance(hamiltonian, Mapping):
        raise ConfigError(f"hamiltonian={hamiltonian!r}: expected a mapping with t, g, k, kappa")
    return dict(hamiltonian)


def constructor_keys(cls: type) -> list[str]:
    """Keyword arguments of ``cls.__init__`` that a model config may set (all but ``hamiltonian``)."""
    params = inspect.signature(cls.__init__).parameters
    return [p for p in params if p not in ("self", "hamiltonian")
            and params[p].kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]


def build_model(model_cfg, hamiltonian) -> ForceField:
    """Instantiate the force field described by ``model_cfg`` (``name`` + constructor kwargs).

    ``elastic_prior: true`` on a direct-force model wraps it in
    :class:`~lattice_lab.models.prior.ElasticPrior` (the network learns only the electronic force).

    The full resolved config (defaults filled in) is recorded on the model as ``model.model_cfg``
    so checkpoints can rebuild it exactly. Unknown names or keys raise :class:`ConfigError`.
    """
    cfg = to_plain(model_cfg)
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"model={model_cfg!r}: expected a mapping with a 'name' key")
    cfg = dict(cfg)
    if "name" not in cfg:
        raise ConfigError(f"model.name is missing (expected one of {list(MODEL_NAMES)})")
    name = cfg.pop("name")
    cls = model_class(name)
    allowed = constructor_keys(cls)
    # elastic_prior: the model's own option (energy models) or the generic ElasticPrior wrapper
    wrap_prior = check_flag(cfg.pop("elastic_prior", False), "model.elastic_prior") \
        if "elastic_prior" not in allowed else False
    for key in cfg:
        if key not in allowed:
            raise ConfigError(f"model.{key}={cfg[key]!r}: unknown key for model {name!r} (allowed: {allowed})")
    ham = hamiltonian_dict(hamiltonian)
    model = cls(hamiltonian=ham, **cfg)
    bound = inspect.signature(cls.__init__).bind(None, hamiltonian=ham, **cfg)
    bound.apply_defaults()
    full = {k: to_plain(v) for k, v in bound.arguments.items() if k not in ("self", "hamiltonian")}
    full = {k: list(v) if isinstance(v, tuple) else v for k, v in full.items()}
    if "elastic_prior" not in allowed:
        full["elastic_prior"] = wrap_prior
        if wrap_prior:
            from lattice_lab.models.prior import ElasticPrior

            model = ElasticPrior(model)
    model.model_cfg = {"name": name, **full}
    return model


def count_parameters(model, trainable_only: bool = False) -> int:
    """Number of scalar parameters (all, or only those with ``requires_grad``)."""
    return int(sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only))


def available_presets() -> list[str]:
    """Names of the model presets ``conf/model/*.yaml`` (usable as ``model=<name>``)."""
    from lattice_lab.common.cli import CONFIG_DIR

    return sorted(p.stem for p in (Path(CONFIG_DIR) / "model").glob("*.yaml"))


def load_preset(preset: str) -> dict:
    """The model config stored in ``conf/model/<preset>.yaml`` as a plain dict."""
    from omegaconf import OmegaConf

    from lattice_lab.common.cli import CONFIG_DIR

    path = Path(CONFIG_DIR) / "model" / f"{preset}.yaml"
    if not path.is_file():
        raise ConfigError(f"model={preset!r}: no preset {path} (available: {available_presets()})")
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)
