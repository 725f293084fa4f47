"""In-database prediction: score a query's rows with a stored model, inside the database.

The model's weights never leave the database. The scoring pass reads the rows a buffer at a
time, with each row's raw feature values (numbers, the index of a category, array elements)
gathered into one array per buffer; the kernel encodes them with the model's stored encoding
and scores the whole buffer in one call (decoding the model once per process), and the key
columns plus the predictions are written to a table (``into``) or returned as a DataFrame:

* PostgreSQL stages the query once (unlogged, no row numbers: the table's order is the
  query's), reads it by ranges of heap pages and writes ``into`` in one ``CREATE TABLE AS``:
  arrays cross into and out of PL/Python as bytes, never as a Python object per value;
* SQLite runs the query itself once, in this process: numpy builds the raw matrix of each
  fetched buffer and one executemany writes it back.

The pass assumes valid values (checking every value first would cost a scan of its own);
when it fails, the query is staged whole and checked, and the error names the column at fault
(NULLs without impute, text in a numeric column, arrays of another size).

A per-group model (``group_by``) routes the staged rows by ``CAST(<group column> AS TEXT)`` to
one sub-stage per group, scores each with its group's checkpoint (rows of groups without a
model with ``fallback``, or an error naming them) and puts the union back in query order.
"""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass
from typing import Any

import pandas as pd
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from dbdl_magic.backends.base import Backend, Scoring
from dbdl_magic.data.encoding import ARRAY, CATEGORICAL, NUMERIC, Encoding
from dbdl_magic.data.packing import (
    ONE_STATEMENT,
    RN,
    _aggregate_row,
    _is_table_name,
    _quote_dotted,
    stage_query,
)
from dbdl_magic.errors import DbdlError, InputError
from dbdl_magic.store import registry
from dbdl_magic.store.modules import is_router, unknown_groups_message

ROWS_PER_BUFFER = 8192
ORIG = "__dbdl_orig_rn"  # a per-group stage's row number in the query (orders the union back)
MEMBER = "__dbdl_member"  # routed row → index of the group model (-1: the fallback)
SUB = "__dbdl_sub_rn"  # routed row → its row number within its group (1..n, contiguous)
PREDICTION = "prediction"
# PostgreSQL cuts identifiers to 63 bytes (NAMEDATALEN - 1); both backends keep to it
MAX_NAME_BYTES = 63


def prediction_columns(
    encoding: Encoding, proba: bool, keys: list[str] | tuple[str, ...] = ()
) -> list[str]:
    """Names of the output columns after the key columns: ``prediction``, then with ``proba``
    one probability column per class (see :func:`proba_columns`)."""
    columns = [PREDICTION]
    if proba and encoding.target.task == "classification":
        columns += proba_columns(encoding.target.classes, [*keys, PREDICTION])
    return columns


