"""Trainer: force metrics, learning, exact resume, checkpoints, conservative models, config errors."""

import math
import re

import numpy as np
import pytest
import torch

from lattice_lab import load_force_field
from lattice_lab.common.errors import ConfigError
from lattice_lab.data.h5io import ForceData
from lattice_lab.models.checkpoint import load_checkpoint
from lattice_lab.models.registry import build_model
from lattice_lab.physics.ed import ExactForces
from lattice_lab.physics.holstein import HolsteinParams
from lattice_lab.training.metrics import (
    ForceErrorStats,
    error_report,
    force_metrics,
    metrics_by_kind,
    per_config_rmse,
)
from lattice_lab.training.trainer import EPOCH_METRICS, Trainer

HAM = HolsteinParams(temperature=0.1)
TINY_GNN = {"name": "gnn", "widths": [1, 8, 8, 1]}
TINY_ENERGY = {"name": "gnn_energy", "width": 8, "blocks": 1, "readout": [8]}


@pytest.fixture(scope="module")
def tiny_data():
    """6 configurations of 8x8 with exact (ED) forces; the last 2 are the validation set."""
    gen = torch.Generator().manual_seed(1)
    Q = torch.randn(6, 8, 8, generator=gen, dtype=torch.float64) * 1.2
    Q += 1.5 * torch.tensor([[(-1.0) ** (x + y) for y in range(8)] for x in range(8)], dtype=torch.float64)
    res = ExactForces(HAM).compute(Q)
    return ForceData(Q=Q.numpy(), F=res.forces.numpy(), n=res.density.numpy(), kind=np.zeros(6, np.uint8),
                     is_val=np.array([0, 0, 0, 0, 1, 1], bool), attrs=HAM.as_dict())


def _cfg(**kw):
    base = {"lr": 1e-2, "batch_size": 2, "max_epochs": 6, "patience": None, "lr_patience": 2,
            "eval_batch_size": 1, "progress": False}
    base.update(kw)
    return base


def _model(seed=0, cfg=TINY_GNN):
    torch.manual_seed(seed)
    return build_model(cfg, HAM)


def test_force_metrics_match_numpy_and_accumulate():
    gen = torch.Generator().manual_seed(3)
    pred, target = torch.randn(5, 6, 6, generator=gen), torch.randn(5, 6, 6, generator=gen) + 0.3
    err = (pred - target).double().numpy().ravel()
    m = force_metrics(pred, target)
    assert m["rmse"] == pytest.approx(np.sqrt(np.mean(err ** 2)), rel=1e-12)
    assert m["mae"] == pytest.approx(np.mean(np.abs(err)), rel=1e-12)
    assert m["sigma"] == pytest.approx(np.std(err), rel=1e-10)
    assert m["max_err"] == pytest.approx(np.max(np.abs(err)), rel=1e-12)
    stats = ForceErrorStats()
    for i in range(5):  # per-batch accumulation equals the one-shot metrics
        stats.update(pred[i:i + 1], target[i:i + 1])
    for k, v in stats.compute().items():
        assert v == pytest.approx(m[k], rel=1e-12)
    with pytest.raises(ValueError):
        ForceErrorStats().compute()


def test_errors_by_kind_and_per_configuration_match_numpy():
    gen = torch.Generator().manual_seed(4)
    pred, target = torch.randn(6, 5, 5, generator=gen), torch.randn(6, 5, 5, generator=gen)
    err = (pred - target).double().numpy()
    kind = np.array([1, 0, 1, 1, 0, 1], np.uint8)
    by_kind = metrics_by_kind(pred, target, kind)
    assert sorted(by_kind) == ["quench", "random"]
    for code, name in enumerate(("random", "quench")):
        e = err[kind == code].ravel()
        assert by_kind[name]["sigma"] == pytest.approx(np.std(e), rel=1e-10)
        assert by_kind[name]["rmse"] == pytest.approx(np.sqrt(np.mean(e ** 2)), rel=1e-12)
        assert by_kind[name]["max_err"] == pytest.approx(np.abs(e).max(), rel=1e-12)
    # a kind with no configuration is left out, not reported as zero or NaN
    assert list(metrics_by_kind(pred, target, np.ones(6, np.uint8))) == ["quench"]
    with pytest.raises(ValueError, match="one code per configuration"):
        metrics_by_kind(pred, target, kind[:5])
    rmse = per_config_rmse(pred, target)
    assert rmse.dtype == torch.float64 and rmse.shape == (6,)
    assert np.allclose(rmse.numpy(), [np.sqrt(np.mean(e ** 2)) for e in err], rtol=1e-12, atol=0)


