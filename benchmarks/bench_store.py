"""Model-store benchmark: deduplication ratios, load times and in-database prediction throughput.

Run from the repository root::

    .venv/bin/python benchmarks/bench_store.py --quick          # < 2 min, writes nothing
    .venv/bin/python benchmarks/bench_store.py --quick --write  # ... and updates RESULTS.md
    .venv/bin/python benchmarks/bench_store.py --full           # ~15-30 min, updates RESULTS.md

Six measurements in one run, on synthetic data (32 numeric features, 4 classes from a seeded
nonlinear rule; fine-tunes see a *drifted* rule), Adam lr 1e-3, batch 256, 2 torch threads
for the timed parts (training, which is not timed, uses 1):

1. ``storage``: bytes the block store keeps ÷ naive bytes (every checkpoint stored in full,
   i.e. the sum of the checkpoints' ``logical_bytes``) for (a) the per-iteration checkpoints
   of one run, with lossless deltas off and on; (b-d) head-only, last-two-layers and full
   fine-tunes of a base model, counting only the fine-tune's own new blocks (``new_bytes``),
   with exact dedup only (``deltas=False``) and with deltas; plus an approximate serving copy
   (``dl.serving_copy``, accuracy budget 0.01) of each fine-tune. Every variant gets its own
   SQLite file (copied from one template holding the base model), so no variant can
   deduplicate against another. The block store code is the same on PostgreSQL (it runs in
   PL/Python there), so this part runs on SQLite only.
2. ``load``: ``dl.load_model`` from the store (SQLite and PostgreSQL) vs the same weights
   from a safetensors file (``safetensors.torch.load_file``) and from
   ``torch.load(weights_only=True)`` of a ``state_dict``, for a ~1M and a ~10M parameter MLP;
   medians of repeats that rotate through the sources (warm caches for all of them).
3. ``predict``: ``dl.predict(db, name, query, into="scores")`` vs two client paths that end
   with the predictions in a table: ``pandas.read_sql`` + ``model.predict`` + write back, and
   the fastest client path (PostgreSQL binary COPY out parsed by numpy, the module, binary COPY
   back; SQLite the driver's cursor into numpy, the module, executemany), on ≥ 1M rows × 32
   features (quick: 100k). The database variant's time is split by SQL statement (SQLAlchemy
   cursor events) and, on PostgreSQL, by dbdl function (``pg_stat_user_functions``).
4. ``rows``: row-level SQL prediction (one kernel call per row) over 100k rows (quick: 5k), the
   JSON and numeric forms.
5. ``pack``: SQLite packing of 1M rows × 32 features (quick: 100k) as a training run does it
   (stage the query, encoding statistics, pack into buffers, drop the stage) vs
   ``pandas.read_sql`` of the same query, in one process, alternating, split by step; plus the
   SQL path the code took before (column-type scan, statistics aggregates, ``dbdl_pack``), once,
   checked to give the same buffers (fingerprint).
6. ``concurrent``: 4 sessions (threads, each with its own engine and connection) predicting
   ``pred_data`` on PostgreSQL into their own tables at once, vs one session alone: no errors,
   identical predictions, aggregate rows/s.

``--before REV`` runs parts 2-4 and 6 on the code of git revision REV first (exported to a temp dir,
with its own PostgreSQL server) for a before/after table.

A throwaway PostgreSQL server with PL/Python is started with ``tests/pgserver.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import sqlite3
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

# As in bench_engine.py: idle OpenMP threads sleep instead of spinning. Read when torch loads
# (hence before the imports below); the PostgreSQL server inherits it, so the client and the
# database get the same setting. Export OMP_WAIT_POLICY yourself to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import pandas as pd
import torch
from bench_engine import fmt_params, machine_facts, table, wait_quiet
from safetensors.torch import load_file, save_file
from sqlalchemy import event, text

import dbdl_magic as dl
from dbdl_magic.api import Database
from dbdl_magic.kernel.blockstore import block_hash, split_state
from dbdl_magic.kernel.netbuild import build_network
from dbdl_magic.store import registry

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
BEGIN, END = "<!-- store:begin -->", "<!-- store:end -->"
N_FEATURES = 32
N_CLASSES = 4
THREADS = 2
SEED = 0
STORE_MODEL = "mlp:256,128"  # layers 0, 2, 4 hold weights
BUDGET = 0.01
FEATURES = [f"f{i}" for i in range(N_FEATURES)]
COMMON = {
    "target": "label",
    "batch_size": 256,
    "optimizer": "adam",
    "lr": 1e-3,
    # Training speed is not measured here: one thread avoids OpenMP threads spinning against
    # other processes on a busy two-core machine. Training in SQLite runs in this process and
    # sets its torch threads, so measurements reset them to THREADS (see ``setup_done``).
    "threads": 1,
    "validation": 0.2,
    "device": "cpu",
}
#: name, freeze option, layers frozen (indices into the Sequential)
FINE_TUNES = [
    ("head only", "all_but_last", [0, 2]),
    ("last two layers", [0], [0]),
    ("full", None, []),
]


@dataclass
class Mode:
    """Sizes of one benchmark mode."""

    name: str
    store_rows: int  # rows of the training and fine-tuning tables
    run_epochs: int  # checkpoints of the per-iteration run (plus the initial one)
    base_epochs: int
    ft_epochs: int
    load_models: list[str]
    load_repeats: int
    predict_rows: int
    predict_repeats: int
    row_rows: int  # rows scored one SQL call at a time (row-level prediction)
    quiet: float  # seconds to wait at most for an idle machine before a timed measurement
    pack_rows: int = 100_000  # rows of the SQLite packing benchmark
    pack_repeats: int = 2
    sessions: int = 4  # concurrent prediction sessions (PostgreSQL)


QUICK = Mode(
    "quick",
    store_rows=5_000,
    run_epochs=5,
    base_epochs=2,
    ft_epochs=2,
    load_models=["mlp:1024,1024"],
    load_repeats=5,
    predict_rows=100_000,
    predict_repeats=1,
    row_rows=5_000,
    quiet=0.0,
    pack_rows=100_000,
    pack_repeats=2,
)
FULL = Mode(
    "full",
    store_rows=20_000,
    run_epochs=20,
    base_epochs=10,
    ft_epochs=5,
    load_models=["mlp:1024,1024", "mlp:3072,3072"],
    load_repeats=7,
    predict_rows=1_000_000,
    predict_repeats=3,
    row_rows=100_000,
    quiet=20.0,
    pack_rows=1_000_000,
    pack_repeats=3,
)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def mb(n: float) -> str:
    return f"{n / 1e6:.2f}"


# -- data -----------------------------------------------------------------------------------------
def make_features(rows: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, N_FEATURES))


def make_labels(x: np.ndarray, drift: float = 0.0, seed: int = SEED) -> np.ndarray:
    """Argmax of a seeded random tanh network of ``x``; ``drift`` perturbs its first layer
    (the fine-tuning data follows a related but different rule)."""
    rule = np.random.default_rng(seed + 1)
    w1 = rule.standard_normal((N_FEATURES, 16)) / np.sqrt(N_FEATURES) * 2.0
    w2 = rule.standard_normal((16, N_CLASSES))
    w1 = w1 + drift * np.random.default_rng(seed + 2).standard_normal(w1.shape) / np.sqrt(
        N_FEATURES
    )
    return (np.tanh(x @ w1) @ w2).argmax(axis=1).astype(np.int64)


def labelled(rows: int, seed: int, drift: float = 0.0) -> dict[str, np.ndarray]:
    x = make_features(rows, seed)
    return {**{c: x[:, i] for i, c in enumerate(FEATURES)}, "label": make_labels(x, drift)}


def unlabelled(rows: int, seed: int) -> dict[str, np.ndarray]:
    x = make_features(rows, seed)
    return {"id": np.arange(rows, dtype=np.int64), **{c: x[:, i] for i, c in enumerate(FEATURES)}}


def write_sqlite(path: Path, name: str, columns: dict[str, np.ndarray]) -> None:
    """(Re)create table ``name`` with executemany in chunks (int64 → INTEGER, else REAL)."""
    decl = ", ".join(
        f"{c} {'INTEGER' if v.dtype.kind == 'i' else 'REAL'}" for c, v in columns.items()
    )
    marks = ", ".join("?" * len(columns))
    n = len(next(iter(columns.values())))
    with contextlib.closing(sqlite3.connect(path)) as con:
        con.execute(f"DROP TABLE IF EXISTS {name}")
        con.execute(f"CREATE TABLE {name} ({decl})")
        for start in range(0, n, 100_000):
            parts = [v[start : start + 100_000].tolist() for v in columns.values()]
            con.executemany(f"INSERT INTO {name} VALUES ({marks})", zip(*parts, strict=True))
        con.commit()


def write_postgres(conninfo: str, name: str, columns: dict[str, np.ndarray]) -> None:
    """(Re)create table ``name`` with one binary COPY built by numpy (int64 → bigint)."""
    import psycopg

    fields: list[tuple[str, str]] = [("count", ">i2")]
    for c in columns:
        fields += [(f"len_{c}", ">i4"), (c, ">i8" if columns[c].dtype.kind == "i" else ">f8")]
    decl = ", ".join(
        f"{c} {'bigint' if v.dtype.kind == 'i' else 'double precision'}" for c, v in columns.items()
    )
    n = len(next(iter(columns.values())))
    with psycopg.connect(conninfo) as con:
        con.execute(f"DROP TABLE IF EXISTS {name}")
        con.execute(f"CREATE TABLE {name} ({decl})")
        with con.cursor() as cur, cur.copy(f"COPY {name} FROM STDIN (FORMAT BINARY)") as copy:
            copy.write(b"PGCOPY\n\xff\r\n\x00" + b"\x00" * 8)
            for start in range(0, n, 100_000):
                stop = min(start + 100_000, n)
                rec = np.empty(stop - start, dtype=np.dtype(fields))
                rec["count"] = len(columns)
                for c, v in columns.items():
                    rec[f"len_{c}"] = 8
                    rec[c] = v[start:stop]
                copy.write(rec.tobytes())
            copy.write(b"\xff\xff")
        con.execute(f"ANALYZE {name}")


def fresh_sqlite(path: Path) -> str:
    """A new SQLite file with the kernels installed; returns its URL."""
    url = f"sqlite:///{path}"
    dl.install(url).engine.dispose()  # sets the 64 KiB page size first
    return url


def copy_sqlite(src: Path, dst: Path) -> str:
    """Copy a SQLite database file with the backup API; returns the copy's URL."""
    with (
        contextlib.closing(sqlite3.connect(src)) as source,
        contextlib.closing(sqlite3.connect(dst)) as copy,
    ):
        source.backup(copy)
    return f"sqlite:///{dst}"


