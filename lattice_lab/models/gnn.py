"""Direct-force graph network on the periodic square lattice (gnn_paper Table 2, DESIGN.md section 5).

Every layer is one message-passing step over the nearest-neighbour graph:

    h_i' = act(h_i W_self + AGG_{j in nn(i)} h_j W_nn + b),   AGG = sum or mean of the 4 neighbours,

widths 1-128-512-1024-2048-1024-512-128-1 in the paper (last layer linear), i.e. exactly a 3 x 3
cross-shaped convolution with periodic padding. The same ``W_nn`` for all four neighbours makes
the map D4-invariant (forces are A1 scalars, so F transforms like Q); sharing weights across sites
makes it translation invariant; each layer reaches one hop further, so the receptive field is the
number of layers.

Implementation: features are channels-last ``[B, L, L, C]`` and each layer is ONE matmul with the
stacked weight ``[W_self; W_nn]``. Aggregation is done on the narrower side: before the matmul
(``[h, nn_sum(h)] @ [[W_self], [W_nn]]``) when ``c_out >= c_in``, after it
(``y = h @ [W_self, W_nn]``; ``y_self + nn_sum(y_nn)``) when ``c_out < c_in`` -- identical by
linearity. Measured on 2 idle CPU cores, paper preset, L = 64, float32: 0.53 s per forward, vs
0.60 s for two matmuls without the narrow-side trick and 1.06 s for a cross-kernel ``conv2d``
with circular padding (which wastes the 4 zero corners of the 3 x 3 kernel).

CPU inference (no autograd) by default runs the whole force -- network and elastic prior -- in one
call of a C++ kernel (:mod:`lattice_lab.native.gnn`, option ``native_kernel``): every row of every
layer once, the sites of a row as SIMD lanes, a wavefront of a few rows per layer per thread in cache;
the same function as the torch path up to floating-point rounding, 5-10x faster for ``gnn_small`` and
~1.5x for the paper preset.

Normalisation (fitted once from training data by :meth:`GNN.fit_normalization`): the input is
``(Q - q_mean) / q_std`` and the output ``F = f_std * y + f_mean`` (epsilon-guarded standard
deviations); scalar shifts/scales keep every symmetry exact.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lattice_lab.common.errors import ConfigError
from lattice_lab.lattice import nn_sum
from lattice_lab.models.base import ForceField
from lattice_lab.native.policy import applicable, build_or_fallback, check_setting
from lattice_lab.symmetry.field_ops import ring_index

PAPER_WIDTHS = (1, 128, 512, 1024, 2048, 1024, 512, 128, 1)
AGGREGATIONS = ("sum", "mean")
ACTIVATIONS = {
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "softplus": nn.Softplus,
}
_GAIN = {"relu": math.sqrt(2.0), "silu": math.sqrt(2.0), "gelu": math.sqrt(2.0), "tanh": 1.0, "softplus": 1.0}
NATIVE_ACTIVATIONS = ("relu", "tanh", "silu", "softplus")  # in the native kernel (lattice_lab/native/gnn.py)
# native_kernel=auto: the native kernel up to this channel width, the widest measured faster than torch
# (wider layers: the torch path, unmeasured). us/site through the force provider, float32, 2 idle-ish cores
# (1 thread in brackets), native vs torch:
#   widths 1-16-32-16-1 (gnn_small), L=64:  0.018 vs 0.10   (0.031 vs 0.28)
#   widths 1-128-256-128-1, L=64:           0.68  vs 3.1    (1.3 vs 4.5)
#   widths 1-512-1024-512-1, L=64:          9.4   vs 29     (19 vs 51)
#   paper preset (up to 2048), L=32:        86    vs 131    (183 vs 233)
#   paper preset, L=64:                     79    vs 120    (160 vs 225);  L=128: 66 vs 113
# (paper preset: 270 GFLOP/s native vs 180 in torch's matmuls + neighbour sums + whole-lattice intermediates).
NATIVE_AUTO_MAX_WIDTH = 2048


def make_activation(name: str, key: str = "model.activation") -> nn.Module:
    """The activation module called ``name`` (ConfigError naming ``key`` otherwise)."""
    if name not in ACTIVATIONS:
        raise ConfigError(f"{key}={name!r}: expected one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


def check_aggregation(aggregation: str) -> float:
    """Neighbour weight of the aggregation: 1 for ``sum``, 1/4 for ``mean`` (4 neighbours)."""
    if aggregation not in AGGREGATIONS:
        raise ConfigError(f"model.aggregation={aggregation!r}: expected one of {list(AGGREGATIONS)}")
    return 1.0 if aggregation == "sum" else 0.25


def nn_sum_channels_last(h: torch.Tensor) -> torch.Tensor:
    """:func:`lattice_lab.lattice.nn_sum` for channels-last features ``[B, L, L, C]``."""
    return nn_sum(h.movedim(-1, 1)).movedim(1, -1)


class CrossLayer(nn.Module):
    """One message-passing layer h' = act(h W_self + s * nn_sum(h) W_nn + b) on ``[B, L, L, C]``.

    ``s`` is 1 (sum) or 1/4 (mean). One matmul per call (see the module docstring).
    """

    def __init__(self, c_in: int, c_out: int, neighbour_scale: float, activation: nn.Module, gain: float):
        super().__init__()
        self.c_in = int(c_in)
        self.c_out = int(c_out)
        self.neighbour_scale = float(neighbour_scale)
        self.aggregate_after = bool(c_out < c_in)
        # fan-in of one output: c_in self inputs + c_in neighbour inputs of variance 4 s^2
        std = gain / math.sqrt(c_in * (1.0 + 4.0 * neighbour_scale ** 2))
        self.w_self = nn.Parameter(torch.randn(c_in, c_out) * std)
        self.w_nn = nn.Parameter(torch.randn(c_in, c_out) * std)
        self.bias = nn.Parameter(torch.zeros(c_out))
        self.act = activation

    band_bytes = 8 << 20  # CPU inference: widest features of one band of rows ~ this many bytes

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        w_nn = self.w_nn * self.neighbour_scale
        if self.aggregate_after:
            y = h @ torch.cat([self.w_self, w_nn], 1)
            out = y[..., : self.c_out] + nn_sum_channels_last(y[..., self.c_out:]) + self.bias
        else:
            stacked = torch.cat([h, nn_sum_channels_last(h)], -1)
            out = stacked @ torch.cat([self.w_self, w_nn], 0) + self.bias
        return self.act(out)

    @torch.jit.unused
    def _use_bands(self, h: torch.Tensor) -> bool:
        return (h.device.type == "cpu" and not torch.is_grad_enabled()
                and h.shape[0] * h.shape[1] * h.shape[2] * max(self.c_in, self.c_out) * h.element_size()
                > 2 * self.band_bytes)

    @torch.jit.unused
    def _forward_bands(self, h: torch.Tensor) -> torch.Tensor:
        """The same layer (inference on CPU), band of rows by band of rows so that the neighbour sum,
        bias and activation work on features the band's matmul has just left in cache instead of
        streaming whole-lattice tensors through memory several times (paper preset, 2 threads:
        115 us/site instead of 147 at L = 128, 121 instead of 154 at L = 256). The neighbour sum
        takes each band's rows r0 - 1 and r1 from the periodic neighbours; results are identical
        up to float rounding."""
        B, L, _, c_in = h.shape
        c_out = self.c_out
        out = h.new_empty(B, L, L, c_out)
        w_nn = self.w_nn * self.neighbour_scale
        rows = max(1, min(L, self.band_bytes // (max(c_in, c_out) * h.element_size() * L)))
        ring = ring_index(L, 1, h.device)
        y_nn = (h.reshape(-1, c_in) @ w_nn).view(B, L, L, c_out) if self.aggregate_after else None
        for b in range(B):
            for r0 in range(0, L, rows):
                r1 = min(L, r0 + rows)
                o = out[b:b + 1, r0:r1]  # contiguous: whole rows of one configuration
                flat = o.view(-1, c_out)
                if y_nn is not None:  # aggregate after the matmul: self part + neighbour sum of y_nn
                    torch.addmm(self.bias, h[b, r0:r1].reshape(-1, c_in), self.w_self, out=flat)
                    _add_neighbour_sum(o, y_nn[b:b + 1].index_select(1, ring[r0:r1 + 2]))
                else:  # aggregate before: neighbour sum of the band's inputs, then two matmuls
                    hb = h[b:b + 1].index_select(1, ring[r0:r1 + 2])
                    nb = torch.zeros_like(hb[:, 1:-1])
                    _add_neighbour_sum(nb, hb)
                    torch.addmm(self.bias, hb[:, 1:-1].reshape(-1, c_in), self.w_self, out=flat)
                    flat.addmm_(nb.view(-1, c_in), w_nn)
                _activation_(self.act, o)
        return out


def _add_neighbour_sum(out: torch.Tensor, rows: torch.Tensor) -> None:
    """``out [B, h, L, C] += `` the 4-neighbour sum of the middle rows of ``rows [B, h + 2, L, C]``
    (its first and last row are the periodic neighbours of the band; columns wrap around)."""
    c = rows[:, 1:-1]
    out += rows[:, :-2]
    out += rows[:, 2:]
    out[:, :, 1:] += c[:, :, :-1]
    out[:, :, :1] += c[:, :, -1:]
    out[:, :, :-1] += c[:, :, 1:]
    out[:, :, -1:] += c[:, :, :1]


def _activation_(act: nn.Module, x: torch.Tensor) -> None:
    """Apply ``act`` to ``x`` in place (inference only)."""
    if isinstance(act, nn.Identity):
        return
    if isinstance(act, nn.ReLU):
        torch.relu_(x)
    else:
        x.copy_(act(x))


class GNN(ForceField):
    """Direct-force message-passing network (gnn_paper Table 2). ``Q [B, L, L] -> F [B, L, L]``.

    Args:
        hamiltonian: Holstein parameters the model is trained for (t, g, k, kappa, temperature, filling).
        cutoff: interaction range recorded for compatibility checks; defaults to the receptive field
            (number of layers, in lattice hops).
        widths: channel widths, first and last must be 1 (paper: 1-128-512-1024-2048-1024-512-128-1).
        aggregation: ``"sum"`` or ``"mean"`` over the four nearest neighbours.
        activation: nonlinearity after every layer but the last (paper: ReLU).
        native_kernel: CPU inference through the C++ kernel (:mod:`lattice_lab.native.gnn`, the whole
            force in one call): ``auto`` (default) where it is faster -- activations relu, tanh, silu,
            softplus and widths up to :data:`NATIVE_AUTO_MAX_WIDTH` -- with a warning and the torch path
            if it cannot be built; ``true``: always (a ConfigError for another activation or a kernel
            that does not build); ``false``: the torch path.
    """

    name = "gnn"
    conservative = False
    __jit_ignored_attributes__ = ["_native"]  # noqa: RUF012 - Python-only cache

    def __init__(self, hamiltonian: dict, cutoff: float | None = None, widths=PAPER_WIDTHS,
                 aggregation: str = "sum", activation: str = "relu", native_kernel: str | bool = "auto"):
        widths = [w for w in widths] if isinstance(widths, (list, tuple)) else widths
        if (not isinstance(widths, list) or len(widths) < 2
                or not all(isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in widths)):
            raise ConfigError(f"model.widths={widths!r}: expected a list of >= 2 positive integers")
        if widths[0] != 1 or widths[-1] != 1:
            raise ConfigError(f"model.widths={widths}: the first and last width must be 1 (Q in, F out)")
        scale = check_aggregation(aggregation)
        make_activation(activation)
        check_setting(native_kernel)
        if native_kernel is True and activation not in NATIVE_ACTIVATIONS:
            raise ConfigError(f"model.native_kernel=true: the native GNN kernel has no activation {activation!r} "
                              f"(one of {list(NATIVE_ACTIVATIONS)}; use native_kernel: auto or false)")
        n_layers = len(widths) - 1
        if cutoff is None:
            cutoff = float(n_layers)
        if not isinstance(cutoff, (int, float)) or isinstance(cutoff, bool) or not cutoff > 0:
            raise ConfigError(f"model.cutoff={cutoff!r}: expected a positive number (or null)")
        super().__init__(hamiltonian, float(cutoff), n_layers)
        self.widths = list(widths)
        self.aggregation = aggregation
        self.activation = activation
        self.native_kernel = native_kernel
        self._native_auto = activation in NATIVE_ACTIVATIONS and (
            NATIVE_AUTO_MAX_WIDTH is None or max(widths) <= NATIVE_AUTO_MAX_WIDTH)
        self._native: dict = {}  # dtype -> GNNForces, or the NativeUnavailable that keeps the torch path
        self.model_cfg = {"name": self.name, "cutoff": float(cutoff), "widths": list(widths),
                          "aggregation": aggregation, "activation": activation, "native_kernel": native_kernel}
        layers = []
        for i in range(n_layers):
            last = i == n_layers - 1
            act = nn.Identity() if last else make_activation(activation)
            gain = 1.0 if last else _GAIN[activation]
            layers.append(CrossLayer(widths[i], widths[i + 1], scale, act, gain))
        self.layers = nn.ModuleList(layers)
        for name in ("q_mean", "f_mean"):
            self.register_buffer(name, torch.tensor(0.0))
        for name in ("q_std", "f_std"):
            self.register_buffer(name, torch.tensor(1.0))

    @torch.no_grad()
    def fit_normalization(self, Q, F) -> None:
        """Scalar input shift/scale from Q and output shift/scale from the total force F."""
        self.fill_scalar_normalization(Q, F)

    def compute_forces(self, Q: torch.Tensor) -> torch.Tensor:
        """Forces without input checks (TorchScript-compatible; used by the exported module)."""
        h = self._features_in(Q)
        for layer in self.layers:
            h = layer(h)
        return self._forces_out(h)

    def _features_in(self, Q: torch.Tensor) -> torch.Tensor:
        return ((Q - self.q_mean) / self.q_std).unsqueeze(-1)

    def _forces_out(self, h: torch.Tensor) -> torch.Tensor:
        return h.squeeze(-1) * self.f_std + self.f_mean

    @torch.jit.unused
    def forward(self, Q: torch.Tensor) -> torch.Tensor:
        self.check_input(Q)
        F = self.native_forces(Q)  # CPU inference: the whole network in one native call, if it applies
        if F is not None:
            return F
        h = self._features_in(Q)  # as compute_forces; on CPU inference, wide layers band by band
        for layer in self.layers:
            h = layer._forward_bands(h) if layer._use_bands(h) else layer(h)
        return self._forces_out(h)

    # -- native CPU inference (lattice_lab.native.gnn) ------------------------------------------------
    @torch.jit.unused
    def native_wanted(self) -> bool:
        """Whether the settings ask for the native kernel: ``true``, or ``auto`` with a native activation
        and no channel wider than :data:`NATIVE_AUTO_MAX_WIDTH` (where it is faster than torch)."""
        if self.native_kernel is True:
            return True
        return self.native_kernel == "auto" and self._native_auto

    @torch.jit.unused
    def native_plan(self, Q: torch.Tensor):
        """The native kernel (:class:`lattice_lab.native.gnn.GNNForces`) that serves ``Q``, or None:
        autograd recording, GPU, a dtype other than the model's float32 / float64, ``LATTICE_LAB_NATIVE=0``,
        settings that do not ask for it (:meth:`native_wanted`), or, with ``auto``, no working compiler."""
        setting = self.native_kernel
        if not ((setting is True or (self._native_auto and setting == "auto")) and applicable(setting, Q)):
            return None  # the first test is native_wanted(), inlined: this runs on every force call
        got = self._native.get(Q.dtype)
        if got is None:
            from lattice_lab.native.gnn import GNNForces

            got = build_or_fallback(self.native_kernel, "GNN", lambda: GNNForces(self, Q.dtype))
            self._native[Q.dtype] = got
        if isinstance(got, Exception) or not got.ready():  # ready: Q's dtype is the parameters' dtype
            return None
        return got

    def __getstate__(self):  # copies / pickles drop the native kernel cache (ctypes objects, this model's tensors)
        state = dict(super().__getstate__())
        state["_native"] = {}
        return state

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._native.clear()  # load_state_dict(assign=True) replaces the tensors the kernel reads

    @torch.jit.unused
    def native_function(self, Q: torch.Tensor, k: float = 0.0, kappa: float = 0.0, frozen: bool = False):
        """See :meth:`ForceField.native_function` (:class:`lattice_lab.native.gnn.GNNForces`; None
        from the function when a parameter has moved to another dtype or device)."""
        plan = self.native_plan(Q)
        if plan is None:
            return None
        return plan.bind(k, kappa, frozen)
