"""The one MLflow module of the project: tracking store, experiments, runs, params, metrics, artifacts.

Every entrypoint (train, simulate, analyze, bench, sweeps) tracks through this module:

    from lattice_lab.tracking.mlflow_utils import start_run, standard_tags

    with start_run(task="simulate", cfg=cfg, run_name=name,
                   tags=standard_tags("simulate", device=device)) as tracker:
        tracker.log_params(cfg)                      # flattened, dotted keys
        tracker.log_metrics({"energy": e}, step=s)
        tracker.log_figure(fig, "plots/corr.png")
        tracker.log_artifact(path, "trajectory")

Store: ``tracking.uri`` in the config, else ``MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/runs/mlflow.db``
with artifacts under ``runs/mlartifacts`` (for any sqlite store: ``mlartifacts/`` beside the
database; MLflow 3 needs the artifact location set when the experiment is created). Experiment:
``tracking.experiment``, else ``lattice_lab/<task>``. ``tracking.enabled=false`` gives a tracker
whose methods do nothing.

Tracking never loses a run: every MLflow call is guarded; a failure warns once per kind of call
and the run continues without it. A store URI of a scheme MLflow has no store for (``bogus://x``) is
no failure of the store but a wrong setting: with tracking on it is a ConfigError, raised when the
``tracking`` section is read (:meth:`TrackingSettings.from_config`, which every entrypoint calls
before it starts: :func:`lattice_lab.common.cli.friendly_errors`).
"""

from __future__ import annotations

import contextlib
import csv
import getpass
import hashlib
import io
import logging
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

from lattice_lab.common.errors import ConfigError, Interrupted
from lattice_lab.common.switch import check_flag

MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value
_BATCH = 100  # MLflow's limit on params/tags per log_batch call
_METRIC_BATCH = 1000
DEFAULT_DB = "runs/mlflow.db"
DEFAULT_ARTIFACTS = "runs/mlartifacts"
EXPERIMENT_PREFIX = "lattice_lab/"

log = logging.getLogger(__name__)


# -- configuration ---------------------------------------------------------------------------------
def _abs(path: str | os.PathLike) -> Path:
    """Resolve a repo-relative path like every config path (``hydra.utils.to_absolute_path``)."""
    try:
        from hydra.utils import to_absolute_path

        return Path(to_absolute_path(str(path)))
    except Exception:  # noqa: BLE001 - outside Hydra
        return Path(path).resolve()


