"""D4-equivariant building blocks for irrep-valued features on lattice sites.

Features of one layer are a dict ``{irrep: x [N, c, d]}`` (N sites as the batch dim, c channels,
d = 1 for A1, A2, B1, B2 and d = 2 for E). A :class:`QuadraticIrrepLayer` implements one layer of
the equivariant network (enn_paper, DESIGN.md section 5):

    auxiliary = copies of the input features
              + every symmetry-allowed product of two features coupled with Clebsch-Gordan
                coefficients (same irrep: pairs i < j only; E x E -> A1, A2, B1, B2 over i < j;
                1-d x E -> E and distinct 1-d irreps over all pairs),
    output_o  = W_o^copy x_o + sum_blocks bilinear_{a b -> o}(x_a, x_b) (+ bias for A1),

with one weight per (auxiliary channel, output channel), shared by both components of E. The
auxiliary layer is never materialised: each (a, b -> o) block is the bilinear form
``y[n, k, g] = sum_{i j a b} W[i, j, k] C[g, a, b] x_a[n, i, a] x_b[n, j, b]``, evaluated as one
matmul per left irrep (``x_a @ W.reshape(c_a, c_b * out)``, all blocks with the same left irrep
concatenated) followed by a batched contraction with ``x_b``. Same-irrep blocks store only the
strictly upper-triangular weights, so parameter counts equal (auxiliary count) x (output width).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lattice_lab.common.errors import ConfigError
from lattice_lab.symmetry.clebsch_gordan import clebsch_gordan, product_decomposition
from lattice_lab.symmetry.group import IRREP_DIM, IRREPS

NORM_EPS = 1e-8  # guards every vector norm (gradient finite at v = 0)
ACTIVATIONS = ("gate", "tanh", "authors")


def product_blocks() -> list[tuple[str, str, str]]:
    """All (a, b, out) with a <= b in ``IRREPS`` order and ``out`` in ``a x b``."""
    return [(a, b, o) for ia, a in enumerate(IRREPS) for b in IRREPS[ia:] for o in product_decomposition(a, b)]


def n_pairs(a: str, b: str, counts: dict[str, int]) -> int:
    """Number of channel pairs feeding a product block (i < j for the same irrep)."""
    ca, cb = counts.get(a, 0), counts.get(b, 0)
    return ca * (ca - 1) // 2 if a == b else ca * cb


def auxiliary_layer_counts(counts: dict[str, int]) -> dict[str, int]:
    """Channels per irrep of the auxiliary layer built from features with ``counts``."""
    aux = {ir: int(counts.get(ir, 0)) for ir in IRREPS}
    for a, b, o in product_blocks():
        aux[o] += n_pairs(a, b, counts)
    return aux


class QuadraticIrrepLayer(nn.Module):
    """Copies + CG-coupled quadratic products, then one linear map per irrep (bias on A1 only)."""

    def __init__(self, in_counts: dict[str, int], out_counts: dict[str, int]):
        super().__init__()
        self.in_counts = {ir: int(in_counts.get(ir, 0)) for ir in IRREPS}
        self.out_counts = {ir: int(out_counts.get(ir, 0)) for ir in IRREPS}
        aux = auxiliary_layer_counts(self.in_counts)
        self.copy = nn.ParameterDict()
        for o in IRREPS:
            if self.out_counts[o] and self.in_counts[o]:
                self.copy[o] = nn.Parameter(torch.randn(self.in_counts[o], self.out_counts[o]) / math.sqrt(aux[o]))
        self.blocks: list[tuple[str, str, str]] = []
        self._cg_np: list = []
        self._cg_cache: dict = {}
        self.weights = nn.ParameterList()
        for k, (a, b, o) in enumerate(
                [blk for blk in product_blocks() if self.out_counts[blk[2]] and n_pairs(blk[0], blk[1], self.in_counts)]):
            self.blocks.append((a, b, o))
            shape = (n_pairs(a, b, self.in_counts),) if a == b else (self.in_counts[a], self.in_counts[b])
            self.weights.append(nn.Parameter(torch.randn(*shape, self.out_counts[o]) / math.sqrt(aux[o])))
            self._cg_np.append(clebsch_gordan(a, b)[o])  # float64; cast per dtype in cg()
            if a == b:
                iu = torch.triu_indices(self.in_counts[a], self.in_counts[a], offset=1)
                self.register_buffer(f"triu{k}", iu, persistent=False)
        self.bias = nn.Parameter(torch.zeros(self.out_counts["A1"])) if self.out_counts["A1"] else None
        self.left_groups: dict[str, list[int]] = {}
        for k, (a, _, _) in enumerate(self.blocks):
            self.left_groups.setdefault(a, []).append(k)

    def cg(self, k: int, like: torch.Tensor) -> torch.Tensor:
        """Clebsch-Gordan tensor of block k in the dtype/device of ``like`` (built from float64)."""
        key = (k, like.dtype, like.device)
        if key not in self._cg_cache:
            self._cg_cache[key] = torch.as_tensor(self._cg_np[k], dtype=like.dtype, device=like.device)
        return self._cg_cache[key]

    def dense_weight(self, k: int) -> torch.Tensor:
        """Weights of block k as ``[c_a, c_b, out]`` (zero on and below the diagonal for a == b)."""
        a, b, o = self.blocks[k]
        W = self.weights[k]
        if a != b:
            return W
        c = self.in_counts[a]
        iu = getattr(self, f"triu{k}")
        dense = W.new_zeros(c, c, self.out_counts[o])
        return dense.index_put((iu[0], iu[1]), W)

    def forward(self, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        N = next(iter(x.values())).shape[0]
        acc: dict[str, list[torch.Tensor]] = {o: [] for o in IRREPS if self.out_counts[o]}
        for o, W in self.copy.items():
            d = x[o].shape[2]
            acc[o].append((x[o].transpose(1, 2).reshape(N * d, -1) @ W).view(N, d, -1))  # [N, d, out]
        for a, ks in self.left_groups.items():
            widths = [self.in_counts[self.blocks[k][1]] * self.out_counts[self.blocks[k][2]] for k in ks]
            Wa = torch.cat([self.dense_weight(k).reshape(self.in_counts[a], w) for k, w in zip(ks, widths)], 1)
            d_a = x[a].shape[2]  # one matmul per left irrep: [N * d_a, c_a] @ [c_a, sum widths]
            T = (x[a].transpose(1, 2).reshape(N * d_a, -1) @ Wa).view(N, d_a, -1)
            off = 0
            for k, w in zip(ks, widths):
                _, b, o = self.blocks[k]
                Tk = T[..., off:off + w].unflatten(-1, (self.in_counts[b], self.out_counts[o]))  # [N, da, cb, out]
                off += w
                C = self.cg(k, x[b])  # [d_o, d_a, d_b]
                d_o, d_a, d_b = C.shape
                if C.numel() == 1:  # 1-d x 1-d: the CG coefficient is +-1
                    z = (x[b] * C.reshape(())).transpose(1, 2)[:, None]  # [N, 1, 1, c_b]
                else:  # z[n, g, a, j] = sum_b C[g, a, b] x_b[n, j, b], one small mm
                    z = (x[b].reshape(-1, d_b) @ C.permute(2, 0, 1).reshape(d_b, d_o * d_a))
                    z = z.view(N, -1, d_o, d_a).permute(0, 2, 3, 1)
                acc[o].append(torch.einsum("ngaj,najk->ngk", z, Tk))  # per-site contraction: one bmm
        out = {}
        for o, terms in acc.items():
            y = terms[0] if terms else x[next(iter(x))].new_zeros(N, IRREP_DIM[o], self.out_counts[o])
            for t in terms[1:]:
                y = y + t
            if o == "A1" and self.bias is not None:
                y = y + self.bias
            out[o] = y.transpose(1, 2)  # [N, out, d]
        return out


class IrrepActivation(nn.Module):
    """Equivariant amplitude nonlinearity on ``{irrep: [N, c, d]}``.

    ``gate`` (default): A1 -> SiLU(y); A2, B1, B2 -> y * sigmoid(|y| + b) (odd, so it commutes with
    the sign flips of a 1-d irrep, and continuous); E -> v * sigmoid(||v|| + b) with
    ||v|| = sqrt(v.v + eps) (commutes with the orthogonal E matrices). ``authors``: the authors'
    sign(y) * sigmoid(|y| + b) for every 1-d irrep (A1 included) and the same norm gate for E; it is
    equivariant but jumps by 2 sigmoid(b) at y = 0, so the predicted force is a discontinuous
    function of Q (bad for Langevin dynamics and for gradient-based training), hence not the default.
    ``tanh``: bounded and smooth, no parameters: tanh(y) for every 1-d irrep (odd) and
    v * tanh(||v||) / ||v|| for E. Bounded hidden features keep the quadratic layers from growing
    like a high-degree polynomial on inputs far outside the training distribution.
    """

    def __init__(self, counts: dict[str, int], kind: str = "gate"):
        super().__init__()
        if kind not in ACTIVATIONS:
            raise ConfigError(f"model.activation={kind!r}: expected one of {list(ACTIVATIONS)}")
        self.kind = kind
        gated = [ir for ir in IRREPS if counts.get(ir, 0) and (ir != "A1" or kind == "authors") and kind != "tanh"]
        self.gate_bias = nn.ParameterDict({ir: nn.Parameter(torch.zeros(counts[ir])) for ir in gated})

    def forward(self, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for ir, y in x.items():
            if self.kind == "tanh":
                if ir == "E":
                    norm = torch.sqrt((y * y).sum(-1, keepdim=True) + NORM_EPS)
                    out[ir] = y * (torch.tanh(norm) / norm)
                else:
                    out[ir] = torch.tanh(y)
            elif ir == "E":
                norm = torch.sqrt((y * y).sum(-1, keepdim=True) + NORM_EPS)
                out[ir] = y * torch.sigmoid(norm + self.gate_bias[ir][:, None])
            elif ir == "A1" and self.kind == "gate":
                out[ir] = F.silu(y)
            elif self.kind == "authors":
                out[ir] = torch.sign(y) * torch.sigmoid(y.abs() + self.gate_bias[ir][:, None])
            else:
                out[ir] = y * torch.sigmoid(y.abs() + self.gate_bias[ir][:, None])
        return out


class EnvironmentProjection(nn.Module):
    """Q [B, L, L] -> all irrep channels of every site's environment, channels last ``[B*L*L, M]``.

    One periodic ``conv2d`` with the fixed kernels of :class:`~lattice_lab.symmetry.EnvironmentBasis`
    (built from a float64 master copy in the dtype / on the device of the input). An optional per-channel
    affine map ``(x - shift) / scale`` is folded into the kernel and a conv bias.
    """

    def __init__(self, cutoff: float):
        super().__init__()
        from lattice_lab.symmetry.environment import EnvironmentBasis

        self.basis = EnvironmentBasis(cutoff)
        self.layout = self.basis.layout
        K = 2 * self.basis.radius + 1
        self.kernel_np = np.zeros((self.basis.M, 1, K, K))  # float64 master copy
        self.kernel_np[:] = self.basis.kernels(torch.float64)[0].numpy()
        self._kernel_cache: dict = {}

    def kernel(self, dtype: torch.dtype, device) -> torch.Tensor:
        """Conv weights ``[M, 1, K, K]`` in ``dtype`` on ``device`` (exactly rounded from float64)."""
        key = (dtype, torch.device(device))
        if key not in self._kernel_cache:
            self._kernel_cache[key] = torch.as_tensor(self.kernel_np, dtype=dtype, device=device)
        return self._kernel_cache[key]

    @property
    def counts(self) -> dict[str, int]:
        return dict(self.basis.counts)

    def forward(self, Q: torch.Tensor, shift: torch.Tensor | None = None,
                scale: torch.Tensor | None = None) -> torch.Tensor:
        from lattice_lab.symmetry.field_ops import periodic_pad

        w = self.kernel(Q.dtype, Q.device)
        bias = None
        if scale is not None:
            w = w / scale.to(Q.dtype)[:, None, None, None]
        if shift is not None:
            bias = -shift.to(Q.dtype) / (scale.to(Q.dtype) if scale is not None else 1.0)
        x = F.conv2d(periodic_pad(Q.unsqueeze(1), w.shape[-1] // 2), w, bias)  # [B, M, L, L]
        return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])

    def split(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``[N, M]`` -> ``{irrep: [N, c, d]}`` (views)."""
        return {ir: x[:, self.layout[ir]].reshape(x.shape[0], self.basis.counts[ir], IRREP_DIM[ir])
                for ir in IRREPS if self.basis.counts[ir]}

    @torch.no_grad()
    def moments(self, Q: torch.Tensor, chunk: int = 16, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel mean and mean square ``[M]`` (float64) over all sites of ``Q [C, L, L]``."""
        Q = torch.as_tensor(Q)
        dev = device if device is not None else Q.device
        s1 = torch.zeros(self.basis.M, dtype=torch.float64, device=dev)
        s2 = torch.zeros_like(s1)
        n = 0
        for start in range(0, Q.shape[0], chunk):
            x = self(Q[start:start + chunk].to(device=dev, dtype=torch.float64))
            s1 += x.sum(0)
            s2 += (x * x).sum(0)
            n += x.shape[0]
        return s1 / n, s2 / n


def force_moments(F_: torch.Tensor) -> tuple[float, float]:
    """Mean and standard deviation (epsilon-guarded) of a force dataset, in float64."""
    F_ = torch.as_tensor(F_).to(torch.float64)
    mean = float(F_.mean())
    std = float(torch.sqrt(F_.var(unbiased=False) + NORM_EPS))
    return mean, std
