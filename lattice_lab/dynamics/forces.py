"""Force providers for Langevin dynamics: exact diagonalisation (ED) or a trained force field (ML).

A provider is a callable ``Q [R, L, L] -> F [R, L, L]`` giving the total adiabatic force
F_i = g(<n_i> - 1/2) - k Q_i - kappa sum_nn Q_j (DESIGN.md section 2) for R replicas at once, plus
``density(Q, F) -> n [R, L, L]``, the electron density <n_i> at the same configuration:

- ``ed``: :class:`lattice_lab.physics.ed.ExactForces` in float64; the density comes straight from
  the diagonalisation (cached from the force call at the same Q, so saving a frame costs nothing);
- ``ml``: a :class:`lattice_lab.models.base.ForceField` loaded from a checkpoint path or MLflow run
  id, checked against the run's Hamiltonian; the density is reconstructed from the predicted
  force, n_i = (F_i + k Q_i + kappa sum_nn Q_j)/g + 1/2 (DESIGN.md section 6).

The provider evaluates in its own dtype (float64 for ED, the model dtype for ML) and returns the
force in the dtype of its input, so the integrator may keep its state in another precision.
Replicas are one batch; ``chunk_replicas`` splits the batch only to bound memory.

An ML provider also accepts ``provider(Q, out=buffer)``: a hint that it may write the forces into
``buffer`` (a tensor like ``Q``) and return it instead of a new tensor; the caller uses the returned
tensor either way. The Langevin integrator's native CPU steps pass buffers of their own
(``forces_into``, without the check of the buffer), which spares an allocation per step
(docs/simulate.md, "Frozen models and force buffers").
"""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path

import torch

from lattice_lab.common.device import MODEL_DTYPES, resolve_device, resolve_dtype
from lattice_lab.common.errors import ConfigError, refuse_unknown_keys
from lattice_lab.common.switch import check_switch
from lattice_lab.models.base import min_lattice
from lattice_lab.models.checkpoint import ExportedForceField, mlflow_run_of, weights_sha256

log = logging.getLogger(__name__)

FORCE_SOURCES = ("ed", "ml")


def _cfg_get(cfg, key, default=None):
    if cfg is None:
        return default
    try:
        value = cfg.get(key, default)
    except AttributeError:
        value = getattr(cfg, key, default)
    return default if value is None else value


def _chunks(R: int, chunk: int | None):
    if not chunk or chunk >= R:
        yield slice(0, R)
        return
    for start in range(0, R, chunk):
        yield slice(start, min(start + chunk, R))


def _check_chunk(value, key: str) -> None:
    """``chunk_replicas``: a positive integer or None ('abc' was a ValueError, 2.5 was taken as 2)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConfigError(f"{key}={value!r}: need a positive integer or null")


def fits_forces(buffer: torch.Tensor, Q: torch.Tensor) -> bool:
    """Whether ``buffer`` can receive the forces of ``Q`` (the ``out`` of :meth:`MLForceProvider.forces_into`):
    ``Q``'s shape, dtype and device, contiguous."""
    return (buffer.shape == Q.shape and buffer.dtype == Q.dtype and buffer.device == Q.device
            and buffer.is_contiguous())


