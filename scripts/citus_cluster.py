"""A local Citus cluster for development: one coordinator and two workers on 127.0.0.1.

Usage (from the repository root, with the project's venv so the servers' PL/Python can import
torch and dbdl_magic)::

    .venv/bin/python scripts/citus_cluster.py [--dir DIR] [--db NAME] [--pool-size N]
    .venv/bin/python scripts/citus_cluster.py --stop DIR

Starting creates three PostgreSQL clusters under ``DIR`` (default: a new temporary directory
``dbdl-citus-*``), ``coordinator/``, ``worker1/`` and ``worker2/``, each on a free port of
127.0.0.1 with ``shared_preload_libraries = 'citus'``. It creates database ``NAME`` (default
``dbdl``) with ``CREATE EXTENSION citus`` on all three, then registers the coordinator
(``citus_set_coordinator_host``) and the workers (``citus_add_node``). The servers keep running
after the script exits; ``--stop DIR`` shuts them down (fast shutdown) and removes ``DIR`` if this
script created it as a temporary directory. ``DIR/cluster.json`` records the ports.

The last line on stdout is the coordinator's SQLAlchemy URL (superuser ``postgres``, trust
authentication on 127.0.0.1), ready for the Citus test::

    export "$(.venv/bin/python scripts/citus_cluster.py | tail -n 1)"
    .venv/bin/python -m pytest -q tests/test_citus.py -x

The servers are started the way the tests start theirs (``tests/pgserver.py``): as the
``postgres`` OS user when run as root, with ``PYTHONPATH`` naming this checkout and this
interpreter's site-packages. ``--pool-size N`` (default: the number of CPUs) caps the connections
the coordinator opens to each worker for one query (``citus.max_adaptive_executor_pool_size``) and
keeps that many open between transactions (``citus.max_cached_conns_per_worker``), so the next
training iteration runs in the same worker backends, whose PL/Python has already imported torch.

Citus must be installed for the server's PostgreSQL (``citus.so`` in ``pg_config --pkglibdir``);
the script says so and exits with status 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import pwd
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tests"))

from pgserver import (  # noqa: E402  (tests/ is not a package)
    DB_USER,
    SERVER_OS_USER,
    PostgresServer,
    _free_port,
    _user_switch_prefix,
    find_pg_bindir,
    server_pythonpath,
    unavailable_reason,
)

NODE_NAMES = ("coordinator", "worker1", "worker2")
STATE_FILE = "cluster.json"
HOST = "127.0.0.1"
START_ATTEMPTS = 3


class ClusterError(Exception):
    """The cluster cannot be started or stopped; the message says why."""


class CitusNode(PostgresServer):
    """One Citus node: a :class:`PostgresServer` that preloads Citus and outlives this process.

    ``pg_ctl start`` forks the server, so it is not our child: it keeps running after the script
    exits (``PostgresServer`` instead runs the server as a child that dies with the tests).
    """

    def __init__(self, bindir: Path, nodedir: Path, port: int, pool_size: int) -> None:
        super().__init__(bindir, nodedir, port, server_pythonpath(), max_workers=8)
        self.pool_size = pool_size

    def _server_args(self) -> list[str]:
        settings = {
            "shared_preload_libraries": "citus",
            "citus.local_hostname": HOST,  # "localhost" may resolve to ::1, where nothing listens
            "citus.max_adaptive_executor_pool_size": str(self.pool_size),
            "citus.max_cached_conns_per_worker": str(self.pool_size),
        }
        args = super()._server_args()
        for key, value in settings.items():
            args += ["-c", f"{key}={value}"]
        return args

    def init(self) -> None:
        """Create the node's directory (owned by the server's OS user) and run ``initdb``."""
        self.tmpdir.mkdir()
        _give_to_server_user(self.tmpdir)
        self._initdb()

    def start_detached(self) -> None:
        """Start the server with ``pg_ctl start -w``; retry on a new port if the port was taken."""
        for attempt in range(START_ATTEMPTS):
            args = self._server_args()
            at = args.index("-D")  # pg_ctl passes -D itself
            options = shlex.join(args[:at] + args[at + 2 :])
            try:
                self._run(
                    "pg_ctl",
                    "start",
                    "-w",
                    "-t",
                    "60",
                    "-D",
                    str(self.datadir),
                    "-l",
                    str(self.logfile),
                    "-o",
                    options,
                    timeout=90,
                )
                return
            except RuntimeError as e:
                if "could not bind" in self.log_tail(20) and attempt + 1 < START_ATTEMPTS:
                    self.port = _free_port()
                    continue
                raise ClusterError(
                    f"{self.tmpdir.name} did not start: {e}\nserver log tail:\n{self.log_tail()}"
                ) from e

    def stop_detached(self) -> bool:
        """Fast-shut-down the server if it runs; return whether it was running."""
        if not (self.datadir / "postmaster.pid").exists():
            return False
        self._run(
            "pg_ctl", "stop", "-w", "-t", "60", "-m", "fast", "-D", str(self.datadir), timeout=90
        )
        return True


def _is_root() -> bool:
    return os.geteuid() == 0


def _give_to_server_user(path: Path) -> None:
    """When root, hand ``path`` to the OS user that runs the servers."""
    if _is_root():
        pw = pwd.getpwnam(SERVER_OS_USER)
        os.chown(path, pw.pw_uid, pw.pw_gid)


def _pg_config(bindir: Path, option: str) -> Path:
    """Return the directory ``pg_config OPTION`` prints for the server in ``bindir``."""
    pg_config = bindir / "pg_config"
    try:
        out = subprocess.run(
            [str(pg_config), option], capture_output=True, text=True, timeout=30, check=True
        )
    except (OSError, subprocess.SubprocessError) as e:
        raise ClusterError(f"cannot run {pg_config} {option}: {e}") from e
    return Path(out.stdout.strip())


def citus_missing_reason(bindir: Path) -> str | None:
    """Explain why Citus can't be loaded by the server in ``bindir``, or return None."""
    libdir = _pg_config(bindir, "--pkglibdir")
    if not (libdir / "citus.so").is_file():
        return (
            f"Citus is not installed for the PostgreSQL in {bindir}: no citus.so in {libdir} "
            "(pg_config --pkglibdir). Build and install Citus for this PostgreSQL (from source: "
            f"./configure PG_CONFIG={bindir / 'pg_config'}; make; make install as root) or install "
            "the Citus package for this PostgreSQL version."
        )
    control = _pg_config(bindir, "--sharedir") / "extension" / "citus.control"
    if not control.is_file():
        return f"citus.so is in {libdir} but {control} is missing: reinstall Citus"
    return None


