"""Model selection in one pass: the trials of a grid or random search, successive halving.

All trials train in the same aggregate queries (one member each), so every iteration reads the
data once for all of them; weak trials stop early at the halving rungs.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
from typing import Any

from dbdl_magic.display import lower_is_better
from dbdl_magic.errors import InputError, SpecError
from dbdl_magic.kernel.netbuild import SpecError as KernelSpecError
from dbdl_magic.options import LOG_SCALE, SEARCHABLE, TrainOptions, validate_option
from dbdl_magic.store.spec import parse_spec

MAX_TRIALS = 64


def trials(opts: TrainOptions) -> list[dict[str, Any]]:
    """The configurations to train: the grid's product, or ``trials`` random draws.

    ``grid`` maps searchable options (:data:`~dbdl_magic.options.SEARCHABLE`) to lists of
    values; with ``search="random"`` a value may also be a ``(low, high)`` tuple, drawn
    log-uniformly for the options the schema marks so (``lr``, ``weight_decay``). Every
    configuration is checked by the options' own rules. Empty when the run is not a search.
    """
    grid = opts.grid
    search = validate_option("search", opts.search)
    if not grid:
        if search is not None or opts.trials is not None:
            raise InputError(f"option search={search!r}/trials={opts.trials!r} needs grid={{...}}")
        return []
    unknown = [k for k in grid if k not in SEARCHABLE]
    if unknown:
        raise InputError(
            f"option grid: cannot search over {', '.join(map(repr, unknown))}; "
            f"searchable options: {', '.join(SEARCHABLE)}"
        )
    for name, values in grid.items():
        ranged = isinstance(values, tuple) and len(values) == 2 and search == "random"
        if not ranged and (not isinstance(values, (list, tuple)) or not values):
            raise InputError(f"option grid[{name!r}]: must be a non-empty list of values")
    if search in (None, "grid"):
        names, combos = list(grid), itertools.product(*grid.values())
        chosen = [dict(zip(names, combo, strict=True)) for combo in combos]
        if opts.trials is not None:
            chosen = random.Random(opts.seed).sample(chosen, min(opts.trials, len(chosen)))
    else:  # random
        if not opts.trials:
            raise InputError("option search='random' needs trials=N (how many configurations)")
        rng = random.Random(opts.seed)
        chosen = [{k: _draw(rng, k, v) for k, v in grid.items()} for _ in range(opts.trials)]
    if len(chosen) > MAX_TRIALS:
        raise InputError(
            f"option grid: {len(chosen)} configurations (at most {MAX_TRIALS}); "
            "pass trials=N to sample some, or search='random'"
        )
    for trial in chosen:
        trial_options(opts, trial)  # refuse a bad value now, naming it
        if "model" in trial:
            try:
                parse_spec(trial["model"])
            except (KernelSpecError, SpecError) as exc:
                raise SpecError(f"grid configuration {label(trial)}: {exc}") from exc
    return chosen


def _draw(rng: random.Random, name: str, values: Any) -> Any:
    if isinstance(values, tuple) and len(values) == 2 and all(
        isinstance(v, (int, float)) for v in values
    ):
        low, high = values
        if isinstance(low, int) and isinstance(high, int) and name not in LOG_SCALE:
            return rng.randint(low, high)
        if name in LOG_SCALE and low > 0 and high > 0:
            return math.exp(rng.uniform(math.log(low), math.log(high)))
        return rng.uniform(low, high)
    return rng.choice(list(values))


def trial_options(opts: TrainOptions, trial: dict[str, Any]) -> TrainOptions:
    """The run's options with one trial's values, validated (errors name the grid entry)."""
    changed = dataclasses.replace(opts, **trial)
    try:
        changed.validate()
    except InputError as exc:
        raise InputError(f"grid configuration {label(trial)}: {exc}") from exc
    return changed


def label(trial: dict[str, Any]) -> str:
    """``lr=0.01 batch_size=64``: how a trial is named in tables and the store."""

    def show(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.3g}"
        return value if isinstance(value, str) else str(value)

    return " ".join(f"{k}={show(v)}" for k, v in trial.items())


def halving_rungs(epochs: int, n_trials: int) -> list[int]:
    """Epochs after which the worse half of the live trials stops (successive halving).

    With ``K`` trials there are ``ceil(log2 K)`` rungs at ``epochs / 2**k``: each survivor
    round trains twice as long as the last, and one trial is left for the last stretch.
    """
    rounds = math.ceil(math.log2(n_trials)) if n_trials > 1 else 0
    rungs = sorted({max(1, epochs >> k) for k in range(1, rounds + 1)})
    return [r for r in rungs if r < epochs]


def maximize(metric: str) -> bool:
    """Whether larger is better for ``metric`` (accuracy, F1, R²) or smaller (losses, errors)."""
    return not lower_is_better(metric)


def rank(rows: dict[int, dict[str, Any]], metric: str) -> list[int]:
    """Member ids best first by ``metric`` (members without the metric go last)."""
    sign = -1.0 if maximize(metric) else 1.0

    def key(member: int) -> tuple[int, float, int]:
        value = rows[member].get(metric)
        if value is None or value != value:
            return (1, 0.0, member)
        return (0, sign * float(value), member)

    return sorted(rows, key=key)


__all__ = ["SEARCHABLE", "halving_rungs", "label", "maximize", "rank", "trial_options", "trials"]