def test_error_report_splits_quench_sites_into_domain_walls_and_domains():
    gen = torch.Generator().manual_seed(6)
    pred, target = torch.randn(4, 6, 6, generator=gen), torch.randn(4, 6, 6, generator=gen)
    n = torch.rand(4, 6, 6, generator=gen, dtype=torch.float64)
    kind = np.array([0, 1, 1, 0], np.uint8)
    rep = error_report(pred, target, kind, n.numpy(), prefix="final/val_")
    # phi_i = (-1)^(x+y) (n_i - sum_nn n_j / 4), written out with rolls
    x, y = np.meshgrid(np.arange(6), np.arange(6), indexing="ij")
    nn = n.numpy()
    nn_sum = sum(np.roll(nn, s, axis=a) for s in (1, -1) for a in (1, 2))
    phi = (-1.0) ** (x + y) * (nn - nn_sum / 4)
    err = (pred - target).double().numpy()
    wall = np.abs(phi[1:3]) < 0.5
    assert 0 < wall.sum() < wall.size
    assert rep["final/val_quench_wall_sigma"] == pytest.approx(np.std(err[1:3][wall]), rel=1e-10)
    assert rep["final/val_quench_domain_rmse"] == pytest.approx(np.sqrt(np.mean(err[1:3][~wall] ** 2)), rel=1e-10)
    assert rep["final/val_quench_wall_fraction"] == pytest.approx(wall.mean(), rel=1e-12)
    assert rep["final/val_sigma"] == pytest.approx(np.std(err), rel=1e-10)
    assert rep["final/val_random_sigma"] == pytest.approx(np.std(err[[0, 3]]), rel=1e-10)
    # another threshold moves sites between the two
    wide = error_report(pred, target, kind, n.numpy(), wall_threshold=0.9)
    assert wide["quench_wall_fraction"] == pytest.approx((np.abs(phi[1:3]) < 0.9).mean(), rel=1e-12)
    # no densities, or no quench snapshot: no wall numbers (not zeros)
    assert not any("wall" in k or "domain" in k for k in error_report(pred, target, kind))
    assert not any("wall" in k for k in error_report(pred, target, np.zeros(4, np.uint8), n.numpy()))


def test_training_lowers_val_loss_and_logs_all_metrics(tiny_data, tmp_path):
    trainer = Trainer(_model(), tiny_data, _cfg(max_epochs=8), device="cpu", dtype="float64", out_dir=tmp_path)
    initial = trainer.evaluate("val")["rmse"]
    best = trainer.fit()
    assert best < 0.7 * initial, (best, initial)
    assert best == min(h["val/rmse"] for h in trainer.history)
    assert len(trainer.history) == 8 and trainer.stop_reason == "max_epochs"
    for h in trainer.history:
        assert set(h) == {"epoch", *EPOCH_METRICS}
        assert all(math.isfinite(v) for v in h.values())
        assert h["val/sigma"] <= h["val/rmse"] + 1e-15 and h["val/max_err"] >= h["val/rmse"]
    assert (tmp_path / "best.pt").is_file() and (tmp_path / "last.pt").is_file()
    # best.pt records the validation metrics of its epoch
    best_row = trainer.history[trainer.best_epoch - 1]
    assert load_checkpoint(tmp_path / "best.pt")["val_metrics"] == {k: v for k, v in best_row.items()
                                                                  if k.startswith("val/")}
    lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert lines[0].split(",") == ["epoch", *EPOCH_METRICS] and len(lines) == 9

    # best.pt rebuilds the model and reproduces the trainer's best validation RMSE
    ff = load_force_field(tmp_path / "best.pt", device="cpu")
    assert not ff.training and next(ff.parameters()).dtype == torch.float64
    with torch.no_grad():
        pred = ff(torch.from_numpy(tiny_data.split("val").Q))
    assert force_metrics(pred, torch.from_numpy(tiny_data.split("val").F))["rmse"] == pytest.approx(best, rel=1e-12)
    trainer.load_best()
    assert trainer.evaluate("val")["rmse"] == pytest.approx(best, rel=1e-12)