def proba_columns(classes: list[Any], taken: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The probability column of each class, in the model's class order (``model.classes_``).

    A class's column is ``proba_<class>``, unless that name is longer than 63 bytes (PostgreSQL
    would cut it, and two long labels with the same first bytes would collide) or equals, up to
    ASCII case (SQLite ignores it), a name in ``taken`` (the key columns and ``prediction``) or
    an earlier class's column. Then it is cut to fit and ends in ``~<j>``, ``j`` being the
    class's index in ``classes``: ``proba_<first bytes of the label>~3`` is ``classes[3]``.
    Both backends name the columns alike; a returned DataFrame also maps each column to its
    class in ``frame.attrs["proba_columns"]``.
    """
    seen = {_fold(t) for t in taken}
    names = []
    for j, label in enumerate(classes):
        name = f"proba_{label}"
        if len(name.encode()) > MAX_NAME_BYTES or _fold(name) in seen:
            base, name, n = name, _fit(name, f"~{j}"), 0
            while _fold(name) in seen:  # a label that already reads like a cut name
                n += 1
                name = _fit(base, f"~{j}_{n}")
        seen.add(_fold(name))
        names.append(name)
    return names


def _fold(name: str) -> bytes:
    """A column name as SQLite compares them (ASCII letters without case)."""
    return name.encode().lower()


def _fit(name: str, suffix: str) -> str:
    """``name`` cut (on a character boundary) so that it ends in ``suffix`` within 63 bytes."""
    room = MAX_NAME_BYTES - len(suffix.encode())
    return name.encode()[:room].decode(errors="ignore") + suffix


def kernel_config(row: dict[str, Any], encoding: Encoding, backend: Backend) -> dict[str, Any]:
    """What the predict kernel needs to rebuild and run the network, and ``columns``: how to
    encode a row of raw feature values (see :func:`dbdl_magic.kernel.predict.encode_raw`)."""
    return {
        "spec": row["spec"], "input_shape": encoding.input_shape,
        "n_outputs": encoding.target.n_outputs, "task": encoding.target.task,
        "byteorder": backend.byteorder,
        "target_scale": [encoding.target.mean, encoding.target.std],
        "columns": [{"name": f.name, "kind": f.kind, "mean": f.mean, "std": f.std,
                     "width": f.width} for f in encoding.features],
    }


def feature_specs(encoding: Encoding) -> list[dict[str, Any]]:
    """The features as the backends phrase their raw values in SQL (name, kind, categories,
    impute, width)."""
    return [{**asdict(f), "width": f.width} for f in encoding.features]


def _check_features(
    backend: Backend, conn: Any, stage: str, encoding: Encoding, values: bool = True,
    typed: bool = True,
) -> list[str]:
    """The staged columns; refuses missing and (``typed``: the stage holds the rows, or the
    database declares its column types) mistyped feature columns and (``values``) NULL
    features the model does not impute, naming them."""
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
        if typed and f.kind != CATEGORICAL and kinds[f.name].kind != f.kind
    ]
    if wrong:
        raise InputError("mistyped feature column(s): " + "; ".join(wrong))
    if values:
        _check_values(backend, conn, stage, encoding)
    return list(kinds)


def _check_values(backend: Backend, conn: Any, stage: str, encoding: Encoding) -> None:
    """Refuse NULL features the model does not impute and arrays of another size than it was
    trained on (one scan). Scored as they were, PostgreSQL's packing would drop such a row
    from its buffer and shift the predictions of the rows after it; SQLite's would score NaN.
    """
    checks: list[tuple[str, str]] = []  # (message, SQL counting the offending rows)
    for f in encoding.features:
        col = backend.q(f.name)
        if f.kind == CATEGORICAL or (f.kind == NUMERIC and f.impute is not None):
            continue  # NULL: no category / the imputed value
        checks.append((f"column {f.name!r} has {{n}} NULL value(s) and the model was trained "
                       "without impute: fill them in the query or filter those rows out",
                       f"count(*) - count({col})"))
        if f.kind == ARRAY:
            pg = backend.name == "postgresql"
            bad = (f"cardinality({col}) <> {f.width} OR CASE WHEN array_ndims({col}) = 1 THEN"
                   f" array_position({col}, NULL) IS NOT NULL ELSE EXISTS (SELECT 1 FROM"
                   f" unnest({col}) AS e(v) WHERE e.v IS NULL) END"  # NULL elements
                   if pg else f"length({col}) <> {4 * f.width}")
            checks.append((f"array column {f.name!r} has {{n}} row(s) whose array does not hold"
                           f" the {f.width} non-NULL values (shape {f.shape}) the model was"
                           " trained on",
                           f"sum(CASE WHEN {bad} THEN 1 ELSE 0 END)"))
    if not checks:
        return
    counts = _aggregate_row(conn, stage, [sql for _, sql in checks])
    found = [message.format(n=int(n)) for (message, _), n in zip(checks, counts, strict=True)
             if n]
    if found:
        raise InputError("; ".join(found))


def _key_columns(encoding: Encoding, columns: list[str], keys: list[str] | None) -> list[str]:
    """The columns copied beside the predictions: ``keys``, or every non-feature column."""
    features = set(encoding.feature_names())
    chosen = keys if keys is not None else [
        c for c in columns if c not in features and c != encoding.target.name
    ]
    unknown = [k for k in chosen if k not in columns]
    if unknown:
        raise InputError(f"key column(s) {', '.join(map(repr, unknown))} not in the query")
    clash = [k for k in chosen if _fold(k) == _fold(PREDICTION)]
    if clash:
        raise InputError(
            f"key column {clash[0]!r} would clash with the output column {PREDICTION!r}; "
            "rename it in the query (AS) or leave it out of keys="
        )
    return chosen


def _driver_name(quoted: str) -> str:
    """A quoted table name as the database sees it (``text()`` reads ``\\:`` as ``:``)."""
    return quoted.replace("\\:", ":")


def _begin_ddl(backend: Backend, conn: Any) -> None:
    """Make the CREATE/DROP TABLE of this transaction roll back with it on SQLite too.

    Python's sqlite3 begins a transaction only before INSERT/UPDATE/DELETE, so a CREATE TABLE
    would commit on its own and a failed prediction left an empty or partial ``into`` table
    (and ``replace=True`` had dropped the old one); an explicit BEGIN takes them in.
    PostgreSQL's DDL is transactional anyway.
    """
    if backend.name == "sqlite":
        conn.exec_driver_sql("BEGIN")


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
    fallback: Any = None,
) -> pd.DataFrame | int:
    """Score ``query`` with model ``name``; see :func:`dbdl_magic.api.predict`."""
    engine = backend.engine
    row, fb_row = _model_rows(backend, name, version, fallback, proba)
    if is_router(row):
        return _predict_grouped(backend, row, query, into=into, proba=proba, keys=keys,
                                params=params, replace=replace, fallback=fb_row)
    if row["iteration"] is None:
        raise InputError(f"model {name!r} has no checkpoint to predict with")
    token = uuid.uuid4().hex[:12]
    stage = backend.table(f"stage_{token}")
    result = _quote_dotted(backend, into) if into else backend.table(f"pred_{token}")
    encoding = Encoding.from_json(row["encoding"])
    key = {"name": row["name"], "version": row["version"], "iteration": row["iteration"]}
    failed: BaseException | None = None  # the scoring pass's own failure
    try:
        with engine.begin() as conn:
            if into:  # the into table appears whole or not at all
                _begin_ddl(backend, conn)
            registry.ensure_hot_state(conn, backend, key, int(key["iteration"]))
            source, source_params = _stage_source(backend, conn, query, params or {}, stage)
            # SQLite staged no rows: its column types are the values', checked as they come
            columns = _check_features(backend, conn, stage, encoding, values=False,
                                      typed=backend.name != "sqlite")
            key_columns = _key_columns(encoding, columns, keys)
            outputs = prediction_columns(encoding, proba, key_columns)
            if into and replace:
                backend.drop_table(conn, result)
            if into and backend.table_exists(conn, _driver_name(result)):
                raise InputError(f"table {into!r} already exists; pass replace=True to overwrite")
            try:
                backend.predict_into(conn, Scoring(
                    source, result, feature_specs(encoding), source_params, key_columns,
                    outputs, encoding.target.classes, kernel_config(row, encoding, backend), key,
                    ROWS_PER_BUFFER, with_rn=not into,
                ))
            except (DBAPIError, DbdlError, ValueError) as exc:
                failed = exc
                raise
            if into:
                return int(conn.execute(text(f"SELECT count(*) FROM {result}")).scalar_one())
            frame = pd.read_sql(text(f"SELECT * FROM {result} ORDER BY {backend.q(RN)}"), conn)
            return _with_mapping(frame.drop(columns=[RN]).reset_index(drop=True), outputs,
                                 encoding)
    except (DBAPIError, DbdlError, ValueError) as exc:
        if exc is failed:  # rolled back: now say which value was at fault, if one was
            _explain_failure(backend, query, params or {}, encoding, exc)
        raise
    finally:
        with engine.begin() as conn:
            for table in (stage,) if into else (stage, result):
                backend.drop_table(conn, table)


def _model_rows(
    backend: Backend, name: str, version: int | None, fallback: Any, proba: bool
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Model ``name``'s row and, for a per-group model, its ``fallback`` model's row (None
    without one); a fallback for a model that is not per-group is refused."""
    with backend.engine.connect() as conn:
        row = registry.read_model(conn, backend, name, version, with_state=False)
        if is_router(row):
            return row, _fallback_row(conn, backend, fallback, row, proba) if fallback else None
    if fallback is not None:
        raise InputError(
            f"fallback= applies to per-group models (trained with group_by); model {name!r}"
            f" version {row['version']} scores every row itself"
        )
    return row, None