@dataclass
class Targets:
    """The SQLite file and PostgreSQL database of the load and predict benchmarks."""

    sqlite_path: Path
    pg_url: str | None
    pg_conninfo: str | None
    tmp: Path

    def urls(self) -> dict[str, str]:
        out = {"sqlite": f"sqlite:///{self.sqlite_path}"}
        if self.pg_url:
            out["postgresql"] = self.pg_url
        return out

    def load(self, name: str, columns: dict[str, np.ndarray]) -> None:
        started = time.perf_counter()
        write_sqlite(self.sqlite_path, name, columns)
        if self.pg_conninfo:
            write_postgres(self.pg_conninfo, name, columns)
        rows = len(next(iter(columns.values())))
        log(f"loaded {rows:,} rows into {name} ({time.perf_counter() - started:.1f} s)")


@contextlib.contextmanager
def databases(use_postgres: bool) -> Iterator[Targets]:
    """A temporary directory with a SQLite file and (optionally) a throwaway PostgreSQL server."""
    with tempfile.TemporaryDirectory(prefix="dbdl-store-bench-") as tmp:
        path = Path(tmp) / "bench.db"
        fresh_sqlite(path)
        if not use_postgres:
            yield Targets(path, None, None, Path(tmp))
            return
        sys.path.insert(0, str(ROOT / "tests"))
        from pgserver import PostgresServer, server_pythonpath, unavailable_reason

        reason = unavailable_reason()
        if reason:
            raise SystemExit(f"PostgreSQL unavailable ({reason}); use --no-postgres")
        with PostgresServer.start(server_pythonpath()) as server:
            url = server.create_database("bench")
            dl.install(url).engine.dispose()
            yield Targets(path, url, server.conninfo("bench"), Path(tmp))


# -- store accounting -----------------------------------------------------------------------------
def scalar(db: Database, sql: str, **params: Any) -> Any:
    with db.engine.connect() as conn:
        return conn.execute(text(sql), params).scalar_one()


def checkpoint_bytes(db: Database, name: str) -> dict[str, Any]:
    """Naive (logical), newly stored and hot-copy bytes of every checkpoint of ``name``."""
    ck = db.backend.table("checkpoints")
    with db.engine.connect() as conn:
        rows = conn.execute(
            text(
                f"SELECT iteration, logical_bytes, new_bytes, coalesce(length(state), 0)"
                f" FROM {ck} WHERE name = :n ORDER BY iteration"
            ),
            {"n": name},
        ).all()
    listed = dl.list_models(db).set_index("name").loc[name]
    later = [new / logical for _, logical, new, _ in rows[1:]]  # after the initial state
    return {
        "checkpoints": len(rows),
        "naive": sum(r[1] for r in rows),
        "new": sum(r[2] for r in rows),
        "hot": sum(r[3] for r in rows),
        "listed_stored": int(listed["stored_bytes"]),
        "per_checkpoint": median(later),
    }


def blocks_beyond(db: Database, name: str, iteration: int, other: str, prefix: str = "") -> int:
    """Bytes of the blocks of ``name``'s checkpoint ``iteration`` (labels starting with
    ``prefix``) that ``other`` does not reference: what keeping it costs on top of ``other``."""
    b, cb = db.backend.table("blocks"), db.backend.table("checkpoint_blocks")
    return int(
        scalar(
            db,
            f"SELECT coalesce(sum(length(b.data)), 0) FROM {b} AS b WHERE b.hash IN"
            f" (SELECT hash FROM {cb} WHERE name = :n AND iteration = :i AND label LIKE :p)"
            f" AND b.hash NOT IN (SELECT hash FROM {cb} WHERE name = :o)",
            n=name,
            i=iteration,
            p=prefix + "%",
            o=other,
        )
    )


def logical_of(db: Database, name: str, iteration: int, prefix: str = "") -> int:
    """Raw bytes of ``name``'s checkpoint ``iteration`` (labels starting with ``prefix``)."""
    b, cb = db.backend.table("blocks"), db.backend.table("checkpoint_blocks")
    return int(
        scalar(
            db,
            f"SELECT coalesce(sum(b.raw_size), 0) FROM {cb} AS cb JOIN {b} AS b"
            " ON b.hash = cb.hash WHERE cb.name = :n AND cb.iteration = :i AND cb.label LIKE :p",
            n=name,
            i=iteration,
            p=prefix + "%",
        )
    )


def frozen_sharing(db: Database, name: str, base: str, layers: list[int]) -> tuple[int, int]:
    """(blocks of frozen layers also referenced by ``base``, blocks of frozen layers)."""
    if not layers:
        return 0, 0
    cb = db.backend.table("checkpoint_blocks")
    like = " OR ".join(f"label LIKE 'model.{i}.%'" for i in layers)
    with db.engine.connect() as conn:
        mine = {
            bytes(r[0])
            for r in conn.execute(
                text(f"SELECT hash FROM {cb} WHERE name = :n AND ({like})"), {"n": name}
            )
        }
        theirs = {
            bytes(r[0])
            for r in conn.execute(text(f"SELECT hash FROM {cb} WHERE name = :n"), {"n": base})
        }
    return len(mine & theirs), len(mine)


# -- benchmark 1: storage -------------------------------------------------------------------------
def bench_storage(mode: Mode, tmp: Path) -> dict[str, list[dict[str, Any]]]:
    train_data = labelled(mode.store_rows, SEED)
    runs = []
    for deltas in (False, True):
        path = tmp / f"run_deltas_{deltas}.db"
        url = fresh_sqlite(path)
        write_sqlite(path, "store_data", train_data)
        db = dl.connect(url)
        started = time.perf_counter()
        model = dl.train(
            db,
            "SELECT * FROM store_data",
            name="run",
            model=STORE_MODEL,
            epochs=mode.run_epochs,
            deltas=deltas,
            seed=SEED,
            **COMMON,
        )
        wall = time.perf_counter() - started
        history = model.history
        row = {
            "deltas": deltas,
            "model": STORE_MODEL,
            "params": sum(p.numel() for p in model.parameters()),
            "train_wall": wall,
            "archive_share": float((history["seconds"] - history["train_seconds"]).sum()) / wall,
            "accuracy": float(history["val_accuracy"].iloc[-1]),
            **checkpoint_bytes(db, "run"),
        }
        db.engine.dispose()
        log(
            f"run deltas={deltas}: {row['checkpoints']} checkpoints, naive {mb(row['naive'])} MB,"
            f" stored {mb(row['new'])} MB ({row['new'] / row['naive']:.3f})"
        )
        runs.append(row)

    # one template with the base model; every fine-tune variant gets its own copy
    template = tmp / "ft_template.db"
    url = fresh_sqlite(template)
    write_sqlite(template, "store_data", train_data)
    write_sqlite(template, "ft_data", labelled(mode.store_rows, SEED + 10, drift=0.6))
    write_sqlite(template, "ft_holdout", labelled(5_000, SEED + 20, drift=0.6))
    db = dl.connect(url)
    dl.train(
        db,
        "SELECT * FROM store_data",
        name="base",
        model=STORE_MODEL,
        epochs=mode.base_epochs,
        seed=SEED,
        **COMMON,
    )
    base_holdout = float(
        (
            dl.load_model(db, "base", device="cpu").predict(
                pd.read_sql("SELECT * FROM ft_holdout", db.engine)
            )
            == pd.read_sql("SELECT label FROM ft_holdout", db.engine)["label"].to_numpy()
        ).mean()
    )
    db.engine.dispose()
    log(
        f"base model: {mode.base_epochs} epochs, accuracy on the drifted hold-out"
        f" {base_holdout:.4f}"
    )

    finetunes = []
    for label, freeze, frozen in FINE_TUNES:
        for deltas in (False, True):
            path = tmp / f"ft_{label.replace(' ', '_')}_{deltas}.db"
            db = dl.connect(copy_sqlite(template, path))
            tuned = dl.train(
                db,
                "SELECT * FROM ft_data",
                name="ft",
                model=STORE_MODEL,
                epochs=mode.ft_epochs,
                init_from="base",
                freeze=freeze,
                deltas=deltas,
                seed=SEED + 1,
                **COMMON,
            )
            stats = checkpoint_bytes(db, "ft")
            shared, total = frozen_sharing(db, "ft", "base", frozen)
            final = stats["checkpoints"] - 1
            row = {
                "variant": label,
                "frozen": frozen,
                "deltas": deltas,
                "accuracy": float(tuned.history["val_accuracy"].iloc[-1]),
                "frozen_shared": shared,
                "frozen_blocks": total,
                "final_beyond_base": blocks_beyond(db, "ft", final, "base"),
                "final_logical": logical_of(db, "ft", final),
                "final_weights_beyond_base": blocks_beyond(db, "ft", final, "base", "model."),
                "final_weights": logical_of(db, "ft", final, "model."),
                **stats,
            }
            if not deltas:  # the serving copy does not depend on how the fine-tune was stored
                row["serving"] = serving_stats(db, "ft", "base")
            db.engine.dispose()
            log(
                f"fine-tune {label} deltas={deltas}: naive {mb(row['naive'])} MB, new"
                f" {mb(row['new'])} MB ({row['new'] / row['naive']:.3f}), frozen blocks shared"
                f" {shared}/{total}"
            )
            finetunes.append(row)
    return {"runs": runs, "finetunes": finetunes, "base": [{"holdout": base_holdout}]}


