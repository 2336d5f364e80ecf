"""The upstream side: one authenticated smtplib session (UpstreamConnection), the pool
that keeps them for reuse (UpstreamPool), and the Forwarder that speaks MAIL, RCPT and
DATA upstream for one client transaction at a time.

smtplib blocks, so every upstream call runs in a worker thread; the event loop never
waits on the upstream. The handshake steps (connect, EHLO, STARTTLS, AUTH) are defined
once here and used by the pool, /readyz and `check`.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import fcntl
import queue
import select
import smtplib
import socket
import ssl
import struct
import termios
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from relay import replies
from relay.observability import log
from relay.policy import one_line
from relay.routes import (
    AttemptInfo,
    Outcomes,
    SmartHost,
    default_destination,
)
from relay.settings import host_label, upstream_tls_context

if TYPE_CHECKING:
    from relay.observability import Metrics
    from relay.protocol import RelaySession
    from relay.settings import Config


_UPSTREAM_REPLIES = {"451 4.4.1": replies.UPSTREAM_UNAVAILABLE,
                     "451 4.7.0": replies.UPSTREAM_CREDENTIALS,
                     "451 4.4.2": replies.UPSTREAM_DROPPED}


class UpstreamError(Exception):
    """The upstream could not be reached or dropped us. `kind` and `reply` are for the
    client."""

    def __init__(self, reason: str, reply: str = "451 4.4.1"):
        super().__init__(reason)
        self.reply_key = reply
        self.kind = _UPSTREAM_REPLIES[reply]
        self.detail = one_line(reason)[:200]
        self.reply = self.kind.format(detail=self.detail)


Reply = tuple[int, str]


def reply_text(message: bytes | str) -> str:
    if isinstance(message, bytes):
        message = message.decode("utf-8", "replace")
    return one_line(" ".join(message.split("\n"))).strip()[:400]


def final_reply(code: int) -> bool:
    """A completion reply (2xx, 4xx, 5xx) other than 421 (the upstream is closing)."""
    return code != 421 and (200 <= code < 300 or 400 <= code < 600)


# The data goes upstream in pieces, each allowed TIMEOUT to make progress: a large
# message to a slow upstream may take longer in all. A kernel send buffer of its own
# size would let the upload "finish" long before the upstream has read it, so it is
# kept small, and the reply after the final dot is awaited only once the upstream has
# taken what the kernel still held (Linux tells: TIOCOUTQ), again TIMEOUT per progress.
_DATA_CHUNK = 64 * 1024


_UPSTREAM_SEND_BUFFER = 256 * 1024


_OUTQ = getattr(termios, "TIOCOUTQ", None)


def _unacknowledged(sock: socket.socket) -> int:
    """Bytes sent on `sock` that the peer has not acknowledged yet (0 when unknown)."""
    if _OUTQ is None:
        return 0
    try:
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), _OUTQ, b"\0" * 4))[0]
    except (OSError, ValueError):
        return 0


class Handshake:
    """The steps that open an upstream session, defined once: connect (and the banner),
    EHLO, STARTTLS (required when RELAY_USE_TLS), AUTH (when RELAY_USERNAME). The pool
    runs them all (UpstreamConnection.open), /readyz names them, and `check` runs them
    one at a time to say which failed. Each step blocks, and raises smtplib's or the
    socket's own errors: the caller decides how to tell them."""

    def __init__(self, config: Config, tls_context: ssl.SSLContext | None):
        self.config = config
        self.tls_context = tls_context

    def steps(self) -> list[str]:
        """The steps these settings take, by name."""
        return ["connect", "EHLO"] + (["STARTTLS"] if self.config.relay_use_tls
                                      else []) + (["AUTH"] if self.config.relay_username
                                                  else [])

    def connect(self, timeout: float | None = None) -> tuple[smtplib.SMTP, int, str]:
        """TCP (and TLS, with RELAY_USE_SSL) and the banner: (session, code, text).
        `timeout`: for the connect and banner (failover's budget), else TIMEOUT."""
        config = self.config
        timeout = config.timeout if timeout is None else timeout
        smtp: smtplib.SMTP
        if config.relay_use_ssl:
            smtp = smtplib.SMTP_SSL(timeout=timeout, context=self.tls_context,
                                    local_hostname=config.smtp_hostname)
        else:
            smtp = smtplib.SMTP(timeout=timeout, local_hostname=config.smtp_hostname)
        # smtplib checks the certificate against _host, which only its constructor
        # sets: connect() alone would leave it empty.
        smtp._host = config.relay_host  # type: ignore[attr-defined]
        try:
            code, banner = smtp.connect(config.relay_host, config.relay_port)
        except BaseException:
            smtp.close()
            raise
        try:
            if smtp.sock is not None:
                smtp.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF,
                                     _UPSTREAM_SEND_BUFFER)
        except OSError:
            pass  # the kernel's default then; the upload is still paced per piece
        return smtp, code, reply_text(banner)

    @staticmethod
    def ehlo(smtp: smtplib.SMTP) -> tuple[int, str]:
        code, message = smtp.ehlo()
        return code, reply_text(message)

    def starttls(self, smtp: smtplib.SMTP) -> bool:
        """False when the upstream does not offer it; else TLS is up (and EHLO again)."""
        if not smtp.has_extn("starttls"):
            return False
        smtp.starttls(context=self.tls_context)
        smtp.ehlo()
        return True

    def auth(self, smtp: smtplib.SMTP) -> None:
        smtp.login(self.config.relay_username, self.config.relay_password)


