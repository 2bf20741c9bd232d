"""Analysis of one trajectory file (and ED-vs-ML comparison of two), outputs + MLflow.

``analyze_trajectory(path, cfg)`` reads the trajectory frame by frame (never the whole file),
computes per frame and per replica: phi, domain-wall fraction, S(k), the domain size L from the
replica-averaged S(k) (jackknife error over replicas, and per-replica L), G(r) and xi (same
estimators), the circular average S(|k - Q|); C(r) of Q at the requested steps; fits the growth
exponents of L(t) and xi(t); writes PNGs, CSVs and ``summary.json`` (last, so its presence marks
a complete analysis) into ``<trajectory folder>/analysis/`` and logs to MLflow when enabled.

Configuration keys (all optional; defaults in ``DEFAULTS`` and ``conf/analyze.yaml``):
``correlation_steps`` (steps for C(r), default [200, 1000, 9000]; the nearest saved frame is used),
``snapshot_steps`` (steps of the phi / S(k) snapshots; default: ``correlation_steps`` and the last frame),
``collapse_frames`` (number of late frames in the collapse plots), ``fit.t_min``, ``fit.t_max``
(fit window in time units; default the last decade of saved times), ``correlation.binning``
(``exact`` | ``integer``), ``correlation.r_max``, ``order_parameter.wall_threshold``, ``device``,
``tracking.enabled`` (true | false | null = log only into an already active MLflow run),
``tracking.experiment``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from lattice_lab.analysis import plots
from lattice_lab.analysis.compare import compare_curves
from lattice_lab.analysis.correlation import (
    as_field,
    check_binning,
    correlation_length,
    correlation_t,
    distance_bins,
    normalized_correlation_t,
)
from lattice_lab.analysis.growth import PowerLawFit, describe_exponent, format_with_error, growth_exponent
from lattice_lab.analysis.order_parameter import (
    cdw_order_parameter_t,
    check_wall_threshold,
    domain_wall_fraction_t,
)
from lattice_lab.analysis.scaling import collapse_correlation, collapse_quality, collapse_structure_factor
from lattice_lab.analysis.stats import jackknife_error, leave_one_out_means, replica_mean_sem
from lattice_lab.analysis.structure_factor import circular_average_t, domain_size_t, structure_factor_t
from lattice_lab.common.device import resolve_device
from lattice_lab.common.errors import ConfigError, LatticeLabError
from lattice_lab.common.figures import save_figure
from lattice_lab.common.io import atomic_path, atomic_write_text
from lattice_lab.common.progress import progress
from lattice_lab.common.switch import check_flag

log = logging.getLogger(__name__)

DEFAULTS: dict = {
    "out_dir": None,
    "correlation_steps": [200, 1000, 9000],
    "snapshot_steps": None,
    "collapse_frames": 6,
    "fit": {"t_min": None, "t_max": None},
    "correlation": {"binning": "exact", "r_max": None},
    "order_parameter": {"wall_threshold": 0.5},
    "device": "auto",
    "tracking": {"enabled": None, "experiment": "lattice_lab/analyze"},
}


# --------------------------------------------------------------------------------------------
# configuration and input
# --------------------------------------------------------------------------------------------
def _plain(cfg) -> dict:
    if cfg is None:
        return {}
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return OmegaConf.to_container(cfg, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    if isinstance(cfg, Mapping):
        return {k: _plain(v) if isinstance(v, Mapping) else v for k, v in cfg.items()}
    raise ConfigError(f"analysis config: expected a mapping, got {type(cfg).__name__}")


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def resolve_config(cfg=None) -> dict:
    """Defaults merged with ``cfg`` (dict or DictConfig), as a plain dict."""
    return _merge(DEFAULTS, _plain(cfg))


def open_trajectory(path):
    """Open a trajectory lazily; ConfigError if missing or not a trajectory file."""
    from lattice_lab.dynamics.trajectory import Trajectory

    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"trajectory={path}: is a folder, expected a trajectory .h5 file")
    try:
        traj = Trajectory(path)
    except LatticeLabError:
        raise
    except (OSError, KeyError, ValueError) as exc:
        raise ConfigError(f"trajectory={path}: not a readable trajectory file ({exc.__class__.__name__}: "
                          f"{exc})") from None
    if len(traj) == 0:
        traj.close()
        raise ConfigError(f"trajectory={path}: holds no frames")
    bad_time = np.flatnonzero(~np.isfinite(traj.time))
    if bad_time.size:
        traj.close()
        i = int(bad_time[0])
        raise ConfigError(f"trajectory={path}: time holds NaN/inf at frame {i} (step {int(traj.step[i])})")
    if traj.n.shape[1:] != (traj.R, traj.L, traj.L):
        traj.close()
        raise ConfigError(f"trajectory={path}: n has shape {traj.n.shape}, expected [S, R={traj.R}, L={traj.L}, "
                          f"L={traj.L}]")
    if traj.L % 2:
        traj.close()
        raise ConfigError(f"trajectory={path}: L={traj.L} is odd; the CDW analysis (Q = (pi, pi)) needs even L")
    return traj


def read_frame(traj, path, key: str, i: int) -> np.ndarray:
    """Frame ``i`` of the dataset ``key`` (``Q`` or ``n``) of the open trajectory ``traj``, checked as it is read:
    a ConfigError naming the file, the dataset and the frame where its compressed chunk cannot be read or it holds
    NaN/inf (a damaged or edited file; a simulation checks every frame before it writes it), instead of NaN
    curves, a silently dropped replica and a changed exponent. The check costs 0.2 ms for a 30 x 200 x 200 frame,
    against ~20 ms to read and decompress it."""
    try:
        frame = getattr(traj, key)[i]
    except OSError as exc:  # a damaged compressed chunk
        raise ConfigError(f"trajectory={path}: frame {i} (step {int(traj.step[i])}) cannot be read, the file "
                          f"is corrupted ({exc})") from None
    if not np.isfinite(frame).all():
        raise ConfigError(f"trajectory={path}: {key} holds NaN/inf at frame {i} (step {int(traj.step[i])})")
    return frame


def select_frames(saved_steps, requested, warn: bool = True, unique: bool = True) -> list[dict]:
    """Nearest saved frame for each requested step: dicts ``requested, step, index, exact``.

    A request that is not saved uses the nearest saved step (ties: the earlier one; logged as a
    warning, or as information for a request past the run's end: the last frame); duplicates (two requests landing on the same frame) are kept once, unless ``unique``
    is false (then the list has one entry per request, in order: two runs can be paired by it).
    """
    saved = np.asarray(saved_steps, dtype=np.int64)
    out, seen = [], set()
    for req in requested:
        if isinstance(req, bool) or not isinstance(req, (int, np.integer)):
            raise ConfigError(f"steps: {req!r} is not an integer step")
        i = int(np.argmin(np.abs(saved - int(req))))
        exact = int(saved[i]) == int(req)
        if not exact and warn and int(req) > int(saved.max()):  # e.g. the paper's step 9000 in a shorter run
            log.info("requested step %d is past the run's last saved step: using it, step %d", int(req), int(saved[i]))
        elif not exact and warn:
            log.warning("requested step %d is not saved; using the nearest saved step %d", int(req), int(saved[i]))
        if unique and i in seen:
            continue
        seen.add(i)
        out.append({"requested": int(req), "step": int(saved[i]), "index": i, "exact": exact})
    return out


def _steps_list(value, key: str) -> list[int]:
    """A list of integer steps >= 0 from an int, a list, or null (-> []). A negative step is refused, naming it
    (the nearest saved frame, step 0, would be analysed in its place with only a warning)."""
    if value is None:
        return []
    items = [value] if isinstance(value, (int, np.integer, float, str)) else value
    out = []
    try:
        for v in items:
            if isinstance(v, bool) or float(v) != int(float(v)):
                raise ValueError
            out.append(int(float(v)))
    except (TypeError, ValueError):
        raise ConfigError(f"{key}={value!r}: expected a list of integer steps") from None
    negative = [s for s in out if s < 0]
    if negative:
        raise ConfigError(f"{key}={value!r}: step {negative[0]} is negative; MD steps count from 0")
    return out


def _fit_value(cfg: dict, key: str):
    v = cfg["fit"].get(key)
    if v is None:
        return None
    try:
        v = float(v)
    except (TypeError, ValueError):
        raise ConfigError(f"fit.{key}={v!r}: expected a number or null") from None
    if not math.isfinite(v) or v < 0:
        raise ConfigError(f"fit.{key}={v!r}: expected a finite number >= 0")
    return v


def check_config(cfg=None, key_prefix: str = "") -> dict:
    """:func:`resolve_config` with every setting checked that does not need the trajectory, so that a bad value
    is refused before any work: ``analyze`` before it writes, ``simulate`` (its ``analysis`` section,
    ``key_prefix="analysis."``, named so in the error) before the run rather than after it."""
    c = resolve_config(cfg)
    try:
        _steps_list(c["correlation_steps"], "correlation_steps")
        _steps_list(c["snapshot_steps"], "snapshot_steps")
        n_col = c.get("collapse_frames")
        if isinstance(n_col, bool) or not isinstance(n_col, int) or n_col < 1:
            raise ConfigError(f"collapse_frames={n_col!r}: expected an integer >= 1")
        t_min, t_max = _fit_value(c, "t_min"), _fit_value(c, "t_max")
        if t_min is not None and t_max is not None and t_min >= t_max:
            raise ConfigError(f"fit.t_min={t_min:g} >= fit.t_max={t_max:g}: the fit window is empty")
        check_wall_threshold(c["order_parameter"].get("wall_threshold"))
        check_binning(c["correlation"].get("binning", "exact"), c["correlation"].get("r_max"))
        resolve_device(c.get("device", "auto"))
        if (c.get("tracking") or {}).get("enabled") is not None:
            check_flag(c["tracking"]["enabled"], "tracking.enabled")
    except ConfigError as exc:
        if not key_prefix:
            raise
        raise ConfigError(f"{key_prefix}{exc}") from None
    return c


# --------------------------------------------------------------------------------------------
# output helpers
# --------------------------------------------------------------------------------------------
def write_csv(path: Path, columns: dict) -> Path:
    """Atomically write equal-length columns as a CSV with a header line."""
    names = list(columns)
    data = np.column_stack([np.asarray(columns[k], dtype=np.float64) for k in names]) if names else np.zeros((0, 0))
    with atomic_path(path) as tmp:
        np.savetxt(tmp, data, delimiter=",", header=",".join(names), comments="", fmt="%.10g")
    return path


def _json_safe(x):
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, np.ndarray):
        return _json_safe(x.tolist())
    if isinstance(x, (np.floating, float)):
        x = float(x)
        return x if math.isfinite(x) else None
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def _attr(attrs: dict, key: str, default=None):
    v = attrs.get(key, default)
    return default if v is None or (isinstance(v, str) and v == "") else v


# --------------------------------------------------------------------------------------------
# per-frame observables
# --------------------------------------------------------------------------------------------
def frame_observables(n: torch.Tensor, g_bins, wall_threshold: float) -> dict:
    """All density-based observables of one frame n [R, L, L] (float64 torch); numpy results."""
    R = n.shape[0]
    phi = cdw_order_parameter_t(n)
    S = structure_factor_t(n)  # [R, L, L]
    G = normalized_correlation_t(phi, g_bins)  # [R, nb]
    q, Sq = circular_average_t(S)
    out = {
        "phi_mean": phi.mean(dim=(-2, -1)).cpu().numpy(),
        "phi_abs": phi.abs().mean(dim=(-2, -1)).cpu().numpy(),
        "wall": domain_wall_fraction_t(phi, wall_threshold).cpu().numpy(),
        "S_mean": S.mean(0),
        "L_ens": float(domain_size_t(S.mean(0))),
        "L_rep": domain_size_t(S).cpu().numpy(),
        # slices are copied: a numpy view would keep the whole [R, L, L] frame alive (kept per frame on the CPU)
        "S_Q": S[:, n.shape[-1] // 2, n.shape[-1] // 2].cpu().numpy().copy(),
        "q": q, "Sq": Sq.cpu().numpy(), "G": G.cpu().numpy(), "phi0": phi[0].cpu().numpy().copy(),
    }
    G_mean, G_sem = replica_mean_sem(out["G"])
    out["G_mean"], out["G_sem"] = G_mean, G_sem
    out["Sq_mean"], out["Sq_sem"] = replica_mean_sem(out["Sq"])
    out["xi_ens"] = float(correlation_length(G_mean, g_bins.r)[0])
    out["xi_rep"] = correlation_length(out["G"], g_bins.r)[0]
    if R >= 2:
        out["L_jk"] = domain_size_t(leave_one_out_means(S)).cpu().numpy()
        out["xi_jk"] = correlation_length(leave_one_out_means(out["G"]), g_bins.r)[0]
    else:
        out["L_jk"] = out["xi_jk"] = np.full(R, np.nan)
    return out


def log_spaced_frames(times, candidates, n: int) -> np.ndarray:
    """Up to ``n`` of the ``candidates`` (frame indices, increasing times > 0), log-spaced in time: the frames
    nearest to n times geometrically spaced from the first candidate's to the last's, each frame once. (Spacing
    the indices instead picked t = 125, 130, 158, ... from a run's linearly spaced frames: near-duplicates.)"""
    cand = np.asarray(candidates, dtype=int)
    if cand.size == 0:
        return cand
    log_t = np.log(np.asarray(times, dtype=np.float64)[cand])
    targets = np.linspace(log_t[0], log_t[-1], min(int(n), cand.size))
    return cand[np.unique(np.abs(log_t[None, :] - targets[:, None]).argmin(axis=1))]


G_COLLAPSE_X_MAX = 5.0  # collapse_G.png shows r / xi <= 5: G(r / xi) has decayed there (collapse_quality: <= 3)
_KEPT_PER_REPLICA = ("L_rep", "L_jk", "xi_rep", "xi_jk", "wall", "phi_abs", "phi_mean", "S_Q")
_KEPT = ("L_ens", "xi_ens", "G_mean", "G_sem", "Sq_mean", "Sq_sem", *_KEPT_PER_REPLICA)  # frame_observables kept per frame


def _safe_growth(t, mean, rep, jk, t_min, t_max, strict: bool, what: str) -> dict:
    try:
        return growth_exponent(t, mean, rep, jk if rep.shape[0] >= 2 else None, t_min, t_max)
    except ConfigError as exc:
        if strict:
            raise
        log.warning("no growth exponent for %s: %s", what, exc)
        return {"alpha": float("nan"), "alpha_err": float("nan"), "fit_error": str(exc)}


def _fit_obj(res: dict):
    """``(PowerLawFit, alpha_err, alpha_err_note)`` of a :func:`growth_exponent` result (also as read back
    from ``summary.json``, where NaN is null), or None without a fit."""
    res = {k: (float("nan") if v is None else v) for k, v in res.items()}
    if not np.isfinite(res.get("alpha", np.nan)):
        return None
    fit = PowerLawFit(res["alpha"], res["alpha_fit_err"], res["amplitude"], res["t_min"], res["t_max"],
                      res["n_points"])
    return fit, res["alpha_err"], res.get("alpha_err_note")


# --------------------------------------------------------------------------------------------
# the pipeline
# --------------------------------------------------------------------------------------------
def analyze_trajectory(path, cfg=None, out_dir=None, tracker=None) -> dict:
    """Analyse a trajectory file; returns the summary dict (also written to ``summary.json``).

    ``cfg``: mapping or DictConfig with the keys listed in the module docstring (missing keys
    take ``DEFAULTS``). Output folder: ``out_dir`` argument, else ``cfg.out_dir``, else
    ``<trajectory folder>/analysis``. ``tracker``: an open MLflow run to log the results into (the
    simulation that produced the trajectory) instead of a run of their own (``cfg.tracking``).
    """
    c = check_config(cfg)
    path = Path(path)
    out = Path(out_dir or c["out_dir"] or path.parent / "analysis")
    device = resolve_device(c.get("device", "auto"))
    thr = check_wall_threshold(c["order_parameter"]["wall_threshold"])
    n_col = c["collapse_frames"]
    t_min, t_max = _fit_value(c, "t_min"), _fit_value(c, "t_max")
    strict_fit = t_min is not None or t_max is not None

    with open_trajectory(path) as traj:
        attrs, L, R = traj.attrs, traj.L, traj.R
        steps, times = traj.step.astype(np.int64), traj.time.astype(np.float64)
        corr_req = _steps_list(c["correlation_steps"], "correlation_steps")
        if c["snapshot_steps"] is not None:
            snap_req = _steps_list(c["snapshot_steps"], "snapshot_steps")
        else:  # and the run's end (the papers' 25,000 steps, past 9000)
            snap_req = corr_req + [int(steps[-1])] if corr_req else []
        if not snap_req:
            snap_req = [int(steps[0]), int(steps[len(steps) // 2]), int(steps[-1])]
        corr_sel = select_frames(steps, corr_req)
        snap_sel = select_frames(steps, snap_req, warn=c["snapshot_steps"] is not None)
        corr_idx = {s["index"] for s in corr_sel}
        snap_idx = {s["index"] for s in snap_sel}
        bin_cfg = c["correlation"]
        g_bins = distance_bins(L, bin_cfg.get("r_max"), bin_cfg.get("binning", "exact"))
        S_frames = len(steps)

        # kept per frame: replica means of the curves, per-replica scalars (memory O(S (nb + R))), copied into
        # arrays allocated once: thousands of small arrays kept between the frames' large temporaries
        # fragment the heap (the RSS grew by ~14 MB per frame at 200 x 200 x 30)
        kept: dict[str, np.ndarray] = {}
        C_Q, snaps = {}, {}
        for i in progress(range(S_frames), desc=f"analyze L={L} R={R}", unit="frame"):
            # every frame of n and Q is read and checked (NaN/inf, a damaged chunk) before any output is written;
            # Q too, although only the C(r) frames use it: a file with a bad Q is not analysed as if it were sound
            n_i, Q_i = read_frame(traj, path, "n", i), read_frame(traj, path, "Q", i)
            n = as_field(n_i, device)
            obs = frame_observables(n, g_bins, thr)
            for k in _KEPT:
                if k not in kept:
                    kept[k] = np.empty((S_frames, *np.shape(obs[k])), dtype=np.float64)
                kept[k][i] = obs[k]
            if i in corr_idx:
                C_Q[i] = correlation_t(as_field(Q_i, device), g_bins).cpu().numpy()
            if i in snap_idx:
                snaps[i] = (obs["phi0"], obs["S_mean"].cpu().numpy())
        q = obs["q"]

    r = g_bins.r
    L_ens, xi_ens = kept["L_ens"], kept["xi_ens"]
    G_mean, G_sem, Sq_mean, Sq_sem = (kept[k] for k in ("G_mean", "G_sem", "Sq_mean", "Sq_sem"))
    A = {k: kept[k] for k in _KEPT_PER_REPLICA}  # [S, R]
    L_err = jackknife_error(A["L_jk"], axis=1)
    xi_err = jackknife_error(A["xi_jk"], axis=1)

    growth_L = _safe_growth(times, L_ens, A["L_rep"].T, A["L_jk"].T, t_min, t_max, strict_fit, "L(t)")
    growth_xi = _safe_growth(times, xi_ens, A["xi_rep"].T, A["xi_jk"].T, t_min, t_max, strict_fit, "xi(t)")

    # collapse frames: up to collapse_frames late frames (in the fit window if there is one), log-spaced
    cand = np.nonzero((times > 0) & np.isfinite(L_ens) & np.isfinite(xi_ens))[0]
    if "t_min" in growth_L:
        in_win = cand[(times[cand] >= growth_L["t_min"]) & (times[cand] <= growth_L["t_max"])]
        cand = in_win if in_win.size >= 2 else cand
    col_idx = log_spaced_frames(times, cand, n_col)
    xS, yS = collapse_structure_factor(q, Sq_mean[col_idx], L_ens[col_idx])
    xG, yG = collapse_correlation(r, G_mean[col_idx], xi_ens[col_idx])
    quality_S = collapse_quality(xS, yS, log_y=True)
    quality_G = collapse_quality(xG, yG, x_range=(0.0, 3.0))

    T = _attr(attrs, "temperature")
    label = plots.run_label(T, L, R, str(_attr(attrs, "force_source", "")))
    files = []
    out.mkdir(parents=True, exist_ok=True)

    # ---- CSVs
    files.append(write_csv(out / "L_t.csv", {
        "step": steps, "time": times, "L": L_ens, "L_err": L_err, "L_wavelength": 2 * np.pi * L_ens,
        "S_Q": replica_mean_sem(A["S_Q"], axis=1)[0], "S_Q_sem": replica_mean_sem(A["S_Q"], axis=1)[1]}))
    files.append(write_csv(out / "xi_t.csv", {
        "step": steps, "time": times, "xi": xi_ens, "xi_err": xi_err,
        "xi_found_fraction": np.isfinite(A["xi_rep"]).mean(axis=1)}))
    wall_m, wall_s = replica_mean_sem(A["wall"], axis=1)
    pa_m, pa_s = replica_mean_sem(A["phi_abs"], axis=1)
    pm_m, pm_s = replica_mean_sem(A["phi_mean"], axis=1)
    files.append(write_csv(out / "order_t.csv", {
        "step": steps, "time": times, "phi_abs": pa_m, "phi_abs_sem": pa_s, "wall_fraction": wall_m,
        "wall_fraction_sem": wall_s, "phi_mean": pm_m, "phi_mean_sem": pm_s}))
    C_cols = {k: [] for k in ("step", "time", "r", "C", "C_sem")}
    C_curves = {}
    for sel in corr_sel:
        m, s = replica_mean_sem(C_Q[sel["index"]], axis=0)
        C_curves[f"step {sel['step']} (t = {times[sel['index']]:g})"] = (m, s)
        for key, val in (("step", sel["step"]), ("time", times[sel["index"]])):
            C_cols[key].append(np.full(len(r), val, dtype=np.float64))
        C_cols["r"].append(r)
        C_cols["C"].append(m)
        C_cols["C_sem"].append(s)
    files.append(write_csv(out / "C_r.csv", {k: np.concatenate(v) if v else [] for k, v in C_cols.items()}))
    cols_S = {k: [] for k in ("step", "time", "q", "S", "S_sem", "L", "qL", "S_over_L2")}
    cols_G = {k: [] for k in ("step", "time", "r", "G", "G_sem", "xi", "r_over_xi")}
    for j, i in enumerate(col_idx):
        for key, val in (("step", steps[i]), ("time", times[i]), ("L", L_ens[i])):
            cols_S[key].append(np.full(len(q), val, dtype=np.float64))
        cols_S["q"].append(q)
        cols_S["S"].append(Sq_mean[i])
        cols_S["S_sem"].append(Sq_sem[i])
        cols_S["qL"].append(xS[j])
        cols_S["S_over_L2"].append(yS[j])
        for key, val in (("step", steps[i]), ("time", times[i]), ("xi", xi_ens[i])):
            cols_G[key].append(np.full(len(r), val, dtype=np.float64))
        cols_G["r"].append(r)
        cols_G["G"].append(G_mean[i])
        cols_G["G_sem"].append(G_sem[i])
        cols_G["r_over_xi"].append(xG[j])
    files.append(write_csv(out / "S_q_collapse.csv", {k: np.concatenate(v) if v else [] for k, v in cols_S.items()}))
    files.append(write_csv(out / "G_r_collapse.csv", {k: np.concatenate(v) if v else [] for k, v in cols_G.items()}))

    # ---- figures
    snap_list = [s for s in snap_sel if s["index"] in snaps]
    st = [s["step"] for s in snap_list]
    tt = [times[s["index"]] for s in snap_list]
    files.append(save_figure(plots.phi_snapshots([snaps[s["index"]][0] for s in snap_list], st, tt, label),
                             out / "phi_snapshots.png"))
    files.append(save_figure(plots.structure_factor_maps([snaps[s["index"]][1] for s in snap_list], st, tt, label),
                             out / "S_k_maps.png"))
    files.append(save_figure(plots.correlation_curves(r, C_curves, r"$C(r) = \langle Q_i Q_j \rangle$",
                                                      f"lattice correlation ({label})"), out / "C_r.png"))
    files.append(save_figure(plots.growth_plot(
        times, {"L(t) from S(k)": (L_ens, L_err), r"$\xi(t)$ from G(r) = 1/2": (xi_ens, xi_err)},
        {"L(t) from S(k)": _fit_obj(growth_L), r"$\xi(t)$ from G(r) = 1/2": _fit_obj(growth_xi)}, label),
        out / "growth.png"))
    files.append(save_figure(plots.collapse_plot(
        xS, yS, times[col_idx], r"$q\,L(t)$  ($q = |k - Q|$)", r"$S(q, t) / L(t)^2$",
        f"structure-factor collapse ({label})\nspread of log S: {quality_S:.3g}", logy=True), out / "collapse_S.png"))
    files.append(save_figure(plots.collapse_plot(
        xG, yG, times[col_idx], r"$r / \xi(t)$", r"$G(r, t)$",
        f"order-parameter correlation collapse ({label})\nspread: {quality_G:.3g}", x_max=G_COLLAPSE_X_MAX),
        out / "collapse_G.png"))

    # ---- summary (last)
    last = S_frames - 1
    summary = {
        "trajectory": str(path.resolve()), "out_dir": str(out.resolve()), "settings": result_settings(c),
        "T": T, "L": L, "R": R, "force_source": _attr(attrs, "force_source"),
        "model_run_id": _attr(attrs, "model_run_id"), "seed": _attr(attrs, "seed"), "dt": _attr(attrs, "dt"),
        "n_frames": S_frames, "steps": [int(steps[0]), int(steps[-1])], "times": [float(times[0]), float(times[-1])],
        "alpha": growth_L.get("alpha"), "alpha_err": growth_L.get("alpha_err"), "growth_L": growth_L,
        "alpha_xi": growth_xi.get("alpha"), "alpha_xi_err": growth_xi.get("alpha_err"), "growth_xi": growth_xi,
        "fit_window": [growth_L.get("t_min"), growth_L.get("t_max")],
        "final": {"step": int(steps[last]), "time": float(times[last]), "L": L_ens[last], "L_err": L_err[last],
                  "xi": xi_ens[last], "xi_err": xi_err[last], "wall_fraction": wall_m[last], "phi_abs": pa_m[last]},
        "domain_size_convention": "L = sum_k S(k) / sum_k S(k)|k-Q|, |k-Q| in rad per lattice spacing "
                                  "(a modulation of wavelength lambda gives L = lambda/2pi)",
        "correlation_steps": corr_sel, "snapshot_steps": snap_sel,
        "collapse": {"steps": steps[col_idx].tolist(), "quality_S": quality_S, "quality_G": quality_G},
        "config": c, "files": sorted(p.name for p in files) + ["summary.json"],
    }
    summary = _json_safe(summary)
    summary["mlflow_run_id"] = None
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, allow_nan=False))
    if tracker is not None:
        log_analysis(tracker, out, summary, steps, L_ens, xi_ens)
        run_id = tracker.run_id
    else:
        run_id = _log_to_mlflow(c, out, summary, steps, L_ens, xi_ens, path)
    if run_id:
        summary["mlflow_run_id"] = run_id
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, allow_nan=False))
    log.info("analysis of %s: alpha = %s from L(t), %s from xi(t) -> %s", path, describe_exponent(summary["growth_L"]),
             describe_exponent(summary["growth_xi"]), out)
    return summary


# --------------------------------------------------------------------------------------------
# several runs together
# --------------------------------------------------------------------------------------------
RESULT_SETTINGS = ("correlation_steps", "snapshot_steps", "collapse_frames", "fit", "correlation", "order_parameter")


def result_settings(c: dict) -> dict:
    """The analysis settings that change its numbers (not where it is written, run or logged), as JSON
    stores them: recorded in ``summary.json`` so that an analysis is reused only for the same ones."""
    return json.loads(json.dumps({k: c.get(k) for k in RESULT_SETTINGS}))


def _run_trajectory(path) -> Path:
    """The trajectory file of ``runs=[...]`` entry ``path`` (a run folder or the file itself)."""
    path = Path(path)
    traj = path / "trajectory.h5" if path.is_dir() else path
    if not traj.exists():
        raise ConfigError(f"runs: {path} is neither a run folder with trajectory.h5 nor a trajectory file")
    return traj


def _run_analysis(path, c: dict, elsewhere: Path) -> tuple[dict, Path]:
    """The analysis of one run (a run folder or its trajectory file): its own ``analysis/`` where that was
    made with the same settings (``result_settings``) from the trajectory as it is now; a run whose
    trajectory changed since (resumed) is analysed again there; other settings are analysed into
    ``<elsewhere>_<run folder name>`` (the run's own analysis, which its simulate run logged, is left as it is).
    Returns (summary, analysis folder)."""
    traj = _run_trajectory(path)
    own = traj.parent / "analysis"
    done = own / "summary.json"
    if not (done.exists() and (own / "L_t.csv").exists()):
        return analyze_trajectory(traj, c, out_dir=own), own
    summary = json.loads(done.read_text())
    if summary.get("settings") != result_settings(c):
        elsewhere = elsewhere.with_name(f"{elsewhere.name}_{traj.parent.name}")
        return analyze_trajectory(traj, c, out_dir=elsewhere), elsewhere
    if traj.stat().st_mtime > done.stat().st_mtime:  # a run resumed since its analysis
        return analyze_trajectory(traj, c, out_dir=own), own
    return summary, own


def compare_growth(paths, cfg=None, out_dir=None) -> dict:
    """L(t) of several runs (e.g. the papers' T = 0.1 / 0.2 / 0.3 quenches) on one log-log plot with their fits,
    and their exponents in one table: ``growth_runs.png`` and ``growth_runs.csv`` (T, L, R, steps, alpha and
    alpha_xi with errors, fit window, run folder) in ``out_dir``. Each run's own analysis is reused where it
    exists (``<run>/analysis``), else made. Returns ``{"runs": [...], "out_dir": ...}``."""
    c = check_config(cfg)
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths or [])
    if not paths:
        raise ConfigError("runs=[]: give the run folders (or trajectory files) to compare")
    for p in paths:  # every run is there before the first is analysed
        open_trajectory(_run_trajectory(p)).close()
    out = Path(out_dir or c.get("out_dir") or "runs/analysis_runs")
    rows, curves = [], []
    for i, p in enumerate(paths):
        summary, folder = _run_analysis(p, c, out / f"run{i}")
        data = np.genfromtxt(folder / "L_t.csv", delimiter=",", names=True)
        fit = _fit_obj(summary.get("growth_L") or {})
        label = plots.run_label(summary.get("T"), summary.get("L"), summary.get("R"),
                                str(summary.get("force_source") or ""))
        curves.append({"label": label, "t": np.atleast_1d(data["time"]), "L": np.atleast_1d(data["L"]),
                       "L_err": np.atleast_1d(data["L_err"]), "fit": fit})
        rows.append({"T": summary.get("T"), "L": summary.get("L"), "R": summary.get("R"),
                     "last_step": (summary.get("steps") or [None, None])[1], "alpha": summary.get("alpha"),
                     "alpha_err": summary.get("alpha_err"), "alpha_xi": summary.get("alpha_xi"),
                     "alpha_xi_err": summary.get("alpha_xi_err"), "t_min": (summary.get("fit_window") or [None])[0],
                     "t_max": (summary.get("fit_window") or [None, None])[1],
                     "run": str(Path(summary["trajectory"]).parent)})
    out.mkdir(parents=True, exist_ok=True)
    save_figure(plots.growth_runs_plot(curves), out / "growth_runs.png")
    table = io.StringIO()  # csv quotes a run folder with a comma in its name
    writer = csv.DictWriter(table, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: "" if v is None else (f"{v:.10g}" if isinstance(v, float) else v) for k, v in r.items()}
                     for r in rows)
    atomic_write_text(out / "growth_runs.csv", table.getvalue())
    log.info("growth of %d runs: %s -> %s", len(rows), "; ".join(
        f"T = {r['T']}: alpha = " + (format_with_error(r["alpha"], r["alpha_err"]) if r["alpha"] is not None
                                     else "not fitted") for r in rows), out)
    return {"runs": rows, "out_dir": str(out.resolve())}


