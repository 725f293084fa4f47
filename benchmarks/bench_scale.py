"""Scale-out benchmark: segments vs one process, convergence of averaged models, model
selection and per-group training.

Run from the repository root::

    .venv/bin/python benchmarks/bench_scale.py --quick            # smoke run, < 3 min, prints only
    .venv/bin/python benchmarks/bench_scale.py --freeze           # full run, updates RESULTS.md
    .venv/bin/python benchmarks/bench_scale.py --only selection   # one part (its section only)
    .venv/bin/python benchmarks/bench_scale.py --only parallel --workers 2,4,8 --rows 4000000

Four parts, each written to its own marked section of ``benchmarks/RESULTS.md``
(``<!-- bench_scale:<part>:start -->`` … ``:end -->``), so ``--only`` replaces just its own:

1. ``parallel``: epoch time (median ``train_seconds`` over the epochs after the first) of one
   process × 1 thread vs ``parallel=2`` segments × 1 thread, on PostgreSQL and on SQLite (a
   database file), for mlp:64,32 on 1M rows and mlp:1024,1024 (a 13 MB state to combine) on
   100k rows: speedup, efficiency, segment start-up; on PostgreSQL also its own parallel query
   with 2 workers (the path before segments, reached by a wrapper of ``train_iteration``);
   where a segment iteration's time goes (the rounds' statements, combine, checkpoint insert:
   the segment classes' methods timed in this process); what ``parallel="auto"`` chooses.
2. ``convergence``: 200k rows, validation accuracy per epoch for 8 epochs with one process
   and 2, 4, 8 segments × ``averaging`` {mean, outer} × ``sync_every`` {1, 0.25, 0.1}, the
   time until the one-process final accuracy is reached, and an ``outer_lr`` ×
   ``outer_momentum`` sweep at 2 and 8 segments; the section ends with a recommendation
   computed from the numbers.
3. ``selection``: a K = 8 grid trained in one pass (``grid=...``; ``halving=False`` for a like
   for like time comparison, and the default successive halving) versus 8 sequential runs of
   the same configurations: total time ratio, best validation accuracy found.
4. ``groups``: 50 groups with a rule of their own, one model per group in the same queries
   (``group_by="grp"``) versus 50 separate runs (``WHERE grp = :g``): total time ratio and mean
   per-group validation accuracy (both evaluated on the same held-out rows per group).

Every part uses one torch thread per process (``--threads``): with ``OMP_WAIT_POLICY=PASSIVE``
(set here as in ``bench_engine.py``) a second thread makes these small models several times
slower on two cores.

Data comes from ``bench_engine.make_data`` (32 float features, 4 classes from a seeded
nonlinear rule) and, for ``groups``, from a per-group variant of that rule; the PostgreSQL
server is a throwaway one started with ``tests/pgserver.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import math
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_engine as be
import numpy as np
import torch

import dbdl_magic as dl
from dbdl_magic.events import Callbacks
from dbdl_magic.training.selection import label as trial_label

ROOT = be.ROOT
RESULTS = be.RESULTS
CORES = os.cpu_count() or 1
PARTS = ("parallel", "convergence", "selection", "groups")
BATCH = 256
LR = 1e-3
SEED = 0
log = be.log


@dataclass
class Mode:
    """Sizes of one benchmark mode (every field can be overridden from the command line)."""

    name: str
    # 1. parallel: speed of segments against one process
    rows: int
    workers: list[int]  # segment counts besides one process
    epochs: int
    model: str
    auto: bool
    auto_epochs: int  # parallel="auto" gets more epochs, so that spreading can pay
    big_model: str  # a large state: what the combine costs
    big_rows: int  # 0: skip the large model
    big_epochs: int
    big_rows_per_buffer: int  # enough buffers for every segment (the default packs 1 here)
    speed_backends: list[str]
    query_workers: bool  # also PostgreSQL's own parallel query (the path before segments)
    # 2. convergence
    conv_rows: int
    conv_workers: list[int]  # segment counts besides one process
    conv_epochs: int
    conv_syncs: list[float | None]
    conv_averaging: list[str]
    conv_rows_per_buffer: int
    conv_backend: str
    sweep_workers: list[int]  # the outer_lr × outer_momentum sweep ([]: none)
    sweep_lrs: list[float]
    sweep_momenta: list[float]
    sweep_sync: float
    # 3. model selection
    sel_rows: int
    sel_epochs: int
    sel_grid: dict[str, list[Any]]
    # 4. per-group training
    groups: int
    group_rows: int  # rows per group (training + validation)
    group_epochs: int
    group_model: str
    # torch threads per process in the speed comparison, convergence, selection and groups
    # parts (1: on two cores the fastest for these small models, and the same for every
    # segment count)
    threads: int = 1
    # both backends for selection and groups
    backends: list[str] = field(default_factory=lambda: ["postgresql", "sqlite"])
    quiet: float = 20.0  # seconds to wait at most for idle CPUs before a timed run
    conv_quiet: float = 3.0  # the same for convergence runs (accuracy first)
    quiet_budget: float = 300.0


FULL = Mode(
    "full",
    rows=1_000_000,
    workers=[2],
    epochs=4,
    model="mlp:64,32",
    auto=True,
    auto_epochs=6,
    big_model="mlp:1024,1024",
    big_rows=100_000,
    big_epochs=3,
    big_rows_per_buffer=5_000,
    speed_backends=["postgresql", "sqlite"],
    query_workers=True,
    conv_rows=200_000,
    conv_workers=[2, 4, 8],
    conv_epochs=8,
    conv_syncs=[None, 0.25, 0.1],
    conv_averaging=["mean", "outer"],
    conv_rows_per_buffer=1000,
    conv_backend="postgresql",
    sweep_workers=[2, 8],
    sweep_lrs=[0.7, 1.0, 1.5],
    sweep_momenta=[0.0, 0.9],
    sweep_sync=0.25,
    sel_rows=120_000,
    sel_epochs=4,
    sel_grid={
        "lr": [1e-3, 1e-2],
        "batch_size": [64, 256],
        "model": ["mlp:64,32", "mlp:128,64"],
    },
    groups=50,
    group_rows=2_000,
    group_epochs=8,
    group_model="mlp:32,16",
)
QUICK = Mode(
    "quick",
    rows=60_000,
    workers=[2],
    epochs=2,
    model="mlp:64,32",
    auto=False,
    auto_epochs=2,
    big_model="mlp:1024,1024",
    big_rows=0,
    big_epochs=2,
    big_rows_per_buffer=1_000,
    speed_backends=["postgresql", "sqlite"],
    query_workers=False,  # one query's workers cost seconds each: the full run has it
    conv_rows=20_000,
    conv_workers=[2],
    conv_epochs=2,
    conv_syncs=[0.5],
    conv_averaging=["mean", "outer"],
    conv_rows_per_buffer=500,
    conv_backend="postgresql",
    sweep_workers=[],
    sweep_lrs=[1.0],
    sweep_momenta=[0.9],
    sweep_sync=0.5,
    sel_rows=10_000,
    sel_epochs=2,
    sel_grid={"lr": [1e-3, 1e-2], "model": ["mlp:32", "mlp:64,32"]},
    groups=6,
    group_rows=600,
    group_epochs=2,
    group_model="mlp:16",
    backends=["postgresql"],
    quiet=2.0,
    conv_quiet=0.0,
    quiet_budget=10.0,
)


# -- machine and load -----------------------------------------------------------------------------
def loadavg() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f}"


def ram_gb() -> str:
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/meminfo") as f:
            line = next(v for v in f if v.startswith("MemTotal:"))
        return f"{int(line.split()[1]) / 2**20:.1f} GiB"
    return "unknown"


def facts(targets: be.Targets) -> dict[str, str]:
    out = be.machine_facts(targets)
    out["ram"] = ram_gb()
    out["load average (1/5/15 min) at start"] = loadavg()
    out["CPUs busy with other work at start"] = f"{be.cpu_busy(1.0):.0%}"
    return out


def cpu_snapshot() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:]]
    tck = os.sysconf("SC_CLK_TCK")
    return (sum(ticks) - ticks[3] - ticks[4]) / tck, sum(ticks) / tck


# -- data -----------------------------------------------------------------------------------------
def group_data(
    groups: int, rows_per_group: int, n_features: int = 8, n_classes: int = 2, seed: int = SEED
) -> dict[str, np.ndarray]:
    """Rows of ``groups`` groups, each labelled by its own random tanh network of the features.

    A model of all rows together can only learn the average rule; one model per group can learn
    each. ``is_val`` marks 20% of every group's rows (a fixed set) for validation.
    """
    rng = np.random.default_rng(seed)
    xs, ys, gs, vs = [], [], [], []
    for g in range(groups):
        rule = np.random.default_rng(seed + 1000 + g)
        w1 = rule.standard_normal((n_features, 8)) / np.sqrt(n_features) * 2.0
        w2 = rule.standard_normal((8, n_classes))
        x = rng.standard_normal((rows_per_group, n_features))
        logits = np.tanh(x @ w1) @ w2 + 0.1 * rng.standard_normal((rows_per_group, n_classes))
        xs.append(x)
        ys.append(logits.argmax(axis=1))
        gs.append(np.full(rows_per_group, g))
        val = np.zeros(rows_per_group, dtype=np.int64)
        val[rng.permutation(rows_per_group)[: round(rows_per_group * 0.2)]] = 1
        vs.append(val)
    x = np.concatenate(xs)
    cols: dict[str, np.ndarray] = {f"f{i}": x[:, i] for i in range(n_features)}
    cols["grp"] = np.concatenate(gs).astype(np.int32)
    cols["is_val"] = np.concatenate(vs).astype(np.int32)
    cols["label"] = np.concatenate(ys).astype(np.int32)
    return cols


def load_columns(
    targets: be.Targets, table: str, cols: dict[str, np.ndarray], backends: list[str]
) -> None:
    """(Re)create ``table`` from float64 / int32 column arrays: binary COPY on PostgreSQL,
    executemany on SQLite."""
    started = time.perf_counter()
    names = list(cols)
    n = len(next(iter(cols.values())))
    kinds = {c: "int" if np.issubdtype(v.dtype, np.integer) else "float" for c, v in cols.items()}
    if "postgresql" in backends and targets.pg_conninfo:
        import psycopg

        fields: list[tuple[str, str]] = [("count", ">i2")]
        for c in names:
            fields += [(f"len_{c}", ">i4"), (c, ">i4" if kinds[c] == "int" else ">f8")]
        ddl = ", ".join(
            f"{c} {'integer' if kinds[c] == 'int' else 'double precision'}" for c in names
        )
        with psycopg.connect(targets.pg_conninfo) as con:
            con.execute(f"DROP TABLE IF EXISTS {table}")
            con.execute(f"CREATE TABLE {table} ({ddl})")
            with con.cursor() as cur, cur.copy(f"COPY {table} FROM STDIN (FORMAT BINARY)") as cp:
                cp.write(b"PGCOPY\n\xff\r\n\x00" + b"\x00" * 8)
                for start in range(0, n, 100_000):
                    stop = min(n, start + 100_000)
                    rec = np.empty(stop - start, dtype=np.dtype(fields))
                    rec["count"] = len(names)
                    for c in names:
                        rec[f"len_{c}"] = 4 if kinds[c] == "int" else 8
                        rec[c] = cols[c][start:stop]
                    cp.write(rec.tobytes())
                cp.write(b"\xff\xff")
            con.execute(f"ANALYZE {table}")
    if "sqlite" in backends:
        ddl = ", ".join(f"{c} {'INTEGER' if kinds[c] == 'int' else 'REAL'}" for c in names)
        marks = ", ".join("?" * len(names))
        with contextlib.closing(sqlite3.connect(targets.sqlite_path)) as con:
            con.execute(f"DROP TABLE IF EXISTS {table}")
            con.execute(f"CREATE TABLE {table} ({ddl})")
            for start in range(0, n, 50_000):
                part = [cols[c][start : start + 50_000].tolist() for c in names]
                con.executemany(f"INSERT INTO {table} VALUES ({marks})", zip(*part, strict=True))
            con.commit()
    log(
        f"loaded {n:,} rows into {table} ({', '.join(backends)};"
        f" {time.perf_counter() - started:.1f} s)"
    )


def engine_columns(x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    cols = {f"f{i}": x[:, i] for i in range(x.shape[1])}
    cols["label"] = y.astype(np.int32)
    return cols


# -- servers --------------------------------------------------------------------------------------
@contextlib.contextmanager
def databases(use_postgres: bool, max_workers: int) -> Iterator[be.Targets]:
    """A temporary SQLite file and a throwaway PostgreSQL server (kernels installed) allowing
    ``max_workers`` parallel workers (``bench_engine.databases`` with a worker count)."""
    with tempfile.TemporaryDirectory(prefix="dbdl-scale-") as tmp:
        path = Path(tmp) / "bench.db"
        dl.install(f"sqlite:///{path}").engine.dispose()
        if not use_postgres:
            with be._disposing(be.Targets(path, None, None)) as targets:
                yield targets
            return
        sys.path.insert(0, str(ROOT / "tests"))
        from pgserver import PostgresServer, server_pythonpath, unavailable_reason

        reason = unavailable_reason()
        if reason:
            raise SystemExit(f"PostgreSQL unavailable ({reason}); use --no-postgres")
        with PostgresServer.start(server_pythonpath(), max_workers=max_workers) as server:
            url = server.create_database("bench")
            dl.install(url).engine.dispose()
            postmaster = int((server.datadir / "postmaster.pid").read_text().split()[0])
            targets = be.Targets(path, url, server.conninfo("bench"), postmaster)
            with be._disposing(targets):
                yield targets


# -- one timed training run -----------------------------------------------------------------------
@dataclass
class Run:
    """A finished ``dl.train``: wall time, the run's iteration rows, the model (or the error)."""

    wall: float
    rows: list[dict[str, Any]]
    model: Any = None
    error: str | None = None
    server_cpu: float = 0.0
    others: float = 0.0  # share of the machine's CPU time other processes used meanwhile
    info: dict[str, Any] = field(default_factory=dict)  # the run's start facts (buffers, ...)
    packed_at: float = float("nan")  # seconds from the call to ``on_start`` (packing done)

    @property
    def iter_seconds(self) -> float:
        return float(sum(r["seconds"] for r in self.rows))

    def col(self, name: str) -> list[Any]:
        return [r.get(name) for r in self.rows]