class UpstreamConnection:
    """One authenticated session to the upstream. Every method blocks: threads only."""

    def __init__(self, config: Config, tls_context: ssl.SSLContext | None):
        self.config = config
        self.handshake = Handshake(config, tls_context)
        self.smtp: smtplib.SMTP | None = None
        self.messages_sent = 0
        self.idle_since = 0.0
        self.reused = False
        self.discarded = False  # handed to UpstreamPool.discard (closing or closed)

    @property
    def host(self) -> str:
        """host:port of the server this session is (or was) for."""
        return _label(self.config)

    def open(self, timeout: float | None = None) -> None:
        """Every step of the handshake; UpstreamError saying which failed.
        `timeout`: how long the handshake may take in each step (else TIMEOUT)."""
        config, handshake, step = self.config, self.handshake, "connect"
        try:
            smtp, code, banner = handshake.connect(timeout)
            self.smtp = smtp
            if code != 220:
                raise UpstreamError(f"upstream refused the connection: {code} {banner}")
            step = "EHLO"
            code, text = handshake.ehlo(smtp)
            if code != 250:
                raise UpstreamError(f"EHLO refused: {code} {text}")
            if config.relay_use_tls:
                step = "STARTTLS"
                if not handshake.starttls(smtp):
                    raise UpstreamError("upstream does not offer STARTTLS "
                                        "(RELAY_USE_TLS is on)")
            if config.relay_username:
                step = "AUTH"
                handshake.auth(smtp)
            if timeout is not None and smtp.sock is not None:
                smtp.sock.settimeout(config.timeout)  # each later step: TIMEOUT
        except UpstreamError:
            self.close()
            raise
        except smtplib.SMTPAuthenticationError as error:
            self.close()
            raise UpstreamError(f"upstream refused our credentials ({error.smtp_code} "
                                f"{reply_text(error.smtp_error)})", "451 4.7.0") from None
        except (smtplib.SMTPException, OSError, ValueError) as error:
            self.close()
            raise UpstreamError(f"{step} to {config.relay_host}:{config.relay_port} "
                                f"failed: {describe_error(error)}") from None

    def has(self, extension: str) -> bool:
        return bool(extension) and self.smtp is not None and self.smtp.has_extn(extension)

    def command(self, verb: str, argument: str) -> Reply:
        assert self.smtp is not None
        code, message = self.smtp.docmd(verb, argument)
        return code, reply_text(message)

    def mail_and_recipient(self, mail: str, recipient: str) -> tuple[Reply, Reply | None]:
        """MAIL and one RCPT in one round trip (RFC 2920; one after the other when the
        upstream does not offer PIPELINING). RCPT's reply is None when MAIL was
        refused (a pipelining upstream's answer to that RCPT is read and dropped), and
        (0, why) when the link broke after MAIL's reply."""
        smtp = self.smtp
        assert smtp is not None
        if not self.has("pipelining"):
            mail_reply = self.command("MAIL", mail)
            if not 200 <= mail_reply[0] < 300:
                return mail_reply, None
            try:
                return mail_reply, self.command("RCPT", recipient)
            except LINK_ERRORS as error:
                return mail_reply, (0, describe_error(error))
        lines = f"MAIL {mail}\r\nRCPT {recipient}\r\n"
        if lines.count("\r") != 2 or lines.count("\n") != 2:
            raise ValueError("command and arguments contain prohibited newline characters")
        smtp.send(lines)  # as putcmd does, with its check above
        code, message = smtp.getreply()
        mail_reply = (code, reply_text(message))
        if code == 421:  # closing: there is no second reply to wait for
            return mail_reply, None
        rcpt_reply: Reply
        try:
            code, message = smtp.getreply()
            rcpt_reply = (code, reply_text(message))
        except LINK_ERRORS as error:
            rcpt_reply = (0, describe_error(error))
        return mail_reply, rcpt_reply if 200 <= mail_reply[0] < 300 else None

    def data(self, stuffed: bytes) -> tuple[bool, int, str]:
        """DATA with a message that is already dot-stuffed and ends in CRLF (as the
        client sent it), so it goes out without being unstuffed and stuffed again.

        Returns (sent, code, text): `sent` is False when the upstream answered the DATA
        command itself instead of 354 (nothing was sent; its transaction is still
        open), True when the reply is the one after the final dot."""
        smtp = self.smtp
        assert smtp is not None
        smtp.putcmd("data")
        code, reply = smtp.getreply()
        if code != 354:
            return False, code, reply_text(reply)
        try:
            if smtp.sock is None:
                raise smtplib.SMTPServerDisconnected("connection closed by upstream")
            self._upload(smtp.sock, stuffed)
        except OSError:
            smtp.close()  # half a message is in the way: no QUIT, just close
            raise
        code, reply = smtp.getreply()  # waits up to TIMEOUT
        return True, code, reply_text(reply)

    def _upload(self, sock: socket.socket, stuffed: bytes) -> None:
        """Send the data and the final dot; each send waits up to TIMEOUT for room.
        Then wait until the upstream has taken it all (or has answered early)."""
        view = memoryview(stuffed + b".\r\n")  # one piece: no Nagle wait for the dot
        sent, total = 0, len(view)
        while sent < total:
            sent += sock.send(view[sent:sent + _DATA_CHUNK])
        queued = _unacknowledged(sock)
        if not queued or not hasattr(select, "poll"):
            return
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        deadline = time.monotonic() + self.config.timeout
        while queued:
            if poller.poll(50):
                return  # a reply (or the connection's end) is there to read
            still_queued = _unacknowledged(sock)
            if still_queued < queued:
                queued, deadline = still_queued, time.monotonic() + self.config.timeout
            elif time.monotonic() >= deadline:
                raise TimeoutError("timed out")

    def close(self) -> None:
        """QUIT politely; never raises."""
        smtp, self.smtp = self.smtp, None
        if smtp is None:
            return
        try:
            if smtp.sock is not None:
                smtp.quit()
        except (smtplib.SMTPException, OSError, ValueError):
            pass
        finally:
            smtp.close()


