"""In-database prediction: API, magic, key columns, errors naming the culprit."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from IPython.core.interactiveshell import InteractiveShell
from sqlalchemy import text

import dbdl_magic as dl
from dbdl_magic.datasets import load_table


def customers(n: int = 500, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({
        "id": np.arange(n) + 1000,
        "plan": rng.choice(["basic", "plus", "pro"], size=n),
        "age": rng.integers(18, 80, size=n),
        "spend": rng.normal(50, 15, size=n),
    })
    score = (df["plan"] == "pro") * 1.5 + (df["spend"] - 50) / 15
    df["churned"] = np.where(score > 0.5, "yes", "no")
    df["price"] = 3 * df["spend"] + df["age"]
    return df


@pytest.fixture
def trained(db):
    frame = customers()
    load_table(db.engine, "customers", frame)
    model = dl.train(db, "SELECT plan, age, spend, churned FROM customers", name="churn",
                     target="churned", model="mlp:16", epochs=4, seed=0)
    return db, model, frame


def test_predict_returns_keys_and_matches_the_client_module(trained):
    db, model, frame = trained
    out = dl.predict(db, "churn", "SELECT id, plan, age, spend FROM customers", proba=True)
    assert list(out.columns) == ["id", "prediction", "proba_no", "proba_yes"]
    assert list(out["id"]) == list(frame["id"])  # query order, keys kept
    assert np.allclose(out[["proba_no", "proba_yes"]].to_numpy(), model.predict_proba(frame),
                       atol=1e-5)
    assert list(out["prediction"]) == list(model.predict(frame))


def test_predict_into_a_table(trained):
    db, model, frame = trained
    n = dl.predict(db, "churn", "SELECT * FROM customers WHERE age > :a", into="scores",
                   params={"a": 40}, keys=["id"])
    assert n == int((frame["age"] > 40).sum())
    with db.engine.connect() as conn:
        stored = pd.read_sql(text("SELECT * FROM scores ORDER BY id"), conn)
    assert list(stored.columns) == ["id", "prediction"]
    expected = model.predict(frame[frame["age"] > 40])
    assert list(stored["prediction"]) == list(expected)
    with pytest.raises(dl.InputError, match="already exists"):
        dl.predict(db, "churn", "customers", into="scores")
    assert dl.predict(db, "churn", "customers", into="scores", replace=True) == len(frame)


def test_regression_prediction(db):
    frame = customers(300)
    load_table(db.engine, "customers", frame)
    model = dl.train(db, "SELECT age, spend, price FROM customers", name="price",
                     target="price", task="regression", model="linear", epochs=30, lr=0.05)
    out = dl.predict(db, "price", "SELECT id, age, spend FROM customers")
    assert np.allclose(out["prediction"], model.predict(frame), rtol=1e-4, atol=1e-3)


def test_missing_and_mistyped_features_are_named(trained):
    db, _, _ = trained
    with pytest.raises(dl.InputError, match="'spend'"):
        dl.predict(db, "churn", "SELECT id, plan, age FROM customers")
    with pytest.raises(dl.InputError, match="'age'"):
        dl.predict(db, "churn", "SELECT id, plan, plan AS age, spend FROM customers")
    with pytest.raises(dl.InputError, match="no model 'ghost'"):
        dl.predict(db, "ghost", "customers")


def test_dbpredict_magic(trained, tmp_path, monkeypatch):
    db, _, frame = trained
    ip = InteractiveShell.instance()
    ip.run_line_magic("reload_ext", "dbdl_magic")
    ip.user_ns["engine"] = db.engine
    ip.run_line_magic("dbconnect", "engine")
    ip.user_ns["min_age"] = 70
    out = ip.run_cell_magic("dbpredict", "churn --proba",
                            "SELECT id, plan, age, spend FROM customers WHERE age >= :min_age")
    assert len(out) == int((frame["age"] >= 70).sum()) and "proba_yes" in out.columns
    ip.run_cell_magic("dbpredict", "churn --into magic_scores --keys id", "customers")
    with db.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM magic_scores")).scalar_one() == len(frame)


def test_plain_sql_prediction_function(trained):
    db, model, frame = trained
    if db.backend.name == "postgresql":
        sql = ("SELECT c.id, dbdl.predict('churn', to_jsonb(c)) AS label,"
               " dbdl.predict_proba('churn', to_jsonb(c)) AS proba FROM customers c ORDER BY id")
    else:
        sql = ("SELECT id, dbdl_predict('churn', json_object('plan', plan, 'age', age,"
               " 'spend', spend)) AS label, dbdl_predict_proba('churn', json_object('plan',"
               " plan, 'age', age, 'spend', spend)) AS proba FROM customers ORDER BY id")
    with db.engine.connect() as conn:
        rows = conn.execute(text(sql)).all()
    assert [r.label for r in rows] == list(model.predict(frame))
    proba = np.array([r.proba if isinstance(r.proba, list) else json.loads(r.proba)
                      for r in rows])
    assert np.allclose(proba, model.predict_proba(frame), atol=1e-5)
    # a failing kernel names its error on both databases (sqlite3 alone would say only
    # "user-defined function raised exception"), and the connection stays usable
    f = "dbdl." if db.backend.name == "postgresql" else "dbdl_"
    row = ("jsonb_build_object('plan', 'basic', 'age', 30)" if db.backend.name == "postgresql"
           else "json_object('plan', 'basic', 'age', 30)")
    error = Exception if db.backend.name == "postgresql" else dl.DbdlError
    for sql, message in [
        (f"SELECT {f}predict('nosuch', {row})", "no model 'nosuch'"),
        (f"SELECT {f}predict('churn', {row})", "missing feature.*'spend'"),
    ]:
        with db.engine.connect() as conn, pytest.raises(error, match=message):
            conn.execute(text(sql))
    with db.engine.connect() as conn:
        assert conn.execute(text("SELECT 1")).scalar_one() == 1


def test_plain_sql_numeric_variadic_form(pg_db):
    frame = customers(300)
    load_table(pg_db.engine, "customers", frame)
    model = dl.train(pg_db, "SELECT age, spend, price FROM customers", name="price",
                     target="price", task="regression", model="linear", epochs=20, lr=0.05)
    with pg_db.engine.connect() as conn:
        values = conn.execute(text(
            "SELECT dbdl.predict_value('price', jsonb_build_object('age', age, 'spend', spend)),"
            " dbdl.predict('price', age, spend) FROM customers ORDER BY id")).all()
        with pytest.raises(Exception, match="missing feature"):
            conn.execute(text("SELECT dbdl.predict_value('price', '{\"age\": 3}')")).all()
    expected = model.predict(frame)
    assert np.allclose([v[0] for v in values], expected, rtol=1e-4)
    assert np.allclose([float(v[1]) for v in values], expected, rtol=1e-4)
