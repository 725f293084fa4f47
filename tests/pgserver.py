"""Throwaway PostgreSQL clusters for tests.

Starts a private PostgreSQL server (``initdb`` + ``postgres``) in a temporary directory, with
``PYTHONPATH`` set so that PL/Python (the system ``python3`` embedded in the server) can import
torch, numpy, safetensors and ``dbdl_magic`` from this checkout and its virtualenv.

PostgreSQL refuses to run as root, so when the tests run as root (as on CI) every server command
runs as the ``postgres`` OS user, through ``setpriv`` (preferred: it execs, so the server is a
direct child and gets a parent-death signal) or ``runuser``.

This module deliberately has no pytest dependency; ``tests/conftest.py`` wraps it in a fixture.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

__all__ = [
    "PostgresServer",
    "find_pg_bindir",
    "require_postgres",
    "server_pythonpath",
    "unavailable_reason",
]

#: OS user that runs the server when the tests run as root.
SERVER_OS_USER = "postgres"
#: Superuser created by ``initdb`` (trust authentication, no password).
DB_USER = "postgres"  # not "dbdl": "$user" in search_path would resolve to schema dbdl
STARTUP_TIMEOUT_S = 60.0

_REQUIRED_BINARIES = ("initdb", "postgres", "pg_ctl")
_live_servers: set[PostgresServer] = set()


def find_pg_bindir() -> Path | None:
    """Return the directory holding ``initdb``, ``postgres`` and ``pg_ctl``, or None.

    Looks in ``/usr/lib/postgresql/*/bin`` (Debian layout; version 15 preferred, then the newest)
    and then on ``PATH``.
    """

    def has_all(d: Path) -> bool:
        return all(os.access(d / b, os.X_OK) for b in _REQUIRED_BINARIES)

    def version_key(d: Path) -> tuple[int, float]:
        name = d.parent.name
        try:
            num = float(name)
        except ValueError:
            num = 0.0
        return (1 if name == "15" else 0, num)

    candidates = sorted(
        (Path(p) for p in glob.glob("/usr/lib/postgresql/*/bin")), key=version_key, reverse=True
    )
    for d in candidates:
        if has_all(d):
            return d
    found = shutil.which("postgres")
    if found and has_all(Path(found).resolve().parent):
        return Path(found).resolve().parent
    return None


def _share_dir(bindir: Path) -> Path | None:
    """Return the server's share directory (where ``extension/*.control`` live), or None."""
    pg_config = bindir / "pg_config"
    if os.access(pg_config, os.X_OK):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [str(pg_config), "--sharedir"], capture_output=True, text=True, timeout=30
            )
            if out.returncode == 0 and out.stdout.strip():
                return Path(out.stdout.strip())
    # Debian: /usr/lib/postgresql/15/bin -> /usr/share/postgresql/15
    debian = Path("/usr/share/postgresql") / bindir.parent.name
    if debian.is_dir():
        return debian
    # Source builds: PREFIX/bin -> PREFIX/share(/postgresql)
    for cand in (bindir.parent / "share" / "postgresql", bindir.parent / "share"):
        if (cand / "extension").is_dir():
            return cand
    return None


def _is_root() -> bool:
    return os.geteuid() == 0


def _which(program: str) -> str | None:
    """``shutil.which`` that also looks in the sbin dirs (often not on a root PATH in CI)."""
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/bin", "/sbin", "/bin"])
    return shutil.which(program, path=path)


def _user_switch_prefix() -> list[str]:
    """Command prefix that runs a program as the server's OS user (empty when not root).

    ``setpriv`` execs the program, so it stays our direct child and can be given a
    parent-death signal (SIGINT = fast shutdown) should this Python process die abruptly.
    """
    pdeath = ["--pdeathsig", "INT"]
    setpriv = _which("setpriv")
    if not _is_root():
        return [setpriv, *pdeath] if setpriv else []
    if setpriv:
        return [
            setpriv,
            "--reuid",
            SERVER_OS_USER,
            "--regid",
            SERVER_OS_USER,
            "--init-groups",
            "--inh-caps=-all",
            *pdeath,
        ]
    runuser = _which("runuser")
    if runuser:
        return [runuser, "-u", SERVER_OS_USER, "--"]
    raise RuntimeError("running as root but neither setpriv nor runuser is available")


