"""The model store's catalog: its tables, their columns, and the statements on them.

The store is five tables. ``models`` has a row per model version (spec, encoding, options,
history, status); ``checkpoints`` a row per iteration of a version, with the hot copy of its
state; ``blocks`` the content-addressed weight blocks every checkpoint is archived into;
``checkpoint_blocks`` which blocks, in order, make a checkpoint; ``meta`` key/value pairs (the
kernel version, the runs on record).

Every layer that touches these tables takes their names and shared statements from here: the
store's client (``store/registry.py``), the dialects' iteration SQL (``backends/``), and the
routines that run inside the database (``kernel/blockstore.py``, ``kernel/rowpredict.py``).
SQLite creates the tables from :data:`COLUMNS` (:func:`sqlite_schema`); PostgreSQL creates
them in ``kernels/postgres/install.sql``, each with an ``owner`` column behind a per-owner
view, and a unit test holds that script to :data:`COLUMNS`.

Statements for SQLAlchemy take named parameters (``:name``); the ones run by the in-database
routines take positional ``$1, $2, ...`` (SQLite and PostgreSQL's SPI both read that).
Every parameter is cast to its exact type, as the kernels' calls are on PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

#: the blocks a module needs (SQL condition on ``cb.label``): the tensor table and the
#: network's own tensors; the optimizer's moments (``optim.*``) are only read to resume
WEIGHT_LABELS = "substr(cb.label, 1, 6) = 'model.' OR cb.label = 'safetensors-header'"

#: the store's tables, in the order they are created
STORE_TABLES = ("meta", "models", "checkpoints", "blocks", "checkpoint_blocks")

#: each table's columns: name, portable type (see :data:`SQLITE_TYPES`), constraint
COLUMNS: dict[str, tuple[tuple[str, str, str], ...]] = {
    "meta": (("key", "text", "PRIMARY KEY"), ("value", "text", "NOT NULL")),
    "models": (
        ("name", "text", "NOT NULL"),
        ("version", "integer", "NOT NULL"),
        ("status", "text", "NOT NULL"),
        ("spec", "text", "NOT NULL"),
        ("encoding", "text", "NOT NULL"),
        ("options", "text", "NOT NULL"),
        ("query", "text", "NOT NULL"),
        ("history", "text", "NOT NULL DEFAULT '[]'"),
        ("model_iteration", "integer", ""),  # the checkpoint that is the model (NULL: the last)
        ("parent", "text", ""),  # "name:version" of the model a warm start began from
        ("error", "text", ""),
        ("created_at", "timestamp", "NOT NULL DEFAULT CURRENT_TIMESTAMP"),
        ("updated_at", "timestamp", "NOT NULL DEFAULT CURRENT_TIMESTAMP"),
    ),
    "checkpoints": (
        ("name", "text", "NOT NULL"),
        ("version", "integer", "NOT NULL"),
        ("iteration", "integer", "NOT NULL"),
        ("state", "blob", ""),  # hot copy (the latest, the model's); the blocks hold all
        ("logical_bytes", "bigint", ""),
        ("new_bytes", "bigint", ""),  # bytes this checkpoint added to the block store
        ("metrics", "text", ""),
        ("created_at", "timestamp", "NOT NULL DEFAULT CURRENT_TIMESTAMP"),
    ),
    "blocks": (
        ("hash", "blob", "NOT NULL"),  # BLAKE2b-256 over dtype tag + raw bytes
        ("dtype", "text", "NOT NULL"),
        ("encoding", "smallint", "NOT NULL"),  # 0 raw, 1 delta (XOR + zstd) against "base"
        ("base", "blob", ""),
        ("data", "blob", "NOT NULL"),
        ("raw_size", "integer", "NOT NULL"),
        ("refs", "integer", "NOT NULL DEFAULT 0"),
    ),
    "checkpoint_blocks": (
        ("name", "text", "NOT NULL"),
        ("version", "integer", "NOT NULL"),
        ("iteration", "integer", "NOT NULL"),
        ("ord", "integer", "NOT NULL"),
        ("label", "text", "NOT NULL"),
        ("hash", "blob", "NOT NULL"),
    ),
}
#: each table's primary key (PostgreSQL puts ``owner`` first)
KEYS = {
    "meta": (),  # the key column is the primary key
    "models": ("name", "version"),
    "checkpoints": ("name", "version", "iteration"),
    "blocks": ("hash",),
    "checkpoint_blocks": ("name", "version", "iteration", "ord"),
}
SQLITE_TYPES = {"text": "TEXT", "integer": "INTEGER", "smallint": "INTEGER",
                "bigint": "INTEGER", "blob": "BLOB", "timestamp": "TEXT"}
POSTGRES_TYPES = {"text": "text", "integer": "integer", "smallint": "smallint",
                  "bigint": "bigint", "blob": "bytea", "timestamp": "timestamptz"}


@dataclass(frozen=True)
class StoreTables:
    """The store tables' names, quoted as the database reads them."""

    meta: str
    models: str
    checkpoints: str
    blocks: str
    checkpoint_blocks: str

    @classmethod
    def named(cls, name_of: Callable[[str], str]) -> StoreTables:
        """The tables named by ``name_of(table)`` (e.g. a backend's ``table``)."""
        return cls(*(name_of(t) for t in STORE_TABLES))

    def __iter__(self) -> Iterator[str]:
        return (getattr(self, t) for t in STORE_TABLES)


