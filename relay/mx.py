"""Direct delivery to a recipient domain's MX hosts (the `mx` route), as Postfix's smtp
client does it.

- DNS with dnspython (DNS_RESOLVERS, or the system's): MX records by preference, equal
  preferences shuffled, at most MAX_MX_HOSTS hosts; no MX: the domain's own A/AAAA
  (RFC 5321 5.1); a null MX (RFC 7505): permanent 556 5.1.10; NXDOMAIN: permanent;
  SERVFAIL or a timeout: temporary.
- Addresses that are loopback, private, link-local or our own are refused unless
  MX_ALLOW_PRIVATE (a DNS record must not turn the relay against its own network).
- Every host (and each of its addresses) is tried in one attempt before the domain
  counts as deferred; a host that fails the session (connect, greeting, EHLO, TLS, a
  421 or a lost link) passes the turn to the next one.
- TLS: STARTTLS whenever offered. MX_TLS=may verifies and records, delivers anyway,
  and retries in clear after a failed handshake (Postfix's `may`); `encrypt` needs TLS
  with any certificate; `verify` a certificate valid for the MX host's name. With
  MX_MTA_STS, a domain's `enforce` policy (RFC 8461) limits delivery to the MX hosts it
  lists, with a verified certificate; policies are cached for their max_age.

Every blocking call here runs in a worker thread (MXDeliverer.deliver hands it over).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import http.client
import ipaddress
import logging
import random
import smtplib
import socket
import ssl
import threading
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import dns.exception
import dns.nameserver
import dns.resolver

from relay.observability import log_event
from relay.routes import AttemptInfo, Outcomes
from relay.upstream import (
    HostState,
    UpstreamConnection,
    UpstreamError,
    UpstreamPool,
    describe_error,
    reply_text,
    transact,
)

if TYPE_CHECKING:
    from relay.observability import Metrics
    from relay.settings import Config

MAX_MX_HOSTS = 5


class DNSFailure(Exception):
    """The domain cannot be delivered to now (temporary) or ever (permanent)."""

    def __init__(self, code: int, text: str):
        super().__init__(f"{code} {text}")
        self.code, self.text = code, text


@dataclasses.dataclass
class MXHost:
    name: str  # without the trailing dot
    preference: int
    addresses: list[str]


def _temporary(what: str, error: BaseException) -> DNSFailure:
    reason = "timed out" if isinstance(error, dns.exception.Timeout) else \
        "no name server answered (SERVFAIL)"
    return DNSFailure(451, f"4.4.3 DNS lookup of {what} failed: {reason}")


class Resolver:
    """dnspython, pointed at DNS_RESOLVERS when set."""

    def __init__(self, config: Config):
        self.config = config
        self.resolver = dns.resolver.Resolver(configure=not config.dns_resolvers)
        if config.dns_resolvers:
            self.resolver.nameservers = [dns.nameserver.Do53Nameserver(host, port)
                                         for host, port in config.dns_resolvers]
        self.resolver.lifetime = min(config.timeout, 30.0)
        self.resolver.timeout = min(config.timeout, 5.0)

    def query(self, name: str, rdtype: str) -> list[str] | None:
        """The records' text; None when the name exists without such records.
        DNSFailure: NXDOMAIN (permanent), SERVFAIL or timeout (temporary)."""
        try:
            answer = self.resolver.resolve(name, rdtype, search=False)
        except dns.resolver.NXDOMAIN:
            raise DNSFailure(550, f"5.1.2 {name}: no such domain (NXDOMAIN)") from None
        except dns.resolver.NoAnswer:
            return None
        except (dns.resolver.NoNameservers, dns.exception.Timeout) as error:
            raise _temporary(f"{name} {rdtype}", error) from None
        except dns.exception.DNSException as error:
            raise DNSFailure(451, f"4.4.3 DNS lookup of {name} {rdtype} failed: "
                                  f"{type(error).__name__}") from None
        return [record.to_text() for record in answer]

    def addresses(self, name: str) -> list[str]:
        """A and AAAA (IPv4 first); [] when there are none."""
        found: list[str] = []
        for rdtype in ("A", "AAAA"):
            found += self.query(name, rdtype) or []
        return found

    def mx_hosts(self, domain: str) -> list[MXHost]:
        """The hosts to try, in order. DNSFailure when there are none."""
        records = self.query(domain, "MX")
        if records is None:  # no MX: the domain itself (RFC 5321 section 5.1)
            addresses = self.addresses(domain)
            if not addresses:
                raise DNSFailure(550, f"5.1.2 {domain} has no MX and no address records")
            return [MXHost(domain, 0, addresses)]
        by_preference: dict[int, list[str]] = {}
        for record in records:
            preference_text, _, exchange = record.partition(" ")
            by_preference.setdefault(int(preference_text), []).append(
                exchange.rstrip(".").lower())
        if list(by_preference.values()) == [[""]]:  # "0 ." alone: RFC 7505
            raise DNSFailure(556, f"5.1.10 {domain} accepts no mail (null MX)")
        ordered: list[tuple[int, str]] = []
        for preference in sorted(by_preference):
            names = [name for name in by_preference[preference] if name]
            random.shuffle(names)  # equal preferences share the load
            ordered += [(preference, name) for name in names]
        hosts, temporary = [], None
        for preference, name in ordered[:MAX_MX_HOSTS]:
            try:
                addresses = self.addresses(name)
            except DNSFailure as failure:
                temporary = temporary or (failure if failure.code < 500 else None)
                continue
            if addresses:
                hosts.append(MXHost(name, preference, addresses))
        if not hosts:
            raise temporary or DNSFailure(451, f"4.4.4 no MX host of {domain} has an "
                                               "address")
        return hosts

    def txt(self, name: str) -> list[str]:
        try:
            records = self.query(name, "TXT") or []
        except DNSFailure:
            return []
        return ["".join(part.strip('"') for part in record.split('" "'))
                for record in records]


def _is_refused(address: str, own: set[str]) -> bool:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return (ip.is_loopback or ip.is_private or ip.is_link_local or ip.is_unspecified
            or ip.is_multicast or ip.is_reserved or address in own)


def own_addresses(config: Config) -> set[str]:
    """This host's addresses, as far as its name tells, and LISTEN_HOST."""
    found = {config.listen_host}
    try:
        for info in socket.getaddrinfo(socket.gethostname(), None):
            found.add(str(info[4][0]))
    except OSError:
        pass
    return found


