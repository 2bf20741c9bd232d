import os
import stat

import pytest
import torch

from lattice_lab.common.cli import friendly_errors
from lattice_lab.common.device import resolve_device, resolve_dtype
from lattice_lab.common.errors import ConfigError
from lattice_lab.common.io import atomic_path, atomic_torch_save, atomic_write_text
from lattice_lab.lattice import checkerboard, gather_offsets, nn_sum, translate


def test_atomic_write_replaces_and_keeps_target_on_error(tmp_path):
    target = tmp_path / "sub" / "out.txt"
    atomic_write_text(target, "first")
    assert target.read_text() == "first"
    mode = stat.S_IMODE(os.stat(target).st_mode)
    assert mode & 0o044, f"file should be readable by group/others under the default umask, got {oct(mode)}"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half-written")
            raise RuntimeError("crash")
    assert target.read_text() == "first"
    assert [p.name for p in target.parent.iterdir()] == ["out.txt"], "temporary file left behind"
    atomic_torch_save({"x": torch.arange(3)}, tmp_path / "t.pt")
    assert torch.equal(torch.load(tmp_path / "t.pt")["x"], torch.arange(3))


def test_device_and_dtype_errors_name_the_value():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(ConfigError, match="'gpu0'"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda")
    assert resolve_dtype("float64") is torch.float64
    with pytest.raises(ConfigError, match="'float8'"):
        resolve_dtype("float8")


def test_friendly_errors_prints_one_line_and_exits_2(capsys):
    @friendly_errors
    def task():
        raise ConfigError("hamiltonian.kappa=0.3: need |kappa| < k/4 = 0.25")

    with pytest.raises(SystemExit) as exc:
        task()
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: hamiltonian.kappa=0.3: need |kappa| < k/4 = 0.25"


def test_periodic_helpers_match_explicit_indexing():
    g = torch.Generator().manual_seed(1)
    L = 5
    f = torch.randn(2, L, L, generator=g, dtype=torch.float64)
    nn = nn_sum(f)
    x, y = 1, 4
    expect = f[:, (x + 1) % L, y] + f[:, (x - 1) % L, y] + f[:, x, (y + 1) % L] + f[:, x, (y - 1) % L]
    assert torch.allclose(nn[:, x, y], expect)
    offsets = torch.tensor([[0, 0], [2, -1], [-3, 3]])
    env = gather_offsets(f, offsets)
    for m, (dx, dy) in enumerate(offsets.tolist()):
        assert torch.equal(env[:, x, y, m], f[:, (x + dx) % L, (y + dy) % L])
    assert torch.equal(translate(f, (1, 2))[:, (x + 1) % L, (y + 2) % L], f[:, x, y])
    cb = checkerboard(4)
    assert cb[0, 0] == 1 and cb[0, 1] == -1 and cb[1, 1] == 1 and cb.sum() == 0
