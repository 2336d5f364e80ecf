"""aiosmtpd's SMTP protocol with the few changes a relay needs, and the typed session.

Overrides private aiosmtpd methods and state (`_create_session`, `_getaddr`,
`_timeout_cb`, `_reset_timeout`, `_handle_client`, `smtp_DATA` reading `_reader`
directly): aiosmtpd is pinned to an exact version, and tests/test_aiosmtpd_overrides.py
fails when an upgrade changes them.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import itertools
import logging
import secrets
import ssl
import time
import types
from asyncio import sslproto
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, AnyStr

from aiosmtpd.smtp import (
    MISSING,
    SMTP,
    AuthResult,
    Session,
    TLSSetupException,
    syntax,
)

from relay.observability import log, log_event
from relay.policy import long_line_in, split_path
from relay.settings import ConfigError
from relay.upstream import describe_error

if TYPE_CHECKING:
    from relay.upstream import Transaction
    from relay.users import UserPolicy
    from smtp_relay import SMTPRelayServer


class RelaySession(Session):
    """aiosmtpd's per-connection Session, plus what the relay tracks about it."""

    # aiosmtpd still assigns this deprecated field after AUTH and logs a warning each
    # time through its property; a plain attribute keeps the log clean.
    login_data = None

    def __init__(self, loop: asyncio.AbstractEventLoop):
        super().__init__(loop)
        self.user: str | None = None
        self.peer_ip: str | None = None
        self.trusted = False  # from TRUSTED_NETWORKS: may send without AUTH
        self.policy: UserPolicy | None = None  # the user's, from AUTH (or trusted)
        self.credentials: tuple[str, Any] | None = None  # AUTH data awaiting a check
        self.message_id: str | None = None
        self.transaction: Transaction | None = None
        self.busy = False  # waiting on the upstream
        self.receiving_data = False  # between 354 and the end of the data
        self.active_at = time.monotonic()  # last command, DATA bytes or upstream reply
        self.started = 0.0


_MESSAGE_IDS = itertools.count(1)


_ID_PREFIX = secrets.token_hex(2)  # per process, so ids differ across restarts


def new_message_id() -> str:
    """Short and unique within this process's life: one grep finds one message."""
    return f"{_ID_PREFIX}{next(_MESSAGE_IDS):08x}"


class ProtocolTemplate:
    """What aiosmtpd's SMTP.__init__ works out for a listener's first connection, for
    the next ones. It depends only on the classes and the listener's options, but
    costs ~200 us a connection (inspect.getmembers on the protocol and the handler,
    dir(), inspect.signature of handle_EHLO): a sixth of a small message's CPU."""

    _TABLES = ("_auth_methods", "_smtp_methods", "_handle_hooks")

    def __init__(self, first: RelaySMTP):
        loop = first.loop
        # StreamReaderProtocol's own state (reader, futures, queues) is per connection.
        fresh = vars(asyncio.StreamReaderProtocol(
            asyncio.StreamReader(loop=loop), first._cb_client_connected, loop=loop))
        self.attributes = {name: value for name, value in vars(first).items()
                           if name not in fresh and name not in self._TABLES}
        # (key, value, own): an own method (bound to `first`) is kept as its function,
        # to be bound to each new protocol; _auth_methods holds (method, is_builtin).
        self.tables: dict[str, list[tuple[str, Any, bool]]] = {}
        for name in self._TABLES:
            self.tables[name] = rows = []
            for key, value in getattr(first, name).items():
                method = value.method if name == "_auth_methods" else value
                own = getattr(method, "__self__", None) is first
                if own:
                    method = method.__func__
                rows.append((key, value._replace(method=method)
                             if name == "_auth_methods" else method, own))
        self.log = logging.getLogger("mail.log")
        self.mechanisms = "Available AUTH mechanisms: " + " ".join(
            m + "(builtin)" if impl.is_builtin else m
            for m, impl in sorted(first._auth_methods.items()))

    def initialise(self, protocol: RelaySMTP) -> None:
        """SMTP.__init__'s work for `protocol`, from the first connection's."""
        loop = self.attributes["loop"]
        asyncio.StreamReaderProtocol.__init__(
            protocol, asyncio.StreamReader(loop=loop, limit=protocol.line_length_limit),
            protocol._cb_client_connected, loop=loop)
        protocol.__dict__.update(self.attributes)
        bind = types.MethodType
        protocol._smtp_methods = {key: bind(value, protocol) if own else value
                                  for key, value, own in self.tables["_smtp_methods"]}
        protocol._handle_hooks = {key: bind(value, protocol) if own else value
                                  for key, value, own in self.tables["_handle_hooks"]}
        protocol._auth_methods = {
            key: type(value)(bind(value.method, protocol), value.is_builtin) if own
            else value for key, value, own in self.tables["_auth_methods"]}
        protocol.command_size_limits.clear()  # a class attribute SMTP.__init__ resets
        self.log.info(self.mechanisms)


