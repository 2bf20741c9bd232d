"""The speed benchmark: end to end on tiny sizes (outputs, columns, skips), and its arithmetic.

No timing assertions: the machine is shared. The arithmetic (fits, crossover, interpolation,
targets) is checked on synthetic numbers whose answers are known in closed form.
"""

import csv
import json
import math
import re

import matplotlib.image
import pytest
import torch
from hydra import compose, initialize_config_dir

from lattice_lab.bench import run
from lattice_lab.bench import summary as S
from lattice_lab.bench.models import combine_rounds
from lattice_lab.bench.report import CSV_COLUMNS
from lattice_lab.bench.timing import memory_method, peak_memory, plan_repeats, time_call
from lattice_lab.common.cli import CONFIG_DIR
from lattice_lab.common.errors import ConfigError


def _cfg(*overrides):
    with initialize_config_dir(config_dir=CONFIG_DIR):
        return compose(config_name="bench", overrides=list(overrides))



TARGETS = {"scaling_tolerance": 0.25, "enn_ceiling_fraction": 0.25, "gnn_ceiling_fraction": 0.6, "large_L": 128,
           "langevin_overhead": 0.1, "ed_compare_L": 40, "enn_ed_speedup": 50, "memory_preset": "enn",
           "memory_L": 200, "enn_memory_gb": 1.0}


def _rows(sizes, per_site=1e-8):
    return [{"status": "ok", "set": "scaling", "L": L, "N": L * L, "batch": 1, "force_s": per_site * L * L,
             "force_s_per_site": per_site, "gflops": 1.0} for L in sizes]


def _summary(rows, preset="enn", ceiling_gflops=10.0, **kw):
    """summarize_model of a model M of 1e3 FLOPs per site timed as ``rows``."""
    return S.summarize_model({"preset": preset, "model": "M", "params": 1, "flops_per_site": 1e3,
                              "conservative": False, "rows": rows}, ceiling_gflops=ceiling_gflops, **kw)


def test_default_config_composes():
    cfg = _cfg()
    assert list(cfg.sizes) == [32, 64, 128, 256, 512]
    assert list(cfg.ed_sizes) == [8, 12, 16, 24, 32, 40]
    assert cfg.presets is None and cfg.device == "auto" and cfg.dtype == "float32"
    assert cfg.compile is False and cfg.tracking.enabled is False
    quick = _cfg("bench_preset=quick")
    assert list(quick.sizes) == [8, 10, 12] and "enn_small" in quick.presets


