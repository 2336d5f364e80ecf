"""smtp-relay: a small, authenticated, domain-filtering SMTP relay.

Applications and devices on a private network send mail through it. A client must
authenticate (or connect from TRUSTED_NETWORKS); its envelope sender and every recipient
must be in an allowed domain; what passes is handed, command by command, to one upstream
SMTP server (Gmail, SES, a company MTA), and the client is told the upstream's own
verdict: `250` after DATA means the upstream has the message. With DELIVERY_MODE=queue
(or fallback, where the upstream cannot answer now) `250` means the message is durably
in the queue instead, and background workers deliver it.

The path of a message, and who owns each step:

    accept       SMTPRelayServer   a connection slot (MAX_CONNECTIONS, _PER_IP), or 421
    greeting     SMTPRelayServer   ALLOWED_CLIENT_NETWORKS, lock-outs, TRUSTED_NETWORKS
    AUTH         SMTPAuthHandler   mechanism, lock-out, password check -> the user
    MAIL         SMTPRelayHandler  authenticated? sender domain? rate? -> upstream MAIL
    RCPT         SMTPRelayHandler  recipient domain? count? rate?     -> upstream RCPT
    DATA         SMTPRelayHandler  smuggling, hops, From:, + Received: -> upstream DATA
    outcome      SMTPRelayHandler  exactly one `delivered`, `delivery-failed` or `queued`
    queued       Queue (delivery)  claim, upstream, record: delivered, deferred, bounced

Every reply the relay makes itself is named in relay/replies.py, and written down
(log line and metric) by one call, Metrics.record. Supporting code is in the `relay`
package, one module per concern: settings (the table of variables), replies, policy
(pure checks), users (passwords, lock-outs), ratelimit, upstream (the handshake, the
pooled upstream sessions, the Forwarder), observability (logs and metrics), protocol
(aiosmtpd's protocol with the relay's overrides, the typed session), operations
(HTTP, check, demo, hash-password), the queue: store (SQLite or PostgreSQL),
delivery (the workers, retries), bounce (RFC 3464 reports) and admin (CLI and API),
and where mail goes: routes (ROUTES_FILE, users' routes, RELAY_HOST lists) and mx
(direct delivery to recipient domains' MX hosts).

Run `python smtp_relay.py` to serve; `python smtp_relay.py demo` starts the relay in front
of a local demo upstream that prints what it receives; `check` tries the upstream
settings step by step; `hash-password` prints a bcrypt hash for SMTP_AUTH_PASSWORD_HASH; `queue list|show|retry|
hold|release|delete` looks after the queue (DELIVERY_MODE queue or fallback).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import functools
import ipaddress
import logging
import os
import signal
import ssl
import sys
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

import uvloop
from aiosmtpd.smtp import (
    SMTP,
    AuthResult,
)

from relay import replies
from relay.admin import QueueAPI, queue_command
from relay.delivery import Deliverer, DeliveryAgent, Queue, queue_message
from relay.mx import DNSFailure, MXDeliverer, MXSessionPool, hostname_looks_qualified
from relay.observability import (
    Metrics,
    log,
    log_event,
    session_user,
    setup_logging,
)
from relay.operations import (
    DEMO_ENV,
    HTTPEndpoint,
    check_command,
    hash_password,
    run_demo,
)
from relay.policy import (
    HEADER_SECTION_LIMIT,
    SAFE_HELO,
    AddressError,
    count_received_headers,
    declared_size,
    forbidden_in_data,
    header_block_end,
    header_from_domains,
    header_from_fields,
    header_section_end,
    parse_path,
    rfc5322_date,
)
from relay.protocol import (
    LateReply,
    RelayEnvelope,
    RelaySession,
    RelaySMTP,
    SMTPSAcceptor,
    TooManyConnections,
    cannot_listen,
    listening_port,
    new_message_id,
)
from relay.ratelimit import RateLimiter, StorageUnavailable, sender_key, storage_client
from relay.replies import upstream_reason
from relay.routes import MXDelivery, Router, RouteTable, SmartHost, domain_of
from relay.settings import (
    AUTH_MECHANISMS,
    DEFAULT_AUTH_PASSWORD,
    TLS_VERSIONS,
    Config,
    ConfigError,
    inbound_tls_context,
    load_config,
    redact_url,
)
from relay.store import NewMessage, Store, StoreError
from relay.upstream import Forwarder, UpstreamError, UpstreamPool
from relay.users import (
    AuthGuard,
    LockOuts,
    PasswordChecker,
    SharedAuthGuard,
    attempted_user,
    default_policy,
)
from relay.worker import DeliveryProcess

if TYPE_CHECKING:
    from relay.observability import LogHandler
    from relay.protocol import ProtocolTemplate
    from relay.replies import Reply
    from relay.users import User, UserPolicy


Verdict = tuple[str, bool]  # (the reply, hang up after it)

__all__ = [
    "Config",
    "ConfigError",
    "SMTPAuthHandler",
    "SMTPRelayHandler",
    "SMTPRelayServer",
    "load_config",
    "main",
]


class SMTPAuthHandler:
    """The whole AUTH decision: whether AUTH may happen now (not inside a transaction,
    not from a locked-out address), the check of the credentials (PLAIN, LOGIN,
    CRAM-MD5) against the users, the lock-out count, and the identity a session gets.

    aiosmtpd calls an authenticator synchronously, but a bcrypt check takes a good part
    of a second, so `__call__` only captures the credentials; the protocol's smtp_AUTH
    then awaits `authenticate`. Name and password are both compared in constant time,
    so timing says nothing about which was wrong.

    The password check itself (constant time, or bcrypt on a pool of its own) is
    users.PasswordChecker's.
    """

    def __init__(self, config: Config, guard: LockOuts, metrics: Metrics,
                 executor: concurrent.futures.Executor | None = None):
        self.config = config
        self.guard = guard  # failed AUTH per address: the lock-out (maybe in Redis)
        self.metrics = metrics
        self.passwords = PasswordChecker(config, executor)  # the users and their check
        self._counting: set[asyncio.Future[None]] = set()  # failures of clients gone

    @property
    def users(self) -> dict[str, User]:
        return self.passwords.users

    def reload(self, config: Config) -> int:
        """Re-read SMTP_USERS_FILE (SIGHUP). On error keep the old users and raise."""
        return self.passwords.reload(config)

    def __call__(self, server: SMTP, session: RelaySession, envelope: RelayEnvelope,
                 mechanism: str, auth_data: Any) -> AuthResult:
        session.credentials = (mechanism, auth_data)
        return AuthResult(success=False, handled=True)  # authenticate() answers

    async def refusal(self, session: RelaySession, in_transaction: bool
                      ) -> Verdict | None:
        """Before the exchange: may this client try AUTH now?"""
        if in_transaction:
            # RFC 4954 section 4; a trusted client that began MAIL without AUTH would
            # otherwise mix two policies in one transaction.
            return self.metrics.record(replies.AUTH_IN_TRANSACTION, session), False
        try:
            locked = await self.guard.is_locked(session.peer_ip)
        except StorageUnavailable:  # RATE_LIMIT_FAILURE=closed
            return self.metrics.record(replies.LIMITS_UNAVAILABLE, session,
                                       stage="AUTH"), False
        if locked:
            return self.metrics.record(replies.LOCKED_OUT, session), True
        session.credentials = None
        return None

    def _count_failure_later(self, address: str) -> None:
        """guard.failed(address) in a task of its own (the caller is being cancelled)."""
        async def count() -> None:
            try:
                await self.guard.failed(address)
            except StorageUnavailable:
                pass
        task = asyncio.ensure_future(count())
        self._counting.add(task)
        task.add_done_callback(self._counting.discard)

    @staticmethod
    def take_credentials(session: RelaySession) -> tuple[str, Any] | None:
        """What __call__ captured during aiosmtpd's exchange (None: aiosmtpd already
        answered: a syntax error, an abort)."""
        credentials, session.credentials = session.credentials, None
        return credentials

    async def authenticate(self, session: RelaySession, mechanism: str,
                           credentials: Any) -> Verdict:
        """Check the credentials; on success the session gets its user and policy."""
        # A failure is counted once the check says so, never before: clients of one
        # address checked at the same time (an application's workers, replicas behind
        # one NAT) must not lock it out between them while their checks run. A client
        # that leaves during its check (bcrypt runs on) is counted all the same.
        try:
            user = await self.passwords.verify(mechanism, credentials, session.peer_ip)
        except asyncio.CancelledError:
            log_event(logging.DEBUG, "auth-abandoned", session, mechanism=mechanism)
            self._count_failure_later(session.peer_ip)
            raise
        if user is not None:
            session.authenticated = True
            session.user = user.policy.name
            session.auth_data = user.policy.name
            session.user_policy = user.policy  # kept for the session, across reloads
            self.metrics.labelled(self.metrics.auth, "success").inc()
            return self.metrics.record(replies.AUTH_OK, session, mechanism=mechanism), \
                False
        self.metrics.labelled(self.metrics.auth, "failure").inc()
        try:
            locked_now = await self.guard.failed(session.peer_ip)
        except StorageUnavailable:  # closed, and Redis went down during the check
            locked_now = False
        reply = self.metrics.record(replies.AUTH_FAILED, session, mechanism=mechanism,
                                    attempted_user=attempted_user(mechanism, credentials))
        # A pause before each "no" slows guessing; it blocks only this client.
        await asyncio.sleep(self.config.auth_failure_delay)
        if locked_now:
            log_event(logging.ERROR, "auth-locked-out", session,
                      failures=self.config.auth_max_failures,
                      seconds=self.config.auth_failure_window)
            return replies.LOCKED_OUT.format(), True
        return reply, False


class SMTPRelayHandler:
    """aiosmtpd handler: the checks for each stage, then the upstream's verdict."""

    def __init__(self, config: Config, forwarder: Forwarder, rate_limiter: RateLimiter,
                 metrics: Metrics, queue: Queue | None = None,
                 routes: RouteTable | None = None,
                 mx_sessions: Callable[[str], UpstreamPool] | None = None):
        self.config = config
        self.routes = routes or RouteTable(config, load=False)  # ROUTES_FILE, users' routes
        # fallback: sessions to a recipient domain's MX for the synchronous part.
        self.mx_sessions = mx_sessions
        self.forwarder = forwarder
        self.rate_limiter = rate_limiter
        self.metrics = metrics
        self.queue = queue  # DELIVERY_MODE queue or fallback, or ARCHIVE on
        self.mode = config.delivery_mode

    async def handle_EHLO(self, server: SMTP, session: RelaySession, envelope: Any,
                          hostname: str, responses: list[str]) -> list[str]:
        session.host_name = hostname
        await self._abandon(session)
        # Replies come strictly in order (aiosmtpd handles one command at a time and
        # drops anything buffered across STARTTLS), so pipelining is safe to offer.
        responses.insert(-1, "250-PIPELINING")
        return responses

    async def handle_HELO(self, server: SMTP, session: RelaySession, envelope: Any,
                          hostname: str) -> str:
        session.host_name = hostname
        await self._abandon(session)
        return f"250 {server.hostname}"

    async def handle_MAIL(self, server: RelaySMTP, session: RelaySession,
                          envelope: RelayEnvelope,
                          address: str, mail_options: list[str]) -> str:
        policy = session.policy
        if policy is None:  # neither authenticated nor trusted
            return self.metrics.record(replies.AUTH_REQUIRED, session)
        await self._abandon(session)
        session.message_id = new_message_id()
        session.started = time.monotonic()
        try:
            sender = parse_path(address, smtputf8="SMTPUTF8" in mail_options)
        except AddressError as error:
            return self.metrics.record(error.kind, session, event="sender-refused",
                                       detail=str(error), address=address)
        if not policy.allowed_from_domains.allows(sender.domain):
            return self.metrics.record(replies.SENDER_DOMAIN, session,
                                       address=str(sender), domain=sender.domain)
        if self.rate_limiter.message_limits(policy.rate_limit_per_minute):
            try:
                limit = await self.rate_limiter.check_message(
                    sender_key(session), policy.rate_limit_per_minute)
            except StorageUnavailable:  # logged once per outage; open: no limit now
                if self.rate_limiter.outage.closed:
                    return self.metrics.record(replies.LIMITS_UNAVAILABLE, session,
                                               stage="MAIL", **{"from": str(sender)})
                limit = None
            if limit is not None:
                return self.metrics.record(replies.RATE_LIMITED, session, **limit,
                                           **{"from": str(sender)})
        session.queue_recipients = []
        session.queue_only = self.mode == "queue"
        session.pending_mail, session.route, session.route_domain = None, None, ""
        session.late_mail = None
        destination = None if session.queue_only else \
            self.routes.at_mail(session.user, str(sender))
        if not session.queue_only and not isinstance(destination, SmartHost):
            # fallback: the route depends on the recipients (to:, mx); MAIL goes
            # upstream with the first recipient whose route is a smart host.
            session.pending_mail = (str(sender), list(mail_options))
            reply = replies.SENDER_OK.format()
        elif session.queue_only:  # store first: the upstream is not asked now
            assert self.queue is not None
            full = self.queue.room(declared_size(mail_options))
            if full is not None:
                return self.metrics.record(replies.QUEUE_FULL, session, detail=full,
                                           **{"from": str(sender)})
            reply = replies.SENDER_OK.format()
        else:
            session.route = destination
            # RELAY_*'s destination is the Forwarder's own default.
            routed = () if destination == self.routes.default else (destination,)
            try:
                if self.mode == "sync" and server.pipelined(b"RCPT"):
                    reply = await self.forwarder.prepare(
                        session, str(sender), mail_options, *routed) or \
                        self._late_mail(session, envelope)
                else:
                    reply = await self.forwarder.begin(session, str(sender), mail_options,
                                                       *routed)
            except UpstreamError as error:
                if self.mode != "fallback":
                    return self.metrics.record(error.kind, session, detail=error.detail,
                                               stage="MAIL", **{"from": str(sender)})
                reply = error.reply
            if self.mode == "fallback" and reply[:1] == "4":
                # The upstream cannot answer now: the whole message goes to the queue.
                session.queue_only = True
                log_event(logging.WARNING, "upstream-unavailable", session, stage="MAIL",
                          upstream=reply, then="queue")
                reply = replies.SENDER_OK.format()
        if reply.startswith("250"):
            envelope.mail_from = str(sender)
            envelope.mail_options.extend(mail_options)
            if not isinstance(reply, LateReply):  # else once the upstream said so
                log_event(logging.DEBUG, "sender-accepted", session,
                          **{"from": str(sender)})
        else:
            self.metrics.record_upstream_refusal("sender-refused", reply, session,
                                                 address=str(sender))
        return reply

    def _late_mail(self, session: RelaySession, envelope: RelayEnvelope) -> LateReply:
        """MAIL's reply when the MAIL goes upstream with the first RCPT (the client
        pipelined them): see Forwarder.prepare."""
        session.late_mail = LateReply(replies.SENDER_OK.format(), functools.partial(
            self._send_late_mail, session, envelope))
        return session.late_mail

    async def _send_late_mail(self, session: RelaySession, envelope: RelayEnvelope,
                              recipient: str | None) -> str:
        """The MAIL that waited for the first RCPT, with that RCPT when given. Returns
        MAIL's reply, logged and counted as handle_MAIL would have; a refused MAIL
        leaves the envelope without a sender, as if refused at once."""
        sender = str(envelope.mail_from)  # handle_MAIL set it
        try:
            reply = await self.forwarder.send_mail(session, recipient)
        except UpstreamError as error:
            reply = self.metrics.record(error.kind, session, detail=error.detail,
                                        stage="MAIL", **{"from": sender})
        else:
            if reply.startswith("250"):
                log_event(logging.DEBUG, "sender-accepted", session, **{"from": sender})
                return reply
            self.metrics.record_upstream_refusal("sender-refused", reply, session,
                                                 address=sender)
        envelope.mail_from = None
        envelope.mail_options.clear()
        return reply

    async def handle_RCPT(self, server: RelaySMTP, session: RelaySession,
                          envelope: RelayEnvelope,
                          address: str, rcpt_options: list[str]) -> str:
        fields: dict[str, Any] = {"from": envelope.mail_from}
        policy = session.policy
        if policy is None or (session.transaction is None and not session.queue_only
                              and session.pending_mail is None):
            return self.metrics.record(replies.UPSTREAM_TRANSACTION_LOST, session,
                                       detail="start the message again", **fields)
        if len(envelope.rcpt_tos) >= self.config.max_recipients:
            return self.metrics.record(replies.TOO_MANY_RECIPIENTS, session, **fields,
                                       address=address, limit=self.config.max_recipients)
        try:
            recipient = parse_path(address, smtputf8=envelope.smtp_utf8)
        except AddressError as error:
            return self.metrics.record(error.kind, session, event="recipient-refused",
                                       detail=str(error), **fields, address=address)
        if not policy.allowed_to_domains.allows(recipient.domain):
            return self.metrics.record(replies.RECIPIENT_DOMAIN, session, **fields,
                                       address=str(recipient), domain=recipient.domain)
        if self.rate_limiter.recipient_limit is not None:
            try:
                limit = await self.rate_limiter.check_recipient(sender_key(session))
            except StorageUnavailable:
                if self.rate_limiter.outage.closed:
                    return self.metrics.record(replies.LIMITS_UNAVAILABLE, session,
                                               stage="RCPT", **fields, to=str(recipient))
                limit = None
            if limit is not None:
                return self.metrics.record(replies.RATE_LIMITED, session, **limit,
                                           **fields, to=str(recipient))
        refused = None if session.queue_only else \
            await self._route_recipient(session, envelope, str(recipient))
        if refused is not None:  # the route refused the sender, or the domain all mail
            self.metrics.record_upstream_refusal("recipient-refused", refused, session,
                                                 **fields, address=str(recipient))
            return refused
        if session.queue_only or str(recipient) in session.queue_recipients:
            if str(recipient) not in session.queue_recipients:
                session.queue_recipients.append(str(recipient))
            reply = replies.RECIPIENT_OK.format()
        else:
            late = session.late_mail  # MAIL goes upstream with this RCPT
            if late is not None and late.verdict is None and not (
                    await late.send(str(recipient))).startswith("250"):
                return replies.NO_SENDER.format()
            try:
                reply = await self.forwarder.add_recipient(session, str(recipient))
            except UpstreamError as error:
                if self.mode != "fallback":
                    return self.metrics.record(error.kind, session, detail=error.detail,
                                               stage="RCPT", **fields, to=str(recipient))
                reply = error.reply
            if self.mode == "fallback" and reply[:1] == "4":
                # This recipient waits in the queue; the others still go upstream.
                log_event(logging.WARNING, "upstream-unavailable", session, stage="RCPT",
                          to=str(recipient), upstream=reply, then="queue")
                session.queue_recipients.append(str(recipient))
                reply = replies.RECIPIENT_OK.format()
        if reply[:1] == "2":
            envelope.rcpt_tos.append(str(recipient))
        else:
            self.metrics.record_upstream_refusal("recipient-refused", reply, session,
                                                 **fields, address=str(recipient))
        return reply

    async def _route_recipient(self, session: RelaySession, envelope: RelayEnvelope,
                               recipient: str) -> str | None:
        """fallback with routes by recipient: the first recipient's route (a smart
        host, or its domain's MX) begins the upstream transaction; a later recipient
        on another route waits in the queue (queue_recipients), so a message whose
        recipients share one route is still forwarded synchronously. Returns the
        refusal for this recipient (the route refused the sender; a domain that
        takes no mail), or None."""
        if not self.routes.needs_split():
            return None
        destination = self.routes.for_recipient(session.user, envelope.mail_from or "",
                                                recipient)
        domain = domain_of(recipient) if isinstance(destination, MXDelivery) else ""
        if session.pending_mail is None:
            if (destination, domain) != (session.route, session.route_domain):
                session.queue_recipients.append(recipient)
            return None
        sender, options = session.pending_mail
        if isinstance(destination, SmartHost):
            begin = self.forwarder.begin(session, sender, options, destination)
        elif self.mx_sessions is not None:  # the first recipient's MX, synchronously
            begin = self.forwarder.begin(session, sender, options,
                                         pool=self.mx_sessions(domain))
        else:
            session.queue_recipients.append(recipient)
            return None
        try:
            reply = await begin
        except UpstreamError as error:
            reply = error.reply
        except DNSFailure as failure:  # a 5xx (null MX, NXDOMAIN): this recipient, never
            reply = f"{failure.code} {failure.text}"
        if reply[:1] == "2":
            session.pending_mail, session.route = None, destination
            session.route_domain = domain
            return None
        if reply[:1] == "4":  # cannot answer now: the whole message goes to the queue
            log_event(logging.WARNING, "upstream-unavailable", session, stage="MAIL",
                      upstream=reply, then="queue")
            session.pending_mail, session.queue_only = None, True
            return None
        return reply

    async def handle_DATA(self, server: RelaySMTP, session: RelaySession,
                          envelope: RelayEnvelope) -> str:
        content: bytes = envelope.smtp_data  # as the client sent it: dot-stuffed
        fields: dict[str, Any] = {"from": envelope.mail_from, "to": envelope.rcpt_tos,
                                  "size": len(envelope.original_content or b"")}
        policy = session.policy
        refusal = self._refuse_content(content, policy) if policy is not None else None
        if refusal is None and (policy is None or (
                session.transaction is None and not session.queue_only
                and len(session.queue_recipients) < len(envelope.rcpt_tos))):
            refusal = replies.UPSTREAM_TRANSACTION_LOST, {"detail": "send the message "
                                                          "again"}
        if refusal is not None:
            self.forwarder.finish(session, reset=True)
            kind, details = refusal
            return self.metrics.record(kind, session, **fields, **details)
        header = self._received_header(server, session, envelope)
        # When the client leaves, aiosmtpd cancels this hook; the upstream may still
        # accept the message. The delivery goes on by itself and logs its outcome.
        delivery = asyncio.ensure_future(self._deliver(session, envelope, header, fields))
        try:
            return await asyncio.shield(delivery)
        except asyncio.CancelledError:
            self.forwarder.outlive(delivery)
            raise

    async def _deliver(self, session: RelaySession, envelope: RelayEnvelope, header: bytes,
                       fields: dict[str, Any]) -> str:
        """The data upstream, or to the queue; one `delivered`, `delivery-failed` or
        `queued` line for each part."""
        queued = session.queue_recipients
        if session.queue_only or len(queued) == len(envelope.rcpt_tos):
            self.forwarder.finish(session, reset=True)  # fallback: nothing goes upstream
            return await self._enqueue(session, envelope, header, envelope.rcpt_tos, fields)
        upstream_recipients = [r for r in envelope.rcpt_tos if r not in queued]
        fields = {**fields, "to": upstream_recipients}
        sent_at = time.monotonic()
        try:
            accepted, reply = await self.forwarder.send_data(
                session, header + envelope.smtp_data)
        except UpstreamError as error:
            accepted, reply = False, error.reply
        now = time.monotonic()
        self.metrics.upstream_duration.observe(now - sent_at)
        duration_ms = round((now - session.started) * 1000, 1)
        if not accepted and self.mode == "fallback" and reply[:1] == "4":
            log_event(logging.WARNING, "upstream-unavailable", session, stage="DATA",
                      upstream=reply, then="queue")
            return await self._enqueue(session, envelope, header, envelope.rcpt_tos,
                                       fields)
        if accepted:
            self.metrics.delivered(session, len(upstream_recipients), fields["size"])
            log_event(logging.INFO, "delivered", session, **fields, upstream=reply,
                      duration_ms=duration_ms)
            if queued:  # fallback: the others wait in the queue
                return await self._enqueue(session, envelope, header, queued, fields,
                                           upstream=reply)
            # The client's 250 names the relay's id too: one grep finds the log line.
            client_reply = f"{reply} (smtp-relay id {session.message_id})"
        else:
            self.metrics.rejected(upstream_reason(reply), session)
            log_event(logging.ERROR, "delivery-failed", session, **fields,
                      upstream=reply, duration_ms=duration_ms)
            client_reply = reply
        if self.config.archive != "off" and (accepted or reply[:1] == "5"):
            await self._archive(session, envelope, header, upstream_recipients,
                                "delivered" if accepted else "failed", reply)
        session.message_id = None  # later lines about the connection are not about it
        return client_reply

    async def _enqueue(self, session: RelaySession, envelope: RelayEnvelope, header: bytes,
                       recipients: list[str], fields: dict[str, Any],
                       upstream: str | None = None) -> str:
        """Commit the message for `recipients` to the queue: 250 only once it is
        durably stored. `upstream`: the upstream's 250 for the other recipients."""
        assert self.queue is not None  # queue and fallback modes have one
        fields = {**fields, "to": recipients}
        message = self._for_the_store(session, envelope, header, recipients)
        full = self.queue.room(len(message.body))
        if full is not None:
            reply = self.metrics.record(replies.QUEUE_FULL, session, **fields, detail=full)
        else:
            try:
                await self.queue.commit(message)
            except StoreError as error:
                reply = self.metrics.record(replies.QUEUE_FAILED, session, **fields,
                                            detail=str(error))
            else:
                kind = replies.QUEUED if upstream is None else replies.QUEUED_PARTLY
                reply = self.metrics.record(kind, session, **fields, id=message.id,
                                            upstream=(upstream or "")[4:],
                                            count=len(recipients))
        session.message_id = None
        return reply

    async def _archive(self, session: RelaySession, envelope: RelayEnvelope, header: bytes,
                       recipients: list[str], status: str, reply: str) -> None:
        """ARCHIVE in sync mode: the record of a message the upstream decided on."""
        assert self.queue is not None  # ARCHIVE on opens the store
        message = self._for_the_store(
            session, envelope, header, recipients,
            outcomes={recipient: (status, reply) for recipient in recipients})
        try:
            await self.queue.commit(message)
        except StoreError as error:
            log_event(logging.ERROR, "archive-failed", session, reason=str(error))

    @staticmethod
    def _for_the_store(session: RelaySession, envelope: RelayEnvelope, header: bytes,
                       recipients: list[str], **extra: Any) -> NewMessage:
        """The message as the store keeps it: our Received: header, then the data
        without its dot-stuffing."""
        return queue_message(session.message_id or new_message_id(),
                             session_user(session), session.peer_ip,
                             envelope.mail_from or "", recipients,
                             header + (envelope.original_content or b""), **extra)

    async def handle_RSET(self, server: SMTP, session: RelaySession, envelope: Any) -> str:
        await self._abandon(session)
        return replies.OK.format()

    async def _abandon(self, session: RelaySession) -> None:
        """The client gave up on its transaction: reset it upstream too."""
        if session.transaction is not None:
            log_event(logging.DEBUG, "transaction-abandoned", session)
            self.forwarder.finish(session, reset=True)

    def _refuse_content(self, content: bytes, policy: UserPolicy
                        ) -> tuple[Reply, dict[str, Any]] | None:
        """Why the data cannot go upstream: the reply and its fields, or None."""
        # No copies of the data here, and no work that grows with more than the first
        # HEADER_SECTION_LIMIT bytes past a few byte scans: this runs on the loop.
        problem = forbidden_in_data(content)
        if problem is not None:
            return replies.SMUGGLING, {"problem": problem}
        hops = count_received_headers(
            content, min(header_block_end(content), HEADER_SECTION_LIMIT))
        if hops > self.config.max_hops:
            return replies.MAIL_LOOP, {"hops": hops, "limit": self.config.max_hops}
        if self.config.check_header_from:
            end = header_section_end(content, HEADER_SECTION_LIMIT)
            if end is None:
                return replies.HEADERS_TOO_LARGE, {
                    "limit": HEADER_SECTION_LIMIT // 1024 // 1024}
            try:
                domains = header_from_domains(header_from_fields(content, end))
            except AddressError as error:
                return replies.HEADER_FROM, {"detail": str(error)}
            for domain in domains:
                if not policy.allowed_from_domains.allows(domain):
                    return replies.HEADER_FROM_DOMAIN, {"domain": domain}
        return None

    def _received_header(self, server: RelaySMTP, session: RelaySession,
                         envelope: RelayEnvelope) -> bytes:
        protocol = "ESMTP" if session.extended_smtp else "SMTP"
        if server.encrypted:
            protocol += "S"
        if session.authenticated:
            protocol += "A"
        helo = SAFE_HELO.sub("?", session.host_name or "unknown")[:128]
        recipient = (f"\r\n\tfor <{envelope.rcpt_tos[0]}>"
                     if len(envelope.rcpt_tos) == 1 else "")
        header = (f"Received: from {helo} ([{session.peer_ip}])\r\n"
                  f"\tby {self.config.smtp_hostname} (smtp-relay) with {protocol} "
                  f"id {session.message_id}{recipient};\r\n"
                  f"\t{rfc5322_date(int(time.time()))}\r\n")
        return header.encode("utf-8", "replace")


class SMTPRelayServer:
    """The listening relay: builds the handler and upstream side, caps connections,
    and shuts down without cutting a delivery short."""

    def __init__(self, config: Config):
        self.config = config
        self.metrics = Metrics()
        self.metrics.connections_open.set_function(lambda: len(self.connections))
        self.forwarder = Forwarder(config, self.metrics)
        self.rate_limiter = RateLimiter(config, metrics=self.metrics)
        # ROUTES_FILE and the users' routes; a split in sync mode is a ConfigError here.
        self.routes = RouteTable(config)
        self.router = Router(self.routes, self.forwarder.pools, lambda: MXDeliverer(
            config, self.forwarder.executor, self.metrics))
        self.queue: Queue | None = None
        if config.delivery_mode != "sync" or config.archive != "off" or \
                config.api_token or config.api_read_token:
            # Queued deliveries run in a process of their own (relay.worker), which
            # reads the routes itself; in sync mode the queue is only the archive and
            # delivers nothing.
            deliverer: DeliveryAgent = (
                DeliveryProcess(config, self.metrics) if config.delivery_mode != "sync"
                else Deliverer(config, self.forwarder.pool, self.metrics, self.router))
            self.queue = Queue(config, open_store(config), deliverer, self.metrics)
            self.queue.alone = lambda: len(self.connections) == 1
        self.handler = SMTPRelayHandler(
            config, self.forwarder, self.rate_limiter, self.metrics, self.queue,
            self.routes, lambda domain: MXSessionPool(
                config, self.forwarder.executor, self.metrics, self.router.mx, domain))
        self.default_policy = default_policy(config)
        # Lock-outs live where the rate limits do: in a shared Redis, every replica's.
        redis = storage_client(self.rate_limiter.storage)
        self.auth_guard: LockOuts = (
            SharedAuthGuard(redis, self.rate_limiter.outage, config.auth_max_failures,
                            config.auth_failure_window) if redis is not None
            else AuthGuard(config.auth_max_failures, config.auth_failure_window))
        self.draining = False  # SIGTERM: /readyz says 503, the listeners are closed
        self.authenticator = SMTPAuthHandler(config, self.auth_guard, self.metrics)
        self.tls_context = (inbound_tls_context(config)
                            if config.use_tls or config.smtps_port is not None else None)
        if self.tls_context is not None:  # the listeners' context, for good
            self._certificate = self.tls_context  # the one handshakes use (reload_tls)
            self.tls_context.sni_callback = self._use_current_certificate
        self.connections: set[RelaySMTP] = set()  # from accept to close: the slots
        self._per_ip: collections.Counter[str] = collections.Counter()
        self.protocol_templates: dict[bool, ProtocolTemplate] = {}  # by implicit_tls
        self._servers: list[asyncio.AbstractServer] = []
        self._smtp_options = {
            "hostname": config.smtp_hostname,
            "ident": "ESMTP smtp-relay",
            "data_size_limit": config.max_message_size,
            "enable_SMTPUTF8": True,
            "decode_data": False,
            "tls_context": self.tls_context if config.use_tls else None,
            "require_starttls": config.use_tls,
            # We check AUTH ourselves at MAIL (530), so aiosmtpd's own switch stays off;
            # AUTH is offered only after STARTTLS when USE_TLS is on.
            "auth_required": False,
            "auth_require_tls": config.use_tls,
            "auth_exclude_mechanism": [m for m in AUTH_MECHANISMS
                                       if m not in config.auth_mechanisms],
            "authenticator": self.authenticator,
            "timeout": config.timeout,
            "command_call_limit": {"AUTH": 10, "*": 10**9},
        }
        # SMTPS: TLS from the first byte, so no STARTTLS, and AUTH offered at once
        # (aiosmtpd counts only its own STARTTLS as TLS: issues #281/#274).
        self._smtps_options = {**self._smtp_options, "tls_context": None,
                               "require_starttls": False, "auth_require_tls": False}

    def _make_protocol(self, implicit_tls: bool = False) -> asyncio.Protocol:
        # The factory runs as each connection is accepted, several in one go when they
        # come at once (connection_made follows a loop turn later; on SMTPS only after
        # the handshake): the slot is taken here, and given back in connection_closed.
        if len(self.connections) >= self.config.max_connections:
            reply = self.metrics.record(replies.TOO_MANY_CONNECTIONS,
                                        reason="MAX_CONNECTIONS reached",
                                        limit=self.config.max_connections)
            return TooManyConnections(reply if not implicit_tls else "")
        options = self._smtps_options if implicit_tls else self._smtp_options
        protocol = RelaySMTP(self, implicit_tls=implicit_tls,
                              loop=asyncio.get_running_loop(), **options)
        self.connections.add(protocol)
        return SMTPSAcceptor(self, protocol) if implicit_tls else protocol

    def claim_address(self, protocol: RelaySMTP, address: str) -> bool:
        """Count the connection for the client's address (MAX_CONNECTIONS_PER_IP, once
        per connection; behind a proxy, once its header named the client); False when
        that puts the address over the cap."""
        limit = self.config.max_connections_per_ip
        if not limit or protocol.claimed_ip is not None:
            return not protocol.over_ip_limit
        protocol.claimed_ip = address
        self._per_ip[address] += 1
        protocol.over_ip_limit = self._per_ip[address] > limit
        return not protocol.over_ip_limit

    def refused_over_ip_limit(self, session: RelaySession | None, peer: str | None
                              ) -> str:
        where: dict[str, Any] = {} if session is not None else {"peer": peer}
        return self.metrics.record(replies.TOO_MANY_FROM_ADDRESS, session, **where,
                                   reason="MAX_CONNECTIONS_PER_IP reached",
                                   limit=self.config.max_connections_per_ip)

    def proxy_source_allowed(self, peer: str) -> bool:
        """PROXY_PROTOCOL: may this peer (the socket's) send a PROXY header? Anyone
        outside PROXY_TRUSTED_NETWORKS could claim any address: dropped, one line."""
        address = ip_of(peer)
        if address is not None and any(address in network for network in
                                       self.config.proxy_trusted_networks):
            return True
        self.metrics.connections_refused.labels("proxy_untrusted").inc()
        log_event(logging.WARNING, "proxy-untrusted", peer=peer,
                  reason="not in PROXY_TRUSTED_NETWORKS", then="dropped")
        return False

    async def connection_refusal(self, session: RelaySession, over_ip_limit: bool = False
                                 ) -> str | None:
        """The connection checker, before the greeting: None to serve this client,
        else the reply. It decides, once per connection, whether the client is
        trusted (session.client.trusted_policy)."""
        address = ip_of(session.peer_ip)
        if address is None:  # not an IP peer (a Unix socket): nothing to match
            return None
        networks = self.config.allowed_client_networks
        if networks and not any(address in network for network in networks):
            return self.metrics.record(replies.CLIENT_NOT_ALLOWED, session,
                                       reason="not in ALLOWED_CLIENT_NETWORKS")
        if over_ip_limit:
            return self.refused_over_ip_limit(session, session.peer_ip)
        try:
            locked = await self.auth_guard.is_locked(session.peer_ip)
        except StorageUnavailable:  # closed: AUTH will say 451; trusted clients go on
            locked = False
        if locked:
            return self.metrics.record(replies.LOCKED_OUT, session,
                                       reason="locked out after failed logins")
        if any(address in network for network in self.config.trusted_networks):
            session.client.trusted_policy = self.default_policy
        self.metrics.connections.inc()
        return None

    def connection_closed(self, protocol: RelaySMTP) -> None:
        """Give back what the connection took when it was accepted (once)."""
        if protocol not in self.connections:
            return
        self.connections.discard(protocol)
        address = protocol.claimed_ip
        if address is not None:
            left = self._per_ip[address] - 1
            if left > 0:
                self._per_ip[address] = left
            else:
                del self._per_ip[address]

    async def start(self) -> None:
        if self.queue is not None:  # deliveries left from the last run start now
            self.queue.start(deliver=self.config.delivery_mode != "sync")
        await self._listen("LISTEN_PORT", self.config.listen_port, self._make_protocol)
        if self.config.smtps_port is not None:
            await self._listen("SMTPS_PORT", self.config.smtps_port,
                               lambda: self._make_protocol(implicit_tls=True))

    async def _listen(self, name: str, port: int, factory: Callable,
                      **options: Any) -> None:
        host = self.config.listen_host
        try:
            self._servers.append(await asyncio.get_running_loop().create_server(
                factory, host, port, reuse_address=True,
                backlog=max(100, self.config.max_connections), **options))
        except OSError as error:
            raise cannot_listen(f"LISTEN_HOST/{name}", host, port, error) from None

    @property
    def port(self) -> int:
        return listening_port(self._servers[0])

    @property
    def serving(self) -> bool:
        return bool(self._servers) and all(s.is_serving() for s in self._servers)

    def reload(self, log_handler: LogHandler | None) -> None:
        """SIGHUP: reopen the log file (after logrotate) and re-read SMTP_USERS_FILE.
        Sessions and deliveries go on; a users file that fails validation keeps the
        old users. Authenticated sessions keep the policy they had at AUTH. The TLS
        certificate and key are loaded anew too (see reload_tls)."""
        if log_handler is not None and log_handler.path:
            try:
                log_handler.reopen()
            except OSError as error:
                log_event(logging.ERROR, "log-reopen-failed", reason=error.strerror)
        self.reload_tls()
        if self.queue is not None:
            self.queue.reload()
        try:
            routes = self.router.reload()
        except ConfigError as error:
            log_event(logging.ERROR, "routes-reload-failed", reason=str(error),
                      kept=len(self.routes.routes))
            routes = len(self.routes.routes)
        try:
            count = self.authenticator.reload(self.config)
        except ConfigError as error:
            log_event(logging.ERROR, "users-reload-failed", reason=str(error),
                      kept=len(self.authenticator.users))
            return
        log_event(logging.INFO, "reloaded", users=count, routes=routes)

    def reload_tls(self) -> None:
        """SIGHUP: TLS_CERT_FILE and TLS_KEY_FILE read again (a renewed certificate).
        New handshakes, STARTTLS and SMTPS alike, get the new pair; sessions already
        in TLS keep theirs. A pair that does not load keeps the one in use."""
        if self.tls_context is None:
            return
        try:
            certificate = inbound_tls_context(self.config)
        except ConfigError as error:
            log_event(logging.ERROR, "tls-reload-failed", reason=str(error),
                      kept="the certificate loaded before")
            return
        self._certificate = certificate
        log_event(logging.INFO, "tls-reloaded", cert=self.config.tls_cert_file)

    def _use_current_certificate(self, tls: ssl.SSLObject, server_name: str | None,
                                 listening: ssl.SSLContext) -> None:
        # The listeners' context cannot be swapped under a running server, so every
        # handshake (this callback runs for each ClientHello, with or without SNI)
        # moves to the context reload_tls loaded last.
        if self._certificate is not listening:
            tls.context = self._certificate

    @property
    def smtps_port(self) -> int | None:
        if len(self._servers) < 2:
            return None
        return listening_port(self._servers[1])

    async def stop(self) -> None:
        """The drain (SIGTERM): stop accepting at once; a client between messages is
        told 421 and let go, a message begun (MAIL accepted) may finish, then the
        queue's deliveries: each bounded by TIMEOUT."""
        self.draining = True
        self.metrics.draining.set(1)
        for listener in self._servers:
            listener.close()
        deadline = time.monotonic() + self.config.timeout
        while time.monotonic() < deadline:
            for protocol in list(self.connections):
                protocol.say_goodbye()
            if not any(p.in_transaction for p in self.connections):
                break
            await asyncio.sleep(0.05)
        for protocol in list(self.connections):
            if protocol.transport is not None:
                protocol.transport.close()
        if self.queue is not None:  # its workers use the upstream pool
            await self.queue.stop()
        await self.forwarder.close()


@functools.lru_cache(maxsize=4096)  # ip_address() is ~5 % of a one-message connection
def ip_of(peer: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """A peer's address as an ip_address (IPv4-mapped IPv6 as IPv4), None if it is
    not an IP address."""
    try:
        address = ipaddress.ip_address(peer.split("%")[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


def open_store(config: Config) -> Store:
    """The queue's store, or the start-up error naming QUEUE_URL."""
    try:
        return Store.open(config.queue_url, archive=config.archive)
    except StoreError as error:
        raise ConfigError(f"QUEUE_URL={redact_url(config.queue_url)!r}: cannot open the "
                          f"queue ({error}): expects a writable SQLite path or a "
                          "reachable PostgreSQL database") from None


def startup_warnings(config: Config, routes: RouteTable | None = None) -> None:
    if config.auth_password == DEFAULT_AUTH_PASSWORD and not config.auth_password_hash:
        log.warning("SMTP_AUTH_PASSWORD is the default %r: anyone who knows it can send "
                    "through this relay. Set your own.", DEFAULT_AUTH_PASSWORD)
    if not config.use_tls:
        log.warning("USE_TLS is off: clients send AUTH credentials and mail in plaintext. "
                    "Fine on a trusted network or loopback; otherwise turn USE_TLS on.")
    if (config.relay_use_tls or config.relay_use_ssl) and not config.relay_tls_verify:
        log.warning("RELAY_TLS_VERIFY is off: the upstream's certificate is not checked, "
                    "so anyone on the path can impersonate it.")
    if not (config.relay_use_tls or config.relay_use_ssl):
        log.warning("RELAY_USE_TLS and RELAY_USE_SSL are off: mail goes to the upstream "
                    "in plaintext.")
    if config.trusted_networks:
        log.warning("TRUSTED_NETWORKS: clients from %s may send WITHOUT authenticating "
                    "(the domain allowlists still apply).",
                    ",".join(map(str, config.trusted_networks)))
    if TLS_VERSIONS[config.tls_min_version] < ssl.TLSVersion.TLSv1_2:
        log.warning("TLS_MIN_VERSION=%s: TLS below 1.2 is broken; allow it only for old "
                    "devices that cannot do better.", config.tls_min_version)
    for destination in (routes.smart_hosts()[1:] if routes is not None else []):
        if destination.tls == "none":
            log.warning("A route sends mail to %s in plaintext (tls=none).",
                        destination.label)
        elif not destination.verify:
            log.warning("A route to %s does not verify the certificate (verify=false): "
                        "anyone on the path can impersonate it.", destination.label)
    if routes is not None and routes.uses_mx() and \
            not hostname_looks_qualified(config.smtp_hostname):
        log.warning("SMTP_HOSTNAME=%s does not look fully qualified: MX hosts that "
                    "receive our EHLO often reject such a name. Set SMTP_HOSTNAME to "
                    "this host's public DNS name.", config.smtp_hostname)


async def serve(config: Config, *, ready: Callable[[SMTPRelayServer], Any] | None = None,
                log_handler: LogHandler | None = None) -> int:
    server = SMTPRelayServer(config)
    await server.start()
    api = QueueAPI(server.queue.store, config.api_token, config.api_read_token) \
        if server.queue is not None and (config.api_token or config.api_read_token) else None
    http = HTTPEndpoint(server, api=api) if config.http_port is not None else None
    if http is not None:
        await http.start()
    log_event(logging.INFO, "started", listen=f"{config.listen_host}:{server.port}",
              smtps=server.smtps_port, http=http.port if http else None,
              **{k: v for k, v in config.redacted().items()
                 if k not in ("listen_host", "listen_port", "smtps_port", "http_port")})
    startup_warnings(config, server.routes)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, server.reload, log_handler)
    if log_handler is not None:
        log_handler.attach(loop)  # lines of one loop turn written together
    try:
        if ready is not None:
            await ready(server)
        await stop.wait()
        # The drain: /readyz answers 503 from now on (a load balancer sends new
        # clients elsewhere) and stays up until the sessions and deliveries are done.
        server.draining = True
        log_event(logging.INFO, "stopping", in_flight=sum(
            1 for p in server.connections if p.in_transaction),
            sessions=len(server.connections))
        await server.stop()
        if http is not None:
            http.close()
        log_event(logging.INFO, "stopped")
    finally:
        if log_handler is not None:
            log_handler.attach(None)  # and whatever is pending, now
    return 0


COMMANDS = ("serve", "demo", "hash-password", "check", "queue")


def run_loop(main_coroutine: Coroutine[Any, Any, int]) -> int:
    """Run the relay on uvloop: libuv's event loop, with transports, accept and the
    loop's own bookkeeping in C. A connection costs about a third less CPU than on
    asyncio's selector loop, which is what a client sending one message per
    connection pays for (issue #8: one message per connection, 0.77x Postfix before).
    Everything else (aiosmtpd, STARTTLS, signals) behaves the same on both loops."""
    return uvloop.run(main_coroutine)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv else "serve"
    if command not in COMMANDS or (len(argv) > 1 and command != "queue"):
        print(f"usage: {os.path.basename(sys.argv[0])} [{'|'.join(COMMANDS)}]",
              file=sys.stderr)
        return 2
    if command == "hash-password":
        return hash_password()
    try:
        from dotenv import load_dotenv
        # .env in the working directory; variables already in the environment win.
        load_dotenv(os.path.join(os.getcwd(), ".env"), override=False)
        if command == "demo":
            return run_loop(run_demo(serve, {**DEMO_ENV, **{k: v for k, v in os.environ.items()
                                                     if k not in DEMO_ENV}}))
        if command == "check":
            return check_command(os.environ)
        if command == "queue":  # the operator's view of the store, beside a running relay
            config = load_config(os.environ)
            store = open_store(config)
            try:
                return queue_command(argv[1:], store, sys.stdout)
            finally:
                store.close()
        config = load_config(os.environ)
        log_handler = setup_logging(config)
        return run_loop(serve(config, log_handler=log_handler))
    except ConfigError as error:
        print(f"smtp-relay: configuration error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())

