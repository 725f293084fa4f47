"""Where does an epoch in the database spend its time? A companion of ``bench_engine.py``.

Run from the repository root::

    .venv/bin/python benchmarks/profile_engine.py [--rows 200000] [--epochs 4]
        [--model mlp:1024,1024] [--backend sqlite|postgresql|both] [--native] [--snapshot]

SQLite runs the kernels in this process, so the per-buffer kernel steps are timed exactly by
wrapping them (``Trainer.__init__``, ``buffer_tensors``, the SGD loop, ``Trainer.to_bytes``,
the evaluator); what remains of the aggregate query is SQLite's own work (reading and sorting
the buffers, storing the checkpoint); one plain torch epoch per iteration is timed alongside
for reference. PostgreSQL runs them in a server process, which is sampled with py-spy (``pip
install py-spy``; ``--native`` adds C frames, but stops the process for every sample) from the
end of the warm-up epoch on, and summarised as the share of samples per dbdl function
(inclusive), the share outside Python (the server's C code) and the top leaf functions; the
server's CPU seconds per iteration are printed too. ``--snapshot`` profiles the committed
HEAD, as in ``bench_engine.py``.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import bench_engine as bench
import torch

import dbdl_magic as dl
from dbdl_magic.kernel import evaluate as kevaluate
from dbdl_magic.kernel import train as ktrain

VENV_BIN = Path(sys.executable).parent


# -- SQLite: exact timers around the kernel steps -------------------------------------------------
class Timers:
    """Wall and CPU seconds (all threads of this process) per wrapped function."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = collections.defaultdict(float)
        self.cpu: dict[str, float] = collections.defaultdict(float)

    def wrap(self, owner: Any, attr: str, label: str) -> None:
        original = getattr(owner, attr, None)
        if original is None:
            return

        def timed(*args: Any, **kwargs: Any) -> Any:
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                return original(*args, **kwargs)
            finally:
                self.wall[label] += time.perf_counter() - wall
                self.cpu[label] += time.process_time() - cpu

        setattr(owner, attr, timed)

    def take(self) -> dict[str, tuple[float, float]]:
        out = {k: (self.wall[k], self.cpu[k]) for k in self.wall}
        self.wall.clear()
        self.cpu.clear()
        return out


SQLITE_STEPS = [
    # (owner, attribute, label); nesting is shown by indentation of the label
    ("backend", "train_iteration", "aggregate query (train_iteration)"),
    (ktrain.Trainer, "__init__", "  Trainer.__init__ (decode state, build net)"),
    (ktrain.Trainer, "train_buffer", "  Trainer.train_buffer"),
    (ktrain, "buffer_tensors", "    buffer_tensors (bytes → tensors)"),
    (ktrain.Trainer, "to_bytes", "  Trainer.to_bytes (serialise state)"),
    ("backend", "state_info", "state_info"),
    ("backend", "evaluate", "evaluate query"),
    (kevaluate.Evaluator, "score_buffer", "  Evaluator.score_buffer"),
    ("backend", "archive", "archive checkpoint"),
]


def profile_sqlite(url: str, model: str, epochs: int, data: tuple) -> list[str]:
    """Per-epoch wall/CPU seconds of each kernel step, next to one plain epoch per iteration."""
    from dbdl_magic.backends.sqlite import SQLiteBackend

    timers = Timers()
    for owner, attr, label in SQLITE_STEPS:
        timers.wrap(SQLiteBackend if owner == "backend" else owner, attr, label)
    plain = bench.PlainLoop(model, data)
    per_epoch: list[dict[str, tuple[float, float]]] = []

    def on_iteration(row: dict[str, Any]) -> None:
        steps = timers.take()
        steps["iteration (history 'seconds')"] = (row["seconds"], float("nan"))
        wall, cpu = time.perf_counter(), time.process_time()
        plain.epoch()
        steps["plain epoch (reference)"] = (time.perf_counter() - wall, time.process_time() - cpu)
        per_epoch.append(steps)

    dl.train(
        url,
        f"SELECT * FROM {bench.TABLE}",
        callbacks=bench.Callbacks(on_iteration=on_iteration),
        **bench.train_options(model, epochs),
    )
    steady = per_epoch[1:] or per_epoch
    labels = [label for _, _, label in SQLITE_STEPS if label in steady[0]]
    labels += ["iteration (history 'seconds')", "plain epoch (reference)"]
    lines = [
        f"SQLite, {model}, median of epochs 2..{len(per_epoch)}, seconds per epoch:",
        f"  {'step':<48s}{'wall':>9s}{'CPU':>9s}",
    ]
    for label in labels:
        wall = bench.median([e[label][0] for e in steady if label in e])
        cpu = bench.median([e[label][1] for e in steady if label in e])
        lines.append(f"  {label:<48s}{wall:9.3f}{cpu:9.3f}")
    return lines


# -- PostgreSQL: py-spy on the server process -----------------------------------------------------
class Spy:
    """py-spy on the server processes serving ``dbname``'s clients, started on demand."""

    def __init__(self, conninfo: str, out_dir: Path, native: bool) -> None:
        self.conninfo, self.out_dir, self.native = conninfo, out_dir, native
        self.procs: list[tuple[subprocess.Popen[bytes], Path]] = []

    def start(self) -> None:
        """Attach to every client backend of the database (the training run's connections)."""
        import psycopg

        with psycopg.connect(self.conninfo, autocommit=True) as con:
            pids = [
                r[0]
                for r in con.execute(
                    "SELECT pid FROM pg_stat_activity WHERE backend_type = 'client backend'"
                    " AND datname = current_database() AND pid <> pg_backend_pid()"
                )
            ]
        for pid in pids:
            out = self.out_dir / f"spy-{pid}.txt"
            cmd = [str(VENV_BIN / "py-spy"), "record", "-p", str(pid), "-r", "200"]
            cmd += ["-f", "raw", "-o", str(out), "--native" if self.native else "--nonblocking"]
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            self.procs.append((proc, out))

    def stop(self) -> list[Path]:
        """Stop sampling; returns the files written."""
        files = []
        for proc, out in self.procs:
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=60)
            if out.exists():
                files.append(out)
            else:
                print(err.decode(errors="replace")[-2000:], file=sys.stderr)
        return files


