"""Fast in-process tests of the three classes of smtp_relay.py, with small fakes.

The end-to-end tests (real relay process, real sockets, real upstream) are the proof of
behaviour; these pin each class's own decisions without a network, so a change to one
of them fails here in milliseconds and says where. The fakes stand in only for a
collaborator's interface (the Forwarder's four calls); sessions, policies, the rate
limiter and the metrics are the real ones.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiosmtpd.smtp import LoginPassword
from conftest import PASSWORD, USER

from relay.observability import Metrics
from relay.protocol import Client, RelayEnvelope, RelaySession
from relay.ratelimit import RateLimiter
from relay.settings import load_config
from relay.users import AuthGuard
from smtp_relay import SMTPAuthHandler, SMTPRelayHandler, SMTPRelayServer

pytestmark = pytest.mark.timeout(30)

SETTINGS = {"SMTP_AUTH_USERNAME": USER, "SMTP_AUTH_PASSWORD": PASSWORD,
            "ALLOWED_FROM_DOMAINS": "example.com", "ALLOWED_TO_DOMAINS": "example.org",
            "RELAY_USE_TLS": "false", "AUTH_FAILURE_DELAY": "0", "AUTH_MAX_FAILURES": "3",
            "LISTEN_HOST": "127.0.0.1"}


def run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


def counted(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


async def new_session(peer: str = "10.0.0.7") -> RelaySession:
    return RelaySession(asyncio.get_running_loop(), Client(peer_ip=peer))


# ---------------------------------------------------------------------------------------
# SMTPAuthHandler: the whole AUTH decision
# ---------------------------------------------------------------------------------------

def auth_handler(**overrides: str) -> tuple[SMTPAuthHandler, Metrics]:
    config = load_config({**SETTINGS, **overrides})
    metrics = Metrics()
    guard = AuthGuard(config.auth_max_failures, config.auth_failure_window)
    return SMTPAuthHandler(config, guard, metrics), metrics


def test_auth_success_gives_the_session_its_user_and_policy():
    handler, metrics = auth_handler()

    async def go() -> tuple[tuple[str, bool], RelaySession]:
        session = await new_session()
        credentials = LoginPassword(USER.encode(), PASSWORD.encode())
        return await handler.authenticate(session, "PLAIN", credentials), session

    (reply, hang_up), session = run(go())
    assert reply.startswith("235 2.7.0") and not hang_up
    assert session.authenticated and session.user == USER
    assert session.policy is not None and session.policy.name == USER
    assert counted(metrics, "smtp_relay_auth_total", result="success") == 1


def test_auth_failure_is_535_and_locks_out_at_the_limit():
    handler, metrics = auth_handler()

    async def go() -> list[tuple[str, bool]]:
        session = await new_session()
        wrong = LoginPassword(USER.encode(), b"wrong")
        return [await handler.authenticate(session, "LOGIN", wrong) for _ in range(3)]

    verdicts = run(go())
    assert [reply[:3] for reply, _ in verdicts] == ["535", "535", "421"]
    assert [hang_up for _, hang_up in verdicts] == [False, False, True]
    assert counted(metrics, "smtp_relay_auth_total", result="failure") == 3


def test_concurrent_logins_from_one_address_do_not_lock_it_out():
    # A failure is counted once its check fails (issue #12): five bcrypt checks of one
    # address running at once, all right, leave AUTH_MAX_FAILURES=3 far away.
    import bcrypt
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode()
    config = load_config({**{k: v for k, v in SETTINGS.items()
                             if k != "SMTP_AUTH_PASSWORD"},
                          "SMTP_AUTH_PASSWORD_HASH": hashed})
    guard = AuthGuard(config.auth_max_failures, config.auth_failure_window)
    handler = SMTPAuthHandler(config, guard, Metrics())

    async def go() -> tuple[list[Any], bool, bool]:
        sessions = [await new_session() for _ in range(5)]
        right = LoginPassword(USER.encode(), PASSWORD.encode())
        verdicts = await asyncio.gather(*(handler.authenticate(session, "PLAIN", right)
                                          for session in sessions))
        unlocked = not guard.locked("10.0.0.7")
        # A client that leaves during its check is counted all the same.
        wrong = LoginPassword(USER.encode(), b"wrong")
        checks = [asyncio.ensure_future(handler.authenticate(await new_session(),
                                                             "PLAIN", wrong))
                  for _ in range(3)]
        await asyncio.sleep(0)
        for check in checks:
            check.cancel()
        await asyncio.gather(*checks, return_exceptions=True)
        for _ in range(200):  # the counts run in tasks of their own
            if guard.locked("10.0.0.7"):
                break
            await asyncio.sleep(0.01)
        return verdicts, unlocked, guard.locked("10.0.0.7")

    verdicts, unlocked, locked = run(go())
    assert [reply[:3] for reply, _ in verdicts] == ["235"] * 5
    assert unlocked and locked


def test_auth_refused_inside_a_transaction_and_when_locked_out():
    handler, _ = auth_handler(AUTH_MAX_FAILURES="1")

    async def go() -> tuple[Any, Any, Any]:
        session = await new_session()
        inside = await handler.refusal(session, in_transaction=True)
        before = await handler.refusal(session, in_transaction=False)
        await handler.authenticate(session, "PLAIN", LoginPassword(USER.encode(), b"x"))
        return inside, before, await handler.refusal(session, in_transaction=False)

    inside, before, locked = run(go())
    assert inside == ("503 5.5.1 AUTH not permitted during a mail transaction", False)
    assert before is None
    assert locked is not None and locked[0].startswith("421 4.7.0") and locked[1]


def test_take_credentials_hands_over_once():
    handler, _ = auth_handler()

    async def go() -> tuple[Any, Any]:
        session = await new_session()
        handler(None, session, None, "PLAIN", "data")  # type: ignore[arg-type]
        return handler.take_credentials(session), handler.take_credentials(session)

    assert run(go()) == (("PLAIN", "data"), None)


# ---------------------------------------------------------------------------------------
# SMTPRelayHandler: each hook's checks, then the (fake) upstream, then the outcome
# ---------------------------------------------------------------------------------------

class FakeForwarder:
    """The Forwarder's interface, answering what the test says, recording the calls."""

    def __init__(self, mail: str = "250 2.1.0 Ok", rcpt: str = "250 2.1.5 Ok",
                 data: tuple[bool, str] = (True, "250 2.0.0 queued as F1")):
        self.mail, self.rcpt, self.data = mail, rcpt, data
        self.calls: list[str] = []

    async def begin(self, session: RelaySession, sender: str, options: list[str]) -> str:
        self.calls.append(f"MAIL {sender}")
        if self.mail.startswith("250"):
            session.transaction = object()  # type: ignore[assignment]
        return self.mail

    async def add_recipient(self, session: RelaySession, recipient: str) -> str:
        self.calls.append(f"RCPT {recipient}")
        return self.rcpt

    async def send_data(self, session: RelaySession, message: bytes) -> tuple[bool, str]:
        self.calls.append("DATA")
        session.transaction = None
        return self.data

    def finish(self, session: RelaySession, *, reset: bool = False) -> None:
        self.calls.append("finish")
        session.transaction = None

    def outlive(self, delivery: asyncio.Future) -> None:
        self.calls.append("outlive")


