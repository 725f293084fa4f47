"""The model store's catalog (dbdl_magic/kernel/catalog.py) is the one place that declares the
store's tables: SQLite's schema is made from it, PostgreSQL's install script must agree with it,
and no other module names a store table in SQL."""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

import pytest

from dbdl_magic.kernel.catalog import (
    COLUMNS,
    KEYS,
    POSTGRES_TYPES,
    SQLITE,
    SQLITE_TYPES,
    STORE_TABLES,
    sqlite_schema,
)

ROOT = Path(__file__).resolve().parents[2]
INSTALL = (ROOT / "kernels" / "postgres" / "install.sql").read_text()


def _create_table(schema: str, table: str) -> list[tuple[str, str, str]]:
    """``(column, type, rest)`` of ``CREATE TABLE IF NOT EXISTS schema.table (...)`` in the
    install script; constraint lines are left out."""
    head = rf"CREATE TABLE IF NOT EXISTS {schema}\.{table} \("
    match = re.search(head + r"([^\n]*)\);", INSTALL) or re.search(
        head + r"\n(.*?)\n\);", INSTALL, re.S
    )
    assert match, f"install.sql creates no {schema}.{table}"
    body = re.sub(r"--[^\n]*", "", match.group(1))
    out = []
    for part in re.split(r",\s*(?![^()]*\))", body):
        words = part.split()
        if not words or words[0] in {"PRIMARY", "FOREIGN", "ON", "REFERENCES"}:
            continue
        out.append((words[0], words[1], " ".join(words[2:])))
    return out


@pytest.mark.parametrize("table", STORE_TABLES)
def test_install_sql_creates_the_declared_columns(table):
    schema = "dbdl" if table == "meta" else "dbdl_store"
    columns = _create_table(schema, table)
    if schema == "dbdl_store":  # every role's rows, behind a view showing only its own
        owner, *columns = columns
        assert owner[:2] == ("owner", "text")
    declared = [(name, POSTGRES_TYPES[kind]) for name, kind, _ in COLUMNS[table]]
    assert [(name, kind) for name, kind, _ in columns] == declared
    def nullable(rules):
        return {n for n, _, rule in rules if "NOT NULL" not in rule and "PRIMARY" not in rule}

    assert nullable(columns) == nullable(COLUMNS[table])


@pytest.mark.parametrize("table", [t for t in STORE_TABLES if t != "meta"])
def test_install_sql_views_show_every_declared_column(table):
    match = re.search(
        rf"CREATE OR REPLACE VIEW dbdl\.{table} WITH \(security_barrier\) AS\s+SELECT (.*?)\s+"
        rf"FROM dbdl_store\.{table} WHERE owner", INSTALL, re.S,
    )
    assert match, f"install.sql has no per-owner view dbdl.{table}"
    shown = [c.strip() for c in match.group(1).split(",")]
    assert shown == [name for name, _, _ in COLUMNS[table]]


def test_sqlite_schema_creates_the_declared_tables():
    con = sqlite3.connect(":memory:")
    con.execute("PRAGMA foreign_keys = ON")
    for statement in sqlite_schema():
        con.execute(statement)
    for statement in sqlite_schema():  # idempotent
        con.execute(statement)
    for table, quoted in zip(STORE_TABLES, SQLITE, strict=True):
        info = con.execute(f"PRAGMA table_info({quoted})").fetchall()
        assert [(row[1], row[2]) for row in info] == [
            (name, SQLITE_TYPES[kind]) for name, kind, _ in COLUMNS[table]
        ]
        key = [row[1] for row in sorted(info, key=lambda r: r[5]) if row[5]]
        assert key == (list(KEYS[table]) or ["key"])
    con.execute(f"INSERT INTO {SQLITE.models} (name, version, status, spec, encoding, options,"
                " query) VALUES ('m', 1, 'training', '{}', '{}', '{}', 'q')")
    con.execute(f"INSERT INTO {SQLITE.checkpoints} (name, version, iteration) VALUES ('m', 1, 0)")
    con.execute(f"DELETE FROM {SQLITE.models}")
    assert con.execute(f"SELECT count(*) FROM {SQLITE.checkpoints}").fetchone() == (0,)


_STORE_IN_SQL = re.compile(
    r"""table\(\s*['"](models|checkpoints|blocks|checkpoint_blocks|meta)['"]\s*\)"""
    r"|\b(?:FROM|INTO|UPDATE|JOIN|to_regclass\(')\s*\"?dbdl(?:_store)?\"?\.\"?"
    r"(?:models|checkpoints|blocks|checkpoint_blocks|meta)\b"
)


def test_no_other_module_names_a_store_table():
    """Store SQL comes from the catalog (or from a module that takes the catalog's
    ``StoreTables``): a ``backend.table('models')`` or ``FROM dbdl.models`` elsewhere fails."""
    offenders = []
    for path in sorted((ROOT / "dbdl_magic").rglob("*.py")):
        if path.name == "catalog.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if _STORE_IN_SQL.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_the_contract_check_finds_what_it_forbids():
    assert _STORE_IN_SQL.search("text(f\"UPDATE {self.table('models')} SET x = 1\")")
    assert _STORE_IN_SQL.search('"SELECT value FROM dbdl.meta WHERE key = :k"')
    assert not _STORE_IN_SQL.search("backend.table(f'stage_{token}')")
