"""Models in the database: one row per (name, version), one checkpoint row per iteration."""

from __future__ import annotations

import json
import logging
import re
from typing import Any

import pandas as pd
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError

from dbdl_magic.backends.base import Backend
from dbdl_magic.errors import InputError
from dbdl_magic.kernel.catalog import model_iteration_sql, set_options_sql, weight_blocks_sql

log = logging.getLogger(__name__)


def next_version(conn: Connection, backend: Backend, name: str) -> int:
    """1 + the highest stored version of ``name``."""
    return int(
        conn.execute(
            text(
                f"SELECT coalesce(max(version), 0) + 1 FROM {backend.store_tables().models} "
                "WHERE name = :name"
            ),
            {"name": name},
        ).scalar_one()
    )


def create_model(
    conn: Connection,
    backend: Backend,
    key: dict[str, Any],
    *,
    spec: dict[str, Any],
    encoding: str,
    options: dict[str, Any],
    query: str,
    parent: str | None = None,
) -> None:
    """Insert the model row with status ``training``."""
    conn.execute(
        text(
            f"INSERT INTO {backend.store_tables().models} (name, version, status, spec, encoding,"
            " options, query, history, parent) VALUES (:name, :version, 'training', :spec,"
            " :encoding, :options, :query, '[]', :parent)"
        ),
        {
            **key,
            "parent": parent,
            "spec": json.dumps(spec),
            "encoding": encoding,
            "options": json.dumps(options, default=str),
            "query": query,
        },
    )


def set_status(
    conn: Connection,
    backend: Backend,
    key: dict[str, Any],
    status: str,
    history: list[dict[str, Any]] | None = None,
    error: str | None = None,
    model_iteration: int | None = None,
) -> None:
    """Update status (and history / error text / the checkpoint that is the model)."""
    sets = ["status = :status", "updated_at = CURRENT_TIMESTAMP", "error = :error"]
    params: dict[str, Any] = {**key, "status": status, "error": error}
    if model_iteration is not None:
        sets.append("model_iteration = :model_iteration")
        params["model_iteration"] = model_iteration
    if history is not None:
        sets.append("history = :history")
        params["history"] = json.dumps(history)
    conn.execute(
        text(
            f"UPDATE {backend.store_tables().models} SET {', '.join(sets)} "
            "WHERE name = :name AND version = :version"
        ),
        params,
    )


def set_options(
    conn: Connection, backend: Backend, key: dict[str, Any], options: dict[str, Any]
) -> None:
    """Replace the stored options of a model version (e.g. a resumed run's work token)."""
    conn.execute(
        text(set_options_sql(backend.store_tables())),
        {**key, "options": json.dumps(options, default=str)},
    )


def write_checkpoint(
    conn: Connection, backend: Backend, key: dict[str, Any], iteration: int, state: bytes
) -> None:
    conn.execute(
        text(
            f"INSERT INTO {backend.store_tables().checkpoints} (name, version, iteration, state) "
            "VALUES (:name, :version, :iteration, :state)"
        ),
        {**key, "iteration": iteration, "state": state},
    )


def record_iteration(
    conn: Connection,
    backend: Backend,
    iteration: int,
    entries: list[tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]],
) -> None:
    """After iteration ``iteration`` of several models (``(key, metrics row, history)`` each):
    the checkpoints' metrics, the models' histories, and the hot copies of the older
    checkpoints dropped (their blocks keep them) — three statements, however many models."""
    if not entries:
        return
    t = backend.store_tables()
    ck, models = t.checkpoints, t.models
    conn.execute(
        text(
            f"UPDATE {ck} SET metrics = :metrics "
            "WHERE name = :name AND version = :version AND iteration = :iteration"
        ),
        [{**key, "iteration": iteration, "metrics": json.dumps(row)} for key, row, _ in entries],
    )
    conn.execute(
        text(
            f"UPDATE {models} SET status = 'training', updated_at = CURRENT_TIMESTAMP,"
            " error = NULL, history = :history WHERE name = :name AND version = :version"
        ),
        [{**key, "history": json.dumps(history)} for key, _, history in entries],
    )
    conn.execute(
        text(
            f"UPDATE {ck} SET state = NULL WHERE name = :name AND version = :version"
            " AND iteration < :below AND state IS NOT NULL"
        ),
        [{**key, "below": iteration} for key, _, _ in entries],
    )


