"""One model per group (``group_by``): storage, loading, client-side and in-database routing.

Runs against real SQLite and real PostgreSQL (the ``db`` fixture).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import database_tables
from sqlalchemy import text

import dbdl_magic as dl
import dbdl_magic.notebook.accessor  # registers df.dl
from dbdl_magic.datasets import load_table
from dbdl_magic.store.modules import DBModel, GroupedModel, group_key_candidates, group_keys

FEATURES = ["plan", "age", "spend"]


def opposite_lines(n: int, seed: int) -> pd.DataFrame:
    """y = 3x + 1 in group 1 and y = -3x - 1 in group 2: no single function of x fits both."""
    rng = np.random.default_rng(seed)
    shop = rng.choice([1, 2], size=n)
    x = rng.uniform(-2, 2, size=n)
    sign = np.where(shop == 1, 1.0, -1.0)
    return pd.DataFrame({
        "id": np.arange(n) + 10_000 * seed,
        "shop": shop,  # an INTEGER group column: CAST(shop AS TEXT) = '1' / '2'
        "x": x,
        "noise": rng.normal(size=n),
        "y": sign * (3 * x + 1) + rng.normal(scale=0.1, size=n),
    })


def customers(n: int, seed: int = 0) -> pd.DataFrame:
    """Churn flips with the region: high spenders churn in eu.de, low spenders in us.ny."""
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({
        "id": np.arange(n) + 1000,
        "region": rng.choice(["eu.de", "us.ny"], size=n),  # dots in the group values
        "plan": rng.choice(["basic", "plus", "pro"], size=n),
        "age": rng.integers(18, 80, size=n),
        "spend": rng.normal(50, 15, size=n),
    })
    high = df["spend"] > 50
    df["churned"] = np.where((df["region"] == "eu.de") == high, "yes", "no")
    return df


def test_group_models_beat_one_global_model_and_route_an_integer_column(db):
    train, holdout = opposite_lines(400, 0), opposite_lines(200, 1)
    load_table(db.engine, "lines", train)
    load_table(db.engine, "holdout", holdout)
    common = dict(target="y", features=["x", "noise"], task="regression", model="linear",
                  epochs=12, lr=0.05, batch_size=32, seed=0,
                  validation_query="SELECT * FROM holdout")
    grouped = dl.train(db, "SELECT * FROM lines", group_by="shop", name="lines", **common)
    single = dl.train(db, "SELECT * FROM lines", name="lines_global", **common)

    assert isinstance(grouped, GroupedModel) and grouped.group_by == "shop"
    assert sorted(grouped.models) == ["1", "2"]  # integer values, stored as text
    table = grouped.group_table
    assert list(table["group"]) == ["1", "2"] and list(table["epochs"]) == [12, 12]
    assert table["train_rows"].sum() == len(train)
    assert {"train_loss", "val_loss"} <= set(table.columns)

    # The same holdout rows, scored inside the database: the router sends shop 1 and shop 2
    # to their own models; one model for all rows cannot fit lines of opposite slopes.
    routed = dl.predict(db, "lines", "SELECT id, shop, x, noise FROM holdout")
    assert list(routed.columns) == ["id", "shop", "prediction"]
    assert list(routed["id"]) == list(holdout["id"])  # the query's row order
    pooled = dl.predict(db, "lines_global", "SELECT id, x, noise FROM holdout")
    mse_grouped = float(np.mean((routed["prediction"] - holdout["y"]) ** 2))
    mse_global = float(np.mean((pooled["prediction"] - holdout["y"]) ** 2))
    assert np.allclose(pooled["prediction"], single.predict(holdout), rtol=1e-4, atol=1e-4)
    print(f"holdout MSE: per-group {mse_grouped:.4f}, one global model {mse_global:.4f}")
    assert mse_grouped < 0.1 < 5.0 < mse_global

    # Client side: int values route by str(int); equal to each group model on its rows.
    assert np.allclose(routed["prediction"], grouped.predict(holdout), rtol=1e-4, atol=1e-4)
    for shop in (1, 2):
        rows = holdout["shop"] == shop
        own = dl.load_model(db, "lines", group=shop)  # the int finds group "1"
        assert isinstance(own, DBModel) and own.version == int(table["version"][shop - 1])
        assert np.allclose(routed["prediction"][rows.to_numpy()], own.predict(holdout[rows]),
                           rtol=1e-4, atol=1e-4)
    assert dl.load_model(db, "lines", group="2").version == grouped.models["2"].version
    with pytest.raises(dl.InputError, match="no model for shop=3"):
        dl.load_model(db, "lines", group=3)
    with pytest.raises(dl.InputError, match="not trained with group_by"):
        dl.load_model(db, "lines_global", group=1)

    # Row-at-a-time prediction from SQL routes by the row's group column too.
    with db.engine.connect() as conn:
        if db.backend.name == "postgresql":
            sql = ("SELECT h.id, dbdl.predict_value('lines', to_jsonb(h)) FROM holdout AS h"
                   " ORDER BY h.id")
        else:
            sql = ("SELECT id, dbdl_predict_value('lines', json_object('shop', shop, 'x', x,"
                   " 'noise', noise)) FROM holdout ORDER BY id")
        per_row = [float(v) for _, v in conn.execute(text(sql))]
        assert np.allclose(per_row, routed.sort_values("id")["prediction"], atol=1e-4)
        no_group = ("SELECT dbdl.predict_value('lines', jsonb_build_object('x', 1, 'noise', 0))"
                    if db.backend.name == "postgresql" else
                    "SELECT dbdl_predict_value('lines', json_object('x', 1, 'noise', 0))")
        # SQLite too names the kernel's error (sqlite3 alone says "user-defined function
        # raised exception"); PostgreSQL's error carries the kernel's message
        error = Exception if db.backend.name == "postgresql" else dl.DbdlError
        with pytest.raises(error, match="one model per 'shop'"):
            conn.execute(text(no_group))

    # A float column with the same values still finds the groups ("1" for 1.0).
    as_float = holdout.assign(shop=holdout["shop"].astype(float))
    assert np.allclose(grouped.predict(as_float), grouped.predict(holdout))


def test_stored_versions_in_database_routing_unknown_groups_and_fallback(db):
    frame = customers(400)
    load_table(db.engine, "customers", frame)
    model = dl.train(db, "SELECT region, plan, age, spend, churned FROM customers",
                     target="churned", group_by="region", name="churn", model="mlp:8",
                     epochs=3, lr=0.01, seed=0)
    # Stored: one ordinary version per group, then the router (no checkpoints of its own).
    listed = dl.list_models(db)
    listed = listed[listed["name"] == "churn"]
    assert list(listed["version"]) == [1, 2, 3]
    assert list(listed["checkpoints"])[-1] == 0 and min(listed["checkpoints"][:2]) == 4
    assert isinstance(model, GroupedModel) and model.version == 3
    loaded = dl.load_model(db, "churn", device="cpu")
    assert isinstance(loaded, GroupedModel) and len(loaded.group_table) == 2
    assert list(loaded.group_table["group"]) == ["eu.de", "us.ny"]
    assert list(loaded.group_table["version"]) == [1, 2]
    assert len(loaded.history) == 3 and len(loaded.history["members"].iloc[-1]) == 2
    assert loaded.classes_ == ["no", "yes"] and loaded.task == "classification"
    assert loaded.device == torch.device("cpu")

    # In the database: every row scored by its region's model, in the query's order.
    out = dl.predict(db, "churn", "SELECT id, region, plan, age, spend FROM customers",
                     proba=True)
    assert list(out.columns) == ["id", "region", "prediction", "proba_no", "proba_yes"]
    assert list(out["id"]) == list(frame["id"])
    for region, member in loaded.models.items():
        rows = (frame["region"] == region).to_numpy()
        assert np.allclose(out.loc[rows, ["proba_no", "proba_yes"]].to_numpy(),
                           member.predict_proba(frame[rows]), atol=1e-5)
        assert list(out.loc[rows, "prediction"]) == list(member.predict(frame[rows]))
    assert list(out["prediction"]) == list(loaded.predict(frame))
    assert np.allclose(loaded.predict_proba(frame), out[["proba_no", "proba_yes"]], atol=1e-5)
    # The groups really differ: each region's model is better on its own rows.
    for region, member in loaded.models.items():
        own = frame[frame["region"] == region]
        other = next(m for g, m in loaded.models.items() if g != region)
        assert (member.predict(own) == own["churned"]).mean() > (
            other.predict(own) == own["churned"]).mean()

    # Into a table, keys chosen; the old table is kept unless replace=True.
    assert dl.predict(db, "churn", "SELECT * FROM customers WHERE age > 40", into="scores",
                      keys=["id"]) == int((frame["age"] > 40).sum())
    with db.engine.connect() as conn:
        stored = pd.read_sql(text("SELECT * FROM scores ORDER BY id"), conn)
    assert list(stored.columns) == ["id", "prediction"]
    assert list(stored["prediction"]) == list(loaded.predict(frame[frame["age"] > 40]))
    with pytest.raises(dl.InputError, match="already exists"):
        dl.predict(db, "churn", "customers", into="scores")
    assert dl.predict(db, "churn", "customers", into="scores", replace=True) == len(frame)

    # Unknown groups: an error naming the column and the value; nothing left behind.
    before = database_tables(db)
    with db.engine.begin() as conn:
        conn.execute(text("UPDATE customers SET region = 'ap.jp' WHERE id < 1010"))
    with pytest.raises(dl.InputError, match=r"'region'.*'ap\.jp'.*fallback="):
        dl.predict(db, "churn", "customers")
    with pytest.raises(dl.InputError, match="lacks the group_by column 'region'"):
        dl.predict(db, "churn", "SELECT id, plan, age, spend FROM customers")
    assert database_tables(db) == before
    moved = frame.assign(region=np.where(frame["id"] < 1010, "ap.jp", frame["region"]))
    with pytest.raises(dl.InputError, match=r"'region'.*'ap\.jp'"):
        loaded.predict(moved)

    # A fallback model scores them (the rest still by their regions' models).
    fallback = dl.train(db, "SELECT plan, age, spend, churned FROM customers", name="everyone",
                        target="churned", model="mlp:8", epochs=2, seed=0, device="cpu")
    out = dl.predict(db, "churn", "SELECT id, region, plan, age, spend FROM customers"
                     " ORDER BY id", proba=True, fallback="everyone:1")
    unknown = (moved["region"] == "ap.jp").to_numpy()
    assert unknown.sum() == 10 and list(out["id"]) == list(frame["id"])
    assert np.allclose(out.loc[unknown, ["proba_no", "proba_yes"]].to_numpy(),
                       fallback.predict_proba(moved[unknown]), atol=1e-5)
    assert np.allclose(out.loc[~unknown, ["proba_no", "proba_yes"]].to_numpy(),
                       loaded.predict_proba(moved[~unknown]), atol=1e-5)
    assert list(out["prediction"]) == list(loaded.predict(moved, fallback=fallback))
    assert list(moved.dl.predict(loaded, fallback=fallback)) == list(out["prediction"])
    assert database_tables(db) == before
    load_table(db.engine, "narrow", frame[["plan", "age", "churned"]])
    dl.train(db, "narrow", name="narrow", target="churned", model="linear", epochs=1)
    with pytest.raises(dl.InputError, match=r"other features.*lacks 'spend'"):
        dl.predict(db, "churn", "customers", fallback="narrow")
    with pytest.raises(dl.InputError, match="per-group models"):
        dl.predict(db, "everyone", "customers", fallback="narrow")


def test_client_side_routing_forward_and_accessor(sqlite_db):
    frame = customers(300, seed=2)
    load_table(sqlite_db.engine, "customers", frame)
    model = dl.train(sqlite_db, "customers", target="churned", group_by="region",
                     features=FEATURES, model="mlp:8", epochs=2, seed=0, device="cpu")
    # forward(x, groups) on encoded rows equals each group model on its rows.
    x = model.encoding.encode_frame(frame)
    with torch.no_grad():
        routed = model(torch.from_numpy(x), frame["region"].tolist())
        for region, member in model.models.items():
            rows = np.array(frame["region"] == region)
            assert torch.allclose(routed[torch.from_numpy(rows)],
                                  member(torch.from_numpy(x[rows])))
    assert model["us.ny"] is model.models["us.ny"]
    # df.dl.predict routes client side; evaluate works on the routed outputs.
    proba = frame.dl.predict(model, proba=True)
    assert list(proba.columns) == ["no", "yes"] and proba.index.equals(frame.index)
    assert list(frame.dl.predict(model)) == list(model.predict(frame))
    assert frame.dl.evaluate(model)["n"] == len(frame)
    # The database's kernel on client-encoded rows, per group.
    in_db = dl.predict_in_database(sqlite_db, model.name, frame.head(20))
    assert np.allclose(in_db, model.predict_proba(frame.head(20)), atol=1e-5)


def test_group_value_text_rule():
    assert group_key_candidates("a.b") == ["a.b"]
    assert group_key_candidates(np.int64(7)) == ["7"]
    assert group_key_candidates(3.0)[:2] == ["3", "3.0"]  # PostgreSQL, SQLite
    assert group_key_candidates(2.5)[0] == "2.5"
    assert group_key_candidates(True)[:2] == ["true", "1"]
    assert group_key_candidates(None) == [] and group_key_candidates(float("nan")) == []
    assert group_keys([1, 1.0, True, "1", None], {"1"}) == ["1", "1", "1", "1", None]
    assert group_keys([True, False], {"true", "false"}) == ["true", "false"]


def test_every_group_runs_its_own_search_in_the_same_queries(db):
    """group_by with grid: each group trains every configuration, halving stops the weak ones
    within the group, and the router sends each group to its own best trial."""
    from dbdl_magic.store import registry
    rng = np.random.default_rng(3)
    n = 1200
    kind = rng.choice(["line", "wave"], size=n)
    x = rng.uniform(-2, 2, size=n)
    y = np.where(kind == "line", 3 * x + 1, np.sin(3 * x)) + rng.normal(scale=0.05, size=n)
    frame = pd.DataFrame({"id": np.arange(n), "kind": kind, "x": x, "y": y})
    load_table(db.engine, "shapes", frame)
    grid = {"model": ["linear", "mlp:32"], "lr": [0.01, 0.03]}
    model = dl.train(db, "SELECT kind, x, y FROM shapes", target="y", task="regression",
                     group_by="kind", grid=grid, epochs=8, batch_size=32, seed=0, parallel=1,
                     name="shapes")
    assert isinstance(model, GroupedModel) and model.version == 9  # 2 groups × 4 trials
    with db.engine.connect() as conn:
        members = [registry.read_model(conn, db.backend, "shapes", v, with_state=False)
                   for v in range(1, 9)]
    for group in ("line", "wave"):
        mine = [m for m in members if m["options"]["group"] == group]
        assert len(mine) == 4
        # halving inside the group: rungs after epochs 2 and 4 leave one trial for the end
        assert sorted(len(m["history"]) for m in mine) == [2, 2, 4, 8]
        best = min(mine, key=lambda m: m["history"][-1]["val_loss"])
        assert model.info["groups"][group] == best["version"]
        board = model.leaderboards[group]
        assert board["version"].iloc[0] == best["version"] and len(board) == 4
    assert "model=mlp:32" in model.leaderboards["wave"]["label"].iloc[0]  # a sine needs it
    routed = dl.predict(db, "shapes", "SELECT id, kind, x FROM shapes")
    for group in ("line", "wave"):
        rows = (frame["kind"] == group).to_numpy()
        own = dl.load_model(db, "shapes", model.info["groups"][group])
        assert np.allclose(routed["prediction"][rows], own.predict(frame[rows]), atol=1e-4)
    wave_mse = float(np.mean((routed["prediction"][kind == "wave"] - y[kind == "wave"]) ** 2))
    assert wave_mse < 0.25 < 0.4 < float(np.var(y[kind == "wave"]))  # a line: ≈ the variance
