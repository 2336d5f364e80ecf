"""Bounces: the RFC 3464 delivery status notification for a message the queue gave up on.

Pure functions for the delivery workers. `build_dsn` makes the bounce's bytes;
`bounce_wanted` (from the envelope) and `is_bounce` (from the message) decide whether a
bounce is sent at all and where to.

The MIME structure is the standard library's email package, written with CRLF line
endings. Everything taken from the inputs (addresses, upstream replies, the reporting
host, the original's headers) is flattened to one line before it goes into a header or
a delivery-status field, so it can never start a line of its own there; the original's
headers travel only inside the text/rfc822-headers part, whose MIME boundary the
generator chooses so that it does not occur in them.
"""

from __future__ import annotations

import dataclasses
import datetime
import email.policy
import email.utils
import re
import textwrap
from email.message import MIMEPart
from email.parser import BytesHeaderParser
from email.policy import EmailPolicy
from typing import Any, Self

# The original's header section is attached up to this size: enough for any real
# header, and a bounce never grows with a hostile one.
MAX_ORIGINAL_HEADERS = 64 * 1024

SUBJECT = "Undelivered Mail Returned to Sender"

# RFC 5322: lines SHOULD stay within 78 characters and MUST within 998 octets.
_LINE = 78
# A run without spaces longer than this is cut into pieces so that no line passes 998
# octets. Nothing valid is that long (RFC 5321 caps a path at 256 octets, a reply line
# at 512), so only garbage is cut.
_WORD = 900


@dataclasses.dataclass
class FailedRecipient:
    address: str
    reply: str  # the upstream's last reply, e.g. "550 5.1.1 no such user", or
    # "expired: 451 4.4.1 connection refused" style text from the relay
    expired: bool = False  # gave up after QUEUE_MAX_AGE (Status 4.4.7) vs a 5xx


def build_dsn(*, reporting_mta: str, message_id: str, original_sender: str,
              recipients: list[FailedRecipient], original: bytes, arrival: float,
              now: float, to: str) -> bytes:
    """The bounce as RFC 5322 bytes (CRLF): From: MAILER-DAEMON@reporting_mta, To: to,
    multipart/report; report-type=delivery-status with (1) a text part naming each
    failed recipient and its reply, (2) message/delivery-status (Reporting-MTA,
    Arrival-Date, and per recipient Final-Recipient, Action: failed, Status,
    Diagnostic-Code), (3) text/rfc822-headers with the original's header section
    (never its body).

    `message_id` is the relay's id of the original message (the queue id); the bounce
    gets a Message-ID of its own. Status is the RFC 3463 code at the start of the reply
    (right after the basic code, as in "550 5.1.1 ..."), else 4.4.7 for an expired
    recipient and 5.0.0 for a refused one.

    The result is 7-bit except for the To: line when `to` is an internationalised
    address (then it is UTF-8 as RFC 6532 has it, and must be sent with SMTPUTF8).
    """
    if not recipients:
        raise ValueError("a delivery status notification needs a failed recipient")
    host = _domain(reporting_mta)
    to_text = _header_text(to)
    # SMTPUTF8 only where a header needs raw UTF-8 (an internationalised address has no
    # 7-bit form in a header). refold_source="none": the delivery-status fields are
    # folded here already (_fold) and must go out as they are; the generator would
    # otherwise refold long ones as free text.
    base = email.policy.SMTP if to_text.isascii() else email.policy.SMTPUTF8
    policy = base.clone(refold_source="none")

    # MIMEPart rather than EmailMessage throughout: set_content() on an EmailMessage
    # adds a MIME-Version to every part; the report sets its own once.
    report = MIMEPart(policy=policy)
    report["From"] = _Verbatim("From", f"MAILER-DAEMON@{host}")
    report["To"] = _Verbatim("To", to_text)
    report["Subject"] = SUBJECT
    report["Date"] = _date(now)
    report["Message-ID"] = email.utils.make_msgid(idstring=_atom(message_id) or None,
                                                  domain=host)
    report["MIME-Version"] = "1.0"
    # RFC 3834: a bounce is an automatic reply; is_bounce() and other MTAs see this.
    report["Auto-Submitted"] = "auto-replied"
    report["Content-Type"] = "multipart/report; report-type=delivery-status"
    report.attach(_notification(policy, host, message_id, original_sender, recipients,
                                arrival, now))
    report.attach(_delivery_status(policy, host, recipients, arrival))
    report.attach(_original_headers(policy, original))
    return report.as_bytes()


