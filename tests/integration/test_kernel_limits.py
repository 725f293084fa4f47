"""Hostile input to the in-database kernels: every case is refused with a clear error.

Each refusal is checked three ways: on the kernel's Python entry points (fast, no database),
through real PostgreSQL (the SQL functions called directly, every argument cast to its declared
type), and through SQLite (the functions every connection registers). Also: threads clamped to
the server's cores, network size budgets read from the server's environment, and the cost of
the per-buffer checks.
"""

from __future__ import annotations

import json
import math
import os
import random
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from sqlalchemy import text

import dbdl_magic as dl
from dbdl_magic.api import Database
from dbdl_magic.errors import DbdlError, InputError, SpecError
from dbdl_magic.kernel import evaluate, limits, netbuild, plpython, state, train
from dbdl_magic.kernel.errors import ConfigError, KernelError, LimitError, clean_errors
from dbdl_magic.options import TrainOptions
from dbdl_magic.store.spec import parse_spec

K = 3  # classes of the test configs
WIDTH = 4


# -- valid inputs and mutations -------------------------------------------------------------------
def make_config(task: str = "classification", spec: Any = "mlp:8", **extra: Any) -> dict[str, Any]:
    """A valid kernel config (little-endian buffers)."""
    config = {
        "spec": parse_spec(spec) if isinstance(spec, str) else spec,
        "input_shape": [WIDTH],
        "n_outputs": K if task == "classification" else 1,
        "task": task,
        "optimizer": {"name": "adam", "lr": 0.01},
        "batch_size": 16,
        "seed": 1,
        "epoch": 0,
        "device": "cpu",
        "threads": 1,
        "byteorder": "<",
        "target_scale": [0.0, 1.0],
    }
    config.update(extra)
    return config


def cfg_text(config: dict[str, Any]) -> str:
    """Config JSON as the client sends it (NaN/Infinity literals allowed, as json.dumps does)."""
    return json.dumps(config)


def make_x(n: int = 64, width: int = WIDTH, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).normal(size=(n, width)).astype("<f4").tobytes()


def make_y(n: int = 64, task: str = "classification", seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed + 1)
    if task == "classification":
        return rng.integers(0, K, size=n).astype("<i4").tobytes()
    return rng.normal(size=n).astype("<f4").tobytes()


def trained_state(config: dict[str, Any] | None = None) -> bytes:
    """A state after one buffer of Adam (so it has optimizer state)."""
    config = config or make_config()
    trainer = train.Trainer(config, train.initial_state(config), fresh=True)
    trainer.train_buffer(make_x(), make_y(task=config["task"]), 0)
    return trainer.to_bytes()


def split(data: bytes) -> tuple[bytes, dict[str, Any], bytes]:
    """``(state header + meta, safetensors table, tensor data)``."""
    *_, offset = state.read_header(data)
    blob = data[offset:]
    (n,) = struct.unpack_from("<Q", blob)
    return data[:offset], json.loads(blob[8 : 8 + n]), blob[8 + n :]


def join(head: bytes, table: dict[str, Any], data: bytes) -> bytes:
    raw = json.dumps(table).encode()
    raw += b" " * (-len(raw) % 8)
    return head + struct.pack("<Q", len(raw)) + raw + data


def relabel(data: bytes, dtype: str, name: str = "model.0.weight") -> bytes:
    """The same bytes with one tensor's dtype tag changed (e.g. float32 → int32)."""
    head, table, body = split(data)
    table[name]["dtype"] = dtype
    return join(head, table, body)


def poke(data: bytes, value: float, name: str = "model.0.weight") -> bytes:
    """``value`` written over the first element of a float32 tensor."""
    head, table, body = split(data)
    begin = table[name]["data_offsets"][0]
    return join(head, table, body[:begin] + struct.pack("<f", value) + body[begin + 4 :])


def with_tensor(data: bytes, name: str, tensor: torch.Tensor) -> bytes:
    """The state with ``name`` added or replaced."""
    decoded = state.decode_state(data)
    decoded.tensors[name] = tensor
    return state.encode_state(decoded)


def header(data: bytes, **fields: Any) -> bytes:
    """The state with header fields replaced (``samples``, ``loss_sum``, ``version``...)."""
    names = ("magic", "version", "reserved", "samples", "loss_sum", "combines", "meta_len")
    values = dict(zip(names, state._HEADER.unpack_from(data), strict=True))
    values.update(fields)
    return state._HEADER.pack(*values.values()) + data[state._HEADER.size :]


