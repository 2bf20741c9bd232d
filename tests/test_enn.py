"""Equivariant network (ENN): Table I counts, bilinear layer vs explicit auxiliary layer, exact
D4 / translation equivariance, locality (lattice-size transfer), normalisation, gradients."""

import itertools
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from lattice_lab.common.errors import ConfigError
from lattice_lab.lattice import translate
from lattice_lab.models.enn import ENN, auxiliary_counts
from lattice_lab.models.layers_equivariant import QuadraticIrrepLayer, product_blocks
from lattice_lab.symmetry import IRREP_DIM, IRREPS, apply_group_element, clebsch_gordan

HAM = {"t": 1.0, "g": 3.5, "k": 1.0, "kappa": 0.18, "temperature": 0.1, "filling": "canonical"}
SQRT13 = math.sqrt(13.0)
CONF = Path(__file__).resolve().parents[1] / "conf" / "model"

TABLE = [
    {"A1": 128, "A2": 115, "B1": 130, "B2": 123, "E": 264},
    {"A1": 2512, "A2": 2576, "B1": 2576, "B2": 2576, "E": 4128},
    {"A1": 148, "A2": 164, "B1": 164, "B2": 164, "E": 264},
    {"A1": 34, "A2": 42, "B1": 42, "B2": 42, "E": 68},
]


def test_auxiliary_counts_reproduce_table_I():
    inputs = {"A1": 9, "A2": 3, "B1": 6, "B2": 5, "E": 11}
    assert auxiliary_counts(inputs, [32, 8, 4]) == TABLE


def test_full_model_parameters():
    model = ENN(HAM, SQRT13, [32, 8, 4])
    assert model.input_counts == {"A1": 9, "A2": 3, "B1": 6, "B2": 5, "E": 11}
    assert model.aux_counts == TABLE
    n = sum(p.numel() for p in model.parameters())
    # linear maps (aux x width per irrep) + A1 biases + gate biases (A2, B1, B2, E) + readout
    expected = sum(sum(aux.values()) * h + h + 4 * h for aux, h in zip(TABLE[:3], [32, 8, 4])) + 34 + 1
    assert n == expected == 143135
    assert model.receptive_field == 3 and model.conservative is False


def _explicit_layer(layer: QuadraticIrrepLayer, x: dict) -> dict:
    """Reference: materialise the auxiliary layer channel by channel, then apply the linear maps."""
    out = {}
    for o in IRREPS:
        if not layer.out_counts[o]:
            continue
        aux, weights = [], []  # aux features [N, d_o], weight rows [out]
        if o in layer.copy:
            for i in range(layer.in_counts[o]):
                aux.append(x[o][:, i, :])
                weights.append(layer.copy[o][i])
        for k, (a, b, oo) in enumerate(layer.blocks):
            if oo != o:
                continue
            C = torch.as_tensor(clebsch_gordan(a, b)[o], dtype=x[a].dtype)
            W = layer.dense_weight(k)
            for i, j in itertools.product(range(layer.in_counts[a]), range(layer.in_counts[b])):
                if a == b and i >= j:
                    assert torch.all(W[i, j] == 0)
                    continue
                aux.append(torch.einsum("gab,na,nb->ng", C, x[a][:, i], x[b][:, j]))
                weights.append(W[i, j])
        assert len(aux) == layer_aux_count(layer, o)
        A = torch.stack(aux, dim=1)  # [N, n_aux, d_o]
        Wm = torch.stack(weights)  # [n_aux, out]
        y = torch.einsum("nig,ik->nkg", A, Wm)
        if o == "A1":
            y = y + layer.bias[:, None]
        out[o] = y
    return out


def layer_aux_count(layer, o):
    return auxiliary_counts(layer.in_counts, [])[0][o]


