"""Build an ED force dataset: random configurations and snapshots of ED-driven quench dynamics.

Two kinds of configurations (DESIGN.md section 5, "200 random + 400 snapshots from ED quench dynamics"):

* ``random`` (kind 0): Q_i ~ N(0, T_init / kappa) independently per site (the hot-start distribution);
* ``quench`` (kind 1): R replicas start from the hot start (Q, v) and evolve under Langevin dynamics
  with exact forces in a bath at T (velocity Verlet + OU, :mod:`lattice_lab.dynamics.langevin`);
  after ``burn_in`` steps every replica is snapshotted each ``snapshot_every`` steps.

For every configuration the exact total force F and density <n> are stored (float64). Configuration
``i`` (random ones first, then quench snapshots in time order, replicas in order) is a validation
configuration when ``i % 3 == 2``.

Resumable and atomic: progress is saved to ``<path>.partial.pt`` every ``checkpoint_every``
configurations (finished arrays, the integrator state and the noise generator state), so rerunning
the same build after an interruption continues and produces the same file as an uninterrupted build
(same datasets bit for bit; same attributes, ``created`` included). The final file appears only when
complete (written to a temporary file, then renamed).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from lattice_lab.common.errors import ConfigError
from lattice_lab.common.interrupts import interrupts_as
from lattice_lab.common.io import atomic_torch_save, load_torch_file
from lattice_lab.common.progress import progress, set_status, start_phase
from lattice_lab.common.seeding import SEED_MAX, check_seed
from lattice_lab.common.switch import check_flag
from lattice_lab.data.h5io import write_force_dataset
from lattice_lab.dynamics.initial import random_hot_start
from lattice_lab.dynamics.langevin import LangevinIntegrator, LangevinParams, LangevinState
from lattice_lab.physics.ed import ExactForces, working_bytes
from lattice_lab.physics.holstein import HolsteinParams

log = logging.getLogger(__name__)

DEFAULT_CUTOFF = math.sqrt(13.0)
TOP_KEYS = {"hamiltonian", "dataset", "seed", "device", "overwrite"}
INT_KEYS = {"L": 2, "n_random": 0, "n_quench": 0, "replicas": 1, "burn_in": 0, "snapshot_every": 1,
            "ed_batch": 1, "checkpoint_every": 1}
FLOAT_KEYS = {"temperature", "init_temperature", "mass", "gamma", "dt", "min_cutoff"}
STR_KEYS = {"name", "path"}
OPTIONAL_DEFAULTS = {"ed_batch": 8, "checkpoint_every": 16, "min_cutoff": DEFAULT_CUTOFF}
PARTIAL_VERSION = 1


def snapshot_step(j: int, replicas: int, burn_in: int, snapshot_every: int) -> int:
    """The Langevin step at which quench snapshot ``j`` (0-based, in file order: time order, replicas in
    order) is taken: every replica once after ``burn_in`` steps, then again every ``snapshot_every``."""
    return burn_in + (j // replicas) * snapshot_every


def quench_times(data) -> np.ndarray | None:
    """Time after the quench, ``t = step * dt``, of each configuration of a dataset as ``generate`` wrote it
    (NaN for random configurations), from the build settings stored in the file; None when the file does not
    say (no stored config, or not the whole file in its order: random configurations first, then
    ``n_quench`` snapshots)."""
    from omegaconf import OmegaConf

    try:
        ds = OmegaConf.to_container(OmegaConf.create(str(data.attrs.get("config") or "{}")))["dataset"]
        n_rand, n_quench = int(ds["n_random"]), int(ds["n_quench"])
        R, burn_in, every, dt = int(ds["replicas"]), int(ds["burn_in"]), int(ds["snapshot_every"]), float(ds["dt"])
    except Exception:  # not written by generate: no schedule to read
        return None
    expected = np.r_[np.zeros(n_rand, np.uint8), np.ones(n_quench, np.uint8)]
    if R < 1 or not np.array_equal(np.asarray(data.kind), expected):
        return None
    steps = np.array([snapshot_step(j, R, burn_in, every) for j in range(n_quench)], dtype=np.float64)
    return np.r_[np.full(n_rand, np.nan), steps * dt]


def _container(cfg) -> dict:
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    return dict(cfg)


def validate_generate_config(cfg) -> tuple[dict, HolsteinParams]:
    """Check the whole generate config up front; return (dataset settings, Hamiltonian).

    Raises :class:`ConfigError` naming the first bad key and value.
    """
    c = _container(cfg)
    unknown = sorted(set(c) - TOP_KEYS - {"hydra"})
    if unknown:
        raise ConfigError(f"{unknown[0]}={c[unknown[0]]!r}: unknown key (allowed: {sorted(TOP_KEYS)})")
    ds = c.get("dataset")
    if not isinstance(ds, dict):
        raise ConfigError(f"dataset={ds!r}: choose a dataset preset, e.g. dataset=holstein_L16")
    allowed = set(INT_KEYS) | FLOAT_KEYS | STR_KEYS
    unknown = sorted(set(ds) - allowed)
    if unknown:
        raise ConfigError(f"dataset.{unknown[0]}={ds[unknown[0]]!r}: unknown key (allowed: {sorted(allowed)})")
    ds = {**OPTIONAL_DEFAULTS, **ds}
    missing = sorted(allowed - set(ds))
    if missing:
        raise ConfigError(f"dataset.{missing[0]}: missing (the dataset preset must set it)")
    for key, minimum in INT_KEYS.items():
        v = ds[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise ConfigError(f"dataset.{key}={v!r}: expected an integer >= {minimum}")
    for key in FLOAT_KEYS:
        v = ds[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ConfigError(f"dataset.{key}={v!r}: expected a finite number")
        ds[key] = float(v)
    for key in STR_KEYS:
        if not isinstance(ds[key], str) or not ds[key]:
            raise ConfigError(f"dataset.{key}={ds[key]!r}: expected a non-empty string")
    if ds["temperature"] < 0:
        raise ConfigError(f"dataset.temperature={ds['temperature']}: must be >= 0")
    if ds["init_temperature"] < 0:
        raise ConfigError(f"dataset.init_temperature={ds['init_temperature']}: must be >= 0")
    L = ds["L"]
    if (L * L) % 2:
        raise ConfigError(f"dataset.L={L}: half filling needs an even number of sites L*L = {L * L} (use even L)")
    if L < 2 * ds["min_cutoff"]:
        raise ConfigError(f"dataset.L={L}: must be >= 2 * min_cutoff = {2 * ds['min_cutoff']:.2f} "
                          "so every environment fits on the lattice")
    if ds["n_random"] + ds["n_quench"] < 1:
        raise ConfigError("dataset.n_random=0, dataset.n_quench=0: the dataset would be empty")
    LangevinParams.checked({k: ds[k] for k in ("mass", "gamma", "dt", "temperature")}, "dataset")
    check_seed(c.get("seed", 0), largest=SEED_MAX - 1)  # the quench draws from seed + 1
    check_flag(c.get("overwrite", False), "overwrite")
    params = HolsteinParams.from_config(c.get("hamiltonian") or {}, temperature=ds["temperature"])
    if params.kappa == 0 and ds["n_random"] > 0:
        log.warning("kappa = 0: random configurations use variance init_temperature / k")
    return ds, params


def _abs_path(path: str) -> Path:
    try:
        from hydra.utils import to_absolute_path

        return Path(to_absolute_path(path))
    except Exception:  # noqa: BLE001 - outside a Hydra app
        return Path(path).absolute()


def partial_path(path: str | os.PathLike) -> Path:
    """Where an unfinished build keeps its progress."""
    path = Path(path)
    return path.with_name(path.name + ".partial.pt")


def _fingerprint(ds: dict, params: HolsteinParams, seed: int, device: torch.device) -> dict:
    """Everything that determines the numbers in the file (a resumed build must match it)."""
    keep = {k: v for k, v in ds.items() if k not in ("path", "checkpoint_every", "name", "min_cutoff")}
    return {"dataset": keep, "hamiltonian": params.as_dict(), "seed": int(seed), "device": device.type,
            "version": PARTIAL_VERSION}


class _CachingED:
    """ED force provider for the integrator that remembers the last result (density for snapshots)."""

    def __init__(self, ed: ExactForces):
        self.ed = ed
        self.last_Q: torch.Tensor | None = None
        self.last = None

    def __call__(self, Q: torch.Tensor) -> torch.Tensor:
        res = self.ed.compute(Q)
        self.last_Q, self.last = Q.clone(), res
        return res.forces

    def result_for(self, Q: torch.Tensor):
        if self.last_Q is None or not torch.equal(self.last_Q, Q):
            self.last_Q, self.last = Q.clone(), self.ed.compute(Q)
        return self.last


def _check_memory(ds: dict, device: torch.device) -> None:
    """Refuse a build that cannot fit before anything is written: the configurations it keeps until the file
    is written (Q, F, n in float64, plus the random hot starts) on the CPU, and one ED call's matrices
    (``ed_batch`` random configurations or ``replicas`` quench replicas at once) on ``device``."""
    from lattice_lab.common.memory import require_memory

    L, N = ds["L"], ds["L"] ** 2
    size = {"dataset.L": L}
    counts = {**size, "dataset.n_random": ds["n_random"], "dataset.n_quench": ds["n_quench"]}
    kept = 8 * N * (3 * (ds["n_random"] + ds["n_quench"]) + ds["n_random"])
    kept_what = "the configurations kept until the file is written"
    work = working_bytes(max(ds["ed_batch"], ds["replicas"]), L)  # generate's ExactForces: default chunks
    if device.type == "cpu":  # one memory
        require_memory(kept + work, device, counts, f"{kept_what} and one ED call's matrices")
    else:
        require_memory(kept, "cpu", counts, kept_what)
        require_memory(work, device, size, "one ED call's matrices")


def build_dataset(cfg) -> Path:
    """Generate (or resume) the dataset described by a composed ``generate`` config; return its path."""
    from omegaconf import OmegaConf

    from lattice_lab.common.device import resolve_device

    ds, params = validate_generate_config(cfg)
    c = _container(cfg)
    seed = int(c.get("seed", 0))
    overwrite = bool(c.get("overwrite", False))
    device = resolve_device(c.get("device", "auto"))
    path = _abs_path(ds["path"])
    for out in (path, partial_path(path)):  # overwrite replaces a file, never a folder
        if out.is_dir():
            raise ConfigError(f"dataset.path={str(path)!r}: {str(out)!r} is a directory (expected the path of "
                              f"the .h5 file to write, e.g. {str(path / (ds['name'] + '.h5'))!r})")
    if path.exists() and not overwrite:
        raise ConfigError(f"dataset.path={str(path)!r}: file exists (pass overwrite=true to rebuild it)")
    _check_memory(ds, device)
    try:  # before any ED work: an unwritable folder is found in a second, not after the first batch
        path.parent.mkdir(parents=True, exist_ok=True)
        probe = path.parent / f".{path.name}.write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"dataset.path={str(path)!r}: cannot write to {str(path.parent)!r} "
                          f"({exc.strerror or exc})") from None
    config_yaml = OmegaConf.to_yaml(OmegaConf.create(c), resolve=True)
    fp = _fingerprint(ds, params, seed, device)
    ppath = partial_path(path)

    L, n_rand, n_quench, R = ds["L"], ds["n_random"], ds["n_quench"], ds["replicas"]
    total = n_rand + n_quench
    saved: dict = {"Q": [], "F": [], "n": [], "kind": [], "quench": None,
                   "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    if ppath.exists():
        try:
            part = load_torch_file(ppath, "unfinished build")
        except ConfigError as exc:
            if not overwrite:
                raise ConfigError(f"{exc}; pass overwrite=true to start the build over") from None
            part = {}
        part = part if isinstance(part, dict) else {}
        if part.get("fingerprint") != fp:
            if not overwrite:
                raise ConfigError(
                    f"dataset.path={str(path)!r}: an unfinished build with different settings is at "
                    f"{ppath} (rerun with the same settings to resume, or overwrite=true to start over)")
            log.warning("discarding %s (different settings, overwrite=true)", ppath)
        else:
            saved = part
            log.info("resuming %s: %d of %d configurations done", path.name, len(saved["kind"]), total)

    def n_done() -> int:
        return len(saved["kind"])

    def save_partial() -> None:
        atomic_torch_save({**saved, "fingerprint": fp}, ppath)

    ed = ExactForces(params, device=device)
    # one bar per phase (random, then the far slower quench: snapshot_every ED solves per config), each its own ETA
    bar = progress(total=n_rand, desc=f"ED {ds['name']} (L={L}) random", unit="config", initial=min(n_done(), n_rand))
    def interrupted() -> str:
        kept = (f"{ppath} holds the configurations saved so far (every dataset.checkpoint_every="
                f"{ds['checkpoint_every']})" if ppath.exists() else "nothing was saved yet")
        return f"{kept}; the same command resumes the build"

    with contextlib.closing(bar), interrupts_as(interrupted):
        # -- random configurations ------------------------------------------------------------
        if n_done() < n_rand:
            gen = torch.Generator().manual_seed(seed)
            Q_all, _ = random_hot_start(n_rand, L, params, ds["mass"], ds["init_temperature"], gen,
                                        dtype=torch.float64, device="cpu")
            step = ds["ed_batch"]
            last_save = n_done()
            set_status(bar, f"then {n_quench} quench configs, {ds['snapshot_every']} ED solves each" if n_quench else "")
            for start in range(n_done(), n_rand, step):  # chunks stay aligned to multiples of ed_batch
                Q = Q_all[start:start + step]
                res = ed.compute(Q.to(device))
                saved["Q"].append(Q.clone())
                saved["F"].append(res.forces.cpu())
                saved["n"].append(res.density.cpu())
                saved["kind"].extend([0] * Q.shape[0])
                bar.update(Q.shape[0])
                if n_done() - last_save >= ds["checkpoint_every"] and n_done() < total:
                    save_partial()
                    last_save = n_done()
            if n_quench:
                save_partial()
        # -- quench snapshots -----------------------------------------------------------------
        if n_done() < total:
            start_phase(bar, f"ED {ds['name']} (L={L}) quench", n_quench, done=n_done() - n_rand)
            provider = _CachingED(ed)
            lp = LangevinParams(mass=ds["mass"], gamma=ds["gamma"], dt=ds["dt"], temperature=ds["temperature"])
            gen = torch.Generator(device=device).manual_seed(seed + 1)
            integ = LangevinIntegrator(provider, lp, generator=gen)
            if saved["quench"] is None:
                Q0, V0 = random_hot_start(R, L, params, ds["mass"], ds["init_temperature"], gen,
                                          dtype=torch.float64, device=device)
                state = integ.init_state(Q0, V0)
            else:
                state = LangevinState.from_dict(saved["quench"]["state"], device=device, dtype=torch.float64)
                integ.set_rng_state(saved["quench"]["rng"])
            noise = integ.noise_source(state)  # the native step's Philox noise, or torch's generator
            if saved["quench"] is not None and saved["quench"].get("noise", noise) != noise:
                raise ConfigError(
                    f"dataset.path={str(path)!r}: the unfinished build at {ppath} drew its quench noise from the "
                    f"{saved['quench']['noise']} generator, this machine would use {noise} (a C++ compiler "
                    "decides: the native step uses Philox); finish it where it started, or delete it to start over")
            last_save = n_done()
            final_step = snapshot_step(n_quench - 1, R, ds["burn_in"], ds["snapshot_every"])
            while n_done() < total:
                target = snapshot_step(n_done() - n_rand, R, ds["burn_in"], ds["snapshot_every"])
                last_shown = 0.0
                while state.step < target:  # step by step so the bar shows where the quench is
                    integ.step(state)
                    if time.monotonic() - last_shown > 1.0:
                        set_status(bar, f"quench step {state.step}/{final_step}")
                        last_shown = time.monotonic()
                res = provider.result_for(state.Q)
                take = min(R, total - n_done())
                saved["Q"].append(state.Q[:take].cpu().clone())
                saved["F"].append(res.forces[:take].cpu())
                saved["n"].append(res.density[:take].cpu())
                saved["kind"].extend([1] * take)
                bar.update(take)
                saved["quench"] = {"state": state.to_dict(), "rng": integ.rng_state(), "noise": noise}
                if n_done() - last_save >= ds["checkpoint_every"] and n_done() < total:
                    save_partial()
                    last_save = n_done()

    Q = torch.cat(saved["Q"]).numpy()
    data = {"Q": Q, "F": torch.cat(saved["F"]).numpy(), "n": torch.cat(saved["n"]).numpy(),
            "kind": np.asarray(saved["kind"], dtype=np.uint8), "is_val": np.arange(total) % 3 == 2}
    attrs = {**params.as_dict(), "L": L, "seed": seed, "name": ds["name"], "created": saved["created"],
             "config": config_yaml, "n_random": n_rand, "n_quench": n_quench}
    if saved["quench"] is not None:  # same seed and settings give the same file only with the same noise source
        attrs["quench_noise"] = saved["quench"].get("noise", "unknown")
    write_force_dataset(path, data, attrs)
    with contextlib.suppress(FileNotFoundError):
        ppath.unlink()
    log.info("wrote %s (%d configurations)", path, total)
    return path
