"""relay/bounce.py: the bounces (RFC 3464 delivery status notifications) the queue sends.

Every test parses the produced bytes with the standard library's parser, as a mail
client would, and checks what the RFCs require of the bytes themselves: CRLF lines of at
most 998 octets, the multipart/report structure, one delivery-status block per failed
recipient, and that nothing from the inputs (addresses, upstream replies, the
original's headers) ever becomes a header line of its own.
"""

from __future__ import annotations

import email
import email.policy
import email.utils
import re
from email.message import EmailMessage, Message
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.bounce import (
    MAX_ORIGINAL_HEADERS,
    FailedRecipient,
    bounce_wanted,
    build_dsn,
    is_bounce,
)

pytestmark = pytest.mark.timeout(60)

ARRIVAL = 1_700_000_000.0
FIVE_DAYS = 5 * 86400.0
ORIGINAL = (b"From: Alice <alice@example.com>\r\nTo: bob@example.org\r\n"
            b"Subject: quarterly figures\r\n  (folded)\r\n\r\nSECRET BODY LINE\r\n")
# The bounce's own header fields: any other name means an input injected one.
HEADERS = {"From", "To", "Subject", "Date", "Message-ID", "MIME-Version",
           "Auto-Submitted", "Content-Type"}
RECIPIENT_FIELDS = {"Final-Recipient", "Action", "Status", "Diagnostic-Code"}


def dsn(**overrides: Any) -> bytes:
    arguments: dict[str, Any] = {
        "reporting_mta": "relay.example.com", "message_id": "0123456789abcdef",
        "original_sender": "alice@example.com", "original": ORIGINAL,
        "recipients": [FailedRecipient("bob@example.org", "550 5.1.1 no such user")],
        "arrival": ARRIVAL, "now": ARRIVAL + FIVE_DAYS, "to": "alice@example.com"}
    arguments.update(overrides)
    return build_dsn(**arguments)


def parse(raw: bytes) -> EmailMessage:
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def parts(raw: bytes) -> list[EmailMessage]:
    return list(parse(raw).iter_parts())  # type: ignore[arg-type]


def status_blocks(raw: bytes) -> list[Message]:
    """The delivery-status part's blocks: the per-message one, then one per recipient."""
    blocks = parts(raw)[1].get_payload()
    assert isinstance(blocks, list)
    return blocks


def assert_well_formed(raw: bytes, recipients: int = 1) -> None:
    assert re.search(rb"\r(?!\n)|(?<!\r)\n", raw) is None, "a line not ended by CRLF"
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998
    report = parse(raw)
    assert set(report.keys()) == HEADERS
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    assert [part.get_content_type() for part in parts(raw)] == [
        "text/plain", "message/delivery-status", "text/rfc822-headers"]
    assert not report.defects and not any(part.defects for part in parts(raw))
    blocks = status_blocks(raw)
    assert len(blocks) == 1 + recipients
    assert set(blocks[0].keys()) == {"Reporting-MTA", "Arrival-Date"}
    for block in blocks[1:]:
        assert set(block.keys()) <= RECIPIENT_FIELDS
        assert block["Action"] == "failed"
    # Everything below the header is 7-bit: no transport needs 8BITMIME for a bounce.
    assert raw.split(b"\r\n\r\n", 1)[1].isascii()


def test_report_structure_and_fields() -> None:
    raw = dsn(recipients=[
        FailedRecipient("bob@example.org", "550 5.1.1 no such user"),
        FailedRecipient("carol@example.org", "expired: 451 4.4.1 connection refused",
                        expired=True)])
    assert_well_formed(raw, recipients=2)
    report = parse(raw)
    assert report["From"] == "MAILER-DAEMON@relay.example.com"
    assert report["To"] == "alice@example.com"
    assert report["Subject"] == "Undelivered Mail Returned to Sender"
    assert report["Auto-Submitted"] == "auto-replied"
    assert report["MIME-Version"] == "1.0"
    assert report["Date"].datetime.timestamp() == ARRIVAL + FIVE_DAYS
    assert report["Message-ID"].endswith("@relay.example.com>")
    assert "0123456789abcdef" in report["Message-ID"]

    per_message, bob, carol = status_blocks(raw)
    assert per_message["Reporting-MTA"] == "dns; relay.example.com"
    assert email.utils.parsedate_to_datetime(per_message["Arrival-Date"]).timestamp() \
        == ARRIVAL
    assert dict(bob.items()) == {"Final-Recipient": "rfc822; bob@example.org",
                                 "Action": "failed", "Status": "5.1.1",
                                 "Diagnostic-Code": "smtp; 550 5.1.1 no such user"}
    assert dict(carol.items()) == {
        "Final-Recipient": "rfc822; carol@example.org", "Action": "failed",
        "Status": "4.4.7",
        "Diagnostic-Code": "smtp; expired: 451 4.4.1 connection refused"}