DBDL_FILES = ("plpython.py", "train.py", "state.py", "evaluate.py", "predict.py", "blockstore.py")


def _frame(raw: str) -> tuple[str, str]:
    """``"fn (path/file.py:12)"`` → ``("fn", "file.py")``."""
    name, _, where = raw.rpartition(" (")
    return (name or raw), where.rstrip(")").split(":")[0].rsplit("/", 1)[-1]


def summarise_raw(path: Path, top: int = 12) -> list[str]:
    """Shares of samples from a py-spy ``raw`` (collapsed stacks) file.

    Inclusive shares of the dbdl kernel functions, the share with no Python frame at all (the
    server's own C code: executor, detoasting, copying the state datum), and the top leaves.
    """
    inclusive: collections.Counter[str] = collections.Counter()
    leaf: collections.Counter[str] = collections.Counter()
    c_leaf: collections.Counter[str] = collections.Counter()
    no_python = total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        total += n
        frames = [_frame(f) for f in stack.split(";")]
        if not any(where.endswith(".py") or where == "<string>" for _, where in frames):
            no_python += n
            c_leaf["{} ({})".format(*frames[-1])] += n
        for name, where in set(frames):
            if where in DBDL_FILES:
                inclusive[f"{name} ({where})"] += n
        leaf["{} ({})".format(*frames[-1])] += n
    lines = [f"{total} samples; dbdl kernel functions, inclusive share:"]
    lines += [f"  {100 * n / total:5.1f}%  {name}" for name, n in inclusive.most_common(2 * top)]
    lines += [f"  {100 * no_python / total:5.1f}%  (no Python frame: server C code)"]
    if no_python and any(name.strip() for name in c_leaf):
        lines += [f"  of which (leaf frames; needs --native), top {top // 2}:"]
        lines += [
            f"    {100 * n / total:5.1f}%  {name}" for name, n in c_leaf.most_common(top // 2)
        ]
    lines += [f"leaf (self) share, top {top}:"]
    lines += [f"  {100 * n / total:5.1f}%  {name}" for name, n in leaf.most_common(top)]
    return lines


def profile_postgres(targets: bench.Targets, model: str, epochs: int, native: bool) -> list[str]:
    """Sample the server from the end of the warm-up epoch to the end of the run."""
    assert targets.pg_url and targets.pg_conninfo
    with tempfile.TemporaryDirectory() as tmp:
        os.chmod(tmp, 0o777)
        spy = Spy(targets.pg_conninfo, Path(tmp), native)
        marks = [bench.server_cpu(targets.pg_postmaster)]

        def on_iteration(_row: dict[str, Any]) -> None:
            if len(marks) == 1:
                spy.start()  # after the warm-up epoch (imports, first optimizer)
            marks.append(bench.server_cpu(targets.pg_postmaster))

        try:
            trained = dl.train(
                targets.pg_url,
                f"SELECT * FROM {bench.TABLE}",
                callbacks=bench.Callbacks(on_iteration=on_iteration),
                **bench.train_options(model, epochs),
            )
        finally:
            files = spy.stop()
        history = trained.history.to_dict("records")
        cpu = [b - a for a, b in itertools.pairwise(marks)]
        lines = [
            f"PostgreSQL, {model}, per epoch: train_seconds "
            + ", ".join(f"{h['train_seconds']:.2f}" for h in history)
            + "; seconds "
            + ", ".join(f"{h['seconds']:.2f}" for h in history)
            + "; server CPU s "
            + ", ".join(f"{c:.2f}" for c in cpu),
            f"py-spy from the end of epoch 1 on ({len(files)} server process(es) sampled):",
        ]
        merged = Path(tmp) / "merged.txt"
        merged.write_text("".join(f.read_text() for f in files))
        if files:
            lines += summarise_raw(merged)
        return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--model", default=bench.LARGE_MODEL)
    parser.add_argument("--backend", default="both", choices=["sqlite", "postgresql", "both"])
    parser.add_argument("--native", action="store_true", help="py-spy --native (C frames)")
    parser.add_argument("--snapshot", action="store_true", help="profile the committed HEAD")
    args = parser.parse_args(argv)
    if args.snapshot and not os.environ.get("DBDL_BENCH_SNAPSHOT"):
        rest = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--snapshot"]
        return bench.run_on_snapshot(str(Path(__file__).resolve()), rest)
    torch.set_num_threads(bench.THREADS)
    with bench.databases(args.backend != "sqlite") as targets:
        x, y = bench.make_data(args.rows)
        targets.load(x, y)
        report: list[str] = []
        if args.backend in ("sqlite", "both"):
            data = bench.split_plain(x, y)
            report += profile_sqlite(targets.sqlite_url, args.model, args.epochs, data)
        if args.backend in ("postgresql", "both"):
            report += profile_postgres(targets, args.model, args.epochs, args.native)
    print("\n".join(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
