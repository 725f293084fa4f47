"""Training options: one validated dataclass, shared by the API, the magics and the accessor."""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dbdl_magic.errors import InputError
from dbdl_magic.kernel.limits import MAX_THREADS
from dbdl_magic.kernel.train import OPTIMIZERS


@dataclass
class TrainOptions:
    """Every option of :func:`dbdl_magic.train`. Unknown names are refused with the valid list."""

    target: str
    model: Any = "mlp:64,32"
    epochs: int = 10
    lr: float = 1e-3
    batch_size: int = 64
    optimizer: str = "adam"
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float | None = None
    validation: float | None = 0.2
    validation_query: str | None = None
    task: str = "auto"
    features: list[str] | None = None
    impute: str | None = None
    max_categories: int = 100
    image_shape: list[int] | None = None
    rows_per_buffer: int | None = None
    seed: int = 0
    device: str = "auto"
    db_device: str = "auto"
    # scale-out: PostgreSQL parallel workers as segments ("auto" estimates the count), weight
    # averaging more than once per epoch, one model per group, model selection in one pass
    parallel: int | str = "auto"
    sync_every: float | None = None
    threads: int | None = None
    group_by: str | None = None
    grid: dict[str, Any] | None = None
    search: str | None = None
    trials: int | None = None
    halving: bool = True
    params: dict[str, Any] = field(default_factory=dict)
    # early stopping (on when ``patience`` is set) and what Ctrl-C does
    patience: int | None = None
    monitor: str = "val_loss"
    min_delta: float = 0.0
    restore_best: bool = True
    on_interrupt: str = "raise"
    resume: bool = False
    # warm start / fine-tuning: start from a stored model, optionally freezing layers
    init_from: str | None = None
    freeze: Any = None
    # block store: block size and lossless deltas against the previous checkpoint
    block_bytes: int = 256 * 1024 - 1024
    deltas: bool = True

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> TrainOptions:
        """Build and validate; an unknown keyword raises :class:`InputError` naming it."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            hints = [
                f"{u!r} (did you mean {close[0]!r}?)" if close else repr(u)
                for u in unknown
                for close in [difflib.get_close_matches(u, names, n=1)]
            ]
            raise InputError(
                f"unknown option(s) {', '.join(hints)}; valid options: {', '.join(sorted(names))}"
            )
        if "target" not in kwargs or not kwargs["target"]:
            raise InputError("the 'target' option (the label column) is required")
        if not isinstance(kwargs["target"], str):
            raise InputError(
                f"option target={kwargs['target']!r}: must be the label column's name (a string)"
            )
        options = cls(**kwargs)
        options.validate()
        return options

    def validate(self) -> None:
        """Raise :class:`InputError` naming the first bad option."""

        def need(ok: bool, option: str, rule: str) -> None:
            if not ok:
                raise InputError(f"option {option}={getattr(self, option)!r}: {rule}")

        self._check_types()
        self.optimizer = self.optimizer.lower()
        need(isinstance(self.epochs, int) and self.epochs >= 1, "epochs", "must be an integer ≥ 1")
        need(
            isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0,
            "lr",
            "must be a positive number",
        )
        need(
            isinstance(self.batch_size, int) and self.batch_size >= 1,
            "batch_size",
            "must be an integer ≥ 1",
        )
        need(
            str(self.optimizer).lower() in OPTIMIZERS,
            "optimizer",
            f"must be one of {', '.join(OPTIMIZERS)}",
        )
        need(self.momentum >= 0, "momentum", "must be ≥ 0")
        need(self.weight_decay is None or self.weight_decay >= 0, "weight_decay", "must be ≥ 0")
        need(
            not self.nesterov or (self.optimizer == "sgd" and self.momentum > 0),
            "nesterov",
            "needs optimizer='sgd' with momentum > 0",
        )
        need(
            self.validation is None or 0 <= float(self.validation) < 1,
            "validation",
            "must be a fraction in [0, 1)",
        )
        need(self.device in ("auto", "cpu", "cuda"), "device", "must be auto, cpu or cuda")
        need(self.db_device in ("auto", "cpu", "cuda"), "db_device", "must be auto, cpu or cuda")
        if isinstance(self.parallel, str) and self.parallel.strip().isdigit():
            self.parallel = int(self.parallel)
        need(
            self.parallel == "auto" or (isinstance(self.parallel, int) and self.parallel >= 1),
            "parallel",
            "must be 'auto' or an integer ≥ 1 (the number of segments training in parallel)",
        )
        need(
            self.sync_every is None or 0 < self.sync_every <= 1,
            "sync_every",
            "must be a fraction of an epoch in (0, 1] (e.g. 0.25 averages 4 times per epoch)",
        )
        need(
            self.group_by is None or bool(self.group_by.strip()),
            "group_by",
            "must name the column whose values get one model each",
        )
        need(
            self.search in (None, "grid", "random"),
            "search",
            "must be 'grid' or 'random' (with grid={option: values})",
        )
        need(
            self.trials is None or self.trials >= 1,
            "trials",
            "must be an integer ≥ 1 (configurations to draw)",
        )
        need(
            self.threads is None
            or (isinstance(self.threads, int) and 1 <= self.threads <= MAX_THREADS),
            "threads",
            f"must be an integer in [1, {MAX_THREADS}] (torch threads per database process; "
            "the server uses at most its own number of cores)",
        )
        need(
            isinstance(self.max_categories, int) and self.max_categories >= 1,
            "max_categories",
            "must be an integer ≥ 1",
        )
        need(
            self.rows_per_buffer is None or self.rows_per_buffer >= 1,
            "rows_per_buffer",
            "must be an integer ≥ 1 (or None to choose it from the data)",
        )
        need(
            self.impute in (None, "mean", "zero"),
            "impute",
            "must be None, 'mean' or 'zero' (the value that replaces NULL features)",
        )
        need(
            self.features is None or len(self.features) > 0,
            "features",
            "must list at least one column (or be None for every column but the target)",
        )
        need(
            self.on_interrupt in ("raise", "return"),
            "on_interrupt",
            "must be 'raise' or 'return' (return the last completed iteration's model)",
        )
        need(
            self.patience is None or (isinstance(self.patience, int) and self.patience >= 1),
            "patience",
            "must be an integer ≥ 1 (iterations without improvement before stopping)",
        )
        need(self.min_delta >= 0, "min_delta", "must be ≥ 0")
        need(
            self.task in ("auto", "classification", "regression"),
            "task",
            "must be auto, classification or regression",
        )
        if self.image_shape is not None:
            shape = self.image_shape
            if isinstance(shape, str):
                parts = [s.strip() for s in shape.lower().replace("x", ",").split(",")]
                need(
                    all(p.isdigit() for p in parts if p),
                    "image_shape",
                    "must be positive sizes, e.g. (8, 8) or '8x8'",
                )
                shape = [int(p) for p in parts if p]
            need(
                all(isinstance(s, int) and s > 0 for s in shape),
                "image_shape",
                "must be positive sizes, e.g. (8, 8)",
            )
            self.image_shape = list(shape)

    def _check_types(self) -> None:
        """Refuse values of the wrong type naming the option; numpy scalars become Python ones."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "image_shape" and isinstance(value, str):
                continue  # "8x8", parsed in validate()
            ok, converted, rule = _conform(value, hints[f.name])
            if not ok:
                raise InputError(f"option {f.name}={value!r}: must be {rule}")
            setattr(self, f.name, converted)

    def optimizer_config(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.optimizer.lower(), "lr": float(self.lr)}
        if self.optimizer == "sgd":
            out.update(momentum=self.momentum, nesterov=self.nesterov)
        if self.weight_decay is not None:
            out["weight_decay"] = float(self.weight_decay)
        return out

    def to_json_dict(self) -> dict[str, Any]:
        """Options as stored with the model (the model spec is stored separately)."""
        data = dataclasses.asdict(self)
        data.pop("model")
        data["params"] = {k: repr(v) for k, v in self.params.items()}
        return data

    #: options that must be the same when a run is resumed (they shape data or updates)
    RESUME_KEYS = (
        "target",
        "features",
        "task",
        "validation",
        "validation_query",
        "impute",
        "max_categories",
        "image_shape",
        "rows_per_buffer",
        "seed",
        "lr",
        "batch_size",
        "optimizer",
        "momentum",
        "nesterov",
        "weight_decay",
        "params",
        "group_by",
        "sync_every",
        "grid",
        "search",
        "trials",
        "halving",
    )


