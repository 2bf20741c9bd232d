"""Trainer settings (``conf/trainer/*.yaml``), validated once with errors that name the key."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from lattice_lab.common.errors import ConfigError
from lattice_lab.common.switch import check_flag


@dataclass(frozen=True)
class TrainerConfig:
    """Optimisation of the force MSE over all sites of a batch of whole configurations.

    Adam (``lr``, ``weight_decay``), ReduceLROnPlateau on the validation RMSE (``lr_factor``,
    ``lr_patience``, ``min_lr``), early stopping after ``patience`` epochs without a better
    validation RMSE (``None`` = off), at most ``max_epochs`` epochs and ``max_time`` seconds of
    training (checked between epochs; ``None`` = no limit), optional gradient-norm clipping.
    """

    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 4  # configurations per batch; every site of each is a sample
    max_epochs: int = 200
    patience: int | None = 30
    lr_factor: float = 0.5
    lr_patience: int = 10
    min_lr: float = 1e-6
    grad_clip: float | None = None
    max_time: float | None = None
    eval_batch_size: int = 16  # configurations per evaluation chunk
    progress: bool = True

    @classmethod
    def from_config(cls, cfg) -> TrainerConfig:
        """Build from a mapping / DictConfig (unknown keys are an error, missing keys take defaults)."""
        if isinstance(cfg, cls):
            return cfg
        if cfg is None:
            return cls()
        try:
            from omegaconf import DictConfig, OmegaConf

            if isinstance(cfg, DictConfig):
                cfg = OmegaConf.to_container(cfg, resolve=True)
        except ImportError:  # pragma: no cover - omegaconf is a dependency
            pass
        cfg = dict(cfg)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ConfigError(f"trainer.{unknown[0]}: unknown trainer setting (known: {', '.join(sorted(known))})")
        out = cls(**cfg)
        out.validate()
        return out

    def validate(self) -> None:
        def positive(key, value, allow_none=False, integer=False):
            if value is None and allow_none:
                return
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
            if integer:
                ok = ok and float(value).is_integer()
            if not ok:
                kind = "a positive integer" if integer else "a positive number"
                raise ConfigError(f"trainer.{key}={value!r}: expected {kind}" + (" or null" if allow_none else ""))

        positive("lr", self.lr)
        positive("batch_size", self.batch_size, integer=True)
        positive("max_epochs", self.max_epochs, integer=True)
        positive("patience", self.patience, allow_none=True, integer=True)
        positive("lr_patience", self.lr_patience, integer=True)
        positive("grad_clip", self.grad_clip, allow_none=True)
        positive("max_time", self.max_time, allow_none=True)
        positive("eval_batch_size", self.eval_batch_size, integer=True)
        if not (isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0):
            raise ConfigError(f"trainer.weight_decay={self.weight_decay!r}: expected a number >= 0")
        if not (isinstance(self.lr_factor, (int, float)) and 0 < self.lr_factor < 1):
            raise ConfigError(f"trainer.lr_factor={self.lr_factor!r}: expected 0 < lr_factor < 1")
        if not (isinstance(self.min_lr, (int, float)) and 0 <= self.min_lr <= self.lr):
            raise ConfigError(f"trainer.min_lr={self.min_lr!r}: expected 0 <= min_lr <= lr={self.lr}")
        check_flag(self.progress, "trainer.progress")

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)
