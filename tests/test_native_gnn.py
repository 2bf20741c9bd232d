"""Native CPU kernel of the direct-force GNN (lattice_lab.native.gnn): the same forces as the torch
path (float64 to 1e-12, float32 to ~1e-5), every supported activation and both aggregations, exact
equivariance, parameter updates, when it is (not) used, the fallback without a compiler, NaN
propagation and the ElasticPrior-wrapped preset."""

import contextlib
import copy
import pickle

import pytest
import torch
from test_enn import _equivariance_error  # tests/ is on sys.path (rootdir conftest)

import lattice_lab.native.gnn as native_gnn
from lattice_lab.common.errors import ConfigError
from lattice_lab.models.checkpoint import load_checkpoint, save_checkpoint
from lattice_lab.models.gnn import GNN, NATIVE_ACTIVATIONS, NATIVE_AUTO_MAX_WIDTH
from lattice_lab.models.registry import build_model, load_preset
from lattice_lab.native.gnn import PACK_ABOVE, GNNForces, packed_chunk, widest_chunk

HAM = {"t": 1.0, "g": 3.5, "k": 1.0, "kappa": 0.18, "temperature": 0.1, "filling": "canonical"}
# c_out 6, 40, 5, 1: register chunks of 2, 8 (a packed layer: wider than PACK_ABOVE), 1 and 1 output channels
WIDTHS = [1, 6, 40, 5, 1]


def _randomise(model: GNN, seed: int = 0) -> GNN:
    """Random weights and biases (pre-activations of both signs, some large) and normalisation."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p * (1 + 0.5 * torch.randn(p.shape, generator=g, dtype=p.dtype))
                    + 0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        model.q_mean.fill_(0.3)
        model.q_std.fill_(1.7)
        model.f_mean.fill_(-0.2)
        model.f_std.fill_(2.5)
    return model


def _gnn(dtype=torch.float64, widths=WIDTHS, seed=0, **kw) -> GNN:
    return _randomise(GNN(HAM, widths=list(widths), **kw), seed).to(dtype).eval()


def _elastic(Q, k=HAM["k"], kappa=HAM["kappa"]):
    nn = Q.roll(1, -2) + Q.roll(-1, -2) + Q.roll(1, -1) + Q.roll(-1, -1)
    return -k * Q - kappa * nn


@contextlib.contextmanager
def _threads(n: int):
    """torch's (and so the kernel's) thread count set to ``n`` inside the block."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def test_pack_threshold_is_exercised():
    assert max(WIDTHS) > PACK_ABOVE >= min(WIDTHS[1:-1])


@pytest.mark.parametrize("widest", [16, 8, 4, 2])
def test_every_packed_chunk_width_gives_the_torch_forces(monkeypatch, widest):
    """A packed layer of 48 outputs in chunks of 16, 8, 4 or 2 (the kernel's widest chunk is 16 with
    AVX-512, 8 with AVX2: each CPU runs one of them by default, every layout must be right)."""
    assert packed_chunk(48, widest) == widest and packed_chunk(40, 16) == 8 and packed_chunk(5) == 1
    assert widest_chunk() in (8, 16)
    monkeypatch.setattr(native_gnn, "widest_chunk", lambda: widest)
    model = _gnn(widths=[1, 6, 48, 5, 1], activation="silu", seed=3)
    kernel = GNNForces(model, torch.float64)
    assert kernel.ready() and kernel.packed == [False, True, False, False]
    assert int(kernel.dims[2 + 5 + 3 * 1 + 2]) == widest  # layer 2's packed chunk in the kernel's dims
    Q = 2.0 * torch.randn(2, 13, 13, dtype=torch.float64)
    with torch.no_grad():
        ref = model.compute_forces(Q)
    torch.testing.assert_close(kernel(Q, HAM["k"], HAM["kappa"]), ref + _elastic(Q), atol=1e-12, rtol=0)


