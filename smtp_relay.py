"""smtp-relay: a small, authenticated, domain-filtering, synchronous SMTP relay.

Applications and devices on a private network send mail through it. A client must
authenticate; its envelope sender and every recipient must be in an allowed domain; what
passes is handed, command by command, to one upstream SMTP server (Gmail, SES, a company
MTA), and the client is told the upstream's own verdict: `250` after DATA means the
upstream has the message. Nothing is queued here, so nothing can be lost here.

The module reads in the order a message travels:

    config      -> Config, built once from the environment (and .env)
    logging     -> one line (text or JSON) per event, the same fields on every line;
                   Prometheus metrics
    auth        -> users (env and SMTP_USERS_FILE), SMTPAuthHandler, AuthGuard
                   (password-guessing lock-out), RateLimiter (quotas)
    policy      -> pure functions: RFC 5321 path parsing, domain allowlists, headers
    forwarding  -> UpstreamConnection, UpstreamPool, Forwarder: the upstream side
    handler     -> SMTPRelayHandler: aiosmtpd hooks, one per SMTP stage
    server      -> SMTPRelayServer: listeners, connection checks and cap, idle
                   timeout, shutdown, SIGHUP reload; /healthz, /readyz, /metrics
    main        -> `python smtp_relay.py [serve|demo|check|hash-password]`

Run `python smtp_relay.py` to serve; `python smtp_relay.py demo` starts the relay in front
of a local demo upstream that prints what it receives; `check` tries the upstream
settings step by step; `hash-password` prints a bcrypt hash for SMTP_AUTH_PASSWORD_HASH.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import concurrent.futures
import dataclasses
import email.parser
import email.policy
import email.utils
import fcntl
import functools
import hmac
import ipaddress
import itertools
import json
import logging
import math
import os
import queue
import re
import secrets
import select
import signal
import smtplib
import socket
import ssl
import struct
import sys
import termios
import threading
import time
import types
from asyncio import sslproto
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, AnyStr

import bcrypt
import idna
import prometheus_client
from aiosmtpd.smtp import (
    MISSING,
    SMTP,
    AuthResult,
    LoginPassword,
    Session,
    TLSSetupException,
    syntax,
)
from limits import RateLimitItemPerDay, RateLimitItemPerMinute
from limits.aio.strategies import MovingWindowRateLimiter
from limits.errors import ConfigurationError
from limits.storage import storage_from_string

__all__ = [
    "Config",
    "ConfigError",
    "SMTPAuthHandler",
    "SMTPRelayHandler",
    "SMTPRelayServer",
    "load_config",
    "main",
]

log = logging.getLogger("smtp_relay")


# ---------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------

class ConfigError(Exception):
    """A setting is unusable. The text names the variable and what it expects."""


DEFAULT_AUTH_PASSWORD = "password"
_BOOLEANS = {"true": True, "yes": True, "1": True, "on": True,
             "false": False, "no": False, "0": False, "off": False}
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


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


@dataclasses.dataclass(frozen=True)
class Config:
    """The relay's whole configuration, read once at start-up (see load_config)."""

    auth_username: str = "user"
    auth_password: str = DEFAULT_AUTH_PASSWORD
    allowed_from_domains: DomainList = None  # type: ignore[assignment]
    allowed_to_domains: DomainList = None  # type: ignore[assignment]
    listen_host: str = "0.0.0.0"
    listen_port: int = 1025
    use_tls: bool = False
    tls_cert_file: str = "/etc/certs/server.crt"
    tls_key_file: str = "/etc/certs/server.key"
    relay_host: str = "smtp.example.com"
    relay_port: int = 25
    relay_use_tls: bool = True
    relay_use_ssl: bool = False
    relay_username: str = ""
    relay_password: str = ""
    relay_tls_verify: bool = True
    relay_tls_ca_file: str = ""
    relay_pool_idle_seconds: float = 15.0
    relay_pool_max_messages: int = 100
    max_connections: int = 50
    max_connections_per_ip: int = 0  # 0: no cap per client address
    timeout: float = 60.0
    log_file: str = "logs/smtp-relay.log"
    log_level: str = "INFO"
    max_message_size: int = 10485760
    max_recipients: int = 100
    smtp_hostname: str = ""
    # Abuse resistance.
    auth_password_hash: str = ""
    auth_mechanisms: tuple[str, ...] = ("PLAIN", "LOGIN")
    auth_max_failures: int = 5
    auth_failure_window: float = 300.0
    auth_failure_delay: float = 1.0
    rate_limit_per_minute: int = 0
    rate_limit_burst: int = 0
    messages_per_day: int = 0
    recipients_per_minute: int = 0
    rate_limit_storage: str = "memory://"
    allowed_client_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    trusted_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    trusted_networks_allow_public: bool = False
    smtps_port: int | None = None
    tls_min_version: str = "1.2"
    max_hops: int = 50
    check_header_from: bool = False
    # Operations.
    log_format: str = "text"
    log_max_bytes: int = 10485760
    log_backup_count: int = 5
    http_host: str = "0.0.0.0"
    http_port: int | None = None
    ready_probe_seconds: float = 30.0
    users_file: str = ""

    # Values never printed: the start-up line and `repr` show them as "***" (and the
    # credentials inside URL settings, see redact_url).
    SECRETS = ("auth_password", "relay_password", "auth_password_hash")

    def redacted(self) -> dict[str, Any]:
        shown = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name in self.SECRETS:
                value = "***" if value else ""
            elif isinstance(value, str) and "://" in value:  # RATE_LIMIT_STORAGE
                value = redact_url(value)
            elif isinstance(value, DomainList):
                value = str(value)
            elif isinstance(value, tuple):
                value = ",".join(map(str, value))
            shown[field.name] = value
        return shown

    def __repr__(self) -> str:
        return f"Config({self.redacted()})"


_SECRET_QUERY = re.compile(r"([?&;][^=&;#]*(?:pass|secret|token|key)[^=&;#]*=)([^&;#]*)",
                           re.IGNORECASE)


def url_secrets(url: str) -> list[str]:
    """The credentials in a URL: the userinfo's password (or a lone userinfo, which
    some clients take for a password) and password-like query values."""
    _, separator, rest = url.partition("://")
    if not separator:
        return []
    netloc = re.split(r"[/?#]", rest, maxsplit=1)[0]
    found = []
    if "@" in netloc:
        userinfo = netloc.rpartition("@")[0]
        user, colon, password = userinfo.partition(":")
        found.append(password if colon else user)
    found += [match.group(2) for match in _SECRET_QUERY.finditer(rest)]
    return [secret for secret in found if secret]


def redact_url(url: str) -> str:
    """`redis://user:pw@host/0?password=pw` as it may be printed: credentials as ***."""
    scheme, separator, rest = url.partition("://")
    if not separator:
        return url
    netloc, tail = re.match(r"([^/?#]*)(.*)", rest, re.DOTALL).groups()
    if "@" in netloc:
        userinfo, _, host = netloc.rpartition("@")
        user, colon, _ = userinfo.partition(":")
        netloc = f"{user}:***@{host}" if colon else f"***@{host}"
    tail = _SECRET_QUERY.sub(lambda match: match.group(1) + "***", tail)
    return f"{scheme}://{netloc}{tail}"


def _text(env: Mapping[str, str], name: str, default: str) -> str:
    value = env.get(name)
    return default if value is None else value.strip()


