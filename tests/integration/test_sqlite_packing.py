"""SQLite packs in this process (``dbdl_magic.data.inprocess``): the same buffers, bit for bit,
as the SQL path (column-type scan, statistics aggregates, ``dbdl_pack``), which a resume's
fingerprint check depends on; the same errors for bad input; and the SQL path still taken where
the in-process one does not apply."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sqlalchemy import text

from dbdl_magic.backends.sqlite import SQLiteBackend
from dbdl_magic.data import inprocess
from dbdl_magic.data.packing import RN, PackOptions, infer_encoding, pack, stage_query
from dbdl_magic.errors import InputError
from dbdl_magic.training.prepare import check_columns

N = 700
COLUMNS = ("i INTEGER, r REAL, u, cat TEXT, blob BLOB, g TEXT, gi INTEGER, lab INTEGER,"
           " labt TEXT, labr REAL, y REAL, big INTEGER, nz REAL, nul REAL, late")


def _rows(n: int, seed: int) -> list[dict]:
    """Tricky values: integers and reals in one untyped column, Unicode and case-differing
    categories, float32 blobs, -0.0, integers beyond 2**53, NULLs, a column NULL in its first
    rows and text after (crossing a fetch chunk)."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        out.append(dict(
            i=int(rng.integers(-50, 50)),
            r=float(rng.standard_normal() * 10 ** rng.uniform(-3, 5)),
            u=float(rng.standard_normal()) if k % 2 else int(rng.integers(0, 1000)),
            cat=["red", "green", "blue", "Ünïcode", "b", "B"][k % 6],
            blob=rng.standard_normal(6).astype("<f4").tobytes(),
            g=["x", "y", "z"][int(rng.integers(0, 3))],
            gi=int(rng.integers(0, 4)),
            lab=int(rng.integers(0, 3)),
            labt=["no", "yes", "maybe"][int(rng.integers(0, 3))],
            labr=float(rng.integers(0, 2)),
            y=float(rng.standard_normal() * 3 + 1),
            big=int(rng.integers(2**53, 2**62)) * (1 if k % 2 else -1),
            nz=-0.0 if k % 4 else float(rng.standard_normal()),
            nul=None if k % 5 == 0 else float(rng.standard_normal()),
            late=None if k < 300 else f"t{k % 3}",
        ))
    return out


@pytest.fixture
def tables(sqlite_db):
    with sqlite_db.engine.begin() as conn:
        conn.execute(text(f"CREATE TABLE a ({COLUMNS})"))
        names = [c.split()[0] for c in COLUMNS.split(", ")]
        insert = f"INSERT INTO a VALUES ({', '.join(':' + c for c in names)})"
        conn.execute(text(insert), _rows(N, 5))
        conn.execute(text("CREATE TABLE v AS SELECT * FROM a WHERE rowid % 3 = 0"))
        wide = ", ".join(f"c{j} REAL" for j in range(130))
        conn.execute(text(f"CREATE TABLE w ({wide}, cat TEXT, lab INTEGER)"))
        m = np.random.default_rng(1).standard_normal((300, 130))
        marks = ", ".join(f":c{j}" for j in range(130))
        conn.execute(text(f"INSERT INTO w VALUES ({marks}, :cat, :lab)"), [
            {**{f"c{j}": float(m[k, j]) for j in range(130)}, "cat": f"k{k % 7}", "lab": k % 2}
            for k in range(300)
        ])
    return sqlite_db


