"""Client-facing behaviour of the relay process, end to end.

Every test starts the real relay (`python smtp_relay.py`) in front of a real upstream
(aiosmtpd in this process) and talks to it over real sockets on 127.0.0.1: smtplib for
well-formed sessions, RawClient for what smtplib will not send. Nothing is mocked.

Sections: authentication, domain policy, limits, robustness, lifecycle and logging.
Every robustness test ends by checking that a fresh client can still deliver a message.
"""

from __future__ import annotations

import base64
import concurrent.futures
import re
import shlex
import signal
import smtplib
import ssl
import threading
import time

import pytest
from conftest import PASSWORD, USER, message

pytestmark = pytest.mark.timeout(60)

SENDER = "app@example.com"
RECIPIENT = "ops@example.com"
WRONG_PASSWORD = "Wr0ng-Pa55-xyzzy"


# ---------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------

_LOG_LINE = re.compile(r"^\S+ \S+ (?P<level>[A-Z]+) (?P<event>\S+) ?(?P<rest>.*)$")


def log_events(text: str, event: str) -> list[tuple[str, dict[str, str]]]:
    """[(level, {field: value})] for every `event key=value ...` line in `text`."""
    found = []
    for line in text.splitlines():
        match = _LOG_LINE.match(line)
        if match is None or match["event"] != event:
            continue
        fields = dict(token.split("=", 1) for token in shlex.split(match["rest"]))
        found.append((match["level"], fields))
    return found