def _check_prerequisites() -> Path:
    """Return the server's bindir, or raise :class:`ClusterError` saying what is missing."""
    reason = unavailable_reason()
    if reason is not None:
        raise ClusterError(f"cannot start PostgreSQL: {reason}")
    bindir = find_pg_bindir()
    assert bindir is not None  # unavailable_reason() checked it
    reason = citus_missing_reason(bindir)
    if reason is not None:
        raise ClusterError(reason)
    if importlib.util.find_spec("torch") is None:
        raise ClusterError(
            f"torch is not importable by {sys.executable}, so the servers' PL/Python could not "
            "import it either: run this script with the project's venv (.venv/bin/python)"
        )
    return bindir


def _prepare_dir(requested: str | None) -> tuple[Path, bool, bool]:
    """Return the cluster directory, whether it is a new temp dir and whether it was created."""
    if requested is None:
        return Path(tempfile.mkdtemp(prefix="dbdl-citus-")), True, True
    path = Path(requested).resolve()
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ClusterError(f"--dir {path} exists and is not an empty directory")
    created = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    return path, False, created


def _check_server_user_can_enter(path: Path) -> None:
    """Fail early when the server's OS user cannot reach ``path`` (e.g. under /root)."""
    if not _is_root():
        return
    probe = subprocess.run(
        [*_user_switch_prefix(), "test", "-x", str(path)],
        capture_output=True,
        timeout=30,
    )
    if probe.returncode != 0:
        raise ClusterError(
            f"OS user {SERVER_OS_USER!r} (which runs the servers) cannot enter {path}: "
            "choose a --dir whose parent directories it can traverse"
        )


def _sql(port: int, dbname: str, *statements: str) -> None:
    """Run ``statements`` as the superuser on the node listening on ``port``."""
    import psycopg

    conninfo = f"host={HOST} port={port} user={DB_USER} dbname={dbname}"
    with psycopg.connect(conninfo, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)


def _create_databases(nodes: list[CitusNode], dbname: str) -> None:
    """Create ``dbname`` with the citus extension on every node."""
    from psycopg import sql

    create = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)).as_string(None)
    for node in nodes:
        _sql(node.port, "postgres", create)
        _sql(node.port, dbname, "CREATE EXTENSION citus")