class ForceProvider:
    """Base class: batched force evaluation in ``self.dtype`` on ``self.device`` plus the density."""

    source: str = ""
    compiled: bool = False  # the forces come from a torch.compile'd model (MLForceProvider)

    def __init__(self, hamiltonian, device, dtype: torch.dtype, chunk_replicas: int | None = None):
        self.hamiltonian = hamiltonian
        self.device = resolve_device(device)
        self.dtype = dtype
        _check_chunk(chunk_replicas, "force.chunk_replicas")
        self.chunk_replicas = int(chunk_replicas) if chunk_replicas else None
        self.model_path = ""
        self.model_run_id = ""
        self.model_sha256 = ""
        self.model_family = ""

    def _evaluate(self, Q: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def __call__(self, Q: torch.Tensor) -> torch.Tensor:
        if Q.dim() != 3 or Q.shape[-1] != Q.shape[-2]:
            raise ValueError(f"force provider input must be [R, L, L], got {tuple(Q.shape)}")
        if self.chunk_replicas is None and Q.dtype == self.dtype and Q.device == self.device:
            return self._evaluate(Q)  # the common case, without per-call conversions (~2 us)
        Qc = Q.to(device=self.device, dtype=self.dtype)
        parts = [self._evaluate(Qc[sl]) for sl in _chunks(Qc.shape[0], self.chunk_replicas)]
        F = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        return F.to(dtype=Q.dtype)

    def working_bytes(self, R: int, L: int) -> int:
        """Bytes a force call on R replicas of L x L needs beyond its input and output, as far as known
        without running it (memory estimates before a run): 0 here, as for a model, whose activations
        depend on its layers; ED: its diagonalisation's working set."""
        return 0

    def density(self, Q: torch.Tensor, F: torch.Tensor) -> torch.Tensor:
        """Electron density <n_i> [R, L, L] at configuration Q whose force is F."""
        from lattice_lab.physics.holstein import density_from_force

        return density_from_force(F, Q, self.hamiltonian)

    def describe(self) -> dict:
        """Trajectory/MLflow attributes of this force source."""
        return {"force_source": self.source, "model_path": self.model_path,
                "model_run_id": self.model_run_id, "model_sha256": self.model_sha256,
                "force_compiled": bool(self.compiled)}


class EDForceProvider(ForceProvider):
    """Exact forces by diagonalising the N x N electron Hamiltonian of every replica (float64).

    ``chunk_replicas`` bounds how many replicas are diagonalised together (ExactForces' chunk_size).
    """

    source = "ed"

    def __init__(self, hamiltonian, device, chunk_replicas=None):
        super().__init__(hamiltonian, device, torch.float64, chunk_replicas)
        from lattice_lab.physics.ed import ExactForces

        self._ed = ExactForces(hamiltonian, device=self.device, chunk_size=self.chunk_replicas)
        self._cache_Q: torch.Tensor | None = None
        self._cache_n: torch.Tensor | None = None

    def __call__(self, Q: torch.Tensor) -> torch.Tensor:
        if Q.dim() != 3 or Q.shape[-1] != Q.shape[-2]:
            raise ValueError(f"force provider input must be [R, L, L], got {tuple(Q.shape)}")
        Qc = Q.to(device=self.device, dtype=self.dtype)
        res = self._ed.compute(Qc)
        self._cache_Q, self._cache_n = Qc.clone(), res.density
        return res.forces.to(dtype=Q.dtype)

    def working_bytes(self, R: int, L: int) -> int:
        return self._ed.working_bytes(R, L)

    def density(self, Q: torch.Tensor, F: torch.Tensor) -> torch.Tensor:
        """The ED density of the last force call if it was at this Q; otherwise diagonalise again."""
        Qc = Q.to(device=self.device, dtype=self.dtype)
        if self._cache_Q is None or self._cache_Q.shape != Qc.shape or not torch.equal(self._cache_Q, Qc):
            self(Q)
        return self._cache_n.to(dtype=Q.dtype)


class MLForceProvider(ForceProvider):
    """A trained force field; direct models run without autograd (no_grad), energy models with autograd."""

    source = "ml"

    def __init__(self, hamiltonian, device, dtype, checkpoint, *, chunk_replicas=None,
                 compile: bool | str = False, model=None, tracking_uri: str | None = None, frozen: bool = False):
        """``frozen``: the model's weights will not change while this provider is used (true for the
        providers :func:`make_force_provider` builds from a checkpoint: nothing else holds their model).
        Its native kernel then skips the per-call check that they have not (docs/simulate.md); a model
        changed anyway is not reliably followed. Without it, weight updates are followed."""
        super().__init__(hamiltonian, device, dtype, chunk_replicas)
        self.frozen = bool(frozen)
        if model is None:
            if checkpoint in (None, "", "???"):
                raise ConfigError("force.checkpoint=None: force=ml needs a model checkpoint path or "
                                  "MLflow run id (force.checkpoint=PATH|RUN_ID), or use force=ed")
            from lattice_lab.models.checkpoint import load_force_field

            model = load_force_field(str(checkpoint), device=self.device, dtype=dtype, tracking_uri=tracking_uri)
            self.model_path = str(checkpoint)
        model = model.to(device=self.device, dtype=dtype).eval()
        model.check_compatible(hamiltonian.as_dict() if hasattr(hamiltonian, "as_dict") else dict(hamiltonian))
        self.model = model
        self.model_run_id = model_run_id_of(checkpoint, model) if checkpoint not in (None, "") else ""
        # an export carries the hash of the model it was made from: the same weights give the same
        # model_sha256 from best.pt and from model.ts.pt (whose module holds them under other names)
        self.model_sha256 = (getattr(model, "metadata", None) or {}).get("weights_sha256") or weights_sha256(model)
        # the family that trained it (an export says so in its metadata): tag model_family, as on train runs
        self.model_family = str((getattr(model, "metadata", None) or {}).get("name") or model.name)
        self.conservative = bool(getattr(model, "conservative", False))
        self._fn = model
        self._compiled = False
        self._native = None  # (input shape, model.native_function) once the model has run at that shape
        if compile_wanted(compile, self.device, model):
            try:
                self._fn = torch.compile(model)
                self._compiled = True
            except Exception as exc:  # noqa: BLE001 - any compile failure falls back to eager
                warnings.warn(f"torch.compile failed ({exc!r}); running the model eagerly", stacklevel=2)
                self._fn = model

    @property
    def compiled(self) -> bool:
        """Whether the model runs through torch.compile (false again after a compile failure)."""
        return self._compiled

    def __call__(self, Q: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Forces at ``Q [R, L, L]``; ``out``: a hint, a buffer the native kernel may write them into
        (used when it is a contiguous CPU tensor of ``Q``'s shape and dtype, else ignored). The caller
        uses the returned tensor."""
        if out is not None and not fits_forces(out, Q):
            out = None
        return self.forces_into(Q, out)

    def forces_into(self, Q: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`__call__` without the check of ``out``, which is None or a contiguous CPU tensor of
        ``Q``'s shape and dtype (the integrator's own buffers; ~0.4 us a call less)."""
        native = self._native  # the per-step case first: the shape the native kernel was fetched for
        if native is not None and Q.shape == native[0] and Q.dtype == self.dtype and Q.is_cpu:
            # that shape passed the input checks once (~1 us a call less); a native function is only
            # fetched for CPU inputs, so Q.is_cpu means Q is on this provider's device
            F = native[1](Q) if out is None else native[1](Q, out)
            if F is not None:
                return F
        return ForceProvider.__call__(self, Q)

    def _run(self, Q: torch.Tensor) -> torch.Tensor:
        native = self._native
        if native is not None and native[0] == Q.shape:  # the model's native kernel, without the
            F = native[1](Q)                               # per-call checks (~5 us a call)
            if F is not None:
                return F
        F = self._run_model(Q)
        if not self._compiled and (native is None or native[0] != Q.shape):
            with torch.no_grad():  # as the dynamics calls it (energy models: not training, so grad mode is moot)
                fn = self.model.native_function(Q, frozen=self.frozen)
            self._native = None if fn is None else (Q.shape, fn)
        return F

    def _run_model(self, Q: torch.Tensor) -> torch.Tensor:
        if self.conservative:  # F = -dE/dQ needs autograd
            with torch.enable_grad():
                return self._fn(Q).detach()
        with torch.no_grad():  # not inference_mode: its outputs would need a copy before the
            return self._fn(Q)   # integrator may update them in place

    def _evaluate(self, Q: torch.Tensor) -> torch.Tensor:
        if not self._compiled:
            return self._run(Q)
        try:
            return self._run(Q)
        except Exception as exc:  # noqa: BLE001 - compilation happens lazily at the first call
            warnings.warn(f"torch.compile failed at the first call ({type(exc).__name__}: {exc}); "
                          "running the model eagerly", stacklevel=2)
            self._fn, self._compiled = self.model, False
            return self._run(Q)


def compile_wanted(setting, device, model) -> bool:
    """``force.compile``: ``true`` / ``false``, or ``auto``: on CUDA only, for a torch model (not a
    TorchScript export). On a GPU the compiled model is recorded as a CUDA graph like any other
    (``cuda_graph: auto``); at production sizes on an H100 it runs 1.03-4.5x faster than the uncompiled
    graph, for 3-60 s of compilation per lattice shape (docs/bench.md, "On a GPU"). On the CPU the native
    kernels are faster than anything torch.compile makes."""
    setting = check_switch(setting, "force.compile")
    if setting != "auto":
        return setting
    return torch.device(device).type == "cuda" and not isinstance(model, ExportedForceField)


def model_run_id_of(checkpoint, model=None) -> str:
    """MLflow run id of the model behind ``force.checkpoint``: the id itself (``<run_id>`` or
    ``runs:/<run_id>/...``), else the ``mlflow_run_id`` stored in the checkpoint / export metadata."""
    run = mlflow_run_of(checkpoint)
    if run:
        return run[0]
    path = Path(checkpoint)
    meta = getattr(model, "metadata", None)
    if isinstance(meta, dict):
        return str(meta.get("mlflow_run_id") or "")
    if path.is_dir():
        path = path / "best.pt"
    try:
        from lattice_lab.models.checkpoint import is_torchscript, load_checkpoint

        if path.is_file() and not is_torchscript(path):
            return str(load_checkpoint(path).get("mlflow_run_id") or "")
    except Exception as exc:  # noqa: BLE001 - only a tag: never fail the run for it
        log.warning("could not read mlflow_run_id from %s: %s", path, exc)
    return ""


FORCE_KEYS = ("source", "checkpoint", "chunk_replicas", "compile", "max_L")  # conf/force/{ml,ed}.yaml


def check_force_config(force_cfg, prefix: str = "force.", *, L: int | None = None) -> str:
    """Check a force config before any work; errors name the key as ``<prefix><key>`` (``force.`` or
    ``compare.ed_force.``). Returns the source, ``ed`` or ``ml``. Unknown keys are refused (a typo such as
    ``+force.chunk_replica=2`` would otherwise be ignored); both sources accept every key in
    :data:`FORCE_KEYS`, so an experiment that sets ``force.checkpoint`` still runs with ``force=ed``."""
    refuse_unknown_keys(force_cfg, FORCE_KEYS, prefix.rstrip("."))
    source = str(_cfg_get(force_cfg, "source", "")).lower()
    if source not in FORCE_SOURCES:
        raise ConfigError(f"{prefix}source={source!r}: expected one of {FORCE_SOURCES} (force=ml or force=ed)")
    _check_chunk(_cfg_get(force_cfg, "chunk_replicas"), f"{prefix}chunk_replicas")
    check_switch(_cfg_get(force_cfg, "compile", False), f"{prefix}compile")
    if source == "ed":
        max_L = _cfg_get(force_cfg, "max_L", 48)
        if isinstance(max_L, bool) or not isinstance(max_L, int) or max_L < 2:
            raise ConfigError(f"{prefix}max_L={max_L!r}: expected an integer >= 2")
        if isinstance(L, int) and not isinstance(L, bool) and L > max_L:
            raise ConfigError(
                f"dynamics.L={L}: exact diagonalisation above {prefix}max_L={max_L} costs O(L^6) per step; "
                f"use force=ml with a trained model (or raise {prefix}max_L)")
    return source


def make_force_provider(force_cfg, hamiltonian, device="auto", dtype="float32", *, L: int | None = None,
                        model=None, tracking_uri: str | None = None) -> ForceProvider:
    """Build the force provider named by ``force_cfg.source`` (``ed`` or ``ml``), checked by
    :func:`check_force_config`.

    ``hamiltonian`` is a :class:`~lattice_lab.physics.holstein.HolsteinParams` (temperature = the
    bath temperature). ``dtype`` is the ML model's dtype (ED is always float64). With ``L`` given,
    ED refuses lattices above ``force.max_L``. ``model`` injects an already built force field, whose
    weight updates the provider follows; a model loaded here from the checkpoint is frozen (nothing
    else holds it: :class:`MLForceProvider`'s ``frozen``). ``tracking_uri`` is the MLflow store a
    checkpoint given as a run id is looked up in.
    """
    source = check_force_config(force_cfg, L=L)
    chunk = _cfg_get(force_cfg, "chunk_replicas")
    if source == "ed":
        return EDForceProvider(hamiltonian, device, chunk_replicas=chunk)
    provider = MLForceProvider(hamiltonian, device, resolve_dtype(dtype, MODEL_DTYPES), _cfg_get(force_cfg, "checkpoint"),
                               chunk_replicas=chunk, compile=_cfg_get(force_cfg, "compile", False),
                               model=model, tracking_uri=tracking_uri, frozen=model is None)
    need = min_lattice(float(getattr(provider.model, "receptive_field", 0)))
    if L is not None and int(L) < need:
        raise ConfigError(f"dynamics.L={L}: smaller than this force field's receptive field allows "
                          f"(needs L >= {need})")
    return provider


def equilibrium_q_scale(hamiltonian) -> float:
    """Largest static distortion the Holstein force allows: g/2 / (k - 4|kappa|).

    |g(<n_i> - 1/2)| <= g/2 and the softest elastic mode has stiffness k - 4|kappa|, so a
    configuration with max|Q| far above this is runaway, not physics.
    """
    g, k, kappa = float(hamiltonian.g), float(hamiltonian.k), float(hamiltonian.kappa)
    stiff = k - 4 * abs(kappa)
    if stiff <= 0:
        raise ConfigError(f"hamiltonian.kappa={kappa}: need |kappa| < k/4 = {k / 4}")
    return 0.5 * g / stiff if g else math.sqrt(1.0 / stiff)