def describe_error(error: BaseException) -> str:
    if isinstance(error, TimeoutError) or isinstance(error.__context__, TimeoutError):
        return "timed out"  # smtplib re-raises a read timeout as SMTPServerDisconnected
    if isinstance(error, ssl.SSLCertVerificationError):
        return f"TLS certificate not trusted ({error.verify_message})"
    if isinstance(error, ssl.SSLError):
        return f"TLS error ({error.reason or error})"
    if isinstance(error, smtplib.SMTPServerDisconnected):
        return "connection closed by upstream"
    if isinstance(error, smtplib.SMTPResponseException):
        return f"{error.smtp_code} {reply_text(error.smtp_error)}"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return one_line(error) or type(error).__name__


# Raised inside a worker thread when the link to the upstream is gone.
LINK_ERRORS = (smtplib.SMTPServerDisconnected, OSError)


def _label(config: Config) -> str:
    """host:port of the one host a (per-host) Config's RELAY_* name."""
    return host_label(config.relay_host, config.relay_port)


@dataclasses.dataclass
class HostState:
    """What the pool last saw of one host: for failover, /readyz, check, metrics."""

    label: str
    up: bool | None = None  # None: not tried yet
    failed_until: float = 0.0  # monotonic: skipped (tried last) until then
    detail: str = ""


