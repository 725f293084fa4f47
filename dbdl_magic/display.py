"""The metric vocabulary and how numbers are shown: one place, importable by every layer.

A history row (one per iteration) holds facts (``epoch``, ``seconds``, ``samples``, ...) and
metrics, named ``<split>_<measure>``: ``train_loss``, ``val_accuracy``, ``val_rmse``. This module
decides which names are metrics, which direction is better, how values are written in tables and
what the one-line summary of a run says. It imports nothing but the standard library, so the
training loop, the policies and the notebook front all use the same rules.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Mapping
from typing import Any

TRAIN_PREFIX = "train_"
VALIDATION_PREFIX = "val_"
#: row keys that look like metrics but are timings
TIMINGS = frozenset({"train_seconds"})
#: measures where smaller is better (errors and losses); every other measure (accuracy, f1,
#: r2, ...) is better when larger
LOWER_IS_BETTER = frozenset({"loss", "mse", "rmse", "mae", "mape", "msle", "rmsle", "mad"})


# -- metric vocabulary ---------------------------------------------------------------------------
def is_metric(name: Any) -> bool:
    """``train_*`` / ``val_*`` names, except timings such as ``train_seconds``."""
    text = str(name)
    return text.startswith((TRAIN_PREFIX, VALIDATION_PREFIX)) and text not in TIMINGS


def is_validation(name: Any) -> bool:
    """True for a metric measured on the validation split (``val_*``)."""
    return is_metric(name) and str(name).startswith(VALIDATION_PREFIX)


def measure(name: Any) -> str:
    """The measure a metric name reports, without its split: ``val_rmse`` → ``rmse``."""
    text = str(name)
    for prefix in (TRAIN_PREFIX, VALIDATION_PREFIX):
        if text.startswith(prefix):
            return text[len(prefix):]
    return text


def lower_is_better(name: Any) -> bool:
    """Whether smaller values of metric ``name`` are better: losses and errors (``val_loss``,
    ``train_mse``, ``val_rmse``, ``val_huber_loss``, a bare ``mae``); False for scores."""
    word = measure(name).lower()
    return word in LOWER_IS_BETTER or word.rsplit("_", 1)[-1] in LOWER_IS_BETTER


def selection_mode(name: Any) -> str:
    """``"min"`` when smaller is better for metric ``name``, else ``"max"``."""
    return "min" if lower_is_better(name) else "max"


def metrics_of(row: Mapping[str, Any]) -> dict[str, Any]:
    """The metric entries of a history row, in its order (``train_loss``, ``val_*``; no
    timings or other facts)."""
    return {str(k): v for k, v in row.items() if is_metric(k)}


def ranking_metric(named: str | None, columns: Iterable[Any]) -> str | None:
    """The metric a leaderboard with ``columns`` is ranked by: ``named`` when it is one of them,
    else its first validation metric, else ``train_loss``; None when there is none."""
    names = [str(c) for c in columns]
    fallback = [c for c in names if is_validation(c)] + [f"{TRAIN_PREFIX}loss"]
    return next((c for c in [named, *fallback] if c and c in names), None)


# -- values --------------------------------------------------------------------------------------
def is_missing(value: Any) -> bool:
    """True for None, NaN, NaT and pandas' NA (whose comparisons are themselves missing);
    False for containers (a list of cohort members is a value)."""
    if value is None:
        return True
    try:
        return bool(value != value)
    except TypeError:  # pandas.NA: ``NA != NA`` is NA, which has no truth value
        return True
    except ValueError:  # an array: element-wise comparison, not a missing value
        return False


def is_real(value: Any) -> bool:
    """True for a number that is not NaN (bools excluded)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and value == value


def format_value(value: Any) -> str:
    """A value on a text line: floats to 4 places, anything else as ``str``."""
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def format_cell(value: Any, missing: str = "") -> str:
    """A table cell: floats to 4 places, ``missing`` for None/NaN/NA."""
    return missing if is_missing(value) else format_value(value)


def workers_text(workers: Any) -> str:
    """``"2 worker(s)"``, or ``"auto workers"`` when the engine picks the count."""
    return f"{workers} worker(s)" if isinstance(workers, int) else f"{workers} workers"


def better_text(mode: str | None) -> str:
    """``"higher is better"`` for mode ``"max"``, else ``"lower is better"``."""
    return f"{'higher' if mode == 'max' else 'lower'} is better"


def short_error(error: BaseException | str) -> str:
    """One line naming an error: ``TypeName: first line of the message`` (at most 300 chars)."""
    if isinstance(error, str):
        text = error
    else:
        message = str(error).strip()
        text = f"{type(error).__name__}: {message}" if message else type(error).__name__
    lines = text.strip().splitlines()
    first = lines[0] if lines else "unknown error"
    return first if len(first) <= 300 else first[:299] + "…"


# -- the one-line summary of a run ---------------------------------------------------------------
def best_text(best: Mapping[str, Any], metric: str | None) -> str:
    """``"best: LABEL val_loss 0.123"``: the first line of a leaderboard (3 places)."""
    label = best.get("label", f"v{best.get('version', '?')}")
    value = best.get(metric) if metric else None
    return f"best: {label}" + (f" {metric} {float(value):.3f}" if is_real(value) else "")


def groups_text(groups: int) -> str:
    """``"3 groups"``: the cohort part of a per-group model's summary."""
    return f"{groups} groups"


def summary_line(
    name: Any,
    version: Any,
    status: str,
    iterations: int,
    last: Mapping[str, Any] | None = None,
    *,
    cohort: str | None = None,
    error: str | None = None,
) -> str:
    """One deterministic line: name, version, status, iterations, the ``last`` row's metrics
    rounded to 3 places, then ``cohort`` (:func:`best_text` / :func:`groups_text`) and
    ``error`` when given. It holds no timings, so the same run always gives the same line."""
    parts = [f"dbdl: model {name} v{version} {status}", f"{iterations} iteration(s)"]
    parts += [f"{k} {v:.3f}" for k, v in metrics_of(last or {}).items() if is_real(v)]
    parts += [p for p in (cohort, error) if p]
    return " | ".join(parts)


__all__ = [
    "LOWER_IS_BETTER",
    "TIMINGS",
    "TRAIN_PREFIX",
    "VALIDATION_PREFIX",
    "best_text",
    "better_text",
    "format_cell",
    "format_value",
    "groups_text",
    "is_metric",
    "is_missing",
    "is_real",
    "is_validation",
    "lower_is_better",
    "measure",
    "metrics_of",
    "ranking_metric",
    "selection_mode",
    "short_error",
    "summary_line",
    "workers_text",
]
