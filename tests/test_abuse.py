"""Abuse resistance: password guessing, bcrypt hashes, secret files, AUTH mechanisms,
rate limits, client and trusted networks, SMTPS and the TLS floor, mail loops and the
From: header check.

Most tests start a real relay subprocess in front of a real upstream and talk to it
over real sockets on 127.0.0.1 (smtplib, or the line-level RawClient for what smtplib
will not send); nothing is mocked. Tests that only need a relay's default settings, or
the MAX_HOPS/CHECK_HEADER_FROM settings, share one relay per module. The start-up
refusals (exit status 2, one line naming the variable) are run side by side, once per
module. The pure pieces (AuthGuard, the header helpers, load_config) are tested
directly at the end.

Delays and windows are kept small (fractions of a second, the 1 s minimum window);
assertions are about replies, counts and the order of events, never about speed.
"""

from __future__ import annotations

import base64
import re
import select
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import bcrypt
import pytest
from conftest import (
    PASSWORD,
    SMTP_RELAY,
    UPSTREAM_PASSWORD,
    UPSTREAM_USER,
    USER,
    RawClient,
    RelayProcess,
    exit_of_each,
    free_port,
    mail,
    message,
    rcpt,
    relay_env,
    start_module_relay,
    try_message,
)

import smtp_relay
from relay.policy import (
    AddressError,
    count_received_headers,
    header_block,
    header_from_domains,
)
from relay.ratelimit import RateLimiter
from relay.settings import BCRYPT_HASH, ConfigError, load_config
from relay.users import AuthGuard

pytestmark = pytest.mark.timeout(60)

SENDER = "app@example.com"
RECIPIENT = "ops@example.com"
WRONG_PASSWORD = "Wr0ng-Guess-77"
LOCKED_OUT = "421 4.7.0"
RATE_LIMITED = "451 4.7.1"
RETRY_HINT = re.compile(r"try again in (\d+) s")
CONFIG_ERROR = "smtp-relay: configuration error:"


# ---------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------

def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def plain_token(user: str, password: str) -> str:
    return b64(f"\0{user}\0{password}")


def auth_plain(client: RawClient, user: str = USER, password: str = PASSWORD) -> str:
    """EHLO + AUTH PLAIN on a fresh RawClient; the reply to AUTH."""
    assert client.command("EHLO raw.test").startswith("250")
    return client.command(f"AUTH PLAIN {plain_token(user, password)}")


def auth_login(client: RawClient, user: str = USER, password: str = PASSWORD) -> str:
    """EHLO + AUTH LOGIN on a fresh RawClient; the reply to the password."""
    assert client.command("EHLO raw.test").startswith("250")
    assert client.command("AUTH LOGIN").startswith("334")
    assert client.command(b64(user)).startswith("334")
    return client.command(b64(password))


def auth_mechanisms(client: smtplib.SMTP) -> list[str]:
    """The mechanisms on the EHLO AUTH line (smtplib joins repeated AUTH lines)."""
    return sorted(client.esmtp_features.get("auth", "").split())


def send_one(relay: RelayProcess, *, login: bool = True, subject: str = "test") -> None:
    """A whole message on a new connection; raises if any step is refused."""
    with relay.client(login=login) as client:
        client.sendmail(SENDER, [RECIPIENT], message(subject))


def log_lines(relay: RelayProcess, event: str) -> list[str]:
    return [line for line in relay.log().splitlines() if f" {event} " in f"{line} "]


def names(text: str, variable: str) -> bool:
    """`variable` appears in `text` as a whole name (not as part of a longer one)."""
    return re.search(rf"(?<![A-Z_]){re.escape(variable)}(?![A-Z_])", text) is not None


def tls_client_context(ca_file: Path, **versions: ssl.TLSVersion) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca_file))
    for attribute, version in versions.items():
        setattr(context, attribute, version)
    return context


def smtps_settings(server_cert, **overrides: object) -> dict[str, object]:
    cert_file, key_file, _ = server_cert
    return {"SMTPS_PORT": free_port(), "TLS_CERT_FILE": cert_file,
            "TLS_KEY_FILE": key_file, **overrides}


def make_hash(password: str = PASSWORD, prefix: str = "$2b$") -> str:
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(4)).decode()
    return prefix + hashed[4:]


# ---------------------------------------------------------------------------------------
# Relays shared by a whole module: the default settings, and a loop/From: checking one
# ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def default_relay(tmp_path_factory, module_upstream_server):
    """The relay with conftest's default settings: no abuse option switched on."""
    relay = start_module_relay(tmp_path_factory, module_upstream_server, "default-relay")
    yield relay
    relay.stop(signal.SIGKILL)


@pytest.fixture(scope="module")
def checking_relay(tmp_path_factory, module_upstream_server):
    """MAX_HOPS=3 and CHECK_HEADER_FROM on, subdomains of example.net allowed."""
    relay = start_module_relay(tmp_path_factory, module_upstream_server, "checking-relay",
                               MAX_HOPS="3", CHECK_HEADER_FROM="true",
                               ALLOWED_FROM_DOMAINS="example.com,*.example.net")
    yield relay
    relay.stop(signal.SIGKILL)


# ---------------------------------------------------------------------------------------
# 1. Password guessing
# ---------------------------------------------------------------------------------------

