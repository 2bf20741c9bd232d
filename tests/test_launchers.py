"""Multirun launchers: submitit's local executor (`+launcher=parallel`) runs jobs as separate processes."""

import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def test_parallel_launcher_runs_each_job_in_its_own_process(tmp_path):
    from test_sweeps import _write_tiny_dataset

    data = _write_tiny_dataset(tmp_path / "tiny.h5")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "LATTICE_LAB_NO_PROGRESS": "1",
           "OMP_NUM_THREADS": "1"}
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "lattice_lab.train", "-m", "+launcher=parallel", "model=enn_small",
           "model.hidden=[2,2,2]", f"dataset.path={data}", "dataset.name=tiny", "trainer=quick",
           "trainer.max_epochs=1", "plots=false", "tracking.enabled=false", f"output_root={tmp_path / 'ckpt'}",
           "seed=0,1", f"hydra.sweep.dir={sweep}", "hydra.launcher.timeout_min=10"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (sweep / ".submitit").is_dir(), "jobs must have gone through submitit"
    seeds = sorted(yaml.safe_load((sweep / str(i) / ".hydra" / "config.yaml").read_text())["seed"] for i in (0, 1))
    assert seeds == [0, 1]
    runs = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert len(runs) == 2 and all((tmp_path / "ckpt" / r / "best.pt").is_file() for r in runs)


def test_slurm_launcher_composes_and_gives_each_task_as_many_threads_as_cpus():
    """``+launcher=slurm`` composes; ``hydra.launcher.cpus_per_task=16`` also sets OMP_NUM_THREADS=16 (it stayed 8)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from lattice_lab.common.cli import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR):
        cfg = compose("simulate", overrides=["+launcher=slurm", "hydra.launcher.cpus_per_task=16"],
                      return_hydra_config=True)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"].endswith("SlurmLauncher")
    assert "export OMP_NUM_THREADS=16" in launcher["setup"]
