"""The local environment of a lattice site and its D4 symmetry-adapted (irrep) basis.

The environment of site r is the vector ``env_m(r) = Q(r + d_m)`` over the offsets ``d_m`` with
``|d_m| <= cutoff`` (default sqrt(13): 45 sites in 9 shells, DESIGN.md section 4). A group element g
permutes offsets, ``P(g) e_m = e_{index(g d_m)}``; under ``Q -> g.Q`` the environment at ``g r``
is ``P(g)^T env(r)``. The basis rows ``coeffs[ir]`` satisfy ``coeffs[ir] @ P(g) = rho_ir(g) @
coeffs[ir]``, so the irrep features ``f = coeffs @ env`` obey ``f(g.Q)(g r) = rho(g) f(Q)(r)``.

The basis is built orbit by orbit (the D4 orbits of offsets; for sqrt(13) these are exactly the
shells of equal |d|^2) from the orbit's permutation representation with matrix-element
projectors, so the channels of each irrep are grouped by orbit in order of increasing radius.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from lattice_lab.common.errors import ConfigError
from lattice_lab.symmetry.field_ops import periodic_correlate
from lattice_lab.symmetry.group import D4_ELEMENTS, IRREP_DIM, IRREPS, ORDER, adapted_basis

DEFAULT_CUTOFF = math.sqrt(13.0)


def environment_offsets(cutoff: float = DEFAULT_CUTOFF) -> np.ndarray:
    """Integer offsets ``[M, 2]`` with ``|d| <= cutoff``, sorted by ``|d|^2`` then angle in [0, 2 pi)."""
    cutoff = float(cutoff)
    if not math.isfinite(cutoff) or cutoff < 0:
        raise ConfigError(f"cutoff={cutoff}: need a finite cutoff >= 0")
    R = int(math.floor(cutoff + 1e-9))
    r2max = cutoff * cutoff + 1e-9
    pts = [(x, y) for x in range(-R, R + 1) for y in range(-R, R + 1) if x * x + y * y <= r2max]
    pts.sort(key=lambda p: (p[0] ** 2 + p[1] ** 2, math.atan2(p[1], p[0]) % (2 * math.pi)))
    return np.array(pts, dtype=np.int64).reshape(-1, 2)


def offset_permutations(offsets: np.ndarray) -> np.ndarray:
    """``perm[g, m] = index(g d_m)``; raises if the offsets are not closed under D4."""
    lookup = {tuple(d): m for m, d in enumerate(offsets.tolist())}
    perm = np.empty((ORDER, len(offsets)), dtype=np.int64)
    for g in range(ORDER):
        for m, d in enumerate((offsets @ D4_ELEMENTS[g].T).tolist()):
            if tuple(d) not in lookup:
                raise ValueError("offsets are not closed under D4")
            perm[g, m] = lookup[tuple(d)]
    return perm


class EnvironmentBasis:
    """Orthogonal symmetry-adapted basis of the environment within ``cutoff``.

    Attributes: ``offsets [M, 2]``, ``shell_r2 [M]``, ``orbit [M]`` (orbit index of each offset),
    ``coeffs`` (1-d irreps ``[n_ch, M]``, E ``[n_ch, 2, M]``), ``counts`` (channels per irrep),
    ``channel_shell_r2`` / ``channel_orbit`` (``{irrep: [n_ch]}``: which orbit each channel comes
    from). Channel order: per irrep, by orbit (increasing radius).
    """

    def __init__(self, cutoff: float = DEFAULT_CUTOFF):
        self.cutoff = float(cutoff)
        self.offsets = environment_offsets(self.cutoff)
        self.M = len(self.offsets)
        self.shell_r2 = (self.offsets**2).sum(axis=1)
        self.perm = offset_permutations(self.offsets)
        # D4 orbits, in order of first appearance (offsets are sorted by radius)
        self.orbit = -np.ones(self.M, dtype=np.int64)
        n_orb = 0
        for m in range(self.M):
            if self.orbit[m] < 0:
                self.orbit[np.unique(self.perm[:, m])] = n_orb
                n_orb += 1
        self.n_orbits = n_orb
        rows: dict[str, list[np.ndarray]] = {ir: [] for ir in IRREPS}
        chan_orbit: dict[str, list[int]] = {ir: [] for ir in IRREPS}
        for o in range(n_orb):
            members = np.nonzero(self.orbit == o)[0]
            pos = {int(m): k for k, m in enumerate(members)}
            rep = np.zeros((ORDER, len(members), len(members)))
            for g in range(ORDER):
                for k, m in enumerate(members):
                    rep[g, pos[int(self.perm[g, m])], k] = 1.0
            for ir, C in adapted_basis(rep).items():
                full = np.zeros((C.shape[0], C.shape[1], self.M))
                full[:, :, members] = C
                rows[ir].extend(full)
                chan_orbit[ir].extend([o] * C.shape[0])
        self.coeffs: dict[str, np.ndarray] = {}
        self.channel_orbit: dict[str, np.ndarray] = {}
        self.channel_shell_r2: dict[str, np.ndarray] = {}
        first_member = np.array([np.nonzero(self.orbit == o)[0][0] for o in range(n_orb)])
        for ir in IRREPS:
            C = np.array(rows[ir]).reshape(len(rows[ir]), IRREP_DIM[ir], self.M)
            C[np.abs(C) < 1e-14] = 0.0
            self.coeffs[ir] = C[:, 0, :] if IRREP_DIM[ir] == 1 else C
            self.channel_orbit[ir] = np.array(chan_orbit[ir], dtype=np.int64)
            self.channel_shell_r2[ir] = self.shell_r2[first_member[self.channel_orbit[ir]]]
        self.counts = {ir: int(len(rows[ir])) for ir in IRREPS}
        self.radius = int(np.abs(self.offsets).max()) if self.M else 0
        self.layout = self._layout()
        self._kernel_cache: dict = {}

    # -- matrices -------------------------------------------------------------------------------
    def _layout(self) -> dict[str, slice]:
        out, start = {}, 0
        for ir in IRREPS:
            n = self.counts[ir] * IRREP_DIM[ir]
            out[ir] = slice(start, start + n)
            start += n
        return out

    @property
    def n_channels(self) -> int:
        """Total number of scalar channels (= M)."""
        return sum(self.counts[ir] * IRREP_DIM[ir] for ir in IRREPS)

    def matrix(self) -> np.ndarray:
        """The orthogonal ``[M, M]`` matrix whose rows are all basis vectors, in ``layout`` order
        (1-d irreps A1, A2, B1, B2, then E channel-major: channel 0 comp 0, channel 0 comp 1, ...)."""
        return np.concatenate([self.coeffs[ir].reshape(-1, self.M) for ir in IRREPS], axis=0)

    def permutation_matrices(self) -> np.ndarray:
        """``P(g) [8, M, M]`` with ``P(g) e_m = e_{index(g d_m)}``."""
        P = np.zeros((ORDER, self.M, self.M))
        for g in range(ORDER):
            P[g, self.perm[g], np.arange(self.M)] = 1.0
        return P

    # -- on fields -------------------------------------------------------------------------------
    def kernels(self, dtype=torch.float32, device=None) -> tuple[torch.Tensor, dict[str, slice]]:
        """Conv weights ``[M, 1, K, K]`` (K = 2 radius + 1) and ``layout`` for :func:`periodic_correlate`.

        ``periodic_correlate(Q[:, None], w)[:, c]`` is channel c of ``matrix() @ env`` at every site;
        ``layout[ir]`` is the slice of channels of irrep ``ir`` (E channel-major, component fastest).
        """
        R = self.radius
        K = 2 * R + 1
        w = np.zeros((self.M, 1, K, K))
        mat = self.matrix()
        w[:, 0, self.offsets[:, 0] + R, self.offsets[:, 1] + R] = mat
        return torch.as_tensor(w, dtype=dtype, device=device), dict(self.layout)

    def project_channels(self, Q: torch.Tensor) -> torch.Tensor:
        """All irrep channels ``[B, M, L, L]`` of a field ``Q [B, L, L]`` (one periodic conv2d)."""
        key = (Q.dtype, Q.device)
        if key not in self._kernel_cache:
            self._kernel_cache[key] = self.kernels(Q.dtype, Q.device)[0]
        return periodic_correlate(Q.unsqueeze(1), self._kernel_cache[key])

    def split(self, channels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Channels-last ``[..., M]`` -> ``{ir: [..., n_ch]}`` (1-d) / ``[..., n_ch, 2]`` (E)."""
        out = {}
        for ir in IRREPS:
            x = channels[..., self.layout[ir]]
            out[ir] = x.reshape(*x.shape[:-1], self.counts[ir], 2) if IRREP_DIM[ir] == 2 else x
        return out

    def project(self, Q: torch.Tensor) -> dict[str, torch.Tensor]:
        """Irrep features of every site: ``{ir: [B, L, L, n_ch]}`` (1-d), ``[B, L, L, n_ch, 2]`` (E)."""
        return self.split(self.project_channels(Q).permute(0, 2, 3, 1))
