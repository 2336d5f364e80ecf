"""Relay replicas behind HAProxy, as one `--relay-cmd` for bench.py (issue #12).

    python bench/bench.py --relay-cmd "python bench/replicas.py 2"

Reads the environment bench.py gives a relay (LISTEN_PORT, RELAY_PORT, LOG_FILE...),
and starts, all on 127.0.0.1:

- redis-server on a free port: RATE_LIMIT_STORAGE for every replica, with a per-minute
  limit too high to reach, so each message costs the Redis round trips a shared limit
  does (and each connection the shared lock-out's);
- N relays (`python smtp_relay.py`) on free ports, PROXY_PROTOCOL on, HAProxy trusted;
- haproxy on LISTEN_PORT: mode tcp, send-proxy-v2, balance leastconn, /readyz checks
  (as deploy/haproxy.cfg).

On SIGTERM it stops haproxy, then the relays (their drain), then Redis, and writes the
CPU seconds each process used to stderr (bench.py keeps it in the run's .out file) and
to $BENCH_REPLICAS_REPORT when that is set. Needs haproxy and redis-server installed.
Standard library only, like bench.py.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
START_SECONDS = 30.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process so far (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def wait_for(check: object, what: str) -> None:
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise SystemExit(f"replicas.py: {what} did not start")


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


HAPROXY_CONFIG = """\
global
    maxconn 4000
defaults
    mode tcp
    timeout connect 5s
    timeout client 120s
    timeout server 120s
    retries 3
    option redispatch
frontend smtp
    bind 127.0.0.1:{port}
    default_backend relays
backend relays
    balance leastconn
    option httpchk GET /readyz
    http-check expect status 200
    default-server check inter 2s fall 2 rise 1 send-proxy-v2
{servers}
"""


def main() -> int:
    replicas = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    env = dict(os.environ)
    listen_port = int(env["LISTEN_PORT"])
    log_file = env.get("LOG_FILE", "smtp-relay.log")
    directory = Path(tempfile.mkdtemp(prefix="bench-replicas-"))
    processes: list[tuple[str, subprocess.Popen]] = []
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        redis_port = free_port()
        redis = subprocess.Popen(
            [shutil.which("redis-server") or "redis-server", "--port", str(redis_port),
             "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(directory)], stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        processes.append(("redis", redis))
        wait_for(lambda: port_open(redis_port), "redis-server")
        backends = []
        for number in range(replicas):
            smtp_port, http_port = free_port(), free_port()
            log = f"{log_file}.r{number}"
            relay_env = {**env, "LISTEN_PORT": str(smtp_port), "HTTP_PORT": str(http_port),
                         "HTTP_HOST": "127.0.0.1", "PROXY_PROTOCOL": "true",
                         "PROXY_TRUSTED_NETWORKS": "127.0.0.1/32",
                         "RATE_LIMIT_STORAGE": f"redis://127.0.0.1:{redis_port}/0",
                         "RATE_LIMIT_PER_MINUTE": "100000000", "LOG_FILE": log}
            relay = subprocess.Popen([sys.executable, str(PROJECT / "smtp_relay.py")],
                                     cwd=PROJECT, env=relay_env, stdin=subprocess.DEVNULL)
            processes.append((f"relay{number}", relay))
            backends.append((number, smtp_port, http_port, Path(log)))
        for number, _, _, log_path in backends:
            wait_for(lambda p=log_path: p.exists() and " started " in p.read_text(
                errors="replace"), f"relay{number}")
        servers = "\n".join(f"    server r{n} 127.0.0.1:{smtp} port {http}"
                            for n, smtp, http, _ in backends)
        config = directory / "haproxy.cfg"
        config.write_text(HAPROXY_CONFIG.format(port=listen_port, servers=servers))
        haproxy = subprocess.Popen(
            [shutil.which("haproxy") or "/usr/sbin/haproxy", "-db", "-f", str(config)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        processes.insert(0, ("haproxy", haproxy))
        while not stopping and all(p.poll() is None for _, p in processes):
            time.sleep(0.1)
    finally:
        used = {name: cpu_seconds(process.pid) for name, process in processes}
        for _, process in processes:  # haproxy first, then the relays drain, Redis
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(60)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        shutil.rmtree(directory, ignore_errors=True)
        line = "replicas.py cpu_seconds " + " ".join(
            f"{name}={seconds:.2f}" for name, seconds in used.items())
        print(line, file=sys.stderr)
        report = os.environ.get("BENCH_REPLICAS_REPORT")
        if report:
            with open(report, "a", encoding="utf-8") as out:
                out.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