def _answered_in_groups(method: Callable[..., Awaitable[None]]
                        ) -> Callable[..., Awaitable[None]]:
    """aiosmtpd's smtp_ method for a command whose replies may wait for the rest of a
    pipelined group (see RelaySMTP.push)."""
    @functools.wraps(method)  # and so the same HELP text
    async def answer(self: RelaySMTP, arg: str) -> None:
        self._in_group = True
        try:
            await method(self, arg)
        finally:
            self._in_group = False
    return answer


class RelaySMTP(SMTP):
    """aiosmtpd's protocol with the few changes a relay needs.

    Overrides private aiosmtpd methods and state (`_create_session`, `_getaddr`,
    `_timeout_cb`, `_reset_timeout`, `_handle_client`, `smtp_DATA` and `push` reading
    `_reader` directly, SMTP.__init__'s work copied by ProtocolTemplate): aiosmtpd is
    pinned to an exact version, and tests/test_aiosmtpd_overrides.py fails when an
    upgrade changes them.
    """

    # Refused commands (5xx) a client that is neither authenticated nor trusted may
    # send before it is disconnected, as Postfix's smtpd_hard_error_limit.
    MAX_REFUSED_COMMANDS = 20

    def __init__(self, server: SMTPRelayServer, *, implicit_tls: bool = False,
                 **kwargs: Any):
        template = server.protocol_templates.get(implicit_tls)
        if template is not None:
            template.initialise(self)
        else:
            super().__init__(server.handler, **kwargs)
            server.protocol_templates[implicit_tls] = ProtocolTemplate(self)
        self._relay_server = server
        self.implicit_tls = implicit_tls  # the SMTPS listener: TLS from the first byte
        self.connected = False  # connection_made has run (SMTPS: after the handshake)
        self.raw_transport: asyncio.BaseTransport | None = None  # SMTPS: the TCP one
        self.claimed_ip: str | None = None  # counted for MAX_CONNECTIONS_PER_IP
        self.over_ip_limit = False
        self._greeted_at: float | None = None
        self._refused_commands = 0  # 5xx replies while unauthenticated

    @property
    def encrypted(self) -> bool:
        return self.implicit_tls or self._tls_protocol is not None

    _unsent = b""  # reply lines kept for the next write (see push)
    _in_group = False  # answering RSET, MAIL or RCPT

    smtp_RSET = _answered_in_groups(SMTP.smtp_RSET)  # smtp_MAIL: see below
    smtp_RCPT = _answered_in_groups(SMTP.smtp_RCPT)

    async def _handle_client(self) -> None:
        # The connection checker: before the greeting, refuse clients from outside
        # ALLOWED_CLIENT_NETWORKS, over MAX_CONNECTIONS_PER_IP, and addresses locked
        # out for guessing passwords.
        session = self.session
        refusal = self._relay_server.connection_refusal(session, self.over_ip_limit)
        if refusal is not None:
            self._hang_up(refusal.encode() + b"\r\n")
            return
        self._greeted_at = time.monotonic()
        await super()._handle_client()

    async def smtp_AUTH(self, arg: str) -> None:
        server, session = self._relay_server, self.session
        if self.envelope.mail_from:
            # RFC 4954 section 4; a trusted client that began MAIL without AUTH would
            # otherwise mix two policies in one transaction.
            await self.push("503 5.5.1 AUTH not permitted during a mail transaction")
            return
        if server.auth_guard.locked(session.peer_ip):
            await self._locked_out()
            return
        session.credentials = None
        await super().smtp_AUTH(arg)  # parses the exchange; SMTPAuthHandler captures
        if session.credentials is None:
            return  # aiosmtpd already answered (syntax error, abort, already done)
        mechanism, credentials = session.credentials
        session.credentials = None
        # Counted as a failure before the check and taken back if it succeeds: a client
        # that leaves during the check (bcrypt runs on) is still counted.
        server.auth_guard.record_failure(session.peer_ip)
        try:
            user = await server.authenticator.verify(mechanism, credentials,
                                                     session.peer_ip)
        except asyncio.CancelledError:
            log_event(logging.DEBUG, "auth-abandoned", session, mechanism=mechanism)
            raise
        if user is not None:
            server.auth_guard.withdraw(session.peer_ip)
            session.authenticated = True
            session.user = session.auth_data = user.policy.name
            session.policy = user.policy  # kept for the session, even across reloads
            server.metrics.auth.labels("success").inc()
            log_event(logging.INFO, "auth-ok", session, mechanism=mechanism)
            await self.push("235 2.7.0 Authentication successful")
            return
        server.metrics.auth.labels("failure").inc()
        attempted = server.authenticator.attempted_user(mechanism, credentials)
        log_event(logging.WARNING, "auth-failed", session, mechanism=mechanism,
                  attempted_user=attempted)
        locked_now = server.auth_guard.locked(session.peer_ip)
        # A pause before each "no" slows guessing; it blocks only this client.
        await asyncio.sleep(server.config.auth_failure_delay)
        if locked_now:
            log_event(logging.ERROR, "auth-locked-out", session,
                      failures=server.config.auth_max_failures,
                      seconds=server.config.auth_failure_window)
            await self._locked_out()
        else:
            await self.push("535 5.7.8 Authentication credentials invalid")

    async def challenge_auth(self, challenge: str | bytes, encode_to_b64: bool = True,
                             log_client_response: bool = False) -> Any:
        """aiosmtpd's, except that an overlong response line is refused (RFC 4954:
        500 5.5.6) where aiosmtpd's readline raised (a 451 and a traceback). The
        response is never logged."""
        data = challenge.encode() if isinstance(challenge, str) else challenge
        await self.push(b"334 " + (base64.b64encode(data) if encode_to_b64 else data))
        reader = self._reader
        try:
            line = await reader.readuntil()
        except asyncio.IncompleteReadError as error:
            line = error.partial  # the client closed; connection_lost follows
        except asyncio.LimitOverrunError as error:
            while True:  # discard up to the end of the line, as aiosmtpd does
                await reader.read(error.consumed)
                try:
                    await reader.readuntil()
                    break
                except asyncio.LimitOverrunError as longer:
                    error = longer
            await self.push("500 5.5.6 Authentication exchange line is too long")
            return MISSING
        blob = line.strip()
        if blob == b"*":  # the client cancels
            await self.push("501 5.7.0 Auth aborted")
            return MISSING
        try:
            return base64.b64decode(blob, validate=True)
        except ValueError:
            await self.push("501 5.5.2 Can't decode base64")
            return MISSING

    @_answered_in_groups
    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: str | None) -> None:
        # aiosmtpd takes any SIZE value that str.isdigit() likes and then calls int(),
        # which refuses "\u00b2" (a 451 and a traceback). RFC 1870: ASCII digits.
        path = self._strip_command_keyword("FROM:", arg) if arg else None
        if path is not None and self.session.host_name:
            _, parameters = self._getaddr(path)
            for parameter in (parameters or "").upper().split():
                name, equals, value = parameter.partition("=")
                if name == "SIZE" and equals and not (value.isascii() and value.isdigit()):
                    await self.push("501 5.5.4 Syntax: SIZE=<size in bytes, digits>")
                    return
        await super().smtp_MAIL(arg)

    def _transport_closing(self) -> bool:
        """The client is gone or we hung up. Under TLS the TCP transport learns first:
        the TLS one only a loop turn later, and pipelined replies written in between
        each cost a warning from asyncio."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return True
        raw = self._original_transport or self.raw_transport  # STARTTLS, SMTPS
        return raw is not None and raw.is_closing()

    async def push(self, status: AnyStr) -> None:
        if self._transport_closing():
            # Nothing more to say. (aiosmtpd would write on, and a torn-down TLS
            # transport raises AttributeError.)
            log_event(logging.DEBUG, "client-gone", self.session)
            raise asyncio.CancelledError
        # Each write is a TCP segment and a wake-up for the client (and for us a
        # system call, at which the upstream threads take the GIL). So:
        # - a multi-line reply (EHLO's; aiosmtpd pushes it a line at a time) goes
        #   out in one write, with its last line;
        # - RFC 2920 3.2: the replies to RSET, MAIL and RCPT wait while the next
        #   command of a pipelined group is already here, and go out with the next
        #   reply (at the latest DATA's 354). Never while we wait for the client.
        reply = status if isinstance(status, bytes) else status.encode(
            "utf-8" if self.enable_SMTPUTF8 else "ascii")
        pending = self._reader._buffer  # type: ignore[attr-defined]
        if reply[3:4] == b"-" or (self._in_group and b"\n" in pending):
            self._unsent += reply + b"\r\n"
        else:
            if self._unsent:
                reply, self._unsent = self._unsent + reply, b""
            await super().push(reply)
        session = self.session
        if status[:1] in ("5", b"5") and session is not None and not (
                session.authenticated or session.trusted):
            self._refused_commands += 1
            if self._refused_commands >= self.MAX_REFUSED_COMMANDS:
                log_event(logging.WARNING, "too-many-errors", session,
                          refused=self._refused_commands)
                self._hang_up(b"421 4.7.0 Too many errors, closing connection\r\n")
                raise asyncio.CancelledError

    async def _locked_out(self) -> None:
        self._hang_up(b"421 4.7.0 Too many failed logins from your address; try "
                      b"again later\r\n")

    async def auth_CRAM__MD5(self, _: Any, args: list[str]) -> AuthResult:
        """RFC 2195; offered only when AUTH_MECHANISMS asks for it."""
        if len(args) > 1:
            await self.push("501 5.5.4 CRAM-MD5 takes no initial response")
            return AuthResult(success=False, handled=True)
        challenge = f"<{secrets.token_hex(8)}.{int(time.time())}@{self.hostname}>"
        response = await self.challenge_auth(challenge)
        if response is MISSING:
            return AuthResult(success=False, handled=True)
        login, _, digest = response.rpartition(b" ")
        return self._authenticate("CRAM-MD5", (login, challenge.encode(), digest))

    def _create_session(self) -> Session:
        return RelaySession(self.loop)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # After STARTTLS aiosmtpd makes a new session: keep what the checker decided
        # (AUTH, and so a user's policy, must come again over TLS).
        trusted = self.session is not None and self.session.trusted
        super().connection_made(transport)
        peer = self.session.peer
        self.session.peer_ip = peer[0] if isinstance(peer, tuple) else str(peer)
        self.session.trusted = trusted
        if trusted:
            self.session.policy = self._relay_server.default_policy
        if not self.connected:  # the first time (STARTTLS comes through here again)
            self.connected = True
            self._relay_server.claim_address(self, transport)

    def connection_lost(self, error: Exception | None) -> None:
        session = self.session
        super().connection_lost(error)
        self._relay_server.connection_closed(self)
        if session is not None and session.transaction is not None:
            self._relay_server.forwarder.finish(session, reset=True)

    def data_received(self, data: bytes) -> None:
        # Bytes count as activity only inside DATA (a large message may take longer
        # than TIMEOUT to arrive); junk outside it must not keep a connection alive.
        if self.session is not None and self.session.receiving_data:
            self.session.active_at = time.monotonic()
        super().data_received(data)

    def _reset_timeout(self, duration: float | None = None) -> None:
        now = time.monotonic()
        command = False
        if duration is None and self.session is not None:  # aiosmtpd: a valid command
            self.session.active_at = now
            command = True
        deadline = self._auth_deadline()
        if deadline is not None:  # commands do not push it back
            duration = min(duration or self._timeout_duration, max(0.05, deadline - now))
        handle = self._timeout_handle
        if command and handle is not None and not handle.cancelled() and (
                handle.when() <= self.loop.time() + (duration or self._timeout_duration)):
            return  # it fires first: _timeout_cb counts from active_at, and re-arms
        super()._reset_timeout(duration)

    def _auth_deadline(self) -> float | None:
        """When a client that is neither authenticated nor trusted is cut off: TIMEOUT
        after its greeting, however busy it keeps the connection (NOOPs, refusals)."""
        session = self.session
        if self._greeted_at is None or session is None or session.authenticated or \
                session.trusted:
            return None
        return self._greeted_at + self._timeout_duration

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        # aiosmtpd parses paths with the email package's RFC 5322 header parser, which
        # accepts comments and folding that have no place in SMTP, and is slow. Only
        # split here; the handler parses strictly (parse_path) and gives the reason.
        if not arg:
            return "", ""
        return split_path(arg)

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        # aiosmtpd reads DATA a line at a time, about 7 us a line: 10 ms of CPU for a
        # 100 KB message. This reads up to the terminator in one go, with the same
        # rules: only <CRLF>.<CRLF> ends the data (a bare-LF "dot" line does not), and
        # size and line-length errors are answered once the whole message is in.
        if await self.check_helo_needed():
            return
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        self.session.receiving_data = True
        try:
            stuffed = await self._read_data()
        except (asyncio.CancelledError, asyncio.IncompleteReadError):
            self._writer.close()
            raise asyncio.CancelledError from None
        finally:
            self.session.receiving_data = False
        if stuffed is None:
            status = "552 Error: Too much mail data"
        elif await self._has_long_line(stuffed):
            status = "500 Line too long (see RFC5321 4.5.3.1.6)"
        else:
            # RFC 5321 4.5.2: remove the transparency dot from lines that start with one.
            content = stuffed.replace(b"\r\n.", b"\r\n")
            if content.startswith(b"."):
                content = content[1:]
            self.envelope.content = self.envelope.original_content = content
            self.envelope.smtp_data = stuffed
            status = await self._call_handler_hook("DATA")
        self._set_post_data_state()
        await self.push(status)

    # A line longer than aiosmtpd's limit (999 bytes before the CRLF), found in the
    # bytes themselves: splitting the data into lines made an object per line (170 MB
    # for 10 MB of 2-byte lines). See long_line_in.
    _SCAN_ON_THE_LOOP = 256 * 1024  # bytes; larger data is scanned in a worker thread

    async def _has_long_line(self, data: bytes) -> bool:
        limit = self.line_length_limit - 1
        if len(data) <= self._SCAN_ON_THE_LOOP:
            return long_line_in(data, limit)
        # Some 0.2 ms a megabyte: in a thread, so other clients are served meanwhile.
        return await self.loop.run_in_executor(None, long_line_in, data, limit)

    async def _read_data(self) -> bytes | None:
        """The data up to (not including) the final ".<CRLF>", still dot-stuffed;
        None (after reading and discarding it all) when over MAX_MESSAGE_SIZE."""
        reader = self._reader
        # The DATA line's own CRLF begins the terminator of an empty message, so put
        # one back in front: then a single separator covers every case.
        reader._buffer[0:0] = b"\r\n"
        saved_limit, too_big = reader._limit, False
        reader._limit = self.data_size_limit + 5
        try:
            while True:
                try:
                    data = await reader.readuntil(b"\r\n.\r\n")
                    break
                except asyncio.LimitOverrunError as error:
                    too_big = True
                    await reader.readexactly(error.consumed)  # discard, keep looking
        finally:
            reader._limit = saved_limit
        return None if too_big else data[2:-3]

    def _timeout_cb(self) -> None:
        # aiosmtpd's timer counts from the last command and then drops the connection
        # without a word. A client waiting for the upstream is not idle, nor is one
        # still sending DATA; an idle one is told why it is disconnected.
        session = self.session
        now = time.monotonic()
        idle = now - (session.active_at if session is not None else 0.0)
        deadline = self._auth_deadline()
        busy = session is not None and session.busy
        if busy or (idle < self._timeout_duration and (deadline is None or now < deadline)):
            self._reset_timeout(max(0.05, self._timeout_duration - idle))
            return
        if idle >= self._timeout_duration:
            log_event(logging.INFO, "idle-timeout", session)
            self._hang_up(b"421 4.4.2 Idle timeout, closing connection\r\n")
            return
        log_event(logging.INFO, "auth-timeout", session)
        self._hang_up(f"421 4.7.0 No AUTH within {self._timeout_duration:g} s of "
                      "connecting, closing connection\r\n".encode())

    def _hang_up(self, reply: bytes) -> None:
        """Say why and close. close() waits for the write buffer to drain, so a client
        that never reads would keep its connection (and MAX_CONNECTIONS slot) forever:
        whatever cannot be sent at once is dropped."""
        transport = self.transport
        if transport is None or self._transport_closing():
            return  # closed once already (a second close() breaks a TLS transport)
        transport.write(self._unsent + reply)
        self._unsent = b""
        transport.close()
        if transport.get_write_buffer_size():
            transport.abort()

    @syntax("STARTTLS", when="tls_context")
    async def smtp_STARTTLS(self, arg: str) -> None:
        if self.encrypted:  # RFC 3207: no TLS inside TLS (aiosmtpd would try)
            await self.push("503 5.5.1 Already running TLS")
            return
        await super().smtp_STARTTLS(arg)

    async def handle_exception(self, error: Exception) -> str:
        if isinstance(error, TLSSetupException):  # the client's doing, not ours
            cause = error.__cause__ or error
            if isinstance(cause, (ConnectionError, ssl.SSLEOFError)):  # it left
                log_event(logging.DEBUG, "tls-abandoned", self.session,
                          reason=describe_error(cause))
            else:
                log_event(logging.WARNING, "tls-failed", self.session,
                          reason=describe_error(cause))
            return "421 4.7.0 TLS handshake failed"  # aiosmtpd closes; nothing sent
        log.exception("unexpected error peer=%s", getattr(self.session, "peer_ip", "?"))
        return "451 4.3.0 Internal error: try again later"

    @property
    def in_flight(self) -> bool:
        """A message is on its way: its data arriving, or the upstream answering."""
        return self.session is not None and (self.session.busy
                                             or self.session.receiving_data)

    def say_goodbye(self) -> None:
        """At shutdown, between commands: tell the client and close."""
        if not self.in_flight:
            self._hang_up(b"421 4.3.2 Service shutting down\r\n")


def cannot_listen(variables: str, host: str, port: int, error: OSError) -> ConfigError:
    return ConfigError(f"{variables}: cannot listen on {host}:{port} "
                       f"({error.strerror or error}): expects a free port on a local "
                       "address")


class TooManyConnections(asyncio.Protocol):
    """Answers one connection over MAX_CONNECTIONS and hangs up. On SMTPS it hangs up
    without a word: the client expects a TLS handshake, and a refusal must not cost
    one."""

    def __init__(self, reply: bool = True):
        self.reply = reply

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.reply:
            transport.write(b"421 4.7.0 Too many connections, try again later\r\n")
        transport.close()


class SMTPSAcceptor(asyncio.Protocol):
    """SMTPS, TLS from the first byte: the handshake of one accepted connection, which
    already holds its MAX_CONNECTIONS slot, then the SMTP protocol takes the TLS
    transport. (asyncio's own `ssl=` listener never tells the protocol about a handshake
    that failed or timed out, so the slot could not be given back.)"""

    def __init__(self, server: SMTPRelayServer, protocol: RelaySMTP):
        self._server = server
        self._protocol = protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        server, protocol = self._server, self._protocol
        if not server.claim_address(protocol, transport):
            server.refused_over_ip_limit(None, protocol.claimed_ip)
            transport.close()  # connection_lost gives the slot back
            return
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        waiter.add_done_callback(self._handshake_done)
        assert server.tls_context is not None  # SMTPS_PORT set: load_config made sure
        # What create_server(ssl=...) does, with a waiter we can watch.
        tls = sslproto.SSLProtocol(
            loop, protocol, server.tls_context, waiter, server_side=True,
            ssl_handshake_timeout=server.config.timeout)  # type: ignore[arg-type]
        protocol.raw_transport = transport
        transport.set_protocol(tls)
        tls.connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        self._server.connection_closed(self._protocol)  # refused before the handshake

    def _handshake_done(self, waiter: asyncio.Future) -> None:
        error = None if waiter.cancelled() else waiter.exception()
        if self._protocol.connected:
            return  # the SMTP session has the connection (and gives the slot back)
        peer = self._protocol.claimed_ip
        if isinstance(error, ssl.SSLError) and not isinstance(error, ssl.SSLEOFError):
            log_event(logging.WARNING, "tls-failed", peer=peer, port="SMTPS",
                      reason=describe_error(error))
        else:  # gone, or silent until the handshake timeout
            log_event(logging.DEBUG, "tls-abandoned", peer=peer, port="SMTPS",
                      reason=describe_error(error) if error is not None else "closed")
        self._server.connection_closed(self._protocol)

