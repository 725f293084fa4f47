"""Segments on SQLite: worker processes, each with its own connection to the database file.

An embedded database runs its kernels in the client's process, so one process trains on one
core; small models gain nothing from a second torch thread but do from a second process.
:class:`SQLiteSegments` starts N processes once per run (``python -m`` this module: a clean
interpreter that imports torch once), each opening the database file and registering the same
kernels. Every round it sends each process its statement (the training aggregate over its
share of the buffers, the round's starting states bound as blobs), and combines the partial
states it gets back with the same combine kernel (in segment order) and, with
``averaging='outer'``, the outer step, in this process, which is where SQLite runs kernels.

Messages travel as length-prefixed frames: a JSON header, then raw byte frames for the states
(nothing is pickled). A failed or killed process stops the others and raises; Ctrl-C kills
every process before it propagates.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import time
from multiprocessing.connection import Connection as Pipe
from multiprocessing.connection import wait as wait_pipes
from typing import TYPE_CHECKING, Any

from sqlalchemy import text
from sqlalchemy.engine import Connection

from dbdl_magic.backends.segments import ProgressSink, Segments
from dbdl_magic.errors import TrainingError
from dbdl_magic.kernel.averaging import outer_step
from dbdl_magic.kernel.catalog import insert_checkpoints_sql
from dbdl_magic.kernel.state import combine_states, state_info

if TYPE_CHECKING:
    from dbdl_magic.backends.base import Backend, Member

POLL_SECONDS = 0.2
STARTUP_TIMEOUT = 300.0


def _send(pipe: Pipe, header: dict[str, Any], blobs: list[bytes | None] = ()) -> None:  # type: ignore[assignment]
    """A JSON header (listing which blobs are NULL) followed by one frame per blob."""
    pipe.send_bytes(json.dumps({**header, "nulls": [b is None for b in blobs]}).encode())
    for blob in blobs:
        if blob is not None:
            pipe.send_bytes(blob)


def _recv(pipe: Pipe) -> tuple[dict[str, Any], list[bytes | None]]:
    header = json.loads(pipe.recv_bytes())
    blobs = [None if null else pipe.recv_bytes() for null in header.pop("nulls", [])]
    return header, blobs


def serve(url: str, pipe: Pipe) -> None:
    """A segment process: open the database, then run statements until told to stop."""
    from sqlalchemy import create_engine

    from dbdl_magic.backends.sqlite import SQLiteBackend
    from dbdl_magic.kernel.train import warm_up

    engine = create_engine(url)
    backend = SQLiteBackend(engine)
    warm_up()  # torch's lazy imports now, not in the first round
    _send(pipe, {"op": "ready"})
    while True:
        header, blobs = _recv(pipe)
        if header["op"] == "stop":
            break
        params = dict(header["params"])
        params.update(zip(header["blob_names"], blobs, strict=True))

        def progress(samples: int) -> None:
            _send(pipe, {"op": "progress", "samples": samples})

        try:
            with engine.connect() as conn:
                with backend.progress_channel(conn, header["run"], progress):
                    rows = backend.run_kernels(conn, header["sql"], params).all()
                conn.rollback()
            _send(pipe, {"op": "done", "members": [int(m) for m, _ in rows]},
                  [bytes(s) if s is not None else None for _, s in rows])
        except BaseException as exc:
            _send(pipe, {"op": "error", "kind": type(exc).__name__, "message": str(exc)})
            if isinstance(exc, KeyboardInterrupt):
                break
    engine.dispose()


class SQLiteSegments(Segments):
    """N worker processes on one SQLite database file."""

    def __init__(self, backend: Backend, size: int, token: str) -> None:
        super().__init__(backend, size, token)
        url = backend.engine.url  # a database file (segments_unavailable refuses memory)
        self.processes: list[subprocess.Popen[bytes]] = []
        self.pipes: list[Pipe] = []
        self.states: dict[int, bytes] = {}  # the current round's starting state per member
        try:
            for _ in range(size):
                ours, theirs = socket.socketpair()
                proc = subprocess.Popen(
                    [sys.executable, "-m", __name__, str(theirs.fileno()),
                     url.render_as_string(hide_password=False)],
                    pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                    start_new_session=True,  # Ctrl-C reaches the run, which stops them
                )
                theirs.close()
                self.processes.append(proc)
                self.pipes.append(Pipe(ours.detach()))
            self._await_ready()
        except BaseException:
            self.close()
            raise

    def pids(self) -> list[int]:
        """The process id of each segment."""
        return [int(p.pid) for p in self.processes]

    def _await_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        for k, pipe in enumerate(self.pipes):
            if not pipe.poll(max(0.0, deadline - time.monotonic())):
                raise TrainingError(f"segment {k} of {self.size} did not start within "
                                    f"{STARTUP_TIMEOUT:.0f} s")
            try:
                _recv(pipe)
            except (EOFError, OSError) as exc:
                raise self._died(k) from exc

    def _died(self, k: int) -> TrainingError:
        proc = self.processes[k]
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        return TrainingError(
            f"segment {k} of {self.size} (process {proc.pid}) died (exit code {proc.returncode});"
            " the other segments were stopped and the run keeps its last checkpoint (train "
            "again with resume=True)"
        )

    def begin(self, conn: Connection, members: list[Member], iteration: int) -> None:
        sql, params = self.backend._states_sql(members, iteration)
        self.states = {int(m): bytes(s) for m, s in conn.execute(text(sql), params).all()}

    def source(self, r: int, members: list[Member]) -> tuple[str, dict[str, Any]]:
        params: dict[str, Any] = {}
        rows = []
        for i, (member, state) in enumerate(sorted(self.states.items())):
            params[f"ss{i}_m"], params[f"ss{i}_s"] = member, state
            rows.append(f"(:ss{i}_m, :ss{i}_s)")
        return (
            "(SELECT column1 AS member, column2 AS state FROM (VALUES"
            f" {', '.join(rows)}))",
            params,
        )

    def run_round(
        self, r: int, statements: list[tuple[str, dict[str, Any]]], sink: ProgressSink | None
    ) -> None:
        for pipe, (sql, params) in zip(self.pipes, statements, strict=True):
            names = [k for k, v in params.items() if isinstance(v, (bytes, bytearray))]
            plain = {k: v for k, v in params.items() if k not in names}
            _send(pipe, {"op": "round", "sql": sql, "params": plain, "blob_names": names,
                         "run": self.token}, [params[n] for n in names])
        seen = [0] * self.size
        self.partials: list[dict[int, bytes | None]] = [{} for _ in range(self.size)]
        pending = set(range(self.size))
        try:
            while pending:
                ready = wait_pipes([self.pipes[k] for k in pending], timeout=POLL_SECONDS)
                for pipe in ready:
                    k = self.pipes.index(pipe)  # type: ignore[arg-type]
                    try:
                        header, blobs = _recv(pipe)
                    except (EOFError, OSError) as exc:
                        self._kill()
                        raise self._died(k) from exc
                    if header["op"] == "progress":
                        seen[k] = int(header["samples"])
                    elif header["op"] == "done":
                        self.partials[k] = dict(zip(header["members"], blobs, strict=True))
                        pending.discard(k)
                    else:
                        self._kill()
                        raise TrainingError(
                            f"segment {k} of {self.size} failed: {header['message']}; the other "
                            "segments were stopped and the run keeps its last checkpoint"
                        )
                if sink is not None:
                    sink(sum(seen))
        except KeyboardInterrupt:
            self._kill()
            raise

    def combine(
        self, r: int, members: list[Member], outer: dict[str, float] | None
    ) -> dict[int, dict[str, Any]]:
        infos: dict[int, dict[str, Any]] = {}
        for member, start in list(self.states.items()):
            merged: bytes | None = None
            for partial in self.partials:  # in segment order, as dbdl.merge(... ORDER BY)
                merged = combine_states(merged, partial.get(member))
            if merged is None:
                continue
            if outer is not None:
                merged = outer_step(start, merged, outer)
            self.states[member] = merged
            infos[member] = state_info(merged)
        return infos

    def commit(self, conn: Connection, members: list[Member], iteration: int, last: int) -> None:
        params: dict[str, Any] = {"iteration": iteration + 1}
        relation = self.backend.members_relation(members, params)
        source, sparams = self.source(last, members)
        params.update(sparams)
        conn.execute(text(
            insert_checkpoints_sql(self.backend.store_tables(), source, relation)
        ), params)

    def _kill(self) -> None:
        for proc in self.processes:
            if proc.poll() is None:
                proc.kill()
        for proc in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)

    def close(self) -> None:
        for proc, pipe in zip(self.processes, self.pipes, strict=False):
            if proc.poll() is None:
                with contextlib.suppress(OSError):
                    _send(pipe, {"op": "stop"})
        for proc in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        self._kill()
        for pipe in self.pipes:
            pipe.close()
        self.processes, self.pipes = [], []


def main(argv: list[str]) -> None:
    """``python -m dbdl_magic.backends.sqlite_segments FD URL``: a segment process serving
    the run that started it over the socket ``FD``."""
    serve(argv[1], Pipe(int(argv[0])))


if __name__ == "__main__":
    main(sys.argv[1:])


__all__ = ["SQLiteSegments", "serve"]
