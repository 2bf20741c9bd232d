"""HDF5 force datasets: exact (ED) forces and densities for a set of lattice configurations.

File layout (docs/ARCHITECTURE.md, ``data/``):

* datasets ``Q``, ``F``, ``n``: float64 ``[C, L, L]`` (distortions, total forces, densities),
  ``kind``: uint8 ``[C]`` (0 = random, 1 = quench; attribute ``kind_names``), ``is_val``: bool ``[C]``;
* file attributes ``t, g, k, kappa, temperature, filling`` (the Hamiltonian the forces belong to),
  ``L, seed, version, name, created`` and ``config`` (the resolved YAML that produced the file).
"""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from lattice_lab.common.errors import ConfigError
from lattice_lab.common.io import atomic_path

KIND_NAMES = ("random", "quench")
ARRAYS = ("Q", "F", "n", "kind", "is_val")
HAMILTONIAN_ATTRS = ("t", "g", "k", "kappa", "temperature", "filling")
REQUIRED_ATTRS = HAMILTONIAN_ATTRS + ("L", "seed", "version", "name", "created", "config")


def _plain(value):
    """HDF5 attribute value -> plain Python (bytes -> str, numpy scalars -> int/float)."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()] if value.dtype.kind in "OSU" else value.tolist()
    return value


@dataclass
class ForceData:
    """A force dataset in memory (numpy arrays; ``Q, F, n`` float64 ``[C, L, L]``)."""

    Q: np.ndarray
    F: np.ndarray
    n: np.ndarray
    kind: np.ndarray
    is_val: np.ndarray
    attrs: dict = field(default_factory=dict)

    def __post_init__(self):
        self.Q = np.asarray(self.Q, dtype=np.float64)
        self.F = np.asarray(self.F, dtype=np.float64)
        self.n = np.asarray(self.n, dtype=np.float64)
        self.kind = np.asarray(self.kind, dtype=np.uint8)
        self.is_val = np.asarray(self.is_val, dtype=bool)
        C = self.Q.shape[0] if self.Q.ndim == 3 else -1
        if self.Q.ndim != 3 or self.Q.shape[1] != self.Q.shape[2]:
            raise ConfigError(f"force dataset: Q must be [C, L, L], got shape {self.Q.shape}")
        for name in ("F", "n"):
            if getattr(self, name).shape != self.Q.shape:
                raise ConfigError(f"force dataset: {name} has shape {getattr(self, name).shape}, "
                                  f"expected {self.Q.shape} like Q")
        for name in ("kind", "is_val"):
            if getattr(self, name).shape != (C,):
                raise ConfigError(f"force dataset: {name} has shape {getattr(self, name).shape}, expected ({C},)")

    def __len__(self) -> int:
        return int(self.Q.shape[0])

    @property
    def L(self) -> int:
        return int(self.Q.shape[-1])

    @property
    def name(self) -> str:
        """The dataset's own name: attribute ``name`` (generate writes its preset's), else the file's stem."""
        return str(self.attrs.get("name") or Path(str(self.attrs.get("path", ""))).stem)

    def build_settings(self) -> dict:
        """The ``dataset`` section of the config the file was generated from (attribute ``config``, which
        generate writes); empty for a file that stores none."""
        from omegaconf import OmegaConf

        try:
            config = OmegaConf.to_container(OmegaConf.create(str(self.attrs.get("config") or "{}")))
        except Exception:  # noqa: BLE001 - not YAML, or not a mapping: the file says nothing usable
            return {}
        section = config.get("dataset") if isinstance(config, dict) else None
        return dict(section) if isinstance(section, dict) else {}

    def subset(self, mask_or_index) -> ForceData:
        idx = np.asarray(mask_or_index)
        return replace(self, Q=self.Q[idx], F=self.F[idx], n=self.n[idx], kind=self.kind[idx],
                       is_val=self.is_val[idx], attrs=dict(self.attrs))

    def indices(self, name: str) -> np.ndarray:
        """Positions of the configurations of split ``name``, in file order: ``"train"`` (is_val false),
        ``"val"`` (is_val true), ``"all"``, or a kind (``"random"``, ``"quench"``)."""
        if name == "train":
            return np.flatnonzero(~self.is_val)
        if name == "val":
            return np.flatnonzero(self.is_val)
        if name == "all":
            return np.arange(len(self))
        if name in KIND_NAMES:
            return np.flatnonzero(self.kind == KIND_NAMES.index(name))
        raise ConfigError(f"split={name!r}: expected 'train', 'val', 'all', 'random' or 'quench'")

    def split(self, name: str) -> ForceData:
        """The configurations of split ``name`` (see :meth:`indices`)."""
        return self.subset(self.indices(name))

    def hamiltonian(self):
        """The :class:`~lattice_lab.physics.holstein.HolsteinParams` the forces were computed for."""
        from lattice_lab.physics.holstein import HolsteinParams

        missing = [k for k in HAMILTONIAN_ATTRS if k not in self.attrs]
        if missing:
            raise ConfigError(f"force dataset attrs lack {missing} (needed for the Hamiltonian)")
        values = {}
        for key in HAMILTONIAN_ATTRS[:-1]:
            try:
                values[key] = float(self.attrs[key])
            except (TypeError, ValueError):
                raise ConfigError(f"dataset path={self.attrs.get('path', '?')!r}: attribute {key}={self.attrs[key]!r} "
                                  "is not a number (the file is damaged or was not written by generate)") from None
        return HolsteinParams(**values, filling=str(self.attrs["filling"]))


