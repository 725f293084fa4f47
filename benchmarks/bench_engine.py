"""Engine benchmark: training inside SQLite/PostgreSQL versus a plain PyTorch loop.

Run from the repository root::

    .venv/bin/python benchmarks/bench_engine.py --quick          # < 2 min, writes nothing
    .venv/bin/python benchmarks/bench_engine.py --quick --write  # ... and updates RESULTS.md
    .venv/bin/python benchmarks/bench_engine.py --full           # ~15-25 min, updates RESULTS.md

Three measurements, all in one run on the same synthetic data (32 numeric features, 4 classes
from a seeded nonlinear rule), batch size, optimizer (Adam, lr 1e-3) and torch thread count:

1. ``ratio``: epoch time in the database ÷ epoch time of a plain torch loop over in-memory
   tensors, for SQLite and PostgreSQL (``parallel=1``), for a ~20k and a ~1M parameter MLP.
   The plain epoch runs from the ``on_iteration`` callback, i.e. right after each database
   epoch, so the two alternate and share the machine's noise. The first epoch of each is a
   warm-up (PL/Python imports torch) and is excluded; medians are over the rest. Both the
   aggregate query alone (``train_seconds``) and the whole iteration including evaluation
   (``seconds``, compared with a plain epoch plus a plain evaluation) are reported.
2. ``e2e``: pack + one epoch in the database versus ``pandas.read_sql`` + the plain loop, each
   in a fresh subprocess, reporting wall time and the client's peak RSS growth.
3. ``parallel``: PostgreSQL with two parallel workers (one torch thread each) versus one
   worker (two threads): epoch time and validation accuracy after the same number of epochs.

A throwaway PostgreSQL 15 server with PL/Python is started with ``tests/pgserver.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import itertools
import json
import os
import platform
import re
import resource
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Idle OpenMP threads sleep instead of spinning (read when torch loads; the PostgreSQL server and
# the e2e subprocesses inherit it). On a shared two-core machine spinning threads make an epoch
# up to 10-20x slower whenever another process runs; both sides of every comparison get the same
# setting. Export OMP_WAIT_POLICY yourself to override (ACTIVE spins the most).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch

import dbdl_magic as dl
from dbdl_magic.events import Callbacks
from dbdl_magic.kernel.netbuild import build_network
from dbdl_magic.store.spec import parse_spec

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
N_FEATURES = 32
N_CLASSES = 4
BATCH = 256
LR = 1e-3
THREADS = 2
VALIDATION = 0.2
SEED = 0
TARGET_RATIO = 1.10
SMALL_MODEL = "mlp:128,128"
LARGE_MODEL = "mlp:1024,1024"
TABLE = "bench_data"


@dataclass
class Mode:
    """Sizes of one benchmark mode."""

    name: str
    rows: int  # rows of the ratio and parallel benchmarks
    epochs: dict[str, int]  # per model, including the warm-up epoch
    e2e_rows: list[int]
    e2e_epochs: int
    parallel_epochs: int
    parallel_models: list[str] = field(default_factory=list)
    quiet: float = 5.0  # seconds to wait at most for an idle machine before a measurement
    quiet_budget: float = 60.0  # ... and in all


QUICK = Mode(
    "quick",
    rows=20_000,
    epochs={SMALL_MODEL: 4, LARGE_MODEL: 3},
    e2e_rows=[100_000],
    e2e_epochs=1,
    parallel_epochs=2,
    parallel_models=[SMALL_MODEL],
    quiet=2.0,
    quiet_budget=10.0,
)
FULL = Mode(
    "full",
    rows=200_000,
    epochs={SMALL_MODEL: 6, LARGE_MODEL: 5},
    e2e_rows=[250_000, 1_000_000],
    e2e_epochs=1,
    parallel_epochs=5,
    parallel_models=[SMALL_MODEL, LARGE_MODEL],
    quiet=30.0,
    quiet_budget=600.0,
)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- data -----------------------------------------------------------------------------------------
def make_data(rows: int, seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic classification data: ``X`` (rows × 32, float64) and labels 0..3.

    The label is the argmax of a random two-layer tanh network of the features (plus a little
    noise), so an MLP can learn it well but not trivially. The rule is fixed by ``seed``; the
    first rows are the same whatever ``rows`` is.
    """
    rule = np.random.default_rng(seed + 1)
    w1 = rule.standard_normal((N_FEATURES, 16)) / np.sqrt(N_FEATURES) * 2.0
    w2 = rule.standard_normal((16, N_CLASSES))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, N_FEATURES))
    logits = np.tanh(x @ w1) @ w2 + 0.1 * rng.standard_normal((rows, N_CLASSES))
    return x, logits.argmax(axis=1).astype(np.int64)


