"""Derived benchmark numbers: scaling, fraction of the matmul ceiling, ED crossover, target checks.

- time per site t(L)/N: a local model is O(N), so this is constant up to overheads; the scaling
  ratio is max/min of it over a range of L (1 = perfectly linear).
- fixed cost per call: t(N) = t0 + b N fitted to the measured force times (relative least squares)
  separates what does not scale with the sites (dispatch, thread start-up, per-call bookkeeping) from
  the per-site rate b; t0 / t(L_min) is the part of the smallest lattice's call that is overhead.
- the cores' state: on CPU every force timing is bracketed by two probes of the core-to-core round
  trip (:mod:`lattice_lab.bench.cores`); a timing whose probes are both within ``FAR_FACTOR`` of the
  run's fastest probe ran with the two threads on near cores. The scaling ratio of those timings alone
  (``scaling_ratio_near``) shows what the per-call overheads are when the VM does not place the
  threads far apart; the main ratio takes every timing.
- fraction of ceiling: achieved GFLOP/s (``flops_per_site * N / t``) over the dense matmul rate.
- ED vs models: ED time is fitted as ``a N^3`` (diagonalisation) and a model's as ``b N``;
  they cross at N* = sqrt(b / a), i.e. L* = (b / a)^(1/4). The speed-up at an ED size uses the
  model measured at that size when it was, else its time per site interpolated log-log between
  measured sizes (flagged "interpolated"), else held at the nearest measured size ("extrapolated").
"""

from __future__ import annotations

import math
import statistics

from lattice_lab.bench.cores import FAR_FACTOR, near_cores, probe_pairs


def _ok(rows, role: str | None = "scaling"):
    return [r for r in rows if r.get("status") == "ok" and r.get("force_s") and (role is None or r["set"] == role)]


def power_coefficient(Ls, times, power: float) -> float | None:
    """Least-squares fit of log t = log a + power log N with fixed ``power``: a = geometric mean of t / N^power."""
    pairs = [(L, t) for L, t in zip(Ls, times) if t and t > 0]
    if not pairs:
        return None
    return math.exp(statistics.fmean(math.log(t) - power * math.log(L * L) for L, t in pairs))


def scaling_ratio(rows, min_L: int = 0) -> float | None:
    """max/min of the force time per site over measured sizes L >= min_L (None with < 2 sizes)."""
    tps = [r["force_s_per_site"] for r in _ok(rows) if r["L"] >= min_L]
    return max(tps) / min(tps) if len(tps) >= 2 else None


def _timings(row) -> list[tuple[float, tuple]]:
    """A measured row's force timings, one per round: ``(seconds, (probe before, probe after))``."""
    times = row.get("force_s_rounds") or [row["force_s"]]
    pairs = probe_pairs(row)
    if len(pairs) != len(times):  # probes missing in some round: not attributable
        pairs = [(None, None)] * len(times)
    return list(zip(times, pairs))


def round_spread(rows) -> float | None:
    """The largest max/min, over the measured sizes, of one size's force times in the rounds (None
    without rounds): how far the machine alone moves a timing. A scaling ratio that is not clearly
    beyond it cannot tell the sizes apart."""
    spreads = [max(t) / min(t) for r in _ok(rows) if len(t := r.get("force_s_rounds") or []) >= 2]
    return max(spreads) if spreads else None


def core_probes(rows) -> list[float]:
    """Every core-to-core probe (ns) of the measured rows, all rounds."""
    return [p for r in _ok(rows, role=None) for _, pair in _timings(r) for p in pair if p is not None]


