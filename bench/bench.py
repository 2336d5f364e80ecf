"""Throughput, latency and memory benchmark for the SMTP relay (smtp_relay.py).

The script starts, all on 127.0.0.1:

* a fast SMTP sink (raw asyncio streams, in its own process) that accepts and
  counts every message, and a "slow" sink that waits 200 ms before the final
  250 after DATA;
* the relay as a subprocess, configured through its environment variables to
  forward to one of the sinks;
* a lean asyncio load generator (in this process) that opens N concurrent
  sessions and sends M messages per session, pipelining MAIL+RCPT+DATA when
  the server advertises PIPELINING.

For every message size and concurrency it measures the sink directly (the
ceiling) and the relay in front of the same sink, then prints a markdown
table.  A run passes its count check when the messages the sink accepted equal
the messages the client saw acknowledged; the script exits non-zero otherwise.

Usage, from the project root:

    python bench/bench.py            # full run, about 3-4 minutes
    python bench/bench.py --quick    # about a minute

Standard library only.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import ctypes
import json
import math
import os
import platform
import select
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"

SENDER_DOMAIN = "example.com"
RECIPIENT_DOMAIN = "example.org"
SENDER = f"bench@{SENDER_DOMAIN}"
RECIPIENT = f"sink@{RECIPIENT_DOMAIN}"
AUTH_USERNAME = "bench-user"
AUTH_PASSWORD = "bench-password"

SLOW_SINK_DELAY_MS = 200
SLOW_SINK_CONCURRENCY = 48
DEFAULT_DURATION_S = 10.0
QUICK_DURATION_S = 2.0
MAX_RUN_S = 300.0              # hard cap for one run in --messages mode
DRAIN_GRACE_S = 60.0           # time allowed after the deadline to finish
IO_TIMEOUT_S = 30.0            # one message transaction or session setup
RELAY_START_TIMEOUT_S = 20.0
PROCESS_STOP_TIMEOUT_S = 10.0
SINK_MAX_LIFETIME_S = 3 * 3600.0
SINK_MAX_SIZE = 100 * 1024 * 1024

CRLF = b"\r\n"
SINK_STATS_COMMAND = b"XSTATS"


# --------------------------------------------------------------------------
# Process helpers
# --------------------------------------------------------------------------

def die_with_parent() -> None:
    """In a child (preexec_fn): get SIGTERM if the bench process dies.

    Safe as a preexec_fn because this process starts no threads: asyncio.run
    has returned (and joined its executor) whenever a child is started.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def stop_process(proc: subprocess.Popen) -> None:
    """SIGTERM one process we started (by its PID), SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(PROCESS_STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(PROCESS_STOP_TIMEOUT_S)


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def port_accepts(port: int) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=0.5):
            return True
    except OSError:
        return False


def read_peak_rss_kib(pid: int) -> int | None:
    """VmHWM (peak resident set size) of a process, in KiB."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def read_cpu_seconds(pid: int) -> float | None:
    """User + system CPU time a process has used so far."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        ticks = int(fields[11]) + int(fields[12])
        return ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def tail_of_file(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


# --------------------------------------------------------------------------
# The sink: a minimal, fast ESMTP server on raw asyncio streams
# --------------------------------------------------------------------------

SINK_GREETING = b"220 bench-sink ESMTP\r\n"
SINK_EHLO_REPLY = (
    b"250-bench-sink\r\n250-PIPELINING\r\n250-8BITMIME\r\n"
    b"250-SIZE %d\r\n250 AUTH PLAIN LOGIN\r\n" % SINK_MAX_SIZE
)
REPLY_OK = b"250 2.0.0 Ok\r\n"
REPLY_QUEUED = b"250 2.0.0 Ok: queued\r\n"
REPLY_START_DATA = b"354 End data with <CR><LF>.<CR><LF>\r\n"
REPLY_NO_RECIPIENTS = b"503 5.5.1 No valid recipients\r\n"
REPLY_AUTH_OK = b"235 2.7.0 Authentication successful\r\n"
REPLY_BYE = b"221 2.0.0 Bye\r\n"
REPLY_UNKNOWN = b"502 5.5.2 Command not recognized\r\n"


class SinkStats:
    """Messages (and their unstuffed bytes) the sink answered 250 to."""

    __slots__ = ("bytes", "messages")

    def __init__(self) -> None:
        self.messages = 0
        self.bytes = 0

    def reply(self) -> bytes:
        return b"250 %d %d\r\n" % (self.messages, self.bytes)


def dot_unstuff(data_block: bytes) -> bytes:
    """Message content from a DATA block ending with '.<CRLF>'."""
    content = data_block[:-3]
    if content.startswith(b".."):
        content = content[1:]
    return content.replace(b"\r\n..", b"\r\n.")


class SinkInput:
    """Buffered reads of command lines and DATA blocks from one client.

    A DATA block is found by searching the buffer for CRLF.CRLF, not line by
    line, so long messages cost a few large reads; bytes the client pipelined
    after the block stay in the buffer for the next command.
    """

    READ_SIZE = 256 * 1024

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self.reader = reader
        self.buffer = bytearray()

    async def fill(self) -> None:
        chunk = await self.reader.read(self.READ_SIZE)
        if not chunk:
            raise ConnectionResetError("client closed the connection")
        self.buffer += chunk

    def take(self, length: int) -> bytes:
        taken = bytes(self.buffer[:length])
        del self.buffer[:length]
        return taken

    async def line(self) -> bytes:
        """The next line with its line ending; b'' when the client went away."""
        try:
            while (end := self.buffer.find(b"\n")) < 0:
                await self.fill()
        except ConnectionResetError:
            return b""
        return self.take(end + 1)

    async def data_block(self) -> bytes:
        """The DATA block up to and including the terminating '.<CRLF>'."""
        while len(self.buffer) < 3:
            await self.fill()
        if self.buffer.startswith(b".\r\n"):  # empty message
            return self.take(3)
        searched = 0
        while (end := self.buffer.find(b"\r\n.\r\n", searched)) < 0:
            searched = max(0, len(self.buffer) - 4)
            await self.fill()
        return self.take(end + 5)


async def receive_message(source: SinkInput, writer, stats: SinkStats,
                          delay_s: float) -> bytes:
    writer.write(REPLY_START_DATA)
    content = dot_unstuff(await source.data_block())
    if delay_s:
        await asyncio.sleep(delay_s)
    stats.messages += 1
    stats.bytes += len(content)
    return REPLY_QUEUED


async def accept_any_auth(source: SinkInput, writer, command_line: bytes) -> bytes:
    """AUTH PLAIN / LOGIN that accepts any credentials (if a relay logs in)."""
    words = command_line.split()
    mechanism = words[1].upper() if len(words) > 1 else b""
    if mechanism == b"PLAIN" and len(words) < 3:
        writer.write(b"334 \r\n")
        await source.line()
    elif mechanism == b"LOGIN":
        prompts = [b"334 UGFzc3dvcmQ6\r\n"]
        if len(words) < 3:
            prompts.insert(0, b"334 VXNlcm5hbWU6\r\n")
        for prompt in prompts:
            writer.write(prompt)
            await source.line()
    return REPLY_AUTH_OK


async def serve_sink_client(reader, writer, stats: SinkStats, delay_s: float) -> None:
    source = SinkInput(reader)
    recipients = 0
    writer.write(SINK_GREETING)
    try:
        while True:
            line = await source.line()
            if not line:
                break
            verb = line[:4].upper()
            if verb == b"MAIL":
                recipients = 0
                reply = REPLY_OK
            elif verb == b"RCPT":
                recipients += 1
                reply = REPLY_OK
            elif verb == b"DATA":
                if recipients:
                    reply = await receive_message(source, writer, stats, delay_s)
                else:
                    reply = REPLY_NO_RECIPIENTS
                recipients = 0
            elif verb == b"EHLO":
                reply = SINK_EHLO_REPLY
            elif verb in (b"HELO", b"NOOP"):
                reply = REPLY_OK
            elif verb == b"RSET":
                recipients = 0
                reply = REPLY_OK
            elif verb == b"AUTH":
                reply = await accept_any_auth(source, writer, line)
            elif verb == b"QUIT":
                writer.write(REPLY_BYE)
                break
            elif line.rstrip().upper() == SINK_STATS_COMMAND:
                reply = stats.reply()
            else:
                reply = REPLY_UNKNOWN
            writer.write(reply)
            if verb == b"DATA":
                await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def serve_sink(delay_s: float) -> None:
    stats = SinkStats()

    async def on_client(reader, writer):
        await serve_sink_client(reader, writer, stats, delay_s)

    server = await asyncio.start_server(on_client, LOOPBACK, 0, backlog=1024)
    port = server.sockets[0].getsockname()[1]
    print(port, flush=True)
    async with server:
        await asyncio.sleep(SINK_MAX_LIFETIME_S)


def run_sink_process(delay_ms: int) -> int:
    """Entry point of the sink child process (`bench.py --run-sink`)."""
    try:
        asyncio.run(serve_sink(delay_ms / 1000.0))
    except KeyboardInterrupt:
        pass
    return 0


class SinkProcess:
    """A sink running as a subprocess of this script; reports its counters."""

    def __init__(self, delay_ms: int) -> None:
        self.delay_ms = delay_ms
        self.proc: subprocess.Popen | None = None
        self.port = 0

    def start(self) -> SinkProcess:
        command = [sys.executable, str(Path(__file__).resolve()),
                   "--run-sink", "--sink-delay-ms", str(self.delay_ms)]
        self.proc = subprocess.Popen(
            command, stdout=subprocess.PIPE,
            preexec_fn=die_with_parent,  # noqa: PLW1509 (no threads here)
        )
        ready, _, _ = select.select([self.proc.stdout], [], [], 15)
        port_line = self.proc.stdout.readline() if ready else b""
        if not port_line.strip().isdigit():
            self.stop()
            raise RuntimeError("the sink process did not report its port")
        self.port = int(port_line)
        return self

    def received(self) -> tuple[int, int]:
        """(messages, bytes) the sink has accepted since it started."""
        with socket.create_connection((LOOPBACK, self.port), timeout=10) as sock:
            stream = sock.makefile("rwb")
            stream.readline()
            stream.write(SINK_STATS_COMMAND + CRLF)
            stream.flush()
            reply = stream.readline().split()
            stream.write(b"QUIT\r\n")
            stream.flush()
        return int(reply[1]), int(reply[2])

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc.stdout.close()


# --------------------------------------------------------------------------
# The relay under test
# --------------------------------------------------------------------------

@dataclass
class RelaySettings:
    command: list[str]
    log_dir: Path
    max_message_size: int
    log_level: str = "INFO"


class RelayProcess:
    """smtp_relay.py (or --relay-cmd) started on a free port in front of a sink."""

    def __init__(self, settings: RelaySettings, sink_port: int, name: str) -> None:
        self.settings = settings
        self.sink_port = sink_port
        self.port = free_loopback_port()
        self.output_path = settings.log_dir / f"{name}.out"
        self.log_path = settings.log_dir / f"{name}.log"
        self.proc: subprocess.Popen | None = None

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update({
            "LISTEN_HOST": LOOPBACK,
            "LISTEN_PORT": str(self.port),
            "SMTP_AUTH_USERNAME": AUTH_USERNAME,
            "SMTP_AUTH_PASSWORD": AUTH_PASSWORD,
            "ALLOWED_FROM_DOMAINS": SENDER_DOMAIN,
            "ALLOWED_TO_DOMAINS": RECIPIENT_DOMAIN,
            "RELAY_HOST": LOOPBACK,
            "RELAY_PORT": str(self.sink_port),
            "RELAY_USE_TLS": "false",
            "RELAY_USE_SSL": "false",
            "MAX_CONNECTIONS": "200",
            "LOG_LEVEL": self.settings.log_level,
            "LOG_FILE": str(self.log_path),
            "TIMEOUT": str(int(IO_TIMEOUT_S)),
            "MAX_MESSAGE_SIZE": str(self.settings.max_message_size),
        })
        return env

    def start(self) -> None:
        """Start the relay and wait until its port accepts connections."""
        with open(self.output_path, "wb") as output:
            self.proc = subprocess.Popen(
                self.settings.command, cwd=PROJECT_ROOT, env=self.environment(),
                stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent,  # noqa: PLW1509 (no threads here)
            )
        deadline = time.monotonic() + RELAY_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"relay exited with code {self.proc.returncode} at start")
            if port_accepts(self.port):
                return
            time.sleep(0.1)
        raise RuntimeError(
            f"relay port {self.port} did not accept within {RELAY_START_TIMEOUT_S:.0f} s")

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def diagnostics(self) -> str:
        parts = [tail_of_file(self.output_path), tail_of_file(self.log_path)]
        return "\n".join(part for part in parts if part)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)


# --------------------------------------------------------------------------
# The load generator
# --------------------------------------------------------------------------

@dataclass
class Target:
    port: int
    credentials: tuple[str, str] | None  # AUTH PLAIN when set


@dataclass
class LoadResult:
    acked: int = 0
    errors: int = 0
    sessions: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    first_error: str = ""
    elapsed_s: float = 0.0
    cpu_s: float = 0.0

    def record_error(self, description: str) -> None:
        self.errors += 1
        if not self.first_error:
            self.first_error = description


class Budget:
    """Decides whether another message may be started (deadline and/or count)."""

    def __init__(self, duration_s: float | None, messages: int | None) -> None:
        self.deadline = time.monotonic() + (duration_s or MAX_RUN_S)
        self.remaining = messages

    def has_time(self) -> bool:
        return time.monotonic() < self.deadline

    def take_message(self) -> bool:
        if not self.has_time():
            return False
        if self.remaining is None:
            return True
        if self.remaining <= 0:
            return False
        self.remaining -= 1
        return True


def build_message(size: int) -> bytes:
    """An RFC 5322 message of `size` bytes (one more if that would split CRLF)."""
    headers = (
        f"From: Bench <{SENDER}>\r\n"
        f"To: Sink <{RECIPIENT}>\r\n"
        "Subject: smtp-relay benchmark message\r\n"
        "Date: Thu, 01 Jan 2026 00:00:00 +0000\r\n"
        f"Message-ID: <bench-{size}@{SENDER_DOMAIN}>\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n"
        "\r\n"
    ).encode("ascii")
    filler_line = b"The quick brown fox jumps over the lazy dog. 0123456789 abcdefghij\r\n"
    dotted_line = b".A line that starts with a dot, to exercise dot-stuffing.\r\n"
    message = bytearray(headers)
    line_number = 0
    while True:
        line_number += 1
        line = dotted_line if line_number % 40 == 0 else filler_line
        if len(message) + len(line) > size:
            break
        message += line
    padding = size - len(message)
    if padding > 0:
        message += b"x" * max(padding - 2, 0) + CRLF
    return bytes(message)


def dot_stuff(message: bytes) -> bytes:
    """The DATA block for a message ending with CRLF, terminator included."""
    stuffed = message.replace(b"\r\n.", b"\r\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    return stuffed + b".\r\n"


async def read_reply(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One (possibly multi-line) SMTP reply: (code, all lines)."""
    lines = b""
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("connection closed by server")
        lines += line
        if line[3:4] != b"-":
            return int(line[:3]), lines