class FakeServer:
    """What a hook reads of the protocol."""

    hostname = "relay.test"
    encrypted = False

    def pipelined(self, verb: bytes) -> bool:
        return False  # a client that waits for each reply


def relay_handler(forwarder: FakeForwarder, **overrides: str
                  ) -> tuple[SMTPRelayHandler, Metrics]:
    config = load_config({**SETTINGS, **overrides})
    metrics = Metrics()
    handler = SMTPRelayHandler(config, forwarder, RateLimiter(config),  # type: ignore[arg-type]
                               metrics)
    return handler, metrics


async def authenticated_session() -> RelaySession:
    from relay.users import default_policy
    session = await new_session()
    session.authenticated, session.user = True, USER
    session.user_policy = default_policy(load_config(SETTINGS), USER)
    return session


def test_mail_without_auth_is_530_and_never_reaches_the_upstream():
    forwarder = FakeForwarder()
    handler, metrics = relay_handler(forwarder)

    async def go() -> str:
        session = await new_session()
        return await handler.handle_MAIL(FakeServer(), session, RelayEnvelope(),  # type: ignore[arg-type]
                                         "<a@example.com>", [])

    assert run(go()) == "530 5.7.0 Authentication required"
    assert forwarder.calls == []
    assert counted(metrics, "smtp_relay_messages_rejected_total", reason="auth",
                   user="-") == 1