def unavailable_reason() -> str | None:
    """Explain why a PostgreSQL server with PL/Python can't be started here, or return None."""
    bindir = find_pg_bindir()
    if bindir is None:
        return (
            "PostgreSQL server binaries (initdb, postgres, pg_ctl) not found in "
            "/usr/lib/postgresql/*/bin or on PATH; run scripts/setup.sh as root "
            "(installs postgresql-15 and postgresql-plpython3-15)"
        )
    share = _share_dir(bindir)
    if share is None or not (share / "extension" / "plpython3u.control").is_file():
        return (
            f"PL/Python (plpython3u.control) not found under {share or 'the share dir'} for "
            f"{bindir}; install postgresql-plpython3-15 (scripts/setup.sh does this as root)"
        )
    if _is_root():
        try:
            pwd.getpwnam(SERVER_OS_USER)
        except KeyError:
            return (
                f"running as root (PostgreSQL refuses to) and OS user {SERVER_OS_USER!r} "
                "does not exist to run the server as"
            )
        if not (_which("setpriv") or _which("runuser")):
            return "running as root and neither setpriv nor runuser is available to drop root"
    return None


def _package_parent_dir() -> Path:
    """Return the directory that contains the ``dbdl_magic`` package (the repo root)."""
    with contextlib.suppress(ImportError, ValueError):
        spec = importlib.util.find_spec("dbdl_magic")
        if spec is not None:
            if spec.submodule_search_locations:
                for loc in spec.submodule_search_locations:
                    return Path(loc).resolve().parent
            if spec.origin:
                return Path(spec.origin).resolve().parent.parent
    return Path(__file__).resolve().parent.parent


def require_postgres() -> None:
    """In a fixture: fail when no server can be started here on CI (``CI`` set), skip elsewhere."""
    import pytest

    reason = unavailable_reason()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL unavailable on CI: {reason}", pytrace=False)
        pytest.skip(f"PostgreSQL unavailable: {reason}")


@contextlib.contextmanager
def throwaway_server() -> Iterator[PostgresServer]:
    """A PostgreSQL server with PL/Python for a fixture's scope (see :func:`require_postgres`
    for when none can be started), stopped at the end."""
    require_postgres()
    with PostgresServer.start(server_pythonpath()) as server:
        yield server


def server_pythonpath() -> list[str]:
    """Return the ``PYTHONPATH`` entries the server's PL/Python needs.

    These are this interpreter's (the venv's) purelib and platlib ``site-packages`` -- so the
    server's system ``python3`` can import torch, numpy and safetensors -- plus the directory
    containing the ``dbdl_magic`` package. The latter is needed because ``.pth`` files (which
    is how an editable install works) are only processed in site dirs, not in ``PYTHONPATH``.
    """
    paths = sysconfig.get_paths()
    entries = [str(_package_parent_dir()), paths["purelib"], paths["platlib"]]
    out: list[str] = []
    for e in entries:
        if e not in out:
            out.append(e)
    return out


