"""Training options: one schema, declared once; every other view of the options comes from it.

Each option of :func:`dbdl_magic.train` is one field of :class:`TrainOptions`: its name, type and
default, and (in :func:`option`) its help text, allowed values, its ``%%dbtrain`` flag, whether a
grid may search it, whether a resumed run must repeat it, the key of the training kernel's
config it becomes, and whether packing reads it. Generated from the schema:

- validation, once, where the options are built (:meth:`TrainOptions.from_kwargs`);
- the flags of ``%%dbtrain`` and ``dbdl demo`` (:func:`flag_arguments`, :func:`values_from_flags`);
- the keys compared on resume (:attr:`TrainOptions.RESUME_KEYS`), what a grid may search
  (:data:`SEARCHABLE`, :data:`LOG_SCALE`);
- the training kernel's config (:func:`kernel_config`) and what packing reads
  (:func:`pack_values`);
- the option list of ``dl.train``'s docstring and the README's options table
  (``python -m dbdl_magic.options --docstring`` / ``--readme-table`` / ``--update-readme``;
  tests/unit/test_options.py fails when either drifts from the schema).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import math
import numbers
import sys
import textwrap
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from dbdl_magic.errors import InputError
from dbdl_magic.kernel.averaging import AVERAGING
from dbdl_magic.kernel.blockstore import DEFAULT_BLOCK_BYTES
from dbdl_magic.kernel.limits import DEVICES, MAX_THREADS, OPTIMIZERS


class _Required:
    """The default of an option that has none (``target``)."""

    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()


@dataclass(frozen=True)
class Check:
    """A rule a value must pass beyond its type; ``rule`` completes "option x=v: ..."."""

    test: Callable[[Any], bool]
    rule: str


@dataclass(frozen=True)
class Option:
    """One training option. ``name``, ``type`` and ``default`` come from its field of
    :class:`TrainOptions`; the rest is declared in the field's metadata (:func:`about`)."""

    help: str
    choices: tuple[Any, ...] = ()
    check: Check | None = None
    flag: str | None = None
    searchable: bool = False
    log_scale: bool = False
    resume: bool = False
    kernel: str | None = None
    pack: bool = False
    normalize: Callable[[Any], Any] | None = None
    text: Callable[[str], Any] | None = None
    metavar: str | None = None
    name: str = ""
    type: Any = None
    default: Any = REQUIRED

    @property
    def optional(self) -> bool:
        """Whether None is a value of the option's type."""
        return type(None) in typing.get_args(self.type)

    @property
    def base(self) -> Any:
        """The type without ``| None``: what a flag's text is parsed as."""
        inner = [a for a in typing.get_args(self.type) if a is not type(None)]
        return inner[0] if self.optional and len(inner) == 1 else self.type

    def rule(self) -> str:
        """What a valid value is, as in "option epochs=0: must be an integer ≥ 1"."""
        if self.check is not None:
            text = self.check.rule
        elif self.choices:
            text = f"must be one of {', '.join(map(str, self.choices))}"
        else:
            return f"must be {_conform(None, self.type)[2]}"
        return text + (" (or None)" if self.optional and "None" not in text else "")

    def accept(self, value: Any) -> Any:
        """``value`` in canonical form (plain Python, normalized), or :class:`InputError`
        naming the option and what it accepts."""
        given = value
        if self.normalize is not None:
            value = self.normalize(value)
        ok, value, _ = _conform(value, self.type)
        if ok and value is not None:
            ok = (not self.choices or value in self.choices) and (
                self.check is None or self.check.test(value)
            )
        if not ok:
            raise InputError(f"option {self.name}={given!r}: {self.rule()}")
        return value


def about(help: str, **declared: Any) -> dict[str, Option]:
    """A field's metadata: its :class:`Option` (the field gives name, type and default)."""
    return {"option": Option(help=help, **declared)}


