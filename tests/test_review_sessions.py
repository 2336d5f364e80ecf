"""Sessions under review: the connection cap, AUTH under load and across a reload, AUTH
inside a transaction, and what strangers can make the relay log.

1. MAX_CONNECTIONS holds for connections opened all at once and counts SMTPS
   connections from the moment they are accepted (a handshake in progress holds a
   slot; a failed or timed-out one gives it back). MAX_CONNECTIONS_PER_IP caps one
   address. A client that neither authenticates nor comes from TRUSTED_NETWORKS is
   disconnected TIMEOUT seconds after its greeting, however many NOOPs it sends.
2. A verdict of bcrypt belongs to the users it was checked against: an AUTH checked
   while SIGHUP rotates a password does not keep the old password working.
3. A failed AUTH is counted before the check, so a client that leaves during it still
   counts toward AUTH_MAX_FAILURES; checks run on their own small pool, a few at a time
   per address, and the check of a client that already left never starts. Passwords
   over 72 bytes are checked as `htpasswd -B` hashes them (the first 72 bytes), and
   `hash-password` says so.
4. AUTH inside a mail transaction is 503 (RFC 4954 section 4), also for a trusted
   client that began MAIL without AUTH.
5. No traceback from hostile input: a non-ASCII SIZE digit, an overlong AUTH response,
   a TLS client that drops the connection while the relay answers. An unauthenticated
   connection that keeps sending refused commands is closed after a small budget.
6. The aiosmtpd and asyncio internals the fixes above rely on (fails on an upgrade).

Real relay processes, real sockets on 127.0.0.1, real TLS (trustme); nothing mocked.
No assertion is about speed: windows are a few TIMEOUTs wide, and the one about CPU
compares the relay's own CPU time against its own cost of one check.
"""

from __future__ import annotations

import base64
import inspect
import os
import select
import smtplib
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from asyncio import sslproto
from pathlib import Path

import bcrypt
import pytest
from aiosmtpd.smtp import SMTP
from conftest import (
    PASSWORD,
    SMTP_RELAY,
    USER,
    RawClient,
    RelayProcess,
    free_port,
    hangup,
    message,
    relay_env,
)

from relay.settings import ConfigError, load_config

pytestmark = pytest.mark.timeout(120)

SENDER = "app@example.com"
RECIPIENT = "ops@example.com"
TOO_MANY = "421 4.7.0 Too many connections"
OTHER_ADDRESS = "127.0.0.2"  # loopback too (Linux routes all of 127/8 to lo)


# ---------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------

def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def plain_token(user: str, password: str | bytes) -> str:
    secret = password.encode() if isinstance(password, str) else password
    return b64(b"\0" + user.encode() + b"\0" + secret)


def client_from(port: int, source: str = "127.0.0.1", timeout: float = 20.0
                ) -> RawClient:
    """A RawClient whose connection comes from `source` (a loopback address)."""
    client = RawClient.__new__(RawClient)
    client.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout,
                                           source_address=(source, 0))
    client.buffer = b""
    client.banner = client.reply()
    return client


def tls_context(ca_file: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca_file))


def smtps_settings(server_cert, **overrides: object) -> dict[str, object]:
    cert_file, key_file, _ = server_cert
    return {"SMTPS_PORT": free_port(), "TLS_CERT_FILE": cert_file,
            "TLS_KEY_FILE": key_file, **overrides}


def http_settings() -> dict[str, str]:
    return {"HTTP_HOST": "127.0.0.1", "HTTP_PORT": str(free_port())}


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def open_connections(relay: RelayProcess) -> float:
    """smtp_relay_connections_open, from /metrics."""
    with _OPENER.open(f"http://127.0.0.1:{relay.env['HTTP_PORT']}/metrics",
                      timeout=20) as response:
        for line in response.read().decode().splitlines():
            if line.startswith("smtp_relay_connections_open "):
                return float(line.split()[1])
    raise AssertionError("no smtp_relay_connections_open in /metrics")


