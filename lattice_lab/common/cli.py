"""Entrypoint helpers: user errors become one line on stderr (exit code 2), not a traceback.

Every Hydra entrypoint is decorated twice::

    @hydra_errors                                       # outside Hydra: Hydra's own errors, multirun failures
    @hydra.main(config_path=CONFIG_DIR, config_name="simulate")
    @friendly_errors                                    # inside a job: our errors, interruptions
    def main(cfg): ...

- :func:`friendly_errors`: a :class:`LatticeLabError` (or an ``OSError`` naming a file) prints
  ``error: ...`` and exits 2. In a multirun it is raised on, labelled with its job, so that launchers
  and sweepers record the job as failed (Optuna: the trial is ``FAIL`` and the sweep goes on). The job's
  ``tracking`` section is checked before the job starts: a store URI of a scheme MLflow has no store for
  (``tracking.uri=bogus://x``) is such an error, not a warning once the run is under way.
- :func:`hydra_errors`: Hydra's composition errors (``dynamics=quench_smal``, an unparsable override,
  an unknown key, flags that do not go together such as ``-m --cfg job``), the failed job that ends a plain multirun (``error: job N (overrides): message``)
  and ``+launcher=slurm`` without SLURM print one line and exit 2; anything else is reported the way
  Hydra reports it (traceback, exit 1).
- An interruption (Ctrl-C, SIGTERM) prints one line ``interrupted...`` and exits 130 (143 after a
  SIGTERM): a run that saved its state raises :class:`~lattice_lab.common.errors.Interrupted`, whose
  message says where and how to continue.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import logging
import os
import re
import shutil
import signal
import sys
import threading
from pathlib import Path

from lattice_lab.common.allocator import tune_malloc
from lattice_lab.common.errors import ConfigError, Interrupted, LatticeLabError
from lattice_lab.common.interrupts import interrupting

CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "conf")

EXIT_USER_ERROR = 2

# How to continue after an interruption that the run itself did not describe (a plain KeyboardInterrupt),
# by Hydra job name (the entrypoint's module).
_RESUME_HINTS = {
    "generate": "rerun the same command to resume from the last saved progress",
    "train": "rerun with resume=true to continue from the last finished epoch (if one finished)",
    "simulate": "rerun with resume=true to continue from the last checkpoint (if one was written)",
}

log = logging.getLogger(__name__)

_received: dict = {"signal": None}  # the last SIGTERM turned into a KeyboardInterrupt by _sigterm_interrupts
# user errors of this process's multirun jobs, (job label, message), for the line that ends the multirun
_failed_jobs: list[tuple[str, str]] = []
# user errors a multirun's callback found before the sweep (Hydra turns a callback's exception into a warning;
# the multirun then fails where the bad setting is used, e.g. Optuna's sampler seed), for that failure's line
_setup_errors: list[str] = []
_JOB_ATTR = "_lattice_lab_job"  # the label a multirun job's user error carries to hydra_errors (survives pickling)


def _hydra_job():
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get() if HydraConfig.initialized() else None
    except Exception:  # noqa: BLE001 - outside Hydra
        return None


def _in_multirun() -> bool:
    try:
        from hydra.types import RunMode

        hc = _hydra_job()
        return hc is not None and hc.mode == RunMode.MULTIRUN
    except Exception:  # noqa: BLE001 - outside Hydra
        return False


def _job_name() -> str | None:
    hc = _hydra_job()
    try:
        return str(hc.job.name) if hc is not None else None
    except Exception:  # noqa: BLE001
        return None


def _job_label() -> str:
    """``job N (overrides)`` of the running multirun job."""
    hc = _hydra_job()
    try:
        overrides = " ".join(o for o in hc.overrides.task if not o.startswith("hydra."))
        return f"job {hc.job.num}" + (f" ({overrides})" if overrides else "")
    except Exception:  # noqa: BLE001
        return "a job"


def _user_message(exc: BaseException) -> str:
    if isinstance(exc, OSError) and not isinstance(exc, LatticeLabError):
        return f"{exc.filename}: {exc.strerror or exc}"
    return str(exc)


def _job_failed(exc: BaseException) -> None:
    """A multirun job ends in a user error: label it, remember it, log it (one line), and let it propagate."""
    label, message = _job_label(), _user_message(exc)
    with contextlib.suppress(Exception):
        setattr(exc, _JOB_ATTR, label)
    _failed_jobs.append((label, message))
    log.error("%s failed: %s", label, message)


def refuse_multirun(exc: LatticeLabError) -> None:
    """Remember a user error a multirun callback found at its start (see ``_setup_errors``): the error that
    then ends the multirun is reported as this one line."""
    _setup_errors.append(str(exc))


def multirun_refused() -> bool:
    """Whether a callback of this multirun refused a setting at its start (its end has nothing to report)."""
    return bool(_setup_errors)


def received_signal() -> int | None:
    """The signal behind the KeyboardInterrupt being handled: SIGTERM when this module turned one into it,
    else None (Ctrl-C)."""
    return _received["signal"]


def _exit_code() -> int:
    return 128 + int(_received["signal"] or signal.SIGINT)


def _interrupted(detail: str | None) -> None:
    """Print ``interrupted[ (SIGTERM)][: detail]`` and exit 130 (143 after a SIGTERM)."""
    signum = _received["signal"]
    head = "interrupted" if signum in (None, signal.SIGINT) else f"interrupted ({signal.Signals(signum).name})"
    print(f"{head}: {detail}" if detail else head, file=sys.stderr, flush=True)
    sys.exit(_exit_code())


@interrupting
def _raise_keyboard_interrupt(signum, frame):
    _received["signal"] = signum
    raise KeyboardInterrupt(signal.Signals(signum).name)


@contextlib.contextmanager
def _sigterm_interrupts():
    """While inside: SIGTERM raises KeyboardInterrupt in the main thread, as Ctrl-C does, so runs save their
    state and stop the same way. Only where nobody else handles SIGTERM (e.g. submitit's job handlers do);
    the previous handler is restored on the way out."""
    installed = False
    if threading.current_thread() is threading.main_thread():
        with contextlib.suppress(ValueError, OSError):
            if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
                signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
                installed = True
    try:
        yield
    finally:
        if installed:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _check_tracking(args) -> None:
    """The ``tracking`` section of the job's config (its first argument), where it has one and tracking is on:
    :meth:`~lattice_lab.tracking.mlflow_utils.TrackingSettings.from_config` checks it."""
    cfg = args[0] if args else None
    if cfg is not None and hasattr(cfg, "get") and cfg.get("tracking") is not None:
        from lattice_lab.tracking.mlflow_utils import TrackingSettings

        TrackingSettings.from_config(cfg)


def _check_added_keys(args) -> None:
    """A top-level setting added on the command line with ``+`` (``+seed=1`` to ``analyze``, which has no
    seed: Hydra's own error for ``seed=1`` suggests it) is a ConfigError: nothing reads a key the
    entrypoint's config does not have, so the run would silently go on without it. ``+group=option``
    (``+experiment=...``, ``+launcher=...``), ``++key=value`` and keys inside sections
    (``+tracking.tags.team=x``; the sections with a fixed set of keys refuse unknown ones themselves)
    are left alone."""
    hc = _hydra_job()
    cfg = args[0] if args else None
    if hc is None or cfg is None or not hasattr(cfg, "keys"):
        return
    try:
        from hydra.core.override_parser.overrides_parser import OverridesParser
        from hydra.core.override_parser.types import OverrideType

        overrides = OverridesParser.create().parse_overrides(list(hc.overrides.task))
        groups = set(hc.runtime.choices)
    except Exception:  # noqa: BLE001 - not a Hydra job we can read: nothing to check
        return
    for o in overrides:
        key = o.key_or_group
        if o.type is OverrideType.ADD and o.package is None and "." not in key and "/" not in key \
                and key not in groups:
            known = sorted(str(k) for k in cfg.keys() if k != key)
            raise ConfigError(f"{o.input_line}: {_job_name() or 'this command'} has no setting {key!r}, so nothing "
                              f"would read it (its settings: {', '.join(known)})")


def friendly_errors(fn):
    """Decorate a Hydra task function: a :class:`LatticeLabError` prints ``error: ...`` and exits 2.

    So does an ``OSError`` that names a file (an output folder that cannot be created, a read-only
    disk, no space left): ``error: <path>: <reason>``.
    Ctrl-C (or SIGTERM) prints ``interrupted: <how to continue>`` and exits 130 (143 after SIGTERM);
    :class:`Interrupted`, raised by a run that saved its state, prints ``interrupted: <its message>``.
    In multirun (sweeps) user errors propagate so the sweeper records the trial as failed.
    The config's ``tracking`` section is checked before ``fn`` runs (every entrypoint, before any work).
    Also tunes glibc malloc for tensor workloads (:mod:`lattice_lab.common.allocator`).
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        tune_malloc()
        _received["signal"] = None
        try:
            with _sigterm_interrupts():
                _check_added_keys(args)
                _check_tracking(args)
                return fn(*args, **kwargs)
        except KeyboardInterrupt:  # a multirun stops too: the user wants the sweep to end
            hint = _RESUME_HINTS.get(_job_name() or "")
            _interrupted(f"{_job_label()}; {hint}" if _in_multirun() and hint else hint)
        except Interrupted as exc:  # before LatticeLabError: an interruption is not a user error
            if exc.signum is not None:  # the run caught the signal itself (to stop at a safe point)
                _received["signal"] = exc.signum
            _interrupted(f"{_job_label()}: {exc}" if _in_multirun() else str(exc))
        except (LatticeLabError, OSError) as exc:
            if isinstance(exc, OSError) and not isinstance(exc, LatticeLabError) and exc.filename is None:
                raise  # not about a path: a real failure keeps its traceback
            if _in_multirun():
                _job_failed(exc)
                raise
            print(f"error: {_user_message(exc)}", file=sys.stderr)
            sys.exit(EXIT_USER_ERROR)

    return wrapper


def _hydra_message(exc: BaseException) -> str | None:
    """One line for Hydra's own errors (config composition, override grammar); None for others."""
    try:
        from hydra.errors import CompactHydraException, MissingConfigException, OverrideParseException
    except ImportError:  # pragma: no cover - Hydra is a dependency
        return None
    if not isinstance(exc, CompactHydraException):
        return None
    text = str(exc)
    for marker in ("\nConfig search path:", "\nSearch path:"):
        text = text.split(marker)[0]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if isinstance(exc, MissingConfigException) and exc.options and "/" in (exc.missing_cfg_file or ""):
        group, name = exc.missing_cfg_file.rsplit("/", 1)
        options = list(exc.options)
        close = difflib.get_close_matches(name, options, n=1)
        return (f"{group}={name}: no such config in group {group!r}" + (f"; did you mean {close[0]}?" if close else "")
                + f" (options: {', '.join(options)})")
    if isinstance(exc, OverrideParseException):
        reason = [line for line in lines if not line.startswith(("Error when parsing", "See https://"))]
        return f"{exc.override}: cannot parse this override ({'; '.join(reason) or 'syntax error'}; " \
               "grammar: https://hydra.cc/docs/advanced/override_grammar/basic/)"
    message = " ".join(lines) or type(exc).__name__
    added = re.fullmatch(r"Could not override '([^'.]+)'\. To append to your config use \+(\S+)", message)
    if added:  # a top-level key: appending it with + is refused too (_check_added_keys), so do not suggest it
        return f"{added.group(2)}: no such setting ({added.group(1)!r} is not in this command's config; " \
               "--cfg job prints its settings)"
    if "hydra.mode changed during config composition" in message and not {"-m", "--multirun"} & set(sys.argv[1:]):
        message += " (this config, e.g. an +experiment=..., is a multirun: add -m)"
    return message


def _raised_in(exc: BaseException, functions: tuple[str, ...]) -> bool:
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_name in functions:
            return True
        tb = tb.tb_next
    return False


def _raise_site(exc: BaseException) -> str | None:
    """The name of the function that raised ``exc`` (the innermost frame of its traceback)."""
    tb = exc.__traceback__
    if tb is None:
        return None
    while tb.tb_next is not None:
        tb = tb.tb_next
    return tb.tb_frame.f_code.co_name


def _top_level_message(exc: BaseException) -> str | None:
    """The one line for an exception that ended a Hydra entrypoint, or None where it is not a user error."""
    hydra_msg = _hydra_message(exc)
    if hydra_msg is not None:
        return hydra_msg
    if isinstance(exc, ValueError) and _raise_site(exc) == "_run_hydra":
        return str(exc)  # Hydra's command-line flags that do not go together (-m with --cfg, --resolve alone)
    if _setup_errors:  # a setting a callback refused at the start: the cause of whatever failed after it
        return _setup_errors[0]
    label = getattr(exc, _JOB_ATTR, None)
    if label is not None:  # the failed multirun job that ended the sweep
        others = [other for other, _ in _failed_jobs if other != label]
        more = f"; {len(others)} more failed ({', '.join(o.split(' (')[0] for o in others)}, see above)" if others else ""
        return f"{label}: {_user_message(exc)}{more}"
    if isinstance(exc, LatticeLabError):
        return str(exc)
    if isinstance(exc, RuntimeError) and '"srun"' in str(exc) and shutil.which("srun") is None:
        return ('hydra/launcher=submitit_slurm (+launcher=slurm): no SLURM here ("srun" not found); submit from a '
                "SLURM login node, or run the jobs on this machine with +launcher=parallel or +launcher=local")
    if type(exc).__module__.startswith("sqlalchemy") and _raised_in(exc, ("get_storage",)):
        detail = str(exc).splitlines()[0] if str(exc) else ""
        return (f"hydra.sweeper.storage: the Optuna study storage cannot be opened ({type(exc).__name__}: {detail}); "
                "expected an SQLAlchemy URL of a database, e.g. sqlite:///runs/optuna.db")
    if _failed_jobs and isinstance(exc, ValueError) and _raised_in(exc, ("best_trial", "best_trials")):
        label, message = _failed_jobs[0]  # an Optuna sweep whose every trial failed has no best trial
        return f"every trial failed; {label}: {message}"
    return None


def _report_like_hydra(exc: BaseException) -> None:
    """Report ``exc`` as Hydra does without HYDRA_FULL_ERROR (its traceback without Hydra's frames) and exit 1."""
    try:
        from hydra._internal.utils import run_and_report
    except ImportError:  # pragma: no cover
        return

    def again():
        raise exc

    os.environ.pop("HYDRA_FULL_ERROR", None)  # the process ends here
    run_and_report(again)


# The user's own HYDRA_FULL_ERROR, for processes a run starts (demo stages, submitit jobs): they inherit the
# HYDRA_FULL_ERROR=1 that hydra_errors sets, which is not the user's.
_USER_FULL_ERROR = "LATTICE_LAB_USER_HYDRA_FULL_ERROR"


def _trusted_targets():
    """The Python targets this project's configs may name for Hydra to build (its sweep callback): Hydra 1.4
    warns at every sweep of a target built without a whitelist from the calling code (1.5 will refuse it);
    the project's own package is trusted, anything else is left to Hydra's check."""
    try:
        from hydra.utils import execution_whitelist
    except ImportError:  # a Hydra without execution checks
        return contextlib.nullcontext()
    return execution_whitelist(["lattice_lab.*"])


def hydra_errors(main):
    """Decorate a ``hydra.main`` function (outermost): the errors Hydra itself would print as several lines or a
    traceback, exit status 1, become one line ``error: ...`` and exit 2 where they are the user's (see the
    module docstring); Ctrl-C outside a job prints ``interrupted`` and exits 130.

    Hydra is asked to raise (``HYDRA_FULL_ERROR=1`` while ``main`` runs) so that the exception reaches this
    wrapper; other errors are then reported exactly as Hydra reports them, and a ``HYDRA_FULL_ERROR=1`` set by
    the user still shows their full traceback.
    """

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        outer = {key: os.environ.get(key) for key in ("HYDRA_FULL_ERROR", _USER_FULL_ERROR)}
        user_full_error = os.environ.get(_USER_FULL_ERROR, os.environ.get("HYDRA_FULL_ERROR", ""))

        def restore():
            for key, value in outer.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

        os.environ.update({"HYDRA_FULL_ERROR": "1", _USER_FULL_ERROR: user_full_error})
        _failed_jobs.clear()
        _setup_errors.clear()
        _received["signal"] = None
        try:
            with _sigterm_interrupts(), _trusted_targets():
                return main(*args, **kwargs)
        except KeyboardInterrupt:
            restore()
            _interrupted(None)
        except Exception as exc:  # noqa: BLE001 - sorted into user errors and the rest below
            restore()
            message = _top_level_message(exc)
            if message is None:
                if user_full_error != "1":
                    _report_like_hydra(exc)
                raise
            print(f"error: {message}", file=sys.stderr)
            sys.exit(EXIT_USER_ERROR)
        finally:
            restore()

    return wrapper