def test_third_failure_locks_the_address_out(start_relay, upstream, raw_client):
    relay = start_relay(upstream, AUTH_MAX_FAILURES="3", AUTH_FAILURE_DELAY="0.2",
                        AUTH_FAILURE_WINDOW="30")
    # Connected before the lock-out: it will try the right password during it.
    early = raw_client(relay.port)
    assert early.command("EHLO early.test").startswith("250")

    guesser = raw_client(relay.port)
    assert auth_plain(guesser, USER, WRONG_PASSWORD + "1").startswith("535 5.7.8")
    assert guesser.command(
        f"AUTH PLAIN {plain_token('mallory', WRONG_PASSWORD + '2')}").startswith("535")
    third = guesser.command(f"AUTH PLAIN {plain_token(USER, WRONG_PASSWORD + '3')}")
    assert third.startswith(LOCKED_OUT), third
    assert guesser.closed()

    # A new connection from the same address is refused at the greeting.
    again = raw_client(relay.port)
    assert again.banner.startswith(LOCKED_OUT), again.banner
    assert again.closed()

    # The right password does not get in during the lock-out.
    right = early.command(f"AUTH PLAIN {plain_token(USER, PASSWORD)}")
    assert right.startswith(LOCKED_OUT), right
    assert early.closed()

    failures = log_lines(relay, "auth-failed")
    assert len(failures) == 3, relay.log()
    assert all(" WARNING auth-failed " in line and "peer=127.0.0.1" in line
               for line in failures)
    assert [re.search(r"attempted_user=(\S+)", line).group(1) for line in failures] == [
        USER, "mallory", USER]
    locked = log_lines(relay, "auth-locked-out")
    assert len(locked) == 1, relay.log()
    assert " ERROR auth-locked-out " in locked[0] and "peer=127.0.0.1" in locked[0]
    assert "auth-ok" not in relay.log()
    for attempt in ("1", "2", "3"):
        assert WRONG_PASSWORD + attempt not in relay.log()
        assert WRONG_PASSWORD + attempt not in relay.stderr


def test_lock_out_counts_failures_across_connections(start_relay, upstream, raw_client):
    relay = start_relay(upstream, AUTH_MAX_FAILURES="3", AUTH_FAILURE_DELAY="0",
                        AUTH_FAILURE_WINDOW="30")
    replies = []
    for _ in range(3):
        client = raw_client(relay.port)
        replies.append(auth_plain(client, USER, WRONG_PASSWORD))
        client.close()
    assert replies[0].startswith("535") and replies[1].startswith("535"), replies
    assert replies[2].startswith(LOCKED_OUT), replies
    assert raw_client(relay.port).banner.startswith(LOCKED_OUT)


def test_lock_out_ends_when_the_window_has_passed(start_relay, upstream, raw_client):
    relay = start_relay(upstream, AUTH_MAX_FAILURES="2", AUTH_FAILURE_DELAY="0",
                        AUTH_FAILURE_WINDOW="1")
    guesser = raw_client(relay.port)
    assert auth_plain(guesser, USER, WRONG_PASSWORD).startswith("535")
    locked = guesser.command(f"AUTH PLAIN {plain_token(USER, WRONG_PASSWORD)}")
    assert locked.startswith(LOCKED_OUT)
    assert raw_client(relay.port).banner.startswith(LOCKED_OUT)

    time.sleep(1.2)  # more than the 1 s window since the lock-out began
    client = raw_client(relay.port)
    assert client.banner.startswith("220"), client.banner
    assert auth_plain(client).startswith("235")


def test_zero_max_failures_never_locks_out(start_relay, upstream, raw_client):
    relay = start_relay(upstream, AUTH_MAX_FAILURES="0", AUTH_FAILURE_DELAY="0")
    for _ in range(3):
        client = raw_client(relay.port)
        assert auth_plain(client, USER, WRONG_PASSWORD).startswith("535")
        for _ in range(2):
            reply = client.command(f"AUTH PLAIN {plain_token(USER, WRONG_PASSWORD)}")
            assert reply.startswith("535"), reply
        client.close()
    client = raw_client(relay.port)
    assert client.banner.startswith("220")
    assert auth_plain(client).startswith("235")
    assert len(log_lines(relay, "auth-failed")) == 9
    assert "auth-locked-out" not in relay.log()


def test_failure_delay_blocks_only_the_failing_client(start_relay, upstream, raw_client):
    relay = start_relay(upstream, AUTH_FAILURE_DELAY="2")
    guesser = raw_client(relay.port)
    assert guesser.command("EHLO guesser.test").startswith("250")
    guesser.send(f"AUTH PLAIN {plain_token(USER, WRONG_PASSWORD)}\r\n".encode())
    relay.wait_for_log("auth-failed")  # the relay is now pausing before its "no"

    send_one(relay, subject="while another client waits")
    assert len(upstream.messages) == 1
    # The whole message went through while the guesser's answer was still pending.
    readable, _, _ = select.select([guesser.sock], [], [], 0)
    assert not readable and not guesser.buffer
    assert guesser.reply().startswith("535 5.7.8")


# ---------------------------------------------------------------------------------------
# 2. SMTP_AUTH_PASSWORD_HASH and hash-password
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("prefix", ["$2b$", "$2y$"], ids=["2b", "2y-htpasswd"])
def test_bcrypt_hash_checks_the_password(start_relay, upstream, raw_client, prefix):
    hashed = make_hash(prefix=prefix)
    relay = start_relay(upstream, SMTP_AUTH_PASSWORD="", SMTP_AUTH_PASSWORD_HASH=hashed,
                        AUTH_FAILURE_DELAY="0")
    assert auth_plain(raw_client(relay.port)).startswith("235")
    assert auth_login(raw_client(relay.port)).startswith("235")
    assert auth_plain(raw_client(relay.port), USER, WRONG_PASSWORD).startswith("535")
    assert auth_login(raw_client(relay.port), USER, WRONG_PASSWORD).startswith("535")
    assert auth_plain(raw_client(relay.port), "someone-else").startswith("535")
    send_one(relay)
    assert len(upstream.messages) == 1
    assert "is the default" not in relay.log()
    assert hashed not in relay.log()


def run_hash_password(tmp_path: Path, stdin: str) -> subprocess.CompletedProcess:
    """`python smtp_relay.py hash-password` with `stdin` piped in (not a terminal)."""
    return subprocess.run([sys.executable, str(SMTP_RELAY), "hash-password"],
                          input=stdin, capture_output=True, text=True, check=False,
                          env=relay_env(tmp_path, None), cwd=tmp_path, timeout=30)


def test_hash_password_command_prints_a_bcrypt_hash(tmp_path):
    result = run_hash_password(tmp_path, "correct horse\n")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout
    hashed = lines[0]
    assert BCRYPT_HASH.fullmatch(hashed), hashed
    assert bcrypt.checkpw(b"correct horse", hashed.encode())
    assert not bcrypt.checkpw(b"correct horse\n", hashed.encode())
    assert "correct horse" not in result.stdout + result.stderr
    # What it prints is what SMTP_AUTH_PASSWORD_HASH takes.
    assert load_config({"SMTP_AUTH_PASSWORD_HASH": hashed}).auth_password_hash == hashed


