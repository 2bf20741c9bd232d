"""Whole-lattice operations on periodic fields of shape [..., L, L] (dim -2 = x, dim -1 = y).

Site (x, y) has flat index ``s = x * L + y``. Every function works on any batch shape and device.
"""

from __future__ import annotations

import torch


def nn_sum(field: torch.Tensor) -> torch.Tensor:
    """Sum of the four nearest neighbours of every site (periodic)."""
    return (torch.roll(field, 1, -2) + torch.roll(field, -1, -2)
            + torch.roll(field, 1, -1) + torch.roll(field, -1, -1))


def translate(field: torch.Tensor, shift: tuple[int, int]) -> torch.Tensor:
    """Field translated by ``shift``: out[x, y] = field[x - sx, y - sy]."""
    return torch.roll(field, shifts=(int(shift[0]), int(shift[1])), dims=(-2, -1))


def checkerboard(L: int, *, dtype=torch.float64, device=None) -> torch.Tensor:
    """(-1)^(x + y) on an L x L lattice."""
    x = torch.arange(L, device=device)
    return (1 - 2 * ((x[:, None] + x[None, :]) % 2)).to(dtype)


def site_coordinates(L: int, device=None) -> torch.Tensor:
    """Integer coordinates [L, L, 2] of every site."""
    x = torch.arange(L, device=device)
    return torch.stack(torch.meshgrid(x, x, indexing="ij"), dim=-1)


def gather_offsets(field: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Environment values: out[..., x, y, m] = field[..., (x + dx_m) % L, (y + dy_m) % L].

    ``offsets`` is an integer tensor [M, 2]. One gather over the flattened lattice (no Python loop
    over sites). Memory is [..., L, L, M]; for large channel counts prefer a periodic convolution.
    """
    L = field.shape[-1]
    if field.shape[-2] != L:
        raise ValueError(f"field must be square [..., L, L], got {tuple(field.shape)}")
    offsets = torch.as_tensor(offsets, device=field.device, dtype=torch.long)
    coords = site_coordinates(L, device=field.device)  # [L, L, 2]
    nb = (coords[:, :, None, :] + offsets[None, None, :, :]) % L  # [L, L, M, 2]
    flat_idx = (nb[..., 0] * L + nb[..., 1]).reshape(-1)  # [L*L*M]
    flat = field.reshape(*field.shape[:-2], L * L)
    out = flat.index_select(-1, flat_idx)
    return out.reshape(*field.shape[:-2], L, L, offsets.shape[0])
