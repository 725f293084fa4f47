"""Entry points called by the PL/Python functions that ``kernels/postgres/install.sql`` creates.

Every function here is safe in a parallel worker: no SPI (``plpy.execute`` and friends), all
inputs arrive as arguments. ``GD`` is PL/Python's per-backend dict; it caches the live model
between calls so that the state is decoded only when it did not come from this process.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from typing import Any

from . import KERNEL_VERSION
from .evaluate import Evaluator, combine_stats, metrics_json, stats_to_bytes
from .predict import predict_buffer
from .state import combine_states, state_info
from .train import Trainer

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


def _config(GD: dict[str, Any], text: str) -> dict[str, Any]:
    cache = _cache(GD, "dbdl_configs")
    config = cache.get(text)
    if config is None:
        config = cache[text] = json.loads(text)
    return config


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
    trainers[_member_key(config)] = (out, trainer)
    return out


def train_combine(a: bytes | None, b: bytes | None) -> bytes | None:
    """Sample-weighted model averaging of two partial states."""
    return combine_states(a, b)


def _evaluator(GD: dict[str, Any], model: bytes, config: dict[str, Any]) -> Evaluator:
    evaluators = _cache(GD, "dbdl_evaluators")
    key = _member_key(config)
    cached = evaluators.get(key)
    if cached is not None and cached[0] == model and cached[1].config is config:
        return cached[1]
    evaluator = Evaluator(config, model)
    evaluators[key] = (model, evaluator)
    return evaluator


def eval_transition(
    GD: dict[str, Any], acc: bytes | None, x: bytes, y: bytes, model: bytes, config_text: str
) -> bytes:
    """Add one buffer's loss and metric statistics."""
    from .evaluate import stats_from_bytes

    config = _config(GD, config_text)
    evaluator = _evaluator(GD, model, config)
    vector = evaluator.score_buffer(x, y, None if acc is None else stats_from_bytes(acc))
    return stats_to_bytes(vector)


def eval_combine(a: bytes | None, b: bytes | None) -> bytes | None:
    """Partial statistics add."""
    return combine_stats(a, b)


def metrics(acc: bytes | None, config_text: str) -> str:
    """Metrics JSON from the evaluate aggregate's statistics."""
    return metrics_json(acc, config_text)


def predict(GD: dict[str, Any], x: bytes, model: bytes, config_text: str) -> bytes:
    """Predictions for one packed feature buffer, as little-endian float32 (n × outputs)."""
    config = _config(GD, config_text)
    return predict_buffer(_evaluator(GD, model, config), x).astype("<f4").tobytes()


def info(state: bytes) -> str:
    """Header of a training state as JSON."""
    return json.dumps(state_info(state))


def kernel_info() -> str:
    """What the server's Python can do: versions, device, interpreter."""
    import numpy
    import safetensors
    import torch

    return json.dumps(
        {
            "kernel_version": KERNEL_VERSION,
            "torch": torch.__version__,
            "numpy": numpy.__version__,
            "safetensors": safetensors.__version__,
            "cuda": torch.cuda.is_available(),
            "python": sys.version.split()[0],
            "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
        }
    )


# -- storage routines (SPI; called only from PARALLEL UNSAFE functions, never in parallel plans)
PG_TABLES = {t: f"dbdl.{t}" for t in ("blocks", "checkpoint_blocks", "checkpoints", "models")}


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
    from .blockstore import Archiver

    return Archiver(spi_runner(plpy, GD), PG_TABLES, **kwargs)


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
    archiver = _archiver(plpy, GD, block_bytes=block_bytes, deltas=deltas)
    parent = None if parent_name is None else (parent_name, parent_version, parent_iteration)
    return json.dumps(archiver.archive(name, version, iteration, parent))


def materialize(plpy: Any, GD: dict[str, Any], name: str, version: int, iteration: int) -> None:
    """Rebuild a checkpoint's hot state from its blocks."""
    _archiver(plpy, GD).materialize(name, version, iteration)


def release(plpy: Any, GD: dict[str, Any], name: str, version: int, iteration: int | None) -> int:
    """Drop block references of a model version (or one checkpoint) and collect garbage."""
    return _archiver(plpy, GD).release(name, version, iteration)


def predict_rows(
    GD: dict[str, Any], x: bytes, model: bytes, config_text: str
) -> list[tuple[int, int | None, float, list[float] | None]]:
    """Rows ``(i, label index, value, probabilities)`` for one packed feature buffer."""
    config = _config(GD, config_text)
    out = predict_buffer(_evaluator(GD, model, config), x)
    if config["task"] == "classification":
        labels = out.argmax(axis=1)
        proba = out.tolist() if config.get("proba", True) else [None] * out.shape[0]
        return [
            (i, int(labels[i]), float(out[i, labels[i]]), proba[i]) for i in range(out.shape[0])
        ]
    return [(i, None, float(out[i, 0]), None) for i in range(out.shape[0])]


def row_predict(plpy: Any, GD: dict[str, Any], model: str, features: Any, mode: str) -> Any:
    """``dbdl.predict*(model, features)``: one row, features as JSON (by name) or an array."""
    from .rowpredict import RowPredictor

    predictor = GD.get("dbdl_rows")
    if predictor is None:
        predictor = GD["dbdl_rows"] = RowPredictor(spi_runner(plpy, GD), PG_TABLES)
    values = json.loads(features) if isinstance(features, str) else list(features)
    label, value, proba = predictor.outputs(model, values)
    if mode == "label":
        return str(label)
    return value if mode == "value" else proba