def test_quick_end_to_end(tmp_path, tmp_mlflow):
    out = tmp_path / "bench"
    cfg = _cfg("bench_preset=quick", f"output_dir={out}", "tracking.enabled=true", "threads=1")
    result = run(cfg)
    for name in ("bench.json", "bench.csv", "bench.png", "bench.txt", "config.yaml"):
        assert (out / name).is_file(), name

    data = json.loads((out / "bench.json").read_text())
    for c in data["ceiling"].values():  # best of the start and end measurements
        assert c["gflops"] == max(c["gflops_start"], c["gflops_end"]) > 0
    assert data["machine"]["threads"] == 1
    machine = data["machine"]  # which machine the timings belong to: in the JSON, the text and the MLflow tags
    assert machine["cpu_model"] and machine["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    text = (out / "bench.txt").read_text()
    assert text.startswith("== machine ==\n")
    assert f"cpu {machine['cpu_model']} ({machine['cpu_capability']} vectors)" in text
    presets = [m["preset"] for m in data["models"]]
    assert presets == ["enn_small", "gnn_small", "gnn_energy_small", "mlp_small"]
    for m in data["models"]:
        assert m["error"] is None, m
        assert m["params"] > 0 and m["flops_per_site"] > 0
    # every preset measured at L = 10 and 12 (force, step, memory); the gnn presets skip L = 8
    for r in data["rows"]:
        if r["set"] != "scaling":
            continue
        if r["preset"].startswith("gnn") and r["L"] == 8:
            assert r["status"] == "skipped" and "receptive-field" in r["note"]
            continue
        assert r["status"] == "ok", r
        assert r["force_s"] > 0 and r["step_s"] > 0 and r["gflops"] > 0
        assert math.isclose(r["force_s_per_site"], r["force_s"] / r["N"])
        assert math.isclose(r["site_steps_per_s"], r["N"] / r["step_s"])
        assert math.isclose(r["langevin_overhead"], r["step_s"] / r["force_s"] - 1)
        assert math.isclose(r["ceiling_fraction"], r["gflops"] / data["ceiling_gflops"])
        if data["machine"]["memory_method"] != "unavailable":
            assert r["peak_mem_step_bytes"] is not None and r["peak_mem_step_bytes"] >= 0
    assert [r["L"] for r in data["ed"]] == [4, 6, 10] and all(r["ed_force_s"] > 0 for r in data["ed"])
    cmp_ = data["ed_comparison"]
    assert cmp_["ed_a_seconds_per_N3"] > 0
    for p in presets:
        assert cmp_["models"][p]["crossover_L"] > 0
        at10 = S.speedup_at(cmp_, p, 10)
        assert at10["how"] == "measured" and at10["speedup"] > 0
    assert data["memory_target"]["total_bytes"] > data["memory_target"]["param_bytes"]
    assert {t["passed"] for t in data["targets"]} <= {True, False, None}
    assert len(data["targets"]) == 4 * 3 + 2 + 1 + 1  # scaling, overhead, vs-ED per preset; 2 ceilings; enn 50x; memory

    with open(out / "bench.csv") as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames) == CSV_COLUMNS
        rows = list(reader)
    assert {r["kind"] for r in rows} == {"model", "ed"}
    assert len([r for r in rows if r["kind"] == "model"]) == len(data["rows"])
    assert all(float(r["force_s"]) > 0 for r in rows if r["kind"] == "model" and r["status"] == "ok")

    img = matplotlib.image.imread(out / "bench.png")
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 400
    assert "targets" in (out / "bench.txt").read_text()
    assert result["paths"]["json"] == str(out / "bench.json")

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tmp_mlflow)
    exp = client.get_experiment_by_name("lattice_lab/bench")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.metrics["ceiling_gflops_float32"] > 0
    assert "enn_small/ed_crossover_L" in runs[0].data.metrics
    assert runs[0].data.tags["cpu_model"] == machine["cpu_model"]
    assert runs[0].data.tags["cpu_capability"] == machine["cpu_capability"]
    # compare_runs' default bench columns are names the bench logs
    from lattice_lab.compare_runs import DEFAULT_COLUMNS, runs_table

    header, table_rows = runs_table("lattice_lab/bench", tracking_uri=tmp_mlflow)
    assert len(table_rows) == 1
    for column in DEFAULT_COLUMNS["lattice_lab/bench"]:
        assert column.split(".", 1)[1] in header, column
    # the model column names the network, not only the elastic-prior wrapper around it
    assert {m["preset"]: m["model"] for m in data["models"]} == {
        "enn_small": "ENN+ElasticPrior", "gnn_small": "GNN+ElasticPrior", "gnn_energy_small": "EnergyGNN",
        "mlp_small": "DescriptorMLP+ElasticPrior"}


@pytest.mark.parametrize("override, key", [
    ("sizes=[1,12]", "sizes"), ("ed_sizes=[5]", "ed_sizes"), ("presets=[nope]", "presets"),
    ("repeats=0", "repeats"), ("device=tpu", "device"), ("dtype=int3", "dtype"), ("statistic=mean", "statistic"),
    ("cuda_graph=maybe", "cuda_graph"), ("rounds=0", "rounds"), ("seed=abc", "seed"),
])
def test_bad_config_names_the_key(tmp_path, override, key):
    cfg = _cfg("bench_preset=quick", f"output_dir={tmp_path}", override)
    with pytest.raises(ConfigError, match=key):
        run(cfg)


