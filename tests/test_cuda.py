"""CUDA paths: every model, ED, the Langevin integrator and the simulate/train entrypoints on a GPU.

Skipped where no CUDA device exists (CI). On a GPU machine these prove that the CUDA code gives the
CPU's numbers (float64) and keeps the symmetries (float32), and that the entrypoints run there.
"""

import copy

import h5py
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from test_models_common import assert_close, lattice_size, random_field, random_model

from lattice_lab.common.cli import CONFIG_DIR
from lattice_lab.dynamics.forces import MLForceProvider
from lattice_lab.dynamics.langevin import LangevinIntegrator, LangevinParams
from lattice_lab.lattice import translate
from lattice_lab.models import available_presets
from lattice_lab.physics.holstein import HolsteinParams
from lattice_lab.symmetry.field_ops import apply_group_element

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module", params=available_presets())
def pair(request):
    """(CPU model, CUDA copy) of a preset in float64 with random weights and normalisation."""
    cpu = random_model(request.param)
    return cpu, copy.deepcopy(cpu).cuda()


def test_models_match_cpu_in_float64(pair):
    cpu, gpu = pair
    Q = random_field(2, lattice_size(cpu), seed=5)
    F_cpu = cpu(Q).detach()
    F_gpu = gpu(Q.cuda()).detach()
    assert F_gpu.device.type == "cuda" and float(F_cpu.std()) > 1e-3
    assert_close(F_gpu.cpu(), F_cpu, tol=1e-9)