class UpstreamPool:
    """Authenticated upstream sessions kept for reuse, for one destination: RELAY_*
    or a route's smart host, each a list of hosts tried in order.

    Opening TCP + EHLO + STARTTLS + AUTH costs more than a small message, so sessions are
    returned here after a transaction and handed to the next one. Idle sessions are
    closed after RELAY_POOL_IDLE_SECONDS (before the upstream's own idle timeout) and
    after RELAY_POOL_MAX_MESSAGES messages. The pool never holds more sessions than there
    are client connections, since each client holds at most one.

    Failover (issue #11): a new session tries the hosts in order, all within TIMEOUT;
    a connect, TLS or AUTH failure, a 421 or a timeout moves on to the next host, and
    a host that just failed is tried last for HOST_BACKOFF_SECONDS (as Postfix
    remembers a dead host for a while).
    """

    HOST_BACKOFF_SECONDS = 30.0

    def __init__(self, config: Config, executor: concurrent.futures.Executor,
                 metrics: Metrics, destination: SmartHost | None = None):
        self.config = config
        self.executor = executor
        self.metrics = metrics
        self.destination = destination or default_destination(config)
        self.host_configs = [self.destination.host_config(config, host, port)
                             for host, port in self.destination.hosts]
        first = self.host_configs[0]
        self.tls_context = (upstream_tls_context(first)
                            if first.relay_use_tls or first.relay_use_ssl else None)
        self.hosts = {label: HostState(label) for label in map(_label, self.host_configs)}
        self.idle: collections.deque[UpstreamConnection] = collections.deque()
        self._background: set[asyncio.Future] = set()
        self._reaper: asyncio.Task | None = None

    async def run(self, function: Callable, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, function,
                                                                *args)

    async def acquire(self) -> UpstreamConnection:
        now = time.monotonic()
        while self.idle:
            connection = self.idle.pop()  # most recently used: least likely stale
            if now - connection.idle_since < self.config.relay_pool_idle_seconds:
                connection.reused = True
                self.metrics.upstream_sessions_reused.inc()
                return connection
            self.discard(connection)
        return await self.open_new()

    def host_answered(self, label: str) -> None:
        state = self.hosts.get(label)
        if state is not None:
            state.up, state.failed_until, state.detail = True, 0.0, "answered"
            self.metrics.upstream_host_up.labels(label).set(1)

    def host_failed(self, label: str, detail: str) -> None:
        """`label` failed (connect, TLS, AUTH, 421, timeout): tried last for a while."""
        state = self.hosts.get(label)
        if state is not None:
            state.up, state.detail = False, detail
            state.failed_until = time.monotonic() + self.HOST_BACKOFF_SECONDS
            self.metrics.upstream_host_up.labels(label).set(0)

    def open_first(self) -> UpstreamConnection:
        """Blocking (a worker thread): a session to the first host that completes the
        handshake, within TIMEOUT in all. UpstreamError (the last host's reason,
        every host named) when none does."""
        deadline = time.monotonic() + self.config.timeout
        now = time.monotonic()
        order = sorted(self.host_configs, key=lambda c: self.hosts[
            _label(c)].failed_until > now)  # stable
        failures: list[tuple[str, UpstreamError]] = []
        for host_config in order:
            label = _label(host_config)
            remaining = deadline - time.monotonic()
            if failures and remaining < 1.0:
                break  # the client is owed an answer within TIMEOUT
            connection = UpstreamConnection(host_config, self.tls_context)
            try:
                connection.open(timeout=min(self.config.timeout, max(remaining, 1.0))
                                if len(order) > 1 else None)
            except UpstreamError as error:
                self.host_failed(label, error.detail)
                failures.append((label, error))
                continue
            self.host_answered(label)
            return connection
        if len(failures) == 1 and len(order) == 1:
            raise failures[0][1]
        last = failures[-1][1]
        raise UpstreamError("; ".join(f"{label}: {error.detail}"
                                      for label, error in failures), last.reply_key)

    async def open_new(self) -> UpstreamConnection:
        opening = asyncio.get_running_loop().run_in_executor(self.executor,
                                                             self.open_first)
        try:
            connection: UpstreamConnection = await asyncio.shield(opening)
        except asyncio.CancelledError:
            # The client left while we connected: the session is still good for others.
            def keep(done: asyncio.Future) -> None:
                if not done.cancelled() and done.exception() is None:
                    self.metrics.upstream_sessions_opened.inc()
                    self.metrics.upstream_sessions_open.inc()
                    self.release(done.result())
            opening.add_done_callback(keep)
            raise
        self.metrics.upstream_sessions_opened.inc()
        self.metrics.upstream_sessions_open.inc()
        self._start_reaper()
        return connection

    def release(self, connection: UpstreamConnection) -> None:
        """Back to the pool after a finished transaction (the upstream is between
        transactions: nothing needs resetting)."""
        if (connection.smtp is None
                or connection.messages_sent >= self.config.relay_pool_max_messages
                or self.config.relay_pool_idle_seconds <= 0
                or len(self.idle) >= self.config.max_connections):
            self.discard(connection)
            return
        connection.idle_since = time.monotonic()
        self.idle.append(connection)

    def reset_and_release(self, connection: UpstreamConnection,
                          pending: asyncio.Future | None = None) -> None:
        """For an abandoned transaction: RSET upstream, then pool it (in the background,
        after `pending`, the upstream call still running in a thread, if any)."""
        async def reset() -> None:
            if pending is not None:
                await asyncio.wait([pending])
            if connection.discarded:  # the call's outcome already condemned it
                return
            try:
                code, _ = await self.run(connection.command, "RSET", "")
            except (*LINK_ERRORS, smtplib.SMTPException, AssertionError):
                code = 0
            if code == 250:
                self.release(connection)
            else:
                self.discard(connection)
        self._in_background(reset())

    def discard(self, connection: UpstreamConnection) -> None:
        if connection.smtp is not None and not connection.discarded:
            connection.discarded = True
            self.metrics.upstream_sessions_open.dec()
            self._in_background(self.run(connection.close))

    def _in_background(self, awaitable: Any) -> None:
        task = asyncio.ensure_future(awaitable)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _start_reaper(self) -> None:
        if self._reaper is None and self.config.relay_pool_idle_seconds > 0:
            self._reaper = asyncio.ensure_future(self._reap_idle())

    async def _reap_idle(self) -> None:
        limit = self.config.relay_pool_idle_seconds
        while True:
            await asyncio.sleep(max(0.05, min(limit / 4, 5.0)))
            now = time.monotonic()
            while self.idle and now - self.idle[0].idle_since >= limit:
                self.discard(self.idle.popleft())

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        while self.idle:
            self.discard(self.idle.popleft())
        if self._background:
            await asyncio.wait(list(self._background), timeout=self.config.timeout)


