"""Training through real SQLite and real PostgreSQL: packing, iterations, models, parity."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from sqlalchemy import text
from torch import nn

import dbdl_magic as dl
from dbdl_magic.datasets import digits_frame, load_table
from dbdl_magic.events import Callbacks
from dbdl_magic.kernel.netbuild import build_network
from dbdl_magic.kernel.train import make_optimizer


def mixed_frame(n: int = 400, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    plan = rng.choice(["basic", "plus", "pro"], size=n)
    tenure = rng.integers(0, 60, size=n)
    spend = rng.normal(50, 15, size=n)
    vip = rng.random(n) < 0.3
    score = (plan == "pro") * 1.5 + (tenure < 12) * 1.0 - vip * 1.0 + (spend - 50) / 15
    churned = np.where(score + rng.normal(0, 0.3, n) > 0.8, "yes", "no")
    return pd.DataFrame({"plan": plan, "tenure": tenure, "monthly_spend": spend,
                         "vip": vip, "churned": churned})


def test_digits_train_end_to_end(db, digits):
    starts, rows, progress = [], [], []
    model = dl.train(
        db, "SELECT * FROM digits", target="digit", model="mlp:64", epochs=8,
        batch_size=32, seed=0, features=[f"p{i}" for i in range(64)],
        callbacks=Callbacks(on_start=starts.append, on_iteration=rows.append,
                            on_progress=lambda done, total: progress.append((done, total))),
    )
    assert isinstance(model, nn.Module) and model.device.type == "cpu"
    h = model.history
    assert list(h["epoch"]) == list(range(1, 9))
    assert {"train_loss", "val_loss", "val_accuracy", "val_f1", "seconds"} <= set(h.columns)
    assert h["train_loss"].iloc[-1] < h["train_loss"].iloc[0] / 3
    assert h["val_accuracy"].iloc[-1] > 0.9
    assert (h["samples"] == starts[0]["rows"]).all()
    assert starts[0]["rows"] + starts[0]["validation_rows"] == len(digits)
    assert len(rows) == 8 and progress and progress[-1][0] == progress[-1][1] == starts[0]["rows"]
    proba = model.predict_proba(digits)
    assert proba.shape == (len(digits), 10) and np.allclose(proba.sum(axis=1), 1, atol=1e-5)
    assert (model.predict(digits) == digits["digit"]).mean() > 0.93
    # the stored model is the same module
    again = dl.load_model(db, model.name)
    assert np.allclose(again.predict_proba(digits), proba, atol=1e-6)
    # the database's own predict kernel agrees with the client module
    in_db = dl.predict_in_database(db, model.name, digits.head(50))
    assert np.allclose(in_db, proba[:50], atol=1e-5)
    # status complete; every iteration (and the initial model) is a stored checkpoint
    listing = dl.list_models(db)
    assert listing.loc[0, "status"] == "complete" and listing.loc[0, "checkpoints"] == 9
    assert 0 < listing.loc[0, "stored_bytes"] < listing.loc[0, "logical_bytes"]


def test_packing_encodes_like_the_client(db):
    frame = mixed_frame(120)
    load_table(db.engine, "customers", frame)
    backend = db.backend
    from dbdl_magic.data.packing import PackOptions, infer_encoding, pack, stage_query

    opts = PackOptions(target="churned", validation=0.0, rows_per_buffer=50)
    stage, packed = backend.table("stage_t"), backend.table("packed_t")
    with db.engine.begin() as conn:
        stage_query(backend, conn, "SELECT * FROM customers", {}, stage)
        enc, n = infer_encoding(backend, conn, stage, opts)
        data = pack(backend, conn, stage, packed, enc, n, opts)
        rows = conn.execute(text(f"SELECT n, x, y FROM {packed} ORDER BY buffer_id")).all()
        conn.execute(text(f"DROP TABLE {stage}"))
        conn.execute(text(f"DROP TABLE {packed}"))
    assert data.n_buffers == 3 and [r[0] for r in rows] == [50, 50, 20]
    order = backend.byteorder
    x_db = np.concatenate([np.frombuffer(bytes(r[1]), f"{order}f4") for r in rows])
    y_db = np.concatenate([np.frombuffer(bytes(r[2]), f"{order}i4") for r in rows])
    x_db = x_db.reshape(n, -1)
    kinds = {f.name: f.kind for f in enc.features}
    assert kinds == {"plan": "categorical", "tenure": "numeric", "monthly_spend": "numeric",
                     "vip": "categorical" if db.backend.name == "postgresql" else "numeric"}
    x_client = enc.encode_frame(frame)
    y_client = np.searchsorted(enc.target.classes, frame["churned"])
    # rows were shuffled: compare as sorted row sets
    key_db = np.lexsort(np.column_stack([x_db, y_db]).T)
    key_client = np.lexsort(np.column_stack([x_client, y_client]).T)
    assert np.allclose(x_db[key_db], x_client[key_client], atol=1e-5)
    assert np.array_equal(y_db[key_db], y_client[key_client])
    assert not np.array_equal(y_db, y_client)  # and they were shuffled


def test_mixed_types_text_labels_and_validation_query(db):
    frame = mixed_frame(600)
    frame.insert(0, "id", np.arange(len(frame)))
    load_table(db.engine, "customers", frame)
    model = dl.train(
        db, "SELECT plan, tenure, monthly_spend, vip, churned FROM customers WHERE id % 4 <> 0",
        validation_query="SELECT plan, tenure, monthly_spend, vip, churned FROM customers "
                         "WHERE id % 4 = 0",
        target="churned", model="mlp:32,16", epochs=15, batch_size=32, lr=3e-3,
    )
    assert model.classes_ == ["no", "yes"]
    assert model.history["val_accuracy"].iloc[-1] > 0.85
    holdout = frame[frame["id"] % 4 == 0]
    assert (model.predict(holdout) == holdout["churned"]).mean() > 0.85


def test_regression(db):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(800, 3))
    frame = pd.DataFrame(x, columns=["a", "b", "c"])
    frame["price"] = 100 + 20 * x[:, 0] - 10 * x[:, 1] ** 2 + rng.normal(0, 1, 800)
    load_table(db.engine, "houses", frame)
    model = dl.train(db, "houses", target="price", model="mlp:32", epochs=25,
                     batch_size=32, lr=3e-3, task="regression")
    last = model.history.iloc[-1]
    assert model.task == "regression" and last["val_r2"] > 0.9
    assert last["val_mae"] < 5
    err = np.abs(model.predict(frame) - frame["price"]).mean()
    assert err < 5


def test_same_seed_same_history(db, digits):
    runs = [
        dl.train(db, "SELECT * FROM digits", target="digit", model="mlp:32,dropout=0.1",
                 epochs=3, seed=7, features=[f"p{i}" for i in range(64)]).history
        for _ in range(2)
    ]
    assert np.allclose(runs[0]["train_loss"], runs[1]["train_loss"], rtol=0, atol=1e-7)
    assert np.allclose(runs[0]["val_accuracy"], runs[1]["val_accuracy"])


def test_cnn_on_digit_images(db):
    frame = digits_frame(image=True)
    if db.backend.name == "postgresql":
        pixels = [list(np.frombuffer(b, "<f4").reshape(8, 8).astype(float)) for b in frame["image"]]
        with db.engine.begin() as conn:
            conn.execute(text("CREATE TABLE images (image real[], digit integer)"))
            conn.execute(text("INSERT INTO images VALUES (:image, :digit)"),
                         [{"image": [list(r) for r in p], "digit": int(d)}
                          for p, d in zip(pixels, frame["digit"], strict=True)])
        extra = {}
    else:
        load_table(db.engine, "images", frame)
        extra = {"image_shape": (8, 8)}
    model = dl.train(db, "SELECT image, digit FROM images", target="digit", model="cnn:8,16",
                     epochs=6, batch_size=32, lr=3e-3, **extra)
    assert model.encoding.input_shape == [1, 8, 8]
    assert isinstance(model.net[0], nn.Conv2d)
    assert model.history["val_accuracy"].iloc[-1] > 0.85
    assert (model.predict(frame.head(300)) == frame["digit"].head(300)).mean() > 0.85


def _plain_torch_accuracy(model, train: pd.DataFrame, test: pd.DataFrame, epochs: int,
                          batch_size: int, lr: float, seed: int) -> float:
    """The same architecture, optimizer, seed and epochs as a plain in-memory torch loop."""
    enc = model.encoding
    torch.manual_seed(seed)
    net = build_network(model.spec, enc.input_shape, enc.target.n_outputs)
    opt = make_optimizer(net.parameters(), {"name": "adam", "lr": lr})
    X = torch.from_numpy(enc.encode_frame(train))
    y = torch.from_numpy(np.searchsorted(enc.target.classes, train[enc.target.name]))
    gen = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(epochs):
        order = torch.randperm(len(X), generator=gen)
        for start in range(0, len(X), batch_size):
            idx = order[start : start + batch_size]
            opt.zero_grad()
            loss_fn(net(X[idx]), y[idx]).backward()
            opt.step()
    with torch.no_grad():
        pred = net(torch.from_numpy(enc.encode_frame(test))).argmax(1).numpy()
    return float((np.asarray(enc.target.classes)[pred] == test[enc.target.name]).mean())


def test_accuracy_parity_with_plain_torch(db, digits):
    epochs, batch, lr = 15, 32, 1e-3
    features = ", ".join(f"p{i}" for i in range(64))
    model = dl.train(
        db, f"SELECT {features}, digit FROM digits WHERE id % 5 <> 0",
        validation_query=f"SELECT {features}, digit FROM digits WHERE id % 5 = 0",
        target="digit", model="mlp:64", epochs=epochs, batch_size=batch, lr=lr, seed=0,
        optimizer="adam",
    )
    test = digits[digits["id"] % 5 == 0]
    in_db = float(model.history["val_accuracy"].iloc[-1])
    assert in_db == pytest.approx((model.predict(test) == test["digit"]).mean(), abs=1e-9)
    plain = _plain_torch_accuracy(model, digits[digits["id"] % 5 != 0], test, epochs, batch,
                                  lr, seed=0)
    assert abs(in_db - plain) <= 0.02, (in_db, plain)