# -- value rules and spellings ------------------------------------------------------------------
def at_least(low: int, what: str = "an integer") -> Check:
    """``value ≥ low``."""
    return Check(lambda v: v >= low, f"must be {what} ≥ {low}")


def _lower(value: Any) -> Any:
    return value.lower() if isinstance(value, str) else value


def _count_or_auto(value: Any) -> Any:
    return int(value) if isinstance(value, str) and value.strip().isdigit() else value


def _shape(value: Any) -> Any:
    """``"8x8"`` / ``"8,8"`` → ``[8, 8]``; anything else unchanged (the type check names it)."""
    if not isinstance(value, str):
        return list(value) if isinstance(value, tuple) else value
    parts = [p.strip() for p in value.lower().replace("x", ",").split(",") if p.strip()]
    return [int(p) for p in parts] if parts and all(p.isdigit() for p in parts) else value


def _columns(text: str) -> list[str]:
    """``"a, b"`` → ``["a", "b"]`` (a flag's comma-separated list)."""
    return [c.strip() for c in text.split(",") if c.strip()]


def literal(text: str, what: str) -> Any:
    """A Python literal written in a flag (``--grid "{'lr': [1e-3, 1e-2]}"``)."""
    if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":
        text = text[1:-1]  # shell-style splitting may keep the quotes
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError) as exc:
        raise InputError(f"{what} {text!r}: not a variable or a Python literal ({exc})") from exc


def _grid_literal(text: str) -> Any:
    return literal(text, "--grid")