# --------------------------------------------------------------------------------------------
# ED vs ML
# --------------------------------------------------------------------------------------------
def _replica_correlations(path, requested, bins_cfg, device):
    """Per-replica C(r) at the requested steps, the frames used, the attributes, r, and Q at step 0
    (None if step 0 is not saved)."""
    with open_trajectory(path) as traj:
        sel = select_frames(traj.step, requested, unique=False)  # one entry per request: paired by it
        bins = distance_bins(traj.L, bins_cfg.get("r_max"), bins_cfg.get("binning", "exact"))
        curves = {s["index"]: correlation_t(as_field(read_frame(traj, path, "Q", s["index"]), device), bins).cpu().numpy()
                  for s in sel}
        start = read_frame(traj, path, "Q", 0) if int(traj.step[0]) == 0 else None
        return curves, sel, dict(traj.attrs, L=traj.L, R=traj.R, _time=traj.time.copy()), bins.r, start


def compare_trajectories(ed_path, ml_path, steps=None, cfg=None, out_dir=None) -> dict:
    """C(r) of ED-driven vs ML-driven runs at ``steps`` (nearest saved frames): z-scores per r,
    max |z| per step and overall, paired replica by replica when both runs saved the same Q at step 0
    (the same hot starts, as ``simulate_compare`` runs them); writes ``compare_C_r.png``, ``compare_C_r.csv``, ``compare.json``
    into ``out_dir`` (default ``<ml trajectory folder>/analysis/compare``). Needs R >= 2 in both.
    """
    c = check_config(cfg)
    steps = _steps_list(c["correlation_steps"] if steps is None else steps, "correlation_steps")
    device = resolve_device(c.get("device", "auto"))
    ca, sa, attrs_a, r, start_a = _replica_correlations(ed_path, steps, c["correlation"], device)
    cb, sb, attrs_b, _, start_b = _replica_correlations(ml_path, steps, c["correlation"], device)
    if attrs_a["L"] != attrs_b["L"]:
        raise ConfigError(f"compare_with: lattice sizes differ (L={attrs_a['L']} in {ed_path}, L={attrs_b['L']} "
                          f"in {ml_path})")
    for attrs, p in ((attrs_a, ed_path), (attrs_b, ml_path)):
        if attrs["R"] < 2:
            raise ConfigError(f"compare_with: {p} has R={attrs['R']} replicas; need >= 2 for error bars")
    if _attr(attrs_a, "temperature") != _attr(attrs_b, "temperature"):
        log.warning("comparing runs at different temperatures: %s vs %s", _attr(attrs_a, "temperature"),
                    _attr(attrs_b, "temperature"))
    # replicas with the same hot start (simulate_compare: one seed for both runs) are pairs, strongly
    # correlated: their difference is judged by its own standard error (analysis/compare.py)
    paired = start_a is not None and start_b is not None and np.array_equal(start_a, start_b)
    names = (str(_attr(attrs_a, "force_source", "A")).upper(), str(_attr(attrs_b, "force_source", "B")).upper())
    if names[0] == names[1]:
        names = (f"{names[0]} (1)", f"{names[1]} (2)")
    out = Path(out_dir or c.get("out_dir") or Path(ml_path).parent / "analysis" / "compare")
    per_step, rows, result_steps = {}, {k: [] for k in ("step", "r", "C_a", "C_a_sem", "C_b", "C_b_sem", "z")}, []
    seen = set()
    for s_a, s_b in zip(sa, sb):  # the same requested step on both sides
        if (s_a["index"], s_b["index"]) in seen:
            continue
        seen.add((s_a["index"], s_b["index"]))
        if s_a["step"] != s_b["step"]:
            log.warning("step %d: nearest saved frames differ (%d in %s, %d in %s)", s_a["requested"], s_a["step"],
                        ed_path, s_b["step"], ml_path)
        res = compare_curves(ca[s_a["index"]], cb[s_b["index"]], paired=paired)
        per_step[s_a["step"] if s_a["step"] == s_b["step"] else f"{s_a['step']}/{s_b['step']}"] = res
        result_steps.append({"requested": s_a["requested"], "step_a": s_a["step"], "step_b": s_b["step"],
                             "max_abs_z": res["max_abs_z"], "chi2": res["chi2"], "dof": res["dof"],
                             "frac_abs_z_gt_2": res["frac_abs_z_gt_2"],
                             **({"max_abs_z_unpaired": res["max_abs_z_unpaired"]} if paired else {})})
        rows["step"].append(np.full(len(r), s_a["step"], dtype=np.float64))
        rows["r"].append(r)
        for key, val in (("C_a", res["mean_a"]), ("C_a_sem", res["sem_a"]), ("C_b", res["mean_b"]),
                         ("C_b_sem", res["sem_b"]), ("z", res["z"])):
            rows[key].append(val)
    out.mkdir(parents=True, exist_ok=True)
    label = plots.run_label(_attr(attrs_b, "temperature"), attrs_b["L"], f"{attrs_a['R']}/{attrs_b['R']}")
    files = [save_figure(plots.comparison_plot(r, per_step, names, label), out / "compare_C_r.png"),
             write_csv(out / "compare_C_r.csv", {k: np.concatenate(v) for k, v in rows.items()})]
    maxz = [s["max_abs_z"] for s in result_steps if np.isfinite(s["max_abs_z"])]
    result = _json_safe({
        "a": str(Path(ed_path).resolve()), "b": str(Path(ml_path).resolve()), "names": list(names),
        "L": attrs_a["L"], "R_a": attrs_a["R"], "R_b": attrs_b["R"], "T": _attr(attrs_b, "temperature"),
        "steps": result_steps, "max_abs_z": max(maxz) if maxz else float("nan"),
        "paired": paired,
        "statistic": ("max over r of |mean_j (a_j - b_j)| / sem_j(a_j - b_j) (replicas paired by their shared hot "
                      "start)" if paired else "max over r of |mean_a - mean_b| / sqrt(sem_a^2 + sem_b^2)"),
        "files": [p.name for p in files] + ["compare.json"], "out_dir": str(out.resolve()),
    })
    atomic_write_text(out / "compare.json", json.dumps(result, indent=2, allow_nan=False))
    tracking = dict(c.get("tracking") or {})
    if tracking_enabled(tracking):
        from lattice_lab.tracking.mlflow_utils import standard_tags, start_run

        tags = standard_tags("analyze", comparison="true", trajectory_a=result["a"], trajectory_b=result["b"],
                             model_run_id=_attr(attrs_b, "model_run_id"))
        with start_run(run_name=f"compare_{Path(ed_path).parent.name}_vs_{Path(ml_path).parent.name}", tags=tags,
                       task="analyze", cfg={"tracking": tracking}, enabled=True) as tracker:
            tracker.log_metrics({"max_abs_z": result["max_abs_z"]} if result["max_abs_z"] is not None else {})
            for s in result["steps"]:
                if s["max_abs_z"] is not None:
                    tracker.log_metrics({"max_abs_z_at_step": s["max_abs_z"]}, step=s["step_b"])
            for name in result["files"]:
                tracker.log_artifact(out / name, "compare")
            result["mlflow_run_id"] = tracker.run_id
    return result


