"""Bad input: every case raises the specific error, names the culprit and leaves nothing behind.

Each test asserts (a) the exact exception class, (b) that the message names the column, table,
option or layer at fault, and (c) that no work table (staged query, packed buffers, iteration
scratch) remains and, for input errors, that no model row was created.
"""

from __future__ import annotations

import json
import math
import os
import re
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pandas as pd
import pytest
from pgserver import PostgresServer
from sqlalchemy import text
from torch import nn

import dbdl_magic as dl
from dbdl_magic.api import Database
from dbdl_magic.backends.postgres import install_sql
from dbdl_magic.errors import DbdlError, InputError, InstallError, SpecError, TrainingError
from dbdl_magic.events import Callbacks

# Work tables the library creates (SQLite names carry a ``dbdl_`` prefix).
WORK_PREFIXES = (
    "dbdl_stage_",
    "dbdl_vstage_",
    "dbdl_packed_",
    "dbdl_iter_",
    "iter_",
    "stage_",
    "vstage_",
    "packed_",
)
_STORE_TABLES: dict[str, frozenset[str]] = {}
VICTIM = "victim"

BASE_COLUMNS = [
    ("x1", "double precision"),
    ("x2", "double precision"),
    ("color", "text"),
    ("y", "integer"),
]


# -- fixtures ---------------------------------------------------------------------------------
@pytest.fixture
def pg_db(module_pg_db: Database) -> Database:
    """Overrides conftest's ``pg_db`` (and so ``db``): the module's database, emptied first.

    A fresh database per test costs a server connection that imports torch (seconds); here the
    pooled connection keeps it. Emptying drops every user table and work table and truncates
    the model store, so each test starts as on a fresh install.
    """
    db = module_pg_db
    with db.engine.begin() as conn:
        rows = conn.execute(
            text(
                "SELECT schemaname, tablename FROM pg_tables WHERE schemaname NOT IN"
                " ('pg_catalog', 'information_schema')"
            )
        ).all()
        store = store_tables(db)
        for schema, name in rows:
            if schema not in ("dbdl", "dbdl_store") or name not in store:
                conn.execute(
                    text(
                        f"DROP TABLE IF EXISTS {db.backend.q(schema)}.{db.backend.q(name)} CASCADE"
                    )
                )
        owned = ", ".join(f"dbdl_store.{db.backend.q(n)}" for n in sorted(store - {"meta"}))
        conn.execute(text(f"TRUNCATE {owned} CASCADE"))
    assert work_tables(db) == [] and model_rows(db).empty
    return db


# -- helpers ----------------------------------------------------------------------------------
def is_pg(db: Database) -> bool:
    """Whether ``db`` is the PostgreSQL backend."""
    return db.backend.name == "postgresql"


def store_tables(db: Database) -> frozenset[str]:
    """Names of the model store's tables (models, checkpoints, meta, ...), as installed.

    PostgreSQL: the tables the install script creates in schemas ``dbdl``/``dbdl_store``;
    SQLite: the ``dbdl_*`` tables of a freshly installed in-memory database.
    """
    name = db.backend.name
    if name not in _STORE_TABLES:
        if is_pg(db):
            found = re.findall(
                r"CREATE\s+(?:UNLOGGED\s+)?TABLE\s+IF\s+NOT\s+EXISTS\s+dbdl(?:_store)?\.(\w+)",
                install_sql(),
            )
        else:
            fresh = dl.install("sqlite://")
            with fresh.engine.connect() as conn:
                found = [
                    r[0]
                    for r in conn.execute(
                        text("SELECT name FROM sqlite_master WHERE type = 'table'")
                    )
                ]
            fresh.engine.dispose()
        _STORE_TABLES[name] = frozenset(found)
        assert {"models", "checkpoints", "meta"} <= {n.removeprefix("dbdl_") for n in found}
    return _STORE_TABLES[name]


def work_tables(db: Database) -> list[str]:
    """Work tables left in ``db``: anything dbdl creates for a run besides its model store.

    SQLite: tables in ``sqlite_master`` named ``dbdl_*`` other than the store's, or with a work
    prefix. PostgreSQL: tables in schemas ``dbdl``/``dbdl_store`` other than the store's, every
    table in the role's work schema ``dbdl_work_*``, plus work-prefixed tables anywhere.
    """
    store = store_tables(db)
    with db.engine.connect() as conn:
        if is_pg(db):
            rows = conn.execute(
                text(
                    "SELECT schemaname, tablename FROM pg_tables WHERE schemaname NOT IN"
                    " ('pg_catalog', 'information_schema')"
                )
            ).all()
            return sorted(
                f"{schema}.{name}"
                for schema, name in rows
                if (schema in ("dbdl", "dbdl_store") and name not in store)
                or schema.startswith("dbdl_work_")  # the role's own work schema
                or name.startswith(WORK_PREFIXES)
            )
        names = [
            r[0]
            for r in conn.execute(
                text("SELECT name FROM sqlite_master WHERE type IN ('table', 'view')")
            )
        ]
    return sorted(
        n
        for n in names
        if n.startswith(WORK_PREFIXES) or (n.startswith("dbdl_") and n not in store)
    )