def test_resume_is_bit_identical(tiny_data, tmp_path):
    full = Trainer(_model(0), tiny_data, _cfg(), device="cpu", dtype="float64", out_dir=tmp_path / "a", seed=5)
    full.fit()

    part = Trainer(_model(0), tiny_data, _cfg(max_epochs=3), device="cpu", dtype="float64", out_dir=tmp_path / "b",
                   seed=5)
    part.fit()
    assert part.epoch == 3
    torch.manual_seed(123)  # the global RNG state must come from the checkpoint, not from here
    resumed = Trainer(_model(7), tiny_data, _cfg(), device="cpu", dtype="float64", out_dir=tmp_path / "b",
                      seed=5, resume=True)  # different init: everything must come from last.pt (the shuffling
    # generator's state too: it is at epoch 3, not at the seed's start)
    assert resumed.epoch == 3
    resumed.fit()

    def strip(hist):
        return [{k: v for k, v in h.items() if k != "epoch_time"} for h in hist]

    assert strip(resumed.history) == strip(full.history)  # exact float equality, every metric, every epoch
    assert resumed.best_val == full.best_val and resumed.best_epoch == full.best_epoch
    sa, sb = full.model.state_dict(), resumed.model.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    for group in ("best.pt", "last.pt"):
        a = torch.load(tmp_path / "a" / group, weights_only=False)["state_dict"]
        b = torch.load(tmp_path / "b" / group, weights_only=False)["state_dict"]
        assert all(torch.equal(a[k], b[k]) for k in a), group


def test_resume_needs_last_checkpoint_and_same_dtype(tiny_data, tmp_path):
    with pytest.raises(ConfigError, match="resume"):
        Trainer(_model(), tiny_data, _cfg(), device="cpu", dtype="float64", out_dir=tmp_path, resume=True)
    Trainer(_model(), tiny_data, _cfg(max_epochs=1), device="cpu", dtype="float64", out_dir=tmp_path).fit()
    with pytest.raises(ConfigError, match="dtype=float32"):
        Trainer(_model(), tiny_data, _cfg(), device="cpu", dtype="float32", out_dir=tmp_path, resume=True)
    other = _model(0, {"name": "gnn", "widths": [1, 4, 1]})
    with pytest.raises(ConfigError, match=r"model\.widths=\[1, 4, 1\]: the run being resumed \(.+\) was trained with "
                                          r".*widths=\[1, 8, 8, 1\]"):
        Trainer(other, tiny_data, _cfg(), device="cpu", dtype="float64", out_dir=tmp_path, resume=True)


def test_resume_refuses_another_seed_or_hamiltonian(tiny_data, tmp_path):
    """Another seed was resumed silently and then recorded in the checkpoints (the continuation draws from last.pt's
    RNG states); a model built for another Hamiltonian (the elastic prior's k, kappa) took the run's weights."""
    from lattice_lab.common.io import atomic_torch_save, load_torch_file

    Trainer(_model(), tiny_data, _cfg(max_epochs=1), device="cpu", dtype="float64", out_dir=tmp_path, seed=3).fit()
    assert load_torch_file(tmp_path / "best.pt")["seed"] == 3
    resumed = f"the run being resumed \\({re.escape(str(tmp_path))}\\)"
    with pytest.raises(ConfigError, match=rf"^seed=9: {resumed} was trained with seed=3$"):
        Trainer(_model(), tiny_data, _cfg(), device="cpu", dtype="float64", out_dir=tmp_path, seed=9, resume=True)
    other = build_model(TINY_GNN, HolsteinParams(temperature=0.1, kappa=0.1))
    with pytest.raises(ConfigError, match=rf"^hamiltonian\.kappa=0\.1: {resumed} was trained for kappa=0\.18$"):
        Trainer(other, tiny_data, _cfg(), device="cpu", dtype="float64", out_dir=tmp_path, seed=3, resume=True)
    # a last.pt written before the seed was stored with it: the seed of the entrypoint's config it holds
    ckpt = load_torch_file(tmp_path / "last.pt")
    del ckpt["seed"]
    atomic_torch_save({**ckpt, "config": "seed: 3\ndtype: float64\n"}, tmp_path / "last.pt")
    with pytest.raises(ConfigError, match=rf"^seed=9: {resumed} was trained with seed=3$"):
        Trainer(_model(), tiny_data, _cfg(), device="cpu", dtype="float64", out_dir=tmp_path, seed=9, resume=True)
    assert Trainer(_model(), tiny_data, _cfg(), device="cpu", dtype="float64", out_dir=tmp_path, seed=3,
                   resume=True).epoch == 1


