"""``df.dl``: fit / predict / evaluate on DataFrames, through real databases."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sqlalchemy import text

import dbdl_magic.notebook.accessor  # noqa: F401 - registers df.dl


@pytest.fixture
def frame() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"a": rng.normal(size=400), "b": rng.choice(["x", "y", "z"], size=400)})
    df["label"] = np.where(df["a"] + (df["b"] == "x") > 0.5, "hi", "lo")
    return df.set_axis(pd.Index(rng.permutation(10_000)[:400], name="row"))


def frame_tables(db) -> list[str]:
    with db.engine.connect() as conn:
        if db.backend.name == "postgresql":
            sql = "SELECT tablename FROM pg_tables WHERE tablename LIKE 'dbdl_frame_%'"
        else:
            sql = "SELECT name FROM sqlite_master WHERE name LIKE 'dbdl_frame_%'"
        return [r[0] for r in conn.execute(text(sql))]


def test_fit_predict_evaluate_in_memory(frame):
    model = frame.dl.fit(target="label", model="mlp:16", epochs=15, lr=5e-3, batch_size=16,
                         display="none")
    pred = frame.dl.predict(model)
    assert isinstance(pred, pd.Series) and pred.index.equals(frame.index)
    assert (pred == frame["label"]).mean() > 0.9
    proba = frame.dl.predict(model, proba=True)
    assert list(proba.columns) == ["hi", "lo"] and proba.index.equals(frame.index)
    metrics = frame.dl.evaluate(model)
    assert metrics["n"] == 400
    assert metrics["accuracy"] == pytest.approx((pred == frame["label"]).mean())
    assert 0 < metrics["loss"] < 0.5


def test_fit_in_a_database_always_removes_its_table(db, frame):
    model = frame.dl.fit(target="label", model="linear", epochs=2, con=db, display="none")
    assert len(model.history) == 2
    assert frame_tables(db) == []
    bad = frame.assign(label=1.0)  # a single class: the run fails, the table still goes
    with pytest.raises(Exception, match="single class"):
        bad.dl.fit(target="label", epochs=1, con=db, display="none")
    assert frame_tables(db) == []


def test_regression_evaluate_matches_history(frame):
    df = frame.assign(y=frame["a"] * 3 + 1)
    model = df.drop(columns="label").dl.fit(target="y", model="linear", epochs=30, lr=0.05,
                                            validation=0.0, display="none")
    metrics = df.drop(columns="label").dl.evaluate(model)
    assert metrics["r2"] > 0.9 and metrics["mae"] < 1.0


def test_unusable_frames_raise_attribute_error(frame):
    with pytest.raises(AttributeError, match="MultiIndex"):
        _ = frame.set_axis(pd.MultiIndex.from_tuples([("a", 1), ("b", 2), ("c", 3)]), axis=1).dl
    with pytest.raises(AttributeError, match="duplicated"):
        _ = frame.set_axis(["a", "a", "label"], axis=1).dl
    with pytest.raises(KeyError, match="nope"):
        frame.dl.fit(target="nope", display="none")
