"""Citus benchmark: training on 1, 2, 4, 8 shards next to plain PostgreSQL, same total threads.

Run from the repository root (Citus installed for this machine's PostgreSQL, see
docs/scale-out.md)::

    .venv/bin/python benchmarks/bench_citus.py            # prints the table
    .venv/bin/python benchmarks/bench_citus.py --write    # ... and updates RESULTS.md

It starts a throwaway Citus cluster (``scripts/citus_cluster.py``: a coordinator and two
workers on 127.0.0.1) and a throwaway plain PostgreSQL 15 (``tests/pgserver.py``), loads the
same synthetic data into both (``bench_engine.make_data``: 32 numeric features, 4 classes; on
Citus a table distributed by ``id``), and for each shard count S trains the same model for the
same epochs twice, one after the other: on Citus with ``parallel=S`` (the packed table in S
shards, one partial model per shard per epoch) and on plain PostgreSQL with ``parallel=S``
(S warm segments, one partial model each). Both use one torch thread per partial model, so
the total thread count is S on both sides, and both average the partial models once per
epoch (``sync_every=1``). Each side runs ``--reps`` times (default 2) in the
order Citus, plain, plain, Citus, so that both see the shared machine's load in the same
phases; every run starts without warm server processes. Reported: validation accuracy after
the last epoch (first repetition), epoch 1 (which pays ``import torch`` in every new server
process; median of the repetitions) and the median over all repetitions of epochs 2..N of
the whole iteration (training query, evaluation, checkpoint), and, after each
Citus run, the memory of each worker node: the summed PSS (proportional set size: shared pages
split between the processes that map them) and RSS of its postmaster and all its children,
read from ``/proc``.

With S = 1 the one shard makes the training query a single-shard (router) query: the worker
runs the whole aggregate, there is no partial aggregate and no combine on the coordinator.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as bench_engine; the servers inherit it

import pandas as pd
from sqlalchemy import text

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "tests"))

import citus_cluster  # noqa: E402
from bench_engine import feature_names, make_data  # noqa: E402
from pgserver import PostgresServer, server_pythonpath  # noqa: E402

import dbdl_magic as dl  # noqa: E402
from dbdl_magic.events import Callbacks  # noqa: E402

RESULTS = ROOT / "benchmarks" / "RESULTS.md"
START, END = "<!-- bench_citus:start -->", "<!-- bench_citus:end -->"
TABLE = "citus_bench"


def log(message: str) -> None:
    print(f"[bench_citus] {message}", file=sys.stderr, flush=True)


TICKS = os.sysconf("SC_CLK_TCK")


def _postmaster(datadir: Path) -> int:
    return int((datadir / "postmaster.pid").read_text().split()[0])


def _children(postmaster: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == postmaster:  # field 4: ppid
                pids.append(int(entry.name))
    return pids


def cpu_seconds(datadirs: list[Path]) -> float:
    """CPU seconds used so far by this process and by the servers in ``datadirs``: each
    postmaster's own and its exited children's (cutime/cstime), plus its live children's."""
    used = sum(os.times()[:2])
    for datadir in datadirs:
        postmaster = _postmaster(datadir)
        for pid in [postmaster, *_children(postmaster)]:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # exited meanwhile: counted in the postmaster's cutime from now on
            ticks = fields[11:13] + (fields[13:15] if pid == postmaster else [])
            used += sum(int(t) for t in ticks) / TICKS
    return used


def node_memory(datadir: Path) -> dict[str, float]:
    """Summed PSS and RSS (MB) and the process count of the server running in ``datadir``."""
    postmaster = _postmaster(datadir)
    pids = [postmaster, *_children(postmaster)]
    pss = rss = 0
    for pid in pids:
        try:
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        for line in rollup.splitlines():
            key, _, value = line.partition(":")
            if key == "Pss":
                pss += int(value.split()[0])
            elif key == "Rss":
                rss += int(value.split()[0])
    return {"pss_mb": pss / 1024, "rss_mb": rss / 1024, "processes": len(pids)}


