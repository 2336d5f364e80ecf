"""Attacker-facing security tests, end to end.

Every test drives the real relay process (`python smtp_relay.py`) over real sockets on
127.0.0.1, in front of a real upstream (aiosmtpd in this process) that records every
MAIL, RCPT and message it sees. Nothing is mocked. The attacker is an authenticated (or
not) SMTP client; the asset is the upstream, which trusts the relay and will deliver
wherever the relay tells it to.

1. Address tricks. An authenticated client tries to make the upstream send mail from or
   to a domain outside ALLOWED_FROM_DOMAINS / ALLOWED_TO_DOMAINS (here `evil.com` or an
   IP address) by spelling the envelope address so that the relay's parser and the
   upstream's disagree: source routes, `%` and `!` routing, several `@`, quoted routing
   characters, IP literals and numeric IPs, look-alike and homograph domains, control
   characters and line breaks inside the path, comments, unbalanced brackets, overlong
   parts, UTF-8 without SMTPUTF8. Each trick must get a 5xx, the upstream must never see
   an address outside the allowlist, and the one session used for the whole matrix must
   still deliver a legitimate message at the end.
2. SMTP smuggling. A client hides a second transaction inside the data of the first
   behind an end-of-data marker that is not `<CRLF>.<CRLF>` (`<LF>.<LF>`, `<CR>.<CR>`,
   NUL tricks ...), hoping that the relay or the upstream ends the data there and runs
   the rest as commands: mail to a recipient the policy never checked, under the
   relay's authenticated identity. The upstream must see at most the one message, never
   the smuggled recipient, and the relay must stay in step (the next reply answers the
   next command). Bare CR/LF variants are refused outright (550 5.6.0); a
   `<CRLF>NUL.<CRLF>` line has no bare line ending, so that message goes upstream as
   one message with the would-be commands as body text, dot-stuffing intact.
3. STARTTLS command injection (CVE-2011-0411 class). A man in the middle appends
   commands to the plaintext STARTTLS line; a server that buffers them runs them inside
   the TLS session as if the client had sent them. After STARTTLS nothing from before
   may survive: no buffered commands, no authentication, no EHLO. Plaintext sent after
   the 220 must never run; a second STARTTLS inside TLS, or a handshake the client
   abandons, is the client's error, not an internal one (no traceback in the log).
4. Property-based fuzzing. Hypothesis generates envelope addresses from an alphabet
   full of routing characters and command sequences (EHLO/HELO/MAIL/RCPT/DATA/RSET/
   AUTH/garbage/overlong lines) before and after a valid AUTH. The relay must answer
   every line with a well-formed reply, never hit its internal-error path, never die,
   and never forward to a domain outside the allowlist.
5. Floods and resource abuse. Pipelined floods are answered in order; a 2 MiB line does
   not kill the session; abandoned half-open connections are reclaimed at TIMEOUT so
   MAX_CONNECTIONS cannot be exhausted by idling; a client that never reads its replies
   neither blocks other clients nor keeps its connection slot forever.
"""

from __future__ import annotations

import base64
import dataclasses
import re
import signal
import smtplib
import socket
import ssl
import threading
import time