def feature_names() -> list[str]:
    return [f"f{i}" for i in range(N_FEATURES)]


def load_sqlite(path: Path, x: np.ndarray, y: np.ndarray, table: str = TABLE) -> None:
    """(Re)create ``table`` in the SQLite file with executemany, in chunks."""
    cols = ", ".join(f"{c} REAL" for c in feature_names())
    marks = ", ".join("?" * (N_FEATURES + 1))
    with contextlib.closing(sqlite3.connect(path)) as con:
        con.execute(f"DROP TABLE IF EXISTS {table}")
        con.execute(f"CREATE TABLE {table} ({cols}, label INTEGER)")
        for start in range(0, len(x), 50_000):
            chunk = x[start : start + 50_000].tolist()
            labels = y[start : start + 50_000].tolist()
            con.executemany(
                f"INSERT INTO {table} VALUES ({marks})",
                ([*row, label] for row, label in zip(chunk, labels, strict=True)),
            )
        con.commit()


def load_postgres(conninfo: str, x: np.ndarray, y: np.ndarray, table: str = TABLE) -> None:
    """(Re)create ``table`` with a binary COPY built by numpy (no per-row Python)."""
    import psycopg

    fields: list[tuple[str, str]] = [("count", ">i2")]
    for i in range(N_FEATURES):
        fields += [(f"len{i}", ">i4"), (f"f{i}", ">f8")]
    fields += [("len_label", ">i4"), ("label", ">i4")]
    cols = ", ".join(f"{c} double precision" for c in feature_names())
    with psycopg.connect(conninfo) as con:
        con.execute(f"DROP TABLE IF EXISTS {table}")
        con.execute(f"CREATE TABLE {table} ({cols}, label integer)")
        with con.cursor() as cur, cur.copy(f"COPY {table} FROM STDIN (FORMAT BINARY)") as copy:
            copy.write(b"PGCOPY\n\xff\r\n\x00" + b"\x00" * 8)
            for start in range(0, len(x), 100_000):
                part = x[start : start + 100_000]
                rec = np.empty(len(part), dtype=np.dtype(fields))
                rec["count"] = N_FEATURES + 1
                for i in range(N_FEATURES):
                    rec[f"len{i}"] = 8
                    rec[f"f{i}"] = part[:, i]
                rec["len_label"] = 4
                rec["label"] = y[start : start + 100_000]
                copy.write(rec.tobytes())
            copy.write(b"\xff\xff")
        con.execute(f"ANALYZE {table}")


