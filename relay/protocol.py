"""aiosmtpd's SMTP protocol with the few changes a relay needs, and the typed session.

Overrides private aiosmtpd methods and state (`_create_session`, `_getaddr`,
`_timeout_cb`, `_reset_timeout`, `_handle_client`, `smtp_DATA` reading `_reader`
directly): aiosmtpd is pinned to an exact version, and tests/test_aiosmtpd_overrides.py
fails when an upgrade changes them.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import functools
import itertools
import logging
import secrets
import ssl
import time
import types
import typing
from asyncio import sslproto
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, AnyStr

import aiosmtpd.smtp
from aiosmtpd.proxy_protocol import ProxyData, get_proxy
from aiosmtpd.smtp import (
    MISSING,
    SMTP,
    AuthResult,
    Envelope,
    Session,
    TLSSetupException,
    syntax,
)

from relay import replies
from relay.observability import log, log_event
from relay.policy import long_line_in, split_path
from relay.settings import ConfigError
from relay.upstream import describe_error

if TYPE_CHECKING:
    from relay.routes import Destination
    from relay.upstream import Transaction
    from relay.users import UserPolicy
    from smtp_relay import SMTPRelayServer


_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR, "exception": logging.ERROR}
_escaped_log = getattr(aiosmtpd.smtp.sanitized_log, "__wrapped__",
                       aiosmtpd.smtp.sanitized_log)  # aiosmtpd's own, even on a reload


def _sanitized_log(func: Callable[..., None], msg: AnyStr, *args: Any,
                   **kwargs: Any) -> None:
    """aiosmtpd's sanitized_log, which escapes every command line it is handed even
    when "mail.log" does not show that level (it shows INFO lines only at
    LOG_LEVEL=DEBUG): about 4 % of a one-message connection's CPU. Here a line the
    logger would drop is not escaped first."""
    logger = getattr(func, "__self__", None)
    if isinstance(logger, logging.Logger) and not logger.isEnabledFor(
            _LEVELS.get(getattr(func, "__name__", ""), logging.CRITICAL)):
        return
    _escaped_log(func, msg, *args, **kwargs)


_sanitized_log.__wrapped__ = _escaped_log  # type: ignore[attr-defined]
aiosmtpd.smtp.sanitized_log = _sanitized_log  # smtp.py looks it up at each call


@dataclasses.dataclass
class Client:
    """What is known about a connection's client before its first command, kept for
    the whole connection (across STARTTLS, which gives aiosmtpd a new Session). Every
    field has one writer: the protocol (peer_ip) or the connection checker,
    SMTPRelayServer.admit (trusted_policy)."""

    peer_ip: str = ""  # the client's address, as a string (connection_made, or
    # the PROXY header's source once read: PROXY_PROTOCOL)
    trusted_policy: UserPolicy | None = None  # set when in TRUSTED_NETWORKS (admit)
    via: str = ""  # PROXY_PROTOCOL: the load balancer's address (the socket's peer)


class RelaySession(Session):
    """aiosmtpd's per-connection Session, plus what the relay tracks about it.

    Each field has one writer, named beside it; readers use the properties.
    """

    # aiosmtpd still assigns this deprecated field after AUTH and logs a warning each
    # time through its property; a plain attribute keeps the log clean.
    login_data = None
    auth_data: Any  # aiosmtpd's: the user's name after AUTH (SMTPAuthHandler)

    def __init__(self, loop: asyncio.AbstractEventLoop, client: Client):
        super().__init__(loop)
        self.client = client  # the connection's (RelaySMTP), shared across STARTTLS
        # SMTPAuthHandler: the AUTH in progress and its verdict.
        self.credentials: tuple[str, Any] | None = None  # awaiting a check
        self.user: str | None = None  # the authenticated user's name
        self.user_policy: UserPolicy | None = None  # theirs at AUTH, kept across reloads
        # SMTPRelayHandler: the message of the transaction in progress.
        self.message_id: str | None = None
        self.started = 0.0  # when its MAIL arrived (monotonic)
        # SMTPRelayHandler: what of the transaction goes to the queue (DELIVERY_MODE).
        self.queue_only = False  # no upstream transaction: it all goes to the queue
        self.queue_recipients: list[str] = []  # accepted for the queue, not upstream
        # Routes (issue #11), fallback mode: the MAIL not sent upstream yet because the
        # route depends on the recipients (to:, mx); the smart host the sync part uses.
        self.pending_mail: tuple[str, list[str]] | None = None
        self.route: Destination | None = None
        self.route_domain = ""  # for an mx route: the recipient domain it went to
        # Forwarder: the upstream half of the transaction.
        self.transaction: Transaction | None = None
        # SMTPRelayHandler: MAIL's reply while the MAIL waits for the first RCPT.
        self.late_mail: LateReply | None = None
        # RelaySMTP: where the client is in the dialogue.
        self.receiving_data = False  # between 354 and the end of the data
        # RelaySession itself (touch, waiting_on_upstream): for the idle timer.
        self.busy = False  # waiting on the upstream
        self.active_at = time.monotonic()  # last command, DATA bytes or upstream reply

    @property
    def peer_ip(self) -> str:
        return self.client.peer_ip

    @property
    def trusted(self) -> bool:
        """From TRUSTED_NETWORKS: may send without AUTH."""
        return self.client.trusted_policy is not None

    @property
    def policy(self) -> UserPolicy | None:
        """What this client may do: its user's policy after AUTH, else the trusted
        networks' policy, else nothing."""
        if self.user_policy is not None:
            return self.user_policy
        return self.client.trusted_policy

    def touch(self) -> None:
        """The client did something that counts against the idle timer."""
        self.active_at = time.monotonic()

    @contextlib.contextmanager
    def waiting_on_upstream(self) -> Iterator[None]:
        """The client waits for the upstream: not idle, however long it takes."""
        self.busy = True
        try:
            yield
        finally:
            self.busy = False
            self.active_at = time.monotonic()  # the client's wait ends now


