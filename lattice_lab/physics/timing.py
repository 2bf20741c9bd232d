"""Cost of one exact force evaluation against a bare eigendecomposition of the same matrix.

``ed_timing_table`` times, for each lattice size L (batch 1, float64): the full
:class:`~lattice_lab.physics.ed.ExactForces` call (Hamiltonian assembly, ``torch.linalg.eigh``,
chemical potential, densities, forces), a bare ``torch.linalg.eigh`` and a bare ``numpy.linalg.eigh``
of the same N x N matrix. The ED overhead beyond the eigensolver is the part this project controls.
Run ``python -m lattice_lab.physics.timing 16 24 32 40`` for a markdown table.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

from lattice_lab.common.device import resolve_device, synchronize
from lattice_lab.common.errors import ConfigError
from lattice_lab.physics.ed import ExactForces
from lattice_lab.physics.holstein import HolsteinParams


def _best_time(fn, repeats: int, device: torch.device) -> float:
    best = float("inf")
    for _ in range(max(1, int(repeats))):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return best


def ed_timing_table(sizes=(16, 24, 32, 40), repeats: int = 3, device: str = "cpu",
                    params: HolsteinParams | None = None, seed: int = 0) -> list[dict]:
    """One dict per L: ``L, N, device, ed_force_s, torch_eigh_s, numpy_eigh_s, overhead_pct``.

    Times are the best of ``repeats`` (after one warm-up call); ``overhead_pct`` is
    ``100 (ed_force_s / torch_eigh_s - 1)``. ``numpy_eigh_s`` is NaN on a non-CPU device.
    """
    dev = resolve_device(device)
    params = params or HolsteinParams()
    ed = ExactForces(params, device=dev)
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for L in sizes:
        L = int(L)
        Q = (torch.randn(1, L, L, generator=gen, dtype=torch.float64) * 1.5).to(dev)
        h = ed._hopping(L).clone()
        h.diagonal().sub_(params.g * Q.reshape(-1))
        hn = h.cpu().numpy()
        ed(Q)  # warm-up (caches the hopping matrix)
        fns = {"ed_force_s": lambda Q=Q: ed(Q), "torch_eigh_s": lambda h=h: torch.linalg.eigh(h)}
        if dev.type == "cpu":
            fns["numpy_eigh_s"] = lambda hn=hn: np.linalg.eigh(hn)
        best = {key: float("inf") for key in fns}
        for _ in range(max(1, int(repeats))):  # interleaved, so load changes hit all three alike
            for key, fn in fns.items():
                best[key] = min(best[key], _best_time(fn, 1, dev))
        best.setdefault("numpy_eigh_s", float("nan"))
        rows.append({"L": L, "N": L * L, "device": str(dev), "threads": torch.get_num_threads(), **best,
                     "overhead_pct": 100.0 * (best["ed_force_s"] / best["torch_eigh_s"] - 1.0)})
    return rows


def format_timing_table(rows: list[dict]) -> str:
    """Markdown table of :func:`ed_timing_table` rows (milliseconds)."""
    lines = ["| L | N | ED force (ms) | torch eigh (ms) | numpy eigh (ms) | ED overhead |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['L']} | {r['N']} | {1e3 * r['ed_force_s']:.1f} | {1e3 * r['torch_eigh_s']:.1f} | "
                     f"{1e3 * r['numpy_eigh_s']:.1f} | {r['overhead_pct']:+.1f}% |")
    return "\n".join(lines)


def main(argv=None) -> int:
    """``python -m lattice_lab.physics.timing [L ...]``: the markdown table; a bad L is one ``error:`` line."""
    p = argparse.ArgumentParser(prog="python -m lattice_lab.physics.timing", description=__doc__.splitlines()[0])
    p.add_argument("sizes", nargs="*", type=int, default=[16, 24, 32, 40], metavar="L",
                   help="even lattice sizes (default: 16 24 32 40)")
    args = p.parse_args(argv)
    try:
        print(format_timing_table(ed_timing_table(args.sizes)))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover - manual benchmark
    sys.exit(main())