def replacement_origins(
    db: Database, prefixes: list[str], base: str, name: str, serving: str
) -> dict[str, int]:
    """Which stored model each replacement block came from (by its address prefix)."""
    with db.engine.connect() as conn:
        refs = conn.execute(
            text(
                f"SELECT name, hash FROM {db.backend.table('checkpoint_blocks')} WHERE name <> :s"
            ),
            {"s": serving},
        ).all()
    owners: dict[str, set[str]] = defaultdict(set)
    for owner, address in refs:
        owners[bytes(address).hex()[:16]].add(owner)
    counts: dict[str, int] = defaultdict(int)
    for prefix in prefixes:
        found = owners.get(prefix, set())
        kind = "base" if base in found else f"{name} history" if name in found else "other"
        counts[kind] += 1
    return dict(counts)


def serving_stats(db: Database, name: str, base: str) -> dict[str, Any]:
    """Build ``<name>_serving`` with the accuracy budget; bytes and accuracy change."""
    started = time.perf_counter()
    _model, replacements = dl.serving_copy(db, name, "SELECT * FROM ft_holdout", budget=BUDGET)
    seconds = time.perf_counter() - started
    serving = f"{name}_serving"
    with db.engine.connect() as conn:
        info = registry.read_model(conn, db.backend, serving, with_state=False)["options"]
    approx = info["approximate_dedup"]
    tensor_blocks = int(
        scalar(
            db,
            f"SELECT count(*) FROM {db.backend.table('checkpoint_blocks')}"
            " WHERE name = :n AND label LIKE 'model.%'",
            n=serving,
        )
    )
    stats = checkpoint_bytes(db, serving)
    origin = replacement_origins(db, list(replacements["replaced_by"]), base, name, serving)
    out = {
        "seconds": seconds,
        "replaced": len(replacements),
        "weight_blocks": tensor_blocks,
        "logical": stats["naive"],
        "new": stats["new"],
        "hot": stats["hot"],
        "beyond_base": blocks_beyond(db, serving, 0, base),
        "weights_beyond_base": blocks_beyond(db, serving, 0, base, "model."),
        "weights": logical_of(db, serving, 0, "model."),
        "original_accuracy": approx["original_accuracy"],
        "accuracy": approx["accuracy"],
        "labels": sorted({str(label).split("[")[0][6:] for label in replacements["label"]}),
        "origin": origin,
    }
    log(
        f"  serving copy: {out['replaced']}/{out['weight_blocks']} weight blocks replaced,"
        f" accuracy {out['original_accuracy']:.4f} → {out['accuracy']:.4f}"
    )
    return out


