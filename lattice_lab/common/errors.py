"""Exceptions that reach the user as one clear line (see :mod:`lattice_lab.common.cli`)."""


class LatticeLabError(Exception):
    """Base class: an error the user can fix; printed as one line, without traceback."""


class ConfigError(LatticeLabError, ValueError):
    """A configuration value is invalid. The message names the key and the bad value."""


class SimulationDiverged(LatticeLabError):
    """A dynamics run produced NaN/inf or runaway values; the last good state was saved."""


class DiskFull(LatticeLabError):
    """The output disk has no room for the next frame or checkpoint; the run stopped before writing
    anything incomplete, and the message says what was saved and how to continue."""


class Interrupted(LatticeLabError):
    """The user interrupted a run (Ctrl-C, SIGTERM) after it saved what it had; the message says where,
    and how to continue. Entrypoints print it as one line and exit 128 + ``signum`` (130 for Ctrl-C;
    :mod:`lattice_lab.common.cli`)."""

    def __init__(self, message: str, signum: int | None = None):
        super().__init__(message)
        self.signum = signum


def require(condition: bool, message: str) -> None:
    """Raise :class:`ConfigError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(message)


def number_or_nan(value) -> float:
    """``value`` as a float for a range check, NaN where it is no number (a string, None, a bool), so that
    ``not lo < number_or_nan(v) <= hi`` refuses those too and the caller names ``v`` in one ConfigError."""
    if isinstance(value, bool):
        return float("nan")
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def refuse_unknown_keys(section, known, name: str) -> None:
    """ConfigError naming the first key of the config ``section`` (a mapping, or None) that is not in
    ``known``, as ``<name>.<key>``: a typo added with ``+`` (``+dynamics.tempertaure=0.2``) would
    otherwise be ignored."""
    keys = list(section.keys()) if section is not None and hasattr(section, "keys") else []
    unknown = sorted(set(map(str, keys)) - set(known))
    if unknown:
        raise ConfigError(f"{name}.{unknown[0]}: no such setting ({name} has {', '.join(known)})")