def bounce_wanted(sender: str, bounce_to: str) -> str | None:
    """Where a bounce goes: None for the null sender "" (bounces and other automatic
    mail are sent from it, RFC 5321 4.5.5: we never bounce a bounce) or BOUNCE_TO=none;
    the envelope sender for BOUNCE_TO=sender; else the BOUNCE_TO address.

    A message that is a bounce although its sender is not null is recognised from its
    content: callers check is_bounce(body) as well.
    """
    if sender.strip() in ("", "<>"):
        return None
    choice = bounce_to.strip()
    if choice.lower() in ("", "none"):  # an empty BOUNCE_TO names no address either
        return None
    if choice.lower() == "sender":
        return sender
    return choice


def is_bounce(original: bytes) -> bool:
    """Whether the message is itself a bounce or other automatic mail, which is never
    answered with a bounce: a multipart/report of delivery status (RFC 3464, or RFC
    6533's global form), or an Auto-Submitted field other than "no" (RFC 3834 5.2).
    Only the header section is read."""
    headers = BytesHeaderParser().parsebytes(b"\r\n".join(_header_section(original)))
    # collapse: an RFC 2231 parameter comes back as a tuple.
    report_type = email.utils.collapse_rfc2231_value(headers.get_param("report-type", ""))
    if (headers.get_content_type() == "multipart/report"
            and report_type.lower() in ("delivery-status", "global-delivery-status")):
        return True
    for value in headers.get_all("Auto-Submitted", []):
        # "auto-replied; owner-email=..." or "no (a comment)": the keyword decides.
        keyword = re.sub(r"\([^)]*\)", " ", str(value)).split(";")[0].strip().lower()
        if keyword != "no":
            return True
    return False


# --- the three parts ---------------------------------------------------------------------

def _notification(policy: EmailPolicy[Any], host: str, message_id: str,
                  original_sender: str, recipients: list[FailedRecipient],
                  arrival: float, now: float) -> MIMEPart:
    """The human-readable part: who did not get the message, and why."""
    sender = _one_line(original_sender)
    paragraphs = [
        f"This is the mail relay at {host}.",
        _wrap(f"Your message from <{sender}>, received {_date(arrival)} (queue id "
              f"{_one_line(message_id)}), could not be delivered to the recipients "
              "below. The relay will not try again.", ""),
    ]
    for recipient in recipients:
        if recipient.expired:
            why = (f"The relay gave up after retrying for {_duration(now - arrival)}. "
                   "The last reply was:")
        else:
            why = "The receiving server refused the message. Its reply was:"
        paragraphs.append("\n".join([_wrap(f"<{_one_line(recipient.address)}>", ""),
                                     _wrap(why, "    "),
                                     _wrap(_one_line(recipient.reply), "    ")]))
    paragraphs.append("The delivery report and the headers of your message are "
                      "attached.")
    text = "\n\n".join(paragraphs) + "\n"

    part = MIMEPart(policy=policy)
    # Quoted-printable keeps a UTF-8 address readable and the part 7-bit.
    part.set_content(text, charset="us-ascii" if text.isascii() else "utf-8",
                     cte="7bit" if text.isascii() else "quoted-printable")
    part["Content-Description"] = "Notification"
    return part


