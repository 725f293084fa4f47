"""Server-side packing: a SELECT becomes a table of shuffled float32 buffers.

Steps, all inside the database (rows never travel to the client):

1. stage the query into a work table with a row number (the query runs once);
2. infer each column's kind and compute the encoding statistics with SQL aggregates;
3. refuse bad input with errors naming the column (NULLs, NaN/inf, one class, ...);
4. pack: shuffle by a seeded hash of the row number, split off validation rows, and aggregate
   encoded rows into buffers of ``rows_per_buffer`` rows.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError, StatementError

from dbdl_magic.backends.base import Backend, ColumnKind
from dbdl_magic.data import inprocess
from dbdl_magic.data.encoding import ARRAY, CATEGORICAL, NUMERIC, Encoding, Feature, Target
from dbdl_magic.errors import InputError

RN = "__dbdl_rn"
ONE_STATEMENT = "dbdl_one_statement"  # a bound value that keeps the staged query one statement
TARGET_BUFFER_BYTES = 8 << 20
MAX_CLASSES = 1000


@dataclass
class PackOptions:
    """What packing needs to know (a subset of the training options)."""

    target: str
    features: list[str] | None = None
    task: str = "auto"
    validation: float | str | None = 0.2
    impute: str | None = None
    max_categories: int = 100
    image_shape: list[int] | None = None
    rows_per_buffer: int | None = None
    n_parameters: int = 0
    batch_size: int = 64
    seed: int = 0
    group_by: str | None = None
    #: the fewest training buffers a run with segments needs (a share for every segment in
    #: every sync round); None: one process
    min_buffers: int | None = None


MAX_GROUPS = 10_000


@dataclass
class PackedData:
    """A packed table and what it holds."""

    table: str
    encoding: Encoding
    n_train: int
    n_val: int
    n_buffers: int
    rows_per_buffer: int
    n_parameters: int = 0
    #: group value → {"train": rows, "validation": rows} when packed per group
    groups: dict[str, dict[str, int]] | None = None
    #: digest of the packed buffers (rows, split and shuffle), checked when a run resumes
    fingerprint: str = ""


def stage_query(
    backend: Backend,
    conn: Connection,
    query: str,
    params: dict[str, Any],
    table: str,
    what: str = "training query",
    deterministic: bool = False,
    numbered: bool = True,
    create: str = "CREATE TABLE",
    limit: int | None = None,
) -> None:
    """Materialise ``query`` into ``table`` with a row-number column (runs the query once).

    ``numbered=False`` leaves the row number out (the rows keep their order in the table);
    ``create`` may make it ``CREATE UNLOGGED TABLE``; ``limit`` keeps that many rows at most.

    ``deterministic`` numbers the rows by their content (:meth:`Backend.staging_order`), not
    by the order a scan happened to return them in (a concurrent scan of the same table can
    change where PostgreSQL starts reading): the same rows get the same shuffle, split and
    model for the same seed. The query always runs as exactly one statement: the wrapper binds
    a value, so drivers use the extended protocol, which refuses ``...; DROP TABLE t``.
    SQLite numbers the rows by the table's rowid instead of a window
    (:func:`~dbdl_magic.data.inprocess.stage_by_rowid`: the same numbers, one copy less).

    A query the database cannot run (unknown table, syntax error, missing ``:name`` value) is
    the user's input: it raises :class:`InputError` with the database's message in ``detail``.
    """
    body = query.strip().rstrip(";").strip()
    if not body:
        raise InputError(f"the {what} is empty")
    if _is_table_name(body):
        body = f"SELECT * FROM {_quote_dotted(backend, body)}"
    try:
        order = backend.staging_order("src") if deterministic else ""
        select = f"src.* FROM ({body}) AS src WHERE CAST(:{ONE_STATEMENT} AS INTEGER) = 1"
        bound = {**params, ONE_STATEMENT: 1}
        by_rowid = numbered and not order and limit is None and create == "CREATE TABLE"
        if (
            by_rowid
            and backend.packs_in_process
            and inprocess.stage_by_rowid(conn, backend, table, RN, select, bound)
        ):
            return
        number = f"row_number() OVER ({order}) AS {RN}, " if numbered else ""
        tail = "" if limit is None else f" LIMIT {int(limit)}"
        conn.execute(text(f"{create} {table} AS SELECT {number}{select}{tail}"), bound)
    except DBAPIError as exc:
        detail = str(exc.orig) if exc.orig is not None else str(exc)
        first = detail.strip().splitlines()[0] if detail.strip() else type(exc).__name__
        raise InputError(f"the {what} failed in the database: {first}", detail=detail) from exc
    except StatementError as exc:  # e.g. a :name placeholder without a value in params
        missing = re.search(r"bind parameter '([^']*)'", str(exc))
        if missing is None:
            raise InputError(f"the {what} could not be run: {exc.orig}", detail=str(exc)) from exc
        name = missing.group(1)
        raise InputError(
            f"the {what} has a placeholder :{name} but params gives no value for {name!r}; "
            f"pass params={{{name!r}: ...}} (write \\: for a literal colon)",
            detail=str(exc),
        ) from exc


def check_staged_names(backend: Backend, names: list[str], what: str = "query") -> None:
    """Refuse duplicate column names (PostgreSQL refuses them when staging).

    SQLite stages a second column ``y`` as ``y:1`` without a word, which would make a copy of
    the label a feature; ``__dbdl_rn`` is the staging row number.
    """
    dupes: set[str] = set()
    if backend.name == "sqlite":
        for name in names:
            renamed = re.fullmatch(r"(.*):\d+", name)
            if renamed and renamed.group(1) in names:
                dupes.add(renamed.group(1))
    if RN in dupes:
        raise InputError(f"the column name {RN!r} is reserved by dbdl; rename it in the {what}")
    if dupes:
        raise InputError(
            f"the {what} returns more than one column named "
            f"{', '.join(map(repr, sorted(dupes)))}; give each column its own name with AS"
        )


def _is_table_name(body: str) -> bool:
    return not any(ch.isspace() for ch in body) and "(" not in body and ";" not in body


_NAME_PART = r'"((?:[^"]|"")*)"|([^."]+)'
_DOTTED_NAME = re.compile(rf"(?:{_NAME_PART})(?:\.(?:{_NAME_PART}))*")


def _quote_dotted(backend: Backend, name: str) -> str:
    """``table`` or ``schema.table`` quoted by the dialect, whatever characters it holds; a
    part written in double quotes (``"my.table"``, ``""`` inside) is one name, dots and all."""
    if '"' in name and _DOTTED_NAME.fullmatch(name):
        parts = [
            m.group(1).replace('""', '"') if m.group(1) is not None else m.group(2)
            for m in re.finditer(_NAME_PART, name)
        ]
    else:
        parts = [part.strip('"') for part in name.split(".")]
    return ".".join(backend.q(part) for part in parts)


def infer_encoding(
    backend: Backend, conn: Connection, stage: str, opts: PackOptions
) -> tuple[Encoding, int]:
    """Column kinds and statistics → :class:`Encoding`; returns it with the row count.

    On SQLite one scan reads the columns into this process and the kinds and statistics come
    from those values (:mod:`~dbdl_magic.data.inprocess`, the same numbers as the SQL
    aggregates); :func:`pack` then packs the rows read.
    """
    fetched = inprocess.fetch_stage(backend, conn, stage, RN, opts.features, opts.target,
                                    opts.group_by)
    kinds = fetched.kinds(conn) if fetched is not None else backend.column_kinds(conn, stage)
    check_staged_names(backend, list(kinds), "training query")
    kinds.pop(RN, None)
    where = f"in the query's columns ({', '.join(kinds)})"
    if opts.target not in kinds:
        raise InputError(f"target column {opts.target!r} is not {where}")
    if opts.group_by is not None:
        if opts.group_by not in kinds:
            raise InputError(f"group_by column {opts.group_by!r} is not {where}")
        if opts.group_by == opts.target or opts.group_by in (opts.features or []):
            raise InputError(
                f"group_by column {opts.group_by!r} cannot also be the target or a feature"
            )
    names = opts.features or [c for c in kinds if c not in (opts.target, opts.group_by)]
    for name in names:
        if name not in kinds:
            raise InputError(f"feature column {name!r} is not {where}")
    if opts.target in names:
        raise InputError(f"the target {opts.target!r} cannot also be a feature")
    if not names:
        raise InputError("the query has no feature columns besides the target")
    for name in [*names, opts.target]:
        if kinds[name].kind == "unsupported":
            raise InputError(
                f"column {name!r} has an unsupported type ({kinds[name].dbtype}); "
                "cast it to a number or text in the query, or leave it out"
            )

    numeric = fetched.numeric_pass([*names, opts.target], kinds) if fetched else None
    total, nulls, bad, means = numeric or _numeric_pass(
        backend, conn, stage, names, opts.target, kinds
    )
    if total == 0:
        raise InputError("the training query returned no rows")
    for name in [*names, opts.target]:
        if bad.get(name):
            raise InputError(f"column {name!r} has {bad[name]} NaN or infinite value(s)")
    if nulls[opts.target]:
        raise InputError(
            f"target column {opts.target!r} has {nulls[opts.target]} NULL value(s); "
            f"filter them out (WHERE {opts.target} IS NOT NULL)"
        )
    if opts.impute not in (None, "mean", "zero"):
        raise InputError(f"impute={opts.impute!r} is not supported; use 'mean' or 'zero'")
    for name in names:
        if nulls[name] and (opts.impute is None or kinds[name].kind == ARRAY):
            raise InputError(
                f"column {name!r} has {nulls[name]} NULL value(s); fill them in the query or "
                "pass impute='mean'"
            )
    numeric_names = [n for n in names if kinds[n].kind == NUMERIC]
    stds = fetched.std_pass(numeric_names, means) if fetched else None
    if stds is None:
        stds = _std_pass(backend, conn, stage, numeric_names, means)
    features = [
        _feature(backend, conn, stage, name, kinds[name], means, stds, opts) for name in names
    ]
    target = _target(backend, conn, stage, opts, kinds[opts.target], total)
    if fetched is not None:
        inprocess.keep(conn, fetched)
    return Encoding(features=features, target=target, impute=opts.impute), total


# result columns per statistics query: PostgreSQL returns at most 1664, SQLite 2000
MAX_RESULT_COLUMNS = 1500


def _aggregate_row(
    conn: Connection, stage: str, parts: list[str], params: dict[str, Any] | None = None
) -> list[Any]:
    """The values of aggregate expressions ``parts`` over ``stage``: one scan, or one per
    :data:`MAX_RESULT_COLUMNS` expressions for a very wide query."""
    row: list[Any] = []
    for start in range(0, len(parts), MAX_RESULT_COLUMNS):
        chunk = ", ".join(parts[start : start + MAX_RESULT_COLUMNS])
        row += conn.execute(text(f"SELECT {chunk} FROM {stage}"), params or {}).one()
    return row


def _numeric_pass(
    backend: Backend,
    conn: Connection,
    stage: str,
    names: list[str],
    target: str,
    kinds: dict[str, ColumnKind],
) -> tuple[int, dict[str, int], dict[str, int], dict[str, float]]:
    parts = ["count(*)"]
    cols = [*names, target]
    for name in cols:
        col = backend.q(name)
        parts.append(f"count(*) - count({col})")
        if kinds[name].kind == NUMERIC:
            cond = backend.nonfinite(col) if kinds[name].is_float else "1 = 0"
            parts.append(f"sum(CASE WHEN {cond} THEN 1 ELSE 0 END)")
            parts.append(f"avg(CASE WHEN {cond} THEN NULL ELSE {backend.to_float(col)} END)")
        else:
            parts += ["0", "0"]
    row = _aggregate_row(conn, stage, parts)
    nulls, bad, means = {}, {}, {}
    for i, name in enumerate(cols):
        nulls[name], bad[name] = int(row[1 + 3 * i] or 0), int(row[2 + 3 * i] or 0)
        means[name] = float(row[3 + 3 * i] or 0.0)
    return int(row[0]), nulls, bad, means


def _std_pass(
    backend: Backend, conn: Connection, stage: str, names: list[str], means: dict[str, float]
) -> dict[str, float]:
    if not names:
        return {}
    params: dict[str, Any] = {}
    parts = []
    for i, name in enumerate(names):
        params[f"m{i}"] = means[name]
        diff = f"({backend.to_float(backend.q(name))} - :m{i})"
        parts.append(f"avg({diff} * {diff})")
    row = _aggregate_row(conn, stage, parts, params)
    return {name: math.sqrt(float(row[i] or 0.0)) for i, name in enumerate(names)}


def _feature(
    backend: Backend,
    conn: Connection,
    stage: str,
    name: str,
    kind: ColumnKind,
    means: dict[str, float],
    stds: dict[str, float],
    opts: PackOptions,
) -> Feature:
    if kind.kind == NUMERIC:
        std = stds[name] if stds[name] > 1e-12 else 1.0
        impute = {"mean": means[name], "zero": 0.0}.get(opts.impute or "")
        return Feature(name, NUMERIC, mean=means[name], std=std, impute=impute)
    if kind.kind == CATEGORICAL:
        col = backend.q(name)
        values = [
            r[0]
            for r in conn.execute(
                text(
                    f"SELECT {col} FROM {stage} WHERE {col} IS NOT NULL GROUP BY {col}"
                    f" ORDER BY {col} LIMIT :cap"
                ),
                {"cap": opts.max_categories + 1},
            )
        ]
        if len(values) > opts.max_categories:
            raise InputError(
                f"column {name!r} has more than {opts.max_categories} distinct values; too many "
                "to one-hot encode. Leave it out, bucket it in the query, or raise max_categories"
            )
        return Feature(name, CATEGORICAL, categories=values)
    stats = backend.array_stats(conn, stage, name)
    if stats.get("shapes"):
        raise InputError(_shapes_message(name, stats))
    if stats.get("bad_blobs"):
        raise InputError(
            f"array column {name!r} has {stats['bad_blobs']} value(s) that are not float32 "
            "arrays (blob sizes must be a multiple of 4 bytes)"
        )
    if stats.get("null_values"):
        raise InputError(
            f"array column {name!r} has {stats['null_values']} NULL element(s) inside its "
            "arrays; fill them in the query"
        )
    nonfinite = stats.get("nonfinite") or 0
    if nonfinite or not (math.isfinite(stats["mean"]) and math.isfinite(stats["std"])):
        raise InputError(
            f"array column {name!r} has {nonfinite or 'some'} NaN or infinite value(s)"
        )
    if stats["min_len"] is None or stats["min_len"] != stats["max_len"]:
        raise InputError(
            f"array column {name!r} must hold arrays of one fixed size; found sizes "
            f"{stats['min_len']}..{stats['max_len']}"
        )
    shape = list(opts.image_shape or stats.get("dims") or [stats["max_len"]])
    if math.prod(shape) != stats["max_len"]:
        raise InputError(
            f"image_shape {shape} does not match the {stats['max_len']} values in column {name!r}"
        )
    std = stats["std"] if stats["std"] > 1e-12 else 1.0
    return Feature(name, ARRAY, mean=stats["mean"], std=std, shape=shape)


def _shapes_message(name: str, stats: dict[str, Any]) -> str:
    """Why array column ``name`` is refused: its rows' arrays differ in size or shape
    (``stats["shapes"]``: the most common shapes with their row counts)."""
    shapes = stats["shapes"]
    n_shapes = max(int(stats.get("n_shapes") or 0), len(shapes))
    found = ", ".join(
        f"{'x'.join(map(str, s['shape']))} ({s['rows']} row{'s' if s['rows'] != 1 else ''})"
        for s in shapes
    )
    more = f" and {n_shapes - len(shapes)} more" if n_shapes > len(shapes) else ""
    if stats["min_len"] != stats["max_len"]:
        what = f"size; found sizes {stats['min_len']}..{stats['max_len']} in"
    else:
        what = "shape; found"
    return (
        f"array column {name!r} must hold arrays of one fixed {what} {n_shapes} shapes: "
        f"{found}{more}. Give every row the same shape in the query, or filter the others out"
    )


def _target(
    backend: Backend,
    conn: Connection,
    stage: str,
    opts: PackOptions,
    kind: ColumnKind,
    total: int,
) -> Target:
    name, col = opts.target, backend.q(opts.target)
    task = opts.task
    if task not in ("auto", "classification", "regression"):
        raise InputError(f"task={task!r}; use 'classification', 'regression' or 'auto'")
    if kind.kind == ARRAY:
        raise InputError(f"target column {name!r} holds arrays; it must be a label or a number")
    if task == "regression" and kind.kind != NUMERIC:
        raise InputError(
            f"target column {name!r} is not numeric ({kind.dbtype}); regression needs numbers"
        )
    counts = conn.execute(
        text(f"SELECT {col}, count(*) FROM {stage} GROUP BY {col} ORDER BY {col} LIMIT :cap"),
        {"cap": MAX_CLASSES + 1},
    ).all()
    classes = [r[0] for r in counts]
    if task == "auto":
        integral = all(float(c).is_integer() for c in classes) if kind.kind == NUMERIC else True
        small = len(classes) <= 20
        task = "classification" if kind.kind != NUMERIC or (integral and small) else "regression"
    if task == "classification":
        if len(classes) > MAX_CLASSES:
            raise InputError(f"target column {name!r} has more than {MAX_CLASSES} classes")
        if len(classes) < 2:
            raise InputError(
                f"target column {name!r} has a single class ({classes[0]!r}); classification "
                "needs at least two"
            )
        return Target(name, "classification", classes=[_plain(c) for c in classes])
    mean_sq = conn.execute(
        text(
            f"SELECT avg({backend.to_float(col)}), avg({backend.to_float(col)} * "
            f"{backend.to_float(col)}) FROM {stage}"
        )
    ).one()
    mean = float(mean_sq[0])
    std = math.sqrt(max(float(mean_sq[1]) - mean * mean, 0.0)) or 1.0
    return Target(name, "regression", mean=mean, std=std)


def _plain(value: Any) -> Any:
    """JSON-able Python value for a class label (Decimal → float/int)."""
    if isinstance(value, (str, bool, int, float)) or value is None:
        return value
    try:
        f = float(value)
        return int(f) if f.is_integer() else f
    except (TypeError, ValueError):
        return str(value)


def encode_sql(
    backend: Backend, encoding: Encoding, params: dict[str, Any], alias: str = "s"
) -> tuple[list[tuple[str, bool]], str]:
    """SQL pieces encoding one row's features, and the target expression (params filled in)."""
    pieces = feature_sql(backend, encoding, params, alias)
    t = encoding.target
    tcol = f"{alias}.{backend.q(t.name)}"
    if t.task == "classification":
        whens = []
        for j, cls in enumerate(t.classes):
            params[f"y_c{j}"] = cls
            whens.append(f"WHEN {tcol} = :y_c{j} THEN {j}")
        y_sql = f"(CASE {' '.join(whens)} ELSE -1 END)"
    else:
        params["y_m"], params["y_s"] = t.mean, t.std
        y_sql = f"(({backend.to_float(tcol)} - :y_m) / :y_s)"
    return pieces, y_sql