def wait_for_open_connections(relay: RelayProcess, expected: int,
                              timeout: float = 20.0) -> None:
    """Connections close asynchronously on the relay's side: wait for the count."""
    deadline = time.monotonic() + timeout
    while (count := open_connections(relay)) != expected:
        assert time.monotonic() < deadline, f"{count} connections open, not {expected}"
        time.sleep(0.05)


def read_to_eof(sock: socket.socket, timeout: float = 20.0) -> bytes:
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    return data


def first_line(sock: socket.socket, timeout: float = 20.0) -> bytes:
    sock.settimeout(timeout)
    data = b""
    try:
        while b"\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    except ConnectionResetError:
        pass
    return data.split(b"\r\n")[0]


def smtps_client(port: int, ca_file: Path, timeout: float = 20.0) -> smtplib.SMTP_SSL:
    return smtplib.SMTP_SSL("127.0.0.1", port, context=tls_context(ca_file),
                            timeout=timeout)


def log_lines(relay: RelayProcess, event: str) -> list[str]:
    return [line for line in relay.log().splitlines() if f" {event} " in f"{line} "]


def assert_no_traceback(relay: RelayProcess) -> None:
    assert relay.process.poll() is None, f"relay died:\n{relay.stderr}"
    assert "Traceback" not in relay.stderr, relay.stderr
    assert "unexpected error" not in relay.stderr, relay.stderr


def cpu_seconds(relay: RelayProcess) -> float:
    """User + system CPU time of the relay process so far."""
    fields = Path(f"/proc/{relay.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_until_cpu_settles(relay: RelayProcess, quiet: float = 1.5,
                           timeout: float = 90.0) -> float:
    """The relay's CPU time once it has stopped growing for `quiet` seconds."""
    deadline = time.monotonic() + timeout
    last, since = cpu_seconds(relay), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = cpu_seconds(relay)
        if now - last > 0.02:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return now
    raise AssertionError("the relay kept using CPU")


@pytest.fixture(scope="module")
def slow_hash() -> str:
    """A bcrypt hash of PASSWORD costly enough (cost 14, about a second) that a check
    is still running when the test acts."""
    return bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(14)).decode()


# ---------------------------------------------------------------------------------------
# 1. MAX_CONNECTIONS, MAX_CONNECTIONS_PER_IP, the unauthenticated deadline
# ---------------------------------------------------------------------------------------

def test_max_connections_holds_for_connections_opened_at_once(start_relay, upstream):
    relay = start_relay(upstream, MAX_CONNECTIONS="3", **http_settings())
    wait_for_open_connections(relay, 0)  # wait_ready's probe is gone
    sockets = [socket.create_connection(("127.0.0.1", relay.port), timeout=20)
               for _ in range(30)]
    try:
        banners = [first_line(sock) for sock in sockets]
        greeted = [b for b in banners if b.startswith(b"220 relay.test")]
        refused = [b for b in banners if b.startswith(TOO_MANY.encode())]
        assert 1 <= len(greeted) <= 3, banners
        assert len(greeted) + len(refused) == 30, banners
    finally:
        for sock in sockets:
            sock.close()
    wait_for_open_connections(relay, 0)
    with relay.client() as client:
        assert client.sendmail(SENDER, [RECIPIENT], message("after the burst")) == {}
    assert len(upstream.messages) == 1


def test_smtps_handshakes_in_progress_hold_their_slots(start_relay, upstream,
                                                       server_cert):
    settings = smtps_settings(server_cert, MAX_CONNECTIONS="2", **http_settings())
    relay = start_relay(upstream, **settings)
    relay.wait_for_log("started")
    wait_for_open_connections(relay, 0)
    silent = [socket.create_connection(("127.0.0.1", settings["SMTPS_PORT"]), timeout=20)
              for _ in range(2)]  # TCP only: no ClientHello
    try:
        wait_for_open_connections(relay, 2)
        refused = socket.create_connection(("127.0.0.1", relay.port), timeout=20)
        assert read_to_eof(refused).startswith(TOO_MANY.encode())
        refused.close()
    finally:
        for sock in silent:
            sock.close()
    wait_for_open_connections(relay, 0)
    with smtps_client(settings["SMTPS_PORT"], server_cert[2]) as client:
        client.login(USER, PASSWORD)
        assert client.sendmail(SENDER, [RECIPIENT], message("over SMTPS")) == {}
    assert len(upstream.messages) == 1
    assert_no_traceback(relay)


