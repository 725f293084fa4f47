"""Entry points called by the PL/Python functions that ``kernels/postgres/install.sql`` creates.

Every function here is safe in a parallel worker: no SPI (``plpy.execute`` and friends), all
inputs arrive as arguments. ``GD`` is PL/Python's per-backend dict; it caches the live model
between calls so that the state is decoded only when it did not come from this process.

Any role allowed to call the SQL functions may send anything, so every entry point checks its
arguments and reports a failure as a :class:`~dbdl_magic.kernel.errors.KernelError` naming the
function (see :func:`~dbdl_magic.kernel.errors.clean_errors`), never as torch's own exception.
Limits: see :mod:`dbdl_magic.kernel.limits`.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from typing import Any

from dbdl_magic.kernel import KERNEL_VERSION, averaging
from dbdl_magic.kernel.errors import DataError, clean_errors
from dbdl_magic.kernel.evaluate import (
    Evaluator,
    combine_stats,
    metrics_json,
    parse_config,
    stats_from_bytes,
    stats_length,
    stats_to_bytes,
)
from dbdl_magic.kernel.limits import max_parameters
from dbdl_magic.kernel.predict import (
    FLOAT4,
    FLOAT8,
    INT4,
    array_image,
    batch_outputs,
    predict_buffer,
    score_rows,
)
from dbdl_magic.kernel.state import combine_states, state_info
from dbdl_magic.kernel.train import Trainer

Notice = Callable[[str], None]


# One aggregate query may train several models (one per group or per hyper-parameter
# configuration), each with its own config, interleaved row by row: live objects are cached per
# (run, member), so a member's entry is replaced when its next iteration starts.
_CACHE_LIMIT = 256


def _member_key(config: dict[str, Any]) -> str:
    return f"{config.get('run', '')}:{config.get('member', 0)}"


def _cache(GD: dict[str, Any], name: str) -> dict[str, Any]:
    cache = GD.setdefault(name, {})
    if len(cache) > _CACHE_LIMIT:  # a new run's configs: forget the old ones
        cache.clear()
    return cache


_CONFIG_CACHE_CHARS = 1 << 16  # longer config texts are parsed every time, never kept


def _config(GD: dict[str, Any], text: str) -> dict[str, Any]:
    cache = _cache(GD, "dbdl_configs")
    config = cache.get(text) if isinstance(text, str) else None
    if config is None:
        config = parse_config(text)
        if len(text) <= _CONFIG_CACHE_CHARS:
            cache[text] = config
    return config


def _keep(cache: dict[str, Any], key: str, entry: tuple[bytes, Any]) -> None:
    """Cache a live trainer/evaluator; the cached networks together stay within the server's
    parameter limit (older entries are dropped), so a caller cycling through run/member keys
    cannot pile up models in this process."""
    cache.pop(key, None)
    total = sum(e[1].plan.parameters for e in cache.values()) + entry[1].plan.parameters
    if total > max_parameters():
        cache.clear()
    cache[key] = entry


@clean_errors("dbdl.train")
def train_transition(
    GD: dict[str, Any],
    state: bytes | None,
    x: bytes,
    y: bytes,
    buffer_id: int,
    model: bytes,
    config_text: str,
    notice: Notice | None = None,
) -> bytes:
    """SGD over one buffer. ``state`` is None on the first buffer of each worker."""
    config = _config(GD, config_text)
    if buffer_id is None:
        raise DataError("buffer_id is NULL")
    trainers = _cache(GD, "dbdl_trainers")
    cached = trainers.get(_member_key(config))
    if state is None:
        trainer = Trainer(config, model, fresh=True)
    elif cached is not None and cached[0] == state and cached[1].config is config:
        trainer = cached[1]
    else:
        trainer = Trainer(config, state, fresh=False)
    progress = None
    if notice is not None and config.get("progress", True):
        base, pid, run = trainer.samples, os.getpid(), config.get("run", "")
        member = int(config.get("member", 0))

        def progress(done: int) -> None:
            report = {"run": run, "pid": pid, "member": member, "samples": base + done}
            notice(f"dbdl-progress {json.dumps(report)}")

    trainer.train_buffer(x, y, int(buffer_id), progress, float(config.get("progress_every", 0.5)))
    out = trainer.to_bytes()
    _keep(trainers, _member_key(config), (out, trainer))
    return out


@clean_errors("dbdl.train_combine")
def train_combine(a: bytes | None, b: bytes | None) -> bytes | None:
    """Sample-weighted model averaging of two partial states."""
    return combine_states(a, b)


@clean_errors("dbdl.warm_up")
def warm_up() -> str:
    """Pay this process's lazy imports now (a segment opening); returns the seconds taken."""
    from dbdl_magic.kernel.train import warm_up as warm

    return f"{warm():.3f}"


@clean_errors("dbdl.outer_step")
def outer_step(GD: dict[str, Any], start: bytes, averaged: bytes, config_text: str) -> bytes:
    """The outer optimizer's step over a sync round's averaged state (see
    :mod:`~dbdl_magic.kernel.averaging`)."""
    return averaging.outer_step(start, averaged, _config(GD, config_text))


