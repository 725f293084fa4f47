"""Every ```python block of README.md runs as written, on SQLite and on a fresh PostgreSQL.

The blocks run in order in one namespace, like a reader going down the page, against a test
database named by ``DBDL_DATABASE`` (the first example reads its URL from there). What the
README says the examples are given (its note under "Use it") is prepared here: the synthetic
tables ``customers``, ``events``, ``sales``, ``new_sales`` and ``digits``; ``df`` (customers'
rows), ``db`` (the same database as ``con``) and a stored model ``global_model``, the last
two just before the first block that names them (they need the kernels the first example
installs). Then the results are checked: the models learned, predictions cover the rows.
"""

from __future__ import annotations

import ast
import os
import re
import uuid
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from sqlalchemy import create_engine, make_url

import dbdl_magic as dl
from dbdl_magic.datasets import digits_frame, load_table

README = Path(__file__).resolve().parents[2] / "README.md"
_BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)
COUNTRIES = ("DE", "FR", "US")


def readme_blocks() -> list[tuple[int, str]]:
    """``(first line number, code)`` of every ```python block of README.md."""
    text = README.read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in _BLOCK.finditer(text)]


# -- the synthetic tables the examples name ----------------------------------------------------
def customers_frame(rng: np.random.Generator, n: int = 800) -> pd.DataFrame:
    """Churn that depends on tenure, plan and spend (plus noise), as text labels."""
    plan = rng.choice(["basic", "plus", "pro"], size=n)
    tenure = rng.integers(0, 72, size=n)
    spend = np.round(rng.gamma(2.0, 30.0, size=n), 2)
    score = (2.0 - 0.08 * tenure + 1.2 * (plan == "basic") - 0.8 * (plan == "pro")
             + 0.015 * (spend - 60.0) + rng.normal(0.0, 0.5, size=n))
    return pd.DataFrame({
        "age": rng.integers(18, 80, size=n), "tenure": tenure, "plan": plan,
        "monthly_spend": spend, "churned": np.where(score > 0, "yes", "no"),
    })


def events_frame(rng: np.random.Generator, n: int = 1000) -> pd.DataFrame:
    """Four numeric features, a 0/1 label from a linear rule. Small on purpose: the rows fit
    one buffer, so one process trains it even with ``parallel=2`` (history ``workers`` 1);
    two real workers cost ≈ 12 s of start-up per query on a busy 2-core machine, 40 queries
    here, and are tests/integration/test_postgres.py's subject."""
    x = rng.normal(size=(n, 4))
    frame = pd.DataFrame(x, columns=["x1", "x2", "x3", "x4"])
    frame["label"] = (x[:, 0] + 0.5 * x[:, 1] - x[:, 2] > 0).astype(int)
    return frame


def sales_frame(rng: np.random.Generator, n: int, countries: tuple[str, ...]) -> pd.DataFrame:
    """Churn whose rule differs by country (what per-group models are for)."""
    country = rng.choice(countries, size=n)
    age = rng.integers(18, 80, size=n)
    spend = np.round(rng.gamma(2.0, 25.0, size=n), 2)
    visits = rng.integers(0, 10, size=n)
    rule = np.select([country == "DE", country == "FR"], [spend > 50, visits < 4], age < 45)
    return pd.DataFrame({"country": country, "age": age, "spend": spend, "visits": visits,
                         "churn": np.where(rule, "yes", "no")})


def load_tables(url: str) -> dict[str, pd.DataFrame]:
    """Write the tables the README names into ``url``; returns them by name."""
    rng = np.random.default_rng(7)
    tables = {
        "customers": customers_frame(rng),
        "events": events_frame(rng),
        "sales": sales_frame(rng, 900, COUNTRIES),
        # JP has no per-country model: the fallback scores those rows
        "new_sales": sales_frame(rng, 60, (*COUNTRIES, "JP")).drop(columns="churn"),
        "digits": digits_frame(),
    }
    engine = create_engine(url)
    try:
        for name, frame in tables.items():
            load_table(engine, name, frame)
    finally:
        engine.dispose()
    return tables


def majority(labels: pd.Series) -> float:
    """Accuracy of always predicting the most frequent label."""
    return float(labels.value_counts(normalize=True).iloc[0])


