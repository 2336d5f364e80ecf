"""Review fixes: memory and the event loop at DATA, IDNA 2008 domains, secrets in URL
settings and in aiosmtpd's DEBUG lines, JSON log lines a client cannot break, the
token-bucket burst, the READY_PROBE_SECONDS floor and the TLS certificate reload on
SIGHUP.

As everywhere in this suite: the real relay process over real sockets on 127.0.0.1, a
real upstream (aiosmtpd in this process), real clients; nothing is mocked. Bounds on
time are generous; assertions are about replies, log lines and memory, not speed.
"""

from __future__ import annotations

import base64
import json
import re
import signal
import smtplib
import time
from pathlib import Path

import pytest
from conftest import (
    PASSWORD,
    USER,
    RawClient,
    RelayProcess,
)

from smtp_relay import (
    AddressError,
    normalize_domain,
    parse_domain_list,
)

pytestmark = pytest.mark.timeout(120)

SENDER = "app@example.com"
RECIPIENT = "ops@example.com"
CONFIG_ERROR = "smtp-relay: configuration error:"


# ---------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------

def b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def mail(client: smtplib.SMTP, sender: str = SENDER, options: tuple[str, ...] = ()) -> str:
    code, text = client.mail(sender, list(options))
    return f"{code} {text.decode()}"


def rcpt(client: smtplib.SMTP, recipient: str) -> str:
    code, text = client.rcpt(recipient)
    return f"{code} {text.decode()}"


def try_message(client: smtplib.SMTP, content: bytes,
                recipients: tuple[str, ...] = (RECIPIENT,)) -> str:
    """MAIL, RCPT*, DATA on an open client; the first refusal, or the DATA reply."""
    reply = mail(client)
    if not reply.startswith("250"):
        return reply
    for recipient in recipients:
        reply = rcpt(client, recipient)
        if not reply.startswith("250"):
            return reply
    code, text = client.data(content)
    return f"{code} {text.decode()}"


def plain_token(user: str = USER, password: str = PASSWORD) -> str:
    return b64(f"\0{user}\0{password}")


def raw_login(client: RawClient) -> None:
    assert client.command("EHLO raw.test").startswith("250")
    assert client.command(f"AUTH PLAIN {plain_token()}").startswith("235")


def hangup(relay: RelayProcess, timeout: float = 10.0) -> None:
    """SIGHUP once the relay has installed its handler (before that HUP would end it)."""
    status = Path(f"/proc/{relay.process.pid}/status")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        caught = next((line.split()[1] for line in status.read_text().splitlines()
                       if line.startswith("SigCgt:")), "0")
        if int(caught, 16) & (1 << (signal.SIGHUP - 1)):
            break
        time.sleep(0.02)
    else:
        raise AssertionError("the relay never installed its SIGHUP handler")
    relay.process.send_signal(signal.SIGHUP)


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
