"""Floating-point operations per lattice site and force evaluation, counted from the architecture.

Convention (as the papers count): a multiply-add is 2 FLOPs; only the dominant terms are counted
(matrix products, neighbour sums, the quadratic products of the ENN); biases, activations,
normalisation and the elastic prior are ignored (O(width) per site).

- ``gnn`` (direct force): per layer ``2 * (2 c_in c_out)`` (self and neighbour matmuls) plus
  ``3 c_in`` adds for the 4-neighbour sum. Paper preset: 21,512,963 FLOP/site (DESIGN.md: ~21 M).
- ``gnn_energy``: forward = ``2 * sum(in * out)`` over every linear map + ``3 * width`` neighbour adds
  per block; a force evaluation is counted as **3 x forward** (the usual convention that a backward
  pass costs twice the forward; for forces only input gradients are needed, so ~2x is a lower bound).
- ``enn``: per layer ``2 * sum_ir aux_ir * out_ir * dim_ir`` (the linear map from the auxiliary layer,
  applied to both E components with shared weights) plus one multiply per component of every
  quadratic product in the auxiliary layer (``(aux_ir - copies_ir) * dim_ir``); the readout is the
  last auxiliary layer -> 1 A1 output.
- ``mlp``: ``2 * sum(in * out)`` over the MLP's linear layers plus the environment projection onto
  the symmetry-adapted basis, ``2 * M * M`` (M = 45 environment sites for r_c = sqrt(13)).
"""

from __future__ import annotations

from torch import nn


def _linear_flops(module: nn.Module) -> int:
    return sum(2 * m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def gnn_flops(widths: list[int]) -> int:
    """Direct-force GNN: sum over layers of 2 * (2 c_in c_out) + 3 c_in (neighbour sum)."""
    return int(sum(4 * a * b + 3 * a for a, b in zip(widths[:-1], widths[1:])))


def energy_gnn_forward_flops(model) -> int:
    """Forward pass of the energy GNN (site energies) per site."""
    width = model.embed.out_features
    return int(_linear_flops(model) + 3 * width * len(model.blocks))


def enn_flops(input_counts: dict[str, int], hidden: list[int]) -> int:
    """ENN per site: auxiliary x outputs x 2 per layer (x dim for E) + the quadratic products."""
    from lattice_lab.models.enn import auxiliary_counts
    from lattice_lab.symmetry.group import IRREP_DIM, IRREPS

    aux = auxiliary_counts(input_counts, hidden)
    layer_in = [input_counts] + [{ir: h for ir in IRREPS} for h in hidden]
    layer_out = [{ir: h for ir in IRREPS} for h in hidden] + [{ir: int(ir == "A1") for ir in IRREPS}]
    total = 0
    for a, cin, cout in zip(aux, layer_in, layer_out):
        for ir in IRREPS:
            d = IRREP_DIM[ir]
            total += 2 * a[ir] * cout[ir] * d  # linear map, both E components
            total += (a[ir] - cin.get(ir, 0)) * d  # the products forming the auxiliary channels
    return int(total)


def mlp_flops(model) -> int:
    """Descriptor MLP per site: 2 * sum(in * out) + the 2 M^2 environment projection."""
    from lattice_lab.symmetry.environment import environment_offsets

    M = len(environment_offsets(model.cutoff))
    return int(_linear_flops(model.net if hasattr(model, "net") else model) + 2 * M * M)


def flops_per_site(model) -> float:
    """FLOPs per lattice site for one force evaluation of ``model`` (see the module docstring)."""
    model = getattr(model, "network", model)  # an ElasticPrior adds ~5 FLOPs/site: negligible
    name = getattr(model, "name", None)
    if hasattr(model, "metadata") and "flops_per_site" in getattr(model, "metadata", {}):
        return float(model.metadata["flops_per_site"])  # an exported force field
    if name == "gnn":
        return float(gnn_flops(model.widths))
    if name == "gnn_energy":
        return float(3 * energy_gnn_forward_flops(model))
    if name == "enn":
        return float(enn_flops(model.input_counts, model.hidden))
    if name == "mlp":
        return float(mlp_flops(model))
    raise NotImplementedError(f"flops_per_site: no FLOP count for model {name!r}")
