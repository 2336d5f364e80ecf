"""Pure policy: no I/O, no state. RFC 5321 path parsing, domain normalisation (UTS #46 /
IDNA 2008) and allowlists, and the checks on a message's content and headers.

Every function here either returns a value or raises AddressError carrying the reply
the client is told.
"""

from __future__ import annotations

import dataclasses
import email.parser
import email.policy
import email.utils
import functools
import re
import socket

import idna

from relay import replies


@dataclasses.dataclass(frozen=True)
class DomainList:
    """An allowlist of domains: exact names plus `*.name` entries for subdomains.

    Names are stored lower-case, in ASCII (punycode) form, without a trailing dot.
    """

    exact: frozenset[str]
    parents: tuple[str, ...]  # from "*.example.com": ".example.com"

    def allows(self, domain: str) -> bool:
        """`domain` must already be normalised (see normalize_domain)."""
        if domain in self.exact:
            return True
        return any(domain.endswith(parent) for parent in self.parents)

    def __str__(self) -> str:
        return ",".join(sorted(self.exact) + sorted("*" + p for p in self.parents))


def one_line(value: object) -> str:
    """Printable, single-line text: peers and upstreams control some of what we log."""
    text = value if isinstance(value, str) else str(value)
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else "?" for ch in text.replace("\n", " "))


_ADDRESS_REPLIES = {"553 5.1.3": replies.MALFORMED_ADDRESS,
                    "553 5.7.1": replies.AMBIGUOUS_ROUTING,
                    "553 5.6.7": replies.NEEDS_SMTPUTF8,
                    "550 5.7.1": replies.HEADER_FROM_MISSING}


class AddressError(ValueError):
    """An address is refused. `kind` (by its code) and the text are what the client is
    told."""

    def __init__(self, reason: str, code: str = "553 5.1.3"):
        super().__init__(reason)
        self.code = code
        self.kind = _ADDRESS_REPLIES[code]

    @property
    def reply(self) -> str:
        return self.kind.format(detail=str(self))


@dataclasses.dataclass(frozen=True)
class Mailbox:
    """A parsed envelope address: local part as given, domain normalised to ASCII."""

    local_part: str
    domain: str

    def __str__(self) -> str:
        return f"{self.local_part}@{self.domain}"


# RFC 5321 limits (section 4.5.3.1).
MAX_LOCAL_PART = 64


MAX_DOMAIN = 255


MAX_PATH = 256


# RFC 5321 atext, without "%" and "!": old routing syntaxes (user%other@relay,
# host!user) that some MTAs still honour, which would let a message reach a domain
# that the allowlist never saw.
_ATEXT = r"A-Za-z0-9#$&'*+\-/=?^_`{|}~"


_UTF8 = "\u0080-\ud7ff\ue000-\U0010ffff"  # RFC 6531 UTF8-non-ascii; no lone surrogates


_DOT_STRING = {
    False: re.compile(rf"[{_ATEXT}]+(?:\.[{_ATEXT}]+)*"),
    True: re.compile(rf"[{_ATEXT}{_UTF8}]+(?:\.[{_ATEXT}{_UTF8}]+)*"),
}


_QUOTED_STRING = {
    False: re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"'),
    True: re.compile(rf'"(?:[\x20\x21\x23-\x5b\x5d-\x7e{_UTF8}]|\\[\x20-\x7e])*"'),
}


_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


HOSTNAME_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?")


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # C0, DEL and C1 (e.g. U+009B CSI)


def split_path(arg: str) -> tuple[str, str]:
    """Split the argument of MAIL FROM:/RCPT TO: into (path, parameters).

    `<a@b> SIZE=10` -> ("<a@b>", " SIZE=10"). Quoted local parts may contain ">" and
    spaces. Nothing is validated here beyond finding where the path ends.
    """
    text = arg.lstrip(" ")
    if not text.startswith("<"):
        path, _, rest = text.partition(" ")
        return path, rest
    end = text.find(">")
    if end > 0 and '"' not in text[:end]:  # the usual case: nothing quoted before ">"
        return text[:end + 1], text[end + 1:]
    index, quoted = 1, False
    while index < len(text):
        char = text[index]
        if quoted and char == "\\":
            index += 2
            continue
        if char == '"':
            quoted = not quoted
        elif char == ">" and not quoted:
            return text[:index + 1], text[index + 1:]
        index += 1
    return text, ""


