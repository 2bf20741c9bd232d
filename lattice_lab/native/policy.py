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


# Writes that torch does not track -- in place through ``p.data`` (``p.data.copy_(x)``: ``.data`` has a
# version counter of its own) or through a numpy view -- change neither a version counter nor a data
# pointer. ForceField.weights_changed() counts them per module (in the module's __dict__, bypassing
# nn.Module.__setattr__), and every weight cache key holds the count of the module it copies from, so
# only that model's caches are rebuilt.
_COUNT = "_weights_written"


def weights_written(module: torch.nn.Module) -> None:
    """Note an untracked write to ``module``'s weights: the cached weight copies of it and of every
    submodule are rebuilt at their next use."""
    for m in module.modules():
        m.__dict__[_COUNT] = m.__dict__.get(_COUNT, 0) + 1


def write_count(module: torch.nn.Module) -> int:
    """How often :func:`weights_written` reached ``module`` (part of its weight caches' keys)."""
    return module.__dict__.get(_COUNT, 0)


def change_key(tensors: list[torch.Tensor], owner: torch.nn.Module) -> tuple:
    """A key that changes whenever one of ``tensors`` (parameters, normalisation buffers) may have
    changed: every in-place update bumps a version counter, ``.data =`` / ``.to()`` replace the
    data pointer, and :func:`weights_written` bumps ``owner``'s count for the writes torch does not track.
    ~50 ns per tensor, so kernels check it on every call and rebuild their weight
    tables only when it differs. Inference tensors have no version counter: their key never repeats
    (the tables are rebuilt on every call: correct, only slower)."""
    try:
        return write_count(owner), tuple(map(_VERSION, tensors)), tuple(map(torch.Tensor.data_ptr, tensors))
    except RuntimeError:  # an inference tensor (a model converted under torch.inference_mode)
        return (next(_never_equal),)


# Bumped whenever a module's parameter or buffer may have been replaced by another tensor object:
# torch calls the global registration hooks on every parameter / buffer assignment (attribute
# assignment, register_*, load_state_dict(assign=True)), and ForceField._apply (model.to(), .float(),
# .double(), ...) calls tensors_replaced(). Between bumps, LiveTensors returns its cached lookup: one
# integer compare per call instead of a walk through the modules' dictionaries.
_GENERATION = [0]


def tensors_replaced(*_args) -> None:
    """Note that some module's tensors were replaced (returns None: a registration hook that keeps the value)."""
    _GENERATION[0] += 1


torch.nn.modules.module.register_module_parameter_registration_hook(tensors_replaced)
torch.nn.modules.module.register_module_buffer_registration_hook(tensors_replaced)


class LiveTensors:
    """The tensors a kernel reads, looked up where their modules keep them (``_parameters`` /
    ``_buffers``) on every call: ``model.to()`` replaces buffers, ``load_state_dict(assign=True)``
    and attribute assignment replace parameters too, so tensors collected once would go on being
    watched (and read) after the model has moved on. ``slots``: ``(module, name)`` pairs, in order.
    The lookup is redone only after a replacement may have happened (``_GENERATION``); a direct write
    into a module's private ``_parameters`` / ``_buffers`` dict, or ``.to()`` on a submodule of a force
    field alone, is not seen (in-place updates and ``.data =`` are, through :func:`change_key`; writes
    through ``p.data`` after :meth:`ForceField.weights_changed` on ``owner``: the module they belong to,
    by default the first slot's)."""

    def __init__(self, slots, owner: torch.nn.Module | None = None):
        self.owner = slots[0][0] if owner is None else owner
        self._groups = []  # (dict, itemgetter, single): consecutive names of one dict in one lookup
        for module, name in slots:
            store = module._parameters if name in module._parameters else module._buffers
            if name not in store:
                raise KeyError(f"{type(module).__name__} has no parameter or buffer {name!r}")
            if self._groups and self._groups[-1][0] is store:
                self._groups[-1][1].append(name)
            else:
                self._groups.append((store, [name]))
        self._groups = [(d, operator.itemgetter(*names), len(names) == 1) for d, names in self._groups]
        self.key: tuple | None = None  # change_key of the tensors at the last change
        self._kept: list[torch.Tensor] = []
        self._generation = -1  # _GENERATION of the cached lookup
        self._cached: list[torch.Tensor] = []

    @classmethod
    def of(cls, module: torch.nn.Module, buffers=()) -> LiveTensors:
        """Every parameter of ``module`` (the order of ``module.parameters()``) and its own ``buffers``."""
        slots, seen = [], set()
        for m in module.modules():
            for name, p in m._parameters.items():
                if p is not None and id(p) not in seen:
                    seen.add(id(p))
                    slots.append((m, name))
        return cls([*slots, *((module, name) for name in buffers)], owner=module)

    def __call__(self) -> list[torch.Tensor]:
        if self._generation == _GENERATION[0]:
            return self._cached
        generation = _GENERATION[0]
        out: list[torch.Tensor] = []
        for store, get, single in self._groups:
            if single:
                out.append(get(store))
            else:
                out += get(store)
        self._cached, self._generation = out, generation
        return out

    def changed(self) -> bool:
        """Whether a tensor may have changed since the last call that returned True (:func:`change_key`,
        stored as ``self.key``). The tensors' memory is kept until the next change, so a replacement
        cannot be allocated where a watched tensor was (an equal data pointer, an equal version)."""
        tensors = self()
        key = change_key(tensors, self.owner)
        if key == self.key:
            return False
        self.key = key
        self._kept = [t.detach() for t in tensors]
        return True