def with_meta(data: bytes, meta: bytes) -> bytes:
    samples, loss, combines, _, offset = state.read_header(data)
    head = state._HEADER.pack(state.MAGIC, 1, 0, samples, loss, combines, len(meta))
    return head + meta + data[offset:]


# -- the cases ------------------------------------------------------------------------------------
@dataclass
class Case:
    """One hostile call: ``kind`` names the kernel, ``args`` its SQL arguments in order."""

    id: str
    kind: str  # train | evaluate | predict | metrics | state_info | combine | eval_combine
    args: tuple[Any, ...]
    expect: tuple[str, ...]  # fragments of the error message
    sqlite_expect: tuple[str, ...] | None = None  # when SQLite's wrapper words it differently


def _train(x: Any = None, y: Any = None, model: Any = None, config: Any = None,
           buffer_id: Any = 0) -> tuple[Any, ...]:
    config = make_config() if config is None else config
    text_config = config if isinstance(config, str) else cfg_text(config)
    if model is None:
        model = BASE["initial"]
    return (make_x() if x is None else x, make_y() if y is None else y, buffer_id, model,
            text_config)


BASE: dict[str, bytes] = {}


def cases() -> list[Case]:
    """Every refusal, as SQL-level arguments (built once; the states need torch)."""
    if not BASE:
        BASE["initial"] = train.initial_state(make_config())
        BASE["trained"] = trained_state()
        BASE["other"] = train.initial_state(make_config(spec="mlp:5"))
    init, trained = BASE["initial"], BASE["trained"]
    nan, inf = float("nan"), float("inf")
    huge_pool = {"layers": [{"type": "AdaptiveAvgPool1d", "output_size": 2**31 - 1},
                            {"type": "AdaptiveAvgPool1d", "output_size": 2},
                            {"type": "Flatten"}, {"type": "Linear"}]}
    conv = {"layers": [{"type": "Conv1d", "out_channels": 2, "kernel_size": 0},
                       {"type": "Flatten"}, {"type": "Linear"}]}
    x_nan = np.frombuffer(make_x(), "<f4").copy()
    x_nan[7] = nan
    x_inf = x_nan.copy()
    x_inf[7] = -inf
    y_bad = np.frombuffer(make_y(), "<i4").copy()
    y_bad[3] = -100
    y_high = y_bad.copy()
    y_high[3] = K
    y_reg = np.frombuffer(make_y(task="regression"), "<f4").copy()
    y_reg[0] = nan
    regression = make_config("regression")
    adam_state = state.decode_state(trained)
    negative_sq = with_tensor(trained, "optim.0.exp_avg_sq",
                              -adam_state.tensors["optim.0.exp_avg_sq"].abs() - 1)
    stats_ok = evaluate.stats_to_bytes(evaluate.empty_stats(make_config()))
    return [
        # threads
        Case("threads-zero", "train", _train(config=make_config(threads=0)), ("threads",)),
        Case("threads-text", "train", _train(config=make_config(threads="8")), ("threads",)),
        # spec sizes and budgets
        Case("pool-2^31-1", "train", _train(config=make_config(spec=huge_pool)),
             ("layer 0 (AdaptiveAvgPool1d)", "DBDL_MAX_ACTIVATION_BYTES")),
        Case("pool-2^31", "predict", (make_x(), init, cfg_text(make_config(spec={"layers": [
            {"type": "AdaptiveAvgPool1d", "output_size": 2**31}, {"type": "Linear"}]}))),
             ("layer 0 (AdaptiveAvgPool1d)", "output_size")),
        Case("linear-1e9", "evaluate", (make_x(), make_y(), init, cfg_text(make_config(
            spec={"layers": [{"type": "Linear", "out_features": 10**9}, {"type": "Linear"}]}))),
             ("layer 0 (Linear)", "DBDL_MAX_PARAMETERS")),
        Case("linear-negative", "train", _train(config=make_config(
            spec={"layers": [{"type": "Linear", "out_features": -3}, {"type": "Linear"}]})),
             ("layer 0 (Linear)", "out_features")),
        Case("conv-kernel-0", "train", _train(config=make_config(spec=conv, input_shape=[1, 8])),
             ("layer 0 (Conv1d)", "kernel_size")),
        Case("unknown-layer", "train", _train(config=make_config(spec={"layers": [
            {"type": "LSTM"}]})), ("unsupported layer", "LSTM")),
        # config values
        Case("lr-nan", "train", _train(config=make_config(optimizer={"name": "sgd", "lr": nan})),
             ("optimizer.lr",)),
        Case("lr-negative", "train", _train(config=make_config(optimizer={"lr": -1})),
             ("optimizer.lr",)),
        Case("momentum", "train", _train(config=make_config(
            optimizer={"name": "sgd", "lr": 0.1, "momentum": -0.5})), ("optimizer.momentum",)),
        Case("batch-0", "train", _train(config=make_config(batch_size=0)), ("batch_size",)),
        Case("batch-huge", "train", _train(config=make_config(batch_size=2**40)), ("batch_size",)),
        Case("seed", "train", _train(config=make_config(seed=2**70)), ("seed",)),
        Case("epoch", "train", _train(config=make_config(epoch=-1)), ("epoch",)),
        Case("n-outputs", "evaluate", (make_x(), make_y(), init,
                                       cfg_text(make_config(n_outputs=10**6))), ("n_outputs",)),
        Case("input-shape", "predict", (make_x(), init, cfg_text(make_config(input_shape=[0]))),
             ("input_shape",)),
        Case("task", "train", _train(config=make_config(task="clustering")), ("task",)),
        Case("device", "train", _train(config=make_config(device="tpu")), ("device",)),
        Case("freeze", "train", _train(config=make_config(freeze=[42])), ("freeze", "42")),
        Case("byteorder", "predict", (make_x(), init, cfg_text(make_config(byteorder="|"))),
             ("byteorder",)),
        Case("config-not-json", "predict", (make_x(), init, "{spec: 1"), ("not valid JSON",),
             ("JSONDecodeError", "line 1 column 2")),  # sqlite.py parses the config itself
        Case("config-array", "metrics", (stats_ok, "[1, 2]"), ("JSON object",)),
        # states
        Case("weights-int32", "train", _train(model=relabel(init, "I32")), ("dtype I32",)),
        Case("weights-f16", "predict", (make_x(), relabel(init, "F16"), cfg_text(make_config())),
             ("dtype F16",)),
        Case("other-spec", "evaluate", (make_x(), make_y(), BASE["other"], cfg_text(make_config())),
             ("model.0.weight", "builds")),
        Case("weight-nan", "train", _train(model=poke(init, nan)), ("NaN or infinite",)),
        Case("weight-inf", "predict", (make_x(), poke(init, inf), cfg_text(make_config())),
             ("NaN or infinite",)),
        Case("truncated", "state_info", (trained[:-3],), ("truncated",)),
        Case("padded", "train", _train(model=init + b"\0\0\0\0"), ("padded",)),
        Case("magic", "state_info", (b"XXXX" + trained[4:],), ("magic",)),
        Case("samples", "state_info", (header(trained, samples=-5),), ("samples=-5",)),
        Case("loss-nan", "state_info", (header(trained, loss_sum=nan),), ("loss sum",)),
        Case("meta-len", "state_info", (header(trained, meta_len=2**31),), ("meta",)),
        Case("meta-array", "state_info", (with_meta(trained, b"[1]"),), ("meta",)),
        Case("extra-tensor", "train", _train(model=with_tensor(init, "model.9.weight",
                                                               torch.zeros(2))),
             ("unexpected tensor", "model.9.weight")),
        Case("combine-other", "combine", (trained, BASE["other"]), ("different models",)),
        Case("combine-garbage", "combine", (trained, b"DBDL" + os.urandom(60)), ("state",)),
        # data buffers
        Case("x-nan", "train", _train(x=x_nan.tobytes()), ("NaN or infinite feature",)),
        Case("x-inf", "predict", (x_inf.tobytes(), init, cfg_text(make_config())),
             ("NaN or infinite feature",)),
        Case("x-partial-row", "evaluate", (make_x()[:-4], make_y(), init, cfg_text(make_config())),
             ("not a multiple of the 4 features",)),
        Case("x-odd-bytes", "predict", (make_x()[:-1], init, cfg_text(make_config())),
             ("4-byte",)),
        Case("label-minus-100", "train", _train(y=y_bad.tobytes()), ("-100", "outside [0, 3)")),
        Case("label-n-outputs", "evaluate", (make_x(), y_high.tobytes(), init,
                                             cfg_text(make_config())), ("outside [0, 3)",)),
        Case("y-regression-nan", "train",
             _train(y=y_reg.tobytes(), config=regression,
                    model=train.initial_state(regression)), ("regression targets",)),
        Case("y-short", "train", _train(y=make_y()[:-8]), ("targets",)),
        # evaluation statistics
        Case("stats-length", "metrics", (stats_ok + b"\0" * 8, cfg_text(make_config())),
             ("needs 11",)),
        Case("stats-nan", "metrics", (struct.pack("<11d", *([nan] * 11)),
                                      cfg_text(make_config())), ("NaN",)),
        Case("stats-negative", "metrics", (struct.pack("<11d", -1, *([0] * 10)),
                                           cfg_text(make_config())), ("negative",)),
        Case("stats-combine", "eval_combine", (stats_ok, stats_ok + b"\0" * 8), ("needs",)),
        Case("optim-exp-avg-sq", "train_transition",
             (negative_sq, make_x(), make_y(), 0, init, cfg_text(make_config())),
             ("exp_avg_sq",)),
    ]


