import pytest

from lattice_lab.common.errors import ConfigError
from lattice_lab.compare_runs import format_table, main, runs_table


def test_runs_table_sorts_by_validation_sigma(tmp_mlflow, capsys):
    import mlflow

    mlflow.set_tracking_uri(tmp_mlflow)
    exp = mlflow.create_experiment("lattice_lab/train")
    for name, sigma, n in (("b", 0.2, 10), ("a", 0.05, 20), ("c", 0.9, 5)):
        with mlflow.start_run(experiment_id=exp, run_name=name):
            mlflow.set_tag("model_family", "enn")
            mlflow.log_param("model.name", "enn")
            mlflow.log_metrics({"final/val_sigma": sigma, "n_params": n})
    header, rows = runs_table("lattice_lab/train", tracking_uri=tmp_mlflow)
    assert "final/val_sigma" in header and "runName" in " ".join(header)
    names = [r[header.index("mlflow.runName")] for r in rows]
    assert names == ["a", "b", "c"]
    text = format_table(header, rows)
    assert text.splitlines()[0].startswith("run_id") and len(text.splitlines()) == 5
    assert main(["--experiment", "lattice_lab/train", "--tracking-uri", tmp_mlflow]) == 0
    assert "0.05" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="no such MLflow experiment"):
        runs_table("lattice_lab/nothing", tracking_uri=tmp_mlflow)
    # a misspelt sort key or columns that match nothing are named, not silently ignored
    with pytest.raises(ConfigError, match="--sort metrics.val_sigma: not a column"):
        runs_table("lattice_lab/train", sort="metrics.val_sigma", tracking_uri=tmp_mlflow)
    with pytest.raises(ConfigError, match="--columns metrics.nope: none of them"):
        runs_table("lattice_lab/train", columns=["metrics.nope"], tracking_uri=tmp_mlflow)
    assert main(["--tracking-uri", tmp_mlflow, "--csv", "/proc/no/such/dir/t.csv"]) == 2
    assert "error: --csv /proc/no/such/dir/t.csv" in capsys.readouterr().err


def test_max_runs_must_be_positive(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--max-runs", "0"])
    assert exc.value.code == 2 and "error: --max-runs=0: expected a positive integer" in capsys.readouterr().err
