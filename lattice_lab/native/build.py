"""Compile a C++ source of this package into a shared library once per machine and load it (ctypes).

The kernels are plain C++ (no torch headers, no Python API), so a build takes ~1-2 s with the
system compiler (``$CXX`` or ``g++``/``c++``/``clang++``), flags ``-O3 -march=native -fopenmp``.
OpenMP: the library asks for ``libgomp.so.1``, and torch (always imported first) has already loaded
its own ``libgomp.so.1``, so the dynamic loader hands the kernels torch's OpenMP runtime: one thread
team for torch's operations and the kernels, no second set of spinning threads (an empty parallel
region costs ~1 us). Kernels take their thread count as an argument (``torch.get_num_threads()``). The library
is cached under ``$LATTICE_LAB_CACHE`` (default ``$XDG_CACHE_HOME/lattice_lab`` or
``~/.cache/lattice_lab``; the temporary directory if that is not writable), keyed by a hash of
the source, the compiler, the flags and the CPU, so a home directory shared by different machines
never loads a library built for another CPU. The build
writes a temporary file and renames it (atomic), so concurrent processes never see a partial library.
Functions called through ``ctypes.CDLL`` release the GIL, so pool threads run them concurrently.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

log = logging.getLogger(__name__)
_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL | Exception] = {}
FLAG_SETS = (  # tried in order; without -fopenmp the kernels run on one thread (the pragmas are ignored)
    ["-O3", "-march=native", "-ffp-contract=fast", "-fno-math-errno", "-fopenmp"],
    ["-O3", "-mcpu=native", "-ffp-contract=fast", "-fno-math-errno", "-fopenmp"],  # clang on arm64
    ["-O3", "-march=native", "-ffp-contract=fast", "-fno-math-errno"],  # a compiler without OpenMP
    ["-O3", "-ffp-contract=fast"],
)


class NativeUnavailable(RuntimeError):
    """No C++ compiler, or the kernel did not build on this machine (the torch path is used instead)."""


def cache_dir() -> Path:
    root = os.environ.get("LATTICE_LAB_CACHE")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lattice_lab"


def compiler() -> str:
    for name in [os.environ.get("CXX"), "g++", "c++", "clang++"]:
        path = shutil.which(name) if name else None
        if path:
            return path
    raise NativeUnavailable("no C++ compiler found (set CXX, or install g++); the ENN uses its torch path")


def _cpu_identity() -> str:
    ident = [platform.machine(), platform.processor()]
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith(("flags", "Features", "model name")):
                    ident.append(line.strip())
                    if len(ident) > 4:
                        break
    except OSError:
        pass
    return "\n".join(ident)


def _version(cxx: str) -> str:
    try:
        return subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise NativeUnavailable(f"C++ compiler {cxx!r} does not run: {exc}") from None


def _writable(folder: Path) -> Path:
    """``folder`` (created), or a per-user folder in the temporary directory when it cannot be written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if os.access(folder, os.W_OK):
            return folder
    except OSError:
        pass
    fallback = Path(tempfile.gettempdir()) / f"lattice_lab-{os.getuid() if hasattr(os, 'getuid') else 'user'}" / "native"
    fallback.mkdir(parents=True, exist_ok=True)
    log.info("cache folder %s is not writable; building in %s", folder, fallback)
    return fallback


def _build(source: Path) -> Path:
    cxx = compiler()
    version = _version(cxx)
    headers = [h.read_bytes() for h in sorted(source.parent.glob("*.h"))]  # the shared headers it may include
    common = [source.read_bytes(), *headers, version.encode(), _cpu_identity().encode()]
    folder = _writable(cache_dir() / "native")
    errors = []
    for flags in FLAG_SETS:
        key = hashlib.sha256(b"\0".join([*common, " ".join(flags).encode()])).hexdigest()[:20]
        target = folder / f"{source.stem}-{key}.so"
        if target.exists():
            return target
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        cmd = [cxx, *flags, "-std=c++17", "-shared", "-fPIC", str(source), "-o", tmp]
        log.info("compiling %s (once per machine): %s", source.name, " ".join(cmd))
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.SubprocessError) as exc:
            proc = None
            errors.append(f"{' '.join(cmd)}: {exc}")
        if proc is not None and proc.returncode == 0:
            os.replace(tmp, target)
            return target
        if proc is not None:
            errors.append(f"{' '.join(cmd)}:\n{proc.stderr.strip()[-2000:]}")
        Path(tmp).unlink(missing_ok=True)
    raise NativeUnavailable(f"could not compile {source.name}:\n" + "\n".join(errors))


def load(name: str) -> ctypes.CDLL:
    """The shared library built from ``lattice_lab/native/<name>.cpp`` (built on first use, then
    cached on disk and per process). Raises :class:`NativeUnavailable` when it cannot be built."""
    with _lock:
        got = _loaded.get(name)
        if got is None:
            try:
                got = ctypes.CDLL(str(_build(Path(__file__).with_name(f"{name}.cpp"))))
            except NativeUnavailable as exc:
                got = exc
            except OSError as exc:  # cache directory not writable, or a library that does not load
                got = NativeUnavailable(f"could not build or load the {name} kernel: {exc}")
            _loaded[name] = got
    if isinstance(got, Exception):
        raise got
    return got