#: the names every role reads and writes on PostgreSQL: per-owner views in schema ``dbdl``
POSTGRES = StoreTables.named(lambda t: f"dbdl.{t}")
#: the names in an SQLite file
SQLITE = StoreTables.named(lambda t: f'"dbdl_{t}"')


def sqlite_schema(t: StoreTables = SQLITE) -> list[str]:
    """The statements that create the store in an SQLite file (idempotent)."""
    out = []
    for table in STORE_TABLES:
        parts = [f"{c} {SQLITE_TYPES[kind]} {rule}".rstrip() for c, kind, rule in COLUMNS[table]]
        if KEYS[table]:
            parts.append(f"PRIMARY KEY ({', '.join(KEYS[table])})")
        if table == "checkpoints":
            parts.append(f"FOREIGN KEY (name, version) REFERENCES {t.models} (name, version)"
                         " ON DELETE CASCADE")
        out.append(f"CREATE TABLE IF NOT EXISTS {getattr(t, table)} ({', '.join(parts)})")
    out.append(f"CREATE INDEX IF NOT EXISTS dbdl_checkpoint_blocks_hash ON {t.checkpoint_blocks}"
               " (hash)")
    return out


# -- statements shared by the layers (named parameters) ---------------------------------------
def model_iteration_sql(t: StoreTables) -> str:
    """The iteration of model row ``m``'s model checkpoint: ``model_iteration``, or its last."""
    return (
        "coalesce(m.model_iteration, (SELECT max(c2.iteration) FROM"
        f" {t.checkpoints} AS c2 WHERE c2.name = m.name AND c2.version = m.version))"
    )


def checkpoint_sql(t: StoreTables, selected: str = "c.state") -> str:
    """``SELECT selected`` of checkpoint (``:name``, ``:version``, ``:iteration``), aliased
    ``c``."""
    return (
        f"SELECT {selected} FROM {t.checkpoints} AS c WHERE c.name = CAST(:name AS TEXT)"
        " AND c.version = CAST(:version AS INTEGER) AND c.iteration = CAST(:iteration AS INTEGER)"
    )


def member_states_sql(t: StoreTables, members: str) -> str:
    """``(member, state)`` of each member's checkpoint ``:iteration``; ``members`` is a relation
    ``m(member, name, version)``."""
    return (
        f"SELECT m.member AS member, c.state AS state FROM {members}"
        f" JOIN {t.checkpoints} AS c ON c.name = m.name AND c.version = m.version"
        " AND c.iteration = CAST(:iteration AS INTEGER)"
    )


def insert_checkpoints_sql(t: StoreTables, states: str, members: str, where: str = "") -> str:
    """Insert checkpoint ``:iteration`` of each member from ``states`` (a relation
    ``s(member, state, ...)``, filtered by ``where`` on ``s``); ``members`` as in
    :func:`member_states_sql`."""
    return (
        f"INSERT INTO {t.checkpoints} (name, version, iteration, state)"
        f" SELECT m.name, m.version, CAST(:iteration AS INTEGER), s.state FROM {states} AS s"
        f" JOIN {members} ON m.member = s.member" + (f" WHERE {where}" if where else "")
    )


