"""D4-invariant descriptor of a site's environment (Behler-Parrinello-style baseline, gnn_paper Sec. III).

From the irrep coefficients of the environment (:class:`~lattice_lab.symmetry.EnvironmentBasis`,
default cutoff sqrt(13): 9 A1, 3 A2, 6 B1, 5 B2, 11 E channels) the descriptor keeps, per site:

- the A1 coefficients themselves (already invariant),
- the amplitude of every A2, B1, B2 coefficient and of every E doublet (power spectrum),
  ``sqrt(y^2 + eps_n)`` / ``sqrt(|v|^2 + eps_n)``,
- the relative phase of every A2, B1, B2 coefficient and every E doublet with respect to reference
  coefficients of the same irrep taken from one reference shell (default r^2 = 5, the first 8-site
  shell: one A2, one B1, one B2 and two E channels): ``y y_ref / (|y_ref| + eps)`` and, for E,
  ``v . r_k / (|r_k| + eps)`` for both E references k = 1, 2.

Each term is a product of two coefficients of the same irrep (an invariant) divided by an invariant,
so the descriptor is exactly D4-invariant; the ``eps`` in the denominator makes it continuous where
a reference vanishes (the value goes to 0 there). For sqrt(13) it has 9 + 2 * 14 + 3 * 11 = 70 features.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from lattice_lab.common.errors import ConfigError
from lattice_lab.models.layers_equivariant import NORM_EPS, EnvironmentProjection

ONE_D_NON_TRIVIAL = ("A2", "B1", "B2")


class D4Descriptor(nn.Module):
    """``Q [B, L, L]`` -> invariant features ``[B*L*L, n_features]`` (channels last, sites flattened)."""

    def __init__(self, cutoff: float, reference_shell_r2: int = 5, phase_eps: float = 1e-2):
        super().__init__()
        if isinstance(phase_eps, bool) or not isinstance(phase_eps, (int, float)) or not 0 < phase_eps < math.inf:
            raise ConfigError(f"model.phase_eps={phase_eps!r}: need a positive epsilon")
        if isinstance(reference_shell_r2, bool) or not isinstance(reference_shell_r2, (int, np.integer)):
            raise ConfigError(f"model.reference_shell_r2={reference_shell_r2!r}: expected the integer |r|^2 of an 8-site "
                              "shell, e.g. 5")
        self.proj = EnvironmentProjection(cutoff)
        basis = self.proj.basis
        self.reference_shell_r2 = int(reference_shell_r2)
        self.phase_eps = float(phase_eps)
        orbits = {int(o) for o in basis.orbit[basis.shell_r2 == self.reference_shell_r2]}
        need = {"A2": 1, "B1": 1, "B2": 1, "E": 2}
        ref = {ir: [int(c) for c in (basis.channel_shell_r2[ir] == self.reference_shell_r2).nonzero()[0]]
               for ir in need}
        if len(orbits) != 1 or any(len(ref[ir]) != n for ir, n in need.items()):
            raise ConfigError(
                f"model.reference_shell_r2={reference_shell_r2}: need one 8-site shell |r|^2 inside the cutoff "
                f"{basis.cutoff:.4g} (shells: {sorted(set(basis.shell_r2.tolist()))}; 8-site shells work, e.g. 5)")
        self.ref = ref
        c = basis.counts
        self.counts = c
        self.n_features = c["A1"] + 2 * sum(c[ir] for ir in ONE_D_NON_TRIVIAL) + 3 * c["E"]
        names = [f"A1[{i}]" for i in range(c["A1"])]
        for ir in ONE_D_NON_TRIVIAL:
            names += [f"|{ir}[{i}]|" for i in range(c[ir])] + [f"{ir}[{i}].ref" for i in range(c[ir])]
        names += [f"|E[{i}]|" for i in range(c["E"])]
        names += [f"E[{i}].ref{k}" for i in range(c["E"]) for k in (1, 2)]
        self.feature_names = names
        # plain-int channel layout for the TorchScript-compatible features()
        self.channel_start = {ir: int(basis.layout[ir].start) for ir in c}
        self.channel_count = {ir: int(n) for ir, n in c.items()}
        self.register_buffer("_ref_e", torch.tensor(ref["E"], dtype=torch.long), persistent=False)
        self.norm_eps = NORM_EPS  # instance attributes: TorchScript cannot read global floats / tuples
        self.one_d_irreps = list(ONE_D_NON_TRIVIAL)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Irrep channels ``[N, M]`` (basis layout) -> invariant features ``[N, n_features]``."""
        eps = self.phase_eps
        n = x.shape[0]
        s, c = self.channel_start["A1"], self.channel_count["A1"]
        parts = [x[:, s:s + c]]
        for ir in self.one_d_irreps:
            s, c = self.channel_start[ir], self.channel_count[ir]
            y = x[:, s:s + c]  # [N, c]
            k = self.ref[ir][0]
            y_ref = y[:, k:k + 1]  # [N, 1]
            parts.append(torch.sqrt(y * y + self.norm_eps))
            parts.append(y * y_ref / (torch.sqrt(y_ref * y_ref + self.norm_eps) + eps))
        s, c = self.channel_start["E"], self.channel_count["E"]
        v = x[:, s:s + 2 * c].reshape(n, c, 2)  # [N, c, 2]
        parts.append(torch.sqrt((v * v).sum(-1) + self.norm_eps))
        r = v.index_select(1, self._ref_e)  # [N, 2 refs, 2 comps]
        r_norm = torch.sqrt((r * r).sum(-1) + self.norm_eps) + eps  # [N, 2]
        phases = torch.einsum("nca,nka->nck", v, r) / r_norm[:, None, :]  # [N, c, 2 refs]
        parts.append(phases.reshape(v.shape[0], -1))
        return torch.cat(parts, dim=1)

    def forward(self, Q: torch.Tensor) -> torch.Tensor:
        return self.features(self.proj.project(Q))
