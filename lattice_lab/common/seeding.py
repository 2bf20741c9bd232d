"""Reproducible seeding and capture/restore of every RNG state (for exact resume)."""

from __future__ import annotations

import random

import numpy as np
import torch

from lattice_lab.common.errors import ConfigError

SEED_MAX = 2**64 - 1  # torch generators and the native Philox noise take 64-bit seeds


def check_seed(value, key: str = "seed", largest: int = SEED_MAX, bits: int = 64) -> int:
    """A config seed as an int: ConfigError unless it is an integer in ``[0, largest]`` (a run that
    derives further streams as ``seed + k`` passes ``SEED_MAX - k``; a consumer of ``bits``-bit seeds,
    such as Optuna's samplers (32), passes ``2**bits - 1``)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ConfigError(f"{key}={value!r}: expected a non-negative integer")
    if value > largest:
        bound = f"2^{bits} - {2**bits - largest}"
        raise ConfigError(f"{key}={value!r}: too large (seeds are {bits}-bit: at most {bound} = {largest})")
    return int(value)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