# -- the schema ----------------------------------------------------------------------------------
@dataclass
class TrainOptions:
    """Every option of :func:`dbdl_magic.train`, declared once (see the module docstring).

    Build with :meth:`from_kwargs`, which validates; unknown names are refused with the valid
    list. Plain construction does not validate (:meth:`validate` does).
    """

    target: str = field(metadata=about(
        "the label column to predict",
        check=Check(lambda v: bool(v.strip()),
                    "must be the label column's name (a non-empty string)"),
        flag="--target", metavar="COLUMN", resume=True, pack=True,
    ))
    model: Any = field(default="mlp:64,32", metadata=about(
        "`linear`, `mlp:64,32` (add `dropout=0.2`, `bn`, `ln`, `act=gelu`), `cnn:16,32` for an "
        "image column, a JSON spec `{\"layers\": [...]}`, or an `nn.Sequential` of supported "
        "layers (Linear, Conv1d/2d, BatchNorm1d/2d, LayerNorm, ReLU/GELU/ELU/SiLU/LeakyReLU/"
        "Tanh/Sigmoid/Softplus, Dropout, Flatten, Max/Avg/AdaptiveAvg pooling); only the JSON "
        "spec reaches the database, never pickled code",
        flag="--model", metavar="SPEC", searchable=True,
    ))
    epochs: int = field(default=10, metadata=about(
        "iterations: passes over the training rows",
        check=at_least(1), flag="--epochs",
    ))
    lr: float = field(default=1e-3, metadata=about(
        "learning rate",
        check=Check(lambda v: math.isfinite(v) and v > 0, "must be a positive number"),
        flag="--lr", searchable=True, log_scale=True, resume=True, kernel="optimizer.lr",
    ))
    batch_size: int = field(default=64, metadata=about(
        "rows per minibatch",
        check=at_least(1), flag="--batch-size", searchable=True, resume=True,
        kernel="batch_size", pack=True,
    ))
    optimizer: str = field(default="adam", metadata=about(
        "the optimizer", choices=OPTIMIZERS, normalize=_lower,
        flag="--optimizer", searchable=True, resume=True, kernel="optimizer.name",
    ))
    momentum: float = field(default=0.0, metadata=about(
        "momentum (sgd)",
        check=at_least(0, "a number"),
        flag="--momentum", searchable=True, resume=True, kernel="optimizer.momentum",
    ))
    nesterov: bool = field(default=False, metadata=about(
        "Nesterov momentum (sgd with momentum > 0)",
        flag="--nesterov", resume=True, kernel="optimizer.nesterov",
    ))
    weight_decay: float | None = field(default=None, metadata=about(
        "L2 penalty (None: the optimizer's own, 0.01 for adamw, else 0)",
        check=at_least(0, "a number"),
        flag="--weight-decay", searchable=True, log_scale=True, resume=True,
        kernel="optimizer.weight_decay",
    ))
    validation: float | None = field(default=0.2, metadata=about(
        "fraction of the rows held out for validation",
        check=Check(lambda v: 0 <= v < 1, "must be a fraction in [0, 1)"),
        flag="--validation", resume=True, pack=True,
    ))
    validation_query: str | None = field(default=None, metadata=about(
        "a second query whose rows are the validation set, instead of a fraction "
        "(%%dbtrain: a variable holding it, or the SQL)",
        flag="--validation-query", metavar="QUERY", resume=True,
    ))
    task: str = field(default="auto", metadata=about(
        "`auto` (text/bool or small-integer targets are classification), `classification` "
        "or `regression`",
        choices=("auto", "classification", "regression"), flag="--task", resume=True, pack=True,
    ))
    features: list[str] | None = field(default=None, metadata=about(
        "the feature columns (None: every column but the target and group_by; %%dbtrain: "
        "comma-separated)",
        check=Check(lambda v: len(v) > 0,
                    "must list at least one column (or be None for every column but the target)"),
        flag="--features", metavar="COLUMNS", text=_columns, resume=True, pack=True,
    ))
    impute: str | None = field(default=None, metadata=about(
        "`mean` or `zero` fills NULL numeric features (None: a NULL is an error naming the "
        "column)",
        choices=("mean", "zero"), flag="--impute", resume=True, pack=True,
    ))
    max_categories: int = field(default=100, metadata=about(
        "most distinct values of a text feature (one-hot encoded)",
        check=at_least(1), flag="--max-categories", resume=True, pack=True,
    ))
    image_shape: list[int] | None = field(default=None, metadata=about(
        "e.g. (8, 8) or '8x8' for a SQLite float32 BLOB column (PostgreSQL 2-D real[] arrays "
        "carry their shape)",
        normalize=_shape,
        check=Check(lambda v: all(s > 0 for s in v),
                    "must be positive sizes, e.g. (8, 8) or '8x8'"),
        flag="--image-shape", metavar="SHAPE", resume=True, pack=True,
    ))
    rows_per_buffer: int | None = field(default=None, metadata=about(
        "rows packed per buffer (None: chosen from the data and the model)",
        check=Check(lambda v: v >= 1,
                    "must be an integer ≥ 1 (or None to choose it from the data)"),
        flag="--rows-per-buffer", resume=True, pack=True,
    ))
    seed: int = field(default=0, metadata=about(
        "seed of the shuffle, split, initial weights and dropout: the same seed gives the same "
        "model",
        flag="--seed", resume=True, kernel="seed", pack=True,
    ))
    device: str = field(default="auto", metadata=about(
        "device of the returned module (`auto`: cuda when this machine has one)",
        choices=DEVICES, flag="--device",
    ))
    db_device: str = field(default="auto", metadata=about(
        "device of the kernels in the database (`auto`: a GPU when the database host's torch "
        "sees one)",
        choices=DEVICES, flag="--db-device", kernel="device",
    ))
    parallel: int | str = field(default="auto", metadata=about(
        "segments training side by side, N or `auto` (spread once a measured iteration says it "
        "pays): sessions held by the run on PostgreSQL, worker processes on SQLite",
        normalize=_count_or_auto,
        check=Check(lambda v: v == "auto" or (isinstance(v, int) and v >= 1),
                    "must be 'auto' or an integer ≥ 1 (the number of segments training in "
                    "parallel)"),
        flag="--parallel", metavar="N",
    ))
    sync_every: float | None = field(default=None, metadata=about(
        "combine the segments' models every this fraction of an epoch (e.g. 0.25: 4 times per "
        "epoch; None: 10 times for a model under 100k parameters on segments, else once)",
        check=Check(lambda v: 0 < v <= 1, "must be a fraction of an epoch in (0, 1] (e.g. 0.25 "
                    "averages 4 times per epoch)"),
        flag="--sync-every", resume=True,
    ))
    averaging: str = field(default="outer", metadata=about(
        "how segments' models become one at each sync: `mean` (sample-weighted average) or "
        "`outer` (the average's change as a pseudo-gradient of an outer Nesterov step)",
        choices=AVERAGING, normalize=_lower, flag="--averaging", resume=True,
        kernel="averaging",
    ))
    outer_lr: float = field(default=1.0, metadata=about(
        "outer step size with averaging='outer' (1 with momentum 0 is the plain average)",
        check=Check(lambda v: math.isfinite(v) and 0 < v <= 100, "must be a number in (0, 100]"),
        flag="--outer-lr", resume=True, kernel="outer_lr",
    ))
    outer_momentum: float = field(default=0.9, metadata=about(
        "outer Nesterov momentum with averaging='outer'",
        check=Check(lambda v: 0 <= v < 1, "must be a number in [0, 1)"),
        flag="--outer-momentum", resume=True, kernel="outer_momentum",
    ))
    threads: int | None = field(default=None, metadata=about(
        "torch threads per database process (capped at the server's cores)",
        check=Check(lambda v: 1 <= v <= MAX_THREADS,
                    f"must be an integer in [1, {MAX_THREADS}] (torch threads per database "
                    "process; the server uses at most its own number of cores)"),
        flag="--threads",
    ))
    group_by: str | None = field(default=None, metadata=about(
        "one model per value of this column, trained in the same queries",
        check=Check(lambda v: bool(v.strip()),
                    "must name the column whose values get one model each"),
        flag="--group-by", metavar="COLUMN", resume=True, pack=True,
    ))
    grid: dict[str, Any] | None = field(default=None, metadata=about(
        "model selection in one pass: {option: [values]} (random search: also (low, high)); "
        "%%dbtrain: a variable holding it, or a dict literal",
        flag="--grid", metavar="GRID", text=_grid_literal, resume=True,
    ))
    search: str | None = field(default=None, metadata=about(
        "`grid` (every configuration, the default with a grid) or `random` (draws `trials` "
        "of them)",
        choices=("grid", "random"),
        check=Check(lambda v: v in ("grid", "random"),
                    "must be 'grid' or 'random' (with grid={option: values})"),
        flag="--search", resume=True,
    ))
    trials: int | None = field(default=None, metadata=about(
        "configurations to draw (random search; with a grid: a sample of it)",
        check=Check(lambda v: v >= 1, "must be an integer ≥ 1 (configurations to draw)"),
        flag="--trials", resume=True,
    ))
    halving: bool = field(default=True, metadata=about(
        "successive halving: the worse half of the configurations stops at each rung",
        flag="--no-halving", resume=True,
    ))
    params: dict[str, Any] = field(default_factory=dict, metadata=about(
        "values bound to `:name` placeholders in the query, never pasted into SQL (%%dbtrain "
        "binds them from the notebook's variables)",
        resume=True,
    ))
    patience: int | None = field(default=None, metadata=about(
        "early stopping: iterations without improvement of `monitor` before stopping",
        check=Check(lambda v: v >= 1,
                    "must be an integer ≥ 1 (iterations without improvement before stopping)"),
        flag="--patience",
    ))
    monitor: str = field(default="val_loss", metadata=about(
        "the metric early stopping and model selection watch",
        flag="--monitor", metavar="METRIC",
    ))
    min_delta: float = field(default=0.0, metadata=about(
        "the least change of `monitor` that counts as an improvement",
        check=at_least(0, "a number"), flag="--min-delta",
    ))
    restore_best: bool = field(default=True, metadata=about(
        "after early stopping, the model is the best iteration's (not the last)",
        flag="--no-restore-best",
    ))
    on_interrupt: str = field(default="raise", metadata=about(
        "on Ctrl-C: `raise`, or `return` the last completed iteration's model (%%dbtrain "
        "always returns)",
        choices=("raise", "return"),
        check=Check(lambda v: v in ("raise", "return"),
                    "must be 'raise' or 'return' (return the last completed iteration's model)"),
    ))
    resume: bool = field(default=False, metadata=about(
        "continue the interrupted run of this name (same query and options)",
        flag="--resume",
    ))
    init_from: str | None = field(default=None, metadata=about(
        "warm start from a stored model: `name` or `name:version`",
        flag="--init-from", metavar="MODEL",
    ))
    freeze: Any = field(default=None, metadata=about(
        "with init_from: layer indices to freeze (e.g. [0, 2] or '0,2') or 'all_but_last'",
        flag="--freeze", metavar="LAYERS",
    ))
    block_bytes: int = field(default=DEFAULT_BLOCK_BYTES, metadata=about(
        "bytes per stored weight block (checkpoints share equal blocks)",
        check=Check(lambda v: 1 <= v < 2**31, "must be an integer in [1, 2**31)"),
    ))
    deltas: bool = field(default=True, metadata=about(
        "store a checkpoint's blocks as lossless deltas against the previous one",
    ))

    #: options that must be the same when a run is resumed (they shape data or updates)
    RESUME_KEYS: ClassVar[tuple[str, ...]]

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> TrainOptions:
        """Build and validate; an unknown keyword raises :class:`InputError` naming it."""
        unknown = sorted(set(kwargs) - set(OPTION))
        if unknown:
            hints = [
                f"{u!r} (did you mean {close[0]!r}?)" if close else repr(u)
                for u in unknown
                for close in [difflib.get_close_matches(u, OPTION, n=1)]
            ]
            raise InputError(
                f"unknown option(s) {', '.join(hints)}; valid options: {', '.join(sorted(OPTION))}"
            )
        missing = [o for o in OPTIONS if o.default is REQUIRED and kwargs.get(o.name) is None]
        if missing:
            o = missing[0]
            raise InputError(f"option {o.name} is required ({o.flag} in %%dbtrain): {o.help}")
        options = cls(**kwargs)
        options.validate()
        return options

    def validate(self) -> None:
        """Put every value in canonical form; raise :class:`InputError` naming the first bad
        option (its own rule, then the rules between options)."""
        for o in OPTIONS:
            setattr(self, o.name, o.accept(getattr(self, o.name)))
        if self.nesterov and not (self.optimizer == "sgd" and self.momentum > 0):
            raise InputError(
                f"option nesterov={self.nesterov!r}: needs optimizer='sgd' with momentum > 0"
            )

    def optimizer_config(self) -> dict[str, Any]:
        """The ``optimizer`` object of the kernel config (see :func:`kernel_config`)."""
        return dict(_kernel_values(self)["optimizer"])

    def to_json_dict(self) -> dict[str, Any]:
        """Options as stored with the model (the model spec is stored separately)."""
        data = dataclasses.asdict(self)
        data.pop("model")
        data["params"] = {k: repr(v) for k, v in self.params.items()}
        return data


