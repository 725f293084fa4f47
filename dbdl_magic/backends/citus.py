"""Citus: the packed table distributed over the run's shards, and where those shards are.

On a Citus coordinator the training aggregate is pushed down to the shards of the packed
table: every shard that holds buffers trains one partial model per sync, and the coordinator
combines them. So the run, not ``citus.shard_count``, chooses the shard count, and the shard
tasks stay in warm worker backends between iterations (one cached connection per shard a node
holds). Everything else is plain PostgreSQL (:mod:`postgres`).
"""

from __future__ import annotations

import json

from sqlalchemy import text
from sqlalchemy.engine import Connection


def installed(conn: Connection) -> bool:
    """Whether the Citus extension is installed in this database."""
    return bool(
        conn.execute(text("SELECT count(*) FROM pg_extension WHERE extname = 'citus'")).scalar()
    )


def worker_nodes(conn: Connection) -> list[tuple[str, int]]:
    """The active primary worker nodes of a Citus coordinator (host, port)."""
    return [
        (str(h), int(p)) for h, p in conn.execute(text(
            "SELECT nodename, nodeport FROM pg_dist_node WHERE isactive"
            " AND noderole = 'primary' AND groupid <> 0 ORDER BY nodename, nodeport"
        )).all()
    ]


def distribute_packed(conn: Connection, packed: str, parallel: int | str) -> None:
    """Spread the packed buffers (table ``packed``, as ``regclass`` text) over ``parallel``
    shards (``"auto"``: one per worker node) and truncate the local copy the coordinator keeps
    after distributing; cache as many connections per worker as a node holds shards."""
    nodes = len(worker_nodes(conn))
    shards = max(1, nodes) if parallel == "auto" else int(parallel)
    conn.execute(
        text("SELECT create_distributed_table(CAST(:t AS regclass), 'buffer_id',"
             " shard_count => CAST(:n AS integer))"),
        {"t": packed, "n": shards},
    )
    conn.execute(
        text("SELECT truncate_local_data_after_distributing_table(CAST(:t AS regclass))"),
        {"t": packed},
    )
    per_node = -(-shards // max(1, nodes))
    cached = int(conn.execute(text("SHOW citus.max_cached_conns_per_worker")).scalar_one())
    # Citus keeps 1 connection per worker by default and closes the rest after a query
    conn.execute(
        text("SELECT set_config('citus.max_cached_conns_per_worker', CAST(:n AS text), false)"),
        {"n": max(per_node, cached)},
    )


def distribution(conn: Connection, packed: str) -> dict[str, int] | None:
    """The shards of table ``packed`` (``regclass`` text), the worker nodes they are on, and
    the fewest cores among those nodes; None when the table is not distributed."""
    placed = conn.execute(text(
        "SELECT s.shardid, p.nodename, p.nodeport FROM pg_dist_shard s"
        " JOIN pg_dist_shard_placement p ON p.shardid = s.shardid"
        " WHERE s.logicalrelid = CAST(:t AS regclass)"
    ), {"t": packed}).all()
    if not placed:
        return None
    cpus = conn.execute(text(
        "SELECT result FROM run_command_on_workers($$SELECT dbdl.kernel_info()$$)"
        " WHERE success"
    )).scalars().all()
    node_cpus = [int(json.loads(c).get("cpus") or 1) for c in cpus] or [1]
    return {
        "shards": len({r[0] for r in placed}),
        "nodes": len({(r[1], r[2]) for r in placed}),
        "cpus": min(node_cpus),
    }


__all__ = ["distribute_packed", "distribution", "installed", "worker_nodes"]
