"""Device and dtype resolution from config strings (``device=auto`` picks CUDA when present)."""

from __future__ import annotations

import re

import torch

from lattice_lab.common.errors import ConfigError

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
# the project's precisions: models train and run in these (float32 by default; ED and datasets are float64).
# Half precisions do not train these models: Adam's eps=1e-8 is 0 in float16 (the loss diverges), and
# bfloat16 has no numpy type (plots, trajectories) and 3 significant digits for 1e-2 force errors.
MODEL_DTYPES = ("float32", "float64")


def resolve_device(spec: str | torch.device | None = "auto", key: str = "device") -> torch.device:
    """The torch device named by ``spec`` (``auto``: CUDA when present); a ConfigError naming ``key`` otherwise."""
    if isinstance(spec, torch.device):
        return spec
    spec = "auto" if spec is None else str(spec).strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    cuda = re.fullmatch(r"cuda(?::(\d+))?", spec)
    if cuda is None:  # checked first: cuda:abc is a malformed value, not a machine without CUDA
        raise ConfigError(f"{key}={spec!r}: expected 'auto', 'cpu', 'cuda' or 'cuda:N' (N: a GPU index, 0, 1, ...)")
    if not torch.cuda.is_available():
        raise ConfigError(f"{key}={spec!r}: CUDA is not available on this machine (use {key}=auto or cpu)")
    count = torch.cuda.device_count()
    if cuda.group(1) is not None and int(cuda.group(1)) >= count:  # torch would fail at the first tensor moved
        have = "1 CUDA device (cuda:0)" if count == 1 else f"{count} CUDA devices (cuda:0 to cuda:{count - 1})"
        raise ConfigError(f"{key}={spec!r}: this machine has {have}")
    return torch.device(spec)


def resolve_dtype(spec: str | torch.dtype, allowed: tuple[str, ...] | None = None, key: str = "dtype") -> torch.dtype:
    """The torch dtype named by ``spec`` (``"float32"``) or ``spec`` itself; a ConfigError naming ``key``
    unless it is one of ``allowed`` (default: any of the table; :data:`MODEL_DTYPES` for models)."""
    names = tuple(_DTYPES) if allowed is None else allowed
    name = str(spec).removeprefix("torch.") if isinstance(spec, torch.dtype) else str(spec)
    if name not in names:
        raise ConfigError(f"{key}={name!r}: expected one of {list(names)}")
    return _DTYPES[name]


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels (for honest timing on CUDA); no-op on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