async def expect(reader, wanted: int, step: str) -> bytes:
    code, lines = await read_reply(reader)
    if code != wanted:
        raise SmtpError(f"{step}: {lines.decode('ascii', 'replace').strip()}")
    return lines


class SmtpError(Exception):
    """The server answered with an unexpected reply code."""


def parse_extensions(ehlo_reply: bytes) -> set[str]:
    keywords = set()
    for line in ehlo_reply.split(CRLF)[1:]:
        words = line[4:].split()
        if words:
            keywords.add(words[0].decode("ascii", "replace").upper())
    return keywords


async def authenticate(reader, writer, credentials: tuple[str, str]) -> None:
    username, password = credentials
    token = base64.b64encode(f"\0{username}\0{password}".encode())
    writer.write(b"AUTH PLAIN " + token + CRLF)
    code, lines = await read_reply(reader)
    if code == 334:  # server wants the credentials on their own line
        writer.write(token + CRLF)
        code, lines = await read_reply(reader)
    if code != 235:
        raise SmtpError(f"AUTH PLAIN: {lines.decode('ascii', 'replace').strip()}")


async def open_session(target: Target):
    """Connect, EHLO, AUTH; return (reader, writer, uses_pipelining)."""
    reader, writer = await asyncio.open_connection(LOOPBACK, target.port)
    try:
        await expect(reader, 220, "greeting")
        writer.write(b"EHLO bench-client.example.com\r\n")
        extensions = parse_extensions(await expect(reader, 250, "EHLO"))
        if target.credentials is not None:
            if "AUTH" not in extensions:
                raise SmtpError("server did not advertise AUTH after EHLO")
            await authenticate(reader, writer, target.credentials)
    except BaseException:
        writer.close()
        raise
    return reader, writer, "PIPELINING" in extensions


