"""Address policy: strict RFC 5321 paths, domain allowlists, CRLF-only message data.

Pure functions imported from smtp_relay; no sockets, no relay process. The attacker's
matrix lists the ways an envelope address can route mail somewhere the allowlist never
saw (source routes, `%` and `!` routing, several `@`, IP literals, ...): each must be
refused with a 5xx reply of the right class:

- `553 5.7.1`: a routing trick (a policy refusal),
- `553 5.1.3`: a malformed address,
- `553 5.6.7`: non-ASCII without the SMTPUTF8 parameter.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.policy import (
    AddressError,
    DomainList,
    Mailbox,
    bare_line_ending,
    normalize_domain,
    parse_path,
    split_path,
)
from relay.settings import load_config

ROUTING = "553 5.7.1"
MALFORMED = "553 5.1.3"
NEEDS_SMTPUTF8 = "553 5.6.7"

LABEL_63 = "a" * 63
# 256 characters: the longest domain that fits in a 258-character bracketed path.
DOMAIN_256 = ".".join([LABEL_63, LABEL_63, LABEL_63, "b" * 62, "c"])
# 64 + 1 + 192 = 257 characters: one more than RFC 5321 allows for a whole path.
ADDRESS_257 = "x" * 64 + "@" + ".".join([LABEL_63, LABEL_63, "b" * 62, "c"])


def refusal(path: str, *, smtputf8: bool = False) -> AddressError:
    with pytest.raises(AddressError) as caught:
        parse_path(path, smtputf8=smtputf8)
    return caught.value


# ---------------------------------------------------------------------------------------
# The attacker's matrix: (path, code, a fragment of the reason), refused with or
# without SMTPUTF8.
# ---------------------------------------------------------------------------------------

ATTACKS = [
    # Source routes: the upstream would relay to a.com, whatever the final domain.
    pytest.param("<@a.com:user@example.com>", ROUTING, "source route", id="source-route"),
    pytest.param("<@a,@b:u@example.com>", ROUTING, "source route", id="source-route-list"),
    pytest.param("@a.com:user@example.com", ROUTING, "source route",
                 id="source-route-no-brackets"),
    # More than one unquoted "@".
    pytest.param("a@evil.com@example.com", ROUTING, "routing", id="two-at"),
    pytest.param("<a@evil.com@example.com>", ROUTING, "routing", id="two-at-brackets"),
    pytest.param("a@b@evil.com@example.com", ROUTING, "routing", id="three-at"),
    # "%" and "!" routing (user%host@relay, host!user).
    pytest.param("user%evil.com@example.com", ROUTING, "routing", id="percent-hack"),
    pytest.param("<user%evil.com@example.com>", ROUTING, "routing", id="percent-brackets"),
    pytest.param("evil.com!user@example.com", ROUTING, "routing", id="bang-path"),
    pytest.param("a!b!user@example.com", ROUTING, "routing", id="bang-path-chain"),
    # The same characters hidden in a quoted local part.
    pytest.param('"user@evil.com"@example.com', ROUTING, "routing", id="quoted-at"),
    pytest.param('"user%evil.com"@example.com', ROUTING, "routing", id="quoted-percent"),
    pytest.param('"evil.com!user"@example.com', ROUTING, "routing", id="quoted-bang"),
    pytest.param('"user\\@evil.com"@example.com', ROUTING, "routing",
                 id="quoted-escaped-at"),
    pytest.param('"user\\"@evil.com"@example.com', ROUTING, "routing",
                 id="quoted-escaped-quote-then-at"),
    # IP literals and bare IP addresses: no allowlist entry can name them.
    pytest.param("u@[1.2.3.4]", ROUTING, "ip-literal", id="ipv4-literal"),
    pytest.param("<u@[127.0.0.1]>", ROUTING, "ip-literal", id="ipv4-literal-brackets"),
    pytest.param("u@[IPv6:::1]", ROUTING, "ip-literal", id="ipv6-literal"),
    pytest.param("u@[1.2.3.4", ROUTING, "ip-literal", id="unterminated-literal"),
    pytest.param("u@127.0.0.1", ROUTING, "ip-address", id="bare-ipv4"),
    pytest.param("u@10.0.0.1.", ROUTING, "ip-address", id="bare-ipv4-trailing-dot"),
    pytest.param("u@::1", MALFORMED, "malformed", id="bare-ipv6"),
    # Control characters: command injection and log forging.
    pytest.param("u\x00@example.com", MALFORMED, "control", id="nul"),
    pytest.param("u@example.com\r", MALFORMED, "control", id="cr"),
    pytest.param("u@example.com\n", MALFORMED, "control", id="lf"),
    pytest.param("<u@example.com>\r\nRCPT TO:<x@evil.net>", MALFORMED, "control",
                 id="crlf-injection"),
    pytest.param("u\t@example.com", MALFORMED, "control", id="tab"),
    pytest.param("u\x7f@example.com", MALFORMED, "control", id="del"),
    pytest.param("u\x1b[31m@example.com", MALFORMED, "control", id="escape"),
    pytest.param('"u\x00"@example.com', MALFORMED, "control", id="quoted-nul"),
    # Overlong parts (RFC 5321 4.5.3.1).
    pytest.param("x" * 65 + "@example.com", MALFORMED, "too long", id="local-part-65"),
    pytest.param("u@" + DOMAIN_256, MALFORMED, "too long", id="domain-256"),
    pytest.param("u@" + "a" * 64 + ".com", MALFORMED, "malformed", id="label-64"),
    pytest.param("<" + ADDRESS_257 + ">", MALFORMED, "too long", id="path-257-brackets"),
    pytest.param("x" * 5000 + "@example.com", MALFORMED, "too long", id="path-5000"),
    # Empty or missing parts.
    pytest.param("@example.com", ROUTING, "source route", id="empty-local-part"),
    pytest.param("<@example.com>", ROUTING, "source route",
                 id="empty-local-part-brackets"),
    pytest.param("u@", MALFORMED, "empty domain", id="empty-domain"),
    pytest.param("<u@>", MALFORMED, "empty domain", id="empty-domain-brackets"),
    pytest.param("u@.", MALFORMED, "empty domain", id="domain-only-dot"),
    pytest.param("user", MALFORMED, "malformed", id="no-at"),
    pytest.param("<user>", MALFORMED, "malformed", id="no-at-brackets"),
    pytest.param("user.example.com", MALFORMED, "malformed", id="no-at-dotted"),
    pytest.param("", MALFORMED, "malformed", id="empty"),
    pytest.param("<>", MALFORMED, "malformed", id="null-path"),
    # Malformed domains.
    pytest.param("u@example..com", MALFORMED, "malformed", id="empty-label"),
    pytest.param("u@.example.com", MALFORMED, "malformed", id="leading-dot"),
    pytest.param("u@example.com..", MALFORMED, "malformed", id="two-trailing-dots"),
    pytest.param("u@-example.com", MALFORMED, "malformed", id="label-leading-hyphen"),
    pytest.param("u@example-.com", MALFORMED, "malformed", id="label-trailing-hyphen"),
    pytest.param("u@exa_mple.com", MALFORMED, "malformed", id="underscore"),
    # Unbalanced angle brackets.
    pytest.param("<u@example.com", MALFORMED, "malformed", id="no-closing-bracket"),
    pytest.param("u@example.com>", MALFORMED, "malformed", id="no-opening-bracket"),
    pytest.param("<<u@example.com>>", MALFORMED, "malformed", id="double-brackets"),
    pytest.param("<<u@example.com>", MALFORMED, "malformed", id="extra-opening-bracket"),
    pytest.param("<u@example.com>>", MALFORMED, "malformed", id="extra-closing-bracket"),
    pytest.param("<", MALFORMED, "malformed", id="lone-bracket"),
    # Backslash tricks.
    pytest.param("user\\@evil.com@example.com", MALFORMED, "malformed",
                 id="unquoted-backslash-at"),
    pytest.param('"user\\\\"@evil.com@example.com', MALFORMED, "malformed",
                 id="escaped-backslash-ends-quote"),
    pytest.param('"user\\"@example.com', MALFORMED, "quoted", id="escaped-closing-quote"),
    pytest.param("user\\.name@example.com", MALFORMED, "malformed", id="backslash-dot"),
    pytest.param('"user"%evil.com@example.com', MALFORMED, "malformed",
                 id="percent-after-quoted"),
    # RFC 5322 comments and whitespace have no place in an SMTP path.
    pytest.param("<u(comment)@example.com>", MALFORMED, "malformed", id="comment-local"),
    pytest.param("<(comment)u@example.com>", MALFORMED, "malformed", id="comment-before"),
    pytest.param("<u@example.com(comment)>", MALFORMED, "malformed", id="comment-domain"),
    pytest.param("<u@(comment)example.com>", MALFORMED, "malformed",
                 id="comment-before-domain"),
    pytest.param("<u @example.com>", MALFORMED, "malformed", id="space-before-at"),
    pytest.param("<u@ example.com>", MALFORMED, "malformed", id="space-after-at"),
    pytest.param("< u@example.com>", MALFORMED, "malformed", id="space-after-bracket"),
    pytest.param("<u@example.com >", MALFORMED, "malformed", id="space-before-bracket"),
    pytest.param("u@exa mple.com", MALFORMED, "malformed", id="space-in-domain"),
    pytest.param(" u@example.com", MALFORMED, "malformed", id="leading-space"),
    pytest.param("Joe <u@example.com>", MALFORMED, "malformed", id="display-name"),
    pytest.param(".u@example.com", MALFORMED, "malformed", id="leading-dot-local"),
    pytest.param("u.@example.com", MALFORMED, "malformed", id="trailing-dot-local"),
    pytest.param("u..v@example.com", MALFORMED, "malformed", id="double-dot-local"),
    # Trailing garbage.
    pytest.param("<u@example.com>x", MALFORMED, "malformed", id="garbage-after-bracket"),
    pytest.param("<u@example.com> x", MALFORMED, "malformed", id="word-after-bracket"),
    pytest.param("u@example.com x", MALFORMED, "malformed", id="word-after-domain"),
    pytest.param("u@example.com,v@evil.net", ROUTING, "routing", id="two-addresses"),
    pytest.param("u@example.com;", MALFORMED, "malformed", id="semicolon"),
]


@pytest.mark.parametrize("smtputf8", [False, True], ids=["ascii", "smtputf8"])
@pytest.mark.parametrize(("path", "code", "reason"), ATTACKS)
def test_attack_is_refused_with_the_right_code(path, code, reason, smtputf8):
    error = refusal(path, smtputf8=smtputf8)
    assert error.code == code
    assert reason in str(error).lower()
    assert error.reply == f"{code} {error}"
    assert "\r" not in error.reply and "\n" not in error.reply


@pytest.mark.parametrize("path", [
    "jörg@example.com",
    "u@bücher.example",
    '"jörg"@example.com',
    "<用户@例子.广告>",
    "u@exａmple.com",  # a full-width "ａ" that IDNA would fold into example.com
])
def test_non_ascii_without_smtputf8_is_refused(path):
    error = refusal(path, smtputf8=False)
    assert error.code == NEEDS_SMTPUTF8
    assert "SMTPUTF8" in error.reply


def test_address_error_reply_defaults_to_553_5_1_3():
    error = AddressError("Malformed address")
    assert error.code == MALFORMED
    assert error.reply == "553 5.1.3 Malformed address"
    assert isinstance(error, ValueError)


def test_overlong_path_without_brackets_is_refused():
    assert len(ADDRESS_257) == 257
    error = refusal(ADDRESS_257)
    assert error.code == MALFORMED
    assert "too long" in str(error).lower()


@pytest.mark.parametrize("path", [
    "u@127.1", "u@2130706433", "u@0x7f.0.0.1", "u@0177.0.0.1", "u@0x7f000001",
])
def test_other_spellings_of_an_ip_address_are_refused(path):
    assert refusal(path).code == ROUTING


@pytest.mark.parametrize("control", ["\x85", "\x9b", "\x80"],
                         ids=["next-line", "c1-csi", "padding"])
def test_c1_control_characters_are_refused_with_smtputf8(control):
    error = refusal(f"u{control}x@example.com", smtputf8=True)
    assert error.code == MALFORMED
    assert "control" in str(error).lower()


def test_empty_quoted_local_part_is_refused():
    assert refusal('""@example.com').code == MALFORMED


# ---------------------------------------------------------------------------------------
# What is accepted, and how it is normalised
# ---------------------------------------------------------------------------------------

ACCEPTED = [
    pytest.param("user@example.com", False, "user", "example.com", id="plain"),
    pytest.param("<user@example.com>", False, "user", "example.com", id="brackets"),
    pytest.param("u@Example.COM.", False, "u", "example.com", id="trailing-dot"),
    pytest.param("<u@example.com.>", False, "u", "example.com",
                 id="trailing-dot-brackets"),
    pytest.param("User.Name@EXAMPLE.COM", False, "User.Name", "example.com",
                 id="upper-case"),
    pytest.param('"john doe"@example.com', False, '"john doe"', "example.com",
                 id="quoted-space"),
    pytest.param('<"a\\"b"@example.com>', False, '"a\\"b"', "example.com",
                 id="quoted-escaped-quote"),
    pytest.param("user+tag@example.com", False, "user+tag", "example.com", id="plus-tag"),
    pytest.param("first.last-x_y=z@sub-domain.example.com", False, "first.last-x_y=z",
                 "sub-domain.example.com", id="atext"),
    pytest.param("x" * 64 + "@example.com", False, "x" * 64, "example.com",
                 id="local-part-64"),
    pytest.param("u@" + LABEL_63 + ".com", False, "u", LABEL_63 + ".com", id="label-63"),
    pytest.param("u@xn--bcher-kva.example", False, "u", "xn--bcher-kva.example",
                 id="punycode"),
    pytest.param("u@bücher.example", True, "u", "xn--bcher-kva.example", id="idn"),
    pytest.param("u@BÜCHER.example.", True, "u", "xn--bcher-kva.example",
                 id="idn-upper-case-trailing-dot"),
    pytest.param("<用户@例子.广告>", True, "用户", "xn--fsqu00a.xn--4rr70v",
                 id="idn-cjk"),
    pytest.param("jörg@example.com", True, "jörg", "example.com", id="utf8-local-part"),
    pytest.param('"jörg müller"@example.com', True, '"jörg müller"', "example.com",
                 id="utf8-quoted-local-part"),
    pytest.param("u@１２７.example", True, "u", "127.example", id="full-width-digits"),
]


@pytest.mark.parametrize(("path", "smtputf8", "local_part", "domain"), ACCEPTED)
def test_valid_address_is_accepted_and_normalised(path, smtputf8, local_part, domain):
    mailbox = parse_path(path, smtputf8=smtputf8)
    assert mailbox == Mailbox(local_part, domain)
    assert str(mailbox) == f"{local_part}@{domain}"
    # What is forwarded parses back to the same mailbox.
    assert parse_path(f"<{mailbox}>", smtputf8=smtputf8) == mailbox


def test_utf8_local_part_limit_counts_octets():
    assert parse_path("é" * 32 + "@example.com", smtputf8=True).local_part == "é" * 32
    error = refusal("é" * 33 + "@example.com", smtputf8=True)  # 66 octets
    assert error.code == MALFORMED
    assert "too long" in str(error).lower()


@pytest.mark.parametrize(("domain", "normalised"), [
    ("example.com", "example.com"),
    ("Example.COM.", "example.com"),
    ("bücher.example", "xn--bcher-kva.example"),
    ("XN--BCHER-KVA.example", "xn--bcher-kva.example"),
    ("a-b.c0.example", "a-b.c0.example"),
])
def test_normalize_domain(domain, normalised):
    assert normalize_domain(domain) == normalised


@pytest.mark.parametrize(("domain", "code"), [
    ("", MALFORMED), (".", MALFORMED), ("a..b", MALFORMED), ("a b.com", MALFORMED),
    ("a_b.com", MALFORMED), ("a" * 64 + ".com", MALFORMED), ("example.com:25", MALFORMED),
    ("[1.2.3.4]", ROUTING), ("1.2.3.4", ROUTING), ("bücher..example", MALFORMED),
])
def test_normalize_domain_refuses(domain, code):
    with pytest.raises(AddressError) as caught:
        normalize_domain(domain)
    assert caught.value.code == code


# ---------------------------------------------------------------------------------------
# Domain allowlists
# ---------------------------------------------------------------------------------------

def allowlist(entries: str) -> DomainList:
    return load_config({"ALLOWED_TO_DOMAINS": entries}).allowed_to_domains


def allows(entries: str, address: str, *, smtputf8: bool = False) -> bool:
    return allowlist(entries).allows(parse_path(address, smtputf8=smtputf8).domain)


@pytest.mark.parametrize(("entries", "address", "smtputf8", "expected"), [
    # Exact entries.
    ("example.com", "u@example.com", False, True),
    ("example.com", "u@EXAMPLE.Com", False, True),
    ("Example.COM", "u@example.com", False, True),
    ("example.com.", "u@example.com", False, True),
    ("example.com", "u@example.com.", False, True),
    ("example.com", "u@a.example.com", False, False),
    ("example.com", "u@evilexample.com", False, False),
    ("example.com", "u@example.com.evil.net", False, False),
    ("example.com", "u@example.co", False, False),
    ("example.com", "u@xample.com", False, False),
    ("example.com,example.org", "u@example.org", False, True),
    # Wildcards: subdomains at any depth, never the parent itself.
    ("*.example.com", "u@a.example.com", False, True),
    ("*.example.com", "u@b.a.example.com", False, True),
    ("*.example.com", "u@A.Example.COM.", False, True),
    ("*.example.com", "u@example.com", False, False),
    ("*.example.com", "u@evilexample.com", False, False),
    ("*.example.com", "u@example.com.evil.net", False, False),
    ("*.example.com", "u@a.example.com.evil.net", False, False),
    ("*.example.com", "u@aexample.com", False, False),
    ("*.example.com,example.com", "u@example.com", False, True),
    # IDN entries match punycode addresses and the other way round.
    ("bücher.example", "u@xn--bcher-kva.example", False, True),
    ("bücher.example", "u@BÜCHER.example", True, True),
    ("xn--bcher-kva.example", "u@bücher.example", True, True),
    ("*.bücher.example", "u@mail.xn--bcher-kva.example", False, True),
    ("*.bücher.example", "u@xn--bcher-kva.example", False, False),
    ("bücher.example", "u@bucher.example", False, False),
])
def test_domain_allowlist(entries, address, smtputf8, expected):
    assert allows(entries, address, smtputf8=smtputf8) is expected


def test_allowlist_is_stored_normalised():
    domains = allowlist(" Example.COM. , *.Example.ORG ,bücher.example")
    assert domains.exact == frozenset({"example.com", "xn--bcher-kva.example"})
    assert domains.parents == (".example.org",)
    assert str(domains) == "example.com,xn--bcher-kva.example,*.example.org"


# ---------------------------------------------------------------------------------------
# split_path: where the path ends in MAIL FROM:/RCPT TO: arguments
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("argument", "path", "parameters"), [
    ("<a@example.com>", "<a@example.com>", []),
    ("<a@example.com> SIZE=10", "<a@example.com>", ["SIZE=10"]),
    ("<a@example.com> SIZE=10 BODY=8BITMIME", "<a@example.com>",
     ["SIZE=10", "BODY=8BITMIME"]),
    ("  <a@example.com> SMTPUTF8", "<a@example.com>", ["SMTPUTF8"]),
    ('<"a>b"@example.com> SIZE=10', '<"a>b"@example.com>', ["SIZE=10"]),
    ('<"a> b c"@example.com>', '<"a> b c"@example.com>', []),
    ('<"a\\">"@example.com> SIZE=1', '<"a\\">"@example.com>', ["SIZE=1"]),
    ("a@example.com", "a@example.com", []),
    ("a@example.com SIZE=10", "a@example.com", ["SIZE=10"]),
    ("<a@example.com", "<a@example.com", []),
    ("", "", []),
])
def test_split_path(argument, path, parameters):
    found_path, found_parameters = split_path(argument)
    assert found_path == path
    assert found_parameters.split() == parameters


def test_split_then_parse_keeps_a_quoted_angle_bracket():
    path, parameters = split_path('<"a> b"@Example.com> SIZE=10')
    assert parse_path(path) == Mailbox('"a> b"', "example.com")
    assert parameters.split() == ["SIZE=10"]


# ---------------------------------------------------------------------------------------
# bare_line_ending: SMTP smuggling needs a bare CR or LF somewhere
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("content", [
    b"",
    b"Subject: x\r\n\r\nHello.\r\n",
    b"\r\n",
    b"a\r\n.\r\nb\r\n",
    b"no line ending at all",
])
def test_crlf_only_content_is_fine(content):
    assert bare_line_ending(content) is False


@pytest.mark.parametrize("content", [
    b"a\n",
    b"a\r",
    b"\n",
    b"\r",
    b"a\rb\r\n",
    b"a\nb\r\n",
    b"a\r\r\n",
    b"a\r\n\n",
    b"a\n\r",
    b"a\n\r\n",
    b"a\r\n\r",
    b"x\r\n.\n",  # <CRLF>.<LF>
    b"x\n.\r\n",  # <LF>.<CRLF>
    b"x\n.\n",  # <LF>.<LF>
    b"x\r\n.\r",  # <CRLF>.<CR>
    b"x\r.\r\n",  # <CR>.<CRLF>
    b"x\r\n.\r\r\nMAIL FROM:<a@evil.net>\r\n",
])
def test_bare_cr_or_lf_is_flagged(content):
    assert bare_line_ending(content) is True


@settings(max_examples=150, deadline=None, database=None)
@given(st.lists(st.sampled_from([b"a", b".", b"\r\n", b"\r", b"\n"]), max_size=12))
def test_bare_line_ending_property(pieces):
    content = b"".join(pieces)
    without_crlf = content.replace(b"\r\n", b"")
    assert bare_line_ending(content) is (b"\r" in without_crlf or b"\n" in without_crlf)


# ---------------------------------------------------------------------------------------
# Property: whatever parse_path accepts is one unambiguous mailbox, and the domain the
# allowlist checks is the domain that was written.
# ---------------------------------------------------------------------------------------

ALLOWED = "example.com,*.example.org,bücher.example"
ALLOWED_EXACT = ("example.com", "xn--bcher-kva.example")
ALLOWED_PARENTS = ("example.org",)

PIECES = [
    "a", "Z", "0", "9", ".", "-", "+", "_", "=", "@", "%", "!", '"', "\\", " ", "<", ">",
    "[", "]", ":", ",", ";", "(", ")", "\r", "\n", "\t", "\x00", "\x7f", "ü", "ａ", "。",
    "\u2028", "\x85", "user", "example", ".com", "example.com", "EXAMPLE.COM",
    "example.org", "evil.net", "evilexample.com", "xn--bcher-kva", "bücher", "127.0.0.1",
    "IPv6:", "example.com.evil.net", ".example.org",
]
LOCAL_PARTS = st.one_of(
    st.text(st.sampled_from("abcXYZ019.+-_=%!@\\\" <>ü"), min_size=0, max_size=10),
    st.sampled_from(["user", '"a b"', '"a@b"', "a%b", "a!b", '""', '"\\"', "ü"]),
)
DOMAINS = st.one_of(
    st.lists(st.sampled_from(["example", "com", "org", "evil", "net", "a", "b", "xn--bcher-kva",
                              "bücher", "EXAMPLE", "0", "127", "", "-x", "ａ"]),
             min_size=1, max_size=5).map(".".join),
    st.sampled_from(["example.com", "a.example.org", "example.org", "evilexample.com",
                     "example.com.evil.net", "bücher.example", "xn--bcher-kva.example",
                     "x.example.org.", "[1.2.3.4]", "example.com>", "example.com."]),
)
ADDRESSES = st.one_of(
    st.lists(st.sampled_from(PIECES), max_size=12).map("".join),
    st.text(max_size=30),
    st.builds(lambda local, domain, bracket: f"<{local}@{domain}>" if bracket
              else f"{local}@{domain}", LOCAL_PARTS, DOMAINS, st.booleans()),
)


def unquoted_at_signs(text: str) -> int:
    count, quoted, escaped = 0, False, False
    for char in text:
        if escaped:
            escaped = False
        elif quoted and char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == "@" and not quoted:
            count += 1
    return count


def really_allowed(domain: str) -> bool:
    domain = domain.lower()
    return domain in ALLOWED_EXACT or any(domain.endswith("." + parent)
                                          for parent in ALLOWED_PARENTS)


@settings(max_examples=300, deadline=None, database=None)
@given(ADDRESSES, st.booleans())
def test_parsed_address_is_unambiguous_and_checked_on_its_real_domain(address, smtputf8):
    domains = allowlist(ALLOWED)
    try:
        mailbox = parse_path(address, smtputf8=smtputf8)
    except AddressError as error:
        assert error.code in (ROUTING, MALFORMED, NEEDS_SMTPUTF8)
        return
    text = str(mailbox)
    assert "\r" not in text and "\n" not in text
    assert unquoted_at_signs(text) == 1
    assert text.endswith("@" + mailbox.domain)
    assert mailbox.domain.isascii() and mailbox.domain == mailbox.domain.lower()
    if domains.allows(mailbox.domain):
        assert really_allowed(mailbox.domain)
    else:
        assert not really_allowed(mailbox.domain)
    written = address.removeprefix("<").removesuffix(">").rpartition("@")[2]
    if written.isascii():
        assert mailbox.domain == written.removesuffix(".").lower()
    assert parse_path(f"<{text}>", smtputf8=smtputf8) == mailbox