def test_text_part_names_each_recipient_and_why() -> None:
    raw = dsn(recipients=[
        FailedRecipient("bob@example.org", "550 5.1.1 no such user"),
        FailedRecipient("carol@example.org", "expired: 451 4.4.1 connection refused",
                        expired=True)])
    text = parts(raw)[0].get_content()
    bob, carol = text.split("<bob@example.org>")[1].split("<carol@example.org>")
    assert "refused" in bob and "550 5.1.1 no such user" in bob
    assert "gave up after retrying for 5 days" in carol
    assert "451 4.4.1 connection refused" in carol
    assert "0123456789abcdef" in text and "<alice@example.com>" in text


@pytest.mark.parametrize(("reply", "expired", "status"), [
    ("550 5.1.1 no such user", False, "5.1.1"),
    ("554-5.7.1 first line of a multi-line reply", False, "5.7.1"),
    ("550 no such user", False, "5.0.0"),  # no enhanced code
    ("550 4.1.1 class differs from the code", False, "5.0.0"),  # not a valid one
    ("550 5.1.1.1 too many parts", False, "5.0.0"),
    ("expired: 451 4.4.1 connection refused", True, "4.4.7"),  # the relay's text
    ("connection timed out", True, "4.4.7"),
    ("451 4.4.1 connection refused", True, "4.4.1"),  # the reply's own code comes first
])
def test_status_codes(reply: str, expired: bool, status: str) -> None:
    raw = dsn(recipients=[FailedRecipient("bob@example.org", reply, expired=expired)])
    assert status_blocks(raw)[1]["Status"] == status


def test_only_the_header_section_is_attached() -> None:
    raw = dsn()
    assert b"SECRET BODY LINE" not in raw
    assert parts(raw)[2].get_content().splitlines() == [
        "From: Alice <alice@example.com>", "To: bob@example.org",
        "Subject: quarterly figures", "  (folded)"]


@pytest.mark.parametrize("original", [
    b"Subject: bare LF\nFrom: a@example.com\n\nSECRET BODY LINE\n",
    b"Subject: bare CR\rFrom: a@example.com\r\rSECRET BODY LINE\r",
    b"SECRET BODY LINE without any header\r\nSubject: x\r\n",
    b"",
])
def test_the_body_never_leaks_whatever_the_line_endings(original: bytes) -> None:
    raw = dsn(original=original)
    assert_well_formed(raw)
    assert b"SECRET BODY LINE" not in raw


def test_original_headers_are_capped_at_whole_lines() -> None:
    filler = b"".join(b"X-Filler-%05d: %s\r\n" % (n, b"f" * 60) for n in range(3000))
    raw = dsn(original=b"Subject: big\r\n" + filler + b"\r\nSECRET BODY LINE\r\n")
    assert_well_formed(raw)
    lines = parts(raw)[2].get_content().splitlines()
    assert sum(len(line) + 2 for line in lines) <= MAX_ORIGINAL_HEADERS
    assert lines[0] == "Subject: big"
    assert all(re.fullmatch(r"X-Filler-\d{5}: f{60}", line) for line in lines[1:])


# Each payload tries to end the line it lands in and start a header (or a delivery-status
# field) of its own, with every character some reader takes for a line break.
INJECTIONS = [f"x{brk}Bcc: evil@example.net{brk}Action: delivered"
              for brk in ("\r\n", "\n", "\r", "\u2028", "\x85", "\x0b", "\x0c", "\x1e")]


@pytest.mark.parametrize("payload", INJECTIONS)
@pytest.mark.parametrize("field", ["to", "address", "reply", "original_sender",
                                   "reporting_mta", "message_id"])
def test_header_injection(field: str, payload: str) -> None:
    recipient = FailedRecipient("bob@example.org", "550 5.1.1 no such user")
    if field in ("address", "reply"):
        setattr(recipient, field, payload)
        raw = dsn(recipients=[recipient])
    else:
        raw = dsn(**{field: payload})
    assert_well_formed(raw)  # the header names and the delivery-status fields are fixed
    assert not re.search(rb"^(Bcc|Action: delivered)", raw, re.MULTILINE)


def test_utf8_addresses_and_headers() -> None:
    """An SMTPUTF8 sender: raw UTF-8 only in the To: line (it can be written no other
    way); the delivery-status part uses RFC 6533's 7-bit form; stray 8-bit bytes in the
    original's headers do not break anything."""
    original = ("From: Jörg <jörg@bücher.example>\r\nSubject: Grüße\r\n".encode()
                + b"X-Latin1: caf\xe9\r\n\r\nSECRET BODY LINE\r\n")
    raw = dsn(to="jörg@bücher.example", original_sender="jörg@bücher.example",
              original=original,
              recipients=[FailedRecipient("müller@exämple.org", "550 5.1.1 kein Müller")])
    assert_well_formed(raw)
    assert "To: jörg@bücher.example\r\n".encode() in raw
    assert parse(raw)["To"] == "jörg@bücher.example"
    block = status_blocks(raw)[1]
    assert block["Final-Recipient"] == "utf-8; m\\x{FC}ller@ex\\x{E4}mple.org"
    assert block["Diagnostic-Code"] == "smtp; 550 5.1.1 kein M\\x{FC}ller"
    text, _, headers = parts(raw)
    assert "<müller@exämple.org>" in text.get_content()
    assert "Subject: Grüße" in headers.get_content()
    assert "X-Latin1: caf\ufffd" in headers.get_content()
    assert is_bounce(raw)


