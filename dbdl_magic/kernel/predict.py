"""Prediction over whole buffers of rows (no targets).

Two forms of input:

* a *packed* buffer: the rows already encoded as float32 (what training packs);
* *raw* values: one row of feature values per query row, as the PostgreSQL image of a
  ``double precision[]`` array (``dbdl.array_image``: the array's own bytes, no value converted
  to a Python object) or a float64 matrix; numeric features as they are (imputed in SQL),
  categorical ones as the index of their category (-1: none), arrays flattened. The kernel
  encodes them with the model's stored means and deviations (:func:`encode_raw`), exactly as
  the packing SQL and the client's ``Encoding.encode_frame`` do.

The outputs leave a PostgreSQL kernel as array images too (:func:`array_image`), which
``dbdl.int4_array`` / ``float8_array`` / ``float4_array`` check and turn into SQL arrays: a
buffer's labels, values and probabilities cost one copy each, not a conversion per value.
"""

from __future__ import annotations

import math
import struct
import sys
from typing import Any

import numpy as np
import torch

from dbdl_magic.kernel.errors import DataError, LimitError, clean_errors
from dbdl_magic.kernel.evaluate import Evaluator
from dbdl_magic.kernel.limits import all_finite, is_int, is_number, max_activation_bytes
from dbdl_magic.kernel.train import buffer_tensors

#: PostgreSQL type OIDs of the array elements the kernels read and write
INT4, FLOAT4, FLOAT8 = 23, 700, 701
_ITEM = {INT4: "i4", FLOAT4: "f4", FLOAT8: "f8"}
_MAXDIM = 6  # PostgreSQL's MAXDIM
_NATIVE = "<" if sys.byteorder == "little" else ">"
KINDS = ("numeric", "categorical", "array")


def _check_out_size(evaluator: Evaluator, rows: int) -> None:
    cfg = evaluator.config
    out_bytes = 4 * rows * int(cfg["n_outputs"])
    if out_bytes > max_activation_bytes():
        raise LimitError(
            f"predictions of {rows:,} rows × {cfg['n_outputs']} outputs take "
            f"{out_bytes:,} bytes, over this server's limit DBDL_MAX_ACTIVATION_BYTES="
            f"{max_activation_bytes():,}; send smaller buffers"
        )


def _finish(cfg: dict[str, Any], out: torch.Tensor) -> np.ndarray:
    if cfg["task"] == "classification":
        return torch.softmax(out, dim=1).cpu().numpy().astype(np.float32)
    mean, std = cfg.get("target_scale", (0.0, 1.0))
    return (out.cpu().numpy().astype(np.float64) * std + mean).astype(np.float32)


@clean_errors("prediction")
def predict_buffer(evaluator: Evaluator, x: bytes | np.ndarray) -> np.ndarray:
    """Class probabilities (n × k) or regression values in original units (n × 1) of a packed
    buffer (float32 bytes in the config's byte order) or of already encoded rows (float32,
    n × input_shape)."""
    cfg: dict[str, Any] = evaluator.config
    if isinstance(x, np.ndarray):
        shape = tuple(cfg["input_shape"])
        if x.dtype != np.float32 or x.ndim < 1 or x.size != x.shape[0] * int(np.prod(shape)):
            raise DataError(f"encoded rows must be float32 of shape (n, {list(shape)})")
        if not all_finite(x):
            raise DataError("the encoded rows hold NaN or infinite feature values")
        X = torch.from_numpy(np.ascontiguousarray(x).reshape(-1, *shape)).to(evaluator.device)
    else:
        X, _ = buffer_tensors(x, None, cfg, evaluator.device, targets=False)
    _check_out_size(evaluator, X.shape[0])
    return _finish(cfg, evaluator.outputs(X))


# -- raw values in ----------------------------------------------------------------------------
def check_columns(columns: Any, input_shape: list[int]) -> list[dict[str, Any]]:
    """The raw-value layout of a config (``config["columns"]``): one entry per feature with
    ``name``, ``kind``, ``mean``, ``std`` and ``width`` (categories, or values of an array);
    its encoded width must be the network's input size."""
    if not isinstance(columns, list) or not columns:
        raise DataError("config columns must be a non-empty list of features")
    total = 0
    for c in columns:
        ok = (
            isinstance(c, dict) and isinstance(c.get("name"), str) and c.get("kind") in KINDS
            and is_int(c.get("width")) and 1 <= c["width"] <= 1 << 24
            and is_number(c.get("mean", 0.0)) and is_number(c.get("std", 1.0))
            and c.get("std", 1.0) != 0
        )
        if not ok:
            raise DataError(f"config column {str(c)[:120]} is not a feature description "
                            "(name, kind, mean, std != 0, width)")
        total += c["width"]
    if total != int(np.prod(input_shape)):
        raise DataError(f"config columns encode {total} values per row; the network takes "
                        f"{int(np.prod(input_shape))}")
    return columns


def raw_width(columns: list[dict[str, Any]]) -> int:
    """Raw values per row: one per numeric or categorical feature, ``width`` per array."""
    return sum(c["width"] if c["kind"] == "array" else 1 for c in columns)


