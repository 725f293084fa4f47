"""Scale-out benchmark: parallel workers, sync_every, model selection and per-group training.

Run from the repository root::

    .venv/bin/python benchmarks/bench_scale.py --quick            # smoke run, < 3 min, prints only
    .venv/bin/python benchmarks/bench_scale.py                    # full run, updates RESULTS.md
    .venv/bin/python benchmarks/bench_scale.py --only selection   # one part (its section only)
    .venv/bin/python benchmarks/bench_scale.py --only parallel --workers 1,2,4,8 --rows 4000000

Four parts, each written to its own marked section of ``benchmarks/RESULTS.md``
(``<!-- bench_scale:<part>:start -->`` … ``:end -->``), so ``--only`` replaces just its own:

1. ``parallel``: PostgreSQL ``parallel=P`` (P workers, ``threads = cores // P``; and one process
   with one thread) on a generated table of ≥ 1M rows: epoch seconds (median over the epochs
   after the first), speedup over P = 1, final validation accuracy, the workers/combines the
   history reports; and what ``parallel="auto"`` chooses.
2. ``convergence``: validation accuracy after N epochs with 1, 2, 4 workers, with and without
   ``sync_every=0.25`` (on 2 cores 4 workers measure accuracy, not speed).
3. ``selection``: a K = 8 grid trained in one pass (``grid=...``; ``halving=False`` for a like
   for like time comparison, and the default successive halving) versus 8 sequential runs of
   the same configurations: total time ratio, best validation accuracy found.
4. ``groups``: 50 groups with a rule of their own, one model per group in the same queries
   (``group_by="grp"``) versus 50 separate runs (``WHERE grp = :g``): total time ratio and mean
   per-group validation accuracy (both evaluated on the same held-out rows per group).

Parts 2-4 use one torch thread per process (``--threads``): with ``OMP_WAIT_POLICY=PASSIVE``
(set here as in ``bench_engine.py``) a second thread makes these small models several times
slower on two cores; part 1 shows that cost.

Data comes from ``bench_engine.make_data`` (32 float features, 4 classes from a seeded
nonlinear rule) and, for ``groups``, from a per-group variant of that rule; the PostgreSQL
server is a throwaway one started with ``tests/pgserver.py``.
"""

from __future__ import annotations

import argparse
import contextlib
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
    # 1. parallel workers
    rows: int
    workers: list[int]
    epochs: int
    model: str
    auto: bool
    # 2. convergence
    conv_rows: int
    conv_workers: list[int]
    conv_epochs: int
    conv_sync: float
    # 3. model selection
    sel_rows: int
    sel_epochs: int
    sel_grid: dict[str, list[Any]]
    # 4. per-group training
    groups: int
    group_rows: int  # rows per group (training + validation)
    group_epochs: int
    group_model: str
    # torch threads per process in the convergence, selection and groups parts (1: on two
    # cores the fastest for these small models, and the same for every worker count)
    threads: int = 1
    # both backends for selection and groups
    backends: list[str] = field(default_factory=lambda: ["postgresql", "sqlite"])
    quiet: float = 20.0  # seconds to wait at most for idle CPUs before a timed run
    quiet_budget: float = 300.0


