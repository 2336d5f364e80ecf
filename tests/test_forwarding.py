"""Forwarding: what the client is told about the upstream, and what the upstream gets.

The relay hands each client transaction live to the upstream (MAIL, RCPT, DATA) and
answers the client with the upstream's own verdict. These tests drive a real relay
process (`start_relay`) in front of a real aiosmtpd upstream in this process
(`upstream`, `make_upstream`) and check, through smtplib or the line-level
`raw_client`:

- verdict mapping: upstream refusals, temporary failures, stalls past TIMEOUT, dropped
  connections, an unreachable upstream and an upstream 421, as the client sees them;
- TLS to the upstream: STARTTLS + AUTH, implicit TLS, untrusted certificates,
  RELAY_TLS_VERIFY=false, an upstream without STARTTLS, wrong credentials;
- the pool of reused upstream sessions: reuse, RELAY_POOL_MAX_MESSAGES,
  RELAY_POOL_IDLE_SECONDS, stale sessions, abandoned transactions, concurrency;
- parameters and content: SIZE / BODY / SMTPUTF8 only where advertised, the body byte
  for byte after one Received: header, no CR/LF in upstream envelope commands.

`UpstreamSpy` wraps the upstream handler's hooks to observe what its knobs do not
record: which upstream session carried each message, QUIT, and how many DATA commands
the upstream was handling at once. It keeps the session objects alive, so their ids
(`Received.session_id`, `handler.sessions`) are never reused within a test.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import email.utils
import logging
import re
import smtplib
import socket
import threading
import time

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from conftest import UPSTREAM_PASSWORD, UPSTREAM_USER, message

pytestmark = pytest.mark.timeout(60)

SENDER = "app@example.com"
RECIPIENT = "ops@example.com"


# ---------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------

def wait_until(predicate, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


class UpstreamSpy:
    """Wraps `upstream.handler`'s hooks (before the relay connects) to record, per
    upstream SMTP session: the session object, the server protocol, QUIT; and the
    number of DATA commands being handled at once. Optionally stalls DATA only for
    messages to `slow_recipient`."""

    def __init__(self, upstream, *, slow_recipient: str | None = None,
                 slow_seconds: float = 0.0):
        self.upstream = upstream
        self.sessions: list = []  # strong references: ids stay unique
        self.servers: list = []  # the upstream's SMTP protocol for each session
        self.quits: set[int] = set()  # indexes of sessions that got QUIT
        self.active_data = 0
        self.max_active_data = 0
        self.slow_recipient = slow_recipient
        self.slow_seconds = slow_seconds
        self.slow_data_started = threading.Event()
        handler = upstream.handler
        original_mail, original_data = handler.handle_MAIL, handler.handle_DATA

        async def handle_MAIL(server, session, envelope, address, mail_options):
            self._index(server, session)
            return await original_mail(server, session, envelope, address, mail_options)

        async def handle_DATA(server, session, envelope):
            self.active_data += 1
            self.max_active_data = max(self.max_active_data, self.active_data)
            try:
                if self.slow_recipient in envelope.rcpt_tos:
                    self.slow_data_started.set()
                    await asyncio.sleep(self.slow_seconds)
                return await original_data(server, session, envelope)
            finally:
                self.active_data -= 1

        async def handle_QUIT(server, session, envelope):
            self.quits.add(self._index(server, session))
            return "221 2.0.0 Bye"

        handler.handle_MAIL = handle_MAIL
        handler.handle_DATA = handle_DATA
        handler.handle_QUIT = handle_QUIT

    def _index(self, server, session) -> int:
        for index, known in enumerate(self.sessions):
            if known is session:
                return index
        self.sessions.append(session)
        self.servers.append(server)
        return len(self.sessions) - 1

    def session_of(self, received) -> int:
        """Index of the upstream session that carried a `Received` message."""
        for index, session in enumerate(self.sessions):
            if id(session) == received.session_id:
                return index
        raise AssertionError("message from a session the spy did not see")

    def message_sessions(self) -> list[int]:
        return [self.session_of(received) for received in self.upstream.messages]

    def closed(self, index: int) -> bool:
        """The upstream saw QUIT on that session, or its connection is gone."""
        return index in self.quits or self.servers[index].transport is None

    def drop_connections(self) -> None:
        """The upstream closes every connection it has (as on its idle timeout)."""
        def close_all() -> None:
            for server in self.servers:
                if server.transport is not None:
                    server.transport.close()
        self.upstream.controller.loop.call_soon_threadsafe(close_all)
        wait_until(lambda: all(s.transport is None for s in self.servers),
                   "the upstream to close its connections")


def hide_extensions(upstream, *names: str) -> None:
    """Make the upstream leave `names` (e.g. SIZE, 8BITMIME) out of its EHLO reply."""
    async def handle_EHLO(server, session, envelope, hostname, responses):
        session.host_name = hostname
        return [line for line in responses
                if line[4:].split(" ")[0].upper() not in names]
    upstream.handler.handle_EHLO = handle_EHLO


def answering_authenticator(server, session, envelope, mechanism, auth_data):
    """The upstream's credentials check, answering 535 when they are wrong."""
    ok = (isinstance(auth_data, LoginPassword)
          and auth_data.login == UPSTREAM_USER.encode()
          and auth_data.password == UPSTREAM_PASSWORD.encode())
    return AuthResult(success=ok, handled=ok)