def _stage_source(
    backend: Backend, conn: Any, query: str, params: dict[str, Any], stage: str
) -> tuple[str, dict[str, Any]]:
    """Stage what prediction reads; returns the relation the scoring pass reads and its
    parameters. PostgreSQL stages the query's rows once, unlogged and without row numbers
    (their order in the table is the query's); the pass reads the table by ranges of pages.
    SQLite stages no rows, only the query's columns (for the checks): the pass runs the query
    itself, once."""
    if backend.name == "postgresql":
        stage_query(backend, conn, query, params, stage, what="query", numbered=False,
                    create="CREATE UNLOGGED TABLE")
        return stage, {}
    stage_query(backend, conn, query, params, stage, what="query", numbered=False, limit=0)
    body = query.strip().rstrip(";").strip()
    if _is_table_name(body):
        body = f"SELECT * FROM {_quote_dotted(backend, body)}"
    return (f"(SELECT src.* FROM ({body}) AS src WHERE CAST(:{ONE_STATEMENT} AS INTEGER) = 1)",
            {**params, ONE_STATEMENT: 1})


def _explain_failure(
    backend: Backend, query: str, params: dict[str, Any], encoding: Encoding, exc: BaseException
) -> None:
    """After a failed scoring pass: stage the query whole and check its feature values (types,
    NULLs, array sizes); raise the :class:`InputError` naming what is wrong, if anything is.
    The pass assumes valid values and finds out cheaply when they are not; this says which."""
    check = backend.table(f"check_{uuid.uuid4().hex[:12]}")
    try:
        with backend.engine.begin() as conn:
            stage_query(backend, conn, query, params, check, what="query")
            try:
                _check_features(backend, conn, check, encoding)
            except InputError as found:
                raise found from exc
    finally:
        with backend.engine.begin() as conn:
            backend.drop_table(conn, check)