ALL = cases()


# -- the kernel's Python entry points ----------------------------------------------------------
def call_python(case: Case) -> Any:
    """Run ``case`` on the PL/Python entry points, in-process (a fresh GD)."""
    gd: dict[str, Any] = {}
    a = case.args
    if case.kind == "train":
        return plpython.train_transition(gd, None, a[0], a[1], a[2], a[3], a[4])
    if case.kind == "train_transition":
        return plpython.train_transition(gd, *a)
    if case.kind == "evaluate":
        return plpython.eval_transition(gd, None, *a)
    if case.kind == "predict":
        return plpython.predict(gd, *a)
    if case.kind == "metrics":
        return plpython.metrics(*a)
    if case.kind == "state_info":
        return plpython.info(*a)
    if case.kind == "combine":
        return plpython.train_combine(*a)
    if case.kind == "eval_combine":
        return plpython.eval_combine(*a)
    raise AssertionError(case.kind)


@pytest.mark.parametrize("case", ALL, ids=[c.id for c in ALL])
def test_kernel_refuses(case: Case) -> None:
    """Each hostile call raises a KernelError whose message names the culprit."""
    with pytest.raises(KernelError) as info:
        call_python(case)
    message = str(info.value)
    for fragment in case.expect:
        assert fragment in message, message