def split_plain(
    x: np.ndarray, y: np.ndarray, seed: int = SEED
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Standardise as the database does (statistics over all rows) and hold out 20%."""
    xs = ((x - x.mean(axis=0)) / x.std(axis=0)).astype(np.float32)
    n_val = round(len(x) * VALIDATION)
    order = np.random.default_rng(seed + 7919).permutation(len(x))
    val, train = order[:n_val], order[n_val:]
    return (
        torch.from_numpy(xs[train]),
        torch.from_numpy(y[train]),
        torch.from_numpy(xs[val]),
        torch.from_numpy(y[val]),
    )


# -- the plain torch loop -------------------------------------------------------------------------
class PlainLoop:
    """The ceiling: the same network, optimizer and minibatches over in-memory tensors."""

    def __init__(self, model: str, data: tuple[torch.Tensor, ...], threads: int = THREADS) -> None:
        self.x, self.y, self.xv, self.yv = data
        self.threads = threads
        torch.manual_seed(SEED)  # the database seeds its initial state the same way
        self.net = build_network(parse_spec(model), [N_FEATURES], N_CLASSES)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=LR)
        self.loss_fn = torch.nn.CrossEntropyLoss()
        self.epoch_no = 0

    def epoch(self) -> float:
        """One epoch of shuffled minibatch Adam; returns its seconds."""
        torch.set_num_threads(self.threads)
        net, opt, loss_fn, x, y = self.net, self.opt, self.loss_fn, self.x, self.y
        started = time.perf_counter()
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.epoch_no))
        net.train()
        total = torch.zeros(())
        for start in range(0, len(x), BATCH):
            idx = order[start : start + BATCH]
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(net(x[idx]), y[idx])
            loss.backward()
            opt.step()
            total += loss.detach() * len(idx)
        self.last_loss = float(total) / len(x)
        self.epoch_no += 1
        return time.perf_counter() - started

    def evaluate(self) -> tuple[float, float]:
        """Validation accuracy and the seconds it took."""
        started = time.perf_counter()
        self.net.eval()
        with torch.no_grad():
            out = torch.cat([self.net(self.xv[i : i + 8192]) for i in range(0, len(self.xv), 8192)])
            accuracy = float((out.argmax(dim=1) == self.yv).float().mean())
        return accuracy, time.perf_counter() - started


def n_params(model: str) -> int:
    net = build_network(parse_spec(model), [N_FEATURES], N_CLASSES)
    return sum(p.numel() for p in net.parameters())


def train_options(model: str, epochs: int, **extra: Any) -> dict[str, Any]:
    """The options every database run shares."""
    return {
        "target": "label",
        "model": model,
        "epochs": epochs,
        "batch_size": BATCH,
        "optimizer": "adam",
        "lr": LR,
        "threads": THREADS,
        "parallel": 1,
        "validation": VALIDATION,
        "seed": SEED,
        **extra,
    }


# -- servers and databases ------------------------------------------------------------------------
@dataclass
class Targets:
    """Where the benchmark data lives: a SQLite file and a PostgreSQL database."""

    sqlite_path: Path
    pg_url: str | None
    pg_conninfo: str | None
    pg_postmaster: int | None = None  # pid, to account the server's CPU time
    _databases: dict[str, Any] = field(default_factory=dict)

    @property
    def sqlite_url(self) -> str:
        return f"sqlite:///{self.sqlite_path}"

    def urls(self) -> dict[str, str]:
        out = {"sqlite": self.sqlite_url}
        if self.pg_url:
            out["postgresql"] = self.pg_url
        return out

    def database(self, backend: str) -> Any:
        """A connected ``dl.Database``, kept for the whole run: its pooled connection (and so,
        on PostgreSQL, the server process with torch already imported) is reused."""
        if backend not in self._databases:
            self._databases[backend] = dl.connect(self.urls()[backend])
        return self._databases[backend]

    def load(self, x: np.ndarray, y: np.ndarray, table: str = TABLE) -> None:
        started = time.perf_counter()
        load_sqlite(self.sqlite_path, x, y, table)
        if self.pg_conninfo:
            load_postgres(self.pg_conninfo, x, y, table)
        log(f"loaded {len(x):,} rows into {table} ({time.perf_counter() - started:.1f} s)")


@contextlib.contextmanager
def databases(use_postgres: bool) -> Iterator[Targets]:
    """A temporary SQLite file and (optionally) a throwaway PostgreSQL server, kernels installed."""
    with tempfile.TemporaryDirectory(prefix="dbdl-bench-") as tmp:
        path = Path(tmp) / "bench.db"
        dl.install(f"sqlite:///{path}").engine.dispose()  # sets the 64 KiB page size first
        if not use_postgres:
            with _disposing(Targets(path, None, None)) as targets:
                yield targets
            return
        sys.path.insert(0, str(ROOT / "tests"))
        from pgserver import PostgresServer, server_pythonpath, unavailable_reason

        reason = unavailable_reason()
        if reason:
            raise SystemExit(f"PostgreSQL unavailable ({reason}); use --no-postgres")
        with PostgresServer.start(server_pythonpath(), max_workers=4) as server:
            url = server.create_database("bench")
            dl.install(url).engine.dispose()
            postmaster = int((server.datadir / "postmaster.pid").read_text().split()[0])
            with _disposing(Targets(path, url, server.conninfo("bench"), postmaster)) as targets:
                yield targets


@contextlib.contextmanager
def _disposing(targets: Targets) -> Iterator[Targets]:
    try:
        yield targets
    finally:
        for db in targets._databases.values():
            db.engine.dispose()


# -- benchmark 1: database epoch / plain epoch ----------------------------------------------------
def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def cpu_busy(seconds: float = 0.25) -> float:
    """Fraction of the machine's CPU time spent busy over ``seconds`` (from /proc/stat)."""

    def snapshot() -> tuple[int, int]:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:]]
        return sum(ticks), ticks[3] + ticks[4]  # total, idle + iowait

    total0, idle0 = snapshot()
    time.sleep(seconds)
    total1, idle1 = snapshot()
    return 1.0 - (idle1 - idle0) / max(total1 - total0, 1)


