"""In-database prediction: score a query's rows with a stored model, inside the database.

The model's weights never leave the database: the query is staged, its features encoded with
the model's stored encoding by SQL, packed into buffers in row order, and scored by the predict
kernel (decoded once per process); the query's key columns plus the predictions are written to
a table (``into``) or returned as a DataFrame.
"""

from __future__ import annotations

import uuid
from typing import Any

import pandas as pd
from sqlalchemy import text

from . import store
from .backends.base import Backend
from .encoding import ARRAY, CATEGORICAL, NUMERIC, Encoding
from .errors import InputError
from .packing import RN, _quote_dotted, feature_sql, stage_query

ROWS_PER_BUFFER = 8192


def prediction_columns(encoding: Encoding, proba: bool) -> list[str]:
    """Names of the output columns after the key columns."""
    columns = ["prediction"]
    if proba and encoding.target.task == "classification":
        columns += [f"proba_{c}" for c in encoding.target.classes]
    return columns


def kernel_config(row: dict[str, Any], encoding: Encoding, backend: Backend) -> dict[str, Any]:
    """What the predict kernel needs to rebuild and run the network."""
    return {
        "spec": row["spec"], "input_shape": encoding.input_shape,
        "n_outputs": encoding.target.n_outputs, "task": encoding.target.task,
        "byteorder": backend.byteorder,
        "target_scale": [encoding.target.mean, encoding.target.std],
    }


def _check_features(backend: Backend, conn: Any, stage: str, encoding: Encoding) -> list[str]:
    kinds = backend.column_kinds(conn, stage)
    kinds.pop(RN, None)
    missing = [f.name for f in encoding.features if f.name not in kinds]
    if missing:
        raise InputError(
            f"the query lacks feature column(s) {', '.join(map(repr, missing))}; the model "
            f"was trained on {', '.join(encoding.feature_names())}"
        )
    expected = {NUMERIC: "numeric", CATEGORICAL: "categorical", ARRAY: "array"}
    wrong = [
        f"{f.name!r} is {kinds[f.name].dbtype} but the model expects {expected[f.kind]} values"
        for f in encoding.features
        if f.kind != CATEGORICAL and kinds[f.name].kind != f.kind
    ]
    if wrong:
        raise InputError("mistyped feature column(s): " + "; ".join(wrong))
    return list(kinds)


def predict(
    backend: Backend,
    name: str,
    query: str,
    *,
    into: str | None = None,
    proba: bool = False,
    version: int | None = None,
    keys: list[str] | None = None,
    params: dict[str, Any] | None = None,
    replace: bool = False,
) -> pd.DataFrame | int:
    """Score ``query`` with model ``name``; see :func:`dbdl_magic.api.predict`."""
    engine = backend.engine
    token = uuid.uuid4().hex[:12]
    stage, packed = backend.table(f"stage_{token}"), backend.table(f"ppacked_{token}")
    result = _quote_dotted(backend, into) if into else backend.table(f"pred_{token}")
    with engine.connect() as conn:
        row = store.read_model(conn, backend, name, version, with_state=False)
    if row["iteration"] is None:
        raise InputError(f"model {name!r} has no checkpoint to predict with")
    encoding = Encoding.from_json(row["encoding"])
    key = {"name": row["name"], "version": row["version"], "iteration": row["iteration"]}
    config = kernel_config(row, encoding, backend)
    try:
        with engine.begin() as conn:
            store.ensure_hot_state(conn, backend, key, int(key["iteration"]))
            stage_query(backend, conn, query, params or {}, stage)
            columns = _check_features(backend, conn, stage, encoding)
            features = set(encoding.feature_names())
            key_columns = keys if keys is not None else [
                c for c in columns if c not in features and c != encoding.target.name
            ]
            unknown = [k for k in key_columns if k not in columns]
            if unknown:
                raise InputError(f"key column(s) {', '.join(map(repr, unknown))} not in the query")
            if into and replace:
                backend.drop_table(conn, result)
            if into and backend.table_exists(conn, result):
                raise InputError(f"table {into!r} already exists; pass replace=True to overwrite")
            sql_params: dict[str, Any] = {}
            pieces = feature_sql(backend, encoding, sql_params)
            backend.predict_into(
                conn, stage, packed, result, pieces, sql_params, key_columns,
                prediction_columns(encoding, proba), encoding.target.classes, config, key,
                ROWS_PER_BUFFER, with_rn=not into,
            )
            if into:
                return int(conn.execute(text(f"SELECT count(*) FROM {result}")).scalar_one())
            frame = pd.read_sql(text(f"SELECT * FROM {result} ORDER BY {backend.q(RN)}"), conn)
            return frame.drop(columns=[RN]).reset_index(drop=True)
    finally:
        with engine.begin() as conn:
            for table in (stage, packed) if into else (stage, packed, result):
                backend.drop_table(conn, table)
