"""When a model uses a native (C++) kernel, and what happens when it cannot be built.

Every model with a native CPU path has a ``native_kernel`` option:

- ``auto`` (default): use the kernel for CPU inference when it builds; otherwise warn once and use
  the torch path;
- ``true``: the same, but a kernel that cannot be built is a :class:`ConfigError`;
- ``false``: always the torch path.

The environment variable ``LATTICE_LAB_NATIVE=0`` turns every kernel off (the torch path, e.g. to
compare). Kernels serve inference only: with autograd recording (training), on a GPU, or in a dtype
other than float32 / float64, the torch path runs. Both paths compute the same function; tests
compare them to floating-point precision.
"""

from __future__ import annotations

import itertools
import operator
import os
import warnings
from collections.abc import Callable
from typing import TypeVar

import torch

from lattice_lab.common.errors import ConfigError
from lattice_lab.common.switch import check_switch
from lattice_lab.native.build import NativeUnavailable

SUPPORTED_DTYPES = (torch.float32, torch.float64)
T = TypeVar("T")
_VERSION = operator.attrgetter("_version")
_never_equal = itertools.count()


def check_setting(value, key: str = "model.native_kernel"):
    """``value`` if it is ``"auto"``, ``True`` or ``False``; a ConfigError naming ``key`` otherwise."""
    return check_switch(value, key)


def disabled_by_environment() -> bool:
    """``LATTICE_LAB_NATIVE=0``: every model uses its torch path."""
    return os.environ.get("LATTICE_LAB_NATIVE", "1") == "0"


def applicable(setting, Q: torch.Tensor, *, grad_free: bool = True) -> bool:
    """Whether the native path may serve ``Q``: the option is not ``false``, ``Q`` is a CPU tensor in
    a supported dtype, the environment allows it and (``grad_free``) autograd is not recording."""
    return not (setting is False or Q.device.type != "cpu" or Q.dtype not in SUPPORTED_DTYPES
                or (grad_free and torch.is_grad_enabled()) or disabled_by_environment())


def build_or_fallback(setting, what: str, build: Callable[[], T], key: str = "model.native_kernel"
                      ) -> T | NativeUnavailable:
    """``build()``; when it raises :class:`NativeUnavailable`: a ConfigError for ``setting=True``,
    otherwise a warning and the exception itself (cache it: the caller then keeps its torch path)."""
    try:
        return build()
    except NativeUnavailable as exc:
        if setting is True:
            raise ConfigError(f"{key}=true but the {what} kernel is unavailable: {exc}") from None
        warnings.warn(f"{what}: native CPU kernel unavailable, using the torch path ({exc})", stacklevel=3)
        return exc


def threads() -> int:
    """Threads a kernel call may use: torch's intra-op thread count (the same OpenMP team)."""
    return max(1, torch.get_num_threads())


def change_key(tensors: list[torch.Tensor]) -> tuple:
    """A key that changes whenever one of ``tensors`` (parameters, normalisation buffers) may have
    changed: every in-place update bumps a version counter, and ``.data =`` / ``.to()`` replace the
    data pointer. ~50 ns per tensor, so kernels check it on every call and rebuild their weight
    tables only when it differs. Inference tensors have no version counter: their key never repeats
    (the tables are rebuilt on every call: correct, only slower)."""
    try:
        return tuple(map(_VERSION, tensors)), tuple(map(torch.Tensor.data_ptr, tensors))
    except RuntimeError:  # an inference tensor (a model converted under torch.inference_mode)
        return (next(_never_equal),)
