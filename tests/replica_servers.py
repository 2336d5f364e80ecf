"""Real Redis and HAProxy servers for the replica tests (issue #12), started from the
installed Debian binaries in a temporary directory, on free loopback ports.

    from replica_servers import haproxy, redis_server, require

    require("redis-server", "REQUIRE_REDIS")   # pytest.skip, or fail when it is "1"
    with redis_server() as redis:               # redis.url == "redis://127.0.0.1:PORT"
        redis.stop(); redis.start()             # the same port again
    with haproxy(backends) as proxy:            # proxy.port: mode tcp, send-proxy-v2
        ...

Each server is stopped by its own PID when the block ends; nothing listens beyond
127.0.0.1.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

START_TIMEOUT = 30  # seconds: a loaded 2-core machine


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def require(binary: str, variable: str) -> str:
    """The binary's path; skips the test without it, or fails it when `variable` is
    1 (CI: a replica test that silently skipped would prove nothing)."""
    path = shutil.which(binary) or (f"/usr/sbin/{binary}"
                                     if os.path.exists(f"/usr/sbin/{binary}") else None)
    if path:
        return path
    reason = f"{binary} is not installed (apt-get install {binary.split('-')[0]}" \
             f"{'-server' if binary == 'redis-server' else ''})"
    if os.environ.get(variable) == "1":
        pytest.fail(f"{reason} ({variable}=1)")
    pytest.skip(reason)


def wait_for_port(port: int, process: subprocess.Popen, what: str,
                  timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"{what} exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"{what} did not listen on {port}")


def stop_process(process: subprocess.Popen | None, timeout: float = 10) -> None:
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class RedisServer:
    """redis-server without persistence, on one port for its whole life (stop and
    start again: an outage and the recovery)."""

    def __init__(self, binary: str, directory: Path):
        self.binary, self.directory = binary, directory
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        with open(self.directory / "redis.log", "ab") as log:
            self.process = subprocess.Popen(
                [self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
                 "--save", "", "--appendonly", "no", "--dir", str(self.directory),
                 "--protected-mode", "yes"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        wait_for_port(self.port, self.process, "redis-server")

    def stop(self) -> None:
        stop_process(self.process)


@contextlib.contextmanager
def redis_server() -> Iterator[RedisServer]:
    binary = require("redis-server", "REQUIRE_REDIS")
    with tempfile.TemporaryDirectory(prefix="relay-redis-") as directory:
        server = RedisServer(binary, Path(directory))
        server.start()
        try:
            yield server
        finally:
            server.stop()


@dataclass
class Backend:
    name: str
    smtp_port: int
    http_port: int  # its /readyz is the health check


class HAProxy:
    def __init__(self, port: int, stats_port: int, process: subprocess.Popen,
                 directory: Path):
        self.port, self.stats_port = port, stats_port
        self.process, self.directory = process, directory

    def log(self) -> str:
        return (self.directory / "haproxy.log").read_text(errors="replace")


# As docker-compose.scale.yml's haproxy.cfg, with test timings: mode tcp, the PROXY
# v2 header to each relay, the least busy relay first, /readyz as the health check,
# and a connection that fails at connect tried again on the other relay.
CONFIG = """\
global
    maxconn 2000
defaults
    mode tcp
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    retries 3
    option redispatch
frontend smtp
    bind 127.0.0.1:{port}
    default_backend relays
frontend stats
    mode http
    bind 127.0.0.1:{stats_port}
    stats enable
    stats uri /stats
backend relays
    balance leastconn
    option httpchk GET /readyz
    http-check expect status 200
    default-server check inter 300ms fall 2 rise 1 send-proxy-v2
{servers}
"""


@contextlib.contextmanager
def haproxy(backends: list[Backend]) -> Iterator[HAProxy]:
    binary = require("haproxy", "REQUIRE_HAPROXY")
    with tempfile.TemporaryDirectory(prefix="relay-haproxy-") as name:
        directory = Path(name)
        port, stats_port = free_port(), free_port()
        servers = "\n".join(f"    server {b.name} 127.0.0.1:{b.smtp_port} "
                            f"port {b.http_port}" for b in backends)
        config = directory / "haproxy.cfg"
        config.write_text(CONFIG.format(port=port, stats_port=stats_port,
                                        servers=servers))
        with open(directory / "haproxy.log", "ab") as log:
            process = subprocess.Popen([binary, "-db", "-f", str(config)],
                                       stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        try:
            wait_for_port(port, process, "haproxy")
            yield HAProxy(port, stats_port, process, directory)
        finally:
            stop_process(process)
