"""The exact elastic prior: total force = elastic force + learned electronic force."""

import torch

from lattice_lab.models.checkpoint import export_force_field, load_force_field
from lattice_lab.models.registry import build_model
from lattice_lab.physics.holstein import HolsteinParams, elastic_force

HAM = HolsteinParams(temperature=0.1)


def test_prior_adds_the_exact_elastic_force_and_fits_the_remainder():
    torch.manual_seed(0)
    cfg = {"name": "gnn", "widths": [1, 4, 1], "elastic_prior": True}
    model = build_model(cfg, HAM).double()
    bare = build_model({**cfg, "elastic_prior": False}, HAM).double()
    bare.load_state_dict(model.network.state_dict())
    Q = torch.randn(3, 9, 9, dtype=torch.float64) * 3
    expect = bare(Q) + elastic_force(Q, HAM)
    assert torch.allclose(model(Q), expect, atol=1e-12)
    assert model.model_cfg["elastic_prior"] is True

    # the network is normalised on F - F_elastic: a purely elastic target gives a zero-mean residual
    F = elastic_force(Q, HAM) + 0.5
    model.fit_normalization(Q, F)
    assert abs(float(model.network.f_mean) - 0.5) < 1e-12


def test_prior_model_round_trips_through_checkpoint_and_export(tmp_path):
    from lattice_lab.models.checkpoint import save_checkpoint

    model = build_model({"name": "gnn", "widths": [1, 4, 1], "elastic_prior": True}, HAM)
    Q = torch.randn(2, 9, 9)
    save_checkpoint(tmp_path / "m.pt", model, model.model_cfg)
    loaded = load_force_field(tmp_path / "m.pt", device="cpu")
    assert torch.allclose(loaded(Q), model(Q), atol=1e-6)
    export_force_field(model, tmp_path / "m.ts.pt")
    exported = load_force_field(tmp_path / "m.ts.pt", device="cpu")
    assert torch.allclose(exported(Q), model(Q), atol=1e-5)