def near_core_scaling(rows, fastest_ns: float | None, factor: float = FAR_FACTOR) -> dict:
    """Scaling over the timings that ran with both probes within ``factor`` of the run's fastest probe
    (the threads on near cores): per size the median of those timings; ``ratio`` = max/min of the time
    per site (None unless every measured size has one), ``timings`` / ``far`` = probed timings / those
    with a far probe, ``sizes_without`` = sizes that had no near-core timing."""
    per_site, sizes_without, n, far = {}, [], 0, 0
    for r in _ok(rows):
        states = [(t, near_cores(pair, fastest_ns, factor)) for t, pair in _timings(r)]
        probed = [(t, near) for t, near in states if near is not None]
        n += len(probed)
        far += sum(not near for _, near in probed)
        near_times = [t for t, near in probed if near]
        if near_times:
            per_site[r["L"]] = statistics.median(near_times) / (r["N"] * r.get("batch", 1))
        else:
            sizes_without.append(r["L"])
    ok = bool(per_site) and not sizes_without and len(per_site) >= 2
    return {"ratio": max(per_site.values()) / min(per_site.values()) if ok else None,
            "timings": n, "far": far, "sizes_without": sizes_without}


def affine_fit(Ns, times) -> dict | None:
    """Fit ``t = t0 + b N`` minimising the relative residuals sum ((t0 + b N - t) / t)^2.

    Returns ``{"t0", "b", "max_rel_residual"}`` (seconds, seconds per site), or None with fewer than
    2 distinct N. Relative weights keep the small lattices (where t0 matters) from being drowned by the
    large ones, whose times are up to 256x longer."""
    pts = [(float(N), float(t)) for N, t in zip(Ns, times) if t and t > 0]
    if len({N for N, _ in pts}) < 2:
        return None
    w = [1.0 / t**2 for _, t in pts]
    s0 = sum(w)
    s1 = sum(wi * N for wi, (N, _) in zip(w, pts))
    s2 = sum(wi * N * N for wi, (N, _) in zip(w, pts))
    y0 = sum(wi * t for wi, (_, t) in zip(w, pts))
    y1 = sum(wi * N * t for wi, (N, t) in zip(w, pts))
    det = s0 * s2 - s1 * s1
    t0 = (s2 * y0 - s1 * y1) / det
    b = (s0 * y1 - s1 * y0) / det
    return {"t0": t0, "b": b, "max_rel_residual": max(abs(t0 + b * N - t) / t for N, t in pts)}


def _large_rows(rows, large_L: int):
    """Measured rows with L >= large_L; if none, the largest measured size (flagged by the caller)."""
    ok = _ok(rows)
    big = [r for r in ok if r["L"] >= large_L]
    if big or not ok:
        return big, True
    return [max(ok, key=lambda r: r["L"])], False


def summarize_model(info: dict, ceiling_gflops: float | None, *, large_L: int = 128, scaling_min_L: int = 64,
                    fastest_rt_ns: float | None = None) -> dict:
    """Add ``ceiling_fraction`` to every row and return the per-model summary (``fastest_rt_ns``: the
    run's fastest core-to-core probe, for the fast-state scaling ratio)."""
    rows = info["rows"]
    for r in rows:
        if r.get("gflops") is not None and ceiling_gflops:
            r["ceiling_fraction"] = r["gflops"] / ceiling_gflops
    ok = _ok(rows)
    big, at_large = _large_rows(rows, large_L)

    def med(key):
        vals = [r[key] for r in big if r.get(key) is not None]
        return statistics.median(vals) if vals else None

    all_ok = _ok(rows, role=None)
    fit = affine_fit([r["N"] * r.get("batch", 1) for r in ok], [r["force_s"] for r in ok])
    smallest = min(ok, key=lambda r: r["L"]) if ok else None
    near = near_core_scaling(rows, fastest_rt_ns)
    return {
        "preset": info["preset"], "model": info["model"], "params": info["params"],
        "flops_per_site": info["flops_per_site"], "conservative": info["conservative"],
        "error": info.get("error"), "compile_error": info.get("compile_error"),
        "sizes_measured": [r["L"] for r in ok],
        "sizes_skipped": {str(r["L"]): r["note"] for r in rows if r["status"] != "ok" and r["set"] == "scaling"},
        "scaling_ratio_all": scaling_ratio(rows), f"scaling_ratio_ge{scaling_min_L}": scaling_ratio(rows, scaling_min_L),
        "scaling_ratio_near": near["ratio"], "probed_timings": near["timings"], "far_timings": near["far"],
        "sizes_without_near_timing": near["sizes_without"], "round_spread": round_spread(rows),
        "large_L": large_L, "large_L_measured": at_large, "large_sizes": [r["L"] for r in big],
        "ceiling_fraction_large": med("ceiling_fraction"), "gflops_large": med("gflops"),
        "langevin_overhead_large": med("langevin_overhead"), "site_steps_per_s_large": med("site_steps_per_s"),
        "force_s_per_site_large": med("force_s_per_site"),
        "mem_per_site_step_large": med("mem_per_site_step"),
        "fixed_s_per_call": fit["t0"] if fit else None, "site_s_affine": fit["b"] if fit else None,
        "affine_max_rel_residual": fit["max_rel_residual"] if fit else None,
        "fixed_fraction_smallest": fit["t0"] / smallest["force_s"] if fit else None,
        "b_seconds_per_site": power_coefficient([r["L"] for r in big], [r["force_s"] for r in big], 1.0),
        "_points": sorted((r["L"], r["force_s_per_site"]) for r in all_ok),
    }


