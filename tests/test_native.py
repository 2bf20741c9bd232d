"""Native CPU kernel of the quadratic irrep layers (lattice_lab.native): the same numbers as the torch
path in float64 (to 1e-12) and float32, exact equivariance, fused tanh, parameter updates, strided
inputs, and the fallback to the torch path when no compiler is available."""

import math

import pytest
import torch
from test_enn import _equivariance_error, _randomise  # tests/ is on sys.path (rootdir conftest)

from lattice_lab.common.errors import ConfigError
from lattice_lab.models.enn import ENN
from lattice_lab.models.layers_equivariant import IrrepActivation, QuadraticIrrepLayer
from lattice_lab.native import build
from lattice_lab.native.quadratic import QuadraticKernel, channel_chunk
from lattice_lab.symmetry import IRREPS, apply_group_element

HAM = {"t": 1.0, "g": 3.5, "k": 1.0, "kappa": 0.18, "temperature": 0.1, "filling": "canonical"}
SQRT13 = math.sqrt(13.0)
ENV = {"A1": 9, "A2": 3, "B1": 6, "B2": 5, "E": 11}  # input irreps of the sqrt(13) environment


def _random_layer(in_counts, out_counts, dtype, seed=0):
    torch.manual_seed(seed)
    layer = QuadraticIrrepLayer(in_counts, out_counts).to(dtype).eval()
    if layer.bias is not None:
        with torch.no_grad():
            layer.bias.normal_()
    return layer


def _packed_input(layer, n, dtype, scale=1.0):
    X = scale * torch.randn(n, len(layer.in_rows), layer.cp, dtype=dtype)
    for r, (ir, _g) in enumerate(layer.in_rows):
        X[:, r, layer.in_counts[ir]:] = 0  # padding channels are zero in the packed layout
    return X


def _sites_last(X):
    return X.permute(1, 2, 0).reshape(-1, X.shape[0]).contiguous()


def _packed(Y, layer, n):
    return Y.view(len(layer.out_rows), layer.kp, n).permute(2, 0, 1)


LAYERS = [
    (ENV, {ir: 6 for ir in IRREPS}),
    ({ir: 5 for ir in IRREPS}, {ir: 3 for ir in IRREPS}),  # odd widths: kp = 3 -> one channel at a time
    ({"A1": 3, "B1": 1, "E": 2}, {"A1": 2, "E": 4, "B2": 12}),  # missing irreps, kp = 12 -> chunks of 4
    ({ir: 4 for ir in IRREPS}, {"A1": 1}),  # a readout
    ({"A1": 2, "E": 3}, {"E": 2, "A2": 2}),  # no A1 output: no bias
]


@pytest.mark.parametrize(("in_counts", "out_counts"), LAYERS)
@pytest.mark.parametrize("n", [1, 16, 37])
def test_kernel_matches_torch_layer(in_counts, out_counts, n):
    layer = _random_layer(in_counts, out_counts, torch.float64)
    X = _packed_input(layer, n, torch.float64)
    with torch.no_grad():
        ref = layer.forward_packed(X)
        got = _packed(QuadraticKernel(layer, torch.float64)(_sites_last(X)), layer, n)
    assert ref.abs().max() > 0.1
    torch.testing.assert_close(got, ref, atol=1e-12, rtol=0)
    layer32 = layer.float()
    with torch.no_grad():
        got32 = _packed(QuadraticKernel(layer32, torch.float32)(_sites_last(X.float())), layer32, n)
    torch.testing.assert_close(got32, ref.float(), atol=1e-5 * float(ref.abs().max()), rtol=1e-5)


def test_kernel_fused_tanh_matches_activation():
    layer = _random_layer(ENV, {ir: 8 for ir in IRREPS}, torch.float64)
    n = 45
    X = _packed_input(layer, n, torch.float64, scale=4.0)  # outputs from ~1e-3 up to |y| ~ 100: all tanh regimes
    act = IrrepActivation({ir: 8 for ir in IRREPS}, "tanh")
    with torch.no_grad():
        pre = layer.forward_packed(X)
        ref = act(dict(zip(["A1", "A2", "B1", "B2"], [pre[:, r:r + 1].transpose(1, 2) for r in range(4)]))
                  | {"E": pre[:, 4:6].transpose(1, 2)})
        got = _packed(QuadraticKernel(layer, torch.float64, tanh=True)(_sites_last(X)), layer, n)
    assert pre.abs().max() > 20 and pre.abs().min() < 1e-2
    for r, ir in enumerate(["A1", "A2", "B1", "B2"]):
        torch.testing.assert_close(got[:, r], ref[ir][:, :, 0], atol=1e-14, rtol=0)
    torch.testing.assert_close(got[:, 4:6].transpose(1, 2), ref["E"], atol=1e-14, rtol=0)