CASES = {
    "numbers": ("SELECT i, r, u, big, nz, lab FROM a", dict(target="lab")),
    "categories, text labels": ("SELECT i, r, cat, labt FROM a", dict(target="labt",
                                                                     batch_size=32)),
    "arrays, regression": ("SELECT r, cat, blob, y FROM a", dict(target="y",
                                                                 rows_per_buffer=100)),
    "real labels": ("SELECT i, r, labr FROM a", dict(target="labr", task="classification")),
    "impute mean": ("SELECT r, nul, lab FROM a", dict(target="lab", impute="mean")),
    "impute zero, late text": ("SELECT nul, late, lab FROM a", dict(target="lab",
                                                                    impute="zero")),
    "text groups": ("SELECT r, i, g, lab FROM a", dict(target="lab", group_by="g",
                                                       batch_size=16)),
    "integer groups": ("SELECT r, i, gi, lab FROM a", dict(target="lab", group_by="gi")),
    "no validation": ("SELECT r, i, lab FROM a", dict(target="lab", validation=0.0, seed=11)),
    "feature subset": ("a", dict(target="lab", features=["r", "cat", "blob"])),
    "query": ("SELECT r * 2 AS r2, i + 1 AS i1, lab FROM a WHERE i > -20 ORDER BY r DESC",
              dict(target="lab", seed=4)),
    "wide rows (dbdl_row chunks)": ("w", dict(target="lab", batch_size=8)),
    "validation query": ("SELECT r, i, cat, lab FROM a",
                         dict(target="lab", vq="SELECT r, i, cat, lab FROM v")),
    "validation query, groups": ("SELECT r, i, g, lab FROM a",
                                 dict(target="lab", group_by="g",
                                      vq="SELECT r, i, g, lab FROM v")),
    "integer regression": ("SELECT r, i AS t FROM a", dict(target="t", task="regression")),
    "inf": ("SELECT r, CASE WHEN i = 3 THEN 9e999 ELSE r END AS rr, lab FROM a",
            dict(target="lab")),
    "NULL without impute": ("SELECT r, nul, lab FROM a", dict(target="lab")),
    "text and numbers": ("SELECT r, CASE WHEN i = 3 THEN 'x' ELSE r END AS m, lab FROM a",
                         dict(target="lab")),
    "blobs and numbers": ("SELECT r, CASE WHEN i = 3 THEN blob ELSE r END AS m, lab FROM a",
                          dict(target="lab")),
    "JSON text": ("SELECT r, json_object('a', i) AS js, lab FROM a", dict(target="lab")),
    "one class": ("SELECT r, 1 AS one FROM a", dict(target="one")),
}


def packed_state(db, query: str, options: dict) -> dict:
    """Stage, encode and pack ``query`` as a run does; the packed table's every row, its
    schema, the encoding and the fingerprint (or the error's message)."""
    backend = db.backend
    options = dict(options)
    vq = options.pop("vq", None)
    opts = PackOptions(**options)
    stage, vstage, packed = (backend.table(t) for t in ("t_stage", "t_vstage", "t_packed"))
    with db.engine.begin() as conn:
        for table in (stage, vstage, packed):
            backend.drop_table(conn, table)
    try:
        with db.engine.begin() as conn:
            stage_query(backend, conn, query, {}, stage, deterministic=True)
            encoding, n_rows = infer_encoding(backend, conn, stage, opts)
            if vq:
                stage_query(backend, conn, vq, {}, vstage, "validation query", deterministic=True)
                check_columns(backend, conn, vstage, encoding, opts.group_by)
            data = pack(backend, conn, stage, packed, encoding, n_rows, opts,
                        vstage if vq else None)
            rows = conn.execute(text(f"SELECT * FROM {packed}")).all()
            schema = conn.execute(
                text("SELECT sql FROM sqlite_master WHERE name = :n"), {"n": "dbdl_t_packed"}
            ).scalar_one()
    except InputError as exc:
        return {"error": str(exc)}
    return {"fingerprint": data.fingerprint, "rows": [tuple(r) for r in rows],
            "schema": schema, "encoding": encoding.to_json(), "groups": data.groups,
            "sizes": (data.n_train, data.n_val, data.n_buffers, data.rows_per_buffer)}


@pytest.fixture
def sql_path(monkeypatch):
    """Pack with the SQL path only (the code before the in-process path)."""

    def force() -> None:
        monkeypatch.setattr(inprocess, "fetch_stage", lambda *a, **k: None)
        monkeypatch.setattr(inprocess, "stage_by_rowid", lambda *a, **k: False)

    return force


@pytest.fixture
def sql_calls(monkeypatch):
    """Count the SQL path's packing statements."""
    calls: list[str] = []
    original = SQLiteBackend.create_packed

    def spy(self, *args, **kwargs):
        calls.append("create_packed")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(SQLiteBackend, "create_packed", spy)
    return calls


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("chunk", [inprocess.CHUNK, 64])
def test_in_process_packing_equals_the_sql_path(tables, sql_path, sql_calls, monkeypatch,
                                                case, chunk):
    monkeypatch.setattr(inprocess, "CHUNK", chunk)
    query, options = CASES[case]
    fast = packed_state(tables, query, options)
    assert sql_calls == []  # packed in this process
    sql_path()
    slow = packed_state(tables, query, options)
    assert sql_calls == ([] if "error" in slow else ["create_packed"])
    assert fast == slow
    if "rows" in fast:
        assert fast["rows"] and all(len(r[4]) and len(r[5]) for r in fast["rows"])


