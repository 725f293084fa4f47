"""Packing on the embedded database: the staged rows pass through this process once.

SQLite runs inside this process, so keeping the rows "in the database" saves no transfer, and
every SQL aggregate over the staged table costs a scan at SQLite's per-value speed: the column
types, the NULL / non-finite counts with the means, the deviations, then the packing query,
which sorts the encoded rows twice and calls a Python aggregate once per row. Here one pass
reads the staged columns into numpy (what ``pandas.read_sql`` does, without the DataFrame);
the column kinds, the statistics, the shuffle, the split and the buffers come from those
arrays, and the buffers are written with one ``executemany``.

The packed bytes are those of the SQL path (``SQLiteBackend.create_packed``) bit for bit, which
the fingerprint a resume checks depends on:

- means and deviations are SQLite's ``avg()`` replicated in its summation order: a running
  double sum before SQLite 3.43, Kahan-Babuska-Neumaier compensated summation since. Which one
  the connection's library uses is probed on a few values (:func:`summation`); when neither
  matches, or a sum does not stay finite, the SQL aggregates compute the statistics;
- categories and class labels are matched as SQL's ``=`` matches them on the same values; the
  shuffle hash is ``dbdl_mix`` in uint64 arithmetic; encoded values go through the same
  float64 → float32 rounding; rows keep the SQL path's order inside a buffer (hash, then row
  number), and buffers are written in its order (split, group, buffer).

A staged table whose values would take more than :data:`MEMORY_BUDGET` bytes here, and input
this module does not reproduce exactly (say a warm start's categories that are not text), take
the SQL path, whose memory does not grow with the table.
"""

from __future__ import annotations

import itertools
import math
import re
import struct
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sqlalchemy import text
from sqlalchemy.engine import Connection

from dbdl_magic.backends.base import Backend, ColumnKind
from dbdl_magic.backends.sqlite import storage_kind
from dbdl_magic.data.encoding import ARRAY, CATEGORICAL, NUMERIC, Encoding

#: most bytes the fetched values may take in this process; a larger table is packed by SQL
MEMORY_BUDGET = 1 << 30
#: rows per fetch
CHUNK = 4096
#: buffers per executemany when writing the packed table
WRITE_BUFFERS = 8
#: declared types ``CREATE TABLE ... AS SELECT`` gives columns (by the expression's affinity)
_CTAS_TYPES = {"", "TEXT", "NUM", "INT", "REAL"}
_NAME = re.compile(r'"((?:[^"]|"")*)"|([A-Za-z_][A-Za-z0-9_]*)')
_CLASS = {int: "integer", float: "real", str: "text", bytes: "blob"}
_M64 = 0xFFFFFFFFFFFFFFFF
_EXACT_INT = 2**53


# -- staging ----------------------------------------------------------------------------------
def _raw_name(table: str) -> str | None:
    """The name of table ``table`` (``"quoted"`` or a bare identifier) as ``pragma_table_info``
    takes it; None for anything else (a schema-qualified name, say)."""
    found = _NAME.fullmatch(table)
    if found is None:
        return None
    return found.group(1).replace('""', '"') if found.group(1) is not None else found.group(2)


