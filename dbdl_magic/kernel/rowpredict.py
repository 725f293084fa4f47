"""Row-at-a-time prediction for SQL: ``SELECT id, dbdl.predict('churn', to_jsonb(c)) FROM c``.

The model is read from the block store (verified) once per process and cached; each call
encodes one row with the model's stored encoding and runs the network. Batched scoring of
whole queries is :func:`dbdl_magic.api.predict`; this is the convenient per-row form.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from dbdl_magic.kernel.blockstore import Archiver, Run
from dbdl_magic.kernel.evaluate import Evaluator


class RowPredictor:
    """Scores single rows with stored models; ``run`` executes SQL (``$1`` placeholders)."""

    def __init__(self, run: Run, tables: dict[str, str]) -> None:
        self.run = run
        self.tables = tables
        self.cache: dict[str, tuple[tuple[Any, ...], Evaluator, dict[str, Any]]] = {}

    def _model(
        self, ref: str, values: Mapping[str, Any] | Sequence[Any] | None = None
    ) -> tuple[Evaluator, dict[str, Any]]:
        name, _, version = ref.partition(":")
        sql = (f"SELECT version, coalesce(model_iteration, (SELECT max(c.iteration) FROM"
               f" {self.tables['checkpoints']} AS c WHERE c.name = m.name AND c.version ="
               f" m.version)), spec, encoding, updated_at, options"
               f" FROM {self.tables['models']} AS m WHERE m.name = $1")
        params: list[Any] = [name]
        if version:
            sql += " AND m.version = $2"
            params.append(int(version))
        rows = self.run(sql + " ORDER BY m.version DESC LIMIT 1", params)
        if not rows:
            raise ValueError(f"no model {ref!r} in this database")
        v, iteration, spec, encoding, updated, options = rows[0]
        groups = json.loads(options or "{}").get("groups")
        if groups is not None:  # a per-group model: score with the row's group's model
            return self._model(f"{name}:{group_version(ref, options, groups, values)}")
        stamp = (v, iteration, str(updated))
        cached = self.cache.get(ref)
        if cached is not None and cached[0] == stamp:
            return cached[1], cached[2]
        enc = json.loads(encoding)
        state = Archiver(self.run, self.tables).load(name, int(v), int(iteration))
        target = enc["target"]
        config = {
            "spec": json.loads(spec), "input_shape": input_shape(enc),
            "n_outputs": len(target["classes"]) if target["task"] == "classification" else 1,
            "task": target["task"], "target_scale": [target["mean"], target["std"]],
            "threads": 1,
        }
        evaluator = Evaluator(config, state)
        self.cache[ref] = (stamp, evaluator, enc)
        return evaluator, enc

    def outputs(self, ref: str, values: Mapping[str, Any] | Sequence[Any]) -> tuple[Any, ...]:
        """``(label, value, probabilities)`` for one row (features by name, or in order)."""
        evaluator, enc = self._model(ref, values)
        x = encode_row(enc, values)
        out = evaluator.outputs(torch.from_numpy(x.reshape(1, *evaluator.config["input_shape"])))
        target = enc["target"]
        if target["task"] == "classification":
            proba = torch.softmax(out, dim=1)[0].tolist()
            best = int(np.argmax(proba))
            return target["classes"][best], proba[best], proba
        value = float(out[0, 0]) * target["std"] + target["mean"]
        return value, value, None


def group_version(
    ref: str, options: str, groups: dict[str, int], values: Mapping[str, Any] | Sequence[Any] | None
) -> int:
    """The version of the group model for a row (its group column's value as SQL text)."""
    column = json.loads(options)["group_by"]
    if not isinstance(values, Mapping) or column not in values:
        raise ValueError(
            f"model {ref!r} has one model per {column!r}: pass the row as jsonb with the "
            f"{column!r} column, e.g. dbdl.predict({ref!r}, to_jsonb(t))"
        )
    value = values[column]
    key = str(value).lower() if isinstance(value, bool) else str(value)
    if key not in groups:
        raise ValueError(f"model {ref!r} has no model for {column} = {value!r}")
    return int(groups[key])


def input_shape(enc: dict[str, Any]) -> list[int]:
    """Same rule as :attr:`dbdl_magic.data.encoding.Encoding.input_shape`."""
    features = enc["features"]
    if len(features) == 1 and features[0]["kind"] == "array":
        shape = features[0]["shape"]
        return [1, *shape] if len(shape) == 2 else list(shape)
    return [sum(_width(f) for f in features)]


def _width(f: dict[str, Any]) -> int:
    if f["kind"] == "categorical":
        return len(f["categories"])
    if f["kind"] == "array":
        return int(np.prod(f["shape"]))
    return 1


def encode_row(enc: dict[str, Any], values: Mapping[str, Any] | Sequence[Any]) -> np.ndarray:
    """Encode one row exactly as the packer does (see ``dbdl_magic.data.encoding``)."""
    features = enc["features"]
    if not isinstance(values, Mapping):
        if len(values) != len(features):
            raise ValueError(
                f"the model takes {len(features)} feature(s) "
                f"({', '.join(f['name'] for f in features)}), got {len(values)}"
            )
        values = {f["name"]: v for f, v in zip(features, values, strict=True)}
    missing = [f["name"] for f in features if f["name"] not in values]
    if missing:
        raise ValueError(f"missing feature(s) {', '.join(map(repr, missing))}")
    out: list[float] = []
    for f in features:
        value = values[f["name"]]
        if f["kind"] == "numeric":
            if value is None or (isinstance(value, float) and math.isnan(value)):
                if f.get("impute") is None:
                    raise ValueError(f"feature {f['name']!r} is NULL")
                value = f["impute"]
            try:
                number = float(value)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"feature {f['name']!r} must be a number, got {value!r}") from exc
            out.append((number - f["mean"]) / f["std"])
        elif f["kind"] == "categorical":
            out.extend(1.0 if value == c else 0.0 for c in f["categories"])
        else:
            arr = np.asarray(value, dtype=np.float64).ravel()
            if arr.size != _width(f):
                raise ValueError(f"feature {f['name']!r} needs {_width(f)} values")
            out.extend(((arr - f["mean"]) / f["std"]).tolist())
    return np.asarray(out, dtype=np.float32)