def train(
    db: Any, name: str, shards: int, options: dict[str, Any], datadirs: list[Path]
) -> dict[str, Any]:
    """One run (starting without warm server processes); its accuracy, epoch times and CPU
    seconds per epoch (this process and the servers in ``datadirs``)."""
    db.engine.dispose()  # closing the pooled sessions ends their server processes (on Citus
    # also the shard backends they hold on the workers)
    cpu = [cpu_seconds(datadirs)]
    started = time.perf_counter()
    model = dl.train(db, f"SELECT * FROM {TABLE}", name=name, parallel=shards,
                     callbacks=Callbacks(on_iteration=lambda row: cpu.append(
                         cpu_seconds(datadirs))), **options)
    h = model.history
    return {
        "accuracy": float(h["val_accuracy"].iloc[-1]),
        "seconds": h["seconds"].tolist(),
        "train_seconds": h["train_seconds"].tolist(),
        "cpu": [b - a for a, b in itertools.pairwise(cpu)],
        "workers": int(h["workers"].iloc[-1]),
        "note": str(h["parallel_note"].iloc[-1]),
        "wall": time.perf_counter() - started,
    }


def pooled(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Repetitions of one side: accuracy of the first, medians of epoch 1, of every epoch
    2..N of all repetitions, and of the wall times."""
    return {
        "accuracy": runs[0]["accuracy"],
        "accuracies": [r["accuracy"] for r in runs],
        "epoch1": statistics.median(r["seconds"][0] for r in runs),
        "later": statistics.median(t for r in runs for t in r["seconds"][1:]),
        "train_later": statistics.median(t for r in runs for t in r["train_seconds"][1:]),
        "cpu_later": statistics.median(t for r in runs for t in r["cpu"][1:]),
        "workers": runs[0]["workers"],
        "note": runs[0]["note"],
        "wall": statistics.median(r["wall"] for r in runs),
    }


def copy_frame(db: Any, frame: pd.DataFrame) -> None:
    """Create :data:`TABLE` (id, features, label) and fill it with COPY."""
    columns = ", ".join(
        ["id bigint"] + [f"{c} double precision" for c in feature_names()] + ["label integer"]
    )
    with db.engine.begin() as conn:
        conn.execute(text(f"DROP TABLE IF EXISTS {TABLE}"))
        conn.execute(text(f"CREATE TABLE {TABLE} ({columns})"))
        raw = conn.connection.driver_connection
        with raw.cursor() as cur, cur.copy(f"COPY {TABLE} FROM STDIN") as copy:
            for row in frame.itertuples(index=False):
                copy.write_row(row)
        conn.execute(text(f"CREATE INDEX ON {TABLE} (id)"))  # single-row predictions by id


def serving(db: Any, name: str, rows: int, probes: int = 20) -> dict[str, float]:
    """Row-level ``dbdl.predict`` over the whole table (rows/s, after one warm-up statement)
    and for single rows by id (median ms of ``probes`` statements)."""
    whole = text(f"SELECT count(dbdl.predict(CAST(:m AS text), to_jsonb(d))) FROM {TABLE} AS d")
    one = text(f"SELECT dbdl.predict(CAST(:m AS text), to_jsonb(d)) FROM {TABLE} AS d"
               " WHERE d.id = :i")
    with db.engine.connect() as conn:
        conn.execute(whole, {"m": name}).scalar_one()
        started = time.perf_counter()
        conn.execute(whole, {"m": name}).scalar_one()
        per_second = rows / (time.perf_counter() - started)
        latencies = []
        for i in range(probes):
            started = time.perf_counter()
            conn.execute(one, {"m": name, "i": (1 + 4999 * i) % rows}).scalar_one()
            latencies.append(time.perf_counter() - started)
    return {"rows_per_s": per_second, "row_ms": 1000 * statistics.median(latencies)}


def run(rows: int, epochs: int, shard_counts: list[int], reps: int) -> dict[str, Any]:
    """Start both databases, load the data, train every shard count ``reps`` times on each."""
    x, y = make_data(rows)
    frame = pd.DataFrame(x, columns=feature_names())
    frame.insert(0, "id", range(rows))
    frame["label"] = y
    options = dict(target="label", features=feature_names(), model="mlp:64,32", epochs=epochs,
                   lr=1e-3, batch_size=256, rows_per_buffer=2000, seed=0, threads=1,
                   sync_every=1.0)
    results: dict[str, Any] = {"rows": rows, "epochs": epochs, "reps": reps,
                               "options": options, "runs": []}
    cluster_dir, citus_url = citus_cluster.start_cluster(None, "dbdl", os.cpu_count() or 2)
    try:
        with PostgresServer.start(server_pythonpath(), max_workers=8) as plain:
            plain_url = plain.create_database("bench")
            citus_db, plain_db = dl.install(citus_url), dl.install(plain_url)
            copy_frame(citus_db, frame)
            copy_frame(plain_db, frame)
            with citus_db.engine.begin() as conn:
                conn.execute(text(f"SELECT create_distributed_table('{TABLE}', 'id')"))
            citus_dirs = [cluster_dir / node / "data" for node in citus_cluster.NODE_NAMES]
            for shards in shard_counts:
                runs: dict[str, list[dict[str, Any]]] = {"citus": [], "plain": []}
                # A B B A ...: both sides see the machine's load in the same phases
                order = [("citus", "plain"), ("plain", "citus")] * ((reps + 1) // 2)
                for rep, sides in enumerate(order[:reps]):
                    for side in sides:
                        log(f"{shards} shard(s), repetition {rep + 1}: {side}")
                        db, dirs = ((citus_db, citus_dirs) if side == "citus" else
                                    (plain_db, [plain.datadir]))
                        runs[side].append(
                            train(db, f"{side}_{shards}_{rep}", shards, options, dirs)
                        )
                        if side == "citus":
                            # the run's pooled coordinator session still holds the shard
                            # backends it warmed
                            runs[side][-1]["memory"] = {
                                node: node_memory(cluster_dir / node / "data")
                                for node in ("worker1", "worker2")
                            }
                citus = pooled(runs["citus"])
                citus["memory"] = runs["citus"][-1]["memory"]
                results["runs"].append(
                    {"shards": shards, "citus": citus, "plain": pooled(runs["plain"])}
                )
                log(str(results["runs"][-1]))
            last = shard_counts[-1]
            log("row-level dbdl.predict")
            results["serving"] = {"citus": serving(citus_db, f"citus_{last}_0", rows),
                                  "plain": serving(plain_db, f"plain_{last}_0", rows)}
            log(str(results["serving"]))
            citus_db.engine.dispose()
            plain_db.engine.dispose()
    finally:
        citus_cluster.stop_cluster(str(cluster_dir))
    return results


def table(results: dict[str, Any]) -> str:
    """The results as a Markdown table."""
    lines = [
        "| shards S (`parallel=S`) | Citus accuracy | plain PG accuracy | Citus epoch 1 s |"
        " plain epoch 1 s | Citus epochs 2..N s (median) | plain epochs 2..N s (median) |"
        " Citus ÷ plain (2..N) | CPU s per epoch 2..N, Citus / plain |"
        " run wall s, Citus / plain | memory per worker node: PSS / RSS MB (processes) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["runs"]:
        c, p = r["citus"], r["plain"]
        memory = "; ".join(
            f"{m['pss_mb']:.0f} / {m['rss_mb']:.0f} ({m['processes']})"
            for m in c["memory"].values()
        )
        lines.append(
            f"| {r['shards']} | {c['accuracy']:.4f} | {p['accuracy']:.4f} | {c['epoch1']:.2f} |"
            f" {p['epoch1']:.2f} | {c['later']:.3f} | {p['later']:.3f} |"
            f" {c['later'] / p['later']:.2f}× | {c['cpu_later']:.2f} / {p['cpu_later']:.2f} |"
            f" {c['wall']:.1f} / {p['wall']:.1f} | {memory} |"
        )
    return "\n".join(lines)


def serving_table(results: dict[str, Any]) -> str:
    """Row-level prediction: the whole table and single rows, Citus next to plain."""
    c, p = results["serving"]["citus"], results["serving"]["plain"]
    return "\n".join([
        f"Row-level `dbdl.predict(model, to_jsonb(d))` with the S = {results['runs'][-1]['shards']}"
        f" model over the same table ({results['rows']:,} rows; on Citus distributed by `id` in "
        "32 shards, so the function runs in the shard tasks on the workers, which read the "
        "model from the coordinator as the same role; warm: after one statement):",
        "",
        "| | whole table, rows/s | one row by id, ms (median of 20) |",
        "|---|---|---|",
        f"| Citus | {c['rows_per_s']:,.0f} | {c['row_ms']:.1f} |",
        f"| plain PostgreSQL | {p['rows_per_s']:,.0f} | {p['row_ms']:.1f} |",
    ])


def section(results: dict[str, Any]) -> str:
    """The RESULTS.md section: what ran, on what, and the table."""
    o = results["options"]
    cpu = platform.processor() or platform.machine()
    return "\n".join([
        START,
        f"## Citus (bench_citus, {dt.date.today().isoformat()})",
        "",
        f"Machine: {os.cpu_count()} cores ({cpu}), shared with other work; Python "
        f"{platform.python_version()}, PostgreSQL 15, Citus 13.0.5 built from source. One "
        "coordinator and two workers on 127.0.0.1 (`scripts/citus_cluster.py`), so the three "
        "nodes and the plain server share the same cores: the ratios compare, absolute times "
        "do not scale out here.",
        "",
        f"Data: `bench_engine.make_data({results['rows']:,})` (32 features, 4 classes; 80 % "
        f"training rows in buffers of {o['rows_per_buffer']} rows), `{o['model']}`, Adam lr "
        f"{o['lr']}, batch {o['batch_size']}, {results['epochs']} epochs, one torch thread per "
        "partial model on both sides, one sync per epoch on both (`sync_every=1`: by default "
        "plain PostgreSQL's segments sync a model this small several times per epoch). "
        "Citus: the packed table in S shards (`parallel=S`); "
        "plain PostgreSQL: S warm segments (`parallel=S`). Each side ran "
        f"{results['reps']} times per S, in the order Citus, plain, plain, Citus. Accuracy on "
        "the validation rows after the last epoch (first run); epoch 1 and wall: medians of "
        "the runs; epochs 2..N: median over every run's epochs 2..N. Epoch times are whole "
        "iterations (training, evaluation, checkpoint). Every run starts without warm server "
        "processes; plain PostgreSQL with "
        "S ≥ 2 opens its segments (each imports torch) before epoch 1 starts, so its epoch 1 "
        "leaves that out: the run's wall time (packing, opening, every epoch) has it on both "
        "sides. CPU: user + system seconds per epoch of the client process and every "
        "server process (all three Citus nodes, or the plain server), from `/proc` at each "
        "epoch's end; unlike the epoch times it hardly depends on what else runs on the "
        "machine. Memory: after the run, each worker node's postmaster and children "
        "(warm shard backends holding torch), from `/proc/<pid>/smaps_rollup`.",
        "",
        table(results),
        "",
        "S = 1 on Citus: one shard, so the training query is a single-shard query: the worker "
        "runs the whole aggregate, with no partial aggregate and no combine on the coordinator.",
        "",
        serving_table(results),
        END,
    ])


def write(results: dict[str, Any]) -> None:
    """Replace the section in RESULTS.md (read fresh: others append to it), or append it."""
    current = RESULTS.read_text()
    block = section(results)
    if START in current and END in current:
        head, rest = current.split(START, 1)
        updated = head + block + rest.split(END, 1)[1]
    else:
        updated = current.rstrip("\n") + "\n\n" + block + "\n"
    RESULTS.write_text(updated)
    log(f"updated {RESULTS}")


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--reps", type=int, default=2, help="runs per shard count and side")
    parser.add_argument("--shards", default="1,2,4,8", help="comma-separated shard counts")
    parser.add_argument("--write", action="store_true", help="update benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    results = run(args.rows, args.epochs, [int(s) for s in args.shards.split(",")], args.reps)
    print(section(results))
    if args.write:
        write(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
