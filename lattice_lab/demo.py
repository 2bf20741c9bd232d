"""``python -m lattice_lab.demo`` (``make demo``): generate -> train -> simulate -> analyze, then a summary.

Each stage runs as its own entrypoint process (``python -m lattice_lab.<stage> ...``), exactly as a user
would run it, so each leaves its own Hydra folder, saved config and MLflow run. Settings: ``conf/demo.yaml``.
"""

from __future__ import annotations

import datetime as _dt
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from lattice_lab.analysis.growth import describe_exponent
from lattice_lab.common.cli import CONFIG_DIR, friendly_errors, hydra_errors, received_signal
from lattice_lab.common.errors import Interrupted, LatticeLabError

REPO = Path(CONFIG_DIR).parent


def _stage(name: str, overrides: list[str]) -> float:
    """Run ``python -m lattice_lab.<name> <overrides>`` from the repo root; return its wall time."""
    cmd = [sys.executable, "-m", f"lattice_lab.{name}", *overrides]
    print(f"\n=== {name}: {' '.join(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    rc = run_stage(cmd, name)
    if rc != 0:
        raise LatticeLabError(f"demo stage `{name}` failed (exit code {rc}); see its output above")
    return time.perf_counter() - t0


def run_stage(cmd: list[str], name: str) -> int:
    """Run one stage's process and return its exit code. On Ctrl-C or SIGTERM the stage gets exactly one
    signal (it runs in its own session, so a terminal's Ctrl-C reaches only this process, which passes it
    on) and the time to stop at its next safe point and save, as when it is run by hand; a second Ctrl-C
    passes a second signal on, which stops it at once. Then :class:`Interrupted` says so."""
    proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        signum = received_signal() or signal.SIGINT
        while True:
            try:
                proc.send_signal(signum)
                rc = proc.wait()
                break
            except KeyboardInterrupt:  # asked again: pass it on (the stage stops at once)
                continue
        raise Interrupted(f"the demo stopped in its `{name}` stage (exit code {rc}), which saved its state as "
                          "it says above; `make demo` starts again (reusing the dataset)", signum) from None


def run(cfg: DictConfig) -> dict:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    times = {}
    data_path = REPO / "runs" / "data" / f"{cfg.dataset_preset}.h5"  # where the stage (cwd REPO) writes it
    if data_path.is_file():
        print(f"=== generate: reusing {data_path}")
        times["generate"] = 0.0
    else:
        times["generate"] = _stage("generate", [f"dataset={cfg.dataset_preset}", f"device={cfg.device}",
                                                f"seed={cfg.seed}"])

    train_name = f"demo_{cfg.model_preset}_{stamp}"
    times["train"] = _stage("train", [f"model={cfg.model_preset}", f"dataset={cfg.dataset_preset}",
                                      f"trainer={cfg.trainer_preset}", f"trainer.max_time={cfg.train_max_time}",
                                      f"trainer.max_epochs={cfg.train_max_epochs}", f"run_name={train_name}",
                                      f"device={cfg.device}", f"seed={cfg.seed}", *cfg.extra_train])
    ckpt = REPO / "runs" / "checkpoints" / train_name / "best.pt"

    sim = cfg.simulate
    sim_name = f"demo_quench_L{sim.L}_{stamp}"
    times["simulate+analyze"] = _stage("simulate", [
        "dynamics=quench_small", "force=ml", f"force.checkpoint={ckpt}", f"dynamics.L={sim.L}",
        f"dynamics.replicas={sim.replicas}", f"dynamics.steps={sim.steps}", f"dynamics.save_every={sim.save_every}",
        f"dynamics.temperature={sim.temperature}", f"run_name={sim_name}", f"device={cfg.device}",
        f"seed={cfg.seed}", *cfg.extra_simulate])

    final = OmegaConf.to_container(OmegaConf.load(ckpt.parent / "final_metrics.yaml"))
    sim_dir = REPO / "runs" / "trajectories" / sim_name
    sim_summary = json.loads((sim_dir / "run_summary.json").read_text())
    analysis = json.loads((sim_dir / "analysis" / "summary.json").read_text())
    summary = {"train_run": str(ckpt.parent), "trajectory_run": str(sim_dir), "times_s": times,
               "val_sigma": final.get("final/val_sigma"), "val_rmse": final.get("final/val_rmse"),
               "val_random_sigma": final.get("final/val_random_sigma"),
               "val_quench_sigma": final.get("final/val_quench_sigma"),
               "steps_per_s": sim_summary.get("steps_per_s"), "site_steps_per_s": sim_summary.get("site_steps_per_s"),
               "alpha": analysis.get("alpha"), "alpha_err": analysis.get("alpha_err")}
    _print_summary(cfg, summary, analysis)
    return summary


def _fmt(x, spec=".4g"):
    return "n/a" if x is None else format(x, spec)


def _print_summary(cfg: DictConfig, s: dict, analysis: dict) -> None:
    sim = cfg.simulate
    lines = [
        "", "=" * 72, "lattice_lab demo summary", "=" * 72,
        f"force field   {cfg.model_preset} on {cfg.dataset_preset}: validation force sigma = {_fmt(s['val_sigma'])} "
        f"(RMSE {_fmt(s['val_rmse'])}; enn_paper's full ENN on 40x40: 0.0084)",
        f"              by kind: random hot starts {_fmt(s['val_random_sigma'])}, quench snapshots "
        f"{_fmt(s['val_quench_sigma'])} (error_by_config.png: per configuration)",
        f"dynamics      {sim.L}x{sim.L}, {sim.replicas} replicas, {sim.steps} steps to T = {sim.temperature}: "
        f"{_fmt(s['steps_per_s'], '.3g')} steps/s, {_fmt(s['site_steps_per_s'], '.3g')} site-steps/s",
        f"coarsening    alpha = {describe_exponent(analysis.get('growth_L'))} "
        f"(fit window t = {_fmt(analysis['fit_window'][0], '.3g')}..{_fmt(analysis['fit_window'][1], '.3g')}; "
        "Allen-Cahn 0.5; papers at T=0.1: 0.059 on 200x200, t=1250)",
        "stage times   " + ", ".join(f"{k} {v:.0f} s" for k, v in s["times_s"].items()),
        f"plots         {s['trajectory_run']}/analysis/*.png and {s['train_run']}/*.png",
        "MLflow UI     make ui   (then open http://127.0.0.1:5000)",
        "=" * 72,
    ]
    print("\n".join(lines), flush=True)


@hydra_errors
@hydra.main(config_path=CONFIG_DIR, config_name="demo")
@friendly_errors
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