def _with_mapping(frame: pd.DataFrame, outputs: list[str], encoding: Encoding) -> pd.DataFrame:
    """``frame.attrs["proba_columns"]``: each probability column → its class label."""
    if len(outputs) > 1:
        frame.attrs["proba_columns"] = dict(zip(outputs[1:], encoding.target.classes,
                                                strict=True))
    return frame


# -- per-group models ----------------------------------------------------------------------------


def _fallback_row(
    conn: Any, backend: Backend, fallback: Any, router: dict[str, Any], proba: bool
) -> dict[str, Any]:
    """The stored model that scores rows of unknown groups: ``"name[:version]"`` (or a loaded
    model), with a checkpoint, the same feature names and task as the group models."""
    if isinstance(fallback, str):
        fb_name, _, tail = fallback.rpartition(":")
        if not fb_name or not tail.strip().isdigit():
            fb_name, tail = fallback, ""
        fb_version = int(tail) if tail else None
    elif hasattr(fallback, "name") and hasattr(fallback, "version"):
        fb_name, fb_version = fallback.name, int(fallback.version)
    else:
        raise InputError(f"fallback={fallback!r} must be a stored model's 'name' or 'name:version'")
    row = registry.read_model(conn, backend, fb_name, fb_version, with_state=False)
    what = f"fallback model {row['name']!r} version {row['version']}"
    if is_router(row):
        raise InputError(f"{what} is itself a per-group model; the fallback must be one model")
    if row["iteration"] is None:
        raise InputError(f"{what} has no checkpoint to predict with")
    mine, theirs = Encoding.from_json(router["encoding"]), Encoding.from_json(row["encoding"])
    if set(mine.feature_names()) != set(theirs.feature_names()):
        extra = sorted(set(theirs.feature_names()) - set(mine.feature_names()))
        lacks = sorted(set(mine.feature_names()) - set(theirs.feature_names()))
        raise InputError(
            f"{what} was trained on other features than {router['name']!r}"
            + (f"; it also uses {', '.join(map(repr, extra))}" if extra else "")
            + (f"; it lacks {', '.join(map(repr, lacks))}" if lacks else "")
        )
    if theirs.target.task != mine.target.task:
        raise InputError(
            f"{what} is a {theirs.target.task} model but {router['name']!r} is a "
            f"{mine.target.task} model"
        )
    if mine.target.task == "classification":
        if proba and list(theirs.target.classes) != list(mine.target.classes):
            raise InputError(
                f"{what} has classes {theirs.target.classes}, not {mine.target.classes}; "
                "probabilities need the same classes (or predict without proba)"
            )
        kinds = {isinstance(c, str) for c in [*mine.target.classes, *theirs.target.classes]}
        if len(kinds) > 1:
            raise InputError(f"{what} has labels of another type than {router['name']!r}")
    return row