@pytest.mark.parametrize("override, message", [
    ("sizes=abc", "sizes='abc': not a size"), ("ed_sizes=7", "ed_sizes=7: ED needs even L"),
    ("presets=nope", "presets=nope: unknown model preset 'nope'"),
    ("batch=2.9", "batch=2.9: not an integer"), ("rounds=2.5", "rounds=2.5: not an integer"),
    ("repeats=true", "repeats=True: not a number"), ("warmup=-1", "warmup=-1: too small"),
    ("ed_repeats=1.5", "ed_repeats=1.5: not an integer"), ("scaling_min_L=abc", "scaling_min_L='abc': not a number"),
    ("ed_fit_min_L=4.5", "ed_fit_min_L=4.5: not an integer"), ("ceiling.n=2.5", "ceiling.n=2.5: not an integer"),
    ("ceiling.repeats=0", "ceiling.repeats=0: too small"), ("profile_L=x", "profile_L='x': not a number"),
    ("max_seconds_per_measurement=nan", "max_seconds_per_measurement=nan: not finite"),
    ("targets.large_L=abc", "targets.large_L='abc': not a number"),
    ("targets.ed_compare_L=2.5", "targets.ed_compare_L=2.5: not an integer"),
    ("targets.enn_memory_gb=x", "targets.enn_memory_gb='x': not a number"),
    ("targets.scaling_tolerance=-1", "targets.scaling_tolerance=-1: too small"),
    ("targets.memory_L=abc", "targets.memory_L='abc': not a number"),
    ("targets.memory_preset=nope", "targets.memory_preset='nope': unknown model preset"),
    ("compile=yes", "compile='yes': expected true or false"), ("profile=1", "profile=1: expected true or false"),
    ("measure_memory=no", "measure_memory='no': expected true or false"),
    ("tracking.enabled=no", "tracking.enabled='no': expected true or false"),
    ("dtype=float16", "dtype='float16': expected one of ['float32', 'float64']"),
    ("langevin.dt=-1", "langevin.dt=-1: must be > 0"), ("langevin.mass=x", "langevin.mass='x': expected a finite number"),
    # were refused only after every model was measured (ed_device) or named as dtype (ceiling.dtypes)
    ("ed_device=tpu", "ed_device='tpu': expected 'auto', 'cpu', 'cuda' or 'cuda:N'"),
    ("ceiling.dtypes=[float32,float16x]", "ceiling.dtypes='float16x': expected one of"),
    ("seed=18446744073709551616", "seed=18446744073709551616: too large (seeds are 64-bit"),
])
def test_bad_value_is_named_before_any_work(tmp_path, override, message):
    out = tmp_path / "bench"
    cfg = _cfg("bench_preset=quick", f"output_dir={out}", override)
    with pytest.raises(ConfigError, match="^" + re.escape(message)):
        run(cfg)
    assert not out.exists()  # nothing measured, nothing written


def test_a_single_value_is_a_one_element_list(tmp_path):
    out = tmp_path / "bench"
    run(_cfg("bench_preset=quick", f"output_dir={out}", "threads=1", "presets=mlp_small", "sizes=10",
             "ed_sizes=4", "batch=2.0", "measure_memory=false"))
    data = json.loads((out / "bench.json").read_text())
    assert [m["preset"] for m in data["models"]] == ["mlp_small"]
    assert {r["L"] for r in data["rows"] if r["set"] == "scaling"} == {10}
    assert [r["L"] for r in data["ed"]] == [4]
    assert data["batch"] == 2 and all(r["batch"] == 2 for r in data["rows"])  # an integral float is accepted


def test_power_fit_crossover_and_interpolation():
    a, b = 2e-10, 3e-6
    Ls = [8, 16, 24, 40]
    assert math.isclose(S.power_coefficient(Ls, [a * (L * L) ** 3 for L in Ls], 3.0), a, rel_tol=1e-12)
    ed_rows = [{"L": L, "N": L * L, "ed_force_s": a * (L * L) ** 3} for L in Ls]
    rows = [{"status": "ok", "set": "scaling", "L": L, "N": L * L, "force_s": b * L * L * (L / 32) ** 0.5,
             "force_s_per_site": b * (L / 32) ** 0.5, "gflops": 1e3 / (b * (L / 32) ** 0.5) / 1e9}
            for L in (32, 64, 128)]
    s = _summary(rows, preset="m", large_L=64)
    assert math.isclose(s["scaling_ratio_all"], 2.0, rel_tol=1e-12)  # per-site time ~ L^(1/2): 128/32 -> 2
    assert math.isclose(s["scaling_ratio_ge64"], math.sqrt(2), rel_tol=1e-12)
    b_fit = b * math.sqrt(math.sqrt(2) * 2)  # geometric mean over L = 64, 128 of b (L/32)^(1/2)
    assert math.isclose(s["b_seconds_per_site"], b_fit, rel_tol=1e-12)
    assert math.isclose(rows[0]["ceiling_fraction"], 1e3 / b / 1e9 / 10.0, rel_tol=1e-12)
    # log-log interpolation is exact for a power law; outside the range the per-site time is held
    t40, how = S.model_time_at(s, 40)
    assert how == "interpolated" and math.isclose(t40, b * (40 / 32) ** 0.5 * 1600, rel_tol=1e-12)
    t16, how = S.model_time_at(s, 16)
    assert how == "extrapolated" and math.isclose(t16, b * 256, rel_tol=1e-12)
    cmp_ = S.ed_comparison(ed_rows, [s], fit_min_L=16)
    assert math.isclose(cmp_["models"]["m"]["crossover_L"], (b_fit / a) ** 0.25, rel_tol=1e-12)
    assert math.isclose(S.speedup_at(cmp_, "m", 40)["speedup"], a * 1600 ** 3 / t40, rel_tol=1e-12)