class PhaseTimer:
    """Seconds the run spends in each phase of the segments, per iteration.

    Wraps (in this process, once) the methods :class:`Segments.train` calls (``begin``,
    ``run_round``: the round's statements on every segment until the last returns,
    ``combine``: merge + outer step, ``commit``: the checkpoint insert) and the backends'
    ``open_segments`` (the segments' start-up, in the iteration that opens them).
    :meth:`take` returns the totals since the last call and resets them; ``opened`` keeps
    the segments opened, whose processes :func:`run_cpu` reads.
    """

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.opened: list[Any] = []
        self.installed = False

    def install(self) -> None:
        if self.installed:
            return
        from dbdl_magic.backends import postgres, segments, sqlite, sqlite_segments

        for cls in (segments.PostgresSegments, sqlite_segments.SQLiteSegments):
            for name in ("begin", "run_round", "combine", "commit"):
                self._wrap(cls, name, name)
        for cls in (postgres.PostgresBackend, sqlite.SQLiteBackend):
            self._wrap(cls, "open_segments", "open")
        self.installed = True

    def _wrap(self, cls: type, name: str, phase: str) -> None:
        original = getattr(cls, name)

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                result = original(*args, **kwargs)
                if phase == "open":
                    self.opened.append(result)
                return result
            finally:
                self.totals[phase] = self.totals.get(phase, 0.0) + time.perf_counter() - started
                self.counts[phase] = self.counts.get(phase, 0) + 1

        setattr(cls, name, timed)

    def take(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.totals)
        out["rounds"] = self.counts.get("run_round", 0)
        self.totals, self.counts = {}, {}
        return out


TIMER = PhaseTimer()
QUERY_WORKERS = [0]  # > 1: one-process iterations run as PostgreSQL parallel queries


def install_query_workers() -> None:
    """Make ``QUERY_WORKERS[0]`` reach ``PostgresBackend.train_iteration`` as ``workers``: the
    path ``parallel=N`` took before segments (a parallel plan of the aggregate, N workers
    started by the server for every query), no longer reachable through the options."""
    from dbdl_magic.backends.postgres import PostgresBackend

    if getattr(PostgresBackend.train_iteration, "bench_query_workers", False):
        return
    original = PostgresBackend.train_iteration

    @functools.wraps(original)
    def train_iteration(self: Any, *args: Any, **kwargs: Any) -> Any:
        if QUERY_WORKERS[0] > 1 and kwargs.get("segments") is None:
            kwargs["workers"] = QUERY_WORKERS[0]
        return original(self, *args, **kwargs)

    train_iteration.bench_query_workers = True  # type: ignore[attr-defined]
    PostgresBackend.train_iteration = train_iteration  # type: ignore[method-assign]


@contextlib.contextmanager
def query_workers(n: int) -> Iterator[None]:
    install_query_workers()
    QUERY_WORKERS[0] = n
    try:
        yield
    finally:
        QUERY_WORKERS[0] = 0


