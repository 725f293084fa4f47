"""Unit tests of how rows are cut into buffers (``data/packing.py``, ``training/prepare.py``):
no database."""

from __future__ import annotations

from dbdl_magic.data.packing import choose_rows_per_buffer
from dbdl_magic.options import TrainOptions
from dbdl_magic.training.prepare import pack_options, segment_buffers
from dbdl_magic.training.scaling import AUTO_SYNC_ROUNDS, sync_rounds


def test_rows_per_buffer_rules():
    # 16 buffers at least; whole batches
    assert choose_rows_per_buffer(160_000, 32, 256) == 10_240
    # a buffer holds at least the model's training state (12 bytes per parameter)
    assert choose_rows_per_buffer(800, 10, 64, n_parameters=3_000) == 960
    # segments need buffers for every segment in every round: that beats the state rule
    rows = choose_rows_per_buffer(800, 10, 64, n_parameters=3_000, min_buffers=16)
    assert rows == 64 and 800 / rows >= 12
    assert choose_rows_per_buffer(100_000, 32, 256, 1_090_000, min_buffers=40) == 2_560
    # never below one batch
    assert choose_rows_per_buffer(100, 4, 64, min_buffers=400) == 64


def test_forced_segments_ask_for_two_buffers_each_per_round():
    def need(parameters=1_000, **kwargs):
        return segment_buffers(TrainOptions.from_kwargs(target="y", **kwargs), parameters)

    assert need() is None and need(parallel=1) is None and need(parallel="auto") is None
    # a small model's segments sync 10 times per epoch unless told otherwise; a large one once
    assert need(parallel=2) == 40 and need(2_000_000, parallel=2) == 4
    assert need(parallel=4, sync_every=0.25) == 32
    assert pack_options(TrainOptions.from_kwargs(target="y", parallel=2), []).min_buffers is None


def test_sync_rounds():
    assert sync_rounds(None, 1, 1_000) == 1
    assert sync_rounds(None, 2, 1_000) == AUTO_SYNC_ROUNDS == 10
    assert sync_rounds(None, 2, 5_000_000) == 1
    assert sync_rounds(0.25, 1, 1_000) == 4 and sync_rounds(0.3, 8, 10**9) == 4
