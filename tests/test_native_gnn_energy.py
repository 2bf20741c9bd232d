"""Native CPU kernel of the energy GNN (lattice_lab.native.gnn_energy): forward + hand-written backward
pass equal the autograd forces (float64 to 1e-11, float32 to ~1e-5), on every tiling of the lattice,
exact symmetry, parameter updates, when it is (not) used, the fallback without a compiler, NaN."""

import copy
import itertools

import pytest
import torch
from test_enn import _equivariance_error  # tests/ is on sys.path (rootdir conftest)
from test_native_gnn import _elastic

from lattice_lab.common.errors import ConfigError
from lattice_lab.models.gnn_energy import EnergyGNN
from lattice_lab.models.registry import build_model, load_preset
from lattice_lab.native import gnn_energy as native
from lattice_lab.symmetry import apply_group_element

HAM = {"t": 1.0, "g": 3.5, "k": 1.0, "kappa": 0.18, "temperature": 0.1, "filling": "canonical"}


def _model(dtype=torch.float64, seed=0, **kw):
    """A small EnergyGNN with every parameter and normalisation buffer randomised (eval mode)."""
    cfg = {"width": 6, "blocks": 2, "hidden": 5, "readout": [7, 3]} | kw
    torch.manual_seed(seed)
    model = EnergyGNN(HAM, **cfg).to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():  # LayerNorm weight / bias included
            p.copy_(0.6 * torch.randn_like(p))
        model.q_mean.fill_(0.3)
        model.q_std.fill_(1.7)
        model.f_mean.fill_(-0.2)
        model.e_scale.fill_(4.0)
    return model


def _native_used(model, Q) -> bool:
    return model.native_forces(Q) is not None


def _autograd(model, Q):
    return model._autograd_forces(Q, False).detach()


@pytest.mark.parametrize(("layer_norm", "elastic_prior", "aggregation"),
                         list(itertools.product([True, False], [True, False], ["sum", "mean"])))
@pytest.mark.parametrize(("B", "L"), [(1, 9), (3, 11)])  # L = 9: 2 x receptive field + 1
def test_native_matches_autograd_float64(layer_norm, elastic_prior, aggregation, B, L):
    model = _model(layer_norm=layer_norm, elastic_prior=elastic_prior, aggregation=aggregation)
    Q = 0.5 + torch.randn(B, L, L, dtype=torch.float64)
    assert _native_used(model, Q)
    got, ref = model(Q), _autograd(model, Q)
    assert ref.std() > 1e-2 or (not elastic_prior and ref.std() > 1e-3)
    torch.testing.assert_close(got, ref, atol=1e-11, rtol=0)


@pytest.mark.parametrize(("B", "L"), [(1, 9), (3, 13)])
def test_native_matches_autograd_float32(B, L):
    model = _model(torch.float32, readout=[16], width=16, hidden=16)
    Q = torch.randn(B, L, L)
    got, ref = model(Q), _autograd(model.double(), Q.double())
    torch.testing.assert_close(got, ref.float(), atol=1e-5 * float(ref.abs().max()), rtol=1e-5)


def test_native_extra_elastic_force_and_layer_norm_eps():
    """A call's own elastic constants (``k``, ``kappa``: added to the model's prior) and a LayerNorm eps
    other than the default reach the kernel."""
    model = _model()
    for block in model.blocks:
        block.norm.eps = 0.3
    kernel = native.EnergyGNNForces(model, torch.float64)
    Q = 0.5 + torch.randn(2, 9, 9, dtype=torch.float64)
    ref = _autograd(model, Q)
    torch.testing.assert_close(kernel(Q), ref, atol=1e-11, rtol=0)
    torch.testing.assert_close(kernel(Q, 0.7, -0.3), ref + _elastic(Q, 0.7, -0.3), atol=1e-11, rtol=0)


