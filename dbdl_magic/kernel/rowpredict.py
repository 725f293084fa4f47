"""Row-at-a-time prediction for SQL: ``SELECT id, dbdl.predict('churn', to_jsonb(c)) FROM c``.

A model is read from the block store (verified) once per process and cached. Which version a
name means, and whether the cached one is still current, is asked once per SQL statement, not
per row: the caller passes ``stamp()``, a value that changes whenever the model could have
(PostgreSQL: the statement's start time, transaction start and command id; SQLite: the
connection's change count and the file's data version); without one every row asks. Each
call then encodes one row with the model's stored encoding (numeric features vectorised) and
runs the network: in numpy when it is a stack of linear layers and element-wise activations
(a forward pass of one row through torch costs tens of microseconds of call overhead), else in
torch. Batched scoring of whole queries is :func:`dbdl_magic.api.predict`; this is the
convenient per-row form.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dbdl_magic.kernel.blockstore import Archiver, Run
from dbdl_magic.kernel.catalog import StoreTables, model_lookup_sql
from dbdl_magic.kernel.evaluate import Evaluator

Values = Mapping[str, Any] | Sequence[Any]


@dataclass
class _Router:
    """A per-group model: rows go to the version of their group (``groups``, by text)."""

    name: str
    ref: str
    column: str
    groups: dict[str, int]


@dataclass
class _Model:
    """A model ready for rows: its freshness stamp, network and encoder."""

    stamp: tuple[Any, ...]
    evaluator: Evaluator
    encoder: RowEncoder
    forward: Callable[[np.ndarray], np.ndarray]
    target: dict[str, Any]


class RowPredictor:
    """Scores single rows with stored models; ``run`` executes SQL (``$1`` placeholders),
    ``stamp`` (optional) tells one statement from the next (see the module docstring)."""

    def __init__(
        self, run: Run, tables: StoreTables, stamp: Callable[[], Hashable] | None = None
    ) -> None:
        self.run = run
        self.tables = tables
        self.stamp = stamp
        self.models: dict[str, _Model] = {}  # "name:version" -> built model
        self.resolved: dict[str, tuple[Hashable, _Model | _Router]] = {}  # ref -> statement

    def _resolve(self, ref: str) -> _Model | _Router:
        """What ``ref`` (``name`` or ``name:version``) means in the current statement."""
        now = self.stamp() if self.stamp is not None else None
        known = self.resolved.get(ref)
        if now is not None and known is not None and known[0] == now:
            return known[1]
        found = self._lookup(ref)
        if now is not None:
            if len(self.resolved) > 1024:
                self.resolved.clear()
            self.resolved[ref] = (now, found)
        return found

    def _lookup(self, ref: str) -> _Model | _Router:
        name, _, version = ref.partition(":")
        params: list[Any] = [name, int(version)] if version else [name]
        rows = self.run(model_lookup_sql(self.tables, bool(version)), params)
        if not rows:
            raise ValueError(f"no model {ref!r} in this database")
        v, iteration, spec, encoding, updated, options = rows[0]
        opts = json.loads(options or "{}")
        groups = opts.get("groups")
        if groups is not None:  # a per-group model: score with the row's group's model
            return _Router(name, ref, opts["group_by"], {str(g): int(n) for g, n in groups.items()})
        stamp = (v, iteration, str(updated))
        member = f"{name}:{v}"
        cached = self.models.get(member)
        if cached is not None and cached.stamp == stamp:
            return cached
        if iteration is None:
            raise ValueError(f"model {ref!r} has no checkpoint to predict with")
        model = self._build(name, int(v), int(iteration), json.loads(spec), json.loads(encoding))
        model.stamp = stamp
        if len(self.models) > 64:
            self.models.clear()
        self.models[member] = model
        return model

    def _build(
        self, name: str, version: int, iteration: int, spec: dict[str, Any], enc: dict[str, Any]
    ) -> _Model:
        state = Archiver(self.run, self.tables).load(name, version, iteration)
        target = enc["target"]
        config = {
            "spec": spec, "input_shape": input_shape(enc),
            "n_outputs": len(target["classes"]) if target["task"] == "classification" else 1,
            "task": target["task"], "target_scale": [target["mean"], target["std"]],
            "threads": 1,
        }
        evaluator = Evaluator(config, state)
        return _Model((), evaluator, RowEncoder(enc), numpy_forward(evaluator), target)

    def _model(self, ref: str, values: Values | None) -> _Model:
        found = self._resolve(ref)
        if isinstance(found, _Router):
            version = group_version(found.ref, found.column, found.groups, values)
            found = self._resolve(f"{found.name}:{version}")
            assert isinstance(found, _Model)
        return found

    def outputs(self, ref: str, values: Values, mode: str = "all") -> tuple[Any, ...]:
        """``(label, value, probabilities)`` for one row (features by name, or in order);
        ``mode`` ``label``, ``value`` or ``proba`` computes only that one (the others None)."""
        model = self._model(ref, values)
        out = model.forward(model.encoder.encode(values))
        target = model.target
        if target["task"] != "classification":
            value = float(out[0]) * target["std"] + target["mean"]
            return value, value, None
        best = int(out.argmax())
        label = target["classes"][best]
        if mode == "label":
            return label, None, None
        shifted = np.exp(out - out[best])
        total = float(shifted.sum())
        if mode == "value":
            return label, 1.0 / total, None
        proba = (shifted / total).tolist()
        return label, proba[best], proba


def group_version(ref: str, column: str, groups: dict[str, int], values: Values | None) -> int:
    """The version of the group model for a row (its group column's value as SQL text)."""
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


# -- one row through the network ------------------------------------------------------------------
#: element-wise activations numpy computes in place (``x`` float32, ``m`` the torch module)
_IN_PLACE: dict[str, Callable[[np.ndarray, Any], Any]] = {
    "ReLU": lambda x, m: np.maximum(x, 0, out=x),
    "Tanh": lambda x, m: np.tanh(x, out=x),
    "Sigmoid": lambda x, m: np.reciprocal(np.add(np.exp(np.negative(x, out=x), out=x), 1, out=x),
                                          out=x),
    "LeakyReLU": lambda x, m: np.copyto(x, x * np.float32(m.negative_slope), where=x < 0),
    "Dropout": lambda x, m: None,
    "Identity": lambda x, m: None,
}


def numpy_forward(evaluator: Evaluator) -> Callable[[np.ndarray], np.ndarray]:
    """The network's raw outputs for one encoded row (flat float32): numpy over the layers'
    float32 weights when every layer is Linear or an element-wise activation numpy has (one
    small matrix product and a few in-place operations per layer), else torch."""
    layers: list[tuple[np.ndarray, np.ndarray | None] | tuple[Callable[..., Any], Any]] = []
    if len(evaluator.config["input_shape"]) != 1:
        return lambda x: _torch_forward(evaluator, x)
    for layer in evaluator.net:
        kind = type(layer).__name__
        if isinstance(layer, torch.nn.Linear):
            weight = np.ascontiguousarray(layer.weight.detach().cpu().numpy().T)
            bias = None if layer.bias is None else layer.bias.detach().cpu().numpy().copy()
            layers.append((weight, bias))
        elif kind in _IN_PLACE:
            layers.append((_IN_PLACE[kind], layer))
        else:
            return lambda x: _torch_forward(evaluator, x)

    def forward(x: np.ndarray) -> np.ndarray:
        for first, second in layers:
            if isinstance(first, np.ndarray):
                x = x @ first
                if second is not None:
                    x += second
            else:
                first(x, second)
        return x

    return forward


def _torch_forward(evaluator: Evaluator, x: np.ndarray) -> np.ndarray:
    shape = evaluator.config["input_shape"]
    out = evaluator.outputs(torch.from_numpy(x.reshape(1, *shape)))
    return out[0].cpu().numpy()


# -- one row's encoding -------------------------------------------------------------------------
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


class RowEncoder:
    """Encodes one row exactly as the packer does (see ``dbdl_magic.data.encoding``); a model
    of numeric features only is encoded in one vector operation."""

    def __init__(self, enc: dict[str, Any]) -> None:
        self.enc = enc
        self.features = enc["features"]
        self.names = [f["name"] for f in self.features]
        self.numeric = all(f["kind"] == "numeric" and f.get("impute") is None
                           for f in self.features)
        self.mean = np.array([f.get("mean", 0.0) for f in self.features], dtype=np.float64)
        self.std = np.array([f.get("std", 1.0) for f in self.features], dtype=np.float64)

    def _ordered(self, values: Values) -> list[Any]:
        if isinstance(values, Mapping):
            try:
                return [values[n] for n in self.names]
            except KeyError:
                missing = [n for n in self.names if n not in values]
                raise ValueError(f"missing feature(s) {', '.join(map(repr, missing))}") from None
        if len(values) != len(self.features):
            raise ValueError(
                f"the model takes {len(self.features)} feature(s) "
                f"({', '.join(self.names)}), got {len(values)}"
            )
        return list(values)

    def encode(self, values: Values) -> np.ndarray:
        """The encoded row (float32, flat)."""
        row = self._ordered(values)
        if self.numeric:
            try:
                x = np.array(row, dtype=np.float64)
            except (TypeError, ValueError):
                x = None
            if x is not None:
                x -= self.mean
                x /= self.std
                if not math.isnan(x.sum()):  # a NULL (or NaN): the general path says which
                    return x.astype(np.float32)
        return encode_row(self.enc, dict(zip(self.names, row, strict=True)))


def encode_row(enc: dict[str, Any], values: Values) -> np.ndarray:
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
