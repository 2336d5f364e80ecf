"""The delivery process: queued deliveries run in a child process of their own.

Why a process: the relay's event loop accepts mail, and in `queue` mode every message
is also delivered, in the same interpreter. One interpreter runs Python on one core at
a time, so each delivery (smtplib's conversation with the upstream, the outcome, its
log line) delayed the next client's reply. In a child the deliveries run on the other
core; the acceptor keeps the store, the claims and the records.

The split: the parent's queue workers claim messages and record outcomes exactly as
before; only `Deliverer.deliver(claim)` (one try along the recipients' routes, the
outcome table, the log lines) runs in the child. `DeliveryProcess` is the parent's
side: it has the same `deliver` as a `Deliverer`.

The pipe between them is a socket pair carrying frames (a 4-byte length, then a
pickle; both ends are this program). Parent to child: the Config first, then
("deliver", n, claim), ("reload",). Child to parent: ("done", n, Delivered) or
("error", n, text), each carrying the log lines and metric updates made since the
last frame, and ("flush",) frames with only those. The child writes no file: its log
lines are written by the parent's log handler (one writer, so LOG_FILE's rotation
holds), and its metric updates land in the parent's /metrics.

Lifetimes: the child ends when the pipe closes (the parent stopped, or died: a parent
killed with -9 takes its deliveries' unrecorded outcomes with it, and they are tried
again after the restart, as for any crash). It ignores SIGINT and SIGTERM, which a
terminal or a service manager sends to the whole group: the parent decides when the
deliveries in flight are over. A child that dies is started again; the deliveries it
held fail, and their claims return to the queue when their lease ends.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import logging
import os
import pickle
import socket
import struct
import subprocess
import sys
from typing import TYPE_CHECKING, Any, cast

from relay.delivery import DeliveryFailed
from relay.observability import log, log_event, write_formatted_lines

if TYPE_CHECKING:
    from relay.delivery import Delivered
    from relay.observability import Metrics
    from relay.settings import Config
    from relay.store import Claim

_LENGTH = struct.Struct("!I")
# The child's first statements ignore the signals meant for the parent (SIGHUP comes
# as a "reload" frame), before anything slow is imported, and lower its CPU priority:
# when the cores are busy, a client waiting for its 250 comes before a delivery that
# can wait a few milliseconds (at 100 KB and 10 clients, 8 % more accepted; the queue
# drained 0.4 s later). Where setpriority is not allowed (a seccomp filter) it runs as
# it is.
_CHILD = ("import os, signal, sys\n"
          "for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):\n"
          "    signal.signal(number, signal.SIG_IGN)\n"
          "try:\n"
          "    os.nice(10)\n"
          "except OSError:\n"
          "    pass\n"
          "from relay.worker import main\n"
          "sys.exit(main(sys.argv[1:]))\n")
PROJECT_DIRECTORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


async def _read_frame(reader: asyncio.StreamReader) -> Any:
    header = await reader.readexactly(_LENGTH.size)
    return pickle.loads(await reader.readexactly(_LENGTH.unpack(header)[0]))


def _frame(payload: Any) -> bytes:
    data = pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(data)) + data


# ---------------------------------------------------------------------------------------
# The parent's side
# ---------------------------------------------------------------------------------------

class DeliveryProcess:
    """A `DeliveryAgent` whose tries run in the child process (started by start(), and
    again if it dies)."""

    RESTART_SECONDS = 1.0  # between a child's death and the next start
    # Gauges the child moves up and down: what a dead child had added is taken back.
    _GAUGES = frozenset({"upstream_sessions_open"})

    def __init__(self, config: Config, metrics: Metrics):
        self.config = config
        self.metrics = metrics
        self._process: subprocess.Popen[bytes] | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._pending: dict[int, asyncio.Future[Delivered]] = {}  # by request number
        self._numbers = itertools.count(1)
        self._gauge_net: dict[tuple[str, tuple[str, ...]], float] = {}
        self._bad_metrics: set[str] = set()  # updates that failed (logged once each)
        self._started = asyncio.Event()  # a child is up (set while one runs)
        self._closing = False

    def start(self) -> None:
        """Start the child, and the task that reads its frames and restarts it."""
        self._reader_task = asyncio.create_task(self._supervise())

    async def _spawn(self) -> None:
        ours, theirs = socket.socketpair()
        try:
            environment = dict(os.environ)
            environment["PYTHONPATH"] = os.pathsep.join(
                [PROJECT_DIRECTORY, *filter(None, [environment.get("PYTHONPATH")])])
            # Its own process group: a terminal's Ctrl-C is for the parent, which
            # decides when deliveries end (module docstring).
            self._process = await asyncio.to_thread(
                subprocess.Popen, [sys.executable, "-c", _CHILD, str(theirs.fileno())],
                pass_fds=(theirs.fileno(),), env=environment, close_fds=True,
                process_group=0)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._reader, self._writer = await asyncio.open_unix_connection(sock=ours)
        self._writer.write(_frame(self.config))
        self._started.set()

    async def _supervise(self) -> None:
        while not self.closing():
            try:
                await self._spawn()
            except OSError as error:
                log_event(logging.ERROR, "delivery-process-failed", reason=str(error))
                await asyncio.sleep(self.RESTART_SECONDS)
                continue
            assert self._reader is not None  # _spawn set it
            try:
                while True:
                    self._handle(await _read_frame(self._reader))
            except (asyncio.IncompleteReadError, ConnectionError, OSError):
                pass
            except Exception:  # noqa: BLE001 (a bad frame: the child is restarted)
                log.exception("unreadable frame from the delivery process")
            self._started.clear()
            if self._writer is not None:  # on the loop: a StreamWriter is not threadsafe
                self._writer.close()
            code = await asyncio.to_thread(self._reap)
            lost = len(self._pending)
            self._lost(code)
            if self.closing():
                return
            log_event(logging.ERROR, "delivery-process-died", exit=code, lost=lost)
            await asyncio.sleep(self.RESTART_SECONDS)

    def closing(self) -> bool:
        """close() has begun (a method: type checkers would take the attribute for a
        constant inside _supervise's loop)."""
        return self._closing

    def _reap(self) -> int | None:
        process = self._process
        if process is None:
            return None
        try:
            return process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            return process.wait()

    def _lost(self, code: int | None) -> None:
        """The child is gone: its deliveries in flight fail, its gauges go back."""
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(DeliveryFailed(
                    f"the delivery process ended (exit status {code})"))
        for (name, labels), net in self._gauge_net.items():
            if net:
                self._apply(name, labels, "dec", net)
        self._gauge_net.clear()

    def _handle(self, frame: tuple[Any, ...]) -> None:
        kind = frame[0]
        lines, updates = frame[-2], frame[-1]
        if lines:
            write_formatted_lines(lines)
        for name, labels, method, value in updates:
            self._apply(name, labels, method, value)
            if name in self._GAUGES and method in ("inc", "dec"):
                key = (name, labels)
                self._gauge_net[key] = self._gauge_net.get(key, 0.0) + (
                    value if method == "inc" else -value)
        if kind in ("done", "error"):
            future = self._pending.pop(frame[1], None)
            if future is not None and not future.done():
                if kind == "done":
                    future.set_result(frame[2])
                else:
                    future.set_exception(DeliveryFailed(frame[2]))

    def _apply(self, name: str, labels: tuple[str, ...], method: str, value: float) -> None:
        """One of the child's metric updates, on our Metrics. One that does not fit
        (a bug) is logged once per metric, and never costs the child its life."""
        try:
            metric = getattr(self.metrics, name)
            if labels:
                metric = self.metrics.labelled(metric, *labels)
            if method in ("inc", "dec", "set", "observe"):
                getattr(metric, method)(value)
        except Exception:  # noqa: BLE001
            if name not in self._bad_metrics:
                self._bad_metrics.add(name)
                log.exception("the delivery process's update of metric %s", name)

    async def deliver(self, claim: Claim) -> Delivered:
        await self._started.wait()
        assert self._writer is not None  # _spawn set it
        number = next(self._numbers)
        future: asyncio.Future[Delivered] = asyncio.get_running_loop().create_future()
        self._pending[number] = future
        self._writer.write(_frame(("deliver", number, claim)))
        try:
            return await future
        finally:
            self._pending.pop(number, None)

    def reload(self) -> None:
        if self._writer is not None and self._started.is_set():
            self._writer.write(_frame(("reload",)))

    async def close(self) -> None:
        """Close the pipe (the child leaves at once) and wait for it to exit."""
        self._closing = True
        if self._writer is not None:
            self._writer.close()
        if self._reader_task is not None:
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(self._reader_task, timeout=10)


# ---------------------------------------------------------------------------------------
# The child's side
# ---------------------------------------------------------------------------------------

class _Outbox:
    """What the child has to tell the parent besides results: formatted log lines and
    metric updates, sent with the next frame (or a flush)."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.updates: list[tuple[str, tuple[str, ...], str, float]] = []

    def take(self) -> tuple[list[str], list[tuple[str, tuple[str, ...], str, float]]]:
        lines, updates = self.lines, self.updates
        self.lines, self.updates = [], []
        return lines, updates


class _ShippedLines(logging.Handler):
    """The child's log handler: lines formatted here, written by the parent."""

    def __init__(self, outbox: _Outbox):
        super().__init__()
        self.outbox = outbox

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.outbox.lines.append(self.format(record) + "\n")
        except Exception:  # noqa: BLE001 (a logging failure must never break a delivery)
            self.handleError(record)


class _RecordedMetric:
    """Stands for one of Metrics' attributes: inc/dec/set/observe are recorded."""

    def __init__(self, outbox: _Outbox, name: str, labels: tuple[str, ...] = ()):
        self.outbox, self.name, self.labels_ = outbox, name, labels

    def labels(self, *values: str) -> _RecordedMetric:
        return _RecordedMetric(self.outbox, self.name, tuple(map(str, values)))

    def _record(self, method: str, value: float) -> None:
        self.outbox.updates.append((self.name, self.labels_, method, float(value)))

    def inc(self, amount: float = 1) -> None:
        self._record("inc", amount)

    def dec(self, amount: float = 1) -> None:
        self._record("dec", amount)

    def set(self, value: float) -> None:
        self._record("set", value)

    def observe(self, value: float) -> None:
        self._record("observe", value)


class _RecordedMetrics:
    """The child's `Metrics`: every update goes to the parent's."""

    def __init__(self, outbox: _Outbox):
        self._outbox = outbox

    def __getattr__(self, name: str) -> _RecordedMetric:
        return _RecordedMetric(self._outbox, name)


async def _serve_parent(fd: int) -> None:
    from relay.delivery import Deliverer
    from relay.observability import install_root_handler
    from relay.upstream import UpstreamPool

    reader, writer = await asyncio.open_unix_connection(sock=socket.socket(fileno=fd))
    config: Config = await _read_frame(reader)
    outbox = _Outbox()
    install_root_handler(_ShippedLines(outbox), config)
    metrics = cast("Metrics", _RecordedMetrics(outbox))
    executor = concurrent.futures.ThreadPoolExecutor(
        max_workers=config.queue_workers + 4, thread_name_prefix="upstream")
    deliverer = Deliverer(config, UpstreamPool(config, executor, metrics), metrics)
    running: set[asyncio.Task[None]] = set()

    def send(*frame: Any) -> None:
        writer.write(_frame((*frame, *outbox.take())))

    async def deliver(number: int, claim: Claim) -> None:
        try:
            delivered = await deliverer.deliver(claim)
        except Exception as error:  # noqa: BLE001 (the parent logs it)
            log.exception("unexpected error delivering %s", claim.id)
            send("error", number, f"{type(error).__name__}: {error}")
        else:
            send("done", number, delivered)

    async def flush_now_and_then() -> None:
        while True:
            await asyncio.sleep(0.2)
            if outbox.lines or outbox.updates:
                send("flush")

    flusher = asyncio.create_task(flush_now_and_then())
    try:
        while True:
            frame = await _read_frame(reader)
            if frame[0] == "deliver":
                task = asyncio.create_task(deliver(frame[1], frame[2]))
                running.add(task)
                task.add_done_callback(running.discard)
            elif frame[0] == "reload":
                deliverer.reload()
    except (asyncio.IncompleteReadError, ConnectionError, OSError):
        pass  # the parent closed the pipe, or died: nobody is left to record outcomes
    flusher.cancel()
    for task in running:
        task.cancel()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(deliverer.close(), timeout=2)
    executor.shutdown(wait=False, cancel_futures=True)


def main(argv: list[str]) -> int:
    """The child's entry (see _CHILD): started by DeliveryProcess, never by hand."""
    import uvloop
    uvloop.run(_serve_parent(int(argv[0])))
    return 0