def _to_container(cfg) -> Any:
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(cfg, (DictConfig, ListConfig)):
            return OmegaConf.to_container(cfg, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return cfg


@dataclass
class TrackingSettings:
    """The ``tracking`` config section (all keys optional)."""

    enabled: bool = True
    uri: str | None = None
    experiment: str | None = None
    artifact_root: str | None = None
    parent_run_id: str | None = None
    tags: dict = field(default_factory=dict)

    @classmethod
    def from_config(cls, cfg=None) -> TrackingSettings:
        """Accept a full entrypoint config (uses ``cfg.tracking``), the section itself, or None."""
        cfg = _to_container(cfg)
        if cfg is None:
            return cls()
        if isinstance(cfg, TrackingSettings):
            return cfg
        if not isinstance(cfg, dict):
            raise ConfigError(f"tracking={cfg!r}: expected a mapping")
        section = cfg.get("tracking", cfg) if "tracking" in cfg else cfg
        section = section or {}
        known = {k: section[k] for k in ("enabled", "uri", "experiment", "artifact_root", "parent_run_id", "tags")
                 if k in section}
        out = cls(**known)
        out.tags = dict(out.tags or {})
        if out.enabled is not None:  # null: off here (analyze decides it before, see its tracking_enabled)
            check_flag(out.enabled, "tracking.enabled")
        out.enabled = bool(out.enabled)
        if out.enabled:
            check_tracking_uri(out.uri)
        return out


def resolve_tracking_uri(uri: str | None = None) -> str:
    """Explicit ``uri`` > ``MLFLOW_TRACKING_URI`` > ``sqlite:///<abs>/runs/mlflow.db``."""
    if uri:
        return str(uri)
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{_abs(DEFAULT_DB)}"


def check_tracking_uri(uri: str | None = None, label: str | None = None) -> str:
    """The store URI (:func:`resolve_tracking_uri` of ``uri``); a ConfigError unless MLflow has a tracking store
    for its scheme. ``label`` names the setting in the error (default: ``tracking.uri=...``, or
    ``MLFLOW_TRACKING_URI=...`` where the URI comes from there). Whether the store answers is not asked: a
    store that is down is no wrong setting, and only warns (:func:`start_run`)."""
    resolved = resolve_tracking_uri(uri)
    try:
        from mlflow.tracking._tracking_service.utils import _tracking_store_registry as registry
    except ImportError:  # pragma: no cover - MLflow moved its registry: its own error, where the store is opened
        return resolved
    try:
        registry.get_store_builder(resolved)
    except Exception:  # noqa: BLE001 - MLflow's UnsupportedModelRegistryStoreURIException (sic)
        if label is None:
            label = f"tracking.uri={str(uri)!r}" if uri else f"MLFLOW_TRACKING_URI={resolved!r}"
        schemes = ", ".join(sorted(s for s in getattr(registry, "_registry", {}) if s))
        raise ConfigError(f"{label}: MLflow has no tracking store for the scheme {urlparse(resolved).scheme!r} "
                          f"(known: {schemes}; e.g. sqlite:///runs/mlflow.db, a folder or http://host:5000)") from None
    return resolved


def check_existing_store(uri: str, label: str) -> None:
    """For what only reads a store (compare_runs' table, a checkpoint given as an MLflow run id): a URI MLflow
    has a store for, and, for a local store, one that exists; MLflow would create an empty one."""
    check_tracking_uri(uri, label)
    store = local_store(uri)
    if store is None:
        return
    kind, path = store
    if kind == "sqlite" and not path.is_file():
        raise ConfigError(f"{label}: no database {path} (expected the sqlite file a task logged to, "
                          "e.g. sqlite:///runs/mlflow.db)")
    if kind == "file" and path.is_file():
        raise ConfigError(f"{label}: a file, not a tracking store folder (a sqlite database is "
                          f"sqlite:///{path.resolve()})")
    if kind == "file" and not path.is_dir():
        raise ConfigError(f"{label}: no such tracking store {path} (expected sqlite:///<database file>, "
                          "an existing file store folder or an http(s) server)")


def local_store(uri: str) -> tuple[str, Path] | None:
    """Where a local tracking store lives: ``("sqlite", database file)`` for ``sqlite:///<path>``,
    ``("file", folder)`` for ``file:<path>`` or a plain path (MLflow's file store); None for a server
    or an in-memory database. A relative path is relative to the working directory, as MLflow reads it."""
    if uri.startswith("sqlite:///"):
        db = uri[len("sqlite:///"):].split("?", 1)[0]
        return ("sqlite", Path(db)) if db and db != ":memory:" else None
    scheme = urlparse(uri).scheme
    if scheme == "file":
        return "file", Path(url2pathname(urlparse(uri).path))
    return ("file", Path(uri)) if not scheme and uri != "databricks" else None


def default_artifact_root(uri: str, artifact_root: str | None = None) -> str | None:
    """Artifact location for new experiments: explicit, else ``mlartifacts/`` beside a sqlite db."""
    if artifact_root:
        return _abs(artifact_root).as_uri()
    store = local_store(uri)
    if store is not None and store[0] == "sqlite":
        return (store[1].resolve().parent / "mlartifacts").as_uri()
    return None  # MLflow's own default (servers, file stores)


_QUIET_DONE = False


def quiet_mlflow() -> None:
    """Silence MLflow 3's noise (db migration INFO logs, git-python warnings); keep real warnings."""
    global _QUIET_DONE
    if _QUIET_DONE:
        return
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    for name in ("alembic", "alembic.runtime.migration", "mlflow.store.db.utils", "mlflow.store.sqlalchemy_store",
                 "mlflow.tracking.fluent", "mlflow.utils.git_utils", "mlflow.tracking._tracking_service.client"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"mlflow\..*")
    warnings.filterwarnings("ignore", message=r".*pkg_resources is deprecated.*")
    _QUIET_DONE = True


def setup_tracking(cfg=None) -> str:
    """Point MLflow at the configured store (see module doc) and return its URI."""
    import mlflow

    quiet_mlflow()
    uri = resolve_tracking_uri(TrackingSettings.from_config(cfg).uri)
    store = local_store(uri)
    if store is not None and store[0] == "sqlite":
        store[1].resolve().parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    return uri


def experiment_name(task: str | None = None, cfg=None) -> str:
    """``tracking.experiment`` if set, else ``lattice_lab/<task>``."""
    settings = TrackingSettings.from_config(cfg)
    if settings.experiment:
        return str(settings.experiment)
    if not task:
        raise ValueError("experiment_name: give a task or set tracking.experiment")
    return EXPERIMENT_PREFIX + task


def get_or_create_experiment(name: str, uri: str | None = None, artifact_root: str | None = None) -> str:
    """Experiment id of ``name``; created (with its artifact location) when missing."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    uri = uri or resolve_tracking_uri()
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=default_artifact_root(uri, artifact_root))
    except MlflowException:  # created concurrently by another process
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


# -- params ----------------------------------------------------------------------------------------
def flatten_config(cfg, prefix: str = "", sep: str = ".") -> dict[str, str]:
    """Nested config -> ``{"model.hidden": "32", ...}``: dotted keys, lists and scalars as strings,
    values cut to MLflow's 6000-character limit. ``hydra`` sections are skipped."""
    cfg = _to_container(cfg)
    out: dict[str, str] = {}

    def visit(node, key):
        if isinstance(node, dict):
            if not node and key:
                out[key] = "{}"
            for k, v in node.items():
                if not key and k == "hydra":
                    continue
                visit(v, f"{key}{sep}{k}" if key else str(k))
        else:
            value = "null" if node is None else str(list(node) if isinstance(node, tuple) else node)
            if len(value) > MAX_PARAM_LENGTH:
                value = value[:MAX_PARAM_LENGTH - 3] + "..."
            out[key] = value

    visit(cfg if cfg is not None else {}, prefix)
    return out


# -- standard tags ---------------------------------------------------------------------------------
def file_sha256(path: str | os.PathLike, short: int | None = 12) -> str:
    """SHA-256 of a file (hex; the first ``short`` characters, or all with ``short=None``)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    digest = h.hexdigest()
    return digest[:short] if short else digest


def git_commit(repo: str | os.PathLike | None = None) -> str | None:
    """HEAD commit of the repository holding the package (None outside git)."""
    repo = Path(repo) if repo else Path(__file__).resolve().parents[2]
    try:
        res = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() or None if res.returncode == 0 else None


def git_dirty(repo: str | os.PathLike | None = None) -> bool | None:
    """True when tracked files of that repository differ from HEAD: ``git_commit`` alone does not
    give the code that ran (None outside git)."""
    repo = Path(repo) if repo else Path(__file__).resolve().parents[2]
    try:
        res = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                             capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return bool(res.stdout.strip()) if res.returncode == 0 else None


def standard_tags(task: str, *, model_family: str | None = None, dataset_path=None, device=None,
                  **extra) -> dict[str, str]:
    """Tags every run carries: task, model family, dataset sha256 (short), git commit and whether the
    tree had uncommitted changes, device, torch version, host (plus ``extra``; None values are dropped)."""
    import torch

    import lattice_lab

    tags = {
        "task": task,
        "model_family": model_family,
        "dataset_sha256": file_sha256(dataset_path) if dataset_path and Path(dataset_path).is_file() else None,
        "dataset_path": str(dataset_path) if dataset_path else None,
        "git_commit": git_commit(),
        "git_dirty": git_dirty(),
        "device": str(device) if device is not None else None,
        "torch_version": torch.__version__,
        "lattice_lab_version": lattice_lab.__version__,
        "host": socket.gethostname(),
        **extra,
    }
    if device is not None and str(device).startswith("cuda"):
        with contextlib.suppress(Exception):
            tags["gpu"] = torch.cuda.get_device_name(torch.device(str(device)))
    return {k: str(v) for k, v in tags.items() if v is not None}


# -- the tracker -----------------------------------------------------------------------------------
class Tracker:
    """Logging handle of one MLflow run; every method is a no-op when tracking is disabled and
    turns MLflow failures into a single warning per method (the run goes on)."""

    def __init__(self, run_id: str | None = None, uri: str | None = None, experiment_id: str | None = None):
        self.run_id = run_id
        self.uri = uri
        self.experiment_id = experiment_id
        self._client = None
        self._warned: set[str] = set()

    @property
    def enabled(self) -> bool:
        return self.run_id is not None

    @property
    def client(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    def _guard(self, what: str, fn, *args, **kwargs):
        if not self.enabled:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - tracking must never stop a run
            if what not in self._warned:
                self._warned.add(what)
                warnings.warn(f"MLflow {what} failed ({type(exc).__name__}: {exc}); continuing without it",
                              RuntimeWarning, stacklevel=3)
            return None

    # params / tags / metrics
    def log_params(self, params) -> None:
        """Log a (nested) config or flat dict as params. Keys already logged with the same value are
        skipped; a changed value (e.g. on resume) is recorded as tag ``param_changed.<key>``."""
        flat = flatten_config(params)
        self._guard("log_params", self._log_params, flat)

    def _log_params(self, flat: dict[str, str]) -> None:
        from mlflow.entities import Param, RunTag

        existing = self.client.get_run(self.run_id).data.params
        new = {k: v for k, v in flat.items() if k not in existing}
        changed = {f"param_changed.{k}": v[:MAX_PARAM_LENGTH] for k, v in flat.items()
                   if k in existing and existing[k] != v}
        items = list(new.items())
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in items[i:i + _BATCH]])
        tags = list(changed.items())
        for i in range(0, len(tags), _BATCH):
            self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags[i:i + _BATCH]])

    def set_tags(self, tags: dict) -> None:
        if not self.enabled:
            return
        from mlflow.entities import RunTag

        items = [(str(k), str(v)[:MAX_PARAM_LENGTH]) for k, v in (tags or {}).items() if v is not None]
        for i in range(0, len(items), _BATCH):
            batch = [RunTag(k, v) for k, v in items[i:i + _BATCH]]
            self._guard("set_tags", lambda b=batch: self.client.log_batch(self.run_id, tags=b))

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        """Log numeric metrics (non-numbers and None are skipped) at ``step``."""
        if not self.enabled:
            return
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(str(k), float(v), ts, int(step or 0)) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)]
        for i in range(0, len(items), _METRIC_BATCH):
            batch = items[i:i + _METRIC_BATCH]
            self._guard("log_metrics", lambda b=batch: self.client.log_batch(self.run_id, metrics=b))

    def log_metric(self, key: str, value: float, step: int | None = None) -> None:
        self.log_metrics({key: value}, step=step)

    # artifacts
    def log_artifact(self, local_path, artifact_path: str | None = None) -> None:
        """Upload a file (or a folder's files) under ``artifact_path``."""
        path = Path(local_path)
        self._guard("log_artifact", lambda: (self.client.log_artifacts if path.is_dir() else self.client.log_artifact)(
            self.run_id, str(path), artifact_path))

    def log_figure(self, fig, artifact_path: str) -> None:
        """A matplotlib figure as an image artifact (``artifact_path`` like ``plots/parity.png``)."""
        self._guard("log_figure", lambda: self.client.log_figure(self.run_id, fig, artifact_path))

    def log_text(self, text: str, artifact_path: str) -> None:
        self._guard("log_text", lambda: self.client.log_text(self.run_id, text, artifact_path))

    def log_dict_csv(self, data, artifact_path: str) -> None:
        """A table as a CSV artifact: a list of row dicts, or a dict of equal-length columns."""
        self._guard("log_dict_csv", lambda: self.client.log_text(self.run_id, to_csv(data), artifact_path))

    def log_config(self, cfg, artifact_path: str = "config.yaml") -> None:
        """The resolved config as a YAML artifact."""
        from omegaconf import OmegaConf

        self._guard("log_config", lambda: self.client.log_text(
            self.run_id, OmegaConf.to_yaml(OmegaConf.create(_to_container(cfg))), artifact_path))


def to_csv(data) -> str:
    """CSV text from a list of row dicts or a dict of equal-length columns."""
    if isinstance(data, dict):
        keys = list(data)
        columns = [list(_to_container(data[k]) if not hasattr(data[k], "tolist") else data[k].tolist()) for k in keys]
        n = {len(c) for c in columns}
        if len(n) > 1:
            raise ValueError(f"to_csv: columns have different lengths {sorted(n)}")
        rows = [dict(zip(keys, vals)) for vals in zip(*columns)]
    else:
        rows = list(data)
        keys = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


# -- runs ------------------------------------------------------------------------------------------
def _run_exists(client, run_id: str) -> bool:
    try:
        client.get_run(run_id)
        return True
    except Exception:  # noqa: BLE001
        return False


@contextlib.contextmanager
def start_run(experiment: str | None = None, run_name: str | None = None, tags: dict | None = None,
              nested: bool = False, *, task: str | None = None, cfg=None, run_id: str | None = None,
              parent_run_id: str | None = None, enabled: bool | None = None):
    """Context manager yielding a :class:`Tracker` for one MLflow run.

    - ``experiment``: experiment name; default ``tracking.experiment`` of ``cfg``, else ``lattice_lab/<task>``.
    - ``run_id``: continue an existing run (resume); if it is not in the store, a new run starts.
    - ``parent_run_id`` (or ``tracking.parent_run_id``): nest this run under that one (sweeps); the
      parent need not be active in this process. ``nested=True`` nests under this process's active run.
    - ``tags``: merged over ``tracking.tags`` of ``cfg``.
    - ``enabled`` (or ``tracking.enabled``): False yields a tracker that does nothing.

    The run ends FINISHED, FAILED on an exception, KILLED on Ctrl-C. A tracking failure at start
    warns and yields a disabled tracker; the body always runs. A URI of a scheme MLflow has no store
    for is a ConfigError (:func:`check_tracking_uri`), raised before the body.
    """
    settings = TrackingSettings.from_config(cfg)
    if enabled is None:
        enabled = settings.enabled
    if not enabled:
        yield Tracker(None)
        return
    check_tracking_uri(settings.uri)  # a wrong setting, not a store that is down (enabled=True over a null)
    parent_run_id = parent_run_id or settings.parent_run_id
    all_tags = {**settings.tags, **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    all_tags = {str(k): str(v) for k, v in all_tags.items() if v is not None}
    try:
        import mlflow

        uri = setup_tracking(settings)
        name = experiment or experiment_name(task, settings)
        exp_id = get_or_create_experiment(name, uri, settings.artifact_root)
        tracker = Tracker(None, uri, exp_id)
        if run_id and not _run_exists(tracker.client, run_id):
            warnings.warn(f"MLflow run {run_id} not found in {uri}; starting a new run", RuntimeWarning,
                          stacklevel=3)
            run_id = None
        if run_id:
            tracker.client.update_run(run_id, status="RUNNING")
        if not run_id:
            defaults = {"mlflow.user": _user(), "mlflow.source.name": " ".join(sys.argv[:1]) or "python",
                        "mlflow.source.type": "LOCAL"}
            commit = git_commit()
            if commit:
                defaults["mlflow.source.git.commit"] = commit
            active = mlflow.active_run()
            if nested and active is not None and "mlflow.parentRunId" not in all_tags:
                all_tags["mlflow.parentRunId"] = active.info.run_id
            run = tracker.client.create_run(exp_id, run_name=run_name, tags={**defaults, **all_tags})
            run_id = run.info.run_id
        else:
            tracker.run_id = run_id
            tracker.set_tags({**all_tags, "resumed": "true"})
        tracker.run_id = run_id
    except Exception as exc:  # noqa: BLE001 - never lose the run because tracking is down
        warnings.warn(f"MLflow tracking unavailable ({type(exc).__name__}: {exc}); running without tracking",
                      RuntimeWarning, stacklevel=3)
        yield Tracker(None)
        return

    status = "FINISHED"
    try:
        yield tracker
    except (KeyboardInterrupt, Interrupted):  # Interrupted: stopped by Ctrl-C / SIGTERM after saving
        status = "KILLED"
        raise
    except BaseException:
        status = "FAILED"
        raise
    finally:
        tracker._guard("end_run", lambda: tracker.client.set_terminated(tracker.run_id, status))


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001
        return platform.node() or "unknown"


# -- module-level helpers (ARCHITECTURE.md names) --------------------------------------------------
def log_params(tracker: Tracker, cfg) -> None:
    """Flatten ``cfg`` and log it as params of ``tracker``'s run."""
    tracker.log_params(cfg)


log_flat_params = log_params


def log_figure(tracker: Tracker, fig, artifact_path: str) -> None:
    tracker.log_figure(fig, artifact_path)


def log_dict_csv(tracker: Tracker, data, artifact_path: str) -> None:
    tracker.log_dict_csv(data, artifact_path)


def artifact_dir(tracker: Tracker) -> str | None:
    """Local folder (or URI) of the run's artifacts."""
    if not tracker.enabled:
        return None
    return tracker._guard("artifact_dir", lambda: tracker.client.get_run(tracker.run_id).info.artifact_uri)


def download_artifact(run_id: str, artifact_path: str, uri: str | None = None, dst: str | None = None) -> Path:
    """Fetch one artifact of a run (e.g. ``checkpoints/best.pt``) to a local path."""
    from mlflow.tracking import MlflowClient

    quiet_mlflow()
    client = MlflowClient(tracking_uri=resolve_tracking_uri(uri))
    dst = dst or tempfile.mkdtemp(prefix="lattice_lab_artifact_")
    return Path(client.download_artifacts(run_id, artifact_path, dst))
