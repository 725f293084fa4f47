"""``df.dl``: the in-database engine for a pandas DataFrame.

``df.dl.fit(target=..., model=..., epochs=...)`` writes the frame to a uniquely named work table
in the connected database (an in-memory SQLite one by default), trains there, and always drops
the table. Stateless: pandas may build a new accessor for every attribute access.
"""

from __future__ import annotations

import uuid
from typing import Any

import numpy as np
import pandas as pd
import torch

from . import api
from .kernel.evaluate import metrics_from_stats, stats_to_bytes


@pd.api.extensions.register_dataframe_accessor("dl")
class DLAccessor:
    """Train, predict and evaluate with dbdl_magic on a DataFrame."""

    def __init__(self, frame: pd.DataFrame) -> None:
        if frame.columns.nlevels != 1:
            raise AttributeError("df.dl needs flat column names (this frame has a MultiIndex)")
        if frame.columns.duplicated().any():
            dup = ", ".join(map(repr, frame.columns[frame.columns.duplicated()].unique()))
            raise AttributeError(f"df.dl needs unique column names; duplicated: {dup}")
        if len(frame.columns) == 0:
            raise AttributeError("df.dl needs a frame with columns")
        self._frame = frame

    def fit(
        self,
        target: str,
        model: Any = "mlp:64,32",
        epochs: int = 10,
        con: Any = None,
        *,
        name: str | None = None,
        display: str = "auto",
        **options: Any,
    ) -> Any:
        """Train on this frame inside the database ``con`` (default: in-memory SQLite).

        Returns the trained module (a :class:`~dbdl_magic.model.DBModel`).
        """
        from .monitor import make_monitor

        frame = self._frame
        if target not in frame.columns:
            raise KeyError(
                f"target column {target!r} is not in the frame's columns "
                f"({', '.join(map(str, frame.columns))})"
            )
        db = api.connect(con if con is not None else "sqlite://")
        table = f"dbdl_frame_{uuid.uuid4().hex[:12]}"
        quoted = db.backend.q(table)
        monitor = None if display == "none" else make_monitor(display)
        frame.rename(columns=str).to_sql(table, db.engine, index=False, chunksize=10_000)
        try:
            trained = api.train(
                db,
                f"SELECT * FROM {quoted}",
                target=target,
                model=model,
                epochs=epochs,
                name=name,
                callbacks=monitor.callbacks() if monitor else None,
                **options,
            )
        except BaseException as exc:
            if monitor is not None:
                monitor.fail(exc)
            raise
        finally:
            with db.engine.begin() as conn:
                db.backend.drop_table(conn, quoted)
        if monitor is not None:
            monitor.finish(trained)
        return trained

    def predict(
        self, model: Any, proba: bool = False, fallback: Any = None
    ) -> pd.Series | pd.DataFrame:
        """Predictions aligned with ``df.index`` (``proba=True``: one column per class).

        A per-group model (:class:`~dbdl_magic.model.GroupedModel`) routes every row by its
        ``group_by`` column; ``fallback`` (a module) scores rows of groups it has no model for.
        """
        extra = {"fallback": fallback} if fallback is not None else {}
        if proba:
            return pd.DataFrame(
                model.predict_proba(self._frame, **extra),
                index=self._frame.index,
                columns=model.classes_,
            )
        return pd.Series(
            model.predict(self._frame, **extra),
            index=self._frame.index,
            name=model.encoding.target.name,
        )

    def evaluate(self, model: Any) -> dict[str, Any]:
        """Loss and metrics of ``model`` on this frame (which must hold the target column)."""
        enc = model.encoding
        if enc.target.name not in self._frame.columns:
            raise KeyError(f"the frame lacks the target column {enc.target.name!r}")
        outputs = model._outputs(self._frame)
        truth = self._frame[enc.target.name]
        config = {"task": model.task, "n_outputs": enc.target.n_outputs}
        if model.task == "classification":
            lookup = {c: i for i, c in enumerate(enc.target.classes)}
            y = np.array([lookup.get(v, -1) for v in truth.tolist()])
            if (y < 0).any():
                raise ValueError("the frame has target labels the model never saw")
            loss = torch.nn.functional.cross_entropy(outputs, torch.from_numpy(y)).item()
            k = enc.target.n_outputs
            pred = outputs.argmax(1).numpy()
            extra = np.bincount(y * k + pred, minlength=k * k).astype(np.float64)
        else:
            values = truth.to_numpy(dtype=np.float64)
            pred = outputs[:, 0].numpy().astype(np.float64) * enc.target.std + enc.target.mean
            scaled = (values - enc.target.mean) / enc.target.std
            loss = float(np.mean((outputs[:, 0].numpy() - scaled) ** 2))
            err = pred - values
            extra = np.array([err @ err, np.abs(err).sum(), values.sum(), values @ values])
        stats = np.concatenate([[len(truth), loss * len(truth)], extra])
        return metrics_from_stats(stats_to_bytes(stats), config)
