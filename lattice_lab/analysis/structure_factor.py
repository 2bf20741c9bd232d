"""Structure factor of the density and the CDW domain size (DESIGN.md section 6, enn_paper).

Normalisation (per configuration; leading dims are kept, average over replicas yourself):

    n(k) = sum_r (n_r - nbar) exp(-i k.r),   S(k) = |n(k)|^2 / N,   k = 2 pi (m_x, m_y) / L

array index (m_x, m_y) in 0..L-1, so k in [0, 2pi) and, for even L, Q = (pi, pi) sits at index
(L/2, L/2) - the centre of the array. ``subtract_mean=True`` (default) removes the site mean nbar,
which only sets S(k = 0) = 0 and leaves every other k unchanged (half filling: nbar = 1/2). With
this normalisation sum_k S(k) = sum_r (n_r - nbar)^2 (Parseval); a perfect checkerboard
n = 1/2 + (1/2)(-1)^(x+y) has S(Q) = N/4 and S = 0 elsewhere.

Domain size (enn_paper):  L(t) = sum_k S(k) / sum_{k != Q} S(k) |k - Q|,
with |k - Q| the periodic (wrapped into [-pi, pi)^2) distance in the Brillouin zone in radians per
lattice spacing, so L is in lattice spacings, and a single modulation of wavelength lambda
lattice spacings around Q (|k - Q| = 2 pi / lambda) gives L = lambda / (2 pi). The k = Q term is 0
in the denominator; if all weight is at Q (a single perfect domain) L = +inf; a field with no
fluctuations at all gives NaN. Only ratios of L matter for exponents and collapses.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from lattice_lab.analysis.correlation import as_field


def k_values(L: int) -> np.ndarray:
    """Wave numbers 2 pi m / L, m = 0..L-1 (radians per lattice spacing), matching the FFT index."""
    return 2 * np.pi * np.arange(L) / L


def distance_from_Q(L: int) -> np.ndarray:
    """|k - Q| [L, L] for Q = (pi, pi), each component wrapped into [-pi, pi)."""
    k = k_values(L)
    dk = k - np.pi  # k in [0, 2pi) -> k - pi already lies in [-pi, pi)
    return np.sqrt(dk[:, None] ** 2 + dk[None, :] ** 2)


def structure_factor_t(n: torch.Tensor, subtract_mean: bool = True) -> torch.Tensor:
    N = n.shape[-1] * n.shape[-2]
    if subtract_mean:
        n = n - n.mean(dim=(-2, -1), keepdim=True)
    return torch.fft.fft2(n).abs().square() / N


def structure_factor(n, subtract_mean: bool = True, device=None) -> np.ndarray:
    """S(k) = |FFT(n - nbar)|^2 / N per configuration, [..., L, L] indexed like ``k_values``."""
    return structure_factor_t(as_field(n, device), subtract_mean).cpu().numpy()


def cdw_peak(S) -> np.ndarray:
    """S(Q = (pi, pi)) per configuration (even L; for odd L Q is not on the k grid)."""
    S = np.asarray(S.detach().cpu() if isinstance(S, torch.Tensor) else S)
    L = S.shape[-1]
    if L % 2:
        raise ValueError(f"Q = (pi, pi) is on the k grid only for even L, got L = {L}")
    return S[..., L // 2, L // 2]


def domain_size_t(S: torch.Tensor) -> torch.Tensor:
    dq = torch.as_tensor(distance_from_Q(S.shape[-1]), dtype=S.dtype, device=S.device)
    num = S.sum(dim=(-2, -1))
    den = (S * dq).sum(dim=(-2, -1))
    inf = torch.full_like(num, math.inf)
    nan = torch.full_like(num, math.nan)
    safe = torch.where(den > 0, den, torch.ones_like(den))
    return torch.where(den > 0, num / safe, torch.where(num > 0, inf, nan))


def domain_size(S) -> np.ndarray:
    """L = sum_k S(k) / sum_k S(k)|k - Q| per configuration (lattice spacings; see module doc)."""
    return domain_size_t(torch.as_tensor(S, dtype=torch.float64)).cpu().numpy()


def circular_bins(L: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shells around Q of width 2 pi / L: returns (index [L*L] (nq = excluded), q [nq], counts [nq]).

    Shell m holds the k with round(|k - Q| L / 2pi) = m, m = 0..L//2 (|k - Q| <= pi); its q is the
    mean |k - Q| of its members.
    """
    dq = distance_from_Q(L).reshape(-1)
    m = np.floor(dq * L / (2 * np.pi) + 0.5).astype(np.int64)
    inside = m <= L // 2
    values, inv = np.unique(m[inside], return_inverse=True)  # drops empty shells (odd L)
    index = np.full(L * L, len(values), dtype=np.int64)
    index[inside] = inv
    counts = np.bincount(inv, minlength=len(values))
    q = np.bincount(inv, weights=dq[inside], minlength=len(values)) / counts
    return index, q, counts


def circular_average_t(S: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
    L = S.shape[-1]
    index, q, counts = circular_bins(L)
    flat = S.reshape(*S.shape[:-2], L * L)
    out = torch.zeros(*flat.shape[:-1], len(q) + 1, dtype=S.dtype, device=S.device)
    out.index_add_(-1, torch.as_tensor(index, device=S.device), flat)
    return q, out[..., :-1] / torch.as_tensor(counts, dtype=S.dtype, device=S.device)


def circular_average(S) -> tuple[np.ndarray, np.ndarray]:
    """S averaged over shells |k - Q| = q of width 2pi/L: ``(q [nq], S_q [..., nq])``."""
    q, Sq = circular_average_t(torch.as_tensor(S, dtype=torch.float64))
    return q, Sq.cpu().numpy()
