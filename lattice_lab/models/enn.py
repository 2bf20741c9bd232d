"""Equivariant neural network (ENN) force field for the square lattice (enn_paper, DESIGN.md section 5).

The environment of every site (offsets within ``cutoff``, default sqrt(13): 45 sites) is projected
on the D4 irrep channels (9 A1, 3 A2, 6 B1, 5 B2, 11 E) by one fixed periodic convolution and
normalised equivariantly (one scale per irrep channel, shared by both E components; a shift only
on A1 channels). Each layer forms the auxiliary layer (copies + every Clebsch-Gordan-coupled
quadratic product) and maps it linearly per irrep to the next hidden widths, followed by an
equivariant amplitude nonlinearity; the last auxiliary layer is read out linearly on A1. The force
(an A1 scalar) is ``out * F_std + F_mean``. Sites are the batch dimension; one environment, no
message passing, so the model is exactly D4- and translation-equivariant and transfers to any L.
"""

from __future__ import annotations

import math

import torch

from lattice_lab.common.errors import ConfigError
from lattice_lab.models.base import ForceField
from lattice_lab.models.layers_equivariant import (
    NORM_EPS,
    EnvironmentProjection,
    IrrepActivation,
    QuadraticIrrepLayer,
    auxiliary_layer_counts,
    force_moments,
)
from lattice_lab.symmetry.group import IRREP_DIM, IRREPS

SITE_CHUNK = 1 << 15  # sites per chunk in forward: bounds peak memory on large lattices


def auxiliary_counts(input_counts: dict[str, int], hidden: list[int]) -> list[dict[str, int]]:
    """Auxiliary-layer channel counts per irrep for every layer (enn_paper Table I).

    ``[aux_1, ..., aux_{len(hidden)+1}]``: aux_1 is built from ``input_counts``, aux_{l+1} from
    hidden layer l (``hidden[l-1]`` channels of every irrep); the last feeds the A1 readout.
    """
    out = [auxiliary_layer_counts(input_counts)]
    for h in hidden:
        out.append(auxiliary_layer_counts({ir: int(h) for ir in IRREPS}))
    return out


def _check_hidden(hidden) -> list[int]:
    try:
        widths = [int(h) for h in hidden]
    except (TypeError, ValueError):
        raise ConfigError(f"model.hidden={hidden!r}: expected a list of positive integers") from None
    if not widths or any(h <= 0 for h in widths) or any(float(h) != float(g) for h, g in zip(widths, hidden)):
        raise ConfigError(f"model.hidden={list(hidden)!r}: expected a non-empty list of positive integers")
    return widths


class ENN(ForceField):
    """D4-equivariant network on irrep features of the local environment (direct force model)."""

    name = "enn"
    conservative = False

    def __init__(self, hamiltonian: dict, cutoff: float = math.sqrt(13.0), hidden: list[int] = (32, 8, 4),
                 activation: str = "gate"):
        cutoff = float(cutoff)
        if not math.isfinite(cutoff) or cutoff < 1.0:
            raise ConfigError(f"model.cutoff={cutoff}: need a finite cutoff >= 1 (nearest neighbours)")
        widths = _check_hidden(hidden)
        proj = EnvironmentProjection(cutoff)
        # receptive field = largest |dx| or |dy| of an environment offset (= floor(cutoff)): the
        # periodic window never overlaps itself when L >= 2 * receptive_field + 1
        super().__init__(hamiltonian, cutoff, receptive_field=proj.basis.radius)
        self.hidden = widths
        self.activation = activation
        self.proj = proj
        counts = proj.counts
        self.input_counts = counts
        self.aux_counts = auxiliary_counts(counts, self.hidden)
        layers, acts = [], []
        prev = counts
        for h in self.hidden:
            nxt = {ir: h for ir in IRREPS}
            layers.append(QuadraticIrrepLayer(prev, nxt))
            acts.append(IrrepActivation(nxt, activation))
            prev = nxt
        self.layers = torch.nn.ModuleList(layers)
        self.acts = torch.nn.ModuleList(acts)
        self.readout = QuadraticIrrepLayer(prev, {"A1": 1})
        # equivariant input normalisation and output scale (fit_normalization)
        for ir in IRREPS:
            self.register_buffer(f"in_scale_{ir}", torch.ones(counts[ir]))
        self.register_buffer("in_shift_A1", torch.zeros(counts["A1"]))
        self.register_buffer("out_scale", torch.tensor(1.0))
        self.register_buffer("out_shift", torch.tensor(0.0))

    # -- normalisation -----------------------------------------------------------------------------
    def _flat_norm(self) -> tuple[torch.Tensor, torch.Tensor]:
        scale = torch.cat([getattr(self, f"in_scale_{ir}").repeat_interleave(IRREP_DIM[ir]) for ir in IRREPS])
        shift = torch.cat([self.in_shift_A1, scale.new_zeros(scale.shape[0] - self.in_shift_A1.shape[0])])
        return shift, scale

    @torch.no_grad()
    def fit_normalization(self, Q: torch.Tensor, F: torch.Tensor) -> None:
        """Set the equivariant input normalisation and the force scale/shift from training data.

        A1 channel c: shift = mean, scale = sqrt(var + eps); A2, B1, B2: scale = sqrt(<y^2> + eps)
        (no shift: a shift would break the sign flips); E: scale = sqrt(<|v|^2>/2 + eps), shared by
        both components. Force: F = out * std(F) + mean(F) (allowed: the force is an A1 scalar).
        """
        mean, sq = self.proj.moments(torch.as_tensor(Q), device=self.out_scale.device)
        layout = self.proj.layout
        for ir in IRREPS:
            m, s = mean[layout[ir]], sq[layout[ir]]
            if ir == "A1":
                self.in_shift_A1.copy_(m)
                var = s - m * m
            elif ir == "E":
                var = s.view(-1, 2).mean(-1)
            else:
                var = s
            getattr(self, f"in_scale_{ir}").copy_(torch.sqrt(var.clamp_min(0) + NORM_EPS))
        f_mean, f_std = force_moments(F)
        self.out_shift.fill_(f_mean)
        self.out_scale.fill_(f_std)

    # -- forward -----------------------------------------------------------------------------------
    def site_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised irrep channels ``[N, M]`` -> network output ``[N]`` (before the force scale)."""
        feats = self.proj.split(x)
        for layer, act in zip(self.layers, self.acts):
            feats = act(layer(feats))
        return self.readout(feats)["A1"][:, 0, 0]

    def forward(self, Q: torch.Tensor) -> torch.Tensor:
        self.check_input(Q)
        B, L, _ = Q.shape
        shift, scale = self._flat_norm()
        x = self.proj(Q, shift, scale)  # [B*L*L, M]
        y = torch.cat([self.site_features(x[s:s + SITE_CHUNK]) for s in range(0, x.shape[0], SITE_CHUNK)])
        return y.view(B, L, L) * self.out_scale.to(y.dtype) + self.out_shift.to(y.dtype)
