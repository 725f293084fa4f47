"""Approximate deduplication (opt-in, netsDB-style) for a *serving copy* of a model.

Blocks of the model's weight tensors are replaced by similar blocks already in the store (same
dtype and size, small relative distance) as long as the accuracy on a validation query stays
within ``budget`` of the original's. Every accepted replacement is logged. The result is a new
model version whose blocks are shared with other models; the canonical model is untouched and
stays lossless.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from sqlalchemy import text

from dbdl_magic.backends.base import Backend
from dbdl_magic.data.encoding import Encoding
from dbdl_magic.errors import InputError
from dbdl_magic.kernel.blockstore import assemble, decode_block, split_state
from dbdl_magic.kernel.catalog import blocks_like_sql
from dbdl_magic.kernel.netbuild import build_network
from dbdl_magic.kernel.state import decode_state
from dbdl_magic.store import registry

_TENSOR_DTYPES = ("F32", "F64", "F16", "BF16")


@dataclass
class Replacement:
    """One accepted replacement: which block, by what, how far, accuracy afterwards."""

    label: str
    replaced_by: str
    relative_distance: float
    accuracy: float


def _accuracy(state: bytes, spec: dict[str, Any], enc: Encoding, X: torch.Tensor,
              y: np.ndarray) -> float:
    net = build_network(spec, enc.input_shape, enc.target.n_outputs)
    net.load_state_dict(decode_state(state).model_tensors())
    net.eval()
    with torch.no_grad():
        out = net(X)
    if enc.target.task == "classification":
        return float((out.argmax(1).numpy() == y).mean())
    pred = out[:, 0].numpy() * enc.target.std + enc.target.mean
    ss_tot = float(((y - y.mean()) ** 2).sum()) or 1.0
    return 1.0 - float(((pred - y) ** 2).sum()) / ss_tot  # R² for regression


def _candidates(conn: Any, backend: Backend, dtype: str, size: int, own: set[bytes],
                limit: int) -> list[tuple[bytes, np.ndarray]]:
    rows = conn.execute(
        text(blocks_like_sql(backend.store_tables())),
        {"dtype": dtype, "size": size, "limit": limit},
    ).all()
    out = []
    for address, encoding, data, base in rows:
        if bytes(address) in own:
            continue
        raw = decode_block(int(encoding), bytes(data), None if base is None else bytes(base))
        out.append((bytes(address), np.frombuffer(raw, dtype=np.float32 if dtype == "F32"
                                                  else np.float64).astype(np.float64)))
    return out


def serving_copy(
    backend: Backend, name: str, validation_query: str, *, version: int | None = None,
    budget: float = 0.01, max_distance: float = 0.5, into: str | None = None,
    candidates: int = 200, params: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], pd.DataFrame]:
    """Build a deduplicated serving copy; returns its key and the replacement log."""
    if not 0 <= budget < 1:
        raise InputError(f"budget={budget!r} must be an accuracy drop in [0, 1)")
    engine = backend.engine
    with engine.connect() as conn:
        row = registry.read_model(conn, backend, name, version)
        frame = pd.read_sql(text(validation_query), conn, params=params or {})
    enc = Encoding.from_json(row["encoding"])
    if enc.target.name not in frame.columns:
        raise InputError(f"the validation query lacks the target column {enc.target.name!r}")
    X = torch.from_numpy(enc.encode_frame(frame))
    if enc.target.task == "classification":
        lookup = {c: i for i, c in enumerate(enc.target.classes)}
        y = np.array([lookup.get(v, -1) for v in frame[enc.target.name].tolist()])
    else:
        y = frame[enc.target.name].to_numpy(dtype=np.float64)
    original = _accuracy(row["state"], row["spec"], enc, X, y)
    blocks = split_state(row["state"])
    own = {b.hash for b in blocks}
    raws = [b.raw for b in blocks]
    log: list[Replacement] = []
    current = original
    with engine.connect() as conn:
        for i, block in enumerate(blocks):
            if block.dtype not in _TENSOR_DTYPES[:2] or not block.label.startswith("model."):
                continue
            mine = np.frombuffer(block.raw, np.float32 if block.dtype == "F32" else np.float64)
            norm = float(np.linalg.norm(mine)) or 1.0
            best = None
            for address, other in _candidates(conn, backend, block.dtype, len(block.raw), own,
                                              candidates):
                distance = float(np.linalg.norm(other - mine)) / norm
                if distance <= max_distance and (best is None or distance < best[1]):
                    best = (address, distance, other)
            if best is None:
                continue
            trial = list(raws)
            trial[i] = best[2].astype(mine.dtype).tobytes()
            accuracy = _accuracy(b"".join(trial), row["spec"], enc, X, y)
            if original - accuracy <= budget:
                raws, current = trial, accuracy
                log.append(Replacement(block.label, best[0].hex()[:16], best[1], accuracy))
    new_state = b"".join(raws)
    assemble([(b.hash, b.dtype, 0, b.raw, None) for b in split_state(new_state)])  # sanity
    target_name = into or f"{name}_serving"
    with engine.begin() as conn:
        key = {"name": target_name, "version": registry.next_version(conn, backend, target_name)}
        options = {"approximate_dedup": {
            "source": f"{row['name']}:{row['version']}", "budget": budget,
            "original_accuracy": original, "accuracy": current,
            "replacements": [r.__dict__ for r in log],
        }}
        registry.create_model(conn, backend, key, spec=row["spec"], encoding=row["encoding"]
                           if isinstance(row["encoding"], str) else enc.to_json(),
                           options=options, query=row["query"],
                           parent=f"{row['name']}:{row['version']}")
        registry.write_checkpoint(conn, backend, key, 0, new_state)
        backend.archive(conn, key, 0, None, 256 * 1024 - 1024, False)
        registry.set_status(conn, backend, key, "complete", row["history"])
    return key, pd.DataFrame([r.__dict__ for r in log],
                             columns=["label", "replaced_by", "relative_distance", "accuracy"])