def feature_sql(
    backend: Backend, encoding: Encoding, params: dict[str, Any], alias: str = "s"
) -> list[tuple[str, bool]]:
    """SQL pieces ``(expression, is_bytes)`` encoding one row's features; params filled in.

    A backend may merge a wide row's pieces into fewer (SQLite's functions take at most 127
    arguments): see :meth:`Backend.group_pieces`.
    """
    pieces: list[tuple[str, bool]] = []
    for i, f in enumerate(encoding.features):
        col = f"{alias}.{backend.q(f.name)}"
        if f.kind == NUMERIC:
            params[f"f{i}_m"], params[f"f{i}_s"] = f.mean, f.std
            value = backend.to_float(col)
            if f.impute is not None:
                params[f"f{i}_i"] = f.impute
                value = f"COALESCE({value}, :f{i}_i)"
            pieces.append((f"(({value} - :f{i}_m) / :f{i}_s)", False))
        elif f.kind == CATEGORICAL:
            for j, cat in enumerate(f.categories):
                params[f"f{i}_c{j}"] = cat
                pieces.append((f"(CASE WHEN {col} = :f{i}_c{j} THEN 1.0 ELSE 0.0 END)", False))
        else:
            params[f"f{i}_m"], params[f"f{i}_s"] = f.mean, f.std
            pieces.append((backend.array_piece(col, f"f{i}_m", f"f{i}_s", f.width), True))
    return backend.group_pieces(pieces)


