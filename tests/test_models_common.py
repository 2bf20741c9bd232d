"""Checks every force field must pass, run on every small preset ``conf/model/*_small.yaml``.

Exact symmetries (D4, translations), locality (receptive field), transfer to a tiled lattice,
compatibility checks and input validation; float64, random weights and random normalisation.
"""

import copy
import math
import re

import pytest
import torch

from lattice_lab.common.errors import ConfigError
from lattice_lab.lattice import translate
from lattice_lab.models import ForceField, available_presets, build_model, count_parameters, flops_per_site
from lattice_lab.models.registry import load_preset
from lattice_lab.symmetry.field_ops import apply_group_element

HAM = {"t": 1.0, "g": 3.5, "k": 1.0, "kappa": 0.18, "temperature": 0.1, "filling": "canonical"}
SMALL_PRESETS = [p for p in available_presets() if p.endswith("_small")]


def lattice_size(model: ForceField) -> int:
    """Smallest L >= 8 on which the receptive field does not wrap around (L >= 2 r + 1)."""
    return max(8, 2 * model.receptive_field + 1)


def random_model(preset: str, **overrides) -> ForceField:
    """Preset (with config ``overrides``) in float64 with perturbed weights and a non-trivial fitted
    normalisation, eval mode."""
    model = build_model({**load_preset(preset), **overrides}, HAM).double()
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    Q = 0.3 + 1.7 * torch.randn(3, 10, 10, generator=gen, dtype=torch.float64)
    F = -0.4 + 2.5 * torch.randn(3, 10, 10, generator=gen, dtype=torch.float64)
    model.fit_normalization(Q, F)
    return model.eval()