def ensure_hot_state(
    conn: Connection, backend: Backend, key: dict[str, Any], iteration: int
) -> None:
    """Make sure checkpoint ``iteration`` has its hot copy (rebuilt from blocks if needed)."""
    missing = conn.execute(
        text(
            f"SELECT count(*) FROM {backend.store_tables().checkpoints} WHERE name = :name AND "
            "version = :version AND iteration = :iteration AND state IS NULL"
        ),
        {**key, "iteration": iteration},
    ).scalar_one()
    if missing:
        backend.materialize(conn, key, iteration)


def delete_model(conn: Connection, backend: Backend, name: str, version: int | None) -> int:
    """Delete versions of a model, releasing their blocks; returns the blocks collected."""
    params: dict[str, Any] = {"name": name}
    where = "name = :name" + (" AND version = :version" if version is not None else "")
    if version is not None:
        params["version"] = int(version)
    versions = [
        r[0]
        for r in conn.execute(
            text(f"SELECT version FROM {backend.store_tables().models} WHERE {where}"), params
        )
    ]
    if not versions:
        raise InputError(f"no model {name!r}" + (f" version {version}" if version else ""))
    collected = 0
    for v in versions:
        key = {"name": name, "version": v}
        collected += backend.release(conn, key)
        for table in ("checkpoints", "models"):
            conn.execute(
                text(
                    f"DELETE FROM {backend.table(table)} WHERE name = :name AND version = :version"
                ),
                key,
            )
    return collected


def read_model(
    conn: Connection,
    backend: Backend,
    name: str,
    version: int | None = None,
    with_state: bool = True,
) -> dict[str, Any]:
    """The model row (latest version when ``version`` is None) plus the state of its model
    checkpoint, reassembled from verified blocks (``with_state``)."""
    t = backend.store_tables()
    models, ck = t.models, t.checkpoints
    params: dict[str, Any] = {"name": name}
    where = "m.name = :name"
    if version is not None:
        where += " AND m.version = :version"
        params["version"] = int(version)
    row = (
        conn.execute(
            text(
                f"SELECT m.name, m.version, m.status, m.parent, m.spec, m.encoding, m.options,"
                " m.query,"
                f" m.history, m.error, c.iteration FROM {models} AS m"
                f" LEFT JOIN {ck} AS c ON c.name = m.name AND c.version = m.version"
                f" AND c.iteration = {model_iteration_sql(backend.store_tables())}"
                f" WHERE {where} ORDER BY m.version DESC LIMIT 1"
            ),
            params,
        )
        .mappings()
        .first()
    )
    if row is None:
        what = f"{name!r}" + (f" version {version}" if version is not None else "")
        raise InputError(f"no model {what} in {backend.describe()}")
    out = dict(row)
    for field in ("spec", "encoding", "options", "history"):
        out[field] = json.loads(out[field])
    out["state"] = None
    if out["status"] == "training" and (out["name"], out["version"]) in mark_orphans(
        backend, out["name"]
    ):
        out["status"], out["error"] = "interrupted", ORPHANED
    if with_state and out["iteration"] is not None:
        key = {"name": out["name"], "version": out["version"]}
        out["state"] = backend.load_state(conn, key, int(out["iteration"]))
    return out


#: safetensors dtype tags a state holds (little-endian, as this machine's torch reads them)
_DTYPES = {"F32": "float32", "I64": "int64"}


