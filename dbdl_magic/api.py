"""The Python API: connect, install, train, load_model, list_models, predict."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from sqlalchemy import create_engine, make_url
from sqlalchemy.engine import Engine

from dbdl_magic.backends import Backend, backend_for
from dbdl_magic.errors import InputError, InstallError
from dbdl_magic.events import Callbacks
from dbdl_magic.options import TrainOptions
from dbdl_magic.store import registry
from dbdl_magic.store.modules import DBModel, GroupedModel, group_keys, is_router, load_stored
from dbdl_magic.training.run import TrainingRun, generated_name

DEFAULT_DATABASE = "dbdl.db"


class InstallWarning(UserWarning):
    """:func:`connect` reached a database whose kernels are missing or unusable; the message
    (also on ``Database.missing``) says what and how to fix it."""


@dataclass
class Database:
    """A connection target: SQLAlchemy engine + the backend for its dialect.

    ``info`` holds the server kernel's facts once the kernels were checked; ``missing`` says
    what they lack (and the fix) when the last check failed.
    """

    engine: Engine
    backend: Backend
    info: dict[str, Any] = field(default_factory=dict)
    problem: InstallError | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        """The URL with the password hidden."""
        return self.backend.describe()

    @property
    def missing(self) -> str | None:
        """What the kernels lack and the fix (None when they passed, or were not checked)."""
        return None if self.problem is None else str(self.problem)

    def require(self) -> Database:
        """Check the kernels (unless a check passed already) and return this database.

        Raises :class:`InstallError` saying what is missing and what to do, and records it on
        ``missing``; training and predicting call this first.
        """
        if not self.info:
            try:
                self.info = self.backend.check()
            except InstallError as exc:
                self.problem = exc
                raise
            self.problem = None
        return self

    def __repr__(self) -> str:
        state = "" if self.problem is None else ", kernels missing: see .missing"
        return f"<dbdl Database {self.url} ({self.backend.name}{state})>"


def default_url() -> str:
    """The embedded default: a SQLite file in the working directory (``$DBDL_DATABASE``)."""
    return os.environ.get("DBDL_DATABASE") or f"sqlite:///{DEFAULT_DATABASE}"


def _engine(url: str) -> Engine:
    """An engine for ``url``. PostgreSQL pools hand out the most recently used connection
    (LIFO): the server process behind it has torch imported and the kernels' caches warm,
    where the default FIFO rotation made every pooled backend pay the ≈ 1 s import in turn."""
    if make_url(url).get_backend_name() == "postgresql":
        return create_engine(url, pool_use_lifo=True)
    return create_engine(url)


def connect(target: str | Engine | Database | None = None, *, check: bool = True) -> Database:
    """Connect to a database by SQLAlchemy URL or Engine; ``None`` is ``$DBDL_DATABASE`` or the
    embedded SQLite file ``./dbdl.db``.

    With ``check`` (the default) the kernels are verified: the installed version, and that the
    database server's python3 imports every module they use. When that fails the connection is
    still returned, so that ``install(con)`` can follow: ``con.missing`` says what is missing
    and the fix, an :class:`InstallWarning` repeats it, and training or predicting on ``con``
    raises :class:`InstallError` with the same message (``con.require()`` raises it at once).
    ``check=False`` defers the verification to the first training or prediction. A server
    that cannot be reached raises the driver's error either way.
    """
    if isinstance(target, Database):
        db = target
    else:
        engine = target if isinstance(target, Engine) else _engine(target or default_url())
        db = Database(engine, backend_for(engine))
    if check and not db.info:
        try:
            db.require()
        except InstallError as exc:
            warnings.warn(str(exc), InstallWarning, stacklevel=2)
    return db


def install(target: str | Engine | Database | None = None) -> Database:
    """Install (or upgrade) the kernels and model tables, then check them; idempotent.

    Needs a superuser on PostgreSQL. Returns the connected :class:`Database` (``target``
    itself when it is one), ready to train.
    """
    db = connect(target, check=False)
    db.backend.install()
    db.info = {}
    return db.require()


def train(
    con: str | Engine | Database | None,
    query: str,
    *,
    target: str,
    name: str | None = None,
    callbacks: Callbacks | None = None,
    **options: Any,
) -> DBModel | GroupedModel:
    """Train a model on the rows of ``query`` inside the database; returns the torch module.

    ``name`` names the stored model (default: a generated name); ``callbacks`` receive the
    run's events. Bad option values raise :class:`~dbdl_magic.errors.InputError` naming the
    option. The options, generated from :class:`~dbdl_magic.options.TrainOptions` by
    ``python -m dbdl_magic.options --docstring`` (tests/unit/test_options.py checks this list):

    - ``target``: the label column to predict
    - ``model="mlp:64,32"``: `linear`, `mlp:64,32` (add `dropout=0.2`, `bn`, `ln`, `act=gelu`),
      `cnn:16,32` for an image column, a JSON spec `{"layers": [...]}`, or an `nn.Sequential` of
      supported layers (Linear, Conv1d/2d, BatchNorm1d/2d, LayerNorm,
      ReLU/GELU/ELU/SiLU/LeakyReLU/Tanh/Sigmoid/Softplus, Dropout, Flatten, Max/Avg/AdaptiveAvg
      pooling); only the JSON spec reaches the database, never pickled code; a `grid` may search
      it
    - ``epochs=10``: iterations: passes over the training rows
    - ``lr=0.001``: learning rate; a `grid` may search it
    - ``batch_size=64``: rows per minibatch; a `grid` may search it
    - ``optimizer="adam"``: the optimizer; a `grid` may search it
    - ``momentum=0.0``: momentum (sgd); a `grid` may search it
    - ``nesterov=False``: Nesterov momentum (sgd with momentum > 0)
    - ``weight_decay=None``: L2 penalty (None: the optimizer's own, 0.01 for adamw, else 0); a
      `grid` may search it
    - ``validation=0.2``: fraction of the rows held out for validation
    - ``validation_query=None``: a second query whose rows are the validation set, instead of a
      fraction (%%dbtrain: a variable holding it, or the SQL)
    - ``task="auto"``: `auto` (text/bool or small-integer targets are classification),
      `classification` or `regression`
    - ``features=None``: the feature columns (None: every column but the target and group_by;
      %%dbtrain: comma-separated)
    - ``impute=None``: `mean` or `zero` fills NULL numeric features (None: a NULL is an error
      naming the column)
    - ``max_categories=100``: most distinct values of a text feature (one-hot encoded)
    - ``image_shape=None``: e.g. (8, 8) or '8x8' for a SQLite float32 BLOB column (PostgreSQL
      2-D real[] arrays carry their shape)
    - ``rows_per_buffer=None``: rows packed per buffer (None: chosen from the data and the
      model)
    - ``seed=0``: seed of the shuffle, split, initial weights and dropout: the same seed gives
      the same model
    - ``device="auto"``: device of the returned module (`auto`: cuda when this machine has one)
    - ``db_device="auto"``: device of the kernels in the database (`auto`: a GPU when the
      database host's torch sees one)
    - ``parallel="auto"``: segments training side by side, N or `auto` (spread once a measured
      iteration says it pays): sessions held by the run on PostgreSQL, worker processes on
      SQLite
    - ``sync_every=None``: combine the segments' models every this fraction of an epoch (e.g.
      0.25: 4 times per epoch; None: 10 times for a model under 100k parameters on segments,
      else once)
    - ``averaging="outer"``: how segments' models become one at each sync: `mean`
      (sample-weighted average) or `outer` (the average's change as a pseudo-gradient of an
      outer Nesterov step)
    - ``outer_lr=1.0``: outer step size with averaging='outer' (1 with momentum 0 is the plain
      average)
    - ``outer_momentum=0.9``: outer Nesterov momentum with averaging='outer'
    - ``threads=None``: torch threads per database process (capped at the server's cores)
    - ``group_by=None``: one model per value of this column, trained in the same queries
    - ``grid=None``: model selection in one pass: {option: [values]} (random search: also (low,
      high)); %%dbtrain: a variable holding it, or a dict literal
    - ``search=None``: `grid` (every configuration, the default with a grid) or `random` (draws
      `trials` of them)
    - ``trials=None``: configurations to draw (random search; with a grid: a sample of it)
    - ``halving=True``: successive halving: the worse half of the configurations stops at each
      rung
    - ``params={}``: values bound to `:name` placeholders in the query, never pasted into SQL
      (%%dbtrain binds them from the notebook's variables)
    - ``patience=None``: early stopping: iterations without improvement of `monitor` before
      stopping
    - ``monitor="val_loss"``: the metric early stopping and model selection watch
    - ``min_delta=0.0``: the least change of `monitor` that counts as an improvement
    - ``restore_best=True``: after early stopping, the model is the best iteration's (not the
      last)
    - ``on_interrupt="raise"``: on Ctrl-C: `raise`, or `return` the last completed iteration's
      model (%%dbtrain always returns)
    - ``resume=False``: continue the interrupted run of this name (same query and options)
    - ``init_from=None``: warm start from a stored model: `name` or `name:version`
    - ``freeze=None``: with init_from: layer indices to freeze (e.g. [0, 2] or '0,2') or
      'all_but_last'
    - ``block_bytes=261120``: bytes per stored weight block (checkpoints share equal blocks)
    - ``deltas=True``: store a checkpoint's blocks as lossless deltas against the previous one
    """
    db = connect(con, check=False).require()
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
    *,
    group: Any = None,
) -> DBModel | GroupedModel:
    """Load a stored model (latest version by default) as a torch module.

    A model trained with ``group_by`` comes back as a
    :class:`~dbdl_magic.store.modules.GroupedModel` (one module per group, routed by the
    group column); ``group="DE"`` returns that group's own
    :class:`~dbdl_magic.store.modules.DBModel` instead.
    """
    db = connect(con, check=False)
    with db.engine.connect() as conn:
        if group is not None:
            row = registry.read_model(conn, db.backend, name, version, with_state=False)
            if not is_router(row):
                raise InputError(
                    f"model {name!r} version {row['version']} was not trained with group_by; "
                    "group= selects one group's model of a per-group model"
                )
            groups = {str(g): int(v) for g, v in row["options"]["groups"].items()}
            found = group_keys([group], groups)[0]
            if found is None:
                shown = ", ".join(map(repr, sorted(groups)[:10]))
                raise InputError(
                    f"model {name!r} version {row['version']} has no model for "
                    f"{row['options'].get('group_by')}={group!r} (groups: {shown}"
                    f"{', ...' if len(groups) > 10 else ''})"
                )
            version = groups[found]
        return load_stored(conn, db.backend, name, version, device)


def list_models(con: str | Engine | Database | None = None) -> pd.DataFrame:
    """What the database stores: one row per model version."""
    db = connect(con, check=False)
    with db.engine.connect() as conn:
        return registry.list_models(conn, db.backend)


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
    fallback: Any = None,
) -> pd.DataFrame | int:
    """Score the rows of ``query`` with stored model ``name``, inside the database.

    Writes the query's key columns (default: every column that is not a feature) plus
    ``prediction`` (and ``proba_<class>`` with ``proba``) to table ``into`` and returns the row
    count, or returns them as a DataFrame when ``into`` is None. Missing or mistyped feature
    columns raise :class:`InputError` naming them.

    ``into`` is any table name (``"p:q"``, ``'my "scores"'``; ``schema.table``, or a part in
    double quotes to keep a dot); the table appears only once every row is scored. A
    probability column is ``proba_<class>`` in the model's class order (``classes_``), cut to
    63 bytes and ending in ``~<index in classes_>`` when the name is longer or would clash
    (ignoring case) with a key column or another class's column; the returned DataFrame maps
    each to its class in ``frame.attrs["proba_columns"]``
    (:func:`dbdl_magic.serving.predicting.proba_columns`).

    A model trained with ``group_by`` scores each row with its group's model (the query must
    hold the group column; rows are matched by ``CAST(column AS TEXT)``, as in training).
    Rows of groups without a model raise :class:`InputError` unless ``fallback`` names a
    stored model (``"name"`` or ``"name:version"``, same features) that scores them.
    """
    from dbdl_magic.serving.predicting import predict as run_prediction

    db = connect(con, check=False).require()
    return run_prediction(db.backend, name, query, into=into, proba=proba, version=version,
                          keys=keys, params=params, replace=replace, fallback=fallback)


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
    from dbdl_magic.store.approx import serving_copy as build

    db = connect(con, check=False).require()
    key, log = build(db.backend, name, validation_query, version=version, budget=budget,
                     max_distance=max_distance, into=into, params=params)
    return load_model(db, key["name"], key["version"]), log


def delete_model(con: str | Engine | Database | None, name: str, version: int | None = None) -> int:
    """Delete a model (all versions, or one) and garbage-collect its unshared weight blocks.

    Returns the number of blocks deleted.
    """
    db = connect(con, check=False)
    with db.engine.begin() as conn:
        return registry.delete_model(conn, db.backend, name, version)


def predict_in_database(
    con: str | Engine | Database | None,
    name: str,
    frame: pd.DataFrame,
    version: int | None = None,
) -> np.ndarray:
    """Score ``frame`` with the database's predict kernel (probabilities or values).

    The frame is encoded client side with the model's stored encoding; the stored weights never
    leave the database. A per-group model scores each row with its group's checkpoint (the
    frame must hold the group column). (To score a query's rows, see :func:`predict`.)
    """
    db = connect(con, check=False).require()
    model = load_model(db, name, version, device="cpu")
    if isinstance(model, GroupedModel):
        parts = model._split(frame, None)
        pieces = [predict_in_database(db, m.name, frame.iloc[pos], m.version) for m, pos in parts]
        if not pieces:
            return np.zeros((0, model.encoding.target.n_outputs), dtype=np.float32)
        out = np.empty((len(frame), pieces[0].shape[1]), dtype=pieces[0].dtype)
        for (_, pos), piece in zip(parts, pieces, strict=True):
            out[pos] = piece
        return out
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
        registry.ensure_hot_state(conn, db.backend, key, key["iteration"])
        out = db.backend.predict_buffer(conn, payload, key, config)
    return np.frombuffer(out, dtype="<f4").reshape(len(frame), -1)