ENVELOPE_COMMANDS = (
    f"MAIL FROM:<{SENDER}>\r\n".encode(),
    f"RCPT TO:<{RECIPIENT}>\r\n".encode(),
    b"DATA\r\n",
)


async def send_envelope(reader, writer, pipelining: bool) -> list[int]:
    """MAIL, RCPT, DATA: pipelined in one write, or one at a time."""
    if pipelining:
        writer.write(b"".join(ENVELOPE_COMMANDS))
        return [(await read_reply(reader))[0] for _ in ENVELOPE_COMMANDS]
    codes = []
    for command, wanted in zip(ENVELOPE_COMMANDS, (250, 250, 354)):
        writer.write(command)
        code, _ = await read_reply(reader)
        codes.append(code)
        if code != wanted:
            break
    return codes


async def send_message(reader, writer, pipelining: bool, data_block: bytes) -> str:
    """One transaction; returns '' on a 250 after DATA, else what went wrong."""
    codes = await send_envelope(reader, writer, pipelining)
    if codes[-1] != 354:
        writer.write(b"RSET\r\n")
        await read_reply(reader)
        return f"envelope rejected: {codes}"
    writer.write(data_block)
    await writer.drain()
    final_code, lines = await read_reply(reader)
    if final_code != 250 or codes[:2] != [250, 250]:
        return f"message rejected: {codes} {lines.decode('ascii', 'replace').strip()}"
    return ""