# -- benchmark 2: load time -----------------------------------------------------------------------
def timed(fn: Callable[[], Any]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def setup_done(dbs: dict[str, Database]) -> dict[str, Database]:
    """After training: fresh connections (new PostgreSQL backends, default torch threads) and
    this process's torch threads back to THREADS (SQLite's kernels ran here with 1)."""
    torch.set_num_threads(THREADS)
    for db in dbs.values():
        db.engine.dispose()
    return {backend: dl.connect(db.engine) for backend, db in dbs.items()}


def bench_load(mode: Mode, targets: Targets) -> list[dict[str, Any]]:
    targets.load("load_data", labelled(1_000, SEED))
    dbs = {backend: dl.connect(url) for backend, url in targets.urls().items()}
    results = []
    for spec in mode.load_models:
        name = f"load_{spec.replace(':', '_').replace(',', '_')}"
        for db in dbs.values():  # one epoch: the weights are what matters, not their quality
            dl.train(
                db, "SELECT * FROM load_data", name=name, model=spec, epochs=1, seed=SEED, **COMMON
            )
        model = dl.load_model(dbs["sqlite"], name, device="cpu")
        dbs = setup_done(dbs)
        weights = {k: v.contiguous() for k, v in model.net.state_dict().items()}
        st_path, pt_path = targets.tmp / f"{name}.safetensors", targets.tmp / f"{name}.pt"
        save_file(weights, st_path)
        torch.save(weights, pt_path)

        def module(tensors: dict[str, torch.Tensor], arch: dict = model.spec) -> torch.nn.Module:
            net = build_network(arch, [N_FEATURES], N_CLASSES)
            net.load_state_dict(tensors)
            return net

        def read_state(db: Database, name: str = name) -> bytes:
            with db.engine.connect() as conn:
                return registry.read_model(conn, db.backend, name)["state"]

        def read_stored(db: Database, name: str = name) -> Any:
            """What dl.load_model reads: the weight blocks alone where the code can (after this
            change), else the whole checkpoint."""
            if not hasattr(registry, "read_weights"):
                return read_state(db)
            with db.engine.connect() as conn:
                row = registry.read_model(conn, db.backend, name, with_state=False)
                key = {"name": row["name"], "version": row["version"]}
                return registry.read_weights(conn, db.backend, key, row["iteration"])

        def bytes_read(db: Database, name: str = name) -> int:
            if not hasattr(registry, "read_weights"):
                return len(read_state(db))
            stats: dict[str, int] = {}
            with db.engine.connect() as conn:
                row = registry.read_model(conn, db.backend, name, with_state=False)
                key = {"name": row["name"], "version": row["version"]}
                registry.read_weights(conn, db.backend, key, row["iteration"], stats)
            return stats["bytes"]

        sources: dict[str, dict[str, Callable[[], Any]]] = {
            f"{backend} store": {
                "read": lambda db=db: read_stored(db),
                "module": lambda db=db, name=name: dl.load_model(db, name, device="cpu"),
            }
            for backend, db in dbs.items()
        }
        sources["safetensors file"] = {
            "read": lambda p=st_path: load_file(p),
            "module": lambda p=st_path: module(load_file(p)),
        }
        sources["torch.load file"] = {
            "read": lambda p=pt_path: torch.load(p, weights_only=True),
            "module": lambda p=pt_path: module(torch.load(p, weights_only=True)),
        }
        times: dict[tuple[str, str], list[float]] = defaultdict(list)
        order = list(sources)
        for repeat in range(mode.load_repeats + 1):  # the first round warms caches; dropped
            wait_quiet(mode.quiet)
            for source in order[repeat % len(order) :] + order[: repeat % len(order)]:
                for what, fn in sources[source].items():
                    seconds = timed(fn)
                    if repeat:
                        times[source, what].append(seconds)
        state = read_state(dbs["sqlite"])
        blocks = split_state(state)
        hashing = min(
            timed(lambda blocks=blocks: [block_hash(b.dtype, b.raw) for b in blocks])
            for _ in range(3)
        )
        build = min(
            timed(lambda arch=model.spec: build_network(arch, [N_FEATURES], N_CLASSES))
            for _ in range(3)
        )
        weight_bytes = sum(v.numel() * v.element_size() for v in weights.values())
        sizes = {
            "safetensors file": st_path.stat().st_size,
            "torch.load file": pt_path.stat().st_size,
            **{f"{backend} store": bytes_read(db) for backend, db in dbs.items()},
        }
        st_module = median(times["safetensors file", "module"])
        for source in sources:
            row = {
                "model": spec,
                "params": sum(v.numel() for v in weights.values()),
                "source": source,
                "bytes": sizes.get(source, len(state)),
                "state_bytes": len(state),
                "read": median(times[source, "read"]),
                "module": median(times[source, "module"]),
                "module_min": min(times[source, "module"]),
                "repeats": len(times[source, "module"]),
                "vs_safetensors": median(times[source, "module"]) / st_module,
                "weight_bytes": weight_bytes,
                "blocks": len(blocks),
                "hashing": hashing,
                "build": build,
            }
            log(
                f"load {spec} from {source}: read {row['read'] * 1e3:.1f} ms,"
                f" → module {row['module'] * 1e3:.1f} ms ({row['vs_safetensors']:.1f}×)"
            )
            results.append(row)
    for db in dbs.values():
        db.engine.dispose()
    return results


# -- benchmark 3: prediction throughput -----------------------------------------------------------
class StatementTimer:
    """Sums the time of each kind of SQL statement run on an engine (cursor events)."""

    KINDS: ClassVar[list[tuple[re.Pattern[str], str]]] = [
        (re.compile(r"^\s*CREATE (UNLOGGED )?TABLE \S+ AS SELECT (row_number\(\) OVER|src\.\*)",
                    re.I), "stage query"),
        (re.compile(r"predict_(rows|batch)\(", re.I), "score + write"),
        (re.compile(r"typeof\(", re.I), "check column types (scan)"),
        (re.compile(r"string_agg\(", re.I), "pack buffers"),
        (re.compile(r"^\s*SELECT .* AS p0", re.I | re.S), "encode query (execute)"),
        (re.compile(r"^\s*INSERT INTO", re.I), "write predictions"),
    ]

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.seconds: dict[str, float] = defaultdict(float)
        self._started: list[float] = []

    def _before(self, *_args: Any) -> None:
        self._started.append(time.perf_counter())

    def _after(self, _conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        kind = next((k for rx, k in self.KINDS if rx.search(statement)), "other SQL")
        self.seconds[kind] += time.perf_counter() - self._started.pop()

    def __enter__(self) -> StatementTimer:
        event.listen(self.engine, "before_cursor_execute", self._before)
        event.listen(self.engine, "after_cursor_execute", self._after)
        return self

    def __exit__(self, *_exc: object) -> None:
        event.remove(self.engine, "before_cursor_execute", self._before)
        event.remove(self.engine, "after_cursor_execute", self._after)


@contextlib.contextmanager
def sqlite_kernel_timer(seconds: dict[str, float]) -> Iterator[None]:
    """Time SQLite's predict kernel, which runs in this process between the SQL statements, by
    wrapping it (PostgreSQL runs it inside the scoring statement)."""
    from dbdl_magic.backends import sqlite as module

    original = module.predict_buffer

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            seconds["predict kernel (torch, in process)"] += time.perf_counter() - started

    module.predict_buffer = wrapped
    try:
        yield
    finally:
        module.predict_buffer = original


def pg_function_seconds(conninfo: str) -> dict[str, float]:
    """Total time per dbdl function so far (``pg_stat_user_functions``, self time)."""
    import psycopg

    time.sleep(1.2)  # sessions flush their function statistics at most once a second
    with psycopg.connect(conninfo) as con:
        rows = con.execute(
            "SELECT funcname, self_time FROM pg_stat_user_functions WHERE schemaname IN"
            " ('dbdl', 'dbdl_store')"
        ).fetchall()
    return {str(name): float(ms) / 1e3 for name, ms in rows}


def write_back(backend: str, targets: Targets, ids: np.ndarray, predictions: np.ndarray) -> None:
    """The client's predictions into table ``client_scores`` (executemany / binary COPY)."""
    columns = {"id": ids.astype(np.int64), "prediction": predictions.astype(np.int64)}
    if backend == "sqlite":
        write_sqlite(targets.sqlite_path, "client_scores", columns)
    else:
        assert targets.pg_conninfo
        write_postgres(targets.pg_conninfo, "client_scores", columns)


def score_on_client(model: Any, x: np.ndarray) -> np.ndarray:
    """Class indices of raw feature rows ``x`` (float64, the model's feature order): the
    model's encoding ``(v - mean) / std`` in numpy, then its network in 65,536-row chunks."""
    enc = model.encoding
    mean = np.array([f.mean for f in enc.features])
    std = np.array([f.std for f in enc.features])
    encoded = ((x - mean) / std).astype(np.float32)
    out = []
    with torch.no_grad():
        for i in range(0, len(encoded), 65_536):
            out.append(model.net(torch.from_numpy(encoded[i : i + 65_536])).argmax(1).numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def fast_client_postgres(targets: Targets, db: Database, query: str) -> dict[str, float]:
    """The fastest client path: binary COPY of the query out (parsed by numpy as a record
    array), the module on the client, binary COPY of (id, prediction) back."""
    import psycopg

    assert targets.pg_conninfo
    started = time.perf_counter()
    model = dl.load_model(db, "scorer", device="cpu")
    with (
        psycopg.connect(targets.pg_conninfo) as con,
        con.cursor() as cur,
        cur.copy(f"COPY ({query}) TO STDOUT (FORMAT BINARY)") as copy,
    ):
        chunks = [bytes(chunk) for chunk in copy]
    data = b"".join(chunks)
    fields = [("count", ">i2"), ("len_id", ">i4"), ("id", ">i8")]
    for c in FEATURES:
        fields += [(f"len_{c}", ">i4"), (c, ">f8")]
    header = 19 + int.from_bytes(data[15:19], "big")  # signature, flags, extension area
    rec = np.frombuffer(data, dtype=np.dtype(fields), count=(len(data) - header - 2)
                        // np.dtype(fields).itemsize, offset=header)
    x = np.stack([rec[c].astype(np.float64) for c in FEATURES], axis=1)
    ids = rec["id"].astype(np.int64)
    read = time.perf_counter() - started
    labels = np.asarray(model.encoding.target.classes)[score_on_client(model, x)]
    scored = time.perf_counter() - started
    write_postgres(targets.pg_conninfo, "client_scores", {"id": ids,
                                                          "prediction": labels.astype(np.int64)})
    total = time.perf_counter() - started
    return {"read": read, "predict": scored - read, "write": total - scored, "total": scored,
            "total_with_write": total}


def fast_client_sqlite(targets: Targets, db: Database, query: str) -> dict[str, float]:
    """The fastest client path for SQLite: the driver's cursor (no pandas) into numpy, the
    module on the client, executemany of (id, prediction) into a new table."""
    started = time.perf_counter()
    model = dl.load_model(db, "scorer", device="cpu")
    with contextlib.closing(sqlite3.connect(targets.sqlite_path)) as con:
        rows = np.array(con.execute(query).fetchall(), dtype=np.float64)
        read = time.perf_counter() - started
        labels = np.asarray(model.encoding.target.classes)[score_on_client(model, rows[:, 1:])]
        scored = time.perf_counter() - started
        con.execute("DROP TABLE IF EXISTS client_scores")
        con.execute("CREATE TABLE client_scores (id INTEGER, prediction INTEGER)")
        con.executemany("INSERT INTO client_scores VALUES (?, ?)",
                        zip(rows[:, 0].astype(np.int64).tolist(), labels.tolist(), strict=True))
        con.commit()
    total = time.perf_counter() - started
    return {"read": read, "predict": scored - read, "write": total - scored, "total": scored,
            "total_with_write": total}


def setup_predict(mode: Mode, targets: Targets) -> dict[str, Database]:
    """Tables ``predict_train`` and ``pred_data`` and model ``scorer`` in both databases."""
    targets.load("predict_train", labelled(mode.store_rows, SEED))
    targets.load("pred_data", unlabelled(mode.predict_rows, SEED + 30))
    dbs = {backend: dl.connect(url) for backend, url in targets.urls().items()}
    for db in dbs.values():
        dl.train(db, "SELECT * FROM predict_train", name="scorer", model=STORE_MODEL, epochs=3,
                 seed=SEED, **COMMON)
    return setup_done(dbs)


def bench_predict(mode: Mode, targets: Targets) -> list[dict[str, Any]]:
    query = f"SELECT id, {', '.join(FEATURES)} FROM pred_data"
    dbs = setup_predict(mode, targets)
    if targets.pg_conninfo:  # function timings for the breakdown
        import psycopg

        with psycopg.connect(targets.pg_conninfo, autocommit=True) as con:
            con.execute("ALTER DATABASE bench SET track_functions = 'all'")
        dbs["postgresql"].engine.dispose()
    # The first call in a fresh connection pays for importing torch and the kernels into the
    # database process (PostgreSQL) and decoding the model: timed once here, on 1,000 rows,
    # and left out of the throughput below.
    cold = {}
    for backend, db in dbs.items():
        cold[backend] = timed(lambda db=db: dl.predict(db, "scorer", f"{query} LIMIT 1000"))
        log(f"predict {backend}: first call (1,000 rows) {cold[backend]:.2f} s")
    runs: dict[tuple[str, str], list[dict[str, float]]] = defaultdict(list)
    agree: dict[str, float] = {}
    for repeat in range(mode.predict_repeats):
        backends = list(dbs.items())
        if repeat % 2:
            backends.reverse()
        for backend, db in backends:
            wait_quiet(mode.quiet)
            before = pg_function_seconds(targets.pg_conninfo) if backend != "sqlite" else {}
            with StatementTimer(db.engine) as timer, sqlite_kernel_timer(timer.seconds):
                started = time.perf_counter()
                n = dl.predict(db, "scorer", query, into="scores", replace=True)
                total = time.perf_counter() - started
            assert n == mode.predict_rows, n
            split = dict(timer.seconds)
            split["rest (client Python)"] = total - sum(split.values())
            if backend != "sqlite":
                after = pg_function_seconds(targets.pg_conninfo)
                for name, seconds in after.items():
                    if seconds - before.get(name, 0.0) > 0.005:
                        split[f"  of which {name}()"] = seconds - before.get(name, 0.0)
            runs[backend, "database"].append({"total": total, **split})
            log(f"predict {backend} in database: {total:.1f} s ({n / total:,.0f} rows/s)")

            wait_quiet(mode.quiet)
            fast = (fast_client_sqlite if backend == "sqlite" else fast_client_postgres)(
                targets, db, query)
            runs[backend, "client, fastest"].append(fast)
            log(f"predict {backend} fastest client: {fast['total_with_write']:.1f} s")
            fast_ids = pd.read_sql("SELECT id, prediction FROM client_scores ORDER BY id",
                                   db.engine)

            wait_quiet(mode.quiet)
            started = time.perf_counter()
            model = dl.load_model(db, "scorer", device="cpu")
            frame = pd.read_sql(query, db.engine)
            read = time.perf_counter() - started
            predictions = np.concatenate(
                [model.predict(frame.iloc[i : i + 65_536]) for i in range(0, len(frame), 65_536)]
            )
            scored = time.perf_counter() - started
            write_back(backend, targets, frame["id"].to_numpy(), np.asarray(predictions))
            total = time.perf_counter() - started
            runs[backend, "client, read_sql"].append(
                {
                    "read": read,
                    "predict": scored - read,
                    "write": total - scored,
                    "total": scored,
                    "total_with_write": total,
                }
            )
            log(
                f"predict {backend} in client: read {read:.1f} s, predict {scored - read:.1f} s,"
                f" write back {total - scored:.1f} s"
            )
            if backend not in agree:
                inside = pd.read_sql("SELECT id, prediction FROM scores ORDER BY id", db.engine)
                expected = np.asarray(predictions)[np.argsort(frame["id"].to_numpy())]
                agree[backend] = float(min(
                    (inside["prediction"].to_numpy() == expected).mean(),
                    (fast_ids["prediction"].to_numpy() == expected).mean(),
                ))
            del frame
    results = []
    for (backend, variant), samples in runs.items():
        keys = samples[0].keys()
        row = {k: median([s.get(k, 0.0) for s in samples]) for k in keys}
        row.update(
            backend=backend,
            variant=variant,
            rows=mode.predict_rows,
            repeats=len(samples),
            agree=agree.get(backend, float("nan")),
            cold=cold[backend] if variant == "database" else float("nan"),
        )
        results.append(row)
    for db in dbs.values():
        db.engine.dispose()
    return results


def bench_rows(mode: Mode, targets: Targets) -> list[dict[str, Any]]:
    """Row-level SQL prediction (``dbdl.predict`` / ``dbdl_predict`` per row) over
    ``mode.row_rows`` rows of ``pred_data``: the JSON form (the whole row) and, on PostgreSQL,
    the numeric form (the features as arguments). Warm: a first statement of 100 rows in the
    same connection is left out."""
    dbs = {backend: dl.connect(url) for backend, url in targets.urls().items()}
    sub = f"(SELECT * FROM pred_data LIMIT {mode.row_rows})"
    forms = {
        ("postgresql", "JSON"): f"SELECT count(dbdl.predict('scorer', to_jsonb(p))) FROM {sub} p",
        ("postgresql", "numeric"):
            f"SELECT count(dbdl.predict('scorer', {', '.join(FEATURES)})) FROM {sub} p",
        ("sqlite", "JSON"):
            "SELECT count(dbdl_predict('scorer', json_object("
            + ", ".join(f"'{c}', {c}" for c in FEATURES) + f"))) FROM {sub}",
    }
    results = []
    for (backend, form), sql in forms.items():
        if backend not in dbs:
            continue
        with dbs[backend].engine.connect() as conn:
            conn.execute(text(sql.replace(f"LIMIT {mode.row_rows}", "LIMIT 100"))).all()
            wait_quiet(mode.quiet)
            seconds = timed(lambda conn=conn, sql=sql: conn.execute(text(sql)).all())
        results.append({"backend": backend, "form": form, "rows": mode.row_rows,
                        "seconds": seconds, "rows_per_s": mode.row_rows / seconds})
        log(f"row-level {backend} {form}: {mode.row_rows / seconds:,.0f} rows/s")
    for db in dbs.values():
        db.engine.dispose()
    return results


# -- benchmark 5: SQLite packing -----------------------------------------------------------------
@contextlib.contextmanager
def step_timer(seconds: dict[str, float]) -> Iterator[None]:
    """Time the packing steps a run takes (``prepare.pack_data``: stage, statistics, pack, drop)
    by wrapping them; reading the rows into this process is timed inside the statistics."""
    from dbdl_magic.data import inprocess, packing

    wrapped = {
        (packing, "stage_query"): "stage query",
        (packing, "infer_encoding"): "statistics",
        (inprocess, "fetch_stage"): "  of which reading the rows",
        (packing, "pack"): "pack buffers",
    }
    originals = {key: getattr(*key) for key in wrapped}

    def timing(fn: Callable[..., Any], label: str) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                seconds[label] += time.perf_counter() - started

        return run

    for (module, name), label in wrapped.items():
        setattr(module, name, timing(originals[module, name], label))
    try:
        yield
    finally:
        for (module, name), fn in originals.items():
            setattr(module, name, fn)


def pack_once(db: Database, query: str, sql_path: bool = False) -> dict[str, Any]:
    """Stage, encode, pack and drop the stage as ``prepare.pack_data`` does (one transaction);
    seconds per step and the fingerprint. ``sql_path``: the SQL packing the code used before
    (no rows read into this process)."""
    from dbdl_magic.data import inprocess, packing

    backend = db.backend
    stage, packed = backend.table("bench_stage"), backend.table("bench_packed")
    opts = packing.PackOptions(target="label", batch_size=COMMON["batch_size"],
                               validation=COMMON["validation"], seed=SEED)
    with db.engine.begin() as conn:
        backend.drop_table(conn, packed)
    seconds: dict[str, float] = defaultdict(float)
    saved = inprocess.fetch_stage, inprocess.stage_by_rowid
    if sql_path:
        inprocess.fetch_stage = lambda *_a, **_k: None  # type: ignore[assignment]
        inprocess.stage_by_rowid = lambda *_a, **_k: False  # type: ignore[assignment]
    try:
        with step_timer(seconds):
            started, cpu = time.perf_counter(), time.process_time()
            with db.engine.begin() as conn:
                packing.stage_query(backend, conn, query, {}, stage, deterministic=True)
                encoding, n_rows = packing.infer_encoding(backend, conn, stage, opts)
                data = packing.pack(backend, conn, stage, packed, encoding, n_rows, opts)
                dropped = time.perf_counter()
                backend.drop_table(conn, stage)
            seconds["drop stage + commit"] = time.perf_counter() - dropped
            seconds["total"] = time.perf_counter() - started
            seconds["cpu"] = time.process_time() - cpu
    finally:
        inprocess.fetch_stage, inprocess.stage_by_rowid = saved
    with db.engine.begin() as conn:
        backend.drop_table(conn, packed)
    return {**seconds, "fingerprint": data.fingerprint, "buffers": data.n_buffers}


PACK_QUERY = f"SELECT {', '.join(FEATURES)}, label FROM pack_data"


def proc_kb(field: str) -> int:
    """A ``/proc/self/status`` memory field (kB)."""
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    return int(match.group(1)) if match else 0


def pack_memory_child(variant: str, path: str) -> None:
    """``--pack-memory VARIANT PATH``: run one variant once in this fresh process; print its
    peak RSS growth (MB) over the RSS after imports and a first query."""
    db = dl.connect(f"sqlite:///{path}")
    with db.engine.connect() as conn:
        conn.execute(text("SELECT count(*) FROM pack_data")).scalar_one()
    base = proc_kb("VmRSS")
    if variant == "database":
        pack_once(db, PACK_QUERY)
    else:
        pd.read_sql(PACK_QUERY, db.engine)
    print((proc_kb("VmHWM") - base) / 1024)


def pack_memory(variant: str, path: Path) -> float:
    """Peak RSS growth (MB) of a fresh process packing (or reading) ``pack_data`` once."""
    import subprocess

    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--pack-memory",
                          variant, str(path)], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def bench_pack(mode: Mode, targets: Targets) -> list[dict[str, Any]]:
    """SQLite: pack ``mode.pack_rows`` rows × 32 features vs ``pandas.read_sql`` of the query."""
    columns = labelled(mode.pack_rows, SEED + 50)
    started = time.perf_counter()
    write_sqlite(targets.sqlite_path, "pack_data", columns)
    log(f"loaded {mode.pack_rows:,} rows into pack_data (SQLite,"
        f" {time.perf_counter() - started:.1f} s)")
    query = PACK_QUERY
    db = dl.connect(f"sqlite:///{targets.sqlite_path}")
    runs: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for repeat in range(mode.pack_repeats):
        for variant in (["database", "read_sql"] if repeat % 2 == 0 else ["read_sql", "database"]):
            wait_quiet(mode.quiet)
            if variant == "database":
                run = pack_once(db, query)
            else:
                t0, cpu = time.perf_counter(), time.process_time()
                frame = pd.read_sql(query, db.engine)
                run = {"total": time.perf_counter() - t0, "cpu": time.process_time() - cpu}
                assert len(frame) == mode.pack_rows
                del frame
            runs[variant].append(run)
            log(f"pack {variant}: {run['total']:.1f} s (CPU {run['cpu']:.1f} s)")
    wait_quiet(mode.quiet)
    before = pack_once(db, query, sql_path=True)
    log(f"pack SQL path (before): {before['total']:.1f} s")
    runs["SQL path (before)"].append(before)
    db.engine.dispose()
    memory = {v: pack_memory(v, targets.sqlite_path) for v in ("database", "read_sql")}
    log(f"pack peak RSS growth: {memory}")
    same = all(r["fingerprint"] == before["fingerprint"] for r in runs["database"])
    read_sql = median([r["total"] for r in runs["read_sql"]])
    read_sql_cpu = median([r["cpu"] for r in runs["read_sql"]])
    results = []
    for variant, samples in runs.items():
        keys = [k for k in samples[0] if isinstance(samples[0][k], float)]
        row = {k: median([s[k] for s in samples]) for k in keys}
        row.update(variant=variant, rows=mode.pack_rows, repeats=len(samples),
                   vs_read_sql=row["total"] / read_sql, cpu_vs_read_sql=row["cpu"] / read_sql_cpu,
                   same_buffers=same,
                   rss_growth_mb=memory.get(variant, float("nan")))
        results.append(row)
    return results


# -- benchmark 6: concurrent sessions -------------------------------------------------------------
def bench_concurrent(mode: Mode, targets: Targets) -> list[dict[str, Any]]:
    """``mode.sessions`` threads, each with its own engine (so its own connection and server
    process), run ``dl.predict(..., into=scores_i)`` over ``pred_data`` at the same time; then
    one session alone. Warm: each session first scores 1,000 rows."""
    import threading

    if not targets.pg_url:
        return []
    query = f"SELECT id, {', '.join(FEATURES)} FROM pred_data"
    dbs = [dl.connect(targets.pg_url) for _ in range(mode.sessions)]
    for db in dbs:
        dl.predict(db, "scorer", f"{query} LIMIT 1000")
    results = []
    for sessions in (1, mode.sessions):
        wait_quiet(mode.quiet)
        errors: list[BaseException] = []
        counts = [0] * sessions
        seconds = [0.0] * sessions
        barrier = threading.Barrier(sessions)

        def work(i: int, errors: list = errors, counts: list = counts,
                 seconds: list = seconds, barrier: threading.Barrier = barrier) -> None:
            try:
                barrier.wait()
                t0 = time.perf_counter()
                counts[i] = dl.predict(dbs[i], "scorer", query, into=f"scores_{i}", replace=True)
                seconds[i] = time.perf_counter() - t0
            except BaseException as exc:  # reported, counted as a failure
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(sessions)]
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - started
        agree = True
        if not errors and sessions > 1:
            with dbs[0].engine.connect() as conn:
                differ = conn.execute(text(
                    "SELECT count(*) FROM scores_0 AS a JOIN scores_1 AS b USING (id)"
                    " WHERE a.prediction <> b.prediction"
                )).scalar_one()
            agree = differ == 0
        rows = sum(counts)
        results.append({"sessions": sessions, "rows": rows, "wall": wall,
                        "rows_per_s": rows / wall, "slowest": max(seconds),
                        "errors": [f"{type(e).__name__}: {e}" for e in errors],
                        "agree": agree})
        log(f"predict, {sessions} session(s): {rows:,} rows in {wall:.1f} s"
            f" ({rows / wall:,.0f} rows/s), errors: {len(errors)}")
    for db in dbs:
        db.engine.dispose()
    return results


# -- report ---------------------------------------------------------------------------------------
def ratio(a: float, b: float) -> str:
    return f"{a / b:.3f}" if b else "–"


def render(mode: Mode, facts: dict[str, str], results: dict[str, Any]) -> str:
    parts = [
        "## Model store",
        "",
        f"`benchmarks/bench_store.py --{mode.name}`",
        "",
        "\n".join(f"- {k}: {v}" for k, v in facts.items()),
        "",
        f"Common settings: {N_FEATURES} float features, {N_CLASSES} classes (seeded nonlinear"
        " rule), Adam lr 1e-3, batch 256, 20% validation. Training (not timed here) uses 1 torch"
        f" thread; loading and prediction are timed with {THREADS} (client and database). A"
        " checkpoint holds the weights *and* Adam's two moment tensors (≈ 3× the weights), as"
        " the store keeps resumable training states.",
    ]
    storage = results.get("storage")
    if storage:
        parts += render_storage(mode, storage)
    if results.get("load"):
        parts += render_load(mode, results["load"])
    if results.get("predict"):
        parts += render_predict(mode, results["predict"])
    if results.get("rows"):
        parts += render_rows(mode, results["rows"])
    if results.get("pack"):
        parts += render_pack(mode, results["pack"])
    if results.get("concurrent"):
        parts += render_concurrent(mode, results["concurrent"])
    if results.get("before"):
        parts += render_before_after(results, results["before"], results["before_label"])
    return "\n".join(parts) + "\n"


def render_storage(mode: Mode, storage: dict[str, Any]) -> list[str]:
    runs, fts = storage["runs"], storage["finetunes"]
    r0 = runs[0]
    out = [
        "",
        f"### 1a. Per-iteration checkpoints of one run ({STORE_MODEL},"
        f" {fmt_params(r0['params'])} params, {mode.store_rows:,} rows, {mode.run_epochs} epochs)",
        "",
        "*naive* = Σ `logical_bytes` of the checkpoints (each stored in full); *stored* = Σ"
        " `new_bytes` (bytes the store added per checkpoint; equals `list_models().stored_bytes`"
        " here, each variant having its own database). *per checkpoint* = median of"
        " new ÷ logical over checkpoints 1..N. *hot copy* = the one full state kept beside the"
        " blocks for the next iteration (`checkpoints.state`), not counted in *stored*."
        " *archive share* = (iteration seconds − training seconds) ÷ wall time: evaluation plus"
        " archiving.",
        "",
        table(
            [
                "deltas",
                "checkpoints",
                "naive MB",
                "stored MB",
                "stored ÷ naive",
                "per checkpoint",
                "list_models stored MB",
                "hot copy MB",
                "train wall s",
                "archive share",
                "val acc",
            ],
            [
                [
                    "on" if r["deltas"] else "off (exact dedup only)",
                    r["checkpoints"],
                    mb(r["naive"]),
                    mb(r["new"]),
                    f"**{ratio(r['new'], r['naive'])}**",
                    f"{r['per_checkpoint']:.3f}",
                    mb(r["listed_stored"]),
                    mb(r["hot"]),
                    f"{r['train_wall']:.1f}",
                    f"{r['archive_share']:.2f}",
                    f"{r['accuracy']:.4f}",
                ]
                for r in runs
            ],
        ),
        "",
        f"### 1b-d. Fine-tunes of a base model ({mode.base_epochs} epochs) on drifted data,"
        f" {mode.ft_epochs} epochs each",
        "",
        "Only the fine-tune's own checkpoints count (checkpoint 0 = the warm start, then one per"
        " epoch): *naive* = their Σ `logical_bytes`, *new* = their Σ `new_bytes` (blocks the"
        " base already stored cost nothing). *frozen shared* = blocks of frozen layers that"
        " are byte-identical to blocks of the base model. *final beyond base* = bytes of the"
        " final checkpoint's blocks the base does not reference ÷ its logical bytes (all"
        " tensors / weights only). *hot copy* = the full state of the latest checkpoint kept in"
        " `checkpoints.state` beside its blocks (not in *new*).",
        "",
        table(
            [
                "fine-tune",
                "frozen layers",
                "storage",
                "checkpoints",
                "naive MB",
                "new MB",
                "new ÷ naive",
                "per checkpoint",
                "frozen shared",
                "final beyond base (all / weights)",
                "hot copy MB",
                "val acc",
            ],
            [
                [
                    r["variant"],
                    ",".join(map(str, r["frozen"])) or "none",
                    "exact + deltas" if r["deltas"] else "exact dedup",
                    r["checkpoints"],
                    mb(r["naive"]),
                    mb(r["new"]),
                    f"**{ratio(r['new'], r['naive'])}**",
                    f"{r['per_checkpoint']:.3f}",
                    f"{r['frozen_shared']}/{r['frozen_blocks']}" if r["frozen_blocks"] else "–",
                    f"{ratio(r['final_beyond_base'], r['final_logical'])} /"
                    f" {ratio(r['final_weights_beyond_base'], r['final_weights'])}",
                    mb(r["hot"]),
                    f"{r['accuracy']:.4f}",
                ]
                for r in fts
            ],
        ),
        "",
        f"### 1e. Approximate dedup: `dl.serving_copy(…, budget={BUDGET})` of each fine-tune",
        "",
        "Validated on 5,000 held-out rows of the drifted rule (the base model alone scores"
        f" {storage['base'][0]['holdout']:.4f} on them). *new ÷ logical* = bytes the store"
        " added for the serving copy ÷ its logical bytes — 0 whenever the canonical fine-tune"
        " is still stored, since every block of the copy is then either the canonical's or a"
        " replacement taken from the registry. The meaningful figure is *beyond base*: the"
        " serving copy's blocks the base model does not reference ÷ its logical bytes (what"
        " serving it costs if only the base and the copy are kept), next to the same for the"
        " canonical fine-tune. *taken from* = which stored model held each replacement block"
        " (*ft history* = the fine-tune's own earlier checkpoints). *hot copy* = the full state"
        " the copy also keeps in `checkpoints.state` (every model's latest checkpoint has one),"
        " outside the block registry. Accuracies are on the validation rows the copy was built"
        " with.",
        "",
        table(
            [
                "fine-tune",
                "weight blocks replaced",
                "taken from",
                "new ÷ logical",
                "beyond base: canonical",
                "beyond base: serving copy",
                "hot copy ÷ logical",
                "weights beyond base: canonical / serving",
                "accuracy canonical → serving",
                "Δ accuracy",
                "seconds",
            ],
            [
                [
                    r["variant"],
                    f"{s['replaced']}/{s['weight_blocks']}"
                    + (f" ({', '.join(s['labels'])})" if s["labels"] else ""),
                    ", ".join(f"{k} ×{v}" for k, v in s["origin"].items()) or "–",
                    ratio(s["new"], s["logical"]),
                    ratio(r["final_beyond_base"], r["final_logical"]),
                    f"**{ratio(s['beyond_base'], s['logical'])}**",
                    ratio(s["hot"], s["logical"]),
                    f"{ratio(r['final_weights_beyond_base'], r['final_weights'])} /"
                    f" {ratio(s['weights_beyond_base'], s['weights'])}",
                    f"{s['original_accuracy']:.4f} → {s['accuracy']:.4f}",
                    f"{s['accuracy'] - s['original_accuracy']:+.4f}",
                    f"{s['seconds']:.1f}",
                ]
                for r in fts
                if (s := r.get("serving"))
            ],
        ),
    ]
    return out


def render_load(mode: Mode, rows: list[dict[str, Any]]) -> list[str]:
    by_model: dict[str, dict[str, Any]] = {}
    for r in rows:
        by_model.setdefault(r["model"], r)
    notes = "; ".join(
        f"{fmt_params(r['params'])}: weights {mb(r['weight_bytes'])} MB, checkpoint"
        f" {mb(r.get('state_bytes', r['bytes']))} MB"
        f" in {r['blocks']} blocks, BLAKE2b of all blocks {r['hashing'] * 1e3:.0f} ms, building"
        f" the module (random init) {r['build'] * 1e3:.0f} ms"
        for m, r in by_model.items()
    )
    return [
        "",
        f"### 2. Load time: block store vs files (median of {rows[0]['repeats']} rotating repeats,"
        " warm caches)",
        "",
        "*read* = store: `registry.read_weights` (one query for the network's blocks, each"
        " BLAKE2b address verified, tensors built from them; the code before this change read"
        " and reassembled the whole checkpoint, weights + Adam moments, with"
        " `registry.read_model`); files: `load_file` / `torch.load(weights_only=True)` →"
        " tensors. *→ module* = a ready `nn.Module`: `dl.load_model(db, name, device='cpu')`;"
        " files: build the network + `load_state_dict`. *÷ safetensors* compares *→ module*."
        " *bytes read* = block bytes fetched (a block stored as a delta needs its base block"
        f" too). {notes}.",
        "",
        table(
            [
                "model (params)",
                "source",
                "bytes read MB",
                "read ms",
                "→ module ms",
                "→ module min ms",
                "÷ safetensors",
            ],
            [
                [
                    f"{r['model']} ({fmt_params(r['params'])})",
                    r["source"],
                    mb(r["bytes"]),
                    f"{r['read'] * 1e3:.1f}",
                    f"{r['module'] * 1e3:.1f}",
                    f"{r['module_min'] * 1e3:.1f}",
                    f"**{r['vs_safetensors']:.2f}**",
                ]
                for r in rows
            ],
        ),
    ]


def render_predict(mode: Mode, rows: list[dict[str, Any]]) -> list[str]:
    n = rows[0]["rows"]
    out = [
        "",
        f"### 3. Prediction throughput ({n:,} rows × {N_FEATURES} features, {STORE_MODEL},"
        f" median of {rows[0]['repeats']})",
        "",
        "*database* = `dl.predict(db, 'scorer', query, into='scores', replace=True)`: the"
        " predictions end up in a table. *client, read_sql* = `dl.load_model` +"
        " `pandas.read_sql(query)` + `model.predict` in 65,536-row chunks; *client, fastest* ="
        " `dl.load_model` + the driver's fastest read (PostgreSQL: binary `COPY (query) TO"
        " STDOUT` parsed by numpy as one record array; SQLite: the sqlite3 cursor, no pandas) +"
        " the encoding in numpy and the network in 65,536-row chunks. *+ write back* also"
        " stores (id, prediction) in a table (SQLite executemany, PostgreSQL binary COPY), the"
        " end state of the database variant. *agree* = the smallest share, over the database"
        " and the fastest client variants, of rows whose label equals read_sql + `model.predict`."
        " Throughput is warm: *first call* = a `dl.predict` of 1,000 rows in a fresh connection,"
        " not included (PostgreSQL imports torch and the kernels into the backend).",
        "",
        table(
            [
                "backend",
                "variant",
                "seconds",
                "rows/s",
                "seconds incl. write back",
                "rows/s incl. write back",
                "agree",
                "first call s",
            ],
            [
                [
                    r["backend"],
                    r["variant"],
                    f"{r['total']:.2f}",
                    f"**{n / r['total']:,.0f}**",
                    f"{r.get('total_with_write', r['total']):.2f}",
                    f"**{n / r.get('total_with_write', r['total']):,.0f}**",
                    f"{r['agree']:.4f}",
                    f"{r['cold']:.2f}" if r["variant"] == "database" else "–",
                ]
                for r in rows
            ],
        ),
        "",
        "Where the time goes (seconds, medians): database variant by SQL statement kind (cursor"
        " execute time), for PostgreSQL with the server's own time in the dbdl functions"
        " (`pg_stat_user_functions` self time: `predict_batch` = the kernel: reading the"
        " buffer, encoding, the network, the output arrays; `array_image` / `int4_array` = the"
        " arrays in and out), for SQLite with the predict kernel, which runs in this process;"
        " *rest* = the remaining client-side Python (SQLite: fetching the rows, building the"
        " raw matrix, the inserted tuples); client variants by step.",
        "",
    ]
    lines = []
    for r in rows:
        skip = {"backend", "variant", "rows", "repeats", "agree", "cold", "total"}
        skip.add("total_with_write")
        parts = [f"{k.strip()} {v:.2f}" for k, v in r.items()
                 if k not in skip and isinstance(v, float)]
        lines.append(f"- {r['backend']} {r['variant']}: " + ", ".join(parts))
    return out + lines


def render_rows(mode: Mode, rows: list[dict[str, Any]]) -> list[str]:
    return [
        "",
        f"### 4. Row-level SQL prediction ({rows[0]['rows']:,} rows, {STORE_MODEL})",
        "",
        "One kernel call per row from plain SQL, warm (a 100-row statement in the same"
        " connection first): PostgreSQL `SELECT count(dbdl.predict('scorer', to_jsonb(p)))`"
        " (*JSON*) and `dbdl.predict('scorer', f0, …, f31)` (*numeric*); SQLite"
        " `dbdl_predict('scorer', json_object(…))`.",
        "",
        table(["backend", "form", "rows", "seconds", "rows/s"],
              [[r["backend"], r["form"], f"{r['rows']:,}", f"{r['seconds']:.2f}",
                f"**{r['rows_per_s']:,.0f}**"] for r in rows]),
    ]


def render_pack(mode: Mode, rows: list[dict[str, Any]]) -> list[str]:
    n = rows[0]["rows"]
    steps = ["stage query", "statistics", "  of which reading the rows", "pack buffers",
             "drop stage + commit"]
    return [
        "",
        f"### 5. SQLite packing vs read_sql ({n:,} rows × {N_FEATURES} features + label,"
        f" median of {rows[0]['repeats']})",
        "",
        "*database* = what a training run does before its first epoch (`prepare.pack_data`):"
        " stage the query, the encoding statistics, pack the shuffled rows into buffers, drop"
        " the stage, in one transaction; on SQLite the statistics read the staged rows into this"
        " process once (numpy) and the buffers are packed from those arrays."
        " *SQL path (before)* = the same with the code's previous SQLite path (a column-type"
        " scan, statistics aggregates, the window sorts and the per-row `dbdl_pack` aggregate),"
        " once. *read_sql* = `pandas.read_sql` of the same query. *CPU s* = this process's CPU"
        " time (SQLite runs in it; every variant is single-threaded), which other processes on"
        " the shared machine disturb less than the wall time. *same buffers* = equal packed"
        " fingerprints. *peak RSS growth* = a fresh process's peak RSS over its RSS before the"
        " variant ran (once; SQLite runs in that process, so its page cache counts too).",
        "",
        table(
            ["variant", "seconds", "÷ read_sql", "CPU s", "CPU ÷ read_sql",
             *[s.strip() for s in steps], "peak RSS growth MB", "same buffers"],
            [[r["variant"], f"{r['total']:.2f}", f"**{r['vs_read_sql']:.2f}**",
              f"{r['cpu']:.2f}", f"**{r['cpu_vs_read_sql']:.2f}**",
              *[f"{r[s]:.2f}" if s in r else "–" for s in steps],
              f"{r['rss_growth_mb']:.0f}" if r["rss_growth_mb"] == r["rss_growth_mb"] else "–",
              "yes" if r["same_buffers"] else "**no**"] for r in rows],
        ),
    ]


def render_concurrent(mode: Mode, rows: list[dict[str, Any]]) -> list[str]:
    one = rows[0]
    return [
        "",
        f"### 6. Concurrent prediction sessions on PostgreSQL ({STORE_MODEL},"
        f" {one['rows']:,} rows per session)",
        "",
        "Each session is a thread with its own engine (its own connection and server process)"
        " running `dl.predict(db, 'scorer', query, into='scores_<i>', replace=True)` over the"
        " same table, all started together (warm: each session scored 1,000 rows first)."
        " *rows/s* = all sessions' rows ÷ wall time; *agree* = sessions 0 and 1 wrote the same"
        " predictions.",
        "",
        table(["sessions", "rows", "wall s", "rows/s", "÷ one session", "slowest session s",
               "errors", "agree"],
              [[r["sessions"], f"{r['rows']:,}", f"{r['wall']:.2f}", f"**{r['rows_per_s']:,.0f}**",
                f"{r['rows_per_s'] / one['rows_per_s']:.2f}", f"{r['slowest']:.2f}",
                len(r["errors"]) or "none", "yes" if r["agree"] else "**no**"] for r in rows]),
        *[f"- error: {e}" for r in rows for e in r["errors"]],
    ]


def render_before_after(results: dict[str, Any], before: dict[str, Any], label: str) -> list[str]:
    """One table of the same measurements by the code before this change and after it."""
    lines = []
    for r in results.get("predict", []):
        old = next((o for o in before.get("predict", []) if o["backend"] == r["backend"]
                    and o["variant"] == r["variant"]), None)
        if old is not None:
            n, m = r["rows"], old["rows"]
            lines.append([f"predict {r['backend']} {r['variant']} (rows/s incl. write back)",
                          f"{m / old.get('total_with_write', old['total']):,.0f}",
                          f"{n / r.get('total_with_write', r['total']):,.0f}"])
    for r in results.get("load", []):
        old = next((o for o in before.get("load", []) if o["model"] == r["model"]
                    and o["source"] == r["source"]), None)
        if old is not None:
            lines.append([f"load {r['model']} from {r['source']} (→ module ms)",
                          f"{old['module'] * 1e3:.1f}", f"{r['module'] * 1e3:.1f}"])
    for r in results.get("rows", []):
        old = next((o for o in before.get("rows", []) if o["backend"] == r["backend"]
                    and o["form"] == r["form"]), None)
        if old is not None:
            lines.append([f"row-level {r['backend']} {r['form']} (rows/s; before on"
                          f" {old['rows']:,} rows)", f"{old['rows_per_s']:,.0f}",
                          f"{r['rows_per_s']:,.0f}"])
    if not lines:
        return []
    return ["", f"### Before and after, same run ({label})", "",
            "The same benchmark run first on the code before this change (exported from git,"
            " its own PostgreSQL server with that code's kernels), then on this tree.", "",
            table(["measurement", "before", "after"], lines)]


def write_section(path: Path, body: str) -> None:
    """Replace the marked store section of ``path`` (or append it); other sections stay."""
    block = f"{BEGIN}\n{body}{END}\n"
    old = path.read_text() if path.exists() else "# Benchmark results\n\n"
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END) + r"\n?", re.S)
    new = (
        pattern.sub(lambda _m: block, old) if pattern.search(old) else old.rstrip() + "\n\n" + block
    )
    path.write_text(new)