def own_cpu() -> float:
    """CPU seconds of this process and its reaped children (SQLite segment processes)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def run_cpu(targets: be.Targets) -> float:
    """CPU seconds so far of everything a run uses: this process (and its reaped children),
    the live SQLite segment processes, the PostgreSQL server (its sessions, the segments'
    included, and its exited parallel workers)."""
    total = own_cpu() + be.server_cpu(targets.pg_postmaster)
    tck = os.sysconf("SC_CLK_TCK")
    for segments in list(TIMER.opened):
        if type(segments).__name__ != "SQLiteSegments":
            continue
        pids = segments.pids()
        if not pids:  # closed: reaped, counted in own_cpu
            TIMER.opened.remove(segments)
        for pid in pids:
            with contextlib.suppress(OSError, IndexError, ValueError):
                fields = be._stat_fields(pid)
                total += (int(fields[11]) + int(fields[12])) / tck
    return total


def timed_train(targets: be.Targets, backend: str, query: str, quiet: float, **options: Any) -> Run:
    """``dl.train`` on ``backend``, timed from the call (packing included) to the loaded model.

    The iteration rows come from the ``on_iteration`` callback, so a failure while loading the
    model at the very end still leaves the training's numbers (the error is kept in ``error``).
    Each row also gets ``at`` (seconds since the call when the iteration was committed),
    ``phases`` (:class:`PhaseTimer`) and ``cpu`` (:func:`run_cpu` seconds since the previous
    iteration; the first: since packing ended, the segments' opening included). ``others`` =
    CPU time the machine spent busy during the run minus this process's (and its segment
    processes') and the PostgreSQL server's (incl. its sessions and parallel workers), as a
    share of wall time × cores.
    """
    TIMER.install()
    rows: list[dict[str, Any]] = []
    info: dict[str, Any] = {}
    db = targets.database(backend)  # connected (and checked) before the clock starts
    be.wait_quiet(quiet)
    pid = targets.pg_postmaster if backend == "postgresql" else None
    server0, own0 = be.server_cpu(targets.pg_postmaster), own_cpu()
    busy0, _ = cpu_snapshot()
    cpu0 = be.server_cpu(pid)
    started = time.perf_counter()
    packed_at = [float("nan")]
    cpu_mark = [0.0]

    def on_start(facts: dict[str, Any]) -> None:
        packed_at[0] = time.perf_counter() - started
        info.update(facts)
        TIMER.take()
        cpu_mark[0] = run_cpu(targets)

    def on_iteration(row: dict[str, Any]) -> None:
        now = run_cpu(targets)
        at = time.perf_counter() - started
        rows.append({**row, "at": at, "phases": TIMER.take(), "cpu": now - cpu_mark[0]})
        cpu_mark[0] = now

    model, error = None, None
    try:
        model = dl.train(
            db,
            query,
            callbacks=Callbacks(on_start=on_start, on_iteration=on_iteration),
            **options,
        )
    except Exception as exc:  # keep the numbers; report the error
        if not rows:
            raise
        error = f"{type(exc).__name__}: {exc}"
        log(f"!! dl.train failed after training: {error}")
    wall = time.perf_counter() - started
    busy1, _ = cpu_snapshot()
    ours = own_cpu() - own0 + be.server_cpu(targets.pg_postmaster) - server0
    others = max(0.0, (busy1 - busy0) - ours) / max(wall * CORES, 1e-9)
    return Run(wall, rows, model, error, be.server_cpu(pid) - cpu0, others, info, packed_at[0])


def warm_up(targets: be.Targets, backends: list[str]) -> None:
    """One tiny run per backend, so that no timed run pays the first import of torch and the
    kernels in the database's process (PostgreSQL) or of the optimizer's modules."""
    x, y = be.make_data(2_000, seed=SEED + 99)
    load_columns(targets, "scale_warm", engine_columns(x, y), backends)
    for backend in backends:
        timed_train(
            targets,
            backend,
            "SELECT * FROM scale_warm",
            0.0,
            **base_options(model="mlp:8", epochs=1, parallel=1, threads=CORES),
        )


def base_options(**extra: Any) -> dict[str, Any]:
    return {
        "target": "label",
        "batch_size": BATCH,
        "optimizer": "adam",
        "lr": LR,
        "validation": 0.2,
        "seed": SEED,
        **extra,
    }


def median(values: list[float]) -> float:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else float("nan")


def after_first(values: list[float]) -> list[float]:
    return values[1:] if len(values) > 1 else values


# -- 1. parallel: segments against one process ----------------------------------------------------
def speed_variants(mode: Mode, backend: str, big: bool) -> list[tuple[str, int | str, int]]:
    """(label, ``parallel``, PostgreSQL parallel-query workers) of one backend and model."""
    out: list[tuple[str, int | str, int]] = [("1 process", 1, 0)]
    out += [(f"{w} segments", w, 0) for w in mode.workers if w > 1]
    if backend == "postgresql" and mode.query_workers:
        out += [(f"parallel query, {w} workers (before)", 1, w) for w in mode.workers if w > 1]
    if mode.auto and not big and backend == mode.speed_backends[0]:
        out.append(('"auto"', "auto", 0))
    return out


def phase_split(run: Run) -> dict[str, float]:
    """Medians over iterations 2..N of where an iteration's time went (:class:`PhaseTimer`):
    ``rest`` = training time outside the timed phases (buffer ranges, bookkeeping), ``after``
    = evaluation, archiving, history and the transaction's commit."""
    keys = ("run_round", "combine", "commit", "begin", "rest", "after", "rounds")
    per: dict[str, list[float]] = {k: [] for k in keys}
    for row in after_first(run.rows):
        p = row.get("phases") or {}
        timed = sum(p.get(k, 0.0) for k in ("run_round", "combine", "commit", "begin"))
        for k in ("run_round", "combine", "commit", "begin", "rounds"):
            per[k].append(float(p.get(k, 0.0)))
        per["rest"].append(row["train_seconds"] - timed)
        per["after"].append(row["seconds"] - row["train_seconds"])
    return {k: median(v) for k, v in per.items()}


def bench_parallel(mode: Mode, targets: be.Targets) -> dict[str, Any]:
    backends = [b for b in mode.speed_backends if b in targets.urls()]
    cases: list[tuple[str, int, int, bool, dict[str, Any]]] = [
        (mode.model, mode.rows, mode.epochs, False, {})
    ]
    if mode.big_rows:
        packing = {"rows_per_buffer": mode.big_rows_per_buffer}
        cases.append((mode.big_model, mode.big_rows, mode.big_epochs, True, packing))
    results = []
    for model, n_rows, epochs, big, packing in cases:
        x, y = be.make_data(n_rows)
        table = "scale_big_model" if big else "scale_big"
        load_columns(targets, table, engine_columns(x, y), backends)
        del x, y
        for backend in backends:
            for label, parallel, qworkers in speed_variants(mode, backend, big):
                n_epochs = mode.auto_epochs if parallel == "auto" else epochs
                threads = None if parallel == "auto" else mode.threads
                load0 = loadavg()
                with query_workers(qworkers):
                    run = timed_train(
                        targets,
                        backend,
                        f"SELECT * FROM {table}",
                        mode.quiet,
                        **base_options(
                            model=model,
                            epochs=n_epochs,
                            parallel=parallel,
                            threads=threads,
                            **packing,
                        ),
                    )
                train_s = run.col("train_seconds")
                result = {
                    "backend": backend,
                    "model": model,
                    "rows": n_rows,
                    "rows_per_buffer": packing.get("rows_per_buffer"),
                    "label": label,
                    "parallel": parallel,
                    "n": int(parallel) if parallel != "auto" and parallel > 1 else qworkers or 1,
                    "threads": threads if threads is not None else "auto",
                    "epochs": n_epochs,
                    "epoch_s": median(after_first(train_s)),
                    "iteration_s": median(after_first(run.col("seconds"))),
                    "cpu_s": median(after_first(run.col("cpu"))),
                    "first_epoch_s": train_s[0],
                    "train_s": train_s,
                    "wall": run.wall,
                    "pack_s": run.packed_at,
                    "startup_s": sum(r["phases"].get("open", 0.0) for r in run.rows),
                    "phases": phase_split(run),
                    "accuracy": run.rows[-1].get("val_accuracy"),
                    "workers": run.col("workers"),
                    "combines": run.col("combines"),
                    "notes": run.col("parallel_note"),
                    "buffers": run.info.get("buffers"),
                    "busy": run.others,
                    "load": f"{load0} → {loadavg()}",
                    "error": run.error,
                }
                log(
                    f"parallel {backend} {model} {label}: {result['epoch_s']:.2f} s/epoch"
                    f" (first {result['first_epoch_s']:.2f}), acc {result['accuracy']:.4f},"
                    f" workers {result['workers']}, combines {result['combines']}"
                )
                results.append(result)
    for r in results:
        base = next(
            b
            for b in results
            if b["backend"] == r["backend"]
            and b["model"] == r["model"]
            and b["parallel"] == 1
            and b["n"] == 1
        )
        r["speedup"] = base["epoch_s"] / r["epoch_s"]
        r["efficiency"] = r["speedup"] / r["n"] if r["n"] > 1 else None
        r["base_phases"] = base["phases"]
        r["base_epoch_s"] = base["epoch_s"]
        r["cpu_ratio"] = r["cpu_s"] / base["cpu_s"]
        r["cpu_bound"] = r["n"] * base["cpu_s"] / r["cpu_s"]
    return {"results": results, "threads": mode.threads}


def render_parallel(mode: Mode, data: dict[str, Any]) -> str:
    rows = data["results"]
    models = ", ".join(dict.fromkeys(f"{r['model']} on {r['rows']:,} rows" for r in rows))
    lines = [
        f"### Segments vs one process: {models} × 32 features, Adam lr {LR}, batch {BATCH}",
        "",
        f"*N segments* = `parallel=N, threads={data['threads']}`: N sessions (PostgreSQL) or"
        " worker processes (SQLite, a database file) opened once per run, each training over"
        " its share of the buffers (`buffer_id % N`), the partial states combined in the"
        f" database once per epoch (averaging = the default). *1 process* = `parallel=1,"
        f" threads={data['threads']}`. *parallel query (before)* = the path `parallel=N` took"
        " before segments, PostgreSQL's own parallel plan of the aggregate (N workers, started"
        " by the server for every query), no longer reachable through the options: the"
        " benchmark calls `train_iteration(..., workers=N)` (a wrapper in this process)."
        ' *"auto"* = `parallel="auto"` (threads chosen by the run), given more epochs so that'
        " spreading can pay. *epoch s* = median `train_seconds` over epochs 2..N; *speedup* ="
        " 1 process ÷ this row; *efficiency* = speedup ÷ N (goal ≥ 0.85, i.e. ≥ 1.7× with 2);"
        " *first epoch s* includes each segment's first optimizer (torch's lazy imports);"
        " *start-up s* = opening the segments (before the first iteration's clock starts);"
        " *CPU s/iteration* = CPU seconds of every process the run uses (client, segment"
        " processes, server sessions and parallel workers) per iteration, medians over"
        " epochs 2..N; *speedup if CPU-bound* = N × CPU of 1 process ÷ CPU of this row: the"
        " speedup N processes would reach with N idle cores and perfect overlap (on a machine"
        " shared with other work, more processes also take a larger share of the cores, which"
        " inflates the measured speedup; this column does not depend on that)."
        " *pack s* = from the call to the start of training. 20% of the rows are held out;"
        " *others' CPU* = share of the machine's CPU time (wall × cores) used by other"
        " processes during the run.",
        "",
        be.table(
            [
                "backend",
                "model (rows)",
                "variant",
                "epoch s",
                "speedup",
                "efficiency",
                "goal ≥ 1.7×: measured / CPU-bound",
                "first epoch s",
                "iteration s",
                "CPU s/iteration",
                "CPU ÷ 1 process",
                "speedup if CPU-bound",
                "start-up s",
                "pack s",
                "buffers",
                "workers per epoch",
                "combines per epoch",
                "final val acc",
                "others' CPU",
                "load avg before → after",
            ],
            [
                [
                    r["backend"],
                    f"{r['model']} ({r['rows'] // 1000:,}k"
                    + (f", {r['rows_per_buffer']:,} rows/buffer)" if r["rows_per_buffer"] else ")"),
                    r["label"],
                    f"**{r['epoch_s']:.2f}**",
                    f"**{r['speedup']:.2f}×**",
                    "–" if r["efficiency"] is None else f"{r['efficiency']:.2f}",
                    "–"
                    if r["efficiency"] is None or r["parallel"] == 1
                    else " / ".join(
                        "yes" if v >= 1.7 else "no" for v in (r["speedup"], r["cpu_bound"])
                    ),
                    f"{r['first_epoch_s']:.2f}",
                    f"{r['iteration_s']:.2f}",
                    f"{r['cpu_s']:.2f}",
                    f"{r['cpu_ratio']:.2f}",
                    f"{r['cpu_bound']:.2f}×",
                    f"{r['startup_s']:.1f}" if r["startup_s"] else "–",
                    f"{r['pack_s']:.1f}",
                    r["buffers"],
                    ", ".join(str(w) for w in r["workers"]),
                    ", ".join(str(c) for c in r["combines"]),
                    f"{r['accuracy']:.4f}",
                    f"{r['busy']:.0%}",
                    r["load"],
                ]
                for r in rows
            ],
        ),
    ]
    seg = [r for r in rows if r["parallel"] != "auto" and r["parallel"] > 1]
    if seg:
        lines += [
            "",
            "Where an iteration's time goes with segments (seconds, medians over epochs 2..N):"
            " *rounds* = the sync rounds' statements on every segment until the last one"
            " returns; *combine* = merging the partial states (`dbdl.merge`) + the outer step +"
            " reading the merged states' facts; *checkpoint insert* = copying the last round's"
            " states into the checkpoints; *begin + rest* = the round's starting states,"
            " buffer ranges and bookkeeping; *after training* = evaluation, archiving, history"
            " and the commit (the same work as with one process, whose numbers are on the"
            " right).",
            "",
            be.table(
                [
                    "backend",
                    "model",
                    "variant",
                    "train s",
                    "rounds",
                    "rounds s",
                    "combine s",
                    "checkpoint insert s",
                    "begin + rest s",
                    "after training s",
                    "1 process: train s",
                    "1 process: after training s",
                ],
                [
                    [
                        r["backend"],
                        r["model"],
                        r["label"],
                        f"{r['epoch_s']:.2f}",
                        f"{r['phases']['rounds']:.0f}",
                        f"{r['phases']['run_round']:.3f}",
                        f"{r['phases']['combine']:.3f}",
                        f"{r['phases']['commit']:.3f}",
                        f"{r['phases']['begin'] + r['phases']['rest']:.3f}",
                        f"{r['phases']['after']:.3f}",
                        f"{r['base_epoch_s']:.2f}",
                        f"{r['base_phases']['after']:.3f}",
                    ]
                    for r in seg
                ],
            ),
        ]
    for r in rows:
        if r["parallel"] == "auto":
            notes = "; ".join(
                f"epoch {i + 1}: {n} ({w} worker{'s' if w != 1 else ''})"
                for i, (n, w) in enumerate(zip(r["notes"], r["workers"], strict=True))
            )
            lines += [
                "",
                f'`parallel="auto"` on {r["backend"]} ({r["model"]}, {r["rows"]:,}'
                f" rows, {r['epochs']} epochs): {notes}.",
            ]
    idle = [
        f"{r['backend']} {r['model']} {r['label']}"
        for r in rows
        if r["parallel"] != "auto" and r["n"] > 1 and not any(r["combines"])
    ]
    if idle:
        lines += [
            "",
            "**Not a parallel measurement** (no partial states combined: one segment or"
            " worker had all the training buffers): " + "; ".join(idle) + ".",
        ]
    errors = [f"{r['backend']} {r['label']}: {r['error']}" for r in rows if r.get("error")]
    if errors:
        lines += ["", "Errors after training: " + "; ".join(errors)]
    lines += [
        "",
        "Before segments (the previous run of this part, git ba468a2, 2026-11-29): 1M × 32,"
        " mlp:64,32, epoch 2.11 s in one process × 1 thread vs 4.52 s with 2 PostgreSQL"
        " parallel workers × 1 thread (0.47×).",
    ]
    return "\n".join(lines)


# -- 2. convergence -------------------------------------------------------------------------------
def option_default(name: str) -> Any:
    """The default of a ``dl.train`` option (the outer step's, as the package ships them)."""
    from dbdl_magic.options import TrainOptions

    return TrainOptions.__dataclass_fields__[name].default


@dataclass(frozen=True)
class Setting:
    """One convergence run: segments (1: one process), averaging, sync_every, outer step."""

    workers: int
    averaging: str | None = None
    sync: float | None = None
    outer_lr: float | None = None
    outer_momentum: float | None = None

    def options(self) -> dict[str, Any]:
        out: dict[str, Any] = {"parallel": self.workers, "sync_every": self.sync}
        if self.workers > 1:
            out["averaging"] = self.averaging
            if self.averaging == "outer":
                out["outer_lr"] = self.outer_lr
                out["outer_momentum"] = self.outer_momentum
        return out

    def label(self) -> str:
        if self.workers == 1:
            return "1 process"
        avg = str(self.averaging)
        if self.averaging == "outer":
            avg += f" ({self.outer_lr:g}, {self.outer_momentum:g})"
        return f"{self.workers} seg, {avg}, sync {self.sync or 1:g}"


def conv_settings(
    mode: Mode,
) -> tuple[list[Setting], list[Setting], list[tuple[Setting, Setting]]]:
    """The main grid, and the sweep as (setting, the run that measures it): a sweep point the
    grid already ran is not run again, and outer_lr 1 with momentum 0 (the plain average by
    construction) is the grid's ``mean`` run."""
    lr0, mom0 = option_default("outer_lr"), option_default("outer_momentum")
    grid = [Setting(1)]
    for w in mode.conv_workers:
        for avg in mode.conv_averaging:
            for sync in mode.conv_syncs:
                outer = avg == "outer"
                grid.append(Setting(w, avg, sync, lr0 if outer else None, mom0 if outer else None))
    sweep: list[tuple[Setting, Setting]] = []
    extra: list[Setting] = []
    for w in mode.sweep_workers:
        for lr in mode.sweep_lrs:
            for mom in mode.sweep_momenta:
                s = Setting(w, "outer", mode.sweep_sync, lr, mom)
                same = s
                if lr == 1.0 and mom == 0.0:
                    same = Setting(w, "mean", mode.sweep_sync)
                if same not in grid and same not in extra:
                    extra.append(same)
                sweep.append((s, same))
    return grid, extra, sweep


def bench_convergence(mode: Mode, targets: be.Targets) -> dict[str, Any]:
    backend = mode.conv_backend
    x, y = be.make_data(mode.conv_rows, seed=SEED + 11)
    load_columns(targets, "scale_conv", engine_columns(x, y), [backend])
    del x, y
    grid, extra, sweep = conv_settings(mode)
    runs: dict[Setting, dict[str, Any]] = {}
    for setting in grid + extra:
        load0 = loadavg()
        run = timed_train(
            targets,
            backend,
            "SELECT * FROM scale_conv",
            mode.conv_quiet,
            **base_options(
                model=mode.model,
                epochs=mode.conv_epochs,
                threads=mode.threads,
                rows_per_buffer=mode.conv_rows_per_buffer,
                **setting.options(),
            ),
        )
        result = {
            "label": setting.label(),
            "accuracies": run.col("val_accuracy"),
            "at": run.col("at"),
            "seconds": run.col("seconds"),
            "train_s": run.col("train_seconds"),
            "epoch_s": median(after_first(run.col("train_seconds"))),
            "pack_s": run.packed_at,
            "startup_s": sum(r["phases"].get("open", 0.0) for r in run.rows),
            "rounds": [r["phases"].get("rounds", 0) for r in run.rows],
            "workers_seen": run.col("workers"),
            "combines": run.col("combines"),
            "buffers": run.info.get("buffers"),
            "busy": run.others,
            "load": f"{load0} → {loadavg()}",
            "error": run.error,
        }
        log(
            f"convergence {result['label']}: acc"
            f" {', '.join(f'{a:.4f}' for a in result['accuracies'])};"
            f" {result['epoch_s']:.2f} s/epoch, combines {result['combines']}"
        )
        runs[setting] = result
    base = runs[Setting(1)]
    target = base["accuracies"][-1]
    for r in runs.values():
        hit = next((i for i, a in enumerate(r["accuracies"]) if a >= target), None)
        r["target_epoch"] = None if hit is None else hit + 1
        r["target_after_pack"] = None if hit is None else r["at"][hit] - r["pack_s"]
        r["target_wall"] = None if hit is None else r["at"][hit]
    return {
        "backend": backend,
        "rows": mode.conv_rows,
        "epochs": mode.conv_epochs,
        "model": mode.model,
        "threads": mode.threads,
        "rows_per_buffer": mode.conv_rows_per_buffer,
        "target": target,
        "defaults": (option_default("outer_lr"), option_default("outer_momentum")),
        "grid": [(s, runs[s]) for s in grid],
        "sweep": [(s, runs[same], s != same) for s, same in sweep],
        "sweep_sync": mode.sweep_sync,
    }


def acc_at(r: dict[str, Any], epoch: int) -> float:
    accs = r["accuracies"]
    return accs[min(epoch, len(accs)) - 1]


def render_convergence(data: dict[str, Any]) -> str:
    epochs = data["epochs"]
    mid = min(4, epochs)
    grid = data["grid"]
    base = grid[0][1]
    b_mid, b_end = acc_at(base, mid), acc_at(base, epochs)

    def delta(a: float, b: float) -> str:
        return f"{(a - b) * 100:+.1f}"

    def target_cells(r: dict[str, Any]) -> list[str]:
        if r["target_epoch"] is None:
            return ["not reached", "–", "–"]
        return [str(r["target_epoch"]), f"{r['target_after_pack']:.1f}", f"{r['target_wall']:.1f}"]

    # the accuracy and time-to-target columns both tables share, and their cells for a run
    accuracy_headers = [
        f"acc after {mid}",
        f"Δ {mid}",
        f"acc after {epochs}",
        f"Δ {epochs}",
        "val acc per epoch",
        "time to target: epoch",
        "s after packing",
        "wall s",
    ]

    def accuracy_cells(r: dict[str, Any]) -> list[str]:
        return [
            f"**{acc_at(r, mid):.4f}**",
            delta(acc_at(r, mid), b_mid),
            f"**{acc_at(r, epochs):.4f}**",
            delta(acc_at(r, epochs), b_end),
            ", ".join(f"{a:.3f}" for a in r["accuracies"]),
            *target_cells(r),
        ]

    lr0, mom0 = data["defaults"]
    lines = [
        f"### Convergence: 1 process vs segments × averaging × sync_every ({data['backend']})",
        "",
        f"{data['rows']:,} rows × 32 features (4 classes; 20% held out), {data['model']}, Adam"
        f" lr {LR}, batch {BATCH}, seed {SEED}, `threads={data['threads']}`,"
        f" `rows_per_buffer={data['rows_per_buffer']}` ({base['buffers']} buffers incl."
        " validation, the same for every run, so that every segment gets buffers in every sync"
        f" round), {epochs} epochs. *N seg* = `parallel=N`; *mean* = `averaging='mean'`"
        f" (sample-weighted average), *outer (lr, momentum)* = `averaging='outer'` (defaults"
        f" outer_lr {lr0:g}, outer_momentum {mom0:g}); *sync 1* = once per epoch, 0.25 / 0.1 ="
        " `sync_every`. On 2 cores, 4 and 8 segments measure accuracy, not speed (they share"
        " the cores). *Δ* = points vs 1 process. *time to target* = until the validation"
        f" accuracy first reaches the 1-process final one ({data['target']:.4f}, after"
        f" {epochs} epochs): the epoch, seconds after packing (incl. opening the segments) and"
        " wall seconds from the call (packing is the same for every run). *epoch s* = median"
        " `train_seconds` over epochs 2..N; *first epoch s* includes each segment's first"
        " optimizer.",
        "",
        be.table(
            [
                "setting",
                *accuracy_headers,
                "epoch s",
                "first epoch s",
                "start-up s",
                "combines per epoch",
                "others' CPU",
            ],
            [
                [
                    r["label"],
                    *accuracy_cells(r),
                    f"{r['epoch_s']:.2f}",
                    f"{r['train_s'][0]:.2f}",
                    f"{r['startup_s']:.1f}" if r["startup_s"] else "–",
                    ", ".join(dict.fromkeys(str(c) for c in r["combines"])),
                    f"{r['busy']:.0%}",
                ]
                for _s, r in grid
            ],
        ),
    ]
    if data["sweep"]:
        lines += [
            "",
            f"Outer step sweep (`averaging='outer'`, sync {data['sweep_sync']:g}; outer_lr 1"
            " with momentum 0 is the plain average by construction: its row is the `mean`"
            " run; a point the grid above ran is that run):",
            "",
            be.table(
                [
                    "segments",
                    "outer_lr",
                    "outer_momentum",
                    *accuracy_headers,
                    "others' CPU",
                ],
                [
                    [
                        s.workers,
                        f"{s.outer_lr:g}",
                        f"{s.outer_momentum:g}" + (" (= mean run)" if other else ""),
                        *accuracy_cells(r),
                        f"{r['busy']:.0%}",
                    ]
                    for s, r, other in data["sweep"]
                ],
            ),
        ]
    bad = [
        f"{r['label']} ({', '.join(dict.fromkeys(str(c) for c in r['combines']))})"
        for s, r in grid
        if s.workers > 1
        and any(
            c != (s.workers - 1) * (math.ceil(1 / s.sync) if s.sync else 1) for c in r["combines"]
        )
    ]
    if bad:
        lines += [
            "",
            "Combines per epoch other than (segments − 1) × rounds — some segment"
            " had no buffers in some round: " + "; ".join(bad) + ".",
        ]
    errors = [f"{r['label']}: {r['error']}" for _s, r in grid if r.get("error")]
    if errors:
        lines += ["", "Errors after training: " + "; ".join(errors)]
    lines += ["", recommendation(data)]
    return "\n".join(lines)


def unstable(r: dict[str, Any], drop: float = 0.02) -> bool:
    """Whether validation accuracy fell by more than ``drop`` from one epoch to the next."""
    accs = r["accuracies"]
    return any(after < before - drop for before, after in itertools.pairwise(accs))


def recommendation(data: dict[str, Any]) -> str:
    """The paragraph that closes the convergence section, computed from its numbers."""
    epochs = data["epochs"]
    mid = min(4, epochs)
    grid = data["grid"]
    b_mid, b_end = acc_at(grid[0][1], mid), acc_at(grid[0][1], epochs)
    seg = [(s, r) for s, r in grid if s.workers > 1]
    if not seg:
        return ""

    def d(r: dict[str, Any], epoch: int, base: float) -> float:
        return (acc_at(r, epoch) - base) * 100

    averagings = list(dict.fromkeys(str(s.averaging) for s, _r in seg))
    avg_delta = {
        a: float(np.mean([d(r, mid, b_mid) for s, r in seg if s.averaging == a]))
        for a in averagings
    }
    best_avg = max(avg_delta, key=lambda a: avg_delta[a])
    keys = sorted({(s.workers, s.sync or 1.0) for s, _r in seg}, key=lambda k: (k[0], -k[1]))
    wins = dict.fromkeys(averagings, 0)
    for key in keys:
        scored = {s.averaging: acc_at(r, mid) for s, r in seg if (s.workers, s.sync or 1.0) == key}
        if len(scored) == len(averagings):
            wins[max(scored, key=lambda a: scored[a])] += 1
    text = [
        f"**Recommendation (computed from the tables above).** Averaging: `{best_avg}` (mean Δ"
        f" after {mid} epochs over every segment count and sync_every: "
        + ", ".join(f"{a} {v:+.1f}" for a, v in avg_delta.items())
        + " points; higher in "
        + ", ".join(f"{a} {n}" for a, n in wins.items())
        + f" of {len(keys)} (segments, sync) pairs)."
    ]
    per_count = []
    for w in sorted({s.workers for s, _r in seg}):
        runs = [(s, r) for s, r in seg if s.workers == w and s.averaging == best_avg]
        once = next((r for s, r in runs if not s.sync), None)
        s_best, r_best = max(runs, key=lambda p: (acc_at(p[1], mid), acc_at(p[1], epochs)))
        cost = (
            f", {r_best['epoch_s'] / once['epoch_s']:.2f}× the epoch time of sync 1" if once else ""
        )
        hit = (
            f"reaches the 1-process final at epoch {r_best['target_epoch']}"
            if r_best["target_epoch"]
            else "does not reach the 1-process final"
        )
        per_count.append(
            f"{w} segments: sync {s_best.sync or 1:g} (Δ {d(r_best, mid, b_mid):+.1f} after {mid},"
            f" {d(r_best, epochs, b_end):+.1f} after {epochs}; {hit}{cost})"
        )
    text.append(f" Most accurate sync_every with `{best_avg}`: " + "; ".join(per_count) + ".")
    for a in averagings:
        spreads = []
        for w in sorted({s.workers for s, _r in seg}):
            accs = [acc_at(r, mid) for s, r in seg if s.workers == w and s.averaging == a]
            if len(accs) > 1:
                spreads.append((max(accs) - min(accs)) * 100)
        if spreads and max(spreads) < 0.5:
            text.append(
                f" With `{a}`, sync_every changes the accuracy after {mid} epochs by at most"
                f" {max(spreads):.1f} points: syncing more often does not pay."
            )
    shaky = [s.label() for s, r in seg if unstable(r)]
    if data["sweep"]:
        points: dict[tuple[float, float], list[tuple[float, float]]] = {}
        for s, r, _other in data["sweep"]:
            points.setdefault((s.outer_lr, s.outer_momentum), []).append(
                (acc_at(r, mid), acc_at(r, epochs))
            )
            if unstable(r) and s.label() not in shaky:
                shaky.append(s.label())
        scores = {
            k: (float(np.mean([a for a, _b in v])), float(np.mean([b for _a, b in v])))
            for k, v in points.items()
        }
        best = max(scores, key=lambda k: scores[k])
        default = tuple(data["defaults"])
        counts = sorted({s.workers for s, _r, _o in data["sweep"]})
        text.append(
            f" Outer step (sync {data['sweep_sync']:g}, mean over {counts} segments): best"
            f" outer_lr {best[0]:g}, outer_momentum {best[1]:g} (acc {scores[best][0]:.4f} after"
            f" {mid}, {scores[best][1]:.4f} after {epochs} epochs)"
            + (
                f"; the default {default[0]:g}/{default[1]:g}: {scores[default][0]:.4f} /"
                f" {scores[default][1]:.4f}"
                if default in scores
                else ""
            )
            + "."
        )
    if shaky:
        text.append(
            " Validation accuracy fell by more than 2 points from one epoch to the next in: "
            + "; ".join(shaky)
            + "."
        )
    most = max(s.workers for s, _r in seg)
    top = max(((s, r) for s, r in seg if s.workers == most), key=lambda p: acc_at(p[1], mid))
    top_delta = d(top[1], mid, b_mid)
    goal = "met" if top_delta >= -1.0 else "not met"
    text.append(
        f" Goal (with {most} segments, after {mid} epochs within 1 point of one process):"
        f" **{goal}**: the best {most}-segment setting, {top[0].label()}, is at"
        f" Δ {top_delta:+.1f} points."
    )
    return "".join(text)


# -- 3. model selection ---------------------------------------------------------------------------
def configs(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    names = list(grid)
    return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*grid.values())]