def _boolean(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return _BOOLEANS[raw.strip().lower()]
    except KeyError:
        raise ConfigError(f"{name}={raw!r}: expects true/false (also yes/no, 1/0)") from None


def _number(env: Mapping[str, str], name: str, default: float, *, minimum: float,
            maximum: float = float("inf"), integer: bool = True) -> Any:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    kind = "a whole number" if integer else "a number"
    text = raw.strip()
    # int() and float() also take "1_025" and non-ASCII digits; a setting should not.
    if not (text.isascii() and re.fullmatch(r"-?[0-9]+" if integer else r"-?[0-9.eE+-]+",
                                             text)):
        raise ConfigError(f"{name}={raw!r}: expects {kind}")
    try:
        value = int(text) if integer else float(text)
    except ValueError:
        raise ConfigError(f"{name}={raw!r}: expects {kind}") from None
    if not minimum <= value <= maximum:
        upper = "" if maximum == float("inf") else f" and at most {maximum:g}"
        raise ConfigError(f"{name}={raw!r}: expects {kind} at least {minimum:g}{upper}")
    return value


def _domains(env: Mapping[str, str], name: str, default: str) -> DomainList:
    return parse_domain_list(_text(env, name, default), name)


def parse_domain_list(raw: str, name: str) -> DomainList:
    """`example.com,*.example.org` -> DomainList; ConfigError naming `name` if bad."""
    exact, parents = set(), []
    for entry in raw.split(","):
        entry = entry.strip()
        if not entry:
            raise ConfigError(
                f"{name}={raw!r}: expects a comma-separated list of domains "
                "(e.g. example.com,*.example.org) with no empty entries")
        wildcard = entry.startswith("*.")
        try:
            domain = normalize_domain(entry[2:] if wildcard else entry)
        except AddressError:
            raise ConfigError(
                f"{name}: {entry!r} is not a domain name; expects entries like "
                "example.com or *.example.com") from None
        if wildcard:
            parents.append("." + domain)
        else:
            exact.add(domain)
    return DomainList(frozenset(exact), tuple(parents))


def _secret(env: Mapping[str, str], name: str, default: str) -> str:
    """NAME, or the contents of the file NAME_FILE (Docker secrets); never both."""
    file_name = f"{name}_FILE"
    path = (env.get(file_name) or "").strip()
    if not path:
        return env.get(name, default)
    if env.get(name):  # an empty value counts as unset, as compose files write it
        raise ConfigError(f"{name} and {file_name} are both set: expects only one")
    try:
        with open(path, encoding="utf-8") as secret_file:
            value = secret_file.read()
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or "not UTF-8 text"
        raise ConfigError(f"{file_name}={path!r}: cannot read ({reason}): expects a "
                          "readable file holding the secret") from None
    return value.removesuffix("\n").removesuffix("\r")


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _networks(env: Mapping[str, str], name: str) -> tuple[Network, ...]:
    raw = _text(env, name, "")
    networks = []
    for entry in filter(None, (part.strip() for part in raw.split(","))):
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            raise ConfigError(f"{name}: {entry!r} is not a network; expects CIDR "
                              "entries like 10.0.0.0/8,192.168.1.20,fd00::/8") from None
    return tuple(networks)


AUTH_MECHANISMS = ("PLAIN", "LOGIN", "CRAM-MD5")
TLS_VERSIONS = {"1.0": ssl.TLSVersion.TLSv1, "1.1": ssl.TLSVersion.TLSv1_1,
                "1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
_BCRYPT_HASH = re.compile(r"\$2[aby]\$[0-3][0-9]\$[./A-Za-z0-9]{53}")


def _mechanisms(env: Mapping[str, str]) -> tuple[str, ...]:
    raw = _text(env, "AUTH_MECHANISMS", "PLAIN,LOGIN")
    names = tuple(part.strip().upper() for part in raw.split(",") if part.strip())
    unknown = [name for name in names if name not in AUTH_MECHANISMS]
    if not names or unknown:
        raise ConfigError(f"AUTH_MECHANISMS={raw!r}: expects a comma-separated list of "
                          + ", ".join(AUTH_MECHANISMS))
    return names


def _auth_password(env: Mapping[str, str]) -> str:
    password = _secret(env, "SMTP_AUTH_PASSWORD", DEFAULT_AUTH_PASSWORD)
    hashed = env.get("SMTP_AUTH_PASSWORD_HASH") or env.get("SMTP_AUTH_PASSWORD_HASH_FILE")
    if hashed:
        if env.get("SMTP_AUTH_PASSWORD") or env.get("SMTP_AUTH_PASSWORD_FILE"):
            raise ConfigError("SMTP_AUTH_PASSWORD and SMTP_AUTH_PASSWORD_HASH are both "
                              "set: expects only one")
        return ""  # the hash is the password
    return password


def _default_hostname() -> str:
    name = socket.gethostname()
    return name if _HOSTNAME_RE.fullmatch(name) else "localhost"


def load_config(env: Mapping[str, str]) -> Config:
    """Build the Config from environment variables; raise ConfigError on a bad value."""
    config = Config(
        auth_username=_text(env, "SMTP_AUTH_USERNAME", "user"),
        auth_password=_auth_password(env),
        allowed_from_domains=_domains(env, "ALLOWED_FROM_DOMAINS", "example.com"),
        allowed_to_domains=_domains(env, "ALLOWED_TO_DOMAINS", "example.com"),
        listen_host=_text(env, "LISTEN_HOST", "0.0.0.0"),
        listen_port=_number(env, "LISTEN_PORT", 1025, minimum=0, maximum=65535),
        use_tls=_boolean(env, "USE_TLS", False),
        tls_cert_file=_text(env, "TLS_CERT_FILE", "/etc/certs/server.crt"),
        tls_key_file=_text(env, "TLS_KEY_FILE", "/etc/certs/server.key"),
        relay_host=_text(env, "RELAY_HOST", "smtp.example.com"),
        relay_port=_number(env, "RELAY_PORT", 25, minimum=1, maximum=65535),
        relay_use_tls=_boolean(env, "RELAY_USE_TLS", True),
        relay_use_ssl=_boolean(env, "RELAY_USE_SSL", False),
        relay_username=_text(env, "RELAY_USERNAME", ""),
        relay_password=_secret(env, "RELAY_PASSWORD", ""),
        relay_tls_verify=_boolean(env, "RELAY_TLS_VERIFY", True),
        relay_tls_ca_file=_text(env, "RELAY_TLS_CA_FILE", ""),
        relay_pool_idle_seconds=_number(env, "RELAY_POOL_IDLE_SECONDS", 15.0, minimum=0,
                                        maximum=3600, integer=False),
        relay_pool_max_messages=_number(env, "RELAY_POOL_MAX_MESSAGES", 100, minimum=1),
        max_connections=_number(env, "MAX_CONNECTIONS", 50, minimum=1, maximum=10000),
        max_connections_per_ip=_number(env, "MAX_CONNECTIONS_PER_IP", 0, minimum=0,
                                       maximum=10000),
        timeout=_number(env, "TIMEOUT", 60.0, minimum=1, maximum=3600, integer=False),
        log_file=_text(env, "LOG_FILE", "logs/smtp-relay.log"),
        log_level=_text(env, "LOG_LEVEL", "INFO").upper(),
        max_message_size=_number(env, "MAX_MESSAGE_SIZE", 10485760, minimum=1024),
        max_recipients=_number(env, "MAX_RECIPIENTS", 100, minimum=1),
        smtp_hostname=_text(env, "SMTP_HOSTNAME", "") or _default_hostname(),
        auth_password_hash=_secret(env, "SMTP_AUTH_PASSWORD_HASH", "").strip(),
        auth_mechanisms=_mechanisms(env),
        auth_max_failures=_number(env, "AUTH_MAX_FAILURES", 5, minimum=0),
        auth_failure_window=_number(env, "AUTH_FAILURE_WINDOW", 300.0, minimum=1,
                                    integer=False),
        auth_failure_delay=_number(env, "AUTH_FAILURE_DELAY", 1.0, minimum=0,
                                   maximum=30, integer=False),
        rate_limit_per_minute=_number(env, "RATE_LIMIT_PER_MINUTE", 0, minimum=0),
        rate_limit_burst=_number(env, "RATE_LIMIT_BURST", 0, minimum=0),
        messages_per_day=_number(env, "MESSAGES_PER_DAY", 0, minimum=0),
        recipients_per_minute=_number(env, "RECIPIENTS_PER_MINUTE", 0, minimum=0),
        rate_limit_storage=_text(env, "RATE_LIMIT_STORAGE", "memory://"),
        allowed_client_networks=_networks(env, "ALLOWED_CLIENT_NETWORKS"),
        trusted_networks=_networks(env, "TRUSTED_NETWORKS"),
        trusted_networks_allow_public=_boolean(env, "TRUSTED_NETWORKS_ALLOW_PUBLIC",
                                               False),
        smtps_port=_number(env, "SMTPS_PORT", None, minimum=0, maximum=65535),
        tls_min_version=_text(env, "TLS_MIN_VERSION", "1.2"),
        max_hops=_number(env, "MAX_HOPS", 50, minimum=1),
        check_header_from=_boolean(env, "CHECK_HEADER_FROM", False),
        log_format=_text(env, "LOG_FORMAT", "text").lower(),
        log_max_bytes=_number(env, "LOG_MAX_BYTES", 10485760, minimum=0),
        log_backup_count=_number(env, "LOG_BACKUP_COUNT", 5, minimum=0, maximum=1000),
        http_host=_text(env, "HTTP_HOST", "0.0.0.0"),
        http_port=_number(env, "HTTP_PORT", None, minimum=0, maximum=65535),
        ready_probe_seconds=_number(env, "READY_PROBE_SECONDS", 30.0, minimum=1,
                                    maximum=86400, integer=False),
        users_file=_text(env, "SMTP_USERS_FILE", ""),
    )
    _check_consistency(config)
    return config


def _check_consistency(config: Config) -> None:
    if not config.auth_username or not (config.auth_password or config.auth_password_hash):
        raise ConfigError("SMTP_AUTH_USERNAME/SMTP_AUTH_PASSWORD: expects a non-empty "
                          "user name and password")
    if config.auth_password_hash:
        if not _BCRYPT_HASH.fullmatch(config.auth_password_hash):
            raise ConfigError("SMTP_AUTH_PASSWORD_HASH: expects a bcrypt hash ($2b$ or "
                              "$2y$, as `htpasswd -nB` or `python smtp_relay.py "
                              "hash-password` makes)")
        if "CRAM-MD5" in config.auth_mechanisms:
            raise ConfigError("AUTH_MECHANISMS includes CRAM-MD5, which needs the plain "
                              "password: expects SMTP_AUTH_PASSWORD, not "
                              "SMTP_AUTH_PASSWORD_HASH")
    if config.tls_min_version not in TLS_VERSIONS:
        raise ConfigError(f"TLS_MIN_VERSION={config.tls_min_version!r}: expects one of "
                          + ", ".join(TLS_VERSIONS))
    if config.rate_limit_burst and not config.rate_limit_per_minute:
        raise ConfigError("RATE_LIMIT_BURST is set: expects RATE_LIMIT_PER_MINUTE too")
    public = [str(network) for network in config.trusted_networks
              if not (network.is_private or network.is_loopback)]
    if public and not config.trusted_networks_allow_public:
        raise ConfigError(f"TRUSTED_NETWORKS includes {','.join(public)}, which is not a "
                          "private or loopback range: clients there could send without "
                          "AUTH. Expects private ranges, or "
                          "TRUSTED_NETWORKS_ALLOW_PUBLIC=true")
    if config.log_format not in ("text", "json"):
        raise ConfigError(f"LOG_FORMAT={config.log_format!r}: expects text or json")
    if config.log_level not in _LOG_LEVELS:
        raise ConfigError(f"LOG_LEVEL={config.log_level!r}: expects one of "
                          + ", ".join(_LOG_LEVELS))
    if not config.listen_host:
        raise ConfigError("LISTEN_HOST: expects an address to listen on, e.g. 0.0.0.0")
    if not config.relay_host or any(c.isspace() for c in config.relay_host):
        raise ConfigError(f"RELAY_HOST={config.relay_host!r}: expects the upstream's "
                          "host name or address")
    if not _HOSTNAME_RE.fullmatch(config.smtp_hostname):
        raise ConfigError(f"SMTP_HOSTNAME={config.smtp_hostname!r}: expects a host name")
    if config.relay_use_tls and config.relay_use_ssl:
        raise ConfigError("RELAY_USE_TLS and RELAY_USE_SSL are both on: expects at most "
                          "one (STARTTLS on a submission port, or implicit TLS on 465)")
    if config.relay_username and not (config.relay_use_tls or config.relay_use_ssl):
        raise ConfigError("RELAY_USERNAME is set but RELAY_USE_TLS and RELAY_USE_SSL are "
                          "off: expects TLS to the upstream, credentials are never sent "
                          "in clear")
    if config.relay_password and not config.relay_username:
        raise ConfigError("RELAY_PASSWORD is set: expects RELAY_USERNAME too")
    if config.relay_tls_ca_file and not os.path.isfile(config.relay_tls_ca_file):
        raise ConfigError(f"RELAY_TLS_CA_FILE={config.relay_tls_ca_file!r}: expects a "
                          "readable PEM file of CA certificates")
    if config.use_tls or config.smtps_port is not None:
        reason = "USE_TLS is on" if config.use_tls else "SMTPS_PORT is set"
        for name, path in (("TLS_CERT_FILE", config.tls_cert_file),
                           ("TLS_KEY_FILE", config.tls_key_file)):
            if not os.path.isfile(path):
                raise ConfigError(f"{name}={path!r}: expects a readable PEM file "
                                  f"({reason})")


def inbound_tls_context(config: Config) -> ssl.SSLContext:
    """The certificate clients see after STARTTLS (and on SMTPS_PORT)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = TLS_VERSIONS[config.tls_min_version]
    if context.minimum_version < ssl.TLSVersion.TLSv1_2:
        # OpenSSL's default security level refuses TLS 1.0/1.1 handshakes outright.
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
    try:
        context.load_cert_chain(config.tls_cert_file, config.tls_key_file)
    except (OSError, ssl.SSLError) as error:
        raise ConfigError(f"TLS_CERT_FILE/TLS_KEY_FILE: cannot load the certificate and "
                          f"key ({_one_line(error)}): expects a PEM certificate and its "
                          "matching private key") from None
    return context


def upstream_tls_context(config: Config) -> ssl.SSLContext:
    """Verifying by default: without a context smtplib checks nothing at all."""
    try:
        context = ssl.create_default_context(cafile=config.relay_tls_ca_file or None)
    except (OSError, ssl.SSLError) as error:
        raise ConfigError(f"RELAY_TLS_CA_FILE={config.relay_tls_ca_file!r}: cannot load "
                          f"({_one_line(error)}): expects PEM CA certificates") from None
    if not config.relay_tls_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


# ---------------------------------------------------------------------------------------
# Logging: one line per event, `event key=value ...`, the same keys for the same things
# (peer, user, id, from, to) so one grep follows a message from MAIL to the upstream.
# ---------------------------------------------------------------------------------------

_NEEDS_QUOTES = re.compile(r'[\s"=]')


def _one_line(value: object) -> str:
    """Printable, single-line text: peers and upstreams control some of what we log."""
    text = value if isinstance(value, str) else str(value)
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else "?" for ch in text.replace("\n", " "))


def _field(value: object) -> str:
    if isinstance(value, (list, tuple)):
        value = ",".join(map(str, value))
    text = _one_line(value)
    if not text or _NEEDS_QUOTES.search(text):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text


def log_event(level: int, event: str, session: Session | None = None, **fields: Any) -> None:
    if not log.isEnabledFor(level):
        return
    if session is not None:
        fields = {"id": getattr(session, "message_id", None),
                  "peer": getattr(session, "peer_ip", None),
                  "user": session_user(session), **fields}
    log.log(level, event, extra={"event": event, "fields": fields})


def session_user(session: Session) -> str | None:
    user = getattr(session, "user", None)
    if user is None and getattr(session, "trusted", False):
        return f"trusted:{session.peer_ip}"
    return user


class _TextFormatter(logging.Formatter):
    """`2026-11-21 23:20:44,445 INFO event key=value ...`, the date part built once a
    second (strftime on every line is a measurable share of the relay's CPU)."""

    _second, _date = -1, ""

    def timestamp(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        if second != self._second:
            self._second = second
            self._date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
        return f"{self._date},{int(record.msecs):03d}"

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", None)
        if fields is None:  # a plain log.warning(...): start-up notes, library lines
            text = _one_line(record.getMessage())
        else:
            text = " ".join([record.event] + [f"{key}={_field(value)}"
                                              for key, value in fields.items()
                                              if value is not None])
        line = f"{self.timestamp(record)} {record.levelname} {text}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class _JSONFormatter(_TextFormatter):
    """One JSON object per line. The keys in JSON_KEYS are always present (null when
    they do not apply), so a log pipeline can rely on them; other fields follow."""

    JSON_KEYS = ("time", "level", "event", "id", "peer", "user", "from", "to", "size",
                 "upstream", "duration_ms")

    def format(self, record: logging.LogRecord) -> str:
        fields = dict(getattr(record, "fields", None) or {})
        entry: dict[str, Any] = dict.fromkeys(self.JSON_KEYS)
        entry.update(time=self.timestamp(record), level=record.levelname,
                     event=getattr(record, "event", "message"))
        if not hasattr(record, "fields"):
            entry["message"] = record.getMessage()
        for key, value in fields.items():
            entry[key] = value if isinstance(value, (int, float, type(None))) else (
                list(value) if isinstance(value, (list, tuple)) else str(value))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return _JSON_UNSAFE.sub(_json_safe, json.dumps(entry, ensure_ascii=False))


# What json.dumps(ensure_ascii=False) leaves raw inside strings that a log line cannot
# carry: lone surrogates (a client's invalid UTF-8 bytes, which aiosmtpd decodes with
# surrogateescape, cannot be written as UTF-8 at all), and characters that some
# readers take for line breaks (U+0085, U+2028, U+2029; JavaScript, str.splitlines).
_JSON_UNSAFE = re.compile(r"[\ud800-\udfff\u0085\u2028\u2029]")


def _json_safe(match: re.Match[str]) -> str:
    char = ord(match.group())
    if 0xDC80 <= char <= 0xDCFF:  # the byte the client sent, shown as text: \xff
        return f"\\\\x{char - 0xDC00:02x}"
    if 0xD800 <= char <= 0xDFFF:
        return "\\ufffd"
    return f"\\u{char:04x}"


class _LogHandler(logging.Handler):
    """Writes each line, formatted once, to stderr and to LOG_FILE.

    The file rotates at LOG_MAX_BYTES (LOG_BACKUP_COUNT old files: .1 newest), and
    reopen() (on SIGHUP) starts a new file after an external logrotate moved it.
    """

    def __init__(self, path: str, max_bytes: int, backup_count: int):
        super().__init__()
        self.path, self.max_bytes, self.backup_count = path, max_bytes, backup_count
        self.file: Any = None
        self.size = 0
        if path:
            self.reopen()

    def reopen(self) -> None:
        """Open the file anew (first, so a failure keeps the old one in use)."""
        new = open(self.path, "a", encoding="utf-8",  # noqa: SIM115
                   errors="backslashreplace")  # never a line lost to an odd character
        with self.lock:
            old, self.file, self.size = self.file, new, new.tell()
        if old is not None:
            old.close()

    def _rotate(self) -> None:
        self.file.close()
        for number in range(self.backup_count - 1, 0, -1):
            older = f"{self.path}.{number}"
            if os.path.exists(older):
                os.replace(older, f"{self.path}.{number + 1}")
        if self.backup_count > 0:
            os.replace(self.path, f"{self.path}.1")
        self.file = open(self.path, "w", encoding="utf-8",  # noqa: SIM115
                         errors="backslashreplace")
        self.size = 0

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + "\n"
            sys.stderr.write(line)
            sys.stderr.flush()
            if self.file is not None:
                length = len(line) if line.isascii() else len(
                    line.encode("utf-8", "backslashreplace"))
                if self.max_bytes and self.size and self.size + length > self.max_bytes:
                    self._rotate()
                self.file.write(line)
                self.file.flush()
                self.size += length
        except Exception:  # noqa: BLE001 (a logging failure must never break a delivery)
            self.handleError(record)


def setup_logging(config: Config) -> _LogHandler:
    """stderr and LOG_FILE, one line per event; aiosmtpd's chatter only at DEBUG."""
    try:
        directory = os.path.dirname(config.log_file)
        if directory:
            os.makedirs(directory, exist_ok=True)
        handler = _LogHandler(config.log_file, config.log_max_bytes,
                              config.log_backup_count)
    except OSError as error:
        raise ConfigError(f"LOG_FILE={config.log_file!r}: cannot open "
                          f"({error.strerror}): expects a writable file path") from None
    handler.setFormatter(_JSONFormatter() if config.log_format == "json"
                         else _TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(config.log_level)
    # Fields our lines never show; the logging docs' own advice for less overhead
    # (_srcfile = None skips walking the stack for the caller on every line).
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logging._srcfile = None
    # aiosmtpd logs every command line at INFO on "mail.log": noise, and slow.
    library = logging.getLogger("mail.log")
    library.setLevel(logging.DEBUG if config.log_level == "DEBUG" else logging.WARNING)
    if not any(isinstance(f, _HideAuthData) for f in library.filters):
        library.addFilter(_HideAuthData())
    return handler


# What aiosmtpd may name in its lines (the first word of a command line).
_SMTP_VERBS = frozenset({
    "HELO", "EHLO", "LHLO", "MAIL", "RCPT", "DATA", "BDAT", "RSET", "VRFY", "EXPN",
    "HELP", "NOOP", "QUIT", "STARTTLS", "AUTH", "TURN", "ETRN", "ATRN", "SEND", "SOML",
    "SAML", "XCLIENT", "XFORWARD", "PROXY"})
_SASL_MECHANISMS = frozenset({
    "PLAIN", "LOGIN", "CRAM-MD5", "DIGEST-MD5", "XOAUTH2", "OAUTHBEARER", "GSSAPI",
    "NTLM", "ANONYMOUS", "EXTERNAL", "SCRAM-SHA-1", "SCRAM-SHA-256"})
_HIDDEN = "********"


def hide_auth_data(line: bytes | str) -> bytes | str:
    """A client's line as it may be logged: after `AUTH <mechanism>` nothing shown, and
    nothing of a line that is not an SMTP command at all (a base64 password sent after
    the AUTH was refused, a raw password answering a prompt...)."""
    text = line.decode("ascii", "replace") if isinstance(line, bytes) else line
    words = text.split(None, 2)
    verb = words[0].upper() if words else ""
    if verb == "AUTH":
        keep = "AUTH " + words[1] if len(words) > 1 and \
            words[1].upper() in _SASL_MECHANISMS else "AUTH"
        shown = keep if keep.count(" ") + 1 == len(words) else f"{keep} {_HIDDEN}"
    elif verb in _SMTP_VERBS or not words:
        return line
    else:
        shown = f"{_HIDDEN} (not an SMTP command: not shown)"
    return shown.encode() if isinstance(line, bytes) else shown


class _HideAuthData(logging.Filter):
    """On aiosmtpd's "mail.log" (shown at LOG_LEVEL=DEBUG, warnings always): no AUTH
    data. aiosmtpd masks only `AUTH <mechanism> <response>` in upper case; a client's
    password also reaches its lines in lower-case commands, as the text of a
    "can't decode base64" line, and as "commands" sent after a refused AUTH."""

    # aiosmtpd's formats whose arguments are what the client sent.
    CLIENT_LINES = ("_handle_client readline: %r", "%r >> %r", "%r unrecognised: %s")

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if not isinstance(args, tuple):
            return True
        if record.msg == "%r can't decode base64: %s":
            record.args = (*args[:1], _HIDDEN)
        elif record.msg in self.CLIENT_LINES:
            record.args = tuple(hide_auth_data(a) if isinstance(a, (bytes, str)) else a
                                for a in args)
        else:  # any other line of theirs: at least no AUTH response
            record.args = tuple(hide_auth_data(a) if isinstance(a, (bytes, str)) and
                                a[:4].upper() in ("AUTH", b"AUTH") else a for a in args)
        return True


class Metrics:
    """Prometheus metrics, served on /metrics when HTTP_PORT is set. Every metric about
    a message carries the user (for trusted-network clients: trusted:<address>)."""

    def __init__(self) -> None:
        self.registry = prometheus_client.CollectorRegistry()
        registry = self.registry
        self.connections_open = prometheus_client.Gauge(
            "smtp_relay_connections_open", "Client connections open now.",
            registry=registry)
        self.connections = prometheus_client.Counter(
            "smtp_relay_connections", "Client connections accepted.", registry=registry)
        self.connections_refused = prometheus_client.Counter(
            "smtp_relay_connections_refused",
            "Client connections refused at the greeting.", ["reason"],
            registry=registry)
        self.auth = prometheus_client.Counter(
            "smtp_relay_auth", "AUTH attempts.", ["result"], registry=registry)
        self.messages_accepted = prometheus_client.Counter(
            "smtp_relay_messages_accepted",
            "Messages the upstream accepted (the client got 250).", ["user"],
            registry=registry)
        self.messages_rejected = prometheus_client.Counter(
            "smtp_relay_messages_rejected",
            "Refused MAIL, RCPT or DATA, by reason.", ["reason", "user"],
            registry=registry)
        self.recipients = prometheus_client.Counter(
            "smtp_relay_recipients", "Recipients of accepted messages.", ["user"],
            registry=registry)
        self.bytes = prometheus_client.Counter(
            "smtp_relay_bytes", "Bytes of accepted messages.", ["user"],
            registry=registry)
        self.upstream_duration = prometheus_client.Histogram(
            "smtp_relay_upstream_delivery_seconds",
            "From sending DATA upstream to the upstream's final reply.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=registry)
        self.upstream_sessions_open = prometheus_client.Gauge(
            "smtp_relay_upstream_sessions_open", "Upstream sessions open (pooled or "
            "in use).", registry=registry)
        self.upstream_sessions_opened = prometheus_client.Counter(
            "smtp_relay_upstream_sessions_opened", "Upstream sessions opened.",
            registry=registry)
        self.upstream_sessions_reused = prometheus_client.Counter(
            "smtp_relay_upstream_sessions_reused",
            "Transactions that reused a pooled upstream session.", registry=registry)

    def rejected(self, reason: str, session: Session) -> None:
        self.messages_rejected.labels(reason, session_user(session) or "-").inc()


def rejection_reason(reply: str) -> str:
    """Metric label for an upstream refusal."""
    return "upstream_4xx" if reply[:1] == "4" else "upstream_5xx"


# ---------------------------------------------------------------------------------------
# Auth
# ---------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class UserPolicy:
    """What one user may do; a session keeps the policy it had at AUTH."""

    name: str
    allowed_from_domains: DomainList
    allowed_to_domains: DomainList
    rate_limit_per_minute: int | None = None  # None: RATE_LIMIT_PER_MINUTE


@dataclasses.dataclass(frozen=True)
class User:
    policy: UserPolicy
    password: bytes = b""  # the env user's plain password, or
    password_hash: bytes = b""  # a bcrypt hash


USERS_FILE_FORMAT = ("name:bcrypt-hash[:sender-domains[:recipient-domains"
                     "[:messages-per-minute]]]")
_USER_NAME = re.compile(r"[^\s:]{1,128}")


def default_policy(config: Config, name: str = "") -> UserPolicy:
    return UserPolicy(name, config.allowed_from_domains, config.allowed_to_domains)


def parse_users_file(text: str, config: Config) -> dict[str, User]:
    """SMTP_USERS_FILE: one user per line, `#` comments and blank lines ignored:

        name:bcrypt-hash[:sender-domains[:recipient-domains[:messages-per-minute]]]

    Domain fields are comma lists like ALLOWED_FROM_DOMAINS; an empty or missing field
    falls back to ALLOWED_FROM_DOMAINS / ALLOWED_TO_DOMAINS / RATE_LIMIT_PER_MINUTE.
    """
    users: dict[str, User] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"SMTP_USERS_FILE line {number}"
        fields = line.split(":")
        if not 2 <= len(fields) <= 5:
            raise ConfigError(f"{where}: expects {USERS_FILE_FORMAT}")
        name, hashed, senders, recipients, rate = (fields + ["", "", ""])[:5]
        if not _USER_NAME.fullmatch(name):
            raise ConfigError(f"{where}: expects a user name without spaces or colons")
        if name in users:
            raise ConfigError(f"{where}: user {name!r} is listed twice")
        if not _BCRYPT_HASH.fullmatch(hashed):
            raise ConfigError(f"{where}: expects a bcrypt hash ($2b$ or $2y$) after "
                              f"the name (python smtp_relay.py hash-password)")
        rate = rate.strip()
        if rate and not (rate.isascii() and rate.isdigit()):
            raise ConfigError(f"{where}: expects a whole number of messages per minute")
        policy = UserPolicy(
            name,
            parse_domain_list(senders, f"{where} sender domains")
            if senders.strip() else config.allowed_from_domains,
            parse_domain_list(recipients, f"{where} recipient domains")
            if recipients.strip() else config.allowed_to_domains,
            int(rate) if rate else None)
        users[name] = User(policy, password_hash=hashed.encode("ascii"))
    return users


def load_users(config: Config) -> dict[str, User]:
    """The env user (SMTP_AUTH_USERNAME) and SMTP_USERS_FILE's users together."""
    users: dict[str, User] = {}
    # With a users file, the env user exists only when given a password of its own:
    # the built-in default must not stay a way in.
    env_user_set = config.auth_password_hash or config.auth_password != \
        DEFAULT_AUTH_PASSWORD
    if not config.users_file or env_user_set:
        users[config.auth_username] = User(
            default_policy(config, config.auth_username),
            config.auth_password.encode("utf-8"),
            config.auth_password_hash.encode("ascii"))
    if config.users_file:
        try:
            with open(config.users_file, encoding="utf-8") as users_file:
                text = users_file.read()
        except (OSError, UnicodeDecodeError) as error:
            reason = getattr(error, "strerror", None) or "not UTF-8 text"
            raise ConfigError(f"SMTP_USERS_FILE={config.users_file!r}: cannot read "
                              f"({reason}): expects a readable users file") from None
        for name, user in parse_users_file(text, config).items():
            if name in users:
                raise ConfigError(f"SMTP_USERS_FILE: user {name!r} is also "
                                  "SMTP_AUTH_USERNAME: expects each name once")
            users[name] = user
    return users


BCRYPT_WORKERS = max(2, min(4, os.cpu_count() or 2))
BCRYPT_CHECKS_PER_ADDRESS = max(1, BCRYPT_WORKERS // 2)
BCRYPT_MAX_PASSWORD = 72  # bytes bcrypt reads; `htpasswd -B` ignores the rest


class _Gate:
    """A per-address semaphore, kept only while someone uses it."""

    def __init__(self) -> None:
        self.semaphore = asyncio.Semaphore(BCRYPT_CHECKS_PER_ADDRESS)
        self.users = 0


class SMTPAuthHandler:
    """Checks AUTH credentials (PLAIN, LOGIN, CRAM-MD5) against the configured user.

    aiosmtpd calls an authenticator synchronously, but a bcrypt check takes a good part
    of a second, so `__call__` only captures the credentials and `verify` (awaited by
    the protocol's smtp_AUTH) checks them. Name and password are both compared in
    constant time, so timing says nothing about which was wrong.

    bcrypt runs on its own small pool (never the one that carries deliveries), at most
    BCRYPT_CHECKS_PER_ADDRESS at a time for one client address. A check waits for its
    turn here, not in the pool's queue, so the check of a client that left while
    waiting never runs; a running check keeps its turn until bcrypt returns.
    """

    def __init__(self, config: Config, executor: concurrent.futures.Executor | None = None):
        self.users = load_users(config)
        self._executor = executor or concurrent.futures.ThreadPoolExecutor(
            max_workers=BCRYPT_WORKERS, thread_name_prefix="bcrypt")
        self._workers = asyncio.Semaphore(BCRYPT_WORKERS)
        self._gates: dict[str, _Gate] = {}
        # Keyed digests of (user, password) pairs bcrypt already accepted, so a busy
        # client does not cost a bcrypt run per connection. Never the password itself.
        # One set per users generation: reload() starts a new one.
        self._cache_key = secrets.token_bytes(32)
        self._accepted: set[bytes] = set()
        self._dummy_hash = b""  # made on first need (see _hash_for_unknown_names)

    def reload(self, config: Config) -> int:
        """Re-read SMTP_USERS_FILE (SIGHUP). On error keep the old users and raise."""
        users = load_users(config)
        self.users, self._accepted = users, set()
        return len(users)

    def __call__(self, server: SMTP, session: Session, envelope: Any, mechanism: str,
                 auth_data: Any) -> AuthResult:
        session.credentials = (mechanism, auth_data)
        return AuthResult(success=False, handled=True)  # the protocol answers

    async def verify(self, mechanism: str, credentials: Any, address: str = ""
                     ) -> User | None:
        """The user these credentials prove, or None. `address` is the client's, for
        the limit on concurrent checks per address."""
        for _ in range(3):
            generation = self._accepted
            user = await self._verify(mechanism, credentials, address)
            if self._accepted is generation:
                return user
            # SIGHUP reloaded the users during the check: the verdict was about users
            # that are gone. Check against the new ones.
        return None

    async def _verify(self, mechanism: str, credentials: Any, address: str
                      ) -> User | None:
        if mechanism == "CRAM-MD5":
            login, challenge, digest = credentials
            user = self.users.get(login.decode("utf-8", "replace"))
            secret = user.password if user is not None and user.password else \
                secrets.token_bytes(16)  # no plain password: cannot match
            expected = hmac.new(secret, challenge, "md5").hexdigest().encode()
            return user if hmac.compare_digest(digest, expected) else None
        if not isinstance(credentials, LoginPassword):
            return None
        user = self.users.get(credentials.login.decode("utf-8", "replace"))
        if user is not None and user.password:
            ok = hmac.compare_digest(credentials.password, user.password)
            return user if ok else None
        accepted = self._accepted  # this generation's
        cache_key = hmac.new(self._cache_key, credentials.login + b"\0" +
                             credentials.password, "sha256").digest()
        if user is not None and cache_key in accepted:
            return user
        hashed = user.password_hash if user is not None else \
            await self._in_pool(address, self._hash_for_unknown_names)
        if not hashed:
            return None
        # bcrypt reads 72 bytes (bcrypt 5 refuses more): what `htpasswd -B` hashed.
        ok = await self._in_pool(address, bcrypt.checkpw,
                                 credentials.password[:BCRYPT_MAX_PASSWORD], hashed)
        if ok and user is not None:
            accepted.add(cache_key)
            return user
        return None

    async def _in_pool(self, address: str, function: Callable, *args: Any) -> Any:
        """function(*args) on the bcrypt pool, once this address and the pool have a
        free turn. Cancelled while waiting: it never runs."""
        gate = self._gates.get(address)
        if gate is None:
            gate = self._gates[address] = _Gate()
        gate.users += 1
        try:
            await gate.semaphore.acquire()
            try:
                await self._workers.acquire()
            except BaseException:
                gate.semaphore.release()
                raise
        except BaseException:
            self._leave(address, gate)
            raise
        try:
            future = asyncio.get_running_loop().run_in_executor(self._executor,
                                                                function, *args)
        except BaseException:  # the pool is shut down: stopping
            self._workers.release()
            gate.semaphore.release()
            self._leave(address, gate)
            raise
        future.add_done_callback(functools.partial(self._check_done, address, gate))
        # Shielded: a client that leaves does not end the check early, so its turn
        # stays taken until bcrypt returns.
        return await asyncio.shield(future)

    def _check_done(self, address: str, gate: _Gate, future: asyncio.Future) -> None:
        if not future.cancelled():
            future.exception()  # retrieved, even when its client is gone
        self._workers.release()
        gate.semaphore.release()
        self._leave(address, gate)

    def _leave(self, address: str, gate: _Gate) -> None:
        gate.users -= 1
        if gate.users == 0 and self._gates.get(address) is gate:
            del self._gates[address]

    def _hash_for_unknown_names(self) -> bytes:
        """A hash as costly as the users' own, so that an unknown name takes as long
        to refuse as a wrong password (timing must not tell which names exist)."""
        costs = [int(user.password_hash[4:6]) for user in self.users.values()
                 if user.password_hash]
        if costs and not self._dummy_hash:
            self._dummy_hash = bcrypt.hashpw(b"-", bcrypt.gensalt(max(costs)))
        return self._dummy_hash if costs else b""

    @staticmethod
    def attempted_user(mechanism: str, credentials: Any) -> str:
        login = credentials[0] if mechanism == "CRAM-MD5" else getattr(
            credentials, "login", b"")
        return login.decode("utf-8", "replace")[:128]


class AuthGuard:
    """Counts failed AUTH per client IP. AUTH_MAX_FAILURES of them within
    AUTH_FAILURE_WINDOW seconds lock that IP out for AUTH_FAILURE_WINDOW seconds."""

    MAX_TRACKED_ADDRESSES = 100_000  # memory bound under a distributed attack

    def __init__(self, max_failures: int, window: float):
        self.max_failures = max_failures
        self.window = window
        self._failures: dict[str, collections.deque[float]] = {}
        self._locked_until: dict[str, float] = {}

    def locked(self, address: str) -> bool:
        until = self._locked_until.get(address)
        if until is None:
            return False
        if time.monotonic() < until:
            return True
        del self._locked_until[address]
        return False

    def record_failure(self, address: str) -> bool:
        """Count one failure; True when it locks the address out."""
        if self.max_failures <= 0:
            return False
        now = time.monotonic()
        if address not in self._failures and len(self._failures) >= \
                self.MAX_TRACKED_ADDRESSES:
            self._forget_before(now - self.window)
            if len(self._failures) >= self.MAX_TRACKED_ADDRESSES:
                self._failures.pop(next(iter(self._failures)))
        failures = self._failures.setdefault(address, collections.deque())
        while failures and failures[0] < now - self.window:
            failures.popleft()
        failures.append(now)
        if len(failures) < self.max_failures:
            return False
        # The failures stay (until they age out): withdraw() may take one back. They
        # are all older than the window when the lock-out ends, so none counts again.
        self._locked_until[address] = now + self.window
        return True

    def withdraw(self, address: str) -> None:
        """Take back a failure counted before its check (record_failure): the
        credentials were right. A lock-out it completed is lifted too."""
        failures = self._failures.get(address)
        if not failures:
            return
        failures.pop()
        if len(failures) < self.max_failures:
            self._locked_until.pop(address, None)
        if not failures:
            del self._failures[address]

    def _forget_before(self, oldest: float) -> None:
        for address in [a for a, f in self._failures.items() if f[-1] < oldest]:
            del self._failures[address]
        now = time.monotonic()
        for address in [a for a, u in self._locked_until.items() if u <= now]:
            del self._locked_until[address]


class TokenBucket:
    """RATE_LIMIT_BURST messages in a row, then one each 60/RATE_LIMIT_PER_MINUTE s:
    a token bucket of `burst` tokens refilled at the rate, kept as GCRA's theoretical
    arrival time (TAT, in ms) in the rate-limit storage.

    Only the storage's atomic counter operations are used (get and incr, which every
    `limits` storage has), so relays sharing a Redis share the bucket: the new TAT is
    added, not set, and when the sum is not what this relay computed (another relay
    took a token in between) the addition is undone and the check runs again. The TAT
    is at most `burst` intervals ahead, so it lives under a key per period of that
    length: the current period's and the previous one's hold every TAT that matters,
    and older keys expire on their own.
    """

    ATTEMPTS = 5

    def __init__(self, storage: Any, per_minute: int, burst: int,
                 clock: Callable[[], float]):
        self.storage, self.clock = storage, clock
        self.interval = max(1, round(60000 / per_minute))  # ms per token
        self.tolerance = (burst - 1) * self.interval  # how far ahead the TAT may be
        self.period = burst * self.interval
        self.expiry = math.ceil(2 * self.period / 1000) + 1  # s: two periods at least
        self.prefix = f"smtp-relay/bucket/{self.interval}/{burst}/"

    async def take(self, key: str) -> float | None:
        """Take a token: None when taken, else the seconds until there is one."""
        for _ in range(self.ATTEMPTS):
            now = int(self.clock() * 1000)
            window = now // self.period
            current = f"{self.prefix}{key}/{window}"
            stored = await self.storage.get(current)
            tat = max(stored, await self.storage.get(f"{self.prefix}{key}/{window - 1}"),
                      now)
            if tat - now > self.tolerance:
                return (tat - self.tolerance - now) / 1000
            step = tat + self.interval - stored
            if await self.storage.incr(current, self.expiry, step) == tat + self.interval:
                return None
            await self.storage.incr(current, self.expiry, -step)  # raced: undo, again
        return self.interval / 1000  # contended throughout: refuse, for now


class RateLimiter:
    """Per-sender quotas: messages per minute (a token bucket of RATE_LIMIT_BURST
    when that is set), per day, and recipients per minute. The sender is the
    authenticated user, or the client IP for trusted-network clients.

    Built on the `limits` package (moving windows; the token bucket on its storage);
    its storage is a URI, so RATE_LIMIT_STORAGE can point several relays at one
    shared Redis.
    """

    def __init__(self, config: Config, clock: Callable[[], float] = time.time):
        self.config = config
        self.clock = clock  # the token buckets' (tests move it)
        self._message_limits: dict[int, list[tuple[Any, str]]] = {}
        self.recipient_limit = (RateLimitItemPerMinute(config.recipients_per_minute)
                                if config.recipients_per_minute else None)
        uri = config.rate_limit_storage
        try:
            storage = storage_from_string(uri if uri.startswith("async+") else
                                          f"async+{uri}")
        except (ConfigurationError, ValueError, ImportError) as error:
            detail = _one_line(error).replace(uri, redact_url(uri))
            for secret in url_secrets(uri):
                detail = detail.replace(secret, "***")
            raise ConfigError(f"RATE_LIMIT_STORAGE={redact_url(uri)!r}: {detail}: "
                              "expects a `limits` storage URI such as memory:// or "
                              "redis://host:6379") from None
        self.storage = storage
        self.strategy = MovingWindowRateLimiter(storage)

    def message_limits(self, per_minute: int | None) -> list[tuple[Any, str]]:
        """The limits for one more message; `per_minute` is a user's own rate (SMTP_
        USERS_FILE), None for RATE_LIMIT_PER_MINUTE."""
        per_minute = self.config.rate_limit_per_minute if per_minute is None else \
            per_minute
        limits = self._message_limits.get(per_minute)
        if limits is not None:
            return limits
        limits, burst = [], self.config.rate_limit_burst
        if per_minute and burst:
            limits.append((TokenBucket(self.storage, per_minute, burst, self.clock),
                           f"{burst} messages in a row, then {per_minute} per minute"))
        elif per_minute:  # no burst: a plain limit, at most this many in any minute
            limits.append((RateLimitItemPerMinute(per_minute),
                           f"{per_minute} messages per minute"))
        if self.config.messages_per_day:
            limits.append((RateLimitItemPerDay(self.config.messages_per_day),
                           f"{self.config.messages_per_day} messages per day"))
        self._message_limits[per_minute] = limits
        return limits

    async def check_message(self, key: str, per_minute: int | None = None) -> str | None:
        """None when one more message is allowed (and counted), else the reply."""
        limits = self.message_limits(per_minute)
        windows = [(item, text) for item, text in limits
                   if not isinstance(item, TokenBucket)]
        for item, text in windows:
            if not await self.strategy.test(item, key):
                return await self._refusal(item, key, text)
        for item, text in limits:  # only once every window has room: a token is taken
            if isinstance(item, TokenBucket):
                wait = await item.take(key)
                if wait is not None:
                    return self._reply(text, wait)
        for item, _ in windows:
            await self.strategy.hit(item, key)
        return None

    async def check_recipient(self, key: str) -> str | None:
        item = self.recipient_limit
        if item is None or await self.strategy.hit(item, key):
            return None
        return await self._refusal(
            item, key, f"{item.amount} recipients per minute")

    async def _refusal(self, item: Any, key: str, text: str) -> str:
        stats = await self.strategy.get_window_stats(item, key)
        return self._reply(text, stats.reset_time - time.time())

    @staticmethod
    def _reply(text: str, wait: float) -> str:
        return (f"451 4.7.1 Rate limit reached ({text}): try again in "
                f"{max(1, math.ceil(wait))} s")


# ---------------------------------------------------------------------------------------
# Policy: pure functions, no I/O
# ---------------------------------------------------------------------------------------

class AddressError(ValueError):
    """An address is refused. `code` and the text are what the client is told."""

    def __init__(self, reason: str, code: str = "553 5.1.3"):
        super().__init__(reason)
        self.code = code

    @property
    def reply(self) -> str:
        return f"{self.code} {self}"


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
_HOSTNAME_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?")
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


# ---------------------------------------------------------------------------------------
# Forwarding: blocking smtplib calls, run in worker threads so the event loop never waits
# ---------------------------------------------------------------------------------------

class UpstreamError(Exception):
    """The upstream could not be reached or dropped us. `reply` is for the client."""

    def __init__(self, reason: str, reply: str = "451 4.4.1"):
        super().__init__(reason)
        self.reply = f"{reply} Upstream unavailable: {_one_line(reason)[:200]}"


Reply = tuple[int, str]


def _reply_text(message: bytes | str) -> str:
    if isinstance(message, bytes):
        message = message.decode("utf-8", "replace")
    return _one_line(" ".join(message.split("\n"))).strip()[:400]


def _final(code: int) -> bool:
    """A completion reply (2xx, 4xx, 5xx) other than 421 (the upstream is closing)."""
    return code != 421 and (200 <= code < 300 or 400 <= code < 600)


# The data goes upstream in pieces, each allowed TIMEOUT to make progress: a large
# message to a slow upstream may take longer in all. A kernel send buffer of its own
# size would let the upload "finish" long before the upstream has read it, so it is
# kept small, and the reply after the final dot is awaited only once the upstream has
# taken what the kernel still held (Linux tells: TIOCOUTQ), again TIMEOUT per progress.
_DATA_CHUNK = 64 * 1024
_UPSTREAM_SEND_BUFFER = 256 * 1024
_OUTQ = getattr(termios, "TIOCOUTQ", None)


def _unacknowledged(sock: socket.socket) -> int:
    """Bytes sent on `sock` that the peer has not acknowledged yet (0 when unknown)."""
    if _OUTQ is None:
        return 0
    try:
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), _OUTQ, b"\0" * 4))[0]
    except (OSError, ValueError):
        return 0


class UpstreamConnection:
    """One authenticated session to the upstream. Every method blocks: threads only."""

    def __init__(self, config: Config, tls_context: ssl.SSLContext | None):
        self.config = config
        self.tls_context = tls_context
        self.smtp: smtplib.SMTP | None = None
        self.messages_sent = 0
        self.idle_since = 0.0
        self.reused = False
        self.discarded = False  # handed to UpstreamPool.discard (closing or closed)

    def open(self) -> None:
        """Connect, EHLO, STARTTLS (required when RELAY_USE_TLS), EHLO, AUTH."""
        config, step = self.config, "connect"
        try:
            if config.relay_use_ssl:
                smtp = smtplib.SMTP_SSL(config.relay_host, config.relay_port,
                                        local_hostname=config.smtp_hostname,
                                        timeout=config.timeout, context=self.tls_context)
            else:
                smtp = smtplib.SMTP(config.relay_host, config.relay_port,
                                    local_hostname=config.smtp_hostname,
                                    timeout=config.timeout)
            self.smtp = smtp
            try:
                if smtp.sock is not None:
                    smtp.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF,
                                         _UPSTREAM_SEND_BUFFER)
            except OSError:
                pass  # the kernel's default then; the upload is still paced per piece
            step = "EHLO"
            code, message = smtp.ehlo()
            if code != 250:
                raise UpstreamError(f"EHLO refused: {code} {_reply_text(message)}")
            if config.relay_use_tls:
                step = "STARTTLS"
                if not smtp.has_extn("starttls"):
                    raise UpstreamError("upstream does not offer STARTTLS "
                                        "(RELAY_USE_TLS is on)")
                code, message = smtp.starttls(context=self.tls_context)
                smtp.ehlo()
            if config.relay_username:
                step = "AUTH"
                smtp.login(config.relay_username, config.relay_password)
        except UpstreamError:
            self.close()
            raise
        except smtplib.SMTPAuthenticationError as error:
            self.close()
            raise UpstreamError(f"upstream refused our credentials ({error.smtp_code} "
                                f"{_reply_text(error.smtp_error)})", "451 4.7.0") from None
        except (smtplib.SMTPException, OSError, ValueError) as error:
            self.close()
            raise UpstreamError(f"{step} to {config.relay_host}:{config.relay_port} "
                                f"failed: {_describe(error)}") from None

    def has(self, extension: str) -> bool:
        return bool(extension) and self.smtp is not None and self.smtp.has_extn(extension)

    def command(self, verb: str, argument: str) -> Reply:
        assert self.smtp is not None
        code, message = self.smtp.docmd(verb, argument)
        return code, _reply_text(message)

    def data(self, stuffed: bytes) -> tuple[bool, int, str]:
        """DATA with a message that is already dot-stuffed and ends in CRLF (as the
        client sent it), so it goes out without being unstuffed and stuffed again.

        Returns (sent, code, text): `sent` is False when the upstream answered the DATA
        command itself instead of 354 (nothing was sent; its transaction is still
        open), True when the reply is the one after the final dot."""
        smtp = self.smtp
        assert smtp is not None
        smtp.putcmd("data")
        code, reply = smtp.getreply()
        if code != 354:
            return False, code, _reply_text(reply)
        try:
            if smtp.sock is None:
                raise smtplib.SMTPServerDisconnected("connection closed by upstream")
            self._upload(smtp.sock, stuffed)
        except OSError:
            smtp.close()  # half a message is in the way: no QUIT, just close
            raise
        code, reply = smtp.getreply()  # waits up to TIMEOUT
        return True, code, _reply_text(reply)

    def _upload(self, sock: socket.socket, stuffed: bytes) -> None:
        """Send the data and the final dot; each send waits up to TIMEOUT for room.
        Then wait until the upstream has taken it all (or has answered early)."""
        view = memoryview(stuffed + b".\r\n")  # one piece: no Nagle wait for the dot
        sent, total = 0, len(view)
        while sent < total:
            sent += sock.send(view[sent:sent + _DATA_CHUNK])
        queued = _unacknowledged(sock)
        if not queued or not hasattr(select, "poll"):
            return
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        deadline = time.monotonic() + self.config.timeout
        while queued:
            if poller.poll(50):
                return  # a reply (or the connection's end) is there to read
            still_queued = _unacknowledged(sock)
            if still_queued < queued:
                queued, deadline = still_queued, time.monotonic() + self.config.timeout
            elif time.monotonic() >= deadline:
                raise TimeoutError("timed out")

    def close(self) -> None:
        """QUIT politely; never raises."""
        smtp, self.smtp = self.smtp, None
        if smtp is None:
            return
        try:
            if smtp.sock is not None:
                smtp.quit()
        except (smtplib.SMTPException, OSError, ValueError):
            pass
        finally:
            smtp.close()


def _describe(error: BaseException) -> str:
    if isinstance(error, TimeoutError) or isinstance(error.__context__, TimeoutError):
        return "timed out"  # smtplib re-raises a read timeout as SMTPServerDisconnected
    if isinstance(error, ssl.SSLCertVerificationError):
        return f"TLS certificate not trusted ({error.verify_message})"
    if isinstance(error, ssl.SSLError):
        return f"TLS error ({error.reason or error})"
    if isinstance(error, smtplib.SMTPServerDisconnected):
        return "connection closed by upstream"
    if isinstance(error, smtplib.SMTPResponseException):
        return f"{error.smtp_code} {_reply_text(error.smtp_error)}"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return _one_line(error) or type(error).__name__


# Raised inside a worker thread when the link to the upstream is gone.
_LINK_ERRORS = (smtplib.SMTPServerDisconnected, OSError)


class UpstreamPool:
    """Authenticated upstream sessions kept for reuse.

    Opening TCP + EHLO + STARTTLS + AUTH costs more than a small message, so sessions are
    returned here after a transaction and handed to the next one. Idle sessions are
    closed after RELAY_POOL_IDLE_SECONDS (before the upstream's own idle timeout) and
    after RELAY_POOL_MAX_MESSAGES messages. The pool never holds more sessions than there
    are client connections, since each client holds at most one.
    """

    def __init__(self, config: Config, executor: concurrent.futures.Executor,
                 metrics: Metrics):
        self.config = config
        self.executor = executor
        self.metrics = metrics
        self.tls_context = (upstream_tls_context(config)
                            if config.relay_use_tls or config.relay_use_ssl else None)
        self.idle: collections.deque[UpstreamConnection] = collections.deque()
        self._background: set[asyncio.Future] = set()
        self._reaper: asyncio.Task | None = None

    async def run(self, function: Callable, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, function,
                                                                *args)

    async def acquire(self) -> UpstreamConnection:
        now = time.monotonic()
        while self.idle:
            connection = self.idle.pop()  # most recently used: least likely stale
            if now - connection.idle_since < self.config.relay_pool_idle_seconds:
                connection.reused = True
                self.metrics.upstream_sessions_reused.inc()
                return connection
            self.discard(connection)
        return await self.open_new()

    async def open_new(self) -> UpstreamConnection:
        connection = UpstreamConnection(self.config, self.tls_context)
        opening = asyncio.get_running_loop().run_in_executor(self.executor,
                                                             connection.open)
        try:
            await asyncio.shield(opening)
        except asyncio.CancelledError:
            # The client left while we connected: the session is still good for others.
            def keep(done: asyncio.Future) -> None:
                if not done.cancelled() and done.exception() is None:
                    self.metrics.upstream_sessions_opened.inc()
                    self.metrics.upstream_sessions_open.inc()
                    self.release(connection)
            opening.add_done_callback(keep)
            raise
        self.metrics.upstream_sessions_opened.inc()
        self.metrics.upstream_sessions_open.inc()
        self._start_reaper()
        return connection

    def release(self, connection: UpstreamConnection) -> None:
        """Back to the pool after a finished transaction (the upstream is between
        transactions: nothing needs resetting)."""
        if (connection.smtp is None
                or connection.messages_sent >= self.config.relay_pool_max_messages
                or self.config.relay_pool_idle_seconds <= 0
                or len(self.idle) >= self.config.max_connections):
            self.discard(connection)
            return
        connection.idle_since = time.monotonic()
        self.idle.append(connection)

    def reset_and_release(self, connection: UpstreamConnection,
                          pending: asyncio.Future | None = None) -> None:
        """For an abandoned transaction: RSET upstream, then pool it (in the background,
        after `pending`, the upstream call still running in a thread, if any)."""
        async def reset() -> None:
            if pending is not None:
                await asyncio.wait([pending])
            if connection.discarded:  # the call's outcome already condemned it
                return
            try:
                code, _ = await self.run(connection.command, "RSET", "")
            except (*_LINK_ERRORS, smtplib.SMTPException, AssertionError):
                code = 0
            if code == 250:
                self.release(connection)
            else:
                self.discard(connection)
        self._in_background(reset())

    def discard(self, connection: UpstreamConnection) -> None:
        if connection.smtp is not None and not connection.discarded:
            connection.discarded = True
            self.metrics.upstream_sessions_open.dec()
            self._in_background(self.run(connection.close))

    def _in_background(self, awaitable: Any) -> None:
        task = asyncio.ensure_future(awaitable)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _start_reaper(self) -> None:
        if self._reaper is None and self.config.relay_pool_idle_seconds > 0:
            self._reaper = asyncio.ensure_future(self._reap_idle())

    async def _reap_idle(self) -> None:
        limit = self.config.relay_pool_idle_seconds
        while True:
            await asyncio.sleep(max(0.05, min(limit / 4, 5.0)))
            now = time.monotonic()
            while self.idle and now - self.idle[0].idle_since >= limit:
                self.discard(self.idle.popleft())

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        while self.idle:
            self.discard(self.idle.popleft())
        if self._background:
            await asyncio.wait(list(self._background), timeout=self.config.timeout)


_MAIL_PARAMETER_EXTENSION = {"SIZE": "size", "BODY": "8bitmime", "SMTPUTF8": "smtputf8"}


class Transaction:
    """The upstream half of one client transaction: MAIL .. RCPT* .. DATA."""

    def __init__(self, connection: UpstreamConnection, declared_8bit_unsupported: bool):
        self.connection = connection
        # BODY=8BITMIME declared, and the upstream lacks 8BITMIME
        self.declared_8bit_unsupported = declared_8bit_unsupported
        self.pending: asyncio.Future | None = None  # the upstream call in a thread
        self.broken = False  # the upstream link died mid-transaction
        # The upstream may hold a transaction: from MAIL until a refusal of MAIL or the
        # reply after the data. Such a session is reset before anyone else uses it.
        self.open = False


class _UpstreamCalls:
    """Worker threads for the blocking upstream calls of client transactions (MAIL,
    RCPT, DATA: three a message).

    loop.run_in_executor costs ~25 us of CPU more per call than this: a
    concurrent.futures.Future with its Condition, the executor's bookkeeping, and
    the future chained to an asyncio one. Here a call is a tuple on a queue and one
    call_soon_threadsafe with its outcome. Threads start as needed, up to `limit`
    (beyond that, calls wait their turn), and stay for the next call.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self.threads = 0
        self._idle = 0
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()

    def submit(self, function: Callable, *args: Any) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._lock:  # claim an idle thread, as ThreadPoolExecutor counts them
            start = not self._idle and self.threads < self.limit
            if start:
                self.threads += 1
            elif self._idle:
                self._idle -= 1
        if start:
            threading.Thread(target=self._work, name=f"upstream-{self.threads}",
                             daemon=True).start()
        self._jobs.put((loop, future, function, args))
        return future

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            loop, future, function, args = job
            outcome: tuple[Any, BaseException | None]
            try:
                outcome = (function(*args), None)
            except BaseException as error:  # noqa: BLE001 (handed to the awaiting task)
                outcome = (None, error)
            try:
                loop.call_soon_threadsafe(self._settle, future, *outcome)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                pass
            del job, loop, future, function, args, outcome
            with self._lock:
                self._idle += 1

    @staticmethod
    def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
        if future.done():
            return
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)

    def close(self) -> None:
        """Cancel the calls still queued; threads end after the call they are in."""
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job[1].cancel()
        for _ in range(self.threads):
            self._jobs.put(None)


class Forwarder:
    """Speaks to the upstream on behalf of one client transaction at a time.

    Each call returns the SMTP reply for the client. Upstream 2xx/4xx/5xx replies are
    passed on as the upstream gave them (a 2xx to MAIL or to the data as 250, which is
    what clients look for); a lost link, a timeout or a TLS failure becomes
    `451 4.4.x`. An upstream `421` (it is closing) becomes `451 4.4.2`, since our own
    connection to the client stays open; so does a reply that makes no sense at that
    step (a code outside 200-599, a 3xx other than 354 to DATA), and that upstream
    session is closed.
    """

    def __init__(self, config: Config, metrics: Metrics):
        self.config = config
        self.executor = concurrent.futures.ThreadPoolExecutor(
            # One worker per client that can be waiting on the upstream, plus room for
            # background RSET/QUIT: asyncio's default pool has min(32, cores + 4).
            max_workers=config.max_connections + 4, thread_name_prefix="upstream")
        self.pool = UpstreamPool(config, self.executor, metrics)
        self.calls = _UpstreamCalls(config.max_connections + 4)
        self.orphans: set[asyncio.Future] = set()  # deliveries whose client left

    def outlive(self, delivery: asyncio.Future) -> None:
        """Keep a delivery going after its client left; close() waits for it."""
        def done(task: asyncio.Future) -> None:
            self.orphans.discard(task)
            if not task.cancelled() and task.exception() is not None:
                log.error("unexpected error in a delivery", exc_info=task.exception())
        self.orphans.add(delivery)
        delivery.add_done_callback(done)

    async def _call(self, session: Session, function: Callable, *args: Any) -> Any:
        transaction: Transaction = session.transaction
        future = self.calls.submit(function, *args)
        transaction.pending = future
        session.busy = True  # the client is waiting on us, not idle
        try:
            return await asyncio.shield(future)
        finally:
            session.busy = False
            session.active_at = time.monotonic()  # the client's wait ends now
            if future.done():
                transaction.pending = None

    async def begin(self, session: Session, sender: str, options: list[str]) -> str:
        """MAIL FROM upstream. On 250 the session holds the transaction."""
        declared_8bit = "BODY=8BITMIME" in options
        for attempt in (1, 2):
            session.busy = True  # waiting on the upstream's connect/TLS/AUTH: not idle
            try:
                # A retry never takes another pooled session: it may be just as stale.
                connection = await (self.pool.acquire() if attempt == 1
                                    else self.pool.open_new())
            finally:
                session.busy = False
                session.active_at = time.monotonic()
            session.transaction = transaction = Transaction(
                connection, declared_8bit and not connection.has("8bitmime"))
            if "SMTPUTF8" in options and not connection.has("smtputf8"):
                self.finish(session)
                return ("555 5.6.7 The upstream does not support SMTPUTF8: send this "
                        "message with ASCII addresses")
            if "SMTPUTF8" in options:
                connection.smtp.command_encoding = "utf-8"
            # Only what the upstream advertises goes on; aiosmtpd lets no other through.
            upstream_options = [
                option for option in options
                if connection.has(_MAIL_PARAMETER_EXTENSION.get(option.split("=")[0], ""))]
            argument = f"FROM:<{sender}>" + "".join(" " + o for o in upstream_options)
            transaction.open = True  # until the upstream says otherwise
            try:
                code, text = await self._call(session, connection.command, "MAIL",
                                              argument)
            except _LINK_ERRORS as error:
                code, text = 0, _describe(error)
            if 200 <= code < 300:  # any 2xx: the upstream's transaction is open
                return f"250 {text}"
            if _final(code):
                transaction.open = False  # refused: no transaction upstream
                self.finish(session)
                return f"{code} {text}"
            if code and code != 421:
                self._condemn(transaction)
                session.transaction = None
                raise UpstreamError(f"unexpected reply to MAIL: {code} {text}",
                                    "451 4.4.2")
            # The link is gone. A pooled session may simply have gone stale while idle:
            # the client must not pay for that, so try once more on a fresh one.
            self.pool.discard(connection)
            session.transaction = None
            if not connection.reused or attempt == 2:
                raise UpstreamError(text or "upstream closed the connection",
                                    "451 4.4.2")
        raise AssertionError("unreachable")

    async def add_recipient(self, session: Session, recipient: str) -> str:
        return await self._in_transaction(session, "RCPT", f"TO:<{recipient}>")

    async def _in_transaction(self, session: Session, verb: str, argument: str) -> str:
        transaction: Transaction = session.transaction
        if transaction.broken:
            return "451 4.4.2 Upstream connection was lost: start the message again"
        try:
            code, text = await self._call(session, transaction.connection.command, verb,
                                          argument)
        except _LINK_ERRORS as error:
            code, text = 0, _describe(error)
        if _final(code):
            return f"{code} {text}"
        self._condemn(transaction)  # later commands get 451 until the next MAIL
        if code and code != 421:
            text = f"unexpected reply to {verb}: {code} {text}"
        raise UpstreamError(text or "upstream closed the connection", "451 4.4.2")

    async def send_data(self, session: Session, message: bytes) -> tuple[bool, str]:
        """DATA upstream. Returns (accepted, reply for the client); ends the
        transaction either way."""
        transaction: Transaction | None = session.transaction
        if transaction is None:  # the client left before we began
            return False, "451 4.4.2 Upstream transaction was lost: send the message again"
        if transaction.broken:
            self.finish(session)
            return False, "451 4.4.2 Upstream connection was lost: send the message again"
        if transaction.declared_8bit_unsupported and not message.isascii():
            self.finish(session, reset=True)
            return False, ("554 5.6.3 The upstream does not support 8BITMIME and the "
                           "message has 8-bit content")
        connection = transaction.connection
        # From here on `session.transaction` may be gone (the client left and
        # connection_lost reset it, after this call): only `transaction` is ours.
        try:
            sent, code, text = await self._call(session, connection.data, message)
        except _LINK_ERRORS as error:
            self._condemn(transaction)
            self._end(session, transaction)
            raise UpstreamError(_describe(error), "451 4.4.2") from None
        if sent and _final(code):
            transaction.open = False  # the reply after the data ends the transaction
            accepted = code < 300
            if accepted:
                connection.messages_sent += 1  # before the pool sees it: it may retire
            self._end(session, transaction)
            return accepted, f"250 {text}" if accepted else f"{code} {text}"
        if not sent and _final(code) and code >= 400:
            # The DATA command itself refused (e.g. Postfix's smtpd_data_restrictions):
            # the upstream's transaction is still open, so it is reset before reuse.
            self._end(session, transaction)
            return False, f"{code} {text}"
        self._condemn(transaction)
        self._end(session, transaction)
        return False, f"451 4.4.2 Upstream failed during DATA: {code} {text}"

    def _condemn(self, transaction: Transaction) -> None:
        """The upstream session is lost or makes no sense: close it now, never reuse
        it. A client transaction on it gets 451 until the client moves on."""
        transaction.broken = True
        self.pool.discard(transaction.connection)

    def _end(self, session: Session, transaction: Transaction) -> None:
        """finish(), for this transaction only (connection_lost may have taken it)."""
        if session.transaction is transaction:
            self.finish(session)

    def finish(self, session: Session, *, reset: bool = False) -> None:
        """End the session's upstream transaction: back to the pool only when the
        upstream is between transactions; reset first (RSET) when it may hold one;
        closed when broken."""
        transaction: Transaction | None = session.transaction
        if transaction is None:
            return
        session.transaction = None
        if transaction.broken:
            self.pool.discard(transaction.connection)
        elif reset or transaction.open or transaction.pending is not None:
            self.pool.reset_and_release(transaction.connection, transaction.pending)
        else:
            self.pool.release(transaction.connection)

    async def close(self) -> None:
        if self.orphans:  # their outcome is logged before "stopped"
            await asyncio.wait(list(self.orphans), timeout=self.config.timeout)
        await self.pool.close()
        self.calls.close()
        self.executor.shutdown(wait=False, cancel_futures=True)


# ---------------------------------------------------------------------------------------
# Handler: one aiosmtpd hook per SMTP stage (auth, sender, recipient, data)
# ---------------------------------------------------------------------------------------

class RelaySession(Session):
    """aiosmtpd's per-connection Session, plus what the relay tracks about it."""

    # aiosmtpd still assigns this deprecated field after AUTH and logs a warning each
    # time through its property; a plain attribute keeps the log clean.
    login_data = None

    def __init__(self, loop: asyncio.AbstractEventLoop):
        super().__init__(loop)
        self.user: str | None = None
        self.peer_ip: str | None = None
        self.trusted = False  # from TRUSTED_NETWORKS: may send without AUTH
        self.policy: UserPolicy | None = None  # the user's, from AUTH (or trusted)
        self.credentials: tuple[str, Any] | None = None  # AUTH data awaiting a check
        self.message_id: str | None = None
        self.transaction: Transaction | None = None
        self.busy = False  # waiting on the upstream
        self.receiving_data = False  # between 354 and the end of the data
        self.active_at = time.monotonic()  # last command, DATA bytes or upstream reply
        self.started = 0.0


_MESSAGE_IDS = itertools.count(1)
_ID_PREFIX = secrets.token_hex(2)  # per process, so ids differ across restarts


def new_message_id() -> str:
    """Short and unique within this process's life: one grep finds one message."""
    return f"{_ID_PREFIX}{next(_MESSAGE_IDS):08x}"


def sender_key(session: Session) -> str:
    """Who quotas are counted for: the user, or the address of a trusted client."""
    return session.user if session.user else f"ip:{session.peer_ip}"


class SMTPRelayHandler:
    """aiosmtpd handler: the checks for each stage, then the upstream's verdict."""

    def __init__(self, config: Config, forwarder: Forwarder, rate_limiter: RateLimiter,
                 metrics: Metrics):
        self.config = config
        self.forwarder = forwarder
        self.rate_limiter = rate_limiter
        self.metrics = metrics

    async def handle_EHLO(self, server: SMTP, session: Session, envelope: Any,
                          hostname: str, responses: list[str]) -> list[str]:
        session.host_name = hostname
        await self._abandon(session)
        # Replies come strictly in order (aiosmtpd handles one command at a time and
        # drops anything buffered across STARTTLS), so pipelining is safe to offer.
        responses.insert(-1, "250-PIPELINING")
        return responses

    async def handle_HELO(self, server: SMTP, session: Session, envelope: Any,
                          hostname: str) -> str:
        session.host_name = hostname
        await self._abandon(session)
        return f"250 {server.hostname}"

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Any,
                          address: str, mail_options: list[str]) -> str:
        policy = session.policy
        if policy is None or not (session.authenticated or session.trusted):
            log_event(logging.WARNING, "rejected", session, reason="not-authenticated")
            self.metrics.rejected("auth", session)
            return "530 5.7.0 Authentication required"
        await self._abandon(session)
        session.message_id = new_message_id()
        session.started = time.monotonic()
        try:
            sender = parse_path(address, smtputf8="SMTPUTF8" in mail_options)
        except AddressError as error:
            log_event(logging.WARNING, "sender-refused", session, address=address,
                      reason=str(error))
            self.metrics.rejected("address", session)
            return error.reply
        if not policy.allowed_from_domains.allows(sender.domain):
            log_event(logging.WARNING, "sender-refused", session, address=str(sender),
                      domain=sender.domain, reason="domain not allowed")
            self.metrics.rejected("sender_domain", session)
            return f"553 5.7.1 Sender domain {sender.domain} is not allowed"
        if self.rate_limiter.message_limits(policy.rate_limit_per_minute):
            refusal = await self.rate_limiter.check_message(
                sender_key(session), policy.rate_limit_per_minute)
            if refusal is not None:
                log_event(logging.WARNING, "rate-limited", session,
                          **{"from": str(sender)}, reply=refusal)
                self.metrics.rejected("rate", session)
                return refusal
        try:
            reply = await self.forwarder.begin(session, str(sender), mail_options)
        except UpstreamError as error:
            log_event(logging.ERROR, "upstream-failed", session, stage="MAIL",
                      **{"from": str(sender)}, reply=error.reply)
            self.metrics.rejected("upstream_4xx", session)
            return error.reply
        if reply.startswith("250"):
            envelope.mail_from = str(sender)
            envelope.mail_options.extend(mail_options)
            log_event(logging.DEBUG, "sender-accepted", session, **{"from": str(sender)})
        else:
            log_event(logging.WARNING, "sender-refused", session, address=str(sender),
                      reason="upstream", reply=reply)
            self.metrics.rejected(rejection_reason(reply), session)
        return reply

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Any,
                          address: str, rcpt_options: list[str]) -> str:
        fields = {"from": envelope.mail_from}
        if session.transaction is None:  # the upstream transaction ended under us
            return "451 4.4.2 Upstream transaction was lost: start the message again"
        if len(envelope.rcpt_tos) >= self.config.max_recipients:
            log_event(logging.WARNING, "recipient-refused", session, **fields,
                      address=address, reason="too many recipients")
            self.metrics.rejected("too_many_recipients", session)
            return f"452 4.5.3 Too many recipients (at most {self.config.max_recipients})"
        try:
            recipient = parse_path(address, smtputf8=envelope.smtp_utf8)
        except AddressError as error:
            log_event(logging.WARNING, "recipient-refused", session, **fields,
                      address=address, reason=str(error))
            self.metrics.rejected("address", session)
            return error.reply
        if not session.policy.allowed_to_domains.allows(recipient.domain):
            log_event(logging.WARNING, "recipient-refused", session, **fields,
                      address=str(recipient), domain=recipient.domain,
                      reason="domain not allowed")
            self.metrics.rejected("recipient_domain", session)
            return f"550 5.7.1 Recipient domain {recipient.domain} is not allowed"
        if self.rate_limiter.recipient_limit is not None:
            refusal = await self.rate_limiter.check_recipient(sender_key(session))
            if refusal is not None:
                log_event(logging.WARNING, "rate-limited", session, **fields,
                          to=str(recipient), reply=refusal)
                self.metrics.rejected("rate", session)
                return refusal
        try:
            reply = await self.forwarder.add_recipient(session, str(recipient))
        except UpstreamError as error:
            log_event(logging.ERROR, "upstream-failed", session, stage="RCPT", **fields,
                      to=str(recipient), reply=error.reply)
            self.metrics.rejected("upstream_4xx", session)
            return error.reply
        if reply[:1] == "2":
            envelope.rcpt_tos.append(str(recipient))
        else:
            log_event(logging.WARNING, "recipient-refused", session, **fields,
                      address=str(recipient), reason="upstream", reply=reply)
            self.metrics.rejected(rejection_reason(reply), session)
        return reply

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Any) -> str:
        content: bytes = envelope.smtp_data  # as the client sent it: dot-stuffed
        fields = {"from": envelope.mail_from, "to": envelope.rcpt_tos,
                  "size": len(envelope.original_content)}
        refusal = self._refuse_content(content, session.policy)
        if refusal is None and session.transaction is None:
            refusal = "451 4.4.2 Upstream transaction was lost: send the message again"
        if refusal is not None:
            self.forwarder.finish(session, reset=True)
            log_event(logging.WARNING, "message-refused", session, **fields,
                      reply=refusal)
            self.metrics.rejected("content" if refusal[:1] == "5" else "upstream_4xx",
                                  session)
            return refusal
        message = self._received_header(server, session, envelope) + content
        # When the client leaves, aiosmtpd cancels this hook; the upstream may still
        # accept the message. The delivery goes on by itself and logs its outcome.
        delivery = asyncio.ensure_future(self._deliver(session, envelope, message,
                                                       fields))
        try:
            return await asyncio.shield(delivery)
        except asyncio.CancelledError:
            self.forwarder.outlive(delivery)
            raise

    async def _deliver(self, session: Session, envelope: Any, message: bytes,
                       fields: dict[str, Any]) -> str:
        """The data upstream; one `delivered` or `delivery-failed` line either way."""
        sent_at = time.monotonic()
        try:
            accepted, reply = await self.forwarder.send_data(session, message)
        except UpstreamError as error:
            accepted, reply = False, error.reply
        now = time.monotonic()
        self.metrics.upstream_duration.observe(now - sent_at)
        duration_ms = round((now - session.started) * 1000, 1)
        user = session_user(session) or "-"
        if accepted:
            log_event(logging.INFO, "delivered", session, **fields, upstream=reply,
                      duration_ms=duration_ms)
            self.metrics.messages_accepted.labels(user).inc()
            self.metrics.recipients.labels(user).inc(len(envelope.rcpt_tos))
            self.metrics.bytes.labels(user).inc(fields["size"])
            # The client's 250 names the relay's id too: one grep finds the log line.
            reply = f"{reply} (smtp-relay id {session.message_id})"
        else:
            log_event(logging.ERROR, "delivery-failed", session, **fields,
                      upstream=reply, duration_ms=duration_ms)
            self.metrics.rejected(rejection_reason(reply), session)
        session.message_id = None  # later lines about the connection are not about it
        return reply

    async def handle_RSET(self, server: SMTP, session: Session, envelope: Any) -> str:
        await self._abandon(session)
        return "250 2.0.0 OK"

    async def _abandon(self, session: Session) -> None:
        """The client gave up on its transaction: reset it upstream too."""
        if session.transaction is not None:
            log_event(logging.DEBUG, "transaction-abandoned", session)
            self.forwarder.finish(session, reset=True)

    def _refuse_content(self, content: bytes, policy: UserPolicy) -> str | None:
        # No copies of the data here, and no work that grows with more than the first
        # HEADER_SECTION_LIMIT bytes past a few byte scans: this runs on the loop.
        problem = forbidden_in_data(content)
        if problem is not None:
            return f"550 5.6.0 Message refused: {problem}"
        hops = count_received_headers(
            content, min(header_block_end(content), HEADER_SECTION_LIMIT))
        if hops > self.config.max_hops:
            return (f"554 5.4.6 Too many hops ({hops} Received: headers, at most "
                    f"{self.config.max_hops}): mail loop?")
        if self.config.check_header_from:
            end = header_section_end(content, HEADER_SECTION_LIMIT)
            if end is None:
                return (f"552 5.3.4 Message refused: header section too large (at most "
                        f"{HEADER_SECTION_LIMIT // 1024 // 1024} MiB)")
            try:
                domains = header_from_domains(header_from_fields(content, end))
            except AddressError as error:
                return f"550 5.7.1 From: header refused: {error}"
            for domain in domains:
                if not policy.allowed_from_domains.allows(domain):
                    return f"550 5.7.1 From: header domain {domain} is not allowed"
        return None

    def _received_header(self, server: SMTP, session: Session, envelope: Any) -> bytes:
        protocol = "ESMTP" if session.extended_smtp else "SMTP"
        if server.encrypted:
            protocol += "S"
        if session.authenticated:
            protocol += "A"
        helo = _SAFE_HELO.sub("?", session.host_name or "unknown")[:128]
        recipient = (f"\r\n\tfor <{envelope.rcpt_tos[0]}>"
                     if len(envelope.rcpt_tos) == 1 else "")
        header = (f"Received: from {helo} ([{session.peer_ip}])\r\n"
                  f"\tby {self.config.smtp_hostname} (smtp-relay) with {protocol} "
                  f"id {session.message_id}{recipient};\r\n"
                  f"\t{_rfc5322_date(int(time.time()))}\r\n")
        return header.encode("utf-8", "replace")