def stage_by_rowid(
    conn: Connection, backend: Backend, table: str, rn: str, select: str, params: dict[str, Any]
) -> bool:
    """Stage ``SELECT {select}`` (``src.* FROM (...) AS src WHERE ...``) into ``table`` with
    the row number ``rn`` as its ``INTEGER PRIMARY KEY``: 1, 2, ... in the order the rows
    arrive, which are the numbers ``row_number() OVER ()`` gives them, without the window's
    extra copy of every row. The other columns are declared as ``CREATE TABLE ... AS`` declares
    them, so their values get the same affinity. Returns False, having created nothing, for a
    table name this does not handle (see :func:`_raw_name`)."""
    raw = _raw_name(table)
    if raw is None:
        return False
    conn.execute(text(f"CREATE TABLE {table} AS SELECT NULL AS {rn}, {select} LIMIT 0"), params)
    columns = conn.execute(
        text("SELECT name, type FROM pragma_table_info(:t) ORDER BY cid"),
        {"t": raw},
    ).all()
    conn.execute(text(f"DROP TABLE {table}"))
    if any(str(kind) not in _CTAS_TYPES for _, kind in columns):
        return False
    decl = "".join(f", {backend.q(name)} {kind}".rstrip() for name, kind in columns[1:])
    conn.execute(text(f"CREATE TABLE {table} ({rn} INTEGER PRIMARY KEY{decl})"))
    conn.execute(text(f"INSERT INTO {table} SELECT NULL, {select}"), params)
    return True


# -- SQLite's avg(), replicated ---------------------------------------------------------------
def _running_sums(values: np.ndarray) -> np.ndarray:
    """``0.0`` then the running double sums, added one value at a time (``np.cumsum`` adds
    sequentially, unlike ``np.sum``)."""
    return np.cumsum(np.concatenate(([0.0], values)))


def sqlite_avg(values: np.ndarray, method: str) -> float | None:
    """``avg()`` of ``values`` (float64, no NULLs) as SQLite computes it, in their order;
    None for no values or a sum that does not stay finite (the SQL aggregate decides then).

    ``method`` ``"running"``: ``rSum += v`` (SQLite before 3.43); ``"kbn"``: the
    Kahan-Babuska-Neumaier step of SQLite 3.43 and later, whose running sum ``t`` is the plain
    running sum and whose error term adds ``(s - t) + r`` or ``(r - t) + s``, one value at a
    time, which vectorises exactly."""
    if values.size == 0:
        return None
    with np.errstate(over="ignore", invalid="ignore"):
        sums = _running_sums(values)
    total = float(sums[-1])
    if method == "kbn":
        s, t = sums[:-1], sums[1:]
        with np.errstate(invalid="ignore", over="ignore"):
            terms = np.where(np.abs(s) > np.abs(values), (s - t) + values, (values - t) + s)
            error = float(_running_sums(terms)[-1])
        if not math.isfinite(error):
            return None
        total = total + error
    if not math.isfinite(total):
        return None
    return total / float(values.size)


def _probe_values() -> list[list[float]]:
    """Sums that tell the summation orders apart: cancellation, signed zeros, wide ranges."""
    rng = np.random.default_rng(7)
    wide = rng.standard_normal(300) * 10.0 ** rng.uniform(-8, 12, 300)
    return [
        [1e16, 1.0, 1.0, 1.0, -1e16, 0.5],
        [-0.0, -0.0, -0.0],
        [0.1] * 10 + [1e-3, 3e10, -3e10, 7.0],
        [float(v) for v in wide],
    ]


_SUMMATION: dict[str, str | None] = {}


def summation(conn: Connection) -> str | None:
    """How this connection's SQLite sums doubles in ``avg()``: ``"running"``, ``"kbn"`` or
    None (neither reproduces it); probed once per SQLite version."""
    version = str(conn.execute(text("SELECT sqlite_version()")).scalar_one())
    if version in _SUMMATION:
        return _SUMMATION[version]
    found: str | None = None
    expected = []
    for probe in _probe_values():
        marks = ", ".join(f"(:v{i})" for i in range(len(probe)))
        got = conn.execute(
            text(f"SELECT avg(column1) FROM (VALUES {marks})"),
            {f"v{i}": v for i, v in enumerate(probe)},
        ).scalar_one()
        expected.append((np.asarray(probe, dtype=np.float64), got))
    for method in ("running", "kbn"):
        if all(_same(sqlite_avg(v, method), got) for v, got in expected):
            found = method
            break
    _SUMMATION[version] = found
    return found


