"""Langevin dynamics of the lattice distortions, generic over force providers (DESIGN.md section 3).

    m d^2Q_i/dt^2 = F_i(Q) - gamma m dQ_i/dt + eta_i(t),   <eta eta> = 2 gamma m T delta delta

One step = velocity Verlet (half kick, drift, force, half kick) followed by the exact
Ornstein-Uhlenbeck update of the velocities (the authors' scheme):

    v <- v + dt F / (2m);   Q <- Q + dt v;   F <- F(Q);   v <- v + dt F / (2m)
    v <- a v + sqrt((1 - a^2) T / m) xi,     a = exp(-gamma dt),  xi ~ N(0, 1)

It samples the Boltzmann distribution (equipartition m <v^2> = T) and reduces to symplectic
velocity Verlet (energy error O(dt^2)) for gamma = 0, T = 0. The force is cached in the state, so
a step costs exactly one force evaluation; the rest is a handful of fused in-place tensor ops.
Replicas are the leading batch dim ``[R, L, L]``; any device and float dtype.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields

import torch

from lattice_lab.common.errors import ConfigError
from lattice_lab.dynamics.forces import fits_forces

ForceFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class LangevinParams:
    """Integrator parameters (defaults: the papers' m = 5, gamma = 0.2, dt = 0.05, T = 0.1)."""

    mass: float = 5.0
    gamma: float = 0.2
    dt: float = 0.05
    temperature: float = 0.1

    def __post_init__(self):
        self.validate()

    def validate(self) -> LangevinParams:
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ConfigError(f"dynamics.{f.name}={v!r}: expected a finite number")
        if self.mass <= 0:
            raise ConfigError(f"dynamics.mass={self.mass}: must be > 0")
        if self.gamma < 0:
            raise ConfigError(f"dynamics.gamma={self.gamma}: must be >= 0")
        if self.dt <= 0:
            raise ConfigError(f"dynamics.dt={self.dt}: must be > 0")
        if self.temperature < 0:
            raise ConfigError(f"dynamics.temperature={self.temperature}: must be >= 0")
        return self

    @classmethod
    def from_config(cls, cfg: Mapping, **overrides) -> LangevinParams:
        """Take mass, gamma, dt, temperature from a mapping (other keys are ignored)."""
        kw = {f.name: float(cfg[f.name]) for f in fields(cls) if f.name in cfg and cfg[f.name] is not None}
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def checked(cls, values: Mapping, section: str = "dynamics") -> LangevinParams:
        """``cls(**values)`` with errors naming ``<section>.<key>`` (the config section the values came
        from: ``dataset`` in generate, ``langevin`` in bench), unknown keys included."""
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise ConfigError(f"{section}.{unknown[0]}: unknown setting (expected {[f.name for f in fields(cls)]})")
        try:
            return cls(**values)
        except ConfigError as exc:
            raise ConfigError(str(exc).replace("dynamics.", f"{section}.", 1)) from None

    @property
    def ou_decay(self) -> float:
        """a = exp(-gamma dt)."""
        return math.exp(-self.gamma * self.dt)

    @property
    def ou_noise(self) -> float:
        """sqrt((1 - a^2) T / m), the velocity noise amplitude per step."""
        return math.sqrt(-math.expm1(-2.0 * self.gamma * self.dt) * self.temperature / self.mass)


@dataclass
class LangevinState:
    """Positions Q, velocities V, cached forces F(Q) (all ``[R, L, L]``) and the step counter."""

    Q: torch.Tensor
    V: torch.Tensor
    F: torch.Tensor
    step: int = 0

    def to_dict(self) -> dict:
        """Checkpointable dict (tensors cloned to CPU)."""
        return {"Q": self.Q.detach().cpu().clone(), "V": self.V.detach().cpu().clone(),
                "F": self.F.detach().cpu().clone(), "step": int(self.step)}

    @classmethod
    def from_dict(cls, d: Mapping, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None) -> LangevinState:
        def conv(x):
            return torch.as_tensor(x).to(device=device, dtype=dtype).clone()

        return cls(Q=conv(d["Q"]), V=conv(d["V"]), F=conv(d["F"]), step=int(d["step"]))

    def clone(self) -> LangevinState:
        return LangevinState(self.Q.clone(), self.V.clone(), self.F.clone(), self.step)

    def kinetic_temperature(self, mass: float) -> float:
        """m <v^2> averaged over all sites and replicas (equals T in equilibrium)."""
        return float(mass * self.V.double().pow(2).mean())


class LangevinIntegrator:
    """Velocity Verlet + exact OU thermostat, driven by any force provider ``[R, L, L] -> [R, L, L]``.

    ``generator`` (a ``torch.Generator`` on the state's device) makes the noise reproducible; its
    state is part of a checkpoint (:meth:`rng_state` / :meth:`set_rng_state`). Without one, the
    global torch RNG is used. The force provider is called under ``torch.no_grad()`` unless it is
    marked ``conservative`` or ``needs_grad`` (energy models that differentiate themselves).

    **Noise on the CPU.** With ``native`` (``auto``: when the C++ kernel builds) a CPU step is two
    fused native passes (:mod:`lattice_lab.native.langevin`), and the bath noise of site i at step s
    is a counter-based Philox4x32-10 normal of (seed, s, i), the seed being the generator's
    ``initial_seed()``. It is drawn with every thread (~0.65 ns per site and core with AVX-512, 1.9 with
    AVX2, against 2.6-3.9 ns/site for torch's serial ``normal_``) and independent of the thread count and
    of the CPU's vector width; the generator itself is
    not advanced. The torch path (``native=False``, no compiler, GPU) draws ``normal_`` from the
    generator instead: the same distribution, other numbers. :meth:`noise_source` says which one a
    state gets, so that a resumed run can insist on the same.

    ``cuda_graph=True`` (state on a GPU): one step, force call included, is recorded once as a CUDA
    graph (:mod:`lattice_lab.common.cuda_graph`) and every step replays it: one launch instead of
    the ~100-250 of an eager step, which decide the speed of small lattices. The recording is warmed
    up on a copy of the state with the generator's state restored afterwards, so every step of a run
    is a replay and draws the noise an eager run would; a state with other tensors is recorded anew.

    **Force buffers.** A native CPU step with a provider that has ``forces_into`` writes the forces into
    buffers of the integrator's own, never into ``state.F`` as it was on entry, nor into the force it
    hands out as ``state.F``: a caller may hold either. So a call of :meth:`step` with ``n = 1``
    allocates one new force tensor. ``reuse_forces=True`` is the caller's promise that it reads the
    ``state.F`` a step hands out only until its next :meth:`step` (``simulate``'s loop, which copies
    what it keeps): that force is then overwritten by a later step, when it is still ``state.F``, so
    that steps alternate two buffers and allocate nothing (~8 us of a ~60 us ``gnn_small`` step at
    L = 32 on 2 cores). A ``state.F`` the caller put there itself is never written.
    """

    def __init__(self, force_fn: ForceFn, params: LangevinParams | None = None,
                 generator: torch.Generator | None = None, *, cuda_graph: bool = False, native="auto",
                 reuse_forces: bool = False):
        from lattice_lab.common.switch import check_switch

        self.force_fn = force_fn
        self.params = (params or LangevinParams()).validate()
        self.generator = generator
        self.cuda_graph = bool(cuda_graph)
        self.native = check_switch(native, "native_integrator")
        self._kernel = None  # (state key, LangevinKernel or None) of the last CPU state stepped
        self._needs_grad = bool(getattr(force_fn, "needs_grad", False) or getattr(force_fn, "conservative", False))
        self._into = getattr(force_fn, "forces_into", None)  # (Q, out) -> F, writing into out if it can
        self._spare: torch.Tensor | None = None  # a force buffer of the native steps that nothing outside holds
        self.reuse_forces = bool(reuse_forces)
        self._handed: torch.Tensor | None = None  # with reuse_forces: the buffer last handed out as state.F
        self._noise: torch.Tensor | None = None
        self._graph: tuple[tuple, torch.cuda.CUDAGraph] | None = None  # (state key, one recorded step)

    # -- forces -------------------------------------------------------------------------------
    def forces(self, Q: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """F(Q) in Q's dtype/device, detached. ``out``: a contiguous buffer like ``Q`` that a provider with
        ``forces_into`` (dynamics/forces.py) may write the forces into (the result is then ``out``)."""
        fn, args = (self.force_fn, (Q,)) if out is None else (self._into, (Q, out))
        if self._needs_grad:
            with torch.enable_grad():
                F = fn(*args)
        elif torch.is_grad_enabled():
            with torch.no_grad():
                F = fn(*args)
        else:  # inside step(): already without autograd (entering no_grad again costs ~1 us a step)
            F = fn(*args)
        if F.requires_grad:
            F = F.detach()
        if F.shape != Q.shape:
            raise ConfigError(f"force provider returned shape {tuple(F.shape)} for input {tuple(Q.shape)}")
        if F.dtype != Q.dtype or F.device != Q.device:
            F = F.to(device=Q.device, dtype=Q.dtype)
        return F

    def init_state(self, Q: torch.Tensor, V: torch.Tensor | None = None, step: int = 0) -> LangevinState:
        """A state at positions Q (copied) with velocities V (zero if None); evaluates F(Q) once."""
        Q = Q.detach().clone()
        V = torch.zeros_like(Q) if V is None else V.detach().to(device=Q.device, dtype=Q.dtype).clone()
        if V.shape != Q.shape:
            raise ConfigError(f"velocities have shape {tuple(V.shape)}, positions {tuple(Q.shape)}")
        return LangevinState(Q=Q, V=V, F=self.forces(Q), step=int(step))

    # -- noise --------------------------------------------------------------------------------
    def _draw_noise(self, like: torch.Tensor) -> torch.Tensor:
        buf = self._noise
        if buf is None or buf.shape != like.shape or buf.dtype != like.dtype or buf.device != like.device:
            buf = self._noise = torch.empty_like(like)
        if self.generator is not None and self.generator.device.type != like.device.type:
            raise ConfigError(f"Langevin generator is on {self.generator.device}, state on {like.device}")
        return buf.normal_(generator=self.generator)

    def rng_state(self) -> torch.Tensor | None:
        """The noise generator's state (a uint8 tensor), for checkpoints."""
        return None if self.generator is None else self.generator.get_state()

    def set_rng_state(self, state: torch.Tensor | None) -> None:
        if state is not None:
            if self.generator is None:
                raise ConfigError("cannot restore a Langevin RNG state: the integrator has no generator")
            self.generator.set_state(state.cpu() if state.device.type != "cpu" else state)

    # -- stepping -----------------------------------------------------------------------------
    def step(self, state: LangevinState, n: int = 1) -> LangevinState:
        """Advance ``state`` in place by ``n`` steps (without autograd) and return it. A caller that
        steps in a loop saves ~5 us a call by running the loop under ``torch.no_grad()`` itself, as
        simulate does: ``@torch.no_grad()`` on this method would enter it again at every call."""
        if torch.is_grad_enabled():
            with torch.no_grad():
                return self.step(state, n)
        if self.cuda_graph and state.Q.is_cuda:
            return self._replay(state, int(n))
        kernel = self._native_kernel(state)
        if kernel is not None:
            return self._native_steps(kernel, state, int(n))
        F = state.F
        for _ in range(int(n)):
            F = self._advance(state.Q, state.V, F)
            state.step += 1
        state.F = F
        return state

    def _advance(self, Q: torch.Tensor, V: torch.Tensor, F: torch.Tensor) -> torch.Tensor:
        """One step on Q, V in place, from the force F at Q; returns the force at the new Q."""
        p = self.params
        half = 0.5 * p.dt / p.mass
        a, c = p.ou_decay, p.ou_noise
        V.add_(F, alpha=half)
        Q.add_(V, alpha=p.dt)
        F = self.forces(Q)
        # second half kick fused with the OU decay: V <- a (V + half F) + c xi
        if a != 1.0:
            V.mul_(a)
        V.add_(F, alpha=a * half)
        if c > 0.0:
            V.add_(self._draw_noise(V), alpha=c)
        return F

    # -- native CPU step ---------------------------------------------------------------------
    def noise_source(self, state: LangevinState) -> str:
        """``"philox"`` (native CPU step, noise of (seed, step, site)) or ``"torch"`` (the generator)."""
        return "philox" if self._native_kernel(state) is not None else "torch"

    def _native_kernel(self, state: LangevinState):
        """The native kernel for this state, or None for the torch path (checked once per state)."""
        if self.native is False:
            return None
        if not state.Q.is_cpu:
            if self.native is True:
                raise ConfigError(f"native_integrator=true: the native Langevin step runs on the CPU only "
                                  f"(the state is on {state.Q.device}); use auto or false")
            return None
        # Q and V are updated in place; F is replaced every step by the force call (forces() gives it
        # Q's dtype). A tensor's shape, dtype and layout change only with its data pointer or object.
        Q, V = state.Q, state.V
        key = (id(Q), id(V), Q.data_ptr(), V.data_ptr(), Q.shape, V.shape, Q.dtype, V.dtype)
        if self._kernel is not None and self._kernel[0] == key:
            return self._kernel[1]
        from lattice_lab.native import langevin as native
        from lattice_lab.native.policy import SUPPORTED_DTYPES, build_or_fallback, disabled_by_environment

        kernel = None
        usable = (state.Q.dtype in SUPPORTED_DTYPES and not disabled_by_environment()
                  and all(t.is_contiguous() and t.dtype == state.Q.dtype for t in (state.V, state.F)))
        if usable:
            got = build_or_fallback(self.native, "Langevin step", lambda: native.LangevinKernel(state.Q.dtype),
                                    key="native_integrator")
            kernel = None if isinstance(got, Exception) else got
        if kernel is None and self.native is True and not usable:
            raise ConfigError(f"native_integrator=true: the native Langevin step needs float32/float64 CPU "
                              f"tensors (got {state.Q.dtype}; LATTICE_LAB_NATIVE="
                              f"{os.environ.get('LATTICE_LAB_NATIVE', 'unset')})")
        self._kernel = (key, kernel)
        return kernel

    def _native_steps(self, kernel, state: LangevinState, n: int) -> LangevinState:
        p = self.params
        half = 0.5 * p.dt / p.mass
        a, c = p.ou_decay, p.ou_noise
        seed = self.generator.initial_seed() if self.generator is not None else torch.initial_seed()
        Q, V, F = state.Q, state.V, state.F
        # With a provider that takes out=, the forces go into buffers of the integrator's own: the one
        # kept from the last call (self._spare) and the one each step frees. state.F on entry, and the
        # force handed out as state.F at the end, are never written: a caller may hold them (with
        # reuse_forces the caller lets go of the one handed out, and it is written when it comes back).
        into = self._into is not None
        spare = self._spare if into else None
        if spare is not None and not fits_forces(spare, Q):
            spare = None
        # whether F is one of those buffers: with reuse_forces, the one handed out last time, if still state.F
        mine = into and self.reuse_forces and F is self._handed and fits_forces(F, Q)
        for _ in range(n):
            kernel.drift(Q, V, F, half, p.dt)
            if into:
                if spare is None:
                    spare = torch.empty(Q.shape, dtype=Q.dtype, device=Q.device)  # contiguous
                F_new = self.forces(Q, spare)
                new_mine = F_new is spare
                if new_mine:
                    spare = None
                if mine and spare is None:
                    spare = F  # the previous force: used by the drift above, now free
                F, mine = F_new, new_mine
            else:
                F = self.forces(Q)
            if not F.is_contiguous():
                F, mine = F.contiguous(), False
            state.step += 1
            kernel.kick(V, F, a, a * half, c, seed, state.step)
        state.F = F
        self._spare = spare
        self._handed = F if mine else None
        return state

    # -- CUDA graph ---------------------------------------------------------------------------
    def _replay(self, state: LangevinState, n: int) -> LangevinState:
        key = tuple((t.data_ptr(), tuple(t.shape), t.dtype, t.device) for t in (state.Q, state.V, state.F))
        if self._graph is None or self._graph[0] != key:
            self._graph = None  # release the old recording's memory pool first
            self._graph = (key, self._record(state))
        graph = self._graph[1]
        for _ in range(n):
            graph.replay()
            state.step += 1
        return state

    def _record(self, state: LangevinState) -> torch.cuda.CUDAGraph:
        from lattice_lab.common.cuda_graph import capture

        Q, V, F = state.Q, state.V, state.F
        scratch = [Q.clone(), V.clone(), F.clone()]
        gen = self.generator
        rng = gen.get_state() if gen is not None else torch.cuda.get_rng_state(Q.device)

        def warm_step():
            scratch[2] = self._advance(scratch[0], scratch[1], scratch[2])

        def recorded_step():
            F.copy_(self._advance(Q, V, F))

        def restore_rng():
            if gen is not None:
                gen.set_state(rng)
            else:
                torch.cuda.set_rng_state(rng, Q.device)

        try:
            graph, _ = capture(recorded_step, warmup=lambda: (warm_step(), restore_rng()),
                               generators=[gen] if gen is not None else [])
        except Exception as exc:
            restore_rng()
            raise ConfigError(f"cuda_graph=true: this force provider cannot be recorded as a CUDA graph "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                              "run with cuda_graph=false") from exc
        return graph

    def energy_kinetic(self, state: LangevinState) -> torch.Tensor:
        """Kinetic energy sum_i m v_i^2 / 2 per replica [R]."""
        return 0.5 * self.params.mass * state.V.pow(2).sum(dim=(-2, -1))