_SAFE_HELO = re.compile(r"[^A-Za-z0-9.:\[\]_-]")


@functools.lru_cache(maxsize=2)
def _rfc5322_date(second: int) -> str:
    return email.utils.formatdate(second, localtime=True)


# ---------------------------------------------------------------------------------------
# Server: the listener, the connection cap, the idle timeout and a clean shutdown
# ---------------------------------------------------------------------------------------

class _ProtocolTemplate:
    """What aiosmtpd's SMTP.__init__ works out for a listener's first connection, for
    the next ones. It depends only on the classes and the listener's options, but
    costs ~200 us a connection (inspect.getmembers on the protocol and the handler,
    dir(), inspect.signature of handle_EHLO): a sixth of a small message's CPU."""

    _TABLES = ("_auth_methods", "_smtp_methods", "_handle_hooks")

    def __init__(self, first: _RelaySMTP):
        loop = first.loop
        # StreamReaderProtocol's own state (reader, futures, queues) is per connection.
        fresh = vars(asyncio.StreamReaderProtocol(
            asyncio.StreamReader(loop=loop), first._cb_client_connected, loop=loop))
        self.attributes = {name: value for name, value in vars(first).items()
                           if name not in fresh and name not in self._TABLES}
        # (key, value, own): an own method (bound to `first`) is kept as its function,
        # to be bound to each new protocol; _auth_methods holds (method, is_builtin).
        self.tables: dict[str, list[tuple[str, Any, bool]]] = {}
        for name in self._TABLES:
            self.tables[name] = rows = []
            for key, value in getattr(first, name).items():
                method = value.method if name == "_auth_methods" else value
                own = getattr(method, "__self__", None) is first
                if own:
                    method = method.__func__
                rows.append((key, value._replace(method=method)
                             if name == "_auth_methods" else method, own))
        self.log = logging.getLogger("mail.log")
        self.mechanisms = "Available AUTH mechanisms: " + " ".join(
            m + "(builtin)" if impl.is_builtin else m
            for m, impl in sorted(first._auth_methods.items()))

    def initialise(self, protocol: _RelaySMTP) -> None:
        """SMTP.__init__'s work for `protocol`, from the first connection's."""
        loop = self.attributes["loop"]
        asyncio.StreamReaderProtocol.__init__(
            protocol, asyncio.StreamReader(loop=loop, limit=protocol.line_length_limit),
            protocol._cb_client_connected, loop=loop)
        protocol.__dict__.update(self.attributes)
        bind = types.MethodType
        protocol._smtp_methods = {key: bind(value, protocol) if own else value
                                  for key, value, own in self.tables["_smtp_methods"]}
        protocol._handle_hooks = {key: bind(value, protocol) if own else value
                                  for key, value, own in self.tables["_handle_hooks"]}
        protocol._auth_methods = {
            key: type(value)(bind(value.method, protocol), value.is_builtin) if own
            else value for key, value, own in self.tables["_auth_methods"]}
        protocol.command_size_limits.clear()  # a class attribute SMTP.__init__ resets
        self.log.info(self.mechanisms)