def test_sender_and_recipient_domains_are_checked_before_the_upstream():
    forwarder = FakeForwarder()
    handler, metrics = relay_handler(forwarder)

    async def go() -> list[str]:
        session, envelope = await authenticated_session(), RelayEnvelope()
        server: Any = FakeServer()
        return [await handler.handle_MAIL(server, session, envelope, "<a@evil.com>", []),
                await handler.handle_MAIL(server, session, envelope, "<a@example.com>",
                                          []),
                await handler.handle_RCPT(server, session, envelope, "<b@evil.com>", []),
                await handler.handle_RCPT(server, session, envelope, "<b@example.org>",
                                          [])]

    assert run(go()) == ["553 5.7.1 Sender domain evil.com is not allowed",
                         "250 2.1.0 Ok",
                         "550 5.7.1 Recipient domain evil.com is not allowed",
                         "250 2.1.5 Ok"]
    assert forwarder.calls == ["MAIL a@example.com", "RCPT b@example.org"]
    for reason in ("sender_domain", "recipient_domain"):
        assert counted(metrics, "smtp_relay_messages_rejected_total", reason=reason,
                       user=USER) == 1


def test_data_with_a_bare_lf_is_refused_and_the_transaction_reset():
    forwarder = FakeForwarder()
    handler, _ = relay_handler(forwarder)

    async def go() -> str:
        session, envelope = await authenticated_session(), RelayEnvelope()
        session.transaction = object()  # type: ignore[assignment]
        envelope.rcpt_tos = ["b@example.org"]
        envelope.smtp_data = envelope.original_content = b"Subject: x\n\r\nsmuggled\r\n"
        return await handler.handle_DATA(FakeServer(), session, envelope)  # type: ignore[arg-type]

    assert run(go()).startswith("550 5.6.0 Message refused: bare CR or LF")
    assert forwarder.calls == ["finish"]


def test_accepted_data_is_250_with_the_relay_id_and_counted():
    forwarder = FakeForwarder()
    handler, metrics = relay_handler(forwarder)

    async def go() -> tuple[str, str | None]:
        session, envelope = await authenticated_session(), RelayEnvelope()
        server: Any = FakeServer()
        await handler.handle_MAIL(server, session, envelope, "<a@example.com>", [])
        message_id = session.message_id
        envelope.mail_from, envelope.rcpt_tos = "a@example.com", ["b@example.org"]
        envelope.smtp_data = envelope.original_content = b"Subject: x\r\n\r\nHi\r\n"
        return await handler.handle_DATA(server, session, envelope), message_id

    reply, message_id = run(go())
    assert reply == f"250 2.0.0 queued as F1 (smtp-relay id {message_id})"
    assert forwarder.calls == ["MAIL a@example.com", "DATA"]
    assert counted(metrics, "smtp_relay_messages_accepted_total", user=USER) == 1


# ---------------------------------------------------------------------------------------
# SMTPRelayServer: the connection checker it builds and owns
# ---------------------------------------------------------------------------------------

def test_connection_checker_refuses_outsiders_and_marks_trusted_clients():
    config = load_config({**SETTINGS, "ALLOWED_CLIENT_NETWORKS": "10.0.0.0/8",
                          "TRUSTED_NETWORKS": "10.1.0.0/16"})

    async def go() -> tuple[Any, ...]:
        server = SMTPRelayServer(config)
        try:
            outsider, member, trusted = (await new_session("192.0.2.1"),
                                         await new_session("10.0.0.7"),
                                         await new_session("10.1.2.3"))
            return (await server.connection_refusal(outsider),
                    await server.connection_refusal(member),
                    await server.connection_refusal(trusted), member.trusted,
                    trusted.trusted,
                    trusted.policy, server.metrics)
        finally:
            await server.forwarder.close()

    outsider, member, trusted, member_trusted, is_trusted, policy, metrics = run(go())
    assert outsider == "554 5.7.1 Your address is not allowed to use this relay"
    assert member is None and trusted is None
    assert (member_trusted, is_trusted) == (False, True)
    assert policy is not None and policy.allowed_to_domains.allows("example.org")
    assert counted(metrics, "smtp_relay_connections_refused_total", reason="network") == 1


def test_server_builds_each_collaborator_once_and_shares_them():
    async def go() -> SMTPRelayServer:
        server = SMTPRelayServer(load_config(SETTINGS))
        await server.forwarder.close()
        return server

    server = run(go())
    assert server.handler.forwarder is server.forwarder
    assert server.handler.metrics is server.metrics is server.authenticator.metrics
    assert server.authenticator.guard is server.auth_guard
