"""The relay's configuration: one declarative table of settings, read from the
environment (and .env) once at start-up.

Every setting is one row of `Config`'s body: the environment variable (a public name,
never renamed), how its text is parsed and bounded, its default and a one-line
description. `load_config` reads the rows, `check_consistency` checks what concerns
several rows at once, and tests/test_docs.py holds README, .env.example and
docker-compose.yml to the same rows. A bad value raises ConfigError, whose text names
the variable and what it expects: main prints it as one line and exits with status 2.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
import socket
import ssl
from collections.abc import Mapping
from typing import Any, Generic, TypeVar

from relay.policy import (
    HOSTNAME_RE,
    AddressError,
    DomainList,
    normalize_domain,
    one_line,
    parse_path,
)

T = TypeVar("T")
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class ConfigError(Exception):
    """A setting is unusable. The text names the variable and what it expects."""


DEFAULT_AUTH_PASSWORD = "password"
AUTH_MECHANISMS = ("PLAIN", "LOGIN", "CRAM-MD5")
TLS_VERSIONS = {"1.0": ssl.TLSVersion.TLSv1, "1.1": ssl.TLSVersion.TLSv1_1,
                "1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
BCRYPT_HASH = re.compile(r"\$2[aby]\$[0-3][0-9]\$[./A-Za-z0-9]{53}")
DELIVERY_MODES = ("sync", "queue", "fallback")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
_BOOLEANS = {"true": True, "yes": True, "1": True, "on": True,
             "false": False, "no": False, "0": False, "off": False}


# ---------------------------------------------------------------------------------------
# Kinds of value: each parses one variable's text or raises ConfigError naming it
# ---------------------------------------------------------------------------------------

class Kind(Generic[T]):
    """How a variable's text becomes a value. `parse` gets text that is set and not
    blank (an unset or blank variable takes the row's default)."""

    blank_is_default = True  # an empty value counts as unset, as compose files write it

    def parse(self, name: str, raw: str) -> T:
        raise NotImplementedError

    def shown(self, value: T) -> object:
        """The value as the start line and `check` print it."""
        return value


class Text(Kind[str]):
    blank_is_default = False  # an empty LISTEN_HOST is an error, not the default

    def __init__(self, case: str = "") -> None:
        self.case = case  # "upper", "lower" or "" (as written)

    def parse(self, name: str, raw: str) -> str:
        text = raw.strip()
        return text.upper() if self.case == "upper" else (
            text.lower() if self.case == "lower" else text)


class Choice(Text):
    def __init__(self, *choices: str, case: str = "lower") -> None:
        super().__init__(case)
        self.choices = choices

    def parse(self, name: str, raw: str) -> str:
        value = super().parse(name, raw)
        if value not in self.choices:
            raise ConfigError(f"{name}={raw!r}: expects one of " + ", ".join(self.choices))
        return value


class Secret(Text):
    """Taken as written (a password may have spaces); never shown. NAME_FILE (Docker
    secrets) is handled by load_config for every secret row."""

    def parse(self, name: str, raw: str) -> str:
        return raw

    def shown(self, value: str) -> object:
        return "***" if value else ""


class URL(Text):
    """A URI that may hold credentials (redis://:password@host): shown without them."""

    def shown(self, value: str) -> object:
        return redact_url(value)


class Boolean(Kind[bool]):
    def parse(self, name: str, raw: str) -> bool:
        try:
            return _BOOLEANS[raw.strip().lower()]
        except KeyError:
            raise ConfigError(f"{name}={raw!r}: expects true/false (also yes/no, 1/0)") \
                from None


class Integer(Kind[int]):
    def __init__(self, minimum: int = 0, maximum: float = math.inf) -> None:
        self.minimum, self.maximum = minimum, maximum

    def parse(self, name: str, raw: str) -> int:
        text = raw.strip()
        # int() also takes "1_025" and non-ASCII digits; a setting should not.
        if not (text.isascii() and re.fullmatch(r"-?[0-9]+", text)):
            raise ConfigError(f"{name}={raw!r}: expects a whole number")
        return _bounded(name, raw, int(text), self.minimum, self.maximum,
                        "a whole number")


class OptionalPort(Kind["int | None"]):
    """A port, or empty for off."""

    def parse(self, name: str, raw: str) -> int | None:
        return Integer(0, 65535).parse(name, raw)


class Number(Kind[float]):
    def __init__(self, minimum: float = 0, maximum: float = math.inf) -> None:
        self.minimum, self.maximum = minimum, maximum

    def parse(self, name: str, raw: str) -> float:
        text = raw.strip()
        try:
            if not (text.isascii() and re.fullmatch(r"-?[0-9.eE+-]+", text)):
                raise ValueError
            value = float(text)
        except ValueError:
            raise ConfigError(f"{name}={raw!r}: expects a number") from None
        return _bounded(name, raw, value, self.minimum, self.maximum, "a number")


_SECONDS_PER_UNIT = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


class Duration(Kind[float]):
    """Seconds, or a number with a unit: 90, 90s, 15m, 1.5h, 5d."""

    def __init__(self, minimum: float = 0, maximum: float = math.inf) -> None:
        self.minimum, self.maximum = minimum, maximum

    def parse(self, name: str, raw: str) -> float:
        match = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)\s*([smhd]?)", raw.strip().lower())
        if not raw.isascii() or match is None:
            raise ConfigError(f"{name}={raw!r}: expects a duration: seconds, or a number "
                              "with s, m, h or d (e.g. 90, 15m, 5d)")
        value = float(match.group(1)) * _SECONDS_PER_UNIT[match.group(2)]
        return _bounded(name, raw, value, self.minimum, self.maximum,
                        "a duration in seconds")