def _evaluator(GD: dict[str, Any], model: bytes, config: dict[str, Any]) -> Evaluator:
    evaluators = _cache(GD, "dbdl_evaluators")
    key = _member_key(config)
    cached = evaluators.get(key)
    if cached is not None and cached[0] == model and cached[1].config is config:
        return cached[1]
    evaluator = Evaluator(config, model)
    _keep(evaluators, key, (model, evaluator))
    return evaluator


@clean_errors("dbdl.evaluate")
def eval_transition(
    GD: dict[str, Any], acc: bytes | None, x: bytes, y: bytes, model: bytes, config_text: str
) -> bytes:
    """Add one buffer's loss and metric statistics."""
    config = _config(GD, config_text)
    evaluator = _evaluator(GD, model, config)
    previous = None if acc is None else stats_from_bytes(acc, stats_length(config))
    vector = evaluator.score_buffer(x, y, previous)
    return stats_to_bytes(vector)


@clean_errors("dbdl.eval_combine")
def eval_combine(a: bytes | None, b: bytes | None) -> bytes | None:
    """Partial statistics add."""
    return combine_stats(a, b)


@clean_errors("dbdl.metrics")
def metrics(acc: bytes | None, config_text: str) -> str:
    """Metrics JSON from the evaluate aggregate's statistics."""
    return metrics_json(acc, config_text)


@clean_errors("dbdl.predict_buffer")
def predict(GD: dict[str, Any], x: bytes, model: bytes, config_text: str) -> bytes:
    """Predictions for one packed feature buffer, as little-endian float32 (n × outputs)."""
    config = _config(GD, config_text)
    return predict_buffer(_evaluator(GD, model, config), x).astype("<f4").tobytes()


@clean_errors("dbdl.predict_batch")
def predict_batch(
    GD: dict[str, Any], x: bytes, model: bytes, config_text: str
) -> tuple[int, bytes | None, bytes | None, bytes | None]:
    """``(rows, labels, values, probabilities)`` of one buffer (raw values when the config has
    ``columns``, else packed rows), each output a PostgreSQL array image or None: class indices
    (``integer[]``) and, with ``proba``, probabilities class by class (``real[]``, every row's
    probability of class 0 first) for classification; values (``double precision[]``) for
    regression. One call per buffer, no Python object per value either way."""
    config = _config(GD, config_text)
    out = score_rows(_evaluator(GD, model, config), x, config)
    parts = batch_outputs(config, out)
    labels, values, proba = (parts.get(k) for k in ("labels", "values", "proba"))
    return (
        int(out.shape[0]),
        None if labels is None else array_image(labels, INT4),
        None if values is None else array_image(values, FLOAT8),
        None if proba is None else array_image(proba, FLOAT4),
    )


@clean_errors("dbdl.state_info")
def info(state: bytes) -> str:
    """Header of a training state as JSON."""
    return json.dumps(state_info(state))


#: Third-party modules the kernels import (some only when they need them, e.g. zstandard).
KERNEL_REQUIREMENTS = ("torch", "numpy", "safetensors", "zstandard")


def _unimportable() -> dict[str, str]:
    """Missing module → error, over the requirements and every ``dbdl_magic.kernel`` module."""
    import importlib
    import pkgutil

    package = __name__.rpartition(".")[0]
    own = [f"{package}.{m.name}" for m in pkgutil.iter_modules(sys.modules[package].__path__)]
    missing: dict[str, str] = {}
    for name in (*KERNEL_REQUIREMENTS, *own):
        try:
            importlib.import_module(name)
        except ImportError as exc:  # the module that is really missing, e.g. a kernel's import
            missing.setdefault(exc.name or name, f"{type(exc).__name__}: {exc}")
    return missing


def kernel_info() -> str:
    """What the server's Python can do: versions, device, interpreter.

    Imports every module the kernels use first; raises ImportError naming the ones missing
    (``cannot import: a, b``) so that a check fails here rather than in the middle of a run.
    """
    missing = _unimportable()
    if missing:
        raise ImportError(
            f"the dbdl kernels cannot import: {', '.join(missing)} ("
            + "; ".join(missing.values())
            + f"; sys.path = {sys.path})"
        )
    import numpy
    import safetensors
    import torch
    import zstandard

    return json.dumps(
        {
            "kernel_version": KERNEL_VERSION,
            "torch": torch.__version__,
            "numpy": numpy.__version__,
            "safetensors": safetensors.__version__,
            "zstandard": zstandard.__version__,
            "cuda": torch.cuda.is_available(),
            "python": sys.version.split()[0],
            "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
        }
    )


# -- storage routines (SPI; called only from PARALLEL UNSAFE functions, never in parallel plans)


def _required(**arguments: Any) -> None:
    """Refuse NULL arguments of the store routines, naming them."""
    missing = [name for name, value in arguments.items() if value is None]
    if missing:
        raise DataError(f"argument(s) {', '.join(missing)} must not be NULL")


def _pg_type(value: Any) -> str:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "bytea"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "bigint"
    return "text"