def test_resume_from_a_last_pt_without_training_state_or_without_best_pt_is_refused(tiny_data, tmp_path):
    """A best.pt copied over last.pt (weights only) was a KeyError traceback; a run folder without best.pt
    trained on and failed at the end."""
    import shutil

    Trainer(_model(), tiny_data, _cfg(max_epochs=1), device="cpu", dtype="float64", out_dir=tmp_path).fit()
    shutil.copy(tmp_path / "last.pt", tmp_path / "last.bak")
    shutil.copy(tmp_path / "best.pt", tmp_path / "last.pt")
    with pytest.raises(ConfigError, match=rf"^resume=true: {re.escape(str(tmp_path / 'last.pt'))} holds no training "
                                          r"state to continue \(optimizer, scheduler, .* missing"):
        Trainer(_model(), tiny_data, _cfg(), device="cpu", dtype="float64", out_dir=tmp_path, resume=True)
    shutil.move(tmp_path / "last.bak", tmp_path / "last.pt")
    (tmp_path / "best.pt").unlink()
    with pytest.raises(ConfigError, match=rf"^resume=true: {re.escape(str(tmp_path / 'best.pt'))} is missing"):
        Trainer(_model(), tiny_data, _cfg(), device="cpu", dtype="float64", out_dir=tmp_path, resume=True)


def test_conservative_model_trains_and_evaluates_with_autograd(tiny_data):
    model = _model(0, TINY_ENERGY)
    assert model.conservative
    trainer = Trainer(model, tiny_data, _cfg(max_epochs=2), device="cpu", dtype="float64", out_dir=None)
    best = trainer.fit()
    assert math.isfinite(best) and len(trainer.history) == 2
    pred = trainer.predict(trainer.Q_val)
    assert not pred.requires_grad and pred.shape == trainer.F_val.shape
    assert force_metrics(pred, trainer.F_val)["rmse"] == pytest.approx(trainer.evaluate("val")["rmse"], rel=1e-12)


def test_stopping_rules(tiny_data):
    t = Trainer(_model(), tiny_data, _cfg(max_time=1e-9), device="cpu", dtype="float64")
    t.fit()
    assert t.epoch == 1 and t.stop_reason == "max_time"
    # a validation error that never improves after epoch 1: early stopping after `patience` more epochs
    t = Trainer(_model(), tiny_data, _cfg(patience=2, max_epochs=50), device="cpu", dtype="float64")
    t.evaluate = lambda split="val": {"rmse": 1.0, "mae": 1.0, "sigma": 1.0, "max_err": 1.0}
    t.fit()
    assert t.stop_reason == "early_stopping" and t.epoch == 3 and t.best_epoch == 1 and t.bad_epochs == 2


@pytest.mark.parametrize("key,value,match", [
    ("lr", -1.0, "trainer.lr=-1.0"),
    ("batch_size", 0, "trainer.batch_size=0"),
    ("lr_factor", 1.5, "trainer.lr_factor=1.5"),
    ("lr_factor", 1.0, "trainer.lr_factor=1.0"),  # else ReduceLROnPlateau raises a ValueError
    ("min_lr", 0.1, "trainer.min_lr=0.1"),  # above lr (1e-2): the schedule would raise the rate
    ("patience", 0, "trainer.patience=0"),  # would stop after the first epoch that is not a new best
    ("bogus", 1, "trainer.bogus"),
])
def test_bad_trainer_config(tiny_data, key, value, match):
    with pytest.raises(ConfigError, match=match.replace(".", r"\.")):
        Trainer(_model(), tiny_data, _cfg(**{key: value}), device="cpu", dtype="float64")


def test_dataset_without_validation_is_a_config_error(tiny_data):
    data = tiny_data.subset(np.arange(4))
    with pytest.raises(ConfigError, match="validation"):
        Trainer(_model(), data, _cfg(), device="cpu", dtype="float64")