def model_rows(db: Database) -> pd.DataFrame:
    """The model store's rows (one per model version)."""
    return dl.list_models(db)


def make_table(
    db: Database,
    name: str,
    columns: Sequence[tuple[str, str]],
    rows: Sequence[Sequence[Any]],
) -> None:
    """Create table ``name`` (any identifier, quoted here) and insert ``rows`` as bound values."""
    q = db.backend.q
    # User tables go to public explicitly: schema dbdl holds only what the library creates.
    table = f"public.{q(name)}" if is_pg(db) else q(name)
    cols = ", ".join(f"{q(c)} {t}" for c, t in columns)
    marks = ", ".join(f":p{i}" for i in range(len(columns)))
    with db.engine.begin() as conn:
        conn.execute(text(f"CREATE TABLE {table} ({cols})"))
        if rows:
            conn.execute(
                text(f"INSERT INTO {table} VALUES ({marks})"),
                [{f"p{i}": v for i, v in enumerate(row)} for row in rows],
            )


def base_rows(n: int = 30) -> list[tuple[Any, ...]]:
    """Small, learnable classification rows for :data:`BASE_COLUMNS`."""
    colors = ["red", "green", "blue"]
    return [(i * 0.5, float((i * 7) % 5), colors[i % 3], int(i % 2)) for i in range(n)]


def make_base(db: Database, name: str = "t", n: int = 30) -> None:
    """Create the standard table ``t`` (x1, x2, color, y)."""
    make_table(db, name, BASE_COLUMNS, base_rows(n))


def execute(db: Database, sql: str, params: dict[str, Any] | None = None) -> None:
    """Run one statement in its own transaction."""
    with db.engine.begin() as conn:
        conn.execute(text(sql), params or {})


def assert_clean(db: Database, models_before: int | None = 0) -> None:
    """No work table remains; unless ``models_before`` is None, no model row was added."""
    assert work_tables(db) == []
    if models_before is not None:
        assert len(model_rows(db)) == models_before, "an input error must not create a model row"


def expect_failure(
    db: Database,
    error: type[DbdlError],
    culprits: Sequence[str],
    query: str = "SELECT * FROM t",
    **kwargs: Any,
) -> DbdlError:
    """Train and assert ``error`` (exactly), every culprit named, nothing left behind."""
    kwargs.setdefault("target", "y")
    kwargs.setdefault("model", "mlp:4")
    kwargs.setdefault("epochs", 1)
    before = len(model_rows(db))
    with pytest.raises(DbdlError) as info:
        dl.train(db, query, **kwargs)
    exc = info.value
    assert type(exc) is error, f"expected {error.__name__}, got {type(exc).__name__}: {exc}"
    message = str(exc)
    for culprit in culprits:
        assert culprit in message, f"{culprit!r} not named in: {message}"
    assert_clean(db, None if error is TrainingError else before)
    return exc


def mentions_count(message: str, count: int) -> bool:
    """Whether ``message`` states the number ``count`` as a whole word."""
    return re.search(rf"(?<![\d.]){count}(?![\d.])", message) is not None


# -- the query and its columns ----------------------------------------------------------------
def test_empty_result_set(db: Database) -> None:
    """A query returning no rows is refused before anything is stored."""
    make_base(db)
    exc = expect_failure(db, InputError, ["no rows"], "SELECT * FROM t WHERE x1 < -1000")
    assert "query" in str(exc)


def test_empty_query_text(db: Database) -> None:
    """A blank query is refused as such."""
    expect_failure(db, InputError, ["query", "empty"], "  ;  ")


def test_missing_target_column_lists_columns(db: Database) -> None:
    """The message names the missing target and lists the query's columns."""
    make_base(db)
    expect_failure(db, InputError, ["'label'", "x1", "x2", "color", "y"], target="label")


def test_missing_feature_column(db: Database) -> None:
    """A name in ``features=[...]`` that the query lacks is named."""
    make_base(db)
    expect_failure(db, InputError, ["'ghost'"], features=["x1", "ghost"])


def test_target_listed_as_feature(db: Database) -> None:
    """The target cannot also be a feature."""
    make_base(db)
    expect_failure(db, InputError, ["'y'", "feature"], features=["x1", "y"])


def test_only_target_column(db: Database) -> None:
    """A query with no columns besides the target has nothing to learn from."""
    make_base(db)
    expect_failure(db, InputError, ["feature"], "SELECT y FROM t")


def test_query_on_missing_table(db: Database) -> None:
    """A query naming a table that does not exist is an input error naming the table."""
    expect_failure(db, InputError, ["no_such_table"], "SELECT * FROM no_such_table")


def test_bare_missing_table_name(db: Database) -> None:
    """A bare table name that does not exist is an input error naming it."""
    expect_failure(db, InputError, ["Nowhere"], "Nowhere")


def test_query_syntax_error(db: Database) -> None:
    """SQL that does not parse is the user's input, reported with the database's message."""
    make_base(db)
    exc = expect_failure(db, InputError, ["training query", "syntax error"], "SELEC x1, y FROM t")
    assert exc.detail and "syntax error" in exc.detail