def _delivery_status(policy: EmailPolicy[Any], host: str,
                     recipients: list[FailedRecipient], arrival: float) -> MIMEPart:
    """message/delivery-status: a per-message block, then one block per recipient.
    Each block is a part under the compat32 policy, so its values stay the plain,
    already folded ASCII strings given here, which the generator writes unchanged."""
    per_message = MIMEPart(policy=email.policy.compat32)
    per_message["Reporting-MTA"] = f"dns; {host}"
    per_message["Arrival-Date"] = _date(arrival)
    part = MIMEPart(policy=policy)
    part["Content-Type"] = "message/delivery-status"
    part["Content-Description"] = "Delivery report"
    part.attach(per_message)
    for recipient in recipients:
        block = MIMEPart(policy=email.policy.compat32)
        block["Final-Recipient"] = _fold("Final-Recipient",
                                         _final_recipient(recipient.address))
        block["Action"] = "failed"
        block["Status"] = _status(recipient)
        reply = _ascii(_one_line(recipient.reply))
        if reply:
            block["Diagnostic-Code"] = _fold("Diagnostic-Code", "smtp; " + reply)
        part.attach(block)
    return part


def _original_headers(policy: EmailPolicy[Any], original: bytes) -> MIMEPart:
    """text/rfc822-headers: the original's header section, CRLF lines. 7-bit when it
    is printable ASCII in lines the limit allows, else quoted-printable UTF-8 (an
    SMTPUTF8 message's headers, stray 8-bit bytes, over-long lines)."""
    lines = _header_section(original)
    seven_bit = all(len(line) <= 998 and re.fullmatch(rb"[\t -~]*", line) for line in lines)
    text = b"\n".join(lines).decode("utf-8", errors="replace")
    part = MIMEPart(policy=policy)
    part.set_content(text, subtype="rfc822-headers",
                     charset="us-ascii" if text.isascii() else "utf-8",
                     cte="7bit" if seven_bit else "quoted-printable")
    part["Content-Description"] = "Undelivered message headers"
    return part


# --- fields and text ---------------------------------------------------------------------

# CR, LF, every other C0 and C1 control, and what str.splitlines() also breaks at (VT,
# FF, FS, GS, RS, NEL, U+2028, U+2029): the email package splits header values with
# splitlines(), so any of these would otherwise start a new header line.
_LINE_BREAKING = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]+")


def _one_line(text: str) -> str:
    """Single-line text: line breaks and controls become a space (a multi-line reply
    stays readable as one line). A lone surrogate (bytes that were not UTF-8, decoded
    with surrogateescape) becomes U+FFFD: it could not be encoded at all."""
    return _SURROGATE.sub("\ufffd", _LINE_BREAKING.sub(" ", text)).strip()


_SURROGATE = re.compile("[\ud800-\udfff]")


def _header_text(text: str) -> str:
    """A value for the bounce's own header: one line of at most _WORD octets, so that
    its line stays within 998 (an address that long cannot be delivered to anyway)."""
    return _one_line(text).encode()[:_WORD].decode(errors="ignore")


class _Verbatim(str):
    """A header value the email package writes out exactly as given.

    Its address parser is not made for hostile text: on some strings it raises, and
    without SMTPUTF8 it can fold an encoded word to the start of a line of its own.
    The addresses written with this are one line already (_header_text). The policy's
    documented protocol: a value with a `name` is a header object and folds itself."""

    name: str

    def __new__(cls, name: str, value: str) -> Self:
        header = super().__new__(cls, value)
        header.name = name
        return header

    def fold(self, *, policy: EmailPolicy[Any]) -> str:
        return f"{self.name}: {self}{policy.linesep}"


def _domain(host: str) -> str:
    """The reporting host as an ASCII domain (IDNA for an internationalised one) of
    letters, digits, dots and hyphens: it goes into From, Message-ID and Reporting-MTA,
    which want a plain domain."""
    host = _one_line(host)
    try:
        host = host.encode("idna").decode("ascii")
    except UnicodeError:
        pass  # not a valid IDNA name: what is left of it below is
    return re.sub(r"[^A-Za-z0-9.-]+", "-", host)[:253].strip(".-") or "localhost"