def _stat_fields(pid: int | str) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()  # fields from "state" on


def server_cpu(postmaster: int | None) -> float:
    """CPU seconds used so far by a PostgreSQL server: the postmaster, its live children and
    (through the postmaster's child counters) its exited ones, such as parallel workers."""
    if postmaster is None:
        return 0.0
    fields = _stat_fields(postmaster)
    ticks = sum(int(v) for v in fields[11:15])  # utime, stime, cutime, cstime
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                fields = _stat_fields(entry)
                if int(fields[1]) == postmaster:
                    ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


_quiet_left = [0.0]  # seconds of waiting for quiet left in this run (Mode.quiet_budget)


def wait_quiet(max_wait: float, threshold: float = 0.25) -> float:
    """Wait (at most ``max_wait`` s, within the run's budget) until other processes leave the
    CPUs mostly idle.

    The machine is shared; a measurement that starts while others compute is slowed by them
    (torch's OpenMP threads spin on busy cores). Returns the last busy fraction seen.
    """
    started = time.monotonic()
    deadline = started + min(max_wait, _quiet_left[0])
    busy = cpu_busy()
    while busy > threshold and time.monotonic() < deadline:
        busy = cpu_busy()
    _quiet_left[0] = max(0.0, _quiet_left[0] - (time.monotonic() - started))
    return busy


def ratio_run(
    backend: str,
    db: Any,
    model: str,
    epochs: int,
    data: tuple,
    quiet: float,
    postmaster: int | None = None,
) -> dict[str, Any]:
    """One database run whose every epoch is followed by one plain epoch (alternating).

    Before each database epoch the run waits up to ``quiet`` seconds for an idle machine.
    CPU seconds are counted too (this process, plus the server's processes for PostgreSQL):
    unlike wall time they barely change when other processes compete for the cores.
    """
    plain = PlainLoop(model, data)
    plain_train: list[float] = []
    plain_eval: list[float] = []
    plain_acc: list[float] = []
    db_cpu: list[float] = []
    plain_cpu: list[float] = []

    def cpu_mark() -> float:
        return time.process_time() + server_cpu(postmaster)

    busy = [wait_quiet(quiet)]
    mark = cpu_mark()

    def after_db_epoch(_row: dict[str, Any]) -> None:
        nonlocal mark
        db_cpu.append(cpu_mark() - mark)
        cpu0 = time.process_time()
        plain_train.append(plain.epoch())
        accuracy, seconds = plain.evaluate()
        plain_cpu.append(time.process_time() - cpu0)
        plain_eval.append(seconds)
        plain_acc.append(accuracy)
        if len(plain_train) < epochs:
            busy.append(wait_quiet(quiet))
        mark = cpu_mark()

    trained = dl.train(
        db,
        f"SELECT * FROM {TABLE}",
        callbacks=Callbacks(on_iteration=after_db_epoch),
        **train_options(model, epochs),
    )
    history = trained.history
    db_train = history["train_seconds"].tolist()
    db_full = history["seconds"].tolist()
    plain_full = [a + b for a, b in zip(plain_train, plain_eval, strict=True)]
    row = {
        "backend": backend,
        "model": model,
        "params": n_params(model),
        "train_rows": len(data[0]),
        "epochs": epochs,
        "db_train": db_train,
        "db_seconds": db_full,
        "plain_train": plain_train,
        "plain_full": plain_full,
        "db_train_med": median(db_train[1:]),
        "db_seconds_med": median(db_full[1:]),
        "plain_train_med": median(plain_train[1:]),
        "plain_full_med": median(plain_full[1:]),
        "paired_train": median([a / b for a, b in zip(db_train[1:], plain_train[1:], strict=True)]),
        "min_ratio": min(db_train[1:]) / min(plain_train[1:]),
        "db_cpu": db_cpu,
        "plain_cpu": plain_cpu,
        "cpu_ratio": median(db_cpu[1:]) / median(plain_cpu[1:]),
        "busy_before": busy,
        "contended": sum(b > 0.25 for b in busy[1:]),
        "db_acc": float(history["val_accuracy"].iloc[-1]),
        "plain_acc": plain_acc[-1],
    }
    row["ratio_train"] = row["db_train_med"] / row["plain_train_med"]
    row["ratio_full"] = row["db_seconds_med"] / row["plain_full_med"]
    log(
        f"{backend:10s} {model:14s} db {row['db_train_med']:.3f}s ({row['db_seconds_med']:.3f}s)"
        f" plain {row['plain_train_med']:.3f}s ({row['plain_full_med']:.3f}s)"
        f" ratio {row['ratio_train']:.3f} ({row['ratio_full']:.3f}) cpu {row['cpu_ratio']:.3f}"
    )
    return row


