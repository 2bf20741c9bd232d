"""Benchmark output: aligned text tables (stdout), ``bench.json``, ``bench.csv`` and ``bench.png``.

``bench.csv`` is long format, one row per measurement: ``kind`` = ``model`` (a preset at one L,
``set`` = ``scaling`` or ``ed_compare``) or ``ed`` (exact diagonalisation at one L). Columns are
:data:`CSV_COLUMNS`; empty cells mean "not measured" (skipped sizes carry the reason in ``note``);
``core_rt_ns_slowest`` is the slowest core-to-core probe around the row's force timings (all rounds).
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from lattice_lab.bench.cores import probe_pairs
from lattice_lab.common.io import atomic_write_text

CSV_COLUMNS = (
    "kind", "preset", "model", "set", "L", "N", "batch", "params", "flops_per_site", "status", "note",
    "force_s", "force_s_min", "force_repeats", "force_s_per_site", "gflops", "ceiling_fraction",
    "step_s", "step_s_min", "step_repeats", "step_s_per_site", "site_steps_per_s", "langevin_overhead",
    "peak_mem_force_bytes", "mem_per_site_force", "peak_mem_step_bytes", "mem_per_site_step",
    "compiled_force_s", "compiled_speedup", "cuda_graph", "eager_force_s", "rounds", "core_rt_ns_slowest", "ed_force_s", "ed_eigh_s", "ed_force_s_per_site",
)


def _fmt(x, spec: str = ".3g") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return format(x, spec)


def table(headers: list[str], rows: list[list[str]]) -> str:
    """Right-aligned text table (first column left-aligned)."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def _probes_text(row: dict) -> str:
    """The slower core-to-core probe of each round's force timing, e.g. ``86/362/88``."""
    return "/".join(f"{max(p):.0f}" for p in probe_pairs(row)) or "-"


def model_table(model_rows: list[dict]) -> str:
    """One row per preset and L of the scaling set; with ``compile=true`` also the ``torch.compile``d force
    call (``compiled ms``) and its speed-up over the eager one (``compiled x``, > 1: compiled is faster)."""
    compiled = any(r.get("compiled_force_s") is not None for r in model_rows if r["set"] == "scaling")
    headers = ["preset", "L", "force ms", "us/site", *(["compiled ms", "compiled x"] if compiled else []),
               "step ms", "site-steps/s", "GFLOP/s", "%ceil", "overhead", "B/site(step)", "c2c ns", "note"]
    rows = []
    for r in model_rows:
        if r["set"] != "scaling":
            continue
        if r["status"] != "ok":
            rows.append([r["preset"], str(r["L"]), *["-"] * (len(headers) - 3), r["note"][:60]])
            continue
        comp = r.get("compiled_force_s")
        rows.append([r["preset"], str(r["L"]), _fmt(1e3 * r["force_s"]), _fmt(1e6 * r["force_s_per_site"]),
                     *([_fmt(1e3 * comp if comp is not None else None),
                        _fmt(r.get("compiled_speedup"), ".2f") + "x" if r.get("compiled_speedup") else "-"]
                       if compiled else []),
                     _fmt(1e3 * r["step_s"]) if r.get("step_s") else "-",
                     _fmt(r.get("site_steps_per_s"), ".3e"), _fmt(r.get("gflops")),
                     _fmt(100 * r["ceiling_fraction"], ".1f") if r.get("ceiling_fraction") is not None else "-",
                     _fmt(100 * r["langevin_overhead"], "+.1f") + "%" if r.get("langevin_overhead") is not None else "-",
                     _fmt(r.get("mem_per_site_step"), ".0f"), _probes_text(r),
                     f"CUDA graph; eager {_fmt(1e3 * r['eager_force_s'])} ms" if r.get("cuda_graph") else ""])
    return table(headers, rows)


def summary_table(summaries: list[dict], comparison: dict, L_ed: int, scaling_min_L: int) -> str:
    headers = ["preset", "params", "MFLOP/site", "scale(all)", f"scale(L>={scaling_min_L})", "scale(near)", "far",
               "rounds max/min", "fixed us/call", "%ceil(large)", "overhead", "ED crossover L", f"speed-up@{L_ed}", "note"]
    rows = []
    for s in summaries:
        cmp_ = comparison["models"].get(s["preset"], {})
        sp = next((x for x in cmp_.get("speedups", []) if x["L"] == L_ed), None)
        frac = s.get("ceiling_fraction_large")
        ov = s.get("langevin_overhead_large")
        rows.append([s["preset"], f"{s['params']:,}" if s.get("params") is not None else "-",
                     _fmt(s["flops_per_site"] / 1e6 if s.get("flops_per_site") is not None else None),
                     _fmt(s.get("scaling_ratio_all"), ".3f"), _fmt(s.get(f"scaling_ratio_ge{scaling_min_L}"), ".3f"),
                     _fmt(s.get("scaling_ratio_near"), ".3f"),
                     f"{s['far_timings']}/{s['probed_timings']}" if s.get("probed_timings") else "-",
                     _fmt(s.get("round_spread"), ".2f"),
                     _fmt(1e6 * s["fixed_s_per_call"] if s.get("fixed_s_per_call") is not None else None),
                     _fmt(100 * frac, ".1f") if frac is not None else "-",
                     _fmt(100 * ov, "+.1f") + "%" if ov is not None else "-",
                     _fmt(cmp_.get("crossover_L"), ".3g"),
                     (_fmt(sp["speedup"], ".3g") + "x" + ("" if sp["how"] == "measured" else f" ({sp['how'][:6]})"))
                     if sp and sp["speedup"] else "-",
                     (s.get("error") or (f"compile failed: {s['compile_error']}" if s.get("compile_error") else ""))[:50]])
    return table(headers, rows)