def test_duplicate_column_names(db: Database) -> None:
    """Two result columns with one name are refused (SQLite would silently rename one)."""
    make_base(db)
    expect_failure(db, InputError, ["dup"], "SELECT x1 AS dup, x2 AS dup, y FROM t")
    # a second copy of the label must not become a feature
    expect_failure(db, InputError, ["y"], "SELECT x1, y, y FROM t")


def test_reserved_column_name(db: Database) -> None:
    """The staging row-number column's name cannot be used by the query."""
    make_base(db)
    expect_failure(db, InputError, ["__dbdl_rn"], "SELECT x1 AS __dbdl_rn, x2, y FROM t")


def test_validation_leaves_no_training_rows(db: Database) -> None:
    """A validation fraction that takes every row is refused naming the option."""
    make_base(db)
    expect_failure(db, InputError, ["validation", "no training rows"], validation=0.99)


# -- NULLs, NaN and infinities ----------------------------------------------------------------
def test_null_feature_names_column_and_count(db: Database) -> None:
    """NULLs in a feature: the message names the column and how many, and suggests impute."""
    make_base(db)
    execute(db, "UPDATE t SET x2 = NULL WHERE x1 IN (1.0, 2.0, 3.0)")
    exc = expect_failure(db, InputError, ["'x2'", "NULL", "impute"])
    assert mentions_count(str(exc), 3), str(exc)


def test_null_categorical_feature(db: Database) -> None:
    """NULLs in a text feature are reported like numeric ones."""
    make_base(db)
    execute(db, "UPDATE t SET color = NULL WHERE x1 IN (1.0, 2.0)")
    exc = expect_failure(db, InputError, ["'color'", "NULL"])
    assert mentions_count(str(exc), 2), str(exc)


def test_null_target_names_column_and_count(db: Database) -> None:
    """NULL labels are refused (even with impute) with the column and count."""
    make_base(db)
    execute(db, "UPDATE t SET y = NULL WHERE x1 IN (0.5, 1.5)")
    exc = expect_failure(db, InputError, ["'y'", "NULL"], impute="mean")
    assert mentions_count(str(exc), 2), str(exc)


def test_impute_mean_trains_and_predicts_nan(db: Database) -> None:
    """``impute='mean'`` trains on NULL features and the model predicts rows with NaN there."""
    make_base(db)
    execute(db, "UPDATE t SET x2 = NULL WHERE x1 IN (1.0, 2.0, 3.0)")
    model = dl.train(
        db, "SELECT * FROM t", target="y", model="mlp:4", epochs=2, impute="mean", name="imp"
    )
    feature = {f.name: f for f in model.encoding.features}["x2"]
    assert feature.impute is not None and math.isfinite(feature.impute)
    frame = pd.DataFrame(
        {"x1": [1.0, 2.0, 3.0], "x2": [np.nan, 1.0, np.nan], "color": ["red", "blue", "green"]}
    )
    labels = model.predict(frame)
    assert len(labels) == 3 and set(labels) <= {0, 1}
    proba = model.predict_proba(frame)
    assert proba.shape == (3, 2) and np.isfinite(proba).all()
    with pytest.raises(InputError, match="'x2'"):
        model.predict(frame.drop(columns=["x2"]))
    with pytest.raises(InputError, match="'x1'"):
        model.predict(frame.assign(x1=["a", "b", "c"]))
    assert work_tables(db) == []
    rows = model_rows(db)
    assert list(rows["name"]) == ["imp"] and list(rows["status"]) == ["complete"]


def test_unknown_impute_strategy(db: Database) -> None:
    """An unsupported ``impute`` value is named."""
    make_base(db)
    execute(db, "UPDATE t SET x2 = NULL WHERE x1 = 1.0")
    expect_failure(db, InputError, ["impute", "median"], impute="median")


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_nonfinite_feature(db: Database, value: str) -> None:
    """NaN and ±infinity in a float feature are named with the column and count.

    SQLite has no NaN (it stores a NaN as NULL), so there the NaN case is reported as NULLs;
    its infinities come from the literal ``9e999``.
    """
    make_base(db)
    where = "WHERE x1 IN (1.0, 2.0)"
    if is_pg(db):
        literal = {"nan": "'NaN'", "inf": "'Infinity'", "-inf": "'-Infinity'"}[value]
        execute(db, f"UPDATE t SET x1 = CAST({literal} AS double precision) {where}")
        expected = ["'x1'", "NaN or infinite"]
    elif value == "nan":
        execute(db, f"UPDATE t SET x1 = :v {where}", {"v": float("nan")})
        with db.engine.connect() as conn:
            nulls = conn.execute(text("SELECT count(*) FROM t WHERE x1 IS NULL")).scalar_one()
        assert nulls == 2  # SQLite turned the NaNs into NULLs
        expected = ["'x1'", "NULL"]
    else:
        literal = "9e999" if value == "inf" else "-9e999"
        execute(db, f"UPDATE t SET x1 = {literal} {where}")
        expected = ["'x1'", "NaN or infinite"]
    exc = expect_failure(db, InputError, expected)
    assert mentions_count(str(exc), 2), str(exc)


