"""simulate: ED/ML-driven Langevin runs, trajectories, checkpoints, exact resume, divergence, refusals."""

import copy
import json
import math
import os
import re
import signal
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from lattice_lab.common.cli import CONFIG_DIR
from lattice_lab.common.errors import ConfigError, SimulationDiverged
from lattice_lab.common.seeding import check_seed
from lattice_lab.dynamics.compare_run import run_comparison
from lattice_lab.dynamics.forces import EDForceProvider, ForceProvider, make_force_provider, weights_sha256
from lattice_lab.dynamics.runner import build_hamiltonian, run_simulation
from lattice_lab.dynamics.trajectory import partial_path
from lattice_lab.physics.ed import ExactForces
from lattice_lab.physics.holstein import HolsteinParams, density_from_force
from lattice_lab.simulate import run

L, R = 8, 2
BASE = ["device=cpu", "tracking.enabled=false", "analyze=false", f"dynamics.L={L}", f"dynamics.replicas={R}",
        "dynamics.steps=20", "dynamics.save_every=5", "dynamics.temperature=0.1", "seed=3"]


def make_cfg(tmp_path, *overrides, config_name="simulate"):
    with initialize_config_dir(config_dir=CONFIG_DIR):
        return compose(config_name=config_name, overrides=[f"output_root={tmp_path}", *BASE, *overrides])


def read_all(path):
    with h5py.File(path, "r") as f:
        return {k: f[k][...] for k in ("Q", "n", "step", "time")}, dict(f.attrs)


@pytest.fixture(scope="module")
def gnn_checkpoint(tmp_path_factory):
    """A small GNN with random weights for the default Hamiltonian, saved as a checkpoint."""
    from lattice_lab.models.checkpoint import save_checkpoint
    from lattice_lab.models.registry import build_model

    torch.manual_seed(0)
    model = build_model({"name": "gnn", "widths": [1, 8, 8, 1]}, HolsteinParams().as_dict())
    path = tmp_path_factory.mktemp("model") / "gnn_small.pt"
    save_checkpoint(path, model, {})
    return path, model


class Harmonic(ForceProvider):
    """F = -stiffness * Q on every replica; records the batch shape of every call."""

    source = "harmonic"

    def __init__(self, stiffness=1.0, nan_at_call=None):
        super().__init__(HolsteinParams(), "cpu", torch.float64)
        self.stiffness, self.nan_at_call, self.shapes = stiffness, nan_at_call, []

    def _evaluate(self, Q):
        self.shapes.append(tuple(Q.shape))
        F = -self.stiffness * Q
        if self.nan_at_call is not None and len(self.shapes) >= self.nan_at_call:
            F = F * float("nan")
        return F


class Crashing:
    """Wrap a provider and raise at the given force call (simulates a killed job)."""

    def __init__(self, inner, at_call):
        self.inner, self.at_call, self.calls = inner, at_call, 0

    def __call__(self, Q):
        self.calls += 1
        if self.calls == self.at_call:
            raise RuntimeError("injected crash")
        return self.inner(Q)

    def __getattr__(self, name):
        return getattr(self.inner, name)


# -- valid trajectories -------------------------------------------------------------------------
def test_ed_run_writes_valid_trajectory(tmp_path):
    cfg = make_cfg(tmp_path, "force=ed")
    res = run(cfg)
    assert res["completed"] and res["step"] == 20 and res["frames"] == 5
    assert res["steps_per_s"] > 0 and res["site_steps_per_s"] == pytest.approx(res["steps_per_s"] * R * L * L)
    data, attrs = read_all(res["trajectory"])
    assert data["Q"].shape == (5, R, L, L) and data["n"].shape == (5, R, L, L)
    assert data["Q"].dtype == np.float32 and data["n"].dtype == np.float32
    np.testing.assert_array_equal(data["step"], [0, 5, 10, 15, 20])
    np.testing.assert_allclose(data["time"], 0.05 * data["step"], rtol=0, atol=1e-12)
    assert np.isfinite(data["Q"]).all() and np.isfinite(data["n"]).all()
    assert ((data["n"] >= 0) & (data["n"] <= 1)).all()
    assert attrs["force_source"] == "ed" and attrs["L"] == L and attrs["R"] == R and attrs["seed"] == 3
    for key, val in (("dt", 0.05), ("mass", 5.0), ("gamma", 0.2), ("temperature", 0.1), ("g", 3.5),
                     ("kappa", 0.18), ("init_temperature", 5.0)):
        assert attrs[key] == pytest.approx(val), key
    assert "force:" in attrs["config"] and (tmp_path / "ed_L8_R2_T0.1_seed3" / "config.yaml").exists()
    assert not partial_path(res["trajectory"]).exists()
    # the saved density is the ED density at the saved configuration (final state from the checkpoint)
    ck = torch.load(res["checkpoint"], weights_only=False)
    assert ck["state"]["step"] == 20 and ck["n_frames"] == 5
    Q = ck["state"]["Q"]
    np.testing.assert_array_equal(data["Q"][-1], Q.numpy().astype(np.float32))
    ed = ExactForces(HolsteinParams(temperature=0.1)).compute(Q)
    np.testing.assert_allclose(data["n"][-1], ed.density.numpy(), atol=1e-6)
    torch.testing.assert_close(ck["state"]["F"], ed.forces, rtol=0, atol=1e-12)
    # the hot start: Q ~ N(0, T_init/kappa) -> sample variance near 5/0.18 = 27.8
    assert 15 < float(np.var(data["Q"][0])) < 45