def machine_text(machine: dict) -> str:
    """One line naming the machine a run's timings belong to: CPU model and vector ISA, CPUs, torch, GPU."""
    isa = machine.get("cpu_capability")
    parts = [f"cpu {machine.get('cpu_model') or machine.get('processor') or '?'}"
             + (f" ({isa} vectors)" if isa else ""),
             f"{machine.get('cpu_count')} CPUs", f"torch {machine.get('torch')}"]
    if machine.get("gpu"):
        parts.append(f"gpu {machine['gpu']}")
    return ", ".join(parts)


def rounds_text(summaries: list[dict]) -> str:
    """The legend of the ``rounds max/min`` column (nothing in a run of one round)."""
    if not any(s.get("round_spread") for s in summaries):
        return ""
    return ("\nrounds max/min: the largest spread of one size's force time over the rounds: the machine's own "
            "noise, against which scale(all) is read")


def core_state_text(cores: dict) -> str:
    """The run's core-to-core probes under the summary table (nothing where none was taken)."""
    if not cores.get("probes"):
        return ""
    return (f"\ncore-to-core round trip of the two threads (bench/cores.py, {cores['probes']} probes): fastest "
            f"{cores['fastest_ns']:.0f} ns, median {cores['median_ns']:.0f}, slowest {cores['slowest_ns']:.0f}; "
            f"{cores['far_fraction']:.0%} beyond {cores['far_factor']:g}x the fastest (threads on distant cores).\n"
            f"scale(near): the scaling ratio of the timings whose two probes were near the fastest; far: timings "
            f"with a far probe / probed timings")


def ed_table(ed_rows: list[dict]) -> str:
    headers = ["L", "N", "ED force s", "eigh s", "us/site"]
    rows = [[str(r["L"]), str(r["N"]), _fmt(r.get("ed_force_s")), _fmt(r.get("ed_eigh_s")),
             _fmt(1e6 * r["ed_force_s"] / r["N"] if r.get("ed_force_s") else None)] for r in ed_rows]
    return table(headers, rows)


def targets_text(targets: list[dict]) -> str:
    word = {True: "PASS", False: "FAIL", None: "N/A "}
    return "\n".join(f"{word[t['passed']]}  {t['target']}: {t['detail']}" for t in targets)


def write_json(path: Path, result: dict) -> Path:
    return atomic_write_text(path, json.dumps(result, indent=2, default=_json_default) + "\n")


def _json_default(x):
    if hasattr(x, "item"):
        return x.item()
    return str(x)


def write_csv(path: Path, rows: list[dict]) -> Path:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(CSV_COLUMNS), extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        probes = [p for pair in probe_pairs(r) for p in pair if p is not None]
        r = {**r, "core_rt_ns_slowest": max(probes) if probes else None}
        writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_COLUMNS})
    return atomic_write_text(path, buf.getvalue())