_MESSAGE_IDS = itertools.count(1)


# Per process, random: ids differ across restarts and replicas. A queued message's id
# is its key in a store that outlives processes (and is shared between replicas), so 32
# random bits: two processes share a prefix once in four billion pairs.
_ID_PREFIX = secrets.token_hex(4)


def new_message_id() -> str:
    """16 hex digits, unique across processes: one grep finds one message."""
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
        # Each table as a dict every connection shares, with an own method (bound to
        # `first`) kept as its function; `own` names the tables that have one, which
        # each connection sees through a MethodTable. (_auth_methods holds
        # (method, is_builtin) pairs; _handle_hooks are the handler's methods.)
        self.tables: dict[str, dict[str, Any]] = {}
        self.own: dict[str, frozenset[str]] = {}
        for name in self._TABLES:
            table, own = {}, set()
            for key, value in getattr(first, name).items():
                method = value.method if name == "_auth_methods" else value
                if getattr(method, "__self__", None) is first:
                    own.add(key)
                    method = method.__func__
                table[key] = value._replace(method=method) \
                    if name == "_auth_methods" else method
            self.tables[name], self.own[name] = table, frozenset(own)
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
        # Binding some 30 methods for every connection was a twentieth of an AUTH-only
        # connection's CPU; a connection looks up five or six.
        for name in self._TABLES:
            own = self.own[name]
            setattr(protocol, name, MethodTable(self.tables[name], own, protocol)
                    if own else self.tables[name])
        protocol.command_size_limits.clear()  # a class attribute SMTP.__init__ resets
        self.log.info(self.mechanisms)


class MethodTable(Mapping):
    """One of aiosmtpd's tables of methods (`_smtp_methods`, `_auth_methods`) for one
    connection: the listener's shared table, with the protocol's own methods bound to
    this connection when looked up. aiosmtpd reads these tables only (get, [], in,
    keys, items)."""

    __slots__ = ("_own", "_protocol", "_table")

    def __init__(self, table: dict[str, Any], own: frozenset[str], protocol: RelaySMTP):
        self._table, self._own, self._protocol = table, own, protocol

    def __getitem__(self, key: str) -> Any:
        value = self._table[key]
        if key not in self._own:
            return value
        if isinstance(value, tuple):  # _auth_methods: (method, is_builtin)
            method = types.MethodType(value.method, self._protocol)  # type: ignore[attr-defined]
            return value._replace(method=method)  # type: ignore[attr-defined]
        return types.MethodType(value, self._protocol)

    def __iter__(self) -> Iterator[str]:
        return iter(self._table)

    def __len__(self) -> int:
        return len(self._table)

    def __contains__(self, key: object) -> bool:
        return key in self._table


