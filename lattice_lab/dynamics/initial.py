"""Initial states for quenches: the random "hot start" of the authors' code (DESIGN.md section 2).

Q_i ~ Normal(0, variance T_init / kappa) and v_i ~ Normal(0, variance T_init / m), independent
over sites and replicas, with T_init = 5 by default: a disordered, high-temperature lattice that
is then quenched into a bath at low temperature. (If kappa <= 0 the variance uses |kappa|, and for
kappa = 0 the on-site stiffness k, so the start stays well defined.)
"""

from __future__ import annotations

import math

import torch

from lattice_lab.common.errors import ConfigError


def hot_start_variance(params_or_kappa, init_temperature: float) -> float:
    """Variance T_init / |kappa| of the hot-start distortions (T_init / k when kappa = 0)."""
    if hasattr(params_or_kappa, "kappa"):
        kappa, k = float(params_or_kappa.kappa), float(params_or_kappa.k)
    else:
        kappa, k = float(params_or_kappa), 1.0
    stiffness = abs(kappa) if kappa != 0 else k
    return float(init_temperature) / stiffness


def random_hot_start(R: int, L: int, params, mass: float = 5.0, init_temperature: float = 5.0,
                     generator: torch.Generator | None = None, dtype: torch.dtype = torch.float64,
                     device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (Q, V), each ``[R, L, L]``: Q ~ N(0, T_init/kappa), V ~ N(0, T_init/m).

    ``params`` is a :class:`~lattice_lab.physics.holstein.HolsteinParams` or just the number kappa
    (the ARCHITECTURE.md signature ``random_hot_start(R, L, kappa, m, init_temperature, generator)``).
    Q is drawn before V from ``generator`` (which must live on ``device``).
    """
    if int(R) < 1 or int(L) < 1:
        raise ConfigError(f"random_hot_start: need R >= 1 and L >= 1, got R={R}, L={L}")
    if not (init_temperature >= 0 and math.isfinite(init_temperature)):
        raise ConfigError(f"init_temperature={init_temperature}: must be >= 0")
    if not mass > 0:
        raise ConfigError(f"mass={mass}: must be > 0")
    if device is None and generator is not None:
        device = generator.device
    shape = (int(R), int(L), int(L))
    Q = torch.randn(shape, generator=generator, dtype=dtype, device=device)
    Q.mul_(math.sqrt(hot_start_variance(params, init_temperature)))
    V = torch.randn(shape, generator=generator, dtype=dtype, device=device)
    V.mul_(math.sqrt(float(init_temperature) / float(mass)))
    return Q, V