def test_nonfinite_numeric_types_postgres(pg_db: Database) -> None:
    """PostgreSQL real and numeric columns holding NaN/Infinity are refused too."""
    make_table(
        pg_db,
        "t",
        [("r", "real"), ("n", "numeric"), ("y", "integer")],
        [(float(i), i * 1.5, i % 2) for i in range(20)],
    )
    execute(pg_db, "UPDATE t SET n = CAST('NaN' AS numeric) WHERE r < 3")
    exc = expect_failure(pg_db, InputError, ["'n'", "NaN"], features=["n"])
    assert mentions_count(str(exc), 3), str(exc)
    execute(pg_db, "UPDATE t SET n = 1, r = CAST('Infinity' AS real) WHERE r < 1")
    expect_failure(pg_db, InputError, ["'r'", "NaN or infinite"])


def test_infinite_regression_target(db: Database) -> None:
    """An infinite value in a regression target is named."""
    make_table(
        db,
        "t",
        [("x", "double precision"), ("v", "double precision")],
        [(float(i), i * 0.37) for i in range(30)],
    )
    inf = "CAST('Infinity' AS double precision)" if is_pg(db) else "9e999"
    execute(db, f"UPDATE t SET v = {inf} WHERE x = 4")
    exc = expect_failure(db, InputError, ["'v'", "NaN or infinite"], target="v", task="regression")
    assert mentions_count(str(exc), 1), str(exc)


# -- array columns ----------------------------------------------------------------------------
FLATTEN_SPEC = {"layers": [{"type": "Flatten"}, {"type": "Linear"}]}


def make_arrays(db: Database, values: list[Any]) -> None:
    """Table ``a(v, y)``: ``v`` a float array (PostgreSQL) or float32 blob (SQLite)."""
    if is_pg(db):
        columns = [("v", "double precision[]"), ("y", "integer")]
    else:
        columns = [("v", "BLOB"), ("y", "integer")]
        values = [
            v if isinstance(v, bytes) else np.asarray(v, dtype="<f4").tobytes() for v in values
        ]
    make_table(db, "a", columns, [(v, i % 2) for i, v in enumerate(values)])


def good_arrays(n: int = 20) -> list[Any]:
    """``n`` arrays of four values."""
    return [[float(i), i + 1.0, i + 2.0, i + 3.0] for i in range(n)]


@pytest.mark.parametrize(
    ("bad", "culprits"),
    [
        ([1.0, 2.0], ["fixed size", "2..4"]),
        ([1.0, float("nan"), 2.0, 3.0], ["1 NaN or infinite"]),
        ([1.0, float("inf"), 2.0, 3.0], ["1 NaN or infinite"]),
        ([float("-inf"), 1.0, 2.0, 3.0], ["1 NaN or infinite"]),
    ],
)
def test_bad_array_values(db: Database, bad: list[float], culprits: list[str]) -> None:
    """Ragged arrays and NaN/infinite elements are named with the column."""
    make_arrays(db, [*good_arrays(), bad])
    expect_failure(db, InputError, ["'v'", *culprits], "SELECT * FROM a", model=FLATTEN_SPEC)


def test_null_array_element_postgres(pg_db: Database) -> None:
    """A NULL inside a PostgreSQL array is named (it would shorten the packed row)."""
    make_arrays(pg_db, [*good_arrays(), [1.0, None, 2.0, 3.0]])
    expect_failure(pg_db, InputError, ["'v'", "1 NULL"], "SELECT * FROM a", model=FLATTEN_SPEC)


def test_blob_not_float32_sqlite(sqlite_db: Database) -> None:
    """A SQLite blob whose size is not a whole number of float32 values is named."""
    make_arrays(sqlite_db, [*good_arrays(), b"\x00" * 6])
    expect_failure(sqlite_db, InputError, ["'v'", "float32"], "SELECT * FROM a", model=FLATTEN_SPEC)


def test_null_array_value(db: Database) -> None:
    """A NULL array cannot be imputed: named with the count."""
    make_arrays(db, good_arrays())
    execute(db, "UPDATE a SET v = NULL WHERE y = 1")
    exc = expect_failure(
        db, InputError, ["'v'", "NULL"], "SELECT * FROM a", model=FLATTEN_SPEC, impute="mean"
    )
    assert mentions_count(str(exc), 10), str(exc)


def test_image_shape_mismatch(db: Database) -> None:
    """An ``image_shape`` that does not hold the array's values names the option and column."""
    make_arrays(db, good_arrays())
    expect_failure(
        db, InputError, ["image_shape", "'v'"], "SELECT * FROM a", model="cnn:4", image_shape=(3, 3)
    )


# -- targets ----------------------------------------------------------------------------------
def test_regression_on_text_target(db: Database) -> None:
    """``task='regression'`` on a text column names the column and says it is not numeric."""
    make_base(db)
    expect_failure(db, InputError, ["'color'", "numeric"], target="color", task="regression")


def test_single_class_target(db: Database) -> None:
    """A classification target with one class is named, with the class."""
    make_base(db)
    execute(db, "UPDATE t SET y = 1")
    expect_failure(db, InputError, ["'y'", "single class"])