def test_long_replies_and_addresses_are_folded() -> None:
    words = " ".join(f"word{n}" for n in range(400))
    long_address = "x" * 1500 + "@example.org"
    raw = dsn(to=long_address, recipients=[
        FailedRecipient("bob@example.org", f"550 5.7.1 {words}"),
        FailedRecipient(long_address, "550 " + "y" * 3000)])
    assert_well_formed(raw, recipients=2)
    # Folded at the spaces: unfolding gives the reply back word for word.
    assert status_blocks(raw)[1]["Diagnostic-Code"] == f"smtp; 550 5.7.1 {words}"


# Found by the property test below: each of these made the standard library's address
# parser raise (or, without SMTPUTF8, fold an encoded word to the start of a line) when
# the bounce's From/To went through it.
@pytest.mark.parametrize("text", ["[", "\u00a5g\u8851 \u00a7@", ":BF ;\u00c3",
                                  "T\u00bc\u00c4 `\u00caF \u00b2\\,\"",
                                  ". \u00b79:x", "A,L\ubb7aao:\xec\xb3)mu \xef\xb2 \xa9"])
def test_addresses_the_stdlib_address_parser_chokes_on(text: str) -> None:
    assert_well_formed(dsn(to=text, reporting_mta=text))


# Text that mixes the dangerous characters with anything at all, lone surrogates
# (undecodable bytes kept by surrogateescape) included.
ANY_TEXT = st.text(st.one_of(st.sampled_from(["\r", "\n", "\u2028", " ", ":", "\x00", "é"]),
                             st.characters(exclude_categories=[])), max_size=60)


@settings(max_examples=150, deadline=None, database=None)
@given(to=ANY_TEXT, sender=ANY_TEXT, host=ANY_TEXT,
       recipients=st.lists(st.tuples(ANY_TEXT, ANY_TEXT, st.booleans()),
                           min_size=1, max_size=3),
       original=st.binary(max_size=300))
def test_any_input_gives_a_well_formed_bounce(to: str, sender: str, host: str,
                                              recipients: list[tuple[str, str, bool]],
                                              original: bytes) -> None:
    raw = dsn(to=to, original_sender=sender, reporting_mta=host, original=original,
              recipients=[FailedRecipient(*recipient) for recipient in recipients])
    assert_well_formed(raw, recipients=len(recipients))
    assert is_bounce(raw)


def test_at_least_one_recipient() -> None:
    with pytest.raises(ValueError):
        dsn(recipients=[])


@pytest.mark.parametrize(("sender", "bounce_to", "expected"), [
    ("alice@example.com", "sender", "alice@example.com"),
    ("alice@example.com", "Sender", "alice@example.com"),
    ("alice@example.com", "postmaster@example.com", "postmaster@example.com"),
    ("alice@example.com", "none", None),
    ("alice@example.com", "NONE", None),
    ("alice@example.com", "", None),
    ("", "sender", None),  # the null sender: never bounce a bounce
    ("", "postmaster@example.com", None),
    ("<>", "sender", None),
])
def test_bounce_wanted(sender: str, bounce_to: str, expected: str | None) -> None:
    assert bounce_wanted(sender, bounce_to) == expected


@pytest.mark.parametrize(("original", "expected"), [
    (ORIGINAL, False),
    (b"Auto-Submitted: no\r\nSubject: x\r\n\r\nbody\r\n", False),
    (b"Auto-Submitted: No (a person wrote this)\r\n\r\n", False),
    (b"Auto-Submitted: auto-generated\r\n\r\n", True),
    (b"Auto-Submitted: auto-replied; owner-email=\"a@example.com\"\r\n\r\n", True),
    (b"Content-Type: multipart/report; report-type=delivery-status; boundary=b\r\n\r\n",
     True),
    (b"Content-Type: Multipart/Report; report-type=\"global-delivery-status\"\r\n\r\n",
     True),
    (b"Content-Type: multipart/report; report-type=disposition-notification\r\n\r\n",
     False),
    # Only the header section counts: a message quoting a bounce is no bounce.
    (b"Subject: fwd\r\n\r\nAuto-Submitted: auto-replied\r\n", False),
    (b"\x00\xff\xfe garbage", False),
    (b"", False),
])
def test_is_bounce(original: bytes, expected: bool) -> None:
    assert is_bounce(original) is expected


def test_is_bounce_on_its_own_output() -> None:
    assert is_bounce(dsn())