def test_threads_are_clamped_to_the_servers_cores() -> None:
    """threads=1000 trains on at most the host's cores; the state records what was used."""
    before = torch.get_num_threads()
    try:
        cores = limits.server_cores()
        assert limits.clamp_threads(1000) == cores
        assert limits.clamp_threads(1) == 1
        config = make_config(threads=1000)
        out = plpython.train_transition({}, None, make_x(), make_y(), 0,
                                        train.initial_state(config), cfg_text(config))
        assert torch.get_num_threads() == cores
        assert state.state_info(out)["threads"] == cores
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [0, -1, 1025, 10**9, True, 2.5])
def test_client_refuses_absurd_threads(threads: Any) -> None:
    with pytest.raises(InputError, match="threads"):
        TrainOptions.from_kwargs(target="y", threads=threads)
    assert TrainOptions.from_kwargs(target="y", threads=64).threads == 64  # the server clamps


def test_budget_is_read_from_the_servers_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """DBDL_MAX_PARAMETERS / DBDL_MAX_ACTIVATION_BYTES set the limits; bad values are named."""
    spec = parse_spec("mlp:64")  # 4*64+64 + 64*3+3 = 515 parameters
    plan = netbuild.plan_network(spec, [WIDTH], K)
    assert plan.parameters == 515 == sum(p.numel() for p in plan.build().parameters())
    monkeypatch.setenv("DBDL_MAX_PARAMETERS", "500")
    with pytest.raises(netbuild.SpecError, match=r"515 parameters .*layer 0 \(Linear\).*=500"):
        netbuild.build_network(spec, [WIDTH], K)
    monkeypatch.setenv("DBDL_MAX_PARAMETERS", "515")
    netbuild.build_network(spec, [WIDTH], K)
    row = plan.activation_bytes(1)  # (4 + 64 + 64 + 3) floats, times 2 for training
    assert row == 4 * (4 + 64 + 64 + 3) * 2
    monkeypatch.setenv("DBDL_MAX_ACTIVATION_BYTES", str(row * 10))
    netbuild.build_network(spec, [WIDTH], K, batch_size=10)
    with pytest.raises(netbuild.SpecError, match="batch of 11 row"):
        netbuild.build_network(spec, [WIDTH], K, batch_size=11)
    monkeypatch.setenv("DBDL_MAX_ACTIVATION_BYTES", "lots")
    with pytest.raises(LimitError, match="DBDL_MAX_ACTIVATION_BYTES='lots'"):
        netbuild.build_network(spec, [WIDTH], K)