def test_bilinear_layer_matches_explicit_auxiliary_layer():
    in_counts = {"A1": 3, "A2": 2, "B1": 1, "B2": 2, "E": 3}
    layer = QuadraticIrrepLayer(in_counts, {ir: 2 for ir in IRREPS}).double()
    with torch.no_grad():
        layer.bias.normal_()
    x = {ir: torch.randn(5, c, IRREP_DIM[ir], dtype=torch.float64) for ir, c in in_counts.items()}
    got, ref = layer(x), _explicit_layer(layer, x)
    for ir in IRREPS:
        torch.testing.assert_close(got[ir], ref[ir], atol=1e-12, rtol=0)
    # parameters: one weight per (auxiliary channel, output channel)
    aux = auxiliary_counts(in_counts, [])[0]
    assert sum(p.numel() for p in layer.parameters()) == sum(aux[o] * 2 for o in IRREPS) + 2
    assert len(layer.blocks) == len(product_blocks()) - 1  # B1 x B1 has no pair i < j


def _randomise(model: ENN, seed: int = 3) -> ENN:
    """Random weights and random, non-trivial (but equivariant by construction) normalisation buffers."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # perturb the (well-scaled) initial weights, randomise zero biases
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
            p.copy_(p * (1 + 0.3 * noise) if p.abs().max() > 0 else 0.5 * noise)
        for ir in IRREPS:
            s = getattr(model, f"in_scale_{ir}")
            s.copy_(1.0 + torch.rand(s.shape, generator=g, dtype=s.dtype))
        model.in_shift_A1.copy_(torch.randn(model.in_shift_A1.shape, generator=g, dtype=model.in_shift_A1.dtype))
        model.out_scale.fill_(1.7)
        model.out_shift.fill_(-0.3)
    return model


def _equivariance_error(model, Q):
    F = model(Q)
    err = 0.0
    for g in range(8):
        err = max(err, (model(apply_group_element(Q, g)) - apply_group_element(F, g)).abs().max().item())
    for shift in [(1, 0), (0, 3), (2, -5)]:
        err = max(err, (model(translate(Q, shift)) - translate(F, shift)).abs().max().item())
    return err, F


@pytest.mark.parametrize("activation", ["gate", "tanh", "authors"])
def test_exact_equivariance(activation):
    model = _randomise(ENN(HAM, SQRT13, [4, 3, 2], activation=activation).double())
    Q = torch.randn(2, 8, 8, dtype=torch.float64)
    err, F = _equivariance_error(model, Q)
    assert F.abs().max() < 1e3
    assert err < 1e-10
    assert F.std() > 1e-3  # non-trivial output, so the check above can fail
    assert not torch.allclose(F, apply_group_element(F, 1))


def test_equivariance_check_detects_broken_symmetry():
    """Negative control: scaling the two E components differently (as the authors' normaliser
    does) must be caught by the same check."""
    model = _randomise(ENN(HAM, SQRT13, [4, 3, 2]).double())
    e = model.proj.layout["E"]
    model.proj.kernel_np[e.start:e.stop:2] *= 2.0
    model.proj._kernel_cache.clear()
    err, _ = _equivariance_error(model, torch.randn(1, 8, 8, dtype=torch.float64))
    assert err > 1e-3


def test_same_forces_on_tiled_lattice():
    model = _randomise(ENN(HAM, SQRT13, [4, 3, 2]).double())
    Q8 = torch.randn(2, 8, 8, dtype=torch.float64)
    F8 = model(Q8)
    F16 = model(Q8.repeat(1, 2, 2))
    torch.testing.assert_close(F16, F8.repeat(1, 2, 2), atol=1e-12, rtol=0)


def test_fit_normalization_and_dtype():
    model = ENN(HAM, SQRT13, [4, 3, 2])
    Q = 1.5 + 2.0 * torch.randn(6, 8, 8, dtype=torch.float64)
    F = 0.7 + 3.0 * torch.randn(6, 8, 8, dtype=torch.float64)
    model.fit_normalization(Q, F)
    assert model.out_shift.item() == pytest.approx(F.mean().item(), rel=1e-5)
    assert model.out_scale.item() == pytest.approx(F.std(unbiased=False).item(), rel=1e-5)
    assert model.in_shift_A1[0].item() == pytest.approx(Q.mean().item(), rel=1e-5)  # channel 0 = Q(r)
    shift, scale = model._flat_norm()
    x = model.proj(Q, shift.double(), scale.double())  # normalised channels
    xs = model.proj.split(x)
    torch.testing.assert_close(xs["A1"].mean(0), torch.zeros_like(xs["A1"][0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(xs["A1"].std(0, unbiased=False), torch.ones_like(xs["A1"][0]), atol=1e-5, rtol=0)
    for ir in ("A2", "B1", "B2"):
        torch.testing.assert_close((xs[ir] ** 2).mean(0), torch.ones_like(xs[ir][0]), atol=1e-5, rtol=0)
    torch.testing.assert_close((xs["E"] ** 2).sum(-1).mean(0), 2 * torch.ones(11, 1, dtype=torch.float64)[:, 0],
                               atol=1e-5, rtol=0)
    # float32 default model agrees with its float64 copy
    Qt = Q[:2]
    F32 = model(Qt.float())
    assert F32.dtype == torch.float32
    F64 = ENN(HAM, SQRT13, [4, 3, 2]).double()
    F64.load_state_dict(model.state_dict())
    torch.testing.assert_close(F32.double(), F64.double()(Qt), atol=1e-3, rtol=1e-4)


def test_gradients_flow():
    model = ENN(HAM, SQRT13, [4, 3, 2])
    Q = torch.randn(2, 8, 8)
    loss = (model(Q) - torch.randn(2, 8, 8)).pow(2).mean()
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(int(g.abs().sum() > 0) for g in grads) == len(grads)


def test_smooth_at_zero_field():
    """The eps-guarded norms keep the force and its input gradient finite at Q = 0."""
    model = ENN(HAM, SQRT13, [4, 3, 2]).double()
    Q = torch.zeros(1, 8, 8, dtype=torch.float64, requires_grad=True)
    model(Q).sum().backward()
    assert torch.isfinite(Q.grad).all()


def test_bad_configuration():
    with pytest.raises(ConfigError, match="model.hidden"):
        ENN(HAM, SQRT13, [])
    with pytest.raises(ConfigError, match="model.hidden"):
        ENN(HAM, SQRT13, [4, 0])
    with pytest.raises(ConfigError, match="model.activation"):
        ENN(HAM, SQRT13, [4], activation="relu")
    with pytest.raises(ConfigError, match="model.cutoff"):
        ENN(HAM, 0.5, [4])
    with pytest.raises(ConfigError, match="model.cutoff='abc'"):
        ENN(HAM, "abc", [4])  # model.cutoff=abc on the command line
    with pytest.raises(ConfigError, match="receptive field"):
        ENN(HAM, SQRT13, [2])(torch.zeros(1, 6, 6))


@pytest.mark.parametrize("preset", ["enn", "enn_small"])
def test_presets_build(preset):
    cfg = OmegaConf.to_container(OmegaConf.load(CONF / f"{preset}.yaml"))
    assert cfg.pop("name") == "enn"
    cfg.pop("elastic_prior", None)  # a registry-level wrapper (models/prior.py), not a constructor argument
    model = ENN(hamiltonian=HAM, **cfg)
    assert model.cutoff == pytest.approx(SQRT13)
    if preset == "enn_small":
        assert model(torch.randn(1, 8, 8)).shape == (1, 8, 8)


# -- fast (packed, chunked) evaluation -------------------------------------------------------------
UNEVEN = {"A1": 3, "A2": 2, "B1": 1, "B2": 0, "E": 3}


@pytest.mark.parametrize("out_counts", [{ir: 2 for ir in IRREPS}, {"A1": 3, "B2": 1, "E": 2}, {"A1": 1}])
def test_layer_modes_and_subchunks_match_explicit_reference(out_counts):
    """Bilinear and explicit packed evaluation, several sub-chunks, with and without autograd, all equal
    the channel-by-channel auxiliary layer (uneven and missing irreps, padding, subset of outputs)."""
    ref_layer = QuadraticIrrepLayer(UNEVEN, out_counts).double()
    with torch.no_grad():
        for p in ref_layer.parameters():
            p.normal_()
    x = {ir: torch.randn(37, c, IRREP_DIM[ir], dtype=torch.float64) for ir, c in UNEVEN.items() if c}
    ref = _explicit_layer(ref_layer, x)
    for mode in ("bilinear", "explicit"):
        layer = QuadraticIrrepLayer(UNEVEN, out_counts, mode=mode).double()
        layer.load_state_dict(ref_layer.state_dict())
        layer.cache_bytes = 64  # many sub-chunks of 16 sites (37 = 16 + 16 + 5)
        for grad in (True, False):
            with torch.set_grad_enabled(grad):
                got = layer(x)
            assert sorted(got) == sorted(ref)
            for ir in ref:
                torch.testing.assert_close(got[ir], ref[ir], atol=1e-12, rtol=0)


def test_packed_layer_gradients_match_modes():
    layers = [QuadraticIrrepLayer(UNEVEN, {ir: 2 for ir in IRREPS}, mode=m).double() for m in ("bilinear", "explicit")]
    layers[1].load_state_dict(layers[0].state_dict())
    x0 = {ir: torch.randn(9, c, IRREP_DIM[ir], dtype=torch.float64) for ir, c in UNEVEN.items() if c}
    grads = []
    for layer in layers:
        x = {ir: v.clone().requires_grad_(True) for ir, v in x0.items()}
        sum((y ** 2).sum() for y in layer(x).values()).backward()
        grads.append([x[ir].grad for ir in sorted(x)] + [p.grad for p in layer.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("kind", ["gate", "tanh", "authors"])
def test_packed_activation_matches_dict(kind):
    from lattice_lab.models.layers_equivariant import IrrepActivation, pack_features, unpack_features

    counts = {"A1": 3, "A2": 2, "B1": 1, "B2": 0, "E": 4}
    act = IrrepActivation(counts, kind).double()
    with torch.no_grad():
        for p in act.parameters():
            p.normal_()
    x = {ir: torch.randn(11, c, IRREP_DIM[ir], dtype=torch.float64) for ir, c in counts.items() if c}
    X = pack_features(x, counts, 4)
    Y = act.forward_packed(X)
    ref = act(x)
    got = unpack_features(Y, counts)
    for ir in ref:
        torch.testing.assert_close(got[ir], ref[ir], atol=1e-14, rtol=0)
    pad = torch.ones_like(Y, dtype=torch.bool)
    rows = [name for name in IRREPS if counts[name] for _ in range(IRREP_DIM[name])]
    for r, name in enumerate(rows):
        pad[:, r, :counts[name]] = False
    assert torch.all(Y[pad] == 0)  # zero padding stays zero


def test_chunking_does_not_change_forces_or_gradients():
    """Row bands, partial bands, groups of configurations and one chunk give the same forces and
    input gradients; eval mode (cached packed weights, no autograd) agrees with training mode."""
    model = _randomise(ENN(HAM, SQRT13, [4, 3, 2]).double())
    Q = torch.randn(3, 9, 9, dtype=torch.float64)
    model.chunk_sites = 10 ** 6
    Qg = Q.clone().requires_grad_(True)
    F_ref = model(Qg)
    (F_ref ** 2).sum().backward()
    for chunk in (1, 20, 81, 100, 200):  # 1 row, 2 rows + remainder, 1 config, 1 config, 2 configs
        model.chunk_sites = chunk
        Qc = Q.clone().requires_grad_(True)
        F = model(Qc)
        (F ** 2).sum().backward()
        torch.testing.assert_close(F, F_ref, atol=1e-12, rtol=0)
        torch.testing.assert_close(Qc.grad, Qg.grad, atol=1e-10, rtol=0)
        model.eval()
        with torch.inference_mode():
            torch.testing.assert_close(model(Q), F_ref.detach(), atol=1e-12, rtol=0)
        with torch.no_grad():
            torch.testing.assert_close(model(Q), F_ref.detach(), atol=1e-12, rtol=0)
        model.train()


def test_cached_weights_follow_parameter_changes():
    model = _randomise(ENN(HAM, SQRT13, [4, 3, 2]).double()).eval()
    Q = torch.randn(1, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        F0 = model(Q)
        for p in model.parameters():
            p.mul_(1.1)
        F1 = model(Q)  # parameters changed in place: the cache must be rebuilt
    fresh = ENN(HAM, SQRT13, [4, 3, 2]).double()
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(F1, fresh(Q), atol=1e-12, rtol=0)
    assert (F1 - F0).abs().max() > 1e-3
    F32 = model.float()(Q.float())  # dtype change drops the float64 cache
    torch.testing.assert_close(F32.double(), F1, atol=1e-3, rtol=1e-4)


def test_state_dict_names_unchanged():
    """Checkpoint format: only the layer weights, gate biases and normalisation buffers are saved."""
    import re

    model = ENN(HAM, SQRT13, [32, 8, 4])
    pat = re.compile(r"^((layers\.\d+|readout)\.(copy\.(A1|A2|B1|B2|E)|weights\.\d+|bias)|acts\.\d+\.gate_bias\.\w+"
                     r"|in_scale_(A1|A2|B1|B2|E)|in_shift_A1|out_scale|out_shift)$")
    keys = list(model.state_dict())
    assert keys and all(pat.match(k) for k in keys), [k for k in keys if not pat.match(k)]
    assert sum(v.numel() for k, v in model.state_dict().items() if "scale" not in k and "shift" not in k) == 143135


def test_bad_chunk_sites():
    for bad in (0, -5, 2.5, "many", True):
        with pytest.raises(ConfigError, match="model.chunk_sites"):
            ENN(HAM, SQRT13, [2], chunk_sites=bad)
    with pytest.raises(ConfigError, match="model.layer_mode"):
        QuadraticIrrepLayer(UNEVEN, {"A1": 1}, mode="fast")


@pytest.fixture
def two_threads():
    """torch with 2 intra-op threads for one test (CI runs the suite with 1)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)
    from lattice_lab.common.threads import shutdown_pool

    shutdown_pool()


