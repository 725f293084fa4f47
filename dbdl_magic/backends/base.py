"""What every backend provides. SQL is phrased here and in the subclasses; values are bound."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine

from ..kernel.blockstore import Archiver, Run

ProgressSink = Callable[[int], None]


@dataclass
class ColumnKind:
    """What a column of the staged query holds: numeric, categorical, array or unsupported."""

    kind: str
    dbtype: str
    is_float: bool = False


class Backend(ABC):
    """SQL phrasing, kernel installation and iteration queries for one dialect."""

    name: str = "?"
    byteorder: str = "<"  # byte order of packed float32/int32 buffers

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._preparer = engine.dialect.identifier_preparer

    # -- naming -------------------------------------------------------------------------------
    def q(self, identifier: str) -> str:
        """Quote an identifier with the dialect's preparer (always quoted).

        Quoted names always go into SQLAlchemy ``text()``, which escapes ``%`` for the driver
        itself (the preparer's ``quote_identifier`` would double it a second time) and reads
        ``:name`` as a bound parameter, so colons are escaped: a column ``a :b`` stays a name.
        """
        p = self._preparer
        body = identifier.replace(p.escape_quote, p.escape_to_quote)
        return f"{p.initial_quote}{body}{p.final_quote}".replace(":", "\\:")

    @abstractmethod
    def table(self, name: str) -> str:
        """The quoted, qualified name of a dbdl-owned table."""

    def describe(self) -> str:
        """Database name for messages, without the password."""
        return self.engine.url.render_as_string(hide_password=True)

    # -- installation -------------------------------------------------------------------------
    @abstractmethod
    def install(self) -> None:
        """Create the kernels and model tables (idempotent)."""

    @abstractmethod
    def check(self) -> dict[str, Any]:
        """Verify the kernels are usable; returns the server kernel's facts or raises."""

    # -- packing --------------------------------------------------------------------------------
    @abstractmethod
    def column_kinds(self, conn: Connection, table: str) -> dict[str, ColumnKind]:
        """Kinds of the staged table's columns, in order."""

    @abstractmethod
    def to_float(self, expr: str) -> str:
        """SQL casting ``expr`` to a double."""

    @abstractmethod
    def nonfinite(self, expr: str) -> str:
        """SQL condition true where a float ``expr`` is NaN or ±infinity."""

    @abstractmethod
    def row_hash(self, rn: str, seed_param: str) -> str:
        """SQL for a deterministic pseudo-random integer from a row number and a bound seed."""

    @abstractmethod
    def array_stats(self, conn: Connection, table: str, column: str) -> dict[str, Any]:
        """``{"min_len", "max_len", "dims", "mean", "std"}`` of an array/blob column."""

    @abstractmethod
    def array_piece(self, column: str, mean_param: str, std_param: str, width: int) -> str:
        """SQL yielding a standardised array column as float32 bytes in :attr:`byteorder`."""

    @abstractmethod
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
        """Pack ``rows_sql`` (columns ``split``, ``ord`` and the pieces) into buffers.

        ``pieces`` are ``(sql, is_bytes)``: float expressions, or bytes already encoded.
        """

    # -- iterations -----------------------------------------------------------------------------
    @abstractmethod
    def train_iteration(
        self,
        conn: Connection,
        packed: str,
        key: dict[str, Any],
        config: dict[str, Any],
        progress: ProgressSink | None,
    ) -> None:
        """One aggregate query: the state at ``key['iteration']`` → a new checkpoint row."""

    @abstractmethod
    def evaluate(
        self,
        conn: Connection,
        packed: str,
        split: int,
        key: dict[str, Any],
        config: dict[str, Any],
    ) -> dict[str, Any]:
        """Metrics of the checkpoint ``key`` over buffers of ``split`` (0 train, 1 validation)."""

    @abstractmethod
    def predict_buffer(
        self, conn: Connection, x: bytes, key: dict[str, Any], config: dict[str, Any]
    ) -> bytes:
        """Run the predict kernel in the database on one packed feature buffer."""

    # -- prediction ------------------------------------------------------------------------------
    @abstractmethod
    def table_exists(self, conn: Connection, table: str) -> bool:
        """Whether the (quoted) table exists."""

    @abstractmethod
    def predict_into(
        self,
        conn: Connection,
        stage: str,
        packed: str,
        result: str,
        pieces: list[tuple[str, bool]],
        params: dict[str, Any],
        keys: list[str],
        outputs: list[str],
        classes: list[Any],
        config: dict[str, Any],
        key: dict[str, Any],
        rows_per_buffer: int,
        with_rn: bool,
    ) -> None:
        """Create ``result``: the key columns of ``stage`` plus ``outputs`` (``prediction``,
        then ``proba_<class>``), scored inside the database with checkpoint ``key``."""

    # -- block store -----------------------------------------------------------------------------
    @abstractmethod
    def runner(self, conn: Connection) -> Run:
        """``run(sql, params)`` with ``$1``-style placeholders on ``conn`` (client side)."""

    def store_tables(self) -> dict[str, str]:
        return {t: self.table(t) for t in ("blocks", "checkpoint_blocks", "checkpoints")}

    def archive(
        self,
        conn: Connection,
        key: dict[str, Any],
        iteration: int,
        parent: tuple[str, int, int] | None,
        block_bytes: int,
        deltas: bool,
    ) -> dict[str, Any]:
        """Store a checkpoint's state as blocks, inside the database."""
        return Archiver(self.runner(conn), self.store_tables(), block_bytes, deltas).archive(
            key["name"], key["version"], iteration, parent
        )

    def materialize(self, conn: Connection, key: dict[str, Any], iteration: int) -> None:
        """Rebuild a checkpoint's hot state (``checkpoints.state``) from its blocks."""
        Archiver(self.runner(conn), self.store_tables()).materialize(
            key["name"], key["version"], iteration
        )

    def release(self, conn: Connection, key: dict[str, Any], iteration: int | None = None) -> int:
        """Drop block references of a version (or one checkpoint); garbage-collect blocks."""
        return Archiver(self.runner(conn), self.store_tables()).release(
            key["name"], key["version"], iteration
        )

    def load_state(self, conn: Connection, key: dict[str, Any], iteration: int) -> bytes:
        """A checkpoint's state reassembled from verified blocks (read by the client)."""
        return Archiver(self.runner(conn), self.store_tables()).load(
            key["name"], key["version"], iteration
        )

    # -- helpers shared by the dialects ---------------------------------------------------------
    def state_info(self, conn: Connection, key: dict[str, Any]) -> dict[str, Any]:
        """Header of a stored checkpoint, read by a kernel function inside the database."""
        fn = "dbdl.state_info" if self.name == "postgresql" else "dbdl_state_info"
        row = conn.execute(
            text(
                f"SELECT {fn}(state) FROM {self.table('checkpoints')} "
                "WHERE name = :name AND version = :version AND iteration = :iteration"
            ),
            key,
        ).scalar_one()
        return json.loads(row)

    def drop_table(self, conn: Connection, table: str) -> None:
        conn.execute(text(f"DROP TABLE IF EXISTS {table}"))

    def cancel(self, conn: Connection) -> None:  # noqa: B027 - optional
        """Cancel the statement running on ``conn`` (used on KeyboardInterrupt)."""
