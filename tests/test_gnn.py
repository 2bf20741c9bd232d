"""Graph networks: the direct-force GNN is the paper's cross-shaped periodic convolution, the energy
GNN's forces are the exact negative gradient of its energy, parameter/FLOP counts, training mode."""

import pytest
import torch

from lattice_lab.common.errors import ConfigError
from lattice_lab.lattice import nn_sum
from lattice_lab.models import build_model, count_parameters, flops_per_site
from lattice_lab.models.gnn import GNN, PAPER_WIDTHS
from lattice_lab.models.gnn_energy import EnergyGNN
from lattice_lab.models.registry import load_preset
from lattice_lab.physics.holstein import elastic_energy
from lattice_lab.symmetry.field_ops import periodic_correlate

HAM = {"t": 1.0, "g": 3.5, "k": 1.0, "kappa": 0.18, "temperature": 0.1, "filling": "canonical"}


def randomise(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def fitted(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    Q = 0.5 + 1.5 * torch.randn(2, 8, 8, generator=gen, dtype=torch.float64)
    F = 0.3 + 2.0 * torch.randn(2, 8, 8, generator=gen, dtype=torch.float64)
    model.fit_normalization(Q, F)
    return model


# -- direct-force GNN -------------------------------------------------------------------------
def cross_conv_reference(model: GNN, Q: torch.Tensor) -> torch.Tensor:
    """The paper's layer written as a periodic 3 x 3 convolution with a cross-shaped kernel."""
    h = ((Q - model.q_mean) / model.q_std)[:, None]
    s = 1.0 if model.aggregation == "sum" else 0.25
    for i, layer in enumerate(model.layers):
        k = torch.zeros(layer.c_out, layer.c_in, 3, 3, dtype=Q.dtype)
        k[:, :, 1, 1] = layer.w_self.T
        for dx, dy in ((0, 1), (2, 1), (1, 0), (1, 2)):
            k[:, :, dx, dy] = s * layer.w_nn.T
        h = periodic_correlate(h, k) + layer.bias[None, :, None, None]
        if i < len(model.layers) - 1:
            h = torch.relu(h)
    return h[:, 0] * model.f_std + model.f_mean


@pytest.mark.parametrize("aggregation", ["sum", "mean"])
def test_gnn_is_cross_shaped_periodic_convolution(aggregation):
    # widths with c_out > c_in and c_out < c_in exercise both aggregation orders
    model = fitted(randomise(GNN(HAM, widths=[1, 6, 3, 5, 1], aggregation=aggregation).double())).eval()
    assert [layer.aggregate_after for layer in model.layers] == [False, True, False, True]
    Q = torch.randn(2, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(Q), cross_conv_reference(model, Q), rtol=0, atol=1e-12)


def test_mean_aggregation_is_quarter_neighbour_weight():
    a = randomise(GNN(HAM, widths=[1, 4, 4, 1], aggregation="sum").double())
    b = GNN(HAM, widths=[1, 4, 4, 1], aggregation="mean").double()
    sd = a.state_dict()
    b.load_state_dict({k: (4 * v if "w_nn" in k else v) for k, v in sd.items()})
    Q = torch.randn(1, 9, 9, dtype=torch.float64)
    torch.testing.assert_close(a(Q), b(Q), rtol=0, atol=1e-12)


def test_paper_gnn_parameter_count_and_flops():
    widths = list(PAPER_WIDTHS)
    expected = sum(2 * a * b + b for a, b in zip(widths[:-1], widths[1:]))  # W_self, W_nn, bias
    assert expected == 10_753_793
    model = build_model(load_preset("gnn"), HAM)
    assert count_parameters(model) == expected
    assert model.receptive_field == 8 and model.cutoff == 8.0
    flops = flops_per_site(model)
    assert flops == sum(4 * a * b + 3 * a for a, b in zip(widths[:-1], widths[1:])) == 21_512_963
    assert abs(flops / 21e6 - 1) < 0.05  # DESIGN.md: ~21 MFLOP per site


def test_gnn_config_errors():
    with pytest.raises(ConfigError, match="model.widths"):
        GNN(HAM, widths=[2, 4, 1])
    with pytest.raises(ConfigError, match="model.widths"):
        GNN(HAM, widths=[1, 0, 1])
    with pytest.raises(ConfigError, match="model.activation='swish'"):
        GNN(HAM, widths=[1, 4, 1], activation="swish")
    with pytest.raises(ConfigError, match="model.cutoff=-1"):
        GNN(HAM, widths=[1, 4, 1], cutoff=-1)
    with pytest.raises(ConfigError, match="model.blocks=0"):
        EnergyGNN(HAM, blocks=0)
    with pytest.raises(ConfigError, match="hamiltonian.k is missing"):
        EnergyGNN({"t": 1.0, "g": 3.5}, width=4, blocks=1)


def test_gnn_training_backward():
    model = build_model(load_preset("gnn_small"), HAM).double().train()
    Q = torch.randn(2, 9, 9, dtype=torch.float64)
    loss = (model(Q) - 1.0).pow(2).mean()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert float(model.layers[0].w_nn.grad.abs().sum()) > 0


# -- energy-based GNN -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def energy_model():
    return fitted(randomise(build_model(load_preset("gnn_energy_small"), HAM).double())).eval()


def test_energy_forces_are_minus_gradient(energy_model):
    """F_i == -(E(Q + h e_i) - E(Q - h e_i)) / 2h for a set of sites (central differences)."""
    torch.manual_seed(5)
    L, h = 9, 1e-5
    Q = 0.3 + torch.randn(1, L, L, dtype=torch.float64)
    with torch.no_grad():
        F = energy_model(Q)[0]
        sites = [(0, 0), (3, 7), (8, 1), (4, 4), (6, 2)]
        E = torch.stack([Q.clone() for _ in range(2 * len(sites))])[:, 0]
        for n, (x, y) in enumerate(sites):
            E[2 * n, x, y] += h
            E[2 * n + 1, x, y] -= h
        energies = energy_model.energy(E)
    assert energies.shape == (2 * len(sites),)
    for n, (x, y) in enumerate(sites):
        fd = -(energies[2 * n] - energies[2 * n + 1]) / (2 * h)
        assert abs(float(fd - F[x, y])) < 1e-7 * max(1.0, abs(float(F[x, y]))), (x, y, float(fd), float(F[x, y]))
    assert float(F.std()) > 1e-2


def test_elastic_prior_is_the_exact_elastic_energy(energy_model):
    without = build_model(dict(energy_model.model_cfg, elastic_prior=False), HAM).double().eval()
    without.load_state_dict(energy_model.state_dict())
    Q = torch.randn(2, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        dE = energy_model.energy(Q) - without.energy(Q)
        dF = energy_model(Q) - without(Q)
    torch.testing.assert_close(dE, elastic_energy(Q, HAM), rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(dF, -HAM["k"] * Q - HAM["kappa"] * nn_sum(Q), rtol=1e-10, atol=1e-10)


def test_energy_model_grad_modes(energy_model):
    Q = torch.randn(1, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        F = energy_model(Q)
        assert not torch.is_grad_enabled()  # grad mode restored after the local enable_grad
    assert F.grad_fn is None
    assert energy_model(Q).grad_fn is None  # eval mode: no graph of the gradient (no double graph)
    torch.testing.assert_close(energy_model(Q), F, rtol=0, atol=0)
    assert energy_model.site_energy(Q).shape == Q.shape


def test_energy_model_training_backward():
    model = fitted(randomise(build_model(load_preset("gnn_energy_small"), HAM).double())).train()
    Q = torch.randn(2, 9, 9, dtype=torch.float64)
    F = model(Q)
    assert F.requires_grad
    loss = (F - 0.5).pow(2).mean()
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    # the embedding reaches the force only through the double backward: its gradient must be non-zero
    assert float(grads["embed.weight"].abs().sum()) > 0
    # and it equals a finite difference of the loss in one weight
    w = model.embed.weight
    h = 1e-6
    with torch.no_grad():
        w[0, 0] += h
        lp = (model(Q) - 0.5).pow(2).mean()
        w[0, 0] -= 2 * h
        lm = (model(Q) - 0.5).pow(2).mean()
        w[0, 0] += h
    fd = float((lp - lm) / (2 * h))
    assert abs(fd - float(grads["embed.weight"][0, 0])) < 1e-6 * max(1.0, abs(fd))


def test_energy_model_receptive_field_and_cutoff():
    model = build_model(load_preset("gnn_energy"), HAM)
    assert model.receptive_field == 8 and model.cutoff == 8.0 and model.conservative
    assert flops_per_site(model) > 0


@pytest.mark.parametrize(("B", "L", "chunk"), [(3, 12, 100), (1, 13, 40), (2, 9, 1), (5, 9, 200)])
def test_energy_model_chunked_forces_are_exact(energy_model, B, L, chunk):
    """Inference in pieces (bands of rows with a halo, groups of configurations) = one graph. On the torch
    path: with the native kernel (the preset's ``auto``) both sides were the kernel, and a halo of fewer
    than ``blocks`` rows went unnoticed."""
    Q = torch.randn(B, L, L, dtype=torch.float64)
    energy_model.chunk_sites = 10 ** 9
    energy_model.native_kernel = False
    try:
        with torch.no_grad():
            ref = energy_model(Q)
        energy_model.chunk_sites = chunk
        with torch.no_grad():
            torch.testing.assert_close(energy_model(Q), ref, atol=1e-12, rtol=0)
        torch.testing.assert_close(energy_model(Q), ref, atol=1e-12, rtol=0)  # grad enabled, eval mode
    finally:
        energy_model.chunk_sites = 32768
        energy_model.native_kernel = "auto"


@pytest.mark.parametrize(("activation", "aggregation"), [("relu", "sum"), ("silu", "mean")])
def test_gnn_bands_match_whole_lattice(activation, aggregation):
    """CPU inference in bands of rows (neighbour rows from the periodic ring) = the whole-lattice layer. On
    the torch path (``native_kernel: false``): with the native kernel both sides were the kernel, and a band's
    neighbour sum that wrapped the wrong column, or a mean that summed, went unnoticed."""
    from lattice_lab.models.gnn import CrossLayer

    cfg = dict(load_preset("gnn_small"), widths=[1, 6, 3, 7, 2, 1], activation=activation,
               aggregation=aggregation, native_kernel=False)
    model = randomise(build_model(cfg, HAM).double()).eval()
    net = getattr(model, "network", model)
    Q = torch.randn(2, 11, 11, dtype=torch.float64)
    with torch.no_grad():
        ref = model(Q)
        try:
            CrossLayer.band_bytes = 8  # one row per band, both aggregation orders (widths go up and down)
            assert all(layer._use_bands(torch.zeros(2, 11, 11, layer.c_in, dtype=torch.float64))
                       for layer in net.layers)
            got = model(Q)
        finally:
            CrossLayer.band_bytes = 8 << 20
    torch.testing.assert_close(got, ref, atol=1e-12, rtol=0)
    assert not net.layers[0]._use_bands(torch.zeros(2, 11, 11, 1, dtype=torch.float64, requires_grad=True))


def test_gnn_fit_normalization_sets_the_data_moments():
    """Input shift/scale = mean/std of Q, output shift/scale = mean/std of F (float64, std over all sites):
    a force scale taken from Q instead would scale every predicted force by the wrong factor."""
    gen = torch.Generator().manual_seed(2)
    Q = 0.5 + 1.5 * torch.randn(3, 8, 8, generator=gen, dtype=torch.float64)
    F = -0.4 + 3.0 * torch.randn(3, 8, 8, generator=gen, dtype=torch.float64)
    model = GNN(HAM, widths=[1, 4, 1])
    model.fit_normalization(Q, F)
    got = [float(getattr(model, name)) for name in ("q_mean", "q_std", "f_mean", "f_std")]
    want = [float(Q.mean()), float(Q.std(unbiased=False)), float(F.mean()), float(F.std(unbiased=False))]
    assert got == pytest.approx(want, rel=1e-6)


def test_energy_model_output_scale_follows_its_normalisation():
    """The learned part of the force is ``f_std * (-d readout / dx) + f_mean`` with x = (Q - q_mean) / q_std
    (module docstring), where f_mean / f_std are the moments of the force minus its elastic part. An energy
    scale without the factor q_std, or moments of the total force, would scale or shift every force."""
    model = randomise(build_model(load_preset("gnn_energy_small"), HAM).double())
    gen = torch.Generator().manual_seed(4)
    Q = 0.5 + 2.5 * torch.randn(2, 9, 9, generator=gen, dtype=torch.float64)  # q_std far from 1
    F = 0.3 + 2.0 * torch.randn(2, 9, 9, generator=gen, dtype=torch.float64)
    model.native_kernel = False
    model.fit_normalization(Q, F)
    residual = F - (-HAM["k"] * Q - HAM["kappa"] * nn_sum(Q))
    assert [float(model.f_mean), float(model.f_std)] == pytest.approx(
        [float(residual.mean()), float(residual.std(unbiased=False))], rel=1e-6)
    model.eval()
    x = ((Q - model.q_mean) / model.q_std).requires_grad_(True)
    h = model.embed(x.unsqueeze(-1))
    for block in model.blocks:
        h = block(h)
    (dr_dx,) = torch.autograd.grad(model.readout(h).sum(), [x])
    learned = model(Q) - (-HAM["k"] * Q - HAM["kappa"] * nn_sum(Q))
    torch.testing.assert_close(learned, model.f_std * -dr_dx + model.f_mean, rtol=1e-10, atol=1e-10)


def test_energy_model_keeps_no_graph_under_no_grad_in_training_mode():
    """compute_forces (the exported path) keeps the graph of the gradient only when the caller records
    one: under no_grad in training mode it must return plain forces, not a graph that pins memory."""
    model = fitted(randomise(build_model(load_preset("gnn_energy_small"), HAM).double())).train()
    Q = torch.randn(1, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        F = model.compute_forces(Q)
    assert F.grad_fn is None and not F.requires_grad
    assert model.compute_forces(Q).requires_grad  # grad enabled in training: the graph for a force loss


def test_energy_model_flops_are_three_forward_passes():
    """flops.py: a force of the energy GNN costs 3 x forward (forward + a backward of twice its cost),
    forward = 2 sum(in * out) over every linear map + 3 width neighbour adds per block."""
    model = EnergyGNN(HAM, width=4, blocks=1, readout=[4])
    # in * out: embed 4, self / neighbour / update MLPs 3 x (16 + 16), residual 16, readout 16 + 4
    forward = 2 * (4 + 3 * 32 + 16 + 20) + 3 * 4 * 1
    assert flops_per_site(model) == 3 * forward == 852
