"""End to end with the real swaks CLI: the issue's "done when".

swaks talks to the relay process, which forwards to a real upstream on 127.0.0.1.
Without swaks these tests are skipped, except under REQUIRE_SWAKS=1 (CI), where a
missing swaks fails them (see conftest.swaks_path).
"""

from __future__ import annotations

import subprocess

import pytest
from conftest import PASSWORD, USER, swaks_path

pytestmark = pytest.mark.timeout(60)

SENDER = "app@example.com"
RECIPIENT = "ops@example.com"


@pytest.fixture
def swaks():
    path = swaks_path()
    if path is None:
        pytest.skip("swaks not installed")

    def run(relay, *args: str, user: str = USER, password: str = PASSWORD,
            sender: str = SENDER, to: str = RECIPIENT) -> subprocess.CompletedProcess:
        command = [path, "--server", f"127.0.0.1:{relay.port}", "--timeout", "20",
                   "--helo", "swaks.test", "--auth-user", user,
                   "--auth-password", password, "--from", sender, "--to", to, *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=50,
                              check=False)

    return run


def output(result: subprocess.CompletedProcess) -> str:
    return result.stdout + result.stderr


@pytest.mark.parametrize("auth", [(), ("--auth", "PLAIN"), ("--auth", "LOGIN")],
                         ids=["any", "PLAIN", "LOGIN"])
def test_swaks_delivers_through_the_relay(relay, upstream, swaks, auth):
    result = swaks(relay, *auth)
    assert result.returncode == 0, output(result)
    assert "<-  235 " in result.stdout
    assert "<-  250 2.0.0 Ok: queued as UP1" in result.stdout
    assert len(upstream.messages) == 1
    received = upstream.messages[0]
    assert (received.mail_from, received.rcpt_tos) == (SENDER, [RECIPIENT])
    assert b"X-Mailer: swaks" in received.content
    assert received.content.startswith(b"Received: from swaks.test ([127.0.0.1])")


def test_swaks_with_starttls(start_relay, upstream, server_cert, swaks):
    cert_file, key_file, ca_file = server_cert
    relay = start_relay(upstream, USE_TLS="true", TLS_CERT_FILE=cert_file,
                        TLS_KEY_FILE=key_file)
    result = swaks(relay, "--tls", "--tls-verify", "--tls-ca-path", str(ca_file))
    assert result.returncode == 0, output(result)
    assert "=== TLS started" in result.stdout
    assert "<~  235 " in result.stdout  # AUTH inside TLS
    assert len(upstream.messages) == 1
    assert b" with ESMTPSA id " in upstream.messages[0].content


def test_swaks_without_starttls_cannot_authenticate_when_tls_is_on(
        start_relay, upstream, server_cert, swaks):
    cert_file, key_file, _ = server_cert
    relay = start_relay(upstream, USE_TLS="true", TLS_CERT_FILE=cert_file,
                        TLS_KEY_FILE=key_file)
    result = swaks(relay, "--auth", "PLAIN")
    assert result.returncode != 0, output(result)
    assert "AUTH" not in "".join(line for line in result.stdout.splitlines()
                                 if line.startswith("<-  250"))
    assert upstream.handler.mail_commands == []
    assert upstream.messages == []


def test_swaks_quit_after_auth_over_tls_sends_nothing(start_relay, upstream,
                                                      server_cert, swaks):
    cert_file, key_file, _ = server_cert
    relay = start_relay(upstream, USE_TLS="true", TLS_CERT_FILE=cert_file,
                        TLS_KEY_FILE=key_file)
    result = swaks(relay, "--tls", "--auth", "LOGIN", "--quit-after", "AUTH")
    assert result.returncode == 0, output(result)
    assert "<~  235 " in result.stdout
    assert "MAIL FROM" not in result.stdout
    assert upstream.handler.mail_commands == []


@pytest.mark.parametrize("auth", [("--auth", "PLAIN"), ("--auth", "LOGIN")],
                         ids=["PLAIN", "LOGIN"])
def test_swaks_bad_password_gets_535(relay, upstream, swaks, auth):
    result = swaks(relay, *auth, password="not-the-password")
    assert result.returncode != 0, output(result)
    assert "<** 535 " in result.stdout
    assert "MAIL FROM" not in result.stdout
    assert upstream.handler.mail_commands == []
    assert "not-the-password" not in relay.log()


def test_swaks_disallowed_sender_gets_553(relay, upstream, swaks):
    result = swaks(relay, sender="app@evil.com")
    assert result.returncode != 0, output(result)
    assert "<** 553 5.7.1" in result.stdout
    assert upstream.handler.mail_commands == []
    assert upstream.messages == []


def test_swaks_disallowed_recipient_gets_550_and_the_allowed_one_is_delivered(
        relay, upstream, swaks):
    result = swaks(relay, to="a@example.com,b@evil.com")
    assert "<** 550 5.7.1" in result.stdout, output(result)
    assert "<-  250 2.0.0 Ok: queued as UP1" in result.stdout
    assert [m.rcpt_tos for m in upstream.messages] == [["a@example.com"]]
    assert upstream.handler.rcpt_commands == ["a@example.com"]


def test_swaks_upstream_down_gets_451(start_relay, swaks):
    relay = start_relay(None)  # RELAY_PORT is a free port: nothing listens there
    result = swaks(relay)
    assert result.returncode != 0, output(result)
    assert "<** 451 " in result.stdout
    assert "Upstream unavailable" in result.stdout
    assert "DATA" not in result.stdout
