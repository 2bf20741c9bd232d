"""The machine's compute ceiling: sustained GFLOP/s of one large dense matmul (n x n @ n x n).

A square matmul of size n does 2 n^3 floating-point operations (n^3 multiply-adds) and is the
best case for the BLAS / cuBLAS kernels every model layer ends up in, so its rate is the
practical upper bound a model's achieved GFLOP/s is compared against. Measured with the same
thread settings as the model runs (``torch.get_num_threads()`` is reported with it).
"""

from __future__ import annotations

import torch

from lattice_lab.bench.timing import time_call


def matmul_ceiling(device: torch.device, n: int, dtype: torch.dtype, *, warmup: int = 1, repeats: int = 5,
                   seed: int = 0) -> dict:
    """GFLOP/s of ``a @ b`` for random ``[n, n]`` matrices in ``dtype`` on ``device`` (median)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    a = torch.randn(n, n, generator=gen, dtype=dtype).to(device)
    b = torch.randn(n, n, generator=gen, dtype=dtype).to(device)
    out = torch.empty(n, n, dtype=dtype, device=device)
    timing = time_call(lambda: torch.matmul(a, b, out=out), device, warmup=warmup, repeats=repeats)
    flops = 2.0 * n ** 3
    return {"n": int(n), "dtype": str(dtype).replace("torch.", ""), "device": str(device),
            "threads": torch.get_num_threads(), "seconds": timing.median,
            "gflops": flops / timing.median / 1e9, "gflops_best": flops / timing.min / 1e9,
            "repeats": timing.repeats}
