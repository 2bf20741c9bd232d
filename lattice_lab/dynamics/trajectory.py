"""Trajectory files of Langevin runs: HDF5 writer (atomic, resumable) and a lazy reader.

Format (docs/ARCHITECTURE.md): datasets ``Q`` and ``n`` float32 ``[S, R, L, L]`` (the lattice
distortions and electron densities of R replicas at S saved frames; chunked one frame per chunk,
compressed after a byte shuffle), ``step`` int64 ``[S]`` and ``time`` float64 ``[S]`` (= step * dt); file attributes
``L, R, dt, mass, gamma, temperature, init_temperature, force_source, model_path, model_run_id,
force_compiled, cuda_graph, seed, version, config`` and the Hamiltonian parameters.

While a run is in progress the file lives at ``<path>.partial``; :meth:`TrajectoryWriter.finalize`
renames it to ``<path>`` atomically, so a ``trajectory.h5`` is always a finished run. A resumed run
reopens the partial file and truncates it to the number of frames recorded in its checkpoint,
so frames written after the checkpoint are rewritten identically.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import h5py
import numpy as np
import torch

from lattice_lab.common.errors import ConfigError

log = logging.getLogger(__name__)

TRAJECTORY_VERSION = 1
_COMPRESSIONS = ("gzip", "lzf", "none")


def partial_path(path: str | os.PathLike) -> Path:
    """Where an unfinished trajectory for ``path`` is written."""
    path = Path(path)
    return path.with_name(path.name + ".partial")


RESTART_ADVICE = "overwrite=true (instead of resume=true) starts the run again"
_DATASETS = ("Q", "n", "step", "time")


def _resumable_file(path, n_frames: int, label: str, restart: str, *, extend: bool = True) -> Path:
    """The file a resume continues: ``<path>.partial``, else (``extend``) the finished ``path`` of a run
    extended on resume. ConfigError where there is none: the frames up to the checkpoint are gone."""
    part, path = partial_path(path), Path(path)
    if part.exists():
        return part
    if extend and path.exists():
        return path
    raise ConfigError(f"{label}: the unfinished trajectory {part} is missing, so the checkpoint's {n_frames} "
                      f"frames are lost; {restart}")


def _open_resumable(path: Path, mode: str, n_frames: int, label: str, restart: str) -> h5py.File:
    """Open the trajectory ``path`` a resume continues and check that every dataset is there and holds at
    least ``n_frames`` frames; ConfigError naming ``path`` otherwise (the file closed again)."""
    what = "unfinished trajectory" if path.name.endswith(".partial") else "trajectory"
    try:  # a kill or a full disk while HDF5 was writing can leave it cut short
        f = h5py.File(path, mode)
    except OSError as exc:
        raise ConfigError(f"{label}: the {what} {path} cannot be read ({str(exc).splitlines()[0]}); "
                          f"{restart}") from None
    missing = [key for key in _DATASETS if key not in f]
    counts = {key: int(f[key].shape[0]) for key in _DATASETS if key in f}
    if missing or min(counts.values()) < n_frames:
        f.close()
        if missing:
            raise ConfigError(f"{label}: the {what} {path} cannot be read (no {missing[0]!r} dataset); {restart}")
        have = counts["step"] if len(set(counts.values())) == 1 else counts
        raise ConfigError(f"{label}: {path} holds {have} frames but the checkpoint expects {n_frames}; the "
                          f"trajectory and checkpoint do not belong together; {restart}")
    return f


def _attr_value(value):
    """HDF5 attributes cannot hold None or nested containers: map them to strings."""
    if value is None:
        return ""
    if isinstance(value, (bool, int, float, str, np.integer, np.floating, np.bool_)):
        return value
    return str(value)


def _decode(value):
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _as_frame(x, R: int, L: int, key: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float32).numpy()
    x = np.asarray(x, dtype=np.float32)
    if x.shape != (R, L, L):
        raise ValueError(f"trajectory frame {key}: expected shape {(R, L, L)}, got {x.shape}")
    return x


class TrajectoryWriter:
    """Append frames (Q, n) of R replicas on an L x L lattice to ``<path>.partial``.

    ``compression`` is ``"gzip"`` (level ``compression_opts``), ``"lzf"`` or ``"none"``.
    Use :meth:`reopen` to continue a run from a checkpoint and :meth:`finalize` at the end.
    """

    def __init__(self, path: str | os.PathLike, L: int, R: int, attrs: dict | None = None, *,
                 compression: str = "gzip", compression_opts: int = 4, _file: h5py.File | None = None):
        self.path = Path(path)
        self.partial = partial_path(self.path)
        self.L, self.R = int(L), int(R)
        if _file is not None:  # reopened by :meth:`reopen`
            self._f = _file
            return
        if compression not in _COMPRESSIONS:
            raise ConfigError(f"trajectory compression={compression!r}: expected one of {_COMPRESSIONS}")
        self.partial.parent.mkdir(parents=True, exist_ok=True)
        self._f = h5py.File(self.partial, "w")
        kw = {}
        # the byte shuffle puts the 4 bytes of each float32 into 4 planes: the sign / exponent planes of noisy
        # distortions and densities compress well, the noisy low mantissa bytes do not. At 200 x 200 x 30 it
        # shrinks a gzip frame from 0.89 to 0.77 of the raw 9.6 MB and halves the time to write it (docs/simulate.md)
        if compression == "gzip":
            kw = {"compression": "gzip", "compression_opts": int(compression_opts), "shuffle": True}
        elif compression == "lzf":
            kw = {"compression": "lzf", "shuffle": True}
        frame = (self.R, self.L, self.L)
        for key in ("Q", "n"):
            self._f.create_dataset(key, shape=(0, *frame), maxshape=(None, *frame), dtype="float32",
                                   chunks=(1, *frame), **kw)
        self._f.create_dataset("step", shape=(0,), maxshape=(None,), dtype="int64", chunks=(1024,))
        self._f.create_dataset("time", shape=(0,), maxshape=(None,), dtype="float64", chunks=(1024,))
        all_attrs = {"version": TRAJECTORY_VERSION, **(attrs or {}), "L": self.L, "R": self.R}
        for key, value in all_attrs.items():
            self._f.attrs[key] = _attr_value(value)
        self._f.flush()

    @classmethod
    def reopen(cls, path: str | os.PathLike, n_frames: int, label: str = "resume=true",
               restart: str = RESTART_ADVICE) -> TrajectoryWriter:
        """Reopen the partial file of ``path`` and truncate it to its first ``n_frames`` frames
        (refused as :meth:`check_reopen` refuses; ``label`` and ``restart`` as there)."""
        part = _resumable_file(path, n_frames, label, restart, extend=False)
        f = _open_resumable(part, "r+", n_frames, label, restart)
        for key in _DATASETS:
            f[key].resize(n_frames, axis=0)
        f.flush()
        L, R = int(f.attrs["L"]), int(f.attrs["R"])
        return cls(path, L, R, _file=f)

    @staticmethod
    def check_reopen(path: str | os.PathLike, n_frames: int, label: str = "resume=true",
                     restart: str = RESTART_ADVICE) -> Path:
        """What :meth:`reopen` checks, changing nothing (read-only), so that a refused resume writes no file:
        the trajectory a resume continues (``<path>.partial``, or ``path`` itself where a finished run is
        extended) exists, can be read and holds at least ``n_frames`` frames in every dataset. Returns that
        file; otherwise a ConfigError prefixed with ``label`` (the setting that asked for the resume) and
        ending with ``restart`` (how to start the run again instead)."""
        found = _resumable_file(path, n_frames, label, restart)
        _open_resumable(found, "r", n_frames, label, restart).close()
        return found

    @property
    def n_frames(self) -> int:
        return int(self._f["step"].shape[0])

    def append(self, step: int, time: float, Q, n) -> int:
        """Write one frame; returns the new number of frames."""
        Qf = _as_frame(Q, self.R, self.L, "Q")
        nf = _as_frame(n, self.R, self.L, "n")
        i = self.n_frames
        for key, val in (("Q", Qf), ("n", nf), ("step", step), ("time", time)):
            self._f[key].resize(i + 1, axis=0)
            self._f[key][i] = val
        return i + 1

    def set_attrs(self, **attrs) -> None:
        for key, value in attrs.items():
            self._f.attrs[key] = _attr_value(value)

    def flush(self) -> None:
        """Make every frame written so far durable (called before each checkpoint)."""
        self._f.flush()

    def close(self) -> None:
        """Close, leaving the partial file in place (an unfinished run)."""
        if self._f.id.valid:
            self._f.close()

    def finalize(self) -> Path:
        """Close and rename ``<path>.partial`` to ``<path>`` atomically; returns ``path``."""
        self._f.flush()
        self.close()
        os.replace(self.partial, self.path)
        return self.path

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Trajectory:
    """Lazy view of a trajectory file: ``Q`` and ``n`` are h5py datasets read frame by frame.

    ``traj.Q[i]`` is frame i as a float32 numpy array ``[R, L, L]``; ``step`` and ``time`` are
    loaded (small). Use as a context manager or call :meth:`close`.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            part = partial_path(path)
            hint = (f" (the run is unfinished: give trajectory={part} to read its frames so far)"
                    if part.exists() else "")
            raise ConfigError(f"trajectory={self.path}: no such file{hint}")
        self._f = _open_for_reading(self.path)
        missing = [k for k in ("Q", "n", "step", "time") if k not in self._f]
        if missing:
            self._f.close()
            raise ConfigError(f"trajectory={self.path}: not a trajectory file (missing {missing})")
        self.Q = self._f["Q"]
        self.n = self._f["n"]
        self.step = self._f["step"][...]
        self.time = self._f["time"][...]
        counts = {"Q": self.Q.shape[0], "n": self.n.shape[0], "step": len(self.step), "time": len(self.time)}
        if len(set(counts.values())) > 1:
            self._f.close()
            held = ", ".join(f"{key}: {count}" for key, count in counts.items())
            if self.path.name.endswith(".partial"):  # a writer's metadata caught between two flushes
                raise ConfigError(f"trajectory={self.path}: its datasets hold different numbers of frames ({held}): "
                                  "a simulation is writing it right now; try again in a moment")
            raise ConfigError(f"trajectory={self.path}: its datasets hold different numbers of frames ({held}): a "
                              "finished trajectory has one count, so this file is inconsistent (damaged or edited)")
        self.attrs = {k: _decode(v) for k, v in self._f.attrs.items()}
        self.L = int(self.attrs["L"])
        self.R = int(self.attrs["R"])

    def __len__(self) -> int:
        return int(self.step.shape[0])

    @property
    def n_frames(self) -> int:
        return len(self)

    def frame(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(Q, n) of frame ``i``, each float32 ``[R, L, L]``."""
        return self.Q[i], self.n[i]

    def index_of_step(self, step: int) -> int:
        """Frame index of MD step ``step``; ConfigError if that step was not saved."""
        hits = np.nonzero(self.step == int(step))[0]
        if hits.size == 0:
            saved = f"{int(self.step[0])}..{int(self.step[-1])}" if len(self) else "none"
            raise ConfigError(f"step={step}: not a saved frame of {self.path} (saved steps {saved})")
        return int(hits[0])

    def __iter__(self):
        for i in range(len(self)):
            yield int(self.step[i]), self.Q[i], self.n[i]

    def close(self) -> None:
        if self._f.id.valid:
            self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _open_for_reading(path: Path) -> h5py.File:
    """Open read-only. A file a running simulation is writing (its ``.partial``) is locked by HDF5: it is then
    read without the lock, with a warning: a best-effort look at the frames of the writer's last flush (every
    checkpoint); HDF5 promises no consistent view while another process writes."""
    try:
        return h5py.File(path, "r")
    except BlockingIOError:
        pass
    f = h5py.File(path, "r", locking=False)
    log.warning(
        "%s is being written by a running simulation: reading the %d frames of its last checkpoint "
        "(checkpoint_every_s) without HDF5's lock, a best-effort look (an error or a frame in the making are "
        "possible); analyse the run for results when it has finished", path, f["step"].shape[0] if "step" in f else 0)
    return f


def read_trajectory(path: str | os.PathLike) -> Trajectory:
    """Open a trajectory file lazily (frames are read on demand)."""
    return Trajectory(path)