class LateReply(str):
    """MAIL's reply while the upstream MAIL waits to go with the first RCPT: the client
    pipelined them and reads both replies together, so they share one upstream round
    trip (Forwarder.prepare). The text is provisional. push holds it and writes what
    `send` returns: the upstream's verdict, which that RCPT brought back, or which
    `send` asks for then if no RCPT took the MAIL along."""

    _send: Callable[[str | None], Awaitable[str]]  # the MAIL, with a recipient's RCPT
    verdict: str | None  # MAIL's real reply, once the upstream gave it

    def __new__(cls, provisional: str,
                send: Callable[[str | None], Awaitable[str]]) -> typing.Self:
        reply = super().__new__(cls, provisional)
        reply._send, reply.verdict = send, None
        return reply

    async def send(self, recipient: str | None = None) -> str:
        """The MAIL upstream, once, with `recipient`'s RCPT when given; its reply."""
        if self.verdict is None:
            self.verdict = await self._send(recipient)
        return self.verdict


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


class RelayEnvelope(Envelope):
    """aiosmtpd's Envelope, plus the data as the client sent it."""

    smtp_data: bytes = b""  # still dot-stuffed, without the final ".<CRLF>" (smtp_DATA)


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

    session: RelaySession | None  # aiosmtpd's attributes, with the relay's types
    envelope: RelayEnvelope | None

    def _create_envelope(self) -> RelayEnvelope:
        return RelayEnvelope()

    def current(self) -> tuple[RelaySession, RelayEnvelope]:
        """The session and envelope, which exist from connection_made on (every
        command handler runs after it). A method, not a property: aiosmtpd's
        inspect.getmembers reads every property of a new protocol."""
        assert self.session is not None and self.envelope is not None
        return self.session, self.envelope

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
        self.client = Client()  # the connection's, across STARTTLS
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
    _late: LateReply | None = None  # MAIL's, to follow _unsent once it is known
    _awaiting_proxy = False  # reading the PROXY header (PROXY_PROTOCOL)
    _in_group = False  # answering RSET, MAIL or RCPT

    smtp_RSET = _answered_in_groups(SMTP.smtp_RSET)  # smtp_MAIL: see below
    smtp_RCPT = _answered_in_groups(SMTP.smtp_RCPT)

    async def _handle_client(self) -> None:
        # The connection checker: before the greeting, refuse clients from outside
        # ALLOWED_CLIENT_NETWORKS, over MAX_CONNECTIONS_PER_IP, and addresses locked
        # out for guessing passwords. Behind a load balancer (PROXY_PROTOCOL) the
        # PROXY header comes first (on SMTPS SMTPSAcceptor read it before TLS), and
        # every check is about the address it names.
        session, _ = self.current()
        server = self._relay_server
        if server.config.proxy_protocol and not self.implicit_tls:
            self._awaiting_proxy = True  # the idle timer waits: the header has its own
            try:
                proxy = await read_proxy_header(server, self.client, self._reader)
            except asyncio.CancelledError:  # aiosmtpd's eof_received: the peer left
                self._close_silently()
                raise
            finally:
                self._awaiting_proxy = False
            if proxy is None:
                self._close_silently()
                return
            self._reset_timeout()  # the client's idle time starts now
            session.proxy_data = proxy
            if not server.claim_address(self, self.client.peer_ip):
                self.over_ip_limit = True
        refusal = await server.connection_refusal(session, self.over_ip_limit)
        if refusal is not None:
            self._hang_up(refusal.encode() + b"\r\n")
            return
        self._greeted_at = time.monotonic()
        await super()._handle_client()

    def _before_proxy_header(self) -> bool:
        return (self._relay_server.config.proxy_protocol and not self.implicit_tls
                and self.session is not None and self.session.proxy_data is None)

    def eof_received(self) -> bool | None:
        # aiosmtpd cancels its handler at EOF; one cancelled before it began to read
        # the PROXY header would leave the connection open until the idle timer.
        if self._before_proxy_header() and not self._awaiting_proxy:
            self._drop_before_header("closed before a whole PROXY header")
        return super().eof_received()

    def _drop_before_header(self, reason: str) -> None:
        self._relay_server.metrics.connections_refused.labels("proxy_header").inc()
        log_event(logging.WARNING, "proxy-header-invalid", peer=self.client.peer_ip,
                  reason=reason, then="dropped")
        self._close_silently()

    def _close_silently(self) -> None:
        transport = self.transport
        if transport is not None and not self._transport_closing():
            transport.close()

    async def smtp_AUTH(self, arg: str) -> None:
        # SMTPAuthHandler makes the whole decision; aiosmtpd runs the exchange between
        # its checks before (refusal) and after (authenticate).
        authenticator, (session, envelope) = self._relay_server.authenticator, self.current()
        verdict = await authenticator.refusal(session, bool(envelope.mail_from))
        if verdict is None:
            await super().smtp_AUTH(arg)  # parses the exchange; SMTPAuthHandler captures
            credentials = authenticator.take_credentials(session)
            if credentials is None:
                return  # aiosmtpd already answered (syntax error, abort, already done)
            verdict = await authenticator.authenticate(session, *credentials)
        reply, hang_up = verdict
        if hang_up:
            self._hang_up(reply.encode() + b"\r\n")
        else:
            await self.push(reply)

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
            await self.push(replies.AUTH_LINE_TOO_LONG.format())
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
        if path is not None and self.current()[0].host_name:
            _, parameters = self._getaddr(path)
            for parameter in (parameters or "").upper().split():
                name, equals, value = parameter.partition("=")
                if name == "SIZE" and equals and not (value.isascii() and value.isdigit()):
                    await self.push(replies.SIZE_SYNTAX.format())
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
        if self._late is not None:  # MAIL's reply goes first: its verdict now
            late, self._late = self._late, None
            self._unsent += self._encode(await late.send()) + b"\r\n"
        if isinstance(status, LateReply):
            if self._next_command_here():
                self._late = status  # the next reply brings its verdict along
                return
            status = await status.send()  # nothing follows to wait for after all
        reply = status if isinstance(status, bytes) else self._encode(status)
        if reply[3:4] == b"-" or self._next_command_here():
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
                self._hang_up_with(replies.TOO_MANY_ERRORS, refused=self._refused_commands)
                raise asyncio.CancelledError

    def _encode(self, reply: str) -> bytes:
        return reply.encode("utf-8" if self.enable_SMTPUTF8 else "ascii")

    def _next_command_here(self) -> bool:
        """Answering RSET, MAIL or RCPT, and the next command of the pipelined group
        is already here: the reply waits to go out with the next (see push)."""
        return self._in_group and b"\n" in self._reader._buffer  # type: ignore[attr-defined]

    def pipelined(self, verb: bytes) -> bool:
        """The client's next command is already here and is `verb` (upper case): it
        reads the reply now being made together with that command's (RFC 2920)."""
        pending = self._reader._buffer  # type: ignore[attr-defined]
        return self._next_command_here() and \
            bytes(pending[:len(verb) + 1]).upper() == verb + b" "

    async def auth_CRAM__MD5(self, _: Any, args: list[str]) -> AuthResult:
        """RFC 2195; offered only when AUTH_MECHANISMS asks for it."""
        if len(args) > 1:
            await self.push(replies.CRAM_MD5_INITIAL.format())
            return AuthResult(success=False, handled=True)
        challenge = f"<{secrets.token_hex(8)}.{int(time.time())}@{self.hostname}>"
        response = await self.challenge_auth(challenge)
        if response is MISSING:
            return AuthResult(success=False, handled=True)
        login, _, digest = response.rpartition(b" ")
        return self._authenticate("CRAM-MD5", (login, challenge.encode(), digest))

    def _create_session(self) -> RelaySession:
        return RelaySession(self.loop, self.client)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # After STARTTLS aiosmtpd makes a new session; self.client carries over what
        # the checker decided (AUTH, and so a user's policy, must come again over TLS).
        if not self.connected and not self.client.via:  # (SMTPS behind a proxy: set)
            self.client.peer_ip = peer_address(transport)
        super().connection_made(transport)
        if not self.connected:  # the first time (STARTTLS comes through here again)
            self.connected = True
            if not self._relay_server.config.proxy_protocol:  # else once it is read
                self._relay_server.claim_address(self, self.client.peer_ip)

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
            self.session.touch()
        super().data_received(data)

    def _reset_timeout(self, duration: float | None = None) -> None:
        now = time.monotonic()
        command = False
        if duration is None and self.session is not None:  # aiosmtpd: a valid command
            self.session.touch()
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
        session, envelope = self.current()
        if not envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        session.receiving_data = True
        try:
            stuffed = await self._read_data()
        except (asyncio.CancelledError, asyncio.IncompleteReadError):
            self._writer.close()
            raise asyncio.CancelledError from None
        finally:
            session.receiving_data = False
        if stuffed is None:
            status = self._relay_server.metrics.record(replies.TOO_MUCH_DATA, session)
        elif await self._has_long_line(stuffed):
            status = self._relay_server.metrics.record(replies.LINE_TOO_LONG, session)
        else:
            # RFC 5321 4.5.2: remove the transparency dot from lines that start with one.
            content = stuffed.replace(b"\r\n.", b"\r\n")
            if content.startswith(b"."):
                content = content[1:]
            envelope.content = envelope.original_content = content
            envelope.smtp_data = stuffed
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
        reader: Any = self._reader  # its private buffer and limit (pinned aiosmtpd)
        # The DATA line's own CRLF begins the terminator of an empty message, so put
        # one back in front: then a single separator covers every case.
        reader._buffer[0:0] = b"\r\n"
        saved_limit, too_big = reader._limit, False
        reader._limit = (self.data_size_limit or 0) + 5  # always set here (MAX_MESSAGE_SIZE)
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
        if self._awaiting_proxy:  # read_proxy_header's own deadline drops it, silently
            return
        if self._before_proxy_header():  # (never began to read it)
            self._drop_before_header("no PROXY header in time")
            return
        session = self.session
        now = time.monotonic()
        idle = now - (session.active_at if session is not None else 0.0)
        deadline = self._auth_deadline()
        busy = session is not None and session.busy
        if busy or (idle < self._timeout_duration and (deadline is None or now < deadline)):
            self._reset_timeout(max(0.05, self._timeout_duration - idle))
            return
        if idle >= self._timeout_duration:
            self._hang_up_with(replies.IDLE_TIMEOUT)
        else:
            self._hang_up_with(replies.LOGIN_TIMEOUT, seconds=self._timeout_duration)

    def _hang_up_with(self, reply: replies.Reply, **fields: Any) -> None:
        self._hang_up(self._relay_server.metrics.record(reply, self.session, **fields)
                      .encode() + b"\r\n")

    def _hang_up(self, reply: bytes) -> None:
        """Say why and close. close() waits for the write buffer to drain, so a client
        that never reads would keep its connection (and MAX_CONNECTIONS slot) forever:
        whatever cannot be sent at once is dropped."""
        transport = typing.cast("asyncio.Transport | None", self.transport)
        if transport is None or self._transport_closing():
            return  # closed once already (a second close() breaks a TLS transport)
        transport.write(self._unsent + reply)  # a late MAIL reply (never sent): dropped
        self._unsent, self._late = b"", None
        transport.close()
        if transport.get_write_buffer_size():
            transport.abort()

    @syntax("STARTTLS", when="tls_context")
    async def smtp_STARTTLS(self, arg: str) -> None:
        if self.encrypted:  # RFC 3207: no TLS inside TLS (aiosmtpd would try)
            await self.push(replies.ALREADY_TLS.format())
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
            return replies.TLS_FAILED.format()  # aiosmtpd closes; nothing sent
        log.exception("unexpected error peer=%s", getattr(self.session, "peer_ip", "?"))
        return replies.INTERNAL_ERROR.format()

    @property
    def in_flight(self) -> bool:
        """A message is on its way: its data arriving, or the upstream answering."""
        return self.session is not None and (self.session.busy
                                             or self.session.receiving_data)

    @property
    def in_transaction(self) -> bool:
        """A message has begun (MAIL accepted) and is not finished: the drain lets
        it finish rather than make the client start it again elsewhere."""
        return self.in_flight or bool(self.envelope is not None
                                      and self.envelope.mail_from)

    def say_goodbye(self) -> None:
        """At shutdown, between messages: tell the client and close."""
        if not self.in_transaction:
            self._hang_up(replies.SHUTTING_DOWN.format().encode() + b"\r\n")