def parse_path(path: str, *, smtputf8: bool = False) -> Mailbox:
    """Parse an RFC 5321 path (`<local@domain>`, brackets optional) strictly.

    Refuses everything whose routing is ambiguous: source routes, IP-literal domains,
    more than one unquoted "@", "%" and "!" in the local part, "@" inside a quoted local
    part, control characters, non-ASCII without SMTPUTF8, overlong parts.
    """
    if _CONTROL.search(path):
        raise AddressError("Control characters are not allowed in addresses")
    if path.startswith("<"):
        if not path.endswith(">") or len(path) < 3:
            raise AddressError("Malformed address: expects <local-part@domain>")
        path = path[1:-1]
    if len(path) > MAX_PATH:
        raise AddressError("Address too long (RFC 5321 allows 256 characters)")
    if path.startswith("@"):
        raise AddressError("Source routes (<@host:user@domain>) are not accepted",
                           "553 5.7.1")
    if not smtputf8 and not path.isascii():
        raise AddressError("Non-ASCII address needs the SMTPUTF8 parameter", "553 5.6.7")
    local_part, domain = _split_local_part(path, smtputf8)
    if len(local_part.encode("utf-8", "surrogatepass")) > MAX_LOCAL_PART:
        raise AddressError("Local part too long (RFC 5321 allows 64 octets)")
    return Mailbox(local_part, normalize_domain(domain))


def _split_local_part(path: str, smtputf8: bool) -> tuple[str, str]:
    if path.startswith('"'):
        match = _QUOTED_STRING[smtputf8].match(path)
        if match is None:
            raise AddressError("Malformed quoted local part")
        local_part = match.group()
        unquoted = re.sub(r"\\(.)", r"\1", local_part[1:-1])
        if not unquoted:
            raise AddressError("Malformed address: empty local part")
        if any(char in unquoted for char in "@%!"):
            raise AddressError("Routing characters (@ % !) in the local part are not "
                               "accepted", "553 5.7.1")
    else:
        match = _DOT_STRING[smtputf8].match(path)
        local_part = match.group() if match else ""
        following = path[len(local_part):len(local_part) + 1]
        if following in ("%", "!") or (following == "@" and path.count("@") > 1):
            raise AddressError("Routing characters (@ % !) in the local part are not "
                               "accepted", "553 5.7.1")
        if not local_part:
            raise AddressError("Malformed address: expects local-part@domain")
    rest = path[len(local_part):]
    if not rest.startswith("@"):
        raise AddressError("Malformed address: expects local-part@domain")
    return local_part, rest[1:]


@functools.lru_cache(maxsize=4096)  # a message asks about its domains a dozen times
def normalize_domain(domain: str) -> str:
    """Lower-case ASCII form of a domain: trailing dot dropped, IDNs as punycode.

    Raises AddressError for IP literals, bare IP addresses and anything that is not a
    host name of RFC 1035 labels.
    """
    if domain.startswith("["):
        raise AddressError("IP-literal domains are not accepted", "553 5.7.1")
    domain = domain.removesuffix(".")
    if not domain:
        raise AddressError("Malformed address: empty domain")
    if not domain.isascii():
        # IDNA 2008 with UTS #46 mapping, non-transitional: "straße.de" is
        # xn--strae-oqa.de. (Python's "idna" codec is IDNA 2003, which maps it to
        # strasse.de: someone else's domain.)
        try:
            domain = idna.encode(domain, uts46=True, transitional=False).decode("ascii")
        except ValueError:  # idna.IDNAError is a UnicodeError
            raise AddressError("Malformed internationalised domain") from None
    domain = domain.lower()
    if len(domain) > MAX_DOMAIN:
        raise AddressError("Domain too long (RFC 5321 allows 255 characters)")
    labels = domain.split(".")
    if not all(_LABEL.fullmatch(label) for label in labels):
        raise AddressError(f"Malformed domain {domain!r}")
    try:
        # Not only dotted quads: resolvers also read 127.1, 2130706433 and 0x7f.0.0.1
        # as addresses. (IPv6 cannot get past the label check above.)
        socket.inet_aton(domain)
    except OSError:
        return domain
    raise AddressError("IP-address domains are not accepted", "553 5.7.1")


def forbidden_in_data(content: bytes) -> str | None:
    """Why the data cannot go upstream as it is, or None.

    CR or LF other than as CRLF (RFC 5321 2.3.8) and NUL are refused: a bare
    "<LF>.<LF>", or a "<NUL>." line at an MTA that strips NULs, is how SMTP smuggling
    hides a second message inside the first."""
    if bare_line_ending(content):
        return "bare CR or LF in the data; lines must end with CRLF"
    if b"\x00" in content:
        return "NUL byte in the data"
    return None