def weight_blocks_sql(t: StoreTables) -> str:
    """The blocks a module needs of checkpoint (``:name``, ``:version``, ``:iteration``) in
    order: ``(label, hash, dtype, encoding, data, base data)``."""
    return (
        "SELECT cb.label, b.hash, b.dtype, b.encoding, b.data, base.data"
        f" FROM {t.checkpoint_blocks} AS cb JOIN {t.blocks} AS b ON b.hash = cb.hash"
        f" LEFT JOIN {t.blocks} AS base ON base.hash = b.base"
        " WHERE cb.name = CAST(:name AS TEXT) AND cb.version = CAST(:version AS INTEGER)"
        f" AND cb.iteration = CAST(:iteration AS INTEGER) AND ({WEIGHT_LABELS}) ORDER BY cb.ord"
    )


def set_options_sql(t: StoreTables) -> str:
    """Replace the ``:options`` of model version (``:name``, ``:version``)."""
    return (
        f"UPDATE {t.models} SET options = CAST(:options AS TEXT)"
        " WHERE name = CAST(:name AS TEXT) AND version = CAST(:version AS INTEGER)"
    )


def versions_options_sql(t: StoreTables) -> str:
    """``(version, options)`` of model ``:name``'s versions from ``:lo`` to ``:hi``."""
    return (
        f"SELECT version, options FROM {t.models} WHERE name = CAST(:name AS TEXT)"
        " AND version >= CAST(:lo AS INTEGER) AND version <= CAST(:hi AS INTEGER)"
    )


def lock_models_sql(t: StoreTables) -> str:
    """A write that changes nothing: takes an embedded database's write lock now."""
    return f"UPDATE {t.models} SET name = name WHERE 0 = 1"


def meta_sql(t: StoreTables, action: str) -> str:
    """The meta table's key/value statements: ``read`` (the ``value`` of ``:key``), ``prefixed``
    (``key, value`` of the keys starting with ``:prefix``), ``insert`` (``:key``, ``:value``),
    ``delete`` (``:key``)."""
    return {
        "read": f"SELECT value FROM {t.meta} WHERE key = CAST(:key AS TEXT)",
        "prefixed": f"SELECT key, value FROM {t.meta}"
                    " WHERE substr(key, 1, length(CAST(:prefix AS TEXT))) = CAST(:prefix AS TEXT)",
        "insert": f"INSERT INTO {t.meta} (key, value) VALUES (CAST(:key AS TEXT),"
                  " CAST(:value AS TEXT))",
        "delete": f"DELETE FROM {t.meta} WHERE key = CAST(:key AS TEXT)",
    }[action]


def blocks_like_sql(t: StoreTables) -> str:
    """Blocks of dtype ``:dtype`` and ``:size`` raw bytes with their delta bases' data:
    ``(hash, encoding, data, base data)``, at most ``:limit``."""
    return (
        f"SELECT b.hash, b.encoding, b.data, base.data FROM {t.blocks} AS b"
        f" LEFT JOIN {t.blocks} AS base ON base.hash = b.base"
        " WHERE b.dtype = CAST(:dtype AS TEXT) AND b.raw_size = CAST(:size AS INTEGER)"
        " LIMIT CAST(:limit AS INTEGER)"
    )


# -- statements of the in-database routines (positional parameters) ---------------------------
def model_lookup_sql(t: StoreTables, with_version: bool) -> str:
    """The newest version of model ``$1`` (or version ``$2``): ``(version, iteration of the
    model's checkpoint, spec, encoding, updated_at, options)``."""
    return (
        f"SELECT m.version, {model_iteration_sql(t)}, m.spec, m.encoding, m.updated_at,"
        f" m.options FROM {t.models} AS m WHERE m.name = $1"
        + (" AND m.version = $2" if with_version else "")
        + " ORDER BY m.version DESC LIMIT 1"
    )


__all__ = [
    "COLUMNS",
    "KEYS",
    "POSTGRES",
    "POSTGRES_TYPES",
    "SQLITE",
    "SQLITE_TYPES",
    "STORE_TABLES",
    "WEIGHT_LABELS",
    "StoreTables",
    "blocks_like_sql",
    "checkpoint_sql",
    "insert_checkpoints_sql",
    "member_states_sql",
    "model_iteration_sql",
    "model_lookup_sql",
    "sqlite_schema",
    "weight_blocks_sql",
]