def test_kernel_reads_strided_columns_and_writes_into_out():
    layer = _random_layer({ir: 3 for ir in IRREPS}, {"A1": 1}, torch.float64)
    X = _sites_last(_packed_input(layer, 50, torch.float64))
    kernel = QuadraticKernel(layer, torch.float64)
    out = torch.full((1, 100), 7.0, dtype=torch.float64)
    kernel(X[:, 10:40], out=out[:, 20:50])  # a column slice (row stride 50), into a slice of out
    torch.testing.assert_close(out[:, 20:50], kernel(X)[:, 10:40], atol=0, rtol=0)
    assert torch.all(out[:, :20] == 7.0) and torch.all(out[:, 50:] == 7.0)  # nothing written outside
    with pytest.raises(ValueError, match="unit stride"):
        kernel(X.t().contiguous().t())
    with pytest.raises(ValueError, match="expected a CPU"):
        kernel(X.float())


def test_channel_chunks():
    assert [channel_chunk(k) for k in (1, 2, 3, 4, 6, 8, 12, 32)] == [1, 2, 1, 4, 2, 8, 4, 8]


def _randomised_enn(hidden, activation, dtype, **kw):
    return _randomise(ENN(HAM, SQRT13, hidden, activation=activation, **kw).to(dtype)).eval()


@pytest.mark.parametrize("activation", ["tanh", "gate", "authors"])
@pytest.mark.parametrize(("B", "L", "chunk"), [(1, 9, 10 ** 6), (3, 12, 10 ** 6), (1, 24, 200)])
def test_native_enn_matches_torch_path(activation, B, L, chunk):
    model = _randomised_enn([5, 3, 2], activation, torch.float64, chunk_sites=chunk)
    Q = torch.randn(B, L, L, dtype=torch.float64)
    with torch.inference_mode():
        assert model.native_kernels(Q) is not None
        # tanh: the whole model in one native call; other activations: layer kernels + torch activations
        assert (model.native_forces(Q) is not None) == (activation == "tanh")
        got = model(Q)
        ref = model.compute_forces(Q)  # the torch path (also what the TorchScript export runs)
    assert ref.std() > 1e-3  # non-trivial forces
    torch.testing.assert_close(got, ref, atol=1e-12, rtol=0)


def test_native_enn_float32_and_full_preset_widths():
    model = _randomised_enn([32, 8, 4], "tanh", torch.float32)
    Q = torch.randn(2, 10, 10)
    with torch.inference_mode():
        got, ref = model(Q), model.compute_forces(Q)
    torch.testing.assert_close(got, ref, atol=2e-5 * float(ref.abs().max()), rtol=0)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-10), (torch.float32, 2e-5)])
def test_native_enn_exact_equivariance(dtype, tol):
    """All 8 D4 operations and translations, through the native kernels (floating-point precision)."""
    model = _randomised_enn([4, 3, 2], "tanh", dtype)
    Q = torch.randn(2, 10, 10, dtype=dtype)
    with torch.no_grad():
        assert model.native_forces(Q) is not None
        err, F = _equivariance_error(model, Q)
    assert F.std() > 1e-2 and not torch.allclose(F, apply_group_element(F, 1))
    assert err < tol * float(F.abs().max())