def test_run_is_the_documented_recipe_with_its_own_settings(tmp_path):
    """The run rebuilt by hand from its settings: generator seeded with ``seed``, hot start with
    (mass, init_temperature), bath with (mass, gamma, dt, temperature), ED forces at the bath
    temperature. Every setting differs from the others and from its default, so a runner that
    passes init_temperature as the bath temperature, a wrong friction, or swaps mass and
    init_temperature in the hot start (both 5 by default) gives other frames."""
    from lattice_lab.dynamics import LangevinIntegrator, LangevinParams, random_hot_start

    dyn = {"mass": 2.0, "gamma": 0.7, "dt": 0.04, "temperature": 0.25, "init_temperature": 3.0}
    cfg = make_cfg(tmp_path, "force=ed", *(f"dynamics.{k}={v}" for k, v in dyn.items()))
    data, _ = read_all(run(cfg)["trajectory"])
    gen = torch.Generator().manual_seed(3)
    ham = HolsteinParams(temperature=dyn["temperature"])
    Q0, V0 = random_hot_start(R, L, ham, dyn["mass"], dyn["init_temperature"], gen)
    integ = LangevinIntegrator(ExactForces(ham), LangevinParams(mass=dyn["mass"], gamma=dyn["gamma"], dt=dyn["dt"],
                                                                temperature=dyn["temperature"]), gen)
    state = integ.init_state(Q0, V0)
    frames = [Q0.clone()]
    for _ in range(4):
        frames.append(integ.step(state, 5).Q.clone())
    np.testing.assert_allclose(data["time"], dyn["dt"] * data["step"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(data["Q"], torch.stack(frames).float().numpy(), rtol=0, atol=1e-5)


def test_ml_run_writes_valid_trajectory(tmp_path, gnn_checkpoint):
    path, model = gnn_checkpoint
    cfg = make_cfg(tmp_path, "force=ml", f"force.checkpoint={path}", "dtype=float64")
    res = run(cfg)
    assert res["completed"] and res["frames"] == 5
    data, attrs = read_all(res["trajectory"])
    assert attrs["force_source"] == "ml" and attrs["model_path"] == str(path)
    assert attrs["force_compiled"] == False and attrs["cuda_graph"] == False  # noqa: E712 - h5py's numpy bools
    assert np.isfinite(data["Q"]).all() and np.isfinite(data["n"]).all()
    ck = torch.load(res["checkpoint"], weights_only=False)
    Q = ck["state"]["Q"]
    with torch.no_grad():
        F = model.double()(Q)
    torch.testing.assert_close(ck["state"]["F"], F, rtol=1e-12, atol=1e-12)
    n = density_from_force(F, Q, HolsteinParams())
    np.testing.assert_allclose(data["n"][-1], n.numpy(), rtol=1e-6, atol=1e-5)


def test_ml_run_reuses_two_force_buffers_and_keeps_every_force_exact(tmp_path, gnn_checkpoint):
    """simulate lets its integrator overwrite the force it handed out at the next step (reuse_forces):
    from the third step on no force tensor is allocated, two buffers alternate, and the frames and the
    checkpoint still hold the forces of their own configurations."""
    path, model = gnn_checkpoint
    cfg = make_cfg(tmp_path, "force=ml", f"force.checkpoint={path}", "dtype=float64", "native_integrator=true")
    provider = make_force_provider(cfg.force, build_hamiltonian(cfg), "cpu", "float64")
    outs = []
    real = provider.forces_into
    provider.forces_into = lambda Q, out=None: outs.append(out) or real(Q, out)
    res = run_simulation(cfg, force_provider=provider)
    assert res["completed"] and outs[0] is None and len(outs) == 1 + 20  # the hot start's force, 20 steps
    assert len({out.data_ptr() for out in outs[1:]}) == 2  # outs keeps every buffer alive: none was freed
    ck = torch.load(res["checkpoint"], weights_only=False)["state"]
    with torch.no_grad():
        F = model.double()(ck["Q"])
    torch.testing.assert_close(ck["F"], F, rtol=1e-12, atol=1e-12)
    data, _ = read_all(res["trajectory"])
    n = density_from_force(F, ck["Q"], HolsteinParams())
    np.testing.assert_allclose(data["n"][-1], n.numpy(), rtol=1e-6, atol=1e-5)


def test_ml_float32_default_and_chunking(tmp_path, gnn_checkpoint):
    path, _ = gnn_checkpoint
    ham = HolsteinParams()
    full = make_force_provider({"source": "ml", "checkpoint": str(path)}, ham, "cpu", "float32")
    chunked = make_force_provider({"source": "ml", "checkpoint": str(path), "chunk_replicas": 2}, ham, "cpu",
                                  "float32")
    assert full.dtype == torch.float32
    Q = torch.randn(5, L, L, dtype=torch.float64)
    F1, F2 = full(Q), chunked(Q)
    assert F1.dtype == torch.float64 and F1.shape == Q.shape  # returned in the caller's dtype
    torch.testing.assert_close(F1, F2, rtol=1e-5, atol=1e-5)


def test_energy_model_forces_need_autograd(tmp_path):
    from lattice_lab.models.checkpoint import save_checkpoint
    from lattice_lab.models.registry import build_model, load_preset

    model = build_model(load_preset("gnn_energy_small"), HolsteinParams().as_dict()).double().eval()
    path = tmp_path / "energy.pt"
    save_checkpoint(path, model, {"mlflow_run_id": "0123456789abcdef0123456789abcdef"})
    prov = make_force_provider({"source": "ml", "checkpoint": str(path)}, HolsteinParams(), "cpu", "float64")
    assert prov.conservative and prov.model_run_id == "0123456789abcdef0123456789abcdef"
    Q = torch.randn(2, 10, 10, dtype=torch.float64)
    with torch.no_grad():  # the integrator's context: the provider must re-enable autograd itself
        F = prov(Q)
    q = Q.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model.energy(q).sum(), q)
    torch.testing.assert_close(F, -grad, rtol=1e-12, atol=1e-12)
    assert not F.requires_grad


def test_a_checkpoint_given_by_run_id_is_fetched_from_the_store_of_tracking_uri(tmp_path, gnn_checkpoint, monkeypatch,
                                                                               log_train_run):
    """``force.checkpoint=<run id>`` with ``tracking.uri``: the model comes from that store (the lookup went only to
    $MLFLOW_TRACKING_URI or runs/mlflow.db)."""
    path, model = gnn_checkpoint
    uri = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    train = log_train_run(uri, path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    res = run(make_cfg(tmp_path, "force=ml", f"force.checkpoint={train}", f"tracking.uri={uri}", "dynamics.steps=2"))
    assert res["completed"]
    assert not (tmp_path / "runs" / "mlflow.db").exists()
    prov = make_force_provider({"source": "ml", "checkpoint": train}, HolsteinParams(), "cpu", "float64",
                               tracking_uri=uri)
    assert prov.model_run_id == train and prov.model_sha256 == weights_sha256(model)


def test_compile_failure_falls_back_to_eager(gnn_checkpoint, monkeypatch):
    path, model = gnn_checkpoint

    def broken_compile(fn, *a, **k):
        def call(*args):
            raise RuntimeError("no compiler")
        return call

    monkeypatch.setattr(torch, "compile", broken_compile)
    prov = make_force_provider({"source": "ml", "checkpoint": str(path), "compile": True}, HolsteinParams(),
                               "cpu", "float64")
    Q = torch.randn(2, L, L, dtype=torch.float64)
    with pytest.warns(UserWarning, match="torch.compile failed"):
        F = prov(Q)
    with torch.no_grad():
        torch.testing.assert_close(F, model.double()(Q))


def test_compile_auto_compiles_on_cuda_only(gnn_checkpoint, tmp_path):
    """force.compile=auto: torch.compile on CUDA (where the compiled model, recorded in the step's graph, is
    faster), never on the CPU (native kernels) and never a TorchScript export; true / false are kept."""
    from lattice_lab.dynamics.forces import compile_wanted
    from lattice_lab.models.checkpoint import export_force_field, load_force_field

    _, model = gnn_checkpoint
    exported = load_force_field(export_force_field(model, tmp_path / "model.ts.pt", example_L=L), device="cpu")
    assert compile_wanted("auto", "cuda", model) is True  # decides only: nothing is compiled here
    assert compile_wanted("auto", torch.device("cuda:0"), model) is True
    assert compile_wanted("auto", "cpu", model) is False
    assert compile_wanted("auto", "cuda", exported) is False
    assert compile_wanted(True, "cpu", model) is True and compile_wanted(False, "cuda", model) is False
    prov = make_force_provider({"source": "ml", "checkpoint": str(gnn_checkpoint[0])}, HolsteinParams(), "cpu",
                               "float64")
    assert prov.compiled is False  # the default (conf/force/ml.yaml: auto) on the CPU


def test_cuda_graph_auto_records_compiled_models_too():
    """cuda_graph=auto: every ML provider's steps on CUDA are recorded, compiled or not; ED's never."""
    from types import SimpleNamespace

    from lattice_lab.dynamics.runner import _use_cuda_graph

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    for compiled in (False, True):
        ml = SimpleNamespace(source="ml", compiled=compiled)
        assert _use_cuda_graph("auto", ml, cuda) is True
        assert _use_cuda_graph("auto", ml, cpu) is False and _use_cuda_graph(False, ml, cuda) is False
    assert _use_cuda_graph("auto", SimpleNamespace(source="ed"), cuda) is False
    assert _use_cuda_graph(True, SimpleNamespace(source="ed"), cuda) is True


# -- resume -------------------------------------------------------------------------------------
@pytest.mark.parametrize("native", ["auto", "false"])  # Philox noise of (seed, step), or torch's generator state
def test_resume_is_bit_identical(tmp_path, native):
    over = ["force=ed", "dynamics.steps=30", "checkpoint_every_steps=10", "divergence.check_every=1",
            f"native_integrator={native}"]
    ref = run(make_cfg(tmp_path / "a", *over))

    # invocation 1: stop after 13 steps (checkpoint at 10 and 13)
    cfg = make_cfg(tmp_path / "b", *over, "stop_after_steps=13")
    part = run(cfg)
    assert not part["completed"] and part["step"] == 13
    assert partial_path(part["trajectory"].removesuffix(".partial")).exists()
    # invocation 2: resumes at 13, crashes at step 22 after writing the frame of step 20 (checkpoint 20)
    cfg2 = make_cfg(tmp_path / "b", *over, "resume=true")
    provider = make_force_provider(cfg2.force, build_hamiltonian(cfg2), "cpu", L=L)
    with pytest.raises(RuntimeError, match="injected"):
        run_simulation(cfg2, force_provider=Crashing(provider, at_call=9))
    ck = torch.load(tmp_path / "b" / "ed_L8_R2_T0.1_seed3" / "checkpoint.pt", weights_only=False)
    assert ck["state"]["step"] == 20
    # invocation 3: resumes at 20 and finishes
    done = run(make_cfg(tmp_path / "b", *over, "resume=true"))
    assert done["completed"] and done["step"] == 30
    a, _ = read_all(ref["trajectory"])
    b, _ = read_all(done["trajectory"])
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    ca = torch.load(ref["checkpoint"], weights_only=False)["state"]
    cb = torch.load(done["checkpoint"], weights_only=False)["state"]
    for key in ("Q", "V", "F"):
        assert torch.equal(ca[key], cb[key]), key
    # the run's own config stays as it was started; the resume's is kept beside it
    folder = tmp_path / "b" / "ed_L8_R2_T0.1_seed3"
    assert "stop_after_steps: 13" in (folder / "config.yaml").read_text()
    assert "resume: true" in (folder / "config_resume.yaml").read_text()
    with h5py.File(done["trajectory"]) as f:
        assert "stop_after_steps: 13" in f.attrs["config"] and "resume: true" in f.attrs["config_resume"]


def test_resume_refuses_other_settings_and_existing_runs(tmp_path):
    run(make_cfg(tmp_path, "force=ed", "stop_after_steps=5"))
    with pytest.raises(ConfigError, match="already holds a run"):
        run(make_cfg(tmp_path, "force=ed"))
    with pytest.raises(ConfigError, match="dynamics"):
        run(make_cfg(tmp_path, "force=ed", "resume=true", "dynamics.gamma=0.3"))
    with pytest.raises(ConfigError, match=r"philox generator, this run would use torch.*native_integrator"):
        run(make_cfg(tmp_path, "force=ed", "resume=true", "native_integrator=false"))
    done = run(make_cfg(tmp_path, "force=ed", "resume=true"))
    assert done["completed"] and done["frames"] == 5
    assert torch.load(done["checkpoint"], weights_only=False)["noise"] == "philox"
    assert read_all(done["trajectory"])[1]["noise_source"] == "philox"


def test_log_spaced_frames_are_saved_and_resume_extends_them(tmp_path):
    """dynamics.save_log_per_decade adds frames at round(10^(j/k)): early times on log axes. A run extended
    on resume (larger dynamics.steps) saves exactly the frames one longer run saves."""
    over = ["dynamics.save_log_per_decade=4", "run_name=logt", "checkpoint_every_steps=7"]
    ref = run_simulation(make_cfg(tmp_path / "a", *over, "dynamics.steps=40"), force_provider=Harmonic())
    a, attrs = read_all(ref["trajectory"])
    assert a["step"].tolist() == [0, 1, 2, 3, 5, 6, 10, 15, 18, 20, 25, 30, 32, 35, 40]
    assert attrs["save_log_per_decade"] == 4
    run_simulation(make_cfg(tmp_path / "b", *over, "dynamics.steps=20"), force_provider=Harmonic())
    done = run_simulation(make_cfg(tmp_path / "b", *over, "dynamics.steps=40", "resume=true"),
                          force_provider=Harmonic())
    b, _ = read_all(done["trajectory"])
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    with pytest.raises(ConfigError, match="resume=true.*dynamics"):  # another schedule is another run
        run_simulation(make_cfg(tmp_path / "b", *over[1:], "dynamics.steps=60", "resume=true"),
                       force_provider=Harmonic())
    with pytest.raises(ConfigError, match=r"dynamics.save_log_per_decade=-1: expected an integer >= 0"):
        run_simulation(make_cfg(tmp_path / "c", "dynamics.save_log_per_decade=-1"), force_provider=Harmonic())


def test_resume_without_checkpoint_keeps_an_existing_trajectory(tmp_path):
    done = run(make_cfg(tmp_path, "force=ed", "dynamics.steps=5", "run_name=kept"))
    (tmp_path / "kept" / "checkpoint.pt").unlink()
    before = read_all(done["trajectory"])[0]
    with pytest.raises(ConfigError, match=r"resume=true: .*checkpoint.pt is missing.*overwrite=true"):
        run(make_cfg(tmp_path, "force=ed", "dynamics.steps=5", "run_name=kept", "resume=true", "seed=4"))
    after = read_all(done["trajectory"])[0]
    for key in before:
        np.testing.assert_array_equal(before[key], after[key], err_msg=key)
    # with overwrite=true as well, the trajectory without its checkpoint is replaced by a new run
    again = run(make_cfg(tmp_path, "force=ed", "dynamics.steps=5", "run_name=kept", "resume=true", "overwrite=true",
                         "seed=4"))
    assert again["completed"] and (tmp_path / "kept" / "checkpoint.pt").exists()
    assert not np.array_equal(read_all(again["trajectory"])[0]["Q"], before["Q"])


@pytest.mark.parametrize(("name", "keep", "message"), [
    ("checkpoint.pt", 1000, r"resume=true: checkpoint='.*checkpoint.pt': not a readable torch file"),
    ("trajectory.h5.partial", 2000, r"resume=true: the unfinished trajectory .* cannot be read"),
])
def test_resume_from_a_damaged_file_is_a_config_error(tmp_path, name, keep, message):
    """A checkpoint or trajectory cut short (a kill or a full disk while writing) is named, not a traceback."""
    run(make_cfg(tmp_path, "force=ed", "stop_after_steps=5", "run_name=cut"))
    damaged = tmp_path / "cut" / name
    damaged.write_bytes(damaged.read_bytes()[:keep])
    with pytest.raises(ConfigError, match=message):
        run(make_cfg(tmp_path, "force=ed", "resume=true", "run_name=cut"))


def test_overwrite_leaves_no_file_of_the_replaced_run(tmp_path):
    over = ["dynamics.steps=200", "dynamics.save_every=2", "divergence.check_every=1", "run_name=again"]
    run_simulation(make_cfg(tmp_path, *over), force_provider=Harmonic())
    with pytest.raises(SimulationDiverged):
        run_simulation(make_cfg(tmp_path, *over, "overwrite=true"), force_provider=Harmonic(stiffness=-100.0))
    left = sorted(p.name for p in (tmp_path / "again").iterdir())
    assert left == [".lock", "checkpoint.pt", "config.yaml", "trajectory.h5.partial"]  # the old trajectory.h5 is gone


@pytest.mark.parametrize("damage", ["deleted", "cut short", "fewer frames"])
def test_a_resume_refused_for_its_trajectory_changes_no_file(tmp_path, damage):
    """An interrupted run whose trajectory.h5.partial was deleted or damaged cannot continue: the resume is
    refused before anything is written (it used to write config_resume.yaml first), and the advice is
    overwrite=true, which starts the run again (resume=false would say the folder holds a run)."""
    run(make_cfg(tmp_path, "force=ed", "stop_after_steps=5", "run_name=lost"))  # frames 0, 5
    part = tmp_path / "lost" / "trajectory.h5.partial"
    if damage == "deleted":
        part.unlink()
    elif damage == "cut short":
        part.write_bytes(part.read_bytes()[:2000])
    else:
        with h5py.File(part, "r+") as f:
            for key in ("Q", "n", "step", "time"):
                f[key].resize(1, axis=0)
    before = {p.name: p.read_bytes() for p in (tmp_path / "lost").iterdir()}
    found = {"deleted": "is missing, so the checkpoint's 2 frames are lost", "cut short": "cannot be read",
             "fewer frames": "holds 1 frames but the checkpoint expects 2"}[damage]
    with pytest.raises(ConfigError, match=rf"^resume=true: .*trajectory.h5.partial {found}.*; "
                                          r"overwrite=true \(instead of resume=true\) starts the run again$"):
        run(make_cfg(tmp_path, "force=ed", "resume=true", "run_name=lost"))
    assert {p.name: p.read_bytes() for p in (tmp_path / "lost").iterdir()} == before
    again = run(make_cfg(tmp_path, "force=ed", "overwrite=true", "run_name=lost"))
    assert again["completed"] and again["frames"] == 5


def test_the_final_state_is_saved_whatever_save_every(tmp_path):
    """The run's last step is a frame although save_every does not divide dynamics.steps (the trajectory ended
    at the last multiple, and save_every > steps kept step 0 only). A run stopped early saves no frame where it
    stopped (its resume equals one uninterrupted run); a run extended on resume keeps the frame of its old end.
    The analysis reads the saved times: its final state is the run's."""
    from lattice_lab.analysis.pipeline import analyze_trajectory
    from lattice_lab.dynamics.compare_run import comparison_steps

    over = ["run_name=last", "dynamics.steps=21"]
    one = run_simulation(make_cfg(tmp_path / "a", *over), force_provider=Harmonic())
    a, _ = read_all(one["trajectory"])
    assert a["step"].tolist() == [0, 5, 10, 15, 20, 21] and one["frames"] == 6
    np.testing.assert_allclose(a["time"], 0.05 * a["step"], rtol=0, atol=1e-12)
    final = torch.load(one["checkpoint"], weights_only=False)["state"]
    assert final["step"] == 21
    np.testing.assert_array_equal(a["Q"][-1], final["Q"].numpy().astype(np.float32))
    summary = analyze_trajectory(one["trajectory"], {"correlation_steps": [10], "device": "cpu",
                                                     "tracking": {"enabled": False}})
    assert summary["final"]["step"] == 21 and summary["times"][1] == pytest.approx(1.05)

    run_simulation(make_cfg(tmp_path / "b", *over, "stop_after_steps=13"), force_provider=Harmonic())
    done = run_simulation(make_cfg(tmp_path / "b", *over, "resume=true"), force_provider=Harmonic())
    b, _ = read_all(done["trajectory"])
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    longer = run_simulation(make_cfg(tmp_path / "b", "run_name=last", "dynamics.steps=30", "resume=true"),
                            force_provider=Harmonic())
    assert read_all(longer["trajectory"])[0]["step"].tolist() == [0, 5, 10, 15, 20, 21, 25, 30]

    rare = run_simulation(make_cfg(tmp_path / "c", "dynamics.save_every=1000"), force_provider=Harmonic())
    assert read_all(rare["trajectory"])[0]["step"].tolist() == [0, 20]
    # compare.steps: only what every run length saves (a longer shared compare.ed_run lacks this run's last step)
    with pytest.raises(ConfigError, match=r"compare.steps=\[5, 21\]: step 21 is not a saved frame .*last step"):
        comparison_steps(make_cfg(tmp_path, "dynamics.steps=21", "compare.steps=[5,21]",
                                  config_name="simulate_compare"))


@pytest.mark.parametrize(("integrator_dtype", "per_site"), [
    ("float64", 3 * 8 + 2 * 8 + 2 * 4),           # Q, V, F; the float64 hot start; the float32 frame (Q, n)
    ("float32", 3 * 4 + 2 * 8 + 2 * 8 + 2 * 4),   # + the float64 force call's input and output
])
def test_the_memory_check_counts_the_runs_arrays(tmp_path, monkeypatch, integrator_dtype, per_site):
    """The memory a run is checked for before it starts (a lower bound, on the CPU one sum): per site Q, V, F in
    the integrator's dtype, the float64 hot start, the force call's input and output where the force runs in
    another dtype, and the float32 frame written to the trajectory."""
    from lattice_lab.common import memory

    asked = []
    monkeypatch.setattr(memory, "require_memory", lambda nbytes, device, settings, what: asked.append(
        (nbytes, str(device), settings)))
    run_simulation(make_cfg(tmp_path, f"integrator_dtype={integrator_dtype}", "dynamics.steps=1"),
                   force_provider=Harmonic())
    assert asked == [(per_site * R * L * L, "cpu", {"dynamics.L": L, "dynamics.replicas": R})]


def test_a_run_too_large_for_memory_is_refused_before_anything_is_written(tmp_path):
    """dynamics.L=100000 (or 10^8 replicas) failed in the allocator (RuntimeError DefaultCPUAllocator) after the run
    folder and its config.yaml were made; the state's memory is now checked against what is available first."""
    with pytest.raises(ConfigError, match=r"^dynamics.L=100000, dynamics.replicas=100000000: needs ~[\d,]+ GB on "
                                          r"cpu for Q, V, F in float64, .*, [\d.,]+ GB available$"):
        run_simulation(make_cfg(tmp_path, "dynamics.L=100000", "dynamics.replicas=100000000"),
                       force_provider=Harmonic())
    assert not any(tmp_path.iterdir())


# -- divergence ---------------------------------------------------------------------------------
def test_divergence_stops_with_last_good_checkpoint(tmp_path):
    cfg = make_cfg(tmp_path, "dynamics.steps=200", "checkpoint_every_steps=5", "divergence.check_every=1",
                   "dynamics.save_every=2", "run_name=blowup")
    with pytest.raises(SimulationDiverged, match=r"step (\d+): max\|Q\|") as info:
        run_simulation(cfg, force_provider=Harmonic(stiffness=-100.0))  # anti-restoring: exponential growth
    msg = str(info.value)
    bad_step = int(msg.split("step ")[1].split(":")[0])
    limit = 50 * 3.5 / 2 / (1 - 4 * 0.18)  # the default: scale_factor 50 times g / (2 (k - 4 |kappa|))
    assert f"exceeds divergence.max_abs_q = {limit:.6g}" in msg and "last good checkpoint" in msg
    ck = torch.load(tmp_path / "blowup" / "checkpoint.pt", weights_only=False)
    good = ck["state"]["step"]
    assert good < bad_step and good % 5 == 0 and bad_step - good <= 5
    assert torch.isfinite(ck["state"]["Q"]).all() and float(ck["state"]["Q"].abs().max()) <= limit
    part = partial_path(tmp_path / "blowup" / "trajectory.h5")
    assert f"its {bad_step // 2 + 1} frames (every one checked) kept in {part}" in msg
    with h5py.File(part, "r") as f:  # every frame up to the divergence: the approach to it can be analysed
        assert f["step"][...].tolist() == list(range(0, bad_step, 2)) and int(f["step"][-1]) > good
        assert np.isfinite(f["Q"][...]).all() and float(np.abs(f["Q"][...]).max()) <= limit


@pytest.mark.parametrize(("override", "limit"), [("divergence.max_abs_q=40", 40.0),
                                               ("divergence.scale_factor=10", 10 * 3.5 / 2 / (1 - 4 * 0.18)),
                                               ("divergence.scale_factor=null", 50 * 3.5 / 2 / (1 - 4 * 0.18))])
def test_divergence_limit_is_the_setting_given(tmp_path, override, limit):
    """divergence.max_abs_q, when set, is the limit itself (not the default scale_factor x the Hamiltonian's
    scale); divergence.scale_factor scales the default (null: 50). No frame beyond the limit is written."""
    cfg = make_cfg(tmp_path, "dynamics.steps=200", "dynamics.save_every=2", "run_name=limit", override)
    with pytest.raises(SimulationDiverged, match=rf"exceeds divergence.max_abs_q = {limit:.6g}\b"):
        run_simulation(cfg, force_provider=Harmonic(stiffness=-100.0))
    with h5py.File(partial_path(tmp_path / "limit" / "trajectory.h5"), "r") as f:
        assert float(np.abs(f["Q"][...]).max()) <= limit


def test_every_frame_is_checked_before_it_is_written_whatever_check_every(tmp_path):
    """divergence.check_every spaces the checks between frames only: a frame due is checked first, so with
    checks every 1000 steps the run still stops at the first frame beyond the limit, and no frame on disk
    exceeds it."""
    limit = 50 * 3.5 / 2 / (1 - 4 * 0.18)
    cfg = make_cfg(tmp_path, "dynamics.steps=200", "dynamics.save_every=2", "divergence.check_every=1000",
                   "run_name=rare")
    with pytest.raises(SimulationDiverged, match=r"at step (\d+): max\|Q\| = [\d.]+ exceeds") as info:
        run_simulation(cfg, force_provider=Harmonic(stiffness=-100.0))
    bad_step = int(str(info.value).split("step ")[1].split(":")[0])
    assert bad_step % 2 == 0  # found at a frame, not at the run's end
    with h5py.File(partial_path(tmp_path / "rare" / "trajectory.h5"), "r") as f:
        assert f["step"][...].tolist() == list(range(0, bad_step, 2))
        assert float(np.abs(f["Q"][...]).max()) <= limit


def test_a_diverged_initial_state_writes_no_frame(tmp_path):
    """The hot start itself is checked before its frame and the first checkpoint (max|Q| ~ 5 sigma of
    N(0, 27.8) here, above divergence.max_abs_q=1): nothing beyond the limit is written."""
    cfg = make_cfg(tmp_path, "divergence.max_abs_q=1", "run_name=start")
    with pytest.raises(SimulationDiverged, match=r"at step 0: .*exceeds divergence.max_abs_q = 1; no checkpoint "
                                                 r"was written; no frame was written"):
        run_simulation(cfg, force_provider=Harmonic())
    assert not (tmp_path / "start" / "checkpoint.pt").exists()
    with h5py.File(partial_path(tmp_path / "start" / "trajectory.h5"), "r") as f:
        assert f["step"].shape == (0,)


def test_stop_after_steps_beyond_the_run_stops_at_its_end(tmp_path):
    """stop_after_steps larger than the steps left ends the run at dynamics.steps, not beyond."""
    res = run_simulation(make_cfg(tmp_path, "stop_after_steps=50", "run_name=short"), force_provider=Harmonic())
    assert res["completed"] and res["step"] == 20 and res["frames"] == 5
    assert torch.load(res["checkpoint"], weights_only=False)["state"]["step"] == 20


def test_resuming_a_finished_run_with_its_own_steps_changes_no_frame(tmp_path):
    """resume=true on a finished run with the same dynamics.steps is accepted (the checkpoint's step equals the
    run's length: nothing to do) and leaves its frames as they were; fewer steps are refused."""
    done = run_simulation(make_cfg(tmp_path, "run_name=again"), force_provider=Harmonic())
    before = read_all(done["trajectory"])[0]
    again = run_simulation(make_cfg(tmp_path, "run_name=again", "resume=true"), force_provider=Harmonic())
    assert again["completed"] and again["step"] == 20 and again["frames"] == 5
    after = read_all(again["trajectory"])[0]
    for key in before:
        np.testing.assert_array_equal(before[key], after[key], err_msg=key)
    with pytest.raises(ConfigError, match=r"^dynamics.steps=19: the checkpoint .* is already at step 20"):
        run_simulation(make_cfg(tmp_path, "run_name=again", "resume=true", "dynamics.steps=19"),
                       force_provider=Harmonic())


def test_a_run_of_zero_steps_saves_its_hot_start(tmp_path):
    """dynamics.steps=0 is a valid run (the initial states alone, e.g. to look at the hot start): one frame,
    completed, with its checkpoint at step 0 (a resume with more steps continues it)."""
    res = run_simulation(make_cfg(tmp_path, "dynamics.steps=0", "run_name=zero"), force_provider=Harmonic())
    assert res["completed"] and res["step"] == 0 and res["frames"] == 1
    assert read_all(res["trajectory"])[0]["step"].tolist() == [0]
    more = run_simulation(make_cfg(tmp_path, "dynamics.steps=10", "run_name=zero", "resume=true"),
                          force_provider=Harmonic())
    assert more["completed"] and read_all(more["trajectory"])[0]["step"].tolist() == [0, 5, 10]


def test_wall_time_of_a_resumed_run_counts_the_earlier_invocations(tmp_path):
    """wall_s (result, run_summary.json, checkpoint) is the run's total time: a resume adds to the
    checkpoint's wall_s instead of starting from zero."""
    run_simulation(make_cfg(tmp_path, "stop_after_steps=10", "run_name=walls"), force_provider=Harmonic())
    ck_path = tmp_path / "walls" / "checkpoint.pt"
    ck = torch.load(ck_path, weights_only=False)
    ck["wall_s"] = 1e6  # as if the first invocation had run for 11 days
    torch.save(ck, ck_path)
    done = run_simulation(make_cfg(tmp_path, "resume=true", "run_name=walls"), force_provider=Harmonic())
    assert done["completed"] and 1e6 < done["wall_s"] < 1e6 + 600
    assert torch.load(ck_path, weights_only=False)["wall_s"] > 1e6
    assert json.loads((tmp_path / "walls" / "run_summary.json").read_text())["wall_s"] > 1e6


def test_divergence_after_resume_keeps_the_resumed_checkpoint(tmp_path):
    over = ["dynamics.steps=200", "dynamics.save_every=2", "divergence.check_every=1", "run_name=late"]
    run_simulation(make_cfg(tmp_path, *over, "stop_after_steps=6"), force_provider=Harmonic())
    with pytest.raises(SimulationDiverged, match=r"last good checkpoint .*checkpoint.pt \(step 6\)"):
        run_simulation(make_cfg(tmp_path, *over, "resume=true"), force_provider=Harmonic(stiffness=-100.0))
    ck = torch.load(tmp_path / "late" / "checkpoint.pt", weights_only=False)
    assert ck["state"]["step"] == 6 and ck["n_frames"] == 4
    with h5py.File(partial_path(tmp_path / "late" / "trajectory.h5"), "r") as f:
        kept = f["step"][...].tolist()
    assert kept[:4] == [0, 2, 4, 6] and len(kept) > 4  # the frames after the checkpoint are kept too
    done = run_simulation(make_cfg(tmp_path, *over, "resume=true"), force_provider=Harmonic())
    with h5py.File(done["trajectory"], "r") as f:  # a resume starts from the checkpoint: no frame twice
        assert f["step"][...].tolist() == list(range(0, 201, 2))


def test_divergence_on_nan(tmp_path):
    cfg = make_cfg(tmp_path, "run_name=nan", "divergence.check_every=1")
    with pytest.raises(SimulationDiverged, match=r"step 7: .*max\|F\| = nan"):
        run_simulation(cfg, force_provider=Harmonic(nan_at_call=8))  # call 1 is the initial force


# -- refusals -----------------------------------------------------------------------------------
def test_bad_cuda_graph_setting_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ConfigError, match=r"cuda_graph='often'"):
        run(make_cfg(tmp_path, "cuda_graph=often"))
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("override", ["run_name=../escaped", "run_name=..", "compare.name=../escaped"])
def test_run_name_must_be_one_folder_inside_output_root(tmp_path, gnn_checkpoint, override):
    compare = override.startswith("compare")
    extra = ["compare.steps=[10]"] if compare else []
    with pytest.raises(ConfigError, match=r"(run_name|compare.name)=.*one folder name"):
        run(make_cfg(tmp_path / "out", "force=ml", f"force.checkpoint={gnn_checkpoint[0]}", override,
                     "dynamics.steps=10", *extra, config_name="simulate_compare" if compare else "simulate"))
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "config.yaml").exists()