def choose_rows_per_buffer(
    n_train: int, width: int, batch_size: int, n_parameters: int = 0,
    min_buffers: int | None = None,
) -> int:
    """Rows per buffer, from the feature count, the model size and the run's segments.

    Large buffers (≈8 MB) cut the per-buffer crossing; ≥ 16 buffers keep shuffling fed; and a
    buffer holds at least as many bytes as the model's training state (≈ 12 bytes per
    parameter with Adam), which PostgreSQL passes through every transition. A run with
    segments needs ``min_buffers`` (segments × sync rounds × 2) so that every segment trains
    in every round: that need wins over the state rule. Always a multiple of the batch size,
    so only the last buffer ends with a short batch.
    """
    row_bytes = max(4 * width, 1)
    by_bytes = TARGET_BUFFER_BYTES // row_bytes
    by_count = math.ceil(n_train / 16)
    by_state = math.ceil(12 * n_parameters / row_bytes)
    rows = max(min(by_bytes, by_count), by_state)
    if min_buffers:
        rows = min(rows, math.ceil(n_train / max(16, min_buffers)))
    rows = max(batch_size, rows)
    return math.ceil(rows / batch_size) * batch_size


def pack(
    backend: Backend,
    conn: Connection,
    stage: str,
    packed: str,
    encoding: Encoding,
    n_rows: int,
    opts: PackOptions,
    val_stage: str | None = None,
) -> PackedData:
    """Create ``packed`` from ``stage`` (and ``val_stage``, a second query's rows).

    SQLite packs the rows :func:`infer_encoding` read into this process with numpy (the same
    bytes as the SQL path, see :mod:`~dbdl_magic.data.inprocess`); otherwise, and for input
    that path does not reproduce, the database packs them with SQL.
    """
    fetched = inprocess.take(conn, stage)
    params: dict[str, Any] = {"seed": opts.seed, "vseed": opts.seed + 7919}
    pieces, y_sql = encode_sql(backend, encoding, params)
    selected = ", ".join(f"{sql} AS p{i}" for i, (sql, _) in enumerate(pieces))
    h = backend.row_hash(f"s.{RN}", "seed")
    grp = f"CAST(s.{backend.q(opts.group_by)} AS TEXT)" if opts.group_by else "CAST(NULL AS TEXT)"
    h = f"{h} AS h, {grp} AS grp"
    columns = f"{h}, s.{RN} AS rn, {selected}, {y_sql} AS y"
    inner, n_train, n_val = _split_sql(backend, conn, stage, val_stage, n_rows, opts, params,
                                       columns)
    cols = ", ".join(f"e.p{i}" for i in range(len(pieces)))
    rows_sql = (
        "SELECT e.split AS split, e.grp AS grp, row_number() OVER (PARTITION BY e.split, e.grp"
        f" ORDER BY e.h, e.rn) - 1 AS ord, {cols}, e.y AS y FROM ({inner}) AS e"
    )
    groups = _group_sizes(conn, stage, val_stage, opts.group_by, backend) if opts.group_by else None
    # sized from all training rows, groups included: ≥ 16 buffers overall keep parallel workers
    # fed, and a small group fits in one buffer (per-buffer kernel calls are the fixed cost)
    rows = opts.rows_per_buffer or choose_rows_per_buffer(
        n_train, encoding.width, opts.batch_size, opts.n_parameters, opts.min_buffers
    )
    if rows < 1:
        raise InputError(f"rows_per_buffer={rows} must be positive")
    local = fetched is not None and fetched.n == n_rows and _pack_in_process(
        backend, conn, fetched, packed, encoding, opts, rows, params, pieces, y_sql, val_stage
    )
    if not local:
        backend.create_packed(
            conn,
            packed,
            rows_sql,
            pieces,
            y_sql,
            encoding.target.task == "classification",
            rows,
            params,
        )
    n_buffers = int(conn.execute(text(f"SELECT count(*) FROM {packed}")).scalar_one())
    if groups is not None:
        groups = _packed_group_rows(conn, packed, opts.group_by or "", groups)
    return PackedData(
        packed, encoding, n_train, n_val, n_buffers, rows, opts.n_parameters, groups,
        backend.fingerprint(conn, packed),
    )