def bench_selection(mode: Mode, targets: be.Targets) -> dict[str, Any]:
    x, y = be.make_data(mode.sel_rows, seed=SEED + 23)
    backends = [b for b in mode.backends if b in targets.urls()]
    load_columns(targets, "scale_sel", engine_columns(x, y), backends)
    del x, y
    trials = configs(mode.sel_grid)
    query = "SELECT * FROM scale_sel"
    common = base_options(
        epochs=mode.sel_epochs, parallel=1, threads=mode.threads, monitor="val_accuracy"
    )
    out: dict[str, Any] = {
        "rows": mode.sel_rows,
        "epochs": mode.sel_epochs,
        "grid": mode.sel_grid,
        "k": len(trials),
        "threads": mode.threads,
        "backends": {},
    }
    for backend in backends:
        variants: dict[str, Any] = {}
        load0 = loadavg()
        # the three variants alternate order between backends, so neither always goes first
        order = ["one pass", "one pass + halving", "sequential"]
        if backend == "sqlite":
            order.reverse()
        for variant in order:
            if variant == "sequential":
                per_trial, wall, iter_s, others, errors = {}, 0.0, 0.0, 0.0, []
                for t in trials:
                    run = timed_train(targets, backend, query, mode.quiet, **{**common, **t})
                    wall += run.wall
                    iter_s += run.iter_seconds
                    others += run.others * run.wall
                    per_trial[trial_label(t)] = {
                        "val_accuracy": run.rows[-1].get("val_accuracy"),
                        "epochs": len(run.rows),
                    }
                    if run.error:
                        errors.append(run.error)
                variants[variant] = {
                    "wall": wall,
                    "iter_s": iter_s,
                    "others": others / wall,
                    "trials": per_trial,
                    "member_epochs": len(trials) * mode.sel_epochs,
                    "error": "; ".join(errors) or None,
                }
            else:
                halving = variant.endswith("halving")
                run = timed_train(
                    targets,
                    backend,
                    query,
                    mode.quiet,
                    **{**common, "grid": mode.sel_grid, "halving": halving},
                )
                per_trial = {}
                board = getattr(run.model, "leaderboard", None)
                if board is not None and len(board):
                    for line in board.to_dict("records"):
                        per_trial[line["label"]] = {
                            "val_accuracy": line.get("val_accuracy"),
                            "epochs": line.get("epochs"),
                        }
                    chosen = board.iloc[0]["label"]
                else:  # fall back to the members' lines of the last iteration
                    for line in run.rows[-1].get("members", []):
                        per_trial[line["label"]] = {
                            "val_accuracy": line.get("val_accuracy"),
                            "epochs": line.get("epoch"),
                        }
                    chosen = None
                variants[variant] = {
                    "wall": run.wall,
                    "iter_s": run.iter_seconds,
                    "others": run.others,
                    "trials": per_trial,
                    "chosen": chosen,
                    "member_epochs": sum(int(v["epochs"] or 0) for v in per_trial.values()),
                    "error": run.error,
                }
            v = variants[variant]
            best = max(v["trials"].items(), key=lambda kv: kv[1]["val_accuracy"] or 0)
            v["best_label"], v["best_accuracy"] = best[0], best[1]["val_accuracy"]
            log(
                f"selection {backend} {variant}: {v['wall']:.1f} s, best {v['best_accuracy']:.4f}"
                f" ({v['best_label']})"
            )
        seq = variants["sequential"]
        for v in variants.values():
            v["ratio"] = v["wall"] / seq["wall"]
            v["iter_ratio"] = v["iter_s"] / seq["iter_s"]
        full = variants["one pass"]["trials"]
        diffs = [
            abs(full[k]["val_accuracy"] - seq["trials"][k]["val_accuracy"])
            for k in full
            if k in seq["trials"]
        ]
        out["backends"][backend] = {
            "variants": variants,
            "max_abs_diff": max(diffs, default=None),
            "load": f"{load0} → {loadavg()}",
        }
    return out