def test_failed_and_timed_out_smtps_handshakes_give_their_slots_back(
        start_relay, upstream, server_cert):
    settings = smtps_settings(server_cert, MAX_CONNECTIONS="2", TIMEOUT="2",
                              **http_settings())
    relay = start_relay(upstream, **settings)
    relay.wait_for_log("started")
    port = settings["SMTPS_PORT"]
    # Two that never send a ClientHello: the relay ends them after TIMEOUT.
    silent = [socket.create_connection(("127.0.0.1", port), timeout=20) for _ in range(2)]
    for sock in silent:
        assert read_to_eof(sock, timeout=30) == b""  # closed by the relay, no reply
        sock.close()
    wait_for_open_connections(relay, 0)
    # Two whose handshake fails at once: not TLS at all.
    for _ in range(2):
        with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
            sock.sendall(b"EHLO not-tls.test\r\n" * 20)
            read_to_eof(sock)
    wait_for_open_connections(relay, 0)
    # Both slots are free: two good clients at the same time.
    with smtps_client(port, server_cert[2]) as first, \
            smtps_client(port, server_cert[2]) as second:
        first.login(USER, PASSWORD)
        second.login(USER, PASSWORD)
        assert first.noop()[0] == 250 and second.noop()[0] == 250
    assert_no_traceback(relay)


def test_max_connections_per_ip_caps_one_address(start_relay, upstream, server_cert):
    settings = smtps_settings(server_cert, MAX_CONNECTIONS_PER_IP="2", **http_settings())
    relay = start_relay(upstream, **settings)
    relay.wait_for_log("started")
    wait_for_open_connections(relay, 0)
    first, second = client_from(relay.port), client_from(relay.port)
    try:
        assert first.banner.startswith("220") and second.banner.startswith("220")
        third = client_from(relay.port)
        assert third.banner.startswith("421 4.7.0"), third.banner
        assert "your address" in third.banner, third.banner
        assert third.closed()
        third.close()
        other = client_from(relay.port, OTHER_ADDRESS)  # another address is served
        assert other.banner.startswith("220"), other.banner
        other.close()
    finally:
        first.close()
        second.close()
    wait_for_open_connections(relay, 0)
    # An SMTPS handshake in progress counts for its address too.
    silent = [socket.create_connection(("127.0.0.1", settings["SMTPS_PORT"]), timeout=20)
              for _ in range(2)]
    try:
        wait_for_open_connections(relay, 2)
        refused = client_from(relay.port)
        assert refused.banner.startswith("421 4.7.0"), refused.banner
        refused.close()
    finally:
        for sock in silent:
            sock.close()
    wait_for_open_connections(relay, 0)
    again = client_from(relay.port)
    again.login()
    assert again.command("QUIT").startswith("221")
    again.close()
    assert log_lines(relay, "connection-refused")
    assert_no_traceback(relay)


def noop_or_hang_up(client: RawClient) -> str | None:
    """None after a NOOP answered 250; else what the relay said (or "closed")."""
    try:
        if not select.select([client.sock], [], [], 0)[0]:  # nothing unsolicited
            reply = client.command("NOOP")
            if reply == "250 OK":
                return None
        else:
            reply = client.reply()
    except OSError:
        return "closed"
    assert client.closed(), reply
    return reply