def test_affine_fit_separates_the_fixed_cost_per_call():
    t0, b = 4.8e-6, 13.7e-9  # a fixed cost per call plus a constant per-site rate
    rows = [{"status": "ok", "set": "scaling", "L": L, "N": L * L, "batch": 2, "force_s": t0 + b * 2 * L * L,
             "force_s_per_site": (t0 + b * 2 * L * L) / (2 * L * L)} for L in (32, 64, 128, 512)]
    s = _summary(rows, preset="m", ceiling_gflops=None)
    assert math.isclose(s["fixed_s_per_call"], t0, rel_tol=1e-9)
    assert math.isclose(s["site_s_affine"], b, rel_tol=1e-9)  # per site of the whole batch
    assert s["affine_max_rel_residual"] < 1e-9
    assert math.isclose(s["fixed_fraction_smallest"], t0 / rows[0]["force_s"], rel_tol=1e-9)
    # a super-linear cost is not absorbed: the residual shows it
    bad = S.affine_fit([L * L for L in (32, 64, 128, 512)], [1e-9 * (L * L) ** 1.5 for L in (32, 64, 128, 512)])
    assert bad["max_rel_residual"] > 0.3
    assert S.affine_fit([1024, 1024], [1.0, 1.1]) is None  # one distinct size: no fit
    targets = dict(TARGETS)
    detail = S.evaluate_targets([s], {"models": {}}, None, targets, "cpu")[0]["detail"]
    assert "t0 = 4.8 us per call" in detail and "b = 13.7 ns/site" in detail


def test_round_spread_measures_the_noise_at_one_size():
    """round_spread: the largest max/min of one size's force times over the rounds; the scaling target's
    detail states it and flags it when it alone exceeds the tolerance."""
    def row(L, times):
        r = {"status": "ok", "set": "scaling", "L": L, "N": L * L, "batch": 1, "force_s": times[0],
             "force_s_per_site": times[0] / (L * L)}
        combine_rounds(r, [dict(r)] + [{"force_s": t} for t in times[1:]], flops_per_site=1.0)
        return r

    rows = [row(32, [1.0e-5, 1.1e-5, 1.05e-5]), row(128, [1.6e-4, 2.4e-4, 1.7e-4])]
    assert S.round_spread(rows) == pytest.approx(1.5)  # 2.4 / 1.6 at L = 128; 1.1 at L = 32
    assert S.round_spread([row(32, [1e-5]), row(64, [4e-5])]) is None  # one round: nothing to compare
    targets = dict(TARGETS)
    info = {"preset": "m", "model": "M", "params": 1, "flops_per_site": 1.0, "conservative": False}
    noisy = S.summarize_model({**info, "rows": rows}, None)
    detail = S.evaluate_targets([noisy], {"models": {}}, None, targets, "cpu")[0]["detail"]
    assert "rounds at one size differ by up to 1.50x (beyond the tolerance" in detail
    quiet = S.summarize_model({**info, "rows": [row(32, [1.0e-5, 1.1e-5]), row(128, [1.6e-4, 1.7e-4])]}, None)
    detail = S.evaluate_targets([quiet], {"models": {}}, None, targets, "cpu")[0]["detail"]
    assert detail.endswith("rounds at one size differ by up to 1.10x")


def test_targets_pass_and_fail():
    def summ(preset, frac, overhead, ratio):
        return {"preset": preset, "scaling_ratio_all": ratio, "sizes_measured": [32, 128],
                "ceiling_fraction_large": frac, "large_L_measured": True, "large_sizes": [128],
                "langevin_overhead_large": overhead}

    summaries = [summ("enn", 0.30, 0.05, 1.1), summ("gnn", 0.50, 0.2, 1.3)]
    comparison = {"models": {"enn": {"speedups": [{"L": 40, "speedup": 60.0, "how": "measured"}]},
                             "gnn": {"speedups": [{"L": 40, "speedup": 0.5, "how": "measured"}]}}}
    memory = {"total_bytes": 2e9, "param_bytes": 1, "state_bytes": 1, "peak_step_bytes": 2e9}
    targets = dict(TARGETS)
    res = {t["target"]: t["passed"] for t in S.evaluate_targets(summaries, comparison, memory, targets, "cpu")}
    assert res["linear scaling enn: time/site max/min <= 1.25"] is True
    assert res["linear scaling gnn: time/site max/min <= 1.25"] is False
    assert res["enn >= 25% of matmul ceiling on cpu at L >= 128"] is True
    assert res["gnn >= 60% of matmul ceiling on cpu at L >= 128"] is False
    assert res["Langevin step <= 10% over force enn"] is True
    assert res["Langevin step <= 10% over force gnn"] is False
    assert res["enn faster than ED at L = 40"] is True and res["gnn faster than ED at L = 40"] is False
    assert res["enn >= 50x faster than ED at L = 40"] is True
    assert res["enn full step at L = 200 under 1 GB"] is False


