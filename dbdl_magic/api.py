"""The Python API: connect, install, train, load_model, list_models, predict."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from sqlalchemy import create_engine
from sqlalchemy.engine import Engine

from . import store
from .backends import Backend, backend_for
from .errors import InputError
from .model import DBModel, model_from_stored
from .options import TrainOptions
from .runs import Callbacks, TrainingRun, generated_name

DEFAULT_DATABASE = "dbdl.db"


@dataclass
class Database:
    """A connection target: SQLAlchemy engine + the backend for its dialect."""

    engine: Engine
    backend: Backend
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        """The URL with the password hidden."""
        return self.backend.describe()

    def __repr__(self) -> str:
        return f"<dbdl Database {self.url} ({self.backend.name})>"


def default_url() -> str:
    """The embedded default: a SQLite file in the working directory (``$DBDL_DATABASE``)."""
    return os.environ.get("DBDL_DATABASE") or f"sqlite:///{DEFAULT_DATABASE}"


def connect(target: str | Engine | Database | None = None, *, check: bool = True) -> Database:
    """Connect to a database by SQLAlchemy URL or Engine; ``None`` is the embedded SQLite file.

    With ``check`` (the default) the installed kernel version is verified and the server is
    asked to import torch; failures raise :class:`InstallError` saying what to do.
    """
    if isinstance(target, Database):
        if check and not target.info:  # connected earlier without a successful check
            target.info = target.backend.check()
        return target
    engine = target if isinstance(target, Engine) else create_engine(target or default_url())
    db = Database(engine, backend_for(engine))
    if check:
        db.info = db.backend.check()
    return db


def install(target: str | Engine | Database | None = None) -> Database:
    """Install (or upgrade) the kernels and model tables; idempotent. Needs a superuser on PG."""
    db = connect(target, check=False)
    db.backend.install()
    db.info = db.backend.check()
    return db


def train(
    con: str | Engine | Database | None,
    query: str,
    *,
    target: str,
    name: str | None = None,
    callbacks: Callbacks | None = None,
    **options: Any,
) -> DBModel:
    """Train a model on the rows of ``query`` inside the database; returns the torch module.

    Options (see :class:`~dbdl_magic.options.TrainOptions`): ``model`` ("mlp:64,32", a JSON
    spec or an ``nn.Sequential``), ``epochs``, ``lr``, ``batch_size``, ``optimizer``
    (sgd/adam/adamw), ``momentum``, ``nesterov``, ``weight_decay``, ``validation`` (fraction)
    or ``validation_query``, ``task``, ``features``, ``impute``, ``image_shape``, ``seed``,
    ``device`` (where the returned module lives), ``db_device`` (where the kernels run),
    ``parallel`` (PostgreSQL segments), ``threads``, ``params`` (values bound to ``:name``
    placeholders in the query), ``rows_per_buffer``, ``max_categories``.
    """
    db = connect(con)
    opts = TrainOptions.from_kwargs(target=target, **options)
    run = TrainingRun(
        db.backend, query, opts, name or generated_name(), callbacks or Callbacks(),
        server=db.info,
    )
    return run.execute()


def load_model(
    con: str | Engine | Database | None,
    name: str,
    version: int | None = None,
    device: str = "auto",
) -> DBModel:
    """Load a stored model (latest version by default) as a torch module."""
    db = connect(con, check=False)
    with db.engine.connect() as conn:
        row = store.read_model(conn, db.backend, name, version)
    if row["state"] is None:
        raise InputError(f"model {name!r} version {row['version']} has no checkpoint yet")
    return model_from_stored(row, device)


def list_models(con: str | Engine | Database | None = None) -> pd.DataFrame:
    """What the database stores: one row per model version."""
    db = connect(con, check=False)
    with db.engine.connect() as conn:
        return store.list_models(conn, db.backend)


def predict(
    con: str | Engine | Database | None,
    name: str,
    query: str,
    *,
    into: str | None = None,
    proba: bool = False,
    version: int | None = None,
    keys: list[str] | None = None,
    params: dict[str, Any] | None = None,
    replace: bool = False,
) -> pd.DataFrame | int:
    """Score the rows of ``query`` with stored model ``name``, inside the database.

    Writes the query's key columns (default: every column that is not a feature) plus
    ``prediction`` (and ``proba_<class>`` with ``proba``) to table ``into`` and returns the row
    count, or returns them as a DataFrame when ``into`` is None. Missing or mistyped feature
    columns raise :class:`InputError` naming them.
    """
    from .predicting import predict as run_prediction

    db = connect(con, check=False)
    return run_prediction(db.backend, name, query, into=into, proba=proba, version=version,
                          keys=keys, params=params, replace=replace)


def serving_copy(
    con: str | Engine | Database | None,
    name: str,
    validation_query: str,
    *,
    budget: float = 0.01,
    version: int | None = None,
    into: str | None = None,
    max_distance: float = 0.5,
    params: dict[str, Any] | None = None,
) -> tuple[DBModel, pd.DataFrame]:
    """Approximate dedup (opt-in): a serving copy of ``name`` whose weight blocks are replaced
    by similar stored blocks while accuracy on ``validation_query`` drops by at most ``budget``.

    Returns the serving model (stored as ``into`` or ``<name>_serving``) and the log of
    replacements. The canonical model is not changed.
    """
    from .approx import serving_copy as build

    db = connect(con, check=False)
    key, log = build(db.backend, name, validation_query, version=version, budget=budget,
                     max_distance=max_distance, into=into, params=params)
    return load_model(db, key["name"], key["version"]), log


def delete_model(con: str | Engine | Database | None, name: str, version: int | None = None) -> int:
    """Delete a model (all versions, or one) and garbage-collect its unshared weight blocks.

    Returns the number of blocks deleted.
    """
    db = connect(con, check=False)
    with db.engine.begin() as conn:
        return store.delete_model(conn, db.backend, name, version)


def predict_in_database(
    con: str | Engine | Database | None,
    name: str,
    frame: pd.DataFrame,
    version: int | None = None,
) -> np.ndarray:
    """Score ``frame`` with the database's predict kernel (probabilities or values).

    The frame is encoded client side with the model's stored encoding; the stored weights never
    leave the database. (Full in-database prediction from a query is a later feature.)
    """
    db = connect(con, check=False)
    model = load_model(db, name, version, device="cpu")
    x = model.encoding.encode_frame(frame)
    order = db.backend.byteorder
    payload = x.astype(f"{order}f4").tobytes()
    config = {
        "spec": model.spec,
        "input_shape": model.encoding.input_shape,
        "n_outputs": model.encoding.target.n_outputs,
        "task": model.task,
        "byteorder": order,
        "target_scale": [model.encoding.target.mean, model.encoding.target.std],
    }
    key = {"name": model.name, "version": model.version, "iteration": model.info["iteration"]}
    with db.engine.begin() as conn:
        store.ensure_hot_state(conn, db.backend, key, key["iteration"])
        out = db.backend.predict_buffer(conn, payload, key, config)
    return np.frombuffer(out, dtype="<f4").reshape(len(frame), -1)
