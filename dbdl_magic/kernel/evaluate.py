"""The evaluate aggregate: loss and metrics of a model over packed buffers.

Its state is a float64 vector ``[n, loss_sum, ...]`` followed by, for classification, the
``k × k`` confusion matrix (rows = truth), and for regression ``[sse, sae, sum_y, sum_y2]`` in
the target's original units. Partial states add, so the combine function is a sum.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch

from .state import decode_state
from .train import buffer_tensors, make_loss, network_for, pick_device, set_threads


class Evaluator:
    """A network in eval mode that scores buffers."""

    def __init__(self, config: dict[str, Any], state: bytes) -> None:
        set_threads(config.get("threads"))
        self.config = config
        self.device, _ = pick_device(config.get("device", "auto"))
        self.net = network_for(config)
        self.net.load_state_dict(decode_state(state).model_tensors())
        self.net.to(self.device).eval()
        self.loss_fn = make_loss(config["task"])

    def outputs(self, X: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
        """Raw network outputs (logits or standardised values), in chunks."""
        with torch.no_grad():
            return torch.cat([self.net(X[i : i + chunk]) for i in range(0, X.shape[0], chunk)])

    def score_buffer(self, x: bytes, y: bytes, acc: np.ndarray | None) -> np.ndarray:
        """Add one buffer's statistics to ``acc`` (a new vector when None)."""
        cfg = self.config
        X, Y = buffer_tensors(x, y, cfg, self.device)
        assert Y is not None
        out = self.outputs(X)
        with torch.no_grad():
            loss = float(self.loss_fn(out, Y)) * X.shape[0]
        if acc is None:
            acc = empty_stats(cfg)
        acc[0] += X.shape[0]
        acc[1] += loss
        if cfg["task"] == "classification":
            k = int(cfg["n_outputs"])
            pred = out.argmax(dim=1).cpu().numpy()
            truth = Y.cpu().numpy()
            acc[2:] += np.bincount(truth * k + pred, minlength=k * k).astype(np.float64)
        else:
            mean, std = cfg.get("target_scale", (0.0, 1.0))
            pred = out.cpu().numpy().astype(np.float64)[:, 0] * std + mean
            truth = Y.cpu().numpy().astype(np.float64)[:, 0] * std + mean
            err = pred - truth
            acc[2:] += [float(err @ err), float(np.abs(err).sum()), truth.sum(), truth @ truth]
        return acc


def empty_stats(config: dict[str, Any]) -> np.ndarray:
    """A zero statistics vector for this task."""
    extra = int(config["n_outputs"]) ** 2 if config["task"] == "classification" else 4
    return np.zeros(2 + extra, dtype=np.float64)


def stats_to_bytes(acc: np.ndarray) -> bytes:
    return acc.astype("<f8").tobytes()


def stats_from_bytes(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype="<f8").copy()


def combine_stats(a: bytes | None, b: bytes | None) -> bytes | None:
    """Sum two partial statistics vectors."""
    if a is None:
        return b
    if b is None:
        return a
    return stats_to_bytes(stats_from_bytes(a) + stats_from_bytes(b))


def metrics_from_stats(data: bytes | None, config: dict[str, Any]) -> dict[str, Any]:
    """Final metrics: loss + accuracy/F1 (classification) or MSE/MAE/R² (regression)."""
    if data is None:
        return {"n": 0}
    acc = stats_from_bytes(data)
    n = acc[0]
    out: dict[str, Any] = {"n": int(n), "loss": float(acc[1] / n) if n else None}
    if config["task"] == "classification":
        k = int(config["n_outputs"])
        cm = acc[2:].reshape(k, k)
        tp = np.diag(cm)
        out["accuracy"] = float(tp.sum() / n) if n else None
        precision = np.divide(tp, cm.sum(axis=0), out=np.zeros(k), where=cm.sum(axis=0) > 0)
        recall = np.divide(tp, cm.sum(axis=1), out=np.zeros(k), where=cm.sum(axis=1) > 0)
        denom = precision + recall
        f1 = np.divide(2 * precision * recall, denom, out=np.zeros(k), where=denom > 0)
        # Binary: F1 of the positive (second) class; multi-class: macro average.
        out["f1"] = float(f1[1]) if k == 2 else float(f1.mean())
    else:
        sse, sae, sy, syy = acc[2:6]
        out["mse"] = float(sse / n) if n else None
        out["mae"] = float(sae / n) if n else None
        ss_tot = syy - sy * sy / n if n else 0.0
        out["r2"] = float(1 - sse / ss_tot) if ss_tot > 0 else None
    return out


def metrics_json(data: bytes | None, config_text: str) -> str:
    """JSON text of :func:`metrics_from_stats` (what the aggregate's final function returns)."""
    return json.dumps(metrics_from_stats(data, json.loads(config_text)))
