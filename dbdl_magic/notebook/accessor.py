"""``df.dl``: the in-database engine for a pandas DataFrame.

``df.dl.fit(target=..., model=..., epochs=...)`` writes the frame to a uniquely named work table
in the connected database (an in-memory SQLite one by default), trains there, and always drops
the table. Stateless: pandas may build a new accessor for every attribute access.
"""

from __future__ import annotations

import uuid
from typing import Any

import pandas as pd

from dbdl_magic import api


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

        Returns the trained module (a :class:`~dbdl_magic.store.modules.DBModel`).
        """
        from dbdl_magic.notebook.widgets import make_monitor

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

        A per-group model (:class:`~dbdl_magic.store.modules.GroupedModel`) routes every row by its
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
        return model.evaluate(self._frame)
