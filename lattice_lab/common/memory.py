"""Memory available for a run's tensors, and a refusal naming the settings when they would not fit.

A run that allocates more than the machine has fails deep inside torch (``RuntimeError: DefaultCPUAllocator:
not enough memory``, ``CUDA out of memory``) after it has created its output folder, or is killed by the
kernel's OOM killer. Entrypoints estimate what their largest arrays need and check it up front::

    from lattice_lab.common.memory import require_memory

    need = 3 * R * L * L * 8  # e.g. Q, V, F of R replicas in float64
    require_memory(need, device, {"dynamics.L": L, "dynamics.replicas": R})  # before anything is written

- :func:`available_bytes`: bytes that can be allocated on a device now: ``MemAvailable`` of
  ``/proc/meminfo`` (Linux) for the CPU, ``torch.cuda.mem_get_info`` (free bytes) for a CUDA device;
  None where that is not known (another OS or device), and then nothing is refused.
- :func:`require_memory`: ConfigError ``<key>=<value>, ...: needs ~X GB on <device>, Y GB available``
  where an estimate exceeds what is available.

An estimate should count what is known cheaply (the arrays a run holds), a lower bound of what it will
use: a refusal then means the run cannot fit, while a run that passes may still need more (a model's
activations).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from lattice_lab.common.errors import ConfigError

MEMINFO = "/proc/meminfo"  # read for the CPU (a module constant, so that tests can point it elsewhere)


def available_bytes(device: torch.device | str = "cpu") -> int | None:
    """Bytes that can be allocated on ``device`` now: ``MemAvailable`` (Linux, the memory the kernel can
    give without swapping) for the CPU, the free memory of a CUDA device; None where it is not known."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type != "cpu":
        return None
    try:
        with open(MEMINFO) as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def require_memory(need_bytes: float, device: torch.device | str, settings: Mapping[str, object],
                   what: str = "") -> None:
    """Refuse with a ConfigError naming ``settings`` (``{"dynamics.L": 100000, ...}``, the keys that set the
    size) when ``need_bytes`` exceed :func:`available_bytes` of ``device``; ``what`` (e.g. ``"Q, V, F and a
    frame"``) says what was counted. Nothing happens where the available memory is not known."""
    have = available_bytes(device)
    if have is None or need_bytes <= have:
        return
    named = ", ".join(f"{key}={value}" for key, value in settings.items())
    counted = f" for {what}" if what else ""
    raise ConfigError(f"{named}: needs ~{_gb(need_bytes)} GB on {torch.device(device)}{counted}, "
                      f"{_gb(have)} GB available")


def _gb(n_bytes: float) -> str:
    """``0.512``, ``12.3``, ``3,200`` (GB, without exponents)."""
    gb = n_bytes / 1e9
    return f"{gb:,.0f}" if gb >= 100 else f"{gb:.3g}"