async def within_io_timeout(awaitable):
    """Await with IO_TIMEOUT_S; asyncio.timeout (3.11+) avoids a task per call."""
    if hasattr(asyncio, "timeout"):
        async with asyncio.timeout(IO_TIMEOUT_S):
            return await awaitable
    return await asyncio.wait_for(awaitable, IO_TIMEOUT_S)


async def run_session(target, data_block, per_session, budget, result) -> None:
    reader, writer, pipelining = await within_io_timeout(open_session(target))
    result.sessions += 1
    try:
        for _ in range(per_session):
            if not budget.take_message():
                break
            started = time.perf_counter()
            problem = await within_io_timeout(
                send_message(reader, writer, pipelining, data_block))
            if problem:
                result.record_error(problem)
            else:
                result.acked += 1
                result.latencies_ms.append((time.perf_counter() - started) * 1000.0)
        writer.write(b"QUIT\r\n")
        await within_io_timeout(read_reply(reader))
    finally:
        writer.close()


async def run_worker(target, data_block, per_session, budget, result) -> None:
    """One concurrent client: sessions back to back until the budget ends."""
    while budget.has_time() and budget.remaining != 0:
        try:
            await run_session(target, data_block, per_session, budget, result)
        except (OSError, TimeoutError, SmtpError, ValueError) as error:
            result.record_error(f"{type(error).__name__}: {error}")
            await asyncio.sleep(0.05)


