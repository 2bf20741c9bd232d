"""``run(cfg)``: the whole benchmark in one process, on one machine, in one go.

1. the dense-matmul ceiling (float32 and float64) with the thread settings the models use;
2. every model preset: force time, full Langevin step, peak memory per site vs L, achieved
   GFLOP/s and its fraction of the ceiling (:mod:`lattice_lab.bench.models`);
3. exact-diagonalisation force time vs L (:func:`lattice_lab.physics.timing.ed_timing_table`),
   the models' speed-up over ED and the crossover L (:mod:`lattice_lab.bench.summary`);
4. the issue's targets as PASS/FAIL lines, tables on stdout, ``bench.json``, ``bench.csv``,
   ``bench.png`` and the resolved ``config.yaml`` in ``output_dir``; optionally an MLflow run.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import statistics
import time
import traceback
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from lattice_lab.bench import models as bench_models
from lattice_lab.bench import report, summary
from lattice_lab.bench.ceiling import matmul_ceiling
from lattice_lab.bench.cores import FAR_FACTOR
from lattice_lab.bench.timing import memory_method
from lattice_lab.common.cuda_graph import wanted
from lattice_lab.common.device import MODEL_DTYPES, resolve_device, resolve_dtype
from lattice_lab.common.errors import ConfigError
from lattice_lab.common.io import atomic_write_text
from lattice_lab.common.memory import available_bytes
from lattice_lab.common.seeding import check_seed, seed_everything
from lattice_lab.common.switch import check_flag, check_switch
from lattice_lab.common.threads import shutdown_pool
from lattice_lab.dynamics.langevin import LangevinParams

log = logging.getLogger(__name__)


def _abs(path: str) -> Path:
    try:
        from hydra.utils import to_absolute_path

        return Path(to_absolute_path(str(path)))
    except Exception:  # noqa: BLE001 - outside a Hydra run
        return Path(path).resolve()


def _sizes(cfg, key: str, *, even: bool = False) -> list[int]:
    """The sizes ``cfg.<key>``: a list of integers L >= 2, or one integer as a one-element list."""
    value = cfg.get(key)
    if isinstance(value, str):
        raise ConfigError(f"{key}={value!r}: not a size (expected an integer L >= 2 or a list, e.g. {key}=[16,32])")
    values = [] if value is None else list(value) if _is_list(value) else [value]
    for L in values:
        if isinstance(L, bool) or not isinstance(L, int) or L < 2:
            raise ConfigError(f"{key}={value}: every size must be an integer L >= 2 (got {L!r})")
        if even and L % 2:
            raise ConfigError(f"{key}={value}: ED needs even L for half filling (got {L})")
    return sorted(set(values))


def _is_list(value) -> bool:
    return isinstance(value, (list, tuple)) or OmegaConf.is_list(value)


def _positive(cfg, key: str, kind=float, allow_zero: bool = False, default=None):
    """``cfg.<key>`` (a dotted key reaches into groups: ``targets.large_L``) as a finite ``kind`` > 0
    (>= 0 with ``allow_zero``); an integer setting takes an integral float (2.0), never 2.5 or a bool.
    With a ``default``, a missing or null setting is that default."""
    value = OmegaConf.select(cfg, key)
    if value is None and default is not None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        wrong = "not a number"
    elif not math.isfinite(value):
        wrong = "not finite"
    elif kind is int and not float(value).is_integer():
        wrong = "not an integer"
    elif value < 0 or (value == 0 and not allow_zero):
        wrong = "too small"
    else:
        return kind(value)
    expected = f"{'an integer' if kind is int else 'a number'} {'>= 0' if allow_zero else '> 0'}"
    raise ConfigError(f"{key}={value!r}: {wrong} (expected {expected})")


def _memory_budget(cfg, device: torch.device) -> float | None:
    """Bytes one measurement may need: ``max_memory_gb``, else 0.8 of a GPU's free memory or half the CPU's
    available memory (:func:`lattice_lab.common.memory.available_bytes`); None where that is not known."""
    if cfg.get("max_memory_gb") is not None:
        return _positive(cfg, "max_memory_gb") * 1e9
    free = available_bytes(device)
    if free is None:
        return None
    return (0.8 if device.type == "cuda" else 0.5) * free


def _presets(cfg) -> list[str]:
    value = cfg.get("presets")
    available = bench_models.available_presets()
    if value is None:
        return available
    names = [str(n) for n in value] if _is_list(value) else [str(value)]  # one name: a one-element list
    for n in names:
        if n not in available:
            raise ConfigError(f"presets={value}: unknown model preset {n!r} (available: {available})")
    return names


def _targets(cfg) -> dict:
    """``cfg.targets`` with every value checked: sizes are integers, thresholds numbers (the memory
    target may be switched off with a null ``memory_preset`` or ``memory_L``)."""
    targets = OmegaConf.to_container(cfg.targets, resolve=True) if cfg.get("targets") is not None else {}
    for key in ("large_L", "ed_compare_L"):
        targets[key] = _positive(cfg, f"targets.{key}", int)
    for key in ("scaling_tolerance", "enn_ceiling_fraction", "gnn_ceiling_fraction", "langevin_overhead"):
        targets[key] = _positive(cfg, f"targets.{key}", allow_zero=True)
    for key in ("enn_ed_speedup", "enn_memory_gb"):
        targets[key] = _positive(cfg, f"targets.{key}")
    preset = targets.get("memory_preset")
    if preset is not None and preset not in bench_models.available_presets():
        raise ConfigError(f"targets.memory_preset={preset!r}: unknown model preset "
                          f"(expected one of {bench_models.available_presets()} or null)")
    if targets.get("memory_L") is not None:
        targets["memory_L"] = _positive(cfg, "targets.memory_L", int)
    return targets


def _hamiltonian(cfg):
    from lattice_lab.physics.holstein import HolsteinParams

    return HolsteinParams.from_config(cfg.get("hamiltonian"))


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what :mod:`platform` says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_capability() -> str | None:
    """The widest vector ISA torch dispatches to on this CPU (``AVX512``, ``AVX2``, ...). The native kernels
    are built with ``-march=native`` for the same vectors, so timings compare only between equal values
    (docs/bench.md: the same code ran 3-4x slower with AVX2 than with AVX-512)."""
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except (AttributeError, RuntimeError):  # an older torch
        return None


def machine_info(device: torch.device) -> dict:
    info = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "interop_threads": torch.get_num_interop_threads(), "cpu_count": os.cpu_count(),
            "cpu_model": cpu_model(), "cpu_capability": cpu_capability(),
            "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "hostname": platform.node(), "memory_method": memory_method(device),
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def run(cfg: DictConfig) -> dict:
    """Run the benchmark described by ``cfg`` (``conf/bench.yaml``); return the result dict."""
    t_start = time.perf_counter()
    device = resolve_device(cfg.get("device", "auto"))
    dtype = resolve_dtype(cfg.get("dtype", "float32"), MODEL_DTYPES)
    ed_device = resolve_device(cfg.get("ed_device"), "ed_device") if cfg.get("ed_device") else device
    _ceiling_dtypes(cfg, dtype)
    if cfg.get("threads") is not None:
        torch.set_num_threads(_positive(cfg, "threads", int))
    sizes = _sizes(cfg, "sizes")
    ed_sizes = _sizes(cfg, "ed_sizes", even=True)
    presets = _presets(cfg)
    repeats = _positive(cfg, "repeats", int)
    warmup = _positive(cfg, "warmup", int, allow_zero=True)
    batch = _positive(cfg, "batch", int)
    rounds = _positive(cfg, "rounds", int, default=1)
    max_seconds = _positive(cfg, "max_seconds_per_measurement")
    min_seconds = _positive(cfg, "min_seconds_per_measurement", allow_zero=True, default=0.0)
    ed_repeats = _positive(cfg, "ed_repeats", int, default=3)
    scaling_min_L = _positive(cfg, "scaling_min_L", int, default=64)
    ed_fit_min_L = _positive(cfg, "ed_fit_min_L", int, default=16)
    for key, allow_zero in (("ceiling.n", False), ("ceiling.repeats", False), ("ceiling.warmup", True)):
        _positive(cfg, key, int, allow_zero=allow_zero)
    if cfg.get("profile_L") is not None:
        _positive(cfg, "profile_L", int)
    statistic = str(cfg.get("statistic", "median"))
    graphs = wanted(check_switch(cfg.get("cuda_graph", "auto"), "cuda_graph"), device)
    if statistic not in ("median", "min"):
        raise ConfigError(f"statistic={statistic!r}: expected 'median' or 'min'")
    targets = _targets(cfg)
    measure_memory, compile_models, profile = (check_flag(cfg.get(key, default), key) for key, default in
                                               (("measure_memory", True), ("compile", False), ("profile", False)))
    tracked = check_flag((cfg.get("tracking") or {}).get("enabled", False), "tracking.enabled")  # used at the end
    langevin = OmegaConf.to_container(cfg.langevin, resolve=True) if cfg.get("langevin") else {}
    LangevinParams.checked(langevin, "langevin")  # before any work
    hamiltonian = _hamiltonian(cfg)
    seed = check_seed(cfg.get("seed", 0))
    seed_everything(seed)
    max_bytes = _memory_budget(cfg, device)
    out_dir = _abs(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    machine = machine_info(device)
    print(f"lattice_lab bench -> {out_dir}\n  {report.machine_text(machine)}\n  device {device}, dtype "
          f"{str(dtype)[6:]}, torch threads {machine['threads']}, presets {presets}, sizes {sizes}, "
          f"ED sizes {ed_sizes}")

    # 1. ceiling (measured again at the end: the higher of the two counts, see _ceiling)
    ceilings = _ceiling(cfg, device, dtype, seed, machine)
    # 2. models
    compare_sizes = ed_sizes if cfg.get("measure_models_at_ed_sizes", True) else []
    infos = []
    for name in presets:
        try:
            info = bench_models.bench_preset(
                name, sizes=sizes, compare_sizes=compare_sizes, hamiltonian=hamiltonian, device=device,
                dtype=dtype, batch=batch, repeats=repeats, warmup=warmup, max_seconds=max_seconds,
                min_seconds=min_seconds, max_bytes=max_bytes, langevin=langevin, measure_memory=measure_memory,
                compile=compile_models, seed=seed, statistic=statistic, cuda_graph=graphs,
                rounds=rounds)
        except ConfigError:
            raise
        except Exception as exc:  # noqa: BLE001 - one broken model must not stop the benchmark
            log.debug("preset %s failed:\n%s", name, traceback.format_exc())
            print(f"  preset {name} FAILED: {type(exc).__name__}: {exc}")
            info = {"preset": name, "model": "", "params": None, "flops_per_site": None, "conservative": False,
                    "error": f"{type(exc).__name__}: {exc}", "rows": []}
        finally:
            shutdown_pool()  # a model's worker threads must not slow the next model (common/threads.py)
        infos.append(info)
    profiles = _profiles(cfg, infos, out_dir, hamiltonian=hamiltonian, device=device, dtype=dtype, batch=batch,
                         seed=seed) if profile else {}

    # memory target: one full step of the memory preset at memory_L
    memory = None
    mem_preset, mem_L = targets.get("memory_preset"), targets.get("memory_L")
    if mem_preset and mem_L and mem_preset in presets:
        try:
            memory = bench_models.step_memory(mem_preset, int(mem_L), hamiltonian=hamiltonian, device=device,
                                              dtype=dtype, batch=batch, langevin=langevin, seed=seed)
        except Exception as exc:  # noqa: BLE001
            memory = {"preset": mem_preset, "L": int(mem_L), "error": f"{type(exc).__name__}: {exc}"}

    # 3. ED
    ed_rows = []
    if ed_sizes:
        from lattice_lab.physics.timing import ed_timing_table

        for r in ed_timing_table(ed_sizes, repeats=ed_repeats, device=str(ed_device),
                                 params=hamiltonian, seed=seed):
            ed_rows.append({"kind": "ed", "preset": "ed", "model": "ExactForces", "set": "ed", "L": r["L"],
                            "N": r["N"], "batch": 1, "status": "ok", "note": "best of repeats",
                            "ed_force_s": r["ed_force_s"], "ed_eigh_s": r["torch_eigh_s"],
                            "ed_numpy_eigh_s": r.get("numpy_eigh_s"), "ed_force_s_per_site": r["ed_force_s"] / r["N"],
                            "device": r.get("device")})
    ceilings = _ceiling(cfg, device, dtype, seed, machine, previous=ceilings)
    ceiling_key = str(dtype).replace("torch.", "")
    ceiling_gflops = ceilings[ceiling_key]["gflops"]
    probes = [p for i in infos for p in summary.core_probes(i["rows"])]
    cores = _core_state(probes)
    summaries = [summary.summarize_model(i, ceiling_gflops, large_L=int(targets["large_L"]),
                                         scaling_min_L=scaling_min_L, fastest_rt_ns=cores["fastest_ns"])
                 for i in infos]
    comparison = summary.ed_comparison(ed_rows, summaries, fit_min_L=ed_fit_min_L)
    checks = summary.evaluate_targets(summaries, comparison, memory, targets, device.type)

    # 4. report
    model_rows = [r for i in infos for r in i["rows"]]
    result = {
        "version": 1, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": machine,
        "dtype": ceiling_key, "batch": batch, "statistic": statistic, "rounds": rounds, "ceiling": ceilings, "ceiling_gflops": ceiling_gflops,
        "core_round_trip": cores,
        "models": [{k: v for k, v in s.items() if not k.startswith("_")} for s in summaries],
        "rows": model_rows, "ed": ed_rows, "ed_comparison": comparison, "memory_target": memory,
        "targets": checks, "profiles": profiles, "seconds": None, "config": OmegaConf.to_container(cfg, resolve=True),
    }
    L_ed, min_L = targets["ed_compare_L"], scaling_min_L
    a_ed = report._fmt(comparison["ed_a_seconds_per_N3"])
    text = "\n\n".join([
        "== machine ==\n" + report.machine_text(machine),
        f"== models (force evaluation and full Langevin step, batch {batch}, {ceiling_key}, {statistic} of the "
        f"repeats{f', median of {rounds} rounds' if rounds > 1 else ''}) ==\n"
        + report.model_table(model_rows),
        f"== summary (ceiling {ceiling_gflops:.1f} GFLOP/s {ceiling_key}, {machine['threads']} threads) ==\n"
        + report.summary_table(summaries, comparison, L_ed, min_L) + report.rounds_text(summaries)
        + report.core_state_text(cores),
        f"== exact diagonalisation (float64, fit a N^3: a = {a_ed} s) ==\n" + report.ed_table(ed_rows),
        "== targets ==\n" + report.targets_text(checks),
    ])
    result["seconds"] = time.perf_counter() - t_start
    paths = {"json": report.write_json(out_dir / "bench.json", result),
             "csv": report.write_csv(out_dir / "bench.csv", model_rows + ed_rows),
             "txt": atomic_write_text(out_dir / "bench.txt", text + "\n")}
    lines = [(float(targets["enn_ceiling_fraction"]), "enn target", "enn"),
             (float(targets["gnn_ceiling_fraction"]), "gnn target", "gnn")]
    hardware = (machine.get("gpu") if device.type == "cuda"
                else f"{machine['cpu_model']}, {machine['cpu_capability']}")
    fig = report.make_figure(model_rows, ed_rows, summaries, comparison,
                             f"{device} ({hardware}), {ceiling_key}, {machine['threads']} threads", lines,
                             ceiling_gflops)
    if tracked:
        _track(cfg, result, out_dir, fig, device)
    paths["png"] = report.write_png(out_dir / "bench.png", fig)
    print(text)
    print(f"\nwrote {', '.join(str(p) for p in paths.values())} ({result['seconds']:.0f} s)")
    result["paths"] = {k: str(v) for k, v in paths.items()}
    return result


def _core_state(probes: list[float]) -> dict:
    """The core-to-core probes of the run (bench/cores.py): fastest, median, slowest (ns), and the
    share of far probes (beyond FAR_FACTOR x the fastest: the threads on distant cores)."""
    if not probes:
        return {"fastest_ns": None, "median_ns": None, "slowest_ns": None, "far_fraction": None,
                "probes": 0, "far_factor": FAR_FACTOR}
    fastest = min(probes)
    return {"fastest_ns": fastest, "median_ns": statistics.median(probes), "slowest_ns": max(probes),
            "far_fraction": sum(p > FAR_FACTOR * fastest for p in probes) / len(probes),
            "probes": len(probes), "far_factor": FAR_FACTOR}


def _ceiling_dtypes(cfg, dtype) -> list[str]:
    """``ceiling.dtypes`` (one name or a list, each checked) and the model dtype."""
    value = OmegaConf.select(cfg, "ceiling.dtypes")
    names = [] if value is None else [str(n) for n in value] if _is_list(value) else [str(value)]
    for name in names:
        resolve_dtype(name, key="ceiling.dtypes")
    key = str(dtype).replace("torch.", "")
    return names + ([key] if key not in names else [])


def _ceiling(cfg, device, dtype, seed: int, machine: dict, previous: dict | None = None) -> dict:
    """Matmul ceiling per dtype: GFLOP/s of the fastest repeat (a ceiling is a best case; on a
    shared machine slower repeats measure the other users). With ``previous`` (the measurement
    at the start of the run) the higher of the two is kept and both are recorded."""
    out = {}
    for name in _ceiling_dtypes(cfg, dtype):
        c = matmul_ceiling(device, int(cfg.ceiling.n), resolve_dtype(name), warmup=int(cfg.ceiling.warmup),
                           repeats=int(cfg.ceiling.repeats), seed=seed)
        c["gflops_median"] = c.pop("gflops")
        if previous is not None:
            c["gflops_start"] = previous[name]["gflops_best"]
            c["gflops_end"] = c["gflops_best"]
            c["gflops_best"] = max(c["gflops_best"], c["gflops_start"])
        c["gflops"] = c["gflops_best"]
        out[name] = c
        when = "end" if previous is not None else "start"
        print(f"  matmul ceiling {name} ({when}): best {c['gflops']:.1f} GFLOP/s, median "
              f"{c['gflops_median']:.1f} (n = {cfg.ceiling.n}, {machine['threads']} threads)")
    return out


def _profiles(cfg, infos, out_dir: Path, **kw) -> dict:
    """torch.profiler breakdown of every preset at ``profile_L`` (default: its largest measured L)."""
    from lattice_lab.bench.profile import format_profile, profile_preset

    out = {}
    for info in infos:
        ok = [r["L"] for r in info["rows"] if r["status"] == "ok" and r["set"] == "scaling"]
        if info.get("error") or not ok:
            continue
        L = int(cfg.get("profile_L") or max(ok))
        try:
            p = profile_preset(info["preset"], L, **kw)
        except Exception as exc:  # noqa: BLE001 - a profiler failure must not lose the benchmark
            out[info["preset"]] = {"L": L, "error": f"{type(exc).__name__}: {exc}"}
            continue
        path = atomic_write_text(out_dir / f"profile_{info['preset']}.txt", format_profile(p) + "\n")
        out[info["preset"]] = {"L": L, "path": str(path), "total_ms_per_call": p["total_ms_per_call"],
                               "modules": p["modules"][:10]}
    return out


def _track(cfg, result: dict, out_dir: Path, fig, device) -> None:
    from lattice_lab.tracking.mlflow_utils import standard_tags, start_run

    with start_run(task="bench", cfg=cfg, run_name=f"bench_{out_dir.name}",
                   tags=standard_tags("bench", device=device)) as tracker:
        tracker.log_params(cfg)
        machine = result["machine"]  # to filter and compare bench runs by machine in the MLflow UI
        tracker.set_tags({k: str(machine[k]) for k in ("cpu_model", "cpu_capability", "gpu")
                          if machine.get(k)})
        metrics = {f"ceiling_gflops_{k}": v["gflops"] for k, v in result["ceiling"].items()}
        for s in result["models"]:
            for key in ("scaling_ratio_all", "ceiling_fraction_large", "gflops_large", "langevin_overhead_large",
                        "site_steps_per_s_large", "params", "flops_per_site"):
                metrics[f"{s['preset']}/{key}"] = s.get(key)
            cross = result["ed_comparison"]["models"].get(s["preset"], {}).get("crossover_L")
            metrics[f"{s['preset']}/ed_crossover_L"] = cross
        metrics["targets_passed"] = sum(t["passed"] is True for t in result["targets"])
        metrics["targets_failed"] = sum(t["passed"] is False for t in result["targets"])
        tracker.log_metrics(metrics)
        for r in result["rows"]:
            if r.get("status") == "ok" and r["set"] == "scaling":
                tracker.log_metrics({f"{r['preset']}/force_s_per_site": r["force_s_per_site"],
                                     f"{r['preset']}/step_s": r.get("step_s")}, step=r["L"])
        tracker.log_figure(fig, "bench.png")
        for name in ("bench.json", "bench.csv", "bench.txt", "config.yaml"):
            tracker.log_artifact(out_dir / name)
