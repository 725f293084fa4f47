"""The model store: content-addressed blocks, dedup, deltas, verification, garbage collection."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sqlalchemy import text

import dbdl_magic as dl
from dbdl_magic.datasets import digits_frame, load_table
from dbdl_magic.kernel import blockstore, state, train
from dbdl_magic.store import registry
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
    blocks, cb = db.backend.table("blocks"), db.backend.table("checkpoint_blocks")
    with db.engine.begin() as conn:  # a weight block of the checkpoint the model serves
        victim = conn.execute(text(
            f"SELECT b.hash FROM {blocks} AS b JOIN {cb} AS cb ON cb.hash = b.hash"
            " WHERE cb.name = 'fragile' AND cb.iteration = 1 AND cb.label LIKE 'model.%'"
            " AND b.encoding = 0 AND b.raw_size > 1000 LIMIT 1")
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


def test_served_checkpoint_weights_are_raw_and_load_exact(digits_db):
    """A finished model's served checkpoint holds its network's tensors as raw blocks (loading
    reads the weights' bytes, decodes no delta); the weights equal the full state's, resume
    still reads the whole checkpoint exactly, and the re-stored bytes are accounted."""
    db = digits_db
    model = dl.train(db, "SELECT * FROM digits", name="served", target="digit",
                     model="mlp:128,64", epochs=3, seed=5, lr=1e-3)
    blocks, cb = db.backend.table("blocks"), db.backend.table("checkpoint_blocks")
    key = {"name": "served", "version": 1}
    with db.engine.connect() as conn:
        row = registry.read_model(conn, db.backend, "served", 1)
        assert row["iteration"] == 3
        encodings = conn.execute(text(
            f"SELECT cb.label, b.encoding FROM {cb} AS cb JOIN {blocks} AS b ON b.hash = cb.hash"
            " WHERE cb.name = 'served' AND cb.iteration = :it"), {"it": 3}).all()
        weights = [e for label, e in encodings if label.startswith("model.")]
        assert weights and all(e == blockstore.RAW for e in weights)
        # the earlier checkpoints and the optimizer's moments keep their deltas
        assert conn.execute(text(
            f"SELECT count(*) FROM {cb} AS cb JOIN {blocks} AS b ON b.hash = cb.hash"
            " WHERE cb.name = 'served' AND b.encoding = 1")).scalar_one() > 0
        expected = state.decode_state(row["state"]).model_tensors()
        stats: dict[str, int] = {}
        weights_read = registry.read_weights(conn, db.backend, key, 3, stats)
        payload = sum(len(d) for d in conn.execute(text(
            f"SELECT b.data FROM {cb} AS cb JOIN {blocks} AS b ON b.hash = cb.hash"
            " WHERE cb.name = 'served' AND cb.iteration = 3 AND (cb.label LIKE 'model.%'"
            " OR cb.label = 'safetensors-header')")).scalars())
        assert stats["bytes"] == payload  # no base block read
        new_bytes = dict(conn.execute(text(
            f"SELECT iteration, new_bytes FROM {db.backend.table('checkpoints')}"
            " WHERE name = 'served'")).all())
        stored = conn.execute(text(
            f"SELECT sum(length(data)) FROM {blocks}")).scalar_one()
    assert sum(new_bytes.values()) == stored  # every stored byte is counted once
    module = dl.load_model(db, "served")
    loaded = {k.removeprefix("net."): v for k, v in module.state_dict().items()}
    trained = {k.removeprefix("net."): v for k, v in model.state_dict().items()}
    assert loaded.keys() == expected.keys() == weights_read.keys() == trained.keys()
    for name, tensor in trained.items():
        assert torch.equal(tensor, expected[name]), name
        assert torch.equal(loaded[name], expected[name]), name
        assert torch.equal(weights_read[name], expected[name]), name
    # resume reads the whole last checkpoint (weights + optimizer moments) bit-exact
    with db.engine.connect() as conn:
        assert db.backend.load_state(conn, key, 3) == row["state"]