def restart_upstream(upstream) -> None:
    """Stop the upstream's server and start a new one on the same port and handler."""
    upstream.controller.stop()
    controller = Controller(upstream.handler, hostname="127.0.0.1", port=upstream.port,
                            server_hostname="localhost", ready_timeout=10,
                            enable_SMTPUTF8=True)
    controller.start()
    upstream.controller = controller  # the fixture stops this one at the end


def send(relay, recipients=(RECIPIENT,), content: bytes | None = None, **options):
    """One whole message on a new client connection; smtplib's refused dict."""
    with relay.client() as client:
        return client.sendmail(SENDER, list(recipients),
                               message() if content is None else content, **options)


def transaction(client: smtplib.SMTP, recipients=(RECIPIENT,)) -> list:
    """MAIL, RCPT per recipient, DATA, step by step, up to the first step that leaves
    nothing more to do: a list of (step, code, text)."""
    steps = []
    code, text = client.mail(SENDER)
    steps.append(("MAIL", code, text.decode()))
    if code != 250:
        return steps
    accepted = 0
    for recipient in recipients:
        code, text = client.rcpt(recipient)
        steps.append(("RCPT", code, text.decode()))
        accepted += code == 250
    if accepted:
        code, text = client.data(message())
        steps.append(("DATA", code, without_relay_id(code, text.decode())))
    return steps


RELAY_ID = re.compile(r" \(smtp-relay id [0-9a-f]{16}\)$")


def without_relay_id(code: int, text: str) -> str:
    """The upstream's own text: the relay appends its message id to every 250."""
    if code == 250:
        assert RELAY_ID.search(text), text
    return RELAY_ID.sub("", text)


def split_received(content: bytes) -> tuple[bytes, bytes]:
    """(the first header field with its continuation lines, everything after it)."""
    assert content.startswith(b"Received: "), content[:200]
    end = content.index(b"\r\n") + 2
    while content[end:end + 1] in (b"\t", b" "):
        end = content.index(b"\r\n", end) + 2
    return content[:end], content[end:]


def raw_message(client, recipient: str = RECIPIENT) -> str:
    """A whole transaction on a raw client that is logged in; the reply after DATA."""
    assert client.command(f"MAIL FROM:<{SENDER}>").startswith("250")
    assert client.command(f"RCPT TO:<{recipient}>").startswith("250")
    assert client.command("DATA").startswith("354")
    return client.command(message() + b".")


@pytest.fixture
def tls_relay_env(server_cert) -> dict:
    """Relay settings for STARTTLS + AUTH to an upstream with the trustme certificate."""
    return {"RELAY_USE_TLS": "true", "RELAY_TLS_CA_FILE": str(server_cert[2]),
            "RELAY_HOST": "localhost", "RELAY_USERNAME": UPSTREAM_USER,
            "RELAY_PASSWORD": UPSTREAM_PASSWORD}


# ---------------------------------------------------------------------------------------
# Verdict mapping: the upstream's answers, as the client sees them
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("reply", ["550 5.7.1 Sender rejected by upstream policy",
                                   "451 4.7.1 Greylisted, try again later"])
def test_upstream_refusing_mail_is_passed_on_at_mail(start, upstream, reply):
    upstream.handler.mail_reply = reply
    relay = start(upstream)
    with relay.client() as client:
        code, text = client.mail(SENDER)
        assert (code, text.decode()) == (int(reply[:3]), reply[4:])
        # No transaction was opened: RCPT has nothing to join.
        assert client.rcpt(RECIPIENT)[0] == 503
    assert upstream.handler.mail_commands == [(SENDER, [])]
    assert upstream.handler.rcpt_commands == []
    assert upstream.messages == []


def test_upstream_recipient_verdicts_are_passed_on_per_recipient(start, upstream):
    upstream.handler.rcpt_replies = {
        "gone@example.com": "550 5.1.1 No such user here",
        "busy@example.com": "450 4.2.1 Mailbox busy, try again later",
    }
    relay = start(upstream)
    recipients = ["gone@example.com", RECIPIENT, "busy@example.com"]
    with relay.client() as client:
        refused = client.sendmail(SENDER, recipients, message())
    assert refused == {"gone@example.com": (550, b"5.1.1 No such user here"),
                       "busy@example.com": (450, b"4.2.1 Mailbox busy, try again later")}
    assert upstream.handler.rcpt_commands == recipients
    assert len(upstream.messages) == 1
    assert upstream.messages[0].rcpt_tos == [RECIPIENT]


