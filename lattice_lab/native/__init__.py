"""Hand-written CPU kernels (C++, compiled on first use, called through ctypes): see docs/enn_speed.md."""

from lattice_lab.native.build import NativeUnavailable, load

__all__ = ["NativeUnavailable", "load"]