def random_field(B: int, L: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return 0.2 + torch.randn(B, L, L, generator=gen, dtype=torch.float64)


def assert_close(a, b, tol=1e-10):
    scale = max(1.0, float(b.abs().max()))
    err = float((a - b).abs().max())
    assert err <= tol * scale, f"max deviation {err:.3g} > {tol:g} * {scale:.3g}"


@pytest.fixture(autouse=True)
def _inference_mode_no_grad():
    """Models are used under no_grad at inference; energy models must still produce forces."""
    with torch.no_grad():
        yield


def test_small_presets_found():
    assert {"gnn_small", "gnn_energy_small"} <= set(SMALL_PRESETS)


@pytest.fixture(scope="module", params=SMALL_PRESETS)
def model(request):
    return random_model(request.param)


def test_d4_equivariance(model):
    L = lattice_size(model)
    Q = random_field(2, L)
    F = model(Q)
    assert F.shape == Q.shape and F.dtype == torch.float64
    assert float(F.std()) > 1e-3  # a non-trivial output, so the checks below can fail
    for i in range(8):
        assert_close(model(apply_group_element(Q, i)), apply_group_element(F, i))


def test_translation_equivariance(model):
    L = lattice_size(model)
    Q = random_field(2, L, seed=1)
    F = model(Q)
    for shift in [(1, 0), (0, 3), (2, 5), (L - 1, L - 2)]:
        assert_close(model(translate(Q, shift)), translate(F, shift))


def test_tiled_lattice_gives_same_site_forces(model):
    """Transfer across L: forces on a 2L x 2L lattice tiled from an L x L one are the tiled forces.

    L >= 2 r + 1, so on the small lattice no site sees its own periodic image (a model that is not
    local, or that depends on L, fails this test).
    """
    L = lattice_size(model)
    Q = random_field(2, L, seed=2)
    F = model(Q)
    assert_close(model(Q.repeat(1, 2, 2)), F.repeat(1, 2, 2))


def test_receptive_field_is_exact(model):
    """F at the origin ignores Q at distance r + 1 along an axis and depends on Q at distance r."""
    r = model.receptive_field
    L = 2 * (2 * r + 1)
    Q = random_field(1, L, seed=3)
    F0 = model(Q)[0, 0, 0]
    far, near = Q.clone(), Q.clone()
    far[0, r + 1, 0] += 1.0
    near[0, r, 0] += 1.0
    assert abs(float(model(far)[0, 0, 0] - F0)) < 1e-12 * max(1.0, abs(float(F0)))
    assert abs(float(model(near)[0, 0, 0] - F0)) > 1e-8


def test_batch_is_independent(model):
    L = lattice_size(model)
    Q = random_field(3, L, seed=4)
    F = model(Q)
    for b in range(3):
        assert_close(model(Q[b:b + 1])[0], F[b], tol=1e-12)


def test_check_compatible(model):
    model.check_compatible(dict(HAM))
    for key, bad in (("t", 1.5), ("g", 3.0), ("k", 1.2), ("kappa", 0.1)):
        with pytest.raises(ConfigError, match=f"hamiltonian.{key}={bad}"):
            model.check_compatible(dict(HAM, **{key: bad}))
    with pytest.raises(ConfigError, match="cutoff"):
        model.check_compatible(dict(HAM), cutoff=model.cutoff + 0.5)
    model.check_compatible(dict(HAM), cutoff=model.cutoff)
    with pytest.warns(UserWarning, match="temperature"):
        model.check_compatible(dict(HAM, temperature=0.3))


def test_check_compatible_accepts_holstein_params(model):
    from lattice_lab.physics.holstein import HolsteinParams

    model.check_compatible(HolsteinParams(**HAM))
    with pytest.raises(ConfigError, match="hamiltonian.g"):
        model.check_compatible(HolsteinParams(**dict(HAM, g=2.0)))


def test_bad_input_shapes(model):
    L = lattice_size(model)
    for shape in [(L, L), (1, L, L + 1), (1, 1, L, L)]:
        with pytest.raises(ConfigError, match="shape"):
            model(torch.zeros(shape, dtype=torch.float64))
    small = 2 * model.receptive_field
    with pytest.raises(ConfigError, match=f"L={small}"):
        model(torch.zeros(1, small, small, dtype=torch.float64))


@pytest.mark.parametrize("grad", [False, True])
def test_input_dtype_other_than_the_models_is_refused(model, grad):
    """float64 Q into a float32 model: one clear error on every path (native kernel, torch, autograd)."""
    m32 = copy.deepcopy(model).float()
    Q = random_field(1, lattice_size(model), seed=3)  # float64
    with torch.set_grad_enabled(grad), pytest.raises(ConfigError, match="input dtype float64 differs from the model's float32"):
        m32(Q)
    assert m32(Q.float()).dtype == torch.float32  # converted, it runs
    m32.double()  # .to() forgets the cached dtype
    assert m32(Q).dtype == torch.float64


def test_counts_and_defaults(model):
    assert count_parameters(model) > 0
    assert flops_per_site(model) > count_parameters(model)  # every weight is used once per site
    assert model.receptive_field >= 1 and math.isfinite(model.cutoff)
    assert model.hamiltonian["g"] == HAM["g"]


@pytest.mark.parametrize("preset", SMALL_PRESETS)
def test_default_dtype_is_float32(preset):
    model = build_model(load_preset(preset), HAM)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.model_cfg["name"] == load_preset(preset)["name"]


def test_build_model_errors():
    with pytest.raises(ConfigError, match="model.name='transformer'"):
        build_model({"name": "transformer"}, HAM)
    with pytest.raises(ConfigError, match="model.name is missing"):
        build_model({"widths": [1, 1]}, HAM)
    with pytest.raises(ConfigError, match="model.depth=3"):
        build_model({"name": "gnn", "widths": [1, 4, 1], "depth": 3}, HAM)
    with pytest.raises(ConfigError, match="model.aggregation='max'"):
        build_model({"name": "gnn", "widths": [1, 4, 1], "aggregation": "max"}, HAM)


def test_build_model_accepts_dictconfig_and_params():
    from omegaconf import OmegaConf

    from lattice_lab.physics.holstein import HolsteinParams

    model = build_model(OmegaConf.create({"name": "gnn", "widths": [1, 4, 1]}), HolsteinParams(**HAM))
    assert model.hamiltonian["kappa"] == HAM["kappa"]
    assert model.model_cfg == {"name": "gnn", "cutoff": None, "widths": [1, 4, 1],
                               "aggregation": "sum", "activation": "relu", "native_kernel": "auto",
                               "elastic_prior": False}


@pytest.mark.parametrize("preset", SMALL_PRESETS)
def test_float_round_trip_keeps_float64_constants(preset):
    """``.float()`` then ``.double()`` changes nothing for weights that float32 holds exactly: the
    float64 constants (Clebsch-Gordan coefficients, projection kernels) stay float64 on the way."""
    model = random_model(preset)
    with torch.no_grad():
        for t in model.state_dict().values():  # weights and normalisation
            if t.is_floating_point():
                t.copy_(t.float().double())  # float32-representable: the round trip cannot round them
    reference = build_model(load_preset(preset), HAM).double().eval()
    reference.load_state_dict(model.state_dict())
    model.float()
    for name, t in model.named_buffers():
        if name.rsplit(".", 1)[-1] in ("_z_coef", "_xw_scale", "_ts_kernel"):
            assert t.dtype == torch.float64, name
    model.double()
    for m in [*model.modules(), *reference.modules()]:
        if hasattr(m, "native_kernel"):
            m.native_kernel = False  # the torch path (the native kernels read their own float64 copies)
    Q = random_field(2, lattice_size(model))
    with torch.no_grad():
        torch.testing.assert_close(model(Q), reference(Q), rtol=1e-14, atol=1e-13)


@pytest.mark.parametrize("preset", SMALL_PRESETS)
def test_native_kernel_follows_replaced_tensors(preset, monkeypatch):
    """A native kernel built before ``model.to()`` (which replaces the buffers) or before
    ``load_state_dict(assign=True)`` (which replaces every tensor) computes with the model's current
    weights afterwards, also when a cached function (as force providers keep it) is called; the
    reference is the torch path of the same model (``LATTICE_LAB_NATIVE=0``)."""
    model = random_model(preset)
    L = lattice_size(model)
    Q = random_field(2, L)

    with torch.no_grad():
        held = model.native_function(Q)  # fetched once, as a force provider does

    def forces():
        with torch.no_grad():
            got = [model(Q)] + [F for F in (held and held(Q), ) if F is not None]
            monkeypatch.setenv("LATTICE_LAB_NATIVE", "0")
            ref = model(Q)
            monkeypatch.delenv("LATTICE_LAB_NATIVE")
        for F in got:
            torch.testing.assert_close(F, ref, rtol=1e-9, atol=1e-9)

    forces()  # builds and caches the native kernel (where there is one)
    model.float().double()  # new buffers; the kernel must not keep reading or watching the old ones
    gen = torch.Generator().manual_seed(5)
    model.fit_normalization(0.2 + 1.3 * torch.randn(2, L, L, generator=gen, dtype=torch.float64),
                            0.5 + 2.0 * torch.randn(2, L, L, generator=gen, dtype=torch.float64))
    forces()
    state = {k: v.clone() * (1.1 if v.is_floating_point() else 1) for k, v in model.state_dict().items()}
    model.load_state_dict(state, assign=True)
    forces()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.9)
    forces()


