"""PostgreSQL's bulk prediction: one statement scores a staged table into a result table.

The staged rows (a table whose physical order is the row order) are read a range of heap
pages at a time (a TID range scan: no sort, no row numbers). Each range's key columns are
aggregated into arrays and its raw feature values into one ``double precision[]``, whose image
the kernel scores in one call (:func:`dbdl_magic.kernel.plpython.predict_batch`); the keys and
the predictions are unnested side by side into the result.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from sqlalchemy import text
from sqlalchemy.engine import Connection

from dbdl_magic.kernel.catalog import checkpoint_sql

if TYPE_CHECKING:
    from dbdl_magic.backends.base import Scoring
    from dbdl_magic.backends.postgres import PostgresBackend

#: row numbers of the result: (first page of the range) * 2^24 + position in the range
_RN_PAGE = 16777216


def predict_into(backend: PostgresBackend, conn: Connection, job: Scoring) -> None:
    """Create ``job.result`` from ``job.source`` (see :class:`Scoring`) in one statement."""
    q = backend.q
    source, keys, outputs = job.source, job.keys, job.outputs
    name = source.replace("\\:", ":")
    pages, step = _page_ranges(conn, source, name, job.rows_per_buffer)
    values: dict[str, Any] = {
        **job.params, **job.key, "last_page": max(pages - 1, 0), "step": step,
        "config": json.dumps({**job.config, "proba": len(outputs) > 1}),
    }
    row_sql = raw_row_sql(backend, job.features, values)
    by_tid = any(k in array_columns(conn, name) for k in keys)
    gathered = ["s.ctid"] if by_tid else [f"s.{q(k)}" for k in keys]
    aggs = [f"array_agg({g}) AS a{i}" for i, g in enumerate(gathered)]
    outs, made, predicted = _outputs(job.config["task"], job.classes, outputs, values)
    names = [f"a{i}" for i in range(len(gathered))] + [f"v{j}" for j in range(len(outs))]
    kept = [f"t.{q(k)}" for k in keys] if by_tid else [f"u.a{i}" for i in range(len(keys))]
    selected = ([f"CAST(g.p AS bigint) * {_RN_PAGE} + u.i AS {q('__dbdl_rn')}"] if job.with_rn
                else []) + [f"{k} AS {q(c)}" for k, c in zip(kept, keys, strict=True)]
    selected += [f"{e} AS {q(c)}" for e, c in zip(predicted, outputs, strict=True)]
    backend.kernel_settings(conn)
    pages_of = _pages_condition(conn, backend.server_major(conn))
    conn.execute(text("SET LOCAL max_parallel_workers_per_gather = 0"))
    conn.execute(
        text(
            f"CREATE TABLE {job.result} AS SELECT {', '.join(selected)}"
            " FROM generate_series(0, CAST(:last_page AS integer), CAST(:step AS integer))"
            " AS g(p)"
            " CROSS JOIN LATERAL (SELECT "
            + ", ".join([*aggs, f"dbdl.array_image(array_agg({row_sql})) AS x"])
            + f" FROM {source} AS s"
            f" WHERE {pages_of}) AS b"
            " CROSS JOIN LATERAL dbdl.predict_batch(b.x,"
            f" ({checkpoint_sql(backend.store_tables())}), CAST(:config AS text)) AS r"
            f" CROSS JOIN LATERAL (SELECT {made} OFFSET 0) AS o"
            f" CROSS JOIN LATERAL unnest({', '.join(f'b.a{i}' for i in range(len(gathered)))}"
            f"{', ' if gathered else ''}{', '.join(outs)}) WITH ORDINALITY"
            f" AS u({', '.join(names)}, i)"
            + (f" JOIN {source} AS t ON t.ctid = u.a0" if by_tid else "")
        ),
        values,
    )


def _page_ranges(conn: Connection, source: str, name: str, rows_per_buffer: int
                 ) -> tuple[int, int]:
    """The pages of ``source`` and how many pages make a range of about ``rows_per_buffer``
    rows (rows per page taken from the first page, a TID range scan of one page)."""
    pages = int(conn.execute(
        text("SELECT pg_relation_size(CAST(:t AS regclass))"
             " / CAST(current_setting('block_size') AS bigint)"),
        {"t": name},
    ).scalar_one())
    rows = int(conn.execute(
        text(f"SELECT count(*) FROM {source} WHERE ctid < CAST('(1,0)' AS tid)")
    ).scalar_one()) * max(pages, 1)
    return pages, max(1, -(-rows_per_buffer * max(pages, 1) // max(rows, 1)))


def _outputs(
    task: str, classes: list[Any], outputs: list[str], values: dict[str, Any]
) -> tuple[list[str], str, list[str]]:
    """What the kernel's result unnests into (``outs``), the arrays made of it (``made``) and
    each output column's expression (``predicted``); class labels are bound into ``values``."""
    if task == "classification":
        whens = []
        for j, cls in enumerate(classes):
            values[f"c{j}"] = cls
            whens.append(f"WHEN {j} THEN :c{j}")
        outs = ["o.labels"] + [
            f"o.proba[{j} * r.n + 1 : {j + 1} * r.n]" for j in range(len(outputs) - 1)
        ]
        made = ("dbdl.int4_array(r.labels) AS labels, dbdl.float4_array(r.proba) AS proba"
                if len(outputs) > 1 else "dbdl.int4_array(r.labels) AS labels")
        predicted = [f"CASE u.v0 {' '.join(whens)} END"]
    else:
        outs, made = ["o.vals"], "dbdl.float8_array(r.vals) AS vals"
        predicted = ["u.v0"]
    return outs, made, predicted + [f"u.v{j}" for j in range(1, len(outputs))]


