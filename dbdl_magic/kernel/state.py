"""The training state that travels between aggregate calls: a small header plus safetensors.

Layout (little endian)::

    magic b"DBDL" | format u16 | reserved u16 | samples i64 | loss_sum f64 | combines i64
    | meta_len u32 | meta (UTF-8 JSON) | safetensors blob

``samples``/``loss_sum`` count what this iteration has trained so far, ``combines`` how many
partial states were merged into this one (> 0 proves the parallel combine path ran).  The
safetensors blob holds the network's ``state_dict`` under ``model.`` and the optimizer's state
under ``optim.<param index>.<key>``.  Nothing is ever pickled.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

MAGIC = b"DBDL"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<4sHHqdqI")
MAX_STATE_BYTES = (1 << 30) - (1 << 20)  # a bytea value is capped at 1 GB


class StateError(ValueError):
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
    if data is None or len(data) < _HEADER.size:
        raise StateError("not a dbdl state: too short")
    magic, version, _, samples, loss_sum, combines, meta_len = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise StateError("not a dbdl state: bad magic bytes")
    if version != FORMAT_VERSION:
        raise StateError(f"state format {version} is not supported (this kernel reads 1)")
    start = _HEADER.size
    meta = json.loads(bytes(data[start : start + meta_len]).decode())
    return samples, loss_sum, combines, meta, start + meta_len


def decode_state(data: bytes) -> TrainState:
    """Inverse of :func:`encode_state`."""
    samples, loss_sum, combines, meta, offset = read_header(data)
    blob = bytes(data[offset:])
    tensors = st_load(blob) if blob else {}
    return TrainState(tensors, samples, loss_sum, combines, meta)


def state_info(data: bytes) -> dict[str, Any]:
    """Header facts as a JSON-able dict (no tensors are decoded)."""
    samples, loss_sum, combines, meta, _offset = read_header(data)
    return {
        "format": FORMAT_VERSION,
        "samples": samples,
        "loss": loss_sum / samples if samples else None,
        "combines": combines,
        "bytes": len(data),
        **meta,
    }


def combine_states(a: bytes | None, b: bytes | None) -> bytes | None:
    """Merge two partial states: sample-weighted average of every float tensor.

    Integer tensors (e.g. BatchNorm's ``num_batches_tracked``) take the maximum. Counters add.
    """
    if a is None:
        return b
    if b is None:
        return a
    sa, sb = decode_state(a), decode_state(b)
    total = sa.samples + sb.samples
    wa = sa.samples / total if total else 0.5
    merged: dict[str, torch.Tensor] = {}
    for key in sa.tensors.keys() | sb.tensors.keys():
        ta, tb = sa.tensors.get(key), sb.tensors.get(key)
        if ta is None or tb is None:
            merged[key] = ta if tb is None else tb
        elif ta.is_floating_point():
            merged[key] = ta * wa + tb * (1.0 - wa)
        else:
            merged[key] = torch.maximum(ta, tb)
    meta = dict(sa.meta)
    meta["workers"] = sa.meta.get("workers", 1) + sb.meta.get("workers", 1)
    return encode_state(
        TrainState(
            merged,
            samples=total,
            loss_sum=sa.loss_sum + sb.loss_sum,
            combines=sa.combines + sb.combines + 1,
            meta=meta,
        )
    )