def _same(a: float | None, b: Any) -> bool:
    """Equal to the bit (a signed zero is not the other zero)."""
    if a is None or b is None:
        return a is None and b is None
    return struct.pack("<d", a) == struct.pack("<d", float(b))


# -- the fetched stage ------------------------------------------------------------------------
@dataclass
class Column:
    """One staged column as read: its storage classes, NULL count and values (numbers as
    float64 with NaN for NULL; text or blobs as Python objects)."""

    name: str
    classes: set[str] = field(default_factory=set)
    nulls: int = 0
    numbers: list[np.ndarray] = field(default_factory=list)
    objects: list[Any] = field(default_factory=list)
    mixed: bool = False  # more than one kind of value: unsupported, values dropped

    @property
    def numeric(self) -> bool:
        return not self.mixed and self.classes <= {"integer", "real"}

    def add_numbers(self, values: np.ndarray, kind: str) -> None:
        """A chunk known to hold numbers only (no NULLs)."""
        self.classes.add(kind)
        if self.numeric:
            self.numbers.append(values)

    def add(self, values: Sequence[Any]) -> int:
        """A chunk of Python values; returns the bytes kept."""
        types = set(map(type, values))
        nulls = values.count(None) if type(None) in types else 0
        types.discard(type(None))
        self.nulls += nulls
        try:
            self.classes |= {_CLASS[t] for t in types}
        except KeyError as exc:  # a driver's converter made it: the SQL path judges the column
            raise NotRead(f"column {self.name!r} holds {exc.args[0].__name__} values") from exc
        kept = 0
        if self.numeric:
            self.numbers.append(np.array(values, dtype=np.float64))
            kept = 8 * len(values)
        elif not self.mixed and len(self.classes) == 1:  # text or blobs only
            if self.numbers:  # chunks of NULLs only so far, read as numbers
                self.objects = [None] * sum(part.size for part in self.numbers)
                self.numbers = []
            self.objects.extend(values)
            kept = 8 * len(values) + sum(len(v) + 49 for v in values if v is not None)
        else:
            self.mixed, self.numbers, self.objects = True, [], []
        return kept

    def kind(self) -> ColumnKind | None:
        """As ``SQLiteBackend.column_kinds`` judges it (None: text only, JSON or categories)."""
        classes = sorted(self.classes)
        return storage_kind(classes[0] if classes else None, classes[-1] if classes else None)

    def values(self) -> np.ndarray:
        """The numbers (NaN for NULL) as one float64 array."""
        if len(self.numbers) != 1:
            self.numbers = [np.concatenate(self.numbers) if self.numbers else np.zeros(0)]
        return self.numbers[0]


class NotRead(Exception):
    """The staged rows are not read into this process: more than :data:`MEMORY_BUDGET` bytes,
    or values of a type SQLite does not store (a driver's converter made them)."""