@pytest.mark.parametrize("stdin", ["", "\n"], ids=["no-input", "empty-line"])
def test_hash_password_refuses_an_empty_password(tmp_path, stdin):
    result = run_hash_password(tmp_path, stdin)
    assert result.returncode != 0
    assert "$2" not in result.stdout


# ---------------------------------------------------------------------------------------
# 3. Secrets from files
# ---------------------------------------------------------------------------------------

def test_auth_password_from_a_file(start_relay, upstream, raw_client, tmp_path):
    secret = tmp_path / "auth-password"
    secret.write_text(PASSWORD + "\n")
    relay = start_relay(upstream, SMTP_AUTH_PASSWORD="", SMTP_AUTH_PASSWORD_FILE=secret,
                        AUTH_FAILURE_DELAY="0")
    send_one(relay)  # logs in with PASSWORD: the newline was stripped
    assert len(upstream.messages) == 1
    assert auth_plain(raw_client(relay.port), USER, PASSWORD + "\n").startswith("535")


def test_auth_password_hash_from_a_file(start_relay, upstream, tmp_path):
    secret = tmp_path / "auth-password-hash"
    secret.write_text(make_hash() + "\n")
    relay = start_relay(upstream, SMTP_AUTH_PASSWORD="",
                        SMTP_AUTH_PASSWORD_HASH_FILE=secret)
    send_one(relay)
    assert len(upstream.messages) == 1


def test_relay_password_from_a_file(start_relay, make_upstream, server_tls_context,
                                    server_cert, tmp_path):
    upstream = make_upstream(starttls_context=server_tls_context, require_auth=True)
    secret = tmp_path / "relay-password"
    secret.write_text(UPSTREAM_PASSWORD + "\n")
    relay = start_relay(upstream, RELAY_USE_TLS="true", RELAY_TLS_CA_FILE=server_cert[2],
                        RELAY_HOST="localhost", RELAY_USERNAME=UPSTREAM_USER,
                        RELAY_PASSWORD_FILE=secret)
    send_one(relay)
    assert len(upstream.messages) == 1
    assert "delivered" in relay.log()


@pytest.mark.parametrize("mode", ["password", "hash"])
def test_secrets_never_reach_the_logs(start_relay, make_upstream, server_tls_context,
                                      server_cert, raw_client, mode):
    upstream = make_upstream(starttls_context=server_tls_context, require_auth=True)
    hashed = make_hash()
    auth = ({"SMTP_AUTH_PASSWORD": PASSWORD} if mode == "password" else
            {"SMTP_AUTH_PASSWORD": "", "SMTP_AUTH_PASSWORD_HASH": hashed})
    relay = start_relay(upstream, LOG_LEVEL="DEBUG", AUTH_FAILURE_DELAY="0",
                        RELAY_USE_TLS="true", RELAY_TLS_CA_FILE=server_cert[2],
                        RELAY_HOST="localhost", RELAY_USERNAME=UPSTREAM_USER,
                        RELAY_PASSWORD=UPSTREAM_PASSWORD, **auth)
    send_one(relay)  # smtplib logs in with AUTH PLAIN; the relay logs in upstream
    assert len(upstream.messages) == 1
    assert auth_login(raw_client(relay.port)).startswith("235")
    assert auth_plain(raw_client(relay.port), USER, WRONG_PASSWORD).startswith("535")
    assert auth_login(raw_client(relay.port), USER, WRONG_PASSWORD).startswith("535")
    relay.wait_for_log("auth-failed")

    log, stderr = relay.log(), relay.stderr
    assert " DEBUG " in log and "auth-ok" in log  # the test looked at a full log
    secrets = [PASSWORD, WRONG_PASSWORD, UPSTREAM_PASSWORD,
               plain_token(USER, PASSWORD), plain_token(USER, WRONG_PASSWORD),
               plain_token(UPSTREAM_USER, UPSTREAM_PASSWORD),
               b64(PASSWORD), b64(WRONG_PASSWORD), b64(UPSTREAM_PASSWORD)]
    if mode == "hash":
        secrets += [hashed, hashed[7:]]
    for secret in secrets:
        assert secret not in log, f"{secret!r} in the log file"
        assert secret not in stderr, f"{secret!r} on stderr"


# ---------------------------------------------------------------------------------------
# 4. AUTH_MECHANISMS
# ---------------------------------------------------------------------------------------

def test_default_mechanisms_are_plain_and_login(default_relay):
    with default_relay.client(login=False) as client:
        assert auth_mechanisms(client) == ["LOGIN", "PLAIN"]


def test_plain_only_refuses_login(start_relay, upstream, raw_client):
    relay = start_relay(upstream, AUTH_MECHANISMS="PLAIN")
    with relay.client(login=False) as client:
        assert auth_mechanisms(client) == ["PLAIN"]
    client = raw_client(relay.port)
    assert client.command("EHLO raw.test").startswith("250")
    assert client.command("AUTH LOGIN").startswith("504")
    assert client.command(f"AUTH PLAIN {plain_token(USER, PASSWORD)}").startswith("235")


def test_cram_md5_logs_in(start_relay, upstream):
    relay = start_relay(upstream, AUTH_MECHANISMS="CRAM-MD5,PLAIN",
                        AUTH_FAILURE_DELAY="0")
    with relay.client(login=False) as client:
        assert auth_mechanisms(client) == ["CRAM-MD5", "PLAIN"]
        client.user, client.password = USER, PASSWORD
        code, _ = client.auth("CRAM-MD5", client.auth_cram_md5)
        assert code == 235
        client.sendmail(SENDER, [RECIPIENT], message("cram"))
    assert len(upstream.messages) == 1
    assert "mechanism=CRAM-MD5" in log_lines(relay, "auth-ok")[0]

    with relay.client(login=False) as client:
        client.user, client.password = USER, WRONG_PASSWORD
        with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
            client.auth("CRAM-MD5", client.auth_cram_md5)
        assert refused.value.smtp_code == 535
    assert "mechanism=CRAM-MD5" in log_lines(relay, "auth-failed")[0]


# ---------------------------------------------------------------------------------------
# 5. Rate limits
# ---------------------------------------------------------------------------------------