def _bounded(name: str, raw: str, value: Any, minimum: float, maximum: float,
             kind: str) -> Any:
    if not minimum <= value <= maximum:  # also refuses nan
        upper = "" if maximum == math.inf else f" and at most {maximum:g}"
        raise ConfigError(f"{name}={raw!r}: expects {kind} at least {minimum:g}{upper}")
    return value


class Domains(Kind[DomainList]):
    blank_is_default = False  # an empty allowlist is an error, not the default

    def parse(self, name: str, raw: str) -> DomainList:
        return parse_domain_list(raw, name)

    def shown(self, value: DomainList) -> object:
        return str(value)


class Networks(Kind["tuple[Network, ...]"]):
    def parse(self, name: str, raw: str) -> tuple[Network, ...]:
        networks = []
        for entry in filter(None, (part.strip() for part in raw.split(","))):
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                raise ConfigError(f"{name}: {entry!r} is not a network; expects CIDR "
                                  "entries like 10.0.0.0/8,192.168.1.20,fd00::/8") from None
        return tuple(networks)

    def shown(self, value: tuple[Network, ...]) -> object:
        return ",".join(map(str, value))


class Mechanisms(Kind["tuple[str, ...]"]):
    blank_is_default = False

    def parse(self, name: str, raw: str) -> tuple[str, ...]:
        names = tuple(part.strip().upper() for part in raw.split(",") if part.strip())
        if not names or any(mechanism not in AUTH_MECHANISMS for mechanism in names):
            raise ConfigError(f"{name}={raw!r}: expects a comma-separated list of "
                              + ", ".join(AUTH_MECHANISMS))
        return names

    def shown(self, value: tuple[str, ...]) -> object:
        return ",".join(value)


def parse_host_list(raw: str, default_port: int, name: str) -> tuple[tuple[str, int], ...]:
    """`smtp1.example.com,smtp2.example.com:2525,[2001:db8::1]:25` -> ((host, port), ...):
    hosts tried in order. ConfigError naming `name` if an entry is not host[:port]."""
    hosts = []
    for entry in raw.split(","):
        entry = entry.strip()
        match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\](?::([0-9]{1,5}))?|([^\s:\[\]/@]+)"
                             r"(?::([0-9]{1,5}))?", entry)
        if match is None:
            raise ConfigError(f"{name}={raw!r}: expects a comma-separated list of "
                              "host or host:port ([IPv6]:port), no empty entries")
        host = match.group(1) or match.group(3)
        port_text = match.group(2) or match.group(4)
        port = int(port_text) if port_text else default_port
        if not 1 <= port <= 65535 or not (match.group(1) or HOSTNAME_RE.fullmatch(host)):
            raise ConfigError(f"{name}: {entry!r}: expects host[:port] with a port "
                              "from 1 to 65535")
        hosts.append((host, port))
    return tuple(hosts)