@dataclass
class FetchedStage:
    """The staged query's rows as read by one scan, in the staged table's order."""

    stage: str
    names: list[str]
    rn: np.ndarray
    columns: dict[str, Column]
    method: str | None
    backend: Backend = field(repr=False)

    @property
    def n(self) -> int:
        return int(self.rn.size)

    def kinds(self, conn: Connection) -> dict[str, ColumnKind]:
        """Every staged column's kind (columns not read: ``unsupported``, never looked at)."""
        out: dict[str, ColumnKind] = {}
        for name in self.names:
            column = self.columns.get(name)
            if column is None:
                out[name] = ColumnKind("unsupported", "not read")
                continue
            kind = column.kind()
            if kind is None:
                holds_json = self.backend.holds_json(conn, self.stage, name)  # type: ignore[attr-defined]
                kind = (ColumnKind("unsupported", "JSON text") if holds_json
                        else ColumnKind("categorical", "TEXT"))
            out[name] = kind
        return out

    def numeric_pass(
        self, cols: list[str], kinds: dict[str, ColumnKind]
    ) -> tuple[int, dict[str, int], dict[str, int], dict[str, float]] | None:
        """``(rows, NULLs, non-finite values, means)`` per column, as the SQL numeric pass
        computes them; None when SQLite's ``avg()`` cannot be reproduced here."""
        if self.method is None:
            return None
        nulls, bad, means = {}, {}, {}
        for name in cols:
            column = self.columns[name]
            nulls[name], bad[name], means[name] = column.nulls, 0, 0.0
            if kinds[name].kind != NUMERIC:
                continue
            values = column.values()
            finite = np.isfinite(values)
            bad[name] = int(np.isinf(values).sum())
            mean = sqlite_avg(values if finite.all() else values[finite], self.method)
            if mean is None and finite.any():
                return None
            means[name] = float(mean or 0.0)
        return self.n, nulls, bad, means

    def std_pass(self, cols: list[str], means: dict[str, float]) -> dict[str, float] | None:
        """Deviations as the SQL pass computes them: ``sqrt(avg((v - mean)²))`` over the
        non-NULL values; None when they cannot be reproduced here."""
        if self.method is None:
            return None
        out = {}
        for name in cols:
            values = self.columns[name].values()
            values = values[~np.isnan(values)]
            diff = values - means[name]
            var = sqlite_avg(diff * diff, self.method)
            if var is None and values.size:
                return None
            out[name] = math.sqrt(float(var or 0.0))
        return out


def fetch_stage(
    backend: Backend,
    conn: Connection,
    stage: str,
    rn: str,
    features: list[str] | None,
    target: str,
    skip: str | None = None,
) -> FetchedStage | None:
    """Read the staged columns packing needs (``features``, None for all but ``skip``, the
    group column; and the ``target``) in one scan; None when this path does not apply (not
    SQLite, an unusual table name, more than :data:`MEMORY_BUDGET` bytes)."""
    raw = _raw_name(stage)
    if not backend.packs_in_process or raw is None:
        return None
    info = conn.execute(
        text("SELECT name, type, pk FROM pragma_table_info(:t) ORDER BY cid"), {"t": raw}
    ).all()
    names = [r[0] for r in info]
    chosen = features if features is not None else [c for c in names if c != skip]
    read = [c for c in dict.fromkeys([*chosen, target]) if c in names and c != rn]
    if rn not in names or not read:
        return None
    # staged by stage_by_rowid: the row numbers are the rowids 1..n, which a scan returns in
    # order; checked below, else read
    by_rowid = any(r[0] == rn and str(r[1]).upper() == "INTEGER" and r[2] for r in info)
    select = ", ".join([*([] if by_rowid else [rn]), *(backend.q(c) for c in read)])
    cursor = conn.execute(text(f"SELECT {select} FROM {stage}")).cursor
    try:
        rn_values, columns, n = _read(cursor, read, with_rn=not by_rowid)
    except NotRead:
        return None
    finally:
        cursor.close()
    if by_rowid:
        rn_values = _rowids(conn, stage, rn, n)
    return FetchedStage(stage, names, rn_values, columns, summation(conn), backend)


def _rowids(conn: Connection, stage: str, rn: str, n: int) -> np.ndarray:
    """The row numbers of a table numbered by its rowid, in scan order: 1..n when they are
    (the largest is n), else as stored."""
    if conn.execute(text(f"SELECT max({rn}) FROM {stage}")).scalar() in (n, None):
        return np.arange(1, n + 1, dtype=np.int64)
    return np.array([r[0] for r in conn.execute(text(f"SELECT {rn} FROM {stage}")).cursor],
                    dtype=np.int64)