def test_timing_and_memory_helpers():
    calls = []
    t = time_call(lambda: calls.append(1), torch.device("cpu"), warmup=2, repeats=3)
    assert len(calls) == 5 and t.repeats == 3 and t.min <= t.median <= t.max
    assert plan_repeats(None, 5.0, 5, 2) == (5, 2)
    assert plan_repeats(1.0, 5.0, 5, 2) == (4, 1)  # 5 s budget, 1 s per call: 1 warm-up + 4 timed
    assert plan_repeats(10.0, 5.0, 5, 2) == (1, 1)  # never fewer than one of each
    assert plan_repeats(0.0625, 5.0, 5, 2, min_seconds=1.0) == (16, 4)  # cheap calls: ~1 s of repeats, 1/4 s warm-up
    assert plan_repeats(1e-6, 5.0, 5, 2, min_seconds=1.0) == (1000, 250)  # at most MAX_REPEATS
    assert plan_repeats(0.125, 4.0, 5, 2, min_seconds=10.0) == (24, 8)  # and never beyond the budget
    cpu = torch.device("cpu")
    peak = peak_memory(lambda: torch.ones(10_000_000).add_(1.0), cpu)  # 40 MB float32
    if memory_method(cpu) == "unavailable":
        assert peak is None
    else:
        assert 38e6 <= peak <= 60e6


def test_combine_rounds_takes_the_median_of_the_rounds():
    row = {"N": 100, "batch": 2, "force_s": 1.0, "force_s_min": 0.9, "step_s": 1.2, "step_s_min": 1.1}
    rounds = [dict(row), {"force_s": 4.0, "force_s_min": 3.0, "step_s": 4.4, "step_s_min": 0.8},
              {"force_s": 2.0, "force_s_min": 1.5, "step_s": 2.1, "step_s_min": 2.0}]
    combine_rounds(row, rounds, flops_per_site=1e6)
    assert row["rounds"] == 3 and row["force_s_rounds"] == [1.0, 4.0, 2.0] and row["step_s_rounds"] == [1.2, 4.4, 2.1]
    assert row["force_s"] == 2.0 and row["step_s"] == 2.1  # a burst in one round (4.0) does not count
    assert row["force_s_min"] == 0.9 and row["step_s_min"] == 0.8
    assert math.isclose(row["force_s_per_site"], 2.0 / 200) and math.isclose(row["gflops"], 1e6 * 200 / 2.0 / 1e9)
    assert math.isclose(row["langevin_overhead"], 2.1 / 2.0 - 1) and math.isclose(row["site_steps_per_s"], 200 / 2.1)
    single = {"N": 4, "batch": 1, "force_s": 1.0}
    combine_rounds(single, [dict(single)], flops_per_site=1.0)
    assert single == {"N": 4, "batch": 1, "force_s": 1.0, "rounds": 1}


def test_rounds_time_every_size_again(tmp_path):
    out = tmp_path / "bench"
    cfg = _cfg("bench_preset=quick", f"output_dir={out}", "threads=1", "presets=[gnn_small]", "rounds=2",
               "ed_sizes=[]", "measure_memory=false")
    run(cfg)
    data = json.loads((out / "bench.json").read_text())
    assert data["rounds"] == 2
    ok = [r for r in data["rows"] if r["status"] == "ok"]
    assert [r["L"] for r in ok] == [10, 12]  # L = 8 is skipped (receptive field), and not timed again
    for r in ok:
        assert r["rounds"] == 2 and len(r["force_s_rounds"]) == 2 and len(r["step_s_rounds"]) == 2
        assert r["force_s"] == pytest.approx(sum(r["force_s_rounds"]) / 2)  # the median of two
        assert math.isclose(r["langevin_overhead"], r["step_s"] / r["force_s"] - 1)
    assert "median of 2 rounds" in (out / "bench.txt").read_text()
    with open(out / "bench.csv") as fh:
        assert {row["rounds"] for row in csv.DictReader(fh) if row["status"] == "ok"} == {"2"}