def _sweep_stale_dirs(max_idle_s: float = 600.0) -> None:
    """Remove temp dirs left by servers whose test process died (e.g. ``kill -9``).

    A dir is stale when its ``postmaster.pid`` names a dead process, or when it has none (the
    server was shut down, e.g. by the parent-death signal) and nothing in it changed for
    ``max_idle_s`` seconds. Dirs of live servers in other processes are left alone.
    """
    for d in Path(tempfile.gettempdir()).glob("dbdl-pg-*"):
        if any(s.tmpdir == d for s in _live_servers):
            continue
        pidfile = d / "data" / "postmaster.pid"
        try:
            if pidfile.exists():
                pid = int(pidfile.read_text().split()[0])
                try:
                    os.kill(pid, 0)
                    continue  # alive
                except ProcessLookupError:
                    pass
                except PermissionError:
                    continue  # alive, another user's
            else:
                newest = max(p.stat().st_mtime for p in (d, d / "server.log") if p.exists())
                if time.time() - newest < max_idle_s:
                    continue
        except (OSError, ValueError, IndexError):
            continue
        shutil.rmtree(d, ignore_errors=True)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresServer:
    """A private PostgreSQL server in a temporary directory; stop it with :meth:`stop`.

    Create one with :meth:`start`. Usable as a context manager (stops on exit). Servers still
    running when the interpreter exits are stopped by an ``atexit`` hook.
    """

    def __init__(
        self,
        bindir: Path,
        tmpdir: Path,
        port: int,
        pythonpath: list[str],
        max_workers: int = 4,
        memory_limit: int | None = None,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.bindir = bindir
        self.tmpdir = tmpdir
        self.datadir = tmpdir / "data"
        self.sockdir = tmpdir / "sock"
        self.logfile = tmpdir / "server.log"
        self.port = port
        self.pythonpath = list(pythonpath)
        self.max_workers = max_workers
        self.memory_limit = memory_limit
        self.extra_env = dict(extra_env or {})
        self._proc: subprocess.Popen[bytes] | None = None
        self._prefix = _user_switch_prefix()

    # ------------------------------------------------------------------ lifecycle
    @classmethod
    def start(
        cls,
        pythonpath: list[str],
        max_workers: int = 4,
        memory_limit: int | None = None,
        extra_env: dict[str, str] | None = None,
    ) -> PostgresServer:
        """Create a cluster in a new temp dir, start the server and wait until it accepts.

        ``pythonpath`` becomes the server's ``PYTHONPATH`` (see :func:`server_pythonpath`).
        ``max_workers`` is the number of parallel workers callers intend to use; the server
        allows ``max(8, max_workers)`` (``max_worker_processes``/``max_parallel_workers``).
        ``max_parallel_workers_per_gather`` is 0, so queries opt in to parallelism with ``SET``.
        ``memory_limit`` (bytes), when given, caps the address space (``RLIMIT_AS``) of the
        server and of every process it forks; ``extra_env`` adds variables to its environment.
        """
        reason = unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"cannot start PostgreSQL: {reason}")
        bindir = find_pg_bindir()
        assert bindir is not None
        _sweep_stale_dirs()
        tmpdir = Path(tempfile.mkdtemp(prefix="dbdl-pg-", dir=tempfile.gettempdir()))
        server: PostgresServer | None = None
        try:
            if _is_root():
                pw = pwd.getpwnam(SERVER_OS_USER)
                os.chown(tmpdir, pw.pw_uid, pw.pw_gid)
            server = cls(
                bindir, tmpdir, _free_port(), pythonpath, max_workers, memory_limit, extra_env
            )
            _live_servers.add(server)
            server._initdb()
            server._launch_and_wait()
            return server
        except BaseException:
            if server is not None:
                server.stop()
            else:
                shutil.rmtree(tmpdir, ignore_errors=True)
            raise

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        # Anything that would redirect the *system* python3 embedded in the server.
        for var in (
            "PYTHONHOME",
            "PYTHONSTARTUP",
            "VIRTUAL_ENV",
            "PYTHONEXECUTABLE",
            "PGDATA",
            "PGHOST",
            "PGPORT",
            "PGUSER",
            "PGDATABASE",
            "PGOPTIONS",
        ):
            env.pop(var, None)
        env["PYTHONPATH"] = ":".join(self.pythonpath)
        env["PYTHONDONTWRITEBYTECODE"] = "1"  # the server user can't write into the repo
        env.update(self.extra_env)
        if _is_root():
            # setpriv keeps root's HOME, which the server user can't read.
            env["HOME"] = str(self.tmpdir)
            env["USER"] = env["LOGNAME"] = SERVER_OS_USER
        return env

    def _cmd(self, program: str, *args: str) -> list[str]:
        return [*self._prefix, str(self.bindir / program), *args]

    def _run(self, program: str, *args: str, timeout: float = 120.0) -> None:
        proc = subprocess.run(
            self._cmd(program, *args),
            cwd=self.tmpdir,
            env=self._env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"{program} failed with exit code {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
            )

    def _initdb(self) -> None:
        self._run(
            "initdb",
            "-D",
            str(self.datadir),
            "-A",
            "trust",
            "-U",
            DB_USER,
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        )
        self.sockdir.mkdir()
        if _is_root():
            pw = pwd.getpwnam(SERVER_OS_USER)
            os.chown(self.sockdir, pw.pw_uid, pw.pw_gid)

    def _server_args(self) -> list[str]:
        workers = str(max(8, self.max_workers))
        settings = {
            "listen_addresses": "127.0.0.1",
            "fsync": "off",
            "max_worker_processes": workers,
            "max_parallel_workers": workers,
            "max_parallel_workers_per_gather": "0",
            "shared_buffers": "128MB",
        }
        args = ["-D", str(self.datadir), "-k", str(self.sockdir), "-p", str(self.port)]
        for key, value in settings.items():
            args += ["-c", f"{key}={value}"]
        return args

    def _launch_and_wait(self, attempts: int = 3) -> None:
        for attempt in range(attempts):
            with open(self.logfile, "ab") as log:
                self._proc = subprocess.Popen(
                    self._cmd("postgres", *self._server_args()),
                    cwd=self.tmpdir,
                    env=self._env(),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    preexec_fn=self._limit_memory if self.memory_limit else None,
                )
            deadline = time.monotonic() + STARTUP_TIMEOUT_S
            while time.monotonic() < deadline:
                if self._proc.poll() is not None:
                    break
                if self._is_ready():
                    return
                time.sleep(0.1)
            else:
                self._kill()
                raise RuntimeError(
                    f"PostgreSQL did not accept connections within {STARTUP_TIMEOUT_S:.0f} s "
                    f"(port {self.port}); server log tail:\n{self.log_tail()}"
                )
            # The server exited during start-up. Retry on another port if it lost a port race.
            self._proc = None
            if "could not bind" in self.log_tail(20) and attempt + 1 < attempts:
                self.port = _free_port()
                continue
            raise RuntimeError(
                f"PostgreSQL exited during start-up; server log tail:\n{self.log_tail()}"
            )

    def _limit_memory(self) -> None:
        """In the forked child, before exec: cap the address space of the server's processes."""
        import resource

        assert self.memory_limit is not None
        resource.setrlimit(resource.RLIMIT_AS, (self.memory_limit, self.memory_limit))

    def _is_ready(self) -> bool:
        pg_isready = self.bindir / "pg_isready"
        if os.access(pg_isready, os.X_OK):
            res = subprocess.run(
                [
                    str(pg_isready),
                    "-q",
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(self.port),
                    "-U",
                    DB_USER,
                    "-d",
                    "postgres",
                    "-t",
                    "2",
                ],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=30,
            )
            return res.returncode == 0
        import psycopg

        try:
            with psycopg.connect(self.conninfo(), connect_timeout=2):
                return True
        except psycopg.OperationalError:
            return False

    def _kill(self) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                proc.send_signal(signal.SIGQUIT)  # immediate shutdown
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        self._proc = None

    def stop(self) -> None:
        """Fast-shut-down the server (if running) and remove its temp dir. Idempotent."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(Exception):
                self._run(
                    "pg_ctl",
                    "-D",
                    str(self.datadir),
                    "-m",
                    "fast",
                    "-w",
                    "-t",
                    "30",
                    "stop",
                    timeout=60,
                )
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._kill()
        self._proc = None
        _live_servers.discard(self)
        shutil.rmtree(self.tmpdir, ignore_errors=True)

    @property
    def running(self) -> bool:
        """Whether the server process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> PostgresServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ------------------------------------------------------------------ access
    def conninfo(self, dbname: str = "postgres") -> str:
        """Return a libpq connection string for ``dbname``."""
        return f"host=127.0.0.1 port={self.port} user={DB_USER} dbname={dbname}"

    def url_for(self, dbname: str) -> str:
        """Return the SQLAlchemy URL (psycopg 3 driver) of database ``dbname``."""
        return f"postgresql+psycopg://{DB_USER}@127.0.0.1:{self.port}/{dbname}"

    @property
    def url(self) -> str:
        """SQLAlchemy URL of the default ``postgres`` database."""
        return self.url_for("postgres")

    def create_database(self, name: str) -> str:
        """Create database ``name`` and return its SQLAlchemy URL."""
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.conninfo(), autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url_for(name)

    def log_tail(self, n: int = 50) -> str:
        """Return the last ``n`` lines of the server log."""
        try:
            lines = self.logfile.read_text(errors="replace").splitlines()
        except OSError as e:
            return f"<no server log: {e}>"
        return "\n".join(lines[-n:])

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"PostgresServer(port={self.port}, dir={self.tmpdir}, {state})"


@atexit.register
def _stop_all() -> None:
    for server in list(_live_servers):
        with contextlib.suppress(Exception):
            server.stop()


if __name__ == "__main__":  # manual smoke test: python tests/pgserver.py
    why = unavailable_reason()
    if why:
        sys.exit(why)
    with PostgresServer.start(server_pythonpath()) as srv:
        print(srv, srv.url)