def _atom(text: str) -> str:
    """Only what a Message-ID may carry unquoted (letters, digits, dot, hyphen)."""
    return re.sub(r"[^A-Za-z0-9.-]+", "-", text)[:64].strip(".-")


def _ascii(text: str) -> str:
    """Non-ASCII as RFC 6533's \\x{HEX}: message/delivery-status is 7-bit."""
    return "".join(ch if ch.isascii() else f"\\x{{{ord(ch):02X}}}" for ch in text)


def _final_recipient(address: str) -> str:
    """Final-Recipient's value: "rfc822; address", or for an internationalised
    address RFC 6533's "utf-8; " type with its 7-bit xtext form, where everything but
    printable ASCII other than "\\", "+" and "=" is written \\x{HEX}."""
    address = _one_line(address)
    if address.isascii():
        return f"rfc822; {address}"
    return "utf-8; " + "".join(
        ch if "!" <= ch <= "~" and ch not in "\\+=" else f"\\x{{{ord(ch):02X}}}"
        for ch in address)


def _fold(name: str, value: str) -> str:
    """`value` (ASCII) folded at spaces so that "name: value" lines stay within 78
    characters where the words allow; runs longer than _WORD are cut."""
    words = [word[start:start + _WORD] for word in value.split()
             for start in range(0, len(word), _WORD)]
    lines: list[str] = []
    for word in words:
        room = _LINE - (len(name) + 2 if len(lines) == 1 else 1)
        if lines and len(lines[-1]) + 1 + len(word) <= room:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return "\n ".join(lines)  # the generator writes each "\n" as CRLF


# "550 5.1.1 ..." or "550-5.1.1 ...": RFC 3463's class.subject.detail right after the
# basic code, in the same class as the code (RFC 2034).
_ENHANCED = re.compile(r"([245])\d\d[ -](\1\.\d{1,3}\.\d{1,3})(?!\S)")


def _status(recipient: FailedRecipient) -> str:
    found = _ENHANCED.match(_one_line(recipient.reply))
    if found:
        return found[2]
    # 4.4.7: delivery time expired; 5.0.0: permanent failure, no detail given.
    return "4.4.7" if recipient.expired else "5.0.0"


def _date(moment: float) -> str:
    """RFC 5322 date-time, in UTC."""
    return email.utils.format_datetime(
        datetime.datetime.fromtimestamp(moment, datetime.UTC))


def _duration(seconds: float) -> str:
    """Roughly how long, for people: "5 days", "3 hours", "40 minutes"."""
    unit, size = next(((unit, size) for unit, size in _UNITS if seconds >= size),
                      ("second", 1))
    count = max(round(seconds / size), 0)
    return f"{count} {unit}{'' if count == 1 else 's'}"


_UNITS = (("day", 86400), ("hour", 3600), ("minute", 60))


def _wrap(text: str, indent: str) -> str:
    # break_long_words: a long address or reply token still gets short lines.
    return textwrap.fill(text, width=76, initial_indent=indent, subsequent_indent=indent,
                         break_long_words=True, break_on_hyphens=False)


def _header_section(original: bytes) -> list[bytes]:
    """The original's header lines, without line endings: up to the first blank line,
    or the first line that is no header field (a message without headers must not
    leak its body), whole lines only, at most MAX_ORIGINAL_HEADERS octets as CRLF
    lines. A CR or LF alone ends a line too."""
    window = original[:MAX_ORIGINAL_HEADERS]
    kept: list[bytes] = []
    size = 0
    for line in window.splitlines(keepends=True):
        content = line.rstrip(b"\r\n")
        if not _FIELD_OR_CONTINUATION.match(content):
            break  # the blank line, or the body
        if content == line and len(original) > len(window):
            break  # the window cut this line short
        size += len(content) + 2
        if size > MAX_ORIGINAL_HEADERS:
            break
        kept.append(content)
    return kept


# "Name:" (RFC 5322 ftext, obsolete space before the colon allowed) or a folded
# continuation line.
_FIELD_OR_CONTINUATION = re.compile(rb"[!-9;-~]+[ \t]*:|[ \t]")
