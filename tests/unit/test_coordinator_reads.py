"""The Citus worker's read path to the coordinator's model store (kernel/coordinator.py),
without a cluster: how a statement is bound and how its JSON rows are decoded. The path itself
runs against a real cluster in tests/test_citus.py (row-level dbdl.predict on the workers)."""

from __future__ import annotations

import json

import pytest

from dbdl_magic.kernel.blockstore import Archiver
from dbdl_magic.kernel.catalog import POSTGRES
from dbdl_magic.kernel.coordinator import (
    CoordinatorError,
    bind_literals,
    coordinator_runner,
    decode_rows,
)
from dbdl_magic.kernel.errors import KernelError


class FakePlpy:
    """What the runner uses of PL/Python's ``plpy``; ``answer`` plays the coordinator."""

    class SPIError(Exception):
        pass

    def __init__(self, answer=None) -> None:
        self.answer = answer
        self.commands: list[str] = []

    @staticmethod
    def quote_nullable(value: str) -> str:
        return "'" + value.replace("'", "''") + "'"

    def prepare(self, sql: str, types: list[str]) -> str:
        assert "run_command_on_coordinator($1, false)" in sql and types == ["text"]
        return sql

    def execute(self, plan: str, args: list[str]) -> list[dict]:
        self.commands.append(args[0])
        return self.answer(args[0]) if callable(self.answer) else self.answer


def test_values_are_bound_as_quoted_literals():
    sql = bind_literals(FakePlpy(), "SELECT $1, $2, $3, $10, $4, $5",
                        ["o'brien; DROP TABLE x", 7, b"\x00\xff", None, True, 1, 2, 3, 4, 10])
    assert sql == ("SELECT CAST('o''brien; DROP TABLE x' AS text), CAST(7 AS bigint),"
                   " decode('00ff', 'hex'), CAST(10 AS bigint), NULL, true")
    with pytest.raises(KernelError, match=r"\$3, 2 value"):
        bind_literals(FakePlpy(), "SELECT $1, $3", [1, 2])


def test_rows_decode_bytes_columns_and_refuse_escape_output():
    out = {"bytea_output": "hex",
           "rows": [{"hash": "\\x0aff", "dtype": "F32", "encoding": 0, "data": "\\x", "base_data":
                     None}]}
    assert decode_rows(json.dumps(out)) == [(b"\n\xff", "F32", 0, b"", None)]
    with pytest.raises(CoordinatorError, match="bytea_output is 'escape'"):
        decode_rows(json.dumps({"bytea_output": "escape", "rows": []}))
    with pytest.raises(CoordinatorError, match="'data' is not hex"):
        decode_rows(json.dumps({"bytea_output": "hex", "rows": [{"data": "abc"}]}))


def test_runner_wraps_the_statement_and_reports_the_coordinator_error():
    rows = {"bytea_output": "hex", "rows": [{"hash": "\\x01", "dtype": "RAW", "encoding": 0,
                                             "data": "\\x02", "base_data": None}]}
    plpy = FakePlpy([{"success": True, "result": json.dumps(rows)}])
    run = coordinator_runner(plpy)
    with pytest.raises(ValueError, match="corrupt"):  # the blocks arrive, and are verified
        Archiver(run, POSTGRES).load("m", 1, 3)
    command = plpy.commands[0]
    assert command.startswith("SELECT json_build_object('bytea_output'")
    assert ("cb.name = CAST('m' AS text) AND cb.version = CAST(1 AS bigint)"
            " AND cb.iteration = CAST(3 AS bigint) ORDER BY cb.ord) AS q") in command
    failing = coordinator_runner(FakePlpy([{"success": False, "result": "permission denied"}]))
    with pytest.raises(CoordinatorError, match="failed: permission denied"):
        failing("SELECT 1", [])
    missing = coordinator_runner(FakePlpy([]))
    with pytest.raises(CoordinatorError, match="citus_set_coordinator_host"):
        missing("SELECT 1", [])