@pytest.mark.parametrize("reply", ["451 4.3.0 Queue full, try again later",
                                   "554 5.6.0 Message content rejected"])
def test_upstream_data_verdict_is_passed_on_after_data(start, upstream, reply):
    spy = UpstreamSpy(upstream)
    upstream.handler.data_reply = reply
    relay = start(upstream)
    with relay.client() as client:
        assert transaction(client) == [("MAIL", 250, "2.1.0 Sender OK"),
                                       ("RCPT", 250, "2.1.5 Recipient OK"),
                                       ("DATA", int(reply[:3]), reply[4:])]
        assert upstream.messages == []
        relay.wait_for_log("delivery-failed")
        # The upstream ended that transaction: the same session carries the next one.
        upstream.handler.data_reply = None
        assert client.sendmail(SENDER, [RECIPIENT], message()) == {}
    assert spy.message_sessions() == [0]


@pytest.mark.parametrize("step", ["MAIL", "RCPT", "DATA"])
def test_upstream_stalling_past_timeout_gives_451_and_relay_recovers(start, upstream,
                                                                     step):
    upstream.handler.stall = {step: 4}
    relay = start(upstream, TIMEOUT=2)
    with relay.client() as client:
        steps = transaction(client)
    *before, (failed_step, code, text) = steps
    assert all(code == 250 for _, code, _ in before), steps
    assert (failed_step, code) == (step, 451), steps
    assert text.startswith("4.4."), text
    relay.wait_for_log("upstream-failed" if step != "DATA" else "delivery-failed")
    upstream.handler.reset()
    assert send(relay) == {}
    assert [m.rcpt_tos for m in upstream.messages] == [[RECIPIENT]]


def test_upstream_stall_is_reported_as_a_timeout(start, upstream):
    upstream.handler.stall = {"MAIL": 4}
    relay = start(upstream, TIMEOUT=2)
    with relay.client() as client:
        code, text = client.mail(SENDER)
    assert code == 451
    assert text == b"4.4.2 Upstream unavailable: timed out"
    relay.wait_for_log('reply="451 4.4.2 Upstream unavailable: timed out"')


@pytest.mark.parametrize("step", ["MAIL", "RCPT", "DATA"])
def test_upstream_dropping_connection_gives_451_and_next_message_works(start, upstream,
                                                                       step):
    upstream.handler.drop = {step}
    relay = start(upstream)
    with relay.client() as client:
        *before, (failed_step, code, text) = transaction(client)
        assert all(code == 250 for _, code, _ in before), before
        assert (failed_step, code) == (step, 451)
        assert text.startswith("4.4.2 "), text
        # The client keeps its connection and its next message goes through.
        client.rset()
        upstream.handler.reset()
        assert transaction(client)[-1] == ("DATA", 250, "2.0.0 Ok: queued as UP1")
    assert [m.rcpt_tos for m in upstream.messages] == [[RECIPIENT]]


def test_upstream_down_gives_451_at_mail(start):
    relay = start(None)  # RELAY_PORT: a free port, nothing listening
    port = relay.env["RELAY_PORT"]
    with relay.client() as client:
        code, text = client.mail(SENDER)
        assert code == 451
        assert text.decode().startswith(
            f"4.4.1 Upstream unavailable: connect to 127.0.0.1:{port} failed"), text
        assert client.noop()[0] == 250


def test_upstream_silent_after_connect_gives_451_at_mail(start):
    # Accepts TCP (the kernel's backlog) but never greets: the upstream session's
    # opening stalls, as on an overloaded server or a black-holed TLS handshake.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        relay = start(None, RELAY_PORT=silent.getsockname()[1], TIMEOUT=2)
        with relay.client() as client:
            code, text = client.mail(SENDER)
            assert code == 451, (code, text)
            assert text.startswith(b"4.4."), text
            assert client.noop()[0] == 250


def test_upstream_421_at_rcpt_becomes_451_and_client_stays_connected(start, upstream):
    spy = UpstreamSpy(upstream)
    upstream.handler.rcpt_replies = {"closing@example.com": "421 4.3.0 closing"}
    relay = start(upstream)
    with relay.client() as client:
        assert client.mail(SENDER)[0] == 250
        code, text = client.rcpt("closing@example.com")
        assert code == 451, (code, text)
        assert text.startswith(b"4.4.2 "), text
        assert b"closing" in text
        # The relay did not pass the 421 on by hanging up on its client.
        assert client.noop()[0] == 250
        client.rset()
        assert client.sendmail(SENDER, [RECIPIENT], message()) == {}
    assert [m.rcpt_tos for m in upstream.messages] == [[RECIPIENT]]
    # The upstream session that said 421 was not used again.
    assert spy.message_sessions() == [1]
    wait_until(lambda: spy.closed(0), "the 421 session to be closed")