def dot_stuffed(body: bytes) -> bytes:
    """The body as the DATA command carries it (RFC 5321 4.5.2), ending in CRLF."""
    if not body.endswith(b"\r\n"):
        body += b"\r\n"
    stuffed = body.replace(b"\r\n.", b"\r\n..")
    return b"." + stuffed if stuffed.startswith(b".") else stuffed


def transact(connection: UpstreamConnection, sender: str, recipients: Sequence[str],
             body: bytes) -> tuple[Outcomes, bool]:
    """One whole upstream transaction, blocking (a worker thread): MAIL, each RCPT,
    DATA. Returns each recipient's reply, and whether the session is still usable
    between transactions (False: close it)."""
    outcomes: Outcomes = {}
    try:
        options = [f"SIZE={len(body)}"] if connection.has("size") else []
        if not body.isascii() and connection.has("8bitmime"):
            options.append("BODY=8BITMIME")
        if not (sender.isascii() and all(r.isascii() for r in recipients)):
            if not connection.has("smtputf8"):
                refusal = replies.NO_SMTPUTF8
                return {r: (refusal.code, refusal.format()[4:]) for r in recipients}, True
            options.append("SMTPUTF8")
            assert connection.smtp is not None
            connection.smtp.command_encoding = "utf-8"
        code, text = connection.command("MAIL", f"FROM:<{sender}>" +
                                        "".join(" " + o for o in options))
        if not 200 <= code < 300:
            return {r: (code, text) for r in recipients}, final_reply(code)
        accepted = []
        for recipient in recipients:
            code, text = connection.command("RCPT", f"TO:<{recipient}>")
            outcomes[recipient] = (code, text)
            if 200 <= code < 300:
                accepted.append(recipient)
            elif not final_reply(code):
                raise smtplib.SMTPServerDisconnected(f"{code} {text}")
        if accepted:
            sent, code, text = connection.data(dot_stuffed(body))
            for recipient in accepted:
                outcomes[recipient] = (code, text)
            if not final_reply(code):
                return outcomes, False
            if sent:
                return outcomes, True  # the reply after the data ends the transaction
        code, _ = connection.command("RSET", "")
        return outcomes, code == 250
    except (*LINK_ERRORS, smtplib.SMTPException) as error:
        detail = describe_error(error)
        for recipient in recipients:
            if recipient not in outcomes or 200 <= outcomes[recipient][0] < 300:
                outcomes[recipient] = (0, replies.UPSTREAM_LOST.format(detail=detail))
        return outcomes, False


_MAIL_PARAMETER_EXTENSION = {"SIZE": "size", "BODY": "8bitmime", "SMTPUTF8": "smtputf8"}


class Transaction:
    """The upstream half of one client transaction: MAIL .. RCPT* .. DATA."""

    def __init__(self, connection: UpstreamConnection, declared_8bit_unsupported: bool,
                 pool: UpstreamPool):
        self.connection = connection
        self.pool = pool  # the destination's pool: the session goes back there
        # BODY=8BITMIME declared, and the upstream lacks 8BITMIME
        self.declared_8bit_unsupported = declared_8bit_unsupported
        self.pending: asyncio.Future | None = None  # the upstream call in a thread
        # The client's MAIL (sender, parameters), and its argument as it goes upstream:
        # sent by begin, or with the first RCPT (send_mail); again on a fresh session
        # when a pooled one turns out stale.
        self.mail: tuple[str, list[str]] = ("", [])
        self.mail_argument = ""
        # The RCPT that went with MAIL, for add_recipient: (its argument, the reply).
        self.early_recipient: tuple[str, Reply] | None = None
        self.broken = False  # the upstream link died mid-transaction
        # The upstream may hold a transaction: from MAIL until a refusal of MAIL or the
        # reply after the data. Such a session is reset before anyone else uses it.
        self.open = False


