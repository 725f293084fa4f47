"""The training state that travels between aggregate calls: a small header plus safetensors.

Layout (little endian)::

    magic b"DBDL" | format u16 | reserved u16 | samples i64 | loss_sum f64 | combines i64
    | meta_len u32 | meta (UTF-8 JSON) | safetensors blob

``samples``/``loss_sum`` count what this iteration has trained so far, ``combines`` how many
partial states were merged into this one (> 0 proves the parallel combine path ran).  The
safetensors blob holds the network's ``state_dict`` under ``model.``, the optimizer's state
under ``optim.<param index>.<key>`` and the outer optimizer's momentum of averaged runs under
``outer.model.`` (:mod:`~dbdl_magic.kernel.averaging`).  Nothing is ever pickled.

A state may arrive from anyone allowed to call the SQL functions, so decoding refuses, with a
:class:`StateError` naming what is wrong: a bad header (magic, version, reserved bits, negative
or absurd counters, a non-finite loss, meta that is not a JSON object), a truncated, padded or
oversized buffer, tensors of a dtype other than float32 (weights, optimizer state) and int64
(counters), tensor names outside ``model.*``/``optim.<i>.*``/``outer.model.*``, and NaN/±inf values.
:func:`check_model_tensors` and :func:`check_optimizer_tensors` then compare the tensors with
the network the spec builds (names, shapes, dtypes).
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from dbdl_magic.kernel.errors import KernelError
from dbdl_magic.kernel.limits import all_finite

MAGIC = b"DBDL"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<4sHHqdqI")
MAX_STATE_BYTES = (1 << 30) - (1 << 20)  # a bytea value is capped at 1 GB
MAX_META_BYTES = 1 << 20
MAX_SAMPLES = 2**53
#: safetensors dtype tag -> (torch dtype, item size); anything else is refused
DTYPES = {"F32": (torch.float32, 4), "I64": (torch.int64, 8)}
_NAME = re.compile(
    r"(outer\.)?model\.[A-Za-z0-9_.]{1,200}|optim\.(0|[1-9][0-9]{0,8})\.[a-z_]{1,40}"
)
#: optimizer state each optimizer keeps per parameter
OPTIMIZER_STATE = {
    "sgd": frozenset({"momentum_buffer"}),
    "adam": frozenset({"step", "exp_avg", "exp_avg_sq"}),
    "adamw": frozenset({"step", "exp_avg", "exp_avg_sq"}),
}


class StateError(KernelError):
    """The bytes are not a dbdl training state of a format this kernel understands."""


@dataclass
class TrainState:
    """Decoded training state (tensors live on the CPU)."""

    tensors: dict[str, torch.Tensor]
    samples: int = 0
    loss_sum: float = 0.0
    combines: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

    def model_tensors(self) -> dict[str, torch.Tensor]:
        """The network's ``state_dict`` entries."""
        return {k[6:]: v for k, v in self.tensors.items() if k.startswith("model.")}

    def optimizer_tensors(self) -> dict[int, dict[str, torch.Tensor]]:
        """Optimizer state per parameter index."""
        out: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in self.tensors.items():
            if key.startswith("optim."):
                _, index, name = key.split(".", 2)
                out.setdefault(int(index), {})[name] = value
        return out


def encode_state(state: TrainState) -> bytes:
    """Serialise ``state``; refuses states that would not fit in a PostgreSQL ``bytea``."""
    meta = json.dumps(state.meta, sort_keys=True).encode()
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.tensors.items()}
    blob = st_save(tensors) if tensors else b""
    header = _HEADER.pack(
        MAGIC, FORMAT_VERSION, 0, state.samples, state.loss_sum, state.combines, len(meta)
    )
    size = len(header) + len(meta) + len(blob)
    if size > MAX_STATE_BYTES:
        raise StateError(
            f"the model's training state is {size / 2**30:.2f} GiB, over the 1 GB limit of a "
            "database value; use a smaller model or an optimizer with less state (sgd)"
        )
    return header + meta + blob