def test_native_weights_follow_parameter_updates():
    model = _randomised_enn([4, 3, 2], "tanh", torch.float64)
    Q = torch.randn(1, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        before = model(Q)
        for p in model.parameters():  # an optimizer step: in place
            p.mul_(1.1).add_(0.01)
        after = model(Q)
        ref = model.compute_forces(Q)
    assert (after - before).abs().max() > 1e-3
    torch.testing.assert_close(after, ref, atol=1e-12, rtol=0)


@pytest.mark.parametrize("activation", ["tanh", "gate"])  # the whole-model kernel; the layer kernels
def test_native_weights_follow_replaced_parameters(activation):
    """``load_state_dict(assign=True)`` replaces the parameter tensors: the kernels built before watch
    and read the new ones."""
    model = _randomised_enn([4, 3], activation, torch.float64)
    Q = torch.randn(1, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        before = model(Q)
        model.load_state_dict({k: v.clone() * 1.1 for k, v in model.state_dict().items()}, assign=True)
        after = model(Q)
        ref = model.compute_forces(Q)
    assert (after - before).abs().max() > 1e-3
    torch.testing.assert_close(after, ref, atol=1e-12, rtol=1e-12)


def test_whole_native_enn_follows_the_elastic_constants_and_each_buffer_alone():
    """The call's k and kappa with unchanged weights, then each normalisation buffer changed on its own
    (the input scales enter the packed projection, the output scale and shift the force)."""
    from lattice_lab.physics.holstein import linear_elastic_force

    model = _randomised_enn([4, 3], "tanh", torch.float64)
    Q = torch.randn(1, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        ref = model.compute_forces(Q)
        for k, kappa in [(0.0, 0.0), (1.3, 0.25), (0.7, -0.1)]:
            torch.testing.assert_close(model.native_forces(Q, k, kappa), ref + linear_elastic_force(Q, k, kappa),
                                       atol=1e-12, rtol=0)
        for name in ["in_scale_A1", "in_scale_B2", "in_scale_E", "in_shift_A1", "out_scale", "out_shift"]:
            before = model.native_forces(Q)
            getattr(model, name).mul_(1.3).add_(0.1)
            after = model.native_forces(Q)
            torch.testing.assert_close(after, model.compute_forces(Q), atol=1e-12, rtol=0)
            assert (after - before).abs().max() > 1e-3, name


def test_native_not_used_with_autograd_gpu_dtype_or_switched_off(monkeypatch):
    model = _randomised_enn([2], "tanh", torch.float64)
    Q = torch.randn(1, 9, 9, dtype=torch.float64)
    assert model.native_kernels(Q) is None  # autograd enabled: training uses the torch path
    assert model.native_forces(Q) is None
    with torch.no_grad():
        assert model.native_kernels(Q) is not None and model.native_forces(Q) is not None
        assert model.native_kernels(Q.to(torch.bfloat16)) is None
        assert model.native_forces(Q.to(torch.bfloat16)) is None
        monkeypatch.setenv("LATTICE_LAB_NATIVE", "0")  # the global switch (e.g. for a loaded checkpoint)
        assert model.native_kernels(Q) is None and model.native_forces(Q) is None
        monkeypatch.delenv("LATTICE_LAB_NATIVE")
        model.native_kernel = False
        assert model.native_kernels(Q) is None and model.native_forces(Q) is None
    for bad in ["yes", 1, None]:
        with pytest.raises(ConfigError, match="model.native_kernel"):
            ENN(HAM, SQRT13, [2], native_kernel=bad)


def test_fallback_to_torch_path_without_compiler(no_compiler):
    model = _randomised_enn([3, 2], "tanh", torch.float64)
    Q = torch.randn(1, 9, 9, dtype=torch.float64)
    with torch.no_grad(), pytest.warns(UserWarning, match="native CPU kernel unavailable"):
        got = model(Q)
    with torch.no_grad():
        torch.testing.assert_close(got, model.compute_forces(Q), atol=1e-12, rtol=0)
        forced = _randomised_enn([3, 2], "tanh", torch.float64, native_kernel=True)
        with pytest.raises(ConfigError, match="native_kernel=true.*no C\\+\\+ compiler"):
            forced(Q)


def _tiny_source(folder, answer=42):
    folder.mkdir(exist_ok=True)
    source = folder / "tiny_kernel.cpp"
    source.write_text(f'extern "C" int ll_answer(void) {{ return {answer}; }}\n')
    return source


def test_build_is_cached_per_source_and_atomic(tmp_path, monkeypatch):
    monkeypatch.setenv("LATTICE_LAB_CACHE", str(tmp_path))
    source = _tiny_source(tmp_path)
    path = build._build(source)
    assert path.parent == tmp_path / "native" and path.exists()
    assert build._build(source) == path  # cached: not rebuilt
    import ctypes

    assert ctypes.CDLL(str(path)).ll_answer() == 42
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporary files left
    source.write_text('extern "C" int ll_answer(void) { return 43; }\n')
    assert build._build(source) != path  # a changed source is a new library
    source.write_text("this is not C++\n")
    with pytest.raises(build.NativeUnavailable, match="could not compile tiny_kernel.cpp"):
        build._build(source)


def test_build_falls_back_to_temp_dir_when_cache_not_writable(tmp_path, monkeypatch):
    blocked = tmp_path / "file_not_folder"
    blocked.write_text("")  # a file: the cache folder cannot be created below it
    monkeypatch.setenv("LATTICE_LAB_CACHE", str(blocked))
    monkeypatch.setattr(build.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    path = build._build(_tiny_source(tmp_path, 7))
    assert path.exists() and str(path).startswith(str(tmp_path / "tmp"))


def test_build_cache_key_holds_headers_compiler_cpu_and_flags(tmp_path, monkeypatch):
    """A library built with another header beside the source, another compiler version, on another CPU or
    with other flags is never loaded: each is a new cache entry."""
    monkeypatch.setenv("LATTICE_LAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(build, "FLAG_SETS", (["-O0"],))
    source = _tiny_source(tmp_path / "src")
    header = source.with_name("shared.h")
    header.write_text("// one\n")
    paths = [build._build(source)]
    header.write_text("// two\n")
    paths.append(build._build(source))
    monkeypatch.setattr(build, "_version", lambda cxx: "another compiler 1.0")
    paths.append(build._build(source))
    monkeypatch.setattr(build, "_cpu_identity", lambda: "another cpu")
    paths.append(build._build(source))
    monkeypatch.setattr(build, "FLAG_SETS", (["-O1"],))
    paths.append(build._build(source))
    assert len(set(paths)) == 5 and all(p.exists() for p in paths)


def test_build_tries_the_next_flag_set_and_renames_a_complete_library(tmp_path, monkeypatch):
    """A flag set the compiler refuses: the next one builds, the failed attempt leaves no file behind, and
    the compiler writes a temporary file that is renamed only once complete (atomic for other processes)."""
    monkeypatch.setenv("LATTICE_LAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(build, "FLAG_SETS", (["-fno-such-flag-for-lattice-lab"], ["-O0"]))
    folder, run, after_compile = tmp_path / "cache" / "native", build.subprocess.run, []

    def run_and_look(cmd, **kw):
        proc = run(cmd, **kw)
        if "-shared" in cmd:
            after_compile.append(sorted(p.name for p in folder.iterdir()))
        return proc

    monkeypatch.setattr(build.subprocess, "run", run_and_look)
    path = build._build(_tiny_source(tmp_path / "src"))
    assert len(after_compile) == 2 and all(path.name not in names for names in after_compile)
    assert sorted(p.name for p in folder.iterdir()) == [path.name]


def test_compiler_from_cxx_and_unavailable_without_one(tmp_path, monkeypatch):
    link = tmp_path / "my-cxx"
    link.symlink_to(build.compiler())
    monkeypatch.setenv("CXX", str(link))
    assert build.compiler() == str(link)
    monkeypatch.setenv("CXX", "no-such-compiler")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(build.NativeUnavailable, match="no C\\+\\+ compiler found"):
        build.compiler()
    with pytest.raises(build.NativeUnavailable, match="does not run"):
        build._version(str(tmp_path / "missing-compiler"))


def test_native_enn_propagates_nan():
    """A diverging simulation is detected by non-finite forces: the kernel must not hide a NaN."""
    model = _randomised_enn([4, 3, 2], "tanh", torch.float32)
    Q = torch.randn(1, 10, 10)
    Q[0, 4, 5] = float("nan")
    with torch.no_grad():
        assert model.native_forces(Q) is not None
        F = model(Q)
    assert torch.isnan(F[0, 4, 5]) and torch.isnan(F).sum() > 1  # the NaN reaches its neighbourhood
    assert torch.isfinite(F[0, 0, 0])  # sites farther than the cutoff stay finite


def test_native_single_piece_runs_in_calling_thread():
    """With the layer kernels (activations other than tanh) a call too small to split runs in the
    calling thread (no pool wake-up); a call worth two pieces uses the pool. Same forces either way."""
    from lattice_lab.common import threads

    model = _randomised_enn([4, 3, 2], "gate", torch.float64)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    threads.shutdown_pool()
    try:
        with torch.no_grad():
            Q = torch.randn(1, 9, 9, dtype=torch.float64)
            assert model.parallel_pieces(Q, 2) == 1
            F = model(Q)
            assert threads._pool["executor"] is None
            torch.testing.assert_close(F, model.compute_forces(Q), atol=1e-12, rtol=0)
            model.flops_per_site = 1e9  # pretend every piece is worth a thread
            assert model.parallel_pieces(Q, 2) == 2
            torch.testing.assert_close(model(Q), F, atol=1e-12, rtol=0)
            assert threads._pool["executor"] is not None
    finally:
        torch.set_num_threads(previous)
        threads.shutdown_pool()


def test_kernel_executes_fewer_flops_than_the_architecture_count():
    """The FLOP count quoted in docs/enn_speed.md: the paper's 32 -> 8 layer executes 246,144 FLOPs per
    site (pairs i < j only, T shared by both E components) against 314,240 in the architecture count."""
    from lattice_lab.models.flops import enn_flops

    wide = {ir: 32 for ir in IRREPS}
    layer = QuadraticIrrepLayer(wide, {ir: 8 for ir in IRREPS})
    kernel = QuadraticKernel(layer, torch.float32)
    arch = enn_flops(wide, [8]) - enn_flops({ir: 8 for ir in IRREPS}, [])  # the 32 -> 8 layer alone
    assert kernel.flops_per_site == 246144
    assert arch == 314240 and kernel.flops_per_site < 0.8 * arch


def test_whole_native_enn_with_elastic_prior_matches_torch_path():
    """The registry-built presets (ENN wrapped in the elastic prior) in one native call: the network,
    the force scale and -k Q - kappa nn_sum(Q), against the torch path, in float64 and float32."""
    from lattice_lab.models.registry import build_model, load_preset

    for preset in ("enn_small", "enn"):
        model = build_model(load_preset(preset), HAM).double().eval()
        _randomise(model.network)
        with torch.no_grad():
            model.network.out_scale.fill_(1.7)
            model.network.out_shift.fill_(-0.3)
        Q = torch.randn(3, 11, 11, dtype=torch.float64)
        with torch.inference_mode():
            assert model.network.native_forces(Q, model.k, model.kappa) is not None
            got = model(Q)
            ref = model.network.compute_forces(Q) + model.elastic_force(Q)
            torch.testing.assert_close(got, ref, atol=1e-12 * float(ref.abs().max()), rtol=0)
        model32 = model.float()
        with torch.inference_mode():
            got32 = model32(Q.float())
        torch.testing.assert_close(got32.double(), ref, atol=3e-5 * float(ref.abs().max()), rtol=0)


def test_whole_native_enn_is_independent_of_threads_and_tiles(monkeypatch):
    """Every site's sums run in the same order whatever the tiling and the thread count: bitwise equal."""
    import lattice_lab.native.enn as native_enn

    model = _randomised_enn([4, 3, 2], "tanh", torch.float32)
    Q = torch.randn(3, 13, 13)  # 507 sites: tiles cross configuration boundaries and end in partial vectors
    previous = torch.get_num_threads()
    results = []
    try:
        with torch.no_grad():
            for nt, max_tile in [(1, 256), (2, 256), (2, 16), (1, 1024)]:
                torch.set_num_threads(nt)
                monkeypatch.setattr(native_enn, "TILE_SITES", max_tile)
                monkeypatch.setattr(native_enn.tile_size, "__defaults__", (max_tile,))
                results.append(model(Q))
    finally:
        torch.set_num_threads(previous)
    for F in results[1:]:
        assert torch.equal(F, results[0])


def test_tile_size():
    from lattice_lab.native.enn import tile_size

    assert tile_size(1024, 2) == 256 and tile_size(1024, 1) == 256
    assert tile_size(100, 2) == 64  # two tiles of <= 64 sites (multiples of 16)
    assert tile_size(1, 4) == 16
    for sites, workers in [(1024, 2), (4096, 3), (999, 2), (262144, 2)]:
        t = tile_size(sites, workers)
        assert t % 16 == 0 and t <= 256 and -(-sites // t) >= min(workers, -(-sites // 16))


def test_sparse_projection_reproduces_the_convolution():
    from lattice_lab.native.enn import sparse_projection
    from lattice_lab.symmetry.field_ops import periodic_pad

    model = _randomised_enn([2], "tanh", torch.float64)
    w, b = model.packed_projection(torch.float64, torch.device("cpu"))
    offsets, prow, poff, pcoef, pbias = sparse_projection(w, b, model.radius)
    assert offsets.shape[0] == 45  # the sqrt(13) environment
    assert len(pcoef) == int((w != 0).sum()) <= 273  # every channel on one orbit: at most sum of orbit sizes^2
    Q = torch.randn(1, 9, 9, dtype=torch.float64)
    ref = torch.nn.functional.conv2d(periodic_pad(Q.unsqueeze(1), model.radius), w, b)[0]  # [rows, L, L]
    env = torch.stack([torch.roll(Q[0], (-int(dx), -int(dy)), (0, 1)) for dx, dy in offsets.tolist()])
    got = pbias[:, None, None].expand_as(ref).clone()
    for r in range(w.shape[0]):
        for e in range(int(prow[r]), int(prow[r + 1])):
            got[r] += pcoef[e] * env[poff[e]]
    torch.testing.assert_close(got, ref, atol=1e-12, rtol=0)


@pytest.mark.parametrize("preset", ["enn_small", "gnn_small", "mlp_small", "gnn_energy_small"])
def test_force_provider_fast_path_gives_the_model_forces(preset):
    """The provider fetches the model's native function once per input shape and then calls it
    directly; the forces equal the model's torch path, follow weight updates, and a new shape takes
    the checked path first."""
    from lattice_lab.dynamics.forces import MLForceProvider
    from lattice_lab.models.registry import build_model, load_preset

    model = build_model(load_preset(preset), HAM).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    provider = MLForceProvider(HAM, "cpu", torch.float64, checkpoint=None, model=model)
    Q = torch.randn(2, 11, 11, dtype=torch.float64)

    def reference(Q):
        previous = model.native_kernel if hasattr(model, "native_kernel") else model.network.native_kernel
        target = model if hasattr(model, "native_kernel") else model.network
        target.native_kernel = False
        try:
            with torch.enable_grad() if model.conservative else torch.no_grad():
                return model(Q).detach()
        finally:
            target.native_kernel = previous

    first = provider(Q)
    assert provider._native is not None and provider._native[0] == Q.shape
    calls = []
    fn = provider._native[1]
    provider._native = (Q.shape, lambda Q: calls.append(1) or fn(Q))
    second = provider(Q)
    assert calls == [1]  # the fast path ran
    torch.testing.assert_close(first, reference(Q), atol=1e-11, rtol=0)
    torch.testing.assert_close(second, first, atol=0, rtol=0)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.05)
    torch.testing.assert_close(provider(Q), reference(Q), atol=1e-11, rtol=0)  # weight updates followed
    Q2 = torch.randn(1, 13, 13, dtype=torch.float64)
    torch.testing.assert_close(provider(Q2), reference(Q2), atol=1e-11, rtol=0)
    assert provider._native[0] == Q2.shape


def test_live_tensors_look_up_again_only_after_a_replacement():
    from lattice_lab.models.registry import build_model
    from lattice_lab.native.policy import LiveTensors

    model = build_model({"name": "gnn", "widths": [1, 4, 1], "native_kernel": False},
                        {"t": 1.0, "g": 1.5, "k": 1.0, "kappa": 0.1, "temperature": 0.1})
    layer = model.layers[0]
    live = LiveTensors([(model, "q_mean"), (layer, "w_self"), (layer, "bias")])
    first = live()
    assert live() is first  # nothing replaced: the cached lookup, no walk through the modules
    layer.w_self = torch.nn.Parameter(torch.zeros_like(layer.w_self))  # attribute assignment
    second = live()
    assert second is not first and second[1] is layer.w_self
    model.double()  # ForceField._apply: buffers are new tensor objects
    third = live()
    assert third[0] is model.q_mean and third[0].dtype == torch.float64
    state = {k: v.clone() + 1 for k, v in model.state_dict().items()}
    model.load_state_dict(state, assign=True)
    assert live()[2] is layer.bias and torch.equal(live()[2], state["layers.0.bias"])


@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize("preset", ["enn_small", "gnn_small", "mlp_small", "gnn_energy_small"])
def test_native_function_writes_into_out(preset, frozen):
    """``f(Q, out)`` writes the forces into ``out`` and returns it, bitwise equal to ``f(Q)``; frozen
    or not, the forces are the model's."""
    from lattice_lab.models.registry import build_model, load_preset

    model = build_model(load_preset(preset), HAM).double().eval()
    Q = torch.randn(2, 11, 11, dtype=torch.float64)
    with torch.no_grad():
        fn = model.native_function(Q, frozen=frozen)
        assert fn is not None
        fresh = fn(Q)
        out = torch.full_like(Q, float("nan"))
        got = fn(Q, out)
        target = model if hasattr(model, "native_kernel") else model.network
        target.native_kernel = False
        with torch.enable_grad() if model.conservative else torch.no_grad():
            reference = model(Q).detach()
    assert got is out
    assert torch.equal(out, fresh)
    torch.testing.assert_close(fresh, reference, atol=1e-11, rtol=0)


def _provider(preset, frozen):
    from lattice_lab.dynamics.forces import MLForceProvider
    from lattice_lab.models.registry import build_model, load_preset

    model = build_model(load_preset(preset), HAM).double().eval()
    return MLForceProvider(HAM, "cpu", torch.float64, checkpoint=None, model=model, frozen=frozen)


@pytest.mark.parametrize("frozen", [False, True])
def test_frozen_gnn_provider_checks_the_weights_once(monkeypatch, frozen):
    """A frozen provider's native GNN function checks that the weights have not moved when it is
    fetched, not at every call; an unfrozen one at every call."""
    from lattice_lab.native.gnn import GNNForces

    provider = _provider("gnn_small", frozen)
    Q = torch.randn(1, 11, 11, dtype=torch.float64)
    provider(Q)  # fetches the native function
    calls = []
    real = GNNForces.ready
    monkeypatch.setattr(GNNForces, "ready", lambda self: calls.append(1) or real(self))
    with torch.no_grad():
        provider._native = (provider._native[0], provider.model.native_function(Q, frozen=frozen))
    calls.clear()
    for _ in range(3):
        provider(Q)
        provider.forces_into(Q, torch.empty_like(Q))
    assert len(calls) == (0 if frozen else 6)


def test_frozen_gnn_provider_reads_kept_memory_after_the_model_moves():
    """A change made to a frozen provider's model anyway never makes the kernel read freed memory:
    after ``model.float()`` the float64 calls still read the float64 weights it was fetched with."""
    provider = _provider("gnn_small", True)
    Q = torch.randn(1, 11, 11, dtype=torch.float64)
    provider(Q)
    before = provider(Q)
    provider.model.float()  # replaces every parameter; the old tensors are freed unless kept
    torch.randn(4096, 4096)  # reuse the freed memory
    assert torch.equal(provider.forces_into(Q, torch.empty_like(Q)), before)


@pytest.mark.parametrize("preset", ["enn_small", "gnn_small", "mlp_small", "gnn_energy_small"])
def test_provider_out_is_a_hint_checked_before_use(preset):
    """``provider(Q, out=buffer)`` writes into a fitting buffer and returns it; a buffer of another
    shape or dtype, or a non-contiguous one, is left alone and a new tensor is returned."""
    provider = _provider(preset, True)
    Q = torch.randn(2, 11, 11, dtype=torch.float64)
    first = provider(Q)
    out = torch.empty_like(Q)
    assert provider(Q, out=out) is out and torch.equal(out, first)
    for bad in (torch.zeros(2, 11, 12, dtype=torch.float64), torch.zeros(2, 11, 11, dtype=torch.float32),
                torch.zeros(2, 11, 11, dtype=torch.float64).transpose(1, 2)):
        F = provider(Q, out=bad)
        assert F is not bad and not bad.any() and torch.equal(F, first)
    assert provider.forces_into(Q, None) is not None


def test_simulate_providers_from_a_checkpoint_are_frozen_injected_models_are_not(tmp_path):
    from lattice_lab.dynamics.forces import make_force_provider
    from lattice_lab.models.checkpoint import save_checkpoint
    from lattice_lab.models.registry import build_model, load_preset
    from lattice_lab.physics.holstein import HolsteinParams

    model = build_model(load_preset("gnn_small"), HolsteinParams().as_dict())
    path = tmp_path / "best.pt"
    save_checkpoint(path, model, {})
    assert make_force_provider({"source": "ml", "checkpoint": str(path)}, HolsteinParams(), "cpu").frozen
    assert not make_force_provider({"source": "ml"}, HolsteinParams(), "cpu", model=model).frozen