def _answered_in_groups(method: Callable[..., Awaitable[None]]
                        ) -> Callable[..., Awaitable[None]]:
    """aiosmtpd's smtp_ method for a command whose replies may wait for the rest of a
    pipelined group (see _RelaySMTP.push)."""
    @functools.wraps(method)  # and so the same HELP text
    async def answer(self: _RelaySMTP, arg: str) -> None:
        self._in_group = True
        try:
            await method(self, arg)
        finally:
            self._in_group = False
    return answer


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


class _RelaySMTP(SMTP):
    """aiosmtpd's protocol with the few changes a relay needs.

    Overrides private aiosmtpd methods and state (`_create_session`, `_getaddr`,
    `_timeout_cb`, `_reset_timeout`, `_handle_client`, `smtp_DATA` and `push` reading
    `_reader` directly, SMTP.__init__'s work copied by _ProtocolTemplate): aiosmtpd is
    pinned to an exact version, and tests/test_aiosmtpd_overrides.py fails when an
    upgrade changes them.
    """

    # Refused commands (5xx) a client that is neither authenticated nor trusted may
    # send before it is disconnected, as Postfix's smtpd_hard_error_limit.
    MAX_REFUSED_COMMANDS = 20

    def __init__(self, server: SMTPRelayServer, *, implicit_tls: bool = False,
                 **kwargs: Any):
        template = server.protocol_templates.get(implicit_tls)
        if template is not None:
            template.initialise(self)
        else:
            super().__init__(server.handler, **kwargs)
            server.protocol_templates[implicit_tls] = _ProtocolTemplate(self)
        self._relay_server = server
        self.implicit_tls = implicit_tls  # the SMTPS listener: TLS from the first byte
        self.connected = False  # connection_made has run (SMTPS: after the handshake)
        self.raw_transport: asyncio.BaseTransport | None = None  # SMTPS: the TCP one
        self.claimed_ip: str | None = None  # counted for MAX_CONNECTIONS_PER_IP
        self.over_ip_limit = False
        self._greeted_at: float | None = None
        self._refused_commands = 0  # 5xx replies while unauthenticated

    @property
    def encrypted(self) -> bool:
        return self.implicit_tls or self._tls_protocol is not None

    _unsent = b""  # reply lines kept for the next write (see push)
    _in_group = False  # answering RSET, MAIL or RCPT

    smtp_RSET = _answered_in_groups(SMTP.smtp_RSET)  # smtp_MAIL: see below
    smtp_RCPT = _answered_in_groups(SMTP.smtp_RCPT)

    async def _handle_client(self) -> None:
        # The connection checker: before the greeting, refuse clients from outside
        # ALLOWED_CLIENT_NETWORKS, over MAX_CONNECTIONS_PER_IP, and addresses locked
        # out for guessing passwords.
        session = self.session
        refusal = self._relay_server.connection_refusal(session, self.over_ip_limit)
        if refusal is not None:
            self._hang_up(refusal.encode() + b"\r\n")
            return
        self._greeted_at = time.monotonic()
        await super()._handle_client()

    async def smtp_AUTH(self, arg: str) -> None:
        server, session = self._relay_server, self.session
        if self.envelope.mail_from:
            # RFC 4954 section 4; a trusted client that began MAIL without AUTH would
            # otherwise mix two policies in one transaction.
            await self.push("503 5.5.1 AUTH not permitted during a mail transaction")
            return
        if server.auth_guard.locked(session.peer_ip):
            await self._locked_out()
            return
        session.credentials = None
        await super().smtp_AUTH(arg)  # parses the exchange; SMTPAuthHandler captures
        if session.credentials is None:
            return  # aiosmtpd already answered (syntax error, abort, already done)
        mechanism, credentials = session.credentials
        session.credentials = None
        # Counted as a failure before the check and taken back if it succeeds: a client
        # that leaves during the check (bcrypt runs on) is still counted.
        server.auth_guard.record_failure(session.peer_ip)
        try:
            user = await server.authenticator.verify(mechanism, credentials,
                                                     session.peer_ip)
        except asyncio.CancelledError:
            log_event(logging.DEBUG, "auth-abandoned", session, mechanism=mechanism)
            raise
        if user is not None:
            server.auth_guard.withdraw(session.peer_ip)
            session.authenticated = True
            session.user = session.auth_data = user.policy.name
            session.policy = user.policy  # kept for the session, even across reloads
            server.metrics.auth.labels("success").inc()
            log_event(logging.INFO, "auth-ok", session, mechanism=mechanism)
            await self.push("235 2.7.0 Authentication successful")
            return
        server.metrics.auth.labels("failure").inc()
        attempted = SMTPAuthHandler.attempted_user(mechanism, credentials)
        log_event(logging.WARNING, "auth-failed", session, mechanism=mechanism,
                  attempted_user=attempted)
        locked_now = server.auth_guard.locked(session.peer_ip)
        # A pause before each "no" slows guessing; it blocks only this client.
        await asyncio.sleep(server.config.auth_failure_delay)
        if locked_now:
            log_event(logging.ERROR, "auth-locked-out", session,
                      failures=server.config.auth_max_failures,
                      seconds=server.config.auth_failure_window)
            await self._locked_out()
        else:
            await self.push("535 5.7.8 Authentication credentials invalid")

    async def challenge_auth(self, challenge: str | bytes, encode_to_b64: bool = True,
                             log_client_response: bool = False) -> Any:
        """aiosmtpd's, except that an overlong response line is refused (RFC 4954:
        500 5.5.6) where aiosmtpd's readline raised (a 451 and a traceback). The
        response is never logged."""
        data = challenge.encode() if isinstance(challenge, str) else challenge
        await self.push(b"334 " + (base64.b64encode(data) if encode_to_b64 else data))
        reader = self._reader
        try:
            line = await reader.readuntil()
        except asyncio.IncompleteReadError as error:
            line = error.partial  # the client closed; connection_lost follows
        except asyncio.LimitOverrunError as error:
            while True:  # discard up to the end of the line, as aiosmtpd does
                await reader.read(error.consumed)
                try:
                    await reader.readuntil()
                    break
                except asyncio.LimitOverrunError as longer:
                    error = longer
            await self.push("500 5.5.6 Authentication exchange line is too long")
            return MISSING
        blob = line.strip()
        if blob == b"*":  # the client cancels
            await self.push("501 5.7.0 Auth aborted")
            return MISSING
        try:
            return base64.b64decode(blob, validate=True)
        except ValueError:
            await self.push("501 5.5.2 Can't decode base64")
            return MISSING

    @_answered_in_groups
    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: str | None) -> None:
        # aiosmtpd takes any SIZE value that str.isdigit() likes and then calls int(),
        # which refuses "\u00b2" (a 451 and a traceback). RFC 1870: ASCII digits.
        path = self._strip_command_keyword("FROM:", arg) if arg else None
        if path is not None and self.session.host_name:
            _, parameters = self._getaddr(path)
            for parameter in (parameters or "").upper().split():
                name, equals, value = parameter.partition("=")
                if name == "SIZE" and equals and not (value.isascii() and value.isdigit()):
                    await self.push("501 5.5.4 Syntax: SIZE=<size in bytes, digits>")
                    return
        await super().smtp_MAIL(arg)

    def _transport_closing(self) -> bool:
        """The client is gone or we hung up. Under TLS the TCP transport learns first:
        the TLS one only a loop turn later, and pipelined replies written in between
        each cost a warning from asyncio."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return True
        raw = self._original_transport or self.raw_transport  # STARTTLS, SMTPS
        return raw is not None and raw.is_closing()

    async def push(self, status: AnyStr) -> None:
        if self._transport_closing():
            # Nothing more to say. (aiosmtpd would write on, and a torn-down TLS
            # transport raises AttributeError.)
            log_event(logging.DEBUG, "client-gone", self.session)
            raise asyncio.CancelledError
        # Each write is a TCP segment and a wake-up for the client (and for us a
        # system call, at which the upstream threads take the GIL). So:
        # - a multi-line reply (EHLO's; aiosmtpd pushes it a line at a time) goes
        #   out in one write, with its last line;
        # - RFC 2920 3.2: the replies to RSET, MAIL and RCPT wait while the next
        #   command of a pipelined group is already here, and go out with the next
        #   reply (at the latest DATA's 354). Never while we wait for the client.
        reply = status if isinstance(status, bytes) else status.encode(
            "utf-8" if self.enable_SMTPUTF8 else "ascii")
        pending = self._reader._buffer  # type: ignore[attr-defined]
        if reply[3:4] == b"-" or (self._in_group and b"\n" in pending):
            self._unsent += reply + b"\r\n"
        else:
            if self._unsent:
                reply, self._unsent = self._unsent + reply, b""
            await super().push(reply)
        session = self.session
        if status[:1] in ("5", b"5") and session is not None and not (
                session.authenticated or session.trusted):
            self._refused_commands += 1
            if self._refused_commands >= self.MAX_REFUSED_COMMANDS:
                log_event(logging.WARNING, "too-many-errors", session,
                          refused=self._refused_commands)
                self._hang_up(b"421 4.7.0 Too many errors, closing connection\r\n")
                raise asyncio.CancelledError

    async def _locked_out(self) -> None:
        self._hang_up(b"421 4.7.0 Too many failed logins from your address; try "
                      b"again later\r\n")

    async def auth_CRAM__MD5(self, _: Any, args: list[str]) -> AuthResult:
        """RFC 2195; offered only when AUTH_MECHANISMS asks for it."""
        if len(args) > 1:
            await self.push("501 5.5.4 CRAM-MD5 takes no initial response")
            return AuthResult(success=False, handled=True)
        challenge = f"<{secrets.token_hex(8)}.{int(time.time())}@{self.hostname}>"
        response = await self.challenge_auth(challenge)
        if response is MISSING:
            return AuthResult(success=False, handled=True)
        login, _, digest = response.rpartition(b" ")
        return self._authenticate("CRAM-MD5", (login, challenge.encode(), digest))

    def _create_session(self) -> Session:
        return RelaySession(self.loop)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # After STARTTLS aiosmtpd makes a new session: keep what the checker decided
        # (AUTH, and so a user's policy, must come again over TLS).
        trusted = self.session is not None and self.session.trusted
        super().connection_made(transport)
        peer = self.session.peer
        self.session.peer_ip = peer[0] if isinstance(peer, tuple) else str(peer)
        self.session.trusted = trusted
        if trusted:
            self.session.policy = self._relay_server.default_policy
        if not self.connected:  # the first time (STARTTLS comes through here again)
            self.connected = True
            self._relay_server.claim_address(self, transport)

    def connection_lost(self, error: Exception | None) -> None:
        session = self.session
        super().connection_lost(error)
        self._relay_server.connection_closed(self)
        if session is not None and session.transaction is not None:
            self._relay_server.forwarder.finish(session, reset=True)

    def data_received(self, data: bytes) -> None:
        # Bytes count as activity only inside DATA (a large message may take longer
        # than TIMEOUT to arrive); junk outside it must not keep a connection alive.
        if self.session is not None and self.session.receiving_data:
            self.session.active_at = time.monotonic()
        super().data_received(data)

    def _reset_timeout(self, duration: float | None = None) -> None:
        now = time.monotonic()
        command = False
        if duration is None and self.session is not None:  # aiosmtpd: a valid command
            self.session.active_at = now
            command = True
        deadline = self._auth_deadline()
        if deadline is not None:  # commands do not push it back
            duration = min(duration or self._timeout_duration, max(0.05, deadline - now))
        handle = self._timeout_handle
        if command and handle is not None and not handle.cancelled() and (
                handle.when() <= self.loop.time() + (duration or self._timeout_duration)):
            return  # it fires first: _timeout_cb counts from active_at, and re-arms
        super()._reset_timeout(duration)

    def _auth_deadline(self) -> float | None:
        """When a client that is neither authenticated nor trusted is cut off: TIMEOUT
        after its greeting, however busy it keeps the connection (NOOPs, refusals)."""
        session = self.session
        if self._greeted_at is None or session is None or session.authenticated or \
                session.trusted:
            return None
        return self._greeted_at + self._timeout_duration

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        # aiosmtpd parses paths with the email package's RFC 5322 header parser, which
        # accepts comments and folding that have no place in SMTP, and is slow. Only
        # split here; the handler parses strictly (parse_path) and gives the reason.
        if not arg:
            return "", ""
        return split_path(arg)

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        # aiosmtpd reads DATA a line at a time, about 7 us a line: 10 ms of CPU for a
        # 100 KB message. This reads up to the terminator in one go, with the same
        # rules: only <CRLF>.<CRLF> ends the data (a bare-LF "dot" line does not), and
        # size and line-length errors are answered once the whole message is in.
        if await self.check_helo_needed():
            return
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        self.session.receiving_data = True
        try:
            stuffed = await self._read_data()
        except (asyncio.CancelledError, asyncio.IncompleteReadError):
            self._writer.close()
            raise asyncio.CancelledError from None
        finally:
            self.session.receiving_data = False
        if stuffed is None:
            status = "552 Error: Too much mail data"
        elif await self._has_long_line(stuffed):
            status = "500 Line too long (see RFC5321 4.5.3.1.6)"
        else:
            # RFC 5321 4.5.2: remove the transparency dot from lines that start with one.
            content = stuffed.replace(b"\r\n.", b"\r\n")
            if content.startswith(b"."):
                content = content[1:]
            self.envelope.content = self.envelope.original_content = content
            self.envelope.smtp_data = stuffed
            status = await self._call_handler_hook("DATA")
        self._set_post_data_state()
        await self.push(status)

    # A line longer than aiosmtpd's limit (999 bytes before the CRLF), found in the
    # bytes themselves: splitting the data into lines made an object per line (170 MB
    # for 10 MB of 2-byte lines). See long_line_in.
    _SCAN_ON_THE_LOOP = 256 * 1024  # bytes; larger data is scanned in a worker thread

    async def _has_long_line(self, data: bytes) -> bool:
        limit = self.line_length_limit - 1
        if len(data) <= self._SCAN_ON_THE_LOOP:
            return long_line_in(data, limit)
        # Some 0.2 ms a megabyte: in a thread, so other clients are served meanwhile.
        return await self.loop.run_in_executor(None, long_line_in, data, limit)

    async def _read_data(self) -> bytes | None:
        """The data up to (not including) the final ".<CRLF>", still dot-stuffed;
        None (after reading and discarding it all) when over MAX_MESSAGE_SIZE."""
        reader = self._reader
        # The DATA line's own CRLF begins the terminator of an empty message, so put
        # one back in front: then a single separator covers every case.
        reader._buffer[0:0] = b"\r\n"
        saved_limit, too_big = reader._limit, False
        reader._limit = self.data_size_limit + 5
        try:
            while True:
                try:
                    data = await reader.readuntil(b"\r\n.\r\n")
                    break
                except asyncio.LimitOverrunError as error:
                    too_big = True
                    await reader.readexactly(error.consumed)  # discard, keep looking
        finally:
            reader._limit = saved_limit
        return None if too_big else data[2:-3]

    def _timeout_cb(self) -> None:
        # aiosmtpd's timer counts from the last command and then drops the connection
        # without a word. A client waiting for the upstream is not idle, nor is one
        # still sending DATA; an idle one is told why it is disconnected.
        session = self.session
        now = time.monotonic()
        idle = now - (session.active_at if session is not None else 0.0)
        deadline = self._auth_deadline()
        busy = session is not None and session.busy
        if busy or (idle < self._timeout_duration and (deadline is None or now < deadline)):
            self._reset_timeout(max(0.05, self._timeout_duration - idle))
            return
        if idle >= self._timeout_duration:
            log_event(logging.INFO, "idle-timeout", session)
            self._hang_up(b"421 4.4.2 Idle timeout, closing connection\r\n")
            return
        log_event(logging.INFO, "auth-timeout", session)
        self._hang_up(f"421 4.7.0 No AUTH within {self._timeout_duration:g} s of "
                      "connecting, closing connection\r\n".encode())

    def _hang_up(self, reply: bytes) -> None:
        """Say why and close. close() waits for the write buffer to drain, so a client
        that never reads would keep its connection (and MAX_CONNECTIONS slot) forever:
        whatever cannot be sent at once is dropped."""
        transport = self.transport
        if transport is None or self._transport_closing():
            return  # closed once already (a second close() breaks a TLS transport)
        transport.write(self._unsent + reply)
        self._unsent = b""
        transport.close()
        if transport.get_write_buffer_size():
            transport.abort()

    @syntax("STARTTLS", when="tls_context")
    async def smtp_STARTTLS(self, arg: str) -> None:
        if self.encrypted:  # RFC 3207: no TLS inside TLS (aiosmtpd would try)
            await self.push("503 5.5.1 Already running TLS")
            return
        await super().smtp_STARTTLS(arg)

    async def handle_exception(self, error: Exception) -> str:
        if isinstance(error, TLSSetupException):  # the client's doing, not ours
            cause = error.__cause__ or error
            if isinstance(cause, (ConnectionError, ssl.SSLEOFError)):  # it left
                log_event(logging.DEBUG, "tls-abandoned", self.session,
                          reason=_describe(cause))
            else:
                log_event(logging.WARNING, "tls-failed", self.session,
                          reason=_describe(cause))
            return "421 4.7.0 TLS handshake failed"  # aiosmtpd closes; nothing sent
        log.exception("unexpected error peer=%s", getattr(self.session, "peer_ip", "?"))
        return "451 4.3.0 Internal error: try again later"

    @property
    def in_flight(self) -> bool:
        """A message is on its way: its data arriving, or the upstream answering."""
        return self.session is not None and (self.session.busy
                                             or self.session.receiving_data)

    def say_goodbye(self) -> None:
        """At shutdown, between commands: tell the client and close."""
        if not self.in_flight:
            self._hang_up(b"421 4.3.2 Service shutting down\r\n")


def cannot_listen(variables: str, host: str, port: int, error: OSError) -> ConfigError:
    return ConfigError(f"{variables}: cannot listen on {host}:{port} "
                       f"({error.strerror or error}): expects a free port on a local "
                       "address")


class _TooManyConnections(asyncio.Protocol):
    """Answers one connection over MAX_CONNECTIONS and hangs up. On SMTPS it hangs up
    without a word: the client expects a TLS handshake, and a refusal must not cost
    one."""

    def __init__(self, reply: bool = True):
        self.reply = reply

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.reply:
            transport.write(b"421 4.7.0 Too many connections, try again later\r\n")
        transport.close()


class _SMTPSAcceptor(asyncio.Protocol):
    """SMTPS, TLS from the first byte: the handshake of one accepted connection, which
    already holds its MAX_CONNECTIONS slot, then the SMTP protocol takes the TLS
    transport. (asyncio's own `ssl=` listener never tells the protocol about a handshake
    that failed or timed out, so the slot could not be given back.)"""

    def __init__(self, server: SMTPRelayServer, protocol: _RelaySMTP):
        self._server = server
        self._protocol = protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        server, protocol = self._server, self._protocol
        if not server.claim_address(protocol, transport):
            server.refused_over_ip_limit(None, protocol.claimed_ip)
            transport.close()  # connection_lost gives the slot back
            return
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        waiter.add_done_callback(self._handshake_done)
        assert server.tls_context is not None  # SMTPS_PORT set: load_config made sure
        # What create_server(ssl=...) does, with a waiter we can watch.
        tls = sslproto.SSLProtocol(
            loop, protocol, server.tls_context, waiter, server_side=True,
            ssl_handshake_timeout=server.config.timeout)  # type: ignore[arg-type]
        protocol.raw_transport = transport
        transport.set_protocol(tls)
        tls.connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        self._server.connection_closed(self._protocol)  # refused before the handshake

    def _handshake_done(self, waiter: asyncio.Future) -> None:
        error = None if waiter.cancelled() else waiter.exception()
        if self._protocol.connected:
            return  # the SMTP session has the connection (and gives the slot back)
        peer = self._protocol.claimed_ip
        if isinstance(error, ssl.SSLError) and not isinstance(error, ssl.SSLEOFError):
            log_event(logging.WARNING, "tls-failed", peer=peer, port="SMTPS",
                      reason=_describe(error))
        else:  # gone, or silent until the handshake timeout
            log_event(logging.DEBUG, "tls-abandoned", peer=peer, port="SMTPS",
                      reason=_describe(error) if error is not None else "closed")
        self._server.connection_closed(self._protocol)


class SMTPRelayServer:
    """The listening relay: builds the handler and upstream side, caps connections,
    and shuts down without cutting a delivery short."""

    def __init__(self, config: Config):
        self.config = config
        self.metrics = Metrics()
        self.metrics.connections_open.set_function(lambda: len(self.connections))
        self.forwarder = Forwarder(config, self.metrics)
        self.rate_limiter = RateLimiter(config)
        self.handler = SMTPRelayHandler(config, self.forwarder, self.rate_limiter,
                                        self.metrics)
        self.default_policy = default_policy(config)
        self.authenticator = SMTPAuthHandler(config)  # its own pool for bcrypt
        self.auth_guard = AuthGuard(config.auth_max_failures, config.auth_failure_window)
        self.tls_context = (inbound_tls_context(config)
                            if config.use_tls or config.smtps_port is not None else None)
        if self.tls_context is not None:  # the listeners' context, for good
            self._certificate = self.tls_context  # the one handshakes use (reload_tls)
            self.tls_context.sni_callback = self._use_current_certificate
        self.connections: set[_RelaySMTP] = set()  # from accept to close: the slots
        self._per_ip: collections.Counter[str] = collections.Counter()
        self.protocol_templates: dict[bool, _ProtocolTemplate] = {}  # by implicit_tls
        self._servers: list[asyncio.AbstractServer] = []
        self._smtp_options = {
            "hostname": config.smtp_hostname,
            "ident": "ESMTP smtp-relay",
            "data_size_limit": config.max_message_size,
            "enable_SMTPUTF8": True,
            "decode_data": False,
            "tls_context": self.tls_context if config.use_tls else None,
            "require_starttls": config.use_tls,
            # We check AUTH ourselves at MAIL (530), so aiosmtpd's own switch stays off;
            # AUTH is offered only after STARTTLS when USE_TLS is on.
            "auth_required": False,
            "auth_require_tls": config.use_tls,
            "auth_exclude_mechanism": [m for m in AUTH_MECHANISMS
                                       if m not in config.auth_mechanisms],
            "authenticator": self.authenticator,
            "timeout": config.timeout,
            "command_call_limit": {"AUTH": 10, "*": 10**9},
        }
        # SMTPS: TLS from the first byte, so no STARTTLS, and AUTH offered at once
        # (aiosmtpd counts only its own STARTTLS as TLS: issues #281/#274).
        self._smtps_options = {**self._smtp_options, "tls_context": None,
                               "require_starttls": False, "auth_require_tls": False}

    def _make_protocol(self, implicit_tls: bool = False) -> asyncio.Protocol:
        # The factory runs as each connection is accepted, several in one go when they
        # come at once (connection_made follows a loop turn later; on SMTPS only after
        # the handshake): the slot is taken here, and given back in connection_closed.
        if len(self.connections) >= self.config.max_connections:
            self.metrics.connections_refused.labels("max_connections").inc()
            log_event(logging.WARNING, "connection-refused",
                      reason="MAX_CONNECTIONS reached", limit=self.config.max_connections)
            return _TooManyConnections(reply=not implicit_tls)
        options = self._smtps_options if implicit_tls else self._smtp_options
        protocol = _RelaySMTP(self, implicit_tls=implicit_tls,
                              loop=asyncio.get_running_loop(), **options)
        self.connections.add(protocol)
        return _SMTPSAcceptor(self, protocol) if implicit_tls else protocol

    def claim_address(self, protocol: _RelaySMTP, transport: asyncio.BaseTransport
                      ) -> bool:
        """Count the connection for its address (MAX_CONNECTIONS_PER_IP, once per
        connection); False when that puts the address over the cap."""
        limit = self.config.max_connections_per_ip
        if not limit or protocol.claimed_ip is not None:
            return not protocol.over_ip_limit
        peer = transport.get_extra_info("peername")
        address = peer[0] if isinstance(peer, tuple) else str(peer)
        protocol.claimed_ip = address
        self._per_ip[address] += 1
        protocol.over_ip_limit = self._per_ip[address] > limit
        return not protocol.over_ip_limit

    def refused_over_ip_limit(self, session: Session | None, peer: str | None) -> str:
        self.metrics.connections_refused.labels("max_connections_per_ip").inc()
        log_event(logging.WARNING, "connection-refused", session,
                  **({} if session is not None else {"peer": peer}),
                  reason="MAX_CONNECTIONS_PER_IP reached",
                  limit=self.config.max_connections_per_ip)
        return "421 4.7.0 Too many connections from your address, try again later"

    def connection_refusal(self, session: Session, over_ip_limit: bool = False
                           ) -> str | None:
        """The connection checker: None to serve this client, else the reply."""
        try:
            address = ipaddress.ip_address(session.peer_ip.split("%")[0])
        except ValueError:  # not an IP peer (a Unix socket): nothing to match
            return None
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        networks = self.config.allowed_client_networks
        if networks and not any(address in network for network in networks):
            self.metrics.connections_refused.labels("network").inc()
            log_event(logging.WARNING, "connection-refused", session,
                      reason="not in ALLOWED_CLIENT_NETWORKS")
            return "554 5.7.1 Your address is not allowed to use this relay"
        if over_ip_limit:
            return self.refused_over_ip_limit(session, session.peer_ip)
        if self.auth_guard.locked(session.peer_ip):
            self.metrics.connections_refused.labels("locked_out").inc()
            log_event(logging.WARNING, "connection-refused", session,
                      reason="locked out after failed logins")
            return "421 4.7.0 Too many failed logins from your address; try again later"
        session.trusted = any(address in network
                              for network in self.config.trusted_networks)
        if session.trusted:
            session.policy = self.default_policy
        self.metrics.connections.inc()
        return None

    def connection_closed(self, protocol: _RelaySMTP) -> None:
        """Give back what the connection took when it was accepted (once)."""
        if protocol not in self.connections:
            return
        self.connections.discard(protocol)
        address = protocol.claimed_ip
        if address is not None:
            left = self._per_ip[address] - 1
            if left > 0:
                self._per_ip[address] = left
            else:
                del self._per_ip[address]

    async def start(self) -> None:
        await self._listen("LISTEN_PORT", self.config.listen_port, self._make_protocol)
        if self.config.smtps_port is not None:
            await self._listen("SMTPS_PORT", self.config.smtps_port,
                               lambda: self._make_protocol(implicit_tls=True))

    async def _listen(self, name: str, port: int, factory: Callable,
                      **options: Any) -> None:
        host = self.config.listen_host
        try:
            self._servers.append(await asyncio.get_running_loop().create_server(
                factory, host, port, reuse_address=True,
                backlog=max(100, self.config.max_connections), **options))
        except OSError as error:
            raise cannot_listen(f"LISTEN_HOST/{name}", host, port, error) from None

    @property
    def port(self) -> int:
        return self._servers[0].sockets[0].getsockname()[1]

    @property
    def serving(self) -> bool:
        return bool(self._servers) and all(s.is_serving() for s in self._servers)

    def reload(self, log_handler: _LogHandler | None) -> None:
        """SIGHUP: reopen the log file (after logrotate) and re-read SMTP_USERS_FILE.
        Sessions and deliveries go on; a users file that fails validation keeps the
        old users. Authenticated sessions keep the policy they had at AUTH. The TLS
        certificate and key are loaded anew too (see reload_tls)."""
        if log_handler is not None and log_handler.path:
            try:
                log_handler.reopen()
            except OSError as error:
                log_event(logging.ERROR, "log-reopen-failed", reason=error.strerror)
        self.reload_tls()
        try:
            count = self.authenticator.reload(self.config)
        except ConfigError as error:
            log_event(logging.ERROR, "users-reload-failed", reason=str(error),
                      kept=len(self.authenticator.users))
            return
        log_event(logging.INFO, "reloaded", users=count)

    def reload_tls(self) -> None:
        """SIGHUP: TLS_CERT_FILE and TLS_KEY_FILE read again (a renewed certificate).
        New handshakes, STARTTLS and SMTPS alike, get the new pair; sessions already
        in TLS keep theirs. A pair that does not load keeps the one in use."""
        if self.tls_context is None:
            return
        try:
            certificate = inbound_tls_context(self.config)
        except ConfigError as error:
            log_event(logging.ERROR, "tls-reload-failed", reason=str(error),
                      kept="the certificate loaded before")
            return
        self._certificate = certificate
        log_event(logging.INFO, "tls-reloaded", cert=self.config.tls_cert_file)

    def _use_current_certificate(self, tls: ssl.SSLObject, server_name: str | None,
                                 listening: ssl.SSLContext) -> None:
        # The listeners' context cannot be swapped under a running server, so every
        # handshake (this callback runs for each ClientHello, with or without SNI)
        # moves to the context reload_tls loaded last.
        if self._certificate is not listening:
            tls.context = self._certificate

    @property
    def smtps_port(self) -> int | None:
        if len(self._servers) < 2:
            return None
        return self._servers[1].sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop accepting; let deliveries in flight finish (bounded by TIMEOUT)."""
        for listener in self._servers:
            listener.close()
        deadline = time.monotonic() + self.config.timeout
        while time.monotonic() < deadline:
            for protocol in list(self.connections):
                protocol.say_goodbye()
            if not any(p.in_flight for p in self.connections):
                break
            await asyncio.sleep(0.05)
        for protocol in list(self.connections):
            if protocol.transport is not None:
                protocol.transport.close()
        await self.forwarder.close()


