"""Serving: vectorised in-database prediction, row-level SQL prediction, loading weights only.

Every path's predictions equal the client module's (labels exactly, probabilities within
1e-6), through real SQLite and real PostgreSQL (the ``db`` fixture).
"""

from __future__ import annotations

import json
import struct
import threading
import time

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import database_tables
from sqlalchemy import text

import dbdl_magic as dl
from dbdl_magic.datasets import load_table
from dbdl_magic.kernel import predict as kpredict
from dbdl_magic.kernel.blockstore import CorruptBlockError
from dbdl_magic.kernel.errors import DataError
from dbdl_magic.kernel.state import decode_state
from dbdl_magic.serving import predicting
from dbdl_magic.store import registry

ATOL = 1e-6


def customers(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({
        "id": np.arange(n) + 1000,
        "region": rng.choice(["eu", "us"], size=n),
        "plan": rng.choice(["basic", "plus", "pro"], size=n),
        "age": rng.integers(18, 80, size=n).astype(float),
        "spend": rng.normal(50, 15, size=n),
    })
    score = (df["plan"] == "pro") * 1.5 + (df["spend"] - 50) / 15 + (df["region"] == "eu") * 0.7
    df["churned"] = np.where(score > 0.5, "yes", np.where(score > -0.5, "maybe", "no"))
    df["price"] = 3 * df["spend"] + df["age"]
    return df


def rows_of(db, sql: str, **params) -> list:
    with db.engine.connect() as conn:
        return conn.execute(text(sql), params).all()


def row_sql(db, fn: str, columns: list[str], table: str = "customers") -> str:
    """``fn(model, <the row as JSON>)`` per row of ``table``, ordered by id."""
    if db.backend.name == "postgresql":
        return f"SELECT c.id, dbdl.{fn}(:m, to_jsonb(c)) AS out FROM {table} AS c ORDER BY c.id"
    pairs = ", ".join(f"'{c}', {c}" for c in columns)
    return f"SELECT id, dbdl_{fn}(:m, json_object({pairs})) AS out FROM {table} ORDER BY id"


@pytest.fixture
def trained(db, monkeypatch):
    """Model ``churn`` (3 classes: numeric and categorical features) on 700 rows; scoring is
    done in buffers of 128 rows so that every path crosses buffer boundaries."""
    monkeypatch.setattr(predicting, "ROWS_PER_BUFFER", 128)
    frame = customers(700)
    load_table(db.engine, "customers", frame)
    model = dl.train(db, "SELECT region, plan, age, spend, churned FROM customers", name="churn",
                     target="churned", model="mlp:32,16", epochs=6, seed=0, lr=0.01)
    return db, model, frame


def test_every_path_matches_the_client_module(trained):
    db, model, frame = trained
    labels, proba = list(model.predict(frame)), model.predict_proba(frame)
    assert len(set(labels)) == 3
    out = dl.predict(db, "churn", "SELECT * FROM customers", proba=True)
    assert list(out["id"]) == list(frame["id"])  # the query's order
    assert list(out["prediction"]) == labels
    columns = [f"proba_{c}" for c in model.classes_]
    assert np.allclose(out[columns].to_numpy(), proba, atol=ATOL)

    n = dl.predict(db, "churn", "SELECT id, region, plan, age, spend FROM customers",
                   into="scores", proba=True)
    stored = pd.read_sql(text("SELECT * FROM scores ORDER BY id"), db.engine)
    assert n == len(frame) and list(stored.columns) == ["id", "prediction", *columns]
    assert list(stored["prediction"]) == labels
    assert np.allclose(stored[columns].to_numpy(), proba, atol=ATOL)

    bare = dl.predict(db, "churn", "SELECT region, plan, age, spend FROM customers")
    assert list(bare.columns) == ["prediction"] and list(bare["prediction"]) == labels

    features = ["region", "plan", "age", "spend"]
    got = rows_of(db, row_sql(db, "predict", features), m="churn")
    assert [r.out for r in got] == labels
    got = rows_of(db, row_sql(db, "predict_proba", features), m="churn")
    values = np.array([r.out if isinstance(r.out, list) else json.loads(r.out) for r in got])
    assert np.allclose(values, proba, atol=ATOL)
    got = rows_of(db, row_sql(db, "predict_value", features), m="churn")
    assert np.allclose([r.out for r in got], proba.max(axis=1), atol=ATOL)


def test_key_columns_of_any_type_come_back_as_they_were(trained):
    """Array, text and NULL keys (PostgreSQL joins array keys back by row address, since an
    aggregate of arrays would nest them)."""
    db, model, frame = trained
    pg = db.backend.name == "postgresql"
    tags = "ARRAY[id, id + 1] AS tags" if pg else "json_array(id, id + 1) AS tags"
    out = dl.predict(db, "churn", f"SELECT id, {tags}, CASE WHEN id % 3 = 0 THEN NULL ELSE"
                                  " plan END AS note, region, plan, age, spend FROM customers")
    assert list(out.columns) == ["id", "tags", "note", "prediction"]
    assert list(out["id"]) == list(frame["id"])
    first = out["tags"].iloc[0]
    assert list(first if pg else json.loads(first)) == [1000, 1001]
    assert out["note"].isna().sum() == int((frame["id"] % 3 == 0).sum())
    assert list(out["prediction"]) == list(model.predict(frame))


def test_servers_before_postgresql_14_read_the_pages_by_tid_lists(pg_db, monkeypatch):
    """Without TID range scans (PostgreSQL 12, 13; Greenplum 7) the pages of a range are read
    by the list of every TID they can hold: the same predictions."""
    from dbdl_magic.backends.postgres import PostgresBackend

    monkeypatch.setattr(predicting, "ROWS_PER_BUFFER", 100)
    frame = customers(500, seed=7)
    load_table(pg_db.engine, "customers", frame)
    model = dl.train(pg_db, "SELECT plan, age, spend, churned FROM customers", name="old",
                     target="churned", model="mlp:16", epochs=2)
    monkeypatch.setattr(PostgresBackend, "server_major", lambda self, conn: 13)
    out = dl.predict(pg_db, "old", "SELECT id, plan, age, spend FROM customers", proba=True)
    assert list(out["id"]) == list(frame["id"])
    assert list(out["prediction"]) == list(model.predict(frame))


def test_regression_paths_and_the_numeric_form(db):
    frame = customers(400, seed=1)
    load_table(db.engine, "customers", frame)
    model = dl.train(db, "SELECT age, spend, price FROM customers", name="price",
                     target="price", task="regression", model="mlp:16", epochs=8, lr=0.02)
    expected = model.predict(frame)
    out = dl.predict(db, "price", "SELECT id, age, spend FROM customers")
    assert np.allclose(out["prediction"], expected, rtol=1e-6, atol=1e-4)
    got = rows_of(db, row_sql(db, "predict_value", ["age", "spend"]), m="price")
    assert np.allclose([r.out for r in got], expected, rtol=1e-6, atol=1e-4)
    if db.backend.name == "postgresql":
        got = rows_of(db, "SELECT dbdl.predict('price', age, spend) AS out FROM customers"
                          " ORDER BY id")
        assert np.allclose([float(r.out) for r in got], expected, rtol=1e-6, atol=1e-4)


def test_row_level_networks_numpy_cannot_run_go_through_torch(db):
    """A batch-norm layer is not in the numpy forward pass: such rows go through torch, with
    the same results."""
    frame = customers(300, seed=6)
    load_table(db.engine, "customers", frame)
    model = dl.train(db, "SELECT age, spend, churned FROM customers", name="bn",
                     target="churned", model="mlp:16,bn", epochs=3, seed=4)
    got = rows_of(db, row_sql(db, "predict_proba", ["age", "spend"]), m="bn")
    values = np.array([r.out if isinstance(r.out, list) else json.loads(r.out) for r in got])
    assert np.allclose(values, model.predict_proba(frame), atol=ATOL)
    got = rows_of(db, row_sql(db, "predict", ["age", "spend"]), m="bn")
    assert [r.out for r in got] == list(model.predict(frame))


def test_imputed_nulls_score_like_the_client(db):
    frame = customers(300, seed=2)
    frame.loc[frame.index % 7 == 0, "spend"] = np.nan
    load_table(db.engine, "customers", frame)
    model = dl.train(db, "SELECT plan, age, spend, churned FROM customers", name="imp",
                     target="churned", model="mlp:16", epochs=4, impute="mean", seed=1)
    out = dl.predict(db, "imp", "SELECT id, plan, age, spend FROM customers", proba=True)
    assert list(out["prediction"]) == list(model.predict(frame))
    columns = [f"proba_{c}" for c in model.classes_]
    assert np.allclose(out[columns].to_numpy(), model.predict_proba(frame), atol=ATOL)


def test_per_group_models_match_the_client(db, monkeypatch):
    monkeypatch.setattr(predicting, "ROWS_PER_BUFFER", 64)
    frame = customers(600, seed=3)
    load_table(db.engine, "customers", frame)
    grouped = dl.train(db, "SELECT region, plan, age, spend, churned FROM customers",
                       name="per_region", target="churned", group_by="region", model="mlp:16",
                       epochs=4, seed=2)
    out = dl.predict(db, "per_region", "SELECT * FROM customers", proba=True)
    assert list(out["id"]) == list(frame["id"])
    assert list(out["prediction"]) == list(grouped.predict(frame))
    columns = [f"proba_{c}" for c in grouped.classes_]
    assert np.allclose(out[columns].to_numpy(), grouped.predict_proba(frame), atol=ATOL)
    got = rows_of(db, row_sql(db, "predict", ["region", "plan", "age", "spend"]),
                  m="per_region")
    assert [r.out for r in got] == list(grouped.predict(frame))


def test_null_missing_and_mistyped_features_are_named(trained):
    db, _, _ = trained
    before = database_tables(db)
    with db.engine.begin() as conn:
        conn.execute(text("UPDATE customers SET age = NULL WHERE id IN (1003, 1650)"))
    with pytest.raises(dl.InputError, match="'age' has 2 NULL value"):
        dl.predict(db, "churn", "SELECT * FROM customers", into="scores")
    with pytest.raises(dl.InputError, match="'age' has 2 NULL value"):
        dl.predict(db, "churn", "SELECT * FROM customers")
    with pytest.raises(dl.InputError, match=r"lacks feature column.*'spend'"):
        dl.predict(db, "churn", "SELECT id, region, plan, age FROM customers")
    with pytest.raises(dl.InputError, match=r"mistyped.*'spend'"):
        dl.predict(db, "churn", "SELECT id, region, plan, age, plan AS spend FROM customers")
    assert database_tables(db) == before  # no into table, no work table
    with pytest.raises(Exception, match="feature 'age' is NULL"):
        rows_of(db, row_sql(db, "predict", ["region", "plan", "age", "spend"]), m="churn")
    without_spend = (
        "SELECT dbdl.predict('churn', to_jsonb(c) - 'spend') FROM customers AS c"
        if db.backend.name == "postgresql" else
        "SELECT dbdl_predict('churn', json_object('region', region, 'plan', plan, 'age', age))"
        " FROM customers"
    )
    with pytest.raises(Exception, match=r"missing feature.*'spend'"):
        rows_of(db, without_spend + " WHERE age IS NOT NULL")


def test_an_interrupted_prediction_leaves_no_into_table(trained, monkeypatch):
    db, _, frame = trained
    dl.predict(db, "churn", "SELECT * FROM customers WHERE id < 1100", into="scores")
    before = database_tables(db)
    monkeypatch.setattr(predicting, "ROWS_PER_BUFFER", 4)
    if db.backend.name == "sqlite":
        from dbdl_magic.backends import sqlite as backend_module

        real, calls = backend_module.predict_buffer, []

        def interrupted(evaluator, x):
            calls.append(1)
            if len(calls) == 20:  # rows of 19 buffers are already in the new table
                raise KeyboardInterrupt
            return real(evaluator, x)

        monkeypatch.setattr(backend_module, "predict_buffer", interrupted)
        with pytest.raises(KeyboardInterrupt):
            dl.predict(db, "churn", "SELECT * FROM customers", into="scores", replace=True)
    else:
        stop = threading.Event()

        def cancel_scoring_statements() -> None:
            while not stop.is_set():
                with db.engine.connect() as conn:
                    conn.execute(text(
                        "SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE"
                        " query LIKE '%predict_batch(%' AND query NOT LIKE '%pg_stat_activity%'"
                        " AND state = 'active'")).all()
                time.sleep(0.02)

        canceller = threading.Thread(target=cancel_scoring_statements)
        canceller.start()
        try:
            with pytest.raises(Exception, match="cancel"):
                for _ in range(20):  # a prediction may end before the cancel comes: again
                    dl.predict(db, "churn", "SELECT * FROM customers", into="scores",
                               replace=True)
        finally:
            stop.set()
            canceller.join()
    assert database_tables(db) == before
    kept = rows_of(db, "SELECT count(*) AS n FROM scores")[0].n
    assert kept == int((frame["id"] < 1100).sum())  # the old table, untouched


def test_load_model_reads_the_weights_alone(db):
    frame = customers(300, seed=4)
    load_table(db.engine, "customers", frame)
    dl.train(db, "SELECT plan, age, spend, churned FROM customers", name="adam",
             target="churned", model="mlp:256,128", epochs=2, optimizer="adam", deltas=False)
    loaded = dl.load_model(db, "adam", device="cpu")
    with db.engine.connect() as conn:
        row = registry.read_model(conn, db.backend, "adam")  # the whole checkpoint, as before
        stats: dict[str, int] = {}
        key = {"name": "adam", "version": row["version"]}
        weights = registry.read_weights(conn, db.backend, key, row["iteration"], stats)
    full = decode_state(row["state"])
    assert full.optimizer_tensors()  # the checkpoint does hold Adam's moments
    expected = full.model_tensors()
    assert weights.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(weights[name], tensor)
        assert torch.equal(loaded.net.state_dict()[name], tensor)
    weight_bytes = sum(t.numel() * t.element_size() for t in expected.values())
    # the weights and the tensor table, not the moments (twice the weights)
    assert weight_bytes <= stats["bytes"] < weight_bytes + 16 * 1024 < len(row["state"]) / 2


def test_load_model_verifies_every_weight_block(db):
    frame = customers(200, seed=5)
    load_table(db.engine, "customers", frame)
    dl.train(db, "SELECT plan, age, spend, churned FROM customers", name="bad",
             target="churned", model="mlp:16", epochs=1, deltas=False)
    cb, blocks = db.backend.table("checkpoint_blocks"), db.backend.table("blocks")
    with db.engine.begin() as conn:
        address = conn.execute(text(
            f"SELECT hash FROM {cb} WHERE name = 'bad' AND label LIKE 'model.0.weight%'"
            " ORDER BY iteration DESC LIMIT 1")).scalar_one()
        data = bytearray(conn.execute(text(f"SELECT data FROM {blocks} WHERE hash = :h"),
                                      {"h": address}).scalar_one())
        data[3] ^= 0x55
        conn.execute(text(f"UPDATE {blocks} SET data = :d WHERE hash = :h"),
                     {"d": bytes(data), "h": address})
    with pytest.raises(CorruptBlockError, match="corrupt"):
        dl.load_model(db, "bad", device="cpu")


def test_row_level_prediction_looks_the_model_up_once_per_statement(trained):
    db, model, frame = trained
    features = ["region", "plan", "age", "spend"]
    if db.backend.name == "postgresql":
        def lookups() -> int:
            time.sleep(1.2)  # backends flush their table statistics once a second
            return int(rows_of(db, "SELECT coalesce(seq_scan, 0) + coalesce(idx_scan, 0) AS n"
                                   " FROM pg_stat_all_tables WHERE schemaname = 'dbdl_store'"
                                   " AND relname = 'models'")[0].n)

        with db.engine.connect() as conn:
            conn.execute(text(row_sql(db, "predict", features)), {"m": "churn"}).all()  # warm
            first = lookups()
            conn.execute(text(row_sql(db, "predict", features)), {"m": "churn"}).all()
            conn.execute(text(row_sql(db, "predict", features)), {"m": "churn"}).all()
            assert lookups() - first <= 6  # a few per statement, not one per row (1,400 rows)
    # a new version is picked up by the next statement
    retrained = dl.train(db, "SELECT region, plan, age, spend, churned FROM customers",
                         name="churn", target="churned", model="mlp:8", epochs=2, seed=9)
    got = rows_of(db, row_sql(db, "predict", features), m="churn")
    assert [r.out for r in got] == list(retrained.predict(frame))
    pinned = rows_of(db, row_sql(db, "predict", features), m=f"churn:{model.version}")
    assert [r.out for r in pinned] == list(model.predict(frame))


# -- the kernel and the array images ------------------------------------------------------------
def image_of(values: np.ndarray, nulls: np.ndarray | None = None) -> bytes:
    """A PostgreSQL ``double precision[]`` image of a 2-D array, as ``array_bytes`` gives it."""
    n, m = values.shape
    head = struct.pack("=iiIiiii", 2, 0, 701, n, m, 1, 1)
    if nulls is None:
        return head + values.astype("=f8").tobytes()
    bits = np.packbits(~nulls.ravel(), bitorder="little").tobytes()
    offset = -(-(4 + len(head) + len(bits)) // 8) * 8
    head = struct.pack("=iiIiiii", 2, offset, 701, n, m, 1, 1) + bits
    head += b"\0" * (offset - 4 - len(head))
    return head + values.ravel()[~nulls.ravel()].astype("=f8").tobytes()


def test_kernel_reads_images_and_encodes_like_the_packer():
    raw = np.array([[1.5, 0, 2.0], [np.nan, 2, -1.0], [3.0, -1, 0.5]])
    nulls = np.isnan(raw)
    values, found = kpredict.read_array_image(image_of(np.nan_to_num(raw), nulls))
    assert (found == nulls).all() and np.array_equal(values[~nulls], raw[~nulls])
    columns = [{"name": "x", "kind": "numeric", "mean": 1.0, "std": 2.0, "width": 1},
               {"name": "c", "kind": "categorical", "mean": 0.0, "std": 1.0, "width": 3},
               {"name": "y", "kind": "numeric", "mean": 0.0, "std": 4.0, "width": 1}]
    with pytest.raises(DataError, match="'x' is NULL in 1 row"):
        kpredict.encode_raw(columns, values, found)
    encoded = kpredict.encode_raw(columns, np.nan_to_num(raw))
    assert encoded.dtype == np.float32
    assert np.array_equal(encoded[:, 1:4], [[1, 0, 0], [0, 0, 1], [0, 0, 0]])
    assert encoded[0, 0] == np.float32((1.5 - 1.0) / 2.0) and encoded[1, 4] == np.float32(-0.25)
    for bad in (b"", b"\0" * 11, image_of(raw[:, :1])[:-3], image_of(raw)[:20] + b"\0" * 7):
        with pytest.raises(DataError):
            kpredict.read_array_image(bad)
    out = kpredict.array_image(np.array([3, 1], dtype=np.int32), kpredict.INT4)
    assert out == struct.pack("=iiIiiii", 1, 0, 23, 2, 1, 3, 1)


def test_pg_array_images_round_trip_and_refuse_other_bytes(pg_db):
    with pg_db.engine.connect() as conn:
        def one(sql: str, **params):
            return conn.execute(text(sql), params).scalar_one()

        # other typmods only cut the bytes short: any value is a valid bytea
        assert one("SELECT length(dbdl.array_image(CAST(ARRAY[1, 2] AS float8[]), 12, true))") <= 8
        image = one("SELECT dbdl.array_image(CAST(ARRAY[[1.5, 2], [3, NULL]] AS float8[]))")
        values, nulls = kpredict.read_array_image(image)
        assert values.tolist() == [[1.5, 2.0], [3.0, 0.0]] and nulls.tolist() == [
            [False, False], [False, True]]
        for fn, elem, data in (("int4_array", kpredict.INT4, [5, -2, 7]),
                               ("float4_array", kpredict.FLOAT4, [0.25, -1.5]),
                               ("float8_array", kpredict.FLOAT8, [1e300, -0.0, 3.5])):
            image = kpredict.array_image(np.array(data), elem)
            assert one(f"SELECT dbdl.{fn}(:b)", b=image) == data
            assert one(f"SELECT dbdl.{fn}(:b)", b=kpredict.array_image(np.array([]), elem)) == []
        rng = np.random.default_rng(0)
        good = kpredict.array_image(np.arange(6, dtype=np.int32), kpredict.INT4)
        for trial in range(200):  # nothing but an exact image is read as an array
            bad = bytearray(good if trial % 2 else rng.bytes(int(rng.integers(0, 60))))
            if trial % 2:
                bad[int(rng.integers(0, 20))] ^= 1 + int(rng.integers(0, 255))
                if trial % 4 == 1:
                    bad = bad[: int(rng.integers(0, len(bad)))]
            try:
                got = conn.execute(text("SELECT dbdl.int4_array(:b)"), {"b": bytes(bad)})
                assert got.scalar_one() == list(range(6))  # only the intact image passes
            except Exception as exc:  # the database's refusal
                conn.rollback()
                assert "not the image" in str(exc)
        assert one("SELECT 1") == 1
        for name in ("dbdl_store.bytes_int4s(bytea, integer, boolean)",
                     "dbdl_store.array_bytes(anyarray, integer, boolean)"):
            assert not one(f"SELECT has_function_privilege('public', '{name}', 'EXECUTE')")
        assert one("SELECT has_function_privilege('public', 'dbdl.int4_array(bytea)',"
                   " 'EXECUTE')")
