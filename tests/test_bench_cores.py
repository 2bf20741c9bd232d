"""The benchmark's core-to-core probe (bench/cores.py) and what the summary makes of it.

No timing assertions: the probe's value depends on where the host runs the threads. What is checked:
it measures something positive with two threads, nothing with one, stops at its time limit, and the
classification of timings into the near / far state follows the run's fastest probe.
"""

import json
import time

import pytest
import torch

from lattice_lab.bench import cores
from lattice_lab.bench import summary as S
from lattice_lab.bench.models import combine_rounds


@pytest.fixture
def threads():
    previous = torch.get_num_threads()

    def use(n):
        torch.set_num_threads(n)

    yield use
    torch.set_num_threads(previous)


def test_round_trip_with_two_threads_and_none_with_one(threads):
    threads(2)
    # 5 s for 2000 round trips: under load (the other pytest worker on the other core) the partner thread can
    # start later than the probe's default 0.05 s limit, which then (rightly) reports nothing
    ns = cores.round_trip_ns(iters=2000, max_seconds=5.0)
    if cores.available_cpus() < 2:
        assert ns is None  # a team squeezed onto one CPU would time the scheduler
    else:
        assert ns is not None and 1.0 < ns < 1e7
    threads(1)
    assert cores.round_trip_ns() is None


def test_round_trip_stops_at_its_time_limit(threads):
    threads(2)
    if cores.available_cpus() < 2:
        pytest.skip("needs 2 CPUs")  # the probe itself refuses to run there (previous test)
    t = time.perf_counter()
    ns = cores.round_trip_ns(iters=10**12, max_seconds=0.02)
    assert ns is not None and ns > 0
    assert time.perf_counter() - t < 2.0  # 10^12 round trips would take a day


def test_without_a_compiler_there_is_no_probe(threads, no_compiler, monkeypatch):
    threads(2)
    monkeypatch.setattr(cores, "available_cpus", lambda: 2)
    assert cores.round_trip_ns() is None


def test_near_cores_follows_the_fastest_probe():
    assert cores.near_cores((90.0, 170.0), 90.0) is True
    assert cores.near_cores((90.0, 360.0), 90.0) is False  # a far probe on either side
    assert cores.near_cores((360.0, 90.0), 90.0) is False
    assert cores.near_cores((None, 90.0), 90.0) is None
    assert cores.near_cores((90.0, 90.0), None) is None
    assert cores.probe_pairs({"core_rt_ns": [1.0, 2.0]}) == [(1.0, 2.0)]
    assert cores.probe_pairs({"core_rt_ns_rounds": [[1.0, 2.0], [3.0, 4.0]], "core_rt_ns": [1.0, 2.0]}) == [
        (1.0, 2.0), (3.0, 4.0)]
    assert cores.probe_pairs({}) == []


def _row(L, times, probes):
    row = {"status": "ok", "set": "scaling", "L": L, "N": L * L, "batch": 1, "force_s": times[0],
           "force_s_per_site": times[0] / (L * L), "core_rt_ns": probes[0]}
    combine_rounds(row, [dict(row)] + [{"force_s": t, "core_rt_ns": p} for t, p in zip(times[1:], probes[1:])],
                   flops_per_site=1.0)
    return row


def test_scaling_of_the_near_core_timings():
    NEAR, FAR = [85.0, 88.0], [85.0, 360.0]
    # L = 32: two of three rounds with a far probe and 40% slower; L = 128: all near
    rows = [_row(32, [1.4e-5, 1.0e-5, 1.45e-5], [FAR, NEAR, FAR]),
            _row(128, [1.6e-4, 1.6e-4, 1.6e-4], [NEAR, NEAR, NEAR])]
    assert rows[0]["force_s"] == 1.4e-5 and rows[0]["core_rt_ns_rounds"] == [FAR, NEAR, FAR]
    near = S.near_core_scaling(rows, fastest_ns=85.0)
    assert near["timings"] == 6 and near["far"] == 2 and near["sizes_without"] == []
    assert near["ratio"] == pytest.approx((1.6e-4 / 128**2) / (1.0e-5 / 32**2))
    assert S.core_probes(rows) == [p for pair in (FAR, NEAR, FAR, NEAR, NEAR, NEAR) for p in pair]
    # a size without any near-core timing: no ratio, and the size is named
    rows[0] = _row(32, [1.4e-5], [FAR])
    near = S.near_core_scaling(rows, fastest_ns=85.0)
    assert near["ratio"] is None and near["sizes_without"] == [32]
    info = {"preset": "m", "model": "M", "params": 1, "flops_per_site": 1.0, "conservative": False, "rows": rows}
    s = S.summarize_model(info, None, fastest_rt_ns=85.0)
    assert s["scaling_ratio_near"] is None and s["far_timings"] == 1 and s["probed_timings"] == 4
    assert "no near-core timing at L = [32]" in S._state_note(s)
    # no probes (CUDA, one thread): nothing to say
    plain = [{"status": "ok", "set": "scaling", "L": L, "N": L * L, "force_s": 1.0, "force_s_per_site": 1.0 / L**2}
             for L in (32, 64)]
    assert S.near_core_scaling(plain, fastest_ns=None) == {"ratio": None, "timings": 0, "far": 0,
                                                            "sizes_without": [32, 64]}


def test_bench_records_the_probes(tmp_path, threads):
    from hydra import compose, initialize_config_dir

    from lattice_lab.bench import run
    from lattice_lab.common.cli import CONFIG_DIR

    if cores.available_cpus() < 2:
        pytest.skip("needs 2 CPUs")
    out = tmp_path / "bench"
    with initialize_config_dir(config_dir=CONFIG_DIR):
        cfg = compose(config_name="bench", overrides=["bench_preset=quick", f"output_dir={out}", "threads=2",
                                                      "presets=[mlp_small]", "rounds=2", "ed_sizes=[]",
                                                      "measure_memory=false"])
    run(cfg)
    data = json.loads((out / "bench.json").read_text())
    ok = [r for r in data["rows"] if r["status"] == "ok"]
    for r in ok:
        assert len(r["core_rt_ns_rounds"]) == 2 and all(p > 0 for pair in r["core_rt_ns_rounds"] for p in pair)
    state = data["core_round_trip"]
    assert state["probes"] == 4 * len(ok)
    assert state["fastest_ns"] <= state["median_ns"] <= state["slowest_ns"]
    model = data["models"][0]
    assert model["probed_timings"] == 2 * len(ok)
    text = (out / "bench.txt").read_text()
    assert "core-to-core round trip" in text and "scale(near)" in text
    csv_text = (out / "bench.csv").read_text()
    assert "core_rt_ns_slowest" in csv_text.splitlines()[0]