def _conform(value: Any, hint: Any) -> tuple[bool, Any, str]:
    """``(ok, value converted to plain Python, rule)`` for ``value`` against a type hint."""
    if hint is Any:
        return True, value, "anything"
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        inner = [a for a in args if a is not type(None)]
        rule = " or ".join(_conform(None, a)[2] for a in inner) + " (or None)"
        if value is None and type(None) in args:
            return True, None, rule
        for a in inner:
            ok, converted, _ = _conform(value, a)
            if ok:
                return True, converted, rule
        return False, value, rule
    origin = typing.get_origin(hint) or hint
    if origin is bool:
        ok = isinstance(value, (bool, np.bool_))
        return ok, bool(value) if ok else value, "True or False"
    if origin is int:
        ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
        return ok, int(value) if ok else value, "an integer"
    if origin is float:
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
        return ok, float(value) if ok else value, "a number"
    if origin is str:
        return isinstance(value, str), value, "a string"
    if origin is list:
        item = args[0] if args else Any
        plural = {str: "strings", int: "integers", float: "numbers"}.get(item)
        rule = f"a list of {plural}" if plural else "a list"
        if not isinstance(value, (list, tuple)):
            return False, value, rule
        converted = []
        for v in value:
            ok, c, _ = _conform(v, item)
            if not ok:
                return False, value, rule
            converted.append(c)
        return True, converted, rule
    if origin is dict:
        ok = isinstance(value, Mapping)
        return ok, dict(value) if ok else value, "a dict"
    return True, value, str(hint)
