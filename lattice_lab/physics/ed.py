"""Exact adiabatic forces of the semiclassical Holstein model by exact diagonalisation (ED).

For every configuration Q the N x N single-particle matrix

    h(Q) = -t A - g diag(Q)          (A: periodic nearest-neighbour adjacency, N = L^2)

is diagonalised once (batched ``torch.linalg.eigh``, float64, CPU or CUDA). With eigenpairs
(eps_n, psi_n) and Fermi occupations f_n = f((eps_n - mu) / T):

    <n_i> = sum_n f_n |psi_n(i)|^2                         computed as (|V|^2) @ f
    F_i   = g (<n_i> - 1/2) - k Q_i - kappa sum_nn Q_j     (Hellmann-Feynman, total force)
    A(Q)  = -T sum_n ln(1 + exp(-(eps_n - mu)/T)) + mu N_e + (g/2) sum_i Q_i + E_el(Q)

Chemical potential (``HolsteinParams.filling``):

* ``canonical``: mu solves sum_n f_n = N_e = N/2 to machine precision (vectorised Newton iteration
  with a bisection safeguard, started at midgap). Then F = -dA/dQ exactly.
* ``midgap``: mu = (eps_{N/2} + eps_{N/2+1}) / 2 (1-based), the electron count is only ~N/2.
* ``temperature == 0``: the lowest N/2 levels are filled (mu at midgap). If the Fermi level is
  degenerate (eps_{N/2} == eps_{N/2+1} within ``1e-10 * max|eps|``), the whole degenerate shell is
  occupied uniformly with the fraction that makes the count exactly N/2; this is the T -> 0 limit
  of the canonical ensemble and makes the density basis independent (e.g. uniform n = 1/2 at Q = 0).

The Fermi function uses ``torch.special.expit`` and the grand potential ``torch.logaddexp``, so
they are safe for any (eps - mu)/T.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from lattice_lab.common.errors import ConfigError
from lattice_lab.common.threads import run_pieces
from lattice_lab.physics.holstein import HolsteinParams, as_params, elastic_energy, elastic_force

_DEGENERACY_RTOL = 1e-10


@dataclass
class EDResult:
    """Output of :meth:`ExactForces.compute` (float64, on the input's device).

    forces, density: ``[B, L, L]``; free_energy, mu: ``[B]``; eigenvalues ``[B, N]`` (ascending)
    when requested. For a single ``[L, L]`` input the batch dim is absent.
    """

    forces: torch.Tensor
    density: torch.Tensor
    free_energy: torch.Tensor
    mu: torch.Tensor
    eigenvalues: torch.Tensor | None = None


def fermi(eps: torch.Tensor, mu: torch.Tensor, temperature: float) -> torch.Tensor:
    """Fermi function f = 1 / (1 + exp((eps - mu)/T)) for ``eps [B, N]``, ``mu [B]`` (T > 0)."""
    return torch.special.expit((mu[..., None] - eps) / temperature)


def solve_mu_canonical(eps: torch.Tensor, n_electrons: float, temperature: float,
                       max_iter: int = 200) -> torch.Tensor:
    """Chemical potential mu [B] with sum_n f((eps_n - mu)/T) = n_electrons, to machine precision.

    ``eps`` is ``[B, N]`` ascending. The count is strictly increasing in mu; below eps_min every
    f < 1/2 and above eps_max every f > 1/2, so [eps_min - 1, eps_max + 1] brackets the root for
    half filling. Newton steps (derivative sum f (1 - f) / T) start at midgap; a step leaving the
    current bracket, or a stalled derivative, is replaced by bisection. All configurations iterate
    together; the loop ends when every one has converged (count error <= a few ulps of N, or the
    bracket has shrunk to the resolution of float64).
    """
    B, N = eps.shape
    T = float(temperature)
    h = N // 2
    lo = eps[:, 0] - 1.0
    hi = eps[:, -1] + 1.0
    mu = 0.5 * (eps[:, h - 1] + eps[:, h]) if 0 < h < N else 0.5 * (lo + hi)
    finfo = torch.finfo(eps.dtype)
    tol_count = 8 * finfo.eps * N
    for _ in range(max_iter):
        f = fermi(eps, mu, T)
        resid = f.sum(-1) - n_electrons
        # shrink the bracket with the sign of the residual
        lo = torch.where(resid < 0, mu, lo)
        hi = torch.where(resid > 0, mu, hi)
        width_ok = (hi - lo) <= 4 * finfo.eps * torch.maximum(mu.abs(), torch.ones_like(mu))
        done = (resid.abs() <= tol_count) | width_ok
        if bool(done.all()):
            break
        deriv = (f * (1.0 - f)).sum(-1) / T
        newton = mu - resid / torch.clamp(deriv, min=finfo.tiny)
        ok = (deriv > 0) & (newton > lo) & (newton < hi) & torch.isfinite(newton)
        mu_next = torch.where(ok, newton, 0.5 * (lo + hi))
        mu = torch.where(done, mu, mu_next)
    return mu


def _zero_temperature_occupations(eps: torch.Tensor, n_electrons: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Occupations [B, N] filling the lowest ``n_electrons`` levels, and mu [B] at midgap.

    A degenerate shell at the Fermi level is occupied uniformly (fractionally) so the count stays
    exactly ``n_electrons`` (see module docstring).
    """
    B, N = eps.shape
    h = n_electrons
    mu = 0.5 * (eps[:, h - 1] + eps[:, h]) if h < N else eps[:, -1] + 1.0
    scale = torch.clamp(eps.abs().amax(-1), min=1.0)
    tol = _DEGENERACY_RTOL * scale
    shell = (eps - mu[:, None]).abs() <= tol[:, None]
    below = eps < (mu - tol)[:, None]
    n_shell = shell.sum(-1)
    n_below = below.sum(-1)
    frac = (h - n_below).to(eps.dtype) / torch.clamp(n_shell, min=1).to(eps.dtype)
    occ = torch.where(shell, frac[:, None], below.to(eps.dtype))
    return occ, mu


def chunk_configurations(N: int, chunk_size: int | None = None) -> int:
    """Configurations of N sites diagonalised at once: ``chunk_size``, or as many as fit ~512 MB of
    3 N x N float64 matrices (at least one)."""
    if chunk_size is not None:
        return max(1, int(chunk_size))
    return max(1, int(512e6 // (3 * 8 * N * N)))


def working_bytes(batch: int, L: int, chunk_size: int | None = None) -> int:
    """Bytes an ED call on ``batch`` configurations of L x L works in: ~3 N^2 float64 (Hamiltonian,
    eigenvectors, a product) per configuration diagonalised at once (:func:`chunk_configurations`), N = L^2.
    A function of the sizes alone, so a run can check its memory before it builds anything."""
    N = int(L) ** 2
    return 3 * 8 * N * N * min(int(batch), chunk_configurations(N, chunk_size))


class ExactForces:
    """ED force provider: ``ExactForces(params)(Q [B, L, L]) -> F [B, L, L]`` (float64).

    ``device`` is where the diagonalisation runs (``"auto"`` picks CUDA when present); results are
    returned on the input's device. ``chunk_size`` bounds how many configurations are diagonalised
    together (memory ~ 3 chunk_size N^2 floats); ``None`` picks it from a ~512 MB budget.
    """

    def __init__(self, params: HolsteinParams | Mapping | None = None, device: str | torch.device = "cpu",
                 chunk_size: int | None = None):
        from lattice_lab.common.device import resolve_device

        self.params = as_params(params)
        self.device = resolve_device(device)
        self.chunk_size = chunk_size
        self._hop: dict[int, torch.Tensor] = {}

    # -- helpers ------------------------------------------------------------------------------
    def _hopping(self, L: int) -> torch.Tensor:
        if L not in self._hop:
            from lattice_lab.physics.holstein import hopping_matrix

            self._hop[L] = hopping_matrix(L, self.params.t, torch.float64, self.device)
        return self._hop[L]

    def _chunk(self, N: int) -> int:
        return chunk_configurations(N, self.chunk_size)

    def working_bytes(self, batch: int, L: int) -> int:
        """:func:`working_bytes` of a call of this engine (its ``chunk_size``)."""
        return working_bytes(batch, L, self.chunk_size)

    def _prepare(self, Q) -> tuple[torch.Tensor, tuple, torch.device]:
        Q = torch.as_tensor(Q)
        if Q.dim() < 2 or Q.shape[-1] != Q.shape[-2]:
            raise ConfigError(f"ED input must have shape [..., L, L], got {tuple(Q.shape)}")
        L = Q.shape[-1]
        if (L * L) % 2:
            raise ConfigError(f"L={L}: half filling needs an even number of sites N = L^2 (use even L)")
        if L < 2:
            raise ConfigError(f"L={L}: the lattice needs L >= 2")
        lead = tuple(Q.shape[:-2])
        return Q.reshape(-1, L, L), lead, Q.device

    # -- core ---------------------------------------------------------------------------------
    def _compute_chunk(self, Q: torch.Tensor, want_eigs: bool):
        """Q: [B, L, L] float64 on self.device -> forces, density, free energy, mu, eigenvalues."""
        p = self.params
        B, L, _ = Q.shape
        N = L * L
        ne = N // 2
        h = self._hopping(L).expand(B, N, N).clone()
        h.diagonal(dim1=-2, dim2=-1).sub_(p.g * Q.reshape(B, N))
        eps, V = torch.linalg.eigh(h)  # one eigendecomposition per configuration
        del h
        T = p.temperature
        if T == 0:
            occ, mu = _zero_temperature_occupations(eps, ne)
            omega = (occ * eps).sum(-1)  # -T ln(1+e^{-x/T}) + mu N_e -> sum of filled levels
        else:
            if p.filling == "canonical":
                mu = solve_mu_canonical(eps, float(ne), T)
            else:
                mu = 0.5 * (eps[:, ne - 1] + eps[:, ne])
            x = (mu[:, None] - eps) / T
            occ = torch.special.expit(x)
            omega = -T * torch.logaddexp(torch.zeros((), dtype=eps.dtype, device=eps.device), x).sum(-1) \
                + mu * ne
        V.mul_(V)  # |psi_n(i)|^2 in place: no extra N x N temporary
        density = torch.bmm(V, occ.unsqueeze(-1)).reshape(B, L, L)
        del V
        forces = p.g * (density - 0.5) + elastic_force(Q, p)
        free = omega + 0.5 * p.g * Q.sum(dim=(-2, -1)) + elastic_energy(Q, p)
        return forces, density, free, mu, (eps if want_eigs else None)

    @torch.no_grad()
    def compute(self, Q, return_eigenvalues: bool = False) -> EDResult:
        """Forces, densities, free energies and chemical potentials of a batch ``[..., L, L]``."""
        Qb, lead, out_device = self._prepare(Q)
        Qb = Qb.to(device=self.device, dtype=torch.float64)
        B, L, _ = Qb.shape
        step = self._chunk(L * L)
        self._hopping(L)  # built once, before any worker thread needs it
        workers = torch.get_num_threads() if Qb.device.type == "cpu" else 1
        if workers > 1 and B >= workers:
            # one piece of configurations per torch thread, each diagonalised with one intra-op thread
            # (common/threads.py): an eigh of a few hundred sites gains little from OpenMP threads,
            # independent configurations scale. Every configuration's result is independent of its
            # batch, so this gives the single-threaded numbers bit for bit.
            step = max(1, min(-(-B // workers), step // workers))
        starts = list(range(0, B, step))
        parts: list = [None] * len(starts)

        def piece(j: int) -> None:
            parts[j] = self._compute_chunk(Qb[starts[j]:starts[j] + step], return_eigenvalues)

        run_pieces([functools.partial(piece, j) for j in range(len(starts))], workers if len(starts) > 1 else 1)
        cat = [torch.cat([pt[j] for pt in parts]) if parts[0][j] is not None else None for j in range(5)]
        F, n, A, mu, eps = cat

        def out(x, tail):
            return None if x is None else x.reshape(lead + tail).to(out_device)

        return EDResult(forces=out(F, (L, L)), density=out(n, (L, L)), free_energy=out(A, ()),
                        mu=out(mu, ()), eigenvalues=out(eps, (L * L,)))

    @torch.no_grad()
    def __call__(self, Q) -> torch.Tensor:
        """Total adiabatic force F = -dA/dQ, float64, same shape and device as ``Q``."""
        return self.compute(Q).forces

    @torch.no_grad()
    def free_energy(self, Q) -> torch.Tensor:
        """Free energy A(Q) per configuration (DESIGN.md section 2)."""
        return self.compute(Q).free_energy

    def __repr__(self) -> str:
        return f"ExactForces({self.params}, device={self.device})"