# ---------------------------------------------------------------------------------------
# A pipelining client: its MAIL goes upstream with its first RCPT
# ---------------------------------------------------------------------------------------

class PipelinedUpstream:
    """Wraps `upstream.handler` (before the relay connects): the MAIL reply carries a
    text of its own (so the client's copy shows it came from the upstream), the
    upstream offers PIPELINING when asked to, and for each MAIL it records whether the
    RCPT after it had already arrived with it."""

    MAIL_OK = "250 2.1.0 sender fine by the upstream"

    def __init__(self, upstream, *, pipelining: bool):
        self.rcpt_came_with_mail: list[bool] = []
        handler = upstream.handler
        original_mail = handler.handle_MAIL

        async def handle_EHLO(server, session, envelope, hostname, responses):
            session.host_name = hostname
            return [*responses[:-1], "250-PIPELINING", responses[-1]]

        async def handle_MAIL(server, session, envelope, address, mail_options):
            self.rcpt_came_with_mail.append(b"RCPT TO:" in bytes(server._reader._buffer))
            reply = await original_mail(server, session, envelope, address, mail_options)
            return self.MAIL_OK if reply.startswith("250") else reply

        handler.handle_MAIL = handle_MAIL
        if pipelining:
            handler.handle_EHLO = handle_EHLO


def pipelined_transaction(client, recipients=(RECIPIENT,)) -> list[str]:
    """MAIL, the RCPTs and DATA in one write (as Postfix's smtp client sends them); the
    replies, and the one after the data when DATA got 354."""
    client.send("".join([f"MAIL FROM:<{SENDER}>\r\n"]
                        + [f"RCPT TO:<{r}>\r\n" for r in recipients]
                        + ["DATA\r\n"]).encode())
    replies = [client.reply() for _ in range(len(recipients) + 2)]
    if replies[-1].startswith("354"):
        replies.append(client.command(message() + b"."))
    return replies


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelining", "one-by-one"])
def test_pipelined_mail_goes_upstream_with_the_first_rcpt(start, upstream, raw_client,
                                                          pipelining):
    seen = PipelinedUpstream(upstream, pipelining=pipelining)
    relay = start(upstream)
    client = raw_client(relay.port)
    client.login()
    replies = pipelined_transaction(client, [RECIPIENT, "second@example.com"])
    # The client is told the upstream's own verdict on MAIL, and on each RCPT.
    assert replies[:4] == [seen.MAIL_OK, "250 2.1.5 Recipient OK",
                           "250 2.1.5 Recipient OK", "354 End data with <CR><LF>.<CR><LF>"]
    assert without_relay_id(250, replies[4]) == "250 2.0.0 Ok: queued as UP1"
    assert [m.rcpt_tos for m in upstream.messages] == [[RECIPIENT, "second@example.com"]]
    # One round trip for MAIL and the first RCPT where the upstream pipelines too.
    assert seen.rcpt_came_with_mail == [pipelining]
    # A client that waits for each reply gets the same, MAIL on its own.
    assert client.command(f"MAIL FROM:<{SENDER}>") == seen.MAIL_OK
    assert client.command(f"RCPT TO:<{RECIPIENT}>") == "250 2.1.5 Recipient OK"
    assert seen.rcpt_came_with_mail == [pipelining, False]


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelining", "one-by-one"])
def test_pipelined_mail_refused_upstream_is_refused_for_the_client(
        start, upstream, raw_client, pipelining):
    PipelinedUpstream(upstream, pipelining=pipelining)
    upstream.handler.mail_reply = "550 5.7.1 sender not welcome upstream"
    relay = start(upstream)
    client = raw_client(relay.port)
    client.login()
    # As the upstream itself would answer: MAIL refused, so no RCPT and no DATA.
    assert pipelined_transaction(client) == [
        "550 5.7.1 sender not welcome upstream", "503 5.5.1 Error: need MAIL command",
        "503 Error: need RCPT command"]
    assert upstream.handler.rcpt_commands == []
    assert upstream.messages == []
    relay.wait_for_log('sender-refused')
    # The session goes on: the next transaction is the upstream's to judge again.
    upstream.handler.mail_reply = None
    replies = pipelined_transaction(client)
    assert replies[:2] == [PipelinedUpstream.MAIL_OK, "250 2.1.5 Recipient OK"]
    assert without_relay_id(250, replies[3]) == "250 2.0.0 Ok: queued as UP1"