def test_resume_refuses_other_data_and_other_optimisation_settings(tiny_data, tmp_path):
    """A resume must continue the same optimisation: other data or batch size / lr would silently give
    a run that matches no uninterrupted one (max_epochs and the like may change)."""
    Trainer(_model(), tiny_data, _cfg(max_epochs=1), device="cpu", dtype="float64", out_dir=tmp_path).fit()
    other = ForceData(Q=tiny_data.Q[::-1].copy(), F=tiny_data.F[::-1].copy(), n=tiny_data.n, kind=tiny_data.kind,
                      is_val=tiny_data.is_val, attrs=tiny_data.attrs)
    with pytest.raises(ConfigError, match="trained on other data"):
        Trainer(_model(), other, _cfg(max_epochs=2), device="cpu", dtype="float64", out_dir=tmp_path, resume=True)
    resplit = tiny_data.subset(np.arange(6))
    resplit.is_val = np.array([1, 1, 0, 0, 0, 0], bool)  # the same configurations, another validation split
    with pytest.raises(ConfigError, match="trained on other data"):
        Trainer(_model(), resplit, _cfg(max_epochs=2), device="cpu", dtype="float64", out_dir=tmp_path,
                resume=True)
    for key, value in (("lr", 2e-2), ("weight_decay", 0.1), ("lr_factor", 0.3), ("lr_patience", 5),
                       ("min_lr", 1e-5), ("grad_clip", 1.0)):  # every setting of the optimisation itself
        with pytest.raises(ConfigError, match=rf"^trainer\.{key}={value!r}: the run being resumed"):
            Trainer(_model(), tiny_data, _cfg(max_epochs=2, **{key: value}), device="cpu", dtype="float64",
                    out_dir=tmp_path, resume=True)
    with pytest.raises(ConfigError, match=rf"trainer\.batch_size=3: the run being resumed \({re.escape(str(tmp_path))}\) "
                                          r"was trained with batch_size=2"):
        Trainer(_model(), tiny_data, _cfg(max_epochs=2, batch_size=3), device="cpu", dtype="float64",
                out_dir=tmp_path, resume=True)
    resumed = Trainer(_model(), tiny_data, _cfg(max_epochs=2, patience=5, eval_batch_size=2), device="cpu",
                      dtype="float64", out_dir=tmp_path, resume=True)
    assert resumed.epoch == 1


class _ConstantForce(torch.nn.Module):
    """F = c on every site (one parameter): the loss minimiser is known in closed form (MSE: the mean
    training force). Records what fit_normalization was given and how many configurations it trained on."""

    def __init__(self):
        super().__init__()
        self.c = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))
        self.normalization_data = None
        self.trained_on = 0

    def fit_normalization(self, Q, F):
        self.normalization_data = (Q.shape[0], float(F.double().mean()))

    def forward(self, Q):
        if self.training:
            self.trained_on += Q.shape[0]
        return self.c * torch.ones_like(Q)


def _skewed_data():
    """5 training configurations (one with F = 10, four with F = 0: mean 2, median 0) and 2 validation
    configurations with F = -6 (mean over all 7: -2/7)."""
    F = np.zeros((7, 4, 4))
    F[0] = 10.0
    F[5:] = -6.0
    return ForceData(Q=np.random.default_rng(0).normal(size=(7, 4, 4)), F=F, n=np.zeros((7, 4, 4)),
                     kind=np.zeros(7, np.uint8), is_val=np.arange(7) >= 5, attrs=HAM.as_dict())


def test_training_minimises_the_force_mse_on_the_training_split_only():
    model = _ConstantForce()
    trainer = Trainer(model, _skewed_data(), _cfg(lr=0.1, batch_size=5, max_epochs=300, lr_patience=10**6),
                      device="cpu", dtype="float64")
    assert model.normalization_data == (5, 2.0)  # the training split, not the validation one
    trainer.fit()
    assert float(model.c.detach()) == pytest.approx(2.0, abs=1e-3)  # MSE minimiser; MAE would give 0, all data -2/7


def test_every_training_configuration_is_used_each_epoch():
    model = _ConstantForce()
    Trainer(model, _skewed_data(), _cfg(lr=1e-3, batch_size=2, max_epochs=3), device="cpu", dtype="float64").fit()
    assert model.trained_on == 3 * 5  # 5 configurations in batches of 2: the last batch of 1 included


def test_learning_rate_follows_the_validation_error():
    """c moves from 0 towards the training mean 2, away from the validation mean -6: the training error
    falls and the validation error rises, so ReduceLROnPlateau (patience 1) halves the rate after epoch 3."""
    trainer = Trainer(_ConstantForce(), _skewed_data(), _cfg(lr=0.1, batch_size=5, max_epochs=4, lr_patience=1,
                                                            min_lr=1e-6), device="cpu", dtype="float64")
    trainer.fit()
    assert [h["lr"] for h in trainer.history] == pytest.approx([0.1, 0.1, 0.1, 0.05])
    assert [h["train/rmse"] for h in trainer.history] == sorted((h["train/rmse"] for h in trainer.history), reverse=True)


