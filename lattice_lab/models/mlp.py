"""Descriptor + MLP force field (Behler-Parrinello-style baseline, gnn_paper Sec. III, DESIGN.md section 5).

Every site's environment is mapped to the D4-invariant descriptor of
:mod:`lattice_lab.models.descriptor`, standardised per feature, and fed to a ReLU multilayer
perceptron (paper widths 4096-2048-750-592-256-127-69-1) that outputs the site force
``F = out * F_std + F_mean``. The descriptor is invariant, so the force (an A1 scalar) is exactly
D4- and translation-equivariant; the model is local and transfers to any L.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lattice_lab.models.base import ForceField
from lattice_lab.models.descriptor import D4Descriptor
from lattice_lab.models.enn import _check_cutoff, _check_hidden
from lattice_lab.models.layers_equivariant import NORM_EPS, force_moments
from lattice_lab.native.build import NativeUnavailable
from lattice_lab.native.policy import applicable, build_or_fallback, check_setting

SITE_CHUNK = 1 << 14  # sites per chunk in forward (the widest layer has 4096 units)
# native_kernel=auto: when the C++ kernel (lattice_lab/native/mlp_forward.cpp) is used instead of the
# torch path (MKL GEMMs over 16k-site chunks). Measured on an AMD Zen 5 (float32, L = 32, us/site,
# one thread): hidden [64, 32]: native 0.07 vs torch 0.63; [512, 256]: 1.4 vs 6.1; [2048, 1024]:
# 18 vs 46; the paper preset [4096, ..., 69]: 108 vs 229 (two threads: 54 vs 118; L = 128 the same).
# The kernel runs near the FMA peak with AVX-512 at every width. Built for AVX2 (8 float lanes; MKL
# here runs AVX2 code on AMD, so a like-for-like comparison) it wins up to [512, 256] (4.1 vs 5.8) but
# loses from [1024, 512] (15.1 vs 13.1) to the paper preset (289 vs 225). Hence auto: native for
# hidden widths up to NATIVE_AUTO_MAX_WIDTH on any CPU, and for wider nets only where the kernel is
# built with 64-byte (AVX-512) vectors.
NATIVE_AUTO_MAX_WIDTH = 512

class DescriptorMLP(ForceField):
    """Invariant environment descriptor -> ReLU MLP -> site force (direct force model)."""

    name = "mlp"
    conservative = False
    __jit_ignored_attributes__ = ["_native"]  # noqa: RUF012 - Python-only cache

    def __init__(self, hamiltonian: dict, cutoff: float = math.sqrt(13.0),
                 hidden: list[int] = (4096, 2048, 750, 592, 256, 127, 69), reference_shell_r2: int = 5,
                 phase_eps: float = 1e-2, native_kernel: str | bool = "auto"):
        cutoff = _check_cutoff(cutoff)
        widths = _check_hidden(hidden)
        descriptor = D4Descriptor(cutoff, reference_shell_r2, phase_eps)
        super().__init__(hamiltonian, cutoff, receptive_field=descriptor.proj.basis.radius)
        self.descriptor = descriptor
        self.hidden = widths
        self.reference_shell_r2 = int(reference_shell_r2)
        self.phase_eps = float(phase_eps)
        self.native_kernel = check_setting(native_kernel)
        self._native: dict = {}  # dtype -> MLPForces, or the reason the kernel is unavailable
        n_in = descriptor.n_features
        layers: list[nn.Module] = []
        for w in widths:
            layers += [nn.Linear(n_in, w), nn.ReLU()]
            n_in = w
        layers.append(nn.Linear(n_in, 1))
        self.net = nn.Sequential(*layers)
        self.register_buffer("feat_mean", torch.zeros(descriptor.n_features))
        self.register_buffer("feat_std", torch.ones(descriptor.n_features))
        self.register_buffer("out_scale", torch.tensor(1.0))
        self.register_buffer("out_shift", torch.tensor(0.0))
        self.site_chunk = SITE_CHUNK  # instance attribute: TorchScript cannot read a global int

    @torch.no_grad()
    def fit_normalization(self, Q: torch.Tensor, F: torch.Tensor, chunk: int = 16) -> None:
        """Per-feature mean / std (epsilon-guarded) of the descriptor and the force mean / std."""
        Q = torch.as_tensor(Q)
        dev = self.feat_mean.device
        s1 = torch.zeros(self.descriptor.n_features, dtype=torch.float64, device=dev)
        s2 = torch.zeros_like(s1)
        n = 0
        for start in range(0, Q.shape[0], chunk):
            d = self.descriptor(Q[start:start + chunk].to(device=dev, dtype=torch.float64))
            s1 += d.sum(0)
            s2 += (d * d).sum(0)
            n += d.shape[0]
        mean = s1 / n
        self.feat_mean.copy_(mean)
        self.feat_std.copy_(torch.sqrt((s2 / n - mean * mean).clamp_min(0) + NORM_EPS))
        f_mean, f_std = force_moments(F)
        self.out_shift.fill_(f_mean)
        self.out_scale.fill_(f_std)

    def compute_forces(self, Q: torch.Tensor) -> torch.Tensor:
        """Forces ``[B, L, L]`` without input checks (TorchScript-compatible, any L and B)."""
        B, L = Q.shape[0], Q.shape[-1]
        d = (self.descriptor(Q) - self.feat_mean.to(Q.dtype)) / self.feat_std.to(Q.dtype)
        ys: list[torch.Tensor] = []
        for s in range(0, d.shape[0], self.site_chunk):
            ys.append(self.net(d[s:s + self.site_chunk])[:, 0])
        y = torch.cat(ys)
        return y.view(B, L, L) * self.out_scale.to(y.dtype) + self.out_shift.to(y.dtype)

    def __getstate__(self):  # copies / pickles drop the native kernel cache (ctypes objects, pointers into this model)
        state = dict(super().__getstate__())
        state["_native"] = {}
        return state

    @torch.jit.unused
    def forward(self, Q: torch.Tensor) -> torch.Tensor:
        """Forces ``[B, L, L]``: the native kernel for CPU inference where it applies, else :meth:`compute_forces`."""
        self.check_input(Q)
        F = self.native_forces(Q)
        return F if F is not None else self.compute_forces(Q)

    @torch.jit.unused
    def auto_prefers_native(self, vector_bytes: int) -> bool:
        """What ``native_kernel: auto`` picks for this architecture, given the SIMD width the kernel
        was built with: native up to :data:`NATIVE_AUTO_MAX_WIDTH`, wider nets only with AVX-512
        (faster than torch where measured; see the note at :data:`NATIVE_AUTO_MAX_WIDTH`)."""
        return max(self.hidden) <= NATIVE_AUTO_MAX_WIDTH or vector_bytes >= 64

    @torch.jit.unused
    def native_function(self, Q: torch.Tensor, k: float = 0.0, kappa: float = 0.0, frozen: bool = False):
        """See :meth:`ForceField.native_function`: :class:`lattice_lab.native.mlp.MLPForces` (descriptor,
        MLP and elastic force per tile of sites), where :meth:`auto_prefers_native` allows it."""
        if not applicable(self.native_kernel, Q):
            return None
        got = self._native.get(Q.dtype)
        if got is None:
            got = self._build_native(Q.dtype)
        if isinstance(got, Exception):
            return None
        if frozen:
            got.prepare()
        return lambda Q, out=None: got.run(Q.contiguous(), k, kappa, out, check=not frozen)

    @torch.jit.unused
    def _build_native(self, dtype: torch.dtype):
        """The kernel for ``dtype`` (cached), or the reason the torch path is used instead."""
        from lattice_lab.native.mlp import MLPForces

        got = build_or_fallback(self.native_kernel, "MLP", lambda: MLPForces(self, dtype))
        if self.native_kernel == "auto" and isinstance(got, MLPForces) and not self.auto_prefers_native(got.vector_bytes):
            got = NativeUnavailable(f"hidden {self.hidden}: the torch path is faster with {got.vector_bytes}-byte vectors")
        self._native[dtype] = got
        return got
