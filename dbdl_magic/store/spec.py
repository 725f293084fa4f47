"""Model specs: shorthand strings, JSON, or ``nn.Sequential`` → a JSON architecture spec.

The JSON spec is what the database sees (never pickled code); the kernel builds it with
:func:`dbdl_magic.kernel.netbuild.build_network`.

Shorthand forms::

    linear                    a single Linear layer (logistic/linear regression)
    mlp:64,32                 Linear(64)-ReLU-Linear(32)-ReLU-Linear(out)
    mlp:64,32,dropout=0.2,bn  with Dropout after each activation, BatchNorm1d before it
    mlp:128,act=gelu,ln       other activations (relu, gelu, tanh, silu, elu, leakyrelu), LayerNorm
    cnn:16,32                 Conv2d(16,3×3)-ReLU-MaxPool2d(2) per number, Flatten, Linear(out)
"""

from __future__ import annotations

import json
from typing import Any

from torch import nn

from dbdl_magic.errors import SpecError
from dbdl_magic.kernel.netbuild import LAYERS

_ACTIVATIONS = {
    "relu": "ReLU",
    "gelu": "GELU",
    "tanh": "Tanh",
    "silu": "SiLU",
    "elu": "ELU",
    "leakyrelu": "LeakyReLU",
    "sigmoid": "Sigmoid",
}


def parse_spec(model: str | dict[str, Any] | nn.Module) -> dict[str, Any]:
    """Normalise any accepted model description to a JSON spec ``{"layers": [...]}``."""
    if isinstance(model, nn.Module):
        return sequential_to_spec(model)
    if isinstance(model, dict):
        spec = model
    elif isinstance(model, str):
        text = model.strip()
        spec = _parse_json(text) if text.startswith("{") else _parse_shorthand(text)
    else:
        raise SpecError(f"model must be a spec string, a JSON dict or nn.Sequential, got {model!r}")
    _validate(spec)
    return spec


def _parse_json(text: str) -> dict[str, Any]:
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SpecError(f"model spec is not valid JSON: {exc}") from exc
    if not isinstance(spec, dict):
        raise SpecError("a JSON model spec must be an object with a 'layers' list")
    return spec


def _parse_shorthand(text: str) -> dict[str, Any]:
    kind, _, rest = text.partition(":")
    kind = kind.strip().lower()
    sizes: list[int] = []
    flags: dict[str, str] = {}
    for token in filter(None, (t.strip() for t in rest.split(","))):
        if token.isdigit() and int(token) > 0:
            sizes.append(int(token))
        elif "=" in token:
            key, _, value = token.partition("=")
            flags[key.strip().lower()] = value.strip().lower()
        elif token.lower() in ("bn", "ln"):
            flags[token.lower()] = "1"
        else:
            raise SpecError(f"malformed model spec {text!r}: cannot read {token!r}")
    if kind == "linear":
        if sizes or flags:
            raise SpecError(f"malformed model spec {text!r}: 'linear' takes no options")
        return {"layers": [{"type": "Linear", "out_features": "out"}]}
    if kind == "mlp":
        if not sizes:
            raise SpecError(f"malformed model spec {text!r}: give hidden sizes, e.g. mlp:64,32")
        act = _ACTIVATIONS.get(flags.pop("act", "relu"))
        if act is None:
            raise SpecError(f"unknown activation in {text!r}; use one of {', '.join(_ACTIVATIONS)}")
        dropout_text = flags.pop("dropout", "0") or "0"
        try:
            dropout = float(dropout_text)
        except ValueError:
            dropout = -1.0
        if not 0.0 <= dropout < 1.0:
            raise SpecError(
                f"malformed model spec {text!r}: dropout={dropout_text} must be a fraction "
                "in [0, 1)"
            )
        bn, ln = flags.pop("bn", None), flags.pop("ln", None)
        _no_flags_left(text, flags)
        layers: list[dict[str, Any]] = []
        for size in sizes:
            layers.append({"type": "Linear", "out_features": size})
            if bn:
                layers.append({"type": "BatchNorm1d"})
            if ln:
                layers.append({"type": "LayerNorm"})
            layers.append({"type": act})
            if dropout:
                layers.append({"type": "Dropout", "p": dropout})
        layers.append({"type": "Linear", "out_features": "out"})
        return {"layers": layers}
    if kind == "cnn":
        channels = sizes or [16, 32]
        _no_flags_left(text, flags)
        layers = []
        for c in channels:
            layers += [
                {"type": "Conv2d", "out_channels": c, "kernel_size": 3, "padding": 1},
                {"type": "ReLU"},
                {"type": "MaxPool2d", "kernel_size": 2},
            ]
        layers += [{"type": "Flatten"}, {"type": "Linear", "out_features": "out"}]
        return {"layers": layers}
    raise SpecError(f"unknown model shorthand {kind!r} in {text!r}; use linear, mlp:..., cnn:...")


def _no_flags_left(text: str, flags: dict[str, str]) -> None:
    if flags:
        raise SpecError(f"malformed model spec {text!r}: unknown option(s) {', '.join(flags)}")