def _split_sql(
    backend: Backend, conn: Connection, stage: str, val_stage: str | None, n_rows: int,
    opts: PackOptions, params: dict[str, Any], columns: str,
) -> tuple[str, int, int]:
    """The staged rows with their split (0 train, 1 validation) and ``columns``: the second
    query's rows are the validation rows, or a ``validation`` fraction of the rows is, chosen
    by a seeded hash of the row number. Returns the SQL and the train and validation counts."""
    if val_stage is not None:
        n_val = int(conn.execute(text(f"SELECT count(*) FROM {val_stage}")).scalar_one())
        if n_val == 0:
            raise InputError("the validation query returned no rows")
        inner = (
            f"SELECT 0 AS split, {columns} FROM {stage} AS s"
            f" UNION ALL SELECT 1 AS split, {columns} FROM {val_stage} AS s"
        )
        return inner, n_rows, n_val
    fraction = float(opts.validation or 0.0)
    if not 0.0 <= fraction < 1.0:
        raise InputError(f"validation={opts.validation!r} must be a fraction in [0, 1)")
    n_val = round(n_rows * fraction)
    if n_rows - n_val < 1:
        raise InputError(f"validation={fraction} leaves no training rows of {n_rows}")
    params["n_val"] = n_val
    vh = backend.row_hash(f"s.{RN}", "vseed")
    inner = (
        f"SELECT CASE WHEN row_number() OVER (ORDER BY {vh}, s.{RN}) <= :n_val THEN 1 ELSE 0"
        f" END AS split, {columns} FROM {stage} AS s"
    )
    return inner, n_rows - n_val, n_val