@pytest.mark.parametrize(("B", "L", "chunk"), [(1, 24, 10 ** 6), (3, 17, 10 ** 6), (4, 16, 10 ** 6), (1, 40, 300),
                                               (5, 16, 100)])
def test_pieces_on_threads_match_sequential_forces(two_threads, B, L, chunk):
    """cpu_parallel: pieces of the lattice on 2 threads give the forces of the sequential path,
    for bands of one configuration, odd numbers of configurations and groups of them."""
    from lattice_lab.models.enn import lattice_pieces

    model = _randomise(ENN(HAM, SQRT13, [4, 3, 2], activation="tanh", chunk_sites=chunk).double()).eval()
    Q = torch.randn(B, L, L, dtype=torch.float64)
    model.flops_per_site = 1e9  # a tiny test network: pretend every piece is worth a thread
    with torch.inference_mode():
        assert model.pool_threads(Q) == 2 and model.parallel_pieces(Q, 2) == 2
        F_par = model(Q)
        ref = model.compute_forces(Q)
    torch.testing.assert_close(F_par, ref, atol=1e-12, rtol=0)
    model.cpu_parallel = False
    with torch.no_grad():
        assert model.pool_threads(Q) == 1
        torch.testing.assert_close(model(Q), ref, atol=1e-12, rtol=0)
    covered = torch.zeros(B, L, L, dtype=torch.int64)  # every site exactly once, pieces within the chunk
    pieces = lattice_pieces(B, L, 2, chunk)
    for i0, i1, r0, r1 in pieces:
        covered[i0:i1, r0:r1] += 1
        assert (i1 - i0) * (r1 - r0) * L <= max(chunk, L)
    assert torch.all(covered == 1) and len(pieces) % 2 == 0


