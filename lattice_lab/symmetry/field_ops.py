"""D4 acting on periodic lattice fields, and periodic cross-correlation with small kernels.

A group element ``g`` acts on a field as ``(g.Q)(r) = Q(g^-1 r mod L)`` with the origin at site
(0, 0) (docs/ARCHITECTURE.md). Both operations are exact index permutations / whole-lattice
convolutions: any dtype, any device, differentiable.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from lattice_lab.symmetry.group import D4_ELEMENTS, ORDER, inverse


@lru_cache(maxsize=64)
def _source_index(i: int, L: int) -> np.ndarray:
    """Flat index of ``g_i^-1 r mod L`` for every site r (flat order s = x * L + y)."""
    ginv = D4_ELEMENTS[inverse(i)]
    x, y = np.meshgrid(np.arange(L), np.arange(L), indexing="ij")
    r = np.stack([x.ravel(), y.ravel()])  # [2, N]
    src = (ginv @ r) % L
    return src[0] * L + src[1]


def apply_group_element(field: torch.Tensor, i: int) -> torch.Tensor:
    """``(g_i.Q)(r) = Q(g_i^-1 r mod L)`` for a field ``[..., L, L]`` (exact permutation of sites)."""
    L = field.shape[-1]
    if field.dim() < 2 or field.shape[-2] != L:
        raise ValueError(f"field must be [..., L, L], got {tuple(field.shape)}")
    if not 0 <= int(i) < ORDER:
        raise ValueError(f"group element index {i} not in 0..7")
    idx = torch.as_tensor(_source_index(int(i), L), device=field.device)
    flat = field.reshape(*field.shape[:-2], L * L)
    return flat.index_select(-1, idx).reshape(field.shape)


def all_transforms(field: torch.Tensor) -> torch.Tensor:
    """All eight images ``[8, ...]`` of a field ``[..., L, L]`` (index = element of ``D4_ELEMENTS``)."""
    return torch.stack([apply_group_element(field, i) for i in range(ORDER)])


def periodic_pad(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Circularly pad the last two dims by ``pad`` on each side (works for pad > L too)."""
    if pad == 0:
        return x
    L = x.shape[-1]
    if pad <= L and x.dim() == 4:
        return F.pad(x, (pad, pad, pad, pad), mode="circular")
    return periodic_band(x, 0, L, pad)


def ring_index(L: int, pad: int, device: torch.device) -> torch.Tensor:
    """Periodic indices ``-pad, ..., L - 1 + pad`` (mod L): row or column ``k`` of a lattice padded by
    ``pad`` on each side is row or column ``ring_index(L, pad)[k]`` of the lattice."""
    return torch.arange(-pad, L + pad, device=device) % L


def periodic_band(x: torch.Tensor, r0: int, r1: int, pad: int) -> torch.Tensor:
    """Rows ``r0 - pad .. r1 + pad`` (periodic) of ``x [..., L, L]``, every row circularly padded by
    ``pad`` columns: ``[..., r1 - r0 + 2 pad, L + 2 pad]``, the same values as
    ``periodic_pad(x, pad)[..., r0 : r1 + 2 pad, :]`` without padding the whole lattice."""
    idx = ring_index(x.shape[-1], pad, x.device)
    return x.index_select(-2, idx[r0:r1 + 2 * pad]).index_select(-1, idx)


def periodic_correlate(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Periodic cross-correlation ``out[b, c, r] = sum_{c', d} weight[c, c', R + d] x[b, c', r + d]``.

    ``x [B, C_in, L, L]``, ``weight [C_out, C_in, K, K]`` with odd ``K = 2R + 1`` (the kernel
    centre is offset d = (0, 0); dim -2 of the kernel is dx, dim -1 is dy). One ``conv2d`` call.
    """
    K = weight.shape[-1]
    if K % 2 != 1 or weight.shape[-2] != K:
        raise ValueError(f"kernel must be square with odd size, got {tuple(weight.shape)}")
    return F.conv2d(periodic_pad(x, K // 2), weight)