def peer_address(transport: asyncio.BaseTransport) -> str:
    """The socket's peer address, as a string."""
    peer = transport.get_extra_info("peername")
    return peer[0] if isinstance(peer, tuple) else str(peer)


# At most this long (and never longer than TIMEOUT) for the PROXY header: a load
# balancer sends it at once, before any byte of the client's.
PROXY_HEADER_SECONDS = 10.0


async def read_proxy_header(server: SMTPRelayServer, client: Client,
                            reader: asyncio.StreamReader) -> ProxyData | None:
    """PROXY_PROTOCOL: the PROXY v1/v2 header, read with aiosmtpd's own parser. On
    success the client's address becomes the header's source (client.via keeps the
    load balancer's); None, after one log line, when the connection must be dropped:
    from outside PROXY_TRUSTED_NETWORKS, or a malformed, missing or late header. (A v2 LOCAL or v1 UNKNOWN header, the
    balancer's own health check, keeps the socket's address, as the spec says.)"""
    client.via = client.via or client.peer_ip
    if not server.proxy_source_allowed(client.via):
        return None
    error = ""
    try:
        async with asyncio.timeout(min(PROXY_HEADER_SECONDS, server.config.timeout)):
            proxy = await get_proxy(reader)
    except TimeoutError:
        error = "no PROXY header in time"
    except (asyncio.IncompleteReadError, ConnectionError):
        error = "closed before a whole PROXY header"
    except asyncio.CancelledError:  # aiosmtpd cancels its handler at the peer's EOF
        log_event(logging.WARNING, "proxy-header-invalid", peer=client.via,
                  reason="closed before a whole PROXY header", then="dropped")
        raise
    else:
        if not proxy.valid:
            error = proxy.error or "not a PROXY header"
    if error:
        server.metrics.connections_refused.labels("proxy_header").inc()
        log_event(logging.WARNING, "proxy-header-invalid", peer=client.via,
                  reason=error, then="dropped")
        return None
    if proxy.src_addr is not None and proxy.command != 0:  # 0: v2 LOCAL
        address = str(proxy.src_addr)
        client.peer_ip = address.removeprefix("::ffff:") if "." in address else address
    return proxy