def _flat_val(split="val"):
    """A validation error that never improves after the first epoch."""
    return {"rmse": 1.0, "mae": 1.0, "sigma": 1.0, "max_err": 1.0}


def test_resume_continues_early_stopping_the_lr_schedule_and_the_clock(tiny_data, tmp_path):
    """An interrupted run resumes the early-stopping counter, best epoch and value, the ReduceLROnPlateau
    state and the training time of last.pt: reset, it would train past its patience, call a worse epoch
    the best (overwriting best.pt), keep a rate the schedule had to lower, or restart the max_time clock."""
    cfg = {"max_epochs": 8, "patience": 4, "lr_patience": 1}
    full = Trainer(_model(), tiny_data, _cfg(**cfg), device="cpu", dtype="float64")
    full.evaluate = _flat_val
    full.fit()
    assert full.stop_reason == "early_stopping" and full.epoch == 5  # epochs 2-5 without a better one

    part = Trainer(_model(), tiny_data, _cfg(**{**cfg, "max_epochs": 3}), device="cpu", dtype="float64",
                   out_dir=tmp_path)
    part.evaluate = _flat_val
    part.fit()
    resumed = Trainer(_model(), tiny_data, _cfg(**cfg), device="cpu", dtype="float64", out_dir=tmp_path,
                      resume=True)
    assert (resumed.best_val, resumed.best_epoch, resumed.bad_epochs) == (1.0, 1, 2)
    assert resumed.elapsed == part.elapsed > 0
    resumed.evaluate = _flat_val
    resumed.fit()
    assert (resumed.stop_reason, resumed.epoch, resumed.best_epoch) == ("early_stopping", 5, 1)
    assert [h["lr"] for h in resumed.history] == [h["lr"] for h in full.history]
    final_lr = [t.optimizer.param_groups[0]["lr"] for t in (resumed, full)]
    assert final_lr[0] == final_lr[1] == pytest.approx(2.5e-3)  # halved after epochs 3 and 5
    # resumed once more after it stopped early: nothing left to train
    again = Trainer(_model(), tiny_data, _cfg(**{**cfg, "max_epochs": 20}), device="cpu", dtype="float64",
                    out_dir=tmp_path, resume=True)
    again.evaluate = _flat_val
    again.fit()
    assert (again.stop_reason, again.epoch) == ("early_stopping", 5)


def test_max_time_counts_the_training_time_of_all_epochs(tiny_data, monkeypatch):
    """max_time bounds the total training time, not the time of one epoch (a clock of 1 s per epoch)."""
    import types

    from lattice_lab.training import trainer as trainer_module

    clock = iter(range(1000))
    fake_time = types.SimpleNamespace(perf_counter=lambda: float(next(clock)))
    monkeypatch.setattr(trainer_module, "time", fake_time)
    t = Trainer(_model(), tiny_data, _cfg(max_time=2.5, max_epochs=50), device="cpu", dtype="float64")
    t.fit()
    assert (t.stop_reason, t.epoch, t.elapsed) == ("max_time", 3, 3.0)


def test_weight_decay_acts_on_the_mean_squared_error():
    """The loss is the mean over sites, so Adam's L2 term has the documented scale: with weight decay w
    the constant force minimises mean((c - F)^2) + w c^2 / 2, at c = 2 mean(F) / (2 + w) = 1 for w = 2
    (a loss summed over the 80 sites of a batch would leave c near the mean force 2)."""
    model = _ConstantForce()
    trainer = Trainer(model, _skewed_data(), _cfg(lr=0.1, batch_size=5, max_epochs=300, lr_patience=10**6,
                                                  weight_decay=2.0), device="cpu", dtype="float64")
    trainer.fit()
    assert float(model.c.detach()) == pytest.approx(1.0, abs=1e-3)


def test_gradient_clipping_is_applied():
    """trainer.grad_clip bounds the gradient norm before the Adam step: clipped to 1e-12, the first step
    moves c by about lr * 1e-12 / (1e-12 + eps) = 1e-5 instead of lr (Adam's eps = 1e-8)."""
    moved = {}
    for clip in (None, 1e-12):
        model = _ConstantForce()
        Trainer(model, _skewed_data(), _cfg(lr=0.1, batch_size=5, max_epochs=1, grad_clip=clip), device="cpu",
                dtype="float64").fit()
        moved[clip] = float(model.c.detach())
    assert moved[None] == pytest.approx(0.1, rel=1e-6)
    assert 0 < moved[1e-12] < 1e-4
