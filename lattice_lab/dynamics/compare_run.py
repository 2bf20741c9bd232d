"""ED-vs-ML dynamics comparison (enn_paper Fig. 5): the same quench with exact and with learned forces.

Both runs start from the same hot states (same seed) and feel the same bath noise (same seed, both
integrated in ``compare.integrator_dtype``, float64 by default, so the random streams coincide);
they differ only in the force. The equal-time correlation C(r) = <Q_i Q_j> at the chosen steps
(default 200, 1000, 9000) is compared by :func:`lattice_lab.analysis.pipeline.compare_trajectories`,
which computes the agreement statistic of :mod:`lattice_lab.analysis.compare` (per-point z-scores of
the replica-by-replica differences, since the shared starts and noise pair the replicas; max|z|) and
plots both curves together.

Layout: ``<output_root>/<compare.name>/{ed,ml}/`` (two ordinary simulation folders, resumable) and
``<output_root>/<compare.name>/comparison/`` (plots, tables) plus ``comparison.json``. In MLflow a
parent run ``<compare.name>`` (experiment ``lattice_lab/simulate``) holds the two simulation runs
as children and the agreement metrics.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil

from omegaconf import DictConfig, OmegaConf

from lattice_lab.common.device import MODEL_DTYPES, resolve_device, resolve_dtype
from lattice_lab.common.errors import ConfigError
from lattice_lab.common.io import atomic_write_text, check_run_name, load_torch_file, run_lock
from lattice_lab.common.switch import check_flag, check_switch
from lattice_lab.dynamics.forces import check_force_config
from lattice_lab.dynamics.runner import (
    CHECKPOINT_FILE,
    RESUME_CONFIG_FILE,
    TRAJECTORY_FILE,
    _check_resumable,
    _count_frames,
    _fingerprint,
    _get,
    _to_abs,
    run_simulation,
    validate_dynamics,
)
from lattice_lab.dynamics.schedule import SaveSchedule
from lattice_lab.dynamics.trajectory import partial_path

log = logging.getLogger(__name__)


def comparison_steps(cfg) -> list[int]:
    """``compare.steps`` validated against the run length and the save interval: steps that every run of any
    length saves (not the run's last step where no other rule saves it: a longer shared ``compare.ed_run``
    does not have that frame)."""
    dyn = validate_dynamics(cfg)
    raw = _get(cfg, "compare.steps")
    if raw is None or isinstance(raw, (str, int)) or len(raw) == 0:
        raise ConfigError(f"compare.steps={raw!r}: expected a non-empty list of MD steps, e.g. [200, 1000, 9000]")
    steps, saved = [], SaveSchedule(dyn["save_every"], dyn["save_log_per_decade"])
    for s in raw:
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise ConfigError(f"compare.steps={list(raw)}: {s!r} is not a non-negative integer")
        if s > dyn["steps"]:
            raise ConfigError(f"compare.steps={list(raw)}: step {s} is beyond dynamics.steps={dyn['steps']}")
        if s not in saved:
            last = (" (the run's last step is saved too, but not by a longer shared compare.ed_run)"
                    if s == dyn["steps"] else "")
            raise ConfigError(f"compare.steps={list(raw)}: step {s} is not a saved frame "
                              f"(dynamics.save_every={dyn['save_every']}, "
                              f"save_log_per_decade={dyn['save_log_per_decade']}){last}")
        steps.append(int(s))
    return steps


def comparison_name(cfg) -> str:
    name = _get(cfg, "compare.name")
    if name:
        return check_run_name(name, "compare.name")
    return (f"ed_vs_ml_L{cfg.dynamics.L}_R{cfg.dynamics.replicas}_T{cfg.dynamics.temperature}"
            f"_seed{_get(cfg, 'seed', 0)}")


def _child_config(cfg, force, root, name: str, parent_run_id: str | None) -> DictConfig:
    c = OmegaConf.to_container(cfg, resolve=True)
    c.pop("compare", None)
    c.pop("hydra", None)
    c["force"] = force
    c["run_name"] = name
    c["output_root"] = str(root)
    c["integrator_dtype"] = _get(cfg, "compare.integrator_dtype", "float64")
    c["analyze"] = check_flag(_get(cfg, "compare.analyze_runs", False), "compare.analyze_runs")
    tracking = dict(c.get("tracking") or {})
    if parent_run_id:
        tracking["parent_run_id"] = parent_run_id
    c["tracking"] = tracking
    return OmegaConf.create(c)


def run_comparison(cfg: DictConfig, *, ml_provider=None) -> dict:
    """Run the ED and the ML quench (or resume them) and compare C(r) at ``compare.steps``.

    Returns ``{"name", "root", "ed": <run_simulation result>, "ml": ..., "steps", "comparison":
    <compare_trajectories result or None if a run stopped early>, "summary_path"}``.
    ``ml_provider`` injects a ready force provider for the ML side (tests).
    """
    from lattice_lab.tracking.mlflow_utils import standard_tags, start_run

    steps = comparison_steps(cfg)
    if str(_get(cfg, "force.source", "")) != "ml" and ml_provider is None:
        raise ConfigError(f"force={_get(cfg, 'force.source')!r}: the comparison needs force=ml (the model "
                          f"to test); the ED side comes from compare.ed_force")
    ed_force = OmegaConf.to_container(cfg.compare.ed_force, resolve=True) if _get(cfg, "compare.ed_force") \
        else {"source": "ed", "max_L": 48}
    if ed_force.get("source") != "ed":
        raise ConfigError(f"compare.ed_force.source={ed_force.get('source')!r}: must be 'ed'")
    check_force_config(ed_force, "compare.ed_force.", L=_get(cfg, "dynamics.L"))  # named as compare.ed_force.*
    name = comparison_name(cfg)
    root = _to_abs(_get(cfg, "output_root", "runs/trajectories")) / name
    if _get(cfg, "integrator_dtype") is not None:
        raise ConfigError(f"integrator_dtype={_get(cfg, 'integrator_dtype')!r}: a comparison integrates both runs in "
                          "compare.integrator_dtype (same noise on both sides); set that one")
    resolve_dtype(_get(cfg, "compare.integrator_dtype", "float64"), MODEL_DTYPES, "compare.integrator_dtype")
    check_flag(_get(cfg, "compare.analyze_runs", False), "compare.analyze_runs")
    from lattice_lab.analysis.pipeline import check_config

    check_config(_get(cfg, "analysis"), "analysis.")  # the comparison's settings now, not after both runs
    native = check_switch(_get(cfg, "native_integrator", "auto"), "native_integrator")
    resume = check_flag(_get(cfg, "resume", False), "resume")
    overwrite = check_flag(_get(cfg, "overwrite", False), "overwrite")
    shared = _shared_ed_dir(cfg, root) if _get(cfg, "compare.ed_run") else None
    if not (resume or overwrite) and any((root / side / f).exists() for side in ("ed", "ml")
                                         for f in (CHECKPOINT_FILE, TRAJECTORY_FILE, TRAJECTORY_FILE + ".partial")):
        raise ConfigError(f"compare.name={name!r}: {root} already holds this comparison; pass resume=true to "
                          "continue it, overwrite=true to replace it, or choose another compare.name")
    root.mkdir(parents=True, exist_ok=True)
    if overwrite:  # the replaced comparison's results go with it (its runs are replaced by run_simulation)
        shutil.rmtree(root / "comparison", ignore_errors=True)
        for stale in ("comparison.json", RESUME_CONFIG_FILE):
            (root / stale).unlink(missing_ok=True)

    with start_run(task="simulate", cfg=cfg, run_name=name,
                   tags=standard_tags("simulate", mode="ed_vs_ml", force_source="ed+ml")) as tracker, \
            contextlib.ExitStack() as reading:
        tracker.log_params(cfg)
        ml_force = OmegaConf.to_container(cfg.force, resolve=True)
        ed_cfg = _child_config(cfg, ed_force, root, "ed", tracker.run_id)
        if shared is not None:  # read under a shared lock until the comparison is done: nobody extends it meanwhile
            label = f"compare.ed_run={shared}"
            if shared.is_dir():
                reading.enter_context(run_lock(shared, label, shared=True))
            res_ed = _finished_shared_run(ed_cfg, shared)
            if res_ed is None:  # created or continued here
                reading.close()
                _share_ed_run(ed_cfg, shared)
                res_ed = run_simulation(ed_cfg, folder_label=label)
                reading.enter_context(run_lock(shared, label, shared=True, wait=True))  # a run extending it
        else:                                                                             # meanwhile only adds frames
            res_ed = run_simulation(ed_cfg)
        ml_cfg = _child_config(cfg, ml_force, root, "ml", tracker.run_id)
        ml_cfg.native_integrator = _same_noise(native, res_ed.get("noise_source"), cfg, shared)
        res_ml = run_simulation(ml_cfg, force_provider=ml_provider)
        # both runs accepted their settings: now the comparison's own config (the first one stays)
        config_yaml = OmegaConf.to_yaml(cfg, resolve=True)
        first = root / "config.yaml"
        if not first.exists() or overwrite:
            atomic_write_text(first, config_yaml)
        elif first.read_text() != config_yaml:
            atomic_write_text(root / RESUME_CONFIG_FILE, config_yaml)
        if res_ed.get("noise_source") != res_ml.get("noise_source"):
            raise ConfigError(f"compare: the ED run drew its bath noise from {res_ed.get('noise_source')!r}, the ML "
                              f"run from {res_ml.get('noise_source')!r}, so they do not feel the same noise; use the "
                              "same native_integrator setting for both (a shared compare.ed_run keeps its own)")
        tracker.set_tags({"model_run_id": res_ml.get("model_run_id") or "", "ed_run_id": res_ed["mlflow_run_id"] or "",
                          "ml_run_id": res_ml["mlflow_run_id"] or ""})
        result = {"name": name, "root": str(root), "ed": res_ed, "ml": res_ml, "steps": steps,
                  "comparison": None, "summary_path": str(root / "comparison.json")}
        if not (res_ed["completed"] and res_ml["completed"]):
            log.warning("comparison %s: a run stopped early (stop_after_steps); resume=true continues", name)
            return result
        from lattice_lab.analysis.pipeline import compare_trajectories

        comparison = compare_trajectories(res_ed["trajectory"], res_ml["trajectory"], steps,
                                          _get(cfg, "analysis"), out_dir=str(root / "comparison"))
        result["comparison"] = comparison
        metrics = _agreement_metrics(comparison)
        tracker.log_metrics(metrics)
        for png in sorted((root / "comparison").glob("*.png")):
            tracker.log_artifact(png, "plots")
        summary = {"name": name, "steps": steps, "ed_trajectory": res_ed["trajectory"],
                   "ml_trajectory": res_ml["trajectory"], "model_run_id": res_ml.get("model_run_id"),
                   "metrics": metrics}
        atomic_write_text(root / "comparison.json", json.dumps(summary, indent=2, default=str))
        tracker.log_artifact(root / "comparison.json")
    return result


def _shared_ed_dir(cfg, root):
    """``compare.ed_run`` as an absolute path, outside this comparison's own folder (an ED run there
    would be this comparison's ML run, or overwrite its config) and not another comparison's folder."""
    shared = _to_abs(str(_get(cfg, "compare.ed_run"))).resolve()  # "..", symlinks: where it really is
    check_run_name(shared.name, "compare.ed_run")
    root = root.resolve()
    if shared == root or root in shared.parents or shared in root.parents:
        raise ConfigError(f"compare.ed_run={shared}: must lie outside this comparison's folder {root} "
                          "(e.g. runs/trajectories/ed_L16_R8)")
    if shared.exists() and not shared.is_dir():
        raise ConfigError(f"compare.ed_run={shared}: is a file, not a run folder (name the ED run's folder, "
                          "e.g. runs/trajectories/ed_L16_R8, or a new folder for it)")
    if (shared / "comparison.json").exists() or (shared / "ed").is_dir() or (shared / "ml").is_dir():
        raise ConfigError(f"compare.ed_run={shared}: holds an ED-vs-ML comparison, not an ED run; name a folder of "
                          f"its own (e.g. runs/trajectories/ed_L16_R8), or that comparison's ED run {shared / 'ed'}")
    return shared


def _shared_fingerprint_check(ed_cfg, checkpoint: dict, ck_path, shared) -> None:
    """The shared run's checkpoint against this comparison's ED settings (the resume check, with an error
    and advice that name the setting the user chose: ``compare.ed_run``, not a resume they never asked for)."""
    state_dtype = resolve_dtype(_get(ed_cfg, "integrator_dtype") or "float64", MODEL_DTYPES, "integrator_dtype")  # ED forces are float64
    _check_resumable(checkpoint, _fingerprint(ed_cfg, state_dtype), ck_path, label=f"compare.ed_run={shared}",
                     advice="compare with that ED run's settings, or give this comparison another compare.ed_run")


def _finished_shared_run(ed_cfg, shared) -> dict | None:
    """The shared ED run as :func:`run_simulation` would report it, read without writing anything, if it
    is finished and at least as long as this comparison (None otherwise: it is created or continued).
    Comparisons may then run at once on one shared run (the caller holds its shared lock)."""
    checkpoint_path, trajectory = shared / CHECKPOINT_FILE, shared / TRAJECTORY_FILE
    if not (checkpoint_path.exists() and trajectory.exists()):
        return None
    checkpoint = load_torch_file(checkpoint_path, "compare.ed_run: checkpoint")
    _shared_fingerprint_check(ed_cfg, checkpoint, checkpoint_path, shared)
    done = int(checkpoint["state"]["step"])
    if done < int(ed_cfg.dynamics.steps):
        return None
    log.info("compare.ed_run: reading the finished ED run %s (step %d)", shared, done)
    return {"run_dir": str(shared), "trajectory": str(trajectory), "checkpoint": str(checkpoint_path),
            "config": str(shared / "config.yaml"), "step": done, "steps": done,
            "frames": _count_frames(trajectory), "completed": True, "wall_s": float(checkpoint.get("wall_s", 0.0)),
            "steps_per_s": 0.0, "site_steps_per_s": 0.0, "model_run_id": "",  # no step computed here
            "mlflow_run_id": checkpoint.get("mlflow_run_id"), "analysis": None,
            "noise_source": checkpoint.get("noise", "torch")}


def _share_ed_run(ed_cfg, shared) -> None:
    """Point the ED side at the shared run: created by the first comparison, resumed by the others
    (the resume checks dynamics, Hamiltonian and seed); a run longer than asked is read as it is (its
    frames up to this comparison's steps are the same), a shorter one is continued."""
    ed_cfg.output_root, ed_cfg.run_name = str(shared.parent), shared.name
    ed_cfg.tracking.parent_run_id = None  # an MLflow run of its own, named by each comparison's ed_run_id tag
    checkpoint, trajectory = shared / CHECKPOINT_FILE, shared / TRAJECTORY_FILE
    if not checkpoint.exists() and (trajectory.exists() or partial_path(trajectory).exists()):
        raise ConfigError(f"compare.ed_run={shared}: holds a trajectory without its {CHECKPOINT_FILE}, so it can be "
                          "neither resumed nor checked; a shared ED run is never overwritten: remove that folder "
                          "to run ED there again, or name another one")
    ed_cfg.resume, ed_cfg.overwrite = checkpoint.exists(), False  # created by the first comparison
    if checkpoint.exists():
        state = load_torch_file(checkpoint, "compare.ed_run: checkpoint")
        if not isinstance(state, dict) or "state" not in state:
            raise ConfigError(f"compare.ed_run={shared}: {checkpoint} is not a simulation checkpoint")
        _shared_fingerprint_check(ed_cfg, state, checkpoint, shared)
        ed_cfg.dynamics.steps = max(int(ed_cfg.dynamics.steps), int(state["state"]["step"]))


def _same_noise(setting, ed_noise: str | None, cfg, shared):
    """The ML run's ``native_integrator``: the one that draws the ED run's bath noise (Philox: the native
    CPU step; torch: the generator), checked before the ML run starts. ``auto`` follows the ED run; an
    explicit setting that would give the other noise, or Philox noise where the ML run cannot draw it
    (a GPU, no native kernel), is an error."""
    if ed_noise not in ("philox", "torch"):
        return setting
    want = ed_noise == "philox"
    if setting != "auto" and setting is not want:
        raise ConfigError(f"native_integrator={str(setting).lower()}: the ED run drew its bath noise from "
                          f"{ed_noise!r} (native_integrator={str(want).lower()}); both runs of a comparison must "
                          "feel the same noise")
    why_not = _native_step_unavailable(cfg) if want else None
    if why_not:
        source = f"compare.ed_run={shared}" if shared is not None else "the ED run"
        raise ConfigError(f"{source}: its bath noise is the native CPU step's (Philox), which the ML run cannot "
                          f"draw here ({why_not}); run the comparison where that ED run was made, or give it an "
                          "ED run of its own")
    return want


def _native_step_unavailable(cfg) -> str | None:
    """Why the ML run could not take the native Langevin step (None if it can)."""
    from lattice_lab.native.build import NativeUnavailable
    from lattice_lab.native.langevin import LangevinKernel
    from lattice_lab.native.policy import disabled_by_environment

    device = resolve_device(_get(cfg, "device", "auto"))
    if device.type != "cpu":
        return f"device={device}"
    if disabled_by_environment():
        return "LATTICE_LAB_NATIVE=0"
    try:
        LangevinKernel(resolve_dtype(_get(cfg, "compare.integrator_dtype", "float64"), MODEL_DTYPES))
    except NativeUnavailable as exc:
        return f"no native kernel: {str(exc).splitlines()[0]}"
    return None


def _agreement_metrics(comparison: dict) -> dict:
    """MLflow metrics from :func:`compare_trajectories`: overall and per-step max|z| (paired replicas)."""
    out = {}
    if isinstance(comparison.get("max_abs_z"), (int, float)):
        out["compare/max_abs_z"] = float(comparison["max_abs_z"])
    for entry in comparison.get("steps", []):
        s = entry.get("requested", entry.get("step_a"))
        for key in ("max_abs_z", "max_abs_z_unpaired"):
            if isinstance(entry.get(key), (int, float)):
                out[f"compare/{key}_step{s}"] = float(entry[key])
    return out