def test_pieces_not_used_with_autograd_or_one_thread(two_threads):
    model = _randomise(ENN(HAM, SQRT13, [4, 3, 2]).double())
    Q = torch.randn(1, 24, 24, dtype=torch.float64)
    assert model.pool_threads(Q) == 1  # grad enabled (training)
    with torch.no_grad():
        assert model.pool_threads(Q) == 2
        big = ENN(HAM, SQRT13, [32, 8, 4])  # 0.39 MFLOP/site: 256 sites make a piece
        assert big.parallel_pieces(torch.zeros(1, 40, 40), 2) == 2
        assert big.parallel_pieces(torch.zeros(1, 12, 12), 2) == 1  # 144 sites: one piece
        assert model.parallel_pieces(Q, 2) == 1  # a tiny network: not split
        torch.set_num_threads(1)
        assert model.pool_threads(Q) == 1
    with pytest.raises(ConfigError, match="model.cpu_parallel"):
        ENN(HAM, SQRT13, [2], cpu_parallel="yes")


def test_projection_cache_follows_normalisation():
    model = _randomise(ENN(HAM, SQRT13, [4, 3, 2]).double()).eval()
    Q = torch.randn(2, 9, 9, dtype=torch.float64)
    with torch.inference_mode():
        F0 = model(Q)
    model.fit_normalization(2.0 * Q + 1.0, torch.randn(2, 9, 9, dtype=torch.float64))  # new buffers
    fresh = ENN(HAM, SQRT13, [4, 3, 2]).double().eval()
    fresh.load_state_dict(model.state_dict())
    with torch.inference_mode():
        F1 = model(Q)
        torch.testing.assert_close(F1, fresh(Q), atol=1e-12, rtol=0)
    assert (F1 - F0).abs().max() > 1e-3
    w, _ = model.packed_projection(torch.float64, "cpu")
    assert not w.is_inference()  # built outside inference mode: the cached copy also serves training