async def generate_load(target, data_block, concurrency, per_session,
                        duration_s, messages) -> LoadResult:
    result = LoadResult()
    budget = Budget(duration_s, messages)
    started, cpu_started = time.perf_counter(), time.process_time()
    workers = [run_worker(target, data_block, per_session, budget, result)
               for _ in range(concurrency)]
    time_limit = (duration_s or MAX_RUN_S) + DRAIN_GRACE_S
    try:
        await asyncio.wait_for(asyncio.gather(*workers), time_limit)
    except TimeoutError:
        result.record_error(f"run did not finish within {time_limit:.0f} s")
    result.elapsed_s = time.perf_counter() - started
    result.cpu_s = time.process_time() - cpu_started
    return result


def percentile(sorted_values: list[float], percent: float) -> float | None:
    if not sorted_values:
        return None
    rank = math.ceil(percent / 100.0 * len(sorted_values))
    return sorted_values[min(len(sorted_values), max(rank, 1)) - 1]


# --------------------------------------------------------------------------
# Runs and results
# --------------------------------------------------------------------------

@dataclass
class Case:
    via_relay: bool
    slow_sink: bool
    size: int
    concurrency: int

    @property
    def label(self) -> str:
        target = "relay (R)" if self.via_relay else "direct (L)"
        return target + (f", {SLOW_SINK_DELAY_MS} ms sink" if self.slow_sink else "")


