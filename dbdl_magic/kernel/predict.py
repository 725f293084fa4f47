"""Prediction over packed feature buffers (no targets)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .evaluate import Evaluator
from .train import buffer_tensors


def predict_buffer(evaluator: Evaluator, x: bytes) -> np.ndarray:
    """Class probabilities (n × k) or regression values in original units (n × 1)."""
    cfg: dict[str, Any] = evaluator.config
    X, _ = buffer_tensors(x, None, cfg, evaluator.device)
    out = evaluator.outputs(X)
    if cfg["task"] == "classification":
        return torch.softmax(out, dim=1).cpu().numpy().astype(np.float32)
    mean, std = cfg.get("target_scale", (0.0, 1.0))
    return (out.cpu().numpy().astype(np.float64) * std + mean).astype(np.float32)
