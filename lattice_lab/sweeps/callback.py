"""Hydra callback that gives every sweep one MLflow parent run and a table of its trials.

Configured by ``conf/hparams_search/*.yaml`` (``hydra.callbacks.mlflow_sweep``). In the launching
process it

* on multirun start: offsets the sampler seed of a resumed study by its trial count (so a resumed
  sweep draws new points, not its first ones again), finds or creates the parent run for the Optuna study (the same parent is
  reused when an interrupted sweep is resumed, matched by the study name) and publishes its id so
  each trial's MLflow run is created as its child;
* on multirun end: writes ``trials.csv`` (number, params, value, state, MLflow run id) and
  ``best_config.yaml`` (the best trial, as the overrides and command of one run that retrains it) into the sweep folder, logs both
  to the parent run with the best value, and closes the parent.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from lattice_lab.common.cli import CONFIG_DIR, multirun_refused, refuse_multirun
from lattice_lab.common.errors import ConfigError
from lattice_lab.common.seeding import check_seed
from lattice_lab.common.switch import check_flag
from lattice_lab.sweeps.parent import FILE_NAME as PARENT_FILE
from lattice_lab.sweeps.parent import publish_parent_run_id
from lattice_lab.sweeps.trial import study_name
from lattice_lab.tracking.mlflow_utils import TrackingSettings

log = logging.getLogger(__name__)
SAMPLER_SEED_MAX = 2**32 - 1  # Optuna's samplers seed numpy.random.RandomState
STUDY_TAG = "lattice_lab.study"


def client_and_experiment(config: DictConfig):
    """MLflow client and experiment id of the swept task (``lattice_lab/<hydra job name>``)."""
    from mlflow.tracking import MlflowClient

    from lattice_lab.tracking.mlflow_utils import (
        experiment_name,
        get_or_create_experiment,
        quiet_mlflow,
        resolve_tracking_uri,
    )

    quiet_mlflow()
    section = config.get("tracking") or {}
    settings = TrackingSettings.from_config(section)
    uri = resolve_tracking_uri(settings.uri)
    task = str(config.hydra.job.name).split(".")[-1]
    exp_id = get_or_create_experiment(experiment_name(task, section), uri, settings.artifact_root)
    return MlflowClient(tracking_uri=uri), exp_id


def _study_name(config: DictConfig) -> str:
    return study_name(config.hydra.sweeper)


def check_sampler_seed(seed) -> int:
    """The sampler's seed, refused (naming it and the run's ``seed``, which the search files pass on) unless
    Optuna's samplers take it: they seed numpy's 32-bit Mersenne twister, and a larger seed failed inside
    Optuna after the sweep had started."""
    try:
        return check_seed(seed, "hydra.sweeper.sampler.seed", SAMPLER_SEED_MAX, bits=32)
    except ConfigError as exc:
        raise ConfigError(f"{exc}; the search files set it to the run's seed: give seed= (or "
                          f"hydra.sweeper.sampler.seed=) from 0 to {SAMPLER_SEED_MAX}") from None


def offset_sampler_seed(config: DictConfig) -> int | None:
    """Seed the sampler of a resumed study with ``seed + <trials already in the study>``.

    Hydra builds the sampler after this callback's start, from ``hydra.sweeper.sampler.seed``. With the
    configured seed as is, a resumed sweep would draw the very points of its first invocation again
    (a seeded sampler restarts its random stream), so "n_trials more" would repeat old trials. The
    offset keeps a resumed sweep reproducible (it depends only on the stored study) and new.
    Returns the seed set, or None when nothing changed (new study, no seed, no storage, grid / QMC).
    """
    sweeper = config.hydra.get("sweeper") or {}
    sampler, storage = sweeper.get("sampler"), sweeper.get("storage")
    if sampler is None or sampler.get("seed") is None:
        return None
    check_sampler_seed(sampler.seed)
    if not storage:
        return None
    if str(sampler.get("_target_", "")).endswith(("GridSampler", "QMCSampler")):
        return None  # these find their place in the stored trials (the grid's order depends on the seed)
    import optuna

    try:
        study = optuna.load_study(study_name=_study_name(config), storage=str(storage))
    except KeyError:  # a new study
        return None
    n = len(study.get_trials(deepcopy=False))
    if not n:
        return None
    seed = (int(sampler.seed) + n) % (SAMPLER_SEED_MAX + 1)  # kept a seed the sampler takes
    # as a hydra override too: each trial's config is composed again from those and must match
    with read_write(config.hydra), open_dict(config.hydra):
        sampler.seed = seed
        config.hydra.overrides.hydra.append(f"hydra.sweeper.sampler.seed={seed}")
    log.info("sweep %s: %d trials stored; sampler seed %d", _study_name(config), n, seed)
    return seed


def prepare_storage(config: DictConfig) -> None:
    """Create the folder of a sqlite study storage, as every output folder is created: the default
    ``sqlite:///runs/optuna.db`` is relative to the working directory, and a sweep started where there is
    no ``runs/`` (or given a storage in a new folder) failed in Optuna with 'unable to open database file'."""
    from lattice_lab.tracking.mlflow_utils import local_store

    storage = (config.hydra.get("sweeper") or {}).get("storage")
    store = local_store(str(storage)) if storage else None
    if store is not None and store[0] == "sqlite":
        store[1].parent.mkdir(parents=True, exist_ok=True)


RERUN_GROUPS = ("hamiltonian", "dataset", "model", "trainer")  # presets a single rerun must name


def _is_sweep(override: str) -> bool:
    """Whether a command-line override is a sweep (``choice(...)``, ``range(...)``, ``a,b``, ``tag(...)``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        return OverridesParser.create().parse_override(override).is_sweep_override()
    except Exception:  # noqa: BLE001 - Hydra parsed it once already; by its functions where it does not now
        return any(f in override for f in ("choice(", "range(", "interval(", "tag(", "glob("))


def fixed_overrides(config: DictConfig) -> list[str]:
    """The sweep's settings that are not searched, as the overrides of one plain (not multirun) run:
    the presets the search config chose (e.g. its family's model), the command-line overrides without
    their sweeps (``choice(...)``, ``a,b``, ...) and ``hparams_search``, and every value the search config itself sets
    (``optuna_base``'s ``trainer.max_epochs``, ``trainer.patience``, ...). With a trial's values they
    compose that trial's config."""
    searched = set((config.hydra.sweeper.get("params") or {}).keys())
    task = [str(o) for o in config.hydra.overrides.get("task", [])]

    def key(o: str) -> str:
        return o.split("=", 1)[0].lstrip("+~")

    # a sweep (choice(...), a comma list, ...) is what the trials drew; a plain value is kept, also for a key the
    # search config searches: Optuna takes it out of the search space and every trial trains with it
    out = [o for o in task if key(o) != "hparams_search" and not _is_sweep(o)]
    choices = config.hydra.runtime.get("choices") or {}
    given = {key(o) for o in out}
    presets = [f"{g}={choices[g]}" for g in RERUN_GROUPS if choices.get(g) and g not in given]
    return presets + out + search_config_settings(config, presets + out, searched)


def _leaves(node, prefix: str = "") -> dict:
    """Dotted key -> value of every non-mapping value (lists are values, as in an override)."""
    if not isinstance(node, dict) or (not node and prefix):
        return {prefix: node}
    out = {}
    for k, v in node.items():
        out.update(_leaves(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def search_config_settings(config: DictConfig, overrides: list[str], searched=()) -> list[str]:
    """Overrides for what the sweep's config holds beyond ``overrides`` composed alone: the values the
    search config (``conf/hparams_search/*``) sets, which a plain run without it would not get."""
    from lattice_lab.sweeps.report import override_value  # optuna: imported where needed

    name = config.hydra.job.get("config_name") or "train"
    try:
        if GlobalHydra.instance().is_initialized():  # in the sweep's process, as Hydra started it
            plain = compose(name, overrides=list(overrides))
        else:
            with initialize_config_dir(config_dir=CONFIG_DIR):
                plain = compose(name, overrides=list(overrides))
    except Exception as exc:  # noqa: BLE001 - the report (trials.csv) must be written all the same
        log.warning("best_config.yaml: cannot compose %s without the search config (%s: %s); its command "
                    "lists the sweep's presets and overrides only", name, type(exc).__name__, exc)
        return []

    def leaves(cfg):
        tree = OmegaConf.to_container(cfg, resolve=False)
        tree.pop("hydra", None)
        return _leaves(tree)

    swept, alone = leaves(config), leaves(plain)
    out = [f"{'' if k in alone else '+'}{k}={override_value(v)}" for k, v in swept.items()
           if k not in searched and (k not in alone or alone[k] != v)]
    return out + [f"~{k}" for k in alone if k not in swept]


def record_sampler(client, run_id: str, config: DictConfig) -> None:
    """What drew this invocation's trials, on the sweep's parent run: tag ``sampler`` (its class) and metric
    ``sampler_seed`` at step = the invocation (0, 1, ... for a resumed study, whose seed is offset by
    :func:`offset_sampler_seed`), so every sweep's draws can be reproduced from MLflow alone."""
    sampler = config.hydra.sweeper.get("sampler") or {}
    if sampler.get("_target_"):
        client.set_tag(run_id, "sampler", str(sampler.get("_target_")))
    if sampler.get("seed") is not None:
        invocation = len(client.get_metric_history(run_id, "sampler_seed"))
        client.log_metric(run_id, "sampler_seed", int(sampler.get("seed")), step=invocation)


class MlflowSweepCallback(Callback):
    def __init__(self, enabled: bool = True) -> None:
        self.enabled = check_flag(enabled, "hydra.callbacks.mlflow_sweep.enabled")
        self.parent_run_id: str | None = None

    # ------------------------------------------------------------------ start
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        prepare_storage(config)
        try:
            offset_sampler_seed(config)
        except ConfigError as exc:  # Hydra only warns of a callback's error: the sweeper then fails on the seed
            refuse_multirun(exc)
            raise
        if not self.enabled or not TrackingSettings.from_config(config.get("tracking")).enabled:
            return
        client, experiment_id = client_and_experiment(config)
        study = _study_name(config)
        existing = client.search_runs(
            [experiment_id], filter_string=f"tags.`{STUDY_TAG}` = '{study}'", max_results=1,
            order_by=["attributes.start_time DESC"])
        # run_kind / sweep_study as on the trials: --filter "tags.sweep_study IS NULL" leaves out both
        kind = {"run_kind": "sweep", "sweep_study": study}
        if existing:
            self.parent_run_id = existing[0].info.run_id
            client.update_run(self.parent_run_id, status="RUNNING")
            for k, v in kind.items():  # a parent created before these tags
                client.set_tag(self.parent_run_id, k, v)
            log.info("sweep %s: resuming MLflow parent run %s", study, self.parent_run_id)
        else:
            run = client.create_run(experiment_id, run_name=f"sweep-{study}",
                                    tags={STUDY_TAG: study, "lattice_lab.task": "sweep", **kind})
            self.parent_run_id = run.info.run_id
            storage = config.hydra.sweeper.get("storage")
            client.log_param(self.parent_run_id, "study_name", study)
            client.log_param(self.parent_run_id, "storage", str(storage))
            params = config.hydra.sweeper.get("params")
            space = OmegaConf.to_container(params) if params is not None else {}
            client.log_param(self.parent_run_id, "search_space", str(space)[:6000])
            log.info("sweep %s: MLflow parent run %s", study, self.parent_run_id)
        record_sampler(client, self.parent_run_id, config)
        publish_parent_run_id(self.parent_run_id, sweep_dir)

    # ------------------------------------------------------------------ end
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from lattice_lab.sweeps.report import write_study_report

        if multirun_refused():  # nothing started
            return
        sweep_dir = Path(config.hydra.sweep.dir)
        id_file = sweep_dir / PARENT_FILE  # Hydra may call start and end on different callback instances
        if self.parent_run_id is None and id_file.is_file():
            self.parent_run_id = id_file.read_text().strip() or None
        client, run_params = None, {}
        if self.parent_run_id is not None:
            client, experiment_id = client_and_experiment(config)
            children = client.search_runs(
                [experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{self.parent_run_id}'",
                max_results=5000)
            run_params = {run.info.run_id: dict(run.data.params) for run in children}
        storage = config.hydra.sweeper.get("storage")
        report = None
        if storage:
            report = write_study_report(str(storage), _study_name(config), sweep_dir, run_params=run_params,
                                        fixed_overrides=fixed_overrides(config))
        if client is None:
            return
        if report is not None:
            for path in report["files"]:
                client.log_artifact(self.parent_run_id, str(path), artifact_path="sweep")
            if report["best_value"] is not None:
                client.log_metric(self.parent_run_id, "best/value", float(report["best_value"]))
            client.log_metric(self.parent_run_id, "n_trials_complete", report["n_complete"])
            client.log_metric(self.parent_run_id, "n_trials_failed", report["n_failed"])
        client.set_terminated(self.parent_run_id, status="FINISHED")
