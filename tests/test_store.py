"""The model store: content-addressed blocks, dedup, deltas, verification, garbage collection."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sqlalchemy import text

import dbdl_magic as dl
from dbdl_magic.datasets import digits_frame, load_table
from dbdl_magic.kernel import blockstore, state, train
from dbdl_magic.store.spec import parse_spec


def make_state(seed: int = 0, width: int = 300) -> bytes:
    config = {"spec": parse_spec("mlp:512,256"), "input_shape": [width], "n_outputs": 10,
              "task": "classification", "seed": seed}
    return train.initial_state(config)


def test_split_and_assemble_are_exact_and_content_addressed():
    raw = make_state()
    blocks = blockstore.split_state(raw, block_bytes=64 * 1024)
    assert b"".join(b.raw for b in blocks) == raw
    assert all(len(b.raw) <= 64 * 1024 for b in blocks)
    labels = [b.label for b in blocks]
    assert "model.0.weight[0:54]" in labels  # row slices of a 512 x 300 float32 tensor
    rows = [(b.hash, b.dtype, 0, b.raw, None) for b in blocks]
    assert blockstore.assemble(rows) == raw
    # the dtype is part of the address
    assert blockstore.block_hash("F32", b"abcd") != blockstore.block_hash("I32", b"abcd")


def test_delta_is_lossless_and_small_for_close_weights():
    base = np.random.default_rng(0).normal(size=65536).astype(np.float32)
    new = base + np.float32(1e-4) * np.sign(base)
    delta = blockstore.encode_delta(new.tobytes(), base.tobytes())
    assert delta is not None and len(delta) < 0.9 * new.nbytes
    assert blockstore.decode_delta(delta, base.tobytes()) == new.tobytes()
    noise = np.random.default_rng(1).bytes(base.nbytes)  # incompressible difference
    assert blockstore.encode_delta(noise, base.tobytes()) is None  # not worth it


def test_corrupt_block_is_reported():
    raw = make_state()
    blocks = blockstore.split_state(raw)
    rows = [(b.hash, b.dtype, 0, b.raw, None) for b in blocks]
    damaged = bytearray(rows[3][3])
    damaged[10] ^= 0xFF
    rows[3] = (*rows[3][:3], bytes(damaged), None)
    with pytest.raises(blockstore.CorruptBlockError, match=r"block 3 .* corrupt"):
        blockstore.assemble(rows)


@pytest.fixture
def digits_db(db):
    load_table(db.engine, "digits", digits_frame())
    return db


def block_rows(db) -> list[tuple]:
    with db.engine.connect() as conn:
        return conn.execute(text(
            f"SELECT hash, encoding, refs, length(data) FROM {db.backend.table('blocks')}")).all()


def test_checkpoints_deduplicate_and_load_bit_exact(digits_db):
    db = digits_db
    options = dict(target="digit", model="mlp:128,64", epochs=4, seed=3, lr=1e-3)
    first = dl.train(db, "SELECT * FROM digits", name="twin", **options)
    after_first = block_rows(db)
    assert any(r[1] == blockstore.DELTA for r in after_first), "no delta was stored"
    listing = dl.list_models(db)
    assert listing.loc[0, "checkpoints"] == 5
    assert listing.loc[0, "stored_bytes"] < listing.loc[0, "logical_bytes"]
    # the same seed twice: identical checkpoints, so the second version adds no blocks
    second = dl.train(db, "SELECT * FROM digits", name="twin", **options)
    assert second.version == 2 and block_rows(db).__len__() == len(after_first)
    assert (second.history["stored_bytes"] == 0).all()
    for a, b in zip(first.parameters(), second.parameters(), strict=True):
        assert torch.equal(a, b)
    # loading reassembles exactly what the kernel produced (compare with the hot copy)
    with db.engine.connect() as conn:
        hot = conn.execute(text(
            f"SELECT state FROM {db.backend.table('checkpoints')} WHERE name = 'twin' AND "
            "version = 1 AND state IS NOT NULL")).scalar_one()
        key = {"name": "twin", "version": 1}
        assert db.backend.load_state(conn, key, 4) == bytes(hot)
        assert state.state_info(bytes(hot))["samples"] > 0


def test_corruption_is_detected_on_load(digits_db):
    db = digits_db
    dl.train(db, "SELECT * FROM digits", name="fragile", target="digit", model="linear",
             epochs=1)
    blocks = db.backend.table("blocks")
    with db.engine.begin() as conn:
        victim = conn.execute(text(
            f"SELECT hash FROM {blocks} WHERE encoding = 0 AND raw_size > 1000 LIMIT 1")
        ).scalar_one()
        data = bytearray(conn.execute(text(f"SELECT data FROM {blocks} WHERE hash = :h"),
                                      {"h": victim}).scalar_one())
        data[100] ^= 1
        conn.execute(text(f"UPDATE {blocks} SET data = :d WHERE hash = :h"),
                     {"d": bytes(data), "h": victim})
    with pytest.raises(blockstore.CorruptBlockError, match="corrupt"):
        dl.load_model(db, "fragile")


def test_delete_collects_unshared_blocks(digits_db):
    db = digits_db
    options = dict(target="digit", model="mlp:32", epochs=2, seed=1)
    dl.train(db, "SELECT * FROM digits", name="a", **options)
    dl.train(db, "SELECT * FROM digits", name="b", **options)  # same blocks as "a"
    shared = len(block_rows(db))
    assert dl.delete_model(db, "a") == 0  # every block is still used by "b"
    assert len(block_rows(db)) == shared
    dl.train(db, "SELECT * FROM digits", name="c", **{**options, "seed": 2})
    cb = db.backend.table("checkpoint_blocks")
    with db.engine.connect() as conn:  # blocks of "b" that "c" does not share
        only_b = conn.execute(text(
            f"SELECT count(DISTINCT hash) FROM {cb} WHERE name = 'b' AND hash NOT IN "
            f"(SELECT hash FROM {cb} WHERE name = 'c')")).scalar_one()
    assert 0 < only_b <= shared
    assert dl.delete_model(db, "b") == only_b
    assert dl.delete_model(db, "c") > 0
    assert block_rows(db) == []
    assert dl.list_models(db).empty
    with pytest.raises(dl.InputError, match="no model 'a'"):
        dl.delete_model(db, "a")


def test_approximate_dedup_serving_copy(digits_db):
    db = digits_db
    features = ", ".join(f"p{i}" for i in range(64))
    dl.train(db, f"SELECT {features}, digit FROM digits", name="base", target="digit",
             model="mlp:128", epochs=4, seed=0)
    tuned = dl.train(db, f"SELECT {features}, digit FROM digits", name="tuned",
                     target="digit", model="mlp:128", epochs=1, lr=1e-5, seed=1,
                     init_from="base")
    before = [p.detach().clone() for p in tuned.parameters()]
    serving, log = dl.serving_copy(db, "tuned", f"SELECT {features}, digit FROM digits",
                                   budget=0.02)
    assert len(log) > 0 and (log["relative_distance"] <= 0.5).all()
    frame = digits_frame()
    acc_tuned = (tuned.predict(frame) == frame["digit"]).mean()
    acc_serving = (serving.predict(frame) == frame["digit"]).mean()
    assert acc_tuned - acc_serving <= 0.02 + 1e-9
    # the canonical model is untouched and still loads bit-exact
    reloaded = dl.load_model(db, "tuned")
    for a, b in zip(before, reloaded.parameters(), strict=True):
        assert torch.equal(a, b)
    # replaced blocks are shared, so the serving copy stores fewer new bytes than it holds
    listing = dl.list_models(db).set_index("name")
    assert listing.loc["tuned_serving", "parent"] == "tuned:1"
    with db.engine.connect() as conn:
        new_bytes = conn.execute(text(
            f"SELECT new_bytes FROM {db.backend.table('checkpoints')} "
            "WHERE name = 'tuned_serving'")).scalar_one()
    assert new_bytes < listing.loc["tuned_serving", "logical_bytes"]