@pytest.mark.parametrize("seed", ["abc", "-1", "1.5"])
def test_bad_seed_refused_before_anything_is_written(tmp_path, seed):
    with pytest.raises(ConfigError, match=r"^seed=\S+: expected a non-negative integer") as info:
        run(make_cfg(tmp_path, "force=ed", f"seed={seed}"))
    assert seed in str(info.value)
    assert not any(tmp_path.iterdir())


def test_seed_beyond_64_bits_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ConfigError, match=r"^seed=18446744073709551616: too large \(seeds are 64-bit: at most 2\^64 - 1"):
        run(make_cfg(tmp_path, "force=ed", "seed=18446744073709551616"))
    assert not any(tmp_path.iterdir())
    assert check_seed(2**64 - 1) == 2**64 - 1  # the largest seed torch and the native noise take


@pytest.mark.parametrize("override, fragment", [
    ("checkpoint_every_s=abc", "checkpoint_every_s='abc': expected a non-negative number"),
    ("checkpoint_every_s=-5", "checkpoint_every_s=-5: expected a non-negative number"),
    ("trajectory.compression_level=42", "trajectory.compression_level=42: expected an integer from 0 to 9"),
    ("trajectory.compression_level=-1", "trajectory.compression_level=-1: expected an integer from 0 to 9"),
    ("dynamics.L=2", "dynamics.L=2: expected an integer >= 3"),
    ("dynamics.steps=-1", "dynamics.steps=-1: expected an integer >= 0"),
    ("stop_after_steps=0", "stop_after_steps=0: expected a positive integer or null"),
    ("checkpoint_every_steps=0", "checkpoint_every_steps=0: expected a positive integer or null"),
    ("trajectory.compression_level=abc", "trajectory.compression_level='abc': expected an integer from 0 to 9"),
    ("force.max_L=abc", "force.max_L='abc': expected an integer >= 2"),
    ("+dynamics.integrator=euler", "dynamics.integrator='euler': the only integrator is verlet_ou"),
    ("+dynamics.tempertaure=0.2", "dynamics.tempertaure: no such setting (dynamics has integrator, mass,"),
    ("+divergence.max_abs=3", "divergence.max_abs: no such setting (divergence has max_abs_q, scale_factor,"),
    ("+trajectory.compresion=lzf", "trajectory.compresion: no such setting (trajectory has compression,"),
])
def test_bad_run_settings_are_config_errors(tmp_path, override, fragment):
    with pytest.raises(ConfigError) as info:
        run(make_cfg(tmp_path, "force=ed", override))
    assert str(info.value) == fragment or str(info.value).startswith(fragment)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("level", [0, 9])
