"""Review fixes: memory and the event loop at DATA, IDNA 2008 domains, secrets in URL
settings and in aiosmtpd's DEBUG lines, JSON log lines a client cannot break, the
token-bucket burst, the READY_PROBE_SECONDS floor and the TLS certificate reload on
SIGHUP.

As everywhere in this suite: the real relay process over real sockets on 127.0.0.1, a
real upstream (aiosmtpd in this process), real clients; nothing is mocked. Bounds on
time are generous; assertions are about replies, log lines and memory, not speed.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import smtplib
import ssl
import threading
import time
from pathlib import Path

import pytest
import trustme
from conftest import (
    PASSWORD,
    USER,
    RawClient,
    RelayProcess,
    exit_of_each,
    free_port,
    hangup,
    mail,
    message,
    rcpt,
    relay_env,
    try_message,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from relay import replies
from relay.policy import (
    HEADER_SECTION_LIMIT,
    AddressError,
    header_block,
    header_from_domains,
    header_from_fields,
    header_section_end,
    normalize_domain,
)
from relay.ratelimit import RateLimiter
from relay.settings import ConfigError, load_config, parse_domain_list

pytestmark = pytest.mark.timeout(120)

SENDER = "app@example.com"
RECIPIENT = "ops@example.com"
CONFIG_ERROR = "smtp-relay: configuration error:"


# ---------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------

def b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def plain_token(user: str = USER, password: str = PASSWORD) -> str:
    return b64(f"\0{user}\0{password}")


def raw_login(client: RawClient) -> None:
    assert client.command("EHLO raw.test").startswith("250")
    assert client.command(f"AUTH PLAIN {plain_token()}").startswith("235")


# ---------------------------------------------------------------------------------------
# 7. IDNA 2008 (UTS #46, non-transitional): ß stays ß
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("domain", "ascii_form"), [
    ("straße.de", "xn--strae-oqa.de"),
    ("STRASSE.de", "strasse.de"),
    ("Straße.DE.", "xn--strae-oqa.de"),
    ("bücher.example", "xn--bcher-kva.example"),
    ("faß.de", "xn--fa-hia.de"),
])
def test_normalize_domain_is_idna_2008(domain, ascii_form):
    assert normalize_domain(domain) == ascii_form


def test_allowlists_tell_strasse_from_strasse_with_eszett():
    plain = parse_domain_list("strasse.de", "ALLOWED_TO_DOMAINS")
    eszett = parse_domain_list("straße.de,*.faß.de", "ALLOWED_TO_DOMAINS")
    assert not plain.allows(normalize_domain("straße.de"))
    assert plain.allows(normalize_domain("strasse.de"))
    assert eszett.allows(normalize_domain("straße.de"))
    assert not eszett.allows(normalize_domain("strasse.de"))
    assert eszett.allows(normalize_domain("mail.faß.de"))
    assert not eszett.allows(normalize_domain("mail.fass.de"))
    assert str(eszett) == "xn--strae-oqa.de,*.xn--fa-hia.de"


@pytest.mark.parametrize("domain", ["a\u200db.example", "xn--.example", "-bad.example"])
def test_normalize_domain_refuses_what_idna_2008_refuses(domain):
    with pytest.raises(AddressError):
        normalize_domain(domain)


def test_relay_does_not_take_strasse_with_eszett_for_strasse(start_relay, upstream):
    relay = start_relay(upstream, ALLOWED_TO_DOMAINS="strasse.de")
    with relay.client() as client:
        assert mail(client, options=("SMTPUTF8",)).startswith("250")
        assert rcpt(client, "u@straße.de") == \
            "550 5.7.1 Recipient domain xn--strae-oqa.de is not allowed"
        assert rcpt(client, "u@strasse.de").startswith("250")
    assert upstream.handler.rcpt_commands == ["u@strasse.de"]

    relay = start_relay(upstream, ALLOWED_TO_DOMAINS="straße.de")
    with relay.client() as client:
        assert mail(client, options=("SMTPUTF8",)).startswith("250")
        assert rcpt(client, "u@strasse.de") == \
            "550 5.7.1 Recipient domain strasse.de is not allowed"
        assert rcpt(client, "u@straße.de").startswith("250")
    assert upstream.handler.rcpt_commands == ["u@strasse.de", "u@xn--strae-oqa.de"]


# ---------------------------------------------------------------------------------------
# 12. Log lines a client cannot break: invalid UTF-8 and line separators
# ---------------------------------------------------------------------------------------

def send_hostile_addresses(relay: RelayProcess) -> list[str]:
    """Addresses with an invalid UTF-8 byte and with U+2028/U+2029/U+0085; the replies."""
    client = RawClient(relay.port)
    try:
        raw_login(client)
        replies = [client.command(b"MAIL FROM:<a\xff@evil.com>")]
        replies.append(client.command("MAIL FROM:<app@example.com> SMTPUTF8"))
        replies.append(client.command(b"RCPT TO:<b\xff@example.com>"))
        replies.append(client.command("RCPT TO:<x\u2028y@evil.com>".encode()))
        replies.append(client.command("RCPT TO:<x\u2029y\u0085z@evil.com>".encode()))
        client.command("QUIT")
    finally:
        client.close()
    return replies


def test_json_log_keeps_lines_with_invalid_utf8_and_separators(start_relay, upstream):
    relay = start_relay(upstream, LOG_FORMAT="json")
    replies = send_hostile_addresses(relay)
    assert [reply[:3] for reply in replies] == ["553", "250", "553", "550", "553"], replies
    relay.wait_for_log("x\\u2029y\\u0085z@evil.com")
    raw = relay.log_file.read_bytes()
    text = raw.decode("utf-8")  # valid UTF-8, whatever the client sent
    for separator in ("\u2028", "\u2029", "\u0085"):
        assert separator not in text
    entries = [json.loads(line) for line in text.split("\n") if line]
    events = [(entry["event"], entry.get("address")) for entry in entries]
    refused = [address for event, address in events
               if event in ("sender-refused", "recipient-refused")]
    assert len(refused) == 4, events
    assert refused[0].startswith("<a") and refused[0].endswith("@evil.com>")
    assert "\\xff" in refused[0] or "\ufffd" in refused[0], refused[0]
    assert "x\u2028y@evil.com" in refused[2]  # the value survives, escaped on the line
    for line in relay.stderr.splitlines():
        if line.startswith("{"):
            json.loads(line)
    assert "Logging error" not in relay.stderr
    assert "UnicodeEncodeError" not in relay.stderr


def test_text_log_keeps_lines_with_invalid_utf8_and_separators(start_relay, upstream):
    relay = start_relay(upstream)
    send_hostile_addresses(relay)
    relay.wait_for_log("@evil.com domain=evil.com")
    text = relay.log_file.read_bytes().decode("utf-8")
    lines = text.split("\n")[:-1]
    assert all(re.match(r"\d{4}-\d\d-\d\d ", line) for line in lines), lines
    refused = [line for line in lines if "-refused " in line]
    assert len(refused) == 4, lines
    assert "Logging error" not in relay.stderr


# ---------------------------------------------------------------------------------------
# 10. Secrets: credentials in URL settings, AUTH data in aiosmtpd's DEBUG lines
# ---------------------------------------------------------------------------------------

STORAGE_PASSWORD = "St0rage-Pa55word"


def test_config_redacts_credentials_in_url_settings():
    for uri, shown in [
        (f"redis://:{STORAGE_PASSWORD}@redis.test:6379/0", "redis://:***@redis.test:6379/0"),
        (f"redis://relay:{STORAGE_PASSWORD}@redis.test", "redis://relay:***@redis.test"),
        (f"rediss://{STORAGE_PASSWORD}@redis.test", "rediss://***@redis.test"),
        (f"redis://redis.test/0?password={STORAGE_PASSWORD}&db=1",
         "redis://redis.test/0?password=***&db=1"),
        ("memory://", "memory://"),
    ]:
        config = load_config({"RATE_LIMIT_STORAGE": uri})
        assert config.redacted()["rate_limit_storage"] == shown
        assert STORAGE_PASSWORD not in repr(config)


def test_url_credentials_never_printed(tmp_path, start_relay, upstream):
    """The start line, `check`, and a start-up error about the storage."""
    with_password = f"memory://relay:{STORAGE_PASSWORD}@storage.test"
    relay = start_relay(upstream, RATE_LIMIT_STORAGE=with_password,
                        RATE_LIMIT_PER_MINUTE="5")
    relay.wait_for_log(" started ")
    assert "rate_limit_storage=memory://relay:***@storage.test" in relay.log()
    runs = {}
    for case, storage in [("check", with_password),
                          ("refused", f"redis://:{STORAGE_PASSWORD}@127.0.0.1:1"),
                          ("bogus", f"bogus://:{STORAGE_PASSWORD}@127.0.0.1:1")]:
        workdir = tmp_path / case
        workdir.mkdir()
        runs[case] = (workdir, relay_env(workdir, upstream, RATE_LIMIT_STORAGE=storage,
                                         RATE_LIMIT_PER_MINUTE="5"))
    results = exit_of_each({"check": runs.pop("check")}, args=("check",))
    results.update(exit_of_each(runs, timeout=10))
    status, stdout, stderr = results["check"]
    assert status == 0, stdout + stderr
    assert "  rate_limit_storage = memory://relay:***@storage.test\n" in stdout
    for case in ("refused", "bogus"):
        status, stdout, stderr = results[case]
        assert status in (2, None), (case, status, stderr)
        if status == 2:  # no Redis client installed, or an unknown scheme
            assert stderr.startswith(CONFIG_ERROR) and "RATE_LIMIT_STORAGE" in stderr
            assert ":***@127.0.0.1:1" in stderr, stderr
    for case, (_, stdout, stderr) in results.items():
        assert STORAGE_PASSWORD not in stdout + stderr, case
    for path in [relay.log_file, relay.stderr_file] + [
            workdir / "logs" / "smtp-relay.log" for workdir, _ in runs.values()]:
        if path.exists():
            assert STORAGE_PASSWORD not in path.read_text(errors="replace"), path


def test_no_auth_data_in_debug_lines(start_relay, upstream):
    """PLAIN with an initial response (also in lower case) and after a challenge,
    LOGIN, a raw (not base64) password at the LOGIN prompt, a token in place of the
    mechanism, and AUTH steps sent as commands after the mechanism was refused."""
    relay = start_relay(upstream, LOG_LEVEL="DEBUG", AUTH_FAILURE_DELAY="0",
                        AUTH_MAX_FAILURES="0", AUTH_MECHANISMS="PLAIN,LOGIN")
    token = plain_token()
    steps: list[list[str | bytes]] = [
        [f"AUTH PLAIN {token}"],
        [f"auth plain {token}"],
        ["AUTH PLAIN", token],
        ["AUTH LOGIN", b64(USER), b64(PASSWORD)],
        [f"AUTH LOGIN {b64(USER)}", b64(PASSWORD)],
        ["AUTH LOGIN", b64(USER), PASSWORD],  # raw password: 501, not base64
        [f"AUTH {token}"],  # the token where the mechanism goes: 504
        ["AUTH CRAM-MD5", b64(USER), b64(PASSWORD), token, PASSWORD],  # 504, then junk
    ]
    for lines in steps:
        client = RawClient(relay.port)
        try:
            assert client.command("EHLO raw.test").startswith("250")
            replies = [client.command(line) for line in lines]
            assert replies[-1][:1] in "2345", replies
            client.command("QUIT")
        finally:
            client.close()
    relay.wait_for_log("QUIT")
    log, stderr = relay.log(), relay.stderr
    assert " DEBUG " in log and "auth-ok" in log and " >> " in log  # a full DEBUG log
    secrets = [PASSWORD, b64(PASSWORD), token, b64(f"{USER}\0{PASSWORD}"),
               b64(PASSWORD.encode())[:-2]]
    for secret in secrets:
        assert secret not in log, f"{secret!r} in the log file"
        assert secret not in stderr, f"{secret!r} on stderr"


# ---------------------------------------------------------------------------------------
# 14. READY_PROBE_SECONDS has a floor; SIGHUP reloads the TLS certificate and key
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["0", "0.5", "-1"])
def test_ready_probe_seconds_below_one_is_a_config_error(value):
    with pytest.raises(ConfigError) as refused:
        load_config({"READY_PROBE_SECONDS": value})
    assert "READY_PROBE_SECONDS" in str(refused.value)
    assert "at least 1" in str(refused.value)
    assert load_config({"READY_PROBE_SECONDS": "1"}).ready_probe_seconds == 1


def test_ready_probe_seconds_zero_stops_the_relay_naming_it(tmp_path, upstream):
    env = relay_env(tmp_path, upstream, READY_PROBE_SECONDS="0", HTTP_HOST="127.0.0.1",
                    HTTP_PORT=str(free_port()))
    status, _, stderr = exit_of_each({"zero": (tmp_path, env)})["zero"]
    assert status == 2, stderr
    assert stderr.startswith(CONFIG_ERROR) and "READY_PROBE_SECONDS" in stderr, stderr


def write_cert(cert: trustme.LeafCert, cert_file: Path, key_file: Path) -> None:
    cert.private_key_pem.write_to_path(str(key_file))
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    for extra in cert.cert_chain_pems[1:]:
        extra.write_to_path(str(cert_file), append=True)


def subject_unit(tls_socket: ssl.SSLSocket) -> str:
    certificate = tls_socket.getpeercert()
    fields = dict(item[0] for item in certificate["subject"])
    return fields["organizationalUnitName"]


def starttls_unit(port: int, context: ssl.SSLContext) -> str:
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
        client.starttls(context=context)
        return subject_unit(client.sock)


def smtps_unit(port: int, context: ssl.SSLContext) -> str:
    with smtplib.SMTP_SSL("127.0.0.1", port, timeout=20, context=context) as client:
        client.noop()
        return subject_unit(client.sock)


def test_sighup_reloads_the_tls_certificate(start_relay, upstream, ca, tmp_path):
    first = ca.issue_cert("localhost", "127.0.0.1", organization_unit_name="first")
    second = ca.issue_cert("localhost", "127.0.0.1", organization_unit_name="second")
    cert_file, key_file = tmp_path / "server.crt", tmp_path / "server.key"
    write_cert(first, cert_file, key_file)
    context = ssl.create_default_context()
    ca.configure_trust(context)
    smtps_port = free_port()
    relay = start_relay(upstream, USE_TLS="true", TLS_CERT_FILE=str(cert_file),
                        TLS_KEY_FILE=str(key_file), SMTPS_PORT=str(smtps_port))
    assert starttls_unit(relay.port, context) == "first"
    assert smtps_unit(smtps_port, context) == "first"

    # A session that began before the reload keeps going on its own certificate.
    old_session = smtplib.SMTP("127.0.0.1", relay.port, timeout=20)
    old_session.starttls(context=context)
    write_cert(second, cert_file, key_file)
    hangup(relay)
    relay.wait_for_log("tls-reloaded")
    assert starttls_unit(relay.port, context) == "second"
    assert smtps_unit(smtps_port, context) == "second"
    assert subject_unit(old_session.sock) == "first"
    old_session.ehlo("client.test")
    old_session.login(USER, PASSWORD)
    old_session.sendmail(SENDER, [RECIPIENT], b"Subject: old\r\n\r\nstill works\r\n")
    old_session.quit()
    assert len(upstream.messages) == 1

    # A bad pair (the first key with the second certificate) keeps the loaded one.
    first.private_key_pem.write_to_path(str(key_file))
    hangup(relay)
    relay.wait_for_log("tls-reload-failed")
    failed = [line for line in relay.log().splitlines() if " tls-reload-failed " in line]
    assert len(failed) == 1 and " ERROR " in failed[0], failed
    assert "TLS_CERT_FILE" in failed[0]
    assert starttls_unit(relay.port, context) == "second"
    assert smtps_unit(smtps_port, context) == "second"
    # Then a missing file.
    key_file.unlink()
    hangup(relay)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and relay.log().count(" tls-reload-failed ") < 2:
        time.sleep(0.05)
    assert relay.log().count(" tls-reload-failed ") == 2
    assert starttls_unit(relay.port, context) == "second"
    assert relay.process.poll() is None
    assert "Traceback" not in relay.stderr


# ---------------------------------------------------------------------------------------
# 13. RATE_LIMIT_BURST is a token bucket's size
# ---------------------------------------------------------------------------------------

RATE_LIMITED = "451 4.7.1"
RETRY_HINT = re.compile(r"try again in (\d+) s")


def test_burst_of_three_at_one_a_minute_takes_three_in_a_row(start_relay, upstream):
    relay = start_relay(upstream, RATE_LIMIT_PER_MINUTE="1", RATE_LIMIT_BURST="3")
    with relay.client() as client:
        for number in range(3):
            assert try_message(client, message(f"burst {number}")).startswith("250")
        reply = mail(client)
    assert reply.startswith(RATE_LIMITED), reply
    retry = RETRY_HINT.search(reply)
    assert retry and 50 <= int(retry.group(1)) <= 60, reply  # one token a minute
    assert len(upstream.messages) == 3


def test_without_burst_the_rate_is_a_plain_per_minute_limit(start_relay, upstream):
    relay = start_relay(upstream, RATE_LIMIT_PER_MINUTE="60", RATE_LIMIT_BURST="0")
    with relay.client() as client:
        for _ in range(60):
            assert mail(client).startswith("250")
            assert client.rset()[0] == 250
        reply = mail(client)
    assert reply.startswith(RATE_LIMITED), reply
    retry = RETRY_HINT.search(reply)
    assert retry and 1 <= int(retry.group(1)) <= 60, reply
    assert "60 messages per minute" in reply


def test_token_bucket_refills_one_token_per_interval_up_to_the_burst():
    clock = [1_000_000.0]
    limiter = RateLimiter(load_config({"RATE_LIMIT_PER_MINUTE": "1",
                                       "RATE_LIMIT_BURST": "3"}), clock=lambda: clock[0])

    async def run() -> list[dict | None]:
        outcomes = []
        for advance in (0, 0, 0, 0, 30, 30, 0, 1000, 0, 0, 0, 0):
            clock[0] += advance
            outcomes.append(await limiter.check_message("alice"))
        outcomes.append(await limiter.check_message("bob"))  # a bucket per sender
        return outcomes

    outcomes = asyncio.run(run())
    accepted = [outcome is None for outcome in outcomes]
    # Three in a row, none at 0 s and 30 s, one at 60 s, then none; after a long
    # pause the bucket holds three again (never more).
    assert accepted == [True, True, True, False, False, True, False,
                        True, True, True, False, False, True], outcomes
    assert outcomes[3] == {"limit": "3 messages in a row, then 1 per minute",
                           "seconds": 60}
    assert replies.RATE_LIMITED.format(**outcomes[3]) == (
        "451 4.7.1 Rate limit reached (3 messages in a row, then 1 per minute): try "
        "again in 60 s")
    assert outcomes[4]["seconds"] == 30


# ---------------------------------------------------------------------------------------
# 6. Memory and the event loop at DATA
# ---------------------------------------------------------------------------------------

TEN_MB = 10 * 1024 * 1024


def peak_rss_kib(relay: RelayProcess) -> int:
    status = Path(f"/proc/{relay.process.pid}/status").read_text()
    return int(re.search(r"^VmHWM:\s+(\d+) kB$", status, re.MULTILINE).group(1))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
def test_ten_mb_of_short_lines_costs_no_memory_per_line(start_relay, upstream):
    relay = start_relay(upstream, MAX_MESSAGE_SIZE="20000000", TIMEOUT="60")
    with relay.client(timeout=60) as client:
        assert try_message(client, message("warm-up")).startswith("250")
        before = peak_rss_kib(relay)
        body = b"ab\r\n" * (TEN_MB // 4)  # 2.6 million 2-byte lines
        assert try_message(client, message("short lines").replace(
            b"Hello.\r\n", body)).startswith("250")
    growth_mb = (peak_rss_kib(relay) - before) / 1024
    assert len(upstream.messages) == 2
    assert len(upstream.messages[1].content) > TEN_MB
    assert growth_mb < 60, f"peak RSS grew by {growth_mb:.0f} MB"


def test_long_line_found_without_splitting(start_relay, upstream):
    relay = start_relay(upstream)
    with relay.client() as client:
        for length, expected in [(999, "250"), (1000, "500"), (5000, "500")]:
            body = b"ab\r\n" * 1000 + b"x" * length + b"\r\n" + b"ab\r\n" * 10
            reply = try_message(client, message("line").replace(b"Hello.\r\n", body))
            assert reply.startswith(expected), (length, reply)
            if expected == "500":
                assert reply == "500 Line too long (see RFC5321 4.5.3.1.6)"
    assert len(upstream.messages) == 1


def noop_latencies(port: int, done: threading.Event) -> list[float]:
    """NOOP round trips on another connection until `done` is set."""
    latencies = []
    client = RawClient(port, timeout=60)
    try:
        while not done.is_set():
            started = time.monotonic()
            assert client.command("NOOP").startswith("250")
            latencies.append(time.monotonic() - started)
            time.sleep(0.01)
    finally:
        client.close()
    return latencies


def test_huge_header_section_is_refused_and_the_loop_keeps_serving(start_relay,
                                                                   upstream):
    relay = start_relay(upstream, CHECK_HEADER_FROM="true",
                        MAX_MESSAGE_SIZE="20000000", TIMEOUT="60")
    # ~9 MB and no empty line: all of it is header section, all From: fields.
    headers = f"From: {SENDER}\r\n".encode() * (9 * 1024 * 1024 // 22)
    big = RawClient(relay.port, timeout=120)
    try:
        raw_login(big)
        assert big.command(f"MAIL FROM:<{SENDER}>").startswith("250")
        assert big.command(f"RCPT TO:<{RECIPIENT}>").startswith("250")
        assert big.command("DATA").startswith("354")
        big.send(headers)
        done = threading.Event()
        result: list[list[float]] = []
        pinger = threading.Thread(target=lambda: result.append(
            noop_latencies(relay.port, done)))
        pinger.start()
        try:
            time.sleep(0.2)
            big.send(b".\r\n")
            reply = big.reply()
        finally:
            time.sleep(0.2)
            done.set()
            pinger.join(60)
        assert reply.startswith("552 5.3.4") and "header section" in reply, reply
        assert big.command("NOOP").startswith("250")  # the session goes on
    finally:
        big.close()
    assert upstream.messages == []
    latencies = result[0]
    assert len(latencies) >= 3 and max(latencies) < 3.0, latencies

    # Under the cap the header section is still checked as before.
    with relay.client() as client:
        ok = f"From: {SENDER}\r\n".encode() * 1000 + b"Subject: x\r\n\r\nbody\r\n"
        assert try_message(client, ok).startswith("250")
        bad = ok.replace(b"Subject: x", b"From: x@evil.com")
        assert try_message(client, bad).startswith("550 5.7.1")
        # A non-header line ends the header section, as in the email package.
        not_all_header = f"From: {SENDER}\r\n".encode() + b"ab\r\n" * (TEN_MB // 8)
        assert try_message(client, not_all_header).startswith("250")


def test_header_section_ends_where_the_email_package_ends_it():
    assert header_section_end(b"From: a\r\nSubject: b\r\n\r\nbody\r\n", 100) == 21
    assert header_section_end(b"From: a\r\nnot a header\r\nFrom: b\r\n", 100) == 9
    assert header_section_end(b"From x\r\nFrom: a\r\n\tcontinued\r\n", 100) == 29
    assert header_section_end(b"\r\nbody\r\n", 100) == 0
    assert header_section_end(b"X: y\r\n" * 100, 600) == 600
    assert header_section_end(b"X: y\r\n" * 100, 599) is None
    assert header_section_end(b"X: y\r\n" * 100000, 1024) is None
    assert header_from_fields(b"From: a@x.test\r\n\tb@y.test\r\nTo: c\r\nfrom: d@z.test\r\n",
                              50) == b"From: a@x.test\r\n\tb@y.test\r\nfrom: d@z.test\r\n"


_HEADER_LINES = [
    "From: a@example.com", "from: b@evil.com", "FROM:c@example.org", "From : d@evil.com",
    "From e@evil.com", " f@evil.com", "\tg@example.com", "Subject: s", "X-Y: From: h@evil.com",
    ":no-name", "no header here", "", "From: A <i@example.com>, j@evil.com",
    "From: \"k@evil.com\" <l@example.com>", "Received: x", "From:", "=?utf-8?q?x?=: y",
    "From: m@xn--strae-oqa.de", "From: n@[192.0.2.1]",
]


@settings(max_examples=400, deadline=None, database=None)
@given(st.lists(st.sampled_from(_HEADER_LINES), max_size=8))
def test_from_fields_give_what_parsing_the_whole_block_gives(lines):
    content = "".join(line + "\r\n" for line in lines).encode()

    def outcome(headers: bytes) -> object:
        try:
            return header_from_domains(headers)
        except AddressError as error:
            return error.code

    end = header_section_end(content, HEADER_SECTION_LIMIT)
    assert outcome(header_from_fields(content, end)) == outcome(header_block(content))


def test_the_relay_runs_on_uvloop():
    # Issue #8 §3: the per-connection cost is the event loop's; uvloop is why one
    # message per connection keeps up with Postfix.
    import asyncio

    import uvloop

    import smtp_relay

    async def which_loop() -> int:
        return int(isinstance(asyncio.get_running_loop(), uvloop.Loop))

    assert smtp_relay.run_loop(which_loop()) == 1