def _register_nodes(coordinator: CitusNode, workers: list[CitusNode], dbname: str) -> None:
    """Register the coordinator and the workers in the coordinator's Citus metadata."""
    import psycopg

    conninfo = f"host={HOST} port={coordinator.port} user={DB_USER} dbname={dbname}"
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute("SELECT citus_set_coordinator_host(%s, %s)", (HOST, coordinator.port))
        for worker in workers:
            conn.execute("SELECT citus_add_node(%s, %s)", (HOST, worker.port))
        active = conn.execute("SELECT count(*) FROM citus_get_active_worker_nodes()").fetchone()
    if active is None or active[0] != len(workers):
        raise ClusterError(f"expected {len(workers)} active workers, Citus reports {active}")


def _write_state(path: Path, bindir: Path, nodes: list[CitusNode], state: dict) -> None:
    state = {
        **state,
        "bindir": str(bindir),
        "nodes": {node.tmpdir.name: node.port for node in nodes},
    }
    (path / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")


def start_cluster(requested_dir: str | None, dbname: str, pool_size: int) -> tuple[Path, str]:
    """Start the cluster; return its directory and the coordinator's SQLAlchemy URL."""
    bindir = _check_prerequisites()
    path, temporary, created = _prepare_dir(requested_dir)
    _give_to_server_user(path)
    nodes: list[CitusNode] = []
    try:
        _check_server_user_can_enter(path)
        used: set[int] = set()
        for name in NODE_NAMES:
            port = _free_port()
            while port in used:
                port = _free_port()
            used.add(port)
            node = CitusNode(bindir, path / name, port, pool_size)
            print(f"citus_cluster: initdb + start {name}", file=sys.stderr, flush=True)
            node.init()
            node.start_detached()
            nodes.append(node)
        _create_databases(nodes, dbname)
        _register_nodes(nodes[0], nodes[1:], dbname)
        url = nodes[0].url_for(dbname)
        _write_state(path, bindir, nodes, {"temporary": temporary, "db": dbname, "url": url})
        return path, url
    except BaseException:
        for node in reversed(nodes):
            with contextlib.suppress(Exception):
                node.stop_detached()
        if created:
            shutil.rmtree(path, ignore_errors=True)
        else:
            for name in (*NODE_NAMES, STATE_FILE):
                shutil.rmtree(path / name, ignore_errors=True)
        raise


def stop_cluster(directory: str) -> None:
    """Stop the nodes of the cluster in ``directory``; remove it if it was a temp dir."""
    path = Path(directory).resolve()
    try:
        state = json.loads((path / STATE_FILE).read_text())
        bindir = Path(state["bindir"])
        ports: dict[str, int] = state["nodes"]
    except (OSError, ValueError, KeyError) as e:
        raise ClusterError(f"{path} holds no cluster started by this script: {e}") from e
    failures = []
    for name, port in ports.items():  # the coordinator first: it holds connections to the workers
        node = CitusNode(bindir, path / name, int(port), pool_size=1)
        try:
            was_running = node.stop_detached()
        except RuntimeError as e:
            failures.append(f"{name}: {e}")
            continue
        print(f"citus_cluster: {name} {'stopped' if was_running else 'was not running'}")
    if failures:
        raise ClusterError("could not stop:\n" + "\n".join(failures))
    if state.get("temporary"):
        shutil.rmtree(path, ignore_errors=True)
        print(f"citus_cluster: removed {path}")


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", help="directory for the three data dirs (default: a temp dir)")
    parser.add_argument("--db", default="dbdl", help="database to create (default: dbdl)")
    parser.add_argument(
        "--pool-size",
        type=int,
        default=os.cpu_count() or 2,
        help="connections per worker, per query and cached (default: the number of CPUs)",
    )
    parser.add_argument("--stop", metavar="DIR", help="stop the cluster started in DIR")
    args = parser.parse_args(argv)
    if args.pool_size < 1:
        parser.error("--pool-size must be at least 1")
    try:
        if args.stop:
            stop_cluster(args.stop)
            return 0
        path, url = start_cluster(args.dir, args.db, args.pool_size)
    except ClusterError as e:
        print(f"citus_cluster: {e}", file=sys.stderr)
        return 1
    print(f"citus_cluster: running in {path}; stop with: {sys.argv[0]} --stop {path}")
    print(f"DBDL_CITUS_URL={url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