# ---------------------------------------------------------------------------------------
# MTA-STS (RFC 8461)
# ---------------------------------------------------------------------------------------

@dataclasses.dataclass
class STSPolicy:
    id: str
    mode: str  # enforce, testing, none
    mx: list[str]
    max_age: float
    fetched: float

    def allows(self, host: str) -> bool:
        """Is `host` one of the policy's MX patterns (`*.` covers one label)?"""
        host = host.lower().rstrip(".")
        for pattern in self.mx:
            pattern = pattern.lower().rstrip(".")
            if pattern.startswith("*."):
                if host.partition(".")[2] == pattern[2:] and "." in host:
                    return True
            elif host == pattern:
                return True
        return False


def parse_sts_policy(text: str, policy_id: str, now: float) -> STSPolicy | None:
    fields: dict[str, list[str]] = {}
    for line in text.splitlines():
        key, colon, value = line.partition(":")
        if colon:
            fields.setdefault(key.strip().lower(), []).append(value.strip())
    mode = (fields.get("mode") or [""])[0].lower()
    if (fields.get("version") or [""])[0] != "STSv1" or \
            mode not in ("enforce", "testing", "none"):
        return None
    try:
        max_age = float((fields.get("max_age") or ["0"])[0])
    except ValueError:
        return None
    return STSPolicy(policy_id, mode, fields.get("mx", []), min(max_age, 31557600), now)


class _PinnedHTTPS(http.client.HTTPSConnection):
    """HTTPS to an address our resolver found, with SNI and verification for the
    policy host's name (mta-sts.DOMAIN)."""

    def __init__(self, name: str, address: str, port: int, context: ssl.SSLContext,
                 timeout: float):
        super().__init__(name, port, context=context, timeout=timeout)
        self.address, self.tls_context = address, context

    def connect(self) -> None:
        sock = socket.create_connection((self.address, self.port), self.timeout)
        self.sock = self.tls_context.wrap_socket(sock, server_hostname=self.host)


