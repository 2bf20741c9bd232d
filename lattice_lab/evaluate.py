"""Entrypoint: force errors of a trained force field on an ED dataset.

    python -m lattice_lab.evaluate checkpoint=runs/checkpoints/<run> dataset=holstein_L24 [split=all]

The models are local, so a force field trained on one lattice can be scored on configurations of another
(a larger lattice, a new build, the papers' 40 x 40 set). Scores every configuration of ``split`` against
its exact force, overall, per kind of configuration (random hot starts, quench snapshots) and on the quench
snapshots' domain walls and domains apart (:func:`~lattice_lab.training.metrics.error_report`), and writes
to ``out_dir`` (default ``runs/evaluations/<checkpoint's run>_on_<dataset>_<split>``, ``<run>_last`` for a
last.pt; an earlier evaluation there is replaced):

- ``metrics.yaml`` and ``evaluate_config.yaml``;
- ``parity.png`` and ``error_hist.png``;
- ``error_by_config.png``: the RMSE of every configuration, quench snapshots against the time after the quench;
- ``error_vs_order.png``: the error of the quench snapshots' sites against the local CDW order |phi_i|.

Everything is logged to MLflow (experiment ``lattice_lab/evaluate``), tagged with the checkpoint and its
training run. A Hamiltonian other than the one the model was trained for (t, g, k, kappa) is refused; another
temperature is scored with a warning.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import hydra
from hydra.utils import to_absolute_path
from omegaconf import DictConfig, OmegaConf

from lattice_lab.common.cli import CONFIG_DIR, friendly_errors, hydra_errors
from lattice_lab.common.errors import ConfigError
from lattice_lab.common.io import atomic_write_text

log = logging.getLogger(__name__)

SPLITS = ("all", "train", "val", "random", "quench")
OUTPUTS = ("metrics.yaml", "evaluate_config.yaml", "parity.png", "error_hist.png", "error_by_config.png",
           "error_vs_order.png")  # what an evaluation writes to out_dir


def check_config(cfg: DictConfig) -> dict:
    """Every setting, before anything is read or written; returns them parsed."""
    from lattice_lab.common.device import MODEL_DTYPES, resolve_device, resolve_dtype
    from lattice_lab.common.switch import check_flag
    from lattice_lab.tracking.mlflow_utils import TrackingSettings

    if OmegaConf.is_missing(cfg, "checkpoint") or cfg.get("checkpoint") in (None, ""):
        raise ConfigError("checkpoint=???: give the force field, e.g. checkpoint=runs/checkpoints/<run> "
                          "(a folder with best.pt, a .pt file, a TorchScript export or an MLflow run id)")
    split = cfg.get("split")
    if split not in SPLITS:
        raise ConfigError(f"split={split!r}: expected one of {', '.join(SPLITS)}")
    batch = cfg.get("batch_size")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ConfigError(f"batch_size={batch!r}: expected a positive integer (configurations per force call)")
    dtype = cfg.get("dtype")
    out = {"split": split, "batch_size": batch, "plots": check_flag(cfg.get("plots", True), "plots"),
           "device": resolve_device(cfg.get("device", "auto")),
           "dtype": None if dtype is None else resolve_dtype(str(dtype), MODEL_DTYPES)}
    TrackingSettings.from_config(cfg)
    if "path" not in cfg.dataset or not cfg.dataset.path:
        raise ConfigError("dataset.path is not set (the dataset preset must say where its HDF5 file is)")
    return out


def _mlflow_run_name(run_id: str, uri: str | None) -> str:
    """The name of MLflow run ``run_id`` (train names it after its run folder); the id where it has none."""
    from mlflow.tracking import MlflowClient

    from lattice_lab.tracking.mlflow_utils import resolve_tracking_uri

    try:  # the store the checkpoint was just downloaded from
        name = MlflowClient(resolve_tracking_uri(uri)).get_run(run_id).info.run_name
    except Exception:  # noqa: BLE001 - only a name: the id stands in
        return run_id
    return name if name and "/" not in name and name not in (".", "..") else run_id


def _checkpoint_info(ref: str, path: Path, model, uri: str | None = None) -> dict:
    """What the checkpoint ``ref`` (read from ``path``) says about its training: run name, MLflow run, training
    data (an MLflow run's name from the store ``uri``)."""
    from lattice_lab.models.checkpoint import is_torchscript, load_checkpoint, mlflow_run_of

    if is_torchscript(path):
        meta = dict(getattr(model, "metadata", {}) or {})
        info = {"train_run": path.stem, "train_run_id": meta.get("mlflow_run_id"),
                "train_dataset": meta.get("dataset_name"), "model_family": meta.get("name")}
    else:
        ckpt = load_checkpoint(path)
        info = {"train_run": path.parent.name, "train_run_id": ckpt.get("mlflow_run_id"),
                "train_dataset": ckpt.get("dataset_name"), "train_data_sha256": ckpt.get("data_sha256"),
                "train_data_path": ckpt.get("dataset_path")}
    run_id = (mlflow_run_of(ref) or (None,))[0]
    if run_id:  # downloaded to a temporary folder, whose name says nothing
        info["train_run"] = _mlflow_run_name(run_id, uri)
        info["train_run_id"] = info["train_run_id"] or run_id
    info["checkpoint"] = ref if run_id else str(path)
    # what the evaluation is named after: the run, and the file where it is not the run's best.pt (last.pt)
    info["name"] = info["train_run"] + ("" if is_torchscript(path) or path.stem == "best" else f"_{path.stem}")
    return info


def run(cfg: DictConfig) -> dict:
    """Score ``cfg.checkpoint`` on ``cfg.split`` of ``cfg.dataset``; returns the metrics written to metrics.yaml."""
    import torch

    from lattice_lab.common.progress import progress
    from lattice_lab.data.generation import quench_times
    from lattice_lab.data.h5io import read_force_dataset
    from lattice_lab.models.base import check_reach, predict_forces
    from lattice_lab.models.checkpoint import load_force_field, resolve_checkpoint_path
    from lattice_lab.tracking.mlflow_utils import standard_tags, start_run
    from lattice_lab.training.metrics import error_report, sigma_by_kind
    from lattice_lab.training.trainer import data_fingerprint

    t0 = time.perf_counter()
    opts = check_config(cfg)
    data_path = Path(to_absolute_path(str(cfg.dataset.path)))
    data = read_force_dataset(data_path)
    where = data.indices(opts["split"])  # the configurations' positions in the file
    picked = data.subset(where)
    if len(picked) == 0:
        raise ConfigError(f"split={opts['split']}: {data_path.name} has no such configurations")
    uri = OmegaConf.select(cfg, "tracking.uri", default=None)  # the store a run id as checkpoint is in
    ckpt_path = resolve_checkpoint_path(str(cfg.checkpoint), uri)  # once: an MLflow run's is downloaded
    model = load_force_field(ckpt_path, device=opts["device"], dtype=opts["dtype"])
    info = _checkpoint_info(str(cfg.checkpoint), ckpt_path, model, uri)
    model.check_compatible(data.hamiltonian())  # t, g, k, kappa must match; another temperature warns
    check_reach(data.L, model.receptive_field)
    if info.get("train_data_sha256"):
        same_data = info["train_data_sha256"] == data_fingerprint(data)
    else:  # a checkpoint from before the content hash was stored: its dataset's path
        same_data = info.get("train_data_path") == str(data_path)
    if same_data and opts["split"] != "val":
        log.warning("%s is the data this model was trained on: split=%s includes its training configurations "
                    "(split=val scores the held-out ones only)", data_path.name, opts["split"])
    dataset = data.name  # the file's own name (dataset.path may point anywhere)
    out = (Path(to_absolute_path(str(cfg.out_dir))) if cfg.get("out_dir")
           else Path(to_absolute_path("runs/evaluations")) / f"{info['name']}_on_{dataset}_{opts['split']}")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out_dir={str(out)!r}: is a file, not a folder")

    dtype = next((p.dtype for p in model.parameters()), torch.float32)
    Q = torch.as_tensor(picked.Q, dtype=dtype, device=opts["device"])
    exact = torch.as_tensor(picked.F, dtype=torch.float64)
    with progress(total=len(picked), desc=f"forces of {dataset} ({opts['split']})", unit="config") as bar:
        pred = predict_forces(model, Q, opts["batch_size"], bar=bar).to("cpu", torch.float64)
    bad = torch.nonzero(~torch.isfinite(pred).flatten(1).all(1)).flatten()
    if bad.numel():  # every metric would be NaN, and the log-scale plots cannot be drawn
        raise ConfigError(f"checkpoint={str(cfg.checkpoint)!r}: the model gives NaN or inf forces on {bad.numel()} of "
                          f"{len(picked)} configurations of {data_path.name} (first: configuration "
                          f"{int(where[int(bad[0])])} of the file)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"out_dir={str(out)!r}: cannot make the folder ({exc.strerror or exc})") from None
    for name in OUTPUTS:  # the folder is replaced: no result of an earlier evaluation stays beside these
        (out / name).unlink(missing_ok=True)
    cfg_file = atomic_write_text(out / "evaluate_config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    metrics = error_report(pred, exact, picked.kind, picked.n, prefix="eval/")
    metrics.update({"n_configs": len(picked), "lattice_L": data.L})
    atomic_write_text(out / "metrics.yaml", OmegaConf.to_yaml(OmegaConf.create(metrics)))

    tags = standard_tags("evaluate", model_family=info.get("model_family") or getattr(model, "name", None),
                         dataset_path=data_path, device=opts["device"], dataset=dataset, split=opts["split"],
                         checkpoint=info["checkpoint"],
                         train_run=info.get("train_run"), train_run_id=info.get("train_run_id"),
                         train_dataset=info.get("train_dataset"), same_data_as_training=str(same_data).lower(),
                         out_dir=str(out))
    with start_run(task="evaluate", cfg=cfg, run_name=out.name, tags=tags) as tracker:
        tracker.log_params(cfg)
        tracker.log_metrics(metrics)
        tracker.log_artifact(cfg_file)
        tracker.log_artifact(out / "metrics.yaml")
        if opts["plots"]:
            from lattice_lab.tracking.plots import (
                configuration_error_figures,
                error_histogram,
                parity_plot,
                save_figure,
            )

            label = f"{info['name']} on {dataset} ({opts['split']}: {len(picked)} configurations)"
            splits = {opts["split"]: (pred, exact)}
            figures = {"parity.png": parity_plot(splits, title=label),
                       "error_hist.png": error_histogram(splits, title=label),
                       **configuration_error_figures({opts["split"]: (pred, exact, picked.kind, picked.n, where)},
                                                     quench_times(data), title=label)}
            for name, fig in figures.items():
                save_figure(fig, out / name, close=True)
                tracker.log_artifact(out / name, "plots")

    print(f"[evaluate] {info['name']} on {dataset} ({opts['split']}, {len(picked)} configurations of "
          f"{data.L}x{data.L}): RMSE {metrics['eval/rmse']:.5g}, sigma {metrics['eval/sigma']:.5g}"
          f"{sigma_by_kind(metrics, 'eval/')}; "
          f"max |error| {metrics['eval/max_err']:.3g}  ({time.perf_counter() - t0:.1f} s) -> {out}")
    return metrics


@hydra_errors
@hydra.main(config_path=CONFIG_DIR, config_name="evaluate")
@friendly_errors
def main(cfg: DictConfig) -> dict:
    return run(cfg)


if __name__ == "__main__":
    main()
