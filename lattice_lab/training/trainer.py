"""Supervised training of a force field on ED forces: force MSE over every site, exact resume.

Every site of every configuration is one sample (a local model sees one environment per site), so a
batch is a set of whole configurations ``Q [b, L, L] -> F [b, L, L]`` and the loss is the mean
squared force error over all ``b * L * L`` sites. The trainer is model-agnostic: direct-force and
energy-based (conservative) models share the loop; the latter are evaluated with autograd enabled,
in chunks, because their forces are ``-dE/dQ``.

State that makes a resumed run bit-identical to an uninterrupted one is checkpointed in ``last.pt``
every epoch: weights (incl. normalisation buffers), Adam and ReduceLROnPlateau states, the global
RNG states and the shuffling generator, the epoch, early-stopping counters, elapsed training time
and the metric history.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch

from lattice_lab.common.device import MODEL_DTYPES, resolve_device, resolve_dtype, synchronize
from lattice_lab.common.errors import ConfigError
from lattice_lab.common.io import atomic_write_text
from lattice_lab.common.progress import progress, set_status
from lattice_lab.common.seeding import rng_state, set_rng_state
from lattice_lab.models.base import predict_forces
from lattice_lab.training.config import TrainerConfig
from lattice_lab.training.metrics import METRIC_KEYS, ForceErrorStats, prefixed

log = logging.getLogger(__name__)

EPOCH_METRICS = tuple(f"{split}/{k}" for split in ("train", "val") for k in METRIC_KEYS) + ("lr", "epoch_time")


# -- RNG state in a form torch.load(weights_only=True) accepts (no numpy objects) ------------------
def _pack_rng(state: dict) -> dict:
    name, keys, pos, has_gauss, cached = state["numpy"]
    out = dict(state)
    out["numpy"] = (str(name), torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss),
                    float(cached))
    return out


def _unpack_rng(state: dict) -> dict:
    name, keys, pos, has_gauss, cached = state["numpy"]
    out = dict(state)
    out["numpy"] = (name, keys.numpy().astype(np.uint32), pos, has_gauss, cached)
    py = state["python"]
    out["python"] = (py[0], tuple(py[1]), py[2])
    return out


# trainer settings that change the optimisation; a resume may change only the others (max_epochs,
# max_time, patience, eval_batch_size, progress)
RESUME_FIXED_KEYS = ("lr", "weight_decay", "batch_size", "lr_factor", "lr_patience", "min_lr", "grad_clip")


# what last.pt holds beyond a model checkpoint, for an exact continuation
RESUME_STATE_KEYS = ("optimizer", "scheduler", "rng", "shuffle_generator", "epoch", "best_val", "bad_epochs",
                     "elapsed", "history")


def _saved_seed(ckpt: dict) -> int | None:
    """The seed a checkpoint's run was started with: stored with it, else (checkpoints written before it was)
    the ``seed`` of the entrypoint's config the checkpoint holds; None where neither says."""
    if ckpt.get("seed") is not None:
        return int(ckpt["seed"])
    from omegaconf import OmegaConf

    try:
        seed = OmegaConf.to_container(OmegaConf.create(str(ckpt.get("config") or "{}"))).get("seed")
    except Exception:  # noqa: BLE001 - no config, or not a mapping: nothing to compare
        return None
    return int(seed) if isinstance(seed, int) and not isinstance(seed, bool) else None


def data_fingerprint(data) -> str:
    """SHA-256 of what training sees: Q, F and the validation split (not file names or attributes)."""
    import hashlib

    h = hashlib.sha256()
    for a in (data.Q, data.F, data.is_val):
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _as_tensor(a, device, dtype) -> torch.Tensor:
    return torch.as_tensor(np.ascontiguousarray(a), dtype=dtype, device=device)