def test_summation_is_the_connections_avg(sqlite_db):
    """The probed method reproduces this SQLite's avg() bit for bit on hard sums."""
    rng = np.random.default_rng(2)
    with sqlite_db.engine.begin() as conn:
        method = inprocess.summation(conn)
        assert method in ("running", "kbn")
        conn.execute(text("CREATE TABLE s (x REAL)"))
        for trial in range(6):
            n = int(rng.integers(1, 3000))
            values = rng.standard_normal(n) * 10.0 ** rng.uniform(-12, 14, n)
            if trial % 2:
                values = np.concatenate([values, -values[::-1], [1e-300]])
            conn.execute(text("DELETE FROM s"))
            conn.execute(text("INSERT INTO s VALUES (:x)"), [{"x": float(v)} for v in values])
            got = conn.execute(text("SELECT avg(x), avg((x - 0.5) * (x - 0.5)) FROM s")).one()
            mine = (inprocess.sqlite_avg(values, method),
                    inprocess.sqlite_avg((values - 0.5) * (values - 0.5), method))
            assert [np.float64(v).tobytes() for v in mine] == [np.float64(v).tobytes()
                                                              for v in got]


def test_both_summation_orders():
    values = np.array([1e16, 1.0, 1.0, 1.0, -1e16])
    assert inprocess.sqlite_avg(values, "running") == 0.0  # 1e16 + 1 rounds back to 1e16
    assert inprocess.sqlite_avg(values, "kbn") == 3.0 / 5
    assert math.copysign(1.0, inprocess.sqlite_avg(np.array([-0.0, -0.0]), "running")) == 1.0
    assert inprocess.sqlite_avg(np.array([1e308, 1e308]), "running") is None  # overflow
    assert inprocess.sqlite_avg(np.zeros(0), "kbn") is None


def test_over_budget_and_unknown_sums_take_the_sql_path(tables, sql_calls, monkeypatch):
    query, options = CASES["categories, text labels"]
    fast = packed_state(tables, query, options)
    monkeypatch.setattr(inprocess, "_SUMMATION", {})
    monkeypatch.setattr(inprocess, "sqlite_avg", lambda values, method: 1.0)
    assert packed_state(tables, query, options) == fast  # SQL statistics, packed here
    assert sql_calls == []
    monkeypatch.setattr(inprocess, "MEMORY_BUDGET", 1000)
    assert packed_state(tables, query, options) == fast
    assert sql_calls == ["create_packed"]


@pytest.mark.parametrize("query", [
    "SELECT * FROM a ORDER BY r DESC",
    "SELECT a.r, v.i, a.lab FROM a JOIN v ON a.rowid = v.rowid + 1",
    "SELECT g, count(*) AS n, avg(r) AS r FROM a GROUP BY g",
    "SELECT DISTINCT cat, lab FROM a",
    "SELECT r, lab FROM a WHERE i > 0 UNION ALL SELECT i, lab FROM v",
    "SELECT * FROM (SELECT r, i AS lab FROM a ORDER BY i LIMIT 50)",
])
def test_rowid_staging_numbers_rows_as_row_number(tables, query):
    backend = tables.backend
    with tables.engine.begin() as conn:
        stage_query(backend, conn, query, {}, "by_rowid")
        conn.execute(text(
            f"CREATE TABLE by_window AS SELECT row_number() OVER () AS {RN}, src.*"
            f" FROM ({query}) AS src WHERE CAST(:one AS INTEGER) = 1"
        ), {"one": 1})
        new = conn.execute(text(f"SELECT * FROM by_rowid ORDER BY {RN}")).all()
        old = conn.execute(text(f"SELECT * FROM by_window ORDER BY {RN}")).all()
        types = [conn.execute(text(f"SELECT name, type FROM pragma_table_info('{t}')")).all()
                 for t in ("by_rowid", "by_window")]
    assert new == old and len(new) > 0
    assert types[0][1:] == types[1][1:]  # the query's columns declared alike


def test_rows_numbered_by_a_window_pack_alike(tables, sql_calls, monkeypatch):
    """A stage numbered by ``row_number()`` (not its rowid): the row numbers are read too."""
    query, options = CASES["text groups"]
    fast = packed_state(tables, query, options)
    monkeypatch.setattr(inprocess, "stage_by_rowid", lambda *a, **k: False)
    monkeypatch.setattr(inprocess, "CHUNK", 100)
    assert packed_state(tables, query, options) == fast
    assert sql_calls == []


def test_row_numbers_with_gaps_are_read(sqlite_db):
    backend = sqlite_db.backend
    with sqlite_db.engine.begin() as conn:
        conn.execute(text(f"CREATE TABLE st ({RN} INTEGER PRIMARY KEY, x REAL, lab INTEGER)"))
        conn.execute(text("INSERT INTO st VALUES (1, 0.5, 0), (5, 1.5, 1), (9, -2.0, 0)"))
        fetched = inprocess.fetch_stage(backend, conn, "st", RN, None, "lab")
    assert fetched is not None and fetched.rn.tolist() == [1, 5, 9]
    assert fetched.columns["x"].values().tolist() == [0.5, 1.5, -2.0]