def host_label(host: str, port: int) -> str:
    """host:port as parse_host_list reads it back ([IPv6]:port)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_resolvers(raw: str, name: str) -> tuple[tuple[str, int], ...]:
    """DNS_RESOLVERS: `IP` or `IP:PORT` ([IPv6]:PORT), comma-separated."""
    resolvers = []
    for host, port in parse_host_list(raw, 53, name):
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ConfigError(f"{name}: {host!r} is not an IP address; expects "
                              "IP or IP:PORT entries like 127.0.0.1:5353") from None
        resolvers.append((host, port))
    return tuple(resolvers)


class Resolvers(Kind["tuple[tuple[str, int], ...]"]):
    def parse(self, name: str, raw: str) -> tuple[tuple[str, int], ...]:
        return parse_resolvers(raw, name)

    def shown(self, value: tuple[tuple[str, int], ...]) -> object:
        return ",".join(host_label(host, port) for host, port in value)


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
    netloc, tail = rest, ""
    for index, char in enumerate(rest):
        if char in "/?#":
            netloc, tail = rest[:index], rest[index:]
            break
    if "@" in netloc:
        userinfo, _, host = netloc.rpartition("@")
        user, colon, _ = userinfo.partition(":")
        netloc = f"{user}:***@{host}" if colon else f"***@{host}"
    tail = _SECRET_QUERY.sub(lambda match: match.group(1) + "***", tail)
    return f"{scheme}://{netloc}{tail}"


# ---------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Setting:
    """One row: a variable, how to read it, its default, what it means."""

    variable: str  # the environment variable: a public interface, never renamed
    kind: Kind[Any]  # parses and bounds the text
    default: Any  # the value when unset (or blank, for most kinds)
    doc: str  # one line, as in README's Configuration table


def setting(variable: str, kind: Kind[T], default: T, doc: str) -> T:
    """A Config field declared by its row of the table."""
    row = Setting(variable, kind, default, doc)
    return dataclasses.field(default=default, metadata={"setting": row})


DEFAULT_DOMAINS = parse_domain_list("example.com", "the default")


@dataclasses.dataclass(frozen=True)
class Config:
    """The relay's whole configuration, read once at start-up (see load_config)."""

    # Clients and their users.
    auth_username: str = setting(
        "SMTP_AUTH_USERNAME", Text(), "user",
        "the user clients authenticate as (AUTH PLAIN or LOGIN)")
    auth_password: str = setting(
        "SMTP_AUTH_PASSWORD", Secret(), DEFAULT_AUTH_PASSWORD,
        "its password (a loud warning at start while it is the default)")
    auth_password_hash: str = setting(
        "SMTP_AUTH_PASSWORD_HASH", Secret(), "",
        "instead of the password: its bcrypt hash")
    auth_mechanisms: tuple[str, ...] = setting(
        "AUTH_MECHANISMS", Mechanisms(), ("PLAIN", "LOGIN"),
        "AUTH mechanisms offered: PLAIN, LOGIN, CRAM-MD5 (not with a hash)")
    auth_max_failures: int = setting(
        "AUTH_MAX_FAILURES", Integer(0), 5,
        "failed AUTH from one IP within the window that lock it out; 0 = never")
    auth_failure_window: float = setting(
        "AUTH_FAILURE_WINDOW", Number(1), 300.0, "that window, seconds")
    auth_failure_delay: float = setting(
        "AUTH_FAILURE_DELAY", Number(0, 30), 1.0,
        "seconds before each failed AUTH is answered")
    users_file: str = setting(
        "SMTP_USERS_FILE", Text(), "",
        "more users, each with its own domains and rate; re-read on SIGHUP")
    allowed_from_domains: DomainList = setting(  # noqa: RUF009 (DomainList is frozen)
        "ALLOWED_FROM_DOMAINS", Domains(), DEFAULT_DOMAINS,
        "comma-separated allowed envelope-sender domains")
    allowed_to_domains: DomainList = setting(  # noqa: RUF009 (DomainList is frozen)
        "ALLOWED_TO_DOMAINS", Domains(), DEFAULT_DOMAINS,
        "comma-separated allowed recipient domains")
    # Listening.
    listen_host: str = setting("LISTEN_HOST", Text(), "0.0.0.0", "address to listen on")
    listen_port: int = setting("LISTEN_PORT", Integer(0, 65535), 1025,
                               "port to listen on")
    use_tls: bool = setting("USE_TLS", Boolean(), False,
                            "offer STARTTLS; AUTH and mail only after it")
    tls_cert_file: str = setting("TLS_CERT_FILE", Text(), "/etc/certs/server.crt",
                                 "certificate (PEM, chain after it)")
    tls_key_file: str = setting("TLS_KEY_FILE", Text(), "/etc/certs/server.key",
                                "its private key (PEM)")
    smtps_port: int | None = setting(
        "SMTPS_PORT", OptionalPort(), None,
        "an extra listener with TLS from the first byte; AUTH offered on it")
    tls_min_version: str = setting(
        "TLS_MIN_VERSION", Choice(*TLS_VERSIONS), "1.2", "oldest TLS accepted from clients")
    smtp_hostname: str = setting(
        "SMTP_HOSTNAME", Text(), "",
        "name in the greeting, EHLO to the upstream, Received: (empty: the host name)")
    proxy_protocol: bool = setting(
        "PROXY_PROTOCOL", Boolean(), False,
        "expect a PROXY v1/v2 header (HAProxy send-proxy) on LISTEN_PORT and SMTPS_PORT")
    proxy_trusted_networks: tuple[Network, ...] = setting(
        "PROXY_TRUSTED_NETWORKS", Networks(), (),
        "CIDR list of the load balancers that may send it; others are dropped")
    # The upstream.
    relay_host: str = setting(
        "RELAY_HOST", Text(), "smtp.example.com",
        "upstream server, or a comma-separated list tried in order (host or host:port)")
    relay_port: int = setting("RELAY_PORT", Integer(1, 65535), 25, "upstream port")
    relay_use_tls: bool = setting("RELAY_USE_TLS", Boolean(), True,
                                  "STARTTLS to the upstream, required")
    relay_use_ssl: bool = setting("RELAY_USE_SSL", Boolean(), False,
                                  "implicit TLS to the upstream (port 465)")
    relay_username: str = setting("RELAY_USERNAME", Text(), "",
                                  "upstream AUTH user, optional; needs TLS")
    relay_password: str = setting("RELAY_PASSWORD", Secret(), "",
                                  "upstream AUTH password")
    relay_tls_verify: bool = setting("RELAY_TLS_VERIFY", Boolean(), True,
                                     "verify the upstream's certificate and host name")
    relay_tls_ca_file: str = setting("RELAY_TLS_CA_FILE", Text(), "",
                                     "extra CA certificates (PEM) for the upstream")
    relay_pool_idle_seconds: float = setting(
        "RELAY_POOL_IDLE_SECONDS", Number(0, 3600), 15.0,
        "close a reusable upstream session after this long idle; 0 = no reuse")
    relay_pool_max_messages: int = setting(
        "RELAY_POOL_MAX_MESSAGES", Integer(1), 100,
        "close a reusable upstream session after this many messages")
    # Routes and direct MX delivery (issue #11).
    routes_file: str = setting(
        "ROUTES_FILE", Text(), "",
        "routes by user, sender or recipient domain to other upstreams or to mx; "
        "re-read on SIGHUP")
    dns_resolvers: tuple[tuple[str, int], ...] = setting(
        "DNS_RESOLVERS", Resolvers(), (),
        "DNS servers for MX delivery, IP or IP:PORT, comma-separated; empty = the system's")
    mx_port: int = setting("MX_PORT", Integer(1, 65535), 25,
                           "port of MX hosts (25; another only for tests)")
    mx_allow_private: bool = setting(
        "MX_ALLOW_PRIVATE", Boolean(), False,
        "allow MX delivery to loopback, private and link-local addresses")
    mx_tls: str = setting(
        "MX_TLS", Choice("may", "encrypt", "verify"), "may",
        "TLS to MX hosts: may (opportunistic), encrypt (required), verify (verified)")
    mx_mta_sts: bool = setting("MX_MTA_STS", Boolean(), False,
                               "honour recipient domains' MTA-STS policies (RFC 8461)")
    # Limits.
    max_connections: int = setting("MAX_CONNECTIONS", Integer(1, 10000), 50,
                                   "simultaneous client connections")
    max_connections_per_ip: int = setting(
        "MAX_CONNECTIONS_PER_IP", Integer(0, 10000), 0,
        "simultaneous client connections from one address; 0 = no limit")
    timeout: float = setting("TIMEOUT", Number(1, 3600), 60.0,
                             "seconds: client inactivity, each upstream step")
    max_message_size: int = setting("MAX_MESSAGE_SIZE", Integer(1024), 10485760,
                                    "bytes, advertised as SIZE")
    max_recipients: int = setting("MAX_RECIPIENTS", Integer(1), 100,
                                  "recipients per message")
    rate_limit_per_minute: int = setting(
        "RATE_LIMIT_PER_MINUTE", Integer(0), 0, "messages per minute per user; 0 = off")
    rate_limit_burst: int = setting(
        "RATE_LIMIT_BURST", Integer(0), 0,
        "messages in a row before the per-minute rate applies; 0 = the rate alone")
    messages_per_day: int = setting("MESSAGES_PER_DAY", Integer(0), 0,
                                    "messages per 24 hours per user; 0 = off")
    recipients_per_minute: int = setting("RECIPIENTS_PER_MINUTE", Integer(0), 0,
                                         "recipients per minute per user; 0 = off")
    rate_limit_storage: str = setting("RATE_LIMIT_STORAGE", URL(), "memory://",
                                      "where the counters live: a `limits` storage URI")
    allowed_client_networks: tuple[Network, ...] = setting(
        "ALLOWED_CLIENT_NETWORKS", Networks(), (),
        "CIDR list of client addresses that may connect at all")
    trusted_networks: tuple[Network, ...] = setting(
        "TRUSTED_NETWORKS", Networks(), (),
        "CIDR list of clients that may send without AUTH")
    trusted_networks_allow_public: bool = setting(
        "TRUSTED_NETWORKS_ALLOW_PUBLIC", Boolean(), False,
        "allow non-private ranges in TRUSTED_NETWORKS")
    max_hops: int = setting("MAX_HOPS", Integer(1), 50,
                            "refuse a message with more Received: headers than this")
    check_header_from: bool = setting(
        "CHECK_HEADER_FROM", Boolean(), False,
        "also require the From: header's domains to be allowed")
    rate_limit_failure: str = setting(
        "RATE_LIMIT_FAILURE", Choice("open", "closed"), "open",
        "when RATE_LIMIT_STORAGE cannot be reached: open (relay, unlimited) or closed "
        "(451 4.3.0)")
    # Durable delivery (the queue).
    delivery_mode: str = setting(
        "DELIVERY_MODE", Choice(*DELIVERY_MODES), "sync",
        "sync: the upstream's answer; queue: store, then deliver; fallback: sync, "
        "queue when the upstream cannot answer now")
    queue_url: str = setting(
        "QUEUE_URL", URL(), "sqlite:///spool/queue.db",
        "the queue's store: sqlite:///relative.db, sqlite:////absolute.db or "
        "postgresql://user:password@host/db")
    queue_workers: int = setting(
        "QUEUE_WORKERS", Integer(1, 1000), 50,
        "queued deliveries running at once: upstream sessions, as many as MAX_CONNECTIONS "
        "clients use in sync mode")
    queue_lease_seconds: float = setting(
        "QUEUE_LEASE_SECONDS", Number(5, 3600), 30.0,
        "a claimed delivery returns to the queue if its relay is silent this long")
    queue_retry_min: float = setting(
        "QUEUE_RETRY_MIN", Duration(0.1), 60.0,
        "first retry after a temporary failure (then doubling, with jitter)")
    queue_retry_max: float = setting("QUEUE_RETRY_MAX", Duration(0.1), 3600.0,
                                     "longest wait between two tries")
    queue_max_age: float = setting("QUEUE_MAX_AGE", Duration(1), 432000.0,
                                   "give up (and bounce) after this long in the queue")
    queue_max_messages: int = setting("QUEUE_MAX_MESSAGES", Integer(1), 100000,
                                      "queued messages; beyond it 452 4.3.1")
    queue_max_bytes: int = setting("QUEUE_MAX_BYTES", Integer(1024), 1073741824,
                                   "bytes of queued messages; beyond it 452 4.3.1")
    queue_min_free_bytes: int = setting(
        "QUEUE_MIN_FREE_BYTES", Integer(0), 104857600,
        "free disk space the SQLite queue leaves; below it 452 4.3.1")
    bounce_to: str = setting(
        "BOUNCE_TO", Text(), "sender",
        "where bounces go: sender (the envelope sender), an address, or none")
    archive: str = setting(
        "ARCHIVE", Choice("off", "metadata", "full"), "off",
        "keep delivered and failed messages: off, metadata, or full (with bodies)")
    archive_max_age: float = setting("ARCHIVE_MAX_AGE", Duration(1), 604800.0,
                                     "archived messages are kept this long")
    archive_max_messages: int = setting("ARCHIVE_MAX_MESSAGES", Integer(0), 0,
                                        "at most this many archived messages; 0 = no limit")
    archive_max_bytes: int = setting("ARCHIVE_MAX_BYTES", Integer(0), 0,
                                     "at most this many bytes archived; 0 = no limit")
    api_token: str = setting("API_TOKEN", Secret(), "",
                             "bearer token of the queue API (admin); empty = off")
    api_read_token: str = setting("API_READ_TOKEN", Secret(), "",
                                  "bearer token of the queue API, read only")
    # Operations.
    log_file: str = setting("LOG_FILE", Text(), "logs/smtp-relay.log",
                            "log file (logs also go to stderr)")
    log_level: str = setting("LOG_LEVEL", Choice(*LOG_LEVELS, case="upper"), "INFO",
                             "DEBUG, INFO, WARNING or ERROR")
    log_format: str = setting("LOG_FORMAT", Choice("text", "json"), "text",
                              "text or json (one object per line)")
    log_max_bytes: int = setting("LOG_MAX_BYTES", Integer(0), 10485760,
                                 "rotate the log file at this size; 0 = never")
    log_backup_count: int = setting("LOG_BACKUP_COUNT", Integer(0, 1000), 5,
                                    "old log files kept")
    http_host: str = setting("HTTP_HOST", Text(), "0.0.0.0",
                             "address of the health and metrics endpoint")
    http_port: int | None = setting("HTTP_PORT", OptionalPort(), None,
                                    "its port; empty = off")
    ready_probe_seconds: float = setting(
        "READY_PROBE_SECONDS", Number(1, 86400), 30.0,
        "/readyz probes the upstream at most this often")

    def redacted(self) -> dict[str, Any]:
        """Every setting as the start line and `check` print it: secrets as ***,
        credentials in URLs removed."""
        return {field.name: field.metadata["setting"].kind.shown(getattr(self, field.name))
                for field in dataclasses.fields(self)}

    def __repr__(self) -> str:
        return f"Config({self.redacted()})"


