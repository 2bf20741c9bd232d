"""Device and dtype resolution from config strings (``device=auto`` picks CUDA when present)."""

from __future__ import annotations

import torch

from lattice_lab.common.errors import ConfigError

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    if isinstance(spec, torch.device):
        return spec
    spec = "auto" if spec is None else str(spec).strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device={spec!r}: CUDA is not available on this machine (use device=auto or cpu)")
        return torch.device(spec)
    if spec == "cpu":
        return torch.device("cpu")
    raise ConfigError(f"device={spec!r}: expected 'auto', 'cpu', 'cuda' or 'cuda:N'")


def resolve_dtype(spec: str | torch.dtype) -> torch.dtype:
    if isinstance(spec, torch.dtype):
        return spec
    try:
        return _DTYPES[str(spec)]
    except KeyError:
        raise ConfigError(f"dtype={spec!r}: expected one of {sorted(_DTYPES)}") from None


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels (for honest timing on CUDA); no-op on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