def _predict_grouped(
    backend: Backend,
    router: dict[str, Any],
    query: str,
    *,
    into: str | None,
    proba: bool,
    keys: list[str] | None,
    params: dict[str, Any] | None,
    replace: bool,
    fallback: dict[str, Any] | None,
) -> pd.DataFrame | int:
    """Score ``query`` with a per-group model inside the database.

    The query is staged once and its rows routed by ``CAST(group_by AS TEXT)`` (the text the
    groups were trained under) into one sub-stage per group, numbered 1..n in query order; each
    is scored by its group's checkpoint (rows of unknown groups by ``fallback``) and the
    results are unioned and put back in query order. Every group runs in its own transaction
    (a few tables each), so thousands of groups do not pile up locks.
    """
    engine, q = backend.engine, backend.q
    token = uuid.uuid4().hex[:12]
    union = backend.table(f"pred_{token}")
    result = _quote_dotted(backend, into) if into else None
    work = [union]
    try:
        routing = _route_rows(backend, router, query, params or {}, token, work,
                              proba=proba, keys=keys, into=into if not replace else None,
                              has_fallback=fallback is not None)
        plan: list[tuple[int, dict[str, Any] | None]] = [
            (i, None) for i in range(len(routing.scored))
        ] + ([(-1, fallback)] if routing.unknown else [])
        if not plan:  # no rows: score nothing with the first group model, for the columns
            routing.scored, plan = [next(iter(routing.groups))], [(0, None)]
        fb_features = Encoding.from_json(fallback["encoding"]).feature_names() if fallback else []
        routing.needed += [c for c in fb_features if c not in routing.needed]
        for step, (member, stored) in enumerate(plan):
            _score_group(backend, router["name"], routing, step, member, stored, union, work)
        selected = ", ".join(q(c) for c in [*routing.key_columns, *routing.outputs])
        with engine.begin() as conn:
            ordered = f"SELECT {selected} FROM {union} ORDER BY {q(ORIG)}"
            if result is None:
                return _with_mapping(pd.read_sql(text(ordered), conn).reset_index(drop=True),
                                     routing.outputs, routing.encoding)
            _begin_ddl(backend, conn)  # replace: the old table goes only with the new one made
            if replace:
                backend.drop_table(conn, result)
            elif backend.table_exists(conn, _driver_name(result)):
                raise InputError(f"table {into!r} already exists; pass replace=True to overwrite")
            conn.execute(text(f"CREATE TABLE {result} AS {ordered}"))
            return int(conn.execute(text(f"SELECT count(*) FROM {result}")).scalar_one())
    finally:
        with engine.begin() as conn:
            for table in work:
                backend.drop_table(conn, table)


@dataclass
class _Routing:
    """A per-group prediction's staged rows, routed: the table ``routed`` holds every row with
    its group's member index (``-1``: a group the router has no model for) and its number
    within that member (``SUB``); ``scored`` are the groups that have rows, in member order."""

    routed: str
    token: str
    groups: dict[str, int]
    encoding: Encoding
    key_columns: list[str]
    outputs: list[str]
    scored: list[str]
    unknown: list[Any]
    needed: list[str]