def _pack_in_process(
    backend: Backend,
    conn: Connection,
    fetched: inprocess.FetchedStage,
    packed: str,
    encoding: Encoding,
    opts: PackOptions,
    rows: int,
    params: dict[str, Any],
    pieces: list[tuple[str, bool]],
    y_sql: str,
    val_stage: str | None,
) -> bool:
    """Pack ``fetched`` (and ``val_stage``'s rows, encoded by SQL) into ``packed`` in this
    process; False, having created nothing, for input only the SQL path packs exactly."""
    grp = f"CAST(s.{backend.q(opts.group_by)} AS TEXT)" if opts.group_by else None
    try:
        train = inprocess.Part(
            fetched.rn,
            _column_values(conn, f"SELECT {grp} FROM {fetched.stage} AS s") if grp else None,
            inprocess.encode_rows(fetched, encoding),
            inprocess.encode_targets(fetched, encoding),
            np.zeros(fetched.n, dtype=np.int64),
        )
    except inprocess.NotHere:
        return False
    fetched.columns.clear()  # encoded: the raw values are no longer needed
    parts = [train]
    if val_stage is None:
        train.split = inprocess.split_by_hash(train.rn, int(params["vseed"]), int(params["n_val"]))
    else:
        selected = ", ".join(sql for sql, _ in pieces)
        rows_sql = (
            f"SELECT s.{RN}, {grp or 'NULL'}, {selected}, {y_sql} FROM {val_stage} AS s"
        )
        found = backend.run_kernels(conn, rows_sql, params).all()  # kernel errors as such
        y_type = "<i4" if encoding.target.task == "classification" else "<f4"
        parts.append(inprocess.Part(
            np.array([r[0] for r in found], dtype=np.int64),
            [r[1] for r in found] if grp else None,
            inprocess.rows_from_pieces([tuple(r[2:-1]) for r in found], encoding.width),
            np.asarray([r[-1] for r in found], dtype=y_type),
            np.ones(len(found), dtype=np.int64),
        ))
    inprocess.write_packed(conn, packed, parts, opts.seed, rows)
    return True