def _read(
    cursor: Any, read: list[str], with_rn: bool
) -> tuple[np.ndarray, dict[str, Column], int]:
    """Fetch ``CHUNK`` rows at a time (the row number first, ``with_rn``): while every column
    holds numbers, a chunk converts to a float64 block at once; otherwise column by column.
    Returns the row numbers read, the columns and the row count."""
    columns = [Column(name) for name in read]
    skip = 1 if with_rn else 0
    rn_parts: list[np.ndarray] = []
    kept = n = 0
    first = True
    while batch := cursor.fetchmany(CHUNK):
        n += len(batch)
        block = None if first or not all(c.numeric for c in columns) else _block(batch)
        first = False
        if block is not None:
            if with_rn:
                rn_parts.append(block[:, 0].astype(np.int64))
            kind = "integer" if block.dtype.kind == "i" else "real"
            for j, column in enumerate(columns, start=skip):
                column.add_numbers(block[:, j].astype(np.float64), kind)
            kept += block.shape[0] * 8 * len(columns)
        else:
            values = list(zip(*batch, strict=True))
            if with_rn:
                rn_parts.append(np.array(values[0], dtype=np.int64))
            for column, chunk in zip(columns, values[skip:], strict=True):
                kept += column.add(chunk)
        if kept > MEMORY_BUDGET:
            raise NotRead(f"more than {MEMORY_BUDGET} bytes")
    rn_values = np.concatenate(rn_parts) if rn_parts else np.zeros(0, dtype=np.int64)
    return rn_values, {c.name: c for c in columns}, n



def _block(batch: list[tuple[Any, ...]]) -> np.ndarray | None:
    """Rows of numbers only (no NULLs) as one 2-D array, else None. numpy finds the common
    type itself: float64 or int64 only when every value is a Python float or int."""
    try:
        block = np.array(batch)
    except (ValueError, TypeError):
        return None
    return block if block.ndim == 2 and block.dtype.kind in "fi" else None


# -- between the statistics and the packing ---------------------------------------------------
_PENDING: dict[int, tuple[weakref.ref[Connection], FetchedStage]] = {}


def keep(conn: Connection, fetched: FetchedStage) -> None:
    """Hold ``fetched`` for :func:`take` on the same connection (one at a time: a run that
    failed between its statistics and its packing leaves nothing else behind)."""
    _PENDING.clear()
    key = id(conn)
    _PENDING[key] = (weakref.ref(conn), fetched)
    weakref.finalize(conn, _PENDING.pop, key, None)


def take(conn: Connection, stage: str) -> FetchedStage | None:
    """The rows :func:`keep` held for ``stage`` on this connection, released."""
    held = _PENDING.pop(id(conn), None)
    if held is None or held[0]() is not conn or held[1].stage != stage:
        return None
    return held[1]


# -- encoding ---------------------------------------------------------------------------------
class NotHere(Exception):
    """Input this module does not encode exactly as SQL would: the SQL path packs it."""


def encode_rows(fetched: FetchedStage, encoding: Encoding) -> np.ndarray:
    """The encoded feature rows (float32, ``n × width``) as ``feature_sql`` encodes them."""
    out = np.empty((fetched.n, encoding.width), dtype="<f4")
    at = 0
    for f in encoding.features:
        column = fetched.columns.get(f.name)
        if column is None:
            raise NotHere(f"column {f.name!r} was not read")
        if f.kind == NUMERIC:
            if not column.numeric:
                raise NotHere(f"column {f.name!r} holds more than numbers")
            values = column.values()
            if f.impute is not None:
                values = np.where(np.isnan(values), float(f.impute), values)
            out[:, at] = (values - float(f.mean)) / float(f.std)
        elif f.kind == CATEGORICAL:
            out[:, at : at + f.width] = _one_hot(column, f.categories)
        elif f.kind == ARRAY:
            out[:, at : at + f.width] = _scaled_blobs(column, f.width, f.mean, f.std)
        at += f.width
    return out