def auth_plain_token(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def deliver_with_new_client(relay, upstream, subject: str = "after") -> None:
    """A fresh smtplib client delivers one message, and the upstream has it."""
    before = len(upstream.messages)
    with relay.client() as client:
        refused = client.sendmail(SENDER, [RECIPIENT], message(subject))
    assert refused == {}
    assert len(upstream.messages) == before + 1
    assert upstream.messages[-1].content.endswith(message(subject))


def raw_transaction(client, subject: str, recipients=(RECIPIENT,)) -> str:
    """MAIL, RCPT..., DATA, content on an authenticated RawClient; the final reply."""
    assert client.command(f"MAIL FROM:<{SENDER}>").startswith("250")
    for recipient in recipients:
        assert client.command(f"RCPT TO:<{recipient}>").startswith("250")
    assert client.command("DATA").startswith("354")
    return client.command(message(subject) + b".")


def subjects(upstream) -> list[bytes]:
    return [re.search(rb"Subject: (\S+)", m.content).group(1) for m in upstream.messages]


# ---------------------------------------------------------------------------------------
# Authentication
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("mechanism", ["default", "PLAIN", "LOGIN"])
def test_right_credentials_authenticate_and_deliver(relay, upstream, mechanism):
    with relay.client(login=False) as client:
        if mechanism == "default":
            code, _ = client.login(USER, PASSWORD)
        else:
            client.user, client.password = USER, PASSWORD
            authobject = client.auth_plain if mechanism == "PLAIN" else client.auth_login
            code, _ = client.auth(mechanism, authobject)
        assert code == 235
        refused = client.sendmail(SENDER, [RECIPIENT], message(mechanism))
    assert refused == {}
    assert [m.rcpt_tos for m in upstream.messages] == [[RECIPIENT]]
    log = relay.wait_for_log("auth-ok")
    assert [fields["user"] for _, fields in log_events(log, "auth-ok")] == [USER]


def test_mail_before_auth_gets_530_and_nothing_reaches_upstream(relay, upstream):
    with relay.client(login=False) as client:
        code, text = client.mail(SENDER)
        assert code == 530, text
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            client.sendmail(SENDER, [RECIPIENT], message())
        assert refused.value.smtp_code == 530
    assert upstream.handler.mail_commands == []
    assert upstream.handler.rcpt_commands == []
    assert upstream.messages == []


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
@pytest.mark.parametrize("user,password", [(USER, WRONG_PASSWORD), ("mallory", PASSWORD)],
                         ids=["wrong-password", "wrong-user"])
def test_wrong_credentials_get_535(relay, upstream, raw_client, mechanism, user,
                                   password):
    client = raw_client(relay.port)
    assert client.command("EHLO raw.test").startswith("250")
    if mechanism == "PLAIN":
        reply = client.command(f"AUTH PLAIN {auth_plain_token(user, password)}")
    else:
        assert client.command("AUTH LOGIN").startswith("334")
        assert client.command(b64(user)).startswith("334")
        reply = client.command(b64(password))
    assert reply.startswith("535"), reply
    # Still not authenticated.
    assert client.command(f"MAIL FROM:<{SENDER}>").startswith("530")
    assert upstream.handler.mail_commands == []


def test_failed_auth_is_logged_with_peer_and_user_but_never_the_password(
        relay, raw_client):
    client = raw_client(relay.port)
    assert client.command("EHLO raw.test").startswith("250")
    token = auth_plain_token(USER, WRONG_PASSWORD)
    assert client.command(f"AUTH PLAIN {token}").startswith("535")
    assert client.command("AUTH LOGIN").startswith("334")
    assert client.command(b64("mallory")).startswith("334")
    assert client.command(b64(WRONG_PASSWORD)).startswith("535")

    log = relay.wait_for_log("attempted_user=mallory")
    failures = log_events(log, "auth-failed")
    assert [(level, f["peer"], f["attempted_user"], f["mechanism"])
            for level, f in failures] == [("WARNING", "127.0.0.1", USER, "PLAIN"),
                                          ("WARNING", "127.0.0.1", "mallory", "LOGIN")]
    for text in (log, relay.stderr):
        for secret in (WRONG_PASSWORD, PASSWORD, token, b64(WRONG_PASSWORD)):
            assert secret not in text


def test_use_tls_requires_starttls_before_auth_and_mail(start_relay, upstream,
                                                        server_cert):
    cert_file, key_file, ca_file = server_cert
    relay = start_relay(upstream, USE_TLS="true", TLS_CERT_FILE=cert_file,
                        TLS_KEY_FILE=key_file)
    with relay.client(login=False) as client:
        assert client.has_extn("starttls")
        assert not client.has_extn("auth")
        code, text = client.docmd("AUTH", f"PLAIN {auth_plain_token(USER, PASSWORD)}")
        assert 500 <= code < 600, (code, text)
        code, text = client.docmd("MAIL", f"FROM:<{SENDER}>")
        assert 500 <= code < 600, (code, text)
        assert upstream.handler.mail_commands == []

        client.starttls(context=ssl.create_default_context(cafile=str(ca_file)))
        client.ehlo("client.test")
        assert client.has_extn("auth")
        assert {"PLAIN", "LOGIN"} <= set(client.esmtp_features["auth"].split())
        code, _ = client.login(USER, PASSWORD)
        assert code == 235
        refused = client.sendmail(SENDER, [RECIPIENT], message("over-tls"))
    assert refused == {}
    assert len(upstream.messages) == 1
    assert b" with ESMTPSA id " in upstream.messages[0].content


def test_commands_pipelined_after_starttls_in_plaintext_are_discarded(
        start_relay, upstream, server_cert, raw_client):
    # STARTTLS command injection: an attacker on the path appends AUTH to STARTTLS in
    # the plaintext packet; it must not run inside the TLS session.
    cert_file, key_file, ca_file = server_cert
    relay = start_relay(upstream, USE_TLS="true", TLS_CERT_FILE=cert_file,
                        TLS_KEY_FILE=key_file)
    client = raw_client(relay.port)
    assert "250-STARTTLS" in client.command("EHLO raw.test").splitlines()
    client.send(b"STARTTLS\r\nAUTH PLAIN "
                + auth_plain_token(USER, PASSWORD).encode() + b"\r\n")
    assert client.reply().startswith("220")
    assert client.buffer == b""
    context = ssl.create_default_context(cafile=str(ca_file))
    client.sock = context.wrap_socket(client.sock, server_hostname="localhost")
    # The first reply inside TLS answers our NOOP, not the injected AUTH.
    assert client.command("NOOP") == "250 OK"
    assert client.command("EHLO raw.test").startswith("250")
    assert client.command(f"MAIL FROM:<{SENDER}>").startswith("530")
    assert upstream.handler.mail_commands == []


def test_without_use_tls_auth_is_advertised_in_plaintext(start_relay, upstream):
    relay = start_relay(upstream, USE_TLS="false")
    with relay.client(login=False) as client:
        assert not client.has_extn("starttls")
        assert client.has_extn("auth")
        assert {"PLAIN", "LOGIN"} <= set(client.esmtp_features["auth"].split())


# ---------------------------------------------------------------------------------------
# Domain policy, end to end
# ---------------------------------------------------------------------------------------

def test_disallowed_sender_domain_gets_553_and_a_warning(relay, upstream):
    with relay.client() as client:
        code, text = client.mail("app@evil.com")
    assert code == 553
    assert text.startswith(b"5.7.1"), text
    assert upstream.handler.mail_commands == []

    log = relay.wait_for_log("sender-refused")
    [(level, fields)] = log_events(log, "sender-refused")
    assert level == "WARNING"
    assert fields["domain"] == "evil.com"
    assert "app@evil.com" in fields["address"]
    assert fields["peer"] == "127.0.0.1"
    assert fields["user"] == USER


def test_disallowed_recipient_gets_550_while_allowed_one_is_delivered(relay, upstream):
    with relay.client() as client:
        assert client.mail(SENDER)[0] == 250
        code, text = client.rcpt("bad@evil.com")
        assert code == 550
        assert text.startswith(b"5.7.1"), text
        assert client.rcpt(RECIPIENT)[0] == 250
        code, _ = client.data(message("mixed"))
        assert code == 250
    assert [m.rcpt_tos for m in upstream.messages] == [[RECIPIENT]]
    assert upstream.handler.rcpt_commands == [RECIPIENT]

    log = relay.wait_for_log("recipient-refused")
    [(level, fields)] = log_events(log, "recipient-refused")
    assert level == "WARNING"
    assert fields["domain"] == "evil.com"
    assert "bad@evil.com" in fields["address"]
    assert fields["peer"] == "127.0.0.1"
    assert fields["user"] == USER


@pytest.mark.parametrize("address", [
    "<user%evil.com@example.com>",
    "<@evil.com:u@example.com>",
    "<u@[127.0.0.1]>",
    '<"u@evil.com"@example.com>',
    "<u@evil.com.>",
])
def test_address_tricks_are_refused_and_never_reach_upstream(relay, upstream,
                                                             raw_client, address):
    client = raw_client(relay.port)
    client.login()
    assert client.command(f"MAIL FROM:<{SENDER}>").startswith("250")
    reply = client.command(f"RCPT TO:{address}")
    assert reply[:1] == "5", reply
    assert "5.7.1" in reply, reply
    # The transaction goes on with a legitimate recipient only.
    assert client.command(f"RCPT TO:<{RECIPIENT}>").startswith("250")
    assert client.command("DATA").startswith("354")
    assert client.command(message("trick") + b".").startswith("250")
    assert upstream.handler.rcpt_commands == [RECIPIENT]
    assert [m.rcpt_tos for m in upstream.messages] == [[RECIPIENT]]


def test_subdomain_wildcard_allows_subdomains_but_not_the_parent(relay, upstream):
    # The test configuration has ALLOWED_TO_DOMAINS=example.com,*.example.org.
    with relay.client() as client:
        assert client.mail(SENDER)[0] == 250
        assert client.rcpt("a@x.example.org")[0] == 250
        code, text = client.rcpt("a@example.org")
        assert code == 550, text
        assert client.data(message("wildcard"))[0] == 250
    assert [m.rcpt_tos for m in upstream.messages] == [["a@x.example.org"]]


# ---------------------------------------------------------------------------------------
# Limits
# ---------------------------------------------------------------------------------------

def test_max_connections_refuses_the_extra_connection_with_421(start_relay, upstream,
                                                               raw_client):
    relay = start_relay(upstream, MAX_CONNECTIONS="2")
    first = raw_client(relay.port)
    first.login()
    second = raw_client(relay.port)
    second.login()

    third = raw_client(relay.port)
    assert third.banner.startswith("421 4.7.0"), third.banner
    assert third.closed()

    assert raw_transaction(first, "first").startswith("250")
    assert raw_transaction(second, "second").startswith("250")
    assert sorted(subjects(upstream)) == [b"first", b"second"]
    log = relay.wait_for_log("connection-refused")
    assert log_events(log, "connection-refused")[0][0] == "WARNING"


def test_idle_client_is_told_421_and_disconnected(start_relay, upstream, raw_client):
    relay = start_relay(upstream, TIMEOUT="2")
    client = raw_client(relay.port)
    client.login()
    reply = client.reply()  # nothing sent: the relay speaks first, after TIMEOUT
    assert reply.startswith("421"), reply
    assert client.closed()
    relay.wait_for_log("idle-timeout")
    deliver_with_new_client(relay, upstream)


def test_client_waiting_on_a_slow_upstream_is_not_idle(start_relay, upstream,
                                                       raw_client):
    # TIMEOUT is both the client idle timeout and the upstream command timeout, so the
    # upstream stalls for less than TIMEOUT; the client pauses after 354 so that the
    # time since its last *command* (DATA) exceeds TIMEOUT before the upstream answers.
    relay = start_relay(upstream, TIMEOUT="3")
    upstream.handler.stall = {"DATA": 2}
    client = raw_client(relay.port)
    client.login()
    assert client.command(f"MAIL FROM:<{SENDER}>").startswith("250")
    assert client.command(f"RCPT TO:<{RECIPIENT}>").startswith("250")
    assert client.command("DATA").startswith("354")
    time.sleep(1.5)  # 1.5 s here + 2 s upstream stall: 3.5 s since the DATA command
    reply = client.command(message("slow") + b".")
    assert reply.startswith("250 2.0.0 Ok: queued as UP1"), reply
    assert subjects(upstream) == [b"slow"]


def test_idle_clock_restarts_when_the_upstream_answers(start_relay, upstream,
                                                       raw_client):
    relay = start_relay(upstream, TIMEOUT="3")
    upstream.handler.stall = {"DATA": 2.5}
    client = raw_client(relay.port)
    client.login()
    assert raw_transaction(client, "slow").startswith("250 2.0.0 Ok: queued as UP1")
    time.sleep(1)  # well under TIMEOUT since the relay's last reply
    assert client.command("NOOP") == "250 OK"


def test_max_message_size_is_advertised_and_declared_size_refused(start_relay, upstream,
                                                                  raw_client):
    relay = start_relay(upstream, MAX_MESSAGE_SIZE="2000")
    client = raw_client(relay.port)
    ehlo = client.command("EHLO raw.test")
    assert "250-SIZE 2000" in ehlo.splitlines(), ehlo
    client.login()
    reply = client.command(f"MAIL FROM:<{SENDER}> SIZE=5000")
    assert reply.startswith("552"), reply
    assert upstream.handler.mail_commands == []


def test_oversized_body_gets_552_after_data_and_nothing_is_forwarded(
        start_relay, upstream, raw_client):
    relay = start_relay(upstream, MAX_MESSAGE_SIZE="2000")
    client = raw_client(relay.port)
    client.login()
    assert client.command(f"MAIL FROM:<{SENDER}>").startswith("250")
    assert client.command(f"RCPT TO:<{RECIPIENT}>").startswith("250")
    assert client.command("DATA").startswith("354")
    body = ("x" * 98 + "\r\n") * 50  # 5000 bytes
    reply = client.command(message("big", body) + b".")
    assert reply.startswith("552"), reply
    assert upstream.messages == []
    deliver_with_new_client(relay, upstream)
    assert subjects(upstream) == [b"after"]


def test_max_recipients_refuses_the_third_with_452(start_relay, upstream, raw_client):
    relay = start_relay(upstream, MAX_RECIPIENTS="2")
    client = raw_client(relay.port)
    client.login()
    assert client.command(f"MAIL FROM:<{SENDER}>").startswith("250")
    assert client.command("RCPT TO:<a@example.com>").startswith("250")
    assert client.command("RCPT TO:<b@example.com>").startswith("250")
    reply = client.command("RCPT TO:<c@example.com>")
    assert reply.startswith("452 4.5.3"), reply
    assert client.command("DATA").startswith("354")
    assert client.command(message("two") + b".").startswith("250")
    assert [m.rcpt_tos for m in upstream.messages] == [["a@example.com", "b@example.com"]]
    assert "c@example.com" not in upstream.handler.rcpt_commands


# ---------------------------------------------------------------------------------------
# Robustness: each test ends with a fresh client delivering normally
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("garbage", [
    b"\x00\x01\x02\xff\xfe\xfd",
    b"\xc3\xa9t\xc3\xa9 \x80\x81",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS ClientHello's first bytes
    b"",
], ids=["binary", "non-ascii", "tls-hello", "empty-line"])
def test_garbage_gets_500_and_the_session_continues(relay, upstream, raw_client,
                                                    garbage):
    client = raw_client(relay.port)
    reply = client.command(garbage)
    assert reply.startswith("500"), reply
    client.login()
    assert raw_transaction(client, "same-session").startswith("250")
    deliver_with_new_client(relay, upstream)
    assert subjects(upstream) == [b"same-session", b"after"]


def test_too_many_unknown_commands_close_with_502(relay, upstream, raw_client):
    client = raw_client(relay.port)
    replies = [client.command(verb) for verb in ("FOO", "BAR bar", "XYZZY", "HACK")]
    assert all(reply.startswith("500") for reply in replies), replies
    reply = client.command("ONEMORE")
    assert reply.startswith("502"), reply
    assert client.closed()
    deliver_with_new_client(relay, upstream)


@pytest.mark.parametrize("junk", [b"\xff\xfe junk\r\n", b"x" * 1000],
                         ids=["junk-lines", "endless-line"])
def test_client_sending_only_junk_is_eventually_disconnected(start_relay, raw_client,
                                                             junk):
    relay = start_relay(None, TIMEOUT="1")
    client = raw_client(relay.port)
    closed = False
    for _ in range(16):  # 4 s of junk, four times TIMEOUT
        try:
            client.send(junk)
        except OSError:
            closed = True
            break
        if client.closed(timeout=0.25):
            closed = True
            break
    assert closed
    assert re.search(rb"^(421|502) ", client.buffer.replace(b"500 Error: bad syntax\r\n",
                                                           b""), re.MULTILINE)


@pytest.mark.parametrize("length", [600, 70_000], ids=["over-512", "over-64KiB"])
def test_overlong_command_line_gets_500_and_the_session_continues(
        relay, upstream, raw_client, length):
    client = raw_client(relay.port)
    client.login()
    reply = client.command("NOOP " + "x" * length)
    assert reply.startswith("500"), reply
    reply = client.command(f"RCPT TO:<{'a' * length}@example.com>")
    assert reply.startswith("500"), reply
    assert client.command("NOOP").startswith("250")
    assert raw_transaction(client, "same-session").startswith("250")
    deliver_with_new_client(relay, upstream)
    assert subjects(upstream) == [b"same-session", b"after"]


def test_overlong_data_line_gets_500_and_nothing_is_forwarded(relay, upstream,
                                                              raw_client):
    client = raw_client(relay.port)
    client.login()
    assert client.command(f"MAIL FROM:<{SENDER}>").startswith("250")
    assert client.command(f"RCPT TO:<{RECIPIENT}>").startswith("250")
    assert client.command("DATA").startswith("354")
    reply = client.command(message("long-line", "y" * 2000 + "\r\n") + b".")
    assert reply.startswith("500"), reply
    assert upstream.messages == []
    assert raw_transaction(client, "same-session").startswith("250")
    deliver_with_new_client(relay, upstream)
    assert subjects(upstream) == [b"same-session", b"after"]


SMUGGLED = b"MAIL FROM:<x@example.com>\r\nRCPT TO:<y@example.com>\r\nDATA\r\nsmuggled"


@pytest.mark.parametrize("separator", [
    b"\n.\r\n", b"\r.\r", b"\n.\n", b"\r\n.\n", b"\r.\r\n",
], ids=["LF.CRLF", "CR.CR", "LF.LF", "CRLF.LF", "CR.CRLF"])
def test_smtp_smuggling_is_refused(relay, upstream, raw_client, separator):
    client = raw_client(relay.port)
    client.login()
    assert client.command(f"MAIL FROM:<{SENDER}>").startswith("250")
    assert client.command(f"RCPT TO:<{RECIPIENT}>").startswith("250")
    assert client.command("DATA").startswith("354")
    client.send(message("smuggle", "Hello") + separator + SMUGGLED + b"\r\n.\r\n")
    reply = client.reply()
    assert reply.startswith("550 5.6.0"), reply
    # The next reply answers our NOOP, not a smuggled command.
    assert client.command("NOOP") == "250 OK"
    log = relay.wait_for_log("message-refused")
    assert [level for level, _ in log_events(log, "message-refused")] == ["WARNING"]

    assert len(upstream.messages) <= 1
    assert "y@example.com" not in upstream.handler.rcpt_commands
    assert all("y@example.com" not in m.rcpt_tos for m in upstream.messages)
    deliver_with_new_client(relay, upstream)
    assert b"smuggled" not in b"".join(m.content for m in upstream.messages)


@pytest.mark.parametrize("moment", ["mid-data", "mid-command"])
def test_client_vanishing_forwards_nothing_and_relay_stays_up(relay, upstream,
                                                              raw_client, moment):
    client = raw_client(relay.port)
    client.login()
    if moment == "mid-data":
        assert client.command(f"MAIL FROM:<{SENDER}>").startswith("250")
        assert client.command(f"RCPT TO:<{RECIPIENT}>").startswith("250")
        assert client.command("DATA").startswith("354")
        client.send(message("vanished", "half a line"))
    else:
        client.send(b"MAIL FROM:<app@exa")
    client.close()

    deliver_with_new_client(relay, upstream)
    assert subjects(upstream) == [b"after"]
    assert relay.process.poll() is None


def test_pipelined_commands_get_replies_in_order(relay, upstream, raw_client):
    upstream.handler.rcpt_replies = {"gone@example.com": "550 5.1.1 No such user"}
    client = raw_client(relay.port)
    ehlo = client.command("EHLO raw.test")
    assert "250-PIPELINING" in ehlo.splitlines(), ehlo
    client.login()
    client.send(f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{RECIPIENT}>\r\n"
                "RCPT TO:<gone@example.com>\r\nDATA\r\n".encode())
    replies = [client.reply() for _ in range(4)]
    assert [reply[:9] for reply in replies] == [
        "250 2.1.0", "250 2.1.5", "550 5.1.1", "354 End d"], replies
    assert client.command(message("pipelined") + b".").startswith("250")
    assert [m.rcpt_tos for m in upstream.messages] == [[RECIPIENT]]


# ---------------------------------------------------------------------------------------
# Lifecycle and logging
# ---------------------------------------------------------------------------------------

def test_sigterm_lets_the_delivery_in_flight_finish_then_exits_0(relay, upstream,
                                                                 raw_client):
    upstream.handler.stall = {"DATA": 2}
    # Know when the relay's DATA has reached the (stalling) upstream. aiosmtpd reads
    # the handler's hooks per connection, and the relay connects upstream at MAIL.
    data_reached_upstream = threading.Event()
    stalling_handle_data = upstream.handler.handle_DATA

    async def handle_data(server, session, envelope):
        data_reached_upstream.set()
        return await stalling_handle_data(server, session, envelope)

    upstream.handler.handle_DATA = handle_data
    client = raw_client(relay.port)
    client.login()
    assert client.command(f"MAIL FROM:<{SENDER}>").startswith("250")
    assert client.command(f"RCPT TO:<{RECIPIENT}>").startswith("250")
    assert client.command("DATA").startswith("354")
    client.send(message("in-flight") + b".\r\n")
    assert data_reached_upstream.wait(10)
    relay.process.send_signal(signal.SIGTERM)

    reply = client.reply()
    assert reply.startswith("250 2.0.0 Ok: queued as UP1"), reply
    assert subjects(upstream) == [b"in-flight"]
    assert relay.stop() == 0
    log = relay.log()
    assert "stopping" in log
    assert "stopped" in log


def test_sigint_exits_0(relay):
    assert relay.stop(signal.SIGINT) == 0


def test_every_line_about_one_message_carries_its_id(relay, upstream):
    upstream.handler.rcpt_replies = {"gone@example.com": "550 5.1.1 No such user"}
    with relay.client() as client:
        for subject, refused_domain in (("one", "evil.com"), ("two", "bad.net")):
            assert client.mail(SENDER)[0] == 250
            assert client.rcpt(RECIPIENT)[0] == 250
            assert client.rcpt(f"x@{refused_domain}")[0] == 550
            assert client.rcpt("gone@example.com")[0] == 550
            assert client.data(message(subject))[0] == 250

    log = relay.wait_for_log("queued as UP2")
    delivered = log_events(log, "delivered")
    assert len(delivered) == 2
    first_id, second_id = (fields["id"] for _, fields in delivered)
    assert re.fullmatch(r"[0-9a-f]+", first_id)
    assert first_id != second_id

    refusals = log_events(log, "recipient-refused")
    by_address = {}
    for _, fields in refusals:
        by_address.setdefault(fields["address"].strip("<>"), []).append(fields["id"])
    assert by_address == {"x@evil.com": [first_id], "x@bad.net": [second_id],
                          "gone@example.com": [first_id, second_id]}


def test_one_info_line_per_delivered_message(relay, upstream):
    with relay.client() as client:
        for subject in ("one", "two"):
            assert client.sendmail(SENDER, [RECIPIENT, "b@example.com"],
                                   message(subject)) == {}

    log = relay.wait_for_log("queued as UP2")
    delivered = log_events(log, "delivered")
    assert len(delivered) == 2
    for number, (level, fields) in enumerate(delivered, start=1):
        assert level == "INFO"
        assert fields["from"] == SENDER
        assert fields["to"] == f"{RECIPIENT},b@example.com"
        assert int(fields["size"]) == len(message("one"))
        assert fields["upstream"] == f"250 2.0.0 Ok: queued as UP{number}"
        assert float(fields["duration_ms"]) >= 0
        assert fields["user"] == USER
        assert fields["peer"] == "127.0.0.1"
    assert log_events(log, "delivery-failed") == []


def test_one_error_line_per_failed_delivery(relay, upstream):
    upstream.handler.data_reply = "554 5.7.1 rejected"
    with relay.client() as client:
        assert client.mail(SENDER)[0] == 250
        assert client.rcpt(RECIPIENT)[0] == 250
        code, text = client.data(message("refused"))
    assert (code, text) == (554, b"5.7.1 rejected")

    log = relay.wait_for_log("delivery-failed")
    failed = log_events(log, "delivery-failed")
    assert len(failed) == 1
    level, fields = failed[0]
    assert level == "ERROR"
    assert fields["upstream"] == "554 5.7.1 rejected"
    assert fields["from"] == SENDER
    assert fields["to"] == RECIPIENT
    assert log_events(log, "delivered") == []


def test_log_goes_to_log_file_and_stderr(relay, upstream):
    deliver_with_new_client(relay, upstream)
    log = relay.wait_for_log("delivered")
    assert relay.log_file.is_file()
    [line] = [line for line in log.splitlines() if " delivered " in line]
    deadline = time.monotonic() + 10
    while line not in relay.stderr and time.monotonic() < deadline:
        time.sleep(0.05)
    assert line in relay.stderr
    assert " started " in log and " started " in relay.stderr


def test_concurrent_clients_each_get_their_own_delivery(relay, upstream):
    def send(subject: str) -> dict:
        with relay.client() as client:
            return client.sendmail(SENDER, [RECIPIENT], message(subject))

    with concurrent.futures.ThreadPoolExecutor(5) as executor:
        results = list(executor.map(send, [f"c{n}" for n in range(5)], timeout=30))
    assert results == [{}] * 5
    assert sorted(subjects(upstream)) == [f"c{n}".encode() for n in range(5)]
