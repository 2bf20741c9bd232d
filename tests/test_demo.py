"""demo: its presets can be chosen on the command line and reach the stages."""

import pytest
from hydra import compose, initialize_config_dir

from lattice_lab import demo
from lattice_lab.common.cli import CONFIG_DIR


class _Stop(Exception):
    pass


def test_presets_are_overridable_and_passed_to_the_stages(monkeypatch, tmp_path):
    with initialize_config_dir(config_dir=CONFIG_DIR):
        cfg = compose("demo", overrides=["dataset_preset=no_such_set_for_test", "model_preset=gnn_small",
                                         "trainer_preset=default", "seed=4"])
    calls = []

    def fake_stage(name, overrides):
        calls.append((name, list(overrides)))
        if name == "simulate":
            raise _Stop
        return 0.0

    monkeypatch.setattr(demo, "_stage", fake_stage)
    with pytest.raises(_Stop):
        demo.run(cfg)
    (gen, g_over), (train, t_over), (sim, _) = calls
    assert (gen, train, sim) == ("generate", "train", "simulate")
    assert "dataset=no_such_set_for_test" in g_over and "seed=4" in g_over
    assert {"model=gnn_small", "dataset=no_such_set_for_test", "trainer=default"} <= set(t_over)