def _column_values(conn: Connection, sql: str) -> list[Any]:
    """The one column ``sql`` returns, in order."""
    return [r[0] for r in conn.execute(text(sql)).cursor.fetchall()]


def _group_sizes(
    conn: Connection, stage: str, val_stage: str | None, column: str, backend: Backend
) -> dict[str, dict[str, int]]:
    """The group values of the training rows; refuses NULL groups and too many groups."""
    col = backend.q(column)
    rows = conn.execute(
        text(f"SELECT CAST({col} AS TEXT), count(*) FROM {stage} GROUP BY 1 ORDER BY 1")
    ).all()
    nulls = sum(n for g, n in rows if g is None)
    if nulls:
        raise InputError(
            f"group_by column {column!r} is NULL in {nulls} row(s); filter them out or "
            f"COALESCE them to a group value"
        )
    if len(rows) > MAX_GROUPS:
        raise InputError(
            f"group_by column {column!r} has {len(rows)} distinct values (at most {MAX_GROUPS})"
        )
    return {str(g): {"train": 0, "validation": 0} for g, _ in rows}


def _packed_group_rows(
    conn: Connection, packed: str, column: str, groups: dict[str, dict[str, int]]
) -> dict[str, dict[str, int]]:
    """Training/validation rows per group as packed; a group without training rows is refused."""
    for grp, split, n in conn.execute(
        text(f"SELECT p.grp, p.split, sum(p.n) FROM {packed} AS p GROUP BY p.grp, p.split")
    ).all():
        entry = groups.setdefault(str(grp), {"train": 0, "validation": 0})
        entry["validation" if split else "train"] += int(n)
    empty = [g for g, n in groups.items() if n["train"] == 0]
    if empty:
        raise InputError(
            f"group_by column {column!r}: group(s) {', '.join(map(repr, empty[:5]))} have no "
            "training rows (all their rows went to validation); filter them out or use a "
            "smaller validation fraction"
        )
    return groups