@pytest.mark.parametrize("sender_refused", [False, True], ids=["sender-ok", "refused"])
def test_pipelined_rcpt_refused_here_still_gets_the_upstreams_mail_verdict(
        start, upstream, raw_client, sender_refused):
    """The RCPT never goes upstream (its domain is not allowed): MAIL goes alone, and
    the client hears the upstream's verdict on it all the same."""
    PipelinedUpstream(upstream, pipelining=True)
    if sender_refused:
        upstream.handler.mail_reply = "550 5.7.1 sender not welcome upstream"
    relay = start(upstream)
    client = raw_client(relay.port)
    client.login()
    replies = pipelined_transaction(client, ["someone@elsewhere.test"])
    assert replies[0] == ("550 5.7.1 sender not welcome upstream" if sender_refused
                          else PipelinedUpstream.MAIL_OK)
    assert replies[1].startswith("550 5.7.1"), replies
    assert replies[2].startswith("503"), replies
    assert len(upstream.handler.mail_commands) == 1
    assert upstream.handler.rcpt_commands == []


def test_pipelined_mail_on_a_stale_pooled_session_goes_again_on_a_fresh_one(
        start, upstream, raw_client):
    spy = UpstreamSpy(upstream)
    PipelinedUpstream(upstream, pipelining=True)
    relay = start(upstream)
    assert send(relay) == {}
    spy.drop_connections()  # e.g. the upstream restarted while the session was pooled
    client = raw_client(relay.port)
    client.login()
    replies = pipelined_transaction(client)
    assert replies[:3] == [PipelinedUpstream.MAIL_OK, "250 2.1.5 Recipient OK",
                           "354 End data with <CR><LF>.<CR><LF>"]
    assert without_relay_id(250, replies[3]) == "250 2.0.0 Ok: queued as UP2"
    assert spy.message_sessions() == [0, 1]


def test_pipelined_mail_when_the_upstream_link_breaks(start, upstream, raw_client):
    PipelinedUpstream(upstream, pipelining=True)
    upstream.handler.drop = {"MAIL"}
    relay = start(upstream)
    client = raw_client(relay.port)
    client.login()
    replies = pipelined_transaction(client)
    assert replies[0].startswith("451 4.4.2"), replies
    assert replies[1:] == ["503 5.5.1 Error: need MAIL command",
                           "503 Error: need RCPT command"]
    upstream.handler.drop = set()
    assert without_relay_id(250, raw_message(client)) == "250 2.0.0 Ok: queued as UP1"


# ---------------------------------------------------------------------------------------
# TLS to the upstream
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("relay_host", ["localhost", "127.0.0.1"])
def test_starttls_and_auth_to_upstream_delivers(start, make_upstream, server_tls_context,
                                                tls_relay_env, relay_host):
    upstream = make_upstream(starttls_context=server_tls_context, require_auth=True)
    relay = start(upstream, **{**tls_relay_env, "RELAY_HOST": relay_host})
    assert send(relay) == {}
    assert [m.rcpt_tos for m in upstream.messages] == [[RECIPIENT]]


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
def test_upstream_without_starttls_gets_451_and_no_credentials(start, make_upstream,
                                                               tls_relay_env, caplog):
    caplog.set_level(logging.INFO, logger="mail.log")  # aiosmtpd logs each command
    upstream = make_upstream(require_auth=True)  # AUTH offered in clear, no STARTTLS
    relay = start(upstream, **{**tls_relay_env, "RELAY_HOST": "127.0.0.1"})
    with relay.client() as client:
        code, text = client.mail(SENDER)
    assert code == 451
    assert b"does not offer STARTTLS" in text, text
    commands = [record.getMessage() for record in caplog.records
                if record.name == "mail.log" and " >> " in record.getMessage()]
    assert any(">> b'ehlo relay.test'" in line.lower() for line in commands), commands
    assert not any(">> b'auth" in line.lower() for line in commands), commands
    assert upstream.handler.mail_commands == []


def test_untrusted_upstream_certificate_gives_451(start, make_upstream,
                                                  server_tls_context):
    upstream = make_upstream(starttls_context=server_tls_context)
    relay = start(upstream, RELAY_USE_TLS="true", RELAY_HOST="localhost")
    with relay.client() as client:
        code, text = client.mail(SENDER)
    assert code == 451
    assert text.startswith(b"4.4.1 ") and b"certificate not trusted" in text, text
    assert upstream.handler.mail_commands == []


def test_tls_verify_off_delivers_and_warns_at_startup(start, make_upstream,
                                                      server_tls_context):
    upstream = make_upstream(starttls_context=server_tls_context)
    relay = start(upstream, RELAY_USE_TLS="true", RELAY_HOST="localhost",
                  RELAY_TLS_VERIFY="false")
    assert "WARNING RELAY_TLS_VERIFY is off" in relay.log()
    assert send(relay) == {}
    assert len(upstream.messages) == 1