def _declared() -> tuple[Option, ...]:
    """Each field's :class:`Option`, completed with the field's name, type and default."""
    hints = typing.get_type_hints(TrainOptions)
    out = []
    for f in dataclasses.fields(TrainOptions):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = REQUIRED
        out.append(dataclasses.replace(f.metadata["option"], name=f.name, type=hints[f.name],
                                       default=default))
    return tuple(out)


#: the schema, in declaration order
OPTIONS: tuple[Option, ...] = _declared()
OPTION: dict[str, Option] = {o.name: o for o in OPTIONS}
TrainOptions.RESUME_KEYS = tuple(o.name for o in OPTIONS if o.resume)
#: options a grid or random search may vary (``model`` is the architecture)
SEARCHABLE: tuple[str, ...] = tuple(o.name for o in OPTIONS if o.searchable)
#: searchable options a random search draws log-uniformly from a ``(low, high)`` range
LOG_SCALE: tuple[str, ...] = tuple(o.name for o in OPTIONS if o.log_scale)


def validate_option(name: str, value: Any) -> Any:
    """One option's value in canonical form, checked by the schema's rule for it."""
    return OPTION[name].accept(value)


# -- the kernel's config and packing --------------------------------------------------------------
def _kernel_values(opts: TrainOptions) -> dict[str, Any]:
    """The options that reach the kernel, under their config keys (``optimizer.lr`` nests).
    A None value is left out: its meaning is the kernel's (weight_decay None: the optimizer's
    own)."""
    out: dict[str, Any] = {}
    for o in OPTIONS:
        value = getattr(opts, o.name)
        if o.kernel is None or value is None:
            continue
        *path, key = o.kernel.split(".")
        target = out
        for part in path:
            target = target.setdefault(part, {})
        target[key] = value
    return out


