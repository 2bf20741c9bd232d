"""CUDA graphs: record a sequence of GPU kernels once and replay it with one launch.

On a GPU, a small lattice's force call is bound by the host, not the device: every torch op costs
~5-15 us of Python and kernel launch, and a model runs 70-250 of them per call, while the kernels
themselves take a few us each at L = 32. Replaying a captured graph launches them all at once
(measured on an H100: a 32 x 32 ``gnn_small`` force call 1.16 ms eager, 0.17 ms as a graph; docs/bench.md).

A graph replays the exact kernels it recorded on the exact memory it recorded them on, so:

- its inputs and outputs are *static* tensors: copy new inputs into them, read results out of them;
- the shapes and the control flow are frozen: a new shape needs a new capture;
- nothing inside may synchronise with the host (``.item()``, printing a value, data-dependent
  Python branches): such a function cannot be captured, and :func:`capture` raises;
- in-place updates of the tensors it reads (weights, static inputs) are seen by every replay;
- random numbers stay reproducible: each registered generator (the default CUDA generator always)
  advances its Philox offset by the graph's whole draw at every replay, as the eager calls would.

``setting`` values everywhere: ``auto`` (use graphs on CUDA where the caller finds them worthwhile),
``true`` (use them on CUDA) and ``false`` (never). On the CPU there is nothing to capture.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

import torch

T = TypeVar("T")


def wanted(setting, device: torch.device, *, auto: bool = True) -> bool:
    """Whether to use graphs on ``device``: never off CUDA; ``auto`` resolves to ``auto``."""
    if torch.device(device).type != "cuda" or setting is False:
        return False
    return True if setting is True else bool(auto)


def capture(fn: Callable[[], T], *, warmup: Callable[[], object] | None = None, warmup_calls: int = 2,
            generators: Iterable[torch.Generator] = ()) -> tuple[torch.cuda.CUDAGraph, T]:
    """Record ``fn()`` into a CUDA graph; returns ``(graph, output of the recorded call)``.

    ``warmup`` (default ``fn``) first runs ``warmup_calls`` times on a side stream, as capture
    requires: lazy initialisation (cuBLAS handles, autograd buffers, allocator pools) must not
    happen inside the recording. The recorded call itself does not execute: ``graph.replay()``
    does. ``generators`` are the non-default CUDA generators ``fn`` draws from; the caller restores
    their state after a warm-up that drew from them, if the warm-up must not count.
    """
    warm = fn if warmup is None else warmup
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(int(warmup_calls)):
            warm()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    for gen in generators:
        graph.register_generator_state(gen)
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


class GraphedCall:
    """``f(x)`` for a fixed input shape as a graph replay: copy into a static input, replay, return
    the static output (overwritten by the next call: copy it to keep it). Used by the benchmark to
    time a force call without the host's launch cost."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], example: torch.Tensor):
        self.input = example.detach().clone()
        self.graph, self.output = capture(lambda: fn(self.input))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape != self.input.shape or x.dtype != self.input.dtype or x.device != self.input.device:
            raise ValueError(f"graphed call recorded for {tuple(self.input.shape)} {self.input.dtype} on "
                             f"{self.input.device}, got {tuple(x.shape)} {x.dtype} on {x.device}")
        if x.data_ptr() != self.input.data_ptr():
            self.input.copy_(x)
        self.graph.replay()
        return self.output