FULL = Mode(
    "full",
    rows=1_000_000,
    workers=[1, 2],
    epochs=4,
    model="mlp:64,32",
    auto=True,
    conv_rows=200_000,
    conv_workers=[1, 2, 4],
    conv_epochs=4,
    conv_sync=0.25,
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
    workers=[1, 2],
    epochs=2,
    model="mlp:64,32",
    auto=False,
    conv_rows=20_000,
    conv_workers=[1, 2],
    conv_epochs=2,
    conv_sync=0.5,
    sel_rows=10_000,
    sel_epochs=2,
    sel_grid={"lr": [1e-3, 1e-2], "model": ["mlp:32", "mlp:64,32"]},
    groups=6,
    group_rows=600,
    group_epochs=2,
    group_model="mlp:16",
    backends=["postgresql"],
    quiet=2.0,
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

    @property
    def iter_seconds(self) -> float:
        return float(sum(r["seconds"] for r in self.rows))

    def col(self, name: str) -> list[Any]:
        return [r.get(name) for r in self.rows]


def timed_train(targets: be.Targets, backend: str, query: str, quiet: float, **options: Any) -> Run:
    """``dl.train`` on ``backend``, timed from the call (packing included) to the loaded model.

    The iteration rows come from the ``on_iteration`` callback, so a failure while loading the
    model at the very end still leaves the training's numbers (the error is kept in ``error``).
    ``others`` = CPU time the machine spent busy during the run minus this process's and the
    PostgreSQL server's (incl. its parallel workers), as a share of wall time × cores.
    """
    rows: list[dict[str, Any]] = []
    info: dict[str, Any] = {}
    db = targets.database(backend)  # connected (and checked) before the clock starts
    be.wait_quiet(quiet)
    pid = targets.pg_postmaster if backend == "postgresql" else None
    server0, own0 = be.server_cpu(targets.pg_postmaster), time.process_time()
    busy0, _ = cpu_snapshot()
    cpu0 = be.server_cpu(pid)
    started = time.perf_counter()
    model, error = None, None
    try:
        model = dl.train(
            db,
            query,
            callbacks=Callbacks(on_start=info.update, on_iteration=rows.append),
            **options,
        )
    except Exception as exc:  # keep the numbers; report the error
        if not rows:
            raise
        error = f"{type(exc).__name__}: {exc}"
        log(f"!! dl.train failed after training: {error}")
    wall = time.perf_counter() - started
    busy1, _ = cpu_snapshot()
    ours = time.process_time() - own0 + be.server_cpu(targets.pg_postmaster) - server0
    others = max(0.0, (busy1 - busy0) - ours) / max(wall * CORES, 1e-9)
    return Run(wall, rows, model, error, be.server_cpu(pid) - cpu0, others, info)


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


# -- 1. parallel workers --------------------------------------------------------------------------
def bench_parallel(mode: Mode, targets: be.Targets) -> dict[str, Any]:
    x, y = be.make_data(mode.rows)
    load_columns(targets, "scale_big", engine_columns(x, y), ["postgresql"])
    del x, y
    plans: list[tuple[int | str, int | None]] = [(p, max(1, CORES // p)) for p in mode.workers]
    if 1 in mode.workers and CORES > 1:  # one process with one thread too: the threads' cost
        plans.insert(plans.index((1, CORES)) + 1, (1, 1))
    if mode.auto:
        plans.append(("auto", None))
    results = []
    for parallel, threads in plans:
        load0 = loadavg()
        run = timed_train(
            targets,
            "postgresql",
            "SELECT * FROM scale_big",
            mode.quiet,
            **base_options(
                model=mode.model, epochs=mode.epochs, parallel=parallel, threads=threads
            ),
        )
        train_s = run.col("train_seconds")
        result = {
            "parallel": parallel,
            "threads": threads if threads is not None else "auto",
            "epochs": mode.epochs,
            "epoch_s": median(after_first(train_s)),
            "iteration_s": median(after_first(run.col("seconds"))),
            "first_epoch_s": train_s[0],
            "train_s": train_s,
            "wall": run.wall,
            "pack_s": run.wall - run.iter_seconds,
            "server_cpu_per_epoch": run.server_cpu / mode.epochs,
            "accuracy": run.rows[-1].get("val_accuracy"),
            "accuracies": run.col("val_accuracy"),
            "workers": run.col("workers"),
            "combines": run.col("combines"),
            "note": run.rows[-1].get("parallel_note"),
            "buffers": run.info.get("buffers"),
            "busy": run.others,
            "load": f"{load0} → {loadavg()}",
            "error": run.error,
        }
        log(
            f"parallel={parallel} threads={threads}: {result['epoch_s']:.2f} s/epoch,"
            f" acc {result['accuracy']:.4f}, workers {result['workers']}"
        )
        results.append(result)
    base = results[0]
    for r in results:
        r["speedup"] = base["epoch_s"] / r["epoch_s"]
    return {"rows": mode.rows, "model": mode.model, "results": results}


def render_parallel(mode: Mode, data: dict[str, Any]) -> str:
    rows = data["results"]
    n_train = round(data["rows"] * 0.8)
    lines = [
        f"### Parallel workers: {data['rows']:,} rows × 32 features, {data['model']}, Adam"
        f" lr {LR}, batch {BATCH}, {mode.epochs} epochs (PostgreSQL)",
        "",
        f"Training rows: {n_train:,} (20% held out), packed into {rows[0]['buffers']} buffers"
        " (training + validation; the parallel scan hands them out one at a time)."
        " *epoch s* = median of `train_seconds` (the aggregate query) over epochs 2..N;"
        " *iteration s* adds evaluation and the checkpoint; *speedup* = epoch s of"
        " `parallel=1` ÷ this row's. *workers* / *combines* are the history's per-epoch"
        " columns; *server CPU s/epoch* counts every server process (incl. the parallel"
        " workers); *others* = share of the machine's CPU time (wall × cores) that other"
        " processes used during the run (all busy CPU time minus this client's and the"
        " server's).",
        "",
        be.table(
            [
                "parallel",
                "threads/worker",
                "epoch s",
                "speedup",
                "first epoch s",
                "iteration s",
                "pack + setup s",
                "server CPU s/epoch",
                "workers per epoch",
                "combines per epoch",
                "final val acc",
                "others' CPU",
                "load avg before → after",
            ],
            [
                [
                    r["parallel"],
                    r["threads"],
                    f"**{r['epoch_s']:.2f}**",
                    f"**{r['speedup']:.2f}×**",
                    f"{r['first_epoch_s']:.2f}",
                    f"{r['iteration_s']:.2f}",
                    f"{r['pack_s']:.1f}",
                    f"{r['server_cpu_per_epoch']:.1f}",
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
    lines += [
        "",
        f"The `parallel=1, threads=1` row shows what a second torch thread per process costs or"
        f" buys for this model (OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')});"
        " `parallel=2` runs one thread per worker.",
    ]
    auto = next((r for r in rows if r["parallel"] == "auto"), None)
    if auto:
        lines += ["", f'`parallel="auto"` decided, in its last epoch: *{auto["note"]}*']
    errors = [f"parallel={r['parallel']}: {r['error']}" for r in rows if r.get("error")]
    if errors:
        lines += ["", "Errors after training: " + "; ".join(errors)]
    lines += [
        "",
        "On a larger machine run the same part with more workers and rows, e.g."
        " `.venv/bin/python benchmarks/bench_scale.py --only parallel --workers 1,2,4,8"
        " --rows 4000000` (threads per worker = cores ÷ workers; the server is started with"
        " enough `max_parallel_workers`). Each worker is a new process per query that imports"
        " torch, so the speedup needs epochs that are long against that start-up.",
    ]
    return "\n".join(lines)


# -- 2. convergence -------------------------------------------------------------------------------
def bench_convergence(mode: Mode, targets: be.Targets) -> dict[str, Any]:
    x, y = be.make_data(mode.conv_rows, seed=SEED + 11)
    load_columns(targets, "scale_conv", engine_columns(x, y), ["postgresql"])
    del x, y
    results = []
    for workers in mode.conv_workers:
        for sync in (None, mode.conv_sync):
            threads = mode.threads
            run = timed_train(
                targets,
                "postgresql",
                "SELECT * FROM scale_conv",
                mode.quiet,
                **base_options(
                    model=mode.model,
                    epochs=mode.conv_epochs,
                    parallel=workers,
                    threads=threads,
                    sync_every=sync,
                ),
            )
            result = {
                "workers": workers,
                "threads": threads,
                "sync": sync,
                "accuracy": run.rows[-1].get("val_accuracy"),
                "accuracies": run.col("val_accuracy"),
                "val_loss": run.rows[-1].get("val_loss"),
                "epoch_s": median(after_first(run.col("train_seconds"))),
                "iteration_s": median(after_first(run.col("seconds"))),
                "workers_seen": run.col("workers"),
                "buffers": run.info.get("buffers"),
                "combines": run.col("combines"),
                "busy": run.others,
                "error": run.error,
            }
            log(
                f"convergence workers={workers} sync={sync}: acc {result['accuracy']:.4f},"
                f" {result['epoch_s']:.2f} s/epoch, workers seen {result['workers_seen']}"
            )
            results.append(result)
    return {
        "rows": mode.conv_rows,
        "epochs": mode.conv_epochs,
        "model": mode.model,
        "sync": mode.conv_sync,
        "threads": mode.threads,
        "results": results,
    }


def render_convergence(data: dict[str, Any]) -> str:
    rows = data["results"]
    return "\n".join(
        [
            f"### Convergence: accuracy after {data['epochs']} epochs with 1, 2, 4 workers,"
            f" with and without `sync_every={data['sync']}` (PostgreSQL)",
            "",
            f"{data['rows']:,} rows × 32 features (4 classes; 20% held out), {data['model']},"
            f" Adam lr {LR}, batch {BATCH}, seed {SEED}, {rows[0]['buffers']} packed buffers"
            f" (training + validation); {data['threads']} torch thread(s) per process whatever"
            " the worker count. With more workers than cores this measures accuracy, not speed."
            " *epoch s* ="
            " median `train_seconds` over epochs 2..N (with `sync_every` an epoch is"
            f" {math.ceil(1 / data['sync'])} aggregate queries); *combines* = partial states"
            " averaged per epoch as the history reports them; *others' CPU* = share of the"
            " machine's CPU time other processes used during the run.",
            "",
            be.table(
                [
                    "workers",
                    "sync_every",
                    f"val acc after {data['epochs']} epochs",
                    "val acc per epoch",
                    "val loss",
                    "epoch s",
                    "iteration s",
                    "workers seen",
                    "combines per epoch",
                    "others' CPU",
                ],
                [
                    [
                        r["workers"],
                        r["sync"] if r["sync"] else "none",
                        f"**{r['accuracy']:.4f}**",
                        ", ".join(f"{a:.3f}" for a in r["accuracies"]),
                        f"{r['val_loss']:.4f}",
                        f"{r['epoch_s']:.2f}",
                        f"{r['iteration_s']:.2f}",
                        ", ".join(str(w) for w in r["workers_seen"]),
                        ", ".join(str(c) for c in r["combines"]),
                        f"{r['busy']:.0%}",
                    ]
                    for r in rows
                ],
            ),
        ]
    )


# -- 3. model selection ---------------------------------------------------------------------------
def configs(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    import itertools

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
    "parallel": "1. parallel workers",
    "convergence": "2. convergence with sync_every",
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
        "--workers", type=int_list, help="parallel part's worker counts, e.g. 1,2,4,8"
    )
    parser.add_argument("--epochs", type=int, help="epochs of the parallel part")
    parser.add_argument("--model", help="model of the parallel and convergence parts")
    parser.add_argument("--no-auto", action="store_true", help="skip the parallel='auto' run")
    parser.add_argument("--conv-rows", type=int)
    parser.add_argument("--conv-workers", type=int_list, help="e.g. 1,2,4")
    parser.add_argument("--conv-epochs", type=int)
    parser.add_argument("--sel-rows", type=int)
    parser.add_argument("--sel-epochs", type=int)
    parser.add_argument("--groups", type=int)
    parser.add_argument("--group-rows", type=int, help="rows per group")
    parser.add_argument("--group-epochs", type=int)
    parser.add_argument(
        "--threads", type=int, help="torch threads of the convergence/selection/groups parts"
    )
    parser.add_argument("--backends", help="of the selection and groups parts: postgresql,sqlite")
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
        "sel_rows": args.sel_rows,
        "sel_epochs": args.sel_epochs,
        "groups": args.groups,
        "group_rows": args.group_rows,
        "group_epochs": args.group_epochs,
        "threads": args.threads,
        "backends": args.backends.split(",") if args.backends else None,
    }
    for key, value in overrides.items():
        if value is not None:
            setattr(mode, key, value)
    if args.no_auto:
        mode.auto = False
    only = [p for p in PARTS if p in {s.strip() for s in args.only.split(",")}]
    write = (not args.quick or args.write) and not args.no_write
    be._quiet_left[0] = mode.quiet_budget
    torch.set_num_threads(CORES)
    started = time.perf_counter()
    max_workers = max([*mode.workers, *mode.conv_workers, 4])
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