def test_rounds_alternate_the_order_of_the_sizes(tmp_path, monkeypatch):
    """Round 2 sweeps the sizes from the largest down, round 3 up again: a slow spell of the machine does not
    fall on the same end of every sweep."""
    import lattice_lab.bench.models as M

    order, measure = [], M._measure_size
    monkeypatch.setattr(M, "_measure_size", lambda row, *a, **kw: (order.append(row["L"]), measure(row, *a, **kw)))
    run(_cfg("bench_preset=quick", f"output_dir={tmp_path / 'bench'}", "threads=1", "presets=[gnn_small]",
             "rounds=3", "ed_sizes=[]", "measure_memory=false"))
    assert order == [10, 12, 12, 10, 10, 12]


def test_a_later_round_out_of_memory_keeps_the_first(tmp_path, monkeypatch):
    import lattice_lab.bench.models as M

    measure = M._measure_size

    def failing_later(row, *args, measure_memory, **kw):
        if "status" not in row:  # a later round's measurement (its row is a fresh dict)
            raise RuntimeError("out of memory (simulated)")
        return measure(row, *args, measure_memory=measure_memory, **kw)

    monkeypatch.setattr(M, "_measure_size", failing_later)
    out = tmp_path / "bench"
    run(_cfg("bench_preset=quick", f"output_dir={out}", "threads=1", "presets=[mlp_small]", "rounds=3",
             "ed_sizes=[]", "measure_memory=false"))
    rows = [r for r in json.loads((out / "bench.json").read_text())["rows"] if r["status"] == "ok"]
    assert rows and all(r["rounds"] == 1 and r["force_s"] > 0 and "out of memory" in r["note"] for r in rows)


def test_compiled_timings_appear_in_the_printed_table():
    """``compile=true`` measures the torch.compile'd force call; bench.txt and stdout must show it, not only bench.json."""
    from lattice_lab.bench.report import model_table, summary_table

    row = {"set": "scaling", "status": "ok", "preset": "gnn", "L": 32, "force_s": 2.0e-3, "force_s_per_site": 2.0e-6,
           "step_s": 2.1e-3, "site_steps_per_s": 5e5, "gflops": 10.0, "ceiling_fraction": 0.5,
           "langevin_overhead": 0.05, "mem_per_site_step": 100.0, "note": ""}
    skipped = {"set": "scaling", "status": "skipped", "preset": "gnn", "L": 8, "note": "receptive field > L/2"}
    plain = model_table([row, skipped])
    assert "compiled" not in plain  # compile=false: no empty columns
    text = model_table([{**row, "compiled_force_s": 1.25e-3, "compiled_speedup": 1.6}, skipped]).splitlines()
    header = text[0].split()
    assert header[:6] == ["preset", "L", "force", "ms", "us/site", "compiled"]
    assert "1.25" in text[2] and "1.60x" in text[2]
    assert text[3].index("receptive field") == text[1].rindex("  ") + 2, "a skipped row keeps the columns aligned"
    summary = {"preset": "enn", "params": 10, "flops_per_site": 1e5, "compile_error": "BackendCompilerFailed: x"}
    table = summary_table([summary], {"models": {}}, 40, 64)
    assert "compile failed: BackendCompilerFailed" in table


def test_bench_figure_legend_clear_of_data_and_targets_on_their_own_bars(tmp_path, inked_edges):
    """bench.png: the legend sat on the ED fit line; the enn / gnn target lines ran across every bar (as if
    they applied to all) with their labels over the tallest bar; bars said "L=512" for a median over 128-512."""
    import matplotlib.pyplot as plt

    from lattice_lab.bench import report

    presets = ["enn", "enn_small", "gnn", "mlp_small"]
    rows = [{"preset": p, "L": L, "status": "ok", "force_s_per_site": 1e-7 * (i + 1), "step_s_per_site": 1.1e-7 * (i + 1)}
            for i, p in enumerate(presets) for L in (32, 128, 512)]
    ed = [{"L": L, "N": L * L, "ed_force_s": 2e-10 * (L * L) ** 3} for L in (8, 16, 24, 40)]
    summaries = [{"preset": p, "ceiling_fraction_large": f, "large_sizes": [128, 512]}
                 for p, f in zip(presets, (2.2, 1.1, 1.7, 2.45))]
    fig = report.make_figure(rows, ed, summaries, {"ed_a_seconds_per_N3": 2e-10}, "cpu, float32, 2 threads",
                             [(0.25, "enn target", "enn"), (0.60, "gnn target"), (0.5, "enn_energy target", "enn_energy")],
                             ceiling_gflops=209.8)
    ax, bx = fig.axes
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    assert not ax.get_legend().get_window_extent(renderer).overlaps(ax.get_window_extent(renderer))
    assert inked_edges(report.write_png(tmp_path / "bench.png", fig)) == {}
    bars = {p: b for p, b in zip(presets, bx.patches)}
    red = [c for c in bx.collections if c.get_segments()]
    assert len(red) == 2 and not bx.get_lines()[1:]  # only the 100% line spans the panel
    for coll, (preset, level) in zip(red, (("enn", 25), ("gnn", 60))):
        (seg,) = coll.get_segments()
        bar = bars[preset]
        assert seg[0][1] == seg[1][1] == level
        assert bar.get_x() - 0.1 < seg[0][0] < bar.get_x() and bar.get_x() + bar.get_width() < seg[1][0] < bar.get_x() + 0.9
    texts = [t.get_text() for t in bx.texts]
    assert {"220%", "110%", "170%", "245%", "target 25%", "target 60%"} <= set(texts), texts
    assert "L = 128-512" in bx.get_ylabel() and "210 GFLOP/s = 100%" in bx.get_title()
    plt.close("all")