def test_unauthenticated_client_is_cut_off_timeout_after_its_greeting(start_relay,
                                                                       upstream):
    relay = start_relay(upstream, TIMEOUT="2", TRUSTED_NETWORKS=f"{OTHER_ADDRESS}/32")
    stranger = client_from(relay.port)
    member = client_from(relay.port)
    member.login()
    trusted = client_from(relay.port, OTHER_ADDRESS)
    for client in (stranger, trusted):
        assert client.command("EHLO noop.test").startswith("250")
    greeted = time.monotonic()
    cut_off: str | None = None
    try:
        # NOOPs every quarter second, for three TIMEOUTs.
        while time.monotonic() - greeted < 6:
            if cut_off is None:
                cut_off = noop_or_hang_up(stranger)
            assert member.command("NOOP") == "250 OK"
            assert trusted.command("NOOP") == "250 OK"
            time.sleep(0.25)
        assert cut_off is not None, "the unauthenticated client was never cut off"
        assert cut_off.startswith("421 4.7.0") or cut_off == "closed", cut_off
        assert log_lines(relay, "auth-timeout"), relay.log()
        # The authenticated and the trusted client still work.
        for client in (member, trusted):
            assert client.command(f"MAIL FROM:<{SENDER}>").startswith("250")
            assert client.command(f"RCPT TO:<{RECIPIENT}>").startswith("250")
            assert client.command("DATA").startswith("354")
            assert client.command(message("kept") + b".").startswith("250")
    finally:
        for client in (stranger, member, trusted):
            client.close()
    assert len(upstream.messages) == 2
    assert_no_traceback(relay)


def test_max_connections_per_ip_setting():
    base = {"SMTP_AUTH_PASSWORD": PASSWORD}
    assert load_config(base).max_connections_per_ip == 0  # off by default
    assert load_config({**base, "MAX_CONNECTIONS_PER_IP": "5"}).max_connections_per_ip == 5
    with pytest.raises(ConfigError, match="MAX_CONNECTIONS_PER_IP"):
        load_config({**base, "MAX_CONNECTIONS_PER_IP": "-1"})


# ---------------------------------------------------------------------------------------
# 2. A verdict belongs to the users it was checked against
# ---------------------------------------------------------------------------------------

def test_password_rotated_during_a_check_stops_working(start_relay, upstream, tmp_path,
                                                       slow_hash):
    users = tmp_path / "users"
    users.write_text(f"alice:{slow_hash}\n")
    relay = start_relay(upstream, SMTP_USERS_FILE=str(users), AUTH_FAILURE_DELAY="0",
                        AUTH_MAX_FAILURES="0")
    new_password = "rotated-Pa55-word"
    client = client_from(relay.port)
    try:
        assert client.command("EHLO raw.test").startswith("250")
        client.send(f"AUTH PLAIN {plain_token('alice', PASSWORD)}\r\n".encode())
        time.sleep(0.3)  # the cost-14 check is under way
        new_hash = bcrypt.hashpw(new_password.encode(), bcrypt.gensalt(4)).decode()
        users.write_text(f"alice:{new_hash}\n")
        hangup(relay)
        relay.wait_for_log(" reloaded ")
        during = client.reply()
    finally:
        client.close()
    log = relay.log()
    assert log.index(" reloaded ") < log.index(" auth-"), log  # HUP came mid-check
    # The rotation applies to what is answered after it, this AUTH included.
    assert during.startswith("535"), during
    for _ in range(2):  # no cached verdict either
        late = client_from(relay.port)
        assert late.command("EHLO raw.test").startswith("250")
        assert late.command(f"AUTH PLAIN {plain_token('alice', PASSWORD)}").startswith(
            "535")
        late.close()
    fresh = client_from(relay.port)
    assert fresh.command("EHLO raw.test").startswith("250")
    assert fresh.command(f"AUTH PLAIN {plain_token('alice', new_password)}").startswith(
        "235")
    fresh.close()
    assert_no_traceback(relay)


# ---------------------------------------------------------------------------------------
# 3. AUTH under load: counted first, own pool, long passwords
# ---------------------------------------------------------------------------------------