# -- running the blocks -------------------------------------------------------------------------
def names_used(tree: ast.AST) -> set[str]:
    """Variable names and string literals of a block (``global_model`` is a literal)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            found.add(node.id)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            found.add(node.value)
    return found


def run_block(line: int, code: str, ns: dict[str, Any]) -> list[tuple[str, Any]]:
    """Execute a block statement by statement (tracebacks point at README.md lines); returns
    ``(source, value)`` of every expression statement, as a REPL would show them."""
    tree = ast.parse(code)
    values = []
    for stmt in tree.body:
        source = ast.get_source_segment(code, stmt) or ""
        ast.increment_lineno(stmt, line - 1)
        if isinstance(stmt, ast.Expr):
            expr = ast.Expression(stmt.value)
            values.append((source, eval(compile(expr, str(README), "eval"), ns)))
        else:
            exec(compile(ast.Module([stmt], type_ignores=[]), str(README), "exec"), ns)
    return values


def provide_givens(used: set[str], ns: dict[str, Any], url: str, tables: dict) -> None:
    """Bind what the README says its examples are given, when a block first names it."""
    if "df" in used and "df" not in ns:
        ns["df"] = tables["customers"].head(50)
    if "db" in used and "db" not in ns:
        ns["db"] = dl.connect(url)
    if "global_model" in used:
        dl.train(url, "SELECT age, spend, visits, churn FROM sales", target="churn",
                 name="global_model", model="mlp:16", epochs=3, seed=0)


def value_of(values: list[tuple[str, Any]], prefix: str) -> Any:
    """The value of the (first) expression statement starting with ``prefix``."""
    found = [v for source, v in values if source.startswith(prefix)]
    assert found, f"README.md has no example statement starting with {prefix!r}"
    return found[0]


@pytest.fixture(params=["sqlite", "postgres"])
def readme_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh database: a SQLite file, or a PostgreSQL database without the kernels."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'readme.db'}"
    server = request.getfixturevalue("pg_server")
    return server.create_database(f"dbdl_readme_{os.getpid()}_{uuid.uuid4().hex[:8]}")


def test_readme_has_the_examples() -> None:
    """The extraction finds the examples, and each one parses."""
    blocks = readme_blocks()
    assert len(blocks) >= 2
    for _, code in blocks:
        ast.parse(code)
    first = blocks[0][1]
    assert "con = dl.connect(url)" in first and "dl.install(con)" in first
    assert "DBDL_DATABASE" in first


def test_readme_examples_run(readme_url: str, tmp_path: Path, monkeypatch) -> None:
    """Run every README example in order on a fresh database and check what it claims."""
    monkeypatch.setenv("DBDL_DATABASE", readme_url)
    monkeypatch.chdir(tmp_path)
    tables = load_tables(readme_url)
    ns: dict[str, Any] = {"__name__": "readme"}
    values: list[tuple[str, Any]] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for line, code in readme_blocks():
            provide_givens(names_used(ast.parse(code)), ns, readme_url, tables)
            values += run_block(line, code, ns)
    try:
        check_results(ns, values, tables, readme_url, caught)
    finally:
        for name in ("con", "db"):
            if isinstance(ns.get(name), dl.Database):
                ns[name].engine.dispose()


def check_results(ns: dict[str, Any], values: list[tuple[str, Any]], tables: dict,
                  url: str, caught: list[warnings.WarningMessage]) -> None:
    """What the examples say they do, checked on their results."""
    # connect → install on a fresh database: PostgreSQL warns that the kernels are missing
    con = ns["con"]
    postgres = make_url(url).get_backend_name() == "postgresql"
    assert ns["url"] == url and con.engine.url.database == make_url(url).database
    assert con.missing is None and con.info["kernel_version"]
    install_warnings = [str(w.message) for w in caught if w.category is dl.InstallWarning]
    if postgres:
        assert len(install_warnings) == 1
        assert "not installed" in install_warnings[0] and "dbdl install" in install_warnings[0]
    else:
        assert install_warnings == []

    # the churn model learned, predicts labels, is stored and loads again
    customers = tables["customers"]
    model = ns["model"]
    assert isinstance(model, dl.DBModel) and len(model.history) == 10
    assert model.history["val_accuracy"].iloc[-1] > majority(customers["churned"]) + 0.05
    labels = value_of(values, "model.predict(df)")
    assert len(labels) == len(ns["df"]) and set(labels) <= {"yes", "no"}
    assert (labels == ns["df"]["churned"].to_numpy()).mean() > majority(customers["churned"])
    assert value_of(values, "dl.load_model(con").version == model.version
    assert model.name in set(value_of(values, "dl.list_models(con)")["name"])

    # 2 segments (sessions on PostgreSQL, processes on SQLite), 4 rounds each, and it learned
    m = ns["m"]
    assert m.history["val_accuracy"].iloc[-1] > majority(tables["events"]["label"]) + 0.1
    assert set(m.history["parallel_note"]) == {"2 segments, forced"}
    assert (m.history["workers"] == 2).all() and (m.history["combines"] >= 1).all()

    # one model per country; the new rows scored by their country's model or the fallback
    per_country = ns["per_country"]
    assert isinstance(per_country, dl.GroupedModel)
    assert sorted(per_country.models) == sorted(COUNTRIES)
    scored = value_of(values, "dl.predict(db, per_country.name")
    new_sales = tables["new_sales"]
    assert len(scored) == len(new_sales) and scored["prediction"].notna().all()
    assert sorted(scored["country"]) == sorted(new_sales["country"])

    # model selection: 2 x 2 x 2 configurations, the best well over chance (10 digits)
    best = ns["best"]
    assert len(best.leaderboard) == 8
    assert best.history["val_accuracy"].iloc[-1] > 0.5