def _one_hot(column: Column, categories: list[Any]) -> np.ndarray:
    """``CASE WHEN col = :cat THEN 1.0 ELSE 0.0 END`` per category, for a text column."""
    if column.classes != {"text"} or not all(isinstance(c, str) for c in categories):
        raise NotHere(f"column {column.name!r}: categories and values are not all text")
    index = {cat: j for j, cat in enumerate(categories)}
    codes = np.fromiter((index.get(v, -1) for v in column.objects), dtype=np.int64,
                        count=len(column.objects))
    block = np.zeros((codes.size, len(categories)), dtype="<f4")
    hit = codes >= 0
    block[np.nonzero(hit)[0], codes[hit]] = 1.0
    return block


def _scaled_blobs(column: Column, width: int, mean: float, std: float) -> np.ndarray:
    """``dbdl_scale_blob``: float32 blobs standardised in float64, rounded to float32."""
    blobs = column.objects
    if column.classes != {"blob"} or not all(
        isinstance(b, bytes) and len(b) == 4 * width for b in blobs
    ):
        raise NotHere(f"array column {column.name!r} holds NULLs or blobs of another size")
    values = np.frombuffer(b"".join(blobs), dtype="<f4").reshape(len(blobs), width)
    return ((values.astype(np.float64) - mean) / std).astype("<f4")


def encode_targets(fetched: FetchedStage, encoding: Encoding) -> np.ndarray:
    """The targets as ``encode_sql``'s ``y`` expression gives them: the class index (-1: none
    of the classes) or ``(y - mean) / std``."""
    t = encoding.target
    column = fetched.columns.get(t.name)
    if column is None:
        raise NotHere(f"target {t.name!r} was not read")
    if t.task != "classification":
        if not column.numeric:
            raise NotHere(f"target {t.name!r} holds more than numbers")
        return ((column.values() - float(t.mean)) / float(t.std)).astype("<f4")
    if column.numeric:
        return _class_index(column.values(), t.classes)
    if column.classes != {"text"} or not all(isinstance(c, str) for c in t.classes):
        raise NotHere(f"target {t.name!r}: classes and values are not all text")
    index = {c: j for j, c in enumerate(t.classes)}
    return np.fromiter((index.get(v, -1) for v in column.objects), dtype="<i4",
                       count=len(column.objects))


def _class_index(values: np.ndarray, classes: list[Any]) -> np.ndarray:
    """Index of each number among numeric ``classes`` (exact: every class a float64 as is)."""
    exact = all(
        isinstance(c, float) or (isinstance(c, int) and abs(c) <= _EXACT_INT) for c in classes
    )
    if not exact:
        raise NotHere("class labels that float64 does not hold exactly")
    labels = np.asarray(classes, dtype=np.float64)
    order = np.argsort(labels, kind="stable")
    ranked = labels[order]
    at = np.clip(np.searchsorted(ranked, values), 0, len(ranked) - 1)
    return np.where(ranked[at] == values, order[at], -1).astype("<i4")


# -- the shuffle and the buffers --------------------------------------------------------------
def mix(rn: np.ndarray, seed: int) -> np.ndarray:
    """``dbdl_mix(rn, seed)`` (``mix_seed(rn, seed) >> 1``) of every row number at once."""
    h = np.full(rn.shape, 0x9E3779B97F4A7C15, dtype=np.uint64)
    for part in (rn.astype(np.int64).view(np.uint64), np.uint64(int(seed) & _M64)):
        h = (h ^ part) * np.uint64(0xBF58476D1CE4E5B9)
        h = (h ^ (h >> np.uint64(31))) * np.uint64(0x94D049BB133111EB)
    return (h >> np.uint64(2)).astype(np.int64)


@dataclass
class Part:
    """Rows of one staged table: row numbers, group values (None: no groups), encoded
    features and targets, in the table's order; ``split`` 0/1 per row."""

    rn: np.ndarray
    groups: list[Any] | None
    x: np.ndarray
    y: np.ndarray
    split: np.ndarray