def test_single_class_text_target(db: Database) -> None:
    """The same for a text label."""
    make_base(db)
    execute(db, "UPDATE t SET color = 'red'")
    expect_failure(db, InputError, ["'color'", "'red'"], target="color")


# -- column types -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("dbtype", "value"),
    [("json", '{"a": 1}'), ("jsonb", '{"a": 1}'), ("timestamp", "2024-01-02 03:04:05")],
)
def test_unsupported_column_types_postgres(pg_db: Database, dbtype: str, value: str) -> None:
    """JSON, jsonb and timestamp columns are refused naming the column and its type."""
    make_base(pg_db)
    execute(pg_db, f"ALTER TABLE t ADD COLUMN odd {dbtype}")
    execute(pg_db, f"UPDATE t SET odd = CAST(:v AS {dbtype})", {"v": value})
    expect_failure(pg_db, InputError, ["'odd'", dbtype, "unsupported"])


def test_unsupported_json_text_sqlite(sqlite_db: Database) -> None:
    """SQLite JSON text (``json('{"a":1}')`` values) is refused naming the column."""
    make_base(sqlite_db)
    execute(sqlite_db, "ALTER TABLE t ADD COLUMN meta TEXT")
    execute(sqlite_db, "UPDATE t SET meta = json(:v)", {"v": '{"a":1}'})
    expect_failure(sqlite_db, InputError, ["'meta'", "JSON", "unsupported"])


def test_unsupported_target_type_postgres(pg_db: Database) -> None:
    """An unsupported type is refused as the target too."""
    make_base(pg_db)
    execute(pg_db, "ALTER TABLE t ADD COLUMN stamp timestamp DEFAULT now()")
    expect_failure(pg_db, InputError, ["'stamp'", "timestamp"], target="stamp")


def test_mixed_text_and_numbers_sqlite(sqlite_db: Database) -> None:
    """A SQLite column mixing text and numbers is refused naming the column."""
    make_base(sqlite_db)
    execute(sqlite_db, "UPDATE t SET x2 = 'oops' WHERE x1 = 1.0")
    expect_failure(sqlite_db, InputError, ["'x2'", "mixed"])


def test_too_many_categories(db: Database) -> None:
    """A text column with more distinct values than ``max_categories`` is named."""
    make_base(db)
    execute(db, "UPDATE t SET color = 'c' || CAST(CAST(x1 * 2 AS integer) AS text)")
    expect_failure(db, InputError, ["'color'", "max_categories", "10"], max_categories=10)


# -- identifiers and injection ----------------------------------------------------------------
ODD_TABLE = 'My "Table"'
ODD_COLUMNS = [
    ("select", "double precision"),
    ("Group By", "text"),
    ('x"y', "double precision"),
    ("Mixed Case", "integer"),
    ("Order", "integer"),  # the target
]


def test_identifiers_needing_quotes_train(db: Database) -> None:
    """Spaces, double quotes, mixed case and SQL keywords in names train and predict."""
    rows = [
        (i * 0.25, ["a b", "c'd", 'e"f'][i % 3], float(i % 4), i % 5, int(i % 3 == 0))
        for i in range(30)
    ]
    make_table(db, ODD_TABLE, ODD_COLUMNS, rows)
    query = f"SELECT * FROM {db.backend.q(ODD_TABLE)}"
    model = dl.train(db, query, target="Order", model="mlp:4", epochs=2, name='odd "name"')
    names = [c for c, _ in ODD_COLUMNS[:-1]]
    assert model.encoding.feature_names() == names
    frame = pd.DataFrame(
        {
            "select": [0.5, 3.0],
            "Group By": ["a b", 'e"f'],
            'x"y': [1.0, 2.0],
            "Mixed Case": [1, 4],
        }
    )
    assert len(model.predict(frame)) == 2
    subset = dl.train(
        db, query, target="Order", features=["Mixed Case", 'x"y'], model="linear", epochs=1
    )
    assert subset.encoding.feature_names() == ["Mixed Case", 'x"y']
    assert len(subset.predict(frame)) == 2
    assert work_tables(db) == []
    assert sorted(model_rows(db)["status"]) == ["complete", "complete"]


def test_bare_mixed_case_table_name(db: Database) -> None:
    """A bare table name is used as the table, case preserved."""
    make_table(db, "MixedCase", BASE_COLUMNS, base_rows())
    model = dl.train(db, "MixedCase", target="y", model="linear", epochs=1)
    assert model.encoding.feature_names() == ["x1", "x2", "color"]
    assert work_tables(db) == []


def test_column_names_with_colons_and_percent(db: Database) -> None:
    """Colons and percent signs in names are not mistaken for bound parameters."""
    columns = [
        ("ratio :a", "double precision"),
        (":b", "double precision"),
        ("100%", "double precision"),
        ("y :label", "integer"),
    ]
    rows = [(i * 0.1, float(i % 3), float(i % 4), i % 2) for i in range(30)]
    make_table(db, "t:x", columns, rows)
    model = dl.train(db, "t:x", target="y :label", model="linear", epochs=1)
    assert model.encoding.feature_names() == ["ratio :a", ":b", "100%"]
    frame = pd.DataFrame({"ratio :a": [0.1], ":b": [2.0], "100%": [3.0]})
    assert len(model.predict(frame)) == 1
    assert work_tables(db) == []