def read_weights(
    conn: Connection,
    backend: Backend,
    key: dict[str, Any],
    iteration: int,
    stats: dict[str, int] | None = None,
) -> dict[str, Any] | None:
    """The network's tensors (``state_dict`` names → float32 tensors) of checkpoint
    ``iteration``, read from its weight blocks only, in one query, each block verified against
    its content address; None when the checkpoint has no blocks. ``stats`` (optional) receives
    ``bytes``: the block bytes read."""
    import numpy as np
    import torch

    dtypes = {tag: getattr(torch, name) for tag, name in _DTYPES.items()}
    params = {**key, "iteration": int(iteration)}
    sql = weight_blocks_sql(backend.store_tables())
    if backend.name == "postgresql":  # bytea in binary: no hex text of twice the size
        sql = re.sub(r":(name|version|iteration)\b", r"%(\1)s", sql)
        with conn.connection.driver_connection.cursor(binary=True) as cursor:
            rows = cursor.execute(sql, params).fetchall()
    else:
        rows = conn.execute(text(sql), params).all()
    if not rows:
        return None
    if stats is not None:
        stats["bytes"] = sum(len(r[4]) + (len(r[5]) if r[5] is not None else 0) for r in rows)
    what = f"{key['name']!r} v{key['version']} checkpoint {iteration}"
    raw = _verified(rows, what)
    header = [data for row, data in zip(rows, raw, strict=True) if row[0] == "safetensors-header"]
    if len(header) != 1:
        raise InputError(f"{what} has no tensor table among its blocks")
    (size,) = np.frombuffer(header[0][:8], "<u8")
    table = json.loads(header[0][8 : 8 + int(size)])
    table.pop("__metadata__", None)
    pieces: dict[str, list[bytes]] = {}
    for row, data in zip(rows, raw, strict=True):
        if row[0] != "safetensors-header":
            pieces.setdefault(str(row[0]).split("[", 1)[0], []).append(data)
    tensors: dict[str, Any] = {}
    for name, parts in pieces.items():
        entry = table.get(name)
        data = bytearray().join(parts)  # one copy, writable for torch
        begin, end = entry["data_offsets"] if entry else (0, -1)
        if entry is None or entry["dtype"] not in _DTYPES or len(data) != end - begin:
            raise InputError(f"{what}: the blocks of tensor {name!r} do not match its table")
        dtype = dtypes[entry["dtype"]]
        values = (torch.frombuffer(data, dtype=dtype) if data
                  else torch.zeros(0, dtype=dtype))
        tensors[name[len("model."):]] = values.reshape(entry["shape"])
    return tensors


