"""Train a force field on an ED force dataset: ``python -m lattice_lab.train model=NAME dataset=NAME``.

Reads ``runs/data/<dataset>.h5``, builds the model for the dataset's Hamiltonian, minimises the
force MSE (:mod:`lattice_lab.training.trainer`), evaluates the best model on train and validation
sets, and writes ``runs/checkpoints/<run_name>/`` (best.pt, last.pt, config.yaml, metrics.csv,
parity.png, error_hist.png, learning_curve.png, error_by_config.png, error_vs_order.png). Errors are also given per
kind of configuration (``final/val_quench_sigma``, ...) and on the quench snapshots' domain walls and domains
apart (:func:`~lattice_lab.training.metrics.error_report`). Everything is logged to MLflow (experiment
``lattice_lab/train``).
The Hydra task function returns the best validation RMSE, the objective of Optuna sweeps. Ctrl-C stops
with one line naming ``last.pt`` (the last finished epoch) and the ``resume=true run_name=...`` that continues.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import time
from pathlib import Path

import hydra
from hydra.utils import to_absolute_path
from omegaconf import DictConfig, OmegaConf, open_dict

from lattice_lab.common.cli import CONFIG_DIR, friendly_errors, hydra_errors
from lattice_lab.common.errors import ConfigError, number_or_nan
from lattice_lab.common.interrupts import interrupts_as
from lattice_lab.common.io import atomic_write_text, check_run_name
from lattice_lab.common.switch import check_flag
from lattice_lab.sweeps.trial import TRIAL_FILE, current_trial, is_trial_dir

log = logging.getLogger(__name__)


def _choice(group: str) -> str | None:
    """The preset chosen for a config group (``model=enn_small`` -> ``enn_small``), if Hydra knows it."""
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            return HydraConfig.get().runtime.choices.get(group)
    except Exception:  # noqa: BLE001 - composed without the hydra node
        pass
    return None


def _job_num() -> int | None:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            return int(HydraConfig.get().job.num)
    except Exception:  # noqa: BLE001
        pass
    return None


def dataset_name(cfg: DictConfig) -> str:
    return str(cfg.dataset.get("name") or _choice("dataset") or Path(str(cfg.dataset.path)).stem)


def model_label(cfg: DictConfig) -> str:
    """The model preset name when known (``enn_small``), else the model family (``enn``)."""
    return str(_choice("model") or cfg.model.name)


def resolve_run_dir(cfg: DictConfig) -> Path:
    """``<output_root>/<run_name>``; run_name defaults to ``<model>_<dataset>_<time>`` (``_<job>`` in sweeps).

    ``resume=true`` without run_name picks the newest run of this model and dataset that has ``last.pt``
    and is not a trial of an Optuna sweep (:mod:`lattice_lab.sweeps.trial`).
    """
    root = Path(to_absolute_path(str(cfg.output_root)))
    prefix = f"{model_label(cfg)}_{dataset_name(cfg)}_"
    if cfg.run_name:
        return root / check_run_name(cfg.run_name)
    if check_flag(cfg.resume, "resume"):
        runs = [p for p in root.glob(prefix + "*") if (p / "last.pt").is_file()]
        candidates = sorted((p for p in runs if not is_trial_dir(p)), key=lambda p: (p / "last.pt").stat().st_mtime)
        trials = f"; {len(runs) - len(candidates)} sweep trial folders skipped" if len(runs) > len(candidates) else ""
        if not candidates:
            raise ConfigError(f"resume=true: no run {root / (prefix + '*')}/last.pt to resume{trials} "
                              "(set run_name=... to pick one)")
        log.info("resume=true without run_name: %s is the newest run of %s* with last.pt%s", candidates[-1].name,
                 prefix, trials)
        return candidates[-1]
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    job = _job_num()
    name = prefix + stamp + (f"_{job}" if job is not None else "")
    path, i = root / name, 1
    while path.exists():
        path, i = root / f"{name}_{i}", i + 1
    return path


def _dataset_path(cfg: DictConfig) -> Path:
    if "path" not in cfg.dataset or not cfg.dataset.path:
        raise ConfigError("dataset.path is not set (the dataset preset must say where its HDF5 file is)")
    path = Path(to_absolute_path(str(cfg.dataset.path)))
    if path.is_dir():
        raise ConfigError(f"dataset.path={str(cfg.dataset.path)!r}: is a folder; name the dataset's HDF5 file "
                          "(e.g. runs/data/holstein_L16.h5)")
    if not path.is_file():
        raise ConfigError(f"dataset.path={str(cfg.dataset.path)!r}: file not found; generate it with "
                          f"`python -m lattice_lab.generate dataset={_choice('dataset') or dataset_name(cfg)}`")
    return path


def _same_setting(given, own) -> bool:
    if isinstance(own, str):
        return str(given) == own
    return math.isclose(number_or_nan(given), float(own), rel_tol=1e-9, abs_tol=1e-12)


def describe_dataset(cfg: DictConfig, data, data_path: Path) -> None:
    """Make ``cfg.dataset``, which the run saves (config.yaml, checkpoints) and logs, describe the file it reads.

    ``dataset.path`` may name any file (``dataset=holstein_L8_tiny dataset.path=runs/data/ref16.h5``): the file's
    own name and L, and its build settings where it stores them (generate does), replace the preset's, with a
    warning naming both. A Hamiltonian setting of the config (``dataset.temperature``, ``hamiltonian.*`` where one
    is given) other than the file's is refused: the model is built for the file's Hamiltonian.
    """
    from lattice_lab.data.h5io import HAMILTONIAN_ATTRS

    own = data.hamiltonian().as_dict()
    for section in ("dataset", "hamiltonian"):
        given = cfg.get(section) or {}
        for key in HAMILTONIAN_ATTRS:
            if key in given and not _same_setting(given[key], own[key]):
                raise ConfigError(f"{section}.{key}={given[key]!r}: the dataset file {data_path} ({data.name}) holds "
                                  f"forces for {key}={own[key]!r}, and the model is built for the file's Hamiltonian "
                                  f"(use the dataset preset it was built with, or {section}.{key}={own[key]!r})")
    preset = OmegaConf.to_container(cfg.dataset, resolve=True)
    record = {"name": data.name, "path": preset["path"], "L": data.L}
    settings = data.build_settings() or {"temperature": own["temperature"]}  # a file generate did not write
    record.update({k: v for k, v in settings.items() if k not in record})
    if (preset.get("name"), preset.get("L")) != (record["name"], record["L"]):
        log.warning("dataset.path=%s holds dataset %s (L=%d), not the preset's %s (L=%s): the run records the "
                    "file's name, L and build settings", preset["path"], record["name"], record["L"],
                    preset.get("name"), preset.get("L"))
    with open_dict(cfg):
        cfg.dataset = record


def _optional_flops(model) -> float | None:
    for module in ("lattice_lab.models.flops", "lattice_lab.models.registry"):
        try:
            mod = __import__(module, fromlist=["flops_per_site"])
            fn = getattr(mod, "flops_per_site", None)
            if fn is not None:
                return float(fn(model))
        except Exception:  # noqa: BLE001 - optional extra
            continue
    return None


def interrupted_message(run_dir: Path | None) -> str:
    """What Ctrl-C leaves of a run: ``last.pt``, saved after every epoch, and how to continue it."""
    last = run_dir / "last.pt" if run_dir is not None else None
    if last is None or not last.is_file():
        where = f" ({run_dir} holds no last.pt)" if run_dir is not None else ""
        return f"before the first epoch finished: nothing to resume{where}; run the command again"
    from lattice_lab.models.checkpoint import load_checkpoint

    try:  # the file itself: it is written atomically, so it is either the previous epoch or this one
        epoch = f"epoch {int(load_checkpoint(last)['epoch'])}"
    except (ConfigError, KeyError, TypeError, ValueError):
        epoch = "epoch unknown"
    return (f"{last} holds the last finished epoch ({epoch}; the one under way is lost); "
            f"rerun with resume=true run_name={run_dir.name} to continue")


def run(cfg: DictConfig) -> float:
    """Train, evaluate, log; return the best validation RMSE.

    Ctrl-C raises :class:`~lattice_lab.common.errors.Interrupted`, which says where the last checkpoint is
    and how to continue (the MLflow run is marked KILLED; ``friendly_errors`` prints the one line)."""
    where: dict = {}
    with interrupts_as(lambda: interrupted_message(where.get("run_dir"))):
        return _run(cfg, where)


def _run(cfg: DictConfig, where: dict) -> float:
    """:func:`run`; ``where["run_dir"]`` is set as soon as the run folder is known."""
    import torch

    from lattice_lab.common.device import MODEL_DTYPES, resolve_device, resolve_dtype
    from lattice_lab.common.seeding import check_seed, seed_everything
    from lattice_lab.data.h5io import read_force_dataset
    from lattice_lab.models.base import check_reach
    from lattice_lab.models.checkpoint import load_checkpoint
    from lattice_lab.models.registry import build_model, count_parameters
    from lattice_lab.sweeps.parent import current_parent_run_id
    from lattice_lab.tracking.mlflow_utils import TrackingSettings, standard_tags, start_run
    from lattice_lab.training.config import TrainerConfig
    from lattice_lab.training.trainer import Trainer

    t_start = time.perf_counter()
    # every setting is checked before anything is read or written (a typo is not found after training)
    resume, plots = check_flag(cfg.resume, "resume"), check_flag(cfg.get("plots", True), "plots")
    TrackingSettings.from_config(cfg)
    TrainerConfig.from_config(cfg.trainer)
    device, dtype = resolve_device(cfg.device), resolve_dtype(cfg.dtype, MODEL_DTYPES)
    seed = check_seed(cfg.seed)
    data_path = _dataset_path(cfg)
    data = read_force_dataset(data_path)
    describe_dataset(cfg, data, data_path)  # before the run is named after it (<model>_<dataset>_<time>)
    run_dir = where["run_dir"] = resolve_run_dir(cfg)
    if not resume and (run_dir / "last.pt").exists():
        raise ConfigError(f"run_name={run_dir.name!r}: {run_dir} already holds a run "
                          "(resume=true continues it, or choose another run_name)")
    seed_everything(seed)
    where_model = f"model={model_label(cfg)} on dataset {dataset_name(cfg)} ({data_path})"
    cutoff = cfg.model.get("cutoff")  # an environment's reach is floor(cutoff): checked before the model is
    if isinstance(cutoff, (int, float)) and not isinstance(cutoff, bool) and math.isfinite(cutoff):  # built, whose
        try:  # size grows as cutoff^4 (model.cutoff=100 was built until memory ran out)
            check_reach(data.L, math.floor(cutoff))
        except ConfigError as exc:
            raise ConfigError(f"{where_model}: model.cutoff={cutoff}: {exc}") from None
    model = build_model(cfg.model, data.hamiltonian())
    try:  # before the run folder is written: a dataset smaller than the model's reach is refused now
        model.check_input(torch.zeros(1, data.L, data.L))
    except ConfigError as exc:
        raise ConfigError(f"{where_model}: {exc}") from None
    cfg_yaml = OmegaConf.to_yaml(cfg, resolve=True)

    # built before the MLflow run is (re)opened: a refused resume (other data or settings) leaves that run as it was
    if resume:
        log.info("resuming %s", run_dir)
    try:
        trainer = Trainer(model, data, cfg.trainer, device=device, dtype=dtype, out_dir=run_dir,
                          seed=seed, resume=resume,
                          meta={"config": cfg_yaml, "dataset_path": str(data_path), "dataset_name": dataset_name(cfg)})
    except ConfigError as exc:
        if resume and not cfg.run_name:
            raise ConfigError(f"{exc}; resume=true without run_name picked it as the newest run of this model and "
                              "dataset: set run_name=... to resume another") from None
        raise
    config_file = run_dir / ("config_resume.yaml" if resume else "config.yaml")
    atomic_write_text(config_file, cfg_yaml)
    trial = current_trial()
    if trial is not None:  # marks the folder as a sweep's (resume=true without run_name skips it)
        atomic_write_text(run_dir / TRIAL_FILE, OmegaConf.to_yaml(OmegaConf.create(trial)))
    run_id = load_checkpoint(run_dir / "last.pt").get("mlflow_run_id") if resume else None
    parent = cfg.tracking.get("parent_run_id") or current_parent_run_id()
    tags = standard_tags("train", model_family=str(cfg.model.name), dataset_path=data_path, device=device,
                         model_preset=model_label(cfg), dataset=dataset_name(cfg), run_dir=str(run_dir),
                         dtype=str(cfg.dtype), data_content_sha256=trainer.data_sha256[:16],
                         run_kind="single" if _job_num() is None else "sweep_trial" if trial else "multirun_job",
                         sweep_study=trial and trial["study"])
    with start_run(task="train", cfg=cfg, run_name=run_dir.name, tags=tags, run_id=run_id,
                   parent_run_id=parent) as tracker:
        tracker.log_params(cfg)
        tracker.log_artifact(config_file)
        static = {"n_params": count_parameters(model), "n_train_configs": int((~data.is_val).sum()),
                  "n_val_configs": int(data.is_val.sum()), "lattice_L": data.L}  # metric L: domain size L(t)
        flops = _optional_flops(model)
        if flops is not None:
            static["flops_per_site"] = flops
        tracker.log_metrics(static, step=0)

        trainer.tracker = tracker
        best_val = trainer.fit()

        # the best model, evaluated afresh on both splits
        trainer.load_best()
        pred = {"train": (trainer.predict(trainer.Q_train), trainer.F_train),
                "val": (trainer.predict(trainer.Q_val), trainer.F_val)}
        from lattice_lab.training.metrics import error_report, sigma_by_kind

        where_in_file = {split: data.indices(split) for split in pred}
        kinds = {split: data.kind[idx] for split, idx in where_in_file.items()}
        densities = {split: data.n[idx] for split, idx in where_in_file.items()}  # exact: the local order phi_i
        final = {}
        for split, (p, f) in pred.items():  # overall, per kind (final/val_quench_sigma), walls and domains apart
            final.update(error_report(p, f, kinds[split], densities[split], prefix=f"final/{split}_"))
        final["final/best_epoch"] = trainer.best_epoch
        final["final/epochs"] = trainer.epoch
        final["final/train_time_s"] = trainer.elapsed
        tracker.log_metrics(final, step=trainer.epoch)
        tracker.set_tags({"stop_reason": trainer.stop_reason, "best_epoch": trainer.best_epoch})
        atomic_write_text(run_dir / "final_metrics.yaml", OmegaConf.to_yaml(OmegaConf.create(final)))

        if plots:
            from lattice_lab.data.generation import quench_times
            from lattice_lab.tracking.plots import (
                configuration_error_figures,
                error_histogram,
                learning_curve,
                parity_plot,
                save_figure,
            )

            # which run it is (runs of one model on one dataset differ in seed, settings, length)
            label = (f"{model_label(cfg)} on {dataset_name(cfg)}\n"
                     f"run {run_dir.name}, best epoch {trainer.best_epoch} of {trainer.epoch}")
            for fname, fn in (("parity.png", parity_plot), ("error_hist.png", error_histogram)):
                fig = fn({k: (p.cpu(), f.cpu()) for k, (p, f) in pred.items()}, title=label)
                save_figure(fig, run_dir / fname, close=True)
                tracker.log_artifact(run_dir / fname, "plots")
            save_figure(learning_curve(trainer.history, trainer.best_epoch, title=label), run_dir / "learning_curve.png",
                        close=True)
            tracker.log_artifact(run_dir / "learning_curve.png", "plots")
            sets = {split: (p, f, kinds[split], densities[split], where_in_file[split]) for split, (p, f) in pred.items()}
            for fname, fig in configuration_error_figures(sets, quench_times(data), title=label).items():
                save_figure(fig, run_dir / fname, close=True)
                tracker.log_artifact(run_dir / fname, "plots")
        tracker.log_artifact(run_dir / "metrics.csv")
        tracker.log_artifact(run_dir / "final_metrics.yaml")
        tracker.log_artifact(run_dir / "best.pt", "checkpoints")
        del pred
        if device.type == "cuda":
            torch.cuda.empty_cache()

    print(f"[train] {model_label(cfg)} on {dataset_name(cfg)}: best val RMSE {best_val:.5g} "
          f"(sigma {final['final/val_sigma']:.5g}{sigma_by_kind(final, 'final/val_')}) at epoch {trainer.best_epoch}/{trainer.epoch} "
          f"[{trainer.stop_reason}], {time.perf_counter() - t_start:.1f} s -> {run_dir}")
    if tracker.run_id:
        print(f"[train] MLflow run {tracker.run_id} ({tracker.uri})")
    return float(best_val)


@hydra_errors
@hydra.main(config_path=CONFIG_DIR, config_name="train")
@friendly_errors
def main(cfg: DictConfig) -> float:
    return run(cfg)


if __name__ == "__main__":
    main()