def test_auth_is_counted_when_the_client_leaves_during_the_check(start_relay, upstream,
                                                                 slow_hash):
    relay = start_relay(upstream, SMTP_AUTH_PASSWORD="", SMTP_AUTH_PASSWORD_HASH=slow_hash,
                        AUTH_MAX_FAILURES="2", AUTH_FAILURE_DELAY="0")
    for _ in range(2):
        client = client_from(relay.port)
        assert client.command("EHLO raw.test").startswith("250")
        client.send(f"AUTH PLAIN {plain_token(USER, 'wrong-guess')}\r\n".encode())
        time.sleep(0.5)  # the check is under way; leave before its verdict
        client.close()
    refused = client_from(relay.port)
    assert refused.banner.startswith("421 4.7.0 Too many failed logins"), refused.banner
    refused.close()
    assert_no_traceback(relay)


def test_checks_for_clients_that_left_never_run(start_relay, upstream):
    cost_12 = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(12)).decode()
    relay = start_relay(upstream, SMTP_AUTH_PASSWORD="", SMTP_AUTH_PASSWORD_HASH=cost_12,
                        AUTH_MAX_FAILURES="0", AUTH_FAILURE_DELAY="0")
    # The relay's own CPU cost of one check (the client waits for the verdict).
    before = wait_until_cpu_settles(relay)
    for _ in range(2):
        one = client_from(relay.port)
        assert one.command("EHLO raw.test").startswith("250")
        assert one.command(f"AUTH PLAIN {plain_token(USER, 'wrong')}").startswith("535")
        one.close()
    one_check = (wait_until_cpu_settles(relay) - before) / 2
    # Thirty clients ask at once and leave before any verdict.
    clients = [client_from(relay.port) for _ in range(30)]
    for client in clients:
        client.send(f"EHLO raw.test\r\nAUTH PLAIN {plain_token(USER, 'wrong')}\r\n"
                    .encode())
    time.sleep(0.3)
    for client in clients:
        client.close()
    spent = wait_until_cpu_settles(relay) - before - 2 * one_check
    # At most a few checks ran (those already running when their client left), not 30.
    assert spent < 10 * one_check, (spent, one_check)
    with relay.client() as client:  # and the relay still serves
        assert client.sendmail(SENDER, [RECIPIENT], message("after the flood")) == {}
    assert_no_traceback(relay)


LONG_PASSWORD = "L0ng-" + "p" * 71 + "-end"  # 80 bytes


def test_password_over_72_bytes_is_checked_as_htpasswd_hashes_it(start_relay, upstream,
                                                                 tmp_path):
    assert len(LONG_PASSWORD.encode()) == 80
    # What `htpasswd -nbB user password` stores: bcrypt of the first 72 bytes.
    hashed = bcrypt.hashpw(LONG_PASSWORD.encode()[:72], bcrypt.gensalt(4)).decode()
    users = tmp_path / "users"
    users.write_text(f"alice:{hashed}\n")
    relay = start_relay(upstream, SMTP_USERS_FILE=str(users), AUTH_FAILURE_DELAY="0")
    for password, expected in [(LONG_PASSWORD, "235"),
                               (LONG_PASSWORD[:72] + "-other-tail", "235"),
                               (LONG_PASSWORD[:71], "535"),
                               ("x" + LONG_PASSWORD[1:], "535")]:
        client = client_from(relay.port)
        assert client.command("EHLO raw.test").startswith("250")
        reply = client.command(f"AUTH PLAIN {plain_token('alice', password)}")
        assert reply.startswith(expected), (password, reply)
        client.close()
    assert_no_traceback(relay)


def run_hash_password(tmp_path: Path, password: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SMTP_RELAY), "hash-password"],
                          input=password + "\n", capture_output=True, text=True,
                          check=False, env=relay_env(tmp_path, None), cwd=tmp_path,
                          timeout=60)


def test_hash_password_says_when_it_uses_only_the_first_72_bytes(tmp_path):
    result = run_hash_password(tmp_path, LONG_PASSWORD)
    assert result.returncode == 0, result.stderr
    hashed = result.stdout.strip().encode()
    assert bcrypt.checkpw(LONG_PASSWORD.encode()[:72], hashed)
    assert "72" in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert LONG_PASSWORD not in result.stdout + result.stderr
    short = run_hash_password(tmp_path, "short-Pa55")
    assert short.returncode == 0 and short.stderr == "", short.stderr


