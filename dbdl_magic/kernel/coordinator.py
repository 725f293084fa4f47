"""Reading the model store from a Citus worker: the coordinator's views, as the same role.

The model store (``dbdl_store`` tables behind the per-owner views ``dbdl.models``, ...) lives
on the coordinator only. A query such as ``SELECT dbdl.predict('m', to_jsonb(d)) FROM d`` on a
distributed table ``d`` runs ``dbdl.predict`` on the workers, inside the shard tasks, where
there is no store to read. Making the store tables Citus reference tables would put them on
every node, but Citus refuses writes through views over its tables ("cannot modify views when
the query contains citus tables"), and the per-owner views are how every role writes its own
rows. So a worker reads what it needs through Citus's ``run_command_on_coordinator``: a new
connection to the coordinator as the current role, where the same views show that role its own
rows and nothing else. Only reads go this way (the model's row, then its checkpoint's blocks),
once per SQL statement per worker process (see :mod:`~dbdl_magic.kernel.rowpredict`).

The rows come back as one JSON array (``run_command_on_coordinator`` returns one text value);
values are bound as SQL literals quoted by the server (``quote_nullable``), so nothing a
caller passes can change the statement.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from dbdl_magic.kernel.blockstore import Run
from dbdl_magic.kernel.catalog import POSTGRES
from dbdl_magic.kernel.errors import KernelError

#: columns of the model store that hold bytes (hex in JSON: ``"\\x0a1b..."``)
BYTES_COLUMNS = frozenset({"hash", "data", "base_data", "base", "state"})
_PLACEHOLDER = re.compile(r"\$(\d+)")


class CoordinatorError(KernelError):
    """The coordinator could not be reached or refused the statement; the message says which."""


def store_is_local(plpy: Any) -> bool:
    """Whether this server holds the model store (PostgreSQL, a Citus coordinator)."""
    rows = plpy.execute(f"SELECT to_regclass('{POSTGRES.models}') IS NOT NULL AS here")
    return bool(rows[0]["here"])


def is_citus_worker(plpy: Any) -> bool:
    """Whether this server has Citus's ``run_command_on_coordinator`` (asked where the store
    is not local: then this is a Citus worker)."""
    rows = plpy.execute(
        "SELECT to_regprocedure('pg_catalog.run_command_on_coordinator(text, boolean)')"
        " IS NOT NULL AS citus"
    )
    return bool(rows[0]["citus"])


def bind_literals(plpy: Any, sql: str, params: Sequence[Any]) -> str:
    """``sql`` with ``$1``, ``$2`` ... replaced by literals the server quoted."""
    literals = [_literal(plpy, p) for p in params]

    def literal(match: re.Match[str]) -> str:
        index = int(match.group(1)) - 1
        if not 0 <= index < len(literals):
            raise KernelError(f"statement refers to ${index + 1}, {len(literals)} value(s) given")
        return literals[index]

    return _PLACEHOLDER.sub(literal, sql)


def _literal(plpy: Any, value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return f"CAST({int(value)} AS bigint)"
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"decode('{bytes(value).hex()}', 'hex')"
    return f"CAST({plpy.quote_nullable(str(value))} AS text)"


def decode_rows(result: str) -> list[tuple[Any, ...]]:
    """The wrapper statement's result (``{"bytea_output", "rows"}``) as row tuples."""
    out = json.loads(result)
    if out.get("bytea_output") != "hex":
        raise CoordinatorError(
            f"the coordinator's bytea_output is {out.get('bytea_output')!r}: dbdl reads stored "
            "models from Citus workers with bytea_output = 'hex' (ALTER DATABASE ... RESET "
            "bytea_output)"
        )
    rows = []
    for row in out.get("rows") or []:
        values = []
        for column, value in row.items():
            if column in BYTES_COLUMNS and isinstance(value, str):
                if not value.startswith("\\x"):
                    raise CoordinatorError(f"column {column!r} is not hex-encoded bytes")
                value = bytes.fromhex(value[2:])
            values.append(value)
        rows.append(tuple(values))
    return rows


def coordinator_runner(plpy: Any) -> Run:
    """``run(sql, params)`` for read-only statements, executed on the Citus coordinator as the
    current role (a connection of its own per statement, opened by Citus)."""
    plan = plpy.prepare(
        "SELECT success, result FROM pg_catalog.run_command_on_coordinator($1, false)", ["text"]
    )

    def run(sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        # json_agg over the statement as a subquery, with nothing else at the outer level,
        # keeps the statement's ORDER BY (the block order of a checkpoint)
        command = (
            "SELECT json_build_object('bytea_output', current_setting('bytea_output'),"
            f" 'rows', coalesce(json_agg(q), '[]')) FROM ({bind_literals(plpy, sql, params)})"
            " AS q"
        )
        try:
            rows = plpy.execute(plan, [command])
        except plpy.SPIError as exc:
            raise CoordinatorError(
                f"cannot read the model store on the Citus coordinator: {exc}"
            ) from None
        if not rows:
            raise CoordinatorError("the Citus coordinator is not in this worker's metadata "
                                   "(citus_set_coordinator_host on the coordinator)")
        success, result = rows[0]["success"], rows[0]["result"]
        if not success:
            raise CoordinatorError(
                f"reading the model store on the Citus coordinator failed: {result}"
            )
        return decode_rows(result)

    return run