def test_implicit_tls_upstream_delivers(start, make_upstream, server_tls_context,
                                        server_cert):
    # (aiosmtpd offers AUTH only after its own STARTTLS, never on implicit TLS.)
    upstream = make_upstream(implicit_tls_context=server_tls_context)
    relay = start(upstream, RELAY_USE_TLS="false", RELAY_USE_SSL="true",
                  RELAY_TLS_CA_FILE=str(server_cert[2]), RELAY_HOST="localhost")
    assert send(relay) == {}
    assert [m.rcpt_tos for m in upstream.messages] == [[RECIPIENT]]


def test_wrong_upstream_credentials_give_451_not_5xx(start, make_upstream,
                                                     server_tls_context, tls_relay_env):
    upstream = make_upstream(starttls_context=server_tls_context, require_auth=True)
    # conftest's authenticator returns AuthResult(success=False) with aiosmtpd's default
    # handled=True: the upstream would then never answer a failed AUTH. Answer 535.
    upstream.controller.SMTP_kwargs["authenticator"] = answering_authenticator
    relay = start(upstream, **{**tls_relay_env, "RELAY_PASSWORD": "not-the-password"})
    with relay.client() as client:
        code, text = client.mail(SENDER)
    assert code == 451
    assert text.startswith(b"4.7.0 ") and b"credentials" in text, text
    assert upstream.handler.mail_commands == []


# ---------------------------------------------------------------------------------------
# The pool of upstream sessions
# ---------------------------------------------------------------------------------------

def test_sequential_clients_share_one_upstream_session(start, upstream):
    spy = UpstreamSpy(upstream)
    relay = start(upstream)
    for _ in range(3):
        with relay.client() as client:
            for _ in range(2):
                assert client.sendmail(SENDER, [RECIPIENT], message()) == {}
    assert len(upstream.messages) == 6
    assert len(upstream.handler.sessions) == 1
    assert spy.message_sessions() == [0] * 6
    assert not spy.closed(0)


def test_pool_max_messages_retires_sessions(start, upstream):
    spy = UpstreamSpy(upstream)
    relay = start(upstream, RELAY_POOL_MAX_MESSAGES=2)
    for _ in range(5):
        assert send(relay) == {}
    assert spy.message_sessions() == [0, 0, 1, 1, 2]
    assert len(upstream.handler.sessions) == 3
    wait_until(lambda: spy.closed(0) and spy.closed(1), "retired sessions to close")
    assert spy.quits >= {0, 1}


def test_pool_idle_session_is_closed_and_replaced(start, upstream):
    spy = UpstreamSpy(upstream)
    relay = start(upstream, RELAY_POOL_IDLE_SECONDS=0.5)
    assert send(relay) == {}
    time.sleep(1.5)
    wait_until(lambda: spy.closed(0), "the idle session to be closed")
    assert 0 in spy.quits  # closed politely, by the relay
    assert send(relay) == {}
    assert spy.message_sessions() == [0, 1]


def test_pooled_session_closed_by_upstream_is_replaced_before_answering(start, upstream):
    spy = UpstreamSpy(upstream)
    relay = start(upstream)
    assert send(relay) == {}
    spy.drop_connections()
    restart_upstream(upstream)
    with relay.client() as client:
        assert transaction(client) == [("MAIL", 250, "2.1.0 Sender OK"),
                                       ("RCPT", 250, "2.1.5 Recipient OK"),
                                       ("DATA", 250, "2.0.0 Ok: queued as UP2")]
    assert spy.message_sessions() == [0, 1]


def test_every_stale_pooled_session_is_replaced_before_answering(start, upstream):
    spy = UpstreamSpy(upstream)
    relay = start(upstream)
    # Two clients in a transaction at once: two upstream sessions, both pooled after.
    with relay.client() as first, relay.client() as second:
        assert first.mail(SENDER)[0] == 250
        assert second.mail(SENDER)[0] == 250
        for client in (first, second):
            assert client.rcpt(RECIPIENT)[0] == 250
            assert client.data(message())[0] == 250
    assert spy.message_sessions() == [0, 1]
    spy.drop_connections()  # e.g. the upstream restarted
    with relay.client() as client:
        assert transaction(client)[0] == ("MAIL", 250, "2.1.0 Sender OK")