def bench_ratio(mode: Mode, targets: Targets, data: tuple) -> list[dict[str, Any]]:
    rows = []
    for i, model in enumerate(mode.epochs):
        backends = list(targets.urls())
        if i % 2:
            backends.reverse()  # alternate which backend goes first
        for backend in backends:
            db = targets.database(backend)
            postmaster = targets.pg_postmaster if backend == "postgresql" else None
            rows.append(
                ratio_run(backend, db, model, mode.epochs[model], data, mode.quiet, postmaster)
            )
    return rows


# -- benchmark 2: end to end, each variant in a fresh process -------------------------------------
def rss_now() -> int:
    """Current resident set size in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    """Peak resident set size of this process's address space in bytes.

    ``VmHWM`` from /proc, not ``getrusage().ru_maxrss``: on Linux the latter also keeps the
    high-water mark of the address space replaced by ``exec``, i.e. of the parent that spawned
    this process, which would make the client look as if it grew with the parent's data.
    """
    with contextlib.suppress(OSError, StopIteration, ValueError):
        with open("/proc/self/status") as f:
            line = next(v for v in f if v.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def e2e_child(args: dict[str, Any]) -> dict[str, Any]:
    """Runs in a fresh interpreter: one end-to-end variant; returns times and memory."""
    import pandas as pd
    from sqlalchemy import create_engine, text

    import dbdl_magic.api  # noqa: F401 - imported before the baseline, as pandas is

    torch.set_num_threads(THREADS)
    torch.ones(8) @ torch.ones(8)  # load torch's kernels before the baseline
    warm = create_engine(args["url"])  # load the driver and dialect before the baseline
    with warm.connect() as con:
        con.execute(text("SELECT 1"))
    warm.dispose()
    baseline = rss_now()
    started = time.perf_counter()
    out: dict[str, Any] = {}
    if args["variant"] == "database":
        trained = dl.train(
            args["url"],
            f"SELECT * FROM {args['table']}",
            **train_options(SMALL_MODEL, args["epochs"]),
        )
        history = trained.history
        wall = time.perf_counter() - started
        out.update(
            train=float(history["train_seconds"].sum()),
            eval=float((history["seconds"] - history["train_seconds"]).sum()),
            load=wall - float(history["seconds"].sum()),
            accuracy=float(history["val_accuracy"].iloc[-1]),
        )
    else:
        engine = create_engine(args["url"])
        frame = pd.read_sql(f"SELECT * FROM {args['table']}", engine)
        engine.dispose()
        x = frame[feature_names()].to_numpy(dtype=np.float64)
        y = frame["label"].to_numpy(dtype=np.int64)
        del frame
        data = split_plain(x, y)
        del x, y
        out["load"] = time.perf_counter() - started
        plain = PlainLoop(SMALL_MODEL, data)
        out["train"] = sum(plain.epoch() for _ in range(args["epochs"]))
        out["accuracy"], out["eval"] = plain.evaluate()
        wall = time.perf_counter() - started
    out.update(wall=wall, baseline_mb=baseline / 2**20, growth_mb=(peak_rss() - baseline) / 2**20)
    return out


def run_child(args: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"e2e child {args} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_e2e(mode: Mode, targets: Targets) -> list[dict[str, Any]]:
    results = []
    for rows in mode.e2e_rows:
        x, y = make_data(rows)
        table = f"e2e_{rows}"
        targets.load(x, y, table)
        del x, y
        for backend, url in targets.urls().items():
            for variant in ("database", "pandas"):
                args = {"variant": variant, "url": url, "table": table, "epochs": mode.e2e_epochs}
                wait_quiet(mode.quiet)
                result = {"backend": backend, "variant": variant, "rows": rows, **run_child(args)}
                log(
                    f"e2e {backend:10s} {variant:8s} {rows:>9,} rows: {result['wall']:.1f}s,"
                    f" +{result['growth_mb']:.0f} MB"
                )
                results.append(result)
    return results


# -- benchmark 3: PostgreSQL parallel workers -----------------------------------------------------
def bench_parallel(mode: Mode, targets: Targets) -> list[dict[str, Any]]:
    if not targets.pg_url:
        return []
    results = []
    for model in mode.parallel_models:
        for parallel, threads in ((1, THREADS), (2, THREADS // 2)):
            options = train_options(
                model, mode.parallel_epochs, parallel=parallel, threads=max(threads, 1)
            )
            wait_quiet(mode.quiet)
            marks = [server_cpu(targets.pg_postmaster)]

            def on_iteration(_row: dict[str, Any], marks: list[float] = marks) -> None:
                marks.append(server_cpu(targets.pg_postmaster))

            trained = dl.train(
                targets.database("postgresql"),
                f"SELECT * FROM {TABLE}",
                callbacks=Callbacks(on_iteration=on_iteration),
                **options,
            )
            cpu = [b - a for a, b in itertools.pairwise(marks)]
            history = trained.history
            result = {
                "model": model,
                "params": n_params(model),
                "parallel": parallel,
                "threads": options["threads"],
                "epochs": mode.parallel_epochs,
                "train_med": median(history["train_seconds"].tolist()[1:]),
                "seconds_med": median(history["seconds"].tolist()[1:]),
                "cpu_med": median(cpu[1:]),
                "workers": int(history["workers"].iloc[-1]),
                "combines": int(history["combines"].iloc[-1]),
                "accuracy": float(history["val_accuracy"].iloc[-1]),
                "accuracies": history["val_accuracy"].round(4).tolist(),
            }
            log(
                f"parallel={parallel} {model}: {result['train_med']:.3f}s/epoch,"
                f" acc {result['accuracy']:.4f} (workers {result['workers']})"
            )
            results.append(result)
    return results


# -- report ---------------------------------------------------------------------------------------
def machine_facts(targets: Targets | None) -> dict[str, str]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu = match.group(1).strip() if match else cpu
    u = os.uname()
    facts = {
        "machine": f"{u.sysname} {u.release} {u.machine}",
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "date": dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "sqlite": sqlite3.sqlite_version,
    }
    snapshot = os.environ.get("DBDL_BENCH_SNAPSHOT")
    if snapshot:
        facts["dbdl_magic"] = f"{dl.__version__} (git {snapshot}, exported HEAD)"
    else:
        with contextlib.suppress(Exception):
            commit = subprocess.run(
                ["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True
            ).stdout.strip()
            facts["dbdl_magic"] = f"{dl.__version__} (git {commit}, work tree)"
    facts["OMP_WAIT_POLICY"] = os.environ.get("OMP_WAIT_POLICY", "(unset)")
    if targets and targets.pg_conninfo:
        import psycopg

        with psycopg.connect(targets.pg_conninfo) as con:
            version = con.execute("SHOW server_version").fetchone()
            facts["postgresql"] = str(version[0]) if version else "?"
    return facts


def table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt_params(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def render(mode: Mode, facts: dict[str, str], results: dict[str, list[dict[str, Any]]]) -> str:
    parts = [
        f"## bench_engine --{mode.name}",
        "",
        "\n".join(f"- {k}: {v}" for k, v in facts.items()),
        "",
        f"Common settings: {N_FEATURES} float features, {N_CLASSES} classes (seeded nonlinear"
        f" rule), batch size {BATCH}, Adam lr {LR}, {int(VALIDATION * 100)}% validation,"
        f" torch threads {THREADS} (client loop and `threads={THREADS}` in the database).",
    ]
    if results.get("ratio"):
        r0 = results["ratio"][0]
        parts += [
            "",
            f"### 1. Epoch time: database ÷ plain torch ({r0['train_rows']:,} training rows)",
            "",
            "Medians over epochs 2..N (epoch 1 is a warm-up); each database epoch is followed by"
            " one plain epoch. *train* = the aggregate query (`train_seconds`) vs a plain epoch;"
            " *iteration* = the whole iteration incl. evaluation (`seconds`) vs a plain epoch +"
            " a plain evaluation of the same validation rows. *paired* = median of per-epoch"
            " ratios; *min* = fastest database epoch ÷ fastest plain epoch (least disturbed by"
            " other processes on this shared machine); *CPU* = CPU seconds of a whole database"
            " iteration (client + server processes) ÷ CPU seconds of a plain epoch + evaluation"
            " (robust to other load). *busy* = epochs that started while"
            f" others kept the CPUs > 25% busy. Target: ratio ≤ {TARGET_RATIO:.2f}.",
            "",
            table(
                [
                    "backend",
                    "model (params)",
                    "epochs",
                    "plain s",
                    "db train s",
                    "ratio train",
                    "paired",
                    "min",
                    "plain+eval s",
                    "db iteration s",
                    "ratio iteration",
                    "CPU ratio",
                    "target met",
                    "busy",
                    "val acc db / plain",
                ],
                [
                    [
                        r["backend"],
                        f"{r['model']} ({fmt_params(r['params'])})",
                        r["epochs"],
                        f"{r['plain_train_med']:.3f}",
                        f"{r['db_train_med']:.3f}",
                        f"**{r['ratio_train']:.3f}**",
                        f"{r['paired_train']:.3f}",
                        f"{r['min_ratio']:.3f}",
                        f"{r['plain_full_med']:.3f}",
                        f"{r['db_seconds_med']:.3f}",
                        f"**{r['ratio_full']:.3f}**",
                        f"{r['cpu_ratio']:.3f}",
                        _met(r["ratio_train"], r["ratio_full"]),
                        f"{r['contended']}/{r['epochs'] - 1}",
                        f"{r['db_acc']:.4f} / {r['plain_acc']:.4f}",
                    ]
                    for r in results["ratio"]
                ],
            ),
        ]
    if results.get("e2e"):
        parts += [
            "",
            f"### 2. End to end: pack + train {results['e2e'][0].get('epochs', 1)} epoch in the"
            " database vs pandas.read_sql + plain torch",
            "",
            f"Model {SMALL_MODEL}; each variant in a fresh process. *load* = packing and set-up"
            " in the database / read_sql + tensors on the client. *RSS growth* = the client"
            " process's peak RSS minus its RSS after imports (for SQLite the database engine"
            " and the kernels run inside the client process, so its growth includes them).",
            "",
            table(
                [
                    "backend",
                    "variant",
                    "rows",
                    "wall s",
                    "load s",
                    "train s",
                    "eval s",
                    "val acc",
                    "client RSS growth MB",
                ],
                [
                    [
                        r["backend"],
                        r["variant"],
                        f"{r['rows']:,}",
                        f"{r['wall']:.1f}",
                        f"{r['load']:.1f}",
                        f"{r['train']:.1f}",
                        f"{r['eval']:.2f}",
                        f"{r['accuracy']:.4f}",
                        f"{r['growth_mb']:.0f}",
                    ]
                    for r in results["e2e"]
                ],
            ),
        ]
    if results.get("parallel"):
        p0 = results["parallel"][0]
        parts += [
            "",
            f"### 3. PostgreSQL parallel workers ({p0['epochs']} epochs, same data)",
            "",
            "Total torch threads are the same: 1 worker × 2 threads vs 2 workers × 1 thread."
            " Epoch times are medians over epochs 2..N.",
            "",
            table(
                [
                    "model (params)",
                    "parallel",
                    "threads/worker",
                    "workers seen",
                    "train s/epoch",
                    "iteration s/epoch",
                    "server CPU s/iteration",
                    "final val acc",
                    "val acc per epoch",
                ],
                [
                    [
                        f"{r['model']} ({fmt_params(r['params'])})",
                        r["parallel"],
                        r["threads"],
                        r["workers"],
                        f"{r['train_med']:.3f}",
                        f"{r['seconds_med']:.3f}",
                        f"{r['cpu_med']:.2f}",
                        f"{r['accuracy']:.4f}",
                        ", ".join(f"{a:.3f}" for a in r["accuracies"]),
                    ]
                    for r in results["parallel"]
                ],
            ),
        ]
    return "\n".join(parts) + "\n"


def _met(*ratios: float) -> str:
    return " / ".join("yes" if r <= TARGET_RATIO else "no" for r in ratios)


def write_section(path: Path, key: str, body: str) -> None:
    """Replace the section between ``<!-- key:start -->`` and ``<!-- key:end -->`` of ``path``
    (or append it); other sections stay. ``bench_scale`` writes its parts with it too."""
    start, end = f"<!-- {key}:start -->", f"<!-- {key}:end -->"
    block = f"{start}\n{body}{end}\n"
    old = path.read_text() if path.exists() else "# Benchmark results\n\n"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end) + r"\n?", re.S)
    new = (
        pattern.sub(lambda _m: block, old) if pattern.search(old) else old.rstrip() + "\n\n" + block
    )
    path.write_text(new)


def run_on_snapshot(script: str, argv: list[str]) -> int:
    """Re-run ``script`` with ``PYTHONPATH`` pointing at ``git archive HEAD`` in a temp dir.

    Client, e2e children and the PostgreSQL server (whose PL/Python path is derived from where
    ``dbdl_magic`` is imported) then all use the committed code, whatever the work tree holds.
    """
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="dbdl-snapshot-") as tmp:
        archive = subprocess.run(
            ["git", "archive", "--format=tar", "HEAD", "dbdl_magic", "kernels"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        ).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        for folder, _dirs, _files in os.walk(tmp):
            os.chmod(folder, 0o755)  # the server's OS user must read it
        env = {**os.environ, "DBDL_BENCH_SNAPSHOT": commit}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [tmp, env.get("PYTHONPATH")]))
        log(f"benchmarking HEAD {commit} exported to {tmp}")
        return subprocess.run([sys.executable, script, *argv], env=env).returncode


# -- main -----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="small sizes (default), < 2 min")
    group.add_argument("--full", action="store_true", help="full sizes; updates RESULTS.md")
    parser.add_argument("--write", action="store_true", help="update RESULTS.md in quick mode")
    parser.add_argument("--no-write", action="store_true", help="never update RESULTS.md")
    parser.add_argument(
        "--only", default="ratio,e2e,parallel", help="comma list of ratio, e2e, parallel"
    )
    parser.add_argument("--no-postgres", action="store_true", help="SQLite only")
    parser.add_argument("--json", type=Path, help="also dump the raw results to this file")
    parser.add_argument(
        "--snapshot",
        action="store_true",
        help="benchmark the committed HEAD (exported to a temp dir) instead of the work tree",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(e2e_child(json.loads(args.child))))
        return 0
    if args.snapshot and not os.environ.get("DBDL_BENCH_SNAPSHOT"):
        rest = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--snapshot"]
        return run_on_snapshot(str(Path(__file__).resolve()), rest)

    mode = FULL if args.full else QUICK
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    write = (args.full or args.write) and not args.no_write
    started = time.perf_counter()
    torch.set_num_threads(THREADS)
    _quiet_left[0] = mode.quiet_budget
    results: dict[str, list[dict[str, Any]]] = {}
    with databases(not args.no_postgres) as targets:
        facts = machine_facts(targets)
        facts["CPUs busy with other work at start"] = f"{cpu_busy(1.0):.0%}"
        if only & {"ratio", "parallel"}:
            x, y = make_data(mode.rows)
            targets.load(x, y)
            data = split_plain(x, y)
            if "ratio" in only:
                results["ratio"] = bench_ratio(mode, targets, data)
            if "parallel" in only:
                results["parallel"] = bench_parallel(mode, targets)
        if "e2e" in only:
            results["e2e"] = bench_e2e(mode, targets)
    facts["CPUs busy with other work at end"] = f"{cpu_busy(1.0):.0%}"
    facts["benchmark wall time"] = f"{time.perf_counter() - started:.0f} s"
    body = render(mode, facts, results)
    print(body)
    if args.json:
        args.json.write_text(json.dumps({"facts": facts, "results": results}, indent=1))
    if write:
        write_section(RESULTS, f"bench_engine:{mode.name}", body)
        log(f"updated {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