def render_selection(data: dict[str, Any]) -> str:
    grid = ", ".join(f"{k} ∈ {{{', '.join(map(str, v))}}}" for k, v in data["grid"].items())
    lines = [
        f"### Model selection: K = {data['k']} configurations in one pass vs {data['k']}"
        " sequential runs",
        "",
        f"{data['rows']:,} rows × 32 features (4 classes; 20% held out), {data['epochs']} epochs,"
        f" Adam, grid {grid}; `parallel=1`, `threads={data['threads']}`, selection metric"
        " `val_accuracy`."
        " *one pass* = `grid=..., halving=False` (every configuration for every epoch, the data"
        " read once per iteration for all of them); *+ halving* = the default successive"
        " halving; *sequential* = one `dl.train` per configuration. *wall s* includes packing"
        " (once per one-pass run, once per sequential run); *iterations s* is the sum of the"
        " iterations' `seconds` (training queries, evaluation, checkpoints). *ratio* ="
        " ÷ sequential. *member-epochs* = configuration-epochs trained. *best* = the highest"
        " final validation accuracy among the configurations (for halving: at each one's last"
        " epoch); *returned* = the configuration the run returned (leaderboard rank 1);"
        " *others' CPU* = share of the machine's CPU time other processes used meanwhile.",
        "",
    ]
    rows = []
    for backend, b in data["backends"].items():
        for name in ("one pass", "one pass + halving", "sequential"):
            v = b["variants"][name]
            rows.append(
                [
                    backend,
                    name,
                    f"{v['wall']:.1f}",
                    f"**{v['ratio']:.2f}**",
                    f"{v['iter_s']:.1f}",
                    f"{v['iter_ratio']:.2f}",
                    v["member_epochs"],
                    f"**{v['best_accuracy']:.4f}**",
                    v["best_label"],
                    v.get("chosen") or "–",
                    f"{v['others']:.0%}",
                ]
            )
    lines.append(
        be.table(
            [
                "backend",
                "variant",
                "wall s",
                "ratio",
                "iterations s",
                "ratio (iterations)",
                "member-epochs",
                "best val acc",
                "best configuration",
                "returned",
                "others' CPU",
            ],
            rows,
        )
    )
    lines += [
        "",
        "Per configuration, final validation accuracy (epochs trained) in each variant:",
        "",
    ]
    for backend, b in data["backends"].items():
        v = b["variants"]
        lines.append(
            be.table(
                [f"{backend}: configuration", "one pass", "one pass + halving", "sequential"],
                [
                    [label]
                    + [
                        f"{v[n]['trials'][label]['val_accuracy']:.4f}"
                        f" ({v[n]['trials'][label]['epochs']})"
                        if label in v[n]["trials"]
                        else "–"
                        for n in ("one pass", "one pass + halving", "sequential")
                    ]
                    for label in sorted(
                        v["one pass"]["trials"],
                        key=lambda k: -(v["one pass"]["trials"][k]["val_accuracy"] or 0),
                    )
                ],
            )
        )
        lines.append("")
    lines.append(
        "Load average (1/5/15 min) before → after: "
        + "; ".join(f"{backend} {b['load']}" for backend, b in data["backends"].items())
        + "."
    )
    for backend, b in data["backends"].items():
        if b["max_abs_diff"] is not None:
            lines += [
                "",
                f"{backend}: largest |Δ val accuracy| of one configuration between the"
                f" one pass (no halving) and its sequential run: {b['max_abs_diff']:.4f}.",
            ]
        errors = [f"{n}: {v['error']}" for n, v in b["variants"].items() if v.get("error")]
        if errors:
            lines += ["", f"{backend} errors after training: " + "; ".join(errors)]
    return "\n".join(lines)