def _route_rows(
    backend: Backend, router: dict[str, Any], query: str, params: dict[str, Any], token: str,
    work: list[str], *, proba: bool, keys: list[str] | None, into: str | None,
    has_fallback: bool,
) -> _Routing:
    """Stage ``query`` and route its rows to the router's groups (one transaction); the
    tables made are added to ``work``. ``into`` (when given) must not exist yet; rows of
    groups the router has no model for are refused unless there is a fallback model."""
    q, name, options = backend.q, router["name"], router["options"]
    group_by = str(options.get("group_by") or "")
    groups = {str(g): int(v) for g, v in options["groups"].items()}
    encoding = Encoding.from_json(router["encoding"])
    stage, routes, routed = (backend.table(f"{t}_{token}") for t in ("stage", "routes", "routed"))
    work += [stage, routes, routed]
    with backend.engine.begin() as conn:
        stage_query(backend, conn, query, params, stage)
        columns = _check_features(backend, conn, stage, encoding)
        if group_by not in columns:
            raise InputError(
                f"the query lacks the group_by column {group_by!r}: model {name!r} version "
                f"{router['version']} has one model per {group_by} value and routes every "
                f"row by that column"
            )
        key_columns = _key_columns(encoding, columns, keys)
        outputs = prediction_columns(encoding, proba, key_columns)
        result = _quote_dotted(backend, into) if into else None
        if result and backend.table_exists(conn, _driver_name(result)):
            raise InputError(f"table {into!r} already exists; pass replace=True to overwrite")
        found = conn.execute(
            text(f"SELECT CAST({q(group_by)} AS TEXT), count(*) FROM {stage} GROUP BY 1")
        ).all()
        present = {str(g) for g, _ in found if g is not None and str(g) in groups}
        unknown = sorted((g for g, _ in found if g is None or str(g) not in groups),
                         key=lambda g: (g is not None, str(g)))
        if unknown and not has_fallback:
            raise InputError(unknown_groups_message(group_by, unknown, groups, api=True))
        scored = [g for g in groups if g in present]  # in the router's group order
        conn.execute(text(f"CREATE TABLE {routes} (grp TEXT, {q(MEMBER)} INTEGER)"))
        if scored:
            conn.execute(
                text(f"INSERT INTO {routes} (grp, {q(MEMBER)}) VALUES (:g, :m)"),
                [{"g": g, "m": i} for i, g in enumerate(scored)],
            )
        conn.execute(
            text(
                f"CREATE TABLE {routed} AS SELECT row_number() OVER (PARTITION BY"
                f" COALESCE(rt.{q(MEMBER)}, -1) ORDER BY s.{q(RN)}) AS {q(SUB)},"
                f" COALESCE(rt.{q(MEMBER)}, -1) AS {q(MEMBER)}, s.* FROM {stage} AS s"
                f" LEFT JOIN {routes} AS rt ON rt.grp = CAST(s.{q(group_by)} AS TEXT)"
            )
        )
        if backend.name == "postgresql":
            conn.execute(text(f"CREATE INDEX ON {routed} ({q(MEMBER)})"))
        else:
            index = backend.table(f"routed_ix_{token}")
            conn.execute(text(f"CREATE INDEX {index} ON {routed} ({q(MEMBER)})"))
    needed = list(dict.fromkeys([*key_columns, *encoding.feature_names()]))
    return _Routing(routed, token, groups, encoding, key_columns, outputs, scored, unknown,
                    needed)


def _score_group(
    backend: Backend, name: str, routing: _Routing, step: int, member: int,
    stored: dict[str, Any] | None, union: str, work: list[str],
) -> None:
    """Score the routed rows of ``member`` (``-1``: the unknown groups' rows, by the fallback
    model ``stored``) in a transaction of their own and add them to ``union``."""
    q = backend.q
    sub, res = (backend.table(f"{t}{step}_{routing.token}") for t in ("gstage", "gpred"))
    work += [sub, res]
    kept = ", ".join(f"r.{q(c)}" for c in routing.needed)
    with backend.engine.begin() as conn:
        if stored is None:
            stored = registry.read_model(
                conn, backend, name, routing.groups[routing.scored[member]], with_state=False
            )
        if stored["iteration"] is None:
            raise InputError(
                f"model {name!r} version {stored['version']} (group "
                f"{routing.scored[member]!r}) has no checkpoint to predict with"
            )
        enc = Encoding.from_json(stored["encoding"])
        key = {"name": stored["name"], "version": stored["version"],
               "iteration": stored["iteration"]}
        registry.ensure_hot_state(conn, backend, key, int(key["iteration"]))
        conn.execute(
            text(
                f"CREATE TABLE {sub} AS SELECT r.{q(SUB)} AS {q(RN)},"
                f" r.{q(RN)} AS {q(ORIG)}, {kept} FROM {routing.routed} AS r"
                f" WHERE r.{q(MEMBER)} = :m"
            ),
            {"m": member},
        )
        backend.predict_into(conn, Scoring(
            sub, res, feature_specs(enc), {}, [*routing.key_columns, ORIG],
            routing.outputs, enc.target.classes, kernel_config(stored, enc, backend), key,
            ROWS_PER_BUFFER, with_rn=False,
        ))
        if step == 0:
            conn.execute(text(f"CREATE TABLE {union} AS SELECT * FROM {res}"))
        else:
            conn.execute(text(f"INSERT INTO {union} SELECT * FROM {res}"))
        for table in (sub, res):
            backend.drop_table(conn, table)