def test_messages_per_minute_per_user_across_connections(start_relay, upstream):
    relay = start_relay(upstream, RATE_LIMIT_PER_MINUTE="2")
    send_one(relay, subject="one")
    send_one(relay, subject="two")  # a new connection: the count carries over
    with relay.client() as client:
        reply = mail(client)
    assert reply.startswith(RATE_LIMITED), reply
    retry = RETRY_HINT.search(reply)
    assert retry and 1 <= int(retry.group(1)) <= 60, reply
    assert len(upstream.messages) == 2
    limited = log_lines(relay, "rate-limited")
    assert len(limited) == 1 and " WARNING rate-limited " in limited[0]
    assert f"user={USER}" in limited[0]


def test_burst_refuses_a_message_right_after_another(start_relay, upstream):
    relay = start_relay(upstream, RATE_LIMIT_PER_MINUTE="60", RATE_LIMIT_BURST="1")
    with relay.client() as client:
        assert try_message(client, message("first")).startswith("250")
        reply = mail(client)
        assert reply.startswith(RATE_LIMITED) and RETRY_HINT.search(reply), reply
        time.sleep(1.1)  # the burst of one refills in one second
        assert try_message(client, message("after the pause")).startswith("250")
    assert len(upstream.messages) == 2


def test_messages_per_day(start_relay, upstream):
    relay = start_relay(upstream, MESSAGES_PER_DAY="1")
    send_one(relay)
    with relay.client() as client:
        reply = mail(client)
    assert reply.startswith(RATE_LIMITED) and RETRY_HINT.search(reply), reply
    assert len(upstream.messages) == 1


def test_recipients_per_minute_refuses_the_extra_recipients(start_relay, upstream):
    relay = start_relay(upstream, RECIPIENTS_PER_MINUTE="3")
    recipients = [f"user{n}@example.com" for n in range(5)]
    with relay.client() as client:
        assert mail(client).startswith("250")
        replies = [rcpt(client, recipient) for recipient in recipients]
        code, _ = client.data(message("five recipients"))
    assert [reply[:9] for reply in replies] == ["250 2.1.5"] * 3 + [RATE_LIMITED] * 2, \
        replies
    assert all(RETRY_HINT.search(reply) for reply in replies[3:])
    assert code == 250
    assert len(upstream.messages) == 1
    assert upstream.messages[0].rcpt_tos == recipients[:3]
    assert len(log_lines(relay, "rate-limited")) == 2


def test_trusted_clients_are_counted_per_address(start_relay, upstream):
    relay = start_relay(upstream, TRUSTED_NETWORKS="127.0.0.0/8",
                        RATE_LIMIT_PER_MINUTE="1")
    send_one(relay, login=False)
    with relay.client(login=False) as client:
        assert mail(client).startswith(RATE_LIMITED)
    # The authenticated user has a quota of its own...
    send_one(relay, login=True)
    with relay.client(login=True) as client:
        assert mail(client).startswith(RATE_LIMITED)
    assert len(upstream.messages) == 2
    first, second = log_lines(relay, "rate-limited")
    assert "peer=127.0.0.1" in first and "user=trusted:127.0.0.1" in first
    assert f"user={USER}" in second


def test_no_rate_limit_by_default(default_relay, module_upstream):
    with default_relay.client() as client:
        for number in range(20):
            client.sendmail(SENDER, [RECIPIENT], message(f"quick {number}"))
    assert len(module_upstream.messages) == 20
    assert "rate-limited" not in default_relay.log()


# ---------------------------------------------------------------------------------------
# 6. Client networks and trusted networks
# ---------------------------------------------------------------------------------------

def test_client_outside_allowed_networks_is_refused(start_relay, upstream, raw_client):
    relay = start_relay(upstream, wait=False, ALLOWED_CLIENT_NETWORKS="10.0.0.0/8")
    relay.wait_for_log("started")
    client = raw_client(relay.port)
    assert client.banner.startswith("554 5.7.1"), client.banner
    assert client.closed()
    assert upstream.messages == [] and upstream.handler.mail_commands == []
    refused = log_lines(relay, "connection-refused")
    assert refused and "ALLOWED_CLIENT_NETWORKS" in refused[0]


def test_client_inside_allowed_networks_is_served(start_relay, upstream):
    relay = start_relay(upstream, ALLOWED_CLIENT_NETWORKS="127.0.0.0/8,::1/128")
    send_one(relay)
    assert len(upstream.messages) == 1


def test_trusted_network_sends_without_auth_within_the_allowlists(start_relay,
                                                                  upstream):
    relay = start_relay(upstream, TRUSTED_NETWORKS="127.0.0.0/8")
    log = relay.wait_for_log("TRUSTED_NETWORKS")
    warning = next(line for line in log.splitlines() if "TRUSTED_NETWORKS" in line
                   and " WARNING " in line)
    assert "127.0.0.0/8" in warning

    send_one(relay, login=False)
    assert len(upstream.messages) == 1
    assert b"with ESMTP id" in upstream.messages[0].content  # not ESMTPA: no AUTH
    with relay.client(login=False) as client:
        assert mail(client).startswith("250")
        assert rcpt(client, "someone@elsewhere.test").startswith("550 5.7.1")
        client.rset()
        assert mail(client, "app@elsewhere.test").startswith("553 5.7.1")
    assert len(upstream.messages) == 1


def test_public_trusted_network_starts_only_when_allowed(start_relay, upstream):
    relay = start_relay(upstream, TRUSTED_NETWORKS="8.8.8.0/24",
                        TRUSTED_NETWORKS_ALLOW_PUBLIC="true")
    log = relay.wait_for_log("TRUSTED_NETWORKS")
    assert any(" WARNING " in line and "8.8.8.0/24" in line
               for line in log.splitlines())
    # 127.0.0.1 is not in it: AUTH still required.
    with relay.client(login=False) as client:
        assert mail(client).startswith("530")


def test_mail_without_auth_is_refused_by_default(default_relay, module_upstream):
    with default_relay.client(login=False) as client:
        assert mail(client).startswith("530 5.7.0")
    assert module_upstream.handler.mail_commands == []