def split_by_hash(rn: np.ndarray, vseed: int, n_val: int) -> np.ndarray:
    """1 for the ``n_val`` rows first by ``(dbdl_mix(rn, vseed), rn)``, else 0."""
    split = np.zeros(rn.size, dtype=np.int64)
    split[np.lexsort((rn, mix(rn, vseed)))[:n_val]] = 1
    return split


def write_packed(
    conn: Connection, packed: str, parts: list[Part], seed: int, rows_per_buffer: int
) -> None:
    """Create ``packed`` as ``SQLiteBackend.create_packed`` does: rows ordered by split,
    group, ``dbdl_mix(rn, seed)``, rn; ``rows_per_buffer`` consecutive rows per buffer."""
    rn = np.concatenate([p.rn for p in parts])
    split = np.concatenate([p.split for p in parts])
    x = np.concatenate([p.x for p in parts]) if len(parts) > 1 else parts[0].x
    y = np.concatenate([p.y for p in parts])
    if parts[0].groups is None:
        groups: list[Any] = [None]
        codes = np.zeros(rn.size, dtype=np.int64)
    else:
        values = [g for p in parts for g in (p.groups or [])]
        groups = [None, *sorted({g for g in values if g is not None})]  # NULL sorts first
        index = {g: i for i, g in enumerate(groups)}
        codes = np.fromiter((index[g] for g in values), dtype=np.int64, count=len(values))
    order = np.lexsort((rn, mix(rn, seed), codes, split))
    key = split[order] * len(groups) + codes[order]
    starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    ord_ = np.arange(order.size) - np.repeat(starts, np.diff(np.r_[starts, order.size]))
    buffer_id = ord_ // rows_per_buffer
    cut = np.flatnonzero(np.r_[True, (key[1:] != key[:-1]) | (buffer_id[1:] != buffer_id[:-1])])
    bounds = np.r_[cut, order.size]
    conn.execute(text(
        f"CREATE TABLE {packed} AS SELECT 0 AS split, CAST(NULL AS TEXT) AS grp,"
        " 0 AS buffer_id, 0 AS n, X'' AS x, X'' AS y LIMIT 0"
    ))
    insert = f"INSERT INTO {packed} VALUES (?, ?, ?, ?, ?, ?)"
    rows = []
    for a, b in itertools.pairwise(bounds):
        idx = order[a:b]
        rows.append((int(split[order[a]]), groups[int(codes[order[a]])], int(buffer_id[a]),
                     int(b - a), x[idx].tobytes(), y[idx].tobytes()))
        if len(rows) == WRITE_BUFFERS:
            conn.exec_driver_sql(insert, rows)
            rows = []
    if rows:
        conn.exec_driver_sql(insert, rows)


def rows_from_pieces(rows: list[tuple[Any, ...]], width: int) -> np.ndarray:
    """Encoded rows whose pieces SQL computed (numbers, or float32 bytes for arrays and
    chunks of a wide row) as one float32 matrix, as ``dbdl_pack`` concatenates them."""
    if not rows:
        return np.zeros((0, width), dtype="<f4")
    if not any(isinstance(p, bytes) for p in rows[0]):
        return np.asarray(rows, dtype="<f4").reshape(len(rows), width)
    out = bytearray()
    for row in rows:
        start = 0
        for i, piece in enumerate(row):
            if isinstance(piece, bytes):
                if start < i:
                    out += np.asarray(row[start:i], dtype="<f4").tobytes()
                out += piece
                start = i + 1
        if start < len(row):
            out += np.asarray(row[start:], dtype="<f4").tobytes()
    return np.frombuffer(bytes(out), dtype="<f4").reshape(len(rows), width)


__all__ = [
    "MEMORY_BUDGET",
    "FetchedStage",
    "NotHere",
    "Part",
    "encode_rows",
    "encode_targets",
    "fetch_stage",
    "keep",
    "mix",
    "rows_from_pieces",
    "split_by_hash",
    "sqlite_avg",
    "stage_by_rowid",
    "summation",
    "take",
    "write_packed",
]