def test_one_measured_size_or_none_at_large_L_is_not_a_verdict():
    """One size gives no scaling ratio (N/A, not a ratio of 1 that passes); a ceiling fraction read below
    targets.large_L (no size there fitted the budget) is reported but decides nothing."""
    one = _summary(_rows([32]), preset="mlp")
    assert one["scaling_ratio_all"] is None
    small = _summary(_rows([32, 64]), large_L=128)
    assert small["large_L_measured"] is False and small["large_sizes"] == [64]
    assert small["ceiling_fraction_large"] == pytest.approx(0.1)
    res = {t["target"]: t for t in S.evaluate_targets([one, small], {"models": {}}, None, TARGETS, "cpu")}
    assert res["linear scaling mlp: time/site max/min <= 1.25"]["passed"] is None
    assert "fewer than 2 sizes measured ([32])" in res["linear scaling mlp: time/site max/min <= 1.25"]["detail"]
    ceiling = res["enn >= 25% of matmul ceiling on cpu at L >= 128"]
    assert ceiling["passed"] is None and "(no size >= 128 fitted the budget)" in ceiling["detail"]


def test_enn_speedup_target_and_memory_error_are_their_own_verdicts():
    """enn 10x faster than ED: faster than ED (PASS) but short of the 50x target (FAIL); a memory measurement
    that failed is N/A with its error named."""
    s = {"preset": "enn", "scaling_ratio_all": None, "sizes_measured": [40], "ceiling_fraction_large": None,
         "langevin_overhead_large": None}
    comparison = {"models": {"enn": {"speedups": [{"L": 40, "speedup": 10.0, "how": "measured"}]}}}
    memory = {"preset": "enn", "L": 200, "error": "OutOfMemoryError: simulated"}
    res = {t["target"]: t for t in S.evaluate_targets([s], comparison, memory, TARGETS, "cpu")}
    assert res["enn faster than ED at L = 40"]["passed"] is True
    assert res["enn >= 50x faster than ED at L = 40"]["passed"] is False
    mem = res["enn full step at L = 200 under 1 GB"]
    assert mem["passed"] is None and mem["detail"] == "OutOfMemoryError: simulated"
    from lattice_lab.bench.report import targets_text

    text = targets_text(list(res.values()))
    assert "N/A   enn full step at L = 200 under 1 GB" in text and "FAIL  enn >= 50x faster" in text


def test_ed_fit_falls_back_to_every_size_and_model_times_come_from_the_nearest_sizes():
    """ED's a N^3 is fitted on L >= ed_fit_min_L only when two sizes are there, else on every size; a model's
    time is interpolated between its nearest sizes, and held at its largest size beyond them."""
    a = 3e-10
    ed_rows = [{"L": L, "N": L * L, "ed_force_s": a * (L * L) ** 3 * (2.0 if L == 8 else 1.0)} for L in (8, 12, 16)]
    only_one = S.ed_comparison(ed_rows, [], fit_min_L=16)
    assert only_one["ed_fit_sizes"] == [8, 12, 16]
    two = S.ed_comparison(ed_rows, [], fit_min_L=12)
    assert two["ed_fit_sizes"] == [12, 16] and math.isclose(two["ed_a_seconds_per_N3"], a, rel_tol=1e-12)
    s = _summary([{**r, "force_s_per_site": r["force_s_per_site"] * r["L"] * (5.0 if r["L"] == 16 else 1.0)}
                  for r in _rows([16, 32, 64, 128])])  # per-site time 1e-8 L, but 5x that at L = 16
    t, how = S.model_time_at(s, 100)  # between 64 and 128 (log-log, exact for a power law), L = 16 plays no part
    assert how == "interpolated" and math.isclose(t, 1e-8 * 100 * 100 * 100, rel_tol=1e-12)
    t, how = S.model_time_at(s, 256)
    assert how == "extrapolated" and math.isclose(t, 1e-8 * 128 * 256 * 256, rel_tol=1e-12)