@dataclass
class Row:
    target: str
    via_relay: bool
    slow_sink: bool
    size: int
    concurrency: int
    acked: int = 0
    errors: int = 0
    sessions: int = 0
    msg_per_s: float = 0.0
    p50_ms: float | None = None
    p99_ms: float | None = None
    sink_received: int | None = None
    sink_bytes: int | None = None
    count_ok: bool = False
    relay_peak_rss_kib: int | None = None
    relay_cpu_percent: float | None = None
    generator_cpu_percent: float | None = None
    ratio_to_direct: float | None = None
    elapsed_s: float = 0.0
    note: str = ""


@dataclass
class RunOptions:
    messages_per_session: int
    duration_s: float | None
    messages: int | None


def fill_from_load(row: Row, result: LoadResult) -> None:
    latencies = sorted(result.latencies_ms)
    row.acked, row.errors, row.sessions = result.acked, result.errors, result.sessions
    row.elapsed_s = result.elapsed_s
    row.msg_per_s = result.acked / result.elapsed_s if result.elapsed_s else 0.0
    row.p50_ms, row.p99_ms = percentile(latencies, 50), percentile(latencies, 99)
    row.generator_cpu_percent = 100.0 * result.cpu_s / result.elapsed_s if result.elapsed_s else None
    if result.first_error:
        row.note = result.first_error


def measure(row: Row, sink: SinkProcess, target: Target, data_block: bytes,
            options: RunOptions, relay: RelayProcess | None = None) -> None:
    """Drive load at the target and fill the row, including the count check."""
    received_before, bytes_before = sink.received()
    cpu_before = read_cpu_seconds(relay.proc.pid) if relay else None
    result = asyncio.run(generate_load(
        target, data_block, row.concurrency, options.messages_per_session,
        options.duration_s, options.messages))
    fill_from_load(row, result)
    received_after, bytes_after = sink.received()
    row.sink_received = received_after - received_before
    row.sink_bytes = bytes_after - bytes_before
    row.count_ok = row.sink_received == row.acked and row.acked > 0
    if relay is not None:
        row.relay_peak_rss_kib = read_peak_rss_kib(relay.proc.pid)
        cpu_after = read_cpu_seconds(relay.proc.pid)
        if cpu_before is not None and cpu_after is not None and row.elapsed_s:
            row.relay_cpu_percent = 100.0 * (cpu_after - cpu_before) / row.elapsed_s
        if not relay.is_running():
            row.count_ok = False
            row.note = f"relay died during the run (code {relay.proc.returncode})"


def run_direct(case: Case, sink: SinkProcess, data_block: bytes,
               options: RunOptions) -> Row:
    """Load straight at the sink; also checks the bytes it got (self-test)."""
    row = Row(case.label, False, case.slow_sink, case.size, case.concurrency)
    measure(row, sink, Target(sink.port, None), data_block, options)
    expected_bytes = row.acked * len(dot_unstuff(data_block))
    if row.sink_bytes != expected_bytes:
        row.count_ok = False
        row.note = f"sink got {row.sink_bytes} bytes, expected {expected_bytes}"
    return row


