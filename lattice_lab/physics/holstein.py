"""The semiclassical Holstein model on a periodic L x L square lattice (DESIGN.md section 2).

Electrons (spinless, half filling) hop with amplitude t and couple to one classical distortion
Q_i per site; the lattice has an on-site stiffness k and a nearest-neighbour coupling kappa:

    H_e(Q) = -t sum_<ij> (c_i^+ c_j + h.c.) - g sum_i Q_i (n_i - 1/2)
    E_el(Q) = sum_i k Q_i^2 / 2 + kappa sum_<ij> Q_i Q_j            (each bond once)

This module holds the parameters and the purely classical (elastic) parts; the electronic part
(exact diagonalisation) is in :mod:`lattice_lab.physics.ed`.

Lattice conventions: fields are ``[..., L, L]`` with site (x, y) at flat index ``s = x * L + y``.
Every neighbour sum goes through :func:`lattice_lab.lattice.nn_sum`; the hopping matrix is built
from it, so for L = 2 (where the "left" and "right" neighbour are the same site) both count the
double bond twice and stay mutually consistent. Physically meaningful lattices have L >= 3.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields

import torch

from lattice_lab.common.errors import ConfigError
from lattice_lab.lattice import nn_sum

FILLINGS = ("canonical", "midgap")


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass(frozen=True)
class HolsteinParams:
    """Parameters of the semiclassical Holstein model (defaults: the papers' values).

    ``temperature`` is the electron temperature (= bath temperature) in units of t. ``filling`` is
    ``"canonical"`` (mu solved so that exactly N/2 electrons are present) or ``"midgap"`` (mu halfway
    between eigenvalues N/2 and N/2 + 1). Constructing an instance validates it.
    """

    t: float = 1.0
    g: float = 3.5
    k: float = 1.0
    kappa: float = 0.18
    temperature: float = 0.1
    filling: str = "canonical"

    def __post_init__(self):
        self.validate()

    def validate(self) -> HolsteinParams:
        """Raise :class:`ConfigError` naming the bad value; return ``self`` when valid."""
        for name in ("t", "g", "k", "kappa", "temperature"):
            value = getattr(self, name)
            if not _is_number(value) or not math.isfinite(value):
                key = name if name == "temperature" else f"hamiltonian.{name}"
                raise ConfigError(f"{key}={value!r}: expected a finite number")
        if self.t <= 0:
            raise ConfigError(f"hamiltonian.t={self.t}: the hopping must be > 0")
        if self.k <= 0:
            raise ConfigError(f"hamiltonian.k={self.k}: the stiffness must be > 0")
        if abs(self.kappa) >= self.k / 4:
            raise ConfigError(
                f"hamiltonian.kappa={self.kappa}: need |kappa| < k/4 = {self.k / 4:g} "
                "(otherwise the elastic energy is unbounded below)")
        if self.temperature < 0:
            raise ConfigError(f"temperature={self.temperature}: must be >= 0")
        if self.filling not in FILLINGS:
            raise ConfigError(f"hamiltonian.filling={self.filling!r}: expected one of {list(FILLINGS)}")
        return self

    @classmethod
    def from_config(cls, cfg: Mapping | None, temperature: float | None = None) -> HolsteinParams:
        """Build from a config mapping (e.g. ``cfg.hamiltonian``) with keys t, g, k, kappa, filling
        and optionally temperature; ``temperature=`` (from the dataset/dynamics config) overrides it.

        Unknown keys raise :class:`ConfigError`.
        """
        if cfg is None:
            cfg = {}
        try:  # DictConfig -> plain dict (resolves interpolations)
            from omegaconf import DictConfig, OmegaConf

            if isinstance(cfg, DictConfig):
                cfg = OmegaConf.to_container(cfg, resolve=True)
        except ImportError:  # pragma: no cover - omegaconf is a dependency
            pass
        if not isinstance(cfg, Mapping):
            raise ConfigError(f"hamiltonian={cfg!r}: expected a mapping of t, g, k, kappa, filling")
        allowed = {f.name for f in fields(cls)}
        unknown = sorted(set(cfg) - allowed)
        if unknown:
            raise ConfigError(
                f"hamiltonian.{unknown[0]}={cfg[unknown[0]]!r}: unknown key (allowed: {sorted(allowed)})")
        kwargs = dict(cfg)
        if temperature is not None:
            kwargs["temperature"] = temperature
        for key in ("t", "g", "k", "kappa", "temperature"):
            if key in kwargs and _is_number(kwargs[key]):
                kwargs[key] = float(kwargs[key])
        return cls(**kwargs)

    def as_dict(self) -> dict:
        """Plain dict (t, g, k, kappa, temperature, filling), e.g. for model checkpoints."""
        return asdict(self)

    @property
    def bandwidth(self) -> float:
        """Free-electron bandwidth W = 8 t of the square lattice."""
        return 8.0 * self.t

    @property
    def coupling_lambda(self) -> float:
        """Dimensionless coupling lambda = g^2 / (k W) (1.53 for the defaults)."""
        return self.g ** 2 / (self.k * self.bandwidth)


def as_params(params: HolsteinParams | Mapping | None) -> HolsteinParams:
    """Accept a :class:`HolsteinParams`, a mapping of its fields (e.g. a model's ``hamiltonian``
    dict) or ``None`` (the defaults)."""
    if params is None:
        return HolsteinParams()
    if isinstance(params, HolsteinParams):
        return params
    return HolsteinParams.from_config(params)


def _check_field(Q: torch.Tensor) -> None:
    if Q.dim() < 2 or Q.shape[-1] != Q.shape[-2]:
        raise ConfigError(f"lattice field must have shape [..., L, L], got {tuple(Q.shape)}")


def linear_elastic_force(Q: torch.Tensor, k: float, kappa: float) -> torch.Tensor:
    """-k Q_i - kappa sum_{j in nn(i)} Q_j: the one implementation (TorchScript-compatible, used by models)."""
    return -k * Q - kappa * nn_sum(Q)


def elastic_force(Q: torch.Tensor, params: HolsteinParams | Mapping | None = None) -> torch.Tensor:
    """Elastic force -dE_el/dQ_i = -k Q_i - kappa sum_{j in nn(i)} Q_j, shape of ``Q``."""
    p = as_params(params)
    _check_field(Q)
    return linear_elastic_force(Q, p.k, p.kappa)


def elastic_energy(Q: torch.Tensor, params: HolsteinParams | Mapping | None = None) -> torch.Tensor:
    """Elastic energy sum_i k Q_i^2 / 2 + kappa sum_<ij> Q_i Q_j (each bond once), shape ``[...]``."""
    p = as_params(params)
    _check_field(Q)
    return (0.5 * p.k * Q * Q + 0.5 * p.kappa * Q * nn_sum(Q)).sum(dim=(-2, -1))


def density_from_force(F: torch.Tensor, Q: torch.Tensor,
                       params: HolsteinParams | Mapping | None = None) -> torch.Tensor:
    """Electron density implied by a total force (DESIGN.md section 6):

        n_i = (F_i + k Q_i + kappa sum_nn Q_j) / g + 1/2

    Exact inverse of F_i = g (<n_i> - 1/2) - k Q_i - kappa sum_nn Q_j; used to get <n_i> in
    ML-driven dynamics, where only the predicted force is available.
    """
    p = as_params(params)
    _check_field(Q)
    return (F + p.k * Q + p.kappa * nn_sum(Q)) / p.g + 0.5


def hopping_matrix(L: int, t: float = 1.0, dtype: torch.dtype = torch.float64,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """Hopping part of the single-particle Hamiltonian, ``-t A`` with A the periodic adjacency
    matrix of the L x L square lattice ([N, N], N = L^2, site s = x * L + y).

    Built by applying :func:`lattice_lab.lattice.nn_sum` to unit vectors, so ``A @ f.flatten() ==
    nn_sum(f).flatten()`` for every L >= 2 (for L = 2 each neighbour pair is a double bond).
    """
    L = int(L)
    if L < 2:
        raise ConfigError(f"L={L}: the lattice needs L >= 2 (L >= 3 for distinct neighbours)")
    N = L * L
    eye = torch.eye(N, dtype=dtype, device=device).reshape(N, L, L)
    A = nn_sum(eye).reshape(N, N)  # row s: which sites have s as a neighbour (A is symmetric)
    return -float(t) * A