# -- main -----------------------------------------------------------------------------------------
def run_before(args: argparse.Namespace, only: set[str]) -> dict[str, Any]:
    """This script, on ``git archive REV`` of dbdl_magic and kernels in a temp dir (the client,
    and the PostgreSQL server, whose PL/Python path follows where dbdl_magic is imported, run
    that code; ``dbdl_magic/sql`` points at its own kernels); returns its raw results."""
    import subprocess

    with tempfile.TemporaryDirectory(prefix="dbdl-before-") as tmp:
        archive = subprocess.run(
            ["git", "archive", "--format=tar", args.before, "dbdl_magic", "kernels"],
            cwd=ROOT, capture_output=True, check=True,
        ).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        (Path(tmp) / "dbdl_magic" / "sql").symlink_to(Path(tmp) / "kernels")
        for folder, _dirs, _files in os.walk(tmp):
            os.chmod(folder, 0o755)  # the server's OS user must read it
        out = Path(tmp) / "before.json"
        argv = [sys.executable, str(Path(__file__).resolve()), "--no-write", "--json", str(out),
                "--only", ",".join(sorted(only)), "--full" if args.full else "--quick",
                "--row-rows", str(args.before_row_rows)]
        for flag, value in (("--predict-rows", args.predict_rows), ("--repeats", args.repeats),
                            ("--quiet", args.quiet)):
            if value is not None:
                argv += [flag, str(value)]
        if args.no_postgres:
            argv.append("--no-postgres")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            filter(None, [tmp, os.environ.get("PYTHONPATH")]))}
        log(f"benchmarking {args.before} exported to {tmp}")
        subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())["results"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="small sizes (default), < 2 min")
    group.add_argument("--full", action="store_true", help="full sizes; updates RESULTS.md")
    parser.add_argument("--write", action="store_true", help="update RESULTS.md in quick mode")
    parser.add_argument("--no-write", action="store_true", help="never update RESULTS.md")
    parser.add_argument(
        "--only", default="storage,load,predict,rows,pack,concurrent",
        help="comma list of storage, load, predict, rows, pack, concurrent",
    )
    parser.add_argument("--no-postgres", action="store_true", help="SQLite only")
    parser.add_argument("--json", type=Path, help="also dump the raw results to this file")
    parser.add_argument("--predict-rows", type=int, help="rows of the prediction benchmark")
    parser.add_argument("--pack-rows", type=int, help="rows of the SQLite packing benchmark")
    parser.add_argument("--row-rows", type=int, help="rows of the row-level benchmark")
    parser.add_argument("--repeats", type=int, help="repeats of the prediction benchmark")
    parser.add_argument("--quiet", type=float,
                        help="seconds to wait at most for idle CPUs before a timed step")
    parser.add_argument(
        "--before", metavar="REV",
        help="first run the same parts on git revision REV (exported), for a before/after table",
    )
    parser.add_argument("--before-row-rows", type=int, default=5_000,
                        help="rows of the row-level benchmark on the --before code")
    parser.add_argument("--pack-memory", nargs=2, metavar=("VARIANT", "PATH"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.pack_memory:
        pack_memory_child(*args.pack_memory)
        return 0

    # a kill (nohup runs) unwinds the context managers: the PostgreSQL server and temp files go
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    mode = FULL if args.full else QUICK
    for field, value in (("predict_rows", args.predict_rows), ("row_rows", args.row_rows),
                         ("predict_repeats", args.repeats), ("quiet", args.quiet),
                         ("pack_rows", args.pack_rows)):
        if value is not None:
            setattr(mode, field, value)
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    write = (args.full or args.write) and not args.no_write
    started = time.perf_counter()
    torch.set_num_threads(THREADS)
    results: dict[str, Any] = {}
    if args.before:
        # the packing part measures the previous SQL path itself
        results["before"] = run_before(args, only - {"storage", "pack"})
        results["before_label"] = f"before = git {args.before}, after = this work tree"
    with databases(not args.no_postgres) as targets:
        facts = machine_facts(targets)
        if "storage" in only:
            results["storage"] = bench_storage(mode, targets.tmp)
        if "load" in only:
            results["load"] = bench_load(mode, targets)
        if "predict" in only:
            results["predict"] = bench_predict(mode, targets)
        if {"rows", "concurrent"} & only and "predict" not in only:
            for db in setup_predict(mode, targets).values():
                db.engine.dispose()
        if "rows" in only:
            results["rows"] = bench_rows(mode, targets)
        if "concurrent" in only:
            results["concurrent"] = bench_concurrent(mode, targets)
        if "pack" in only:
            results["pack"] = bench_pack(mode, targets)
    facts["benchmark wall time"] = f"{time.perf_counter() - started:.0f} s"
    body = render(mode, facts, results)
    print(body)
    if args.json:
        args.json.write_text(
            json.dumps({"facts": facts, "results": results}, indent=1, default=str)
        )
    if write:
        write_section(RESULTS, body)
        log(f"updated {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
