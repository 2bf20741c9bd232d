"""Summaries of an Optuna study: a trials table (CSV) and the best configuration (YAML)."""

from __future__ import annotations

import ast
import csv
import io
import re
import shlex
from pathlib import Path

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from lattice_lab.common.io import atomic_write_text

RUN_ID_ATTR = "mlflow_run_id"


def override_value(value) -> str:
    """``value`` in Hydra's override grammar (``null``, ``true``, ``1e-05``, ``gate``, ``'a b'``, ``[16,8,2]``)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(map(override_value, value)) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{override_value(v)}" for k, v in value.items()) + "}"
    text = str(value)
    try:  # unquoted where Hydra reads it back as this very string
        if OverridesParser.create().parse_override(f"k={text}").value() == text:
            return text
    except Exception:  # noqa: BLE001 - not a bare word of the grammar: quote it
        pass
    # in quotes Hydra keeps a backslash as it is, except in a run of them before a quote or at the end, which
    # it halves: only those runs are doubled (doubling all of them turned a value C:\data into C:\\data)
    body = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, text)
    return "'" + body.replace("'", "\\'") + "'"


def _param_text(value) -> str:
    """A value as :func:`lattice_lab.tracking.mlflow_utils.flatten_config` logs it."""
    return "null" if value is None else str(value)


def logged_value(params: dict[str, str], key: str) -> str | None:
    """The value a run logged for the dotted config ``key``, as text; None when it logged none.

    ``flatten_config`` dots only mappings, so a searched list element (``model.hidden.0``) or anything
    below a list lies inside one logged value (``model.hidden = '[16, 8, 2]'``): that value is read back
    as a Python literal and indexed with the rest of the key."""
    if key in params:
        return params[key]
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        head = ".".join(parts[:i])
        if head not in params:
            continue
        try:
            node = ast.literal_eval(params[head])
            for part in parts[i:]:
                node = node[int(part)] if isinstance(node, (list, tuple)) else node[part]
        except (ValueError, SyntaxError, TypeError, KeyError, IndexError):
            return None
        return _param_text(node)
    return None


def match_run(trial_params: dict, run_params: dict[str, dict]) -> str:
    """The MLflow run whose logged (flattened-config) params equal the trial's sampled values
    (list elements and keys below them included, see :func:`logged_value`); "" unless exactly one does."""
    want = {k: _param_text(v) for k, v in trial_params.items()}
    hits = [rid for rid, params in run_params.items() if all(logged_value(params, k) == v for k, v in want.items())]
    return hits[0] if len(hits) == 1 else ""


def trials_table(study: optuna.Study, run_params: dict[str, dict] | None = None) -> list[dict]:
    """One row per trial: number, state, value, every sampled parameter and the MLflow run id.

    ``run_params`` maps the sweep's MLflow child run ids to their params; a trial is linked to the
    run whose params equal its sampled values (left empty when none or several match).
    """
    rows = []
    for trial in study.get_trials(deepcopy=False):
        row = {"number": trial.number, "state": trial.state.name,
               "value": trial.value if trial.values is not None and len(trial.values) == 1 else None,
               RUN_ID_ATTR: match_run(trial.params, run_params or {})}
        row.update({f"param.{k}": v for k, v in sorted(trial.params.items())})
        rows.append(row)
    return rows


def write_study_report(storage: str, study_name: str, out_dir: str | Path,
                       run_params: dict[str, dict] | None = None, fixed_overrides: list[str] | None = None,
                       task: str = "train") -> dict:
    """Write ``trials.csv`` and ``best_config.yaml`` for a study; return paths and counts.

    ``fixed_overrides``: the sweep's own settings (presets, paths, ...); with the best trial's values
    they make ``best_config.yaml``'s ``overrides`` and ``command``, one run that retrains the best trial."""
    out_dir = Path(out_dir)
    study = optuna.load_study(study_name=study_name, storage=storage)
    rows = trials_table(study, run_params)
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    files = [atomic_write_text(out_dir / "trials.csv", buf.getvalue())]
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    best_value = None
    if complete:
        best = study.best_trial
        best_value = best.value
        best_cfg = {"study_name": study_name, "trial": best.number, "value": best.value,
                    "params": dict(best.params),
                    "overrides": [*(fixed_overrides or []),
                                  *(f"{k}={override_value(v)}" for k, v in sorted(best.params.items()))]}
        best_cfg["command"] = f"python -m lattice_lab.{task} " + " ".join(map(shlex.quote, best_cfg["overrides"]))
        files.append(atomic_write_text(out_dir / "best_config.yaml", OmegaConf.to_yaml(OmegaConf.create(best_cfg))))
    n_failed = sum(t.state == optuna.trial.TrialState.FAIL for t in study.get_trials(deepcopy=False))
    return {"files": files, "best_value": best_value, "n_complete": len(complete), "n_failed": n_failed,
            "rows": rows}