@pytest.mark.parametrize("blocks", [1, 3])
def test_native_tilings_are_exact(blocks):
    """Every cut of the lattice into tiles (halo of `blocks` rows / columns, periodic when a tile spans
    the lattice, down to tiles of one row) on 1 or 2 threads gives the same forces."""
    model = _model(blocks=blocks, readout=[])
    L = max(4 * blocks + 1, 11)
    Q = torch.randn(2, L, L, dtype=torch.float64)
    ref = _autograd(model, Q)
    kernel = native.EnergyGNNForces(model, torch.float64)
    previous = torch.get_num_threads()
    try:
        for rows, cols, nt in [([0, L], [0, L], 1), ([0, L], [0, L], 2), ([0, 5, L], [0, L], 2),
                               ([0, L], [0, 3, 7, L], 1), ([0, 4, 9, L], [0, 6, L], 2),
                               (list(range(L + 1)), [0, L], 2), ([0, L], list(range(L + 1)), 1),
                               (native._even(L, 5), native._aligned(L, 2, blocks, 4), 2)]:
            kernel._plans[(2, L, nt)] = kernel.table(2, L, nt, rows, cols)
            torch.set_num_threads(nt)
            torch.testing.assert_close(kernel(Q), ref, atol=1e-11, rtol=0, msg=f"tiles {rows} x {cols}, {nt} threads")
    finally:
        torch.set_num_threads(previous)


