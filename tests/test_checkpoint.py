"""Checkpoints round-trip exactly; TorchScript exports run with plain torch at any lattice size."""

import copy
import json
import subprocess
import sys

import pytest
import torch

from lattice_lab.common.errors import ConfigError
from lattice_lab.models import (
    build_model,
    export_force_field,
    load_checkpoint,
    load_force_field,
    save_checkpoint,
)
from lattice_lab.models.registry import load_preset

HAM = {"t": 1.0, "g": 3.5, "k": 1.0, "kappa": 0.18, "temperature": 0.1, "filling": "canonical"}
PRESETS = ["gnn_small", "gnn_energy_small"]
EXPORT_PRESETS = [*PRESETS, "enn_small", "mlp_small"]  # enn/mlp presets: ElasticPrior(network)


def trained_like(preset: str, dtype=torch.float64):
    """A model with non-default weights and normalisation buffers (as after training)."""
    model = build_model(load_preset(preset), HAM).to(dtype)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    Q = 0.4 + 1.2 * torch.randn(2, 8, 8, generator=gen, dtype=torch.float64)
    model.fit_normalization(Q, -0.2 + 1.8 * torch.randn(2, 8, 8, generator=gen, dtype=torch.float64))
    return model.eval()


@pytest.mark.parametrize("preset", PRESETS)
def test_save_load_round_trip(tmp_path, preset):
    model = trained_like(preset)
    path = save_checkpoint(tmp_path / "run" / "best.pt", model, load_preset(preset),
                           extra={"epoch": 3, "best_val": 0.25, "optimizer": {"lr": 1e-3}})
    ckpt = load_checkpoint(path)
    assert ckpt["epoch"] == 3 and ckpt["optimizer"] == {"lr": 1e-3} and ckpt["dtype"] == "float64"
    assert ckpt["hamiltonian"] == HAM and ckpt["model_cfg"]["name"] == model.name and "version" in ckpt
    Q = torch.randn(2, 11, 11, dtype=torch.float64)
    with torch.no_grad():
        ref = model(Q)
        for source in (path, tmp_path / "run", str(path)):  # file, folder with best.pt, string
            loaded = load_force_field(source, device="cpu")
            assert not loaded.training and next(loaded.parameters()).dtype == torch.float64
            assert torch.equal(loaded(Q), ref)
        as32 = load_force_field(path, device="cpu", dtype="float32")
        assert next(as32.parameters()).dtype == torch.float32
        torch.testing.assert_close(as32(Q.float()).double(), ref, rtol=1e-4, atol=1e-4)
    assert not list(tmp_path.glob("run/.*"))  # atomic write left no temporary file


def test_checkpoint_without_explicit_config(tmp_path):
    model = trained_like("gnn_small", dtype=torch.float32)
    save_checkpoint(tmp_path / "a.pt", model)  # config recorded by build_model
    save_checkpoint(tmp_path / "b.pt", model, {"epoch": 9})  # architecture form (path, model, extra)
    assert load_checkpoint(tmp_path / "b.pt")["epoch"] == 9
    Q = torch.randn(1, 9, 9)
    with torch.no_grad():
        for name in ("a.pt", "b.pt"):
            loaded = load_force_field(tmp_path / name, device="cpu")
            assert next(loaded.parameters()).dtype == torch.float32  # the saved dtype is the default
            assert torch.equal(loaded(Q), model(Q))
    with pytest.raises(ConfigError, match="model.name='enn'"):
        save_checkpoint(tmp_path / "c.pt", model, {"name": "enn"})


def test_missing_checkpoint_is_config_error(tmp_path):
    missing = tmp_path / "nope" / "best.pt"
    with pytest.raises(ConfigError, match=str(missing)):
        load_force_field(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="best.pt"):
        load_force_field(tmp_path / "empty")
    with pytest.raises(ConfigError, match="file not found"):
        load_checkpoint(missing)