class UpstreamPools:
    """One UpstreamPool per smart-host destination (RELAY_* and each route's), made
    when first needed; and the queue's delivery of one recipient group through one."""

    def __init__(self, config: Config, executor: concurrent.futures.Executor,
                 metrics: Metrics, default: UpstreamPool | None = None):
        self.config = config
        self.executor = executor
        self.metrics = metrics
        self.default = default or UpstreamPool(config, executor, metrics)
        self.pools: dict[SmartHost, UpstreamPool] = {self.default.destination: self.default}

    def get(self, destination: SmartHost | None = None) -> UpstreamPool:
        if destination is None:
            return self.default
        pool = self.pools.get(destination)
        if pool is None:
            pool = self.pools[destination] = UpstreamPool(self.config, self.executor,
                                                          self.metrics, destination)
        return pool

    async def deliver(self, destination: SmartHost, sender: str,
                      recipients: Sequence[str], body: bytes
                      ) -> tuple[Outcomes, dict[str, AttemptInfo]]:
        """Each recipient's reply from one try through this destination's pool."""
        pool = self.get(destination)
        tls = "none" if destination.tls == "none" else (
            "verified" if destination.verify else "unverified")
        try:
            connection = await pool.acquire()
        except UpstreamError as error:
            self.metrics.upstream_up.set(0)
            return ({r: (0, error.reply) for r in recipients},
                    {r: AttemptInfo(destination.label, "") for r in recipients})
        info = {r: AttemptInfo(connection.host, tls) for r in recipients}
        try:
            outcomes, reusable = await pool.run(transact, connection, sender,
                                                recipients, body)
        except BaseException:
            pool.discard(connection)
            raise
        if reusable:
            connection.messages_sent += 1
            pool.release(connection)
        else:
            pool.discard(connection)
            if any(code in (0, 421) for code, _ in outcomes.values()):
                pool.host_failed(connection.host, "the session broke off")
        reached = any(code for code, _ in outcomes.values())  # any reply at all
        self.metrics.upstream_up.set(1 if reached else 0)
        return outcomes, info

    async def close(self) -> None:
        await asyncio.gather(*(pool.close() for pool in self.pools.values()))


