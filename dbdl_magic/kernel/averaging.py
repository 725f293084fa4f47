"""Combining the partial models of segments: the outer step of local SGD.

K segments start a sync round from the same model, each trains over its share of the buffers,
and the combine function (:func:`~dbdl_magic.kernel.state.combine_states`) averages their
states weighted by samples. Averaging alone moves the model by about 1/K of what one process
training over all the buffers would have (each segment saw 1/K of them). The outer step treats
the averaged change as a pseudo-gradient for an optimizer over rounds (SlowMo, Wang et al.
2019; DiLoCo, Douillard et al. 2023)::

    g = start − average                 (per weight tensor)
    v = μ·v + g                         (outer momentum, kept in the state as ``outer.*``)
    new = start − η·(g + μ·v)           (Nesterov)

With ``η = 1, μ = 0`` the outer step is the plain average. The momentum ``v`` travels in the
checkpoint (tensors ``outer.model.<name>``), so a resumed run continues exactly. Normalisation
statistics (BatchNorm running mean/var, counters) and the optimizer's own state (Adam's
moments) take the averaged value: they are not weights, and stepping past them could make a
variance negative.
"""

from __future__ import annotations

from typing import Any

import torch

from dbdl_magic.kernel.errors import ConfigError, clean_errors
from dbdl_magic.kernel.state import TrainState, decode_state, encode_state

AVERAGING = ("mean", "outer")
#: tensors of a network that are statistics, not weights: they take the average
_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")
OUTER_PREFIX = "outer."


def outer_settings(config: dict[str, Any]) -> tuple[float, float]:
    """``(outer_lr, outer_momentum)`` from a run's config, checked."""
    try:
        lr = float(config["outer_lr"])
        momentum = float(config["outer_momentum"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError("config outer_lr and outer_momentum must be numbers (the training run "
                          "sends them with averaging='outer')") from exc
    if not 0.0 < lr <= 100.0:
        raise ConfigError(f"config outer_lr={lr} must be in (0, 100]")
    if not 0.0 <= momentum < 1.0:
        raise ConfigError(f"config outer_momentum={momentum} must be in [0, 1)")
    return lr, momentum


def _is_weight(name: str, tensor: torch.Tensor) -> bool:
    return tensor.is_floating_point() and not name.endswith(_STATISTICS)


@clean_errors("dbdl.outer_step")
def outer_step(start: bytes, averaged: bytes, config: dict[str, Any]) -> bytes:
    """The state after one sync round: ``averaged`` (the combine of the segments' partial
    states, which began at ``start``) moved by the outer Nesterov step. The header (samples,
    loss, combines) and the optimizer tensors are the average's; the outer momentum is
    ``start``'s updated."""
    lr, momentum = outer_settings(config)
    s, a = decode_state(start), decode_state(averaged)
    begin, mean = s.model_tensors(), a.model_tensors()
    if begin.keys() != mean.keys():
        raise ConfigError("the averaged state and the round's starting state hold different "
                          "networks")
    tensors = {k: v for k, v in a.tensors.items() if not k.startswith(OUTER_PREFIX)}
    with torch.no_grad():
        for name, before in begin.items():
            after = mean[name]
            if not _is_weight(name, before) or before.shape != after.shape:
                continue
            g = before - after
            key = f"{OUTER_PREFIX}model.{name}"
            velocity = s.tensors.get(key)
            v = g.clone() if velocity is None else velocity * momentum + g
            step = g + momentum * v
            tensors[f"model.{name}"] = before - lr * step
            tensors[key] = v
    meta = dict(a.meta)
    meta["outer_steps"] = int(s.meta.get("outer_steps", 0)) + 1
    return encode_state(TrainState(tensors, a.samples, a.loss_sum, a.combines, meta))


__all__ = ["AVERAGING", "OUTER_PREFIX", "outer_settings", "outer_step"]