# ---------------------------------------------------------------------------------------
# 4. AUTH inside a transaction
# ---------------------------------------------------------------------------------------

def test_auth_inside_a_transaction_is_503(start_relay, upstream):
    relay = start_relay(upstream, TRUSTED_NETWORKS=f"{OTHER_ADDRESS}/32",
                        AUTH_FAILURE_DELAY="0")
    trusted = client_from(relay.port, OTHER_ADDRESS)
    try:
        assert trusted.command("EHLO raw.test").startswith("250")
        assert trusted.command(f"MAIL FROM:<{SENDER}>").startswith("250")
        reply = trusted.command(f"AUTH PLAIN {plain_token(USER, PASSWORD)}")
        assert reply.startswith("503"), reply
        # The transaction goes on under the policy it began with.
        assert trusted.command(f"RCPT TO:<{RECIPIENT}>").startswith("250")
        assert trusted.command("RSET").startswith("250")
        # Outside a transaction AUTH is fine, once.
        assert trusted.command(f"AUTH PLAIN {plain_token(USER, PASSWORD)}").startswith(
            "235")
        assert trusted.command(f"AUTH PLAIN {plain_token(USER, PASSWORD)}").startswith(
            "503")
    finally:
        trusted.close()
    member = client_from(relay.port)
    try:
        member.login()
        assert member.command(f"MAIL FROM:<{SENDER}>").startswith("250")
        assert member.command("AUTH LOGIN").startswith("503")
        assert member.command(f"RCPT TO:<{RECIPIENT}>").startswith("250")
    finally:
        member.close()
    assert upstream.messages == []
    assert_no_traceback(relay)


# ---------------------------------------------------------------------------------------
# 5. No tracebacks from strangers; a budget for refused commands
# ---------------------------------------------------------------------------------------

def test_size_with_a_non_ascii_digit_is_a_syntax_error(relay, upstream):
    client = client_from(relay.port)
    try:
        client.login()
        for size in ("\u00b2", "1\u00b3", "\u0661\u0662"):  # superscripts, Arabic-Indic
            reply = client.command(f"MAIL FROM:<{SENDER}> SIZE={size}".encode())
            assert reply.startswith("501 5.5.4"), (size, reply)
        assert client.command(f"MAIL FROM:<{SENDER}> SIZE=100").startswith("250")
        assert client.command(f"RCPT TO:<{RECIPIENT}>").startswith("250")
        assert client.command("DATA").startswith("354")
        assert client.command(message("sized") + b".").startswith("250")
    finally:
        client.close()
    assert len(upstream.messages) == 1
    assert_no_traceback(relay)


def test_overlong_auth_response_line_is_refused_without_a_traceback(relay):
    client = client_from(relay.port)
    try:
        assert client.command("EHLO raw.test").startswith("250")
        for mechanism in ("PLAIN", "LOGIN"):
            assert client.command(f"AUTH {mechanism}").startswith("334")
            reply = client.command(b"A" * 5000)
            assert reply.startswith("500 5.5.6"), reply
            assert client.command("NOOP") == "250 OK"  # in step: nothing left over
        assert client.command(f"AUTH PLAIN {plain_token(USER, PASSWORD)}").startswith(
            "235")
    finally:
        client.close()
    assert_no_traceback(relay)


def tls_session(relay: RelayProcess, smtps_port: int, ca_file: Path, smtps: bool
                ) -> ssl.SSLSocket:
    context = tls_context(ca_file)
    if smtps:
        tls = context.wrap_socket(socket.create_connection(("127.0.0.1", smtps_port),
                                                           timeout=20),
                                  server_hostname="localhost")
        assert first_line(tls).startswith(b"220")
        return tls
    plain = client_from(relay.port)
    assert plain.command("EHLO raw.test").startswith("250")
    assert plain.command("STARTTLS").startswith("220")
    return context.wrap_socket(plain.sock, server_hostname="localhost")