@pytest.mark.parametrize("activation", NATIVE_ACTIVATIONS)
@pytest.mark.parametrize("aggregation", ["sum", "mean"])
@pytest.mark.parametrize(("B", "L"), [(1, 9), (3, 11), (1, 20)])  # minimum L = 2 * 4 + 1, odd, not a power of 2
def test_native_matches_torch_path(activation, aggregation, B, L):
    model = _gnn(activation=activation, aggregation=aggregation)
    Q = 2.0 * torch.randn(B, L, L, dtype=torch.float64)
    with torch.no_grad():
        assert isinstance(model.native_plan(Q), GNNForces)
        got = model(Q)
        ref = model.compute_forces(Q)  # the torch path (what the TorchScript export runs)
        with_prior = model.native_forces(Q, HAM["k"], HAM["kappa"])
    assert ref.std() > 1e-2  # non-trivial forces
    torch.testing.assert_close(got, ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(with_prior, ref + _elastic(Q), atol=1e-12, rtol=0)
    model32 = model.float()
    with torch.no_grad():
        got32 = model32.native_forces(Q.float(), HAM["k"], HAM["kappa"])
    assert got32.dtype == torch.float32 and isinstance(model32._native.get(torch.float32), GNNForces)
    torch.testing.assert_close(got32, (ref + _elastic(Q)).float(), atol=1e-5 * float(ref.abs().max()), rtol=1e-5)


@pytest.mark.parametrize("threads", [2, 3])
def test_native_chunks_and_seams_on_several_threads(threads):
    """Several row chunks (one per thread, unequal sizes) and the seams between them; the preset widths.
    A batch of 3 runs whole configurations per thread (2 of them on 2 threads, the third row-parallel;
    all 3 on 3 threads): bitwise the forces of each configuration alone (row-parallel)."""
    model = _gnn(widths=[1, 16, 32, 16, 1], activation="silu")
    Q = torch.randn(3, 37, 37, dtype=torch.float64)
    with _threads(threads), torch.no_grad():
        got = model(Q)
        alone = torch.cat([model(Q[i:i + 1]) for i in range(3)])
    assert torch.equal(got, alone)
    with torch.no_grad():
        torch.testing.assert_close(got, model.compute_forces(Q), atol=1e-12, rtol=0)
        torch.testing.assert_close(got, model(Q), atol=1e-12, rtol=0)  # other thread count: same forces


@pytest.mark.parametrize("L", [9, 12, 16, 17])
def test_native_small_lattices_on_two_threads(L):
    """4 layers on 2 threads: L < 16 leaves one chunk of rows (each chunk needs 2 x 4 rows: the team is
    one thread for B = 1, and whole configurations per thread for B >= 2), L = 16, 17 two chunks of 8
    or 9 rows (the thinnest). The scratch memory has a chunk per thread, which the whole configurations use."""
    model = _gnn()
    kernel = GNNForces(model, torch.float64)
    assert kernel.ready()
    one = kernel.workspace(L, 1, cached=False)[0].numel()
    assert kernel.workspace(L, 2, cached=False)[0].numel() >= 2 * one
    Q = torch.randn(3, L, L, dtype=torch.float64)
    with torch.no_grad():
        ref = model.compute_forces(Q) + _elastic(Q)
        with _threads(2):
            for B in (1, 2, 3):
                torch.testing.assert_close(kernel(Q[:B], HAM["k"], HAM["kappa"]), ref[:B], atol=1e-12, rtol=0)


def test_kernel_refuses_what_it_cannot_compute():
    """A lattice smaller than 2 x layers + 1 (the model rejects it before: its receptive field), a packed
    chunk that does not divide its layer's outputs: the kernel's workspace query says no."""
    kernel = GNNForces(_gnn(), torch.float64)
    assert kernel.ready()
    with pytest.raises(ValueError, match="L=8 too small"):
        kernel(torch.randn(1, 8, 8, dtype=torch.float64))
    kernel.dims[2 + 5 + 3 * 1 + 2] = 16  # layer 2 (40 outputs, packed) in chunks of 16
    with pytest.raises(ValueError, match="L=9 too small"):
        kernel.workspace(9, 1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("widths", [[1, 16, 32, 16, 1], WIDTHS])
def test_native_exact_equivariance(widths, dtype):
    """All 8 D4 operations and translations through the kernel, exact to the last bit: the neighbour sum
    (up + down) + (left + right) rounds the same way in every orientation, and every site of a row is
    summed in the same order, in the full vector blocks and in the shorter ones at the row's end (L = 9 ..
    37: rows of 1 to 10 vectors, some ending in a shorter block, for 4-, 8- and 16-lane vectors alike)."""
    model = _gnn(widths=widths).to(dtype)
    for L in (9, 10, 13, 20, 23, 37):
        Q = torch.randn(2, L, L, dtype=dtype)
        with torch.no_grad():
            assert model.native_plan(Q) is not None
            err, F = _equivariance_error(model, Q)
        assert F.std() > 1e-2
        assert err == 0.0, (L, err)


def test_native_weights_follow_parameter_updates():
    model = _gnn()
    Q = torch.randn(1, 11, 11, dtype=torch.float64)
    with torch.no_grad():
        before = model(Q)
        for p in model.parameters():  # an optimizer step: in place (the packed layer included)
            p.mul_(1.1).add_(0.01)
        model.f_std.fill_(1.3)
        after = model(Q)
        assert (after - before).abs().max() > 1e-3
        torch.testing.assert_close(after, model.compute_forces(Q), atol=1e-12, rtol=0)
        model.layers[1].w_self.data = torch.randn_like(model.layers[1].w_self)  # replaced storage
        torch.testing.assert_close(model(Q), model.compute_forces(Q), atol=1e-12, rtol=0)
        twin = copy.deepcopy(model)  # its own kernel, reading its own tensors
        assert not twin._native
        twin.layers[0].bias.add_(1.0)
        torch.testing.assert_close(twin(Q), twin.compute_forces(Q), atol=1e-12, rtol=0)
        torch.testing.assert_close(model(Q), model.compute_forces(Q), atol=1e-12, rtol=0)
        assert not pickle.loads(pickle.dumps(model))._native
        other = _gnn(seed=5)
        model.load_state_dict(other.state_dict(), assign=True)  # replaced tensors
        torch.testing.assert_close(model(Q), other.compute_forces(Q), atol=1e-12, rtol=0)
        model.float()  # .to(): a float32 kernel; the float64 one no longer applies
        assert model.native_plan(Q) is None
        got = model(Q.float())
        torch.testing.assert_close(got, model.compute_forces(Q.float()), atol=1e-5 * float(got.abs().max()), rtol=0)


def test_bound_function_serves_every_case_of_a_call():
    """The provider's per-step closure (GNNForces.bind): the cached-workspace path, a size without a
    workspace yet, a non-contiguous input, a call while another is in flight (its own scratch memory),
    a replaced parameter, and None once the weights are in another dtype."""
    model = _gnn()
    Q = torch.randn(2, 11, 11, dtype=torch.float64)
    with torch.no_grad():
        f = model.native_function(Q, k=HAM["k"], kappa=HAM["kappa"])

        def check(X):
            torch.testing.assert_close(f(X), model.compute_forces(X) + _elastic(X), atol=1e-12, rtol=0)

        check(Q)  # builds the workspace through __call__
        check(Q)  # the cached path
        check(torch.randn(1, 13, 13, dtype=torch.float64))  # another size
        check(torch.randn(2, 11, 22, dtype=torch.float64)[..., ::2])  # not contiguous
        plan = model._native[torch.float64]
        with plan._busy:  # another call in flight
            check(Q)
        model.layers[2].w_nn.data = torch.randn_like(model.layers[2].w_nn)  # the packed layer, replaced
        check(Q)
        model.float()
        assert f(Q) is None


def test_call_while_busy_leaves_the_cached_scratch_alone():
    """A call while another is in flight (here: the lock held) computes in private scratch memory: the
    cached workspace, which the call in flight is using, is neither read nor written."""
    model = _gnn()
    kernel = GNNForces(model, torch.float64)
    assert kernel.ready()
    Q = torch.randn(2, 11, 11, dtype=torch.float64)
    with torch.no_grad():
        kernel(Q)
        cached = kernel._work[(11, torch.get_num_threads())][0]
        before = cached.clone()
        Q2 = torch.randn(2, 11, 11, dtype=torch.float64)
        with kernel._busy:
            got = kernel(Q2, HAM["k"], HAM["kappa"])
        torch.testing.assert_close(got, model.compute_forces(Q2) + _elastic(Q2), atol=1e-12, rtol=0)
    assert torch.equal(cached, before)


def test_native_follows_reallocated_and_non_contiguous_parameters():
    """The packed copy of a wide layer is rebuilt when its weights are replaced, even by a tensor at the
    address of one replaced before (the kernel keeps the memory of the tensors its table was built from);
    a non-contiguous parameter is not read by the kernel (the torch path serves)."""
    model = _gnn()
    layer = model.layers[1]  # 40 outputs: packed
    assert GNNForces(model, torch.float64).packed[1]
    Q = torch.randn(1, 11, 11, dtype=torch.float64)
    with torch.no_grad():
        for _ in range(20):  # the allocator reuses that memory in most rounds (without the kernel's hold)
            model(Q)  # the table and the packed copy of the current weights
            layer.w_nn.data = torch.randn_like(layer.w_nn)
            layer.w_nn.data = torch.randn_like(layer.w_nn)  # where the one before was, unless it is held
            torch.testing.assert_close(model(Q), model.compute_forces(Q), atol=1e-12, rtol=0)
        layer.w_self.data = torch.randn(layer.c_out, layer.c_in, dtype=torch.float64).t()
        assert not layer.w_self.is_contiguous() and model.native_plan(Q) is None
        torch.testing.assert_close(model(Q), model.compute_forces(Q), atol=0, rtol=0)


def test_native_not_used_with_autograd_setting_or_environment(monkeypatch):
    model = _gnn()
    Q = torch.randn(1, 9, 9, dtype=torch.float64)
    Qg = Q.clone().requires_grad_()
    F = model(Qg)  # autograd recording (training): the torch path, differentiable
    assert F.grad_fn is not None and model.native_plan(Qg) is None and not model._native
    with torch.no_grad():
        assert model.native_plan(Q) is not None
        assert model.native_plan(Q.to(torch.bfloat16)) is None
        monkeypatch.setenv("LATTICE_LAB_NATIVE", "0")
        assert model.native_plan(Q) is None and model.native_forces(Q) is None
        monkeypatch.delenv("LATTICE_LAB_NATIVE")
        off = _gnn(native_kernel=False)
        off.load_state_dict(model.state_dict())
        assert off.native_plan(Q) is None
        torch.testing.assert_close(off(Q), model(Q), atol=1e-12, rtol=0)
        gelu = _gnn(activation="gelu")  # auto: silently the torch path
        assert gelu.native_plan(Q) is None and torch.isfinite(gelu(Q)).all()
        if NATIVE_AUTO_MAX_WIDTH is not None:  # auto: the torch path where MKL is faster
            wide = [1, NATIVE_AUTO_MAX_WIDTH + 1, 1]
            assert GNN(HAM, widths=wide).double().native_plan(Q) is None
            forced = GNN(HAM, widths=wide, native_kernel=True).double().eval()
            assert forced.native_plan(Q) is not None
            torch.testing.assert_close(forced(Q), forced.compute_forces(Q), atol=1e-12, rtol=0)
    for bad in ["yes", 1, None]:
        with pytest.raises(ConfigError, match="model.native_kernel"):
            GNN(HAM, widths=[1, 4, 1], native_kernel=bad)
    with pytest.raises(ConfigError, match="model.native_kernel=true.*'gelu'"):
        GNN(HAM, widths=[1, 4, 1], activation="gelu", native_kernel=True)


def test_fallback_to_torch_path_without_compiler(no_compiler):
    model = _gnn()
    Q = torch.randn(1, 9, 9, dtype=torch.float64)
    with torch.no_grad(), pytest.warns(UserWarning, match="native CPU kernel unavailable"):
        got = model(Q)
    with torch.no_grad():
        assert model.native_plan(Q) is None
        torch.testing.assert_close(got, model.compute_forces(Q), atol=1e-12, rtol=0)
        forced = _gnn(native_kernel=True)
        with pytest.raises(ConfigError, match="native_kernel=true.*no C\\+\\+ compiler"):
            forced(Q)


@pytest.mark.parametrize("activation", NATIVE_ACTIVATIONS)
def test_native_propagates_nan(activation):
    """A diverging simulation is detected by non-finite forces: relu must not turn a NaN into 0."""
    model = _gnn(torch.float32, activation=activation)
    Q = torch.randn(1, 13, 13)
    Q[0, 4, 5] = float("nan")
    with torch.no_grad():
        assert model.native_plan(Q) is not None
        F = model(Q)  # the network alone: no -kQ term that would carry the NaN
        ref = model.compute_forces(Q)
    x, y = torch.meshgrid(torch.arange(13), torch.arange(13), indexing="ij")
    dx, dy = (x - 4 + 6) % 13 - 6, (y - 5 + 6) % 13 - 6
    inside = dx.abs() + dy.abs() <= len(model.layers)  # the receptive field: one hop per layer
    assert torch.equal(torch.isnan(F[0]), inside) and torch.equal(torch.isnan(ref[0]), inside)


def test_elastic_prior_preset_matches_torch_path(monkeypatch):
    model = build_model(load_preset("gnn_small"), HAM).double().eval()
    assert model.model_cfg["native_kernel"] == "auto" and model.network.native_kernel == "auto"
    _randomise(model.network)
    calls = []
    real = native_gnn._functions

    def spy(dtype):  # the kernel's arguments: Q, F, B, &args, k, kappa
        fn, ws = real(dtype)
        return (lambda *a: calls.append(a[4:]) or fn(*a)), ws

    monkeypatch.setattr(native_gnn, "_functions", spy)
    Q = torch.randn(2, 12, 12, dtype=torch.float64)
    with torch.inference_mode():
        got = model(Q)
        ref = model.compute_forces(Q)  # network (torch) + elastic force
    assert calls == [(HAM["k"], HAM["kappa"])]  # one native call for network and elastic force
    torch.testing.assert_close(got, ref, atol=1e-12, rtol=0)


def test_native_kernel_setting_round_trips(tmp_path):
    """An old checkpoint's config has no native_kernel (auto is filled in); the setting is saved."""
    old = build_model({"name": "gnn", "widths": [1, 4, 1], "elastic_prior": True}, HAM)
    assert old.model_cfg["native_kernel"] == "auto"
    model = build_model(dict(load_preset("gnn_small"), native_kernel=False), HAM)
    path = save_checkpoint(tmp_path / "m.pt", model)
    assert load_checkpoint(path)["model_cfg"]["native_kernel"] is False