def model_time_at(summary: dict, L: int) -> tuple[float | None, str]:
    """Model force time at size L: measured, log-log interpolated, or extrapolated per-site time."""
    pts = summary["_points"]
    if not pts:
        return None, "none"
    N = L * L
    for Lm, tps in pts:
        if Lm == L:
            return tps * N, "measured"
    below = [p for p in pts if p[0] < L]
    above = [p for p in pts if p[0] > L]
    if below and above:
        (L0, t0), (L1, t1) = below[-1], above[0]
        w = (math.log(L) - math.log(L0)) / (math.log(L1) - math.log(L0))
        return math.exp((1 - w) * math.log(t0) + w * math.log(t1)) * N, "interpolated"
    nearest = above[0] if above else below[-1]
    return nearest[1] * N, "extrapolated"


def ed_comparison(ed_rows: list[dict], summaries: list[dict], fit_min_L: int = 16) -> dict:
    """ED fit a N^3, per model b N, crossover L* = (b/a)^(1/4) and speed-ups at every ED size."""
    ed_ok = [r for r in ed_rows if r.get("ed_force_s")]
    fit = [r for r in ed_ok if r["L"] >= fit_min_L]
    fit = fit if len(fit) >= 2 else ed_ok
    a = power_coefficient([r["L"] for r in fit], [r["ed_force_s"] for r in fit], 3.0)
    out = {"ed_a_seconds_per_N3": a, "ed_fit_sizes": [r["L"] for r in fit], "models": {}}
    for s in summaries:
        b = s.get("b_seconds_per_site")
        cross = (b / a) ** 0.25 if a and b else None
        speed = []
        for r in ed_ok:
            t_model, how = model_time_at(s, r["L"])
            speed.append({"L": r["L"], "ed_s": r["ed_force_s"], "model_s": t_model, "how": how,
                          "speedup": r["ed_force_s"] / t_model if t_model else None})
        out["models"][s["preset"]] = {"b_seconds_per_site": b, "crossover_L": cross, "speedups": speed}
    return out


def speedup_at(comparison: dict, preset: str, L: int) -> dict | None:
    for row in comparison["models"].get(preset, {}).get("speedups", []):
        if row["L"] == L:
            return row
    return None


def _state_note(s: dict) -> str:
    """The scaling ratio's reading with the threads on near cores, for the target's detail."""
    n, far = s.get("probed_timings") or 0, s.get("far_timings") or 0
    if not n:
        return ""
    if not far:
        return f"; all {n} timings with the threads on near cores"
    if s.get("scaling_ratio_near") is not None:
        return f"; {far} of {n} timings with the threads on distant cores, without them {s['scaling_ratio_near']:.3f}"
    return (f"; {far} of {n} timings with the threads on distant cores (no near-core timing at "
            f"L = {s.get('sizes_without_near_timing')})")


def _noise_note(s: dict, tol: float) -> str:
    """The rounds' spread at one size, for the scaling target's detail; flagged when it alone exceeds
    the tolerance (then the machine, not the code, can decide the target)."""
    spread = s.get("round_spread")
    if spread is None:
        return ""
    note = f"; rounds at one size differ by up to {spread:.2f}x"
    return note + (" (beyond the tolerance: this machine's noise can decide the target)" if spread > 1 + tol else "")


