"""The rules a training run applies: early stopping and successive halving between iterations
(the hooks in :mod:`dbdl_magic.training.hooks` apply them), and the warm-start rules (which
encoding a fine-tune uses, which layers it freezes)."""

from __future__ import annotations

import math
from typing import Any

from dbdl_magic.data.encoding import Encoding
from dbdl_magic.display import lower_is_better, metrics_of
from dbdl_magic.errors import InputError
from dbdl_magic.kernel.netbuild import build_network
from dbdl_magic.options import TrainOptions
from dbdl_magic.training.selection import rank


class EarlyStopping:
    """Stop when ``monitor`` has not improved by ``min_delta`` for ``patience`` iterations."""

    def __init__(self, opts: TrainOptions) -> None:
        self.monitor, self.patience, self.min_delta = opts.monitor, opts.patience, opts.min_delta
        self.maximize = not lower_is_better(self.monitor)
        self.best: float | None = None
        self.best_iteration = -1
        self.waited = 0

    def update(self, row: dict[str, Any]) -> bool:
        """Record an iteration's row; True when training should stop."""
        if self.monitor not in row:
            metrics = list(metrics_of(row))
            raise InputError(
                f"monitor={self.monitor!r} is not a metric of this run; use one of "
                f"{', '.join(metrics)}"
            )
        value = float(row[self.monitor])
        sign = 1.0 if self.maximize else -1.0
        if self.best is None or sign * (value - self.best) > self.min_delta:
            self.best, self.best_iteration, self.waited = value, int(row["epoch"]), 0
            return False
        self.waited += 1
        return self.waited >= (self.patience or 0)


def survivors(rows: dict[int, dict[str, Any]], metric: str) -> set[int]:
    """Successive halving at a rung: the better half (at least one) of the members whose
    latest ``rows`` are given, ranked by ``metric``."""
    ranked = rank(rows, metric)
    return set(ranked[: max(1, math.ceil(len(ranked) / 2))])


def warm_encoding(new: Encoding, source: Encoding, init_from: str) -> Encoding:
    """The source model's feature encoding (and its target, when the labels are the same)."""
    missing = [f for f in source.feature_names() if f not in new.feature_names()]
    if missing:
        raise InputError(
            f"init_from={init_from!r}: the query lacks the source model's feature column(s) "
            f"{', '.join(map(repr, missing))}"
        )
    same_target = (
        new.target.task == source.target.task and new.target.classes == source.target.classes
    )
    return Encoding(
        features=source.features,
        target=source.target if same_target else new.target,
        impute=source.impute,
    )


def frozen_layers(freeze: Any, spec: dict[str, Any], enc: Encoding) -> list[int]:
    """Layer indices to freeze: a list/"0,2" of indices, or "all_but_last" (the head trains)."""
    if freeze in (None, "", False, []):
        return []
    net = build_network(spec, enc.input_shape, enc.target.n_outputs)
    with_params = [i for i, m in enumerate(net) if any(True for _ in m.parameters())]
    if freeze == "all_but_last":
        return with_params[:-1]
    items = freeze.split(",") if isinstance(freeze, str) else list(freeze)
    try:
        indices = [int(i) for i in items]
    except (TypeError, ValueError) as exc:
        raise InputError(f"freeze={freeze!r}: give layer indices or 'all_but_last'") from exc
    bad = [i for i in indices if i not in with_params]
    if bad:
        raise InputError(
            f"freeze={freeze!r}: layer(s) {bad} have no weights; layers with weights: {with_params}"
        )
    return indices
