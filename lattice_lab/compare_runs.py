"""Print a comparison table of MLflow runs: ``python -m lattice_lab.compare_runs``.

Examples::

    python -m lattice_lab.compare_runs                       # training runs, best validation sigma first
    python -m lattice_lab.compare_runs --experiment lattice_lab/simulate --sort metrics.site_steps_per_s
    python -m lattice_lab.compare_runs --csv runs/compare.csv
    python -m lattice_lab.compare_runs --filter "tags.mlflow.runName LIKE 'small_%'" --group-by tags.model_preset

Columns are MLflow params/metrics/tags (``metrics.val/sigma``-style names); the defaults match the
names every lattice_lab task logs, so models and runs line up side by side.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

from lattice_lab.common.errors import ConfigError

DEFAULT_COLUMNS = {
    "lattice_lab/train": ["tags.model_family", "tags.model_preset", "params.dataset.name", "metrics.final/val_sigma",
                          "metrics.final/val_random_sigma", "metrics.final/val_quench_sigma",
                          "metrics.final/val_rmse", "metrics.final/train_sigma", "metrics.n_params",
                          "metrics.flops_per_site", "metrics.final/epochs", "params.seed", "tags.device"],
    "lattice_lab/evaluate": ["tags.train_run", "tags.train_dataset", "tags.dataset", "tags.split", "metrics.lattice_L",
                             "metrics.n_configs", "metrics.eval/sigma", "metrics.eval/random_sigma",
                             "metrics.eval/quench_sigma", "metrics.eval/quench_wall_sigma",
                             "metrics.eval/quench_domain_sigma", "metrics.eval/max_err", "tags.same_data_as_training"],
    "lattice_lab/simulate": ["params.force.source", "params.dynamics.L", "params.dynamics.replicas",
                             "params.dynamics.temperature", "params.seed", "metrics.alpha", "metrics.alpha_err",
                             "metrics.steps_per_s", "metrics.site_steps_per_s", "tags.model_run_id", "tags.device"],
    # the trajectory's settings are tags of an analysis run (its params are the analysis settings)
    "lattice_lab/analyze": ["tags.force_source", "tags.L", "tags.R", "tags.T", "tags.seed", "metrics.alpha",
                            "metrics.alpha_err", "metrics.alpha_xi", "metrics.alpha_xi_err", "metrics.final_L",
                            "metrics.final_xi", "tags.model_run_id"],
    # bench logs one run per benchmark; its per-model metrics are named <preset>/<metric>
    "lattice_lab/bench": ["params.presets", "params.sizes", "params.threads", "metrics.ceiling_gflops_float32",
                          "metrics.targets_passed", "metrics.targets_failed", "tags.device",
                          "tags.cpu_capability"],
}
ALL_RUNS = 100_000  # MLflow's own default of search_runs (it pages through the store)
DEFAULT_SORT = {"lattice_lab/train": "metrics.final/val_sigma", "lattice_lab/evaluate": "metrics.eval/sigma",
                "lattice_lab/simulate": "start_time",
                "lattice_lab/bench": "start_time"}


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def runs_table(experiment: str, columns: list[str] | None = None, sort: str | None = None,
               max_runs: int = 50, tracking_uri: str | None = None, filter_string: str | None = None,
               group_by: str | None = None):
    """Return (columns, rows) for the finished runs of ``experiment`` (a pandas-free list of lists): the
    first ``max_runs`` in the order of ``sort``, which the store applies before the cut (grouped: the
    first ``max_runs`` groups, each over all its runs).

    ``filter_string``: an MLflow search filter (``"params.dataset.name = 'holstein_L16'"``), combined with
    the finished-runs filter. ``group_by``: a column; one row per value of it (the runs of a seed study),
    with the number of runs and every numeric column as ``mean +- std`` (std over the runs, ddof 1)."""
    import mlflow

    from lattice_lab.tracking.mlflow_utils import check_existing_store, resolve_tracking_uri

    uri = tracking_uri or resolve_tracking_uri(None)
    label = f"--tracking-uri {uri}" if tracking_uri else f"tracking store {uri}"
    check_existing_store(uri, label)  # this command only reads: MLflow would create an empty store
    mlflow.set_tracking_uri(uri)
    try:
        found = mlflow.get_experiment_by_name(experiment) is not None
    except Exception as exc:  # noqa: BLE001 - the store cannot be read: MLflow's or the database's error, one line
        message = exc.message if isinstance(exc, mlflow.exceptions.MlflowException) else str(exc)
        raise ConfigError(f"{label}: {message.splitlines()[0].split('. ')[0]}") from None
    if not found:
        raise ConfigError(f"experiment={experiment!r}: no such MLflow experiment in {uri}")
    asked_sort, columns_asked = sort, list(columns or [])
    sort = sort or DEFAULT_SORT.get(experiment, "start_time")
    ascending = not sort.endswith("_per_s") and sort != "start_time"
    kind, _, key = sort.partition(".") if sort.split(".", 1)[0] in ("metrics", "params", "tags") else ("", "", sort)
    order = f"{kind}.`{key}`" if kind else f"attributes.{key}"
    where = "attributes.status = 'FINISHED'"
    if filter_string:
        try:
            from mlflow.utils.search_utils import SearchUtils

            SearchUtils.parse_search_filter(filter_string)
        except mlflow.exceptions.MlflowException as exc:
            raise ConfigError(f"--filter {filter_string}: {exc.message.splitlines()[0]}") from None
        where += f" AND {filter_string}"
    try:
        # grouped: every matching run (a cut before grouping would drop a group's worst seeds), max_runs groups
        df = mlflow.search_runs(experiment_names=[experiment], max_results=ALL_RUNS if group_by else max_runs,
                                filter_string=where,
                                order_by=[f"{order} {'ASC' if ascending else 'DESC'}"])
    except mlflow.exceptions.MlflowException as exc:
        if filter_string:  # the store rejects what the pre-parse let through (a comparator): the filter or the sort?
            try:
                mlflow.search_runs(experiment_names=[experiment], max_results=1, filter_string=where)
            except mlflow.exceptions.MlflowException as filter_exc:
                hint = " (MLflow's filter grammar compares with =, not ==)" if "==" in filter_string else ""
                raise ConfigError(f"--filter {filter_string}: {filter_exc.message.split('. ')[0]}{hint}") from None
        raise ConfigError(f"--sort {sort}: {exc.message.split('. ')[0]} (sort by start_time, metrics.<name>, "
                          "params.<name> or tags.<name>)") from None
    columns = ["run_id", "tags.mlflow.runName"] + list(columns or DEFAULT_COLUMNS.get(experiment, []))
    present = [c for c in columns if c in df.columns]
    logged = ", ".join(sorted(c for c in df.columns if c.startswith("metrics."))[:5])
    if len(df) and columns_asked and not any(c in df.columns for c in columns_asked):
        raise ConfigError(f"--columns {' '.join(columns_asked)}: none of them is logged in {experiment!r} (e.g. {logged})")
    if len(df) and asked_sort and asked_sort not in df.columns:
        raise ConfigError(f"--sort {asked_sort}: not a column of {experiment!r} (e.g. start_time, {logged})")
    if sort in df.columns:
        df = df.sort_values(sort, ascending=ascending)
    if group_by:
        if len(df) and group_by not in df.columns:
            raise ConfigError(f"--group-by {group_by}: not a column of {experiment!r} (e.g. tags.model_preset, "
                              "params.model.name)")
        header, rows = _grouped(df, group_by, present, sort, ascending)
        return header, rows[:max_runs]
    rows = [[_fmt(v) for v in rec] for rec in df[present].itertuples(index=False)]
    return [_short(c) for c in present], rows


def _short(column: str) -> str:
    """``metrics.final/val_sigma`` -> ``final/val_sigma``."""
    return column.split(".", 1)[1] if "." in column else column


def _grouped(df, group_by: str, present: list[str], sort: str, ascending: bool):
    """One row per value of ``group_by`` (in the order of the groups' mean ``sort`` where numeric, else of
    their best run): ``n`` runs, numeric columns as ``mean +- std``, others when the runs agree."""
    import pandas as pd

    keep = [c for c in present if c not in ("run_id", "tags.mlflow.runName", group_by)]
    if group_by not in df.columns:  # no run matched
        return [_short(group_by), "n_runs", *map(_short, keep)], []
    numeric = [c for c in keep if pd.api.types.is_numeric_dtype(df[c])]
    groups = list(df.groupby(group_by, sort=False, dropna=False))
    if sort in numeric:
        groups.sort(key=lambda g: (math.isnan(m := float(g[1][sort].mean())), m if ascending else -m))
    rows = []
    for value, part in groups:
        row = [_fmt(value), str(len(part))]
        for c in keep:
            col = part[c]
            if c in numeric:
                vals = col.dropna()
                row.append("-" if vals.empty else _fmt(float(vals.iloc[0])) if vals.nunique() == 1
                           else f"{_fmt(float(vals.mean()))} +- {_fmt(float(vals.std(ddof=1)))}")
            else:
                distinct = col.dropna().unique()
                row.append(_fmt(distinct[0]) if len(distinct) == 1 else f"({len(distinct)} values)")
        rows.append(row)
    return [_short(group_by), "n_runs", *map(_short, keep)], rows


def format_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths))
    out = [line, "-" * len(line)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m lattice_lab.compare_runs", description=__doc__.splitlines()[0])
    p.add_argument("--experiment", default="lattice_lab/train")
    p.add_argument("--columns", nargs="*", help="MLflow columns, e.g. metrics.val/sigma params.model.name")
    p.add_argument("--sort", default=None)
    p.add_argument("--max-runs", type=int, default=50)
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--csv", default=None, help="also write the table as CSV")
    p.add_argument("--filter", default=None, dest="filter_string",
                   help="MLflow search filter, e.g. \"params.dataset.name = 'holstein_L16'\"")
    p.add_argument("--group-by", default=None,
                   help="a column, e.g. tags.model_preset: mean +- std of every numeric column over its runs (seeds)")
    args = p.parse_args(argv)
    # an interactive command: a tracking server that does not answer is an error within seconds, not after
    # MLflow's default 7 retries with backoff (2 minutes); the user's own settings win
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    if args.max_runs < 1:
        p.error(f"--max-runs={args.max_runs}: expected a positive integer")
    try:
        header, rows = runs_table(args.experiment, args.columns, args.sort, args.max_runs, args.tracking_uri,
                                  args.filter_string, args.group_by)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        print(format_table(header, rows), flush=True)
    except BrokenPipeError:  # `compare_runs | head`: the reader has gone; the rest goes nowhere, no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    if args.csv:
        import csv
        import io

        from lattice_lab.common.io import atomic_write_text

        buf = io.StringIO()
        csv.writer(buf).writerows([header, *rows])
        try:
            atomic_write_text(args.csv, buf.getvalue())
        except OSError as exc:
            print(f"error: --csv {args.csv}: {exc.strerror or exc}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