def test_trusted_network_sends_without_auth_after_starttls(start_relay, upstream,
                                                           server_cert):
    cert_file, key_file, ca_file = server_cert
    relay = start_relay(upstream, TRUSTED_NETWORKS="127.0.0.0/8", USE_TLS="true",
                        TLS_CERT_FILE=cert_file, TLS_KEY_FILE=key_file)
    with relay.client(login=False) as client:
        client.starttls(context=tls_client_context(ca_file))
        client.ehlo("client.test")
        reply = mail(client)
        assert reply.startswith("250"), reply
        assert rcpt(client, RECIPIENT).startswith("250")
        assert client.data(message("trusted over TLS"))[0] == 250
    assert len(upstream.messages) == 1


# ---------------------------------------------------------------------------------------
# 7. SMTPS and TLS_MIN_VERSION
# ---------------------------------------------------------------------------------------

def test_smtps_port_serves_implicit_tls(start_relay, upstream, server_cert):
    settings = smtps_settings(server_cert)
    relay = start_relay(upstream, **settings)
    relay.wait_for_log("started")  # both listeners are up
    context = tls_client_context(server_cert[2])
    with smtplib.SMTP_SSL("127.0.0.1", settings["SMTPS_PORT"], context=context,
                          timeout=20) as client:
        client.ehlo("client.test")
        assert auth_mechanisms(client) == ["LOGIN", "PLAIN"]  # at once: no STARTTLS
        assert not client.has_extn("starttls")
        client.login(USER, PASSWORD)
        client.sendmail(SENDER, [RECIPIENT], message("over SMTPS"))
    assert len(upstream.messages) == 1
    assert b"with ESMTPSA id" in upstream.messages[0].content

    send_one(relay, subject="plain port")  # the plain port keeps working alongside
    assert len(upstream.messages) == 2
    assert b"with ESMTPA id" in upstream.messages[1].content


def test_tls_min_version_13_refuses_a_tls_12_client(start_relay, upstream, server_cert,
                                                    raw_client):
    settings = smtps_settings(server_cert, TLS_MIN_VERSION="1.3")
    relay = start_relay(upstream, **settings)
    relay.wait_for_log("started")
    old = tls_client_context(server_cert[2], maximum_version=ssl.TLSVersion.TLSv1_2)
    with pytest.raises(ssl.SSLError):
        smtplib.SMTP_SSL("127.0.0.1", settings["SMTPS_PORT"], context=old, timeout=20)

    new = tls_client_context(server_cert[2], minimum_version=ssl.TLSVersion.TLSv1_3)
    with smtplib.SMTP_SSL("127.0.0.1", settings["SMTPS_PORT"], context=new,
                          timeout=20) as client:
        assert client.sock.version() == "TLSv1.3"
        client.login(USER, PASSWORD)
        client.sendmail(SENDER, [RECIPIENT], message("TLS 1.3"))
    assert len(upstream.messages) == 1
    assert "Traceback" not in relay.stderr


def test_tls_min_version_10_starts_with_a_warning(start_relay, upstream, server_cert):
    relay = start_relay(upstream, **smtps_settings(server_cert, TLS_MIN_VERSION="1.0"))
    log = relay.wait_for_log("started")
    assert any(" WARNING " in line and "TLS_MIN_VERSION=1.0" in line
               for line in log.splitlines()), log


def test_failed_smtps_handshakes_free_their_connection_slots(start_relay, upstream,
                                                             server_cert):
    settings = smtps_settings(server_cert, TLS_MIN_VERSION="1.3", MAX_CONNECTIONS="2")
    relay = start_relay(upstream, **settings)
    relay.wait_for_log("started")
    # A port check (connect, hang up) and an old client whose handshake fails.
    socket.create_connection(("127.0.0.1", settings["SMTPS_PORT"]), timeout=5).close()
    old = tls_client_context(server_cert[2], maximum_version=ssl.TLSVersion.TLSv1_2)
    deadline = time.monotonic() + 5
    while True:  # SMTPS counts from accept: the port check may hold its slot a moment
        try:
            smtplib.SMTP_SSL("127.0.0.1", settings["SMTPS_PORT"], context=old, timeout=20)
        except ssl.SSLError:
            break  # the handshake failed, as it should
        except ConnectionResetError:  # over MAX_CONNECTIONS: closed before any TLS
            assert time.monotonic() < deadline
            time.sleep(0.1)

    # Both are gone, so both slots must come free (the relay notices asynchronously).
    deadline = time.monotonic() + 5
    while True:
        first = RawClient(relay.port, timeout=5)
        if first.banner.startswith("220") or time.monotonic() > deadline:
            break
        first.close()
        time.sleep(0.1)
    try:
        assert first.banner.startswith("220"), first.banner
        second = RawClient(relay.port, timeout=5)
        second.close()
        assert second.banner.startswith("220"), second.banner
    finally:
        first.close()


# ---------------------------------------------------------------------------------------
# 8. MAX_HOPS and CHECK_HEADER_FROM (one relay: MAX_HOPS=3, CHECK_HEADER_FROM=true)
# ---------------------------------------------------------------------------------------

def received(count: int, name: str = "Received") -> str:
    return "".join(f"{name}: from hop{n}.test by relay{n}.test; "
                   "Sat, 21 Nov 2026 10:00:00 +0000\r\n" for n in range(count))


def content(headers: str, body: str = "Hello.\r\n") -> bytes:
    return (headers + f"To: {RECIPIENT}\r\nSubject: checks\r\n\r\n" + body).encode()


FROM_OK = f"From: {SENDER}\r\n"
CHECKS = [
    # MAX_HOPS=3: more Received: headers than that is a loop.
    pytest.param(received(4) + FROM_OK, "554 5.4.6", id="four-received"),
    pytest.param(received(3) + FROM_OK, "250", id="three-received"),
    pytest.param(received(3) + "received: from x.test; Sat, 21 Nov 2026 10:00:00 +0000"
                 "\r\n" + FROM_OK, "554 5.4.6", id="lower-case-received-counts"),
    pytest.param(received(3) + received(2, "X-Received") + FROM_OK, "250",
                 id="x-received-does-not-count"),
    # CHECK_HEADER_FROM: every From: address in an allowed domain.
    pytest.param("From: A <a@example.com>\r\n", "250", id="from-display-name"),
    pytest.param("From: x@evil.com\r\n", "550 5.7.1", id="from-bad-domain"),
    pytest.param("From: a@example.com, x@evil.com\r\n", "550 5.7.1",
                 id="from-two-addresses-one-bad"),
    pytest.param("From: a@example.com\r\nFrom: x@evil.com\r\n", "550 5.7.1",
                 id="two-from-headers-one-bad"),
    pytest.param("Sender: a@example.com\r\n", "550 5.7.1", id="no-from-header"),
    pytest.param("From: a@b.example.net\r\n", "250", id="from-wildcard-subdomain"),
    pytest.param("From: a@example.net\r\n", "550 5.7.1", id="from-wildcard-parent"),
    pytest.param('From: "Doe, John" <john@example.com>\r\n', "250",
                 id="from-quoted-comma"),
    pytest.param("From: =?utf-8?q?x=40evil.com?= <a@example.com>\r\n", "250",
                 id="from-encoded-word"),
]