def read_array_image(data: bytes, elemtype: int = FLOAT8) -> tuple[np.ndarray, np.ndarray | None]:
    """A PostgreSQL array image (``dbdl.array_image``: header, NULL bitmap, native-order values)
    as ``(values n × m, NULL mask n × m or None)``; the first dimension is the rows."""
    data = bytes(data)
    if len(data) < 12:
        raise DataError(f"an array image needs at least 12 bytes, got {len(data)}")
    ndim, offset, elem = struct.unpack_from("=iiI", data)
    if elem != elemtype:
        raise DataError(f"the array image holds elements of type {elem}, not {elemtype}")
    if ndim == 0:
        return np.zeros((0, 0)), None
    if not 1 <= ndim <= _MAXDIM or len(data) < 12 + 8 * ndim:
        raise DataError(f"the array image has {ndim} dimensions (or is truncated)")
    dims = struct.unpack_from(f"={ndim}i", data, 12)
    if min(dims) < 1:
        raise DataError(f"the array image has dimensions {list(dims)}")
    n, m = dims[0], math.prod(dims[1:])  # Python ints: no overflow
    items = n * m
    itemsize = int(_ITEM[elemtype][1])
    bitmap_at = 12 + 8 * ndim  # the header counts the 4-byte length word: its offsets are -4
    if offset:
        nbytes = (items + 7) // 8
        if offset - 4 < bitmap_at + nbytes or offset - 4 > len(data):
            raise DataError("the array image's NULL bitmap does not fit its header")
        bits = np.unpackbits(np.frombuffer(data, np.uint8, nbytes, bitmap_at),
                             bitorder="little")[:items].astype(bool)
        start, present = offset - 4, int(bits.sum())
    else:
        bits, start, present = None, ((16 + 8 * ndim + 7) // 8) * 8 - 4, items
    if len(data) != start + present * itemsize:
        raise DataError(f"the array image holds {len(data) - start} bytes of values; its "
                        f"header says {present * itemsize}")
    stored = np.frombuffer(data, f"{_NATIVE}{_ITEM[elemtype]}", present, start)
    if bits is None:
        return stored.reshape(n, m), None
    values = np.zeros(items, dtype=stored.dtype)
    values[bits] = stored
    return values.reshape(n, m), ~bits.reshape(n, m)


def encode_raw(columns: list[dict[str, Any]], raw: np.ndarray,
               nulls: np.ndarray | None = None) -> np.ndarray:
    """Encode raw rows (n × :func:`raw_width`, float64) as the packer does: numeric and array
    values standardised ``(v - mean) / std`` in float64 then rounded to float32, categorical
    indices one-hot (an index outside the categories: all zeros). A NULL (``nulls``) left in a
    numeric or array feature is refused, naming the column."""
    n = raw.shape[0]
    if raw.ndim != 2 or raw.shape[1] != raw_width(columns):
        raise DataError(f"rows of {raw.shape[1] if raw.ndim == 2 else '?'} raw values; the "
                        f"features take {raw_width(columns)}")
    out = np.empty((n, sum(c["width"] for c in columns)), dtype=np.float32)
    at = col = 0
    for c in columns:
        span = c["width"] if c["kind"] == "array" else 1
        if nulls is not None and nulls[:, col : col + span].any():
            count = int(nulls[:, col : col + span].any(axis=1).sum())
            raise DataError(f"feature column {c['name']!r} is NULL in {count} row(s) of this "
                            "buffer and the model was trained without impute")
        values = raw[:, col : col + span]
        if c["kind"] == "categorical":
            index = values[:, 0]
            block = np.zeros((n, c["width"]), dtype=np.float32)
            hit = (index >= 0) & (index < c["width"]) & (index == np.floor(index))
            block[np.nonzero(hit)[0], index[hit].astype(np.int64)] = 1.0
            out[:, at : at + c["width"]] = block
        else:
            out[:, at : at + c["width"]] = (values - float(c["mean"])) / float(c["std"])
        at += c["width"]
        col += span
    return out


# -- outputs ----------------------------------------------------------------------------------
def array_image(values: np.ndarray, elemtype: int) -> bytes:
    """The image of a one-dimensional PostgreSQL array of ``values`` (what
    ``dbdl.int4_array`` and friends accept): header, then the values in native order."""
    flat = np.ascontiguousarray(values, dtype=f"{_NATIVE}{_ITEM[elemtype]}").ravel()
    if flat.size == 0:
        return struct.pack("=iiI", 0, 0, elemtype)
    return struct.pack("=iiIii", 1, 0, elemtype, flat.size, 1) + flat.tobytes()


def batch_outputs(config: dict[str, Any], out: np.ndarray) -> dict[str, np.ndarray]:
    """What a buffer's predictions turn into: ``labels`` (class index, int32) and, with
    ``config["proba"]``, ``proba`` (float32, class by class: every row's probability of class
    0, then of class 1, ...) for classification; ``values`` (float64) for regression."""
    if config["task"] == "classification":
        result = {"labels": out.argmax(axis=1).astype(np.int32)}
        if config.get("proba", False):
            result["proba"] = np.ascontiguousarray(out.T)
        return result
    return {"values": out[:, 0].astype(np.float64)}


def score_rows(evaluator: Evaluator, x: bytes | np.ndarray, config: dict[str, Any]) -> np.ndarray:
    """Predictions of one buffer: raw values (a ``double precision[]`` image or a float64
    matrix) when the config has ``columns``, else a packed float32 buffer."""
    columns = config.get("columns")
    if columns is None:
        return predict_buffer(evaluator, x)
    columns = check_columns(columns, config["input_shape"])
    raw, nulls = (x, None) if isinstance(x, np.ndarray) else read_array_image(x, FLOAT8)
    if raw.shape[0] == 0:
        return np.zeros((0, int(config["n_outputs"])), dtype=np.float32)
    return predict_buffer(evaluator, encode_raw(columns, raw, nulls))