import pytest
from conftest import (
    PASSWORD,
    USER,
    RawClient,
    RelayProcess,
    Upstream,
    message,
    relay_env,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.timeout(120)

SENDER = "app@example.com"
RECIPIENT = "ops@example.com"
TOKEN = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()

# What the relays here allow (conftest's defaults).
ALLOWED_FROM = "example.com"
ALLOWED_TO_EXACT = "example.com"
ALLOWED_TO_PARENT = ".example.org"

# Replies that end a session by design: QUIT, a closing 421, too many bad commands.
CLOSING_REPLIES = ("221", "421", "502 5.5.1")
_REPLY_LINE = re.compile(r"[2-5][0-9][0-9](?:[ -].*)?")


# ---------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------

@dataclasses.dataclass
class Rig:
    """A relay process and the upstream it forwards to."""

    relay: RelayProcess
    upstream: Upstream


def address_is_allowed(address: str, *, sender: bool) -> bool:
    """The test's own oracle: does `address` (as the upstream recorded it) stay inside
    the allowlist? The domain must match exactly and the local part must carry no
    routing character (`@`, `%`, `!`), which some MTAs would route on."""
    local_part, at, domain = address.rpartition("@")
    if not at or not local_part or any(char in local_part for char in "@%!"):
        return False
    if any(ord(char) < 0x20 or ord(char) == 0x7F for char in address):
        return False
    if sender:
        return domain == ALLOWED_FROM
    return domain == ALLOWED_TO_EXACT or (domain.endswith(ALLOWED_TO_PARENT)
                                          and len(domain) > len(ALLOWED_TO_PARENT))


Marks = tuple[int, int, int]


def upstream_marks(upstream: Upstream) -> Marks:
    """How much the upstream has recorded so far (MAIL, RCPT, messages)."""
    handler = upstream.handler
    return len(handler.mail_commands), len(handler.rcpt_commands), len(handler.messages)


def upstream_addresses(upstream: Upstream, since: Marks = (0, 0, 0)
                       ) -> list[tuple[str, str]]:
    """Every envelope address the upstream saw (after `since`): [(verb, address)]."""
    handler = upstream.handler
    seen = [("MAIL", address) for address, _ in handler.mail_commands[since[0]:]]
    seen += [("RCPT", address) for address in handler.rcpt_commands[since[1]:]]
    for received in handler.messages[since[2]:]:
        seen.append(("MAIL", received.mail_from))
        seen += [("RCPT", address) for address in received.rcpt_tos]
    return seen


def assert_upstream_saw_only_allowed(upstream: Upstream,
                                     since: Marks = (0, 0, 0)) -> None:
    outside = [(verb, address) for verb, address in upstream_addresses(upstream, since)
               if not address_is_allowed(address, sender=verb == "MAIL")]
    assert outside == [], f"the upstream saw addresses outside the allowlist: {outside}"


def assert_relay_healthy(relay: RelayProcess) -> None:
    assert relay.process.poll() is None, f"relay died:\n{relay.stderr}"
    stderr = relay.stderr
    assert "Traceback" not in stderr, stderr
    assert "unexpected error" not in stderr, stderr


def check_reply(reply: str) -> None:
    """A well-formed SMTP reply that is not the relay's internal-error path."""
    for line in reply.split("\n"):
        assert _REPLY_LINE.fullmatch(line), f"malformed reply line {line!r} in {reply!r}"
    assert not reply.startswith("451 4.3.0"), f"internal error: {reply}"
    assert not reply.startswith("500 Error: ("), f"internal error: {reply}"


def replies_until_noop(client: RawClient, limit: int = 8) -> list[str]:
    """Read replies up to and including the `250 OK` of a NOOP sent last."""
    replies = []
    while not replies or replies[-1] != "250 OK":
        assert len(replies) < limit, f"no NOOP reply among {replies}"
        replies.append(client.reply())
    return replies


def login(client: RawClient) -> None:
    assert client.command("EHLO raw.test").startswith("250")
    assert client.command(f"AUTH PLAIN {TOKEN}") == "235 2.7.0 Authentication successful"


def deliver(client: RawClient, subject: str) -> str:
    """One whole transaction on an authenticated client; the final reply."""
    assert client.command(f"MAIL FROM:<{SENDER}>") == "250 2.1.0 Sender OK"
    assert client.command(f"RCPT TO:<{RECIPIENT}>") == "250 2.1.5 Recipient OK"
    assert client.command("DATA").startswith("354")
    return client.command(message(subject) + b".")


def deliver_with_new_client(rig: Rig, subject: str) -> None:
    before = len(rig.upstream.messages)
    with smtplib.SMTP("127.0.0.1", rig.relay.port, timeout=20) as client:
        client.login(USER, PASSWORD)
        assert client.sendmail(SENDER, [RECIPIENT], message(subject)) == {}
    assert len(rig.upstream.messages) == before + 1
    assert rig.upstream.messages[-1].content.endswith(message(subject))
    assert rig.upstream.messages[-1].rcpt_tos == [RECIPIENT]


def subjects(upstream: Upstream) -> list[bytes]:
    return [re.search(rb"Subject: (\S+)", m.content).group(1) for m in upstream.messages]


def starttls(client: RawClient, ca_file) -> None:
    assert client.buffer == b"", f"bytes before the handshake: {client.buffer!r}"
    context = ssl.create_default_context(cafile=str(ca_file))
    client.sock = context.wrap_socket(client.sock, server_hostname="localhost")


@pytest.fixture(scope="module")
def module_rig(tmp_path_factory):
    """Start relays (each with its own upstream) that live for the whole module."""
    started: list[Rig] = []

    def start(**overrides: str) -> Rig:
        upstream = Upstream()
        workdir = tmp_path_factory.mktemp("security-relay")
        relay = RelayProcess(workdir, relay_env(workdir, upstream, **overrides))
        started.append(Rig(relay, upstream))
        relay.wait_ready()
        return started[-1]

    yield start
    for rig in started:
        rig.relay.stop(signal.SIGKILL)
        rig.upstream.stop()


@pytest.fixture(scope="module")
def shared(module_rig) -> Rig:
    """One relay for sections 2, 4 and 5. Failed logins cost nothing and lock nobody
    out, so the fuzzer's random AUTH attempts cannot lock 127.0.0.1 out."""
    return module_rig(AUTH_FAILURE_DELAY="0", AUTH_MAX_FAILURES="0")


@pytest.fixture
def rig(shared) -> Rig:
    """The shared relay with the upstream's records cleared."""
    shared.upstream.handler.reset()
    return shared


# ---------------------------------------------------------------------------------------
# 1. Address-trick matrix: one relay, one authenticated session for the whole matrix
# ---------------------------------------------------------------------------------------

class MatrixSession:
    """The one authenticated session the matrix runs through. Reconnects only if a trick
    killed it (and counts that, so the final test can fail on it)."""

    def __init__(self, rig: Rig):
        self.rig = rig
        self.client: RawClient | None = None
        self.reconnects = 0

    def get(self) -> RawClient:
        if self.client is not None:
            try:
                if self.client.command("NOOP") == "250 OK":
                    return self.client
            except OSError:
                pass
            self.client.close()
            self.reconnects += 1
        self.client = RawClient(self.rig.relay.port, timeout=10)
        login(self.client)
        return self.client


@pytest.fixture(scope="module")
def matrix(module_rig):
    session = MatrixSession(module_rig())
    yield session
    if session.client is not None:
        session.client.close()


DENIED = "DENIED"  # "553 5.7.1 Sender domain ..." at MAIL, "550 5.7.1 Recipient ..." at RCPT
ROUTING = "553 5.7.1 "
MALFORMED = "553 5.1.3 "
NEEDS_SMTPUTF8 = "553 5.6.7 "


@dataclasses.dataclass(frozen=True)
class Trick:
    path: bytes  # what follows "MAIL FROM:" / "RCPT TO:"
    replies: tuple[str, ...]  # expected reply prefixes, one per line the path makes
    smtputf8: bool = False  # the transaction is opened with MAIL ... SMTPUTF8


def trick(id_: str, path: str | bytes, *replies: str, smtputf8: bool = False):
    raw = path.encode() if isinstance(path, str) else path
    return pytest.param(Trick(raw, replies, smtputf8), id=id_)


LABEL_63 = "a" * 63
LONG_ALLOWED_DOMAIN = ".".join([LABEL_63, LABEL_63, LABEL_63, "b" * 40]) + ".example.org"

TRICKS = [
    # Source routes: the upstream would relay through the first host.
    trick("source-route", "<@evil.com:a@example.com>", ROUTING),
    trick("source-route-list", "<@example.com,@evil.com:a@example.com>", ROUTING),
    trick("source-route-to-evil", "<@example.com:a@evil.com>", ROUTING),
    # "%" and "!" routing.
    trick("percent-hack", "<a%evil.com@example.com>", ROUTING),
    trick("percent-hack-chain", "<a%evil.com%example.com@example.com>", ROUTING),
    trick("percent-no-domain", "<a%evil.com>", ROUTING),
    trick("percent-no-brackets", "a%evil.com@example.com", ROUTING),
    trick("bang-path", "<evil.com!a@example.com>", ROUTING),
    trick("bang-path-no-domain", "<evil.com!a>", ROUTING),
    # Several "@".
    trick("two-at-evil-first", "<a@evil.com@example.com>", ROUTING),
    trick("two-at-evil-last", "<a@example.com@evil.com>", ROUTING),
    trick("allowed-domain-as-local-part", "<example.com@evil.com>", DENIED),
    trick("comma-list-in-path", "<a@example.com,b@evil.com>", ROUTING),
    trick("space-then-second-at", "<a@evil.com @example.com>", ROUTING),
    # Routing characters hidden in a quoted local part.
    trick("quoted-at", '<"a@evil.com"@example.com>', ROUTING),
    trick("quoted-percent", '<"a%evil.com"@example.com>', ROUTING),
    trick("quoted-bang", '<"evil.com!a"@example.com>', ROUTING),
    trick("quoted-escaped-at", '<"a\\@evil.com"@example.com>', ROUTING),
    trick("quote-unterminated", '<"a@example.com>', MALFORMED),
    trick("quoted-domain", '<a@"evil.com">', MALFORMED),
    # IP literals and numeric IPs.
    trick("ipv4-literal", "<a@[127.0.0.1]>", ROUTING),
    trick("ipv6-literal", "<a@[IPv6:::1]>", ROUTING),
    trick("domain-in-literal", "<a@[example.com]>", ROUTING),
    trick("bare-ipv4", "<a@127.0.0.1>", ROUTING),
    trick("short-ip-127.1", "<a@127.1>", ROUTING),
    trick("hex-ip-0x7f.1", "<a@0x7f.1>", ROUTING),
    trick("decimal-ip-2130706433", "<a@2130706433>", ROUTING),
    trick("octal-ip", "<a@0177.0.0.1>", ROUTING),
    # Look-alike domains, trailing dot, case.
    trick("evil-trailing-dot", "<a@evil.com.>", DENIED),
    trick("evil-uppercase", "<a@EVIL.COM>", DENIED),
    trick("allowed-as-prefix", "<a@example.com.evil.com>", DENIED),
    trick("allowed-as-suffix-no-dot", "<a@evilexample.com>", DENIED),
    trick("allowed-after-hyphen", "<a@evil-example.com>", DENIED),
    trick("subdomain-of-exact-entry", "<a@evil.com.example.com>", DENIED),
    trick("parent-of-wildcard", "<a@example.org>", DENIED),
    trick("wildcard-parent-as-suffix", "<a@evilexample.org>", DENIED),
    trick("localhost", "<a@localhost>", DENIED),
    trick("single-label", "<a@evil>", DENIED),
    # Homographs: punycode and Unicode, with and without SMTPUTF8.
    trick("punycode-homograph", "<a@xn--exmple-4nf.com>", DENIED),
    trick("cyrillic-homograph-no-smtputf8", "<a@ex\u0430mple.com>", NEEDS_SMTPUTF8),
    trick("cyrillic-homograph", "<a@ex\u0430mple.com>", DENIED, smtputf8=True),
    trick("fullwidth-evil", "<a@\uff45\uff56\uff49\uff4c.com>", DENIED, smtputf8=True),
    trick("fullwidth-dot", "<a@evil\uff0ecom>", DENIED, smtputf8=True),
    trick("ideographic-dot-suffix", "<a@evil.com\u3002example.com>", DENIED,
          smtputf8=True),
    trick("fullwidth-at-no-smtputf8", "<a\uff20evil.com@example.com>", NEEDS_SMTPUTF8),
    trick("utf8-local-no-smtputf8", "<\u00fc@example.com>", NEEDS_SMTPUTF8),
    # Control characters and line breaks inside the brackets.
    trick("cr-inside", b"<a@evil.com\r@example.com>", MALFORMED),
    trick("nul-inside", b"<a@example.com\x00@evil.com>", MALFORMED),
    trick("tab-inside", b"<a@example.com\t@evil.com>", MALFORMED),
    trick("del-inside", b"<a@example.com\x7f@evil.com>", MALFORMED),
    trick("c1-csi-inside", "<a@example.com\u009b@evil.com>", MALFORMED, smtputf8=True),
    # A line break ends the command line; what follows is a command of its own.
    trick("lf-injects-rcpt", b"<a@example.com\nRCPT TO:<b@evil.com>>", MALFORMED, "5"),
    trick("crlf-injects-data", b"<a@evil.com\r\nDATA x>", MALFORMED, "503 "),
    # Spaces, comments, escapes, brackets.
    trick("space-in-local", "<a @evil.com>", MALFORMED),
    trick("space-after-bracket", "< a@evil.com>", MALFORMED),
    trick("comment-in-local", "<a(x)@evil.com>", MALFORMED),
    trick("comment-in-domain", "<a@example.com(evil.com)>", MALFORMED),
    trick("comment-before-path", "(x)<a@evil.com>", MALFORMED),
    trick("backslash-escaped-at", "<a\\@evil.com@example.com>", MALFORMED),
    trick("double-brackets", "<<a@evil.com>>", "501 "),
    trick("unclosed-bracket", "<a@evil.com", MALFORMED),
    trick("unopened-bracket", "a@evil.com>", MALFORMED),
    trick("two-paths", "<a@example.com><b@evil.com>", "501 "),
    trick("two-paths-comma", "<a@example.com>,<b@evil.com>", "501 "),
    trick("display-name", "Evil <a@evil.com>", "501 "),
    trick("no-brackets-evil", "a@evil.com", DENIED),
    trick("param-carries-address", "<a@example.com> AUTH=<b@evil.com>", "555 "),
    trick("dsn-orcpt-carries-address", "<a@example.com> ORCPT=rfc822;b@evil.com", "555 "),
    trick("port-in-domain", "<a@evil.com:25>", MALFORMED),
    trick("slash-in-domain", "<a@example.com/evil.com>", MALFORMED),
    trick("percent-encoded-dot", "<a@evil%2ecom>", MALFORMED),
    # Overlong parts.
    trick("local-part-65", f"<{'a' * 65}@example.com>", MALFORMED),
    trick("label-64", f"<a@{'x' * 64}.example.org>", MALFORMED),
    trick("path-over-256", f"<{'a' * 64}@{LONG_ALLOWED_DOMAIN}>", MALFORMED),
    trick("line-over-512", f"<a@{'x.' * 300}example.com>", "500 "),
    # No domain at all.
    trick("null-path", "<>", MALFORMED),
    trick("bare-postmaster", "<postmaster>", MALFORMED),
    trick("bare-postmaster-no-brackets", "postmaster", MALFORMED),
    trick("empty", "", "501 "),
]


def expected_prefix(prefix: str, verb: str) -> str:
    if prefix == DENIED:
        return ("553 5.7.1 Sender domain " if verb == "MAIL"
                else "550 5.7.1 Recipient domain ")
    return prefix


def run_trick(matrix: MatrixSession, verb: str, trick_: Trick) -> list[str]:
    """Send one trick through the matrix session (preceded, for RCPT, by a legitimate
    MAIL); return its replies. Checks that the upstream saw nothing new."""
    client = matrix.get()
    assert client.command("RSET") == "250 2.0.0 OK"
    if verb == "RCPT":
        opening = f"MAIL FROM:<{SENDER}>" + (" SMTPUTF8" if trick_.smtputf8 else "")
        assert client.command(opening) == "250 2.1.0 Sender OK"
        line = b"RCPT TO:" + trick_.path
    else:
        line = b"MAIL FROM:" + trick_.path + (b" SMTPUTF8" if trick_.smtputf8 else b"")
    marks = upstream_marks(matrix.rig.upstream)
    client.send(line + b"\r\nNOOP\r\n")
    replies = replies_until_noop(client)[:-1]

    expected = [expected_prefix(prefix, verb) for prefix in trick_.replies]
    assert len(replies) == len(expected), (replies, expected)
    for reply, prefix in zip(replies, expected):
        assert reply.startswith(prefix), (replies, expected)
        assert reply[:1] == "5", replies
    # Nothing new reached the upstream: no MAIL for a refused sender, no RCPT for a
    # refused recipient.
    assert upstream_marks(matrix.rig.upstream) == marks, upstream_addresses(
        matrix.rig.upstream, marks)
    return replies


@pytest.mark.parametrize("trick_", TRICKS)
def test_sender_address_trick_is_refused_and_never_forwarded(matrix, trick_):
    run_trick(matrix, "MAIL", trick_)


@pytest.mark.parametrize("trick_", TRICKS)
def test_recipient_address_trick_is_refused_and_never_forwarded(matrix, trick_):
    run_trick(matrix, "RCPT", trick_)


@pytest.mark.parametrize("path,smtputf8,forwarded", [
    ("<A@EXAMPLE.COM.>", False, "A@example.com"),
    ("a@example.com", False, "a@example.com"),
    ('<"a b"@example.com>', False, '"a b"@example.com'),
    # A soft hyphen is mapped to nothing by IDNA: the upstream gets the checked form.
    ("<a@exam\u00adple.com>", True, "a@example.com"),
], ids=["uppercase-trailing-dot", "no-brackets", "quoted-space", "soft-hyphen-idn"])
def test_allowed_sender_spelling_reaches_upstream_in_the_checked_form(matrix, path,
                                                                      smtputf8,
                                                                      forwarded):
    client = matrix.get()
    assert client.command("RSET") == "250 2.0.0 OK"
    suffix = " SMTPUTF8" if smtputf8 else ""
    marks = upstream_marks(matrix.rig.upstream)
    assert client.command(f"MAIL FROM:{path}{suffix}") == "250 2.1.0 Sender OK"
    assert upstream_addresses(matrix.rig.upstream, marks) == [("MAIL", forwarded)]


@pytest.mark.parametrize("path,smtputf8,forwarded", [
    ("<a@sub.example.org>", False, "a@sub.example.org"),
    ("<A@EXAMPLE.COM.>", False, "A@example.com"),
    ("<a@x.Example.Org.>", False, "a@x.example.org"),
    # A genuine subdomain of example.org, whatever its labels say: *.example.org.
    ("<a@evil.com.example.org>", False, "a@evil.com.example.org"),
    ("<a@\uff53\uff55\uff42.example.org>", True, "a@sub.example.org"),
], ids=["wildcard-subdomain", "uppercase-trailing-dot", "mixed-case-subdomain",
        "evil-labels-under-wildcard", "fullwidth-subdomain"])
def test_allowed_recipient_spelling_reaches_upstream_in_the_checked_form(
        matrix, path, smtputf8, forwarded):
    client = matrix.get()
    assert client.command("RSET") == "250 2.0.0 OK"
    suffix = " SMTPUTF8" if smtputf8 else ""
    assert client.command(f"MAIL FROM:<{SENDER}>{suffix}") == "250 2.1.0 Sender OK"
    marks = upstream_marks(matrix.rig.upstream)
    assert client.command(f"RCPT TO:{path}") == "250 2.1.5 Recipient OK"
    assert upstream_addresses(matrix.rig.upstream, marks) == [("RCPT", forwarded)]


def test_after_the_whole_matrix_upstream_saw_only_allowed_addresses_and_session_works(
        matrix):
    # Runs after the matrix above (file order): audits everything the upstream saw
    # during it, then proves the very same session still delivers.
    upstream = matrix.rig.upstream
    assert_upstream_saw_only_allowed(upstream)
    assert upstream.messages == []  # the matrix never sent DATA
    client = matrix.get()
    assert client.command("RSET") == "250 2.0.0 OK"
    assert deliver(client, "after-matrix").startswith("250 2.0.0 Ok: queued as")
    assert [m.rcpt_tos for m in upstream.messages] == [[RECIPIENT]]
    assert upstream.messages[0].mail_from == SENDER
    assert_upstream_saw_only_allowed(upstream)
    assert matrix.reconnects == 0, "a trick killed the matrix session"
    assert_relay_healthy(matrix.rig.relay)


# ---------------------------------------------------------------------------------------
# 2. SMTP smuggling
# ---------------------------------------------------------------------------------------

SMUGGLED = (b"MAIL FROM:<x@example.com>\r\nRCPT TO:<smuggled@example.com>\r\n"
            b"DATA\r\nsmuggled\r\n.\r\n")
BARE_LINE_ENDING = "550 5.6.0 "

ENDINGS = [
    pytest.param(b"\n.\n", BARE_LINE_ENDING, id="LF.LF"),
    pytest.param(b"\n.\r\n", BARE_LINE_ENDING, id="LF.CRLF"),
    pytest.param(b"\r.\r", BARE_LINE_ENDING, id="CR.CR"),
    pytest.param(b"\r.\r\n", BARE_LINE_ENDING, id="CR.CRLF"),
    pytest.param(b"\r\n.\n", BARE_LINE_ENDING, id="CRLF.LF"),
    pytest.param(b"\r\n.\r", BARE_LINE_ENDING, id="CRLF.CR"),
    pytest.param(b"\n.\r", BARE_LINE_ENDING, id="LF.CR"),
    # No bare CR or LF here, but a "<NUL>." line ends the data at an MTA that strips
    # NULs: the relay refuses NUL in the data too.
    pytest.param(b"\r\n\x00.\r\n", "550 5.6.0 Message refused: NUL",
                 id="CRLF-NUL-dot-CRLF"),
]


def send_in_packets(client: RawClient, chunks: list[bytes]) -> None:
    client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for chunk in chunks:
        client.send(chunk)
        time.sleep(0.05)  # separate TCP segments, so the relay reads them separately


@pytest.mark.parametrize("split", [False, True], ids=["one-packet", "split-packets"])
@pytest.mark.parametrize("ending,verdict", ENDINGS)
def test_smuggled_transaction_never_reaches_upstream(rig, raw_client, ending, verdict,
                                                     split):
    client = raw_client(rig.relay.port)
    login(client)
    assert client.command(f"MAIL FROM:<{SENDER}>") == "250 2.1.0 Sender OK"
    assert client.command(f"RCPT TO:<{RECIPIENT}>") == "250 2.1.5 Recipient OK"
    assert client.command("DATA").startswith("354")
    head = message("smuggle", "Hello")
    tail = b"\r\n.\r\n" + b"NOOP\r\n"  # a real end of data, then a pipelined NOOP
    if split:
        send_in_packets(client, [head + ending[:1], ending[1:] + SMUGGLED[:30],
                                 SMUGGLED[30:60], SMUGGLED[60:], tail])
    else:
        client.send(head + ending + SMUGGLED + tail)

    replies = replies_until_noop(client)
    # The data ends at the smuggled part's own <CRLF>.<CRLF>: one verdict for the one
    # message, then the trailing "\r\n" and "." are (bad) commands, then the NOOP.
    assert replies[0].startswith(verdict), replies
    assert replies[1:] == ["500 Error: bad syntax",
                           '500 Error: command "." not recognized', "250 OK"], replies
    # In step: the next reply answers the next command.
    assert client.command("RSET") == "250 2.0.0 OK"

    handler = rig.upstream.handler
    assert [address for address, _ in handler.mail_commands] == [SENDER]
    assert handler.rcpt_commands == [RECIPIENT]
    assert "smuggled@example.com" not in handler.rcpt_commands
    assert len(rig.upstream.messages) == (1 if verdict.startswith("250") else 0)
    for received in rig.upstream.messages:
        assert received.rcpt_tos == [RECIPIENT]
        assert received.content.endswith(b"\r\nsmuggled\r\n")  # inside the one message
    assert_upstream_saw_only_allowed(rig.upstream)

    assert deliver(client, "after").startswith("250 2.0.0 Ok: queued as")
    assert subjects(rig.upstream)[-1] == b"after"
    assert len(rig.upstream.messages) <= 2


def test_commands_pipelined_after_a_real_end_of_data_run_as_commands(rig, raw_client):
    client = raw_client(rig.relay.port)
    login(client)
    client.send(f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{RECIPIENT}>\r\nDATA\r\n".encode())
    assert [client.reply()[:9] for _ in range(3)] == ["250 2.1.0", "250 2.1.5",
                                                      "354 End d"]
    client.send(message("first") + b".\r\n"
                + f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<b@sub.example.org>\r\nDATA\r\n"
                .encode())
    replies = [client.reply() for _ in range(4)]
    assert replies[0].startswith("250 2.0.0 Ok: queued as UP1 "), replies
    assert [reply[:9] for reply in replies[1:]] == ["250 2.1.0", "250 2.1.5",
                                                    "354 End d"], replies
    assert client.command(message("second") + b".").startswith(
        "250 2.0.0 Ok: queued as UP2 ")
    assert subjects(rig.upstream) == [b"first", b"second"]
    assert [m.rcpt_tos for m in rig.upstream.messages] == [[RECIPIENT],
                                                           ["b@sub.example.org"]]


def test_dot_stuffed_lines_reach_upstream_as_text_inside_one_message(rig, raw_client):
    # A lone "." line (sent stuffed as "..") must stay stuffed on the way upstream, or
    # the upstream would end the data there and run the rest as commands.
    body = (b"..\r\nMAIL FROM:<x@example.com>\r\nRCPT TO:<smuggled@example.com>\r\n"
            b"DATA\r\nsmuggled\r\n..\r\n.QUIT\r\n")
    client = raw_client(rig.relay.port)
    login(client)
    assert client.command(f"MAIL FROM:<{SENDER}>") == "250 2.1.0 Sender OK"
    assert client.command(f"RCPT TO:<{RECIPIENT}>") == "250 2.1.5 Recipient OK"
    assert client.command("DATA").startswith("354")
    # The stuffed lone dot is the very first line of the data.
    assert client.command(body + message("stuffed") + b".").startswith(
        "250 2.0.0 Ok: queued as UP1 ")
    [received] = rig.upstream.messages
    assert received.rcpt_tos == [RECIPIENT]
    assert (b"\r\n.\r\nMAIL FROM:<x@example.com>\r\nRCPT TO:<smuggled@example.com>"
            b"\r\nDATA\r\nsmuggled\r\n.\r\nQUIT\r\n" + message("stuffed")) \
        in received.content
    assert rig.upstream.handler.rcpt_commands == [RECIPIENT]
    assert client.command("NOOP") == "250 OK"


# ---------------------------------------------------------------------------------------
# 3. STARTTLS command injection
# ---------------------------------------------------------------------------------------

@pytest.fixture
def tls_relay(start_relay, upstream, server_cert) -> Rig:
    cert_file, key_file, _ = server_cert
    return Rig(start_relay(upstream, USE_TLS="true", TLS_CERT_FILE=cert_file,
                           TLS_KEY_FILE=key_file), upstream)


def test_commands_injected_with_starttls_do_not_run_inside_tls(tls_relay, raw_client,
                                                               server_cert):
    ca_file = server_cert[2]
    client = raw_client(tls_relay.relay.port)
    assert "250-STARTTLS" in client.command("EHLO raw.test").splitlines()
    client.send(f"STARTTLS\r\nAUTH PLAIN {TOKEN}\r\nMAIL FROM:<{SENDER}>\r\n".encode())
    assert client.reply() == "220 Ready to start TLS"
    starttls(client, ca_file)  # asserts no plaintext reply to the injected lines

    # The first reply inside TLS answers our NOOP, not an injected command.
    assert client.command("NOOP") == "250 OK"
    # No EHLO carried over, then no authentication carried over.
    assert client.command(f"MAIL FROM:<{SENDER}>") == "503 Error: send HELO first"
    assert "250-AUTH LOGIN PLAIN" in client.command("EHLO raw.test").splitlines()
    assert client.command(f"MAIL FROM:<{SENDER}>") == "530 5.7.0 Authentication required"
    assert tls_relay.upstream.handler.mail_commands == []
    # The injected AUTH was never consumed: a real one works now ("503 Already
    # authenticated" would mean it ran).
    assert client.command(f"AUTH PLAIN {TOKEN}") == "235 2.7.0 Authentication successful"
    # No stray reply is queued: the next reply answers the next command.
    assert client.command("RSET") == "250 2.0.0 OK"
    assert deliver(client, "over-tls").startswith("250 2.0.0 Ok: queued as")
    assert [address for address, _ in tls_relay.upstream.handler.mail_commands] == [
        SENDER]


def test_plaintext_sent_after_the_starttls_reply_is_never_executed(tls_relay,
                                                                   raw_client,
                                                                   server_cert):
    # A client (or MITM) that keeps talking plaintext after 220: those bytes are the
    # TLS handshake now, so the handshake fails and nothing runs.
    client = raw_client(tls_relay.relay.port)
    assert client.command("EHLO raw.test").startswith("250")
    assert client.command("STARTTLS") == "220 Ready to start TLS"
    client.send(f"AUTH PLAIN {TOKEN}\r\nMAIL FROM:<{SENDER}>\r\n"
                f"RCPT TO:<{RECIPIENT}>\r\n".encode())
    assert client.closed(timeout=10)
    assert not re.search(rb"(^|\n)[0-9]{3}[ -]", client.buffer), client.buffer
    assert tls_relay.upstream.handler.mail_commands == []
    assert tls_relay.upstream.handler.rcpt_commands == []
    # The relay carries on: a proper client still delivers over TLS.
    with smtplib.SMTP("127.0.0.1", tls_relay.relay.port, timeout=20) as other:
        other.starttls(context=ssl.create_default_context(cafile=str(server_cert[2])))
        other.login(USER, PASSWORD)
        assert other.sendmail(SENDER, [RECIPIENT], message("tls-after")) == {}
    assert subjects(tls_relay.upstream) == [b"tls-after"]


def test_auth_and_mail_before_starttls_are_refused_and_no_state_survives_it(
        tls_relay, raw_client, server_cert):
    ca_file = server_cert[2]
    client = raw_client(tls_relay.relay.port)
    ehlo = client.command("EHLO pre-tls.attacker").splitlines()
    assert "250-STARTTLS" in ehlo
    assert not any("AUTH" in line for line in ehlo), ehlo
    must_starttls = "530 Must issue a STARTTLS command first"
    for line in (f"AUTH PLAIN {TOKEN}", "AUTH LOGIN", f"MAIL FROM:<{SENDER}>",
                 f"RCPT TO:<{RECIPIENT}>", "DATA", "RSET", "VRFY <ops@example.com>"):
        assert client.command(line) == must_starttls, line
    assert client.command("STARTTLS") == "220 Ready to start TLS"
    starttls(client, ca_file)

    # A fresh session: EHLO needed again before AUTH and MAIL.
    assert client.command(f"AUTH PLAIN {TOKEN}") == "503 Error: send EHLO first"
    assert client.command(f"MAIL FROM:<{SENDER}>") == "503 Error: send HELO first"
    assert client.command("EHLO post-tls.client").startswith("250-relay.test")
    assert client.command(f"AUTH PLAIN {TOKEN}") == "235 2.7.0 Authentication successful"
    assert deliver(client, "fresh").startswith("250 2.0.0 Ok: queued as")
    [received] = tls_relay.upstream.messages
    assert b"Received: from post-tls.client " in received.content
    assert b"pre-tls.attacker" not in received.content
    assert b" with ESMTPSA id " in received.content


def test_second_starttls_inside_tls_is_refused_and_session_continues(
        tls_relay, raw_client, server_cert):
    client = raw_client(tls_relay.relay.port)
    assert client.command("EHLO raw.test").startswith("250")
    assert client.command("STARTTLS") == "220 Ready to start TLS"
    starttls(client, server_cert[2])
    assert "250-STARTTLS" not in client.command("EHLO raw.test").splitlines()
    reply = client.command("STARTTLS")
    assert reply[:1] in ("4", "5"), reply  # e.g. "503 5.5.1 Already running TLS"
    assert client.command("NOOP") == "250 OK"
    assert_relay_healthy(tls_relay.relay)


def test_abandoned_starttls_handshake_is_not_logged_as_an_internal_error(
        tls_relay, raw_client):
    client = raw_client(tls_relay.relay.port)
    assert client.command("EHLO raw.test").startswith("250")
    assert client.command("STARTTLS") == "220 Ready to start TLS"
    client.close()
    # A later, complete session: the abandoned one has been handled by then.
    other = raw_client(tls_relay.relay.port)
    assert other.command("EHLO raw.test").startswith("250")
    assert other.command("QUIT") == "221 Bye"
    deadline = time.monotonic() + 1
    while time.monotonic() < deadline and "Traceback" not in tls_relay.relay.stderr:
        time.sleep(0.05)
    assert_relay_healthy(tls_relay.relay)


# ---------------------------------------------------------------------------------------
# 4. Property-based: generated addresses and command sequences
# ---------------------------------------------------------------------------------------

ATOMS = ("@", "%", "!", '"', "\\", "<", ">", "[", "]", ":", ",", ".", "(", ")", " ",
         "evil", "example", "com", "org", "sub", "a", "127", "0x7f", "xn--", "-",
         "IPv6:", ".example.com", ".example.org", "@example.com", "@evil.com",
         "\uff20", "\uff0e", "\u3002", "\u0430", "\u00ad", "\r", "\t", "\x00")
# Any Unicode scalar value but LF (which would end the command line early).
ANY_CHAR = st.characters(codec="utf-8", exclude_characters="\n")
address_text = st.lists(st.one_of(st.sampled_from(ATOMS), st.sampled_from(ATOMS),
                                  ANY_CHAR), max_size=24).map("".join)
# Near-valid addresses too, so that the accepting paths get exercised, not only the
# refusals: atext-ish local parts with routing characters, domains from known labels.
clean_local = st.text(alphabet="abxyz019.-_+=", min_size=1, max_size=8)
local_text = st.one_of(
    clean_local,
    # A routing character between clean parts, bare or quoted: the classic tricks.
    st.tuples(clean_local, st.sampled_from("%!@"), clean_local).map("".join),
    st.tuples(clean_local, st.sampled_from("%!@\\ "), clean_local).map(
        lambda parts: '"' + "".join(parts) + '"'),
    st.text(alphabet="abxyz019.-_+=%!@\"\\ ()[]:,<>\u00e9\uff20", min_size=1,
            max_size=10),
)
domain_text = st.one_of(
    st.sampled_from(("example.com", "evil.com", "sub.example.org", "example.org",
                     "example.com.evil.com", "evil.com.example.com", "evilexample.org",
                     "[127.0.0.1]", "127.1", "0x7f.1", "EXAMPLE.COM.", "xn--exmple-4nf.com",
                     "ex\u0430mple.com", "\uff45xample.com", "exam\u00adple.com")),
    st.lists(st.sampled_from(("example", "evil", "com", "org", "sub", "xn--e", "127",
                              "0x7f", "1", "", "EXAMPLE", "\uff0e", "-")),
             min_size=1, max_size=5).map(".".join),
    address_text,
)
path_argument = st.one_of(
    st.tuples(local_text, domain_text).map(lambda parts: f"<{parts[0]}@{parts[1]}>"),
    st.tuples(local_text, domain_text).map(lambda parts: f"{parts[0]}@{parts[1]}"),
    address_text.map(lambda text: f"<{text}>"),
    address_text,
)


def test_property_generated_addresses_never_reach_upstream_outside_allowlist(shared):
    shared.upstream.handler.reset()
    port = shared.relay.port

    @settings(max_examples=150, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(sender=path_argument, smtputf8=st.booleans(), recipient=path_argument)
    def check(sender: str, smtputf8: bool, recipient: str) -> None:
        marks = upstream_marks(shared.upstream)
        client = RawClient(port, timeout=10)
        try:
            login(client)
            reply = client.command(b"MAIL FROM:" + sender.encode()
                                   + (b" SMTPUTF8" if smtputf8 else b""))
            check_reply(reply)
            if not reply.startswith("250"):
                assert client.command(f"MAIL FROM:<{SENDER}>") == "250 2.1.0 Sender OK"
            check_reply(client.command(b"RCPT TO:" + recipient.encode()))
            assert client.command("RSET") == "250 2.0.0 OK"  # still answering
        finally:
            client.close()
        assert_upstream_saw_only_allowed(shared.upstream, marks)

    check()
    assert_upstream_saw_only_allowed(shared.upstream)
    assert_relay_healthy(shared.relay)
    deliver_with_new_client(shared, "after-address-fuzz")


def _b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def _step(line: bytes, *followups: bytes) -> tuple[bytes, tuple[bytes, ...]]:
    """A command line, and what to send if it is answered 334 (AUTH) or 354 (DATA)."""
    return line, followups


body_text = st.lists(st.sampled_from([
    b"Subject: fuzz\r\n", b"\r\n", b"text", b" ", b".", b"..", b"\n", b"\r", b"\x00",
    b"\xc3\xa9", b"MAIL FROM:<x@evil.com>", b"RCPT TO:<y@evil.com>", b"DATA",
    b"\n.\n", b"\r.\r", b"\n.\r\n", b"Received: x\r\n",
]), max_size=12).map(b"".join)

COMMAND_STEPS = st.one_of(
    st.sampled_from([_step(b"EHLO fuzz.test"), _step(b"HELO fuzz.test"),
                     _step(b"RSET"), _step(b"NOOP"), _step(b"HELP"),
                     _step(b"VRFY <a@evil.com>"), _step(b"EXPN staff"),
                     _step(b"STARTTLS"), _step(b"AUTH CRAM-MD5"), _step(b"AUTH"),
                     _step(b"QUIT")]),
    address_text.map(lambda text: _step(b"EHLO " + text.encode())),
    path_argument.map(lambda path: _step(b"MAIL FROM:" + path.encode())),
    path_argument.map(lambda path: _step(b"RCPT TO:" + path.encode())),
    body_text.map(lambda body: _step(b"DATA", body)),
    st.binary(max_size=48).map(lambda data: _step(b"AUTH PLAIN " + _b64(data))),
    st.tuples(st.binary(max_size=24), st.binary(max_size=24)).map(
        lambda pair: _step(b"AUTH LOGIN", _b64(pair[0]), _b64(pair[1]))),
    st.binary(max_size=48).map(lambda data: _step(b"AUTH LOGIN " + _b64(data),
                                                  _b64(data))),
    st.binary(max_size=60).map(lambda data: _step(data.replace(b"\n", b""))),
    st.integers(min_value=513, max_value=5000).map(
        lambda size: _step(b"NOOP " + b"x" * size)),
    st.integers(min_value=450, max_value=3000).map(
        lambda size: _step(f"MAIL FROM:<{'a' * size}@example.com>".encode())),
)
# Whole transactions, so that sequences get past MAIL and RCPT to DATA often.
TRANSACTION = st.tuples(
    st.one_of(  # mostly a sender that passes, so the transaction goes on
        st.just(_step(f"MAIL FROM:<{SENDER}>".encode())),
        st.just(_step(b"MAIL FROM:<A@EXAMPLE.COM.> SMTPUTF8")),
        st.just(_step(b"MAIL FROM:<x@evil.com>")),
        path_argument.map(lambda path: _step(b"MAIL FROM:" + path.encode()))),
    st.lists(st.one_of(
        st.sampled_from((RECIPIENT, "a@sub.example.org", "x@evil.com", "y@example.org",
                         "z@evilexample.org")).map(
            lambda address: _step(f"RCPT TO:<{address}>".encode())),
        path_argument.map(lambda path: _step(b"RCPT TO:" + path.encode()))),
        min_size=1, max_size=3),
    body_text,
).map(lambda parts: [parts[0], *parts[1], _step(b"DATA", parts[2])])
step_sequences = st.lists(st.one_of(COMMAND_STEPS.map(lambda step: [step]), TRANSACTION),
                          max_size=6).map(lambda groups: [s for g in groups for s in g])


def dot_stuffed(body: bytes) -> bytes:
    stuffed = body.replace(b"\r\n.", b"\r\n..")
    return b"." + stuffed if stuffed.startswith(b".") else stuffed


def run_steps(client: RawClient, steps) -> bool:
    """Send each line, read exactly its reply; False once the relay (rightly) closed."""
    for line, followups in steps:
        client.send(line + b"\r\n")
        reply = client.reply()
        check_reply(reply)
        pending = list(followups)
        while reply[:3] in ("334", "354"):
            answer = pending.pop(0) if pending else b""
            if reply.startswith("354"):
                client.send(dot_stuffed(answer) + b"\r\n.\r\n")
            else:
                client.send((answer or b"*") + b"\r\n")
            reply = client.reply()
            check_reply(reply)
        if reply.startswith(CLOSING_REPLIES):
            assert client.closed(timeout=5), f"{reply!r} but the connection stays open"
            return False
    return True


def test_property_generated_command_sequences_never_break_or_bypass_policy(shared):
    shared.upstream.handler.reset()
    port = shared.relay.port
    valid_auth = [_step(b"EHLO fuzz.test"), _step(f"AUTH PLAIN {TOKEN}".encode())]

    @settings(max_examples=150, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(before=step_sequences, transaction=TRANSACTION, after=step_sequences)
    def check(before, transaction, after) -> None:
        marks = upstream_marks(shared.upstream)
        client = RawClient(port, timeout=10)  # a hang fails here, after 10 s
        try:
            if run_steps(client, before) and run_steps(client, valid_auth):
                run_steps(client, transaction + after)
        finally:
            client.close()
        assert shared.relay.process.poll() is None
        assert_upstream_saw_only_allowed(shared.upstream, marks)

    check()
    assert_upstream_saw_only_allowed(shared.upstream)
    assert_relay_healthy(shared.relay)
    deliver_with_new_client(shared, "after-command-fuzz")


# ---------------------------------------------------------------------------------------
# 5. Floods and resource abuse
# ---------------------------------------------------------------------------------------

def test_two_hundred_pipelined_noops_are_answered_in_order(rig, raw_client):
    client = raw_client(rig.relay.port)
    login(client)
    # 200 NOOPs with an RSET after every 50th: the RSET replies mark the order.
    lines, expected = [], []
    for number in range(1, 201):
        lines.append(b"NOOP")
        expected.append("250 OK")
        if number % 50 == 0:
            lines.append(b"RSET")
            expected.append("250 2.0.0 OK")
    client.send(b"\r\n".join(lines) + b"\r\n")
    assert [client.reply() for _ in expected] == expected
    assert deliver(client, "after-noops").startswith("250 2.0.0 Ok: queued as")
    assert subjects(rig.upstream) == [b"after-noops"]


def test_two_mib_lines_get_500_and_the_session_survives(rig, raw_client):
    two_mib = 2 * 1024 * 1024
    client = raw_client(rig.relay.port)
    login(client)
    # A command line: the relay answers once the line ends, and only then.
    client.send(b"X" * two_mib)
    client.send(b"\r\n")
    assert client.reply() == "500 Command line too long"
    assert client.command(b"MAIL FROM:<" + b"a" * two_mib + b"@example.com>") == \
        "500 Command line too long"
    assert client.command("NOOP") == "250 OK"
    # A data line.
    assert client.command(f"MAIL FROM:<{SENDER}>") == "250 2.1.0 Sender OK"
    assert client.command(f"RCPT TO:<{RECIPIENT}>") == "250 2.1.5 Recipient OK"
    assert client.command("DATA").startswith("354")
    assert client.command(message("huge", "y" * two_mib + "\r\n") + b".") == \
        "500 Line too long (see RFC5321 4.5.3.1.6)"
    assert rig.upstream.messages == []
    # The same session still delivers.
    assert deliver(client, "after-2mib").startswith("250 2.0.0 Ok: queued as")
    assert subjects(rig.upstream) == [b"after-2mib"]
    assert [address for address, _ in rig.upstream.handler.mail_commands] == [
        SENDER, SENDER]


IDLE_TIMEOUT_REPLY = b"421 4.4.2 Idle timeout, closing connection\r\n"
AUTH_TIMEOUT_REPLY = b"421 4.7.0 No AUTH within 2 s of connecting, closing connection\r\n"


def read_to_eof(sock: socket.socket, timeout: float) -> bytes:
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def open_served(port: int, *, deadline: float = 10.0) -> socket.socket:
    """A connection the relay has accepted and greeted. (A connection closed just
    before may hold its slot for a few event-loop turns: retry on 421 until then.)"""
    give_up = time.monotonic() + deadline
    while True:
        sock = socket.create_connection(("127.0.0.1", port), timeout=15)
        banner = b""
        while not banner.endswith(b"\r\n"):
            chunk = sock.recv(1)
            assert chunk, f"closed after {banner!r}"
            banner += chunk
        if banner.startswith(b"220 relay.test"):
            return sock
        sock.close()
        assert time.monotonic() < give_up, banner
        time.sleep(0.05)


def test_abandoned_half_open_connections_are_reclaimed_at_timeout(start_relay,
                                                                  upstream):
    relay = start_relay(upstream, MAX_CONNECTIONS="20", TIMEOUT="2")
    abandoned = []
    for index in range(20):
        sock = open_served(relay.port)
        kind = index % 4
        if kind == 1:  # a command whose reply is never read
            sock.sendall(b"EHLO half.open\r\n")
        elif kind == 2:  # half a command line
            sock.sendall(b"MAIL FROM:<app@exa")
        elif kind == 3:  # logged in, transaction open upstream, stopped inside DATA
            sock.sendall(f"EHLO half.open\r\nAUTH PLAIN {TOKEN}\r\nMAIL FROM:<{SENDER}>"
                         f"\r\nRCPT TO:<{RECIPIENT}>\r\nDATA\r\n".encode()
                         + message("half")[:20])
        abandoned.append((kind, sock))  # kind 0: silent after the banner

    extra = socket.create_connection(("127.0.0.1", relay.port), timeout=15)
    assert read_to_eof(extra, 15) == (b"421 4.7.0 Too many connections, try again "
                                      b"later\r\n")
    extra.close()

    for kind, sock in abandoned:
        received = read_to_eof(sock, 20)
        # Kinds 0-2 never authenticated: cut off TIMEOUT after the greeting, which for
        # an idle client is the idle timeout, or just before it.
        assert received.endswith(IDLE_TIMEOUT_REPLY) or (
            kind != 3 and received.endswith(AUTH_TIMEOUT_REPLY)), (kind, received)
        assert received.count(b"421 ") == 1, (kind, received)
        if kind == 3:
            assert b"\r\n354 " in received, received
        sock.close()
    # The slots are free (connection_lost runs before the socket closes).
    client = RawClient(relay.port, timeout=15)
    assert client.banner.startswith("220 relay.test"), client.banner
    login(client)
    assert deliver(client, "after-half-open").startswith("250 2.0.0 Ok: queued as")
    client.close()
    assert subjects(upstream) == [b"after-half-open"]
    # The five abandoned transactions were reset upstream, none delivered.
    deadline = time.monotonic() + 10
    while upstream.handler.rset_count < 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert upstream.handler.rset_count >= 5
    assert [m.rcpt_tos for m in upstream.messages] == [[RECIPIENT]]


def flood_without_reading(sock: socket.socket, line: bytes, *,
                          total_lines: int | None = None, stall: float = 0.5) -> int:
    """Send `line` over and over without ever reading the replies: `total_lines` of
    them, or (None) without end; either way stop early once the relay has taken
    nothing for `stall` seconds (it stopped reading). Returns the bytes sent."""
    payload = memoryview(line * (total_lines if total_lines is not None else 2000))
    sock.setblocking(False)
    sent, offset, last_progress = 0, 0, time.monotonic()
    try:
        while total_lines is None or offset < len(payload):
            try:
                count = sock.send(payload[offset:])
            except BlockingIOError:
                if time.monotonic() - last_progress > stall:
                    break
                time.sleep(0.005)
                continue
            sent, offset, last_progress = sent + count, offset + count, time.monotonic()
            if total_lines is None and offset == len(payload):
                offset = 0
    finally:
        sock.setblocking(True)
    return sent


def test_client_that_never_reads_does_not_block_other_clients(rig):
    noop = b"NOOP\r\n"
    flooder = socket.socket()
    flooder.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fills up fast
    flooder.connect(("127.0.0.1", rig.relay.port))
    try:
        result: list[int] = []
        flooding = threading.Thread(
            target=lambda: result.append(flood_without_reading(
                flooder, noop, total_lines=100_000, stall=2.0)), daemon=True)
        flooding.start()
        # Meanwhile, with the flooder's replies piling up unread, another client
        # delivers.
        deliver_with_new_client(rig, "while-flooded")
        flooding.join(60)
        assert result, "the flooding thread did not finish"
        # Complete a line the flood may have cut in half, then read at last: every
        # NOOP was answered, in order, nothing lost or added.
        sent = result[0]
        rest = -sent % len(noop)
        flooder.sendall(noop[len(noop) - rest:])
        noops = (sent + rest) // len(noop)
        assert noops >= 1000, f"only {noops} NOOPs went out"
        flooder.settimeout(30)
        expected = b"220 relay.test ESMTP smtp-relay\r\n" + b"250 OK\r\n" * noops
        received = b""
        while len(received) < len(expected):
            chunk = flooder.recv(1 << 20)
            assert chunk, f"closed after {len(received)} bytes"
            received += chunk
        assert received == expected
        flooder.sendall(b"RSET\r\n")
        assert flooder.recv(100) == b"250 2.0.0 OK\r\n"
    finally:
        flooder.close()
    assert subjects(rig.upstream) == [b"while-flooded"]
    assert_relay_healthy(rig.relay)


def test_client_that_never_reads_loses_its_slot_at_idle_timeout(start_relay, upstream):
    relay = start_relay(upstream, MAX_CONNECTIONS="1", TIMEOUT="2")
    flooder = open_served(relay.port)
    try:
        # Logged in: the idle rule applies, not the deadline for unauthenticated ones.
        flooder.sendall(f"EHLO flood.test\r\nAUTH PLAIN {TOKEN}\r\n".encode())
        replies = b""
        while b"\r\n235 " not in replies:
            chunk = flooder.recv(4096)
            assert chunk, replies
            replies += chunk
        # EHLO's reply is ~15 times its line: the relay's send buffer fills at once.
        assert flood_without_reading(flooder, b"EHLO flood.test\r\n") > 0
        relay.wait_for_log("idle-timeout", timeout=20)
        deadline = time.monotonic() + 3
        banner = b""
        while time.monotonic() < deadline:
            with socket.create_connection(("127.0.0.1", relay.port), timeout=5) as probe:
                banner = probe.recv(200)
            if banner.startswith(b"220"):
                break
            time.sleep(0.1)
        assert banner.startswith(b"220 relay.test"), banner
    finally:
        flooder.close()