class UpstreamCalls:
    """Worker threads for the blocking upstream calls of client transactions (MAIL,
    RCPT, DATA: three a message).

    loop.run_in_executor costs ~25 us of CPU more per call than this: a
    concurrent.futures.Future with its Condition, the executor's bookkeeping, and
    the future chained to an asyncio one. Here a call is a tuple on a queue and one
    call_soon_threadsafe with its outcome. Threads start as needed, up to `limit`
    (beyond that, calls wait their turn), and stay for the next call.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self.threads = 0
        self._idle = 0
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()

    def submit(self, function: Callable, *args: Any) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._lock:  # claim an idle thread, as ThreadPoolExecutor counts them
            start = not self._idle and self.threads < self.limit
            if start:
                self.threads += 1
            elif self._idle:
                self._idle -= 1
        if start:
            threading.Thread(target=self._work, name=f"upstream-{self.threads}",
                             daemon=True).start()
        self._jobs.put((loop, future, function, args))
        return future

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            loop, future, function, args = job
            outcome: tuple[Any, BaseException | None]
            try:
                outcome = (function(*args), None)
            except BaseException as error:  # noqa: BLE001 (handed to the awaiting task)
                outcome = (None, error)
            try:
                loop.call_soon_threadsafe(self._settle, future, *outcome)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                pass
            del job, loop, future, function, args, outcome
            with self._lock:
                self._idle += 1

    @staticmethod
    def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
        if future.done():
            return
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)

    def close(self) -> None:
        """Cancel the calls still queued; threads end after the call they are in."""
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job[1].cancel()
        for _ in range(self.threads):
            self._jobs.put(None)


class Forwarder:
    """Speaks to the upstream on behalf of one client transaction at a time.

    Each call returns the SMTP reply for the client. Upstream 2xx/4xx/5xx replies are
    passed on as the upstream gave them (a 2xx to MAIL or to the data as 250, which is
    what clients look for); a lost link, a timeout or a TLS failure becomes
    `451 4.4.x`. An upstream `421` (it is closing) becomes `451 4.4.2`, since our own
    connection to the client stays open; so does a reply that makes no sense at that
    step (a code outside 200-599, a 3xx other than 354 to DATA), and that upstream
    session is closed.
    """

    def __init__(self, config: Config, metrics: Metrics):
        self.config = config
        self.executor = concurrent.futures.ThreadPoolExecutor(
            # One worker per client that can be waiting on the upstream and per queue
            # worker (DELIVERY_MODE queue/fallback), plus room for background
            # RSET/QUIT: asyncio's default pool has min(32, cores + 4).
            max_workers=config.max_connections + config.queue_workers + 4,
            thread_name_prefix="upstream")
        self.pools = UpstreamPools(config, self.executor, metrics)
        self.pool = self.pools.default  # RELAY_*'s
        self.calls = UpstreamCalls(config.max_connections + 4)
        self.orphans: set[asyncio.Future] = set()  # deliveries whose client left

    def outlive(self, delivery: asyncio.Future) -> None:
        """Keep a delivery going after its client left; close() waits for it."""
        def done(task: asyncio.Future) -> None:
            self.orphans.discard(task)
            if not task.cancelled() and task.exception() is not None:
                log.error("unexpected error in a delivery", exc_info=task.exception())
        self.orphans.add(delivery)
        delivery.add_done_callback(done)

    async def _call(self, session: RelaySession, function: Callable, *args: Any) -> Any:
        transaction = session.transaction
        assert transaction is not None  # callers hold one
        future = self.calls.submit(function, *args)
        transaction.pending = future
        try:
            with session.waiting_on_upstream():
                return await asyncio.shield(future)
        finally:
            if future.done():
                transaction.pending = None

    async def begin(self, session: RelaySession, sender: str, options: list[str],
                    destination: SmartHost | None = None, *,
                    pool: UpstreamPool | None = None) -> str:
        """MAIL FROM upstream (RELAY_*, or the route's `destination`, or the sessions
        of `pool`: relay.mx.MXSessionPool). On 250 the session holds the
        transaction."""
        refusal = await self.prepare(session, sender, options, destination, pool=pool)
        return refusal if refusal is not None else await self.send_mail(session)

    async def prepare(self, session: RelaySession, sender: str, options: list[str],
                      destination: SmartHost | None = None, *,
                      pool: UpstreamPool | None = None) -> str | None:
        """begin, all but sending the MAIL: for a client that pipelined its first RCPT
        after MAIL and reads the two replies together, MAIL goes upstream with that
        RCPT (send_mail), one round trip and one thread hop instead of two. Returns
        a refusal of our own (NO_SMTPUTF8), or None."""
        return await self._open(session, sender, options,
                                pool or self.pools.get(destination), fresh=False)

    async def _open(self, session: RelaySession, sender: str, options: list[str],
                    pool: UpstreamPool, *, fresh: bool) -> str | None:
        """A session from `pool` (`fresh`: a new one) for the client's transaction, and
        MAIL's argument for it. Returns a refusal when the session cannot carry the
        message."""
        # Waiting on the upstream's connect/TLS/AUTH: not idle.
        with session.waiting_on_upstream():
            connection = await (pool.open_new() if fresh else pool.acquire())
        declared_8bit = "BODY=8BITMIME" in options
        session.transaction = transaction = Transaction(
            connection, declared_8bit and not connection.has("8bitmime"), pool)
        transaction.mail = (sender, options)
        if "SMTPUTF8" in options and not connection.has("smtputf8"):
            self.finish(session)
            return replies.NO_SMTPUTF8.format()
        if "SMTPUTF8" in options and connection.smtp is not None:
            connection.smtp.command_encoding = "utf-8"
        # Only what the upstream advertises goes on; aiosmtpd lets no other through.
        upstream_options = [
            option for option in options
            if connection.has(_MAIL_PARAMETER_EXTENSION.get(option.split("=")[0], ""))]
        transaction.mail_argument = f"FROM:<{sender}>" + "".join(
            " " + o for o in upstream_options)
        return None

    async def send_mail(self, session: RelaySession, recipient: str | None = None) -> str:
        """MAIL upstream for the transaction begin opened, with `recipient`'s RCPT in
        the same round trip when given (its reply then waits for add_recipient).
        Returns MAIL's reply for the client."""
        for attempt in (1, 2):
            transaction = session.transaction
            assert transaction is not None  # begin opened it; handle_RCPT checked
            connection, pool = transaction.connection, transaction.pool
            transaction.open = True  # until the upstream says otherwise
            rcpt_argument = None if recipient is None else f"TO:<{recipient}>"
            rcpt: Reply | None = None
            try:
                if rcpt_argument is None:
                    code, text = await self._call(session, connection.command, "MAIL",
                                                  transaction.mail_argument)
                else:
                    (code, text), rcpt = await self._call(
                        session, connection.mail_and_recipient, transaction.mail_argument,
                        rcpt_argument)
            except LINK_ERRORS as error:
                code, text = 0, describe_error(error)
            if 200 <= code < 300:  # any 2xx: the upstream's transaction is open
                if rcpt_argument is not None and rcpt is not None:
                    transaction.early_recipient = (rcpt_argument, rcpt)
                return f"250 {text}"
            if final_reply(code):
                transaction.open = False  # refused: no transaction upstream
                self.finish(session)
                return f"{code} {text}"
            if code and code != 421:
                self._condemn(transaction)
                session.transaction = None
                raise UpstreamError(f"unexpected reply to MAIL: {code} {text}",
                                    "451 4.4.2")
            # The link is gone. A pooled session may simply have gone stale while idle:
            # the client must not pay for that, so try once more on a fresh one (a
            # retry never takes another pooled session: it may be just as stale). On a
            # fresh session, the host itself failed (a 421): the next host, if any.
            pool.discard(connection)
            session.transaction = None
            if not connection.reused:
                pool.host_failed(connection.host, text or "closed the connection")
            if not (connection.reused or len(pool.hosts) > 1) or attempt == 2:
                raise UpstreamError(text or "upstream closed the connection",
                                    "451 4.4.2")
            refusal = await self._open(session, *transaction.mail, pool, fresh=True)
            if refusal is not None:
                return refusal
        raise AssertionError("unreachable")

    async def add_recipient(self, session: RelaySession, recipient: str) -> str:
        return await self._in_transaction(session, "RCPT", f"TO:<{recipient}>")

    async def _in_transaction(self, session: RelaySession, verb: str, argument: str) -> str:
        transaction = session.transaction
        assert transaction is not None  # handle_RCPT checked
        if transaction.broken:
            return replies.UPSTREAM_LOST.format(detail="start the message again")
        early, transaction.early_recipient = transaction.early_recipient, None
        if early is not None and verb == "RCPT" and argument == early[0]:
            code, text = early[1]  # it went with MAIL (send_mail)
        else:
            try:
                code, text = await self._call(session, transaction.connection.command,
                                              verb, argument)
            except LINK_ERRORS as error:
                code, text = 0, describe_error(error)
        if final_reply(code):
            return f"{code} {text}"
        self._condemn(transaction)  # later commands get 451 until the next MAIL
        if code and code != 421:
            text = f"unexpected reply to {verb}: {code} {text}"
        raise UpstreamError(text or "upstream closed the connection", "451 4.4.2")

    async def send_data(self, session: RelaySession, message: bytes) -> tuple[bool, str]:
        """DATA upstream. Returns (accepted, reply for the client); ends the
        transaction either way."""
        transaction: Transaction | None = session.transaction
        if transaction is None:  # the client left before we began
            return False, replies.UPSTREAM_TRANSACTION_LOST.format(
                detail="send the message again")
        if transaction.broken:
            self.finish(session)
            return False, replies.UPSTREAM_LOST.format(detail="send the message again")
        if transaction.declared_8bit_unsupported and not message.isascii():
            self.finish(session, reset=True)
            return False, replies.NO_8BITMIME.format()
        connection = transaction.connection
        # From here on `session.transaction` may be gone (the client left and
        # connection_lost reset it, after this call): only `transaction` is ours.
        try:
            sent, code, text = await self._call(session, connection.data, message)
        except LINK_ERRORS as error:
            self._condemn(transaction)
            self._end(session, transaction)
            raise UpstreamError(describe_error(error), "451 4.4.2") from None
        if sent and final_reply(code):
            transaction.open = False  # the reply after the data ends the transaction
            accepted = code < 300
            if accepted:
                connection.messages_sent += 1  # before the pool sees it: it may retire
            self._end(session, transaction)
            return accepted, f"250 {text}" if accepted else f"{code} {text}"
        if not sent and final_reply(code) and code >= 400:
            # The DATA command itself refused (e.g. Postfix's smtpd_data_restrictions):
            # the upstream's transaction is still open. Reset it before the client hears
            # the refusal, so the session is back in the pool for whoever sends next.
            try:
                reset, _ = await self._call(session, connection.command, "RSET", "")
            except LINK_ERRORS:
                reset = 0
            if reset == 250:
                transaction.open = False
            else:
                self._condemn(transaction)
            self._end(session, transaction)
            return False, f"{code} {text}"
        self._condemn(transaction)
        self._end(session, transaction)
        return False, replies.UPSTREAM_FAILED_DATA.format(detail=f"{code} {text}")

    def _condemn(self, transaction: Transaction) -> None:
        """The upstream session is lost or makes no sense: close it now, never reuse
        it. A client transaction on it gets 451 until the client moves on."""
        transaction.broken = True
        transaction.pool.discard(transaction.connection)

    def _end(self, session: RelaySession, transaction: Transaction) -> None:
        """finish(), for this transaction only (connection_lost may have taken it)."""
        if session.transaction is transaction:
            self.finish(session)

    def finish(self, session: RelaySession, *, reset: bool = False) -> None:
        """End the session's upstream transaction: back to the pool only when the
        upstream is between transactions; reset first (RSET) when it may hold one;
        closed when broken."""
        transaction: Transaction | None = session.transaction
        if transaction is None:
            return
        session.transaction = None
        pool = transaction.pool
        if transaction.broken:
            pool.discard(transaction.connection)
        elif reset or transaction.open or transaction.pending is not None:
            pool.reset_and_release(transaction.connection, transaction.pending)
        else:
            pool.release(transaction.connection)

    async def close(self) -> None:
        if self.orphans:  # their outcome is logged before "stopped"
            await asyncio.wait(list(self.orphans), timeout=self.config.timeout)
        await self.pools.close()
        self.calls.close()
        self.executor.shutdown(wait=False, cancel_futures=True)