class Trainer:
    """Train ``model`` on ``data`` (a :class:`lattice_lab.data.h5io.ForceData`).

    Parameters
    ----------
    model: a :class:`lattice_lab.models.base.ForceField`.
    data: the dataset; its ``is_val`` flags define the train/validation split.
    cfg: trainer settings (``conf/trainer/*.yaml``, a mapping or :class:`TrainerConfig`).
    device, dtype: where and in which precision to train (``"auto"``, ``"float32"``...).
    out_dir: folder for ``best.pt``, ``last.pt`` and ``metrics.csv`` (None: keep nothing on disk;
        resume then impossible).
    tracker: optional :class:`lattice_lab.tracking.mlflow_utils.Tracker`; per-epoch metrics go to it.
    model_cfg: the model's config (``conf/model/<name>.yaml`` as a dict) stored in checkpoints so
        ``load_force_field`` can rebuild the model.
    seed: seed of the shuffling generator (stored in checkpoints).
    resume: continue from ``out_dir/last.pt`` (weights, optimiser, scheduler, RNGs, history); another
        ``seed``, dtype, model config, Hamiltonian, data or optimisation setting than the run's is refused.
    meta: extra entries stored in every checkpoint (e.g. the resolved config, dataset path).
    """

    def __init__(self, model, data, cfg=None, device="auto", dtype="float32", out_dir=None, tracker=None, *,
                 model_cfg: dict | None = None, seed: int = 0, resume: bool = False, meta: dict | None = None):
        self.cfg = TrainerConfig.from_config(cfg)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, MODEL_DTYPES)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.tracker = tracker
        self.model_cfg = dict(model_cfg) if model_cfg is not None else dict(getattr(model, "model_cfg", {}) or {})
        self.meta = dict(meta or {})
        self.seed = int(seed)
        self.data_sha256 = data_fingerprint(data)
        self.model = model.to(device=self.device, dtype=self.dtype)

        train, val = data.split("train"), data.split("val")
        if len(train.Q) == 0:
            raise ConfigError("dataset has no training configurations (every is_val flag is set)")
        if len(val.Q) == 0:
            raise ConfigError("dataset has no validation configurations (no is_val flag is set)")
        # moved to device/dtype once; batches are index gathers on the device
        self.Q_train = _as_tensor(train.Q, self.device, self.dtype)
        self.F_train = _as_tensor(train.F, self.device, self.dtype)
        self.Q_val = _as_tensor(val.Q, self.device, self.dtype)
        self.F_val = _as_tensor(val.F, self.device, self.dtype)

        # foreach: the multi-tensor step (torch's default on GPUs), bit-identical to the per-parameter loop
        # and ~1.5x faster on CPU for models of many small parameters (enn: 79)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay,
                                          foreach=True)
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer, mode="min", factor=self.cfg.lr_factor, patience=self.cfg.lr_patience,
            min_lr=self.cfg.min_lr)
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(int(seed))

        self.epoch = 0  # epochs completed
        self.best_val = math.inf
        self.best_epoch = 0
        self.bad_epochs = 0
        self.elapsed = 0.0  # seconds of training so far (over all sessions)
        self.history: list[dict] = []
        self.stop_reason: str | None = None
        self._saved_run_id: str | None = None

        if resume:
            self._resume()
        else:
            self.model.fit_normalization(self.Q_train, self.F_train)

    # -- paths -----------------------------------------------------------------------------
    @property
    def best_path(self) -> Path | None:
        return self.out_dir / "best.pt" if self.out_dir is not None else None

    @property
    def last_path(self) -> Path | None:
        return self.out_dir / "last.pt" if self.out_dir is not None else None

    # -- checkpoints -----------------------------------------------------------------------
    def _common_extra(self) -> dict:
        return {
            **self.meta,
            "epoch": self.epoch,
            "best_val": self.best_val,
            "best_epoch": self.best_epoch,
            "dtype": str(self.dtype).removeprefix("torch."),
            "trainer_cfg": self.cfg.as_dict(),
            "seed": self.seed,
            "data_sha256": self.data_sha256,
            "mlflow_run_id": self.mlflow_run_id,
        }

    def _save(self, path: Path, full: bool) -> None:
        from lattice_lab.models.checkpoint import save_checkpoint

        extra = self._common_extra()
        if full:
            extra.update({
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "rng": _pack_rng(rng_state()),
                "shuffle_generator": self.generator.get_state(),
                "bad_epochs": self.bad_epochs,
                "elapsed": self.elapsed,
                "history": self.history,
            })
        else:
            extra["val_metrics"] = {k: v for k, v in self.history[-1].items() if k.startswith("val/")}
        save_checkpoint(path, self.model, self.model_cfg, extra)

    def _resume(self) -> None:
        from lattice_lab.models.checkpoint import load_checkpoint

        if self.last_path is None or not self.last_path.is_file():
            raise ConfigError(f"resume=true: no checkpoint to resume from at {self.last_path}")
        ckpt = load_checkpoint(self.last_path)
        resumed = f"the run being resumed ({self.out_dir})"  # named: resume=true may have picked it
        missing = [k for k in RESUME_STATE_KEYS if k not in ckpt]
        if missing:  # e.g. a best.pt copied over it: weights only
            raise ConfigError(f"resume=true: {self.last_path} holds no training state to continue ({', '.join(missing)} "
                              "missing; a best.pt or an export, not the last.pt a run writes); train again under "
                              "another run_name")
        if not self.best_path.is_file():  # needed at the end (the best model's evaluation): refused now, not then
            raise ConfigError(f"resume=true: {self.best_path} is missing ({resumed} writes it with last.pt); "
                              "train again under another run_name")
        saved_dtype = ckpt.get("dtype")
        if saved_dtype is not None and saved_dtype != str(self.dtype).removeprefix("torch."):
            raise ConfigError(f"dtype={str(self.dtype).removeprefix('torch.')}: {resumed} "
                              f"was trained in {saved_dtype}")
        saved_cfg = ckpt.get("model_cfg")
        if self.model_cfg and saved_cfg and dict(saved_cfg) != self.model_cfg:
            diff = sorted(k for k in set(saved_cfg) | set(self.model_cfg) if saved_cfg.get(k) != self.model_cfg.get(k))
            now = ", ".join(f"model.{k}={self.model_cfg.get(k)!r}" for k in diff)
            then = ", ".join(f"{k}={saved_cfg.get(k)!r}" for k in diff)
            raise ConfigError(f"{now}: {resumed} was trained with {then}")
        saved_ham, ham = dict(ckpt["hamiltonian"]), dict(self.model.hamiltonian)  # the elastic prior's k, kappa...
        diff = sorted(k for k in set(saved_ham) | set(ham) if saved_ham.get(k) != ham.get(k))
        if diff:  # Q, F and the split (the content hash below) do not cover the file's Hamiltonian attributes
            now = ", ".join(f"hamiltonian.{k}={ham.get(k)!r}" for k in diff)
            then = ", ".join(f"{k}={saved_ham.get(k)!r}" for k in diff)
            raise ConfigError(f"{now}: {resumed} was trained for {then}")
        saved_seed = _saved_seed(ckpt)
        if saved_seed is not None and saved_seed != self.seed:  # last.pt's RNG states win: the record would lie
            raise ConfigError(f"seed={self.seed}: {resumed} was trained with seed={saved_seed}")
        saved_data = ckpt.get("data_sha256")
        if saved_data is not None and saved_data != self.data_sha256:
            where = self.meta.get("dataset_path")
            raise ConfigError(f"dataset.path={where!r}: {resumed} was trained on other data "
                              f"({ckpt.get('dataset_path', 'path unknown')}; Q, F or the validation split differ)")
        saved_trainer = ckpt.get("trainer_cfg") or {}
        now_trainer = self.cfg.as_dict()
        diff = [k for k in RESUME_FIXED_KEYS if k in saved_trainer and saved_trainer[k] != now_trainer[k]]
        if diff:
            now = ", ".join(f"trainer.{k}={now_trainer[k]!r}" for k in diff)
            then = ", ".join(f"{k}={saved_trainer[k]!r}" for k in diff)
            raise ConfigError(f"{now}: {resumed} was trained with {then} (a resume may change "
                              "only max_epochs, max_time, patience, eval_batch_size and progress)")
        self.model.load_state_dict(ckpt["state_dict"])
        self.model.to(device=self.device, dtype=self.dtype)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        set_rng_state(_unpack_rng(ckpt["rng"]))
        self.generator.set_state(ckpt["shuffle_generator"])
        self.epoch = int(ckpt["epoch"])
        self.best_val = float(ckpt["best_val"])
        self.best_epoch = int(ckpt.get("best_epoch", 0))
        self.bad_epochs = int(ckpt["bad_epochs"])
        self.elapsed = float(ckpt["elapsed"])
        self.history = list(ckpt["history"])
        self._saved_run_id = ckpt.get("mlflow_run_id")

    @property
    def mlflow_run_id(self) -> str | None:
        """The tracker's run id, else the one stored in the checkpoint being resumed."""
        return getattr(self.tracker, "run_id", None) or self._saved_run_id

    # -- evaluation ------------------------------------------------------------------------
    def predict(self, Q: torch.Tensor) -> torch.Tensor:
        """Forces for ``Q [C, L, L]`` in chunks of ``eval_batch_size`` (eval mode, detached)."""
        was_training = self.model.training
        self.model.eval()
        try:
            return predict_forces(self.model, Q, self.cfg.eval_batch_size)
        finally:
            self.model.train(was_training)

    def evaluate(self, split: str = "val") -> dict[str, float]:
        """Force metrics of the current model on ``split`` ("train" or "val")."""
        Q, F = (self.Q_val, self.F_val) if split == "val" else (self.Q_train, self.F_train)
        stats = ForceErrorStats()
        stats.update(self.predict(Q), F)
        return stats.compute()

    # -- training --------------------------------------------------------------------------
    def _train_epoch(self, epoch: int) -> dict[str, float]:
        """One pass over the shuffled training configurations.

        Returns the train metrics accumulated over the epoch's batches (each batch's prediction
        before its optimiser step), which costs no extra forward pass.
        """
        cfg = self.cfg
        self.model.train()
        n = self.Q_train.shape[0]
        perm = torch.randperm(n, generator=self.generator).to(self.device)
        stats = ForceErrorStats()
        n_batches = math.ceil(n / cfg.batch_size)
        postfix_every = max(1, n_batches // 20)
        bar = progress(total=n, desc=f"epoch {epoch}/{cfg.max_epochs}", unit="cfg", leave=False) \
            if cfg.progress else None
        try:
            for b in range(n_batches):
                idx = perm[b * cfg.batch_size:(b + 1) * cfg.batch_size]
                Q, F = self.Q_train[idx], self.F_train[idx]
                pred = self.model(Q)
                loss = (pred - F).square().mean()
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
                self.optimizer.step()
                stats.update(pred, F)
                if bar is not None:
                    bar.update(idx.numel())
                    if b % postfix_every == 0 or b == n_batches - 1:
                        set_status(bar, f"loss={loss.item():.3e}")
        finally:
            if bar is not None:
                bar.close()
        out = stats.compute()
        if not math.isfinite(out["rmse"]):
            raise ConfigError(f"trainer.lr={self.optimizer.param_groups[0]['lr']:g}: the training loss became "
                              f"non-finite in epoch {epoch}; lower the learning rate or set trainer.grad_clip")
        return out

    def fit(self) -> float:
        """Train until max_epochs, early stopping or max_time; return the best validation RMSE."""
        cfg = self.cfg
        self.stop_reason = None
        if self.epoch >= cfg.max_epochs:
            self.stop_reason = "max_epochs"
        elif cfg.patience is not None and self.bad_epochs >= cfg.patience:
            self.stop_reason = "early_stopping"
        while self.stop_reason is None:
            epoch = self.epoch + 1
            t0 = time.perf_counter()
            lr = self.optimizer.param_groups[0]["lr"]
            train_metrics = self._train_epoch(epoch)
            val_metrics = self.evaluate("val")
            synchronize(self.device)
            epoch_time = time.perf_counter() - t0
            self.elapsed += epoch_time
            self.scheduler.step(val_metrics["rmse"])

            self.epoch = epoch
            metrics = {**prefixed(train_metrics, "train"), **prefixed(val_metrics, "val"),
                       "lr": lr, "epoch_time": epoch_time}
            self.history.append({"epoch": epoch, **metrics})
            if val_metrics["rmse"] < self.best_val:
                self.best_val, self.best_epoch, self.bad_epochs = val_metrics["rmse"], epoch, 0
                if self.best_path is not None:
                    self._save(self.best_path, full=False)
            else:
                self.bad_epochs += 1

            if epoch >= cfg.max_epochs:
                self.stop_reason = "max_epochs"
            elif cfg.patience is not None and self.bad_epochs >= cfg.patience:
                self.stop_reason = "early_stopping"
            elif cfg.max_time is not None and self.elapsed >= cfg.max_time:
                self.stop_reason = "max_time"
            if self.last_path is not None:
                self._save(self.last_path, full=True)
                self.write_metrics_csv(self.out_dir / "metrics.csv")
            if self.tracker is not None:
                self.tracker.log_metrics(metrics, step=epoch)
            log.info("epoch %d/%d  train rmse %.4g  val rmse %.4g  val sigma %.4g  lr %.2g  %.1f s%s", epoch,
                     cfg.max_epochs, train_metrics["rmse"], val_metrics["rmse"], val_metrics["sigma"], lr,
                     epoch_time, "  *best*" if self.best_epoch == epoch else "")
        log.info("stopped after epoch %d (%s); best val rmse %.5g at epoch %d", self.epoch, self.stop_reason,
                 self.best_val, self.best_epoch)
        return self.best_val

    # -- outputs ---------------------------------------------------------------------------
    def write_metrics_csv(self, path) -> Path:
        """The per-epoch history as CSV (atomic)."""
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=["epoch", *EPOCH_METRICS], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(self.history)
        return atomic_write_text(path, buf.getvalue())

    def load_best(self) -> None:
        """Load the weights of ``best.pt`` into the model (kept on the trainer's device and dtype)."""
        from lattice_lab.models.checkpoint import load_checkpoint

        if self.best_path is None or not self.best_path.is_file():
            raise ConfigError(f"no best checkpoint at {self.best_path}")
        self.model.load_state_dict(load_checkpoint(self.best_path)["state_dict"])
        self.model.to(device=self.device, dtype=self.dtype)