SETTINGS: tuple[Setting, ...] = tuple(field.metadata["setting"]
                                      for field in dataclasses.fields(Config))


def variables() -> set[str]:
    """Every variable the relay reads (a secret also as NAME_FILE)."""
    names = {row.variable for row in SETTINGS}
    return names | {f"{row.variable}_FILE" for row in SETTINGS
                    if isinstance(row.kind, Secret)}


# ---------------------------------------------------------------------------------------
# Reading it
# ---------------------------------------------------------------------------------------

def load_config(env: Mapping[str, str]) -> Config:
    """Build the Config from environment variables; raise ConfigError on a bad value."""
    values: dict[str, Any] = {}
    for field in dataclasses.fields(Config):
        row: Setting = field.metadata["setting"]
        raw = _secret_text(env, row.variable) if isinstance(row.kind, Secret) else \
            env.get(row.variable)
        if raw is None or (row.kind.blank_is_default and not raw.strip()):
            values[field.name] = row.default
        else:
            values[field.name] = row.kind.parse(row.variable, raw)
    values["auth_password_hash"] = values["auth_password_hash"].strip()
    if values["auth_password_hash"]:
        if _is_set(env, "SMTP_AUTH_PASSWORD"):
            raise ConfigError("SMTP_AUTH_PASSWORD and SMTP_AUTH_PASSWORD_HASH are both "
                              "set: expects only one")
        values["auth_password"] = ""  # the hash is the password
    values["smtp_hostname"] = values["smtp_hostname"] or _default_hostname()
    config = Config(**values)
    check_consistency(config)
    return config


