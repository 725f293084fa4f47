"""Prediction over packed feature buffers (no targets)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from dbdl_magic.kernel.errors import LimitError, clean_errors
from dbdl_magic.kernel.evaluate import Evaluator
from dbdl_magic.kernel.limits import max_activation_bytes
from dbdl_magic.kernel.train import buffer_tensors


@clean_errors("prediction")
def predict_buffer(evaluator: Evaluator, x: bytes) -> np.ndarray:
    """Class probabilities (n × k) or regression values in original units (n × 1)."""
    cfg: dict[str, Any] = evaluator.config
    X, _ = buffer_tensors(x, None, cfg, evaluator.device, targets=False)
    out_bytes = 4 * X.shape[0] * int(cfg["n_outputs"])
    if out_bytes > max_activation_bytes():
        raise LimitError(
            f"predictions of {X.shape[0]:,} rows × {cfg['n_outputs']} outputs take "
            f"{out_bytes:,} bytes, over this server's limit DBDL_MAX_ACTIVATION_BYTES="
            f"{max_activation_bytes():,}; send smaller buffers"
        )
    out = evaluator.outputs(X)
    if cfg["task"] == "classification":
        return torch.softmax(out, dim=1).cpu().numpy().astype(np.float32)
    mean, std = cfg.get("target_scale", (0.0, 1.0))
    return (out.cpu().numpy().astype(np.float64) * std + mean).astype(np.float32)