@pytest.mark.parametrize("abandon", ["RSET", "EHLO", "QUIT", "disconnect"])
def test_abandoned_transaction_is_reset_upstream_and_session_reused(
        start, upstream, raw_client, abandon):
    spy = UpstreamSpy(upstream)
    relay = start(upstream)
    client = raw_client(relay.port)
    client.login()
    assert client.command(f"MAIL FROM:<{SENDER}>").startswith("250")
    assert client.command("RCPT TO:<abandoned@example.com>").startswith("250")
    if abandon == "RSET":
        assert client.command("RSET").startswith("250")
    elif abandon == "EHLO":
        assert client.command("EHLO again.test").startswith("250")
    elif abandon == "QUIT":
        assert client.command("QUIT").startswith("221")
        assert client.closed()
    else:
        client.close()
    wait_until(lambda: upstream.handler.rset_count == 1, "RSET at the upstream")
    # The relay pools the session once the upstream has answered RSET.
    time.sleep(0.3)
    assert upstream.messages == []
    if abandon in ("RSET", "EHLO"):
        reply = raw_message(client)
    else:
        client = raw_client(relay.port)
        client.login()
        reply = raw_message(client)
    assert without_relay_id(250, reply) == "250 2.0.0 Ok: queued as UP1"
    assert [m.rcpt_tos for m in upstream.messages] == [[RECIPIENT]]
    assert spy.message_sessions() == [0]
    assert upstream.handler.rcpt_commands == ["abandoned@example.com", RECIPIENT]


def test_slow_upstream_call_does_not_hold_up_other_clients(start, upstream):
    spy = UpstreamSpy(upstream, slow_recipient="slow@example.com", slow_seconds=3)
    relay = start(upstream)
    finished: list[str] = []
    outcome: dict = {}

    def slow_client() -> None:
        try:
            outcome["A"] = send(relay, ["slow@example.com"])
        except smtplib.SMTPException as error:  # reported by the assertion below
            outcome["A"] = error
        finally:
            finished.append("A")

    thread = threading.Thread(target=slow_client)
    thread.start()
    try:
        assert spy.slow_data_started.wait(10), "client A's DATA never reached upstream"
        assert send(relay) == {}
        finished.append("B")
    finally:
        thread.join(30)
    assert finished == ["B", "A"]
    assert outcome["A"] == {}
    assert sorted(m.rcpt_tos[0] for m in upstream.messages) == [RECIPIENT,
                                                                "slow@example.com"]


def test_twelve_concurrent_slow_deliveries_all_succeed(start, upstream):
    spy = UpstreamSpy(upstream)
    upstream.handler.stall = {"DATA": 1}
    relay = start(upstream)
    recipients = [f"user{n}@example.com" for n in range(12)]
    with concurrent.futures.ThreadPoolExecutor(len(recipients)) as clients:
        results = list(clients.map(lambda r: send(relay, [r]), recipients))
    assert results == [{}] * 12
    assert sorted(m.rcpt_tos[0] for m in upstream.messages) == sorted(recipients)
    assert spy.max_active_data > 6, spy.max_active_data


# ---------------------------------------------------------------------------------------
# Parameters and content
# ---------------------------------------------------------------------------------------

def test_mail_parameters_go_upstream_when_advertised(start, upstream):
    relay = start(upstream)
    content = message()
    assert send(relay, content=content, mail_options=["BODY=8BITMIME", "SMTPUTF8"]) == {}
    assert upstream.handler.mail_commands == [
        (SENDER, [f"SIZE={len(content)}", "BODY=8BITMIME", "SMTPUTF8"])]
    assert upstream.messages[0].mail_options == upstream.handler.mail_commands[0][1]


def test_smtputf8_address_reaches_upstream(start, upstream):
    relay = start(upstream)
    with relay.client() as client:
        assert client.sendmail("jörg@example.com", ["zoë@example.com"], message(),
                               mail_options=["SMTPUTF8"]) == {}
    received = upstream.messages[0]
    assert (received.mail_from, received.rcpt_tos) == ("jörg@example.com",
                                                       ["zoë@example.com"])
    assert "SMTPUTF8" in received.mail_options


def test_mail_parameters_withheld_when_upstream_does_not_advertise(start,
                                                                    make_upstream):
    upstream = make_upstream(smtputf8=False)
    hide_extensions(upstream, "SIZE", "8BITMIME")
    relay = start(upstream)
    with relay.client() as client:
        assert client.sendmail(SENDER, [RECIPIENT], message(),
                               mail_options=["BODY=8BITMIME"]) == {}
        code, text = client.mail(SENDER, ["SMTPUTF8"])
        assert code == 555, (code, text)
        assert text.startswith(b"5.6.7 "), text
    assert upstream.handler.mail_commands == [(SENDER, [])]
    assert len(upstream.messages) == 1


def test_8bit_content_to_upstream_without_8bitmime_is_refused(start, upstream):
    hide_extensions(upstream, "8BITMIME")
    relay = start(upstream)
    latin1 = message(body="Gr\u00fc\u00dfe\r\n").decode().encode("latin-1")
    with relay.client() as client, pytest.raises(smtplib.SMTPDataError) as refused:
        client.sendmail(SENDER, [RECIPIENT], latin1, mail_options=["BODY=8BITMIME"])
    assert refused.value.smtp_code == 554
    assert refused.value.smtp_error.startswith(b"5.6.3 ")
    assert upstream.messages == []


