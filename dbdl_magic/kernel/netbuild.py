"""Build a ``torch.nn.Sequential`` from a JSON architecture spec, after sizing it.

A spec is ``{"layers": [{"type": "Linear", "out_features": 64}, {"type": "ReLU"}, ...]}``.
Input sizes (``in_features``, ``in_channels``, ``num_features``, ``normalized_shape``) may be
left out: they are inferred from the data's input shape. ``"out"`` (or a missing
``out_features``/``out_channels`` on the last layer) stands for the number of model outputs.

:func:`plan_network` walks the layers with their shapes without allocating anything: it checks
every parameter's type and range, computes every layer's output shape, parameter count and
per-row activation size. :func:`check_budget` refuses a plan over the server's limits
(``DBDL_MAX_PARAMETERS``, ``DBDL_MAX_ACTIVATION_BYTES``, see :mod:`dbdl_magic.kernel.limits`),
naming the layer and the numbers; only then is the network built.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dbdl_magic.kernel.errors import KernelError
from dbdl_magic.kernel.limits import (
    MAX_SIZE,
    is_int,
    is_number,
    max_activation_bytes,
    max_parameters,
)

Shape = tuple[int, ...]
#: training keeps every layer's output and its gradient
TRAINING_FACTOR = 2
FLOAT_BYTES = 4


class SpecError(KernelError):
    """The architecture spec is malformed, does not fit the data, or is over the budget."""


@dataclass(frozen=True)
class LayerPlan:
    """One layer, sized: how to build it, its shapes and what it costs."""

    position: int
    kind: str
    make: Callable[[], nn.Module]
    in_shape: Shape
    out_shape: Shape
    parameters: int = 0  # learnable elements
    workspace: int = 0  # extra elements per row while it runs (convolution unfolding)

    @property
    def row_elements(self) -> int:
        """Elements per row this layer adds to the activations."""
        return math.prod(self.out_shape) + self.workspace

    def describe(self) -> str:
        """``layer 3 (Conv2d)``."""
        return f"layer {self.position} ({self.kind})"


@dataclass(frozen=True)
class NetworkPlan:
    """Every layer of a spec, sized before anything is allocated."""

    input_shape: Shape
    layers: tuple[LayerPlan, ...]

    @property
    def parameters(self) -> int:
        """Learnable parameters of the whole network."""
        return sum(layer.parameters for layer in self.layers)

    @property
    def row_bytes(self) -> int:
        """Bytes one row's forward pass keeps: the input and every layer's output."""
        elements = math.prod(self.input_shape) + sum(x.row_elements for x in self.layers)
        return FLOAT_BYTES * elements

    def activation_bytes(self, batch: int, training: bool = True) -> int:
        """Estimated activation memory of one batch of ``batch`` rows."""
        return batch * self.row_bytes * (TRAINING_FACTOR if training else 1)

    def build(self) -> nn.Sequential:
        """Allocate the network (call :func:`check_budget` first)."""
        modules: list[nn.Module] = []
        for layer in self.layers:
            try:
                module = layer.make()
            except (RuntimeError, TypeError, ValueError) as exc:
                raise SpecError(f"{layer.describe()}: {exc}") from exc
            _probe(module, layer)
            modules.append(module)
        return nn.Sequential(*modules)


def _gib(n: float) -> str:
    return f"{n / 2**30:.3g} GiB" if n >= 2**26 else f"{n / 2**20:.3g} MiB"


def check_budget(plan: NetworkPlan, batch: int = 1, training: bool = True) -> None:
    """Refuse a plan whose parameters or activations for ``batch`` rows exceed the limits."""
    limit = max_parameters()
    if plan.parameters > limit:
        big = max(plan.layers, key=lambda x: x.parameters)
        raise SpecError(
            f"the network has {plan.parameters:,} parameters ({big.describe()} alone has "
            f"{big.parameters:,}), over this server's limit DBDL_MAX_PARAMETERS={limit:,}"
        )
    budget = max_activation_bytes()
    need = plan.activation_bytes(batch, training)
    if need > budget:
        big = max(plan.layers, key=lambda x: x.row_elements)
        per_row = FLOAT_BYTES * big.row_elements
        raise SpecError(
            f"the network needs ≈ {_gib(need)} of activations for a batch of {batch:,} row(s) "
            f"({big.describe()} outputs shape {big.out_shape}: {_gib(per_row)} per row), over "
            f"this server's limit DBDL_MAX_ACTIVATION_BYTES={budget:,}; use a smaller layer "
            "or batch_size"
        )


# -- parameter readers ---------------------------------------------------------------------------
def _value(p: dict[str, Any], key: str, default: Any) -> Any:
    value = p.get(key)
    return default if value is None else value


def _int(p: dict[str, Any], key: str, default: Any, low: int = 1) -> int:
    value = _value(p, key, default)
    if not is_int(value) or not low <= value <= MAX_SIZE:
        raise SpecError(f"{key}={value!r} must be an integer in [{low}, {MAX_SIZE}]")
    return int(value)


def _sizes(p: dict[str, Any], key: str, dim: int, default: Any, low: int = 1) -> Shape:
    value = _value(p, key, default)
    items = value if isinstance(value, list) else [value]
    if len(items) == 1:
        items = items * dim
    if len(items) != dim or not all(is_int(v) and low <= v <= MAX_SIZE for v in items):
        raise SpecError(
            f"{key}={value!r} must be an integer in [{low}, {MAX_SIZE}] or a list of {dim}"
        )
    return tuple(int(v) for v in items)


def _number(
    p: dict[str, Any], key: str, default: float, low: float, high: float, *, open_low: bool = False
) -> float:
    value = _value(p, key, default)
    ok = is_number(value) and (value > low if open_low else value >= low) and value <= high
    if not ok:
        bound = f"({low}, {high}]" if open_low else f"[{low}, {high}]"
        raise SpecError(f"{key}={value!r} must be a number in {bound}")
    return float(value)


def _flag(p: dict[str, Any], key: str, default: bool) -> bool:
    value = _value(p, key, default)
    if not isinstance(value, bool):
        raise SpecError(f"{key}={value!r} must be true or false")
    return value


def _out(p: dict[str, Any], key: str, n_out: int) -> int:
    value = p.get(key, "out")
    if value in ("out", None):
        return n_out
    if not is_int(value) or not 1 <= value <= MAX_SIZE:
        raise SpecError(f"{key} must be a positive integer or 'out', got {value!r}")
    return int(value)


def _check_size(p: dict[str, Any], key: str, actual: int) -> None:
    declared = p.get(key)
    if isinstance(declared, list):
        declared = declared[-1] if len(declared) == 1 else declared
    if declared is not None and (not is_int(declared) or declared != actual):
        raise SpecError(
            f"{p.get('type')} declares {key}={declared}, but the data reaching it has {actual}"
        )


def _dims(kind: str, shape: Shape, allowed: Sequence[int], what: str) -> None:
    if len(shape) not in allowed:
        raise SpecError(f"{kind} expects input of shape {what}, but the data reaching it has "
                        f"shape {shape}")


def _window(kind: str, key: str, size: int, k: int, s: int, pad: int) -> int:
    """Output length of a convolution/pooling window over ``size`` (dilation 1, floor mode)."""
    if size + 2 * pad < k:
        raise SpecError(f"{kind} {key}={k} is larger than its (padded) input of size "
                        f"{size + 2 * pad}")
    return (size + 2 * pad - k) // s + 1


# -- layer planners: (params, input shape, n_outputs) -> (make, out shape, parameters, work) ----
Planned = tuple[Callable[[], nn.Module], Shape, int, int]


def _linear(p: dict[str, Any], shape: Shape, n_out: int) -> Planned:
    in_f = shape[-1]
    _check_size(p, "in_features", in_f)
    out_f, bias = _out(p, "out_features", n_out), _flag(p, "bias", True)
    params = in_f * out_f + (out_f if bias else 0)
    return lambda: nn.Linear(in_f, out_f, bias=bias), (*shape[:-1], out_f), params, 0


def _conv(dim: int) -> Callable[[dict[str, Any], Shape, int], Planned]:
    def plan(p: dict[str, Any], shape: Shape, n_out: int) -> Planned:
        kind = f"Conv{dim}d"
        if len(shape) != dim + 1:
            raise SpecError(
                f"{kind} expects input of shape (channels, {'length' if dim == 1 else 'h, w'})"
                f", but the data reaching it has shape {shape}"
            )
        _check_size(p, "in_channels", shape[0])
        c_in, c_out = shape[0], _out(p, "out_channels", n_out)
        k = _sizes(p, "kernel_size", dim, 3)
        s = _sizes(p, "stride", dim, 1)
        padding = _value(p, "padding", 0)
        if padding in ("same", "valid"):
            if padding == "same" and s != (1,) * dim:
                raise SpecError("padding='same' needs stride 1")
            pad: Any = padding
            spatial = shape[1:] if padding == "same" else tuple(
                _window(kind, "kernel_size", n, kk, ss, 0)
                for n, kk, ss in zip(shape[1:], k, s, strict=True)
            )
        else:
            pads = _sizes(p, "padding", dim, 0, low=0)
            pad = pads if dim > 1 else pads[0]
            spatial = tuple(
                _window(kind, "kernel_size", n, kk, ss, pp)
                for n, kk, ss, pp in zip(shape[1:], k, s, pads, strict=True)
            )
        bias = _flag(p, "bias", True)
        cls = nn.Conv1d if dim == 1 else nn.Conv2d
        kernel, stride = (k, s) if dim > 1 else (k[0], s[0])
        params = c_out * c_in * math.prod(k) + (c_out if bias else 0)
        workspace = c_in * math.prod(k) * math.prod(spatial)  # unfolded input (im2col)
        return (
            lambda: cls(c_in, c_out, kernel_size=kernel, stride=stride, padding=pad, bias=bias),
            (c_out, *spatial),
            params,
            workspace,
        )

    return plan


def _batchnorm(dim: int) -> Callable[[dict[str, Any], Shape, int], Planned]:
    def plan(p: dict[str, Any], shape: Shape, n_out: int) -> Planned:
        _dims(f"BatchNorm{dim}d", shape, (1, 2) if dim == 1 else (3,),
              "(features,) or (channels, length)" if dim == 1 else "(channels, h, w)")
        _check_size(p, "num_features", shape[0])
        eps = _number(p, "eps", 1e-5, 0.0, 1.0, open_low=True)
        momentum = p.get("momentum", 0.1)
        if momentum is not None:
            momentum = _number(p, "momentum", 0.1, 0.0, 1.0)
        cls = nn.BatchNorm1d if dim == 1 else nn.BatchNorm2d
        c = shape[0]
        return lambda: cls(c, eps=eps, momentum=momentum), shape, 2 * c, 0

    return plan


def _layernorm(p: dict[str, Any], shape: Shape, n_out: int) -> Planned:
    _check_size(p, "normalized_shape", shape[-1])
    eps = _number(p, "eps", 1e-5, 0.0, 1.0, open_low=True)
    d = shape[-1]
    return lambda: nn.LayerNorm(d, eps=eps), shape, 2 * d, 0


def _simple(cls: type[nn.Module], **numbers: tuple[float, float, float]) -> Callable[..., Planned]:
    """A shape-preserving layer without parameters; ``numbers`` = name: (default, low, high)."""

    def plan(p: dict[str, Any], shape: Shape, n_out: int) -> Planned:
        kwargs = {k: _number(p, k, *rule) for k, rule in numbers.items() if k in p}
        return lambda: cls(**kwargs), shape, 0, 0

    return plan


def _flatten(p: dict[str, Any], shape: Shape, n_out: int) -> Planned:
    return nn.Flatten, (math.prod(shape),), 0, 0


def _pool(cls: type[nn.Module], dim: int) -> Callable[[dict[str, Any], Shape, int], Planned]:
    def plan(p: dict[str, Any], shape: Shape, n_out: int) -> Planned:
        kind = cls.__name__
        _dims(kind, shape, (dim, dim + 1), "(channels, length)" if dim == 1 else "(channels, h, w)")
        if p.get("kernel_size") is None:
            raise SpecError("kernel_size is required")
        k = _sizes(p, "kernel_size", dim, None)
        s = _sizes(p, "stride", dim, list(k))
        pads = _sizes(p, "padding", dim, 0, low=0)
        if any(2 * pp > kk for pp, kk in zip(pads, k, strict=True)):
            raise SpecError(f"padding={list(pads)} must be at most half of kernel_size={list(k)}")
        spatial = tuple(
            _window(kind, "kernel_size", n, kk, ss, pp)
            for n, kk, ss, pp in zip(shape[-dim:], k, s, pads, strict=True)
        )
        args = [_arg(p, key, sizes) for key, sizes in (("kernel_size", k), ("stride", s),
                                                         ("padding", pads))]
        if p.get("stride") is None:
            args[1] = None  # torch's default: the kernel size
        if p.get("padding") is None:
            args[2] = 0
        return (
            lambda: cls(kernel_size=args[0], stride=args[1], padding=args[2]),
            (*shape[:-dim], *spatial),
            0,
            0,
        )

    return plan


def _arg(p: dict[str, Any], key: str, sizes: Shape) -> int | Shape:
    """A checked size as the layer takes it: an int as given, else the tuple."""
    value = p.get(key)
    return int(value) if is_int(value) else (sizes if len(sizes) > 1 else sizes[0])


def _adaptive(dim: int) -> Callable[[dict[str, Any], Shape, int], Planned]:
    def plan(p: dict[str, Any], shape: Shape, n_out: int) -> Planned:
        kind = f"AdaptiveAvgPool{dim}d"
        _dims(kind, shape, (dim, dim + 1), "(channels, length)" if dim == 1 else "(channels, h, w)")
        value = p.get("output_size")
        if value is None:
            raise SpecError("output_size is required")
        items = value if isinstance(value, list) else [value] * dim
        if dim == 2 and isinstance(value, list) and len(items) == 2:  # None keeps the input size
            items = [n if v is None else v for v, n in zip(items, shape[-2:], strict=True)]
        sizes = _sizes({"output_size": items}, "output_size", dim, None)
        cls = nn.AdaptiveAvgPool1d if dim == 1 else nn.AdaptiveAvgPool2d
        arg = int(value) if is_int(value) else (sizes[0] if dim == 1 else sizes)
        return lambda: cls(arg), (*shape[:-dim], *sizes), 0, 0

    return plan


def _unit(low: float, high: float, default: float) -> tuple[float, float, float]:
    return default, low, high


# Layer type name -> planner(params, input shape without batch dim, number of outputs).
LAYERS: dict[str, Callable[[dict[str, Any], Shape, int], Planned]] = {
    "Linear": _linear,
    "Conv1d": _conv(1),
    "Conv2d": _conv(2),
    "BatchNorm1d": _batchnorm(1),
    "BatchNorm2d": _batchnorm(2),
    "LayerNorm": _layernorm,
    "ReLU": _simple(nn.ReLU),
    "LeakyReLU": _simple(nn.LeakyReLU, negative_slope=_unit(-1e6, 1e6, 0.01)),
    "GELU": _simple(nn.GELU),
    "ELU": _simple(nn.ELU, alpha=_unit(-1e6, 1e6, 1.0)),
    "SiLU": _simple(nn.SiLU),
    "Tanh": _simple(nn.Tanh),
    "Sigmoid": _simple(nn.Sigmoid),
    "Softplus": _simple(nn.Softplus),
    "Dropout": _simple(nn.Dropout, p=_unit(0.0, 1.0, 0.5)),
    "Flatten": _flatten,
    "Identity": _simple(nn.Identity),
    "MaxPool1d": _pool(nn.MaxPool1d, 1),
    "MaxPool2d": _pool(nn.MaxPool2d, 2),
    "AvgPool1d": _pool(nn.AvgPool1d, 1),
    "AvgPool2d": _pool(nn.AvgPool2d, 2),
    "AdaptiveAvgPool1d": _adaptive(1),
    "AdaptiveAvgPool2d": _adaptive(2),
}

_CONV_KEYS = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "bias")
_POOL_KEYS = ("kernel_size", "stride", "padding")
_BN_KEYS = ("num_features", "eps", "momentum")
#: parameters each layer type takes (anything else is refused, as the client does)
PARAMETERS: dict[str, tuple[str, ...]] = {
    "Linear": ("in_features", "out_features", "bias"),
    "Conv1d": _CONV_KEYS,
    "Conv2d": _CONV_KEYS,
    "BatchNorm1d": _BN_KEYS,
    "BatchNorm2d": _BN_KEYS,
    "LayerNorm": ("normalized_shape", "eps"),
    "LeakyReLU": ("negative_slope",),
    "ELU": ("alpha",),
    "Dropout": ("p",),
    "MaxPool1d": _POOL_KEYS,
    "MaxPool2d": _POOL_KEYS,
    "AvgPool1d": _POOL_KEYS,
    "AvgPool2d": _POOL_KEYS,
    "AdaptiveAvgPool1d": ("output_size",),
    "AdaptiveAvgPool2d": ("output_size",),
}
MAX_LAYERS = 1000


def plan_network(spec: Any, input_shape: Sequence[int], n_outputs: int) -> NetworkPlan:
    """Check and size every layer of ``spec`` on inputs of ``input_shape`` (no batch dimension)
    without allocating anything."""
    layers = spec.get("layers") if isinstance(spec, dict) else None
    if not isinstance(layers, list) or not layers:
        raise SpecError("model spec needs a non-empty 'layers' list")
    if len(layers) > MAX_LAYERS:
        raise SpecError(f"model spec has {len(layers)} layers; at most {MAX_LAYERS} are built")
    if not is_int(n_outputs) or not 1 <= n_outputs <= MAX_SIZE:
        raise SpecError(f"the number of outputs must be a positive integer, got {n_outputs!r}")
    if not all(is_int(s) and 1 <= s <= MAX_SIZE for s in input_shape) or not input_shape:
        raise SpecError(f"the input shape must be positive integers, got {list(input_shape)!r}")
    shape: Shape = tuple(int(s) for s in input_shape)
    first = shape
    planned: list[LayerPlan] = []
    for position, params in enumerate(layers):
        layer = _plan_layer(position, params, shape, n_outputs)
        planned.append(layer)
        shape = layer.out_shape
    if shape != (n_outputs,):
        raise SpecError(
            f"the model ends with shape {shape}, but {n_outputs} output(s) are needed; "
            "end the spec with a Linear layer whose out_features is 'out'"
        )
    return NetworkPlan(first, tuple(planned))


def _plan_layer(position: int, params: Any, shape: Shape, n_outputs: int) -> LayerPlan:
    if not isinstance(params, dict) or "type" not in params:
        text = repr(params)
        raise SpecError(f"layer {position} of the model spec has no 'type': {text[:200]}")
    kind = params["type"]
    planner = LAYERS.get(kind) if isinstance(kind, str) else None
    if planner is None:
        raise SpecError(
            f"unsupported layer {str(kind)[:100]!r} (layer {position}); "
            f"supported: {', '.join(LAYERS)}"
        )
    unknown = [k for k in params if k != "type" and k not in PARAMETERS.get(kind, ())]
    if unknown:
        takes = ", ".join(PARAMETERS.get(kind, ())) or "no parameters"
        raise SpecError(f"layer {position} ({kind}) has an unknown parameter "
                        f"{str(unknown[0])[:100]!r}; it takes {takes}")
    try:
        make, out_shape, parameters, workspace = planner(params, shape, n_outputs)
    except SpecError as exc:
        raise SpecError(f"layer {position} ({kind}): {exc}") from exc
    if not out_shape or min(out_shape) < 1:
        raise SpecError(f"layer {position} ({kind}) cannot take input of shape {shape}: "
                        f"its output would have shape {out_shape}")
    return LayerPlan(position, kind, make, shape, out_shape, parameters, workspace)


def _probe(module: nn.Module, layer: LayerPlan) -> None:
    """Run one zero row through the freshly built layer: torch must agree with the plan."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            out = module(torch.zeros((1, *layer.in_shape)))
    except (RuntimeError, TypeError, ValueError) as exc:
        raise SpecError(
            f"{layer.describe()} cannot take input of shape {layer.in_shape}: {exc}"
        ) from exc
    finally:
        module.train(was_training)
    if tuple(out.shape[1:]) != layer.out_shape:
        raise SpecError(
            f"{layer.describe()}: torch gives output shape {tuple(out.shape[1:])} where "
            f"{layer.out_shape} was planned"
        )


def build_network(
    spec: dict[str, Any], input_shape: Sequence[int], n_outputs: int, batch_size: int = 1
) -> nn.Sequential:
    """Build the network for ``spec`` on inputs of ``input_shape`` (no batch dimension),
    refusing it first if it is over the limits for batches of ``batch_size`` rows.

    The caller seeds torch beforehand when initialisation must be reproducible.
    """
    plan = plan_network(spec, input_shape, n_outputs)
    check_budget(plan, batch_size)
    return plan.build()