class ProxyHeaderReader(asyncio.Protocol):
    """SMTPS behind a load balancer: the PROXY header comes before the TLS handshake.
    This protocol holds the raw connection until it is read, then hands the
    connection, and any bytes after the header, to `then`."""

    def __init__(self, server: SMTPRelayServer, protocol: RelaySMTP,
                 then: Callable[[asyncio.BaseTransport, bytes], None]):
        self._server, self._protocol, self._then = server, protocol, then
        self._reader = asyncio.StreamReader(limit=2048)
        self._task: asyncio.Task[ProxyData | None] | None = None
        self._transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        self._task = asyncio.ensure_future(read_proxy_header(
            self._server, self._protocol.client, self._reader))
        self._task.add_done_callback(self._header_read)

    def data_received(self, data: bytes) -> None:
        self._reader.feed_data(data)

    def eof_received(self) -> bool | None:
        self._reader.feed_eof()
        return None

    def connection_lost(self, error: Exception | None) -> None:
        self._reader.feed_eof()
        if self._task is not None and not self._task.done():
            self._task.cancel()
        self._server.connection_closed(self._protocol)

    def _header_read(self, task: asyncio.Task[ProxyData | None]) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if task.cancelled() or task.result() is None:
            transport.close()
            return
        rest = bytes(self._reader._buffer)  # type: ignore[attr-defined]
        self._then(transport, rest)


