"""Checkpoints (training resume + model rebuild), TorchScript export, and ``load_force_field``.

A checkpoint is a ``torch.save``d dict (written atomically) with

    model_cfg    the model config (``name`` + constructor kwargs), enough to rebuild the architecture
    hamiltonian  the Holstein parameters the model was trained for
    state_dict   weights and normalisation buffers
    version      lattice_lab version that wrote it;  dtype: the model's dtype ("float32", ...)
    + any ``extra`` entries (optimizer, scheduler, rng, epoch, best_val, mlflow_run_id, ...)

An exported force field is a TorchScript module (``torch.jit.script``, so it works for any lattice
size L and batch size, and energy models keep their autograd force) with a JSON metadata file
``lattice_lab.json`` stored inside it (``_extra_files``). It needs only ``torch`` to run:

    m = torch.jit.load("model.ts.pt");  F = m(Q)            # Q [B, L, L]
"""

from __future__ import annotations

import copy
import json
import re
import tempfile
import warnings
import zipfile
from pathlib import Path

import torch
from torch import nn

from lattice_lab.common.device import resolve_device, resolve_dtype
from lattice_lab.common.errors import ConfigError
from lattice_lab.common.io import atomic_path, atomic_torch_save, load_torch_file
from lattice_lab.models.base import ForceField

METADATA_FILE = "lattice_lab.json"
BEST_ARTIFACT = "checkpoints/best.pt"
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        return p.dtype
    return torch.float32


def _version() -> str:
    import lattice_lab

    return lattice_lab.__version__


# -- checkpoints ------------------------------------------------------------------------------
def save_checkpoint(path, model: ForceField, model_cfg=None, extra: dict | None = None) -> Path:
    """Write a checkpoint atomically (see the module docstring for its contents).

    ``model_cfg`` defaults to the config recorded on the model by ``build_model`` / the model
    class (``model.model_cfg``). For the form ``save_checkpoint(path, model, extra)`` a third
    positional mapping without a ``name`` key is taken as ``extra``.
    """
    from lattice_lab.models.registry import to_plain

    model_cfg = to_plain(model_cfg)
    if extra is None and isinstance(model_cfg, dict) and "name" not in model_cfg:
        model_cfg, extra = None, model_cfg
    if model_cfg is None:
        model_cfg = getattr(model, "model_cfg", None)
    if not isinstance(model_cfg, dict) or "name" not in model_cfg:
        raise ConfigError(f"save_checkpoint: model_cfg={model_cfg!r}: need a model config with a 'name' key")
    if model_cfg["name"] != getattr(model, "name", None):
        raise ConfigError(f"model.name={model_cfg['name']!r}: the model being saved is {model.name!r}")
    ckpt = dict(to_plain(extra) or {})
    ckpt.update({
        "model_cfg": dict(model_cfg),
        "hamiltonian": dict(model.hamiltonian),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "version": _version(),
    })
    ckpt.setdefault("dtype", _dtype_name(_model_dtype(model)))
    return atomic_torch_save(ckpt, path)


def load_checkpoint(path) -> dict:
    """Read a checkpoint dict (on CPU). Missing file -> ConfigError with the path."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint={str(path)!r}: file not found")
    ckpt = load_torch_file(path)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "model_cfg" not in ckpt:
        raise ConfigError(f"checkpoint={str(path)!r}: not a lattice_lab checkpoint (no model_cfg/state_dict)")
    if not isinstance(ckpt.get("hamiltonian"), dict):
        raise ConfigError(f"checkpoint={str(path)!r}: not a lattice_lab checkpoint (no hamiltonian)")
    return ckpt


def weights_sha256(model) -> str:
    """SHA-256 of a model's parameters and buffers (names, shapes and values; floats as float64, so the
    same weights give the same hash in float32 and float64): which model drove a run, whatever its path."""
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu()
        if t.is_floating_point():
            t = t.double()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def model_from_checkpoint(ckpt: dict, source=None) -> ForceField:
    """Rebuild the model of a checkpoint dict and load its weights (CPU, training mode). Weights that
    do not fit the model the checkpoint describes are a ConfigError (naming ``source``, the file)."""
    from lattice_lab.models.registry import build_model

    model = build_model(ckpt["model_cfg"], ckpt["hamiltonian"])
    model.mlflow_run_id = ckpt.get("mlflow_run_id") or None  # the training run, carried into an export
    model.dataset_name = ckpt.get("dataset_name") or None  # and the data it was trained on
    model.to(resolve_dtype(ckpt.get("dtype", "float32")))
    try:
        model.load_state_dict(ckpt["state_dict"])
    except (RuntimeError, TypeError, AttributeError) as exc:  # missing / unexpected keys, shapes, not a mapping
        detail = " ".join(str(exc).split())[:300]
        raise ConfigError(f"checkpoint={str(source or '<dict>')!r}: its state_dict does not fit the model it "
                          f"describes (model.name={model.name!r}): {detail}") from None
    return model


# -- TorchScript export -----------------------------------------------------------------------
class _DirectExport(nn.Module):
    """Scriptable wrapper: ``forward(Q [B, L, L]) -> F``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, Q: torch.Tensor) -> torch.Tensor:
        return self.model.compute_forces(Q)