HOSTILE = 'a"); DROP TABLE victim; --'


def victim_exists(db: Database) -> bool:
    """Whether the sacrificial table ``victim`` still exists and holds its row."""
    with db.engine.connect() as conn:
        return conn.execute(text(f"SELECT count(*) FROM {VICTIM}")).scalar_one() == 1


def test_hostile_names_never_execute(db: Database) -> None:
    """Names crafted to break out of quoting are only ever identifiers or values."""
    make_table(db, VICTIM, [("id", "integer")], [(1,)])
    table = 't"; DROP TABLE victim; --'
    label = "y'); DROP TABLE victim; --"
    evil_value = "'); DROP TABLE victim; --"
    columns = [(HOSTILE, "double precision"), ("kind", "text"), (label, "integer")]
    rows = [(i * 0.5, [evil_value, "plain"][i % 2], i % 2) for i in range(30)]
    make_table(db, table, columns, rows)
    query = f"SELECT * FROM {db.backend.q(table)}"
    model = dl.train(
        db, query, target=label, model="mlp:4", epochs=1, name="m'); DROP TABLE victim; --"
    )
    assert victim_exists(db)
    assert model.encoding.feature_names() == [HOSTILE, "kind"]
    assert evil_value in model.encoding.features[1].categories
    frame = pd.DataFrame({HOSTILE: [1.0, 2.0], "kind": [evil_value, "plain"]})
    assert len(model.predict(frame)) == 2
    # as feature list, target and bare table name of failing runs too
    expect_failure(db, InputError, [HOSTILE], query, target=label, features=[f"{HOSTILE}x"])
    expect_failure(db, InputError, ['"; DROP'], query, target='y"; DROP TABLE victim; --')
    with pytest.raises(InputError):
        dl.train(db, "victim;DROP\tTABLE\tvictim", target="y", epochs=1)
    assert victim_exists(db)
    assert work_tables(db) == []
    assert list(model_rows(db)["status"]) == ["complete"]


def test_bound_parameters(db: Database) -> None:
    """``params`` are bound to ``:name`` placeholders; only the matching rows train."""
    make_table(
        db,
        "t",
        [("x", "integer"), ("z", "double precision"), ("y", "integer")],
        [(i, i * 0.3, i % 2) for i in range(24)],
    )
    seen: dict[str, Any] = {}
    model = dl.train(
        db,
        "SELECT x, z, y FROM t WHERE x > :lo",
        target="y",
        params={"lo": 3},
        model="linear",
        epochs=1,
        callbacks=Callbacks(on_start=seen.update),
    )
    assert seen["rows"] + seen["validation_rows"] == 20  # x in 4..23
    assert model.encoding.feature_names() == ["x", "z"]
    assert work_tables(db) == []


def test_missing_bound_parameter(db: Database) -> None:
    """A ``:name`` placeholder without a value in ``params`` names the parameter."""
    make_base(db)
    exc = expect_failure(db, InputError, ["'lo'", "params"], "SELECT * FROM t WHERE x1 > :lo")
    assert "sqlalche.me" not in str(exc)
    expect_failure(db, InputError, ["'lo'"], "SELECT * FROM t WHERE x1 > :lo", params={"hi": 1})


# -- options ----------------------------------------------------------------------------------
def test_unknown_option(db: Database) -> None:
    """A misspelt option is refused naming it (and listing the valid ones)."""
    make_base(db)
    exc = expect_failure(db, InputError, ["'epoch'", "did you mean 'epochs'"], epoch=3)
    assert "valid options" in str(exc)


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("epochs", 0),
        ("epochs", 2.5),
        ("epochs", "3"),
        ("epochs", True),
        ("target", 5),
        ("impute", "median"),
        ("lr", -1),
        ("lr", 0),
        ("lr", "fast"),
        ("lr", float("nan")),
        ("lr", float("inf")),
        ("optimizer", "rmsprop"),
        ("validation", 1.5),
        ("validation", -0.1),
        ("validation", "most"),
        ("batch_size", 0),
        ("momentum", -0.5),
        ("momentum", "high"),
        ("weight_decay", -1.0),
        ("weight_decay", "none"),
        ("task", "clustering"),
        ("max_categories", 0),
        ("device", "tpu"),
        ("db_device", "gpu"),
        ("parallel", 0),
        ("threads", -2),
        ("seed", "abc"),
        ("params", [3]),
        ("image_shape", "8xfoo"),
        ("rows_per_buffer", 0),
        ("features", "x1"),
        ("features", []),
        ("features", ["x1", 2]),
        ("nesterov", "yes"),
    ],
)
def test_bad_option_values(sqlite_db: Database, option: str, value: Any) -> None:
    """Each bad value raises InputError naming the option, before the database is touched."""
    make_base(sqlite_db)
    expect_failure(sqlite_db, InputError, [option], **{option: value})


