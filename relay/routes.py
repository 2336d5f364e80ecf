"""Delivery routes: where each message (or each recipient) goes.

A destination is either a smart-host list (`SmartHost`: one or more hosts tried in
order, a TLS mode, certificate verification and optional credentials) or direct
delivery to each recipient domain's MX (`MX`). The RELAY_* settings are the default
destination; ROUTES_FILE and the users file's route field choose others:

    user:billing      smtp://billing@smtp.mailgun.org:587?tls=starttls&password_env=MG_PW
    from:*.shop.example  smtps://email-smtp.eu-west-1.amazonaws.com:465
    to:partner.example   smtp://mx.partner.example:25
    *                    mx

First match wins (users-file routes before ROUTES_FILE's lines), then the default.
`user:` and `from:` are known at MAIL; `to:` and `mx` depend on each recipient, so they
can split one message across destinations (see RouteTable.needs_split).

This module only parses and matches; relay.upstream opens smart hosts, relay.mx
delivers to MX hosts, and `attempt_routed` sends one queued message through both.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import urllib.parse
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from relay.policy import AddressError, DomainList, normalize_domain
from relay.settings import (
    ConfigError,
    host_label,
    parse_domain_list,
    parse_host_list,
    read_text_file,
    redact_url,
)

if TYPE_CHECKING:
    from relay.mx import MXDeliverer
    from relay.settings import Config
    from relay.upstream import UpstreamPools

TLS_MODES = ("starttls", "smtps", "none")
_BOOLEAN_WORDS = {"true": True, "yes": True, "1": True, "on": True,
                  "false": False, "no": False, "0": False, "off": False}
ROUTE_URL_FORMAT = ("smtp://[user@]host[:port][,host2[:port]][?tls=starttls|none"
                    "&verify=false&password_env=NAME|password_file=PATH], smtps://... "
                    "or mx")


@dataclasses.dataclass(frozen=True)
class SmartHost:
    """Upstream servers tried in order (failover), sharing TLS mode and credentials."""

    hosts: tuple[tuple[str, int], ...]
    tls: str = "starttls"  # starttls (required), smtps (implicit) or none
    verify: bool = True
    username: str = ""
    password: str = dataclasses.field(default="", repr=False)

    @property
    def label(self) -> str:
        """The hosts as logs, /readyz and metrics name them (no credentials)."""
        return ",".join(host_label(host, port) for host, port in self.hosts)

    def host_config(self, config: Config, host: str, port: int) -> Config:
        """`config` as if RELAY_* named just this host of this destination: the
        handshake code (relay.upstream, `check`) reads its settings from a Config."""
        return dataclasses.replace(
            config, relay_host=host, relay_port=port,
            relay_use_tls=self.tls == "starttls", relay_use_ssl=self.tls == "smtps",
            relay_tls_verify=self.verify, relay_username=self.username,
            relay_password=self.password)


@dataclasses.dataclass(frozen=True)
class MXDelivery:
    """Direct delivery: each recipient domain's MX hosts (relay.mx)."""

    label: str = "mx"


MX = MXDelivery()
Destination = SmartHost | MXDelivery


def default_destination(config: Config) -> SmartHost:
    """The RELAY_* settings as a destination: RELAY_HOST may list several hosts."""
    tls = "smtps" if config.relay_use_ssl else "starttls" if config.relay_use_tls \
        else "none"
    return SmartHost(parse_host_list(config.relay_host, config.relay_port, "RELAY_HOST"),
                     tls, config.relay_tls_verify, config.relay_username,
                     config.relay_password)


def parse_destination(text: str, where: str,
                      environ: os._Environ[str] | dict[str, str] | None = None
                      ) -> Destination:
    """A route's upstream: `mx` or an smtp:// / smtps:// URL. ConfigError names
    `where` (and never holds a password)."""
    environ = os.environ if environ is None else environ
    if text.lower() == "mx":
        return MX
    shown = redact_url(text)
    parts = urllib.parse.urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme not in ("smtp", "smtps") or not parts.netloc:
        raise ConfigError(f"{where}: {shown!r}: expects {ROUTE_URL_FORMAT}")
    userinfo, at, hostpart = parts.netloc.rpartition("@")
    if at and ":" in userinfo:
        raise ConfigError(f"{where}: {shown!r}: a password is never written in the "
                          "URL: expects password_env=NAME or password_file=PATH")
    username = urllib.parse.unquote(userinfo) if at else ""
    try:
        query = dict(urllib.parse.parse_qsl(parts.query, keep_blank_values=True,
                                            strict_parsing=bool(parts.query)))
    except ValueError:
        raise ConfigError(f"{where}: {shown!r}: expects key=value&... after ?") from None
    unknown = set(query) - {"tls", "verify", "password_env", "password_file"}
    if unknown:
        raise ConfigError(f"{where}: {shown!r}: unknown option {min(unknown)!r}: "
                          "expects tls, verify, password_env or password_file")
    if scheme == "smtps":
        if query.get("tls", "smtps") not in ("smtps",):
            raise ConfigError(f"{where}: {shown!r}: smtps:// is implicit TLS: expects "
                              "no tls= option")
        tls = "smtps"
    else:
        tls = query.get("tls", "starttls").lower()
        if tls not in ("starttls", "none"):
            raise ConfigError(f"{where}: {shown!r}: tls={tls!r}: expects starttls or "
                              "none (smtps:// for implicit TLS)")
    verify_text = query.get("verify", "true").lower()
    if verify_text not in _BOOLEAN_WORDS:
        raise ConfigError(f"{where}: {shown!r}: verify: expects true or false")
    hosts = parse_host_list(hostpart, 465 if tls == "smtps" else 25, where)
    password = _password(query, where, shown, environ)
    if password and not username:
        raise ConfigError(f"{where}: {shown!r}: a password needs a user: expects "
                          "smtp://user@host")
    if username and tls == "none":
        raise ConfigError(f"{where}: {shown!r}: credentials are never sent in clear: "
                          "expects tls=starttls or smtps://")
    return SmartHost(hosts, tls, _BOOLEAN_WORDS[verify_text], username, password)