# -- 4. per-group training ------------------------------------------------------------------------
def bench_groups(mode: Mode, targets: be.Targets) -> dict[str, Any]:
    cols = group_data(mode.groups, mode.group_rows)
    backends = [b for b in mode.backends if b in targets.urls()]
    load_columns(targets, "scale_groups", cols, backends)
    features = ", ".join(c for c in cols if c.startswith("f"))
    train_q = f"SELECT {features}, grp, label FROM scale_groups WHERE is_val = 0"
    val_q = f"SELECT {features}, grp, label FROM scale_groups WHERE is_val = 1"
    one_train = f"SELECT {features}, label FROM scale_groups WHERE is_val = 0 AND grp = :g"
    one_val = f"SELECT {features}, label FROM scale_groups WHERE is_val = 1 AND grp = :g"
    common = base_options(
        model=mode.group_model,
        epochs=mode.group_epochs,
        batch_size=64,
        lr=3e-3,
        parallel=1,
        threads=mode.threads,
    )
    common.pop("validation")
    out: dict[str, Any] = {
        "groups": mode.groups,
        "rows_per_group": mode.group_rows,
        "epochs": mode.group_epochs,
        "model": mode.group_model,
        "threads": mode.threads,
        "backends": {},
    }
    for backend in backends:
        variants: dict[str, Any] = {}
        load0 = loadavg()
        order = ["group_by", "separate", "one global model"]
        if backend == "sqlite":
            order = ["separate", "group_by", "one global model"]
        for variant in order:
            if variant == "group_by":
                run = timed_train(
                    targets,
                    backend,
                    train_q,
                    mode.quiet,
                    group_by="grp",
                    validation_query=val_q,
                    **common,
                )
                accs = [m.get("val_accuracy") for m in run.rows[-1].get("members", [])]
                table_accs = None
                group_table = getattr(run.model, "group_table", None)
                if group_table is not None and "val_accuracy" in group_table:
                    table_accs = group_table["val_accuracy"].tolist()
                variants[variant] = {
                    "wall": run.wall,
                    "iter_s": run.iter_seconds,
                    "others": run.others,
                    "accs": accs,
                    "models": len(accs),
                    "queries": len(run.rows),
                    "returned": type(run.model).__name__ if run.model is not None else "–",
                    "group_table_matches": None
                    if table_accs is None
                    else bool(np.allclose(sorted(table_accs), sorted(accs))),
                    "error": run.error,
                }
            elif variant == "separate":
                wall, iter_s, others, accs, errors = 0.0, 0.0, 0.0, [], []
                for g in range(mode.groups):
                    run = timed_train(
                        targets,
                        backend,
                        one_train,
                        mode.quiet / 10,
                        validation_query=one_val,
                        params={"g": g},
                        **common,
                    )
                    wall += run.wall
                    iter_s += run.iter_seconds
                    others += run.others * run.wall
                    accs.append(run.rows[-1].get("val_accuracy"))
                    if run.error:
                        errors.append(run.error)
                variants[variant] = {
                    "wall": wall,
                    "iter_s": iter_s,
                    "others": others / wall,
                    "accs": accs,
                    "models": len(accs),
                    "queries": mode.groups * mode.group_epochs,
                    "returned": f"DBModel × {mode.groups}",
                    "error": "; ".join(errors) or None,
                }
            else:  # one model for all groups (the group column not a feature): the reference
                run = timed_train(
                    targets,
                    backend,
                    train_q.replace(", grp", ""),
                    mode.quiet,
                    validation_query=val_q.replace(", grp", ""),
                    **common,
                )
                variants[variant] = {
                    "wall": run.wall,
                    "iter_s": run.iter_seconds,
                    "others": run.others,
                    "accs": [run.rows[-1].get("val_accuracy")],
                    "models": 1,
                    "queries": len(run.rows),
                    "returned": "DBModel",
                    "error": run.error,
                }
            v = variants[variant]
            v["mean_acc"] = float(np.mean(v["accs"]))
            v["min_acc"] = float(np.min(v["accs"]))
            log(f"groups {backend} {variant}: {v['wall']:.1f} s, mean acc {v['mean_acc']:.4f}")
        sep = variants["separate"]
        for v in variants.values():
            v["ratio"] = v["wall"] / sep["wall"]
            v["iter_ratio"] = v["iter_s"] / sep["iter_s"]
        out["backends"][backend] = {"variants": variants, "load": f"{load0} → {loadavg()}"}
    return out


