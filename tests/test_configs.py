"""Every config group option and every experiment composes with its entrypoint's primary config."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from lattice_lab.common.cli import CONFIG_DIR

CONF = Path(CONFIG_DIR)
# group -> primary configs it belongs to ("+" = appended, not in the primary defaults list)
GROUPS = {
    "model": ["train"], "dataset": ["train", "generate"], "trainer": ["train"], "hamiltonian": ["generate", "simulate"],
    "dynamics": ["simulate"], "force": ["simulate"], "hparams_search": ["train"],
    "launcher": ["+train", "+simulate", "+generate"],
}
EXPERIMENTS = {"paper_force_accuracy": "train", "paper_ed_vs_ml": "simulate_compare",
               "paper_coarsening": "simulate", "small_coarsening": "simulate", "small_force_accuracy": "train"}


def _options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml") if not p.stem.endswith("_base"))


CASES = [(g, opt, primary) for g, prims in GROUPS.items() for opt in _options(g) for primary in prims]


def test_every_group_and_experiment_is_covered():
    groups = {p.name for p in CONF.iterdir() if p.is_dir()}
    assert groups - set(GROUPS) - {"experiment", "bench_preset"} == set(), "a config group has no composition test"
    assert set(_options("experiment")) == set(EXPERIMENTS)


@pytest.mark.parametrize("group,option,primary", CASES, ids=[f"{p}:{g}={o}" for g, o, p in CASES])
def test_group_option_composes(group, option, primary):
    append = primary.startswith("+")
    primary = primary.lstrip("+")
    with initialize_config_dir(config_dir=CONFIG_DIR):
        cfg = compose(primary, overrides=[f"{'+' if append else ''}{group}={option}"], return_hydra_config=True)
    container = OmegaConf.to_container(cfg, resolve=False)
    assert container
    if not append and group in cfg:
        OmegaConf.to_container(cfg[group], resolve=True)  # interpolations inside the group resolve


@pytest.mark.parametrize("name,primary", sorted(EXPERIMENTS.items()))
def test_experiment_composes(name, primary):
    with initialize_config_dir(config_dir=CONFIG_DIR):
        cfg = compose(primary, overrides=[f"+experiment={name}"], return_hydra_config=True)
    body = {k: v for k, v in cfg.items() if k != "hydra"}
    OmegaConf.to_container(OmegaConf.create(body), resolve=True)


@pytest.mark.parametrize("primary", sorted({p.stem for p in CONF.glob("*.yaml")}))
def test_primary_configs_compose(primary):
    with initialize_config_dir(config_dir=CONFIG_DIR):
        cfg = compose(primary, return_hydra_config=True)
    assert cfg.hydra.run.dir.startswith("runs/hydra/")


def test_bench_job_is_named_bench_not_its_module():
    """``python -m lattice_lab.bench`` runs ``bench/__main__.py``: without a job name in its config, Hydra called
    the job ``__main__`` (``__main__ is powered by Hydra`` in ``--help``, ``__main__.log`` in its run folder)."""
    with initialize_config_dir(config_dir=CONFIG_DIR):
        cfg = compose("bench", return_hydra_config=True)
    assert cfg.hydra.job.name == "bench"


@pytest.mark.parametrize("primary", ["train", "simulate", "simulate_compare", "analyze"])
def test_tracking_store_and_experiment_can_be_set_on_the_command_line(primary):
    """``tracking.uri=...`` / ``tracking.experiment=...`` (docs/training.md) work for every tracked entrypoint."""
    over = ["tracking.uri=sqlite:////tmp/x.db", "tracking.experiment=mine"]
    with initialize_config_dir(config_dir=CONFIG_DIR):
        cfg = compose(primary, overrides=over)
    assert cfg.tracking.uri == "sqlite:////tmp/x.db" and cfg.tracking.experiment == "mine"


def test_the_entrypoints_without_a_seed_are_those_the_readme_names():
    """README: every Hydra entrypoint accepts ``seed=...`` but those it names; ``evaluate ... seed=1`` was refused
    by Hydra (``use +seed=1``) while the README named only analyze. Neither draws random numbers."""
    import re

    repo = CONF.parent
    text = " ".join((repo / "README.md").read_text().split())
    found = re.search(r"\(all but ([^)]*), which draws? no random numbers\) `seed=\.\.\.`", text)
    assert found, "README no longer says which entrypoints take seed=..."
    entrypoints = {m for p in (repo / "lattice_lab").rglob("*.py")
                   for m in re.findall(r'config_name="(\w+)"', p.read_text())}
    assert {"train", "evaluate", "analyze"} <= entrypoints
    with initialize_config_dir(config_dir=CONFIG_DIR):
        without = {name for name in entrypoints if "seed" not in compose(name)}
    assert without == set(re.findall(r"`(\w+)`", found.group(1)))


def test_documented_commands_of_multirun_experiments_pass_dash_m():
    """An experiment that sets ``hydra.mode: MULTIRUN`` only runs with ``-m`` (Hydra 1.4 refuses a mode
    changed during composition), so every command the repo shows for it must pass ``-m``."""
    import re

    repo = CONF.parent
    multirun = {n for n in EXPERIMENTS
                if OmegaConf.select(OmegaConf.load(CONF / "experiment" / f"{n}.yaml"), "hydra.mode") == "MULTIRUN"}
    assert multirun, "no multirun experiment found"
    files = [repo / "Makefile", repo / "README.md", *(repo / "docs").glob("*.md"), *CONF.rglob("*.yaml")]
    bad = []
    for path in files:
        for line in path.read_text().splitlines():
            for cmd in re.findall(r"lattice_lab\.(?:train|simulate)\b[^`|]*\+experiment=(\w+)", line):
                if cmd in multirun and not re.search(r"lattice_lab\.(?:train|simulate)\s+(?:\S+\s+)*-m\s", line):
                    bad.append(f"{path.relative_to(repo)}: {line.strip()}")
    assert not bad, "\n".join(bad)


def test_each_search_sweeps_its_own_family_in_one_study_per_model_preset():
    """``hparams_search=gnn_optuna`` alone sweeps a GNN (it searched ``model.aggregation`` on the default ENN and
    failed), and two presets of a family (``gnn`` vs ``gnn_small``) do not share, and mix, one Optuna study."""
    names = {}
    with initialize_config_dir(config_dir=CONFIG_DIR):
        for search in _options("hparams_search"):
            family = search.split("_")[0]
            for model in (None, family):
                over = [f"hparams_search={search}"] + ([f"model={model}"] if model else [])
                cfg = compose("train", overrides=over, return_hydra_config=True)
                assert cfg.model.name == family
                for key in cfg.hydra.sweeper.params:
                    if key.startswith("model."):
                        assert OmegaConf.select(cfg, key, default="missing") != "missing", (search, key)
                names[(search, model)] = OmegaConf.select(cfg, "hydra.sweeper.study_name")
    assert len(set(names.values())) == len(names), names