# Parameters each layer type takes, and what they must hold (checked before the database sees
# the spec, so a misspelt or mistyped parameter is named instead of silently ignored).
_SIZE, _OUT, _SIZES, _NUMBER, _FLAG = "size", "out", "sizes", "number", "flag"
_POOL = {"kernel_size": _SIZES, "stride": _SIZES, "padding": _SIZES}
_CONV = {
    "in_channels": _SIZE,
    "out_channels": _OUT,
    "kernel_size": _SIZES,
    "stride": _SIZES,
    "padding": _SIZES,
    "bias": _FLAG,
}
_BATCHNORM = {"num_features": _SIZE, "eps": _NUMBER, "momentum": _NUMBER}
_PARAMETERS: dict[str, dict[str, str]] = {
    "Linear": {"in_features": _SIZE, "out_features": _OUT, "bias": _FLAG},
    "Conv1d": _CONV,
    "Conv2d": _CONV,
    "BatchNorm1d": _BATCHNORM,
    "BatchNorm2d": _BATCHNORM,
    "LayerNorm": {"normalized_shape": _SIZES, "eps": _NUMBER},
    "LeakyReLU": {"negative_slope": _NUMBER},
    "ELU": {"alpha": _NUMBER},
    "Dropout": {"p": _NUMBER},
    "MaxPool1d": _POOL,
    "MaxPool2d": _POOL,
    "AvgPool1d": _POOL,
    "AvgPool2d": _POOL,
    "AdaptiveAvgPool1d": {"output_size": _SIZES},
    "AdaptiveAvgPool2d": {"output_size": _SIZES},
    **{k: {} for k in ("ReLU", "GELU", "SiLU", "Tanh", "Sigmoid", "Softplus", "Identity")},
    "Flatten": {},
}
_RULES = {
    _SIZE: "a positive integer",
    _OUT: "a positive integer or 'out'",
    _SIZES: "a positive integer or a list of them",
    _NUMBER: "a number",
    _FLAG: "true or false",
}


def _valid_value(rule: str, value: Any) -> bool:
    def size(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v > 0

    if value is None:  # sizes inferred from the data; pooling stride defaults; BN momentum
        return rule != _FLAG
    if rule == _SIZE:
        return size(value)
    if rule == _OUT:
        return value == "out" or size(value)
    if rule == _SIZES:
        if isinstance(value, str):  # Conv padding "same" / "valid"
            return value in ("same", "valid")
        items = value if isinstance(value, list) else [value]
        return bool(items) and all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in items
        )
    if rule == _NUMBER:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, bool)


def _validate(spec: dict[str, Any]) -> None:
    layers = spec.get("layers")
    if not isinstance(layers, list) or not layers:
        raise SpecError("model spec needs a non-empty 'layers' list")
    for position, layer in enumerate(layers):
        if not isinstance(layer, dict) or "type" not in layer:
            raise SpecError(f"layer {position} of the model spec has no 'type': {layer!r}")
        kind = layer["type"]
        if kind not in LAYERS:
            raise SpecError(
                f"unsupported layer {kind!r} (layer {position}); supported: {', '.join(LAYERS)}"
            )
        allowed = _PARAMETERS.get(kind)
        if allowed is None:  # a layer type without a parameter table here: the kernel checks
            continue
        for key, value in layer.items():
            if key == "type":
                continue
            if key not in allowed:
                takes = ", ".join(allowed) or "no parameters"
                raise SpecError(
                    f"layer {position} ({kind}) has an unknown parameter {key!r}; it takes {takes}"
                )
            if not _valid_value(allowed[key], value):
                raise SpecError(
                    f"layer {position} ({kind}): {key}={value!r} must be {_RULES[allowed[key]]}"
                )


def _size(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _module_to_layer(module: nn.Module, position: int) -> dict[str, Any]:
    kind = type(module).__name__
    if kind not in LAYERS:
        raise SpecError(
            f"unsupported layer {kind} at position {position} of the nn.Sequential; "
            f"supported: {', '.join(LAYERS)}"
        )
    layer: dict[str, Any] = {"type": kind}
    if isinstance(module, nn.Linear):
        layer.update(
            in_features=module.in_features,
            out_features=module.out_features,
            bias=module.bias is not None,
        )
    elif isinstance(module, (nn.Conv1d, nn.Conv2d)):
        layer.update(
            in_channels=module.in_channels,
            out_channels=module.out_channels,
            kernel_size=_size(module.kernel_size),
            stride=_size(module.stride),
            padding=_size(module.padding),
            bias=module.bias is not None,
        )
    elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        layer.update(num_features=module.num_features, eps=module.eps, momentum=module.momentum)
    elif isinstance(module, nn.LayerNorm):
        layer.update(normalized_shape=list(module.normalized_shape), eps=module.eps)
    elif isinstance(module, nn.LeakyReLU):
        layer["negative_slope"] = module.negative_slope
    elif isinstance(module, nn.ELU):
        layer["alpha"] = module.alpha
    elif isinstance(module, nn.Dropout):
        layer["p"] = module.p
    elif isinstance(module, nn.Flatten):
        if module.start_dim != 1 or module.end_dim != -1:
            raise SpecError(f"Flatten at position {position} must flatten all but the batch dim")
    elif isinstance(module, (nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d)):
        layer.update(
            kernel_size=_size(module.kernel_size),
            stride=_size(module.stride),
            padding=_size(module.padding),
        )
    elif isinstance(module, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)):
        layer["output_size"] = _size(module.output_size)
    return layer


def sequential_to_spec(model: nn.Module) -> dict[str, Any]:
    """Convert an ``nn.Sequential`` of supported layers to a JSON spec (architecture only)."""
    if not isinstance(model, nn.Sequential):
        raise SpecError(
            f"only nn.Sequential models can be trained in the database, got {type(model).__name__}"
        )
    return {"layers": [_module_to_layer(m, i) for i, m in enumerate(model)]}