class ReadinessProbe:
    """Is the upstream usable? Connect, EHLO, STARTTLS and AUTH as configured, at most
    once per READY_PROBE_SECONDS; callers in between share the cached answer."""

    def __init__(self, config: Config, pool: UpstreamPool):
        self.config = config
        self.pool = pool
        self._answer: tuple[bool, str] | None = None
        self._answered_at = 0.0
        self._probe: asyncio.Future | None = None

    async def check(self) -> tuple[bool, str]:
        fresh = time.monotonic() - self._answered_at < self.config.ready_probe_seconds
        if self._answer is not None and fresh:
            return self._answer
        if self._probe is None:
            self._probe = asyncio.ensure_future(self._run())
        return await asyncio.shield(self._probe)

    async def _run(self) -> tuple[bool, str]:
        connection = UpstreamConnection(self.config, self.pool.tls_context)
        try:
            await self.pool.run(connection.open)
            steps = ["connect", "EHLO"] + (["STARTTLS"] if self.config.relay_use_tls
                                           else []) + (["AUTH"] if
                                                       self.config.relay_username else [])
            answer = (True, "upstream answered: " + ", ".join(steps))
        except UpstreamError as error:
            answer = (False, f"upstream not ready: {error}")
        finally:
            await self.pool.run(connection.close)
            self._probe = None
        self._answer, self._answered_at = answer, time.monotonic()
        return answer