def test_the_compression_levels_at_the_ends_of_the_range_are_taken(tmp_path, level):
    """trajectory.compression_level takes 0 and 9 (the ends of gzip's range) and writes the frames with it."""
    res = run_simulation(make_cfg(tmp_path, "trajectory.compression=gzip", f"trajectory.compression_level={level}",
                                  "dynamics.steps=5"), force_provider=Harmonic())
    with h5py.File(res["trajectory"], "r") as f:
        assert f["Q"].compression == "gzip" and f["Q"].compression_opts == level and f["step"].shape == (2,)


@pytest.mark.parametrize("bad, message", [
    ("force.chunk_replicas=abc", "force.chunk_replicas='abc': need a positive integer or null"),
    ("force.chunk_replicas=2.5", "force.chunk_replicas=2.5: need a positive integer or null"),
    ("force.compile=maybe", "force.compile='maybe': expected auto, true or false"),
])
def test_bad_force_settings_are_config_errors(tmp_path, gnn_checkpoint, bad, message):
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}"):
        run(make_cfg(tmp_path, "force=ml", f"force.checkpoint={gnn_checkpoint[0]}", bad))
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("bad, message", [
    ("+force.chunk_replica=2", "force.chunk_replica: no such setting (force has source, checkpoint,"),
    ("+force.checkpont=x.pt", "force.checkpont: no such setting"),
])
def test_unknown_force_keys_are_refused(tmp_path, bad, message):
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}"):
        run(make_cfg(tmp_path, "force=ed", bad))
    assert not any(tmp_path.iterdir())


