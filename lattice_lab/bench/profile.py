"""Where a force evaluation spends its time: torch.profiler by operator, by input shape and by layer.

Every submodule of the model is wrapped in a ``record_function("module:<name>")`` range (forward
hooks), so the profile splits the time per layer as well as per aten operator; for energy models
the backward pass shows as ``autograd::engine::evaluate_function: <Op>Backward`` entries.
"""

from __future__ import annotations

import torch
from torch.autograd.profiler import record_function

from lattice_lab.bench.models import build_preset, make_provider, random_configuration


def _attach_ranges(model: torch.nn.Module, max_depth: int):
    stack, handles = [], []
    for name, mod in model.named_modules():
        if not name or name.count(".") >= max_depth:
            continue

        def pre(_m, _inp, label=f"module:{name}"):
            ctx = record_function(label)
            ctx.__enter__()
            stack.append(ctx)

        def post(_m, _inp, _out):
            if stack:
                stack.pop().__exit__(None, None, None)

        handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
    return handles


def profile_preset(name: str, L: int, *, hamiltonian, device: torch.device, dtype: torch.dtype, batch: int = 1,
                   calls: int = 2, row_limit: int = 20, max_depth: int = 2, seed: int = 0) -> dict:
    """Profile ``calls`` force evaluations of preset ``name`` at size L (after one warm-up call).

    Returns ``{"preset", "L", "ops" (table by self time), "shapes" (same, grouped by input shape),
    "modules" (list of (module, total ms per call) sorted by time), "total_ms_per_call"}``.
    """
    model, _, _ = build_preset(name, hamiltonian, device, dtype)
    provider = make_provider(model, hamiltonian, device, dtype)
    Q, _ = random_configuration(batch, L, device, dtype, seed)
    provider(Q)
    handles = _attach_ranges(model, max_depth)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    try:
        with torch.profiler.profile(activities=activities, record_shapes=True) as prof:
            for _ in range(calls):
                with record_function("force_evaluation"):
                    provider(Q)
    finally:
        for h in handles:
            h.remove()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    avg = prof.key_averages()
    modules, total = [], None
    for e in avg:
        if e.key.startswith("module:"):
            modules.append((e.key[len("module:"):], e.cpu_time_total / 1e3 / calls))
        elif e.key == "force_evaluation":
            total = e.cpu_time_total / 1e3 / calls
    modules.sort(key=lambda m: -m[1])
    return {"preset": name, "L": int(L), "calls": calls, "total_ms_per_call": total, "modules": modules,
            "ops": avg.table(sort_by=sort, row_limit=row_limit),
            "shapes": prof.key_averages(group_by_input_shape=True).table(sort_by=sort, row_limit=row_limit)}


def format_profile(p: dict) -> str:
    lines = [f"== profile {p['preset']} at L = {p['L']} ({p['calls']} force calls; "
             f"{p['total_ms_per_call']:.1f} ms per call) ==", "", "time per layer (inclusive, ms per call):"]
    lines += [f"  {name:<40s} {ms:10.2f}" for name, ms in p["modules"]]
    lines += ["", "operators by self time:", p["ops"], "", "operators by input shape:", p["shapes"]]
    return "\n".join(lines)