def test_near_core_ratio_needs_every_size_and_unattributable_probes_count_for_none():
    """Three sizes, one of them without a near-core timing: no near-core ratio (the two others would hide it).
    A row whose rounds lack a probe pair is not attributed to either state."""
    from lattice_lab.bench.cores import PROBE_KEY

    NEAR, FAR = [85.0, 88.0], [85.0, 360.0]
    rows = _rows([32, 64, 128])
    for r, probes in zip(rows, (NEAR, FAR, NEAR)):
        r[PROBE_KEY] = probes
    near = S.near_core_scaling(rows, fastest_ns=85.0)
    assert near["ratio"] is None and near["sizes_without"] == [64] and near["far"] == 1
    torn = {**rows[0], "force_s_rounds": [1.0, 1.1], f"{PROBE_KEY}_rounds": [NEAR]}
    assert S._timings(torn) == [(1.0, (None, None)), (1.1, (None, None))]


def test_core_state_and_csv_name_the_slow_probes(tmp_path):
    """far_fraction: the share of probes beyond FAR_FACTOR x the fastest; bench.csv's core_rt_ns_slowest is the
    slowest probe of the row's rounds."""
    from lattice_lab.bench.cores import FAR_FACTOR
    from lattice_lab.bench.report import write_csv
    from lattice_lab.bench.runner import _core_state

    state = _core_state([85.0, 90.0, 100.0, 360.0])
    assert state["fastest_ns"] == 85.0 and state["slowest_ns"] == 360.0 and state["median_ns"] == 95.0
    assert state["far_fraction"] == 0.25 and state["far_factor"] == FAR_FACTOR
    assert _core_state([])["probes"] == 0
    row = {**_rows([32])[0], "kind": "model", "core_rt_ns_rounds": [[85.0, 360.0], [90.0, 88.0]]}
    with open(write_csv(tmp_path / "b.csv", [row])) as fh:
        (line,) = csv.DictReader(fh)
    assert float(line["core_rt_ns_slowest"]) == 360.0


def test_size_budget_refuses_by_time_and_memory_and_seeds_stay_64_bit():
    """A size is skipped when 2 calls (a warm-up and one timed) would exceed max_seconds, or its peak memory the
    budget (both linear in N from the largest size measured); the per-size seed wraps at 2^64."""
    from lattice_lab.bench.models import _Budget, _size_seed
    from lattice_lab.common.seeding import SEED_MAX

    budget = _Budget(max_seconds=1.0, max_bytes=1e9)
    assert budget.refuse(100) is None  # nothing measured yet
    budget.update(100, 0.2, 2e8)
    assert budget.refuse(200) is None  # 0.4 s a call, 4e8 bytes
    assert budget.refuse(300) == "skipped: estimated 0.6 s per call; 2 calls > max_seconds_per_measurement=1"
    roomy = _Budget(max_seconds=100.0, max_bytes=1e9)
    roomy.update(100, 0.2, 2e8)
    assert roomy.refuse(500) is None and "peak memory 1.2 GB > budget 1 GB" in roomy.refuse(600)
    assert _size_seed(3, 10) == 13 and _size_seed(SEED_MAX, 10) == 9


def test_memory_budget_is_half_the_cpus_available_memory(monkeypatch):
    from lattice_lab.bench import runner as bench_runner

    monkeypatch.setattr(bench_runner, "available_bytes", lambda device: 8e9)
    cfg = _cfg("max_memory_gb=null")
    assert bench_runner._memory_budget(cfg, torch.device("cpu")) == 4e9
    assert bench_runner._memory_budget(_cfg("max_memory_gb=3"), torch.device("cpu")) == 3e9
    monkeypatch.setattr(bench_runner, "available_bytes", lambda device: None)
    assert bench_runner._memory_budget(cfg, torch.device("cpu")) is None


def test_sizes_are_sorted_without_repeats():
    """sizes / ed_sizes in any order, with repeats: each size measured once, smallest first (the time budget
    extrapolates from the largest size measured so far)."""
    from omegaconf import OmegaConf

    from lattice_lab.bench.runner import _sizes

    cfg = OmegaConf.create({"sizes": [32, 8, 16, 8], "ed_sizes": [12, 4], "one": 10})
    assert _sizes(cfg, "sizes") == [8, 16, 32] and _sizes(cfg, "ed_sizes", even=True) == [4, 12]
    assert _sizes(cfg, "one") == [10]
