"""Valid input the databases' own limits used to refuse or mangle, through the real databases.

Wide rows (more encoded columns than SQLite passes to one function or returns in one result),
target tables with special characters in their names, class labels longer than PostgreSQL's
63-byte identifiers, and (refused, clearly) array columns whose rows differ in shape.
"""

from __future__ import annotations

import sqlite3

import numpy as np
import pandas as pd
import pytest
from sqlalchemy import text

import dbdl_magic as dl
from dbdl_magic.backends.sqlite import MAX_PIECES, register_kernels
from dbdl_magic.datasets import digits_frame, load_table
from dbdl_magic.errors import InputError
from dbdl_magic.serving.predicting import MAX_NAME_BYTES, proba_columns


def wide_frame(n: int, d: int, seed: int = 0) -> pd.DataFrame:
    """``d`` numeric columns ``c0..``; the label depends only on the last ten columns, so a
    model learns it only if the columns past the first chunks reach it in the right place."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    df = pd.DataFrame(x, columns=[f"c{i}" for i in range(d)])
    df.insert(0, "id", np.arange(n))
    df["y"] = np.where(x[:, -10:].sum(axis=1) > 0, "pos", "neg")
    return df


def in_order_of(frame: pd.DataFrame, out: pd.DataFrame) -> pd.DataFrame:
    """``frame``'s rows in the order of ``out["id"]`` (a query without ORDER BY returns the
    table's rows in its scan order, which need not be the order they were loaded in)."""
    assert sorted(out["id"]) == sorted(frame["id"])
    return frame.set_index("id", drop=False).loc[out["id"]].reset_index(drop=True)