def test_force_ed_accepts_every_force_key(tmp_path):
    """An experiment that sets force.checkpoint still runs with force=ed (every source takes every key)."""
    res = run(make_cfg(tmp_path, "force=ed", "+force.checkpoint=unused.pt", "+force.compile=false",
                       "dynamics.steps=2", "analyze=false", "tracking.enabled=false"))
    assert os.path.exists(res["trajectory"])


@pytest.mark.parametrize("bad, message", [
    ("compare.ed_force.chunk_replicas=abc", "compare.ed_force.chunk_replicas='abc': need a positive integer"),
    ("compare.ed_force.max_L=abc", "compare.ed_force.max_L='abc': expected an integer >= 2"),
    ("+compare.ed_force.max_l=40", "compare.ed_force.max_l: no such setting (compare.ed_force has source,"),
    ("compare.ed_force.max_L=6", "dynamics.L=8: exact diagonalisation above compare.ed_force.max_L=6"),
])
def test_comparison_ed_force_settings_are_named_as_such(tmp_path, gnn_checkpoint, bad, message):
    cfg = make_cfg(tmp_path, f"force.checkpoint={gnn_checkpoint[0]}", "compare.steps=[5]", "dynamics.L=8", bad,
                   config_name="simulate_compare")
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}"):
        run_comparison(cfg)
    assert not any(tmp_path.iterdir())


def test_comparison_ed_run_that_is_a_file_is_named(tmp_path, gnn_checkpoint):
    (tmp_path / "ed.h5").write_text("not a run folder")
    cfg = make_cfg(tmp_path / "out", f"force.checkpoint={gnn_checkpoint[0]}", "compare.steps=[5]",
                   f"compare.ed_run={tmp_path / 'ed.h5'}", config_name="simulate_compare")
    with pytest.raises(ConfigError, match=r"^compare.ed_run=.*ed.h5: is a file, not a run folder"):
        run_comparison(cfg)
    assert not (tmp_path / "out").exists()


def test_odd_L_refused_before_anything_is_written(tmp_path, gnn_checkpoint):
    with pytest.raises(ConfigError, match=r"dynamics.L=15: use even L"):
        run(make_cfg(tmp_path, "force=ml", f"force.checkpoint={gnn_checkpoint[0]}", "dynamics.L=15"))
    assert not any(tmp_path.iterdir())


def test_ed_refused_above_max_L(tmp_path):
    with pytest.raises(ConfigError, match=r"dynamics.L=50: .*force.max_L=48.*force=ml"):
        run(make_cfg(tmp_path, "force=ed", "dynamics.L=50"))
    with pytest.raises(ConfigError, match="force.max_L=6"):
        run(make_cfg(tmp_path, "force=ed", "force.max_L=6"))
    assert not any(tmp_path.iterdir())


def test_model_for_other_hamiltonian_refused(tmp_path):
    from lattice_lab.models.checkpoint import save_checkpoint
    from lattice_lab.models.registry import build_model

    model = build_model({"name": "gnn", "widths": [1, 4, 1]}, HolsteinParams(g=3.0).as_dict())
    path = tmp_path / "other.pt"
    save_checkpoint(path, model, {})
    with pytest.raises(ConfigError, match=r"hamiltonian.g=3.5: .*trained for g=3.0"):
        run(make_cfg(tmp_path / "out", "force=ml", f"force.checkpoint={path}"))
    with pytest.raises(ConfigError, match="force.checkpoint"):
        run(make_cfg(tmp_path / "out", "force=ml"))
    good = tmp_path / "good.pt"
    save_checkpoint(good, build_model({"name": "gnn", "widths": [1, 4, 4, 4, 4, 1]}, HolsteinParams().as_dict()), {})
    with pytest.raises(ConfigError, match=r"dynamics.L=8: .*receptive field.*L >= 11"):
        run(make_cfg(tmp_path / "out", "force=ml", f"force.checkpoint={good}"))


