"""Atomic file output (write to a temporary file beside the target, then rename over it), run names and
run-folder locks."""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path

RUN_NAME_RE = re.compile(r"^[A-Za-z0-9_.+=-]+$")


def check_run_name(name: str, key: str = "run_name") -> str:
    """``name`` as one folder name inside an output root: no path separators, not ``.`` or ``..``."""
    from lattice_lab.common.errors import ConfigError

    name = str(name)
    if not RUN_NAME_RE.match(name) or set(name) == {"."}:
        raise ConfigError(f"{key}={name!r}: use only letters, digits and _ . + = - (one folder name, not . or ..)")
    return name


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp"):
    """Yield a temporary path in the target's folder; on success rename it to ``path``.

    On an exception the temporary file is removed and the target is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file normal permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def load_torch_file(path: str | os.PathLike, key: str = "checkpoint"):
    """``torch.load`` a file we wrote (on CPU); an unreadable, truncated or foreign file raises
    :class:`~lattice_lab.common.errors.ConfigError` naming ``key`` and the path."""
    import torch

    from lattice_lab.common.errors import ConfigError

    try:
        # weights_only=False: our files hold RNG states (numpy) and optimizer states; only load your own
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - pickle, zip and torch raise many types; report one clear line
        detail = str(exc).splitlines()[0][:200] if str(exc) else ""
        raise ConfigError(f"{key}={str(path)!r}: not a readable torch file, corrupted or of another kind "
                          f"({type(exc).__name__}: {detail})") from None


def atomic_torch_save(obj, path: str | os.PathLike) -> Path:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


LOCK_FILE = ".lock"


@contextlib.contextmanager
def run_lock(folder: str | os.PathLike, what: str, *, shared: bool = False, wait: bool = False):
    """Hold ``<folder>/.lock`` while a run writes there (exclusive) or reads a finished run (``shared``):
    a second process on the same folder -- the same command started twice, a comparison extending a
    shared ED run that others read -- gets a ConfigError naming ``what`` instead of two writers in one
    HDF5 file. An advisory ``flock`` (POSIX; released by the OS when the process dies; elsewhere no
    lock). A reader opens the lock file read-only and, where there is none, holds no lock. ``wait``:
    block until the lock is free instead of refusing."""
    from lattice_lab.common.errors import ConfigError

    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    path = Path(folder) / LOCK_FILE
    if shared and not path.exists():  # a reader writes nothing (a run made before locks, a read-only disk)
        yield
        return
    with open(path, "r" if shared else "a+") as f:
        try:
            fcntl.flock(f, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB))
        except OSError:
            raise ConfigError(f"{what}: {folder} is in use by another process (a run writing there, or "
                              "comparisons reading it); wait for it to finish, or choose another folder") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