def _verified(rows: list[Any], what: str) -> list[bytes]:
    """The raw bytes of blocks ``(label, hash, dtype, encoding, data, base data)``, each
    decoded and checked against its content address."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    from dbdl_magic.kernel.blockstore import assemble

    def one(row: Any) -> bytes:
        return assemble([tuple(row[1:])], f"{what} (its block {row[0]})")

    workers = min(4, os.cpu_count() or 1)
    if workers < 2 or len(rows) < 8:
        return [one(row) for row in rows]
    # BLAKE2b releases the GIL on large buffers: the blocks are checked on several cores
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, rows))


def read_run(conn: Connection, backend: Backend, name: str, token: str) -> list[dict[str, Any]]:
    """Every version of ``name`` written by the run with work token ``token`` (a group_by /
    grid run's members and its router or best copy), oldest first, each with its last
    checkpoint's ``iteration``."""
    t = backend.store_tables()
    models, ck = t.models, t.checkpoints
    rows = conn.execute(
        text(
            "SELECT m.version, m.status, m.spec, m.options, m.query, m.history,"
            f" (SELECT max(c.iteration) FROM {ck} AS c WHERE c.name = m.name"
            "  AND c.version = m.version) AS iteration"
            f" FROM {models} AS m WHERE m.name = :name ORDER BY m.version"
        ),
        {"name": name},
    ).mappings()
    out = []
    for row in rows:
        decoded = {**row, **{f: json.loads(row[f]) for f in ("spec", "options", "history")}}
        if decoded["options"].get("work_token") == token:
            out.append(decoded)
    return out


def list_models(conn: Connection, backend: Backend) -> pd.DataFrame:
    """One row per stored model version."""
    t = backend.store_tables()
    models, ck = t.models, t.checkpoints
    rows = (
        conn.execute(
            text(
                f"SELECT m.name, m.version, m.status, m.parent, m.created_at, m.updated_at,"
                f" (SELECT count(*) FROM {ck} AS c WHERE c.name = m.name AND c.version = m.version)"
                f" AS checkpoints, (SELECT sum(c.logical_bytes) FROM {ck} AS c"
                "  WHERE c.name = m.name AND c.version = m.version) AS logical_bytes,"
                f" (SELECT sum(length(b.data)) FROM {t.blocks} AS b WHERE b.hash IN"
                f"  (SELECT cb.hash FROM {t.checkpoint_blocks} AS cb"
                "   WHERE cb.name = m.name AND cb.version = m.version)) AS stored_bytes"
                f" FROM {models} AS m ORDER BY m.name, m.version"
            )
        )
        .mappings()
        .all()
    )
    columns = [
        "name",
        "version",
        "status",
        "parent",
        "created_at",
        "updated_at",
        "checkpoints",
        "logical_bytes",
        "stored_bytes",
    ]
    frame = pd.DataFrame([dict(r) for r in rows], columns=columns)
    for column in ("logical_bytes", "stored_bytes"):
        frame[column] = frame[column].fillna(0).astype("int64")
    if (frame["status"] == "training").any():
        for name, version in mark_orphans(backend):
            frame.loc[(frame["name"] == name) & (frame["version"] == version), "status"] = (
                "interrupted"
            )
    sweep_work_tables(backend)
    return frame


def copy_checkpoint(
    conn: Connection,
    backend: Backend,
    source: dict[str, Any],
    iteration: int,
    target: dict[str, Any],
) -> None:
    """Copy checkpoint ``iteration`` of ``source`` to ``target`` inside the database (its hot
    copy is rebuilt from blocks first when needed); archive it to share the source's blocks."""
    ensure_hot_state(conn, backend, source, iteration)
    conn.execute(
        text(
            f"INSERT INTO {backend.store_tables().checkpoints} (name, version, iteration, state)"
            " SELECT :to_name, :to_version, c.iteration, c.state"
            f" FROM {backend.store_tables().checkpoints} AS c WHERE c.name = :name"
            " AND c.version = :version AND c.iteration = :iteration"
        ),
        {
            **source,
            "iteration": iteration,
            "to_name": target["name"],
            "to_version": target["version"],
        },
    )


# -- runs whose session is gone ----------------------------------------------------------------
#: the error a model version gets when its training session vanished without a word
ORPHANED = (
    "its training session ended without recording how (client killed, connection lost or "
    "server restarted); resume=True continues from the last checkpoint"
)
#: work tables of a training run: staged query and validation query, packed buffers (suffix:
#: the run's work token) and iteration scratch states (a random suffix)
_WORK_TABLE = re.compile(r"(stage|vstage|packed|segs|iter)_([0-9a-f]{12})\W*$")


def mark_orphans(backend: Backend, name: str | None = None) -> set[tuple[str, int]]:
    """Mark the model versions (of ``name``, or all) that are in status ``training`` with no
    live session training them (:meth:`Backend.version_live`) as ``interrupted``; returns
    their ``(name, version)``. Runs in a transaction of its own, so whoever looks leaves the
    mark. Best effort: when the database refuses now (busy, down), a later look marks them."""
    models = backend.store_tables().models
    params: dict[str, Any] = {} if name is None else {"name": name}
    where = "status = 'training'" + ("" if name is None else " AND name = :name")
    gone: set[tuple[str, int]] = set()
    try:
        with backend.engine.begin() as conn:
            rows = conn.execute(
                text(f"SELECT name, version, options FROM {models} WHERE {where}"), params
            ).all()
            for row_name, version, options in rows:
                if backend.version_live(conn, row_name, int(version), json.loads(options)):
                    continue
                marked = conn.execute(
                    text(
                        f"UPDATE {models} SET status = 'interrupted', error = :error,"
                        " updated_at = CURRENT_TIMESTAMP WHERE name = :name"
                        " AND version = :version AND status = 'training' AND options = :options"
                    ),
                    {"name": row_name, "version": int(version), "options": options,
                     "error": ORPHANED},
                ).rowcount
                if marked:
                    gone.add((row_name, int(version)))
    except DBAPIError as exc:
        log.warning("dbdl: could not check for interrupted runs now: %s", exc.orig or exc)
        return set()
    return gone


def sweep_work_tables(backend: Backend) -> list[str]:
    """Drop the work tables of runs whose session is gone: no live session holds their token
    (:meth:`Backend.token_live`) and none of their model rows is still training (rows are
    missing while a run packs; :meth:`Backend.run_records` and the token's lock cover that).
    Predictions stage rows as ``stage_<token>`` too, so a staged table is dropped only when
    its token is known as a training run's. Returns the names dropped; best effort like
    :func:`mark_orphans`."""
    try:
        with backend.engine.connect() as conn:
            runs, scratch = _work_tables_by_run(backend, backend.work_tables(conn))
            records = backend.run_records(conn)
            dead_records = [t for t, alive in records.items() if not alive]
            if not runs and not scratch and not dead_records:
                return []
            rows = conn.execute(
                text(f"SELECT status, options FROM {backend.store_tables().models}")
            ).all()
    except DBAPIError as exc:
        log.warning("dbdl: could not look for left-over work tables now: %s", exc.orig or exc)
        return []
    known, training = set(records), set()
    for status, options in rows:
        token = json.loads(options).get("work_token")
        known.add(token)
        if status == "training":
            training.add(token)
    dropped: list[str] = []
    for token, tables in runs.items():
        if token in training:
            continue
        names = [t for prefix, t in tables if token in known or prefix == "packed"]
        if names:
            dropped += _drop_if_gone(backend, token, names)
    for token in dead_records:
        if token not in runs and token not in training:
            _drop_if_gone(backend, token, [])
    if scratch:
        dropped += _drop_if_gone(backend, None, scratch)
    return dropped


def _work_tables_by_run(
    backend: Backend, names: list[str]
) -> tuple[dict[str, list[tuple[str, str]]], list[str]]:
    """Training work tables among ``names``: ``(prefix, name)`` by work token, and the
    iteration scratch tables."""
    runs: dict[str, list[tuple[str, str]]] = {}
    scratch: list[str] = []
    for name in names:
        found = _WORK_TABLE.search(name)
        if found is None or backend.table(f"{found[1]}_{found[2]}") != name:
            continue
        if found[1] == "iter":
            scratch.append(name)
        else:
            runs.setdefault(found[2], []).append((found[1], name))
    return runs, scratch


def _drop_if_gone(backend: Backend, token: str | None, tables: list[str]) -> list[str]:
    """Drop ``tables`` and forget run ``token`` if it is not alive (``None``: the iteration
    scratch tables, dropped when no run they could belong to is alive), in one transaction."""
    try:
        with backend.engine.begin() as conn:
            alive = (
                not backend.scratch_orphaned(conn)
                if token is None
                else backend.token_live(conn, token)
            )
            if alive:
                return []
            for table in tables:
                backend.drop_table(conn, table)
            if token is not None:
                backend.forget_run(conn, token)
    except DBAPIError as exc:
        log.warning("dbdl: could not drop the left-over work tables %s now: %s",
                    ", ".join(tables) or token, exc.orig or exc)
        return []
    if tables:
        log.info("dbdl: dropped the left-over work tables %s", ", ".join(tables))
    return tables
