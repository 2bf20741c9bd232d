"""Force-error metrics, identical for every model: RMSE, MAE, sigma and maximum error.

With the error e = F_ML - F_ED over all sites of all configurations:

- ``rmse``    = sqrt(mean(e^2))
- ``mae``     = mean(|e|)
- ``sigma``   = std(e) = sqrt(mean(e^2) - mean(e)^2), the papers' "standard deviation of F_ML - F_ED"
- ``max_err`` = max(|e|)

:class:`ForceErrorStats` accumulates the sums (in float64) over batches, so metrics over a whole
data set never need all predictions in memory; :func:`force_metrics` is the one-shot form.
:func:`metrics_by_kind` splits the error by kind of configuration (random hot starts, quench
snapshots), :func:`per_config_rmse` gives one RMSE per configuration, and :func:`error_report` is the
whole set of numbers a trained model is reported with (overall, per kind, and on the quench snapshots'
domain walls and domains apart).
"""

from __future__ import annotations

import math

import torch

METRIC_KEYS = ("rmse", "mae", "sigma", "max_err")


class ForceErrorStats:
    """Running sums of the force error; ``update`` per batch, ``compute`` at the end.

    The sums stay on the tensors' device (float64) so accumulating over a training epoch costs no
    host synchronisation; ``compute`` transfers them once.
    """

    def __init__(self) -> None:
        self._acc: torch.Tensor | None = None  # [count, sum, sum_sq, sum_abs]
        self._max: torch.Tensor | None = None

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
        err = (pred.detach() - target.detach()).to(torch.float64)
        if err.numel() == 0:
            return
        abs_err = err.abs()
        acc = torch.stack([err.new_tensor(float(err.numel())), err.sum(), err.square().sum(), abs_err.sum()])
        mx = abs_err.max()
        self._acc = acc if self._acc is None else self._acc + acc
        self._max = mx if self._max is None else torch.maximum(self._max, mx)

    def compute(self) -> dict[str, float]:
        if self._acc is None:
            raise ValueError("no samples: cannot compute force metrics of an empty set")
        count, s, s2, sa = self._acc.cpu().tolist()
        mean, mean_sq = s / count, s2 / count
        return {
            "rmse": math.sqrt(mean_sq),
            "mae": sa / count,
            "sigma": math.sqrt(max(mean_sq - mean * mean, 0.0)),
            "max_err": float(self._max.cpu()),
        }


def force_metrics(pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """Metrics (``rmse``, ``mae``, ``sigma``, ``max_err``) of ``pred - target`` over all elements."""
    stats = ForceErrorStats()
    stats.update(pred, target)
    return stats.compute()


def prefixed(metrics: dict[str, float], prefix: str) -> dict[str, float]:
    """``{"rmse": x}`` -> ``{"<prefix>/rmse": x}`` (the names logged to MLflow and metrics.csv)."""
    return {f"{prefix}/{k}": v for k, v in metrics.items()}


def metrics_by_kind(pred, target, kind, names=("random", "quench")) -> dict[str, dict[str, float]]:
    """:func:`force_metrics` of the configurations of each kind present: ``{"random": {...}, "quench": {...}}``.

    ``pred, target``: ``[C, L, L]``; ``kind``: ``[C]`` codes indexing ``names`` (the dataset's ``kind``)."""
    kind = torch.as_tensor(kind).to(torch.long)
    if kind.shape != pred.shape[:1]:
        raise ValueError(f"kind has shape {tuple(kind.shape)}, expected ({pred.shape[0]},): one code per configuration")
    out = {}
    for code, name in enumerate(names):
        mask = (kind == code).to(pred.device)
        if bool(mask.any()):
            out[name] = force_metrics(pred[mask], target[mask])
    return out


@torch.no_grad()
def per_config_rmse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Force RMSE of each configuration, ``[C]`` float64, over its sites (all dimensions after the first)."""
    err = (pred.detach() - target.detach()).to(torch.float64)
    return err.square().flatten(1).mean(1).sqrt()


def error_report(pred, target, kind, density=None, prefix: str = "", wall_threshold: float | None = None
                 ) -> dict[str, float]:
    """Every force-error number of a set of configurations, named ``<prefix><name>``:

    - overall: ``sigma``, ``rmse``, ``mae``, ``max_err``;
    - per kind of configuration: ``random_sigma``, ``quench_sigma``, ... (:func:`metrics_by_kind`);
    - given the exact densities ``density [C, L, L]``, the quench snapshots' sites split by the local CDW
      order parameter phi_i (:mod:`lattice_lab.analysis.order_parameter`): ``quench_wall_*`` on domain-wall
      sites (|phi_i| < ``wall_threshold``, default 1/2), ``quench_domain_*`` inside the domains, and
      ``quench_wall_fraction``. The domains are the ordered states that coarsening produces; the walls,
      whose motion is the coarsening, are where a local model has the least to go on.
    """
    from lattice_lab.analysis.order_parameter import WALL_THRESHOLD

    threshold = WALL_THRESHOLD if wall_threshold is None else float(wall_threshold)
    out = {f"{prefix}{k}": v for k, v in force_metrics(pred, target).items()}
    for name, metrics in metrics_by_kind(pred, target, kind).items():
        out.update({f"{prefix}{name}_{k}": v for k, v in metrics.items()})
    quench, abs_phi = quench_order(kind, density)
    if abs_phi is not None:
        wall = (abs_phi < threshold).to(pred.device)
        p, t = pred[quench.to(pred.device)], target[quench.to(target.device)]
        for name, mask in (("wall", wall), ("domain", ~wall)):
            if bool(mask.any()):
                out.update({f"{prefix}quench_{name}_{k}": v for k, v in force_metrics(p[mask], t[mask]).items()})
        out[f"{prefix}quench_wall_fraction"] = float(wall.to(torch.float64).mean())
    return out


def quench_order(kind, density) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(quench, |phi|)``: which configurations are quench snapshots (``[C]`` bool) and the magnitude of the
    local CDW order parameter of their exact densities (``[C_quench, L, L]`` float64, CPU; None without
    densities or snapshots)."""
    from lattice_lab.analysis.order_parameter import cdw_order_parameter_t

    quench = torch.as_tensor(kind).to(torch.long) == 1
    if density is None or not bool(quench.any()):
        return quench, None
    return quench, cdw_order_parameter_t(torch.as_tensor(density)[quench].to(torch.float64)).abs()


def sigma_by_kind(metrics: dict, prefix: str, names=("random", "quench")) -> str:
    """``"; random 0.711; quench 0.2468"``: the per-kind sigma of an :func:`error_report` (``prefix`` as given to
    it) for an end line, the kinds present only."""
    return "".join(f"; {name} {metrics[f'{prefix}{name}_sigma']:.4g}" for name in names
                   if f"{prefix}{name}_sigma" in metrics)