def test_tile_plan():
    small = dict(blocks=2, lanes=16)
    assert native.tile_plan(1, 32, 1, **small) == ([0, 32], [0, 32])  # one periodic lattice, no halo
    assert native.tile_plan(1, 32, 2, **small) == ([0, 16, 32], [0, 32])  # one band per thread
    assert native.tile_plan(8, 16, 2, **small) == ([0, 16], [0, 16])  # whole lattices per thread
    rows, cols = native.tile_plan(1, 512, 2, **small)
    widths = [b - a for a, b in zip(cols, cols[1:])]
    assert len(rows) > 2 and len(cols) > 2 and cols[-1] == rows[-1] == 512
    assert sum((w + 4) % 16 != 0 for w in widths) <= 1  # tile + halo: whole vectors of 16 sites
    assert (max(widths) + 6) * (512 // (len(rows) - 1) + 7) <= native.TILE_SITES
    with pytest.raises(ValueError, match="bad tiles"):
        native.EnergyGNNForces(_model(), torch.float64).table(1, 12, 1, [0, 12], [0, 7, 5, 12])


def test_native_finite_difference():
    """The native force is -dE/dQ of model.energy (central differences, float64)."""
    model = _model()
    Q = torch.randn(1, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        F = model(Q)
        h = 1e-5
        for i, j in [(0, 0), (4, 7), (8, 3)]:
            dQ = torch.zeros_like(Q)
            dQ[0, i, j] = h
            dE = (model.energy(Q + dQ) - model.energy(Q - dQ)) / (2 * h)
            assert abs(float(F[0, i, j]) + float(dE[0])) < 1e-7


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_native_exact_equivariance(dtype):
    """All 8 D4 operations and translations, through the native kernel."""
    model = _model(dtype)
    Q = torch.randn(2, 10, 10, dtype=dtype)
    assert _native_used(model, Q)
    err, F = _equivariance_error(model, Q)
    assert F.std() > 1e-2 and not torch.allclose(F, apply_group_element(F, 1))
    assert err < (1e-11 if dtype == torch.float64 else 2e-5) * float(F.abs().max())


def test_native_weights_follow_updates():
    model = _model()
    Q = torch.randn(1, 9, 9, dtype=torch.float64)
    before = model(Q)
    with torch.no_grad():
        for p in model.parameters():  # an optimizer step: in place
            p.mul_(1.1).add_(0.01)
        model.q_std.fill_(2.1)  # normalisation buffers too
        model.e_scale.fill_(0.7)
    after = model(Q)
    assert (after - before).abs().max() > 1e-3
    torch.testing.assert_close(after, _autograd(model, Q), atol=1e-11, rtol=0)
    model.float()  # new tensors (data pointers): float32 weights
    torch.testing.assert_close(model(Q.float()).double(), after, atol=1e-4, rtol=1e-4)


def test_native_not_used_for_training_or_when_switched_off(monkeypatch):
    model = _model()
    Q = torch.randn(1, 9, 9, dtype=torch.float64)
    assert _native_used(model, Q)  # eval mode, grad enabled (as the dynamics calls it)
    with torch.no_grad():
        assert _native_used(model, Q)
    assert not _native_used(model, Q.clone().requires_grad_(True))
    assert not _native_used(model, Q.to(torch.bfloat16))
    model.train()
    assert not _native_used(model, Q)  # training: the force loss needs the graph
    F = model(Q)
    assert F.requires_grad
    with torch.no_grad():
        assert _native_used(model, Q)  # training mode without grad: no graph kept, same forces
    model.eval()
    monkeypatch.setenv("LATTICE_LAB_NATIVE", "0")
    assert not _native_used(model, Q)
    monkeypatch.delenv("LATTICE_LAB_NATIVE")
    off = _model(native_kernel=False)
    assert not _native_used(off, Q)
    torch.testing.assert_close(off(Q), model(Q), atol=1e-11, rtol=0)
    for bad in ["yes", 1, None]:
        with pytest.raises(ConfigError, match="model.native_kernel"):
            EnergyGNN(HAM, width=4, blocks=1, native_kernel=bad)


def test_unsupported_models(monkeypatch):
    import lattice_lab.models.gnn_energy as module

    Q = torch.randn(1, 9, 9, dtype=torch.float64)
    tanh = _model(activation="tanh")  # auto: the torch path, silently
    assert not _native_used(tanh, Q)
    with pytest.raises(ConfigError, match="native_kernel=true.*activation Tanh"):
        EnergyGNN(HAM, width=4, blocks=1, activation="tanh", native_kernel=True)
    monkeypatch.setattr(module, "NATIVE_AUTO_MAX_WIDTH", 4)
    wide = _model(width=5)
    assert not _native_used(wide, Q)  # auto: wider than measured
    wide.native_kernel = True
    assert _native_used(wide, Q)


def test_fallback_to_torch_path_without_compiler(no_compiler):
    model = _model()
    Q = torch.randn(1, 9, 9, dtype=torch.float64)
    with pytest.warns(UserWarning, match="native CPU kernel unavailable"):
        got = model(Q)
    torch.testing.assert_close(got, _autograd(model, Q), atol=1e-12, rtol=0)
    forced = _model(native_kernel=True)
    with pytest.raises(ConfigError, match="native_kernel=true.*no C\\+\\+ compiler"):
        forced(Q)


def test_native_propagates_nan():
    """A diverging simulation is detected by non-finite forces: the kernel must not hide a NaN."""
    model = _model(torch.float32)
    for plan in [None, (2, 2)]:
        Q = torch.randn(1, 13, 13)
        Q[0, 4, 5] = float("nan")
        if plan is not None:  # a NaN in a tile's halo too
            kernel = model._native[(torch.float32, "auto")]
            nt = torch.get_num_threads()
            kernel._plans[(1, 13, nt)] = kernel.table(1, 13, nt, native._even(13, plan[0]), native._even(13, plan[1]))
        assert _native_used(model, Q)
        F = model(Q)
        assert torch.isnan(F[0, 4, 5]) and torch.isnan(F).sum() > 1  # the NaN reaches its neighbourhood
        assert torch.isnan(F[0, 4, 9])  # 4 hops: within the receptive field
        assert torch.isfinite(F[0, 4, 10]) and torch.isfinite(F[0, 11, 0])  # farther: finite
    Q = torch.randn(1, 13, 13)
    assert torch.isfinite(model(Q)).all()  # no NaN left behind in the scratch


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_registry_preset_matches_torch_path(dtype):
    cfg = load_preset("gnn_energy_small")
    assert cfg["native_kernel"] == "auto"
    model = build_model(cfg, HAM).to(dtype).eval()
    assert model.model_cfg["native_kernel"] == "auto"
    Q = torch.randn(2, 12, 12, dtype=dtype)
    assert _native_used(model, Q)
    ref = _autograd(model, Q)
    tol = 1e-11 if dtype == torch.float64 else 1e-5 * float(ref.abs().max())
    torch.testing.assert_close(model(Q), ref, atol=tol, rtol=0 if dtype == torch.float64 else 1e-5)


def test_old_config_without_key_copy_and_export(tmp_path):
    from lattice_lab.models.checkpoint import export_force_field, load_exported

    cfg = load_preset("gnn_energy_small")
    del cfg["native_kernel"]  # a checkpoint written before the option existed
    model = build_model(cfg, HAM).double().eval()
    assert model.native_kernel == "auto"
    Q = torch.randn(1, 9, 9, dtype=torch.float64)
    F = model(Q)  # the native kernel is now cached on the model (ctypes objects)
    clone = copy.deepcopy(model)
    assert model._native and not clone._native
    torch.testing.assert_close(clone(Q), F, atol=0, rtol=0)
    path = export_force_field(model, tmp_path / "m.ts.pt", example_L=9)  # TorchScript: autograd inside
    torch.testing.assert_close(load_exported(path)(Q), F, atol=1e-11, rtol=0)