@pytest.mark.parametrize(("bad", "start", "says"), [
    ("dynamics.L=64", "error: dynamics.L=64", "force=ml"),  # above force.max_L
    ("dynamics.replicas=1000000000000", "error: dynamics.L=8, dynamics.replicas=1000000000000: needs ~", "available"),
])
def test_entrypoint_prints_one_line_error(tmp_path, bad, start, says):
    proc = subprocess.run([sys.executable, "-m", "lattice_lab.simulate", "force=ed", "dynamics.L=8", bad,
                           f"output_root={tmp_path / 'out'}", "tracking.enabled=false", f"hydra.run.dir={tmp_path}/h"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(start) and says in errors[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()  # refused before the run folder is made


# -- force providers ----------------------------------------------------------------------------
def test_ed_density_is_that_of_the_configuration_asked_about():
    """EDForceProvider caches the density of its last force call: asked about another configuration (a frame
    saved after a force call at another Q), it diagonalises again instead of returning the cached one."""
    ham = HolsteinParams(temperature=0.1)
    ed = EDForceProvider(ham, "cpu")
    Q1, Q2 = torch.randn(2, 1, L, L, dtype=torch.float64)
    F2 = ed(Q2)
    ed(Q1)
    torch.testing.assert_close(ed.density(Q2, F2), ExactForces(ham).compute(Q2).density, rtol=0, atol=1e-12)


def test_model_run_id_of_an_mlflow_reference():
    """force.checkpoint=runs:/<id>/<path> or a bare 32-hex run id tags the run's model_run_id with the id alone."""
    from lattice_lab.dynamics.forces import model_run_id_of

    run_id = "0123456789abcdef0123456789abcdef"
    assert model_run_id_of(f"runs:/{run_id}/checkpoints/best.pt") == run_id
    assert model_run_id_of(f"runs:/{run_id}") == run_id and model_run_id_of(run_id) == run_id


def test_force_limits_are_inclusive():
    """ED runs at L = force.max_L (refused above it); a model runs at the smallest L its receptive field fits
    (refused below it); the softest elastic mode must be stiff: |kappa| < k/4."""
    from types import SimpleNamespace

    from lattice_lab.dynamics.forces import check_force_config, equilibrium_q_scale
    from lattice_lab.models.base import min_lattice
    from lattice_lab.models.registry import build_model

    assert check_force_config({"source": "ed", "max_L": 8}, L=8) == "ed"
    with pytest.raises(ConfigError, match=r"^dynamics.L=10: exact diagonalisation above force.max_L=8"):
        check_force_config({"source": "ed", "max_L": 8}, L=10)
    model = build_model({"name": "gnn", "widths": [1, 4, 4, 1]}, HolsteinParams().as_dict()).double()
    need = min_lattice(model.receptive_field)
    ml = {"source": "ml", "checkpoint": None}
    assert make_force_provider(ml, HolsteinParams(), "cpu", "float64", L=need, model=model).source == "ml"
    with pytest.raises(ConfigError, match=rf"dynamics.L={need - 1}: .*receptive field allows \(needs L >= {need}\)"):
        make_force_provider(ml, HolsteinParams(), "cpu", "float64", L=need - 1, model=model)
    assert equilibrium_q_scale(SimpleNamespace(g=2.0, k=1.0, kappa=-0.125)) == pytest.approx(2.0)
    with pytest.raises(ConfigError, match=r"hamiltonian.kappa=0.25: need \|kappa\| < k/4 = 0.25"):
        equilibrium_q_scale(SimpleNamespace(g=3.5, k=1.0, kappa=0.25))


# -- batching -----------------------------------------------------------------------------------
def test_replicas_are_one_batch(tmp_path):
    h = Harmonic(stiffness=1.0)
    res = run_simulation(make_cfg(tmp_path, "dynamics.replicas=3", "run_name=h"), force_provider=h)
    assert res["completed"]
    assert h.shapes == [(3, L, L)] * 21  # initial force + one batched call per step, no loop over replicas
    ed = EDForceProvider(HolsteinParams(), "cpu")
    Q = torch.randn(3, L, L, dtype=torch.float64)
    F = ed(Q)
    single = torch.stack([ExactForces(HolsteinParams())(Q[i:i + 1])[0] for i in range(3)])
    torch.testing.assert_close(F, single, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ed.density(Q, F), ExactForces(HolsteinParams()).compute(Q).density)


# -- tracking + analysis ------------------------------------------------------------------------
def test_mlflow_and_analysis(tmp_path, tmp_mlflow, gnn_checkpoint):
    from mlflow.tracking import MlflowClient

    path, _ = gnn_checkpoint
    over = ["force=ml", f"force.checkpoint={path}", "tracking.enabled=true", "analyze=true", "dynamics.steps=40",
            "analysis.correlation_steps=[0,20,40]"]
    first = run(make_cfg(tmp_path, *over, "stop_after_steps=20"))
    assert not first["completed"] and first["analysis"] is None
    res = run(make_cfg(tmp_path, *over, "resume=true"))
    assert res["mlflow_run_id"] == first["mlflow_run_id"]  # the resumed run continues the same MLflow run
    assert res["analysis"] is not None and (tmp_path / res["run_dir"] / "analysis" / "summary.json").exists()
    client = MlflowClient(tracking_uri=tmp_mlflow)
    exp = client.get_experiment_by_name("lattice_lab/simulate")
    run_info = client.get_run(res["mlflow_run_id"])
    assert run_info.info.experiment_id == exp.experiment_id
    assert run_info.data.params["dynamics.L"] == str(L) and run_info.data.params["force.source"] == "ml"
    assert run_info.data.metrics["steps_per_s"] > 0 and "site_steps_per_s" in run_info.data.metrics
    # the kinetic temperature of the last state (equipartition: m <v^2> -> T once thermalised)
    state = torch.load(res["checkpoint"], weights_only=False)["state"]
    t_kin = float((5.0 * state["V"].double() ** 2).mean())
    assert run_info.data.metrics["kinetic_temperature"] == pytest.approx(t_kin, rel=1e-5) == res["kinetic_temperature"]
    assert run_info.data.tags["force_source"] == "ml" and run_info.data.tags["status"] == "completed"
    assert run_info.data.tags["model_sha256"] == weights_sha256(gnn_checkpoint[1])[:12]
    assert run_info.data.tags["model_family"] == "gnn"  # as the train run's tag: simulations group by family
    assert "config.yaml" in {a.path for a in client.list_artifacts(res["mlflow_run_id"])}
    history = client.get_metric_history(res["mlflow_run_id"], "L")
    assert sorted(m.step for m in history) == [0, 5, 10, 15, 20, 25, 30, 35, 40]
    assert all(math.isfinite(m.value) for m in history)
    # the analysis is logged as the analyze entrypoint logs it: same scalars, every output file
    from lattice_lab.analysis.pipeline import analyze_trajectory

    own = analyze_trajectory(res["trajectory"], {"correlation_steps": [0, 20, 40], "tracking": {"enabled": True}},
                             out_dir=tmp_path / "own_analysis")
    analyze_run = client.get_run(own["mlflow_run_id"])
    sim_metrics = client.get_run(res["mlflow_run_id"]).data.metrics
    assert {"final_L", "collapse_quality_S"} <= set(analyze_run.data.metrics)
    assert set(analyze_run.data.metrics) <= set(sim_metrics)
    for key, value in analyze_run.data.metrics.items():
        assert sim_metrics[key] == pytest.approx(value, rel=1e-12), key
    listed = {a.path for a in client.list_artifacts(res["mlflow_run_id"], "analysis")}
    assert {f"analysis/{name}" for name in own["files"]} <= listed


# -- ED vs ML comparison ------------------------------------------------------------------------
def test_comparison_same_initial_states_and_noise(tmp_path, gnn_checkpoint):
    """With exact forces on the 'ML' side the two runs must coincide bit for bit (same hot start,
    same noise) and the agreement statistic is exactly 0; with the random GNN they differ."""
    path, _ = gnn_checkpoint
    cfg = make_cfg(tmp_path, f"force.checkpoint={path}", "compare.steps=[5,20]", "compare.name=cmp",
                   config_name="simulate_compare")
    res = run_comparison(cfg, ml_provider=EDForceProvider(HolsteinParams(temperature=0.1), "cpu"))
    a, _ = read_all(res["ed"]["trajectory"])
    b, _ = read_all(res["ml"]["trajectory"])
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert res["comparison"]["max_abs_z"] == 0.0
    assert (tmp_path / "cmp" / "comparison.json").exists()
    assert (tmp_path / "cmp" / "comparison" / "compare_C_r.png").exists()

    cfg = make_cfg(tmp_path, f"force.checkpoint={path}", "compare.steps=[5,20]", "compare.name=cmp_ml",
                   config_name="simulate_compare")
    res = run(cfg)
    a, _ = read_all(res["ed"]["trajectory"])
    b, attrs = read_all(res["ml"]["trajectory"])
    assert attrs["force_source"] == "ml"
    np.testing.assert_array_equal(a["Q"][0], b["Q"][0])  # same hot start
    assert not np.array_equal(a["Q"][-1], b["Q"][-1])
    assert res["comparison"]["max_abs_z"] > 0
    assert res["comparison"]["paired"] is True  # shared starts and noise: replica-by-replica differences
    with pytest.raises(ConfigError, match="compare.steps"):
        run(make_cfg(tmp_path, f"force.checkpoint={path}", "compare.steps=[7]", config_name="simulate_compare"))
    from lattice_lab.dynamics.compare_run import comparison_steps  # a log-spaced frame may be compared

    logged = make_cfg(tmp_path, "compare.steps=[6,18,20]", "dynamics.save_log_per_decade=4",
                      config_name="simulate_compare")
    assert comparison_steps(logged) == [6, 18, 20]


def test_comparisons_share_one_ed_run(tmp_path, gnn_checkpoint, tmp_mlflow):
    """``compare.ed_run``: the first comparison runs ED there, the next one resumes it (no ED step is
    recomputed, the frames stay as they are) and compares its own ML run with it; a comparison with other
    dynamics (another seed) is refused instead of being compared with the wrong ED run."""
    path, _ = gnn_checkpoint
    shared = tmp_path / "ed_shared"
    common = [f"force.checkpoint={path}", "compare.steps=[5,20]", f"compare.ed_run={shared}", "tracking.enabled=true"]
    first = run(make_cfg(tmp_path, *common, "compare.name=cmp_a", config_name="simulate_compare"))
    ed_file = shared / "trajectory.h5"
    assert first["ed"]["trajectory"] == str(ed_file) and not (tmp_path / "cmp_a" / "ed").exists()
    before, _ = read_all(ed_file)
    files = {f.name: f.stat().st_mtime_ns for f in shared.iterdir()}
    second = run_comparison(make_cfg(tmp_path, *common, "compare.name=cmp_b", config_name="simulate_compare"),
                            ml_provider=EDForceProvider(HolsteinParams(temperature=0.1), "cpu"))
    assert second["ed"]["completed"] and second["ed"]["steps_per_s"] == 0.0  # read as it is: no ED step
    assert {f.name: f.stat().st_mtime_ns for f in shared.iterdir()} == files  # nothing written: comparisons
    after, _ = read_all(ed_file)                                               # may read it at once
    for key in before:
        np.testing.assert_array_equal(after[key], before[key])
    assert second["comparison"]["max_abs_z"] == 0.0  # exact forces on the ML side: the same trajectory
    summary = json.loads((tmp_path / "cmp_b" / "comparison.json").read_text())
    assert summary["ed_trajectory"] == str(ed_file)
    assert {"compare/max_abs_z", "compare/max_abs_z_step5", "compare/max_abs_z_unpaired_step20"} <= set(summary["metrics"])
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tmp_mlflow)  # one MLflow run for the shared ED side, not nested under
    parents = [client.get_run(r["ml"]["mlflow_run_id"]).data.tags["mlflow.parentRunId"] for r in (first, second)]
    ed_ids = {client.get_run(p).data.tags["ed_run_id"] for p in parents}  # either comparison; both name it
    assert len(set(parents)) == 2 and ed_ids == {first["ed"]["mlflow_run_id"]} == {second["ed"]["mlflow_run_id"]}
    assert "mlflow.parentRunId" not in client.get_run(ed_ids.pop()).data.tags
    shorter = run(make_cfg(tmp_path, *common[:1], f"compare.ed_run={shared}", "compare.steps=[5,10]",
                           "dynamics.steps=10", "compare.name=cmp_short", config_name="simulate_compare"))
    assert [s["requested"] for s in shorter["comparison"]["steps"]] == [5, 10]  # a longer ED run serves as it is
    assert shorter["ed"]["steps_per_s"] == 0.0
    with pytest.raises(ConfigError, match=rf"^compare.ed_run={re.escape(str(shared.resolve()))}: seed=7 differs from "
                                          r"the checkpoint's 3 .*another compare.ed_run$") as refused:
        run(make_cfg(tmp_path, *common, "compare.name=cmp_c", "seed=7", config_name="simulate_compare"))
    assert "resume" not in str(refused.value)  # the setting the user chose, not a resume they never asked for
    other_dtype = run(make_cfg(tmp_path, *common, "compare.name=cmp_f", "dtype=float64", config_name="simulate_compare"))
    assert other_dtype["ed"]["trajectory"] == str(ed_file)  # the model's dtype is not ED's (always float64)
    with pytest.raises(ConfigError, match="compare.ed_run=.*holds an ED-vs-ML comparison"):
        run(make_cfg(tmp_path, *common[:2], f"compare.ed_run={tmp_path / 'cmp_a'}", "compare.name=cmp_g",
                     config_name="simulate_compare"))
    assert not (tmp_path / "cmp_a" / "trajectory.h5").exists()
    (shared / "checkpoint.pt").unlink()  # a shared run that cannot be checked is named, not overwritten
    with pytest.raises(ConfigError, match="compare.ed_run=.*without its checkpoint.pt.*never overwritten"):
        run(make_cfg(tmp_path, *common, "compare.name=cmp_e", "overwrite=true", config_name="simulate_compare"))
    assert ed_file.exists()
    for inside in ("cmp_d/ml", "cmp_d", "elsewhere/../cmp_d/ml"):  # the comparison's own ML run or folder (however
        # named): refused, not compared with itself
        with pytest.raises(ConfigError, match="compare.ed_run=.*outside this comparison's folder"):
            run(make_cfg(tmp_path, *common[:2], f"compare.ed_run={tmp_path / inside}", "compare.name=cmp_d",
                         config_name="simulate_compare"))


def test_ml_run_from_torchscript_export(tmp_path):
    """force.checkpoint may be a TorchScript export (here an ENN with the elastic prior)."""
    from lattice_lab.models.checkpoint import export_force_field
    from lattice_lab.models.registry import build_model, load_preset

    torch.manual_seed(1)
    model = build_model(load_preset("enn_small"), HolsteinParams().as_dict()).double().eval()
    path = export_force_field(model, tmp_path / "enn.ts.pt")
    res = run(make_cfg(tmp_path, "force=ml", f"force.checkpoint={path}", "dtype=float64"))
    assert res["completed"] and res["frames"] == 5
    data, attrs = read_all(res["trajectory"])
    assert attrs["force_source"] == "ml" and attrs["model_path"] == str(path)
    assert make_force_provider({"source": "ml", "checkpoint": str(path)}, HolsteinParams(), "cpu",
                               "float64").model_family == "enn"  # the export's family, not "exported"
    assert np.isfinite(data["Q"]).all()
    state = torch.load(res["checkpoint"], weights_only=False)["state"]
    with torch.no_grad():
        torch.testing.assert_close(state["F"], model(state["Q"]), rtol=1e-12, atol=1e-12)


def test_resume_refuses_another_model_at_the_same_path(tmp_path, gnn_checkpoint):
    """force.checkpoint is a path: a model retrained into it must not silently drive the rest of the run."""
    from lattice_lab.models.checkpoint import save_checkpoint

    _, model = gnn_checkpoint
    path = tmp_path / "model" / "best.pt"
    save_checkpoint(path, model, {})
    over = ["force=ml", f"force.checkpoint={path}", "dtype=float64"]
    part = run(make_cfg(tmp_path, *over, "stop_after_steps=5"))
    attrs = read_all(part["trajectory"])[1]
    assert attrs["model_sha256"] == weights_sha256(model) == weights_sha256(copy.deepcopy(model).float())
    other = copy.deepcopy(model)
    with torch.no_grad():
        next(other.parameters()).add_(1e-3)
    save_checkpoint(path, other, {})
    with pytest.raises(ConfigError, match="model_sha256"):
        run(make_cfg(tmp_path, *over, "resume=true"))
    save_checkpoint(path, model, {})
    assert run(make_cfg(tmp_path, *over, "resume=true"))["completed"]


def test_a_shorter_comparison_reads_an_unfinished_longer_shared_ed_run(tmp_path, gnn_checkpoint):
    """A shared ED run stopped early (stop_after_steps) beyond this comparison's dynamics.steps is continued to the
    step it reached, not refused as 'already at step 15' (its frames up to this comparison's steps are the same)."""
    path, _ = gnn_checkpoint
    shared = tmp_path / "ed_long"
    common = [f"force.checkpoint={path}", f"compare.ed_run={shared}"]
    first = run(make_cfg(tmp_path, *common, "dynamics.steps=30", "compare.steps=[5,30]", "stop_after_steps=15",
                         "compare.name=cmp_long", config_name="simulate_compare"))
    assert first["comparison"] is None and first["ed"]["step"] == 15 and not first["ed"]["completed"]
    short = run(make_cfg(tmp_path, *common, "dynamics.steps=10", "compare.steps=[5,10]", "compare.name=cmp_short",
                         config_name="simulate_compare"))
    assert short["ed"]["completed"] and short["ed"]["step"] == 15 and short["comparison"] is not None
    assert read_all(short["ed"]["trajectory"])[0]["step"].tolist() == [0, 5, 10, 15]
    # the ED side finished, the ML side stopped early: no comparison yet (the ML frames are not all there)
    cut = run(make_cfg(tmp_path, *common, "dynamics.steps=10", "compare.steps=[5,10]", "compare.name=cmp_cut",
                       "stop_after_steps=5", config_name="simulate_compare"))
    assert cut["ed"]["completed"] and not cut["ml"]["completed"] and cut["comparison"] is None
    assert not (tmp_path / "cmp_cut" / "comparison.json").exists()


def test_an_overwritten_comparison_keeps_none_of_the_old_results_and_a_resume_keeps_its_config(tmp_path,
                                                                                                gnn_checkpoint):
    """overwrite=true removes the replaced comparison's results (comparison/, comparison.json) even where the new
    one stops early, and its config.yaml is the new one; a resume then writes config_resume.yaml beside it."""
    path, _ = gnn_checkpoint
    args = [f"force.checkpoint={path}", "compare.steps=[5,20]", "compare.name=cmp"]
    root = tmp_path / "cmp"
    run(make_cfg(tmp_path, *args, config_name="simulate_compare"))
    assert (root / "comparison.json").exists() and any((root / "comparison").iterdir())
    part = run(make_cfg(tmp_path, *args, "overwrite=true", "stop_after_steps=5", config_name="simulate_compare"))
    assert part["comparison"] is None
    assert not (root / "comparison").exists() and not (root / "comparison.json").exists()
    assert "stop_after_steps: 5" in (root / "config.yaml").read_text()
    done = run(make_cfg(tmp_path, *args, "resume=true", config_name="simulate_compare"))
    assert done["comparison"] is not None and (root / "comparison.json").exists()
    assert "stop_after_steps: 5" in (root / "config.yaml").read_text()
    assert "resume: true" in (root / "config_resume.yaml").read_text()


def test_first_shared_ed_run_starts_without_a_resume_warning(tmp_path, gnn_checkpoint, caplog):
    path, _ = gnn_checkpoint
    with caplog.at_level("WARNING"):
        run(make_cfg(tmp_path, f"force.checkpoint={path}", "compare.steps=[5,20]",
                     f"compare.ed_run={tmp_path / 'ed_new'}", config_name="simulate_compare"))
    assert not [r for r in caplog.records if "resume" in r.getMessage()]


def test_refused_comparison_rerun_keeps_its_config(tmp_path, gnn_checkpoint):
    """A comparison run again with other settings, without resume/overwrite, is refused naming
    compare.name, and the finished comparison's config.yaml still describes its results."""
    path, _ = gnn_checkpoint
    args = [f"force.checkpoint={path}", "compare.steps=[5,20]", "compare.name=cmp"]
    run(make_cfg(tmp_path, *args, config_name="simulate_compare"))
    before = (tmp_path / "cmp" / "config.yaml").read_text()
    with pytest.raises(ConfigError, match=r"compare.name='cmp': .* already holds this comparison"):
        run(make_cfg(tmp_path, *args, "seed=7", config_name="simulate_compare"))
    assert (tmp_path / "cmp" / "config.yaml").read_text() == before
    with pytest.raises(ConfigError, match="seed"):  # resume with another seed: refused by the runs' check
        run(make_cfg(tmp_path, *args, "seed=7", "resume=true", config_name="simulate_compare"))
    assert (tmp_path / "cmp" / "config.yaml").read_text() == before
    assert not (tmp_path / "cmp" / "config_resume.yaml").exists()


def test_refused_resume_writes_nothing(tmp_path):
    run(make_cfg(tmp_path, "force=ed", "run_name=done"))
    for bad in ("dynamics.steps=10", "native_integrator=false"):  # fewer steps; another noise source
        with pytest.raises(ConfigError):
            run(make_cfg(tmp_path, "force=ed", "run_name=done", "resume=true", bad))
        assert not (tmp_path / "done" / "config_resume.yaml").exists()


def test_overwrite_removes_the_resume_config_and_the_analysis(tmp_path):
    run(make_cfg(tmp_path, "force=ed", "run_name=old", "stop_after_steps=10"))
    run(make_cfg(tmp_path, "force=ed", "run_name=old", "resume=true"))
    (tmp_path / "old" / "analysis").mkdir()
    (tmp_path / "old" / "analysis" / "L_t.csv").write_text("step,L\n")
    assert (tmp_path / "old" / "config_resume.yaml").exists()
    run(make_cfg(tmp_path, "force=ed", "run_name=old", "overwrite=true", "seed=5"))
    assert sorted(p.name for p in (tmp_path / "old").iterdir()) == [
        ".lock", "checkpoint.pt", "config.yaml", "run_summary.json", "trajectory.h5"]


@pytest.mark.parametrize("bad", ["divergence.scale_factor=abc", "divergence.scale_factor=-1",
                                 "divergence.scale_factor=0", "divergence.check_every=0",
                                 "resume=no", "overwrite=no", "analyze=no", "dtype=bfloat16",
                                 "integrator_dtype=float16"])
def test_bad_run_settings_are_named(tmp_path, bad):
    key = bad.split("=")[0]
    with pytest.raises(ConfigError, match=rf"^{key}="):
        run(make_cfg(tmp_path, "force=ed", bad))


@pytest.mark.parametrize("bad, message", [
    ("+analysis.order_parameter.wall_threshold=abc", "analysis.order_parameter.wall_threshold='abc': expected 0 <"),
    ("+analysis.correlation.r_max=abc", "analysis.correlation.r_max='abc': expected a number >= 0"),
    ("+analysis.correlation.binning=log", "analysis.correlation.binning='log': expected one of"),
    ("analysis.fit.t_min=abc", "analysis.fit.t_min='abc': expected a number or null"),
    ("analysis.correlation_steps=abc", "analysis.correlation_steps='abc': expected a list of integer steps"),
    ("+analysis.collapse_frames=0", "analysis.collapse_frames=0: expected an integer >= 1"),
    ("analysis.correlation_steps=[200,-5]", "analysis.correlation_steps=[200, -5]: step -5 is negative"),
])
def test_bad_analysis_settings_are_refused_before_the_run(tmp_path, bad, message):
    """The analysis runs after the simulation (hours at the papers' size): its settings are checked first."""
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}"):
        run(make_cfg(tmp_path, "force=ed", "analyze=true", bad))
    assert not any(tmp_path.iterdir())


def test_bad_analysis_settings_refuse_a_comparison_before_its_runs(tmp_path, gnn_checkpoint):
    with pytest.raises(ConfigError, match=r"^analysis.correlation.binning='log'"):
        run(make_cfg(tmp_path, f"force.checkpoint={gnn_checkpoint[0]}", "compare.steps=[5,20]",
                     "+analysis.correlation.binning=log", config_name="simulate_compare"))
    assert not any(tmp_path.iterdir())


def test_resume_accepts_equivalent_settings(tmp_path, gnn_checkpoint, monkeypatch):
    """The same model named by another path, and integrator_dtype given as the value null stands for."""
    path, _ = gnn_checkpoint
    run(make_cfg(tmp_path, "force=ml", f"force.checkpoint={path}", "run_name=eq", "stop_after_steps=10"))
    monkeypatch.chdir(path.parent)
    res = run(make_cfg(tmp_path, "force=ml", f"force.checkpoint={path.name}", "integrator_dtype=float32",
                       "run_name=eq", "resume=true"))
    assert res["completed"]


def test_a_checkpoint_from_before_newer_fingerprint_entries_resumes(tmp_path, gnn_checkpoint):
    """A checkpoint written before the model's hash, the resolved integrator dtype and save_log_per_decade were
    recorded (no model_sha256, integrator_dtype null, no dynamics.save_log_per_decade) still resumes: what it
    lacks is taken to agree, and the rest of its fingerprint is still checked."""
    path, _ = gnn_checkpoint
    over = ["force=ml", f"force.checkpoint={path}", "run_name=old_ck"]
    run(make_cfg(tmp_path, *over, "stop_after_steps=10"))
    ck_path = tmp_path / "old_ck" / "checkpoint.pt"
    ck = torch.load(ck_path, weights_only=False)
    fp = ck["fingerprint"]
    assert fp.pop("model_sha256") and fp["integrator_dtype"] == "float32"
    fp["integrator_dtype"] = None
    fp["dynamics"].pop("save_log_per_decade", None)  # 0: the schedule of a run made before the setting existed
    torch.save(ck, ck_path)
    with pytest.raises(ConfigError, match="resume=true: dtype='float64' differs"):
        run(make_cfg(tmp_path, *over, "resume=true", "dtype=float64"))
    assert run(make_cfg(tmp_path, *over, "resume=true"))["completed"]


def test_a_run_folder_in_use_is_refused(tmp_path):
    from lattice_lab.common.io import run_lock

    (tmp_path / "busy").mkdir()
    with run_lock(tmp_path / "busy", "test"), pytest.raises(ConfigError, match="in use by another process"):
        run(make_cfg(tmp_path, "force=ed", "run_name=busy"))
    run(make_cfg(tmp_path, "force=ed", "run_name=busy"))  # released


class SignalAt(ForceProvider):
    """Exact forces that send this process ``sig`` at the given force call (Ctrl-C, a cluster's SIGTERM)."""

    source = "ed"

    def __init__(self, sig, at_call):
        super().__init__(HolsteinParams(temperature=0.1), "cpu", torch.float64)
        self.inner, self.sig, self.at_call, self.calls = EDForceProvider(HolsteinParams(temperature=0.1), "cpu"), sig, at_call, 0

    def _evaluate(self, Q):
        self.calls += 1
        if self.calls == self.at_call:
            signal.raise_signal(self.sig)
        return self.inner(Q)

    def density(self, Q, F):
        return self.inner.density(Q, F)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_saves_the_state_and_resume_is_exact(tmp_path, sig):
    from lattice_lab.common.errors import Interrupted

    whole = run(make_cfg(tmp_path, "force=ed", "run_name=whole"))
    before = signal.getsignal(sig)
    with pytest.raises(Interrupted, match=r"at step 7 of 20: saved .*checkpoint.pt.*resume=true") as stopped:
        run_simulation(make_cfg(tmp_path, "force=ed", "run_name=cut"), force_provider=SignalAt(sig, 8))
    assert stopped.value.signum == sig  # the exit status says which signal (128 + signum)
    assert signal.getsignal(sig) == before  # the handler is gone with the run
    done = run(make_cfg(tmp_path, "force=ed", "run_name=cut", "resume=true"))
    a, _ = read_all(whole["trajectory"])
    b, _ = read_all(done["trajectory"])
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


class LockProbe(EDForceProvider):
    """Exact forces; at its first call it tries to take the shared ED run's folder for writing, as a
    comparison extending that run would, and records whether it was refused."""

    def __init__(self, folder):
        super().__init__(HolsteinParams(temperature=0.1), "cpu")
        self.folder, self.refused = folder, None

    def __call__(self, Q):
        if self.refused is None:
            from lattice_lab.common.io import run_lock

            try:
                with run_lock(self.folder, "extending run"):
                    self.refused = False
            except ConfigError:
                self.refused = True
        return super().__call__(Q)


def test_a_shared_ed_run_is_held_while_comparisons_read_it(tmp_path, gnn_checkpoint):
    from lattice_lab.common.io import run_lock

    path, _ = gnn_checkpoint
    shared = tmp_path / "ed_shared"
    common = [f"force.checkpoint={path}", "compare.steps=[5,20]", f"compare.ed_run={shared}"]
    run(make_cfg(tmp_path, *common, "compare.name=cmp_a", config_name="simulate_compare"))
    probe = LockProbe(shared)
    run_comparison(make_cfg(tmp_path, *common, "compare.name=cmp_b", config_name="simulate_compare"), ml_provider=probe)
    assert probe.refused is True  # nobody extends the ED run while this comparison still has to read it
    with run_lock(shared, "another comparison"), pytest.raises(ConfigError, match=r"^compare.ed_run=.*in use"):
        run(make_cfg(tmp_path, *common, "compare.name=cmp_c", config_name="simulate_compare"))


def test_the_ml_run_draws_the_shared_ed_runs_noise(tmp_path, gnn_checkpoint):
    """A shared ED run made with torch's generator: the next comparison's ML run (native_integrator=auto)
    draws the same noise; an explicit setting that cannot is refused before the ML run starts."""
    path, _ = gnn_checkpoint
    common = [f"force.checkpoint={path}", "compare.steps=[5,20]", f"compare.ed_run={tmp_path / 'ed_torch'}"]
    first = run(make_cfg(tmp_path, *common, "compare.name=cmp_a", "native_integrator=false",
                         config_name="simulate_compare"))
    assert first["ed"]["noise_source"] == first["ml"]["noise_source"] == "torch"
    second = run(make_cfg(tmp_path, *common, "compare.name=cmp_b", config_name="simulate_compare"))
    assert second["ml"]["noise_source"] == "torch"
    with pytest.raises(ConfigError, match="native_integrator=true: the ED run drew its bath noise from 'torch'"):
        run(make_cfg(tmp_path, *common, "compare.name=cmp_c", "native_integrator=true", config_name="simulate_compare"))
    assert not (tmp_path / "cmp_c" / "ml").exists()


@pytest.mark.parametrize("bad, message", [
    ("compare.integrator_dtype=float16", "compare.integrator_dtype='float16': expected one of"),
    ("integrator_dtype=float32", "integrator_dtype='float32': a comparison integrates both runs in compare.integrator_dtype"),
    ("compare.analyze_runs=no", "compare.analyze_runs='no': expected true or false"),
])
def test_comparison_settings_are_named(tmp_path, gnn_checkpoint, bad, message):
    path, _ = gnn_checkpoint
    with pytest.raises(ConfigError, match=f"^{message}"):
        run(make_cfg(tmp_path, f"force.checkpoint={path}", "compare.steps=[5,20]", bad, config_name="simulate_compare"))
    assert not (tmp_path / "ed_vs_ml_L8_R2_T0.1_seed3").exists()


def test_a_stop_during_the_last_step_is_not_lost(tmp_path):
    """The signal comes while the last step runs: the run finishes, and nothing that would follow runs."""
    from lattice_lab.common.errors import Interrupted

    with pytest.raises(Interrupted, match="SIGTERM during the last step: the run reached step 20 of 20") as stopped:
        run_simulation(make_cfg(tmp_path, "force=ed", "run_name=last", "analyze=true"),
                       force_provider=SignalAt(signal.SIGTERM, 21))
    assert stopped.value.signum == signal.SIGTERM
    assert (tmp_path / "last" / "trajectory.h5").exists() and not (tmp_path / "last" / "analysis").exists()


def test_a_shared_run_started_meanwhile_is_named(tmp_path):
    run(make_cfg(tmp_path, "force=ed", "run_name=ed_shared", "stop_after_steps=5"))
    with pytest.raises(ConfigError, match="^compare.ed_run=X: another comparison started this ED run meanwhile"):
        run_simulation(make_cfg(tmp_path, "force=ed", "run_name=ed_shared"), folder_label="compare.ed_run=X")


def test_philox_noise_where_the_ml_run_cannot_draw_it_is_refused_first(tmp_path, gnn_checkpoint, monkeypatch):
    path, _ = gnn_checkpoint
    common = [f"force.checkpoint={path}", "compare.steps=[5,20]", f"compare.ed_run={tmp_path / 'ed_philox'}"]
    first = run(make_cfg(tmp_path, *common, "compare.name=cmp_a", config_name="simulate_compare"))
    assert first["ed"]["noise_source"] == "philox"  # the native CPU step (this suite builds the kernels)
    monkeypatch.setenv("LATTICE_LAB_NATIVE", "0")
    with pytest.raises(ConfigError, match=r"^compare.ed_run=.*ed_philox: .*Philox.*LATTICE_LAB_NATIVE=0"):
        run(make_cfg(tmp_path, *common, "compare.name=cmp_b", config_name="simulate_compare"))
    assert not (tmp_path / "cmp_b" / "ml").exists()