def test_models_equivariant_in_float32_on_cuda(pair):
    _, gpu = pair
    model = copy.deepcopy(gpu).float()
    L = lattice_size(model)
    Q = random_field(2, L, seed=6).float().cuda()
    F = model(Q).detach()
    for i in range(8):
        assert_close(model(apply_group_element(Q, i)).detach(), apply_group_element(F, i), tol=2e-5)
    shifted = translate(Q, (3, 1 - L // 2))
    assert_close(model(shifted).detach(), translate(F, (3, 1 - L // 2)), tol=2e-5)


def test_langevin_on_cuda_is_reproducible_and_finite():
    """A float32 GNN force field drives 30 Langevin steps of 4 replicas on the GPU, twice with one seed."""
    model = random_model("gnn_small").float()
    ham = HolsteinParams()
    provider = MLForceProvider(ham, "cuda", torch.float32, None, model=model)

    def trajectory():
        gen = torch.Generator(device="cuda").manual_seed(7)
        integ = LangevinIntegrator(provider, LangevinParams(), generator=gen)
        Q0 = 0.5 * torch.randn(4, 12, 12, generator=gen, device="cuda")
        state = integ.step(integ.init_state(Q0), 30)
        return state.Q.cpu()

    a, b = trajectory(), trajectory()
    assert torch.isfinite(a).all() and torch.equal(a, b)


def _compose(config_name, overrides):
    with initialize_config_dir(config_dir=CONFIG_DIR):
        return compose(config_name=config_name, overrides=overrides)


def test_simulate_and_train_entrypoints_on_cuda(tmp_path):
    """ED data -> train gnn_small on the GPU -> ML quench on the GPU, each entrypoint with device=cuda."""
    from lattice_lab.data.h5io import write_force_dataset
    from lattice_lab.physics.ed import ExactForces
    from lattice_lab.simulate import run as simulate
    from lattice_lab.train import run as train

    ham = HolsteinParams(temperature=0.1)
    gen = torch.Generator().manual_seed(2)
    Q = torch.randn(6, 10, 10, generator=gen, dtype=torch.float64) * 1.5
    res = ExactForces(ham, device="cuda").compute(Q.cuda())
    data = tmp_path / "tiny.h5"
    write_force_dataset(data, {"Q": Q.numpy(), "F": res.forces.cpu().numpy(), "n": res.density.cpu().numpy(),
                               "kind": np.zeros(6, np.uint8), "is_val": np.arange(6) >= 4},
                        attrs={**ham.as_dict(), "name": "tiny"})
    best = train(_compose("train", [
        "model=gnn_small", "dataset=holstein_L8_tiny", f"dataset.path={data}", "trainer=quick",
        "trainer.max_epochs=2", "trainer.progress=false", "device=cuda", "tracking.enabled=false",
        f"output_root={tmp_path}"]))
    assert np.isfinite(best)
    ckpt = next(tmp_path.rglob("best.pt"))
    out = simulate(_compose("simulate", [
        "device=cuda", "tracking.enabled=false", "analyze=false", "dynamics.L=16", "dynamics.replicas=3",
        "dynamics.steps=20", "dynamics.save_every=10", "seed=3", "force=ml", f"force.checkpoint={ckpt}",
        f"output_root={tmp_path / 'sim'}"]))
    assert out["completed"] and out["step"] == 20
    with h5py.File(out["trajectory"], "r") as f:
        Qt = f["Q"][...]
    assert Qt.shape[1:] == (3, 16, 16) and np.isfinite(Qt).all() and np.abs(Qt[-1] - Qt[0]).max() > 1e-3


class _Linear:
    """F = -Q + 0.1 Q^3: a pure-torch force, so graph and eager steps run the same kernels."""

    def __call__(self, Q):
        return -Q + 0.1 * Q.pow(3)


def _run_steps(force, graph: bool, n: int, seed: int = 11, state_seed: int = 4):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    integ = LangevinIntegrator(force, LangevinParams(), generator=gen, cuda_graph=graph)
    Q0 = torch.randn(3, 12, 12, generator=torch.Generator().manual_seed(state_seed)).cuda()
    state = integ.init_state(Q0)
    for k in (1, n - 1):  # two calls: the second replays an existing recording
        integ.step(state, k)
    return state, gen.get_state(), integ


@pytest.mark.parametrize("force", ["linear", "gnn_small", "gnn_energy_small", "enn_small"])
def test_cuda_graph_steps_match_eager_steps(force):
    """Recorded steps draw the eager run's noise (bitwise for a pure-torch force) and give its states."""
    if force == "linear":
        fn = _Linear()
    else:
        fn = MLForceProvider(HolsteinParams(), "cuda", torch.float32, None, model=random_model(force).float())
    eager, rng_eager, _ = _run_steps(fn, False, 25)
    graph, rng_graph, integ = _run_steps(fn, True, 25)
    assert integ._graph is not None and graph.step == eager.step == 25
    assert torch.equal(rng_graph, rng_eager)
    for a, b in ((graph.Q, eager.Q), (graph.V, eager.V), (graph.F, eager.F)):
        if force == "linear":
            assert torch.equal(a, b)
        else:
            assert_close(a, b, tol=1e-5)


@pytest.mark.parametrize("force", ["gnn_small", "enn_small"])
def test_compiled_model_in_the_step_graph_matches_eager_steps(force):
    """force.compile=auto on CUDA compiles the model, and cuda_graph=auto records the compiled model in the
    step's graph: the same noise and, to float32 rounding, the same states as eager uncompiled steps."""
    model = random_model(force).float()
    eager_fn = MLForceProvider(HolsteinParams(), "cuda", torch.float32, None, model=model)
    compiled_fn = MLForceProvider(HolsteinParams(), "cuda", torch.float32, None, model=copy.deepcopy(model),
                                  compile="auto")
    assert compiled_fn.compiled
    eager, rng_eager, _ = _run_steps(eager_fn, False, 25)
    graph, rng_graph, integ = _run_steps(compiled_fn, True, 25)
    assert integ._graph is not None and compiled_fn.compiled  # recorded, and no fallback to eager
    assert torch.equal(rng_graph, rng_eager)
    for a, b in ((graph.Q, eager.Q), (graph.V, eager.V), (graph.F, eager.F)):
        assert_close(a, b, tol=1e-5)


def test_cuda_graph_records_again_for_a_new_state():
    fn = _Linear()
    _, _, integ = _run_steps(fn, True, 5)
    first = integ._graph
    gen = integ.generator.manual_seed(11)
    other = integ.init_state(torch.randn(2, 10, 10, generator=torch.Generator().manual_seed(4)).cuda())
    integ.step(other, 5)
    assert integ._graph is not first and other.step == 5
    ref = LangevinIntegrator(fn, LangevinParams(), generator=gen.manual_seed(11))
    st = ref.init_state(torch.randn(2, 10, 10, generator=torch.Generator().manual_seed(4)).cuda())
    ref.step(st, 5)
    assert torch.equal(st.Q, other.Q)


def test_cuda_graph_resume_is_bit_identical(tmp_path):
    """simulate on CUDA with recorded steps: stop, resume, and the trajectory equals an uninterrupted run."""
    from lattice_lab.models.checkpoint import save_checkpoint
    from lattice_lab.simulate import run as simulate

    ckpt = tmp_path / "gnn.pt"
    save_checkpoint(ckpt, random_model("gnn_small").float(), {})
    base = ["device=cuda", "tracking.enabled=false", "analyze=false", "dynamics.L=12", "dynamics.replicas=2",
            "dynamics.steps=30", "dynamics.save_every=10", "seed=5", "force=ml", f"force.checkpoint={ckpt}",
            "cuda_graph=true"]
    whole = simulate(_compose("simulate", [*base, f"output_root={tmp_path / 'a'}"]))
    simulate(_compose("simulate", [*base, f"output_root={tmp_path / 'b'}", "stop_after_steps=10"]))
    parts = simulate(_compose("simulate", [*base, f"output_root={tmp_path / 'b'}", "resume=true"]))
    with h5py.File(whole["trajectory"], "r") as fa, h5py.File(parts["trajectory"], "r") as fb:
        assert fa["Q"].shape == fb["Q"].shape == (4, 2, 12, 12)
        assert np.array_equal(fa["Q"][...], fb["Q"][...])