# --------------------------------------------------------------------------------------------
# MLflow
# --------------------------------------------------------------------------------------------
def tracking_enabled(tracking: dict) -> bool:
    """``tracking.enabled``: true / false, or null = only when there is a parent run to nest under
    (``tracking.parent_run_id`` set, or an active MLflow run in this process)."""
    enabled = tracking.get("enabled")
    if enabled is not None:
        return bool(enabled)
    if tracking.get("parent_run_id"):
        return True
    try:
        import mlflow

        return mlflow.active_run() is not None
    except ImportError:  # pragma: no cover
        return False


def log_analysis(tracker, out: Path, summary: dict, steps, L_ens, xi_ens) -> None:
    """Log an analysis into ``tracker``'s run: L(t) and xi(t) as step metrics, alpha and its errors, final L
    and xi and the collapse quality as scalars, every output file (PNG, CSV, JSON) under ``analysis/``.
    The one implementation for a run of its own (``analyze``) and for the simulation that ran it, so both
    carry the same metrics."""
    if not tracker.enabled:
        return
    try:  # the whole L(t), xi(t) history in a few batches (one call per frame would be slow)
        import time as _time

        from mlflow.entities import Metric

        ts = int(_time.time() * 1000)
        batch = [Metric(k, float(v), ts, int(s)) for s, Lv, xv in zip(steps, L_ens, xi_ens)
                 for k, v in (("L", Lv), ("xi", xv)) if np.isfinite(v)]
        for i in range(0, len(batch), 1000):
            tracker.client.log_batch(tracker.run_id, metrics=batch[i:i + 1000])
    except Exception as exc:  # noqa: BLE001 - tracking never stops the analysis
        log.warning("MLflow: could not log L(t), xi(t) (%s: %s)", type(exc).__name__, exc)
    scalars = {k: summary.get(k) for k in ("alpha", "alpha_err", "alpha_xi", "alpha_xi_err")}
    for k in ("alpha_fit_err", "alpha_replica_err", "alpha_jackknife_err"):
        scalars[k] = summary["growth_L"].get(k)
    scalars.update(final_L=summary["final"]["L"], final_xi=summary["final"]["xi"],
                   collapse_quality_S=summary["collapse"]["quality_S"],
                   collapse_quality_G=summary["collapse"]["quality_G"])
    tracker.log_metrics({k: float(v) for k, v in scalars.items()
                         if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)})
    for name in summary["files"]:
        if (out / name).exists():
            tracker.log_artifact(out / name, "analysis")


def _log_to_mlflow(c: dict, out: Path, summary: dict, steps, L_ens, xi_ens, path: Path):
    """Log L(t), xi(t) (step metrics), alpha & errors, params, PNG/CSV/JSON artifacts; returns the run id."""
    tracking = dict(c.get("tracking") or {})
    if not tracking_enabled(tracking):
        return None
    from lattice_lab.tracking.mlflow_utils import standard_tags, start_run

    tags = standard_tags("analyze", trajectory=str(path.resolve()),
                         model_run_id=summary.get("model_run_id") or None,
                         force_source=summary.get("force_source"), T=summary.get("T"), L=summary.get("L"),
                         R=summary.get("R"), seed=summary.get("seed"))
    try:
        import mlflow

        nested = mlflow.active_run() is not None
    except ImportError:  # pragma: no cover
        nested = False
    with start_run(run_name=f"analysis_{path.parent.name}", tags=tags, nested=nested, task="analyze",
                   cfg={"tracking": tracking}, enabled=True) as tracker:
        if not tracker.enabled:
            return None
        tracker.log_params({k: v for k, v in c.items() if k != "tracking"} | {"trajectory": str(path)})
        log_analysis(tracker, out, summary, steps, L_ens, xi_ens)
        return tracker.run_id
