"""Speed of one force-field preset: force evaluation, full Langevin step and peak memory vs L.

For every lattice size the model is timed exactly as dynamics uses it: through
:class:`lattice_lab.dynamics.forces.MLForceProvider` (direct models under no_grad, energy
models with autograd for F = -dE/dQ), frozen as simulate's providers are, on one configuration
``[batch, L, L]`` in the benchmark dtype, the forces written into a buffer as the integrator's
native steps do (``provider.forces_into(Q, buffer)``); the full step is
:class:`lattice_lab.dynamics.langevin.LangevinIntegrator` with that provider as its force. Sizes
whose cost would exceed the time or memory budget are skipped, estimated from the largest size
already measured (cost is linear in N for a local model).
"""

from __future__ import annotations

import statistics

import torch

from lattice_lab.bench.cores import PROBE_KEY, round_trip_ns
from lattice_lab.bench.timing import peak_memory, plan_repeats, time_call
from lattice_lab.common.cuda_graph import GraphedCall
from lattice_lab.common.errors import ConfigError
from lattice_lab.common.progress import progress
from lattice_lab.common.seeding import SEED_MAX
from lattice_lab.models.base import min_lattice as reach_lattice


def available_presets() -> list[str]:
    """Names of the model presets ``conf/model/<name>.yaml``."""
    from lattice_lab.models.registry import available_presets as presets

    return presets()


def load_preset(name: str) -> dict:
    """The model config dict of preset ``name`` (``conf/model/<name>.yaml``)."""
    from lattice_lab.models.registry import load_preset as load

    if name not in available_presets():
        raise ConfigError(f"presets: unknown model preset {name!r} (available: {available_presets()})")
    return load(name)


def _model_api():
    """build_model, count_parameters, flops_per_site from the models package."""
    from lattice_lab.models.registry import build_model, count_parameters

    try:
        from lattice_lab.models.flops import flops_per_site
    except ImportError:  # the registry re-exports it (docs/ARCHITECTURE.md)
        from lattice_lab.models.registry import flops_per_site
    return build_model, count_parameters, flops_per_site


def build_preset(name: str, hamiltonian, device: torch.device, dtype: torch.dtype):
    """Build preset ``name`` with random weights: (model in eval mode, params, flops per site)."""
    build_model, count_parameters, flops_per_site = _model_api()
    model = build_model(load_preset(name), hamiltonian.as_dict()).to(device=device, dtype=dtype).eval()
    return model, int(count_parameters(model)), float(flops_per_site(model))


def model_label(model) -> str:
    """The model's class for the ``model`` column: ``ENN+ElasticPrior`` for a network wrapped in the
    exact elastic prior (``elastic_prior: true``), not the wrapper's name alone for three families."""
    network = getattr(model, "network", None)
    if isinstance(network, torch.nn.Module):
        return f"{type(network).__name__}+{type(model).__name__}"
    return type(model).__name__


def min_lattice(model) -> int:
    """Smallest L the model accepts (its receptive field must fit: L >= 2 r + 1)."""
    return reach_lattice(float(getattr(model, "receptive_field", 0)))


def make_provider(model, hamiltonian, device, dtype):
    """The force provider simulate would use for ``model`` (injected, not loaded from a checkpoint):
    frozen, as simulate's providers are (the benchmark never changes the model's weights)."""
    from lattice_lab.dynamics.forces import MLForceProvider

    return MLForceProvider(hamiltonian, device, dtype, checkpoint=None, model=model, frozen=True)


def make_integrator(provider, langevin: dict, device, seed: int, cuda_graph: bool = False):
    """The integrator simulate would step with: it may overwrite the force it handed out at its next
    step (``reuse_forces``), as simulate's loop lets it."""
    from lattice_lab.dynamics.langevin import LangevinIntegrator, LangevinParams

    gen = torch.Generator(device=device).manual_seed(seed)
    return LangevinIntegrator(provider, LangevinParams(**langevin), generator=gen, cuda_graph=cuda_graph,
                              reuse_forces=True)