@pytest.mark.parametrize(("headers", "expected"), CHECKS)
def test_hops_and_header_from(checking_relay, module_upstream, headers, expected):
    data = content(headers, body="Received: in the body is not a header\r\n")
    with checking_relay.client() as client:
        reply = try_message(client, data)
    assert reply.startswith(expected), reply
    if expected == "250":
        assert len(module_upstream.messages) == 1
        forwarded = module_upstream.messages[0].content
        # The relay adds its own Received: on the way out.
        assert forwarded.startswith(b"Received: from client.test")
        assert count_received_headers(header_block(forwarded)) == \
            count_received_headers(header_block(data)) + 1
    else:
        assert module_upstream.messages == []


def test_header_from_is_not_checked_by_default(default_relay, module_upstream):
    with default_relay.client() as client:
        reply = try_message(client, content("From: x@evil.com\r\n"))
    assert reply.startswith("250"), reply
    assert len(module_upstream.messages) == 1


# ---------------------------------------------------------------------------------------
# Start-up refusals: exit status 2, one line naming the variable(s). All run at once.
# ---------------------------------------------------------------------------------------

MISSING_FILE = "/nonexistent/smtp-relay-tests/secret"
MALFORMED_HASH = "$2b$04$not-a-real-bcrypt-hash"

REFUSALS = [
    # (id, settings, variables the line must name); "{hash}" becomes a valid hash.
    ("password-and-hash", {"SMTP_AUTH_PASSWORD_HASH": "{hash}"},
     ["SMTP_AUTH_PASSWORD", "SMTP_AUTH_PASSWORD_HASH"]),
    ("malformed-hash", {"SMTP_AUTH_PASSWORD": "", "SMTP_AUTH_PASSWORD_HASH":
                        MALFORMED_HASH}, ["SMTP_AUTH_PASSWORD_HASH"]),
    ("password-and-file", {"SMTP_AUTH_PASSWORD_FILE": "{file}"},
     ["SMTP_AUTH_PASSWORD", "SMTP_AUTH_PASSWORD_FILE"]),
    ("relay-password-and-file", {"RELAY_PASSWORD": "x", "RELAY_PASSWORD_FILE": "{file}"},
     ["RELAY_PASSWORD", "RELAY_PASSWORD_FILE"]),
    ("hash-and-file", {"SMTP_AUTH_PASSWORD": "", "SMTP_AUTH_PASSWORD_HASH": "{hash}",
                       "SMTP_AUTH_PASSWORD_HASH_FILE": "{file}"},
     ["SMTP_AUTH_PASSWORD_HASH", "SMTP_AUTH_PASSWORD_HASH_FILE"]),
    ("missing-password-file", {"SMTP_AUTH_PASSWORD": "",
                               "SMTP_AUTH_PASSWORD_FILE": MISSING_FILE},
     ["SMTP_AUTH_PASSWORD_FILE"]),
    ("missing-relay-password-file", {"RELAY_PASSWORD_FILE": MISSING_FILE},
     ["RELAY_PASSWORD_FILE"]),
    ("missing-hash-file", {"SMTP_AUTH_PASSWORD": "",
                           "SMTP_AUTH_PASSWORD_HASH_FILE": MISSING_FILE},
     ["SMTP_AUTH_PASSWORD_HASH_FILE"]),
    ("cram-md5-with-hash", {"SMTP_AUTH_PASSWORD": "", "SMTP_AUTH_PASSWORD_HASH": "{hash}",
                            "AUTH_MECHANISMS": "PLAIN,CRAM-MD5"},
     ["AUTH_MECHANISMS", "SMTP_AUTH_PASSWORD_HASH"]),
    ("unknown-mechanism", {"AUTH_MECHANISMS": "PLAIN,XOAUTH2"}, ["AUTH_MECHANISMS"]),
    ("bogus-rate-limit-storage", {"RATE_LIMIT_PER_MINUTE": "5",
                                  "RATE_LIMIT_STORAGE": "bogus://"},
     ["RATE_LIMIT_STORAGE"]),
    ("burst-without-rate", {"RATE_LIMIT_BURST": "3"}, ["RATE_LIMIT_BURST"]),
    ("bad-allowed-cidr", {"ALLOWED_CLIENT_NETWORKS": "10.0.0.0/8,10.1.2.300/32"},
     ["ALLOWED_CLIENT_NETWORKS"]),
    ("bad-trusted-cidr", {"TRUSTED_NETWORKS": "192.168.0.0/33"}, ["TRUSTED_NETWORKS"]),
    ("public-trusted-network", {"TRUSTED_NETWORKS": "8.8.8.0/24"},
     ["TRUSTED_NETWORKS", "TRUSTED_NETWORKS_ALLOW_PUBLIC"]),
    ("smtps-without-certificate", {"SMTPS_PORT": "{port}",
                                   "TLS_CERT_FILE": MISSING_FILE + ".crt"},
     ["TLS_CERT_FILE"]),
    ("tls-min-version-2", {"TLS_MIN_VERSION": "2"}, ["TLS_MIN_VERSION"]),
]


@pytest.fixture(scope="module")
def refusals(tmp_path_factory) -> dict[str, tuple[int | None, str]]:
    """Every REFUSALS case started at once; {id: (exit status, stderr)}."""
    directory = tmp_path_factory.mktemp("refusals")
    secret_file = directory / "secret"
    secret_file.write_text("from-a-file\n")
    fill = {"{hash}": make_hash(), "{file}": str(secret_file)}
    runs = {}
    for case_id, settings, _ in REFUSALS:
        workdir = directory / case_id
        workdir.mkdir()
        values = {name: fill.get(value, value) for name, value in settings.items()}
        values = {name: str(free_port()) if value == "{port}" else value
                  for name, value in values.items()}
        runs[case_id] = (workdir, relay_env(workdir, None, **values))
    return exit_of_each(runs)