def read_header(data: bytes) -> tuple[int, float, int, dict[str, Any], int]:
    """Return ``(samples, loss_sum, combines, meta, offset of the safetensors blob)``."""
    if data is None:
        raise StateError("not a dbdl state: the state is NULL")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise StateError(f"not a dbdl state: expected bytes, got {type(data).__name__}")
    if len(data) > MAX_STATE_BYTES:
        raise StateError(f"not a dbdl state: {len(data):,} bytes, over the 1 GB limit")
    if len(data) < _HEADER.size:
        raise StateError("not a dbdl state: too short")
    magic, version, reserved, samples, loss_sum, combines, meta_len = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise StateError("not a dbdl state: bad magic bytes")
    if version != FORMAT_VERSION:
        raise StateError(f"state format {version} is not supported (this kernel reads 1)")
    if reserved != 0:
        raise StateError(f"damaged state header: reserved field is {reserved}, not 0")
    if not 0 <= samples <= MAX_SAMPLES or not 0 <= combines <= MAX_SAMPLES:
        raise StateError(f"damaged state header: samples={samples}, combines={combines}")
    if not (math.isfinite(loss_sum) and loss_sum >= 0):
        raise StateError(f"damaged state header: loss sum {loss_sum} is not a finite number ≥ 0")
    start = _HEADER.size
    if meta_len > min(MAX_META_BYTES, len(data) - start):
        raise StateError(
            f"damaged state header: {meta_len:,} bytes of meta, but {len(data) - start:,} "
            "bytes follow the header (truncated?)"
        )
    try:
        meta = json.loads(bytes(data[start : start + meta_len]).decode())
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise StateError(f"damaged state header: meta is not JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise StateError("damaged state header: meta is not a JSON object")
    return samples, loss_sum, combines, meta, start + meta_len


def check_blob(blob: bytes | memoryview) -> dict[str, tuple[str, list[int]]]:
    """Validate the safetensors header of ``blob`` without decoding tensors: names, dtypes,
    shapes and offsets that tile the data exactly. Returns ``{name: (dtype tag, shape)}``."""
    if len(blob) == 0:
        return {}
    if len(blob) < 8:
        raise StateError("damaged state: tensor table truncated")
    (n,) = struct.unpack_from("<Q", blob)
    if n > len(blob) - 8 or n > MAX_META_BYTES * 16:
        raise StateError(f"damaged state: tensor table of {n:,} bytes in a {len(blob):,}-byte "
                         "blob (truncated?)")
    try:
        table = json.loads(bytes(blob[8 : 8 + n]).decode())
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise StateError(f"damaged state: tensor table is not JSON ({exc})") from exc
    if not isinstance(table, dict):
        raise StateError("damaged state: tensor table is not a JSON object")
    table.pop("__metadata__", None)
    data_len = len(blob) - 8 - n
    spans: list[tuple[int, int]] = []
    out: dict[str, tuple[str, list[int]]] = {}
    for name, entry in table.items():
        dtype, shape, span = _entry(name, entry)
        spans.append(span)
        out[name] = (dtype, shape)
    position = 0
    for begin, end in sorted(spans):
        if begin != position:
            raise StateError("damaged state: tensor data has a gap or overlap")
        position = end
    if position != data_len:
        raise StateError(f"damaged state: {data_len:,} bytes of tensor data, the table "
                         f"describes {position:,} (truncated or padded)")
    return out


def _entry(name: Any, entry: Any) -> tuple[str, list[int], tuple[int, int]]:
    shown = str(name)[:80]
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise StateError(f"state holds an unexpected tensor {shown!r} (only model.*, "
                         "optim.<index>.* and outer.model.* belong in a state)")
    if not isinstance(entry, dict):
        raise StateError(f"damaged state: entry of tensor {shown!r} is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPES:
        raise StateError(f"tensor {shown!r} has dtype {str(dtype)[:20]}; a state holds float32 "
                         "(F32) weights and int64 (I64) counters only")
    if not (isinstance(shape, list) and len(shape) <= 8
            and all(isinstance(s, int) and 0 <= s < 2**31 for s in shape)):
        raise StateError(f"damaged state: tensor {shown!r} has shape {str(shape)[:80]}")
    if not (isinstance(offsets, list) and len(offsets) == 2
            and all(isinstance(o, int) and o >= 0 for o in offsets)):
        raise StateError(f"damaged state: tensor {shown!r} has offsets {str(offsets)[:80]}")
    begin, end = offsets
    if end - begin != math.prod(shape) * DTYPES[dtype][1]:
        raise StateError(f"damaged state: tensor {shown!r} of shape {shape} spans "
                         f"{end - begin} bytes")
    return dtype, shape, (begin, end)


def decode_state(data: bytes) -> TrainState:
    """Inverse of :func:`encode_state`; refuses anything but a well-formed, finite state."""
    samples, loss_sum, combines, meta, offset = read_header(data)
    blob = memoryview(data)[offset:]
    check_blob(blob)
    try:
        tensors = st_load(bytes(blob)) if len(blob) else {}
    except Exception as exc:  # safetensors' own checks (SafetensorError is not exported)
        raise StateError(f"damaged state: {exc}") from exc
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not all_finite(tensor):
            raise StateError(f"state tensor {name!r} holds NaN or infinite values")
    return TrainState(tensors, samples, loss_sum, combines, meta)


def check_model_tensors(found: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """The state's network tensors must be exactly the network's: names, shapes, dtypes."""
    missing = sorted(f"model.{k}" for k in expected.keys() - found.keys())
    extra = sorted(f"model.{k}" for k in found.keys() - expected.keys())
    if missing or extra:
        raise StateError(
            "the state does not belong to this model spec: "
            + (f"missing tensor(s) {', '.join(missing[:5])}" if missing else "")
            + ("; " if missing and extra else "")
            + (f"unexpected tensor(s) {', '.join(extra[:5])}" if extra else "")
        )
    for name, want in expected.items():
        got = found[name]
        if got.dtype != want.dtype or got.shape != want.shape:
            raise StateError(
                f"state tensor 'model.{name}' is {_describe(got)}; this model spec builds "
                f"{_describe(want)}"
            )
        if name.endswith("num_batches_tracked") and int(got.min()) < 0:
            raise StateError(f"state tensor 'model.{name}' is negative")


def check_optimizer_tensors(
    saved: dict[int, dict[str, torch.Tensor]], params: list[torch.Tensor], optimizer: str
) -> None:
    """Optimizer state must match the trainable parameters and what ``optimizer`` keeps."""
    allowed = OPTIMIZER_STATE.get(optimizer.lower(), frozenset())
    for index, values in saved.items():
        if not 0 <= index < len(params):
            raise StateError(f"state holds optimizer state for parameter {index}, but the "
                             f"network has {len(params)} trainable parameter tensors")
        names = set(values)
        if not names <= allowed or (optimizer != "sgd" and names != allowed):
            raise StateError(f"optimizer state of parameter {index} holds {sorted(names)}; "
                             f"{optimizer} keeps {sorted(allowed)}")
        for name, tensor in values.items():
            want_shape = torch.Size([]) if name == "step" else params[index].shape
            if tensor.dtype != torch.float32 or tensor.shape != want_shape:
                raise StateError(f"state tensor 'optim.{index}.{name}' is {_describe(tensor)}; "
                                 f"expected float32 {list(want_shape)}")
        if "step" in values:  # combined states average it: any finite number ≥ 0
            step = float(values["step"])
            if step < 0:
                raise StateError(f"optimizer step count {step} of parameter {index} is negative")
        if "exp_avg_sq" in values and float(values["exp_avg_sq"].min()) < 0:
            raise StateError(f"optimizer state 'optim.{index}.exp_avg_sq' has negative values")


def _describe(tensor: torch.Tensor) -> str:
    return f"{str(tensor.dtype).replace('torch.', '')} {list(tensor.shape)}"


def state_info(data: bytes) -> dict[str, Any]:
    """Header facts as a JSON-able dict (the tensor table is checked, not decoded)."""
    samples, loss_sum, combines, meta, offset = read_header(data)
    check_blob(memoryview(data)[offset:])
    return {
        **meta,
        "format": FORMAT_VERSION,
        "samples": samples,
        "loss": loss_sum / samples if samples else None,
        "combines": combines,
        "bytes": len(data),
    }


def _workers(meta: dict[str, Any]) -> int:
    workers = meta.get("workers", 1)
    if not isinstance(workers, int) or isinstance(workers, bool) or not 1 <= workers <= 2**31:
        raise StateError(f"state meta workers={str(workers)[:40]} is not a positive integer")
    return workers


def _check_same_model(sa: TrainState, sb: TrainState) -> None:
    """Two partial states must hold the same network tensors, and agree on shared ones."""
    model_a, model_b = sa.model_tensors().keys(), sb.model_tensors().keys()
    if model_a != model_b:
        diff = sorted(model_a ^ model_b)
        raise StateError(f"cannot combine states of different models: tensor "
                         f"{', '.join(diff[:5])} is in one only")
    for key in sa.tensors.keys() & sb.tensors.keys():
        ta, tb = sa.tensors[key], sb.tensors[key]
        if ta.dtype != tb.dtype or ta.shape != tb.shape:
            raise StateError(f"cannot combine states of different models: tensor {key!r} is "
                             f"{_describe(ta)} in one and {_describe(tb)} in the other")


def combine_states(a: bytes | None, b: bytes | None) -> bytes | None:
    """Merge two partial states: sample-weighted average of every float tensor.

    Integer tensors (e.g. BatchNorm's ``num_batches_tracked``) take the maximum. Counters add.
    Both states must hold the same tensors (names, shapes, dtypes).
    """
    if a is None:
        return b
    if b is None:
        return a
    sa, sb = decode_state(a), decode_state(b)
    _check_same_model(sa, sb)
    total = sa.samples + sb.samples
    wa = sa.samples / total if total else 0.5
    merged: dict[str, torch.Tensor] = {}
    for key in sa.tensors.keys() | sb.tensors.keys():
        ta, tb = sa.tensors.get(key), sb.tensors.get(key)
        if ta is None or tb is None:  # optimizer state of a worker that took no step
            merged[key] = ta if tb is None else tb
        elif ta.is_floating_point():
            merged[key] = ta * wa + tb * (1.0 - wa)
        else:
            merged[key] = torch.maximum(ta, tb)
    meta = dict(sa.meta)
    meta["workers"] = _workers(sa.meta) + _workers(sb.meta)
    return encode_state(
        TrainState(
            merged,
            samples=total,
            loss_sum=sa.loss_sum + sb.loss_sum,
            combines=sa.combines + sb.combines + 1,
            meta=meta,
        )
    )
