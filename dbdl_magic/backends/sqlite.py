"""SQLite backend: kernels registered as Python aggregates on every connection.

The training aggregate keeps the live torch model in the aggregate object between buffers, so
the state is decoded once per iteration and serialised once, in ``finalize``.
"""

from __future__ import annotations

import json
import math
import re
import sqlite3
import threading
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlalchemy import event, text
from sqlalchemy.engine import Connection, Engine

from dbdl_magic.backends.base import Backend, ColumnKind, ProgressSink, Scoring
from dbdl_magic.errors import DbdlError, InputError, TrainingError
from dbdl_magic.kernel import KERNEL_VERSION
from dbdl_magic.kernel.averaging import outer_step
from dbdl_magic.kernel.blockstore import Run
from dbdl_magic.kernel.catalog import SQLITE, checkpoint_sql, sqlite_schema
from dbdl_magic.kernel.evaluate import Evaluator, metrics_json, stats_from_bytes, stats_to_bytes
from dbdl_magic.kernel.plpython import kernel_info
from dbdl_magic.kernel.predict import encode_raw, predict_buffer
from dbdl_magic.kernel.rowpredict import RowPredictor
from dbdl_magic.kernel.state import combine_states, state_info
from dbdl_magic.kernel.train import Trainer, mix_seed

if TYPE_CHECKING:
    from dbdl_magic.backends.segments import Segments

PAGE_SIZE = 65536
# SQLite lets one session write at a time, and an iteration's statement holds the write lock
# for its whole epoch: a concurrent session (another run, a listing that records an
# interrupted run) waits this long for it instead of sqlite3's default 5 s
BUSY_TIMEOUT_MS = 60_000
# SQLite calls a function with at most 127 arguments (SQLITE_MAX_FUNCTION_ARG) and returns at
# most 2000 columns (SQLITE_MAX_COLUMN): a row of more encoded pieces is packed as chunks
MAX_PIECES = 100
_DOLLAR = re.compile(r"\$(\d+)")
# one part of a dotted table name: "quoted" (with "" inside) or bare
_NAME_PART = re.compile(r'"((?:[^"]|"")*)"|([^."]+)')

# run id -> progress report(member, samples), set by the backend around an iteration
_PROGRESS: dict[str, Callable[[int, int], None]] = {}
# the last exception raised inside a kernel, per thread (sqlite3 only reports "step raised")
_ERRORS = threading.local()