def _is_set(env: Mapping[str, str], name: str) -> bool:
    return bool(env.get(name) or env.get(f"{name}_FILE"))


def _secret_text(env: Mapping[str, str], name: str) -> str | None:
    """NAME, or the contents of the file NAME_FILE (Docker secrets); never both."""
    file_name = f"{name}_FILE"
    path = (env.get(file_name) or "").strip()
    if not path:
        return env.get(name)
    if env.get(name):  # an empty value counts as unset, as compose files write it
        raise ConfigError(f"{name} and {file_name} are both set: expects only one")
    value = read_text_file(path, file_name, "a readable file holding the secret")
    return value.removesuffix("\n").removesuffix("\r")


def read_text_file(path: str, setting: str, expects: str = "") -> str:
    """The UTF-8 text of the file a setting names; ConfigError naming the setting
    (`SETTING='path': cannot read (why): expects ...`) when it cannot be read."""
    try:
        with open(path, encoding="utf-8") as text_file:
            return text_file.read()
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or "not UTF-8 text"
        raise ConfigError(f"{setting}={path!r}: cannot read ({reason})" +
                          (f": expects {expects}" if expects else "")) from None


def _default_hostname() -> str:
    name = socket.gethostname()
    return name if HOSTNAME_RE.fullmatch(name) else "localhost"


