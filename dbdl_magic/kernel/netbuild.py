"""Build a ``torch.nn.Sequential`` from a JSON architecture spec.

A spec is ``{"layers": [{"type": "Linear", "out_features": 64}, {"type": "ReLU"}, ...]}``.
Input sizes (``in_features``, ``in_channels``, ``num_features``, ``normalized_shape``) may be
left out: they are inferred from the data's input shape. ``"out"`` (or a missing
``out_features``/``out_channels`` on the last layer) stands for the number of model outputs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn


class SpecError(ValueError):
    """The architecture spec is malformed or does not fit the data."""


def _linear(p: dict[str, Any], shape: tuple[int, ...], n_out: int) -> nn.Module:
    in_features = shape[-1]
    _check_size(p, "in_features", in_features)
    return nn.Linear(in_features, _out(p, "out_features", n_out), bias=p.get("bias", True))


def _conv(dim: int) -> Callable[[dict[str, Any], tuple[int, ...], int], nn.Module]:
    def build(p: dict[str, Any], shape: tuple[int, ...], n_out: int) -> nn.Module:
        if len(shape) != dim + 1:
            raise SpecError(
                f"Conv{dim}d expects input of shape (channels, {'length' if dim == 1 else 'h, w'})"
                f", but the data reaching it has shape {shape}"
            )
        _check_size(p, "in_channels", shape[0])
        cls = nn.Conv1d if dim == 1 else nn.Conv2d
        return cls(
            shape[0],
            _out(p, "out_channels", n_out),
            kernel_size=p.get("kernel_size", 3),
            stride=p.get("stride", 1),
            padding=p.get("padding", 0),
            bias=p.get("bias", True),
        )

    return build


def _batchnorm(dim: int) -> Callable[[dict[str, Any], tuple[int, ...], int], nn.Module]:
    def build(p: dict[str, Any], shape: tuple[int, ...], n_out: int) -> nn.Module:
        _check_size(p, "num_features", shape[0])
        cls = nn.BatchNorm1d if dim == 1 else nn.BatchNorm2d
        return cls(shape[0], eps=p.get("eps", 1e-5), momentum=p.get("momentum", 0.1))

    return build


def _layernorm(p: dict[str, Any], shape: tuple[int, ...], n_out: int) -> nn.Module:
    _check_size(p, "normalized_shape", shape[-1])
    return nn.LayerNorm(shape[-1], eps=p.get("eps", 1e-5))


def _simple(cls: type[nn.Module], *names: str) -> Callable[..., nn.Module]:
    def build(p: dict[str, Any], shape: tuple[int, ...], n_out: int) -> nn.Module:
        return cls(**{k: p[k] for k in names if k in p})

    return build


# Layer type name -> builder(params, input shape without batch dim, number of outputs).
LAYERS: dict[str, Callable[[dict[str, Any], tuple[int, ...], int], nn.Module]] = {
    "Linear": _linear,
    "Conv1d": _conv(1),
    "Conv2d": _conv(2),
    "BatchNorm1d": _batchnorm(1),
    "BatchNorm2d": _batchnorm(2),
    "LayerNorm": _layernorm,
    "ReLU": _simple(nn.ReLU),
    "LeakyReLU": _simple(nn.LeakyReLU, "negative_slope"),
    "GELU": _simple(nn.GELU),
    "ELU": _simple(nn.ELU, "alpha"),
    "SiLU": _simple(nn.SiLU),
    "Tanh": _simple(nn.Tanh),
    "Sigmoid": _simple(nn.Sigmoid),
    "Softplus": _simple(nn.Softplus),
    "Dropout": _simple(nn.Dropout, "p"),
    "Flatten": _simple(nn.Flatten),
    "Identity": _simple(nn.Identity),
    "MaxPool1d": _simple(nn.MaxPool1d, "kernel_size", "stride", "padding"),
    "MaxPool2d": _simple(nn.MaxPool2d, "kernel_size", "stride", "padding"),
    "AvgPool1d": _simple(nn.AvgPool1d, "kernel_size", "stride", "padding"),
    "AvgPool2d": _simple(nn.AvgPool2d, "kernel_size", "stride", "padding"),
    "AdaptiveAvgPool1d": _simple(nn.AdaptiveAvgPool1d, "output_size"),
    "AdaptiveAvgPool2d": _simple(nn.AdaptiveAvgPool2d, "output_size"),
}


def _out(p: dict[str, Any], key: str, n_out: int) -> int:
    value = p.get(key, "out")
    if value in ("out", None):
        return n_out
    if not isinstance(value, int) or value <= 0:
        raise SpecError(f"{key} must be a positive integer or 'out', got {value!r}")
    return value


def _check_size(p: dict[str, Any], key: str, actual: int) -> None:
    declared = p.get(key)
    if isinstance(declared, list):
        declared = declared[-1] if len(declared) == 1 else declared
    if declared is not None and declared != actual:
        raise SpecError(
            f"{p.get('type')} declares {key}={declared}, but the data reaching it has {actual}"
        )


def build_network(
    spec: dict[str, Any], input_shape: Sequence[int], n_outputs: int
) -> nn.Sequential:
    """Build the network for ``spec`` on inputs of ``input_shape`` (no batch dimension).

    The caller seeds torch beforehand when initialisation must be reproducible.
    """
    layers = spec.get("layers") if isinstance(spec, dict) else None
    if not isinstance(layers, list) or not layers:
        raise SpecError("model spec needs a non-empty 'layers' list")
    shape = tuple(int(s) for s in input_shape)
    modules: list[nn.Module] = []
    for position, params in enumerate(layers):
        if not isinstance(params, dict) or "type" not in params:
            raise SpecError(f"layer {position} of the model spec has no 'type': {params!r}")
        kind = params["type"]
        builder = LAYERS.get(kind)
        if builder is None:
            raise SpecError(
                f"unsupported layer {kind!r} (layer {position}); supported: {', '.join(LAYERS)}"
            )
        try:
            module = builder(params, shape, n_outputs)
        except (TypeError, ValueError) as exc:  # SpecError too: say which layer
            raise SpecError(f"layer {position} ({kind}): {exc}") from exc
        modules.append(module)
        shape = _output_shape(module, shape, kind, position)
    if shape != (n_outputs,):
        raise SpecError(
            f"the model ends with shape {shape}, but {n_outputs} output(s) are needed; "
            "end the spec with a Linear layer whose out_features is 'out'"
        )
    return nn.Sequential(*modules)


def _output_shape(
    module: nn.Module, shape: tuple[int, ...], kind: str, position: int
) -> tuple[int, ...]:
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            out = module(torch.zeros((1, *shape)))
    except (RuntimeError, TypeError, ValueError) as exc:
        raise SpecError(
            f"layer {position} ({kind}) cannot take input of shape {shape}: {exc}"
        ) from exc
    finally:
        module.train(was_training)
    return tuple(out.shape[1:])