def evaluate_targets(summaries: list[dict], comparison: dict, memory: dict | None, targets: dict,
                     device_type: str) -> list[dict]:
    """The issue's targets as ``{"target", "passed" (True/False/None = not measurable), "detail"}``."""
    by = {s["preset"]: s for s in summaries}
    res = []

    def add(name, passed, detail):
        res.append({"target": name, "passed": passed, "detail": detail})

    tol = float(targets["scaling_tolerance"])
    for s in summaries:
        ratio, Ls = s["scaling_ratio_all"], s["sizes_measured"]
        name = f"linear scaling {s['preset']}: time/site max/min <= {1 + tol:g}"
        if ratio is None:
            add(name, None, f"fewer than 2 sizes measured ({Ls})")
        else:
            fixed = ""
            if s.get("fixed_s_per_call") is not None:
                fixed = (f"; fit t = t0 + b N: t0 = {1e6 * s['fixed_s_per_call']:.3g} us per call "
                         f"({s['fixed_fraction_smallest']:.0%} of the L = {min(Ls)} call), "
                         f"b = {1e9 * s['site_s_affine']:.3g} ns/site")
            add(name, ratio <= 1 + tol, f"max/min = {ratio:.3f} over L = {Ls}{fixed}{_state_note(s)}{_noise_note(s, tol)}")
    for preset, key in (("enn", "enn_ceiling_fraction"), ("gnn", "gnn_ceiling_fraction")):
        want = float(targets[key])
        name = f"{preset} >= {want:.0%} of matmul ceiling on {device_type} at L >= {targets['large_L']}"
        s = by.get(preset)
        if s is None or s["ceiling_fraction_large"] is None:
            add(name, None, f"{preset} not measured at any size")
            continue
        frac = s["ceiling_fraction_large"]
        note = "" if s["large_L_measured"] else f" (no size >= {targets['large_L']} fitted the budget)"
        add(name, frac >= want if s["large_L_measured"] else None,
            f"median fraction {frac:.1%} at L = {s['large_sizes']}{note}")
    want = float(targets["langevin_overhead"])
    for s in summaries:
        ov = s["langevin_overhead_large"]
        name = f"Langevin step <= {want:.0%} over force {s['preset']}"
        if ov is None:
            add(name, None, "no step measured")
        else:
            add(name, ov <= want, f"overhead {ov:+.1%} (median at L = {s['large_sizes']})")
    L_ed = int(targets["ed_compare_L"])
    for s in summaries:
        row = speedup_at(comparison, s["preset"], L_ed)
        name = f"{s['preset']} faster than ED at L = {L_ed}"
        if row is None or row["speedup"] is None:
            add(name, None, f"ED or model not measured at L = {L_ed}")
        else:
            add(name, row["speedup"] > 1.0, f"speed-up {row['speedup']:.3g}x (model time {row['how']})")
    want = float(targets["enn_ed_speedup"])
    row = speedup_at(comparison, "enn", L_ed)
    name = f"enn >= {want:g}x faster than ED at L = {L_ed}"
    if row is None or row["speedup"] is None:
        add(name, None, f"enn or ED not measured at L = {L_ed}")
    else:
        add(name, row["speedup"] >= want, f"speed-up {row['speedup']:.3g}x (model time {row['how']})")
    want_gb = float(targets["enn_memory_gb"])
    name = f"{targets['memory_preset']} full step at L = {targets['memory_L']} under {want_gb:g} GB"
    if not memory or memory.get("total_bytes") is None:
        add(name, None, (memory or {}).get("error", "not measured"))
    else:
        add(name, memory["total_bytes"] < want_gb * 1e9,
            f"{memory['total_bytes'] / 1e9:.3g} GB = params {memory['param_bytes'] / 1e6:.3g} MB + state "
            f"{memory['state_bytes'] / 1e6:.3g} MB + step peak {memory['peak_step_bytes'] / 1e6:.3g} MB")
    return res