class _EnergyExport(_DirectExport):
    """Scriptable wrapper of an energy model: forces (autograd inside) plus site/total energies."""

    @torch.jit.export
    def site_energy(self, Q: torch.Tensor) -> torch.Tensor:
        return self.model.site_energy(Q)

    @torch.jit.export
    def energy(self, Q: torch.Tensor) -> torch.Tensor:
        return self.model.site_energy(Q).sum(dim=(-2, -1))


def export_metadata(model: ForceField) -> dict:
    """JSON-serialisable description stored with an export."""
    from lattice_lab.models.flops import flops_per_site
    from lattice_lab.models.registry import count_parameters

    meta = {
        "format": "lattice_lab.torchscript.v1",
        "name": model.name,
        "model_cfg": getattr(model, "model_cfg", None),
        "hamiltonian": dict(model.hamiltonian),
        "cutoff": model.cutoff,
        "receptive_field": model.receptive_field,
        "conservative": bool(model.conservative),
        "dtype": _dtype_name(_model_dtype(model)),
        "parameters": count_parameters(model),
        "version": _version(),
        # provenance: the training run (set on models loaded from a checkpoint) and the weights exported
        "mlflow_run_id": getattr(model, "mlflow_run_id", None) or None,
        "dataset_name": getattr(model, "dataset_name", None) or None,
        "weights_sha256": weights_sha256(model),
    }
    try:
        meta["flops_per_site"] = flops_per_site(model)
    except (NotImplementedError, ImportError):
        pass
    return meta


def export_force_field(model: ForceField, path, example_L: int | None = None) -> Path:
    """Export ``model`` as a TorchScript file (atomic) runnable with plain ``torch.jit.load``.

    The module is scripted (not traced), so it accepts any batch size and lattice size L; energy
    models compute F = -dE/dQ with autograd inside the scripted code (also under ``no_grad``) and
    additionally export ``site_energy`` and ``energy``. If ``example_L`` is given, the export is
    checked against the eager model on a random ``[2, L, L]`` configuration before it is written.
    The model needs a TorchScript-compatible ``compute_forces(Q)`` (all four families have one;
    ``ElasticPrior`` forwards to its network's). Modules with a ``freeze_for_export()`` method (the
    ENN's packed layers, whose weights TorchScript cannot gather from a ParameterDict) freeze their
    derived weights into buffers on a private copy first; ``model`` itself is not modified.
    """
    if not hasattr(getattr(model, "network", model), "compute_forces"):
        raise ConfigError(f"model.name={model.name!r}: export needs a compute_forces(Q) method (not available)")
    was_training = model.training
    model.eval()
    frozen = model
    if any(callable(getattr(type(m), "freeze_for_export", None)) for m in model.modules()):
        frozen = copy.deepcopy(model).eval()
        for m in frozen.modules():
            if callable(getattr(type(m), "freeze_for_export", None)):
                m.freeze_for_export()
    wrapper = (_EnergyExport if model.conservative else _DirectExport)(frozen)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.*deprecated.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        scripted = torch.jit.script(wrapper)
    meta = export_metadata(model)
    try:
        if example_L is not None:
            p = next(iter(model.parameters()))
            Q = torch.randn(2, int(example_L), int(example_L), dtype=p.dtype, device=p.device)
            with torch.no_grad():
                ref, got = model(Q), scripted(Q)
            if not torch.allclose(ref, got, rtol=1e-4, atol=1e-5 * float(ref.abs().max()) + 1e-12):
                raise RuntimeError(f"export check failed at L={example_L}: max |dF| = {(ref - got).abs().max():.3g}")
        with atomic_path(path) as tmp:
            torch.jit.save(scripted, str(tmp), _extra_files={METADATA_FILE: json.dumps(meta)})
    finally:
        model.train(was_training)
    return Path(path)


class ExportedForceField(ForceField):
    """A TorchScript export wrapped as a :class:`ForceField` (input checks, metadata, ``energy``)."""

    name = "exported"

    def __init__(self, module, metadata: dict):
        super().__init__(metadata["hamiltonian"], metadata["cutoff"], metadata["receptive_field"])
        self.module = module
        self.metadata = dict(metadata)
        self.model_cfg = metadata.get("model_cfg")
        self.conservative = bool(metadata.get("conservative", False))

    def forward(self, Q: torch.Tensor) -> torch.Tensor:
        self.check_input(Q)
        return self.module(Q)

    def site_energy(self, Q: torch.Tensor) -> torch.Tensor:
        if not self.conservative:
            raise NotImplementedError(f"{self.metadata.get('name')} is a direct-force model and has no energy")
        self.check_input(Q)
        return self.module.site_energy(Q)