def render_groups(data: dict[str, Any]) -> str:
    g = data["groups"]
    lines = [
        f"### Per-group training: {g} groups in one query (`group_by`) vs {g} separate runs",
        "",
        f"{g} groups × {data['rows_per_group']:,} rows, 8 float features, 2 classes; every group"
        " is labelled by its own random tanh network, so one model per group is the right"
        f" shape. {data['model']}, Adam lr 0.003, batch 64, {data['epochs']} epochs, `parallel=1`,"
        f" `threads={data['threads']}`. Validation: the same fixed 20% of every group's rows"
        " (`validation_query`), so both approaches are scored on identical rows. *separate* ="
        " one `dl.train` per group with `WHERE grp = :g`; *one global model* (all groups, no"
        " group column) is the reference that shows why per-group models are worth it. *wall s*"
        " includes packing; *iterations s* = Σ iterations' `seconds`; *ratio* = ÷ separate;"
        " *mean / min acc* = mean and lowest per-group final validation accuracy (the global"
        " model: its accuracy over all groups' validation rows); *others' CPU* = share of the"
        " machine's CPU time other processes used meanwhile.",
        "",
    ]
    rows = []
    for backend, b in data["backends"].items():
        for name in ("group_by", "separate", "one global model"):
            v = b["variants"][name]
            rows.append(
                [
                    backend,
                    name,
                    v["models"],
                    f"{v['wall']:.1f}",
                    f"**{v['ratio']:.3f}**",
                    f"{v['iter_s']:.1f}",
                    f"{v['iter_ratio']:.3f}",
                    f"**{v['mean_acc']:.4f}**",
                    f"{v['min_acc']:.4f}",
                    v["returned"],
                    f"{v['others']:.0%}",
                ]
            )
    lines.append(
        be.table(
            [
                "backend",
                "variant",
                "models",
                "wall s",
                "ratio",
                "iterations s",
                "ratio (iterations)",
                "mean per-group val acc",
                "min",
                "returned",
                "others' CPU",
            ],
            rows,
        )
    )
    lines += [
        "",
        "Load average (1/5/15 min) before → after: "
        + "; ".join(f"{backend} {b['load']}" for backend, b in data["backends"].items())
        + ".",
    ]
    for backend, b in data["backends"].items():
        v = b["variants"]["group_by"]
        if v.get("group_table_matches") is not None:
            lines += [
                "",
                f"{backend}: the returned GroupedModel's `group_table` accuracies"
                f" {'match' if v['group_table_matches'] else 'DO NOT match'} the run's"
                " per-member rows.",
            ]
        errors = [f"{n}: {x['error']}" for n, x in b["variants"].items() if x.get("error")]
        if errors:
            lines += ["", f"{backend} errors after training: " + "; ".join(errors)]
    return "\n".join(lines)


