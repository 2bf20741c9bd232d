"""Three-way switches of the configs: ``auto``, ``true`` or ``false`` (native kernels, CUDA graphs)."""

from __future__ import annotations

from lattice_lab.common.errors import ConfigError


def check_switch(value, key: str) -> str | bool:
    """``value`` if it is ``"auto"``, ``True`` or ``False``; a ConfigError naming ``key`` otherwise."""
    if not (value == "auto" or isinstance(value, bool)):
        raise ConfigError(f"{key}={value!r}: expected auto, true or false")
    return value
