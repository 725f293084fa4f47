"""The evaluate aggregate: loss and metrics of a model over packed buffers.

Its state is a float64 vector ``[n, loss_sum, ...]`` followed by, for classification, the
``k × k`` confusion matrix (rows = truth), and for regression ``[sse, sae, sum_y, sum_y2]`` in
the target's original units. Partial states add, so the combine function is a sum.

A statistics vector may arrive from any caller of the SQL functions: it must have the length
its config implies (or, combining, the same length as the other), and hold finite counts ≥ 0.
Buffers are scored in chunks sized by ``DBDL_MAX_ACTIVATION_BYTES``.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch

from dbdl_magic.kernel.errors import ConfigError, DataError, clean_errors
from dbdl_magic.kernel.limits import check_task, max_activation_bytes
from dbdl_magic.kernel.state import check_model_tensors, decode_state
from dbdl_magic.kernel.train import buffer_tensors, make_loss, pick_device, plan_for, set_threads

MAX_CHUNK = 8192


class Evaluator:
    """A network in eval mode that scores buffers."""

    @clean_errors("evaluation")
    def __init__(self, config: dict[str, Any], state: bytes) -> None:
        """Check ``config`` and ``state`` and build the network in eval mode."""
        self.plan = plan_for(config)
        set_threads(config.get("threads"))
        self.config = config
        self.device, _ = pick_device(config.get("device", "auto"))
        self.net = self.plan.build()
        decoded = decode_state(state).model_tensors()
        check_model_tensors(decoded, self.net.state_dict())
        self.net.load_state_dict(decoded)
        self.net.to(self.device).eval()
        self.loss_fn = make_loss(config["task"])
        per_row = self.plan.activation_bytes(1, training=False)
        self.chunk = max(1, min(MAX_CHUNK, max_activation_bytes() // per_row))

    def outputs(self, X: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        """Raw network outputs (logits or standardised values), in chunks."""
        chunk = chunk or self.chunk
        if X.shape[0] == 0:
            return torch.zeros((0, *self.plan.layers[-1].out_shape), device=X.device)
        with torch.no_grad():
            return torch.cat([self.net(X[i : i + chunk]) for i in range(0, X.shape[0], chunk)])

    @clean_errors("evaluation")
    def score_buffer(self, x: bytes, y: bytes, acc: np.ndarray | None) -> np.ndarray:
        """Add one buffer's statistics to ``acc`` (a new vector when None)."""
        cfg = self.config
        X, Y = buffer_tensors(x, y, cfg, self.device, targets=True)
        assert Y is not None
        if acc is None:
            acc = empty_stats(cfg)
        elif acc.shape != (stats_length(cfg),):
            raise DataError(f"evaluation statistics hold {acc.size} values; this config "
                            f"needs {stats_length(cfg)}")
        for start in range(0, X.shape[0], self.chunk):
            self._score_chunk(X[start : start + self.chunk], Y[start : start + self.chunk], acc)
        return acc

    def _score_chunk(self, X: torch.Tensor, Y: torch.Tensor, acc: np.ndarray) -> None:
        cfg = self.config
        with torch.no_grad():
            out = self.net(X)
            loss = float(self.loss_fn(out, Y)) * X.shape[0]
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


def stats_length(config: dict[str, Any]) -> int:
    """Length of the statistics vector of this config's task."""
    return 2 + (int(config["n_outputs"]) ** 2 if config["task"] == "classification" else 4)


def empty_stats(config: dict[str, Any]) -> np.ndarray:
    """A zero statistics vector for this task."""
    check_task(config)
    return np.zeros(stats_length(config), dtype=np.float64)


def stats_to_bytes(acc: np.ndarray) -> bytes:
    """The aggregate's state: little-endian float64."""
    return acc.astype("<f8").tobytes()


def stats_from_bytes(
    data: bytes, length: int | None = None, task: str | None = None
) -> np.ndarray:
    """Decode (and check) a statistics vector: ``length`` values (when given), finite counts
    ≥ 0 (for a known ``task``, every entry but the regression target's sum)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DataError(f"evaluation statistics must be bytes, got {type(data).__name__}")
    if len(data) % 8 or len(data) < 16:
        raise DataError(f"evaluation statistics of {len(data)} bytes are not a vector of "
                        "float64 counts (truncated?)")
    acc = np.frombuffer(data, dtype="<f8").copy()
    if length is not None and acc.size != length:
        raise DataError(f"evaluation statistics hold {acc.size} values; this config needs "
                        f"{length}")
    if not np.isfinite(acc).all():
        raise DataError("evaluation statistics hold NaN or infinite values")
    counts = acc[:2] if task is None else acc if task == "classification" else acc[[0, 1, 2, 3, 5]]
    if counts.min() < 0:
        raise DataError("evaluation statistics hold negative counts")
    if task == "classification" and abs(acc[2:].sum() - acc[0]) > 0.5:
        raise DataError(f"evaluation statistics count {acc[0]:.0f} rows but their confusion "
                        f"matrix {acc[2:].sum():.0f}")
    return acc


@clean_errors("dbdl.eval_combine")
def combine_stats(a: bytes | None, b: bytes | None) -> bytes | None:
    """Sum two partial statistics vectors (of the same length)."""
    if a is None:
        return b
    if b is None:
        return a
    sa = stats_from_bytes(a)
    return stats_to_bytes(sa + stats_from_bytes(b, sa.size))


def metrics_from_stats(data: bytes | None, config: dict[str, Any]) -> dict[str, Any]:
    """Final metrics: loss + accuracy/F1 (classification) or MSE/MAE/R² (regression)."""
    check_task(config)
    if data is None:
        return {"n": 0}
    acc = stats_from_bytes(data, stats_length(config), config["task"])
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


@clean_errors("dbdl.metrics")
def metrics_json(data: bytes | None, config_text: str) -> str:
    """JSON text of :func:`metrics_from_stats` (what the aggregate's final function returns)."""
    return json.dumps(metrics_from_stats(data, parse_config(config_text)))


def parse_config(text: Any) -> dict[str, Any]:
    """The kernel config from its JSON text (an object), or a :class:`ConfigError`."""
    if not isinstance(text, str):
        raise ConfigError(f"the kernel config must be JSON text, got {type(text).__name__}")
    try:
        config = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ConfigError(f"the kernel config is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise ConfigError("the kernel config must be a JSON object")
    return config