class HTTPEndpoint:
    """/healthz, /readyz and /metrics on HTTP_HOST:HTTP_PORT. Three GET routes need no
    web framework: a request line and headers are read, one response written."""

    MAX_REQUEST = 8192

    def __init__(self, relay: SMTPRelayServer):
        self.relay = relay
        self.readiness = ReadinessProbe(relay.config, relay.forwarder.pool)
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        config = self.relay.config
        try:
            self._server = await asyncio.start_server(
                self._serve, config.http_host, config.http_port, reuse_address=True,
                limit=self.MAX_REQUEST)
        except OSError as error:
            raise cannot_listen("HTTP_HOST/HTTP_PORT", config.http_host,
                                config.http_port, error) from None

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    def close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _serve(self, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            method, path = (request.split(b"\r\n", 1)[0].decode("latin-1")
                            .split(" ") + ["", ""])[:2]
            status, content_type, body = await self._respond(method, path.split("?")[0])
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError,
                ConnectionError):
            writer.close()
            return
        head = (f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
        writer.write(head.encode("latin-1") + (body if method != "HEAD" else b""))
        try:
            await writer.drain()
        except ConnectionError:
            pass
        writer.close()

    async def _respond(self, method: str, path: str) -> tuple[str, str, bytes]:
        text = "text/plain; charset=utf-8"
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", text, b"GET only\n"
        if path == "/healthz":
            if self.relay.serving:
                return "200 OK", text, b"ok: the SMTP listener accepts connections\n"
            return "503 Service Unavailable", text, b"the SMTP listener is down\n"
        if path == "/readyz":
            ready, detail = await self.readiness.check()
            status = "200 OK" if ready else "503 Service Unavailable"
            return status, text, (detail + "\n").encode()
        if path == "/metrics":
            return ("200 OK", prometheus_client.CONTENT_TYPE_LATEST,
                    prometheus_client.generate_latest(self.relay.metrics.registry))
        return "404 Not Found", text, b"try /healthz, /readyz or /metrics\n"


# ---------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------

def _startup_warnings(config: Config) -> None:
    if config.auth_password == DEFAULT_AUTH_PASSWORD and not config.auth_password_hash:
        log.warning("SMTP_AUTH_PASSWORD is the default %r: anyone who knows it can send "
                    "through this relay. Set your own.", DEFAULT_AUTH_PASSWORD)
    if not config.use_tls:
        log.warning("USE_TLS is off: clients send AUTH credentials and mail in plaintext. "
                    "Fine on a trusted network or loopback; otherwise turn USE_TLS on.")
    if (config.relay_use_tls or config.relay_use_ssl) and not config.relay_tls_verify:
        log.warning("RELAY_TLS_VERIFY is off: the upstream's certificate is not checked, "
                    "so anyone on the path can impersonate it.")
    if not (config.relay_use_tls or config.relay_use_ssl):
        log.warning("RELAY_USE_TLS and RELAY_USE_SSL are off: mail goes to the upstream "
                    "in plaintext.")
    if config.trusted_networks:
        log.warning("TRUSTED_NETWORKS: clients from %s may send WITHOUT authenticating "
                    "(the domain allowlists still apply).",
                    ",".join(map(str, config.trusted_networks)))
    if TLS_VERSIONS[config.tls_min_version] < ssl.TLSVersion.TLSv1_2:
        log.warning("TLS_MIN_VERSION=%s: TLS below 1.2 is broken; allow it only for old "
                    "devices that cannot do better.", config.tls_min_version)


async def serve(config: Config, *, ready: Callable[[SMTPRelayServer], Any] | None = None,
                log_handler: _LogHandler | None = None) -> int:
    server = SMTPRelayServer(config)
    await server.start()
    http = HTTPEndpoint(server) if config.http_port is not None else None
    if http is not None:
        await http.start()
    log_event(logging.INFO, "started", listen=f"{config.listen_host}:{server.port}",
              smtps=server.smtps_port, http=http.port if http else None,
              **{k: v for k, v in config.redacted().items()
                 if k not in ("listen_host", "listen_port", "smtps_port", "http_port")})
    _startup_warnings(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, server.reload, log_handler)
    if ready is not None:
        await ready(server)
    await stop.wait()
    log_event(logging.INFO, "stopping", in_flight=sum(
        1 for p in server.connections if p.in_flight))
    if http is not None:
        http.close()
    await server.stop()
    log_event(logging.INFO, "stopped")
    return 0


DEMO_ENV = {
    "SMTP_AUTH_USERNAME": "demo",
    "SMTP_AUTH_PASSWORD": "demo-password",
    "ALLOWED_FROM_DOMAINS": "example.com",
    "ALLOWED_TO_DOMAINS": "example.com",
    "LISTEN_HOST": "127.0.0.1",
    "RELAY_USE_TLS": "false",
    "RELAY_USE_SSL": "false",
}


async def _demo(env: dict[str, str]) -> int:
    """The relay in front of a local upstream that prints every message it receives."""
    from aiosmtpd.handlers import Debugging

    loop = asyncio.get_running_loop()
    upstream = await loop.create_server(
        lambda: SMTP(Debugging(sys.stdout), hostname="demo-upstream", loop=loop),
        "127.0.0.1", 0)
    env = {**env, "RELAY_HOST": "127.0.0.1",
           "RELAY_PORT": str(upstream.sockets[0].getsockname()[1])}
    config = load_config(env)
    setup_logging(config)

    async def send_example(server: SMTPRelayServer) -> None:
        def send() -> str:
            with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as client:
                client.login(config.auth_username, config.auth_password)
                client.sendmail("app@example.com", ["ops@example.com"],
                                b"Subject: smtp-relay demo\r\n\r\nIt works.\r\n")
            return "250"
        await loop.run_in_executor(None, send)
        print(f"\nDemo: a message went through the relay (above). Try your own:\n"
              f"  swaks --server 127.0.0.1:{server.port} --auth-user "
              f"{config.auth_username} --auth-password {config.auth_password} "
              f"--from app@example.com --to ops@example.com\n"
              f"Stop with Ctrl-C.\n", flush=True)

    try:
        return await serve(config, ready=send_example)
    finally:
        upstream.close()


def hash_password() -> int:
    """Print a bcrypt hash for SMTP_AUTH_PASSWORD_HASH (typed twice, or one stdin line)."""
    import getpass

    if sys.stdin.isatty():
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            print("smtp-relay: the two passwords differ", file=sys.stderr)
            return 1
    else:
        password = sys.stdin.readline().removesuffix("\n").removesuffix("\r")
    if not password:
        print("smtp-relay: empty password", file=sys.stderr)
        return 2
    secret = password.encode("utf-8")
    if len(secret) > BCRYPT_MAX_PASSWORD:
        print(f"smtp-relay: note: the password is {len(secret)} bytes; bcrypt uses only "
              f"the first {BCRYPT_MAX_PASSWORD} (as htpasswd -B does), so any password "
              "that begins with the same 72 bytes will match", file=sys.stderr)
    print(bcrypt.hashpw(secret[:BCRYPT_MAX_PASSWORD], bcrypt.gensalt(12)).decode("ascii"))
    return 0


class UpstreamCheck:
    """`python smtp_relay.py check`: the upstream settings tried step by step (DNS, TCP,
    banner, EHLO, STARTTLS and certificate, AUTH), each step's outcome printed with the
    likely fix when it fails."""

    def __init__(self, config: Config, out: Any = sys.stdout):
        self.config = config
        self.out = out
        self.smtp: smtplib.SMTP | None = None
        self.tls_context = (upstream_tls_context(config) if config.relay_use_tls
                            or config.relay_use_ssl else None)

    def say(self, step: str, ok: bool, detail: str, fix: str = "") -> bool:
        self.out.write(f"{'ok  ' if ok else 'FAIL'} {step:<10} {detail}\n")
        if fix:
            self.out.write(f"     {'':<10} fix: {fix}\n")
        return ok

    def run(self) -> bool:
        try:
            return (self.dns() and self.tcp() and self.banner() and self.ehlo()
                    and self.starttls() and self.auth())
        finally:
            if self.smtp is not None:
                try:
                    self.smtp.quit()
                except (smtplib.SMTPException, OSError):
                    self.smtp.close()

    def dns(self) -> bool:
        host, port = self.config.relay_host, self.config.relay_port
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as error:
            return self.say("DNS", False, f"{host}: {error.strerror}",
                            "check RELAY_HOST's spelling and this machine's DNS")
        addresses = sorted({info[4][0] for info in infos})
        return self.say("DNS", True, f"{host} -> {', '.join(addresses)}")

    def tcp(self) -> bool:
        host, port = self.config.relay_host, self.config.relay_port
        try:
            socket.create_connection((host, port), timeout=self.config.timeout).close()
        except OSError as error:
            return self.say("TCP", False, f"{host}:{port}: {_describe(error)}",
                            "nothing answers there: check RELAY_PORT (587 STARTTLS, "
                            "465 implicit TLS, 25 often blocked by providers) and "
                            "firewalls")
        return self.say("TCP", True, f"connected to {host}:{port}")

    def banner(self) -> bool:
        config = self.config
        try:
            if config.relay_use_ssl:
                self.smtp = smtplib.SMTP_SSL(timeout=config.timeout, context=self.tls_context,
                                             local_hostname=config.smtp_hostname)
            else:
                self.smtp = smtplib.SMTP(timeout=config.timeout,
                                         local_hostname=config.smtp_hostname)
            # smtplib checks the certificate against _host, which only its constructor
            # sets: connect() alone would leave it empty.
            self.smtp._host = config.relay_host
            code, text = self.smtp.connect(config.relay_host, config.relay_port)
        except ssl.SSLCertVerificationError as error:
            return self.say("TLS", False, _describe(error), self._certificate_fix(error))
        except (ssl.SSLError, smtplib.SMTPException, OSError, ValueError) as error:
            fix = ("this port does not speak TLS first: use RELAY_USE_TLS=true and "
                   "RELAY_USE_SSL=false (STARTTLS, usually port 587)"
                   if config.relay_use_ssl else
                   "the server said nothing: port 465 expects implicit TLS "
                   "(RELAY_USE_SSL=true, RELAY_USE_TLS=false)")
            return self.say("banner", False, _describe(error), fix)
        if code != 220:
            return self.say("banner", False, f"{code} {_reply_text(text)}",
                            "the upstream refuses connections from this address")
        return self.say("banner", True, f"{code} {_reply_text(text)}")

    def ehlo(self) -> bool:
        code, text = self.smtp.ehlo()
        if code != 250:
            return self.say("EHLO", False, f"{code} {_reply_text(text)}",
                            "the upstream refused our EHLO: set SMTP_HOSTNAME to a "
                            "proper host name")
        return self.say("EHLO", True, "extensions: " + " ".join(
            sorted(self.smtp.esmtp_features)))

    def starttls(self) -> bool:
        if not self.config.relay_use_tls:
            detail = ("implicit TLS (RELAY_USE_SSL)" if self.config.relay_use_ssl
                      else "off (RELAY_USE_TLS=false): mail goes in plaintext")
            return self.say("STARTTLS", True, detail)
        if not self.smtp.has_extn("starttls"):
            return self.say("STARTTLS", False, "not offered by the upstream",
                            "use the provider's submission port (587), or "
                            "RELAY_USE_SSL=true on 465")
        try:
            self.smtp.starttls(context=self.tls_context)
        except ssl.SSLCertVerificationError as error:
            return self.say("STARTTLS", False, _describe(error),
                            self._certificate_fix(error))
        except (ssl.SSLError, smtplib.SMTPException, OSError, ValueError) as error:
            return self.say("STARTTLS", False, _describe(error), "")
        certificate = self.smtp.sock.getpeercert() or {}
        subject = dict(item[0] for item in certificate.get("subject", ()))
        self.smtp.ehlo()
        return self.say("STARTTLS", True, f"{self.smtp.sock.version()}, certificate "
                        f"for {subject.get('commonName', '?')}, valid until "
                        f"{certificate.get('notAfter', '?')}")

    def _certificate_fix(self, error: ssl.SSLCertVerificationError) -> str:
        if "hostname" in str(error.verify_message).lower() or "IP address" in str(
                error.verify_message):
            return (f"the certificate is not for RELAY_HOST={self.config.relay_host}: "
                    "use the host name printed on the certificate")
        return ("the certificate's issuer is not trusted: set RELAY_TLS_CA_FILE to "
                "the CA that signed it (RELAY_TLS_VERIFY=false only for testing)")

    def auth(self) -> bool:
        if not self.config.relay_username:
            return self.say("AUTH", True, "not configured (RELAY_USERNAME empty)")
        if not self.smtp.has_extn("auth"):
            return self.say("AUTH", False, "the upstream offers no AUTH here",
                            "AUTH is usually offered only after TLS and on port 587")
        try:
            self.smtp.login(self.config.relay_username, self.config.relay_password)
        except smtplib.SMTPAuthenticationError as error:
            text = _reply_text(error.smtp_error)
            fix = ("the provider wants an app password (Gmail, Microsoft 365) or "
                   "SMTP credentials (SES), not the account's own password"
                   if error.smtp_code == 534 or "application" in text.lower() else
                   "check RELAY_USERNAME and RELAY_PASSWORD; Gmail and Microsoft 365 "
                   "need an app password")
            return self.say("AUTH", False, f"{error.smtp_code} {text}", fix)
        except (smtplib.SMTPException, OSError) as error:
            return self.say("AUTH", False, _describe(error), "")
        return self.say("AUTH", True, f"logged in as {self.config.relay_username}")


def check_command(environ: Mapping[str, str], out: Any = sys.stdout) -> int:
    config = load_config(environ)
    load_users(config)  # a broken users file is a configuration error too
    out.write("Configuration (secrets redacted):\n")
    for key, value in config.redacted().items():
        out.write(f"  {key} = {value}\n")
    out.write(f"\nUpstream {config.relay_host}:{config.relay_port}:\n")
    ok = UpstreamCheck(config, out).run()
    out.write("\nAll steps passed.\n" if ok else "\nThe upstream is not usable yet.\n")
    return 0 if ok else 1


COMMANDS = ("serve", "demo", "hash-password", "check")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv else "serve"
    if command not in COMMANDS or len(argv) > 1:
        print(f"usage: {os.path.basename(sys.argv[0])} [{'|'.join(COMMANDS)}]",
              file=sys.stderr)
        return 2
    if command == "hash-password":
        return hash_password()
    try:
        from dotenv import load_dotenv
        # .env in the working directory; variables already in the environment win.
        load_dotenv(os.path.join(os.getcwd(), ".env"), override=False)
        if command == "demo":
            return asyncio.run(_demo({**DEMO_ENV, **{k: v for k, v in os.environ.items()
                                                     if k not in DEMO_ENV}}))
        if command == "check":
            return check_command(os.environ)
        config = load_config(os.environ)
        log_handler = setup_logging(config)
        return asyncio.run(serve(config, log_handler=log_handler))
    except ConfigError as error:
        print(f"smtp-relay: configuration error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
