"""Native descriptor + MLP forces (lattice_lab.native.mlp, mlp_forward.cpp): the same numbers as the
torch path (float64 to 1e-12, float32 to ~1e-5), exact D4 and translation equivariance, parameter and
buffer updates, the elastic prior in the same call, NaN propagation, when it is (not) used, and the
fallback to the torch path without a compiler."""

import math

import pytest
import torch
from test_enn import _equivariance_error  # tests/ is on sys.path (rootdir conftest)
from test_mlp import _randomise

from lattice_lab.common.errors import ConfigError
from lattice_lab.models.mlp import NATIVE_AUTO_MAX_WIDTH, DescriptorMLP
from lattice_lab.models.registry import build_model, load_preset
from lattice_lab.native import load
from lattice_lab.native.mlp import MLPForces
from lattice_lab.physics.holstein import linear_elastic_force
from lattice_lab.symmetry import apply_group_element

HAM = {"t": 1.0, "g": 3.5, "k": 1.0, "kappa": 0.18, "temperature": 0.1, "filling": "canonical"}
SQRT13 = math.sqrt(13.0)


def _model(hidden, dtype, seed=5, **kw):
    return _randomise(DescriptorMLP(HAM, SQRT13, hidden, **kw).to(dtype), seed).eval()


def _check_close(got, ref, dtype):
    if dtype == torch.float64:
        torch.testing.assert_close(got, ref, atol=1e-12, rtol=0)
    else:
        torch.testing.assert_close(got, ref, atol=1e-5 * float(ref.abs().max()), rtol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("hidden", [[64, 32], [13, 5, 7]])  # the preset; odd widths (zero padding)
@pytest.mark.parametrize(("B", "L"), [(1, 7), (3, 7), (1, 9), (3, 20), (1, 37)])
def test_native_matches_torch_path(dtype, hidden, B, L):
    model = _model(hidden, dtype)
    Q = 1.5 * torch.randn(B, L, L, dtype=dtype)
    with torch.inference_mode():
        got = model(Q)
        assert isinstance(model._native.get(dtype), MLPForces)  # the native path ran
        ref = model.compute_forces(Q)  # the torch path (what the TorchScript export runs)
        assert ref.std() > 1e-2  # non-trivial forces
        _check_close(got, ref, dtype)
        total = model.native_forces(Q, 1.3, 0.25)  # with the elastic force, in the same call
        _check_close(total, ref + linear_elastic_force(Q, 1.3, 0.25), dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_native_with_tiles_of_several_slot_groups(dtype):
    """Tiles of 4 TV slots (what weights beyond the last-level cache get) ending in a partial tile; the
    plan's scratch holds the projection and hidden layers 0, 2 (buffer B), the features and layer 1 (A)."""
    from lattice_lab.native import mlp as native_mlp

    model = _model([13, 5, 7], dtype)
    kernel = MLPForces(model, dtype, tile_slots=4 * load("mlp_forward").ll_mlp_group())
    plan, widths = kernel.plan, kernel.widths_out
    assert plan[native_mlp.P_ROWS_B] >= max(model.descriptor.proj.kernel_np.shape[0], widths[0], widths[2])
    assert plan[native_mlp.P_ROWS_A] >= max(model.descriptor.n_features, widths[1])
    Q = torch.randn(2, 11, 11, dtype=dtype)
    with torch.no_grad():
        _check_close(kernel(Q, 1.3, 0.25), model.compute_forces(Q) + linear_elastic_force(Q, 1.3, 0.25), dtype)


def test_native_independent_of_thread_count():
    model = _model([16, 8], torch.float32)
    Q = torch.randn(2, 33, 33)
    threads = torch.get_num_threads()
    try:
        with torch.no_grad():
            torch.set_num_threads(1)
            one = model(Q)
            torch.set_num_threads(2)
            two = model(Q)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)  # every site is computed the same way by any thread


def test_native_exact_equivariance():
    """All 8 D4 operations and translations, through the native path (float64)."""
    model = _model([12, 6], torch.float64)
    Q = torch.randn(2, 10, 10, dtype=torch.float64)
    with torch.no_grad():
        err, F = _equivariance_error(model, Q)
        assert isinstance(model._native.get(torch.float64), MLPForces)
    assert F.std() > 1e-2 and not torch.allclose(F, apply_group_element(F, 1))
    assert err < 1e-12 * float(F.abs().max())


def test_native_follows_parameter_and_buffer_updates():
    model = _model([8, 4], torch.float64)
    Q = torch.randn(1, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        before = model(Q)
        for p in model.parameters():  # an optimizer step: in place
            p.mul_(1.1).add_(0.01)
        after = model(Q)
        torch.testing.assert_close(after, model.compute_forces(Q), atol=1e-12, rtol=0)
        assert (after - before).abs().max() > 1e-3
        model.feat_mean.add_(0.3)  # normalisation buffers too
        model.feat_std.mul_(1.2)
        model.out_scale.fill_(0.7)
        model.out_shift.fill_(-0.2)
        torch.testing.assert_close(model(Q), model.compute_forces(Q), atol=1e-12, rtol=0)
        model.net[0].weight.data = torch.randn_like(model.net[0].weight)  # replaced storage
        torch.testing.assert_close(model(Q), model.compute_forces(Q), atol=1e-12, rtol=0)
        model.float()  # .to() replaces the buffers; a float32 kernel is built
        Q32 = Q.float()
        got = model(Q32)
        torch.testing.assert_close(got, model.compute_forces(Q32), atol=1e-5 * float(got.abs().max()), rtol=0)


def test_native_follows_each_buffer_alone_and_untracked_writes():
    """Every normalisation buffer on its own is part of the weight tables' key (above they change
    together), and a write through ``.data`` (no version counter) is followed after weights_changed()."""
    model = _model([8, 4], torch.float64)
    Q = torch.randn(1, 8, 8, dtype=torch.float64)
    updates = {"feat_mean": lambda t: t.add_(0.3), "feat_std": lambda t: t.mul_(1.2),
               "out_scale": lambda t: t.fill_(0.7), "out_shift": lambda t: t.fill_(-0.2)}
    with torch.no_grad():
        for name, update in updates.items():
            before = model(Q)
            update(getattr(model, name))
            after = model(Q)
            torch.testing.assert_close(after, model.compute_forces(Q), atol=1e-12, rtol=0)
            assert (after - before).abs().max() > 1e-3, name
        version = model.net[0].weight._version
        model.net[0].weight.data.mul_(1.5)
        assert model.net[0].weight._version == version  # torch does not see this write
        model.weights_changed()
        torch.testing.assert_close(model(Q), model.compute_forces(Q), atol=1e-12, rtol=0)
        assert isinstance(model._native.get(torch.float64), MLPForces)


def test_elastic_prior_model_matches_torch_path():
    model = build_model(load_preset("mlp_small"), HAM).double().eval()
    assert model.model_cfg["native_kernel"] == "auto" and model.network.native_kernel == "auto"
    _randomise(model.network)
    Q = torch.randn(2, 12, 12, dtype=torch.float64)
    with torch.inference_mode():
        got = model(Q)
        assert isinstance(model.network._native.get(torch.float64), MLPForces)
        ref = model.compute_forces(Q)  # network (torch) + elastic force
    torch.testing.assert_close(got, ref, atol=1e-12, rtol=0)


def test_native_propagates_nan():
    """A diverging simulation is detected by non-finite forces: ReLU must not turn NaN into 0."""
    model = _model([8, 4], torch.float32)
    Q = torch.randn(1, 12, 12)
    Q[0, 4, 5] = float("nan")
    with torch.no_grad():
        F = model(Q)  # the network alone: no -kQ term that would carry the NaN
        assert isinstance(model._native.get(torch.float32), MLPForces)
    dx, dy = torch.meshgrid(torch.arange(-3, 4), torch.arange(-3, 4), indexing="ij")
    inside = (dx * dx + dy * dy <= 13).nonzero()
    for a, b in inside.tolist():  # every site whose environment contains the NaN
        assert torch.isnan(F[0, (4 + a - 3) % 12, (5 + b - 3) % 12])
    assert torch.isfinite(F[0, 11, 11])  # far away


def test_not_used_with_autograd_disabled_or_too_wide(monkeypatch):
    Q = torch.randn(1, 8, 8, dtype=torch.float64)
    model = _model([8, 4], torch.float64)
    Qg = Q.clone().requires_grad_()
    F = model(Qg)  # autograd recording: the torch path, differentiable
    assert F.grad_fn is not None and model.native_forces(Qg) is None and not model._native
    with torch.no_grad():
        assert model.native_forces(Q) is not None
        monkeypatch.setenv("LATTICE_LAB_NATIVE", "0")
        assert model.native_forces(Q) is None
        monkeypatch.delenv("LATTICE_LAB_NATIVE")
        off = _model([8, 4], torch.float64, native_kernel=False)
        off.load_state_dict(model.state_dict())
        assert off.native_forces(Q) is None
        torch.testing.assert_close(off(Q), model(Q), atol=1e-12, rtol=0)
        wide = [NATIVE_AUTO_MAX_WIDTH + 1, 4]  # auto: native only with AVX-512 (MKL is faster with AVX2)
        auto = DescriptorMLP(HAM, SQRT13, wide).double().eval()
        assert (auto.native_forces(Q) is not None) == (load("mlp_forward").ll_mlp_vector_bytes() == 64)
        forced = DescriptorMLP(HAM, SQRT13, wide, native_kernel=True).double().eval()
        torch.testing.assert_close(forced(Q), forced.compute_forces(Q), atol=1e-12, rtol=0)
        assert isinstance(forced._native.get(torch.float64), MLPForces)
    with pytest.raises(ConfigError, match="native_kernel"):
        DescriptorMLP(HAM, SQRT13, [4], native_kernel="yes")


def test_auto_choice():
    small, wide = DescriptorMLP(HAM, SQRT13, [64, 32]), DescriptorMLP(HAM, SQRT13, [NATIVE_AUTO_MAX_WIDTH + 1, 8])
    assert small.auto_prefers_native(32) and small.auto_prefers_native(64)
    assert wide.auto_prefers_native(64) and not wide.auto_prefers_native(32)  # AVX2: MKL is faster


def test_config_without_native_kernel_key():
    """An old checkpoint's model config has no native_kernel: the default (auto) is filled in."""
    model = build_model({"name": "mlp", "hidden": [8, 4], "elastic_prior": True}, HAM)
    assert model.model_cfg["native_kernel"] == "auto"


def test_fallback_to_torch_path_without_compiler(no_compiler):
    model = _model([8, 4], torch.float64)
    Q = torch.randn(1, 9, 9, dtype=torch.float64)
    with torch.no_grad(), pytest.warns(UserWarning, match="native CPU kernel unavailable"):
        got = model(Q)
    with torch.no_grad():
        torch.testing.assert_close(got, model.compute_forces(Q), atol=1e-12, rtol=0)
        forced = _model([8, 4], torch.float64, native_kernel=True)
        with pytest.raises(ConfigError, match="native_kernel=true.*no C\\+\\+ compiler"):
            forced(Q)