def is_torchscript(path) -> bool:
    """True if ``path`` is a TorchScript archive (as written by :func:`export_force_field`)."""
    try:
        with zipfile.ZipFile(path) as zf:
            return any(n.endswith("/" + METADATA_FILE) or "/code/" in n for n in zf.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def load_exported(path, device="cpu") -> ExportedForceField:
    """Load an export (TorchScript + metadata) as an :class:`ExportedForceField`."""
    extra = {METADATA_FILE: ""}
    try:
        module = torch.jit.load(str(path), map_location=resolve_device(device), _extra_files=extra)
    except Exception as exc:  # noqa: BLE001 - torch raises many types; report one clear line
        detail = str(exc).splitlines()[0][:200] if str(exc) else ""
        raise ConfigError(f"checkpoint={str(path)!r}: not a readable TorchScript file, corrupted or of another "
                          f"kind ({type(exc).__name__}: {detail})") from None
    if not extra[METADATA_FILE]:
        raise ConfigError(f"checkpoint={str(path)!r}: TorchScript file without lattice_lab metadata")
    try:
        meta = json.loads(extra[METADATA_FILE])
        return ExportedForceField(module, meta)
    except (ValueError, TypeError, KeyError) as exc:
        raise ConfigError(f"checkpoint={str(path)!r}: unreadable lattice_lab metadata in the TorchScript file "
                          f"({type(exc).__name__}: {exc})") from None


# -- one entry point for every kind of saved model ----------------------------------------------
def _tracking_uri(uri: str | None = None) -> str:
    """The project's one tracking-store rule (``tracking.mlflow_utils.resolve_tracking_uri``)."""
    from lattice_lab.tracking.mlflow_utils import resolve_tracking_uri

    return resolve_tracking_uri(uri)


def mlflow_run_of(ref) -> tuple[str, str] | None:
    """``(run id, artifact path or "")`` when the checkpoint reference ``ref`` names an MLflow run
    (``runs:/<run_id>[/artifact/path]``, or a 32-hex-digit run id that is not a local file or folder), else None."""
    ref = str(ref)
    if ref.startswith("runs:/"):
        run_id, _, artifact = ref[len("runs:/"):].strip("/").partition("/")
        return run_id, artifact
    if _RUN_ID.match(ref) and not Path(ref).exists():
        return ref, ""
    return None


def _download_from_mlflow(ref: str, tracking_uri: str | None = None) -> Path:
    """``<run_id>`` or ``runs:/<run_id>[/artifact/path]`` -> local path of the checkpoint artifact."""
    import mlflow

    from lattice_lab.tracking.mlflow_utils import check_existing_store

    run_id, artifact = mlflow_run_of(ref) or (ref, "")
    artifact = artifact or BEST_ARTIFACT
    uri = _tracking_uri(tracking_uri)  # read only: a store that is not there is named, not created empty (tracking may be off)
    check_existing_store(uri, f"checkpoint={ref!r} (an MLflow run id, looked up in {uri})")
    dst = tempfile.mkdtemp(prefix="lattice_lab_ckpt_")
    try:
        local = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=artifact, dst_path=dst, tracking_uri=uri)
    except Exception as exc:  # noqa: BLE001 - MLflow raises many types; report one clear line
        raise ConfigError(f"checkpoint={ref!r}: cannot download {artifact!r} of MLflow run {run_id!r} "
                          f"from {uri} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    return Path(local)


def resolve_checkpoint_path(path_or_run_id, tracking_uri: str | None = None) -> Path:
    """A checkpoint/export file, a folder with ``best.pt``, an MLflow run id or ``runs:/`` URI -> file
    (a run is looked up in the store ``tracking_uri``, by the rule of ``resolve_tracking_uri``)."""
    ref = str(path_or_run_id)
    if mlflow_run_of(ref):
        return _download_from_mlflow(ref, tracking_uri)
    path = Path(ref)
    if path.is_dir():
        best = path / "best.pt"
        if not best.is_file():
            raise ConfigError(f"checkpoint={ref!r}: folder has no best.pt")
        return best
    if path.is_file():
        return path
    raise ConfigError(f"checkpoint={ref!r}: file not found (expected a .pt file, a folder with best.pt, "
                      "an MLflow run id or runs:/<run_id>)")


def load_force_field(path_or_run_id, device="auto", dtype=None, tracking_uri: str | None = None) -> ForceField:
    """A ready-to-use force field in eval mode.

    Accepts a checkpoint ``.pt``, a folder containing ``best.pt``, a TorchScript export, an MLflow
    run id or a ``runs:/<run_id>[/path]`` URI (artifact ``checkpoints/best.pt`` by default; looked up
    in ``tracking_uri``, else ``MLFLOW_TRACKING_URI``, else ``sqlite:///runs/mlflow.db``). ``dtype=None``
    keeps the dtype the model was saved with.
    """
    path = resolve_checkpoint_path(path_or_run_id, tracking_uri)
    dev = resolve_device(device)
    if is_torchscript(path):
        model = load_exported(path, device=dev)
        saved = model.metadata.get("dtype", "float32")
    else:
        ckpt = load_checkpoint(path)
        model = model_from_checkpoint(ckpt, source=path)
        saved = ckpt.get("dtype", "float32")
    model.to(device=dev, dtype=resolve_dtype(dtype if dtype is not None else saved))
    return model.eval()
