"""Equal-time correlation functions on the periodic square lattice, by FFT.

- Autocorrelation A(d) = (1/N) sum_i f_i f_{i+d} for every displacement d, computed as
  IFFT(|FFT f|^2)/N (Wiener-Khinchin), O(N log N), no loop over sites.
- C(r) = <f_i f_j> over all pairs at distance r = |r_i - r_j| (periodic minimum image): A(d)
  averaged over the displacements d in the shell |d| = r. Every displacement has N pairs, so this
  is the average over pairs and sites. Bins: ``"exact"`` (one bin per distinct r^2 <= r_max^2,
  default r_max = L/2) or ``"integer"`` (round(|d|) = 0, 1, 2, ...; the bin's r is the mean |d|
  of its displacements).
- G(r) = (<phi_i phi_{i+r}> - <phi>^2) / (<phi^2> - <phi>^2), site averages per configuration
  (gnn_paper); G(0) = 1.
- xi: the first distance where G crosses 1/2, linearly interpolated between bracketing bins.

Results keep every leading dim (replicas), so callers average with error bars
(:func:`lattice_lab.analysis.stats.replica_mean_sem`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lattice_lab.common.errors import ConfigError, number_or_nan

BINNINGS = ("exact", "integer")


def as_field(x, device=None) -> torch.Tensor:
    """A float64 torch tensor [..., L, L] (square) from numpy or torch input."""
    t = torch.as_tensor(x)
    if device is not None:
        t = t.to(device)
    t = t.to(torch.float64)
    if t.ndim < 2 or t.shape[-1] != t.shape[-2]:
        raise ValueError(f"expected a square lattice field [..., L, L], got shape {tuple(t.shape)}")
    return t


def minimum_image(L: int) -> np.ndarray:
    """Signed minimum-image offsets of the indices 0..L-1: d if d <= L/2 else d - L."""
    d = np.arange(L)
    return np.where(d > L // 2, d - L, d)


@dataclass(frozen=True)
class DistanceBins:
    """Assignment of the L*L displacements to distance bins.

    ``index[s]`` is the bin of displacement s = dx*L + dy (``nbins`` if beyond r_max), ``r`` the
    bin distances, ``counts`` the number of displacements per bin (= number of pairs / N).
    """

    L: int
    binning: str
    r: np.ndarray
    counts: np.ndarray
    index: np.ndarray

    @property
    def nbins(self) -> int:
        return len(self.r)


def check_binning(binning: str, r_max) -> float | None:
    """``correlation.binning`` and ``correlation.r_max`` (a number >= 0 or None = L/2), checked; returns r_max."""
    if binning not in BINNINGS:
        raise ConfigError(f"correlation.binning={binning!r}: expected one of {list(BINNINGS)}")
    if r_max is None:
        return None
    value = number_or_nan(r_max)
    if not value >= 0:
        raise ConfigError(f"correlation.r_max={r_max!r}: expected a number >= 0 or null (L/2)")
    return value


def distance_bins(L: int, r_max: float | None = None, binning: str = "exact") -> DistanceBins:
    """Distance bins of the periodic L x L lattice up to ``r_max`` (default L/2)."""
    r_max = check_binning(binning, r_max)
    r_max = L / 2 if r_max is None else r_max
    d = minimum_image(L)
    r2 = (d[:, None] ** 2 + d[None, :] ** 2).reshape(-1)
    dist = np.sqrt(r2)
    inside = r2 <= r_max**2 + 1e-9
    if binning == "exact":
        values, inv = np.unique(r2[inside], return_inverse=True)
        r = np.sqrt(values.astype(np.float64))
    else:
        key = np.floor(dist[inside] + 0.5).astype(np.int64)
        values, inv = np.unique(key, return_inverse=True)
        r = np.bincount(inv, weights=dist[inside]) / np.bincount(inv)
    index = np.full(L * L, len(values), dtype=np.int64)
    index[inside] = inv
    counts = np.bincount(inv, minlength=len(values))
    return DistanceBins(L=L, binning=binning, r=r, counts=counts, index=index)


def bin_average(values: torch.Tensor, bins: DistanceBins) -> torch.Tensor:
    """Average a displacement field [..., L, L] over each distance bin -> [..., nbins] (torch)."""
    L = bins.L
    flat = values.reshape(*values.shape[:-2], L * L)
    idx = torch.as_tensor(bins.index, device=values.device)
    out = torch.zeros(*flat.shape[:-1], bins.nbins + 1, dtype=values.dtype, device=values.device)
    out.index_add_(-1, idx, flat)
    counts = torch.as_tensor(bins.counts, dtype=values.dtype, device=values.device)
    return out[..., :-1] / counts


def autocorrelation(field: torch.Tensor) -> torch.Tensor:
    """A(d) = (1/N) sum_i f_i f_{i+d} for every displacement d, shape [..., L, L] (torch)."""
    N = field.shape[-1] * field.shape[-2]
    F = torch.fft.fft2(field)
    return torch.fft.ifft2(F * F.conj()).real / N


def correlation_t(field: torch.Tensor, bins: DistanceBins, connected: bool = False) -> torch.Tensor:
    """C(r) per configuration [..., nbins] (torch); ``connected`` subtracts the site mean squared."""
    C = bin_average(autocorrelation(field), bins)
    if connected:
        C = C - field.mean(dim=(-2, -1))[..., None] ** 2
    return C


def correlation_function(field, binning: str = "exact", r_max: float | None = None,
                         connected: bool = False, device=None) -> tuple[np.ndarray, np.ndarray]:
    """Equal-time correlation C(r) = <f_i f_j>_{|r_i - r_j| = r} of a periodic field [..., L, L].

    Returns ``(r [nbins], C [..., nbins])``; the leading dims (replicas) are kept.
    """
    f = as_field(field, device)
    bins = distance_bins(f.shape[-1], r_max, binning)
    return bins.r.copy(), correlation_t(f, bins, connected).cpu().numpy()


def normalized_correlation_t(phi: torch.Tensor, bins: DistanceBins) -> torch.Tensor:
    """G(r) per configuration [..., nbins] (torch); NaN where phi is uniform (zero variance)."""
    mean = phi.mean(dim=(-2, -1))
    var = (phi**2).mean(dim=(-2, -1)) - mean**2
    C = bin_average(autocorrelation(phi), bins)
    var = torch.where(var > 1e-14 * (phi**2).mean(dim=(-2, -1)).clamp_min(1e-300), var,
                      torch.full_like(var, float("nan")))
    return (C - mean[..., None] ** 2) / var[..., None]


def normalized_correlation(phi, binning: str = "exact", r_max: float | None = None,
                           device=None) -> tuple[np.ndarray, np.ndarray]:
    """G(r) = (<phi_i phi_{i+r}> - <phi>^2)/(<phi^2> - <phi>^2) per configuration.

    Site averages are taken within each configuration (each replica is normalised by its own
    mean and variance), so G(0) = 1. Returns ``(r [nbins], G [..., nbins])``.
    """
    p = as_field(phi, device)
    bins = distance_bins(p.shape[-1], r_max, binning)
    return bins.r.copy(), normalized_correlation_t(p, bins).cpu().numpy()


def correlation_length(G, r, level: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Distance where G(r) first drops below ``level`` (default 1/2), interpolated linearly.

    ``G`` is [..., nbins] on increasing distances ``r``. Between the last bin with G >= level and
    the first with G < level, xi = r_a + (G_a - level)(r_b - r_a)/(G_a - G_b). Returns
    ``(xi [...], found [...] bool)``; where G never crosses (or is NaN, or starts below the
    level) xi is NaN and found is False.
    """
    G = np.asarray(G, dtype=np.float64)
    r = np.asarray(r, dtype=np.float64)
    if G.shape[-1] != r.shape[-1]:
        raise ValueError(f"G has {G.shape[-1]} bins but r has {r.shape[-1]}")
    if G.shape[-1] < 2:
        return np.full(G.shape[:-1], np.nan), np.zeros(G.shape[:-1], dtype=bool)
    below = G < level  # NaN compares False
    first = np.argmax(below, axis=-1)
    crossed = below.any(axis=-1) & (first > 0)
    ib = np.where(crossed, first, 1)
    ia = ib - 1
    Ga = np.take_along_axis(G, ia[..., None], -1)[..., 0]
    Gb = np.take_along_axis(G, ib[..., None], -1)[..., 0]
    ok = crossed & np.isfinite(Ga) & np.isfinite(Gb)
    with np.errstate(invalid="ignore", divide="ignore"):
        xi = r[ia] + (Ga - level) * (r[ib] - r[ia]) / (Ga - Gb)
    xi = np.where(ok, xi, np.nan)
    return xi, ok