def test_bad_option_value_postgres(pg_db: Database) -> None:
    """Option errors are the same on PostgreSQL and leave nothing behind."""
    make_base(pg_db)
    for option, value in [("epochs", 0), ("lr", -1), ("optimizer", "rmsprop"), ("validation", 1.5)]:
        expect_failure(pg_db, InputError, [option], **{option: value})


def test_missing_target_option(sqlite_db: Database) -> None:
    """An empty target is refused naming the option."""
    make_base(sqlite_db)
    expect_failure(sqlite_db, InputError, ["target"], target="")


def test_nesterov_needs_sgd(sqlite_db: Database) -> None:
    """Incompatible option combinations name the option."""
    make_base(sqlite_db)
    expect_failure(sqlite_db, InputError, ["nesterov"], nesterov=True)


def test_validation_query_missing_column(db: Database) -> None:
    """A validation query lacking a training column names the column."""
    make_base(db)
    expect_failure(
        db, InputError, ["validation", "'color'"], validation_query="SELECT x1, x2, y FROM t"
    )


def test_validation_query_empty(db: Database) -> None:
    """A validation query returning no rows is refused."""
    make_base(db)
    expect_failure(
        db, InputError, ["validation", "no rows"], validation_query="SELECT * FROM t WHERE 1 = 0"
    )


# -- model specs ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("model", "culprits"),
    [
        ("mlp:", ["mlp:"]),
        ("mlp:abc", ["'abc'"]),
        ("mlp:64,act=swish", ["act", "swish"]),
        ("mlp:8,dropout=lots", ["dropout", "lots"]),
        ("mlp:8,wide=1", ["wide"]),
        ("resnet", ["'resnet'"]),
        ("linear:3", ["linear"]),
        ("", ["model"]),
        ("{not json", ["JSON"]),
        ("[1, 2]", ["model"]),
        ('{"layers": [{"type": "Transformer"}]}', ["'Transformer'"]),
        ('{"layers": []}', ["layers"]),
        ('{"layers": "Linear"}', ["layers"]),
        ('{"layers": [{"out_features": 3}]}', ["layer 0", "type"]),
        ({"layers": [{"type": "Linear", "out_features": -3}]}, ["Linear", "out_features"]),
        ({"layers": [{"type": "Dropout", "p": 1.5}, {"type": "Linear"}]}, ["Dropout"]),
        (
            {"layers": [{"type": "LeakyReLU", "negative_slope": "x"}, {"type": "Linear"}]},
            ["LeakyReLU"],
        ),
        (
            {
                "layers": [
                    {"type": "Linear", "out_features": 4, "bias": "maybe"},
                    {"type": "Linear"},
                ]
            },
            ["Linear", "bias"],
        ),
        ({"layers": [{"type": "Linear", "out_features": 4}]}, ["out"]),
        ({"layers": [{"type": "Linear", "out_feature": 4}]}, ["'out_feature'", "Linear"]),
        (
            {"layers": [{"type": "ReLU", "inplace": True}, {"type": "Linear"}]},
            ["'inplace'", "ReLU"],
        ),
        (
            {"layers": [{"type": "BatchNorm1d", "momentum": "abc"}, {"type": "Linear"}]},
            ["BatchNorm1d", "momentum"],
        ),
        ({"layers": [{"type": "Conv2d", "out_channels": 4}, {"type": "Linear"}]}, ["Conv2d"]),
        (42, ["model"]),
        (nn.Sequential(nn.Linear(4, 8), nn.LSTM(8, 8)), ["LSTM"]),
        (nn.Linear(4, 2), ["Sequential", "Linear"]),
    ],
)
def test_malformed_model_spec(sqlite_db: Database, model: Any, culprits: list[str]) -> None:
    """Malformed specs raise SpecError naming the spec text, layer or parameter at fault."""
    make_base(sqlite_db)
    expect_failure(sqlite_db, SpecError, culprits, model=model)


def test_spec_layer_does_not_fit_data(db: Database) -> None:
    """A Linear whose in_features disagrees with the encoded data names the layer and size."""
    make_base(db)  # encoded width: x1, x2 and three colours = 5
    spec = {
        "layers": [
            {"type": "Linear", "in_features": 7, "out_features": 4},
            {"type": "ReLU"},
            {"type": "Linear", "in_features": 4, "out_features": "out"},
        ]
    }
    exc = expect_failure(db, SpecError, ["Linear", "in_features", "7", "5"], model=json.dumps(spec))
    assert "layer 0" in str(exc) or "Linear" in str(exc)
    seq = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    expect_failure(db, SpecError, ["Linear", "in_features=3"], model=seq)


def test_spec_output_size_does_not_fit(db: Database) -> None:
    """A fixed final size that disagrees with the number of classes is named."""
    make_base(db)
    seq = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    expect_failure(db, SpecError, ["output"], model=seq)


# -- installation -----------------------------------------------------------------------------
def _new_database(server: PostgresServer) -> str:
    return server.create_database(f"dbdl_bad_{os.getpid()}_{uuid.uuid4().hex[:8]}")


@pytest.fixture
def bare_pg_url(pg_server: PostgresServer) -> Iterator[str]:
    """A fresh PostgreSQL database without the kernels."""
    yield _new_database(pg_server)


