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
    with pytest.raises(ConfigError, match="--sort foo: Invalid attribute key 'foo'"):
        runs_table("lattice_lab/train", sort="foo", tracking_uri=tmp_mlflow)
    with pytest.raises(ConfigError, match="--columns metrics.nope: none of them"):
        runs_table("lattice_lab/train", columns=["metrics.nope"], tracking_uri=tmp_mlflow)
    assert main(["--tracking-uri", tmp_mlflow, "--csv", "/proc/no/such/dir/t.csv"]) == 2
    assert "error: --csv /proc/no/such/dir/t.csv" in capsys.readouterr().err


def test_max_runs_must_be_positive(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--max-runs", "0"])
    assert exc.value.code == 2 and "error: --max-runs=0: expected a positive integer" in capsys.readouterr().err


def test_best_runs_first_even_beyond_max_runs_and_only_finished_runs(tmp_mlflow):
    """The store sorts before it cuts at max_runs (else 'best first' lists the newest runs only);
    failed runs and the columns train does not log stay out."""
    import mlflow

    mlflow.set_tracking_uri(tmp_mlflow)
    exp = mlflow.create_experiment("lattice_lab/train")
    for name, sigma in (("best", 0.01), ("mid", 0.2), ("worst", 0.9), ("newest", 0.5)):
        with mlflow.start_run(experiment_id=exp, run_name=name):
            mlflow.log_metrics({"final/val_sigma": sigma, "final/epochs": 3})
    with pytest.raises(RuntimeError), mlflow.start_run(experiment_id=exp, run_name="crashed"):
        mlflow.log_metric("final/val_sigma", 0.001)
        raise RuntimeError("trial failed")
    header, rows = runs_table("lattice_lab/train", max_runs=2, tracking_uri=tmp_mlflow)
    assert [r[header.index("mlflow.runName")] for r in rows] == ["best", "mid"]
    assert "final/epochs" in header  # the default columns name what train logs


def test_filter_and_group_by_give_mean_and_spread_over_seeds(tmp_mlflow, capsys):
    """``--filter`` narrows the runs with an MLflow search filter; ``--group-by`` gives one row per value
    with the number of runs and mean +- std (ddof 1) of each numeric column, best mean first."""
    import mlflow

    mlflow.set_tracking_uri(tmp_mlflow)
    exp = mlflow.create_experiment("lattice_lab/train")
    runs = [("small_a_s0", "a", 0.4), ("small_a_s1", "a", 0.6), ("small_b_s0", "b", 0.1), ("small_b_s1", "b", 0.3),
            ("small_b_s2", "b", 0.2), ("other", "b", 0.0)]
    for name, preset, sigma in runs:
        with mlflow.start_run(experiment_id=exp, run_name=name):
            mlflow.set_tags({"model_preset": preset, "device": "cpu"})
            mlflow.log_metrics({"final/val_sigma": sigma, "n_params": 7 if preset == "a" else 9})
    header, rows = runs_table("lattice_lab/train", tracking_uri=tmp_mlflow, group_by="tags.model_preset",
                              filter_string="tags.mlflow.runName LIKE 'small_%'")
    assert header[:2] == ["model_preset", "n_runs"]
    col = header.index("final/val_sigma")
    assert [(r[0], r[1], r[col]) for r in rows] == [("b", "3", "0.2 +- 0.1"), ("a", "2", "0.5 +- 0.1414")]
    assert rows[0][header.index("n_params")] == "9" and rows[0][header.index("device")] == "cpu"  # constants as such
    # max_runs counts groups, each over all its runs (not the best max_runs runs, which dropped a's worst seed)
    header, rows = runs_table("lattice_lab/train", tracking_uri=tmp_mlflow, group_by="tags.model_preset",
                              filter_string="tags.mlflow.runName LIKE 'small_%'", max_runs=3)
    assert [(r[0], r[1]) for r in rows] == [("b", "3"), ("a", "2")]
    header, rows = runs_table("lattice_lab/train", tracking_uri=tmp_mlflow, group_by="tags.model_preset", max_runs=1)
    assert [(r[0], r[1], r[col]) for r in rows] == [("b", "4", "0.15 +- 0.1291")]
    header, rows = runs_table("lattice_lab/train", tracking_uri=tmp_mlflow, group_by="tags.model_preset",
                              filter_string="tags.mlflow.runName = 'none'")
    assert header[:2] == ["model_preset", "n_runs"] and rows == []  # no run matched: an empty table
    with pytest.raises(ConfigError, match="--group-by tags.nope: not a column"):
        runs_table("lattice_lab/train", tracking_uri=tmp_mlflow, group_by="tags.nope")
    assert main(["--tracking-uri", tmp_mlflow, "--filter", "tags.mlflow.runName LIKEE 'x'"]) == 2
    assert "error: --filter tags.mlflow.runName LIKEE 'x': Invalid clause" in capsys.readouterr().err


def test_a_filter_the_store_rejects_is_named_not_the_sort(tmp_mlflow, capsys):
    """``==`` passes MLflow's pre-parse and fails in the store's search: the error names the filter."""
    import mlflow

    mlflow.set_tracking_uri(tmp_mlflow)
    exp = mlflow.create_experiment("lattice_lab/train")
    with mlflow.start_run(experiment_id=exp):
        mlflow.log_param("dataset.name", "x")
    assert main(["--tracking-uri", tmp_mlflow, "--filter", "params.dataset.name == 'x'"]) == 2
    err = capsys.readouterr().err.splitlines()[-1]  # (the lines before it: MLflow's INFO log)
    assert err.startswith("error: --filter params.dataset.name == 'x': Invalid comparator '=='") and "--sort" not in err
    assert err.endswith("(MLflow's filter grammar compares with =, not ==)")
    with pytest.raises(ConfigError, match="--sort foo: Invalid attribute key"):  # a bad sort beside a good filter
        runs_table("lattice_lab/train", sort="foo", tracking_uri=tmp_mlflow, filter_string="params.dataset.name = 'x'")


@pytest.mark.parametrize("uri, message", [
    ("{tmp}/nonexist.db", "no such tracking store {tmp}/nonexist.db"),
    ("file://{tmp}/mlruns", "no such tracking store {tmp}/mlruns"),
    ("sqlite:///{tmp}/nonexist_dir/x.db", "no database {tmp}/nonexist_dir/x.db"),
    ("sqlite:///{tmp}/x.db", "no database {tmp}/x.db"),
])
def test_a_store_that_does_not_exist_is_refused_and_not_created(tmp_path, capsys, uri, message):
    uri = uri.format(tmp=tmp_path)
    assert main(["--tracking-uri", uri]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --tracking-uri {uri}: {message.format(tmp=tmp_path)} (expected ")
    assert err.count("\n") == 1 and list(tmp_path.iterdir()) == []  # one line; nothing created


def test_a_database_given_as_a_plain_path_or_not_a_database_is_one_line(tmp_path, capsys):
    db = tmp_path / "m.db"
    db.write_text("not a database")
    assert main(["--tracking-uri", str(db)]) == 2
    assert capsys.readouterr().err == (f"error: --tracking-uri {db}: a file, not a tracking store folder "
                                       f"(a sqlite database is sqlite:///{db})\n")
    assert main(["--tracking-uri", f"sqlite:///{db}"]) == 2
    assert capsys.readouterr().err == f"error: --tracking-uri sqlite:///{db}: (sqlite3.DatabaseError) file is not a database\n"


def test_a_closed_pipe_ends_quietly(tmp_mlflow, tmp_path):
    """`python -m lattice_lab.compare_runs | head`: the reader closes the pipe before the table is written."""
    import os
    import subprocess
    import sys

    import mlflow

    mlflow.set_tracking_uri(tmp_mlflow)
    exp = mlflow.create_experiment("lattice_lab/train")
    with mlflow.start_run(experiment_id=exp, run_name="a"):
        mlflow.log_metrics({"final/val_sigma": 0.1})
    read, write = os.pipe()
    os.close(read)  # the reader is gone before anything is written
    proc = subprocess.run([sys.executable, "-m", "lattice_lab.compare_runs", "--tracking-uri", tmp_mlflow,
                           "--csv", str(tmp_path / "t.csv")], stdout=write, stderr=subprocess.PIPE, text=True,
                          timeout=120)
    os.close(write)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr
    assert (tmp_path / "t.csv").read_text().startswith("run_id")


def test_a_tracking_server_that_does_not_answer_is_one_line_within_seconds(tmp_path):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_HTTP_REQUEST")}
    # MLflow's own default (7 retries with backoff) took 2 minutes: past this timeout
    proc = subprocess.run([sys.executable, "-m", "lattice_lab.compare_runs", "--tracking-uri", "http://127.0.0.1:9"],
                          capture_output=True, text=True, timeout=100, env=env, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith("error: --tracking-uri http://127.0.0.1:9: "), proc.stderr
    assert len(proc.stderr.splitlines()) == 1


def test_format_table_pads_every_column_to_its_widest_cell():
    assert format_table(["a", "bb"], [["long value", "x"], ["s", "yyy"]]).splitlines() == [
        "a           bb ", "---------------", "long value  x  ", "s           yyy"]
    assert format_table(["a"], []) == "a\n-"


def test_throughput_sorts_fastest_first_missing_values_are_dashes_and_mixed_values_are_counted(tmp_mlflow):
    """``*_per_s`` is better when higher: ``--sort metrics.site_steps_per_s`` lists the fastest run first; a
    metric a run did not log is ``-`` (not ``nan``); a grouped column whose runs disagree says how many values."""
    import mlflow

    mlflow.set_tracking_uri(tmp_mlflow)
    exp = mlflow.create_experiment("lattice_lab/simulate")
    for name, rate, device, alpha in (("slow", 1e5, "cpu", 0.3), ("fast", 3e5, "cuda", None), ("mid", 2e5, "cpu", 0.25)):
        with mlflow.start_run(experiment_id=exp, run_name=name):
            mlflow.set_tags({"device": device, "model_run_id": "m1"})
            mlflow.log_metrics({"site_steps_per_s": rate, **({"alpha": alpha} if alpha else {})})
    header, rows = runs_table("lattice_lab/simulate", sort="metrics.site_steps_per_s", tracking_uri=tmp_mlflow)
    assert [r[header.index("mlflow.runName")] for r in rows] == ["fast", "mid", "slow"]
    assert [r[header.index("alpha")] for r in rows] == ["-", "0.25", "0.3"]
    header, rows = runs_table("lattice_lab/simulate", sort="metrics.site_steps_per_s", tracking_uri=tmp_mlflow,
                              group_by="tags.model_run_id")
    assert [(r[0], r[1], r[header.index("device")], r[header.index("site_steps_per_s")]) for r in rows] == [
        ("m1", "3", "(2 values)", "2e+05 +- 1e+05")]


def test_a_missing_store_from_the_environment_is_named_as_the_tracking_store(tmp_path, monkeypatch, capsys):
    """No --tracking-uri: the store comes from MLFLOW_TRACKING_URI (or the default), and the error says so."""
    uri = f"sqlite:///{tmp_path / 'none.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert main([]) == 2
    assert capsys.readouterr().err.startswith(f"error: tracking store {uri}: no database {tmp_path / 'none.db'}")
    assert list(tmp_path.iterdir()) == []