def read_force_dataset(path: str | os.PathLike) -> ForceData:
    """Load a whole force dataset; ConfigError for a missing file or missing datasets/attributes."""
    import h5py

    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"dataset path={str(path)!r}: is a folder, not a dataset file")
    if not path.is_file():
        raise ConfigError(f"dataset path={str(path)!r}: file not found "
                          "(build it with `python -m lattice_lab.generate dataset=...`)")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise ConfigError(f"dataset path={str(path)!r}: not a readable HDF5 file ({exc})") from None
    with f:
        missing = [k for k in ARRAYS if k not in f]
        if missing:
            raise ConfigError(f"dataset path={str(path)!r}: missing datasets {missing}")
        missing = [k for k in REQUIRED_ATTRS if k not in f.attrs]
        if missing:
            raise ConfigError(f"dataset path={str(path)!r}: missing attributes {missing}")
        arrays = {k: f[k][()] for k in ARRAYS}
        attrs = {k: _plain(v) for k, v in f.attrs.items()}
        attrs["kind_names"] = [_plain(v) for v in f["kind"].attrs.get("kind_names", KIND_NAMES)]
    attrs["path"] = str(path)
    data = ForceData(attrs=attrs, **arrays)
    for name in ("Q", "F", "n"):  # one NaN force would be reported by training as a diverging learning rate
        bad = np.flatnonzero(~np.isfinite(getattr(data, name)).all(axis=(1, 2)))
        if bad.size:
            raise ConfigError(f"dataset path={str(path)!r}: {name} holds NaN or inf in {bad.size} configuration(s) "
                              f"(first: index {int(bad[0])}); the file is damaged or was not written by generate")
    if data.L != int(attrs["L"]):
        raise ConfigError(f"dataset path={str(path)!r}: attribute L={attrs['L']} but Q is {data.Q.shape}")
    return data


def write_force_dataset(path: str | os.PathLike, data: ForceData | Mapping, attrs: Mapping | None = None) -> Path:
    """Write ``data`` (a :class:`ForceData` or a mapping with Q, F, n, kind, is_val[, attrs]) atomically.

    File attributes = ``data.attrs`` updated with ``attrs``. The Hamiltonian attributes
    (t, g, k, kappa, temperature, filling) are required; ``L`` is taken from Q, and ``version``
    (package version), ``created`` (UTC now), ``name`` (file stem), ``seed`` (-1) and ``config``
    ("") get defaults when absent.
    """
    import h5py

    import lattice_lab

    if not isinstance(data, ForceData):
        data = dict(data)
        base_attrs = dict(data.pop("attrs", {}) or {})
        if "is_val" not in data and "Q" in data:
            data["is_val"] = np.arange(len(data["Q"])) % 3 == 2
        data = ForceData(attrs=base_attrs, **data)
    all_attrs = dict(data.attrs)
    all_attrs.update(attrs or {})
    all_attrs.pop("path", None)
    all_attrs.pop("kind_names", None)
    missing = [k for k in HAMILTONIAN_ATTRS if k not in all_attrs]
    if missing:
        raise ConfigError(f"write_force_dataset: attrs lack the Hamiltonian parameters {missing}")
    path = Path(path)
    all_attrs["L"] = data.L
    all_attrs.setdefault("version", lattice_lab.__version__)
    all_attrs.setdefault("created", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    all_attrs.setdefault("name", path.stem)
    all_attrs.setdefault("seed", -1)
    all_attrs.setdefault("config", "")
    with atomic_path(path, suffix=".h5.tmp") as tmp:
        with h5py.File(tmp, "w", track_order=True) as f:
            chunk = (1, data.L, data.L) if len(data) else None
            for name in ("Q", "F", "n"):
                f.create_dataset(name, data=getattr(data, name), chunks=chunk, track_times=False)
            kd = f.create_dataset("kind", data=data.kind, track_times=False)
            kd.attrs["kind_names"] = list(KIND_NAMES)
            f.create_dataset("is_val", data=data.is_val, track_times=False)
            for key, value in all_attrs.items():
                if value is None:
                    value = ""
                f.attrs[key] = value
    return path