def run_via_relay(case: Case, sink: SinkProcess, data_block: bytes,
                  options: RunOptions, settings: RelaySettings) -> Row:
    row = Row(case.label, True, case.slow_sink, case.size, case.concurrency)
    name = f"relay-{case.size}-{case.concurrency}{'-slow' if case.slow_sink else ''}"
    relay = RelayProcess(settings, sink.port, name)
    try:
        relay.start()
        target = Target(relay.port, (AUTH_USERNAME, AUTH_PASSWORD))
        measure(row, sink, target, data_block, options, relay)
    except RuntimeError as error:
        row.note = str(error)
        print(f"  {error}\n{relay.diagnostics()}", file=sys.stderr)
    finally:
        relay.stop()
    if row.errors and not row.count_ok:
        print(relay.diagnostics(), file=sys.stderr)
    return row


def planned_cases(sizes, concurrencies, include_slow: bool) -> list[Case]:
    cases = []
    for size in sizes:
        for concurrency in concurrencies:
            cases.append(Case(False, False, size, concurrency))
            cases.append(Case(True, False, size, concurrency))
    if include_slow:
        for size in sizes:
            cases.append(Case(False, True, size, SLOW_SINK_CONCURRENCY))
            cases.append(Case(True, True, size, SLOW_SINK_CONCURRENCY))
    return cases


def add_ratios(rows: list[Row]) -> None:
    """relay msg/s divided by direct msg/s for the same size, conc and sink."""
    direct = {(r.size, r.concurrency, r.slow_sink): r.msg_per_s
              for r in rows if not r.via_relay}
    for row in rows:
        baseline = direct.get((row.size, row.concurrency, row.slow_sink))
        if row.via_relay and baseline and row.acked:
            row.ratio_to_direct = row.msg_per_s / baseline


# --------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------

TABLE_HEADER = ("target", "size", "conc", "msg/s", "p50 ms", "p99 ms", "errors",
                "sink / acked", "relay peak RSS", "relay CPU", "gen CPU",
                "relay/direct")


def human_size(size: int) -> str:
    if size >= 1024 and size % 1024 == 0:
        return f"{size // 1024} KiB"
    return f"{size} B"


def optional(value: float | None, template: str) -> str:
    return "-" if value is None else template.format(value)


def table_cells(row: Row) -> list[str]:
    verdict = "ok" if row.count_ok else "FAIL"
    peak_rss = row.relay_peak_rss_kib
    rss = "-" if peak_rss is None else f"{peak_rss / 1024:.1f} MiB"
    return [
        row.target, human_size(row.size), str(row.concurrency),
        f"{row.msg_per_s:.0f}", optional(row.p50_ms, "{:.1f}"),
        optional(row.p99_ms, "{:.1f}"), str(row.errors),
        f"{optional(row.sink_received, '{}')} / {row.acked} {verdict}",
        rss, optional(row.relay_cpu_percent, "{:.0f}%"),
        optional(row.generator_cpu_percent, "{:.0f}%"),
        optional(row.ratio_to_direct, "{:.2f}"),
    ]


def markdown_table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(TABLE_HEADER) + " |",
             "|" + "|".join("---" for _ in TABLE_HEADER) + "|"]
    lines += ["| " + " | ".join(table_cells(row)) + " |" for row in rows]
    return "\n".join(lines)


def notes(rows: list[Row]) -> str:
    return "\n".join(
        f"- {row.target} {human_size(row.size)} conc {row.concurrency}: {row.note}"
        for row in rows if row.note)


def write_json(path: str, rows: list[Row], args: argparse.Namespace) -> None:
    report = {
        "machine": {"python": sys.version.split()[0], "cpus": os.cpu_count(),
                    "platform": platform.platform()},
        "options": {key: value for key, value in vars(args).items()
                    if not key.startswith("run_sink") and key != "sink_delay_ms"},
        "rows": [asdict(row) for row in rows],
    }
    Path(path).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------