def make_figure(model_rows: list[dict], ed_rows: list[dict], summaries: list[dict], comparison: dict,
                device_label: str, targets: list[tuple] | None = None, ceiling_gflops: float | None = None):
    """Left: force time per site vs L (log-log) for every model and ED (with the a N^3 fit), the legend
    below the axes (the fit line and the curves fill the frame). Right: fraction of the matmul ceiling
    per model (median at large L), each bar labelled with its percentage and the sizes of the median.

    ``targets``: ``(level, label)`` or ``(level, label, preset)``; a target of one preset (the preset
    named as the label's first word, ``"enn target"``) is drawn across that preset's bar only (not at
    all when the preset was not measured), one of no preset across the whole panel. ``ceiling_gflops``: the ceiling (100 %), named in the title."""
    import matplotlib
    import matplotlib.ticker
    from matplotlib.lines import Line2D

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 6), gridspec_kw={"width_ratios": [3, 2]}, layout="constrained")
    presets = list(dict.fromkeys(r["preset"] for r in model_rows))
    any_step = False
    for p in presets:
        pts = sorted((r["L"], r["force_s_per_site"]) for r in model_rows
                     if r["preset"] == p and r["status"] == "ok" and r.get("force_s_per_site"))
        if pts:
            ax.plot(*zip(*pts), "o-", label=p)
        step = sorted((r["L"], r["step_s_per_site"]) for r in model_rows
                      if r["preset"] == p and r["status"] == "ok" and r.get("step_s_per_site"))
        if step:
            ax.plot(*zip(*step), ":", color=ax.lines[-1].get_color(), alpha=0.6)
            any_step = True
    ed = sorted((r["L"], r["ed_force_s"] / r["N"]) for r in ed_rows if r.get("ed_force_s"))
    if ed:
        ax.plot(*zip(*ed), "ks-", lw=2, label="ED (exact)")
        a = comparison.get("ed_a_seconds_per_N3")
        lo, hi = ed[0][0], 2 * ed[-1][0]  # the fit, drawn to twice the largest ED size
        if a:
            Ls = [lo * (hi / lo) ** (i / 50) for i in range(51)]
            ax.plot(Ls, [a * (L * L) ** 2 for L in Ls], "k--", lw=1, alpha=0.5, label=r"ED fit $a N^3$ ($a N^2$ per site)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ticks = sorted({r["L"] for r in model_rows if r["status"] == "ok"} | {r["L"] for r in ed_rows})
    if ticks:
        ax.set_xticks(ticks, [str(t) for t in ticks], minor=False)
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("L (lattice is L x L)")
    ax.set_ylabel("seconds per site per force evaluation")
    ax.set_title(f"force time per site ({device_label})")
    ax.grid(True, which="both", alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if any_step:
        handles.append(Line2D([], [], ls=":", color="0.4"))
        labels.append("full Langevin step (dotted, colour of its model)")
    if handles:
        ax.legend(handles, labels, fontsize=8, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.12), frameon=False)

    names = [s["preset"] for s in summaries]
    fr = [100 * (s.get("ceiling_fraction_large") or 0.0) for s in summaries]
    bars = bx.bar(names, fr, color="tab:blue")

    def sizes_text(s):
        sizes = s.get("large_sizes") or []
        return (f"L = {sizes[0]}" if len(sizes) == 1 else f"L = {sizes[0]}-{sizes[-1]}") if sizes else ""

    common = {sizes_text(s) for s in summaries if s.get("ceiling_fraction_large") is not None}
    common = common.pop() if len(common) == 1 else None  # the same sizes for every bar: said once, on the axis
    for b_, s, f in zip(bars, summaries, fr):
        text = (f"{f:.0f}%" + ("" if common else f"\n{sizes_text(s)}")
                if s.get("ceiling_fraction_large") is not None else "n/a")
        bx.annotate(text, (b_.get_x() + b_.get_width() / 2, b_.get_height()), ha="center", va="bottom", fontsize=7)
    bx.axhline(100, color="0.3", lw=1)  # the ceiling itself
    bars_by_name = dict(zip(names, bars))
    for level, label, *preset in targets or ():
        if preset and preset[0] not in bars_by_name:  # the target of a preset not in this run
            continue
        bar = bars_by_name.get(preset[0] if preset else label.split()[0])
        if bar is None:  # not a target of one preset: across the panel
            bx.axhline(100 * level, ls="--", lw=1, color="tab:red", alpha=0.7)
            bx.annotate(f"{label} {100 * level:.0f}%", (0.01, 100 * level), xycoords=("axes fraction", "data"),
                        ha="left", va="bottom", fontsize=7, color="tab:red")
            continue
        x0, w = bar.get_x(), bar.get_width()
        bx.hlines(100 * level, x0 - 0.08 * w, x0 + 1.08 * w, colors="tab:red", lw=2, zorder=3)
        bx.annotate(f"target {100 * level:.0f}%", (x0 + w / 2, 100 * level), xytext=(0, 2), textcoords="offset points",
                    ha="center", va="bottom", fontsize=7, color="tab:red", zorder=4,
                    bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.85})
    top = max([*fr, 100.0, *(100 * t[0] for t in targets or ())])
    bx.set_ylim(0, 1.15 * top)
    bx.set_ylabel(f"% of the matmul ceiling (median over {common or 'large L'})")
    ceiling = f"\n(dense matmul, {ceiling_gflops:.0f} GFLOP/s = 100%)" if ceiling_gflops else " / dense matmul GFLOP/s"
    bx.set_title(f"achieved GFLOP/s of the force call{ceiling}", fontsize=10, wrap=True)
    bx.tick_params(axis="x", rotation=45)
    bx.grid(True, axis="y", alpha=0.3)
    return fig


def write_png(path: Path, fig) -> Path:
    from lattice_lab.common.figures import save_figure

    return save_figure(fig, path)