def listening_port(server: asyncio.AbstractServer) -> int:
    """The port a listener got (LISTEN_PORT=0 picks a free one)."""
    port: int = typing.cast(asyncio.Server, server).sockets[0].getsockname()[1]
    return port


def cannot_listen(variables: str, host: str, port: int, error: OSError) -> ConfigError:
    return ConfigError(f"{variables}: cannot listen on {host}:{port} "
                       f"({error.strerror or error}): expects a free port on a local "
                       "address")


class TooManyConnections(asyncio.Protocol):
    """Answers one connection over MAX_CONNECTIONS and hangs up. On SMTPS it hangs up
    without a word: the client expects a TLS handshake, and a refusal must not cost
    one."""

    def __init__(self, reply: str):
        self.reply = reply  # "" on SMTPS

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.reply:
            transport.write(self.reply.encode() + b"\r\n")  # type: ignore[attr-defined]
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
        protocol.client.peer_ip = peer_address(transport)
        if server.config.proxy_protocol:  # the header first, then TLS
            transport.set_protocol(ProxyHeaderReader(server, protocol, self._start_tls))
            transport.get_protocol().connection_made(transport)
            return
        self._start_tls(transport, b"")

    def _start_tls(self, transport: asyncio.BaseTransport, received: bytes) -> None:
        """The handshake; `received`: bytes that came after a PROXY header."""
        server, protocol = self._server, self._protocol
        if not server.claim_address(protocol, protocol.client.peer_ip):
            server.refused_over_ip_limit(None, protocol.claimed_ip)
            transport.set_protocol(self)
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
        while received:  # what the client sent after the header: its ClientHello
            buffer = tls.get_buffer(len(received))
            size = min(len(buffer), len(received))
            buffer[:size] = received[:size]
            tls.buffer_updated(size)
            received = received[size:]

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