def _pages_condition(conn: Connection, server_major: int) -> str:
    """``s`` lies in pages ``g.p`` .. ``g.p + :step - 1``."""
    if server_major >= 14:  # a memo of each range's arrays would only copy them
        conn.execute(text("SET LOCAL enable_memoize = off"))
        return ("s.ctid >= CAST(format('(%s,0)', g.p) AS tid) AND s.ctid <"
                " CAST(format('(%s,0)', g.p + CAST(:step AS integer)) AS tid)")
    # no TID range scans before PostgreSQL 14: every TID the pages can hold
    # (MaxHeapTuplesPerPage: 291 items on 8 kB pages)
    return ("s.ctid = ANY(CAST(ARRAY(SELECT format('(%s,%s)', pp, oo) FROM"
            " generate_series(g.p, g.p + CAST(:step AS integer) - 1) AS pp,"
            " generate_series(1, (CAST(current_setting('block_size') AS integer)"
            " - 24) / 28) AS oo) AS tid[]))")


def raw_row_sql(backend: PostgresBackend, features: list[dict[str, Any]],
                params: dict[str, Any]) -> str:
    """One row's raw feature values as a ``double precision[]``: numeric values (NULL
    replaced by the imputed value), the index of a categorical value among the model's
    categories (-1: none of them), array elements in storage order."""
    scalars: list[str] = []
    parts: list[str] = []
    for i, f in enumerate(features):
        col = f"s.{backend.q(f['name'])}"
        if f["kind"] == "numeric":
            value = f"CAST({col} AS double precision)"
            if f.get("impute") is not None:
                params[f"f{i}_i"] = f["impute"]
                value = f"COALESCE({value}, CAST(:f{i}_i AS double precision))"
            scalars.append(value)
        elif f["kind"] == "categorical":
            whens = []
            for j, cat in enumerate(f["categories"]):
                params[f"f{i}_c{j}"] = cat
                whens.append(f"WHEN {col} = :f{i}_c{j} THEN {j}")
            scalars.append(f"CAST(CASE {' '.join(whens)} ELSE -1 END AS double precision)"
                           if whens else "CAST(-1 AS double precision)")
        else:
            if scalars:
                parts.append(f"ARRAY[{', '.join(scalars)}]")
                scalars = []
            parts.append(f"ARRAY(SELECT CAST(e.v AS double precision) FROM unnest({col})"
                         " AS e(v))")
    if scalars:
        parts.append(f"ARRAY[{', '.join(scalars)}]")
    return " || ".join(parts)


def array_columns(conn: Connection, table: str) -> set[str]:
    """The columns of ``table`` whose type is an array (array_agg would nest them)."""
    return set(conn.execute(
        text("SELECT a.attname FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid"
             " WHERE a.attrelid = CAST(:t AS regclass) AND a.attnum > 0"
             " AND NOT a.attisdropped AND t.typcategory = 'A'"),
        {"t": table},
    ).scalars())


__all__ = ["array_columns", "predict_into", "raw_row_sql"]