def table_names(db) -> set[str]:
    with db.engine.connect() as conn:
        if db.backend.name == "sqlite":
            rows = conn.execute(text("SELECT name FROM sqlite_master WHERE type = 'table'"))
        else:
            rows = conn.execute(text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'"))
        return {r[0] for r in rows}


# -- 1. wide rows -----------------------------------------------------------------------------
def test_130_numeric_columns_train_and_predict(db):
    """130 numeric features (SQLite passes at most 127 arguments to a function) pack, learn a
    label that lives in the last columns, and score in the database as the client does."""
    frame = wide_frame(800, 130)
    load_table(db.engine, "wide", frame)
    features = [f"c{i}" for i in range(130)]
    model = dl.train(db, "SELECT * FROM wide", name="wide", target="y", features=features,
                     model="linear", epochs=20, lr=0.05, batch_size=32, seed=0)
    assert model.encoding.width == 130
    accuracy = (model.predict(frame) == frame["y"]).mean()
    assert accuracy > 0.9, accuracy  # chance is about 0.5
    assert model.history["val_accuracy"].iloc[-1] > 0.85
    out = dl.predict(db, "wide", "SELECT * FROM wide", keys=["id"])
    assert list(out["prediction"]) == list(model.predict(in_order_of(frame, out)))
    # plain SQL, one row at a time: SQLite's json_object takes 63 columns at most, so the row
    # goes as several objects
    if db.backend.name == "sqlite":
        objects = ", ".join(
            "json_object(" + ", ".join(f"'{c}', {c}" for c in features[i : i + 60]) + ")"
            for i in range(0, 130, 60)
        )
        sql = f"SELECT id, dbdl_predict('wide', {objects}) AS label FROM wide ORDER BY id"
    else:
        sql = "SELECT id, dbdl.predict('wide', to_jsonb(w)) AS label FROM wide AS w ORDER BY id"
    with db.engine.connect() as conn:
        rows = conn.execute(text(sql)).all()
    assert [r.label for r in rows] == list(model.predict(frame))


def test_700_columns_statistics_and_packing(db):
    """700 numeric columns: the encoding statistics (three per column) exceed the columns one
    result may hold (SQLite 2000, PostgreSQL 1664) and are computed in parts."""
    frame = wide_frame(200, 700, seed=1)
    frame.loc[0, "c650"] = np.nan  # a NULL far out: still found, and imputed
    load_table(db.engine, "wider", frame)
    model = dl.train(db, "SELECT * FROM wider", name="wider", target="y",
                     features=[f"c{i}" for i in range(700)], model="linear", epochs=2,
                     impute="mean", seed=0)
    enc = {f.name: f for f in model.encoding.features}
    values = frame[[f"c{i}" for i in range(700)]]
    assert np.allclose([enc[c].mean for c in values], values.mean(), atol=1e-9)
    assert np.allclose([enc[c].std for c in values], values.std(ddof=0), rtol=1e-6)
    assert enc["c650"].impute == pytest.approx(values["c650"].mean())
    out = dl.predict(db, "wider", "SELECT * FROM wider", keys=["id"])
    assert list(out["prediction"]) == list(model.predict(in_order_of(frame, out)))


def test_sqlite_wide_mixed_row_of_2500_pieces(sqlite_db):
    """25 text columns of 100 categories (2500 one-hot pieces), an array blob and numbers:
    beyond SQLite's 2000 result columns; packed in chunks, in order."""
    rng = np.random.default_rng(2)
    n = 400
    labels = np.repeat([f"v{j:02d}" for j in range(100)], n // 100)  # every category present
    frame = pd.DataFrame({f"k{i}": rng.permutation(labels) for i in range(25)})
    blobs = rng.normal(size=(n, 16)).astype("<f4")
    frame["blob"] = [b.tobytes() for b in blobs]
    frame["z"] = rng.normal(size=n)
    frame["y"] = np.where((frame["k24"].str[1:].astype(int) < 50) ^ (blobs[:, 15] > 0), 1, 0)
    load_table(sqlite_db.engine, "cats", frame)
    model = dl.train(sqlite_db, "cats", name="cats", target="y", model="mlp:32", epochs=15,
                     lr=0.01, validation=0.0, seed=0)
    assert model.encoding.width == 2500 + 16 + 1
    assert (model.predict(frame) == frame["y"]).mean() > 0.9
    out = dl.predict(sqlite_db, "cats", "cats")
    assert list(out["prediction"]) == list(model.predict(frame))


def test_sqlite_chunks_nest_past_100_chunks():
    """10 050 pieces become 101 chunks, then 2 chunks of chunks: the packed row keeps every
    value in order (through a real SQLite connection with the kernels)."""
    from dbdl_magic.backends.sqlite import SQLiteBackend

    pieces = [(f"{i}.0", False) for i in range(10_050)]
    pieces[7] = ("x'0000803f'", True)  # a blob piece (1.0 as little-endian float32)
    grouped = SQLiteBackend.group_pieces(None, pieces)  # type: ignore[arg-type]
    assert len(grouped) == 2 and all(is_bytes for _, is_bytes in grouped)
    conn = sqlite3.connect(":memory:")
    register_kernels(conn)
    cols = ", ".join(sql for sql, _ in grouped)
    blob = conn.execute(f"SELECT dbdl_pack({cols}) FROM (SELECT 1 UNION ALL SELECT 2)").fetchone()
    row = np.arange(10_050, dtype="<f4")
    row[7] = 1.0
    assert np.array_equal(np.frombuffer(blob[0], dtype="<f4"), np.tile(row, 2))
    assert MAX_PIECES == 100
    few = [(f"{i}.0", False) for i in range(MAX_PIECES)]
    assert SQLiteBackend.group_pieces(None, few) == few  # type: ignore[arg-type]


# -- 2. target tables with special characters -------------------------------------------------
SPECIAL_NAMES = [("p:q", "p:q"), ('my "odd" table 100%', 'my "odd" table 100%'),
                 ('"dotted.name"', "dotted.name"), ("Ünïcode:x", "Ünïcode:x")]


def read_table(db, stored: str) -> pd.DataFrame:
    """Table ``stored`` (its name as the database keeps it), ordered by ``id``."""
    quoted = '"' + stored.replace('"', '""').replace(":", "\\:") + '"'
    with db.engine.connect() as conn:
        return pd.read_sql(text(f"SELECT * FROM {quoted} ORDER BY id"), conn)


def test_predict_into_tables_with_special_characters(db):
    """``into`` names with a colon, quotes, a percent sign, a quoted dot or non-ASCII letters:
    written, refused when present, replaced, for one model and for a per-group model."""
    rng = np.random.default_rng(3)
    n = 300
    frame = pd.DataFrame({"id": np.arange(n), "a": rng.normal(size=n), "b": rng.normal(size=n),
                          "g": np.arange(n) % 2})
    frame["y"] = np.where(frame["a"] - frame["b"] > 0, "up", "down")
    load_table(db.engine, "churn", frame)
    model = dl.train(db, "SELECT a, b, y FROM churn", name="churn", target="y", model="mlp:8",
                     epochs=4, seed=0)
    for into, stored in SPECIAL_NAMES:
        assert dl.predict(db, "churn", "SELECT id, a, b FROM churn", into=into, proba=True) == n
        out = read_table(db, stored)
        assert list(out.columns) == ["id", "prediction", "proba_down", "proba_up"]
        expected = in_order_of(frame, out)
        assert list(out["prediction"]) == list(model.predict(expected))
        assert np.allclose(out[["proba_down", "proba_up"]], model.predict_proba(expected),
                           atol=1e-5)
        # the existence check reads the same name: refused, then replaced
        with pytest.raises(InputError, match="already exists"):
            dl.predict(db, "churn", "SELECT id, a, b FROM churn", into=into)
        assert dl.predict(db, "churn", "SELECT id, a, b FROM churn WHERE id < 10", into=into,
                          replace=True) == 10
    grouped = dl.train(db, "SELECT a, b, g, y FROM churn", name="per_g", target="y",
                       group_by="g", model="mlp:8", epochs=2, seed=0)
    into, stored = SPECIAL_NAMES[0]
    with pytest.raises(InputError, match="already exists"):
        dl.predict(db, "per_g", "SELECT id, a, b, g FROM churn", into=into)
    assert dl.predict(db, "per_g", "SELECT id, a, b, g FROM churn", into=into, replace=True,
                      proba=True) == n
    out = read_table(db, stored)
    assert list(out["prediction"]) == list(grouped.predict(in_order_of(frame, out)))


def load_vectors(db, table: str, vectors: list[list[float]], ys: list[int]) -> None:
    """Table ``table(id, v, y)``: ``v`` a float32 blob (SQLite) or a ``real[]`` (PostgreSQL)."""
    with db.engine.begin() as conn:
        conn.execute(text(f"DROP TABLE IF EXISTS {table}"))
        pg = db.backend.name == "postgresql"
        conn.execute(text(f"CREATE TABLE {table} (id integer, v {'real[]' if pg else 'BLOB'},"
                          " y integer)"))
        conn.execute(
            text(f"INSERT INTO {table} VALUES (:id, :v, :y)"),
            [{"id": i, "v": v if pg else np.asarray(v, "<f4").tobytes(), "y": y}
             for i, (v, y) in enumerate(zip(vectors, ys, strict=True))],
        )


@pytest.fixture
def vec(db):
    """Model ``vec`` trained on 4-value arrays (column ``v``) in the ``db`` under test."""
    rng = np.random.default_rng(4)
    train = rng.normal(size=(300, 4))
    load_vectors(db, "vec", train.tolist(), (train.sum(axis=1) > 0).astype(int).tolist())
    model = dl.train(db, "SELECT v, y FROM vec", name="vec", target="y", model="mlp:8",
                     epochs=2)
    return db, model


def test_predict_refuses_arrays_of_another_size_and_nulls(vec):
    """An array of the wrong size past the first buffer, or a NULL array, is refused up front
    naming the column (PostgreSQL's packing would otherwise shift the rows after it); nothing
    is left behind."""
    db, _ = vec
    rng = np.random.default_rng(5)
    late = rng.normal(size=(9000, 4)).tolist()
    late[-1] = late[-1][:3]
    load_vectors(db, "late", late, [0] * 9000)
    before = table_names(db)
    with pytest.raises(InputError, match=r"'v' has 1 row\(s\) whose array does not hold the 4 "):
        dl.predict(db, "vec", "SELECT id, v FROM late", into="p:q")
    with db.engine.begin() as conn:
        conn.execute(text("UPDATE late SET v = NULL WHERE id IN (5, 8999)"))
    with pytest.raises(InputError, match="'v' has 2 NULL value"):
        dl.predict(db, "vec", "SELECT id, v FROM late")
    assert table_names(db) == before


def test_failed_prediction_leaves_no_into_table(vec, monkeypatch):
    """A prediction that fails once its ``into`` table is written (here: right after) leaves no
    table behind, and with ``replace=True`` the old table stays as it was."""
    db, _ = vec
    before = table_names(db)
    real = type(db.backend).predict_into

    def written_then_failed(self, conn, *args, **kwargs):
        real(self, conn, *args, **kwargs)
        raise KeyboardInterrupt  # e.g. Ctrl-C after the rows were written

    monkeypatch.setattr(type(db.backend), "predict_into", written_then_failed)
    with pytest.raises(KeyboardInterrupt):
        dl.predict(db, "vec", "SELECT id, v FROM vec", into="p:q")
    assert table_names(db) == before
    monkeypatch.undo()
    assert dl.predict(db, "vec", "SELECT id, v FROM vec WHERE id < 7", into="p:q") == 7
    monkeypatch.setattr(type(db.backend), "predict_into", written_then_failed)
    with pytest.raises(KeyboardInterrupt):
        dl.predict(db, "vec", "SELECT id, v FROM vec", into="p:q", replace=True)
    with db.engine.connect() as conn:
        assert conn.execute(text('SELECT count(*) FROM "p\\:q"')).scalar_one() == 7
    assert table_names(db) == before | {"p:q"}


def test_sqlite_failure_in_a_later_buffer_leaves_no_table(sqlite_db, monkeypatch):
    """SQLite writes predictions buffer by buffer: a kernel failure in the second buffer rolls
    the first buffer's rows and the table back."""
    from dbdl_magic.backends import sqlite as backend_module

    rng = np.random.default_rng(6)
    x = rng.normal(size=(9000, 4))
    load_vectors(sqlite_db, "vec", x.tolist(), (x.sum(axis=1) > 0).astype(int).tolist())
    dl.train(sqlite_db, "SELECT v, y FROM vec", name="vec", target="y", model="linear",
             epochs=1)
    calls = []
    real = backend_module.predict_buffer

    def second_fails(evaluator, x):
        calls.append(len(x))
        if len(calls) == 2:
            raise RuntimeError("the kernel failed in buffer 2")
        return real(evaluator, x)

    monkeypatch.setattr(backend_module, "predict_buffer", second_fails)
    before = table_names(sqlite_db)
    with pytest.raises(RuntimeError, match="buffer 2"):
        dl.predict(sqlite_db, "vec", "SELECT id, v FROM vec", into="p:q")
    assert len(calls) == 2 and table_names(sqlite_db) == before


# -- 3. class labels longer than an identifier ------------------------------------------------
LONG = "a class label that goes on for more than sixty-three bytes, e.g. ü"  # 67 bytes


def test_probabilities_of_labels_sharing_their_first_63_bytes(db):
    """Two labels alike in their first 63 bytes, and one that differs only in case from a
    short one: distinct readable columns, the same on both backends, in the DataFrame, in an
    ``into`` table and in ``frame.attrs``; they sum to 1 and match ``predict_proba``."""
    rng = np.random.default_rng(7)
    n = 600
    frame = pd.DataFrame({"id": np.arange(n), "a": rng.normal(size=n), "b": rng.normal(size=n)})
    labels = np.array([LONG + " one", LONG + " two", "Yes", "yes"], dtype=object)
    frame["y"] = labels[(frame["a"] > 0).astype(int) * 2 + (frame["b"] > 0).astype(int)]
    load_table(db.engine, "long_labels", frame)
    model = dl.train(db, "SELECT a, b, y FROM long_labels", name="long", target="y",
                     model="mlp:16", epochs=30, lr=0.02, seed=0)
    classes = list(model.classes_)
    assert sorted(classes) == sorted(labels)
    expected = proba_columns(classes)
    stem = f"proba_{LONG}".encode()[: MAX_NAME_BYTES - 2].decode(errors="ignore")
    by_class = dict(zip(classes, expected, strict=True))
    assert by_class[LONG + " one"] == stem + f"~{classes.index(LONG + ' one')}"
    assert by_class[LONG + " two"] == stem + f"~{classes.index(LONG + ' two')}"
    assert by_class["Yes"] == "proba_Yes"  # sorts first: keeps its name
    assert by_class["yes"] == f"proba_yes~{classes.index('yes')}"  # SQLite ignores case
    assert all(len(c.encode()) <= MAX_NAME_BYTES for c in expected)

    out = dl.predict(db, "long", "SELECT id, a, b FROM long_labels", proba=True)
    assert list(out.columns) == ["id", "prediction", *expected]
    assert out.attrs["proba_columns"] == dict(zip(expected, classes, strict=True))
    probs = out[expected].to_numpy()
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    frame = in_order_of(frame, out)
    assert np.allclose(probs, model.predict_proba(frame), atol=1e-5)
    assert list(out["prediction"]) == list(model.predict(frame))
    assert (out["prediction"] == frame["y"]).mean() > 0.9

    assert dl.predict(db, "long", "SELECT id, a, b FROM long_labels", proba=True,
                      into="long_scores") == n
    with db.engine.connect() as conn:
        stored = pd.read_sql(text("SELECT * FROM long_scores ORDER BY id"), conn)
    assert list(stored.columns) == ["id", "prediction", *expected]
    assert np.allclose(stored[expected], out.sort_values("id")[expected], atol=1e-6)


def test_proba_columns_keep_clear_of_key_columns(db):
    """A key column named like a probability column pushes that column to a suffixed name; a
    key column named ``prediction`` is refused up front, naming it."""
    rng = np.random.default_rng(8)
    frame = pd.DataFrame({"a": rng.normal(size=200)})
    frame["y"] = np.where(frame["a"] > 0, "up", "down")
    frame["proba_up"] = np.arange(200)
    load_table(db.engine, "keys_t", frame)
    model = dl.train(db, "SELECT a, y FROM keys_t", name="k", target="y", model="linear",
                     epochs=5)
    out = dl.predict(db, "k", "SELECT proba_up, a FROM keys_t", proba=True)
    assert list(out.columns) == ["proba_up", "prediction", "proba_down", "proba_up~1"]
    frame = frame.set_index("proba_up", drop=False).loc[out["proba_up"]]
    assert np.allclose(out[["proba_down", "proba_up~1"]], model.predict_proba(frame), atol=1e-5)
    with pytest.raises(InputError, match=r"key column 'Prediction'.*rename"):
        dl.predict(db, "k", 'SELECT a, a AS "Prediction" FROM keys_t', proba=True)


# -- 4. arrays of mixed shapes ----------------------------------------------------------------
def test_postgres_refuses_mixed_2d_shapes(pg_db):
    """A ``real[]`` column of 8x8, 4x16 and flat 64 arrays (all 64 values) is refused naming the
    column and the shapes found; one shape of 8x8 trains as an 8x8 image."""
    digits = digits_frame()
    pixels = digits[[f"p{i}" for i in range(64)]].to_numpy()[:300]
    shapes = [(8, 8), (4, 16), (64,)]
    rows = [{"id": i, "img": pixels[i].reshape(shapes[i % 3]).tolist(), "digit": int(d)}
            for i, d in enumerate(digits["digit"][:300])]
    with pg_db.engine.begin() as conn:
        conn.execute(text("CREATE TABLE mixed (id integer, img real[], digit integer)"))
        conn.execute(text("INSERT INTO mixed VALUES (:id, :img, :digit)"), rows)
        conn.execute(text("CREATE TABLE square AS SELECT * FROM mixed"))
        conn.execute(text("UPDATE square SET img = (SELECT array_agg(r ORDER BY i) FROM ("
                          "SELECT i, array_agg(e ORDER BY j) AS r FROM unnest(img) WITH"
                          " ORDINALITY AS u(e, k), LATERAL (SELECT (k - 1) / 8 AS i,"
                          " (k - 1) % 8 AS j) AS ij GROUP BY i) AS rows_)"))
    with pytest.raises(InputError) as refused:
        dl.train(pg_db, "SELECT img, digit FROM mixed", target="digit", model="cnn:4")
    message = str(refused.value)
    assert "'img'" in message and "3 shapes" in message
    for shape in ("8x8 (100 rows)", "4x16 (100 rows)", "64 (100 rows)"):
        assert shape in message, message
    model = dl.train(pg_db, "SELECT img, digit FROM square", name="square", target="digit",
                     model="cnn:4", epochs=1)
    assert model.encoding.features[0].shape == [8, 8]
    # scoring checks the arrays too: 8x8 scores as the client does, a NULL element is named
    out = dl.predict(pg_db, "square", "SELECT id, img FROM square")
    client = model.predict(pd.DataFrame({"img": list(pixels.reshape(-1, 8, 8))}))
    assert list(out.sort_values("id")["prediction"]) == list(client)
    with pg_db.engine.begin() as conn:
        conn.execute(text("UPDATE square SET img[2][3] = NULL WHERE digit = 7"))
    with pytest.raises(InputError, match=r"'img' has \d+ row\(s\) whose array does not hold"):
        dl.predict(pg_db, "square", "SELECT img FROM square")


def test_postgres_refuses_ragged_and_mixed_rank_3d(pg_db):
    """Same rank, other sizes (2x3x4 and 4x3x2 hold 24 values each) are named too."""
    with pg_db.engine.begin() as conn:
        conn.execute(text("CREATE TABLE cubes (c real[], y integer)"))
        a = np.arange(24.0)
        conn.execute(text("INSERT INTO cubes VALUES (:c, :y)"),
                     [{"c": a.reshape((2, 3, 4) if i % 4 else (4, 3, 2)).tolist(), "y": i % 2}
                      for i in range(40)])
    with pytest.raises(InputError, match=r"'c'.*2x3x4 \(30 rows\), 4x3x2 \(10 rows\)"):
        dl.train(pg_db, "cubes", target="y", model="linear")


def test_sqlite_blobs_of_mismatched_length(sqlite_db):
    """SQLite blobs of two lengths are refused naming the column and the sizes found; blobs of
    one length that ``image_shape`` does not hold name the option and the column."""
    rng = np.random.default_rng(9)
    x = rng.normal(size=(50, 64)).astype("<f4")
    blobs = [row.tobytes() if i % 10 else row[:48].tobytes() for i, row in enumerate(x)]
    load_table(sqlite_db.engine, "imgs", pd.DataFrame({"img": blobs, "y": np.arange(50) % 2}))
    with pytest.raises(InputError) as refused:
        dl.train(sqlite_db, "imgs", target="y", model="cnn:4", image_shape=(8, 8))
    message = str(refused.value)
    assert "'img'" in message and "sizes 48..64" in message, message
    assert "64 (45 rows), 48 (5 rows)" in message, message
    load_table(sqlite_db.engine, "imgs", pd.DataFrame({"img": [r[:48].tobytes() for r in x],
                                                       "y": np.arange(50) % 2}))
    with pytest.raises(InputError, match=r"image_shape \[8, 8\].*48 values in column 'img'"):
        dl.train(sqlite_db, "imgs", target="y", model="cnn:4", image_shape=(8, 8))