@pytest.mark.parametrize(("case_id", "variables"),
                         [(case_id, variables) for case_id, _, variables in REFUSALS],
                         ids=[case_id for case_id, _, _ in REFUSALS])
def test_program_refuses_setting(refusals, case_id, variables):
    returncode, _, stderr = refusals[case_id]
    assert returncode == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith(CONFIG_ERROR), lines[0]
    for variable in variables:
        assert names(lines[0], variable), f"{variable} not named in {lines[0]!r}"
    assert "from-a-file" not in stderr


# ---------------------------------------------------------------------------------------
# Unit tests: AuthGuard
# ---------------------------------------------------------------------------------------

def test_auth_guard_locks_at_the_nth_failure():
    guard = AuthGuard(max_failures=3, window=30)
    assert [guard.record_failure("192.0.2.1") for _ in range(2)] == [False, False]
    assert not guard.locked("192.0.2.1")
    assert guard.record_failure("192.0.2.1") is True
    assert guard.locked("192.0.2.1")
    assert not guard.locked("192.0.2.2")  # per address
    assert guard.record_failure("192.0.2.2") is False


def test_auth_guard_forgets_failures_older_than_the_window():
    guard = AuthGuard(max_failures=2, window=0.2)
    assert guard.record_failure("192.0.2.1") is False
    time.sleep(0.25)
    assert guard.record_failure("192.0.2.1") is False  # the first one has expired
    assert not guard.locked("192.0.2.1")
    assert guard.record_failure("192.0.2.1") is True


def test_auth_guard_lock_out_lasts_one_window():
    guard = AuthGuard(max_failures=1, window=0.2)
    assert guard.record_failure("192.0.2.1") is True
    assert guard.locked("192.0.2.1")
    time.sleep(0.25)
    assert not guard.locked("192.0.2.1")
    # The failures that caused the lock-out do not count again.
    guard2 = AuthGuard(max_failures=2, window=0.2)
    guard2.record_failure("192.0.2.1")
    assert guard2.record_failure("192.0.2.1") is True
    time.sleep(0.25)
    assert not guard2.locked("192.0.2.1")
    assert guard2.record_failure("192.0.2.1") is False


def test_auth_guard_with_zero_max_failures_never_locks():
    guard = AuthGuard(max_failures=0, window=30)
    assert not any(guard.record_failure("192.0.2.1") for _ in range(100))
    assert not guard.locked("192.0.2.1")


# ---------------------------------------------------------------------------------------
# Unit tests: header helpers
# ---------------------------------------------------------------------------------------

def test_header_block_is_everything_before_the_empty_line():
    data = b"From: a@example.com\r\nSubject: x\r\n\r\nReceived: body\r\n"
    assert header_block(data) == b"From: a@example.com\r\nSubject: x\r\n"
    assert header_block(b"\r\nReceived: body only\r\n") == b""
    assert count_received_headers(header_block(data)) == 0


@pytest.mark.parametrize(("headers", "count"), [
    (b"Subject: x\r\n", 0),
    (b"Received: a\r\nReceived: b\r\n", 2),
    (b"received: a\r\nRECEIVED: b\r\nReceived: c\r\n", 3),
    (b"X-Received: a\r\nARC-Received: b\r\nReceived-SPF: pass\r\n", 0),
    (b"Received: from a\r\n\tby b; received: folded\r\n", 1),
    (b"Subject: Received: not a header\r\n", 0),
])
def test_count_received_headers(headers, count):
    assert count_received_headers(headers) == count


@pytest.mark.parametrize(("headers", "domains"), [
    (b"From: a@example.com\r\n", ["example.com"]),
    (b"From: A <a@Example.COM>\r\n", ["example.com"]),
    (b"From: Someone\r\n <a@example.com>\r\n", ["example.com"]),
    (b"From:\r\n\ta@example.com,\r\n\tb@example.org\r\n", ["example.com", "example.org"]),
    (b'From: "Doe, John" <j@example.com>\r\n', ["example.com"]),
    (b'From: "x@evil.com, y" <j@example.com>\r\n', ["example.com"]),
    (b"From: =?utf-8?q?Jos=C3=A9?= <jose@example.com>\r\n", ["example.com"]),
    (b"From: =?utf-8?b?ZXZpbEBldmlsLmNvbQ==?= <a@example.com>\r\n", ["example.com"]),
    (b"From: a@example.com (x@evil.com)\r\n", ["example.com"]),
    (b"From: a@example.com\r\nFrom: b@evil.com\r\n", ["example.com", "evil.com"]),
    (b"from: a@example.com\r\n", ["example.com"]),
])
def test_header_from_domains(headers, domains):
    assert header_from_domains(headers) == domains


@pytest.mark.parametrize("headers", [
    b"To: a@example.com\r\n",
    b"From: \r\n",
    b"From: undisclosed-recipients\r\n",
    b"From: =?utf-8?q?x=40evil.com?=\r\n",
    b"From: a@[192.0.2.1]\r\n",
])
def test_header_from_domains_refuses(headers):
    with pytest.raises(AddressError):
        header_from_domains(headers)


def test_header_from_refusal_without_from_is_550():
    with pytest.raises(AddressError) as refused:
        header_from_domains(b"Subject: no sender\r\n")
    assert refused.value.code == "550 5.7.1"


# ---------------------------------------------------------------------------------------
# Unit tests: load_config for the abuse settings
# ---------------------------------------------------------------------------------------

BASE = {"SMTP_AUTH_PASSWORD": PASSWORD}


def config_error(**settings: str) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config({**BASE, **settings})
    return str(caught.value)


