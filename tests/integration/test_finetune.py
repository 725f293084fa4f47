"""Warm starts and fine-tuning: frozen layers keep their weights and cost no new storage."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sqlalchemy import text

import dbdl_magic as dl
from dbdl_magic.datasets import digits_frame, load_table


@pytest.fixture
def digits_db(db):
    frame = digits_frame()
    frame.insert(0, "id", np.arange(len(frame)))
    frame["even"] = np.where(frame["digit"] % 2 == 0, "even", "odd")
    load_table(db.engine, "digits", frame)
    return db


def hashes(db, name: str, prefix: str) -> set[bytes]:
    with db.engine.connect() as conn:
        rows = conn.execute(text(
            f"SELECT hash FROM {db.backend.table('checkpoint_blocks')} WHERE name = :n "
            "AND label LIKE :p"), {"n": name, "p": prefix + "%"}).all()
    return {bytes(r[0]) for r in rows}


FEATURES = ", ".join(f"p{i}" for i in range(64))


def test_head_only_fine_tune_freezes_and_deduplicates(digits_db):
    db = digits_db
    base = dl.train(db, f"SELECT {FEATURES}, digit FROM digits WHERE id % 2 = 0",
                    name="base", target="digit", model="mlp:128,64", epochs=6, seed=0)
    tuned = dl.train(db, f"SELECT {FEATURES}, digit FROM digits WHERE id % 2 = 1",
                     name="tuned", target="digit", model="mlp:128,64", epochs=3, seed=1,
                     init_from="base", freeze="all_but_last")
    assert dl.list_models(db).set_index("name").loc["tuned", "parent"] == "base:1"
    for i in (0, 2):  # the two hidden Linear layers are frozen: bit-identical
        assert torch.equal(base.net[i].weight, tuned.net[i].weight)
        assert torch.equal(base.net[i].bias, tuned.net[i].bias)
    assert not torch.equal(base.net[4].weight, tuned.net[4].weight)  # the head trained
    # frozen layers cost no new storage: every block of theirs is one the base model stored
    for layer in ("model.0.", "model.2."):
        assert hashes(db, "tuned", layer) <= hashes(db, "base", layer)
    assert tuned.history["val_accuracy"].iloc[-1] > 0.85
    # the fine-tune encoded its rows with the base model's statistics
    assert tuned.encoding.features == base.encoding.features


def test_warm_start_with_a_new_head(digits_db):
    db = digits_db
    dl.train(db, f"SELECT {FEATURES}, digit FROM digits", name="digits10", target="digit",
             model="mlp:64", epochs=3)
    binary = dl.train(db, f"SELECT {FEATURES}, even FROM digits", name="parity",
                      target="even", model="mlp:64", epochs=3, init_from="digits10:1")
    assert binary.classes_ == ["even", "odd"] and binary.net[2].out_features == 2
    assert binary.history["val_accuracy"].iloc[-1] > 0.85


def test_warm_start_errors_name_the_culprit(digits_db):
    db = digits_db
    dl.train(db, f"SELECT {FEATURES}, digit FROM digits", name="src", target="digit",
             model="linear", epochs=1)
    with pytest.raises(dl.InputError, match="init_from='nope'"):
        dl.train(db, "digits", target="digit", init_from="nope", epochs=1)
    with pytest.raises(dl.InputError, match="'p63'"):
        dl.train(db, "SELECT p0, p1, digit FROM digits", target="digit", model="linear",
                 init_from="src", epochs=1)
    with pytest.raises(dl.InputError, match="freeze"):
        dl.train(db, f"SELECT {FEATURES}, digit FROM digits", target="digit",
                 model="mlp:16", freeze=[1], epochs=1)