def test_unreadable_or_foreign_checkpoint_is_config_error(tmp_path):
    import h5py

    with h5py.File(tmp_path / "data.h5", "w") as f:  # a dataset or trajectory passed as a model
        f["Q"] = torch.zeros(1, 8, 8).numpy()
    (tmp_path / "text.pt").write_text("hello\n")
    save_checkpoint(tmp_path / "good.pt", build_model({"name": "gnn", "widths": [1, 4, 1]}, HAM))
    (tmp_path / "cut.pt").write_bytes((tmp_path / "good.pt").read_bytes()[:500])  # truncated copy
    for name in ("data.h5", "text.pt", "cut.pt"):
        with pytest.raises(ConfigError, match=rf"checkpoint='.*{name}': not a readable torch file"):
            load_force_field(tmp_path / name, device="cpu")


def test_checkpoint_with_foreign_contents_is_config_error(tmp_path):
    """A readable file whose contents do not make a model: weights of another architecture, no
    Hamiltonian, a broken TorchScript archive or its metadata: one clear ConfigError naming the file."""
    import zipfile

    model = build_model({"name": "gnn", "widths": [1, 4, 1]}, HAM)
    good = torch.load(save_checkpoint(tmp_path / "good.pt", model), weights_only=False)
    torch.save(dict(good, state_dict={"w": torch.zeros(1)}), tmp_path / "weights.pt")
    torch.save(dict(good, model_cfg={"name": "gnn", "widths": [1, 8, 1]}), tmp_path / "shapes.pt")
    torch.save({k: v for k, v in good.items() if k != "hamiltonian"}, tmp_path / "noham.pt")
    with zipfile.ZipFile(tmp_path / "broken.ts.pt", "w") as z:  # looks like TorchScript, is not
        z.writestr("model/code/__torch__.py", "x")
    export_force_field(model, tmp_path / "meta.ts.pt")
    with zipfile.ZipFile(tmp_path / "meta.ts.pt") as z:
        entries = {n: z.read(n) for n in z.namelist()}
    with zipfile.ZipFile(tmp_path / "meta.ts.pt", "w") as z:  # metadata without the Hamiltonian
        for n, b in entries.items():
            z.writestr(n, b'{"cutoff": 1.0}' if n.endswith("/extra/lattice_lab.json") else b)
    for name, match in (("weights.pt", "state_dict does not fit"), ("shapes.pt", "state_dict does not fit"),
                        ("noham.pt", "no hamiltonian"), ("broken.ts.pt", "not a readable TorchScript file"),
                        ("meta.ts.pt", "metadata")):
        with pytest.raises(ConfigError, match=rf"checkpoint='.*{name}'.*{match}"):
            load_force_field(tmp_path / name, device="cpu")


_STANDALONE = r"""
import json, sys, torch
out, names = sys.argv[1], sys.argv[2:]
res = {}
for name in names:
    extra = {"lattice_lab.json": ""}
    m = torch.jit.load(f"{out}/{name}.ts.pt", _extra_files=extra)
    meta = json.loads(extra["lattice_lab.json"])
    res[name] = meta
    for L in (9, 12):
        Q = torch.load(f"{out}/Q{L}.pt")
        with torch.no_grad():           # energy models enable grad inside
            F = m(Q)
        torch.save(F, f"{out}/{name}_F{L}.pt")
        if meta["conservative"]:
            torch.save(m.energy(Q), f"{out}/{name}_E{L}.pt")
res["lattice_lab_imported"] = any(k.startswith("lattice_lab") for k in sys.modules)
print(json.dumps(res))
"""