# Lines chosen to break a relay that re-encodes, re-wraps or un-stuffs the body.
EIGHT_BIT_CONTENT = b"\r\n".join([
    b"From: app@example.com",
    b"To: ops@example.com",
    b"Subject: =?utf-8?q?bytes?=",
    b"MIME-Version: 1.0",
    b"Content-Type: application/octet-stream",
    b"Content-Transfer-Encoding: 8bit",
    b"",
    bytes(range(0x80, 0x100)),
    bytes(b for b in range(0x80) if b not in (0x00, 0x0a, 0x0d)),  # NUL is refused
    "UTF-8: Grüße, 日本語, emoji \U0001f600".encode(),
    b"Latin-1: Gr\xfc\xdfe \xff\xfe",
    b".",
    b"..",
    b".leading dot",
    b"...three dots",
    b" . not at the start",
    b"x" * 998,
    b"." + b"y" * 997,
    b"",
    b"trailing spaces   \t",
    b"last line",
    b"",
])


def test_body_reaches_upstream_byte_for_byte_after_received_header(start, upstream):
    relay = start(upstream)
    assert send(relay, content=EIGHT_BIT_CONTENT, mail_options=["BODY=8BITMIME"]) == {}
    received = upstream.messages[0]
    _, body = split_received(received.content)
    assert body == EIGHT_BIT_CONTENT
    assert b"\r\nReceived:" not in body
    assert "BODY=8BITMIME" in received.mail_options


def test_received_header_names_relay_and_logged_message_id(start, upstream):
    relay = start(upstream)
    assert send(relay) == {}
    header, body = split_received(upstream.messages[0].content)
    assert body == message()
    match = re.fullmatch(
        rb"Received: from client\.test \(\[127\.0\.0\.1\]\)\r\n"
        rb"\tby relay\.test \(smtp-relay\) with ESMTPA id ([0-9a-f]{16})\r\n"
        rb"\tfor <ops@example\.com>;\r\n"
        rb"\t(.+)\r\n", header)
    assert match, header
    assert email.utils.parsedate_to_datetime(match.group(2).decode()) is not None
    message_id = match.group(1).decode()
    log = relay.wait_for_log(f"delivered id={message_id} ")
    line = next(line for line in log.splitlines() if f"id={message_id} " in line)
    assert f"from={SENDER} to={RECIPIENT} " in line, line
    assert 'upstream="250 2.0.0 Ok: queued as UP1"' in line, line


# (command, the start of the relay's reply): each smuggles a CR into an envelope.
INJECTED_MAIL = [
    (b"MAIL FROM:<app@example.com>\rRCPT TO:<evil@example.com>", "501 "),
    (b"MAIL FROM:<app@example.com> SIZE=10\rRSET", "555 "),
    (b"MAIL FROM:<app@example.com\rRSET>", "553 5.1.3 "),
    (b'MAIL FROM:<"app\rRCPT TO:<evil@example.com>"@example.com>', "553 5.1.3 "),
    (b"MAIL FROM:app@example.com\rRSET", "553 5.1.3 "),
    (b"MAIL FROM:<app@example.com\x00RSET>", "553 5.1.3 "),
]
INJECTED_RCPT = [
    (b"RCPT TO:<ops@example.com>\rDATA", "555 "),
    (b"RCPT TO:<ops@example.com\rRCPT TO:<evil@example.com>>", "501 "),
    (b'RCPT TO:<"ops\rRSET"@example.com>', "553 5.1.3 "),
    (b"RCPT TO:ops@example.com\r\rDATA", "553 5.1.3 "),
]


def test_envelope_never_carries_cr_or_lf_upstream(start, upstream, raw_client):
    relay = start(upstream)
    client = raw_client(relay.port)
    client.login()
    for line, expected in INJECTED_MAIL:
        reply = client.command(line)
        assert reply.startswith(expected), (line, reply)
    assert client.command(f"MAIL FROM:<{SENDER}>").startswith("250")
    for line, expected in INJECTED_RCPT:
        reply = client.command(line)
        assert reply.startswith(expected), (line, reply)
    assert client.command(f"RCPT TO:<{RECIPIENT}>").startswith("250")
    assert client.command("DATA").startswith("354")
    assert client.command(message() + b".").startswith("250")
    sent = [address for address, _ in upstream.handler.mail_commands]
    sent += [option for _, options in upstream.handler.mail_commands
             for option in options]
    sent += upstream.handler.rcpt_commands
    assert not any(char in text for text in sent for char in "\r\n\x00"), sent
    assert upstream.handler.mail_commands == [(SENDER, [])]
    assert upstream.handler.rcpt_commands == [RECIPIENT]
    assert upstream.messages[0].rcpt_tos == [RECIPIENT]

