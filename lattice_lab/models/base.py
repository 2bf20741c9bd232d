"""The one interface every force field implements: periodic Q [B, L, L] in, total force [B, L, L] out."""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from lattice_lab.common.errors import ConfigError
from lattice_lab.native.policy import tensors_replaced, weights_written

HAMILTONIAN_KEYS = ("t", "g", "k", "kappa")


def min_lattice(receptive_field: float) -> int:
    """Smallest L on which a model of this reach (sites in x or y) sees no site twice: the periodic
    window of ``2 ceil(reach) + 1`` sites must fit."""
    return 2 * math.ceil(receptive_field) + 1


def check_reach(L: int, receptive_field: float) -> None:
    """Refuse a lattice ``L`` smaller than :func:`min_lattice` (ConfigError naming both)."""
    need = min_lattice(receptive_field)
    if L < need:
        raise ConfigError(f"lattice L={L} is smaller than the model's receptive field (needs L >= {need})")


class ForceField(nn.Module):
    """Base class of all learned force fields.

    Subclasses implement :meth:`forward` (``Q [B, L, L] -> F [B, L, L]``, the total force, elastic
    part included). Energy-based models set ``conservative = True`` and implement
    :meth:`site_energy`; their ``forward`` returns ``-dE/dQ``.

    Every model carries the Hamiltonian parameters and environment cutoff it was trained for, so
    using it for another model is an error rather than silently wrong physics.
    """

    name: str = "force_field"
    conservative: bool = False

    def __init__(self, hamiltonian: dict, cutoff: float, receptive_field: int):
        super().__init__()
        self.hamiltonian = {k: hamiltonian[k] for k in hamiltonian}
        self.cutoff = float(cutoff)
        self.receptive_field = int(receptive_field)

    def _apply(self, fn, *args, **kwargs):
        """``.to()``, ``.float()``, ``.double()``, ... replace buffers (and, per torch's settings,
        parameters) by new tensor objects: native kernels must look their tensors up again."""
        out = super()._apply(fn, *args, **kwargs)
        tensors_replaced()
        self._weight_dtype = None
        return out

    def weights_changed(self) -> None:
        """Call after writing to the weights in a way torch does not track: in place through ``.data``
        (``p.data.copy_(x)``, ``p.data.mul_(a)``: ``.data`` has a version counter of its own) or through
        a numpy view. The native kernels and the ENN keep packed copies of the weights, rebuilt when a
        version counter or data pointer changes (optimizer steps, ``load_state_dict``, ``.to()``,
        ``p.data = x``, writes under ``torch.no_grad()``); this rebuilds this model's copies at the next
        call. Like any weight write, not while another thread computes forces with this model."""
        weights_written(self)

    # -- energy models override these -------------------------------------------------------
    def site_energy(self, Q: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError(f"{type(self).__name__} is a direct-force model and has no energy")

    def energy(self, Q: torch.Tensor) -> torch.Tensor:
        """Total energy per configuration [B] (energy-based models only)."""
        return self.site_energy(Q).sum(dim=(-2, -1))

    # -- native CPU inference (lattice_lab.native) ---------------------------------------------
    @torch.jit.unused
    def native_forces(self, Q: torch.Tensor, k: float = 0.0, kappa: float = 0.0) -> torch.Tensor | None:
        """``forward(Q) - k Q - kappa nn_sum(Q)`` in one call of the model's native CPU kernel, or
        None when the model has none or it does not apply to ``Q`` (see ``lattice_lab.native.policy``);
        :class:`~lattice_lab.models.prior.ElasticPrior` then adds the elastic force in torch."""
        fn = self.native_function(Q, k, kappa)
        return None if fn is None else fn(Q)

    @torch.jit.unused
    def native_function(self, Q: torch.Tensor, k: float = 0.0, kappa: float = 0.0, frozen: bool = False):
        """The callable behind :meth:`native_forces` for inputs like ``Q`` (same dtype, device and
        shape, already checked), without the per-call policy checks (~5 us): ``f(Q, out=None) -> F``, or
        None where no native kernel serves ``Q``. ``out``, a contiguous tensor like ``Q``, receives the
        forces instead of a new tensor. ``f`` may return None (then use :meth:`forward`). Force providers
        fetch it once per input shape; weight updates are still followed, unless ``frozen``: the caller
        promises that the weights no longer change, and ``f`` skips its per-call check that they have not
        (1.5-8 us a call; a change made anyway is not reliably seen, but never makes the kernel read freed
        memory)."""
        return None

    # -- data-dependent normalisation (called once by the trainer, before training) ---------
    def fit_normalization(self, Q: torch.Tensor, F: torch.Tensor) -> None:
        """Set input/output scale buffers from training data. Default: nothing to fit."""

    @torch.no_grad()
    def fill_scalar_normalization(self, Q: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
        """Set the scalar buffers ``q_mean, q_std`` (input) and ``f_mean, f_std`` (fitted force target)
        from data moments (float64, epsilon-guarded); return ``(q_std, f_std)``."""
        from lattice_lab.models.layers_equivariant import force_moments

        q_mean, q_std = force_moments(Q)
        f_mean, f_std = force_moments(target)
        for name, value in (("q_mean", q_mean), ("q_std", q_std), ("f_mean", f_mean), ("f_std", f_std)):
            getattr(self, name).fill_(value)
        return q_std, f_std

    # -- checks -----------------------------------------------------------------------------
    _weight_dtype = None  # (torch.dtype) the weights' dtype, looked up on first use (reset by _apply)

    def check_input(self, Q: torch.Tensor) -> None:
        if Q.dim() != 3 or Q.shape[-1] != Q.shape[-2]:
            raise ConfigError(f"force field input must be [B, L, L], got shape {tuple(Q.shape)}")
        want = self._weight_dtype
        if want is None:
            want = self._weight_dtype = next((p.dtype for p in self.parameters()), Q.dtype)
        if Q.dtype != want:  # the native kernels and the torch path would not even agree on what to do
            raise ConfigError(f"force field input dtype {str(Q.dtype).removeprefix('torch.')} differs from the "
                              f"model's {str(want).removeprefix('torch.')}: convert one of them "
                              "(Q.to(dtype) or model.to(dtype))")
        check_reach(Q.shape[-1], self.receptive_field)

    def check_compatible(self, hamiltonian: dict, cutoff: float | None = None) -> None:
        """Raise ConfigError if ``hamiltonian`` (t, g, k, kappa) or ``cutoff`` differ from training.

        ``hamiltonian`` is a mapping or a ``physics.holstein.HolsteinParams`` (anything with ``as_dict()``).
        """
        if hasattr(hamiltonian, "as_dict"):
            hamiltonian = hamiltonian.as_dict()
        for key in HAMILTONIAN_KEYS:
            mine, theirs = self.hamiltonian.get(key), hamiltonian.get(key)
            if mine is None or theirs is None:
                continue
            if not math.isclose(float(mine), float(theirs), rel_tol=1e-9, abs_tol=1e-12):
                raise ConfigError(
                    f"hamiltonian.{key}={theirs}: this force field was trained for {key}={mine}")
        if cutoff is not None and not math.isclose(float(cutoff), self.cutoff, rel_tol=1e-9):
            raise ConfigError(f"cutoff={cutoff}: this force field was trained with cutoff={self.cutoff}")
        for key in ("temperature", "filling"):
            mine, theirs = self.hamiltonian.get(key), hamiltonian.get(key)
            if mine is not None and theirs is not None and mine != theirs:
                warnings.warn(
                    f"force field trained at {key}={mine}, used at {key}={theirs}", stacklevel=2)


def predict_forces(model: nn.Module, Q: torch.Tensor, batch_size: int, bar=None) -> torch.Tensor:
    """Forces of ``Q [C, L, L]`` in chunks of ``batch_size`` configurations, detached; autograd is on only for
    energy-based (conservative) models, whose forces are ``-dE/dQ``. ``bar``: a progress bar advanced per chunk."""
    outs = []
    with torch.set_grad_enabled(bool(getattr(model, "conservative", False))):
        for i in range(0, Q.shape[0], batch_size):
            outs.append(model(Q[i:i + batch_size]).detach())
            if bar is not None:
                bar.update(outs[-1].shape[0])
    return torch.cat(outs)
