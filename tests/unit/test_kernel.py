"""Kernel unit tests: pure Python, no database."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score, r2_score
from torch import nn

from dbdl_magic.errors import SpecError
from dbdl_magic.kernel import evaluate, state, train
from dbdl_magic.kernel.netbuild import SpecError as KernelSpecError
from dbdl_magic.kernel.netbuild import build_network
from dbdl_magic.store.spec import parse_spec, sequential_to_spec


def make_config(task: str = "classification", width: int = 4, n_out: int = 2, **extra):
    config = {
        "spec": parse_spec("mlp:16"), "input_shape": [width], "n_outputs": n_out, "task": task,
        "optimizer": {"name": "adam", "lr": 0.01}, "batch_size": 16, "seed": 3, "epoch": 0,
        "device": "auto", "threads": 1, "byteorder": "<", "target_scale": [0.0, 1.0],
    }
    config.update(extra)
    return config


def make_buffer(n: int = 256, width: int = 4, seed: int = 0, task: str = "classification"):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, width)).astype("<f4")
    if task == "classification":
        y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype("<i4")
    else:
        y = (2 * x[:, 0] - x[:, 1]).astype("<f4")
    return x.tobytes(), y.tobytes()


# -- specs ----------------------------------------------------------------------------------------
def test_shorthand_mlp_builds_expected_layers():
    net = build_network(parse_spec("mlp:64,32"), [10], 3)
    assert [type(m).__name__ for m in net] == ["Linear", "ReLU", "Linear", "ReLU", "Linear"]
    assert net[0].in_features == 10 and net[4].out_features == 3


def test_shorthand_options_and_cnn():
    net = build_network(parse_spec("mlp:8,dropout=0.1,bn,act=gelu"), [5], 2)
    assert [type(m).__name__ for m in net] == ["Linear", "BatchNorm1d", "GELU", "Dropout",
                                               "Linear"]
    cnn = build_network(parse_spec("cnn:4,8"), [1, 8, 8], 10)
    assert cnn(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


@pytest.mark.parametrize("bad", ["mlp:", "mlp:abc", "resnet", "{not json", "mlp:8,act=swoosh"])
def test_malformed_shorthand_is_refused(bad):
    with pytest.raises(SpecError):
        parse_spec(bad)


def test_sequential_round_trip_keeps_architecture():
    seq = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.LeakyReLU(0.2), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64, 16), nn.LayerNorm(16), nn.Tanh(), nn.Dropout(0.3),
        nn.Linear(16, 10),
    )
    spec = sequential_to_spec(seq)
    json.dumps(spec)  # plain JSON, nothing pickled
    rebuilt = build_network(spec, [1, 8, 8], 10)
    assert [type(m) for m in rebuilt] == [type(m) for m in seq]
    assert sum(p.numel() for p in rebuilt.parameters()) == sum(p.numel() for p in seq.parameters())
    assert rebuilt[2].negative_slope == 0.2 and rebuilt[8].p == 0.3


def test_unsupported_layer_is_named():
    with pytest.raises(SpecError, match="LSTM"):
        sequential_to_spec(nn.Sequential(nn.LSTM(4, 4)))
    with pytest.raises(SpecError, match="Transformer"):
        parse_spec({"layers": [{"type": "Transformer"}]})


def test_mismatched_input_size_names_the_layer():
    with pytest.raises(KernelSpecError, match="in_features"):
        build_network({"layers": [{"type": "Linear", "in_features": 7, "out_features": 2}]},
                      [4], 2)


# -- state format ---------------------------------------------------------------------------------
def test_state_round_trip_is_bit_exact():
    config = make_config()
    raw = train.initial_state(config)
    decoded = state.decode_state(raw)
    again = state.encode_state(decoded)
    assert again == raw
    info = state.state_info(raw)
    assert info["samples"] == 0 and info["combines"] == 0


def test_state_refuses_garbage_and_oversize(monkeypatch):
    with pytest.raises(state.StateError):
        state.decode_state(b"not a state at all, really not")
    monkeypatch.setattr(state, "MAX_STATE_BYTES", 100)
    with pytest.raises(state.StateError, match="1 GB"):
        train.initial_state(make_config())


def test_combine_is_sample_weighted_average():
    a = state.TrainState({"model.w": torch.tensor([0.0, 4.0]), "model.n": torch.tensor(3)},
                         samples=1, loss_sum=1.0)
    b = state.TrainState({"model.w": torch.tensor([4.0, 8.0]), "model.n": torch.tensor(5)},
                         samples=3, loss_sum=2.0)
    merged = state.decode_state(state.combine_states(state.encode_state(a), state.encode_state(b)))
    assert torch.allclose(merged.tensors["model.w"], torch.tensor([3.0, 7.0]))
    assert int(merged.tensors["model.n"]) == 5  # integer buffers take the maximum
    assert merged.samples == 4 and merged.loss_sum == 3.0 and merged.combines == 1
    assert state.combine_states(None, state.encode_state(a)) == state.encode_state(a)


# -- training -----------------------------------------------------------------------------------
@pytest.mark.parametrize("optimizer", [
    {"name": "sgd", "lr": 0.1}, {"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True},
    {"name": "adam", "lr": 0.01}, {"name": "adamw", "lr": 0.01, "weight_decay": 0.01},
])
def test_transition_learns_with_each_optimizer(optimizer):
    config = make_config(optimizer=optimizer)
    x, y = make_buffer()
    model = train.initial_state(config)
    ev = evaluate.Evaluator(config, model)
    before = evaluate.metrics_from_stats(evaluate.stats_to_bytes(ev.score_buffer(x, y, None)),
                                         config)
    current = model
    for epoch in range(5):
        trainer = train.Trainer({**config, "epoch": epoch}, current, fresh=True)
        trainer.train_buffer(x, y, buffer_id=0)
        current = trainer.to_bytes()
    ev = evaluate.Evaluator(config, current)
    after = evaluate.metrics_from_stats(evaluate.stats_to_bytes(ev.score_buffer(x, y, None)),
                                        config)
    assert after["loss"] < before["loss"] * 0.7
    assert after["accuracy"] > 0.9
    info = state.state_info(current)
    assert info["samples"] == 256 and info["device"] == "cpu"
    if optimizer["name"] != "sgd" or optimizer.get("momentum"):
        assert any(k.startswith("optim.") for k in state.decode_state(current).tensors)


def test_training_is_reproducible_with_a_seed():
    config = make_config(spec=parse_spec("mlp:16,dropout=0.2"))
    x, y = make_buffer()
    runs = []
    for disturb in (0, 99):
        trainer = train.Trainer(config, train.initial_state(config), fresh=True)
        torch.manual_seed(disturb)  # whatever ran before: each buffer seeds its dropout masks
        torch.rand(7)
        trainer.train_buffer(x, y, buffer_id=4)
        runs.append(trainer.to_bytes())
    assert runs[0] == runs[1]
    other = train.Trainer({**config, "epoch": 1}, train.initial_state(config), fresh=True)
    other.train_buffer(x, y, buffer_id=4)
    assert other.to_bytes() != runs[0]  # another epoch shuffles differently


def test_big_endian_buffers_decode_like_little_endian():
    config = make_config()
    x, y = make_buffer(n=32)
    xb = np.frombuffer(x, "<f4").astype(">f4").tobytes()
    yb = np.frombuffer(y, "<i4").astype(">i4").tobytes()
    X1, Y1 = train.buffer_tensors(x, y, config, torch.device("cpu"))
    X2, Y2 = train.buffer_tensors(xb, yb, {**config, "byteorder": ">"}, torch.device("cpu"))
    assert torch.equal(X1, X2) and torch.equal(Y1, Y2)


def test_progress_is_reported():
    config = make_config()
    x, y = make_buffer()
    seen: list[int] = []
    trainer = train.Trainer(config, train.initial_state(config), fresh=True)
    trainer.train_buffer(x, y, 0, progress=seen.append, every=0.0)
    assert seen[-1] == 256 and seen == sorted(seen) and len(seen) > 2


# -- device ---------------------------------------------------------------------------------------
def test_device_falls_back_to_cpu_without_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    device, note = train.pick_device("auto")
    assert device.type == "cpu"
    device, note = train.pick_device("cuda")
    assert device.type == "cpu" and "no GPU" in note
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert train.pick_device("auto")[0].type == "cuda"
    assert train.pick_device("cpu")[0].type == "cpu"


# -- metrics --------------------------------------------------------------------------------------
def test_classification_metrics_match_sklearn():
    config = make_config(n_out=3)
    truth = np.array([0, 1, 2, 2, 1, 0, 2, 2])
    pred = np.array([0, 2, 2, 2, 1, 0, 1, 2])
    acc = evaluate.empty_stats(config)
    acc[0], acc[1] = len(truth), 4.0
    acc[2:] += np.bincount(truth * 3 + pred, minlength=9)
    m = evaluate.metrics_from_stats(evaluate.stats_to_bytes(acc), config)
    assert m["accuracy"] == pytest.approx(accuracy_score(truth, pred))
    assert m["f1"] == pytest.approx(f1_score(truth, pred, average="macro"))
    assert m["loss"] == pytest.approx(0.5)


def test_regression_metrics_match_sklearn():
    config = make_config(task="regression", n_out=1, target_scale=[10.0, 2.0])
    net_state = train.initial_state(config)
    ev = evaluate.Evaluator(config, net_state)
    x, y = make_buffer(task="regression")
    stats = ev.score_buffer(x, y, None)
    half = evaluate.combine_stats(evaluate.stats_to_bytes(stats), None)
    m = evaluate.metrics_from_stats(half, config)
    X, _ = train.buffer_tensors(x, None, config, torch.device("cpu"))
    pred = ev.outputs(X).numpy()[:, 0] * 2.0 + 10.0
    truth = np.frombuffer(y, "<f4") * 2.0 + 10.0
    assert m["r2"] == pytest.approx(r2_score(truth, pred), rel=1e-4)
    assert m["mse"] == pytest.approx(float(np.mean((pred - truth) ** 2)), rel=1e-4)


def test_kernel_imports_nothing_from_the_front():
    code = (
        "import sys, dbdl_magic.kernel.plpython\n"
        "bad = [m for m in ('pandas', 'IPython', 'ipywidgets', 'matplotlib', 'sqlalchemy')"
        " if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
