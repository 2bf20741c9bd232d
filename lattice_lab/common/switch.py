"""Switches of the configs: flags (``true`` / ``false``) and three-way switches (``auto``, ``true`` or
``false``: native kernels, CUDA graphs)."""

from __future__ import annotations

from lattice_lab.common.errors import ConfigError


def check_switch(value, key: str) -> str | bool:
    """``value`` if it is ``"auto"``, ``True`` or ``False``; a ConfigError naming ``key`` otherwise."""
    if not (value == "auto" or isinstance(value, bool)):
        raise ConfigError(f"{key}={value!r}: expected auto, true or false")
    return value


def check_flag(value, key: str) -> bool:
    """``value`` if it is ``True`` or ``False``; a ConfigError naming ``key`` otherwise (YAML and Hydra
    overrides give booleans for true / false, so ``overwrite=no`` or ``resume=1`` is a mistake, not a flag)."""
    if not isinstance(value, bool):
        raise ConfigError(f"{key}={value!r}: expected true or false")
    return value