def check_consistency(config: Config) -> None:
    """What concerns several settings at once, or the files they name."""
    if not config.auth_username or not (config.auth_password or config.auth_password_hash):
        raise ConfigError("SMTP_AUTH_USERNAME/SMTP_AUTH_PASSWORD: expects a non-empty "
                          "user name and password")
    if config.auth_password_hash:
        if not BCRYPT_HASH.fullmatch(config.auth_password_hash):
            raise ConfigError("SMTP_AUTH_PASSWORD_HASH: expects a bcrypt hash ($2b$ or "
                              "$2y$, as `htpasswd -nB` or `python smtp_relay.py "
                              "hash-password` makes)")
        if "CRAM-MD5" in config.auth_mechanisms:
            raise ConfigError("AUTH_MECHANISMS includes CRAM-MD5, which needs the plain "
                              "password: expects SMTP_AUTH_PASSWORD, not "
                              "SMTP_AUTH_PASSWORD_HASH")
    if config.rate_limit_burst and not config.rate_limit_per_minute:
        raise ConfigError("RATE_LIMIT_BURST is set: expects RATE_LIMIT_PER_MINUTE too")
    if config.proxy_protocol and not config.proxy_trusted_networks:
        raise ConfigError("PROXY_PROTOCOL is on but PROXY_TRUSTED_NETWORKS is empty: "
                          "expects the load balancers' addresses (CIDR list); anyone "
                          "else could claim any client address")
    public = [str(network) for network in config.trusted_networks
              if not (network.is_private or network.is_loopback)]
    if public and not config.trusted_networks_allow_public:
        raise ConfigError(f"TRUSTED_NETWORKS includes {','.join(public)}, which is not a "
                          "private or loopback range: clients there could send without "
                          "AUTH. Expects private ranges, or "
                          "TRUSTED_NETWORKS_ALLOW_PUBLIC=true")
    if not config.listen_host:
        raise ConfigError("LISTEN_HOST: expects an address to listen on, e.g. 0.0.0.0")
    if not config.relay_host or any(c.isspace() for c in config.relay_host):
        raise ConfigError(f"RELAY_HOST={config.relay_host!r}: expects the upstream's "
                          "host name or address (or a comma-separated list)")
    parse_host_list(config.relay_host, config.relay_port, "RELAY_HOST")
    if not HOSTNAME_RE.fullmatch(config.smtp_hostname):
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
    if config.queue_retry_min > config.queue_retry_max:
        raise ConfigError(f"QUEUE_RETRY_MIN={config.queue_retry_min:g}s is longer than "
                          f"QUEUE_RETRY_MAX={config.queue_retry_max:g}s: expects MIN <= MAX")
    if not config.queue_url.startswith(("sqlite:///", "postgresql://", "postgres://")):
        raise ConfigError(f"QUEUE_URL={redact_url(config.queue_url)!r}: expects "
                          "sqlite:///path.db or postgresql://user:password@host/db")
    if config.bounce_to.lower() not in ("sender", "none"):
        try:
            parse_path(config.bounce_to)
        except AddressError:
            raise ConfigError(f"BOUNCE_TO={config.bounce_to!r}: expects sender, none or "
                              "an email address") from None
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
                          f"key ({one_line(error)}): expects a PEM certificate and its "
                          "matching private key") from None
    return context


def upstream_tls_context(config: Config) -> ssl.SSLContext:
    """Verifying by default: without a context smtplib checks nothing at all."""
    try:
        context = ssl.create_default_context(cafile=config.relay_tls_ca_file or None)
    except (OSError, ssl.SSLError) as error:
        raise ConfigError(f"RELAY_TLS_CA_FILE={config.relay_tls_ca_file!r}: cannot load "
                          f"({one_line(error)}): expects PEM CA certificates") from None
    if not config.relay_tls_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context
