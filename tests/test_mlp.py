"""Descriptor + MLP: exact invariance of the descriptor, equivariance of the forces, locality,
normalisation, gradients, presets."""

import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from lattice_lab.common.errors import ConfigError
from lattice_lab.lattice import translate
from lattice_lab.models.descriptor import D4Descriptor
from lattice_lab.models.mlp import DescriptorMLP
from lattice_lab.symmetry import apply_group_element

HAM = {"t": 1.0, "g": 3.5, "k": 1.0, "kappa": 0.18, "temperature": 0.1, "filling": "canonical"}
SQRT13 = math.sqrt(13.0)
CONF = Path(__file__).resolve().parents[1] / "conf" / "model"


def _site_fields(d: torch.Tensor, B: int, L: int) -> torch.Tensor:
    """[B*L*L, F] -> [B, F, L, L] (features as fields)."""
    return d.reshape(B, L, L, -1).permute(0, 3, 1, 2)


def test_descriptor_layout():
    desc = D4Descriptor(SQRT13)
    assert desc.n_features == 9 + 2 * (3 + 6 + 5) + 3 * 11 == 70 == len(desc.feature_names)
    assert desc.ref == {"A2": [0], "B1": [2], "B2": [1], "E": [3, 4]}  # the r^2 = 5 shell channels


@pytest.mark.parametrize("ref_r2", [5, 10, 13])
def test_descriptor_is_invariant(ref_r2):
    desc = D4Descriptor(SQRT13, reference_shell_r2=ref_r2)
    B, L = 2, 8
    Q = torch.randn(B, L, L, dtype=torch.float64)
    D = _site_fields(desc(Q), B, L)
    for g in range(8):
        Dg = _site_fields(desc(apply_group_element(Q, g)), B, L)
        torch.testing.assert_close(Dg, apply_group_element(D, g), atol=1e-12, rtol=0)
    Dt = _site_fields(desc(translate(Q, (3, -2))), B, L)
    torch.testing.assert_close(Dt, translate(D, (3, -2)), atol=1e-12, rtol=0)
    assert D[:, 9:].std() > 0.1  # non-trivial features, so the checks above can fail


def test_descriptor_continuous_and_finite_at_zero():
    desc = D4Descriptor(SQRT13)
    Q = torch.zeros(1, 8, 8, dtype=torch.float64, requires_grad=True)
    d = desc(Q)
    d.sum().backward()
    assert torch.isfinite(d).all() and torch.isfinite(Q.grad).all()
    # phases vanish continuously as the reference vanishes
    Q2 = 1e-9 * torch.randn(1, 8, 8, dtype=torch.float64)
    assert desc(Q2)[:, 9:].abs().max() < 1e-3


def _randomise(model: DescriptorMLP, seed: int = 5) -> DescriptorMLP:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        model.feat_mean.copy_(torch.randn(model.feat_mean.shape, generator=g, dtype=model.feat_mean.dtype))
        model.feat_std.copy_(0.5 + torch.rand(model.feat_std.shape, generator=g, dtype=model.feat_std.dtype))
        model.out_scale.fill_(2.3)
        model.out_shift.fill_(0.4)
    return model


def test_forces_equivariant_and_local():
    model = _randomise(DescriptorMLP(HAM, SQRT13, [16, 8]).double())
    Q = torch.randn(2, 8, 8, dtype=torch.float64)
    F = model(Q)
    assert F.std() > 1e-3 and not torch.allclose(F, apply_group_element(F, 1))
    for g in range(8):
        torch.testing.assert_close(model(apply_group_element(Q, g)), apply_group_element(F, g), atol=1e-10, rtol=0)
    for shift in [(1, 0), (2, 5)]:
        torch.testing.assert_close(model(translate(Q, shift)), translate(F, shift), atol=1e-10, rtol=0)
    torch.testing.assert_close(model(Q.repeat(1, 2, 2)), F.repeat(1, 2, 2), atol=1e-12, rtol=0)


def test_fit_normalization_gradients_and_float32():
    model = DescriptorMLP(HAM, SQRT13, [16, 8])
    Q = 0.5 + torch.randn(4, 8, 8, dtype=torch.float64)
    F = -1.0 + 2.0 * torch.randn(4, 8, 8, dtype=torch.float64)
    model.fit_normalization(Q, F)
    d = (model.descriptor(Q) - model.feat_mean.double()) / model.feat_std.double()
    torch.testing.assert_close(d.mean(0), torch.zeros(70, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(d.std(0, unbiased=False), torch.ones(70, dtype=torch.float64), atol=1e-4, rtol=0)
    assert model.out_shift.item() == pytest.approx(F.mean().item(), rel=1e-5)
    assert model.out_scale.item() == pytest.approx(F.std(unbiased=False).item(), rel=1e-5)
    out = model(Q.float())
    assert out.dtype == torch.float32
    ((out - F.float()) ** 2).mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


def test_bad_configuration():
    with pytest.raises(ConfigError, match="model.reference_shell_r2=4"):
        DescriptorMLP(HAM, SQRT13, [8], reference_shell_r2=4)  # a 4-site shell has no A2 / 2E
    with pytest.raises(ConfigError, match="model.reference_shell_r2=25"):
        DescriptorMLP(HAM, 5.0, [8], reference_shell_r2=25)  # two orbits at r^2 = 25
    with pytest.raises(ConfigError, match="model.hidden"):
        DescriptorMLP(HAM, SQRT13, [8, -1])
    with pytest.raises(ConfigError, match="model.phase_eps"):
        DescriptorMLP(HAM, SQRT13, [8], phase_eps=0.0)
    # were a TypeError / ValueError traceback (2.5 was taken as 2)
    with pytest.raises(ConfigError, match=r"^model.phase_eps='abc': need a positive epsilon"):
        DescriptorMLP(HAM, SQRT13, [8], phase_eps="abc")
    for bad in ("abc", 2.5):
        with pytest.raises(ConfigError, match=rf"^model.reference_shell_r2={bad!r}: expected the integer"):
            DescriptorMLP(HAM, SQRT13, [8], reference_shell_r2=bad)
    with pytest.raises(ConfigError, match="model.cutoff='abc'"):
        DescriptorMLP(HAM, "abc", [8])


@pytest.mark.parametrize("preset", ["mlp", "mlp_small"])
def test_presets_build(preset):
    cfg = OmegaConf.to_container(OmegaConf.load(CONF / f"{preset}.yaml"))
    assert cfg.pop("name") == "mlp"
    cfg.pop("elastic_prior", None)  # a registry-level wrapper (models/prior.py), not a constructor argument
    model = DescriptorMLP(hamiltonian=HAM, **cfg)
    widths = [m.out_features for m in model.net if isinstance(m, torch.nn.Linear)]
    if preset == "mlp":
        assert widths == [4096, 2048, 750, 592, 256, 127, 69, 1]
    else:
        assert model(torch.randn(1, 8, 8)).shape == (1, 8, 8)


def test_flops_count_the_mlp_and_the_environment_projection():
    """flops.py: 2 sum(in * out) over the MLP's linear layers + 2 M^2 for the projection of the M = 45
    environment sites onto the symmetry-adapted basis."""
    from lattice_lab.models import flops_per_site

    model = DescriptorMLP(HAM, SQRT13, [8])
    assert flops_per_site(model) == 2 * (70 * 8 + 8 * 1) + 2 * 45 * 45 == 5186