def bare_line_ending(content: bytes) -> bool:
    """True when CR or LF appears other than as CRLF (RFC 5321 2.3.8 forbids it).

    Such messages are refused: a bare "<LF>.<LF>" is how SMTP smuggling hides a second
    message inside the first from an upstream that ends DATA on it.
    """
    crlf = content.count(b"\r\n")
    return content.count(b"\r") != crlf or content.count(b"\n") != crlf


def header_block(content: bytes) -> bytes:
    """The message's header section (everything before the first empty line)."""
    if content.startswith(b"\r\n"):
        return b""
    return content.split(b"\r\n\r\n", 1)[0] + b"\r\n"


def header_block_end(content: bytes) -> int:
    """Where header_block ends, without copying it."""
    if content.startswith(b"\r\n"):
        return 0
    blank = content.find(b"\r\n\r\n")
    return len(content) if blank < 0 else blank + 2


# A header section larger than this is refused when it must be parsed
# (CHECK_HEADER_FROM); a message without an empty line is all header section.
HEADER_SECTION_LIMIT = 1024 * 1024


# The header section as the email package reads it (email.feedparser.headerRE): it
# ends at the first line that is not a field, a continuation or a "From " line.
_NOT_A_HEADER_LINE = re.compile(rb"^(?!From |[\x21-\x39\x3b-\x7e]*:|[\t ])",
                                re.MULTILINE)


# A From: field with its continuation lines (the email package's get_all("From")).
_FROM_FIELD = re.compile(rb"^from:[^\r\n]*(?:\r\n[\t ][^\r\n]*)*(?:\r\n)?",
                         re.IGNORECASE | re.MULTILINE)


def header_section_end(content: bytes, limit: int) -> int | None:
    """Where the header section ends as the email package sees it (at the empty line,
    or at the first line that is no header field), or None when that is past `limit`.
    Looks at no more than `limit` bytes (plus one line, checked already)."""
    match = _NOT_A_HEADER_LINE.search(content, 0, limit + 1024)
    if match is None or match.start() > limit:
        return None
    return match.start()


def header_from_fields(content: bytes, end: int) -> bytes:
    """The From: fields among content[:end] (a header section), with their
    continuation lines: all of the header section that header_from_domains needs."""
    return b"".join(match.group() for match in _FROM_FIELD.finditer(content, 0, end))


_RECEIVED = re.compile(rb"^received:", re.IGNORECASE | re.MULTILINE)


def count_received_headers(headers: bytes, end: int | None = None) -> int:
    """Received: fields in headers (or in headers[:end], without copying it)."""
    matches = _RECEIVED.finditer(headers, 0, len(headers) if end is None else end)
    return sum(1 for _ in matches)


def header_from_domains(headers: bytes) -> list[str]:
    """Normalised domains of the addresses in the From: header(s).

    Raises AddressError when there is no From: address or one has no usable domain."""
    message = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(
        headers)
    values = [str(value) for value in message.get_all("From", [])]
    addresses = [address for _, address in email.utils.getaddresses(values) if address]
    if not addresses:
        raise AddressError("no From: address", "550 5.7.1")
    domains = []
    for address in addresses:
        local_part, at, domain = address.rpartition("@")
        if not at or not local_part:
            raise AddressError(f"{address!r} has no domain", "550 5.7.1")
        domains.append(normalize_domain(domain))
    return domains


SAFE_HELO = re.compile(r"[^A-Za-z0-9.:\[\]_-]")


@functools.lru_cache(maxsize=2)
def rfc5322_date(second: int) -> str:
    return email.utils.formatdate(second, localtime=True)


def long_line_in(data: bytes, limit: int) -> bool:
    """Whether a line of `data` (from its start or after an LF) has `limit` bytes before
    any CR or LF: re.search(rb"^[^\\r\\n]{limit}", data, re.MULTILINE), which tries a
    match at every byte (1 ms per 100 KB). This looks at `limit` bytes at a time, from
    the end: any LF there starts the only line that can still be long."""
    start, end = 0, len(data)
    while start + limit <= end:
        last = data.rfind(b"\n", start, start + limit)
        if last >= 0:
            start = last + 1  # the lines before it are shorter than limit
            continue
        if data.find(b"\r", start, start + limit) < 0:
            return True
        last = data.find(b"\n", start + limit)  # a CR cut this line short: the next
        if last < 0:
            return False
        start = last + 1
    return False



def declared_size(mail_options: list[str]) -> int:
    """The SIZE=n a client declared at MAIL (RFC 1870), or 0."""
    for option in mail_options:
        name, _, value = option.partition("=")
        if name.upper() == "SIZE" and value.isascii() and value.isdigit():
            return int(value)
    return 0
