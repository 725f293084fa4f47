"""Kernel unit tests of the outer step (``kernel/averaging.py``) and the state's ``outer.*``
tensors: pure Python, no database."""

from __future__ import annotations

import pytest
import torch

from dbdl_magic.kernel import averaging, state
from dbdl_magic.kernel.errors import ConfigError
from dbdl_magic.kernel.state import StateError, TrainState, decode_state, encode_state

OUTER = {"outer_lr": 0.7, "outer_momentum": 0.9}


def make(weight: list[float], samples: int = 10, **extra: torch.Tensor) -> bytes:
    tensors = {
        "model.0.weight": torch.tensor(weight),
        "model.1.running_var": torch.tensor([1.0, 1.0]),
        "optim.0.exp_avg": torch.tensor([0.5, 0.5]),
        **extra,
    }
    return encode_state(TrainState(tensors, samples=samples, loss_sum=2.0 * samples, combines=1))


def test_plain_average_is_the_outer_step_with_unit_lr_and_no_momentum():
    start, avg = make([1.0, 2.0]), make([0.5, 3.0])
    out = decode_state(averaging.outer_step(start, avg, {"outer_lr": 1.0, "outer_momentum": 0.0}))
    assert torch.equal(out.tensors["model.0.weight"], torch.tensor([0.5, 3.0]))
    # the header is the average's: what this round trained
    assert (out.samples, out.loss_sum, out.combines) == (10, 20.0, 1)


def test_nesterov_momentum_over_two_rounds():
    lr, mu = OUTER["outer_lr"], OUTER["outer_momentum"]
    w0, a1 = torch.tensor([1.0, 2.0]), torch.tensor([0.8, 2.5])
    s1 = averaging.outer_step(make(w0.tolist()), make(a1.tolist()), OUTER)
    g1 = w0 - a1
    v1 = g1
    w1 = w0 - lr * (g1 + mu * v1)
    got1 = decode_state(s1)
    assert torch.allclose(got1.tensors["model.0.weight"], w1)
    assert torch.allclose(got1.tensors["outer.model.0.weight"], v1)
    assert got1.meta["outer_steps"] == 1
    # round 2 starts from s1 (its momentum travels in the state)
    a2 = w1 - torch.tensor([0.1, -0.2])
    s2 = decode_state(averaging.outer_step(s1, make(a2.tolist()), OUTER))
    g2 = w1 - a2
    v2 = mu * v1 + g2
    assert torch.allclose(s2.tensors["model.0.weight"], w1 - lr * (g2 + mu * v2))
    assert torch.allclose(s2.tensors["outer.model.0.weight"], v2)
    assert s2.meta["outer_steps"] == 2


def test_statistics_and_optimizer_state_take_the_average():
    start = make([1.0, 1.0])
    avg_tensors = {
        "model.0.weight": torch.tensor([0.0, 0.0]),
        "model.1.running_var": torch.tensor([0.25, 4.0]),
        "optim.0.exp_avg": torch.tensor([0.1, 0.2]),
    }
    avg = encode_state(TrainState(avg_tensors, samples=4, loss_sum=1.0))
    out = decode_state(averaging.outer_step(start, avg, OUTER))
    assert torch.equal(out.tensors["model.1.running_var"], torch.tensor([0.25, 4.0]))
    assert torch.equal(out.tensors["optim.0.exp_avg"], torch.tensor([0.1, 0.2]))
    assert "outer.model.1.running_var" not in out.tensors


def test_the_combine_of_partials_drops_outer_momentum_and_keeps_the_start_s():
    # partial states (what segments emit) carry no outer.* tensors; the start's survive
    start = make([1.0, 2.0], **{"outer.model.0.weight": torch.tensor([0.3, -0.3])})
    a, b = make([0.0, 2.0], samples=30), make([1.0, 0.0], samples=10)
    merged = state.combine_states(a, b)
    assert torch.allclose(decode_state(merged).tensors["model.0.weight"],
                          torch.tensor([0.25, 1.5]))
    out = decode_state(averaging.outer_step(start, merged, OUTER))
    g = torch.tensor([1.0, 2.0]) - torch.tensor([0.25, 1.5])
    v = 0.9 * torch.tensor([0.3, -0.3]) + g
    assert torch.allclose(out.tensors["outer.model.0.weight"], v)


@pytest.mark.parametrize(
    ("config", "words"),
    [
        ({}, ["outer_lr", "outer_momentum"]),
        ({"outer_lr": 0, "outer_momentum": 0.9}, ["outer_lr=0"]),
        ({"outer_lr": 1.0, "outer_momentum": 1.0}, ["outer_momentum=1.0"]),
        ({"outer_lr": "x", "outer_momentum": 0.5}, ["outer_lr"]),
    ],
)
def test_bad_outer_settings_are_named(config, words):
    with pytest.raises(ConfigError) as err:
        averaging.outer_step(make([1.0, 1.0]), make([0.0, 0.0]), config)
    for word in words:
        assert word in str(err.value)


def test_outer_step_refuses_different_networks():
    other = encode_state(TrainState({"model.9.weight": torch.tensor([1.0])}, samples=1))
    with pytest.raises(ConfigError, match="different networks"):
        averaging.outer_step(make([1.0, 1.0]), other, OUTER)


def test_state_names_allow_outer_model_only():
    ok = encode_state(TrainState({"outer.model.0.weight": torch.tensor([1.0])}))
    assert "outer.model.0.weight" in decode_state(ok).tensors
    bad = encode_state(TrainState({"outer.optim.0.step": torch.tensor([1.0])}))
    with pytest.raises(StateError, match=r"outer\.model"):
        decode_state(bad)