# -- writing --------------------------------------------------------------------------------------
TITLES = {
    "parallel": "1. segments vs one process",
    "convergence": "2. convergence: averaging × sync_every",
    "selection": "3. model selection in one pass",
    "groups": "4. per-group training",
}


def section(mode: Mode, part: str, fact: dict[str, str], body: str, seconds: float) -> str:
    flag = " --quick" if mode.name == "quick" else ""
    head = [
        f"## bench_scale{flag} — {TITLES[part]}",
        "",
        f"`benchmarks/bench_scale.py{flag}`, part `{part}` (`--only {part}` reruns just this"
        f" section; this run measured {fact.get('parts', part)})",
        "",
        "\n".join(f"- {k}: {v}" for k, v in fact.items() if k != "parts"),
        f"- load average (1/5/15 min) at end of this part: {loadavg()}",
        f"- this part's wall time: {seconds:.0f} s",
        "",
    ]
    return "\n".join(head) + body + "\n"


def run_frozen(script: str, argv: list[str]) -> int:
    """Re-run on a copy of the work tree's ``dbdl_magic`` + ``kernels`` taken now, so that edits
    made while the benchmark runs reach neither the client nor the server's PL/Python."""
    with tempfile.TemporaryDirectory(prefix="dbdl-frozen-") as tmp:
        for name in ("dbdl_magic", "kernels"):
            shutil.copytree(
                ROOT / name, Path(tmp) / name, ignore=shutil.ignore_patterns("__pycache__")
            )
        for folder, _dirs, _files in os.walk(tmp):
            os.chmod(folder, 0o755)
        commit = subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        env = {**os.environ, "DBDL_BENCH_FROZEN": commit}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [tmp, env.get("PYTHONPATH")]))
        log(f"benchmarking a copy of the work tree ({commit}) in {tmp}")
        return subprocess.run([sys.executable, script, *argv], env=env).returncode


def int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="small smoke run (< 3 min); prints only unless --write"
    )
    parser.add_argument("--write", action="store_true", help="update RESULTS.md in quick mode")
    parser.add_argument("--no-write", action="store_true", help="never update RESULTS.md")
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)}")
    parser.add_argument("--rows", type=int, help="rows of the parallel part (full: 1,000,000)")
    parser.add_argument(
        "--workers", type=int_list, help="parallel part's segment counts (full: 2), e.g. 2,4"
    )
    parser.add_argument("--epochs", type=int, help="epochs of the parallel part")
    parser.add_argument("--model", help="model of the parallel and convergence parts")
    parser.add_argument("--no-auto", action="store_true", help="skip the parallel='auto' run")
    parser.add_argument("--auto-epochs", type=int, help="epochs of the parallel='auto' run")
    parser.add_argument("--big-model", help="the parallel part's large model (mlp:1024,1024)")
    parser.add_argument("--big-rows", type=int, help="its rows (full: 100,000; 0: skip it)")
    parser.add_argument("--big-epochs", type=int)
    parser.add_argument(
        "--speed-backends", help="backends of the parallel part (postgresql,sqlite)"
    )
    parser.add_argument(
        "--no-query-workers",
        action="store_true",
        help="skip PostgreSQL's own parallel query (the path before segments)",
    )
    parser.add_argument("--conv-rows", type=int)
    parser.add_argument("--conv-workers", type=int_list, help="segment counts, e.g. 2,4,8")
    parser.add_argument("--conv-epochs", type=int)
    parser.add_argument(
        "--conv-syncs", help="sync_every values, 1 = once per epoch (full: 1,0.25,0.1)"
    )
    parser.add_argument("--conv-backend", help="postgresql (full) or sqlite")
    parser.add_argument("--conv-rows-per-buffer", type=int)
    parser.add_argument(
        "--sweep-workers", help="segment counts of the outer_lr × outer_momentum sweep (2,8; '')"
    )
    parser.add_argument("--sel-rows", type=int)
    parser.add_argument("--sel-epochs", type=int)
    parser.add_argument("--groups", type=int)
    parser.add_argument("--group-rows", type=int, help="rows per group")
    parser.add_argument("--group-epochs", type=int)
    parser.add_argument(
        "--threads", type=int, help="torch threads of the convergence/selection/groups parts"
    )
    parser.add_argument("--backends", help="of the selection and groups parts: postgresql,sqlite")
    parser.add_argument(
        "--quiet-budget", type=float, help="seconds to wait in all for idle CPUs (full: 300)"
    )
    parser.add_argument("--json", type=Path, help="also dump the raw results to this file")
    parser.add_argument(
        "--freeze",
        action="store_true",
        help="run on a copy of the work tree taken at start (ignores later edits)",
    )
    args = parser.parse_args(argv)
    if args.freeze and not os.environ.get("DBDL_BENCH_FROZEN"):
        rest = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--freeze"]
        return run_frozen(str(Path(__file__).resolve()), rest)

    mode = QUICK if args.quick else FULL
    overrides = {
        "rows": args.rows,
        "workers": args.workers,
        "epochs": args.epochs,
        "model": args.model,
        "conv_rows": args.conv_rows,
        "conv_workers": args.conv_workers,
        "conv_epochs": args.conv_epochs,
        "conv_syncs": [None if float(v) == 1 else float(v) for v in args.conv_syncs.split(",")]
        if args.conv_syncs
        else None,
        "conv_backend": args.conv_backend,
        "conv_rows_per_buffer": args.conv_rows_per_buffer,
        "sweep_workers": int_list(args.sweep_workers) if args.sweep_workers is not None else None,
        "auto_epochs": args.auto_epochs,
        "big_model": args.big_model,
        "big_rows": args.big_rows,
        "big_epochs": args.big_epochs,
        "speed_backends": args.speed_backends.split(",") if args.speed_backends else None,
        "sel_rows": args.sel_rows,
        "sel_epochs": args.sel_epochs,
        "groups": args.groups,
        "group_rows": args.group_rows,
        "group_epochs": args.group_epochs,
        "threads": args.threads,
        "quiet_budget": args.quiet_budget,
        "backends": args.backends.split(",") if args.backends else None,
    }
    for key, value in overrides.items():
        if value is not None:
            setattr(mode, key, value)
    if args.no_auto:
        mode.auto = False
    if args.no_query_workers:
        mode.query_workers = False
    only = [p for p in PARTS if p in {s.strip() for s in args.only.split(",")}]
    write = (not args.quick or args.write) and not args.no_write
    be._quiet_left[0] = mode.quiet_budget
    torch.set_num_threads(CORES)
    started = time.perf_counter()
    max_workers = max([*mode.workers, 4])
    runners: dict[str, tuple[Callable[..., dict[str, Any]], Callable[[dict[str, Any]], str]]] = {
        "parallel": (bench_parallel, lambda d: render_parallel(mode, d)),
        "convergence": (bench_convergence, render_convergence),
        "selection": (bench_selection, render_selection),
        "groups": (bench_groups, render_groups),
    }
    raw: dict[str, Any] = {}
    with databases(True, max_workers) as targets:
        fact = facts(targets)
        frozen = os.environ.get("DBDL_BENCH_FROZEN")
        if frozen:
            fact["dbdl_magic"] = f"{dl.__version__} (git {frozen}, copy of the work tree)"
        fact["parts"] = ", ".join(only)
        warm_up(targets, list(targets.urls()))
        for part in only:
            part_started = time.perf_counter()
            log(f"== {part} (load {loadavg()})")
            bench, render = runners[part]
            raw[part] = bench(mode, targets)
            body = section(mode, part, fact, render(raw[part]), time.perf_counter() - part_started)
            print(body, flush=True)
            if write:
                key = f"bench_scale:{part}" if mode.name == "full" else f"bench_scale-quick:{part}"
                be.write_section(RESULTS, key, body)
                log(f"updated {RESULTS} ({key})")
    log(f"done in {time.perf_counter() - started:.0f} s (load {loadavg()})")
    if args.json:
        args.json.write_text(json.dumps({"facts": fact, "results": raw}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