def kernel_config(
    opts: TrainOptions,
    *,
    spec: dict[str, Any],
    input_shape: list[int],
    n_outputs: int,
    task: str,
    byteorder: str,
    target_scale: list[float],
    run: str,
    freeze: list[int],
    epoch: int,
) -> dict[str, Any]:
    """The training kernel's config of one model: every option that has a kernel key
    (``batch_size``, ``seed``, ``device`` from ``db_device``, ``optimizer`` {name, lr, momentum,
    nesterov, weight_decay}), plus what the run derives from the data and the model: the spec,
    the encoding's ``input_shape``, ``n_outputs`` and resolved ``task``, the backend's
    ``byteorder``, the target's ``[mean, std]``, the run's token, the frozen layer indices and
    the epoch. Every value is explicit: the kernel restates no option's default."""
    return {
        "spec": spec,
        "input_shape": list(input_shape),
        "n_outputs": int(n_outputs),
        "task": task,
        "byteorder": byteorder,
        "target_scale": list(target_scale),
        "run": run,
        "freeze": list(freeze),
        "epoch": int(epoch),
        **_kernel_values(opts),
    }


def pack_values(opts: TrainOptions, trials: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """The options packing reads (``PackOptions(**pack_values(opts, trials))``). ``batch_size``
    is the largest of the run's and its trials' (buffers hold whole batches of each)."""
    values = {o.name: getattr(opts, o.name) for o in OPTIONS if o.pack}
    values["batch_size"] = max([opts.batch_size, *(t.get("batch_size", 0) for t in trials)])
    return values


# -- flags of %%dbtrain and dbdl demo -------------------------------------------------------------
def flag_arguments(exclude: Sequence[str] = ()) -> list[tuple[tuple[str, ...], dict[str, Any]]]:
    """``(flags, argparse keywords)`` of every option that has a flag, in schema order.

    A flag's value lands on its option's name and is None when the flag is absent (the
    option's default then applies where the options are built). A bool option's flag sets the
    opposite of its default (``--nesterov``, ``--no-halving``); a value is parsed as the
    option's type (``int``/``float``), else kept as text for :func:`values_from_flags`.
    """
    out: list[tuple[tuple[str, ...], dict[str, Any]]] = []
    for o in OPTIONS:
        if o.flag is None or o.name in exclude:
            continue
        kwargs: dict[str, Any] = {"dest": o.name, "default": None, "help": _flag_help(o)}
        if o.base is bool:
            kwargs.update(action="store_const", const=not o.default)
        else:
            kwargs["type"] = o.base if o.base in (int, float) else str
            words = [c for c in o.choices if isinstance(c, str)]
            if words:
                kwargs["choices"] = words
            elif o.metavar:
                kwargs["metavar"] = o.metavar
        out.append(((o.flag,), kwargs))
    return out


def _flag_help(o: Option) -> str:
    text = o.help.replace("%", "%%")  # argparse formats help with %
    if o.base is bool and o.default:
        return f"{text} (on by default; this flag turns it off)"
    if o.default is REQUIRED or o.base is bool or o.default is None:
        return text
    return f"{text} (default: {_show(o.default)})"


def values_from_flags(
    parsed: Any, readers: Mapping[str, Callable[[str], Any]] | None = None
) -> dict[str, Any]:
    """Option values from parsed flags (:func:`flag_arguments`): the flags given, their text
    read by ``readers[name]`` or the option's own reader (``--features a,b`` → a list)."""
    readers = readers or {}
    out: dict[str, Any] = {}
    for o in OPTIONS:
        value = getattr(parsed, o.name, None) if o.flag else None
        if value is None:
            continue
        read = readers.get(o.name) or o.text
        out[o.name] = read(value) if read is not None and isinstance(value, str) else value
    return out


# -- documentation -------------------------------------------------------------------------------
README_BEGIN = (
    "<!-- options-table: generated from dbdl_magic/options.py "
    "(python -m dbdl_magic.options --update-readme README.md);"
    " tests/unit/test_options.py checks it -->"
)
README_END = "<!-- /options-table -->"


def _show(value: Any) -> str:
    if value is REQUIRED:
        return "required"
    return f'"{value}"' if isinstance(value, str) else repr(value)


def _meaning(o: Option) -> str:
    notes = []
    if o.searchable:
        notes.append("a `grid` may search it")
    return "; ".join([o.help, *notes])


def readme_table() -> str:
    """The README's table of the options of ``dl.train`` (between its markers)."""
    lines = ["| option | default | `%%dbtrain` | meaning |", "|---|---|---|---|"]
    for o in OPTIONS:
        flag = f"`{o.flag}`" if o.flag else ""
        meaning = _meaning(o).replace("|", "\\|")
        default = "required" if o.default is REQUIRED else f"`{_show(o.default)}`"
        lines.append(f"| `{o.name}` | {default} | {flag} | {meaning} |")
    return "\n".join(lines)


def docstring_options(width: int = 92) -> str:
    """The option list of ``dl.train``'s docstring (unindented)."""
    out = []
    for o in OPTIONS:
        head = f"``{o.name}``" if o.default is REQUIRED else f"``{o.name}={_show(o.default)}``"
        out.append(textwrap.fill(f"- {head}: {_meaning(o)}", width=width,
                                 subsequent_indent="  ", break_on_hyphens=False))
    return "\n".join(out)


def update_readme(path: Path) -> bool:
    """Replace the table between the README's markers; True when it changed."""
    text = path.read_text(encoding="utf-8")
    begin, end = text.index(README_BEGIN) + len(README_BEGIN), text.index(README_END)
    new = f"{text[:begin]}\n{readme_table()}\n{text[end:]}"
    if new != text:
        path.write_text(new, encoding="utf-8")
    return new != text


# -- type conformance ----------------------------------------------------------------------------
def _conform(value: Any, hint: Any) -> tuple[bool, Any, str]:
    """``(ok, value converted to plain Python, rule)`` for ``value`` against a type hint."""
    if hint is Any:
        return True, value, "anything"
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        inner = [a for a in args if a is not type(None)]
        rule = " or ".join(_conform(None, a)[2] for a in inner)
        rule += " (or None)" if type(None) in args else ""
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


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m dbdl_magic.options``: print the README table or the docstring list, or
    update the README's table in place."""
    parser = argparse.ArgumentParser(prog="python -m dbdl_magic.options", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--readme-table", action="store_true", help="print the README table")
    what.add_argument("--docstring", action="store_true", help="print dl.train's option list")
    what.add_argument("--update-readme", metavar="README", type=Path,
                      help="rewrite the table between the README's markers")
    args = parser.parse_args(argv)
    if args.update_readme:
        changed = update_readme(args.update_readme)
        print(f"{args.update_readme}: {'updated' if changed else 'already in sync'}")
    else:
        print(readme_table() if args.readme_table else docstring_options())
    return 0


if __name__ == "__main__":
    sys.exit(main())