def test_database_without_kernels(bare_pg_url: str) -> None:
    """Connecting to a database without the kernels says to run ``dbdl install``."""
    with pytest.raises(DbdlError) as info:
        dl.connect(bare_pg_url, check=False).require()
    assert type(info.value) is InstallError
    assert "dbdl install" in str(info.value)
    with pytest.raises(InstallError, match="dbdl install"):
        dl.train(bare_pg_url, "SELECT 1 AS x, 2 AS y", target="y", epochs=1)
    db = dl.connect(bare_pg_url, check=False)
    try:
        with db.engine.connect() as conn:
            schemas = conn.execute(
                text("SELECT count(*) FROM pg_namespace WHERE nspname = 'dbdl'")
            ).scalar_one()
            tables = conn.execute(
                text("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")
            ).scalar_one()
        assert schemas == 0 and tables == 0, "connect/train must not install anything"
    finally:
        db.engine.dispose()


def test_server_python_without_torch(bare_pg_url: str) -> None:
    """A server whose Python cannot import torch fails at connect with what to set."""
    db = dl.install(bare_pg_url)
    try:
        execute(
            db,
            "CREATE OR REPLACE FUNCTION dbdl.kernel_info() RETURNS text LANGUAGE plpython3u"
            " PARALLEL SAFE AS $$\nimport torch_that_does_not_exist\nreturn ''\n$$",
        )
    finally:
        db.engine.dispose()
    for attempt in (
        lambda: dl.connect(bare_pg_url, check=False).require(),
        lambda: dl.train(bare_pg_url, "x", target="y"),
    ):
        with pytest.raises(DbdlError) as info:
            attempt()
        exc = info.value
        assert type(exc) is InstallError
        assert "PYTHONPATH" in str(exc) and "torch" in str(exc)
        assert exc.detail and "torch_that_does_not_exist" in exc.detail


def test_kernel_version_mismatch(bare_pg_url: str) -> None:
    """An installed kernel of another version asks for ``dbdl install``."""
    db = dl.install(bare_pg_url)
    try:
        execute(db, "UPDATE dbdl.meta SET value = '0.0.0-old' WHERE key = 'version'")
    finally:
        db.engine.dispose()
    with pytest.raises(DbdlError) as info:
        dl.connect(bare_pg_url, check=False).require()
    assert type(info.value) is InstallError
    assert "0.0.0-old" in str(info.value) and "dbdl install" in str(info.value)


# -- failures inside the database -------------------------------------------------------------
BN_SPEC = {
    "layers": [
        {"type": "Linear", "out_features": 4},
        {"type": "BatchNorm1d"},
        {"type": "ReLU"},
        {"type": "Linear", "out_features": "out"},
    ]
}


def test_kernel_failure_is_training_error(db: Database) -> None:
    """A spec the client accepts but the kernel cannot train surfaces as TrainingError.

    BatchNorm1d builds fine (the client checks shapes in eval mode), but 33 training rows in
    batches of 8 end with a batch of one row, which BatchNorm cannot normalise in training.
    """
    make_base(db, n=33)
    exc = expect_failure(
        db,
        TrainingError,
        ["Expected more than 1 value per channel"],
        model=json.dumps(BN_SPEC),
        batch_size=8,
        validation=0,
        name="bn",
    )
    assert exc.detail and "Expected more than 1 value per channel" in exc.detail
    rows = model_rows(db)
    assert list(rows["status"]) == ["failed"]
    assert list(rows["checkpoints"]) == [1]  # the initial state, iteration 0
    failed = dl.load_model(db, "bn")
    assert failed.info["status"] == "failed" and failed.info["iteration"] == 0
    assert "Expected more than 1 value per channel" in failed.info["error"]


def test_failed_run_keeps_last_checkpoint(db: Database) -> None:
    """A kernel failure mid-training marks the run failed and keeps its last good checkpoint.

    After the second iteration a callback truncates the packed buffers, so the third iteration
    fails inside the database.
    """
    make_base(db)

    def sabotage(row: dict[str, Any]) -> None:
        if row["epoch"] != 2:
            return
        (packed,) = [t for t in work_tables(db) if "packed_" in t]
        table = ".".join(db.backend.q(p) for p in packed.split("."))
        cut = "substring(x from 1 for 8)" if is_pg(db) else "substr(x, 1, 8)"
        execute(db, f"UPDATE {table} SET x = {cut}")

    with pytest.raises(DbdlError) as info:
        dl.train(
            db,
            "SELECT * FROM t",
            target="y",
            model="mlp:4",
            epochs=4,
            name="broken",
            callbacks=Callbacks(on_iteration=sabotage),
        )
    exc = info.value
    assert type(exc) is TrainingError
    assert exc.detail and "not a multiple" in exc.detail
    assert work_tables(db) == []
    rows = model_rows(db)
    assert list(rows["status"]) == ["failed"]
    assert int(rows["checkpoints"].iloc[0]) >= 1
    model = dl.load_model(db, "broken")
    assert model.info["iteration"] == 2
    assert list(model.history["epoch"]) == [1, 2]
    frame = pd.DataFrame({"x1": [1.0], "x2": [2.0], "color": ["red"]})
    assert len(model.predict(frame)) == 1