@pytest.mark.parametrize(("settings", "variable"), [
    ({"AUTH_MAX_FAILURES": "-1"}, "AUTH_MAX_FAILURES"),
    ({"AUTH_MAX_FAILURES": "many"}, "AUTH_MAX_FAILURES"),
    ({"AUTH_FAILURE_WINDOW": "0"}, "AUTH_FAILURE_WINDOW"),
    ({"AUTH_FAILURE_DELAY": "31"}, "AUTH_FAILURE_DELAY"),
    ({"AUTH_FAILURE_DELAY": "-0.5"}, "AUTH_FAILURE_DELAY"),
    ({"RATE_LIMIT_PER_MINUTE": "ten"}, "RATE_LIMIT_PER_MINUTE"),
    ({"RATE_LIMIT_BURST": "2"}, "RATE_LIMIT_BURST"),
    ({"MESSAGES_PER_DAY": "-1"}, "MESSAGES_PER_DAY"),
    ({"RECIPIENTS_PER_MINUTE": "1.5"}, "RECIPIENTS_PER_MINUTE"),
    ({"ALLOWED_CLIENT_NETWORKS": "10.0.0.0/8,nonsense"}, "ALLOWED_CLIENT_NETWORKS"),
    ({"TRUSTED_NETWORKS": "10.0.0.0/40"}, "TRUSTED_NETWORKS"),
    ({"TRUSTED_NETWORKS": "10.0.0.0/8,0.0.0.0/0"}, "TRUSTED_NETWORKS"),
    ({"TRUSTED_NETWORKS_ALLOW_PUBLIC": "perhaps"}, "TRUSTED_NETWORKS_ALLOW_PUBLIC"),
    ({"SMTPS_PORT": "70000"}, "SMTPS_PORT"),
    ({"TLS_MIN_VERSION": "1.4"}, "TLS_MIN_VERSION"),
    ({"TLS_MIN_VERSION": "2"}, "TLS_MIN_VERSION"),
    ({"MAX_HOPS": "0"}, "MAX_HOPS"),
    ({"CHECK_HEADER_FROM": "sometimes"}, "CHECK_HEADER_FROM"),
    ({"AUTH_MECHANISMS": "PLAIN,GSSAPI"}, "AUTH_MECHANISMS"),
    ({"AUTH_MECHANISMS": ","}, "AUTH_MECHANISMS"),
    ({"SMTP_AUTH_PASSWORD": "", "SMTP_AUTH_PASSWORD_HASH": MALFORMED_HASH},
     "SMTP_AUTH_PASSWORD_HASH"),
    ({"SMTP_AUTH_PASSWORD": "", "SMTP_AUTH_PASSWORD_FILE": MISSING_FILE},
     "SMTP_AUTH_PASSWORD_FILE"),
    ({"RELAY_PASSWORD_FILE": MISSING_FILE}, "RELAY_PASSWORD_FILE"),
    ({"SMTP_AUTH_PASSWORD": "", "SMTP_AUTH_PASSWORD_HASH_FILE": MISSING_FILE},
     "SMTP_AUTH_PASSWORD_HASH_FILE"),
])
def test_load_config_error_names_the_variable(settings, variable):
    assert names(config_error(**settings), variable)


def test_load_config_refuses_cram_md5_with_a_hash():
    text = config_error(SMTP_AUTH_PASSWORD="", SMTP_AUTH_PASSWORD_HASH=make_hash(),
                        AUTH_MECHANISMS="CRAM-MD5")
    assert names(text, "AUTH_MECHANISMS") and "CRAM-MD5" in text


def test_load_config_refuses_both_password_and_hash():
    text = config_error(SMTP_AUTH_PASSWORD_HASH=make_hash())
    assert names(text, "SMTP_AUTH_PASSWORD") and names(text, "SMTP_AUTH_PASSWORD_HASH")


def test_load_config_reads_the_abuse_settings(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("file-Pa55\r\n")
    config = load_config({
        "SMTP_AUTH_PASSWORD_FILE": str(secret), "AUTH_MECHANISMS": " cram-md5 , plain ",
        "ALLOWED_CLIENT_NETWORKS": "10.0.0.0/8, 192.168.1.20 ,fd00::/8",
        "TRUSTED_NETWORKS": "10.1.2.3/8", "TLS_MIN_VERSION": "1.3", "MAX_HOPS": "7",
        "CHECK_HEADER_FROM": "yes", "SMTPS_PORT": "0", "TLS_CERT_FILE": str(secret),
        "TLS_KEY_FILE": str(secret)})
    assert config.auth_password == "file-Pa55"
    assert config.auth_mechanisms == ("CRAM-MD5", "PLAIN")
    assert [str(n) for n in config.allowed_client_networks] == [
        "10.0.0.0/8", "192.168.1.20/32", "fd00::/8"]
    assert [str(n) for n in config.trusted_networks] == ["10.0.0.0/8"]
    assert (config.tls_min_version, config.max_hops, config.check_header_from,
            config.smtps_port) == ("1.3", 7, True, 0)


def test_load_config_defaults_for_the_abuse_settings():
    config = load_config(BASE)
    assert config.auth_mechanisms == ("PLAIN", "LOGIN")
    assert (config.auth_max_failures, config.rate_limit_per_minute,
            config.rate_limit_burst, config.messages_per_day,
            config.recipients_per_minute) == (5, 0, 0, 0, 0)
    assert config.allowed_client_networks == () and config.trusted_networks == ()
    assert config.smtps_port is None and config.check_header_from is False
    limiter = RateLimiter(config)
    assert limiter.message_limits(None) == [] and limiter.recipient_limit is None


def test_empty_password_with_a_hash_counts_as_unset():
    hashed = make_hash()
    config = load_config({"SMTP_AUTH_PASSWORD": "", "SMTP_AUTH_PASSWORD_HASH": hashed})
    assert config.auth_password == "" and config.auth_password_hash == hashed
    assert "$2b$" not in repr(config)


def test_rate_limit_storage_error_names_the_variable():
    config = load_config({**BASE, "RATE_LIMIT_STORAGE": "bogus://"})
    with pytest.raises(ConfigError) as caught:
        RateLimiter(config)
    assert names(str(caught.value), "RATE_LIMIT_STORAGE")


def test_default_password_warning_only_without_a_hash(caplog):
    with caplog.at_level("WARNING", logger="smtp_relay"):
        smtp_relay.startup_warnings(load_config({}))
    assert "is the default" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="smtp_relay"):
        smtp_relay.startup_warnings(load_config({"SMTP_AUTH_PASSWORD_HASH":
                                                  make_hash()}))
    assert "is the default" not in caplog.text
