"""Where does an epoch in the database spend its time? A companion of ``bench_engine.py``.

Run from the repository root::

    .venv/bin/python benchmarks/profile_engine.py [--rows 200000] [--epochs 4]
        [--model mlp:1024,1024] [--backend sqlite|postgresql|both] [--native]

SQLite runs the kernels in this process, so the per-buffer kernel steps are timed exactly by
wrapping them (``Trainer.__init__``, ``buffer_tensors``, the SGD loop, ``Trainer.to_bytes``,
the evaluator); what remains of the aggregate query is SQLite's own work (reading and sorting
the buffers, storing the checkpoint). PostgreSQL runs them in a server process, which is
sampled with py-spy (``pip install py-spy``; ``--native`` adds C frames such as detoasting) and
summarised as the share of samples per function, inclusive.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
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
    """Seconds and calls per wrapped function."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = collections.defaultdict(float)
        self.calls: dict[str, int] = collections.defaultdict(int)

    def wrap(self, owner: Any, attr: str, label: str) -> None:
        original = getattr(owner, attr)

        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[label] += time.perf_counter() - started
                self.calls[label] += 1

        setattr(owner, attr, timed)

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()


def profile_sqlite(url: str, model: str, epochs: int) -> list[str]:
    timers = Timers()
    timers.wrap(ktrain.Trainer, "__init__", "Trainer.__init__ (decode state, build net)")
    timers.wrap(ktrain, "buffer_tensors", "buffer_tensors (bytes → tensors)")
    timers.wrap(ktrain.Trainer, "train_buffer", "Trainer.train_buffer (incl. buffer_tensors)")
    timers.wrap(ktrain.Trainer, "to_bytes", "Trainer.to_bytes (serialise state)")
    timers.wrap(kevaluate.Evaluator, "__init__", "Evaluator.__init__")
    timers.wrap(kevaluate.Evaluator, "score_buffer", "Evaluator.score_buffer")
    per_epoch: list[dict[str, float]] = []

    def on_iteration(row: dict[str, Any]) -> None:
        per_epoch.append(
            {**timers.seconds, "train_seconds": row["train_seconds"], "seconds": row["seconds"]}
        )
        timers.reset()

    dl.train(
        url,
        f"SELECT * FROM {bench.TABLE}",
        callbacks=bench.Callbacks(on_iteration=on_iteration),
        **bench.train_options(model, epochs),
    )
    steady = per_epoch[1:] or per_epoch
    keys = [k for k in steady[0] if k not in ("train_seconds", "seconds")]
    mean = {
        k: sum(e.get(k, 0.0) for e in steady) / len(steady)
        for k in [*keys, "train_seconds", "seconds"]
    }
    sgd = mean["Trainer.train_buffer (incl. buffer_tensors)"] - mean.get(
        "buffer_tensors (bytes → tensors)", 0.0
    )
    kernel = sum(
        mean.get(k, 0.0)
        for k in (
            "Trainer.__init__ (decode state, build net)",
            "Trainer.train_buffer (incl. buffer_tensors)",
            "Trainer.to_bytes (serialise state)",
        )
    )
    lines = [
        f"SQLite, {model}, mean of epochs 2..{len(per_epoch)} (seconds per epoch):",
        f"  aggregate query (train_seconds)               {mean['train_seconds']:8.3f}",
        f"    SGD loop (train_buffer − decode)            {sgd:8.3f}",
    ]
    for key in keys:
        if key != "Trainer.train_buffer (incl. buffer_tensors)":
            lines.append(f"    {key:<44s}{mean[key]:8.3f}")
    evaluation = mean["seconds"] - mean["train_seconds"]
    lines += [
        f"    SQLite itself (query − kernel calls)        {mean['train_seconds'] - kernel:8.3f}",
        f"  evaluation, checkpoint (seconds − train)      {evaluation:8.3f}",
    ]
    return lines


# -- PostgreSQL: py-spy on the server process -----------------------------------------------------
@contextlib.contextmanager
def spy_on_training_backend(conninfo: str, out: Path, native: bool) -> Iterator[None]:
    """Attach py-spy to the server process that runs the training query, once it appears."""
    import psycopg

    stop = threading.Event()
    procs: list[subprocess.Popen[bytes]] = []

    def attach() -> None:
        with psycopg.connect(conninfo, autocommit=True) as con:
            while not stop.is_set():
                row = con.execute(
                    "SELECT pid FROM pg_stat_activity WHERE state = 'active'"
                    " AND query LIKE 'CREATE UNLOGGED TABLE%' LIMIT 1"
                ).fetchone()
                if row:
                    cmd = [
                        str(VENV_BIN / "py-spy"),
                        "record",
                        "-p",
                        str(row[0]),
                        "-r",
                        "200",
                        "-f",
                        "raw",
                        "-o",
                        str(out),
                    ]
                    cmd.append("--native" if native else "--nonblocking")
                    procs.append(
                        subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                    )
                    return
                time.sleep(0.05)

    thread = threading.Thread(target=attach, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        for proc in procs:
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=60)
            if not out.exists():
                print(err.decode(errors="replace")[-2000:], file=sys.stderr)


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
    no_python = total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        total += n
        frames = [_frame(f) for f in stack.split(";")]
        if not any(where.endswith(".py") or where == "<string>" for _, where in frames):
            no_python += n
        for name, where in set(frames):
            if where in DBDL_FILES:
                inclusive[f"{name} ({where})"] += n
        leaf["{} ({})".format(*frames[-1])] += n
    lines = [f"{total} samples; dbdl kernel functions, inclusive share:"]
    lines += [f"  {100 * n / total:5.1f}%  {name}" for name, n in inclusive.most_common(2 * top)]
    lines += [f"  {100 * no_python / total:5.1f}%  (no Python frame: server C code)"]
    lines += [f"leaf (self) share, top {top}:"]
    lines += [f"  {100 * n / total:5.1f}%  {name}" for name, n in leaf.most_common(top)]
    return lines


def profile_postgres(targets: bench.Targets, model: str, epochs: int, native: bool) -> list[str]:
    assert targets.pg_url and targets.pg_conninfo
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "spy.txt"
        os.chmod(tmp, 0o777)
        history: list[dict[str, Any]] = []
        with spy_on_training_backend(targets.pg_conninfo, out, native):
            trained = dl.train(
                targets.pg_url, f"SELECT * FROM {bench.TABLE}", **bench.train_options(model, epochs)
            )
            history = trained.history.to_dict("records")
        lines = [
            f"PostgreSQL, {model}: train_seconds per epoch "
            + ", ".join(f"{h['train_seconds']:.2f}" for h in history)
            + "; seconds "
            + ", ".join(f"{h['seconds']:.2f}" for h in history)
        ]
        if out.exists():
            lines += summarise_raw(out)
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
            report += profile_sqlite(targets.sqlite_url, args.model, args.epochs)
        if args.backend in ("postgresql", "both"):
            report += profile_postgres(targets, args.model, args.epochs, args.native)
    print("\n".join(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