def _kernel(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Remember the traceback of a failing kernel so the backend can report it."""

    def wrapped(*args: Any) -> Any:
        try:
            return fn(*args)
        except BaseException as exc:  # KeyboardInterrupt too: sqlite3 would swallow it
            _ERRORS.last = (exc, traceback.format_exc())
            raise

    return wrapped


def _kernel_error(context: Any) -> BaseException | None:
    """SQLAlchemy ``handle_error`` hook: a kernel that failed inside a statement of the user's
    own SQL (``SELECT dbdl_predict(...)``) surfaces with its own message; sqlite3 alone says
    only "user-defined function raised exception". A :class:`DbdlError` (an unknown model, a
    row without its group column, ...) is raised as itself, anything else as a
    :class:`DbdlError` naming it. Statements the backend runs itself are left to
    :meth:`SQLiteBackend._run`."""
    last = getattr(_ERRORS, "last", None)
    if last is None or getattr(_ERRORS, "managed", False) or isinstance(last[0], KeyboardInterrupt):
        return None
    _ERRORS.last = None
    inner, tb = last
    if isinstance(inner, DbdlError):
        return inner
    return DbdlError(f"a dbdl kernel failed inside SQLite: {type(inner).__name__}: {inner}",
                     detail=tb)


class _TrainAggregate:
    def __init__(self) -> None:
        self.trainer: Trainer | None = None

    @_kernel
    def step(self, x: bytes, y: bytes, buffer_id: int, model: bytes, config_text: str) -> None:
        if self.trainer is None:
            self.trainer = Trainer(json.loads(config_text), model, fresh=True)
        trainer = self.trainer
        sink = _PROGRESS.get(trainer.config.get("run", ""))
        base, member = trainer.samples, int(trainer.config.get("member", 0))
        progress = (lambda done: sink(member, base + done)) if sink else None
        trainer.train_buffer(
            x, y, int(buffer_id), progress, float(trainer.config.get("progress_every", 0.5))
        )

    @_kernel
    def finalize(self) -> bytes | None:
        return self.trainer.to_bytes() if self.trainer is not None else None


class _MergeAggregate:
    """``dbdl_merge(state)``: the combine kernel as an aggregate over partial states."""

    def __init__(self) -> None:
        self.state: bytes | None = None

    @_kernel
    def step(self, state: bytes | None) -> None:
        self.state = combine_states(self.state, state)

    @_kernel
    def finalize(self) -> bytes | None:
        return self.state


class _EvalAggregate:
    def __init__(self) -> None:
        self.evaluator: Evaluator | None = None
        self.acc: np.ndarray | None = None

    @_kernel
    def step(self, x: bytes, y: bytes, model: bytes, config_text: str) -> None:
        if self.evaluator is None:
            self.evaluator = Evaluator(json.loads(config_text), model)
        self.acc = self.evaluator.score_buffer(x, y, self.acc)

    @_kernel
    def finalize(self) -> bytes | None:
        return None if self.acc is None else stats_to_bytes(self.acc)


class _PackAggregate:
    """Concatenate rows of encoded pieces (floats, or float32 bytes) into one float32 buffer."""

    def __init__(self) -> None:
        self.rows: list[tuple[Any, ...]] = []

    @_kernel
    def step(self, *pieces: Any) -> None:
        self.rows.append(pieces)

    @_kernel
    def finalize(self) -> bytes:
        if not self.rows:
            return b""
        if not any(isinstance(p, bytes) for p in self.rows[0]):
            return np.asarray(self.rows, dtype="<f4").tobytes()
        return b"".join(_row_bytes(row) for row in self.rows)


def _row_bytes(pieces: tuple[Any, ...]) -> bytes:
    """A row's encoded pieces as little-endian float32 bytes: bytes pieces (arrays, chunks)
    as they are, each run of numbers converted at once."""
    out: list[bytes] = []
    start = 0
    for i, piece in enumerate(pieces):
        if isinstance(piece, bytes):
            if start < i:
                out.append(np.asarray(pieces[start:i], dtype="<f4").tobytes())
            out.append(piece)
            start = i + 1
    if start < len(pieces):
        out.append(np.asarray(pieces[start:], dtype="<f4").tobytes())
    return b"".join(out)


@_kernel
def _row_chunk(*pieces: Any) -> bytes:
    """``dbdl_row(p, ...)``: up to :data:`MAX_PIECES` encoded pieces of a row as float32 bytes,
    so a row wider than SQLite's argument limit reaches ``dbdl_pack`` as a few chunks."""
    return _row_bytes(pieces)


class _PackTargets:
    def __init__(self) -> None:
        self.values: list[Any] = []
        self.is_int = True

    @_kernel
    def step(self, value: Any, is_int: int) -> None:
        self.values.append(value)
        self.is_int = bool(is_int)

    @_kernel
    def finalize(self) -> bytes:
        return np.asarray(self.values, dtype="<i4" if self.is_int else "<f4").tobytes()


class _BlobStats:
    def __init__(self) -> None:
        self.min_len: int | None = None
        self.max_len = 0
        self.n = 0
        self.total = 0.0
        self.total_sq = 0.0
        self.bad_blobs = 0  # not a whole number of float32 values: reported as bad input
        self.nonfinite = 0
        self.sizes: dict[int, int] = {}  # values per blob → rows

    @_kernel
    def step(self, blob: Any) -> None:
        if blob is None:
            return
        if not isinstance(blob, bytes) or len(blob) % 4:
            self.bad_blobs += 1
            return
        values = np.frombuffer(blob, dtype="<f4").astype(np.float64)
        self.sizes[values.size] = self.sizes.get(values.size, 0) + 1
        self.min_len = values.size if self.min_len is None else min(self.min_len, values.size)
        self.max_len = max(self.max_len, values.size)
        finite = np.isfinite(values)
        if not finite.all():
            self.nonfinite += int(values.size - finite.sum())
            values = values[finite]
        self.n += values.size
        self.total += float(values.sum())
        self.total_sq += float(values @ values)

    @_kernel
    def finalize(self) -> str:
        mean = self.total / self.n if self.n else 0.0
        var = max(self.total_sq / self.n - mean * mean, 0.0) if self.n else 0.0
        stats = {
            "min_len": self.min_len,
            "max_len": self.max_len,
            "mean": mean,
            "std": math.sqrt(var),
            "dims": None,
            "bad_blobs": self.bad_blobs,
            "nonfinite": self.nonfinite,
        }
        if len(self.sizes) > 1:  # blobs of different lengths: the most common, for the message
            common = sorted(self.sizes.items(), key=lambda kv: (-kv[1], kv[0]))[:5]
            stats["shapes"] = [{"shape": [size], "rows": rows} for size, rows in common]
            stats["n_shapes"] = len(self.sizes)
        return json.dumps(stats)


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


@_kernel
def _scale_blob(blob: bytes, mean: float, std: float, width: int) -> bytes:
    values = np.frombuffer(blob, dtype="<f4")
    if values.size != width:
        raise ValueError(f"array blob has {values.size} values, expected {width}")
    return ((values.astype(np.float64) - mean) / std).astype("<f4").tobytes()


_EVALUATORS: dict[tuple[bytes, str], Evaluator] = {}


@_kernel
def _predict_buffer(x: bytes, model: bytes, config_text: str) -> bytes:
    key = (model, config_text)
    evaluator = _EVALUATORS.get(key)
    if evaluator is None:
        _EVALUATORS.clear()
        evaluator = _EVALUATORS[key] = Evaluator(json.loads(config_text), model)
    return predict_buffer(evaluator, x).astype("<f4").tobytes()


def register_kernels(dbapi_connection: sqlite3.Connection) -> None:
    """Register every dbdl kernel on one sqlite3 connection."""
    c = dbapi_connection
    c.create_aggregate("dbdl_train", 5, _TrainAggregate)
    c.create_aggregate("dbdl_merge", 1, _MergeAggregate)
    c.create_function(
        "dbdl_outer_step", 3, _kernel(lambda s, a, cfg: outer_step(s, a, json.loads(cfg)))
    )
    c.create_aggregate("dbdl_evaluate", 4, _EvalAggregate)
    c.create_aggregate("dbdl_pack", -1, _PackAggregate)
    c.create_function("dbdl_row", -1, _row_chunk, deterministic=True)
    c.create_aggregate("dbdl_pack_y", 2, _PackTargets)
    c.create_aggregate("dbdl_blob_stats", 1, _BlobStats)
    c.create_function("dbdl_metrics", 2, _kernel(metrics_json))
    c.create_function("dbdl_state_info", 1, _kernel(lambda s: json.dumps(state_info(s))))
    c.create_function("dbdl_mix", 2, lambda a, b: mix_seed(a, b) >> 1, deterministic=True)
    c.create_function("dbdl_scale_blob", 4, _scale_blob, deterministic=True)
    c.create_function("dbdl_predict_buffer", 3, _predict_buffer)
    _register_row_predict(c)
    c.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    c.execute(f"PRAGMA page_size = {PAGE_SIZE}")  # effective for new database files


def _register_row_predict(c: sqlite3.Connection) -> None:
    """``dbdl_predict(model, json_object(...))`` and friends, reading models through ``c``.

    ``json_object`` takes at most 127 arguments (63 columns): a wider row is passed as several
    objects, ``dbdl_predict(model, json_object(<first 63>), json_object(<next>), ...)``, merged
    in order.
    """

    def run(sql: str, params: Any) -> list[tuple[Any, ...]]:
        return c.execute(_DOLLAR.sub(r"?\1", sql), tuple(params)).fetchall()

    def stamp() -> tuple[int, int]:
        """Changes when the model tables may have: this connection's change count, and the
        file's data version (which moves when another connection commits)."""
        return c.total_changes, c.execute("PRAGMA data_version").fetchone()[0]

    predictor = RowPredictor(run, SQLITE, stamp)

    def make(mode: str) -> Callable[..., Any]:
        @_kernel
        def row(model: str, *features: str) -> Any:
            label, value, proba = predictor.outputs(model, _merged_row(features))
            if mode == "label":
                return _plain(label)
            return value if mode == "value" else json.dumps(proba)

        return row

    for mode, name in (
        ("label", "dbdl_predict"),
        ("value", "dbdl_predict_value"),
        ("proba", "dbdl_predict_proba"),
    ):
        c.create_function(name, -1, make(mode))


def _merged_row(parts: tuple[str, ...]) -> Any:
    """One row's features: one JSON value as it is (an object, or an array in feature order),
    or several JSON objects merged (later keys win)."""
    if not parts:
        raise DbdlError("pass the row's features: dbdl_predict(model, json_object(...))")
    if len(parts) == 1:
        return json.loads(parts[0])
    merged: dict[str, Any] = {}
    for part in parts:
        values = json.loads(part) if part is not None else None
        if not isinstance(values, dict):
            raise DbdlError(
                f"dbdl_predict takes JSON objects of features after the model name, got {part!r}"
            )
        merged.update(values)
    return merged


class BadValues(DbdlError):
    """Fetched feature values that are not what the model takes (text in a numeric column, a
    NULL without impute, a blob of another size): the caller checks the query and says which."""


def _raw_values(
    batch: list[Any], features: list[dict[str, Any]], n_scalars: int, n_values: int
) -> tuple[np.ndarray, None]:
    """Rows ``(scalar features..., array blobs..., keys...)`` as the kernel's raw matrix
    (features in model order; numeric NULLs imputed, or refused)."""
    n = len(batch)
    try:
        try:  # no blobs and numeric keys (the common case): the whole rows at once
            if n_values > n_scalars:
                raise TypeError("blobs")
            scalars = np.array(batch, dtype=np.float64)[:, :n_scalars]
        except (TypeError, ValueError):
            scalars = np.array([r[:n_scalars] for r in batch], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise BadValues(f"a feature column holds a value that is not a number: {exc}") from exc
    out = np.empty((n, sum(f["width"] if f["kind"] == "array" else 1 for f in features)))
    at = s = b = 0
    for f in features:
        if f["kind"] == "array":
            blobs = [r[n_scalars + b] for r in batch]
            width = int(f["width"])
            if not all(isinstance(v, bytes) and len(v) == 4 * width for v in blobs):
                raise BadValues(f"array column {f['name']!r} holds NULL or arrays of another size")
            out[:, at : at + width] = np.frombuffer(b"".join(blobs), "<f4").reshape(n, width)
            at, b = at + width, b + 1
            continue
        column = scalars[:, s]
        missing = np.isnan(column)  # SQLite stores no NaN: a NULL
        if missing.any():
            if f.get("impute") is None:
                raise BadValues(f"column {f['name']!r} has NULL values")
            column = np.where(missing, float(f["impute"]), column)
        out[:, at] = column
        at, s = at + 1, s + 1
    return out, None


def storage_kind(lo: str | None, hi: str | None) -> ColumnKind | None:
    """A column's kind from the smallest and largest storage class among its values ('blob' <
    'integer' < 'real' < 'text'; None: NULLs only). None for text only: categories, unless the
    text is JSON (:meth:`SQLiteBackend.holds_json` tells)."""
    if lo is None or (lo in ("integer", "real") and hi in ("integer", "real")):
        return ColumnKind("numeric", "REAL" if hi == "real" else "INTEGER", is_float=hi == "real")
    if lo == hi == "text":
        return None
    if lo == hi == "blob":
        return ColumnKind("array", "BLOB (float32)")
    if hi == "text":
        return ColumnKind("unsupported", "mixed text and numbers")
    return ColumnKind("unsupported", "mixed blobs and numbers")


class SQLiteBackend(Backend):
    """Embedded SQLite: the zero-set-up default."""

    name = "sqlite"
    byteorder = "<"
    packs_in_process = True

    def __init__(self, engine: Engine) -> None:
        super().__init__(engine)
        if not getattr(engine, "_dbdl_kernels", False):
            event.listen(engine, "connect", lambda conn, _record: register_kernels(conn))
            event.listen(engine, "handle_error", _kernel_error)
            engine._dbdl_kernels = True  # type: ignore[attr-defined]
            engine.dispose()  # pooled connections made before this have no kernels

    def table(self, name: str) -> str:
        return self.q(f"dbdl_{name}")

    def install(self) -> None:
        tables = self.store_tables()
        with self.engine.begin() as conn:
            for statement in sqlite_schema(tables):
                conn.execute(text(statement))
            conn.execute(
                text(f"INSERT OR REPLACE INTO {tables.meta} (key, value) VALUES ('version', :v)"),
                {"v": KERNEL_VERSION},
            )

    def check(self) -> dict[str, Any]:
        self.install()  # embedded: the kernels live in this process, tables are cheap
        return json.loads(kernel_info())

    # -- packing --------------------------------------------------------------------------------
    def column_kinds(self, conn: Connection, table: str) -> dict[str, ColumnKind]:
        raw_name = table.strip('"').replace('""', '"')
        names = [
            r[0]
            for r in conn.execute(
                text("SELECT name FROM pragma_table_info(:t) ORDER BY cid"), {"t": raw_name}
            )
        ]
        # One scan: the smallest and largest storage class per column ('blob' < 'integer' <
        # 'real' < 'text'); two aggregates per column keep it fast on millions of rows.
        parts = [
            f"min(NULLIF(typeof({self.q(c)}), 'null')), max(NULLIF(typeof({self.q(c)}), 'null'))"
            for c in names
        ]
        row: list[Any] = []
        for start in range(0, len(parts), MAX_PIECES * 5):  # ≤ 1000 result columns per scan
            chunk = ", ".join(parts[start : start + MAX_PIECES * 5])
            row += conn.execute(text(f"SELECT {chunk} FROM {table}")).one()
        kinds: dict[str, ColumnKind] = {}
        for i, c in enumerate(names):
            kind = storage_kind(row[2 * i], row[2 * i + 1])
            if kind is None:
                kind = (
                    ColumnKind("unsupported", "JSON text")
                    if self.holds_json(conn, table, c)
                    else ColumnKind("categorical", "TEXT")
                )
            kinds[c] = kind
        return kinds

    def holds_json(self, conn: Connection, table: str, column: str, sample: int = 1000) -> bool:
        """Whether a text column holds JSON objects/arrays (judged on its first values)."""
        col = self.q(column)
        n, js = conn.execute(
            text(
                f"SELECT count(*), sum(json_valid(v) AND substr(trim(v), 1, 1) IN ('{{', '['))"
                f" FROM (SELECT {col} AS v FROM {table} WHERE {col} IS NOT NULL LIMIT :n)"
            ),
            {"n": sample},
        ).one()
        return bool(n) and js == n

    def to_float(self, expr: str) -> str:
        return f"CAST({expr} AS REAL)"

    def nonfinite(self, expr: str) -> str:
        return f"(typeof({expr}) = 'real' AND abs({expr}) > 1.7976931348623157e308)"

    def row_hash(self, rn: str, seed_param: str) -> str:
        return f"dbdl_mix({rn}, :{seed_param})"

    def array_stats(self, conn: Connection, table: str, column: str) -> dict[str, Any]:
        return json.loads(
            conn.execute(
                text(f"SELECT dbdl_blob_stats({self.q(column)}) FROM {table}")
            ).scalar_one()
        )

    def array_piece(self, column: str, mean_param: str, std_param: str, width: int) -> str:
        return f"dbdl_scale_blob({column}, :{mean_param}, :{std_param}, {int(width)})"

    def group_pieces(self, pieces: list[tuple[str, bool]]) -> list[tuple[str, bool]]:
        """At most :data:`MAX_PIECES` pieces: a wider row becomes ``dbdl_row(...)`` chunks of
        float32 bytes (nested again past 100 chunks), in the same order."""
        while len(pieces) > MAX_PIECES:
            pieces = [
                (f"dbdl_row({', '.join(sql for sql, _ in pieces[i : i + MAX_PIECES])})", True)
                for i in range(0, len(pieces), MAX_PIECES)
            ]
        return pieces

    def create_packed(
        self,
        conn: Connection,
        packed: str,
        rows_sql: str,
        pieces: list[tuple[str, bool]],
        y_sql: str,
        y_is_int: bool,
        rows_per_buffer: int,
        params: dict[str, Any],
    ) -> None:
        cols = ", ".join(f"r.p{i}" for i in range(len(pieces)))
        self._run(  # Ctrl-C inside the packing aggregate stays a KeyboardInterrupt
            conn,
            (
                f"CREATE TABLE {packed} AS SELECT r.split AS split, r.grp AS grp,"
                " r.ord / :rpb AS buffer_id,"
                f" count(*) AS n, dbdl_pack({cols}) AS x, dbdl_pack_y(r.y, :y_is_int) AS y"
                f" FROM ({rows_sql}) AS r GROUP BY r.split, r.grp, r.ord / :rpb"
            ),
            {**params, "rpb": int(rows_per_buffer), "y_is_int": int(y_is_int)},
        )

    # -- iterations -----------------------------------------------------------------------------
    def run_kernels(self, conn: Connection, sql: str, params: dict[str, Any]) -> Any:
        return self._run(conn, sql, params)

    def _run(self, conn: Connection, sql: str, params: dict[str, Any]) -> Any:
        _ERRORS.last, _ERRORS.managed = None, True
        try:
            return conn.execute(text(sql), params)
        except Exception as exc:
            last = getattr(_ERRORS, "last", None)
            if last is not None:
                inner, tb = last
                _ERRORS.last = None
                if isinstance(inner, KeyboardInterrupt):
                    raise KeyboardInterrupt from exc
                raise TrainingError(f"the SQLite kernel failed: {inner}", detail=tb) from exc
            raise
        finally:
            _ERRORS.managed = False

    def values_relation(self, prefixes: list[str]) -> str:
        rows = [f"(:{p}_id, :{p}_grp, :{p}_name, :{p}_version, :{p}_config)" for p in prefixes]
        return (
            "(SELECT column1 AS member, column2 AS grp, column3 AS name, column4 AS version,"
            f" column5 AS config FROM (VALUES {', '.join(rows)})) AS m"
        )

    buffer_order = "dbdl_mix(p.buffer_id, :epoch)"  # a fresh buffer order every epoch
    keep_order = " LIMIT -1"

    def create_scratch(self, conn: Connection, table: str, select_sql: str, params: Any) -> None:
        self._run(conn, f"CREATE TABLE {table} AS {select_sql}", params)

    def segments_unavailable(self, parallel: int | str) -> str | None:
        url = self.engine.url
        if url.database not in (None, "", ":memory:") and "mode=memory" not in str(url):
            return None
        if parallel != "auto" and int(parallel) > 1:
            raise InputError(
                f"parallel={parallel}: an in-memory SQLite database cannot be shared with worker "
                "processes; connect to a database file (dl.connect('sqlite:///path.db')) or use "
                "parallel=1"
            )
        return "an in-memory SQLite database stays in this process"

    def open_segments(self, size: int, token: str) -> Segments:
        from dbdl_magic.backends.sqlite_segments import SQLiteSegments

        return SQLiteSegments(self, size, token)

    def buffers_sql(self, packed: str) -> str:
        # Buffers in a fresh order every epoch (PostgreSQL's scan order is the packing order).
        return (
            f"(SELECT p0.x, p0.y, p0.buffer_id, p0.split, p0.grp FROM {packed} AS p0"
            " ORDER BY dbdl_mix(p0.buffer_id, :epoch))"
        )

    @contextmanager
    def progress_channel(
        self, conn: Connection, run: str, sink: ProgressSink | None
    ) -> Iterator[None]:
        if sink is None:
            yield
            return
        seen: dict[int, int] = {}

        def report(member: int, samples: int) -> None:
            seen[member] = samples
            sink(sum(seen.values()))

        _PROGRESS[run] = report
        try:
            yield
        finally:
            _PROGRESS.pop(run, None)

    def predict_buffer(
        self, conn: Connection, x: bytes, key: dict[str, Any], config: dict[str, Any]
    ) -> bytes:
        selected = "dbdl_predict_buffer(:x, c.state, :config)"
        return self._run(
            conn, checkpoint_sql(self.store_tables(), selected),
            {**key, "x": x, "config": json.dumps(config)},
        ).scalar_one()

    def table_exists(self, conn: Connection, table: str) -> bool:
        """Whether ``table`` (quoted as the database reads it, ``schema.name`` or ``name``)
        exists; names compare without ASCII case, as SQLite does."""
        parts = [m.group(1).replace('""', '"') if m.group(1) is not None else m.group(2)
                 for m in _NAME_PART.finditer(table)]
        schema = f"{self.q(parts[0])}." if len(parts) > 1 else ""
        found = conn.execute(
            text(
                f"SELECT count(*) FROM {schema}sqlite_master WHERE type = 'table'"
                " AND lower(name) = lower(:n)"
            ),
            {"n": parts[-1]},
        )
        return bool(found.scalar())

    def predict_into(self, conn: Connection, job: Scoring) -> None:
        """Embedded: the database runs in this process. One pass over ``source`` (the query
        itself, or a staged table) fetches the key columns and the raw feature values
        (categories as their index, computed by SQLite), a buffer of rows at a time; numpy
        encodes them (:func:`~dbdl_magic.kernel.predict.encode_raw`), the kernel scores the
        buffer and the keys with the predictions go into ``result`` with one executemany."""
        q = self.q
        source, result, features, keys, outputs = (
            job.source, job.result, job.features, job.keys, job.outputs
        )
        config, with_rn, rows_per_buffer = job.config, job.with_rn, job.rows_per_buffer
        rn = q("__dbdl_rn")
        kept = ([rn] if with_rn else []) + [q(k) for k in keys]
        columns = kept + [q(c) for c in outputs]
        conn.execute(text(f"CREATE TABLE {result} ({', '.join(columns)})"))
        state = conn.execute(text(checkpoint_sql(self.store_tables())), job.key).scalar_one()
        evaluator = Evaluator(config, bytes(state))
        values = dict(job.params)
        scalars = [f for f in features if f["kind"] != "array"]
        arrays = [f for f in features if f["kind"] == "array"]
        # scalar features first, then arrays, then keys: a row of numbers converts at once
        selected = [self._raw_sql(f, i, values) for i, f in enumerate(scalars)] + [
            f"s.{q(f['name'])}" for f in arrays
        ] + [f"s.{q(k)}" for k in keys]
        # the driver's cursor itself: no SQLAlchemy Row per fetched row
        rows = conn.execute(text(f"SELECT {', '.join(selected)} FROM {source} AS s"),
                            values).cursor
        target = result.replace("\\:", ":")  # the driver reads no :name placeholders
        insert = f"INSERT INTO {target} VALUES ({', '.join('?' * len(columns))})"
        labels = np.asarray(job.classes, dtype=object)
        proba = len(outputs) > 1
        done, first_key = 0, len(scalars) + len(arrays)
        try:
            while batch := rows.fetchmany(rows_per_buffer):
                raw = _raw_values(batch, features, len(scalars), first_key)
                out = predict_buffer(evaluator, encode_raw(config["columns"], *raw))
                written: list[Any] = [range(done + 1, done + len(batch) + 1)] if with_rn else []
                written += [[r[first_key + i] for r in batch] for i in range(len(keys))]
                if config["task"] == "classification":
                    written.append(labels[out.argmax(axis=1)].tolist())
                    if proba:
                        written += out.T.tolist()
                else:
                    written.append(out[:, 0].astype(np.float64).tolist())
                conn.exec_driver_sql(insert, list(zip(*written, strict=True)))
                done += len(batch)
        finally:  # a pending statement would keep SQLite from dropping tables
            rows.close()

    def _raw_sql(self, f: dict[str, Any], i: int, params: dict[str, Any]) -> str:
        """A scalar feature's raw value: the number as stored, or a category's index (-1:
        none of the model's categories)."""
        col = f"s.{self.q(f['name'])}"
        if f["kind"] == "numeric":
            return col
        whens = []
        for j, cat in enumerate(f["categories"]):
            params[f"f{i}_c{j}"] = cat
            whens.append(f"WHEN {col} = :f{i}_c{j} THEN {j}")
        return f"(CASE {' '.join(whens)} ELSE -1 END)" if whens else "-1"

    def runner(self, conn: Connection) -> Run:
        def run(sql: str, params: Any) -> list[tuple[Any, ...]]:
            result = conn.exec_driver_sql(_DOLLAR.sub(r"?\1", sql), tuple(params))
            return [tuple(r) for r in result] if result.returns_rows else []

        return run

    def work_tables(self, conn: Connection) -> list[str]:
        """Every ``dbdl_*`` table of the file but the model store's and the meta table."""
        store = set(self.store_tables())
        names = conn.execute(
            text(
                "SELECT name FROM sqlite_master WHERE type = 'table'"
                " AND name LIKE 'dbdl\\_%' ESCAPE '\\'"
            )
        ).scalars()
        return [q for q in (self.q(n) for n in names) if q not in store]


__all__ = ["SQLiteBackend", "register_kernels", "stats_from_bytes"]
