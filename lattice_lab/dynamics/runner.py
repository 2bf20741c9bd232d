"""The simulation loop: a Langevin quench of R replicas with ED or ML forces, saved as a trajectory.

Physics: R independent L x L Holstein lattices start from a random hot state (Q_i ~ N(0,
T_init/kappa), V_i ~ N(0, T_init/m)) and evolve under Langevin dynamics in a bath at temperature
T (DESIGN.md section 3); the electrons are at the same temperature T (section 2). Every
``save_every`` steps, and at the run's last step (``dynamics.steps``: the final state is always saved), the
distortions Q and the electron densities n of all replicas are appended to ``trajectory.h5``
(:class:`~lattice_lab.dynamics.schedule.SaveSchedule`).

Robustness: the full state (Q, V, cached F, step, the noise generator's state, the number of
frames written, the config) is checkpointed atomically every ``checkpoint_every_s`` seconds and at
the end; ``resume=true`` continues from it and reproduces an uninterrupted run bit for bit (same
device). Runaway dynamics (NaN/inf or max|Q| above ``divergence.max_abs_q``) stop with
:class:`~lattice_lab.common.errors.SimulationDiverged`, keeping the last good checkpoint and every
frame written (each was checked first). Ctrl-C / SIGTERM stop after the step in progress with a checkpoint there
(:class:`~lattice_lab.common.errors.Interrupted`); a run holds ``<run_dir>/.lock`` while it writes, so
a second process on the same folder is refused; a refused resume writes nothing.

Output folder ``<output_root>/<run_name>/``: ``trajectory.h5``, ``checkpoint.pt``, ``config.yaml``
(``config_resume.yaml`` after a resume; + the analysis outputs when ``analyze=true``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from lattice_lab.common.cuda_graph import wanted
from lattice_lab.common.device import MODEL_DTYPES, resolve_device, resolve_dtype, synchronize
from lattice_lab.common.errors import (
    ConfigError,
    DiskFull,
    Interrupted,
    SimulationDiverged,
    refuse_unknown_keys,
)
from lattice_lab.common.interrupts import StopRequests
from lattice_lab.common.io import (
    atomic_torch_save,
    atomic_write_text,
    check_run_name,
    load_torch_file,
    run_lock,
)
from lattice_lab.common.progress import progress, set_status
from lattice_lab.common.seeding import check_seed
from lattice_lab.common.switch import check_flag, check_switch
from lattice_lab.dynamics.forces import equilibrium_q_scale, make_force_provider
from lattice_lab.dynamics.initial import random_hot_start
from lattice_lab.dynamics.langevin import LangevinIntegrator, LangevinParams, LangevinState
from lattice_lab.dynamics.schedule import SaveSchedule
from lattice_lab.dynamics.trajectory import RESTART_ADVICE, TrajectoryWriter, partial_path
from lattice_lab.tracking.mlflow_utils import standard_tags, start_run

log = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1
EXPERIMENT = "lattice_lab/simulate"
TRAJECTORY_FILE = "trajectory.h5"
CHECKPOINT_FILE = "checkpoint.pt"
CONFIG_FILE = "config.yaml"
RESUME_CONFIG_FILE = "config_resume.yaml"  # the config of the latest resume (config.yaml: the run's first)
DYNAMICS_KEYS = ("integrator", "mass", "gamma", "dt", "temperature", "init_temperature", "L", "replicas", "steps",
                 "save_every", "save_log_per_decade")
DIVERGENCE_KEYS = ("max_abs_q", "scale_factor", "check_every")
TRAJECTORY_KEYS = ("compression", "compression_level")
INTEGRATORS = ("verlet_ou",)  # velocity Verlet + exact Ornstein-Uhlenbeck velocity update (DESIGN.md section 3)


# --------------------------------------------------------------------------------------------
# config helpers
# --------------------------------------------------------------------------------------------
def _get(cfg, dotted: str, default=None):
    value = OmegaConf.select(cfg, dotted, default=default)
    return default if value is None else value


def _to_abs(path: str | os.PathLike) -> Path:
    try:
        from hydra.utils import to_absolute_path

        return Path(to_absolute_path(str(path)))
    except Exception:  # noqa: BLE001 - outside a Hydra app: relative to the working directory
        return Path(path).absolute()


def _positive_int(cfg, key: str, minimum: int = 1, default: int | None = None) -> int:
    """``cfg.<key>`` as an integer >= ``minimum``; ``default`` where it is unset (null)."""
    value = _get(cfg, key)
    if value is None and default is not None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key}={value!r}: expected an integer >= {minimum}")
    return int(value)


def _positive_float(cfg, key: str, allow_zero: bool = False, default: float | None = None) -> float:
    """``cfg.<key>`` as a finite number > 0 (>= 0 with ``allow_zero``); ``default`` where it is unset (null)."""
    value = _get(cfg, key)
    if value is None and default is not None:
        return default
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key}={value!r}: expected a {'non-negative' if allow_zero else 'positive'} number")
    return float(value)


def validate_dynamics(cfg) -> dict:
    """Check ``cfg.dynamics``; return its values as a plain dict."""
    if _get(cfg, "dynamics") is None:
        raise ConfigError("dynamics=None: choose a dynamics preset (e.g. dynamics=quench_small)")
    refuse_unknown_keys(cfg.dynamics, DYNAMICS_KEYS, "dynamics")  # e.g. +dynamics.tempertaure=0.2
    refuse_unknown_keys(_get(cfg, "divergence"), DIVERGENCE_KEYS, "divergence")
    refuse_unknown_keys(_get(cfg, "trajectory"), TRAJECTORY_KEYS, "trajectory")
    integrator = _get(cfg, "dynamics.integrator", INTEGRATORS[0])
    if integrator not in INTEGRATORS:
        raise ConfigError(f"dynamics.integrator={integrator!r}: the only integrator is "
                          f"{' | '.join(INTEGRATORS)} (velocity Verlet + exact Ornstein-Uhlenbeck step)")
    dyn = {
        "mass": _positive_float(cfg, "dynamics.mass"),
        "gamma": _positive_float(cfg, "dynamics.gamma", allow_zero=True),
        "dt": _positive_float(cfg, "dynamics.dt"),
        "temperature": _positive_float(cfg, "dynamics.temperature", allow_zero=True),
        "init_temperature": _positive_float(cfg, "dynamics.init_temperature", allow_zero=True),
        "L": _positive_int(cfg, "dynamics.L", 3),
        "replicas": _positive_int(cfg, "dynamics.replicas"),
        "steps": _positive_int(cfg, "dynamics.steps", 0),
        "save_every": _positive_int(cfg, "dynamics.save_every"),
        "save_log_per_decade": _positive_int(cfg, "dynamics.save_log_per_decade", 0, default=0),
    }
    if dyn["L"] % 2:
        raise ConfigError(f"dynamics.L={dyn['L']}: use even L; the checkerboard CDW (ordering vector (pi, pi)) "
                          "does not fit an odd periodic lattice, and the analysis refuses odd L")
    return dyn


def run_name_of(cfg) -> str:
    name = _get(cfg, "run_name")
    if name:
        return check_run_name(name)
    return (f"{_get(cfg, 'force.source', 'ml')}_L{_get(cfg, 'dynamics.L')}_R{_get(cfg, 'dynamics.replicas')}"
            f"_T{_get(cfg, 'dynamics.temperature')}_seed{_get(cfg, 'seed', 0)}")


def _fingerprint(cfg, state_dtype: torch.dtype | None = None) -> dict:
    """The settings a resumed run must share with the checkpoint (everything that changes the physics
    or the random numbers; ``dynamics.steps`` may grow). ``state_dtype``: the integrator's dtype as
    resolved (``integrator_dtype: null`` means the force's dtype), so null and its value compare equal."""
    c = OmegaConf.to_container(cfg, resolve=True)
    dyn = {k: v for k, v in (c.get("dynamics") or {}).items() if k != "steps"}
    if not dyn.get("save_log_per_decade"):  # 0 is what a run made before the setting existed did
        dyn.pop("save_log_per_decade", None)
    force = c.get("force") or {}
    integrator = str(state_dtype).removeprefix("torch.") if state_dtype is not None else c.get("integrator_dtype")
    return {"hamiltonian": c.get("hamiltonian"), "dynamics": dyn, "seed": c.get("seed"),
            "force_source": force.get("source"), "force_checkpoint": force.get("checkpoint"),
            "dtype": c.get("dtype"), "integrator_dtype": integrator}


def _ignored_on_resume(key: str, old: dict, new: dict) -> bool:
    """Fingerprint entries that may differ without changing the run: the ML model's ``dtype`` under ED
    forces (ED is float64); the checkpoint's path when both name the model by its weights' hash (a
    folder, its best.pt, an absolute path or an MLflow run id can name one model); a model hash or a
    resolved integrator dtype that an older checkpoint did not record."""
    if key == "dtype":
        return new.get("force_source") == "ed" and old.get("force_source") == "ed"
    if key == "force_checkpoint":
        return bool(old.get("model_sha256")) and old.get("model_sha256") == new.get("model_sha256")
    if key == "model_sha256":
        return key not in old
    if key == "integrator_dtype":  # checkpoints before it was resolved hold null (the force's dtype)
        return old.get(key) is None and new.get(key) == ("float64" if new.get("force_source") == "ed" else new.get("dtype"))
    return False


# --------------------------------------------------------------------------------------------
# pieces
# --------------------------------------------------------------------------------------------
def build_hamiltonian(cfg):
    """HolsteinParams of the run: the electron temperature equals the bath temperature."""
    from lattice_lab.physics.holstein import HolsteinParams

    return HolsteinParams.from_config(_get(cfg, "hamiltonian"), temperature=float(cfg.dynamics.temperature))


def _divergence_limit(cfg, hamiltonian) -> float:
    explicit = _get(cfg, "divergence.max_abs_q")
    if explicit is not None:
        return _positive_float(cfg, "divergence.max_abs_q")
    factor = _positive_float(cfg, "divergence.scale_factor", default=50.0)
    return factor * equilibrium_q_scale(hamiltonian)


# --------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------
def run_simulation(cfg: DictConfig, *, force_provider=None, folder_label: str | None = None) -> dict:
    """Run (or resume) the Langevin quench described by ``cfg``; return a summary dict.

    ``force_provider`` injects a ready-made provider (tests: harmonic or failing forces) instead of
    building one from ``cfg.force``; ``folder_label`` names the run folder in errors (default
    ``run_name=...``; a comparison's shared ED run: ``compare.ed_run=...``). Keys of the result: ``run_dir, trajectory, checkpoint, config,
    step, steps, frames, completed, wall_s, steps_per_s, site_steps_per_s, model_run_id,
    mlflow_run_id, analysis``.
    """

    dyn = validate_dynamics(cfg)
    graph_setting = check_switch(_get(cfg, "cuda_graph", "auto"), "cuda_graph")
    native_setting = check_switch(_get(cfg, "native_integrator", "auto"), "native_integrator")
    L, R, steps, save_every = dyn["L"], dyn["replicas"], dyn["steps"], dyn["save_every"]
    seed = check_seed(_get(cfg, "seed", 0))
    resolve_dtype(_get(cfg, "dtype", "float32"), MODEL_DTYPES)  # the model's (checked under ED forces too)
    device = resolve_device(_get(cfg, "device", "auto"))
    hamiltonian = build_hamiltonian(cfg)
    provider = force_provider or make_force_provider(cfg.force, hamiltonian, device,
                                                     _get(cfg, "dtype", "float32"), L=L,
                                                     tracking_uri=_get(cfg, "tracking.uri", None))
    state_dtype = resolve_dtype(_get(cfg, "integrator_dtype") or provider.dtype, MODEL_DTYPES, "integrator_dtype")
    _require_memory(R, L, state_dtype, provider, device)  # before anything is written (a resume needs as much)
    q_limit = _divergence_limit(cfg, hamiltonian)
    check_every = _positive_int(cfg, "divergence.check_every", default=1)
    ck_every_s = _positive_float(cfg, "checkpoint_every_s", allow_zero=True, default=300.0)
    level = _get(cfg, "trajectory.compression_level", 4)
    if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level <= 9:
        raise ConfigError(f"trajectory.compression_level={level!r}: expected an integer from 0 to 9")
    ck_every_steps = _get(cfg, "checkpoint_every_steps")
    stop_after = _get(cfg, "stop_after_steps")
    for key, val in (("checkpoint_every_steps", ck_every_steps), ("stop_after_steps", stop_after)):
        if val is not None and (isinstance(val, bool) or not isinstance(val, int) or val < 1):
            raise ConfigError(f"{key}={val!r}: expected a positive integer or null")

    run_name = run_name_of(cfg)
    run_dir = _to_abs(_get(cfg, "output_root", "runs/trajectories")) / run_name
    traj_path, ck_path, cfg_path = run_dir / TRAJECTORY_FILE, run_dir / CHECKPOINT_FILE, run_dir / CONFIG_FILE
    resume = check_flag(_get(cfg, "resume", False), "resume")
    overwrite = check_flag(_get(cfg, "overwrite", False), "overwrite")
    analyze = check_flag(_get(cfg, "analyze", False), "analyze")
    if analyze:  # its settings now, not after the run
        from lattice_lab.analysis.pipeline import check_config

        check_config(_analysis_config(cfg), "analysis.")
    fingerprint = _fingerprint(cfg, state_dtype)
    if getattr(provider, "model_sha256", ""):  # the same path may hold another model by now (retrained)
        fingerprint["model_sha256"] = provider.model_sha256

    # the setting that asked for the resume, and how to start the run again instead: a comparison's shared
    # ED run is resumed by compare.ed_run (the user never passed resume=true) and is never overwritten
    resume_label, restart = ((folder_label, "a shared ED run is never overwritten: remove that folder to run ED "
                                            "there again, or name another one") if folder_label
                             else ("resume=true", RESTART_ADVICE))
    checkpoint = None
    if resume and ck_path.exists():
        checkpoint = load_torch_file(ck_path, f"{resume_label}: checkpoint")
        _check_resumable(checkpoint, fingerprint, ck_path, label=resume_label)
    elif resume and not (traj_path.exists() or partial_path(traj_path).exists()):
        log.warning("resume=true but %s does not exist: starting a new run", ck_path)
    elif resume and not overwrite:
        raise ConfigError(f"resume=true: {ck_path} is missing but {run_dir} holds a trajectory; a new run would "
                          f"replace it: pass overwrite=true to do that, or choose another run_name")
    elif ck_path.exists() or traj_path.exists() or partial_path(traj_path).exists():
        if not overwrite and folder_label:  # a comparison's shared ED run, started by another one meanwhile
            raise ConfigError(f"{folder_label}: another comparison started this ED run meanwhile; run this "
                              "comparison again once it has finished, to read it")
        if not overwrite:
            raise ConfigError(f"run_name={run_name!r}: {run_dir} already holds a run; pass resume=true to "
                              f"continue it, overwrite=true to replace it, or choose another run_name")
    if checkpoint is not None and int(checkpoint["state"]["step"]) > steps:
        raise ConfigError(f"dynamics.steps={steps}: the checkpoint {ck_path} is already at step "
                          f"{int(checkpoint['state']['step'])}")
    config_yaml = OmegaConf.to_yaml(cfg, resolve=True)
    if checkpoint is not None:  # the run's own config stays; the resume's (more steps, another device) beside it
        cfg_path = run_dir / RESUME_CONFIG_FILE

    lp = LangevinParams(mass=dyn["mass"], gamma=dyn["gamma"], dt=dyn["dt"], temperature=dyn["temperature"])
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    # reuse_forces: the loop below reads state.F only until the next step (frames and checkpoints copy it)
    integrator = LangevinIntegrator(provider, lp, generator, cuda_graph=_use_cuda_graph(graph_setting, provider, device),
                                    native=native_setting, reuse_forces=True)

    attrs = {**{k: dyn[k] for k in ("dt", "mass", "gamma", "temperature", "init_temperature")},
             **{k: v for k, v in hamiltonian.as_dict().items() if k != "temperature"},
             **provider.describe(), "cuda_graph": integrator.cuda_graph, "seed": seed, "save_every": save_every,
             "save_log_per_decade": dyn["save_log_per_decade"], "config": config_yaml}
    tags = standard_tags("simulate", device=device, model_family=getattr(provider, "model_family", "") or None,
                         model_run_id=provider.model_run_id or None,
                         force_source=provider.source, model_path=provider.model_path or None,
                         model_sha256=getattr(provider, "model_sha256", "")[:12] or None, run_dir=str(run_dir))
    result: dict = {}
    with contextlib.ExitStack() as stack:
        run_dir.mkdir(parents=True, exist_ok=True)
        stack.enter_context(run_lock(run_dir, folder_label or f"run_name={run_name!r}"))
        if checkpoint is not None:
            st = checkpoint["state"]
            state = LangevinState(Q=st["Q"].to(device, state_dtype), V=st["V"].to(device, state_dtype),
                                  F=st["F"].to(device, state_dtype), step=int(st["step"]))
            noise = integrator.noise_source(state)
            if checkpoint.get("noise", "torch") != noise:  # checked before anything on disk changes
                raise ConfigError(f"{resume_label}: {ck_path} drew its bath noise from the "
                                  f"{checkpoint.get('noise', 'torch')} generator, this run would use {noise} "
                                  "(native_integrator=false selects torch's generator, true the native Philox step)")
            n_frames = int(checkpoint["n_frames"])
            continued = TrajectoryWriter.check_reopen(traj_path, n_frames, resume_label, restart)
            atomic_write_text(cfg_path, config_yaml)  # after every check: a refused resume changes nothing
            if continued == traj_path:  # finished run, now extended
                os.replace(traj_path, partial_path(traj_path))
            writer = TrajectoryWriter.reopen(traj_path, n_frames, resume_label, restart)
            stack.callback(writer.close)
            writer.set_attrs(config_resume=config_yaml)
            generator.set_state(checkpoint["generator_state"])
            wall_before = float(checkpoint.get("wall_s", 0.0))
            mlflow_run_id = checkpoint.get("mlflow_run_id")
            log.info("resuming %s at step %d (%d frames)", run_name, state.step, writer.n_frames)
        else:  # a new run (overwrite=true if one was here): no file of the replaced run may stay
            for stale in (traj_path, partial_path(traj_path), ck_path, run_dir / "run_summary.json",
                          run_dir / RESUME_CONFIG_FILE):
                stale.unlink(missing_ok=True)
            shutil.rmtree(run_dir / "analysis", ignore_errors=True)
            atomic_write_text(cfg_path, config_yaml)
            Q0, V0 = random_hot_start(R, L, hamiltonian, dyn["mass"], dyn["init_temperature"], generator,
                                      dtype=torch.float64, device=device)
            state = integrator.init_state(Q0.to(device, state_dtype), V0.to(device, state_dtype))
            del Q0, V0  # the float64 draw is not kept for the whole run
            noise = integrator.noise_source(state)
            writer = TrajectoryWriter(traj_path, L, R, attrs,
                                      compression=str(_get(cfg, "trajectory.compression", "gzip")),
                                      compression_opts=level)
            stack.callback(writer.close)
            wall_before = 0.0
            mlflow_run_id = None

        writer.set_attrs(noise_source=noise)
        tracker = stack.enter_context(start_run(task="simulate", cfg=cfg, run_name=run_name, tags=tags,
                                                run_id=mlflow_run_id))
        tracker.log_params(cfg)
        tracker.log_artifact(cfg_path)
        tracker.set_tags({"noise_source": noise})
        ck = _Checkpointer(ck_path, writer, generator, cfg, fingerprint, tracker, noise)
        if checkpoint is not None:  # the resumed checkpoint is the last good state until the next one
            ck.step, ck.n_frames = int(state.step), writer.n_frames
        _check_state(state, q_limit, ck)
        if checkpoint is None:
            writer.append(0, 0.0, state.Q, provider.density(state.Q, state.F))
            ck.save(state, wall_before)

        target = steps if stop_after is None else min(steps, state.step + int(stop_after))
        start_step, site_count = state.step, R * L * L
        space = _DiskSpace(run_dir, frame_bytes=2 * 4 * site_count,
                           checkpoint_bytes=3 * site_count * state.Q.element_size() + (1 << 20))
        schedule = SaveSchedule(save_every, dyn["save_log_per_decade"], final=steps)  # the final state too
        space.warn_if_short(schedule.count(state.step, target) * space.frame_bytes)
        synchronize(device)
        t0 = last_ck = last_post = time.perf_counter()
        bar = progress(total=steps, initial=state.step, desc=f"simulate {provider.source} L={L} R={R}",
                       unit="step")
        # no_grad around the loop: each step() then skips entering it (energy models still get their
        # gradient: the integrator enables it around their force call)
        with bar, StopRequests() as stop, torch.no_grad():  # a request during the last step is honoured below
            while state.step < target:
                if stop.signal is not None:  # between steps: the state is consistent
                    ck.save(state, wall_before + time.perf_counter() - t0)
                    tracker.set_tags({"status": f"interrupted at step {state.step}"})
                    raise Interrupted(f"{stop.signal} at step {state.step} of {steps}: saved {ck_path}; "
                                      "the same command with resume=true continues it", stop.signum)
                if state.step + 1 in schedule:  # room for the next frame, checked before it is due
                    space.ensure(state, ck, wall_before + time.perf_counter() - t0, steps)
                state = integrator.step(state)
                s = state.step
                save = s in schedule
                now = time.perf_counter()
                ck_due = (s == target or now - last_ck >= ck_every_s
                          or (ck_every_steps is not None and s % int(ck_every_steps) == 0))
                if save or ck_due or s % check_every == 0:
                    _check_state(state, q_limit, ck)
                if save:
                    writer.append(s, s * dyn["dt"], state.Q, provider.density(state.Q, state.F))
                if ck_due:
                    space.ensure_checkpoint(state, ck, steps)
                    ck.save(state, wall_before + now - t0)
                    last_ck = time.perf_counter()
                bar.update(1)
                if now - last_post >= 1.0:
                    rate = (s - start_step) / max(now - t0, 1e-12)
                    set_status(bar, f"{rate * site_count:.3g} site-steps/s")
                    last_post = now
        synchronize(device)
        loop_s = time.perf_counter() - t0
        done = state.step - start_step
        steps_per_s = done / loop_s if loop_s > 0 and done else 0.0
        completed = state.step >= steps
        # equipartition check: m <v^2> over sites and replicas (-> the bath temperature once thermalised)
        t_kin = state.kinetic_temperature(dyn["mass"])
        if completed:
            writer.finalize()
        else:
            writer.close()
        result = {
            "run_dir": str(run_dir), "trajectory": str(traj_path if completed else partial_path(traj_path)),
            "checkpoint": str(ck_path), "config": str(cfg_path), "step": int(state.step), "steps": steps,
            "frames": None, "completed": completed, "wall_s": wall_before + loop_s,
            "steps_per_s": steps_per_s, "site_steps_per_s": steps_per_s * site_count,
            "model_run_id": provider.model_run_id, "mlflow_run_id": tracker.run_id, "analysis": None,
            "noise_source": noise, "kinetic_temperature": t_kin,
        }
        result["frames"] = _count_frames(Path(result["trajectory"]))
        tracker.log_metrics({"steps_per_s": steps_per_s, "site_steps_per_s": steps_per_s * site_count,
                             "wall_time_s": result["wall_s"], "kinetic_temperature": t_kin}, step=int(state.step))
        tracker.set_tags({"status": "completed" if completed else f"stopped at step {state.step}"})
        if completed and analyze and stop.signal is None:  # a request during the last step: no analysis
            result["analysis"] = _analyze(traj_path, cfg, tracker)
        _write_run_summary(run_dir / "run_summary.json", result)
    log.info("%s: step %d/%d, %.3g steps/s, %.3g site-steps/s", run_name, result.get("step", -1), steps,
             result.get("steps_per_s", 0.0), result.get("site_steps_per_s", 0.0))
    if stop.signal is not None:  # asked to stop during the last step: the run is done, what follows is not
        raise Interrupted(f"{stop.signal} during the last step: the run reached step {result['step']} of {steps} "
                          f"({result['trajectory']}); stopped before what would follow (analysis, another run)",
                          stop.signum)
    return result


def _require_memory(R: int, L: int, state_dtype: torch.dtype, provider, device: torch.device) -> None:
    """Refuse a run whose arrays cannot fit (ConfigError naming dynamics.L and dynamics.replicas), instead of an
    allocator error deep inside after the run folder was made. Counted, per site, a lower bound of the run's
    memory (a model's activations come on top): on ``device`` Q, V, F in the integrator's dtype, the float64
    hot start they are drawn from, the force call's input and output where the force runs in another dtype,
    and the force's known working set (ED: the diagonalisation); on the host the float32 frame (Q, n) written
    to the trajectory and, from a GPU, the checkpoint's copy of Q, V, F
    (:func:`lattice_lab.common.memory.require_memory`)."""
    from lattice_lab.common.memory import require_memory

    sites = R * L * L
    e = torch.empty((), dtype=state_dtype).element_size()
    e_force = torch.empty((), dtype=provider.dtype).element_size()
    on_device = sites * (3 * e + 2 * 8 + (2 * e_force if provider.dtype != state_dtype else 0))
    working = getattr(provider, "working_bytes", None)  # an injected provider may not know it
    on_device += working(R, L) if working is not None else 0
    on_host = sites * (2 * 4 + (3 * e if device.type != "cpu" else 0))
    settings = {"dynamics.L": L, "dynamics.replicas": R}
    what = f"Q, V, F in {str(state_dtype).removeprefix('torch.')}, their hot start and a frame"
    if device.type == "cpu":
        require_memory(on_device + on_host, device, settings, what)
    else:
        require_memory(on_device, device, settings, what)
        require_memory(on_host, "cpu", settings, "a frame and a checkpoint")


def _use_cuda_graph(setting, provider, device) -> bool:
    """``cuda_graph``: auto records the steps of ML forces on CUDA, torch.compile'd or not (not ED: its
    eigensolver synchronises with the host). torch.compile's default mode launches its fused kernels one
    by one; recorded in the step's graph they replay with one launch (docs/bench.md, "On a GPU")."""
    return wanted(setting, device, auto=provider.source == "ml")


def _write_run_summary(path: Path, result: dict) -> None:
    """``run_summary.json``: steps done, speed, paths and the analysis' headline numbers."""
    import json

    from lattice_lab.common.io import atomic_write_text

    summary = {k: v for k, v in result.items() if k != "analysis"}
    analysis = result.get("analysis") or {}
    summary.update({k: analysis.get(k) for k in ("alpha", "alpha_err", "alpha_xi", "alpha_xi_err") if k in analysis})
    atomic_write_text(path, json.dumps(summary, indent=2, default=str) + "\n")


def _count_frames(path: Path) -> int:
    import h5py

    with h5py.File(path, "r") as f:
        return int(f["step"].shape[0])


def _analyze(traj_path: Path, cfg, tracker) -> dict:
    """Coarsening analysis of the finished trajectory (into ``<run_dir>/analysis``), logged to this run
    as the ``analyze`` entrypoint logs it (:func:`lattice_lab.analysis.pipeline.log_analysis`)."""
    from lattice_lab.analysis.pipeline import analyze_trajectory

    return analyze_trajectory(str(traj_path), _analysis_config(cfg), tracker=tracker)


def _analysis_config(cfg) -> dict:
    """The ``analysis`` section as the analysis of the finished trajectory takes it."""
    acfg = OmegaConf.to_container(cfg.analysis, resolve=True) if _get(cfg, "analysis") is not None else {}
    acfg["tracking"] = {**(acfg.get("tracking") or {}), "enabled": False}  # logged into the simulation's run
    return acfg


def _check_resumable(checkpoint: dict, fingerprint: dict, ck_path: Path, *, label: str = "resume=true",
                     advice: str = "resume with the original settings or start a new run (another run_name)") -> None:
    """The checkpoint ``ck_path`` against this run's ``fingerprint``: ConfigError naming the first setting that
    differs, prefixed with ``label`` (the setting that continues the run: ``resume=true``, or
    ``compare.ed_run=...`` for a comparison's shared ED run) and ending with ``advice``."""
    if checkpoint.get("version") != CHECKPOINT_VERSION:
        raise ConfigError(f"{label}: {ck_path} has checkpoint version {checkpoint.get('version')}, "
                          f"expected {CHECKPOINT_VERSION}")
    old = checkpoint.get("fingerprint", {})
    for key in sorted(set(old) | set(fingerprint)):
        if old.get(key) != fingerprint.get(key) and not _ignored_on_resume(key, old, fingerprint):
            raise ConfigError(f"{label}: {key}={fingerprint.get(key)!r} differs from the checkpoint's "
                              f"{old.get(key)!r} ({ck_path}); {advice}")


def _free_bytes(folder: Path) -> int:
    return shutil.disk_usage(folder).free


class _DiskSpace:
    """Free space on the run's disk. HDF5 reports a failed chunk write only as an ignored error in a destructor:
    a full disk would lose frames silently and then fail in the checkpoint. So a run checks before every frame
    that the frame and a checkpoint fit, and otherwise stops with a checkpoint (:class:`DiskFull`)."""

    def __init__(self, run_dir: Path, frame_bytes: int, checkpoint_bytes: int):
        self.run_dir, self.frame_bytes, self.checkpoint_bytes = run_dir, frame_bytes, checkpoint_bytes

    def warn_if_short(self, trajectory_bytes: int) -> None:
        free = _free_bytes(self.run_dir)
        if trajectory_bytes + self.checkpoint_bytes > free:
            log.warning("%s: the rest of this run's trajectory needs up to %.3g GB (uncompressed) but only %.3g GB "
                        "are free; it will stop with a checkpoint when the disk is full", self.run_dir,
                        trajectory_bytes / 1e9, free / 1e9)

    def ensure(self, state, ck: _Checkpointer, wall_s: float, steps: int) -> None:
        """Room for the next frame and a checkpoint; else a checkpoint now (if it fits) and DiskFull."""
        free = _free_bytes(self.run_dir)
        if free >= self.frame_bytes + self.checkpoint_bytes:
            return
        saved = f"the last checkpoint (step {ck.step}) is kept"
        if free >= self.checkpoint_bytes:
            ck.save(state, wall_s)
            saved = f"saved {ck.path} at step {ck.step}"
        raise self._full(free, self.frame_bytes + self.checkpoint_bytes, "the next frame and a checkpoint",
                         state, steps, saved)

    def ensure_checkpoint(self, state, ck: _Checkpointer, steps: int) -> None:
        """Room for a checkpoint (one between frames, every checkpoint_every_s); else DiskFull, keeping the last."""
        free = _free_bytes(self.run_dir)
        if free < self.checkpoint_bytes:
            raise self._full(free, self.checkpoint_bytes, "a checkpoint", state, steps,
                             f"the last checkpoint (step {ck.step}) is kept")

    def _full(self, free: int, need: int, what: str, state, steps: int, saved: str) -> DiskFull:
        return DiskFull(f"{self.run_dir}: only {free / 1e6:.3g} MB free on its disk, less than the "
                        f"{need / 1e6:.3g} MB of {what}: stopped at step {state.step} of {steps}, {saved}; free "
                        "some space, then the same command with resume=true continues it")


class _Checkpointer:
    """Atomic checkpoints of the dynamics state, consistent with the frames already on disk."""

    def __init__(self, path: Path, writer: TrajectoryWriter, generator: torch.Generator, cfg, fingerprint,
                 tracker, noise: str):
        self.path, self.writer, self.generator, self.noise = path, writer, generator, noise
        self.config = OmegaConf.to_container(cfg, resolve=True)
        self.fingerprint = fingerprint
        self.tracker = tracker
        self.step: int | None = None
        self.n_frames: int | None = None

    def save(self, state, wall_s: float) -> None:
        self.writer.flush()
        atomic_torch_save({
            "version": CHECKPOINT_VERSION,
            "state": {"Q": state.Q.detach().cpu(), "V": state.V.detach().cpu(), "F": state.F.detach().cpu(),
                      "step": int(state.step)},
            "generator_state": self.generator.get_state(),
            "noise": self.noise,  # bath noise source: "philox" (native CPU step) or "torch" (the generator)
            "n_frames": self.writer.n_frames,
            "config": self.config,
            "fingerprint": self.fingerprint,
            "wall_s": float(wall_s),
            "mlflow_run_id": self.tracker.run_id,
        }, self.path)
        self.step, self.n_frames = int(state.step), self.writer.n_frames

    def diverged(self, message: str):
        """Keep every frame written so far (each passed the divergence check before it was written: the
        run's approach to the blow-up is there to look at; a resume cuts the file back to the checkpoint)
        and raise SimulationDiverged naming the last good checkpoint."""
        self.writer.flush()
        frames = self.writer.n_frames
        kept = (f"its {frames} frames (every one checked) kept in {self.writer.partial}" if frames
                else "no frame was written")
        where = ("no checkpoint was written" if self.n_frames is None
                 else f"last good checkpoint {self.path} (step {self.step})")
        self.writer.close()
        self.tracker.set_tags({"status": "diverged"})
        raise SimulationDiverged(f"{message}; {where}; {kept}. Reduce dynamics.dt or check the force field")


def _check_state(state, q_limit: float, ck: _Checkpointer) -> None:
    """NaN/inf anywhere in (Q, V, F) or max|Q| > q_limit -> SimulationDiverged naming the step."""
    qmax, vmax, fmax = torch.stack([state.Q.abs().amax(), state.V.abs().amax(), state.F.abs().amax()]).tolist()
    step = int(state.step)
    bad = [f"max|{name}| = {val}" for name, val in (("Q", qmax), ("V", vmax), ("F", fmax)) if not math.isfinite(val)]
    if bad:
        ck.diverged(f"dynamics diverged at step {step}: {', '.join(bad)}")
    if qmax > q_limit:
        ck.diverged(f"dynamics diverged at step {step}: max|Q| = {qmax:.6g} exceeds "
                    f"divergence.max_abs_q = {q_limit:.6g}")