def _password(query: dict[str, str], where: str, shown: str,
              environ: os._Environ[str] | dict[str, str]) -> str:
    if "password_env" in query and "password_file" in query:
        raise ConfigError(f"{where}: {shown!r}: expects password_env or "
                          "password_file, not both")
    if "password_env" in query:
        name = query["password_env"]
        value = environ.get(name)
        if not value:
            raise ConfigError(f"{where}: {shown!r}: password_env={name}: expects that "
                              "environment variable to be set")
        return value
    if "password_file" in query:
        path = query["password_file"]
        value = read_text_file(path, f"{where}: password_file").removesuffix(
            "\n").removesuffix("\r")
        if not value:
            raise ConfigError(f"{where}: password_file={path!r}: expects a password")
        return value
    return ""


@dataclasses.dataclass(frozen=True)
class Route:
    """One line: a match (`user`, `from`, `to` or `*`) and its destination."""

    kind: str
    user: str  # for kind "user"
    domains: DomainList | None  # for kinds "from" and "to"
    destination: Destination
    where: str  # "ROUTES_FILE line 3", for logs

    @property
    def per_recipient(self) -> bool:
        """Its choice depends on the recipient: it may split a message."""
        return self.kind == "to" or isinstance(self.destination, MXDelivery)

    def matches_at_mail(self, user: str | None, sender_domain: str) -> bool | None:
        """True/False when known from the sender alone; None for `to:`."""
        if self.kind == "user":
            return user == self.user
        if self.kind == "from":
            assert self.domains is not None
            return bool(sender_domain) and self.domains.allows(sender_domain)
        if self.kind == "to":
            return None
        return True

    def matches(self, user: str | None, sender_domain: str, recipient_domain: str
                ) -> bool:
        if self.kind == "to":
            assert self.domains is not None
            return self.domains.allows(recipient_domain)
        return bool(self.matches_at_mail(user, sender_domain))


def parse_routes(text: str, name: str = "ROUTES_FILE",
                 environ: os._Environ[str] | dict[str, str] | None = None
                 ) -> list[Route]:
    """ROUTES_FILE's text: `match upstream` per line, `#` comments."""
    routes = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{name} line {number}"
        fields = line.split()
        if len(fields) != 2:
            raise ConfigError(f"{where}: expects a match (user:NAME, from:DOMAIN, "
                              "to:DOMAIN or *) and an upstream, separated by spaces")
        match, upstream = fields
        destination = parse_destination(upstream, where, environ)
        kind, _, value = match.partition(":")
        kind = kind.lower()
        if match == "*":
            routes.append(Route("*", "", None, destination, where))
        elif kind == "user" and value:
            routes.append(Route("user", value, None, destination, where))
        elif kind in ("from", "to") and value:
            routes.append(Route(kind, "", parse_domain_list(value, f"{where} {kind}:"),
                                destination, where))
        else:
            raise ConfigError(f"{where}: {match!r}: expects user:NAME, from:DOMAIN, "
                              "to:DOMAIN or *")
    return routes


def domain_of(address: str) -> str:
    """The normalised domain of an address ("" for the null sender or none)."""
    _, at, domain = address.rpartition("@")
    if not at:
        return ""
    try:
        return normalize_domain(domain)
    except AddressError:
        return domain.lower()