def test_batch_budget_uses_the_rows_of_the_buffer(monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch_size larger than the buffer costs only the buffer's rows."""
    config = make_config(batch_size=10**6)
    plan = netbuild.plan_network(config["spec"], [WIDTH], K)
    monkeypatch.setenv("DBDL_MAX_ACTIVATION_BYTES", str(plan.activation_bytes(64)))
    trainer = train.Trainer(config, train.initial_state(config), fresh=True)
    trainer.train_buffer(make_x(64), make_y(64), 0)
    with pytest.raises(netbuild.SpecError, match="batch of 65 row"):
        trainer.train_buffer(make_x(65), make_y(65), 1)


def test_huge_spec_is_refused_before_allocating() -> None:
    """The reviewed case: AdaptiveAvgPool1d(2**31 - 1) is refused in milliseconds."""
    spec = {"layers": [{"type": "AdaptiveAvgPool1d", "output_size": 2**31 - 1},
                       {"type": "AdaptiveAvgPool1d", "output_size": 2},
                       {"type": "Flatten"}, {"type": "Linear"}]}
    start = time.perf_counter()
    with pytest.raises(netbuild.SpecError, match="8 GiB per row"):
        netbuild.build_network(spec, [WIDTH], K)
    assert time.perf_counter() - start < 0.5


def test_client_refuses_an_oversized_spec_before_packing(sqlite_db: Database) -> None:
    """dl.train checks the budget (with its batch size) before any data is packed."""
    frame = {"a": np.arange(40.0), "b": np.arange(40.0) % 7, "y": np.arange(40) % 2}
    import pandas as pd

    from dbdl_magic.datasets import load_table

    load_table(sqlite_db.engine, "t", pd.DataFrame(frame))
    spec = {"layers": [{"type": "Linear", "out_features": 300_000_000}, {"type": "Linear"}]}
    with pytest.raises(SpecError, match="DBDL_MAX_PARAMETERS"):
        dl.train(sqlite_db, "SELECT * FROM t", target="y", model=spec)
    with sqlite_db.engine.connect() as conn:
        packed = conn.execute(text("SELECT name FROM sqlite_master WHERE name LIKE "
                                   "'%packed%' OR name LIKE '%stage%'")).all()
    assert packed == []


# specs with random sizes, many invalid: every plan the kernel accepts must build, and torch
# must agree with the planned shapes (the probe compares them), so the budget sees real sizes
def _random_layer(rng: random.Random) -> dict[str, Any]:
    kind = rng.choice(["Conv1d", "Conv2d", "MaxPool1d", "MaxPool2d", "AvgPool1d", "AvgPool2d",
                       "AdaptiveAvgPool1d", "AdaptiveAvgPool2d", "BatchNorm1d", "BatchNorm2d",
                       "LayerNorm", "Dropout", "Identity"])
    layer: dict[str, Any] = {"type": kind}
    size = [1, 2, 3, 5, [2], [2, 3], [1, 1], 0, [0, 2], -1, True, "3", None]
    if ("Pool" in kind and "Adaptive" not in kind) or "Conv" in kind:
        for key in ("kernel_size", "stride", "padding"):
            if rng.random() < 0.6:
                layer[key] = rng.choice(size)
    if "Conv" in kind:
        layer["out_channels"] = rng.choice([1, 3, "out"])
        if rng.random() < 0.2:
            layer["padding"] = rng.choice(["same", "valid", "full"])
    if "Adaptive" in kind:
        layer["output_size"] = rng.choice([1, 2, 3, [2, 2], [None, 2], [3], 0, [1, 2, 3]])
    if kind == "Dropout":
        layer["p"] = rng.choice([0.0, 0.5, 1.0, 1.5, -0.1])
    return layer


def test_planned_shapes_agree_with_torch() -> None:
    rng = random.Random(7)
    accepted = 0
    for _ in range(1500):
        shape = rng.choice([[7], [3, 9], [2, 6, 5], [1, 4, 4], [3, 1, 7]])
        layers = [_random_layer(rng) for _ in range(rng.randint(1, 3))]
        spec = {"layers": [*layers, {"type": "Flatten"}, {"type": "Linear"}]}
        try:
            plan = netbuild.plan_network(spec, shape, 2)
        except netbuild.SpecError:
            continue
        net = plan.build()  # raises SpecError if torch disagreed with a planned shape
        assert net(torch.zeros(2, *shape)).shape == (2, 2)
        accepted += 1
    assert accepted > 200


def test_errors_are_wrapped() -> None:
    """torch/numpy internals never surface as the primary error."""

    @clean_errors("dbdl.demo")
    def boom(exc: BaseException) -> None:
        raise exc

    with pytest.raises(KernelError, match=r"^dbdl.demo failed: IndexError: index 5"):
        boom(IndexError("index 5 is out of bounds"))
    with pytest.raises(LimitError, match="ran out of memory"):
        boom(MemoryError())
    with pytest.raises(LimitError, match="ran out of memory"):
        boom(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate"))
    with pytest.raises(ConfigError, match="mine"):
        boom(ConfigError("mine"))


def test_divergence_is_refused_not_stored() -> None:
    config = make_config(optimizer={"name": "sgd", "lr": 1e30})
    x = (np.frombuffer(make_x(), "<f4") * 1e5).astype("<f4").tobytes()
    with pytest.raises(KernelError, match="diverged"):
        plpython.train_transition({}, None, x, make_y(), 0, train.initial_state(config),
                                  cfg_text(config))


def test_valid_calls_still_work() -> None:
    """The checks accept what the client sends: train, combine, evaluate, predict, metrics."""
    config = make_config()
    init = train.initial_state(config)
    a = plpython.train_transition({}, None, make_x(seed=1), make_y(seed=1), 0, init,
                                  cfg_text(config))
    b = plpython.train_transition({}, None, make_x(seed=2), make_y(seed=2), 1, init,
                                  cfg_text(config))
    merged = plpython.train_combine(a, b)
    assert state.state_info(merged)["combines"] == 1
    stats = plpython.eval_transition({}, None, make_x(), make_y(), merged, cfg_text(config))
    stats = plpython.eval_transition({}, stats, make_x(), make_y(), merged, cfg_text(config))
    assert json.loads(plpython.metrics(stats, cfg_text(config)))["n"] == 128
    assert plpython.eval_combine(stats, stats) is not None
    out = np.frombuffer(plpython.predict({}, make_x(), merged, cfg_text(config)), "<f4")
    assert out.shape == (64 * K,) and np.isfinite(out).all()
    # a frozen layer and an SGD state with momentum
    sgd = make_config(optimizer={"name": "sgd", "lr": 0.1, "momentum": 0.9}, freeze=[0])
    s1 = plpython.train_transition({}, None, make_x(), make_y(), 0, train.initial_state(sgd),
                                   cfg_text(sgd))
    plpython.train_transition({}, s1, make_x(), make_y(), 1, init, cfg_text(sgd))


def test_check_overhead_is_small(capsys: pytest.CaptureFixture[str]) -> None:
    """The per-buffer checks (finite x, label range) on 50k rows × 32 features, against SGD."""
    n, width = 50_000, 32
    config = make_config(spec="mlp:64,32", input_shape=[width], batch_size=64)
    x = np.random.default_rng(0).normal(size=(n, width)).astype("<f4")
    y = np.random.default_rng(1).integers(0, K, n).astype("<i4")
    config_bytes = {**config, "task": "classification"}

    def checks() -> None:  # what buffer_tensors adds: one pass over x, min/max of the labels
        assert limits.all_finite(x)
        assert int(y.min()) >= 0 and int(y.max()) < K

    X, Y = train.buffer_tensors(x.tobytes(), y.tobytes(), config_bytes, torch.device("cpu"))

    reps = 20
    start = time.perf_counter()
    for _ in range(reps):
        checks()
    check_s = (time.perf_counter() - start) / reps
    trainer = train.Trainer(config, train.initial_state(config), fresh=True)
    start = time.perf_counter()
    trainer.train_buffer(x.tobytes(), y.tobytes(), 0)
    sgd_s = time.perf_counter() - start
    assert X.shape == (n, width) and Y.shape == (n,)
    with capsys.disabled():
        print(f"\n[kernel checks] 50k x 32 buffer: checks {check_s * 1e3:.2f} ms, one epoch of "
              f"SGD over it {sgd_s * 1e3:.0f} ms ({100 * check_s / sgd_s:.2f}%)")
    assert check_s < 0.02 * sgd_s


# -- through PostgreSQL -----------------------------------------------------------------------
PG_SQL = {
    "train": "SELECT dbdl.train(CAST(:a0 AS bytea), CAST(:a1 AS bytea), CAST(:a2 AS bigint), "
             "CAST(:a3 AS bytea), CAST(:a4 AS text))",
    "train_transition": "SELECT dbdl.train_transition(CAST(:a0 AS bytea), CAST(:a1 AS bytea), "
                        "CAST(:a2 AS bytea), CAST(:a3 AS bigint), CAST(:a4 AS bytea), "
                        "CAST(:a5 AS text))",
    "evaluate": "SELECT dbdl.evaluate(CAST(:a0 AS bytea), CAST(:a1 AS bytea), CAST(:a2 AS bytea),"
                " CAST(:a3 AS text))",
    "predict": "SELECT dbdl.predict_buffer(CAST(:a0 AS bytea), CAST(:a1 AS bytea), "
               "CAST(:a2 AS text))",
    "metrics": "SELECT dbdl.metrics(CAST(:a0 AS bytea), CAST(:a1 AS text))",
    "state_info": "SELECT dbdl.state_info(CAST(:a0 AS bytea))",
    "combine": "SELECT dbdl.train_combine(CAST(:a0 AS bytea), CAST(:a1 AS bytea))",
    "eval_combine": "SELECT dbdl.eval_combine(CAST(:a0 AS bytea), CAST(:a1 AS bytea))",
}
KERNEL_ERROR = "dbdl_magic.kernel."


def pg_call(conn: Any, kind: str, args: tuple[Any, ...]) -> Any:
    params = {f"a{i}": v for i, v in enumerate(args)}
    return conn.execute(text(PG_SQL[kind]), params).scalar()


def pg_error(conn: Any, kind: str, args: tuple[Any, ...]) -> str:
    """The primary message of the SQL error ``kind(args)`` raises (the transaction is rolled
    back and the connection checked usable)."""
    from sqlalchemy.exc import DBAPIError

    try:
        pg_call(conn, kind, args)
    except DBAPIError as exc:
        conn.rollback()
        assert conn.execute(text("SELECT 1")).scalar() == 1
        return str(exc.orig).strip().splitlines()[0]
    raise AssertionError(f"{kind} accepted hostile input")


@pytest.fixture
def pg_conn(module_pg_db: Database) -> Iterator[Any]:
    with module_pg_db.engine.connect() as conn:
        yield conn
        conn.rollback()


@pytest.mark.parametrize("case", ALL, ids=[c.id for c in ALL])
def test_postgres_refuses(pg_conn: Any, case: Case) -> None:
    """The same hostile calls straight to the SQL functions: a clean error naming the culprit."""
    message = pg_error(pg_conn, case.kind, case.args)
    assert message.startswith(KERNEL_ERROR), message
    for fragment in case.expect:
        assert fragment in message, message


def _backend(conn: Any) -> tuple[int, str]:
    row = conn.execute(text("SELECT pg_backend_pid(), CAST(pg_postmaster_start_time() AS text)"))
    pid, started = row.one()
    return int(pid), str(started)


def _peak_rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def test_postgres_huge_pool_is_refused_fast(pg_conn: Any) -> None:
    """The reviewed crash: refused in well under a second, the backend's memory untouched."""
    pg_call(pg_conn, "state_info", (BASE["initial"],))  # torch imported in this backend
    pid, started = _backend(pg_conn)
    spec = {"layers": [{"type": "AdaptiveAvgPool1d", "output_size": 2147483648},
                       {"type": "AdaptiveAvgPool1d", "output_size": 2},
                       {"type": "Flatten"}, {"type": "Linear"}]}
    for size in (2**31 - 1, 2**31):
        spec["layers"][0]["output_size"] = size
        start = time.perf_counter()
        message = pg_error(pg_conn, "train", _train(config=make_config(spec=spec)))
        assert time.perf_counter() - start < 5, message
        assert "layer 0 (AdaptiveAvgPool1d)" in message
    peak = _peak_rss_kib(pid)
    assert peak is None or peak < 2 * 2**20, f"backend peak RSS {peak} KiB"
    assert _backend(pg_conn) == (pid, started)  # same session, same postmaster


def test_postgres_threads_are_clamped(pg_conn: Any) -> None:
    """threads=1000 sent to dbdl.train: the server trains on at most its cores."""
    config = make_config(threads=1000)
    out = pg_call(pg_conn, "train", _train(config=config))
    info = json.loads(pg_call(pg_conn, "state_info", (out,)))
    cores = json.loads(pg_conn.execute(text("SELECT dbdl.kernel_info()")).scalar())["cpus"]
    assert 1 <= info["threads"] <= cores
    pg_conn.rollback()


def test_postgres_valid_calls_work(pg_conn: Any) -> None:
    """The checked kernels still train, combine, evaluate, score and report on PostgreSQL."""
    config = make_config(byteorder="<")
    init = train.initial_state(config)
    a = pg_call(pg_conn, "train", _train(model=init, config=config))
    b = pg_call(pg_conn, "train", _train(x=make_x(seed=3), model=init, config=config))
    merged = pg_call(pg_conn, "combine", (a, b))
    assert json.loads(pg_call(pg_conn, "state_info", (merged,)))["combines"] == 1
    stats = pg_call(pg_conn, "evaluate", (make_x(), make_y(), merged, cfg_text(config)))
    metrics = json.loads(pg_call(pg_conn, "metrics", (stats, cfg_text(config))))
    assert metrics["n"] == 64 and 0 <= metrics["accuracy"] <= 1
    out = np.frombuffer(pg_call(pg_conn, "predict", (make_x(), merged, cfg_text(config))), "<f4")
    assert out.shape == (64 * K,) and np.allclose(out.reshape(-1, K).sum(axis=1), 1, atol=1e-5)


# -- through SQLite ---------------------------------------------------------------------------
SQLITE_SQL = {
    "train": "SELECT dbdl_train(:a0, :a1, :a2, :a3, :a4)",
    "evaluate": "SELECT dbdl_evaluate(:a0, :a1, :a2, :a3)",
    "predict": "SELECT dbdl_predict_buffer(:a0, :a1, :a2)",
    "metrics": "SELECT dbdl_metrics(:a0, :a1)",
    "state_info": "SELECT dbdl_state_info(:a0)",
}
SQLITE_CASES = [c for c in ALL if c.kind in SQLITE_SQL]


@pytest.mark.parametrize("case", SQLITE_CASES, ids=[c.id for c in SQLITE_CASES])
def test_sqlite_refuses(sqlite_db: Database, case: Case) -> None:
    """SQLite's registered kernels refuse the same input with the same message."""
    params = {f"a{i}": v for i, v in enumerate(case.args)}
    with sqlite_db.engine.connect() as conn, pytest.raises(DbdlError) as info:
        conn.execute(text(SQLITE_SQL[case.kind]), params).scalar()
    message = str(info.value)
    assert "a dbdl kernel failed inside SQLite" in message
    for fragment in case.sqlite_expect or case.expect:
        assert fragment in message, message


def test_sqlite_threads_are_clamped(sqlite_db: Database) -> None:
    before = torch.get_num_threads()
    try:
        config = make_config(threads=1000)
        with sqlite_db.engine.connect() as conn:
            out = conn.execute(text(SQLITE_SQL["train"]),
                               dict(zip(("a0", "a1", "a2", "a3", "a4"),
                                        _train(config=config), strict=True))).scalar()
        assert state.state_info(out)["threads"] == limits.server_cores()
    finally:
        torch.set_num_threads(before)


def test_math_isfinite_helper() -> None:
    """``is_number`` refuses bools, NaN and infinities (JSON may carry NaN/Infinity)."""
    assert limits.is_number(1.5) and not limits.is_number(True)
    assert not limits.is_number(math.inf) and not limits.is_number(float("nan"))