def test_odd_tanh_and_inplace_activation():
    from lattice_lab.models.layers_equivariant import IrrepActivation, odd_tanh

    y = torch.linspace(-30, 30, 20001, dtype=torch.float32)
    torch.testing.assert_close(odd_tanh(y.clone()), torch.tanh(y), atol=3e-7, rtol=0)
    assert torch.equal(odd_tanh(-y), -odd_tanh(y))  # exactly odd: sign-flip equivariance
    counts = {"A1": 3, "A2": 2, "B1": 1, "B2": 0, "E": 4}
    act = IrrepActivation(counts, "tanh").double()
    Y = torch.randn(7, 5, 4, dtype=torch.float64, requires_grad=True)
    ref = act.forward_packed(Y)  # autograd path (torch.tanh)
    with torch.no_grad():
        got = act.forward_packed(Y.detach().clone())  # in-place fast path
    torch.testing.assert_close(got, ref.detach(), atol=1e-15, rtol=0)


def test_projection_cache_follows_each_normalisation_buffer():
    """The cached packed projection is rebuilt when any single input-normalisation buffer is written in
    place (a key watching only some of them would keep serving the old normalisation)."""
    model = _randomise(ENN(HAM, SQRT13, [4, 3, 2]).double()).eval()
    fresh = ENN(HAM, SQRT13, [4, 3, 2]).double().eval()
    Q = torch.randn(1, 9, 9, dtype=torch.float64)
    for buf in model.normalization_buffers()[:-2]:  # input scales and shift (not the force scale)
        with torch.no_grad():
            before = model(Q)
            buf.mul_(1.5).add_(0.1)
            got = model(Q)
            fresh.load_state_dict(model.state_dict())
            torch.testing.assert_close(got, fresh(Q), atol=1e-12, rtol=0)
        assert (got - before).abs().max() > 1e-6
