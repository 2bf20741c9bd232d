"""HDF5 force datasets: format, round trip, splits, clear errors, atomic writes."""

import h5py
import numpy as np
import pytest
import torch

from lattice_lab.common.errors import ConfigError
from lattice_lab.data import ForceData, read_force_dataset, write_force_dataset
from lattice_lab.physics import ExactForces, HolsteinParams


def _data(C=7, L=4, seed=0):
    rng = np.random.default_rng(seed)
    Q = rng.normal(size=(C, L, L))
    p = HolsteinParams(temperature=0.2)
    res = ExactForces(p).compute(torch.from_numpy(Q))
    kind = (np.arange(C) >= 3).astype(np.uint8)
    return ForceData(Q=Q, F=res.forces.numpy(), n=res.density.numpy(), kind=kind,
                     is_val=np.arange(C) % 3 == 2, attrs={**p.as_dict(), "seed": 5, "config": "a: 1\n"})


def test_round_trip_and_format(tmp_path):
    d = _data()
    path = write_force_dataset(tmp_path / "set.h5", d, {"name": "my_set"})
    with h5py.File(path, "r") as f:
        for name in ("Q", "F", "n"):
            assert f[name].dtype == np.float64 and f[name].shape == (7, 4, 4)
        assert f["kind"].dtype == np.uint8 and f["is_val"].dtype == bool
        assert [x.decode() if isinstance(x, bytes) else x for x in f["kind"].attrs["kind_names"]] \
            == ["random", "quench"]
        for key in ("t", "g", "k", "kappa", "temperature", "filling", "L", "seed", "version", "name",
                    "created", "config"):
            assert key in f.attrs, key
    r = read_force_dataset(path)
    for name in ("Q", "F", "n", "kind", "is_val"):
        assert np.array_equal(getattr(r, name), getattr(d, name)), name
    assert r.L == 4 and len(r) == 7
    assert r.attrs["name"] == "my_set" and r.attrs["seed"] == 5 and r.attrs["config"] == "a: 1\n"
    assert r.hamiltonian() == HolsteinParams(temperature=0.2)
    assert [len(r.split(s)) for s in ("train", "val", "all", "random", "quench")] == [5, 2, 7, 3, 4]
    assert r.split("val").is_val.all() and not r.split("train").is_val.any()
    assert np.array_equal(r.split("val").Q, d.Q[[2, 5]])
    with pytest.raises(ConfigError, match="split='test'"):
        r.split("test")


def test_write_accepts_a_mapping_and_fills_defaults(tmp_path):
    d = _data(C=4)
    path = write_force_dataset(tmp_path / "m.h5", {"Q": d.Q, "F": d.F, "n": d.n, "kind": d.kind},
                               HolsteinParams().as_dict())
    r = read_force_dataset(path)
    assert r.attrs["name"] == "m" and r.attrs["seed"] == -1 and r.attrs["L"] == 4
    assert np.array_equal(r.is_val, [False, False, True, False])


def test_missing_file_and_incomplete_files_give_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        read_force_dataset(tmp_path / "nope.h5")
    with pytest.raises(ConfigError, match="is a folder, not a dataset file"):
        read_force_dataset(tmp_path)
    (tmp_path / "junk.h5").write_text("not hdf5")
    with pytest.raises(ConfigError, match="not a readable HDF5 file"):
        read_force_dataset(tmp_path / "junk.h5")
    path = write_force_dataset(tmp_path / "ok.h5", _data())
    with h5py.File(path, "a") as f:
        del f["F"]
    with pytest.raises(ConfigError, match=r"missing datasets \['F'\]"):
        read_force_dataset(path)
    path = write_force_dataset(tmp_path / "ok2.h5", _data())
    with h5py.File(path, "a") as f:
        del f.attrs["kappa"]
    with pytest.raises(ConfigError, match=r"missing attributes \['kappa'\]"):
        read_force_dataset(path)


def test_damaged_values_give_config_errors_naming_them(tmp_path):
    """A NaN force was reported by training as a learning rate too high; a non-numeric attribute was a
    ValueError traceback."""
    path = write_force_dataset(tmp_path / "nan.h5", _data())
    with h5py.File(path, "a") as f:
        F = f["F"][...]
        F[4, 1, 2] = np.nan
        f["F"][...] = F
    with pytest.raises(ConfigError, match=r"nan.h5'?: F holds NaN or inf in 1 configuration\(s\) \(first: index 4\)"):
        read_force_dataset(path)
    path = write_force_dataset(tmp_path / "attr.h5", _data())
    with h5py.File(path, "a") as f:
        f.attrs["g"] = "abc"
    with pytest.raises(ConfigError, match=r"attr.h5'?: attribute g='abc' is not a number"):
        read_force_dataset(path).hamiltonian()
    path = write_force_dataset(tmp_path / "inf.h5", _data())
    with h5py.File(path, "a") as f:
        Q = f["Q"][...]
        Q[[1, 6], 0, 3] = [np.inf, -np.inf]  # inf, not only NaN
        f["Q"][...] = Q
    with pytest.raises(ConfigError, match=r"inf.h5'?: Q holds NaN or inf in 2 configuration\(s\) "
                                          r"\(first: index 1\)"):
        read_force_dataset(path)
    path = write_force_dataset(tmp_path / "L.h5", _data())
    with h5py.File(path, "a") as f:
        f.attrs["L"] = 5  # the attribute no longer describes the arrays
    with pytest.raises(ConfigError, match=r"L.h5'?: attribute L=5 but Q is \(7, 4, 4\)"):
        read_force_dataset(path)


def test_bad_data_is_rejected_and_existing_file_survives(tmp_path):
    d = _data()
    path = write_force_dataset(tmp_path / "keep.h5", d)
    before = path.read_bytes()
    with pytest.raises(ConfigError, match="F has shape"):
        write_force_dataset(path, {"Q": d.Q, "F": d.F[:, :3], "n": d.n, "kind": d.kind, "attrs": d.attrs})
    with pytest.raises(ConfigError, match="Hamiltonian parameters"):
        write_force_dataset(path, ForceData(d.Q, d.F, d.n, d.kind, d.is_val, attrs={}))
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.h5"]  # no temporary files left


def test_densities_in_a_written_file_are_consistent_with_forces(tmp_path):
    from lattice_lab.physics import density_from_force

    r = read_force_dataset(write_force_dataset(tmp_path / "c.h5", _data()))
    n = density_from_force(torch.from_numpy(r.F), torch.from_numpy(r.Q), r.hamiltonian()).numpy()
    assert np.allclose(n, r.n, atol=1e-12)