class RouteTable:
    """ROUTES_FILE and the users file's routes, matched first to last, then RELAY_*.

    `reload()` (SIGHUP) reads both files again; on an error the routes in use stay and
    ConfigError says why."""

    def __init__(self, config: Config, *, load: bool = True):
        self.config = config
        self.default: SmartHost = default_destination(config)
        self.routes: list[Route] = []
        if load:
            self.reload()

    def reload(self) -> int:
        """Re-read ROUTES_FILE and the users file's route fields; the number of routes.
        Raises ConfigError (keeping the old routes) when a file is unusable, or when
        DELIVERY_MODE=sync and the new routes would split messages."""
        from relay.users import load_users  # users.py parses its route field with us
        routes = [Route("user", name, None, user.policy.route,
                        f"SMTP_USERS_FILE user {name}")
                  for name, user in load_users(self.config).items()
                  if user.policy.route is not None]
        if self.config.routes_file:
            routes += parse_routes(read_text_file(self.config.routes_file, "ROUTES_FILE",
                                                  "a readable routes file"))
        split = [route for route in routes if route.per_recipient]
        if split and self.config.delivery_mode == "sync":
            raise ConfigError(
                f"DELIVERY_MODE=sync, but {split[0].where} routes by recipient "
                f"({'mx' if isinstance(split[0].destination, MXDelivery) else 'to:'}), "
                "which can split a message across upstreams, and one reply after DATA "
                "cannot carry several outcomes: expects DELIVERY_MODE=queue or fallback")
        self.routes = routes
        return len(routes)

    def needs_split(self) -> bool:
        return any(route.per_recipient for route in self.routes)

    def uses_mx(self) -> bool:
        return any(isinstance(route.destination, MXDelivery) for route in self.routes)

    def at_mail(self, user: str | None, sender: str) -> SmartHost | None:
        """The destination when the sender alone decides it; None when it depends on
        the recipients (a `to:` line comes first, or the match routes to `mx`)."""
        sender_domain = domain_of(sender)
        for route in self.routes:
            matched = route.matches_at_mail(user, sender_domain)
            if matched is None:
                return None
            if matched:
                return None if isinstance(route.destination, MXDelivery) \
                    else route.destination
        return self.default

    def for_recipient(self, user: str | None, sender: str, recipient: str
                      ) -> Destination:
        sender_domain, recipient_domain = domain_of(sender), domain_of(recipient)
        for route in self.routes:
            if route.matches(user, sender_domain, recipient_domain):
                return route.destination
        return self.default

    def smart_hosts(self) -> list[SmartHost]:
        """Every smart-host destination, the default first (for /readyz and check)."""
        found = [self.default]
        for route in self.routes:
            if isinstance(route.destination, SmartHost) and route.destination not in found:
                found.append(route.destination)
        return found


# Each recipient's (code, text) from one try; code 0: no reply (the link failed).
Outcomes = dict[str, tuple[int, str]]


@dataclasses.dataclass
class AttemptInfo:
    """Where one recipient's attempt went: for the store's attempt record and logs."""

    upstream: str
    tls: str  # "verified", "unverified", "none" ("" when unknown)


class Router:
    """Sends one queued message along its routes: recipients grouped by destination
    (an MX destination per recipient domain), one transaction per group, the groups
    at once. `pools` (relay.upstream.UpstreamPools) carries smart-host groups, `mx`
    (relay.mx.MXDeliverer, made when a route first needs it) the MX ones."""

    def __init__(self, table: RouteTable, pools: UpstreamPools,
                 mx: Callable[[], MXDeliverer]):
        self.table = table
        self.pools = pools
        self._make_mx = mx
        self._mx: MXDeliverer | None = None

    @property
    def mx(self) -> MXDeliverer:
        if self._mx is None:
            self._mx = self._make_mx()
        return self._mx

    def reload(self) -> int:
        """SIGHUP: the routes read again (ConfigError keeps the old ones)."""
        count = self.table.reload()
        if self._mx is not None:
            self._mx.reload()
        return count

    def groups(self, user: str | None, sender: str, recipients: Sequence[str]
               ) -> dict[tuple[Destination, str], list[str]]:
        """{(destination, MX domain or ""): recipients}, in the recipients' order."""
        groups: dict[tuple[Destination, str], list[str]] = {}
        for recipient in recipients:
            destination = self.table.for_recipient(user, sender, recipient)
            domain = domain_of(recipient) if isinstance(destination, MXDelivery) else ""
            groups.setdefault((destination, domain), []).append(recipient)
        return groups

    async def attempt(self, user: str | None, sender: str, recipients: Sequence[str],
                      body: bytes) -> tuple[Outcomes, dict[str, AttemptInfo]]:
        """Each recipient's reply from one try, and where it went."""
        async def one(destination: Destination, domain: str, group: list[str]
                      ) -> tuple[Outcomes, dict[str, AttemptInfo]]:
            if isinstance(destination, MXDelivery):
                return await self.mx.deliver(domain, sender, group, body)
            return await self.pools.deliver(destination, sender, group, body)
        results = await asyncio.gather(*(
            one(destination, domain, group)
            for (destination, domain), group in self.groups(user, sender,
                                                            recipients).items()))
        outcomes: Outcomes = {}
        info: dict[str, AttemptInfo] = {}
        for group_outcomes, group_info in results:
            outcomes.update(group_outcomes)
            info.update(group_info)
        return outcomes, info