def spi_runner(plpy: Any, GD: dict[str, Any]) -> Callable[[str, Any], list[tuple[Any, ...]]]:
    """``run(sql, params)`` over SPI with cached prepared plans (``$1`` placeholders)."""
    plans = GD.setdefault("dbdl_plans", {})

    def run(sql: str, params: Any) -> list[tuple[Any, ...]]:
        params = list(params)
        types = [_pg_type(p) for p in params]
        key = (sql, tuple(types))
        plan = plans.get(key)
        if plan is None:
            plan = plans[key] = plpy.prepare(sql, types)
        result = plpy.execute(plan, params)
        try:
            cols = result.colnames()
        except Exception:  # a command without a result set
            return []
        if not cols:
            return []
        return [tuple(row[c] for c in cols) for row in result]

    return run


def _archiver(plpy: Any, GD: dict[str, Any], **kwargs: Any) -> Any:
    from dbdl_magic.kernel.blockstore import Archiver
    from dbdl_magic.kernel.catalog import POSTGRES

    return Archiver(spi_runner(plpy, GD), POSTGRES, **kwargs)


def archive(
    plpy: Any,
    GD: dict[str, Any],
    name: str,
    version: int,
    iteration: int,
    parent_name: str | None,
    parent_version: int | None,
    parent_iteration: int | None,
    block_bytes: int,
    deltas: bool,
) -> str:
    """Store a checkpoint as content-addressed blocks; JSON byte counts."""
    _required(name=name, version=version, iteration=iteration, block_bytes=block_bytes)
    if parent_name is not None:
        _required(parent_version=parent_version, parent_iteration=parent_iteration)
    if block_bytes < 1:
        raise DataError(f"block_bytes={block_bytes} must be positive")
    archiver = _archiver(plpy, GD, block_bytes=block_bytes, deltas=deltas)
    parent = None if parent_name is None else (parent_name, parent_version, parent_iteration)
    return json.dumps(archiver.archive(name, version, iteration, parent))


def materialize(plpy: Any, GD: dict[str, Any], name: str, version: int, iteration: int) -> None:
    """Rebuild a checkpoint's hot state from its blocks."""
    _required(name=name, version=version, iteration=iteration)
    _archiver(plpy, GD).materialize(name, version, iteration)


def release(plpy: Any, GD: dict[str, Any], name: str, version: int, iteration: int | None) -> int:
    """Drop block references of a model version (or one checkpoint) and collect garbage."""
    _required(name=name, version=version)
    return _archiver(plpy, GD).release(name, version, iteration)


def statement_stamp() -> Callable[[], tuple[int, int, int]] | None:
    """``stamp()``: what tells one SQL statement of this server process from the next, read
    from the server itself without a query: the transaction's and the statement's start times
    and the command id (which moves on after every change the transaction makes). None when
    the server does not export those functions to its extensions."""
    import ctypes

    try:
        server = ctypes.CDLL(None)
        xact = server.GetCurrentTransactionStartTimestamp
        statement = server.GetCurrentStatementStartTimestamp
        command = server.GetCurrentCommandId
    except (OSError, AttributeError):
        return None
    xact.restype = statement.restype = ctypes.c_int64
    xact.argtypes = statement.argtypes = []
    command.restype, command.argtypes = ctypes.c_uint32, [ctypes.c_bool]
    return lambda: (xact(), statement(), command(False))


def _store_runner(plpy: Any, GD: dict[str, Any]) -> Callable[[str, Any], list[tuple[Any, ...]]]:
    """SPI where the model store is (PostgreSQL, a Citus coordinator); on a Citus worker,
    which runs ``dbdl.predict`` inside the shard tasks of a distributed table and has no store,
    the coordinator's views read as the same role (:mod:`~dbdl_magic.kernel.coordinator`)."""
    from dbdl_magic.kernel import coordinator

    if coordinator.store_is_local(plpy) or not coordinator.is_citus_worker(plpy):
        return spi_runner(plpy, GD)
    return coordinator.coordinator_runner(plpy)


def row_predict(plpy: Any, GD: dict[str, Any], model: str, features: Any, mode: str) -> Any:
    """``dbdl.predict*(model, features)``: one row, features as JSON (by name) or an array.
    The model is looked up once per statement (see :func:`statement_stamp`)."""
    predictor = GD.get("dbdl_rows")
    if predictor is None:
        from dbdl_magic.kernel.catalog import POSTGRES
        from dbdl_magic.kernel.rowpredict import RowPredictor

        predictor = GD["dbdl_rows"] = RowPredictor(
            _store_runner(plpy, GD), POSTGRES, statement_stamp()
        )
    if model is None or features is None:
        _required(model=model, features=features)
    _, colon, version = str(model).partition(":")
    if colon and not version.isdigit():
        raise DataError(f"model {model[:100]!r}: the version after ':' must be a whole number")
    values = json.loads(features) if isinstance(features, str) else features
    label, value, proba = predictor.outputs(model, values, mode)
    if mode == "label":
        return str(label)
    return value if mode == "value" else proba