def test_tls_client_dropping_the_connection_mid_reply_leaves_no_traceback(
        start_relay, upstream, server_cert):
    settings = smtps_settings(server_cert, USE_TLS="true", AUTH_FAILURE_DELAY="0",
                              AUTH_MAX_FAILURES="0")
    relay = start_relay(upstream, **settings)
    relay.wait_for_log("started")
    token = plain_token(USER, PASSWORD)
    bursts = [b"BOGUS\r\n" * 12,  # aiosmtpd hangs up at the 5th, then keeps answering
              b"QUIT\r\nNOOP\r\nNOOP\r\n",
              f"EHLO x\r\nAUTH PLAIN {token}\r\n".encode() + b"AUTH PLAIN\r\n*\r\n" * 12,
              b"EHLO x\r\n" * 50 + b"BOGUS\r\n" * 8]
    for round_ in range(3):
        for smtps in (True, False):
            for burst in bursts:
                tls = tls_session(relay, settings["SMTPS_PORT"], server_cert[2], smtps)
                tls.sendall(burst)
                if round_ == 1:
                    time.sleep(0.05)
                tls.close()
    still = client_from(relay.port)  # still serving
    assert still.command("NOOP") == "250 OK"
    still.close()
    time.sleep(0.5)
    assert_no_traceback(relay)
    assert "_write_appdata" not in relay.stderr
    # A vanished client is worth a DEBUG line at most: no replies written after it
    # left (asyncio warns about each from the fifth on).
    assert "socket.send() raised exception" not in relay.stderr, relay.stderr


def test_unauthenticated_flood_of_refused_commands_is_cut_off(start_relay, upstream):
    relay = start_relay(upstream)
    baseline = len(relay.log().splitlines())
    sock = socket.create_connection(("127.0.0.1", relay.port), timeout=20)
    try:
        refused = [f"MAIL FROM:<{SENDER}>", f"RCPT TO:<{RECIPIENT}>", "DATA",
                   "AUTH NOPE", "VRFY", "EHLO"]
        sock.sendall(b"EHLO flood.test\r\n" + "".join(
            refused[n % len(refused)] + "\r\n" for n in range(300)).encode())
        received = read_to_eof(sock, timeout=30).decode()
    finally:
        sock.close()
    replies = received.splitlines()
    errors = [line for line in replies if line[:1] == "5"]
    assert 5 <= len(errors) <= 25, replies
    assert replies[-1].startswith("421 4.7.0 Too many errors"), replies[-5:]
    time.sleep(0.5)
    added = relay.log().splitlines()[baseline:]
    assert len(added) <= 30, "\n".join(added)
    assert_no_traceback(relay)


# ---------------------------------------------------------------------------------------
# 6. The aiosmtpd and asyncio internals these fixes lean on
# ---------------------------------------------------------------------------------------

def test_aiosmtpd_and_asyncio_contracts():
    # challenge_auth is replaced whole (aiosmtpd's readline raised on a long line).
    assert list(inspect.signature(SMTP.challenge_auth).parameters) == [
        "self", "challenge", "encode_to_b64", "log_client_response"]
    assert "await self._reader.readline()" in inspect.getsource(SMTP.challenge_auth)
    # smtp_MAIL checks SIZE before aiosmtpd's int(size).
    assert "self._strip_command_keyword('FROM:', arg)" in inspect.getsource(SMTP.smtp_MAIL)
    assert "size.isdigit()" in inspect.getsource(SMTP.smtp_MAIL)
    # push() looks under TLS at the TCP transport STARTTLS keeps here.
    assert "self._original_transport = self.transport" in inspect.getsource(
        SMTP.smtp_STARTTLS)
    assert list(inspect.signature(SMTP.push).parameters) == ["self", "status"]
    # SMTPS builds the SSLProtocol that create_server(ssl=...) would.
    parameters = inspect.signature(sslproto.SSLProtocol).parameters
    assert list(parameters)[:6] == ["loop", "app_protocol", "sslcontext", "waiter",
                                    "server_side", "server_hostname"]
    assert "ssl_handshake_timeout" in parameters
