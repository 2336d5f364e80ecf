"""A real PostgreSQL server for tests, started from the installed binaries.

`postgres_server()` runs initdb and `pg_ctl start` (as the `postgres` user when the
tests run as root: initdb refuses root) in a fresh temporary directory, listening on a
free port of 127.0.0.1 only, with password (SCRAM) authentication; on leaving the block
it stops the server by its PID and removes the directory. `postgres_url()` is the
short form: one server, one database, its URL.

    from postgres_server import postgres_url, skip_or_fail_without_postgres

    skip_or_fail_without_postgres()    # pytest.skip, or fail when REQUIRE_POSTGRES=1
    with postgres_url() as url:        # postgresql://relay:PASSWORD@127.0.0.1:PORT/relay
        ...

The binaries are found in $POSTGRES_BIN, on PATH, or in Debian's
/usr/lib/postgresql/<version>/bin.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

SUPERUSER = "relay"
START_TIMEOUT = 120      # seconds: a loaded 2-core machine
STOP_TIMEOUT = 60


def postgres_bin() -> Path | None:
    """The directory holding initdb, pg_ctl and postgres, or None."""
    candidates = []
    if os.environ.get("POSTGRES_BIN"):
        candidates.append(os.environ["POSTGRES_BIN"])
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(os.path.dirname(on_path))
    # Debian: /usr/lib/postgresql/15/bin; the newest version first.
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                         key=lambda path: int(Path(path).parent.name)
                         if Path(path).parent.name.isdigit() else 0, reverse=True)
    for candidate in candidates:
        directory = Path(candidate)
        if all((directory / name).is_file() for name in ("initdb", "pg_ctl", "postgres")):
            return directory
    return None


def skip_or_fail_without_postgres() -> None:
    """Skips the calling test when PostgreSQL is not installed; fails it instead when
    REQUIRE_POSTGRES=1 (CI, where a skipped backend would go unnoticed)."""
    if postgres_bin() is not None:
        return
    reason = ("PostgreSQL server binaries (initdb, pg_ctl, postgres) not found:"
              " set POSTGRES_BIN or install postgresql")
    if os.environ.get("REQUIRE_POSTGRES") == "1":
        pytest.fail(f"{reason} (REQUIRE_POSTGRES=1)")
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class PostgresServer:
    """A running server: its address, its superuser's password, and databases."""

    def __init__(self, directory: Path, port: int, password: str, pid: int) -> None:
        self.directory = directory
        self.host = "127.0.0.1"
        self.port = port
        self.user = SUPERUSER
        self.password = password
        self.pid = pid
        self._names = itertools.count(1)

    def url(self, database: str = "postgres") -> str:
        return (f"postgresql://{self.user}:{self.password}@{self.host}:{self.port}"
                f"/{database}")

    def create_database(self, name: str | None = None) -> str:
        """A new empty database (a fresh one per test keeps tests apart); its URL."""
        import psycopg
        from psycopg import sql

        name = name or f"test_{next(self._names)}"
        with psycopg.connect(self.url(), autocommit=True, connect_timeout=30) as connection:
            connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url(name)

    def log(self) -> str:
        try:
            return (self.directory / "server.log").read_text(errors="replace")
        except OSError:
            return ""


def _as_postgres(command: list[str]) -> list[str]:
    """The command run as the postgres user when we are root (initdb refuses root)."""
    if os.geteuid() != 0:
        return command
    return ["runuser", "-u", "postgres", "--", *command]


def _owner() -> tuple[int, int] | None:
    if os.geteuid() != 0:
        return None
    entry = pwd.getpwnam("postgres")
    return entry.pw_uid, entry.pw_gid


def _running(pid: int) -> bool:
    """Whether the process is alive (a zombie, waiting for its parent, is not)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


def _stop(pid: int) -> None:
    """Fast shutdown by PID (SIGINT: disconnect clients, then exit), then harder."""
    for signum, wait in ((signal.SIGINT, STOP_TIMEOUT), (signal.SIGQUIT, 10),
                         (signal.SIGKILL, 10)):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not _running(pid):
                return
            time.sleep(0.1)


@contextlib.contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    """Starts a private PostgreSQL server; stops it and removes its files at the end."""
    binaries = postgres_bin()
    if binaries is None:
        raise RuntimeError("PostgreSQL binaries not found (see skip_or_fail_without_postgres)")
    # Not under pytest's tmp_path: that is private to root, and the server runs as
    # postgres. A short path also keeps the socket's path under its length limit.
    directory = Path(tempfile.mkdtemp(prefix="relay-pg-"))
    pid: int | None = None
    try:
        owner = _owner()
        if owner is not None:
            os.chown(directory, *owner)
        password = secrets.token_urlsafe(18)
        password_file = directory / "password"
        password_file.write_text(password + "\n")
        password_file.chmod(0o600)
        if owner is not None:
            os.chown(password_file, *owner)
        data = directory / "data"
        subprocess.run(_as_postgres([
            str(binaries / "initdb"), "-D", str(data), "-U", SUPERUSER,
            f"--pwfile={password_file}", "--auth=scram-sha-256", "--encoding=UTF8",
            "--locale=C", "--no-sync"]), check=True, capture_output=True,
            timeout=START_TIMEOUT)
        password_file.unlink()
        port = _start(binaries, directory, data)
        pid = int((data / "postmaster.pid").read_text().split()[0])
        yield PostgresServer(directory, port, password, pid)
    finally:
        if pid is not None:
            _stop(pid)
        shutil.rmtree(directory, ignore_errors=True)


def _start(binaries: Path, directory: Path, data: Path) -> int:
    """pg_ctl start on a free port (another port if that one was taken meanwhile)."""
    log = directory / "server.log"
    for _ in range(5):
        port = free_port()
        # Loopback only, the socket in our directory; fsync off: these databases die
        # with the test run, and the machine is shared.
        options = (f"-c listen_addresses=127.0.0.1 -p {port} -k {directory}"
                   " -c fsync=off -c max_connections=200")
        started = subprocess.run(_as_postgres([
            str(binaries / "pg_ctl"), "start", "-D", str(data), "-l", str(log), "-w",
            "-t", str(START_TIMEOUT), "-o", options]), check=False, capture_output=True,
            timeout=START_TIMEOUT + 30)
        if started.returncode == 0:
            return port
        text = log.read_text(errors="replace") if log.exists() else ""
        if "could not bind" not in text and "already in use" not in text:
            break
    raise RuntimeError(f"PostgreSQL did not start: {started.stderr.decode(errors='replace')}"
                       f"\n{text[-2000:]}")


@contextlib.contextmanager
def postgres_url(database: str = "relay") -> Iterator[str]:
    """One server with one database: yields postgresql://relay:PASSWORD@127.0.0.1:PORT/db."""
    with postgres_server() as server:
        yield server.create_database(database)