def test_weights_changed_counts_per_model():
    """``weights_changed()`` counts for the model's own modules only (every weight cache key holds its
    module's count): another model's copies are not rebuilt (a global count made every kernel in the
    process rebuild, under the feet of calls in other threads)."""
    from lattice_lab.native.policy import write_count

    a, b = random_model("enn_small"), random_model("enn_small")
    a.weights_changed()
    a.weights_changed()
    assert {write_count(m) for m in a.modules()} == {2}
    assert {write_count(m) for m in b.modules()} == {0}
    assert "_weights_written" not in a.state_dict() and not any("_weights_written" in n for n, _ in a.named_buffers())


def test_export_after_weights_changed(tmp_path):
    """The per-module count (a plain int in the module's __dict__) does not get in the way of the
    TorchScript export, whose forces match."""
    from lattice_lab.models.checkpoint import export_force_field

    model = random_model("gnn_small")
    model.weights_changed()
    ts = torch.jit.load(str(export_force_field(model, tmp_path / "m.ts.pt")))
    Q = random_field(1, lattice_size(model))
    with torch.no_grad():
        assert_close(ts(Q), model(Q), 1e-12)


def _wide_gnn() -> ForceField:
    """gnn_small with a layer wider than the native kernel's PACK_ABOVE: it reads a packed copy."""
    from lattice_lab.native.gnn import PACK_ABOVE

    return random_model("gnn_small", widths=[1, 16, PACK_ABOVE + 16, 16, 1])


@pytest.mark.parametrize("preset", [*SMALL_PRESETS, "gnn_wide"])
def test_weights_changed_after_untracked_writes(preset, monkeypatch):
    """Writes through ``p.data`` (its own version counter) change neither a version nor a data pointer,
    so the packed weight copies (native kernels, the ENN's packed layers and projection) cannot see
    them; after ``model.weights_changed()`` every path computes with the written weights again, a
    force provider's cached function included. Reference: the torch path (``LATTICE_LAB_NATIVE=0``)."""
    model = _wide_gnn() if preset == "gnn_wide" else random_model(preset)
    L = lattice_size(model)
    Q = random_field(2, L, seed=3)
    with torch.no_grad():
        held = model.native_function(Q)
        before = model(Q)  # builds every cache
        norms = [b for name, b in model.named_buffers()  # the learned normalisation, not internal constants
                 if re.fullmatch(r"([a-z]+_)?(mean|std|scale|shift)(_\w+)?", name.rsplit(".", 1)[-1])]
        assert norms  # every model has a learned normalisation
        for t in [*model.parameters(), *norms]:
            t.data.mul_(1.25)
        model.weights_changed()
        got = [model(Q)] + ([] if held is None else [held(Q)])
        monkeypatch.setenv("LATTICE_LAB_NATIVE", "0")
        ref = model(Q)
    assert (ref - before).abs().max() > 1e-3  # the writes changed the forces
    for F in got:
        if F is not None:
            assert_close(F, ref, 1e-9)