class MTASTS:
    """Policies fetched over HTTPS when the domain's `_mta-sts` TXT record says so,
    cached until their max_age (or a new id in the TXT record)."""

    HTTPS_PORT = 443  # RFC 8461 3.3; tests bind a loopback address on it

    def __init__(self, config: Config, resolver: Resolver, context: ssl.SSLContext):
        self.config = config
        self.resolver = resolver
        self.context = context
        self.cache: dict[str, STSPolicy] = {}
        self.lock = threading.Lock()

    def policy(self, domain: str) -> STSPolicy | None:
        now = time.time()
        with self.lock:
            cached = self.cache.get(domain)
        if cached is not None and now - cached.fetched >= cached.max_age:
            cached = None
        records = [r for r in self.resolver.txt(f"_mta-sts.{domain}")
                   if r.startswith("v=STSv1")]
        if len(records) != 1:
            return cached  # none (or ambiguous): a cached policy still holds
        policy_id = ""
        for part in records[0].split(";"):
            key, _, value = part.strip().partition("=")
            if key == "id":
                policy_id = value.strip()
        if cached is not None and cached.id == policy_id:
            return cached
        fetched = self._fetch(domain, policy_id, now)
        if fetched is None:
            return cached
        with self.lock:
            self.cache[domain] = fetched
        return fetched

    def _fetch(self, domain: str, policy_id: str, now: float) -> STSPolicy | None:
        name = f"mta-sts.{domain}"
        try:
            addresses = self.resolver.addresses(name)
        except DNSFailure:
            return None
        for address in addresses:
            connection = _PinnedHTTPS(name, address, self.HTTPS_PORT, self.context,
                                      min(self.config.timeout, 10.0))
            try:
                connection.request("GET", "/.well-known/mta-sts.txt",
                                   headers={"Host": name})
                response = connection.getresponse()
                body = response.read(65536)
                if response.status != 200:  # redirects are not followed (RFC 8461)
                    continue
                return parse_sts_policy(body.decode("utf-8", "replace"), policy_id, now)
            except (OSError, http.client.HTTPException) as error:
                log_event(logging.WARNING, "mta-sts-fetch-failed", domain=domain,
                          address=address, reason=describe_error(error))
            finally:
                connection.close()
        return None


# ---------------------------------------------------------------------------------------
# Delivery
# ---------------------------------------------------------------------------------------

class SessionFailed(Exception):
    """This host (address) could not carry the transaction: try the next one."""