def test_export_runs_without_lattice_lab(tmp_path):
    """The exported files run in a fresh interpreter with only torch, at two lattice sizes."""
    models = {p: trained_like(p) for p in EXPORT_PRESETS}
    assert {type(models[p]).__name__ for p in ("enn_small", "mlp_small")} == {"ElasticPrior"}
    for name, model in models.items():
        export_force_field(model, tmp_path / f"{name}.ts.pt", example_L=9)
    inputs = {L: torch.randn(2, L, L, dtype=torch.float64) for L in (9, 12)}
    for L, Q in inputs.items():
        torch.save(Q, tmp_path / f"Q{L}.pt")
    proc = subprocess.run([sys.executable, "-c", _STANDALONE, str(tmp_path), *EXPORT_PRESETS],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["lattice_lab_imported"] is False
    for name, model in models.items():
        meta = res[name]
        assert meta["hamiltonian"] == HAM and meta["cutoff"] == model.cutoff
        assert meta["conservative"] == model.conservative and meta["name"] == model.name
        with torch.no_grad():
            for L, Q in inputs.items():
                torch.testing.assert_close(torch.load(tmp_path / f"{name}_F{L}.pt"), model(Q),
                                           rtol=1e-12, atol=1e-12)
                if model.conservative:
                    torch.testing.assert_close(torch.load(tmp_path / f"{name}_E{L}.pt"), model.energy(Q),
                                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("preset", EXPORT_PRESETS)
def test_load_force_field_accepts_export(tmp_path, preset):
    model = trained_like(preset)
    path = export_force_field(model, tmp_path / "model.ts.pt")
    loaded = load_force_field(path, device="cpu")
    assert loaded.hamiltonian == model.hamiltonian and loaded.cutoff == model.cutoff
    assert loaded.receptive_field == model.receptive_field and loaded.conservative == model.conservative
    for L in (9, 13):
        Q = torch.randn(1, L, L, dtype=torch.float64)
        with torch.no_grad():
            torch.testing.assert_close(loaded(Q), model(Q), rtol=1e-12, atol=1e-12)
    with pytest.raises(ConfigError, match="shape"):
        loaded(torch.zeros(9, 9, dtype=torch.float64))
    loaded.check_compatible(HAM)
    with pytest.raises(ConfigError, match="hamiltonian.kappa"):
        loaded.check_compatible(dict(HAM, kappa=0.1))
    if model.conservative:  # autograd inside the exported module, also without no_grad
        Q = torch.randn(1, 9, 9, dtype=torch.float64)
        torch.testing.assert_close(loaded(Q), model(Q), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(loaded.energy(Q), model.energy(Q).detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("preset", EXPORT_PRESETS)
def test_export_and_copy_after_native_inference(tmp_path, preset):
    """A model that has already run CPU inference (its native kernel cached: ctypes objects with
    pointers into the model) still exports (the ENN exports a private deep copy), copies and pickles;
    the copy computes with its own weights."""
    import copy
    import io

    model = trained_like(preset)
    Q = torch.randn(1, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        F = model(Q)  # builds and caches the native kernel where there is one
    path = export_force_field(model, tmp_path / "model.ts.pt", example_L=9)
    with torch.no_grad():
        torch.testing.assert_close(load_force_field(path, device="cpu")(Q), F, rtol=1e-10, atol=1e-10)
    twin = copy.deepcopy(model)
    torch.save(twin, io.BytesIO())
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(1.5)
        torch.testing.assert_close(model(Q), F, rtol=0, atol=0)
        twin_ref = build_model(load_preset(preset), HAM).to(torch.float64)
        twin_ref.load_state_dict(twin.state_dict())
        twin_ref.eval()
        for m in twin_ref.modules():  # the torch path
            if hasattr(m, "native_kernel"):
                m.native_kernel = False
        torch.testing.assert_close(twin(Q), twin_ref(Q), rtol=1e-10, atol=1e-10)


def test_enn_export_bands_layer_modes_and_dtype(tmp_path):
    """The scripted ENN fast path: bands of rows (chunk_sites < L^2), batches split into chunks,
    sub-chunked layers, both layer modes (explicit and bilinear); the exported model is a frozen
    copy (the eager model is not modified) and casts to float32 on load like the eager model."""
    cfg = dict(load_preset("enn_small"), hidden=[12, 3], activation="gate", chunk_sites=40)
    model = build_model(cfg, HAM).to(torch.float64)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    net = model.network
    net.layers[1].mode = "bilinear"  # one layer of each mode
    assert {layer.mode for layer in net.layers} == {"explicit", "bilinear"}
    for layer in [*net.layers, net.readout]:
        layer.cache_bytes = 256  # many sub-chunks per band
    model.eval()
    path = export_force_field(model, tmp_path / "enn.ts.pt", example_L=7)
    assert net.layers[0]._ts_packed0.numel() == 0 and net._ts_conv_w.numel() == 0  # original untouched
    loaded = load_force_field(path, device="cpu")
    with torch.no_grad():
        for B, L in ((3, 7), (1, 11), (2, 13)):  # 7 x 7 < 40 < 11 x 11: whole configs, then bands
            Q = torch.randn(B, L, L, dtype=torch.float64, generator=gen)
            torch.testing.assert_close(loaded(Q), model(Q), rtol=1e-12, atol=1e-12)
        as32 = load_force_field(path, device="cpu", dtype="float32")
        F32 = model.float()(Q.float())  # the eager float32 model runs the native kernel: another summation order
        torch.testing.assert_close(as32(Q.float()), F32, rtol=1e-5, atol=2e-6 * float(F32.abs().max()))


def test_load_from_mlflow_run(tmp_path, monkeypatch):
    """Run ids and runs:/ URIs download checkpoints/best.pt from the tracking server in
    MLFLOW_TRACKING_URI. (MLflow's download is replaced by a local copy: creating a real sqlite
    store takes ~12 s; the fake checks its arguments against the real function's signature.)"""
    import inspect
    import shutil

    import mlflow.artifacts

    model = trained_like("gnn_small")
    ckpt = save_checkpoint(tmp_path / "store" / "checkpoints" / "best.pt", model)
    run_id = "0123456789abcdef0123456789abcdef"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (tmp_path / "mlflow.db").touch()  # a run id is looked up only in a store that exists (none is created)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    calls = []
    real = mlflow.artifacts.download_artifacts

    def fake_download(**kwargs):
        inspect.signature(real).bind(**kwargs)  # a call the real function accepts
        calls.append(kwargs)
        if kwargs["run_id"] != run_id:
            raise RuntimeError(f"Run '{kwargs['run_id']}' not found")
        src = tmp_path / "store" / kwargs["artifact_path"]
        return shutil.copy(src, kwargs["dst_path"])

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", fake_download)
    Q = torch.randn(1, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        for ref in (run_id, f"runs:/{run_id}", f"runs:/{run_id}/checkpoints/best.pt"):
            assert torch.equal(load_force_field(ref, device="cpu")(Q), model(Q))
    assert all(c["tracking_uri"] == uri and c["artifact_path"] == "checkpoints/best.pt" for c in calls)
    assert ckpt.is_file()
    with pytest.raises(ConfigError, match="fedcba9876543210fedcba9876543210"):
        load_force_field("fedcba9876543210fedcba9876543210")


def test_top_level_load_force_field_takes_the_same_arguments(monkeypatch):
    """``lattice_lab.load_force_field`` (README) is the models' loader: a run id's store can be given to it too."""
    import inspect

    import lattice_lab
    import lattice_lab.models.checkpoint as checkpoint

    assert list(inspect.signature(lattice_lab.load_force_field).parameters)[1:] == \
        list(inspect.signature(checkpoint.load_force_field).parameters)[1:]
    calls = []
    monkeypatch.setattr(checkpoint, "load_force_field", lambda *a, **k: calls.append((a, k)))
    lattice_lab.load_force_field("run", device="cpu", tracking_uri="sqlite:///elsewhere.db")
    assert calls == [(("run",), {"device": "cpu", "dtype": None, "tracking_uri": "sqlite:///elsewhere.db"})]


def test_export_of_a_checkpoint_names_its_training_run_and_weights(tmp_path):
    """An export made from a training checkpoint keeps its provenance: a simulation driven by the export
    records the MLflow run that trained the model (tag model_run_id), and the export names the weights'
    hash of the checkpoint it came from."""
    from lattice_lab.dynamics.forces import model_run_id_of, weights_sha256

    run_id = "0123456789abcdef0123456789abcdef"
    model = trained_like("gnn_small")
    ckpt = save_checkpoint(tmp_path / "best.pt", model,
                           {"mlflow_run_id": run_id, "dataset_name": "holstein_L8_tiny"})
    path = export_force_field(load_force_field(ckpt, device="cpu"), tmp_path / "m.ts.pt")
    exported = load_force_field(path, device="cpu")
    assert exported.metadata["mlflow_run_id"] == run_id
    assert exported.metadata["dataset_name"] == "holstein_L8_tiny"  # evaluate records it as train_dataset
    assert exported.metadata["weights_sha256"] == weights_sha256(model)
    assert model_run_id_of(path, exported) == run_id
    from lattice_lab.dynamics.forces import MLForceProvider
    from lattice_lab.physics.holstein import HolsteinParams

    by_path = {name: MLForceProvider(HolsteinParams(), "cpu", torch.float64, str(p)).model_sha256
               for name, p in (("checkpoint", ckpt), ("export", path))}
    assert by_path["checkpoint"] == by_path["export"] == weights_sha256(model)  # one model, one hash
    # a model built in Python (no training run) exports with no run id rather than a wrong one
    bare = load_force_field(export_force_field(model, tmp_path / "bare.ts.pt"), device="cpu")
    assert bare.metadata["mlflow_run_id"] is None and model_run_id_of(tmp_path / "bare.ts.pt", bare) == ""
    assert bare.metadata["dataset_name"] is None


def test_weights_hash_is_the_same_in_float32_and_float64():
    """weights_sha256 hashes floats as float64: one model gives one hash whatever dtype it is loaded in
    (a simulation in float32 and one in float64 name the same weights), and other weights another."""
    from lattice_lab.models.checkpoint import weights_sha256

    model = trained_like("gnn_small", dtype=torch.float32)
    assert weights_sha256(model) == weights_sha256(copy.deepcopy(model).double())
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.layers[0].bias[0] += 1.0
    assert weights_sha256(other) != weights_sha256(model)


@pytest.mark.parametrize("training", [True, False])
def test_export_leaves_the_models_mode_as_it_was(tmp_path, training):
    """Export evaluates in eval mode but hands the model back in its own mode: a model being trained
    stays in training mode (an energy model in eval mode would stop keeping the graph of its forces)."""
    model = trained_like("gnn_energy_small").train(training)
    export_force_field(model, tmp_path / "m.ts.pt", example_L=9)
    assert model.training is training


def test_export_that_disagrees_with_the_model_is_refused(tmp_path, monkeypatch):
    """With example_L the export is checked against the eager model before it is written: a scripted
    module that computes other forces raises and leaves no file."""
    real_script = torch.jit.script

    class Offset(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, Q):
            return self.inner(Q) + 0.1

    def script(obj, *args, **kwargs):  # torch.jit.script also compiles the submodules through this name
        from lattice_lab.models.checkpoint import _DirectExport

        out = real_script(obj, *args, **kwargs)
        return Offset(out) if isinstance(obj, _DirectExport) else out

    monkeypatch.setattr(torch.jit, "script", script)
    model = trained_like("gnn_small")
    with pytest.raises(RuntimeError, match="export check failed at L=9"):
        export_force_field(model, tmp_path / "m.ts.pt", example_L=9)
    assert not list(tmp_path.iterdir())
    assert not model.training  # trained_like's eval mode, restored


def test_mlflow_run_of_tells_a_run_from_a_local_path(tmp_path, monkeypatch):
    """One rule for resolve_checkpoint_path, simulate's model_run_id and evaluate's run name: ``runs:/<id>[/path]``
    and a bare 32-hex-digit id name an MLflow run, unless a local file or folder has that name."""
    from lattice_lab.models.checkpoint import mlflow_run_of

    rid = "0123456789abcdef0123456789abcdef"
    assert mlflow_run_of(f"runs:/{rid}/checkpoints/last.pt") == (rid, "checkpoints/last.pt")
    assert mlflow_run_of(f"runs:/{rid}/") == (rid, "")
    monkeypatch.chdir(tmp_path)
    assert mlflow_run_of(rid) == (rid, "")
    assert mlflow_run_of(rid[:-1]) is None and mlflow_run_of(rid.upper()) is None
    assert mlflow_run_of("runs/checkpoints/x/best.pt") is None
    (tmp_path / rid).mkdir()  # a folder named like a run id is that folder
    assert mlflow_run_of(rid) is None