def int_list(text: str) -> list[int]:
    values = [int(part) for part in text.split(",") if part.strip()]
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError("expected a comma list of positive integers")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark smtp_relay.py against a fast local SMTP sink.")
    parser.add_argument("--sizes", type=int_list, default=[2048, 102400],
                        help="message sizes in bytes (default 2048,102400)")
    parser.add_argument("--concs", type=int_list, default=[1, 10, 48],
                        help="concurrent sessions (default 1,10,48)")
    parser.add_argument("--messages-per-session", type=int, default=10,
                        help="messages sent in one SMTP session (default 10)")
    amount = parser.add_mutually_exclusive_group()
    amount.add_argument("--duration", type=float,
                        help=f"seconds of load per run (default {DEFAULT_DURATION_S:g},"
                             f" {QUICK_DURATION_S:g} with --quick)")
    amount.add_argument("--messages", type=int,
                        help="messages per run instead of a duration")
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_DURATION_S:g} s per run: about a minute in all")
    parser.add_argument("--no-slow", action="store_true",
                        help=f"skip the runs against the {SLOW_SINK_DELAY_MS} ms slow sink")
    parser.add_argument("--relay-cmd",
                        default=shlex.join([sys.executable, "smtp_relay.py"]),
                        help="command that starts the relay, run in the project root"
                             " (default: this Python with smtp_relay.py)")
    parser.add_argument("--log-level", default="INFO",
                        help="the relay's LOG_LEVEL (default INFO, as operators run it:"
                             " one line per delivered message)")
    parser.add_argument("--json", metavar="PATH", help="also write results as JSON")
    parser.add_argument("--run-sink", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--sink-delay-ms", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.messages is None and args.duration is None:
        args.duration = QUICK_DURATION_S if args.quick else DEFAULT_DURATION_S
    if args.messages_per_session <= 0 or (args.messages is not None and args.messages <= 0):
        parser.error("--messages-per-session and --messages must be positive")
    if args.duration is not None and not 0 < args.duration <= MAX_RUN_S:
        parser.error(f"--duration must be in (0, {MAX_RUN_S:g}]")
    return args


def run_all(args: argparse.Namespace, log_dir: Path) -> list[Row]:
    cases = planned_cases(args.sizes, args.concs, not args.no_slow)
    options = RunOptions(args.messages_per_session, args.duration, args.messages)
    settings = RelaySettings(shlex.split(args.relay_cmd), log_dir,
                             max(10 * 1024 * 1024, 4 * max(args.sizes)), args.log_level)
    data_blocks = {size: dot_stuff(build_message(size)) for size in args.sizes}
    sinks = {False: SinkProcess(0).start()}
    rows: list[Row] = []
    try:
        if not args.no_slow:
            sinks[True] = SinkProcess(SLOW_SINK_DELAY_MS).start()
        relay_broken = False
        for number, case in enumerate(cases, 1):
            print(f"[{number}/{len(cases)}] {case.label}, {human_size(case.size)},"
                  f" conc {case.concurrency}", file=sys.stderr, flush=True)
            sink, block = sinks[case.slow_sink], data_blocks[case.size]
            if not case.via_relay:
                rows.append(run_direct(case, sink, block, options))
            elif relay_broken:
                rows.append(Row(case.label, True, case.slow_sink, case.size,
                                case.concurrency, note="skipped: relay did not start"))
            else:
                rows.append(run_via_relay(case, sink, block, options, settings))
                relay_broken = rows[-1].note.startswith("relay ") and not rows[-1].acked
    finally:
        for sink in sinks.values():
            sink.stop()
    add_ratios(rows)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.run_sink:
        return run_sink_process(args.sink_delay_ms)
    with tempfile.TemporaryDirectory(prefix="smtp-relay-bench-") as log_dir:
        rows = run_all(args, Path(log_dir))
    print(markdown_table(rows))
    if any(row.note for row in rows):
        print("\nNotes:\n" + notes(rows))
    if args.json:
        write_json(args.json, rows, args)
    failed = [row for row in rows if not row.count_ok]
    if failed:
        print(f"\nFAILED: {len(failed)} run(s) failed the count check or did not run.",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