def random_configuration(batch: int, L: int, device, dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A hot random configuration (Q of order the CDW amplitude ~ 1, small velocities)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    Q = torch.randn(batch, L, L, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    V = 0.1 * torch.randn(batch, L, L, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    return Q, V


def _size_seed(seed: int, L: int) -> int:
    """The seed of the configuration timed at size L: ``seed + L``, kept a 64-bit seed."""
    return (seed + L) % (SEED_MAX + 1)


class _Budget:
    """Linear-in-N extrapolation of time and memory from the largest size measured so far."""

    def __init__(self, max_seconds: float, max_bytes: float | None):
        self.max_seconds, self.max_bytes = float(max_seconds), max_bytes
        self.N = self.seconds = self.bytes = None

    def update(self, N: int, seconds: float | None, nbytes: int | None) -> None:
        if seconds is not None and (self.N is None or N >= self.N):
            self.N, self.seconds = N, seconds
            self.bytes = nbytes if nbytes is not None else self.bytes

    def estimate(self, N: int) -> tuple[float | None, float | None]:
        if self.N is None:
            return None, None
        scale = N / self.N
        return self.seconds * scale, (self.bytes * scale if self.bytes is not None else None)

    def refuse(self, N: int) -> str | None:
        est_s, est_b = self.estimate(N)
        if est_s is not None and 2 * est_s > self.max_seconds:  # one warm-up + one timed call must fit
            return (f"skipped: estimated {est_s:.3g} s per call; 2 calls > "
                    f"max_seconds_per_measurement={self.max_seconds:g}")
        if est_b is not None and self.max_bytes is not None and est_b > self.max_bytes:
            return f"skipped: estimated peak memory {est_b / 1e9:.3g} GB > budget {self.max_bytes / 1e9:.3g} GB"
        return None


def bench_preset(name: str, *, sizes, compare_sizes, hamiltonian, device: torch.device, dtype: torch.dtype,
                 batch: int = 1, repeats: int = 5, warmup: int = 2, max_seconds: float = 5.0, min_seconds: float = 0.0,
                 max_bytes: float | None = None, langevin: dict | None = None, measure_memory: bool = True,
                 compile: bool = False, seed: int = 0, statistic: str = "median", cuda_graph: bool = False,
                 rounds: int = 1) -> dict:
    """Benchmark preset ``name``: returns ``{"preset", "model", "params", "flops_per_site", "rows", ...}``.

    ``sizes`` are the scaling sizes (force, step, memory); ``compare_sizes`` (the ED sizes) get the
    force time only, for the comparison with exact diagonalisation. ``cuda_graph`` (CUDA only): the
    force call and the Langevin step are timed as CUDA-graph replays
    (:mod:`lattice_lab.common.cuda_graph`), as simulate runs them; the eager force call is kept as
    ``eager_force_s``. ``rounds`` > 1: the force call and the step are timed again at every measured
    size in ``rounds - 1`` further sweeps over the sizes (every other one in reverse order), and each time
    is the median of the rounds (:func:`combine_rounds`): a burst of a shared machine's load then cannot
    fall on one size only.
    """
    model, n_params, fps = build_preset(name, hamiltonian, device, dtype)
    provider = make_provider(model, hamiltonian, device, dtype)
    compiled, compile_error = None, None
    if compile:
        try:
            compiled = make_provider(torch.compile(model), hamiltonian, device, dtype)
        except Exception as exc:  # noqa: BLE001 - reported, never fatal
            compile_error = f"{type(exc).__name__}: {exc}"
    L_min = min_lattice(model)
    info = {"preset": name, "model": model_label(model), "params": n_params, "flops_per_site": fps,
            "conservative": bool(getattr(model, "conservative", False)),
            "receptive_field": float(getattr(model, "receptive_field", 0)), "min_L": L_min,
            "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
            "compile_error": compile_error}
    rows: list[dict] = []
    budget = _Budget(max_seconds, max_bytes)
    plan = [("scaling", int(L)) for L in sorted(set(sizes))]
    plan += [("ed_compare", int(L)) for L in sorted(set(compare_sizes) - set(sizes))]
    bar = progress(plan, desc=f"bench {name}", unit="size")
    for role, L in bar:
        N = L * L
        row = {"kind": "model", "preset": name, "model": info["model"], "set": role, "L": L, "N": N,
               "batch": batch, "params": n_params, "flops_per_site": fps, "status": "ok", "note": ""}
        rows.append(row)
        if L < L_min:
            row.update(status="skipped", note=f"skipped: L={L} < receptive-field minimum {L_min}")
            continue
        refusal = budget.refuse(N) if role == "scaling" else None
        if refusal:
            row.update(status="skipped", note=refusal)
            continue
        try:
            _measure_size(row, provider, compiled, budget, hamiltonian=hamiltonian, device=device, dtype=dtype,
                          batch=batch, repeats=repeats, warmup=warmup, max_seconds=max_seconds, min_seconds=min_seconds,
                          langevin=langevin or {}, measure_memory=measure_memory and role == "scaling",
                          full=role == "scaling", seed=_size_seed(seed, L), info=info, statistic=statistic,
                          cuda_graph=cuda_graph)
        except torch.OutOfMemoryError as exc:
            row.update(status="skipped", note=f"out of memory: {str(exc).splitlines()[0]}")
            if device.type == "cuda":
                torch.cuda.empty_cache()
        except RuntimeError as exc:
            if "memory" not in str(exc).lower():
                raise
            row.update(status="skipped", note=f"out of memory: {str(exc).splitlines()[0]}")
    measured = [r for r in rows if r["status"] == "ok"]
    samples = {id(r): [dict(r)] for r in measured}
    for k in range(1, rounds):
        # every other round from the largest size down: a slow spell of a shared machine, which lasts seconds
        # to minutes, then falls on other sizes in other rounds instead of on the same end of every sweep
        order = measured[::-1] if k % 2 else measured
        for row in progress(order, desc=f"bench {name} round {k + 1}/{rounds}", unit="size"):
            again = {"L": row["L"], "N": row["N"], "batch": batch}
            try:
                _measure_size(again, provider, None, _Budget(max_seconds, max_bytes), hamiltonian=hamiltonian,
                              device=device, dtype=dtype, batch=batch, repeats=repeats, warmup=warmup,
                              max_seconds=max_seconds, min_seconds=min_seconds, langevin=langevin or {},
                              measure_memory=False, full=row["set"] == "scaling", seed=_size_seed(seed, row["L"]), info=info,
                              statistic=statistic, cuda_graph=cuda_graph)
            except RuntimeError as exc:  # out of memory (torch.OutOfMemoryError included) in a later round:
                if "memory" not in str(exc).lower():  # the size keeps the rounds it has
                    raise
                row["note"] = f"round {k + 1}: out of memory"
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            samples[id(row)].append(again)
    for row in measured:
        combine_rounds(row, samples[id(row)], info["flops_per_site"])
    info["rows"] = rows
    return info


ROUND_KEYS = ("force_s", "eager_force_s", "step_s")  # the times a round measures


def combine_rounds(row: dict, rounds: list[dict], flops_per_site: float) -> None:
    """Set ``row``'s times to the median over ``rounds`` (one dict per sweep over the sizes, the first
    is the row as measured), keep every round's value as ``<key>_rounds``, and recompute what follows
    from the times (per site, GFLOP/s, site-steps/s, Langevin overhead)."""
    row["rounds"] = len(rounds)
    if len(rounds) == 1:
        return
    for key in ROUND_KEYS:
        values = [r[key] for r in rounds if r.get(key) is not None]
        if values:
            row[f"{key}_rounds"] = values
            row[key] = statistics.median(values)
    if all(r.get(PROBE_KEY) for r in rounds):  # aligned with force_s_rounds
        row[f"{PROBE_KEY}_rounds"] = [r[PROBE_KEY] for r in rounds]
    for key in ("force_s_min", "step_s_min"):
        values = [r[key] for r in rounds if r.get(key) is not None]
        if values:
            row[key] = min(values)
    sites = row["batch"] * row["N"]
    row.update(force_s_per_site=row["force_s"] / sites, gflops=flops_per_site * sites / row["force_s"] / 1e9)
    if row.get("step_s") is not None:
        row.update(step_s_per_site=row["step_s"] / sites, site_steps_per_s=sites / row["step_s"],
                   langevin_overhead=row["step_s"] / row["force_s"] - 1.0)


def _measure_size(row, provider, compiled, budget, *, hamiltonian, device, dtype, batch, repeats, warmup,
                  max_seconds, langevin, measure_memory, full, seed, info, statistic="median", min_seconds=0.0,
                  cuda_graph=False):
    N, sites = row["N"], row["batch"] * row["N"]
    Q, V = random_configuration(batch, row["L"], device, dtype, seed)
    est_s, _ = budget.estimate(N)
    probe = None
    if est_s is None:  # nothing measured yet: the first warm-up call is timed and gives the estimate
        probe = time_call(lambda: provider(Q), device, warmup=0, repeats=1)
        est_s = probe.median
    r, w = plan_repeats(est_s, max_seconds, repeats, warmup, min_seconds)
    rt_before = round_trip_ns() if device.type == "cpu" else None
    buffer = torch.empty_like(Q)  # a force buffer of the integrator's, as its native CPU steps pass one
    force = time_call(lambda: provider.forces_into(Q, buffer), device, warmup=w - (probe is not None), repeats=r)
    if rt_before is not None:  # the cores' state during the timing (bench/cores.py)
        row[PROBE_KEY] = [rt_before, round_trip_ns()]
    call, mem_force = provider, None
    if cuda_graph:  # a replay allocates nothing: its memory is taken while recording (warm-up included)
        row["eager_force_s"] = getattr(force, statistic)
        graphed = []
        if measure_memory:
            mem_force = peak_memory(lambda: graphed.append(GraphedCall(provider, Q)), device)
        call = graphed[0] if graphed else GraphedCall(provider, Q)
        r, w = plan_repeats(row["eager_force_s"], max_seconds, repeats, warmup, min_seconds)
        force = time_call(lambda: call(Q), device, warmup=w, repeats=r)
    elif measure_memory:
        mem_force = peak_memory(lambda: provider(Q), device)
    t_force = getattr(force, statistic)
    row.update(force_s=t_force, force_s_min=force.min, force_repeats=force.repeats, cuda_graph=bool(cuda_graph),
               force_s_per_site=t_force / sites, gflops=info["flops_per_site"] * sites / t_force / 1e9)
    if not full:
        return
    budget.update(N, t_force, mem_force)
    row.update(peak_mem_force_bytes=mem_force,
               mem_per_site_force=mem_force / sites if mem_force is not None else None)
    integrator = make_integrator(provider, langevin, device, seed, cuda_graph=cuda_graph)
    state = integrator.init_state(Q.clone(), V.clone())
    mem_step = None
    if measure_memory and cuda_graph:  # the first step records the graph: the step's peak memory
        mem_step = peak_memory(lambda: integrator.step(state, 1), device)
    r, w = plan_repeats(t_force, max_seconds, repeats, warmup, min_seconds)
    with torch.no_grad():  # as simulate's loop steps (the integrator enables autograd for energy models)
        step = time_call(lambda: integrator.step(state, 1), device, warmup=w, repeats=r)
    t_step = getattr(step, statistic)
    row.update(step_s=t_step, step_s_min=step.min, step_repeats=step.repeats,
               step_s_per_site=t_step / sites, site_steps_per_s=sites / t_step,
               langevin_overhead=t_step / t_force - 1.0)
    if measure_memory:
        if not cuda_graph:
            mem_step = peak_memory(lambda: integrator.step(state, 1), device)
        row.update(peak_mem_step_bytes=mem_step,
                   mem_per_site_step=mem_step / sites if mem_step is not None else None)
        budget.update(N, t_force, max(mem_force or 0, mem_step or 0) or None)
    if compiled is not None and info.get("compile_error") is None:
        try:  # on CUDA with graphs: the compiled model recorded as a graph, as simulate runs it
            ccall = GraphedCall(compiled, Q) if cuda_graph else compiled
            comp = time_call(lambda: ccall(Q), device, warmup=max(2, w), repeats=r)
            row.update(compiled_force_s=getattr(comp, statistic), compiled_speedup=t_force / getattr(comp, statistic))
        except Exception as exc:  # noqa: BLE001 - torch.compile failures are reported, not fatal
            info["compile_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def step_memory(name: str, L: int, *, hamiltonian, device, dtype, batch: int = 1, langevin: dict | None = None,
                seed: int = 0) -> dict:
    """Total memory of one full Langevin step of preset ``name`` at size L (for the memory target).

    total = parameter bytes + state (Q, V, F) bytes + peak memory of one step above the state.
    """
    model, _, _ = build_preset(name, hamiltonian, device, dtype)
    provider = make_provider(model, hamiltonian, device, dtype)
    integrator = make_integrator(provider, langevin or {}, device, seed)
    Q, V = random_configuration(batch, L, device, dtype, seed)
    state = integrator.init_state(Q, V)
    integrator.step(state, 1)  # warm-up
    peak = peak_memory(lambda: integrator.step(state, 1), device)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    state_bytes = 3 * Q.numel() * Q.element_size()
    total = None if peak is None else param_bytes + state_bytes + peak
    return {"preset": name, "L": int(L), "batch": int(batch), "param_bytes": param_bytes,
            "state_bytes": state_bytes, "peak_step_bytes": peak, "total_bytes": total}