class MXDeliverer:
    """Delivers one recipient domain's share of a message to that domain's MX."""

    def __init__(self, config: Config, executor: concurrent.futures.Executor,
                 metrics: Metrics | None = None):
        self.config = config
        self.executor = executor
        self.metrics = metrics
        self.resolver = Resolver(config)
        self.own = own_addresses(config)
        cafile = config.relay_tls_ca_file or None
        self.verified_context = ssl.create_default_context(cafile=cafile)
        if cafile:  # the system's CAs as well as the extra ones
            self.verified_context.load_default_certs()
        self.any_context = ssl.create_default_context()
        self.any_context.check_hostname = False
        self.any_context.verify_mode = ssl.CERT_NONE
        self.mta_sts = MTASTS(config, self.resolver, self.verified_context) \
            if config.mx_mta_sts else None

    def reload(self) -> None:
        """SIGHUP: forget cached MTA-STS policies (they are fetched again)."""
        if self.mta_sts is not None:
            with self.mta_sts.lock:
                self.mta_sts.cache.clear()

    async def deliver(self, domain: str, sender: str, recipients: Sequence[str],
                      body: bytes) -> tuple[Outcomes, dict[str, AttemptInfo]]:
        return await asyncio.get_running_loop().run_in_executor(
            self.executor, self.deliver_blocking, domain, sender, list(recipients), body)

    def deliver_blocking(self, domain: str, sender: str, recipients: list[str],
                         body: bytes) -> tuple[Outcomes, dict[str, AttemptInfo]]:
        """One attempt: every MX host in turn until one carries the transaction."""
        started = time.monotonic()
        outcomes, info, result = self._deliver(domain, sender, recipients, body)
        tls = next(iter(info.values())).tls if info else ""
        if self.metrics is not None:
            self.metrics.mx_attempts.labels(result, tls or "none").inc()
        log_event(logging.INFO if result == "delivered" else logging.WARNING,
                  "mx-attempt", domain=domain, result=result,
                  host=next(iter(info.values())).upstream if info else "",
                  tls=tls or "none", duration_ms=round((time.monotonic() - started) * 1000))
        return outcomes, info

    def _deliver(self, domain: str, sender: str, recipients: list[str], body: bytes
                 ) -> tuple[Outcomes, dict[str, AttemptInfo], str]:
        def everyone(code: int, text: str, upstream: str = "", tls: str = ""
                     ) -> tuple[Outcomes, dict[str, AttemptInfo], str]:
            result = "failed" if code >= 500 else "deferred"
            return ({r: (code, text) for r in recipients},
                    {r: AttemptInfo(upstream or f"mx:{domain}", tls) for r in recipients},
                    result)

        try:
            hosts, enforce = self._hosts(domain)
        except DNSFailure as failure:
            return everyone(failure.code, failure.text)
        failures: list[str] = []
        for host, address, label in self._addresses(hosts, failures,
                                                    "refused: a loopback, private, "
                                                    "link-local or own address"):
            try:
                outcomes, tls = self._session(host.name, address, sender,
                                              recipients, body, enforce)
            except SessionFailed as failure:
                failures.append(f"{label}: {failure}")
                continue
            info = {r: AttemptInfo(label, tls) for r in recipients}
            codes = [code for code, _ in outcomes.values()]
            result = "delivered" if any(200 <= c < 300 for c in codes) else (
                "failed" if all(c >= 500 for c in codes) else "deferred")
            return outcomes, info, result
        refused = self._every_address_refused(domain, hosts, failures)
        if refused is not None:
            return everyone(refused.code, refused.text)
        return everyone(451, f"4.4.1 no MX host of {domain} took the message: "
                             + "; ".join(failures)[:400])

    def _addresses(self, hosts: list[MXHost], failures: list[str], refusal: str
                   ) -> Iterator[tuple[MXHost, str, str]]:
        """Each (host, address, label) to try, in order; an address MX_ALLOW_PRIVATE
        keeps us from is noted in `failures` (as `refusal`) and skipped."""
        for host in hosts:
            for address in host.addresses:
                if not self.config.mx_allow_private and _is_refused(address, self.own):
                    failures.append(f"{host.name}[{address}]: {refusal} (MX_ALLOW_PRIVATE)")
                    continue
                yield host, address, f"{host.name}[{address}]:{self.config.mx_port}"

    def _every_address_refused(self, domain: str, hosts: list[MXHost],
                               failures: list[str]) -> DNSFailure | None:
        """The permanent failure when no address of the domain may be tried at all."""
        addresses = [address for host in hosts for address in host.addresses]
        if self.config.mx_allow_private or not addresses or not all(
                _is_refused(address, self.own) for address in addresses):
            return None
        return DNSFailure(550, f"5.4.4 every MX address of {domain} is refused: "
                               f"{failures[-1]}")

    def _hosts(self, domain: str) -> tuple[list[MXHost], bool]:
        """The MX hosts to try (those an enforced MTA-STS policy lists), and whether
        such a policy applies. DNSFailure when there are none."""
        policy = self.mta_sts.policy(domain) if self.mta_sts is not None else None
        enforce = policy is not None and policy.mode == "enforce"
        hosts = self.resolver.mx_hosts(domain)
        if policy is not None and enforce:
            hosts = [host for host in hosts if policy.allows(host.name)]
            if not hosts:
                raise DNSFailure(451, f"4.7.5 no MX host of {domain} is listed in its "
                                      "MTA-STS policy (enforce)")
        return hosts, enforce

    def open_session(self, domain: str) -> UpstreamConnection:
        """Blocking: a session (after EHLO and TLS as MX_TLS wants) to the first MX
        host of `domain` that takes one, for fallback's synchronous part. DNSFailure
        when the domain has no usable host (permanent: null MX, NXDOMAIN, only refused
        addresses), UpstreamError when none answered."""
        hosts, enforce = self._hosts(domain)
        failures: list[str] = []
        # A client waits for this: every host within TIMEOUT in all (then the queue).
        deadline = time.monotonic() + self.config.timeout
        for host, address, label in self._addresses(hosts, failures, "refused"):
            remaining = deadline - time.monotonic()
            if remaining < 1.0:
                failures.append("TIMEOUT reached")
                break
            try:
                connection, tls = self._open(host.name, address, enforce, remaining)
            except SessionFailed as failure:
                failures.append(f"{label}: {failure}")
                continue
            assert connection.smtp is not None and connection.smtp.sock is not None
            connection.smtp.sock.settimeout(self.config.timeout)  # MAIL on: TIMEOUT
            log_event(logging.INFO, "mx-session", domain=domain, host=label, tls=tls)
            if self.metrics is not None:
                self.metrics.mx_attempts.labels("session", tls).inc()
            return connection
        refused = self._every_address_refused(domain, hosts, failures)
        if refused is not None:
            raise refused
        raise UpstreamError(f"no MX host of {domain} answered: " + "; ".join(failures))

    def _connect(self, name: str, address: str, timeout: float | None = None
                 ) -> UpstreamConnection:
        """TCP, the greeting and EHLO: a session ready for STARTTLS or MAIL."""
        connection = UpstreamConnection(self.config, None)
        smtp = smtplib.SMTP(timeout=timeout or self.config.timeout,
                            local_hostname=self.config.smtp_hostname)
        smtp._host = name  # type: ignore[attr-defined]  # STARTTLS checks this name
        connection.smtp = smtp
        try:
            code, banner = smtp.connect(address, self.config.mx_port)
            if code != 220:
                raise SessionFailed(f"greeting {code} {reply_text(banner)}")
            code, text = smtp.ehlo()
            if code != 250:
                code, text = smtp.helo()
                if code != 250:
                    raise SessionFailed(f"EHLO refused: {code} {reply_text(text)}")
        except SessionFailed:
            connection.close()
            raise
        except (smtplib.SMTPException, OSError, ValueError) as error:
            connection.close()
            raise SessionFailed(describe_error(error)) from None
        return connection

    def _session(self, name: str, address: str, sender: str, recipients: list[str],
                 body: bytes, enforce: bool) -> tuple[Outcomes, str]:
        """One host: TLS as MX_TLS (and MTA-STS) want it, then the transaction.
        Returns the outcomes and the TLS outcome (verified, unverified, none)."""
        connection, tls = self._open(name, address, enforce)
        try:
            outcomes, _ = transact(connection, sender, recipients, body)
        finally:
            connection.close()
        codes = [code for code, _ in outcomes.values()]
        if all(code in (0, 421) for code in codes):
            detail = next(iter(outcomes.values()))[1]
            raise SessionFailed(detail or "the session broke off")
        return outcomes, tls

    def _open(self, name: str, address: str, enforce: bool,
              timeout: float | None = None) -> tuple[UpstreamConnection, str]:
        """A session to one MX address with TLS as MX_TLS (and MTA-STS) want it, and
        the TLS outcome (verified, unverified, none). SessionFailed if it cannot.
        `timeout`: for each step of opening it (else TIMEOUT)."""
        mode = "verify" if enforce else self.config.mx_tls
        connection = self._connect(name, address, timeout)
        tls = "none"
        assert connection.smtp is not None
        if connection.smtp.has_extn("starttls"):
            tls = self._starttls(connection, self.verified_context, "verified")
            if tls == "failed-verification":
                connection.close()
                if mode == "verify":
                    raise SessionFailed("TLS certificate not verified for " + name)
                connection = self._connect(name, address, timeout)
                tls = self._starttls(connection, self.any_context, "unverified")
            if tls.startswith("failed"):
                connection.close()
                if mode != "may":
                    raise SessionFailed("TLS handshake failed")
                connection = self._connect(name, address, timeout)  # may: in clear
                tls = "none"
        elif mode != "may":
            connection.close()
            raise SessionFailed("STARTTLS not offered (MX_TLS=" + mode + (
                ", MTA-STS enforce)" if enforce else ")"))
        return connection, tls

    @staticmethod
    def _starttls(connection: UpstreamConnection, context: ssl.SSLContext,
                  outcome: str) -> str:
        smtp = connection.smtp
        assert smtp is not None
        try:
            code, _ = smtp.starttls(context=context)
            if code != 220:
                return "failed"
            smtp.ehlo()
        except ssl.SSLCertVerificationError:
            return "failed-verification"
        except (smtplib.SMTPException, OSError, ValueError):
            return "failed"
        return outcome


class MXSessionPool(UpstreamPool):
    """The sessions of fallback's synchronous part to one recipient domain's MX: opened
    as MX delivery opens them (preference order, MX_TLS, MTA-STS), used for one
    transaction, never pooled (each message looks the MX up again)."""

    def __init__(self, config: Config, executor: concurrent.futures.Executor,
                 metrics: Metrics, deliverer: MXDeliverer, domain: str):
        super().__init__(config, executor, metrics)
        self.deliverer, self.domain = deliverer, domain
        self.hosts = {f"mx:{domain}": HostState(f"mx:{domain}")}

    def open_first(self) -> UpstreamConnection:
        return self.deliverer.open_session(self.domain)

    def release(self, connection: UpstreamConnection) -> None:
        self.discard(connection)

    def _start_reaper(self) -> None:
        pass  # nothing idles here


def hostname_looks_qualified(name: str) -> bool:
    """Receivers reject an EHLO name without a dot (or `localhost`)."""
    return "." in name and not name.lower().startswith("localhost") and \
        not name.replace(".", "").isdigit()
