"""Operating the relay: the HTTP endpoint (/healthz, /readyz, /metrics, and the queue API
of relay.admin under /api/), `check` (the upstream settings tried step by step), `demo`
and `hash-password`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import http
import smtplib
import socket
import ssl
import sys
import time
import typing
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import bcrypt
import prometheus_client
from aiosmtpd.smtp import (
    SMTP,
)

from relay.observability import setup_logging
from relay.protocol import cannot_listen, listening_port
from relay.routes import RouteTable
from relay.settings import host_label, load_config, upstream_tls_context
from relay.upstream import (
    Handshake,
    UpstreamConnection,
    UpstreamError,
    describe_error,
    reply_text,
)
from relay.users import BCRYPT_MAX_PASSWORD, load_users

if TYPE_CHECKING:
    from relay.admin import QueueAPI
    from relay.settings import Config
    from relay.upstream import UpstreamPool, UpstreamPools
    from smtp_relay import SMTPRelayServer


class ReadinessProbe:
    """Is the upstream usable? Connect, EHLO, STARTTLS and AUTH as configured, at most
    once per READY_PROBE_SECONDS; callers in between share the cached answer.

    With several hosts (a RELAY_HOST list, routes' smart hosts) every host is probed,
    each on a line of its own; ready when every smart-host destination has at least one
    host that answered (failover covers the rest). MX delivery is not probed."""

    def __init__(self, config: Config, pool: UpstreamPool,
                 routes: RouteTable | None = None, pools: UpstreamPools | None = None):
        self.config = config
        self.pool = pool
        self.routes = routes
        self.pools = pools
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

    @staticmethod
    async def _probe_host(pool: UpstreamPool, host_config: Config) -> tuple[bool, str]:
        connection = UpstreamConnection(host_config, pool.tls_context)
        label = connection.host
        try:
            await pool.run(connection.open)
            pool.host_answered(label)
            return True, "upstream answered: " + ", ".join(connection.handshake.steps())
        except UpstreamError as error:
            pool.host_failed(label, error.detail)
            return False, f"upstream not ready: {error}"
        finally:
            await pool.run(connection.close)

    async def _run(self) -> tuple[bool, str]:
        try:
            destinations = self.routes.smart_hosts() if self.routes is not None else []
            pools = [self.pools.get(d) for d in destinations] if self.pools is not None \
                else [self.pool]
            probes = [(pool, host_config) for pool in pools
                      for host_config in pool.host_configs]
            answers = await asyncio.gather(*(self._probe_host(pool, host_config)
                                             for pool, host_config in probes))
        finally:
            self._probe = None
        if len(probes) == 1:
            answer = answers[0]
        else:
            lines, ready = [], True
            for pool in pools:
                mine = [(host_config, answers[index])
                        for index, (owner, host_config) in enumerate(probes)
                        if owner is pool]
                ready = ready and any(ok for _, (ok, _) in mine)
                for host_config, (_, text) in mine:
                    label = host_label(host_config.relay_host, host_config.relay_port)
                    lines.append(f"host {label}: {text}")
            answered = sum(1 for ok, _ in answers if ok)
            head = (f"upstream answered: {answered} of {len(answers)} hosts" if ready else
                    f"upstream not ready: a destination has no host answering "
                    f"({answered} of {len(answers)} hosts answered)")
            answer = (ready, "\n".join([head, *lines]))
        if self.routes is not None and self.routes.uses_mx():
            answer = (answer[0], answer[1] + "\nmx: direct delivery (not probed)")
        self._answer, self._answered_at = answer, time.monotonic()
        return answer


class BadRequest(Exception):
    """A request HTTPEndpoint will not read further: answered 400 (or `status`)."""

    def __init__(self, text: str, status: int = 400):
        super().__init__(text)
        self.status = status


@dataclasses.dataclass
class HTTPRequest:
    method: str
    target: str                  # path and query, as sent
    headers: dict[str, str]      # lower-case names; values decoded as latin-1


class HTTPEndpoint:
    """/healthz, /readyz and /metrics on HTTP_HOST:HTTP_PORT, and the queue API under
    /api/ when one is given. A few routes need no web framework: the request line and
    header fields are read (bounded), one response written, the connection closed."""

    MAX_LINE = 8192      # the request line and each header line
    MAX_HEADERS = 64
    MAX_BODY = 65536     # no route takes a body; a small one is read and ignored
    REQUEST_SECONDS = 10  # to send the whole request

    def __init__(self, relay: SMTPRelayServer, api: QueueAPI | None = None):
        self.relay = relay
        self.api = api
        # The routes' smart hosts are probed too (a stand-in relay may have none).
        self.readiness = ReadinessProbe(relay.config, relay.forwarder.pool,
                                        getattr(relay, "routes", None),
                                        getattr(relay.forwarder, "pools", None))
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        config = self.relay.config
        try:
            self._server = await asyncio.start_server(
                self._serve, config.http_host, config.http_port, reuse_address=True,
                limit=self.MAX_LINE)
        except OSError as error:
            raise cannot_listen("HTTP_HOST/HTTP_PORT", config.http_host,
                                config.http_port or 0, error) from None

    @property
    def port(self) -> int:
        assert self._server is not None
        return listening_port(self._server)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _serve(self, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        method = ""
        try:
            try:
                async with asyncio.timeout(self.REQUEST_SECONDS):
                    request = await self._read_request(reader)
                method = request.method
                status, headers, body = await self._route(request)
            except BadRequest as error:
                status, headers = error.status, {"Content-Type": PLAIN_TEXT}
                body = f"bad request: {error}\n".encode()
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
            writer.close()
            return
        head = [f"HTTP/1.1 {status} {http_reason(status)}"]
        # Content-Length and Connection are ours; no CR or LF ever starts a new line.
        head += [f"{name}: {value}" for name, value in headers.items()
                 if name.lower() not in ("content-length", "connection")
                 and not any(c in name + value for c in "\r\n")]
        head += [f"Content-Length: {len(body)}", "Connection: close", "", ""]
        writer.write("\r\n".join(head).encode("latin-1")
                     + (body if method != "HEAD" else b""))
        try:
            await writer.drain()
        except ConnectionError:
            pass
        writer.close()

    async def _read_request(self, reader: asyncio.StreamReader) -> HTTPRequest:
        """The request line, at most MAX_HEADERS header fields of at most MAX_LINE
        bytes each, and a body of at most MAX_BODY bytes (read to be dropped: no route
        takes one, and closing with it unread could reset the connection before the
        client reads our answer)."""
        method, target = ((await self._read_line(reader)).split(" ") + ["", ""])[:2]
        headers: dict[str, str] = {}
        count = 0
        while line := await self._read_line(reader):
            count += 1
            if count > self.MAX_HEADERS:
                raise BadRequest(f"more than {self.MAX_HEADERS} header fields")
            name, colon, value = line.partition(":")
            if not colon or not name or name != name.strip():  # also obsolete folding
                raise BadRequest("a malformed header field")
            name, value = name.lower(), value.strip(" \t")
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        if "transfer-encoding" in headers:
            raise BadRequest("a request body needs a Content-Length")
        length = headers.get("content-length", "0").strip()
        if not length.isascii() or not length.isdigit():
            raise BadRequest("a malformed Content-Length")
        if len(length) > 9 or int(length) > self.MAX_BODY:  # (int() of 5000 digits fails)
            raise BadRequest("the request body is too large", 413)
        await reader.readexactly(int(length))
        return HTTPRequest(method, target, headers)

    async def _read_line(self, reader: asyncio.StreamReader) -> str:
        try:
            line = await reader.readuntil(b"\n")
        except asyncio.LimitOverrunError:  # the reader's limit stops a long line early
            line = b""
        if not line or len(line) > self.MAX_LINE:  # ... and this is the exact bound
            raise BadRequest(f"a line longer than {self.MAX_LINE} bytes")
        return line.decode("latin-1").removesuffix("\n").removesuffix("\r")

    async def _route(self, request: HTTPRequest) -> tuple[int, dict[str, str], bytes]:
        path = request.target.split("?")[0]
        if self.api is not None and (path == "/api" or path.startswith("/api/")):
            return await self.api.respond(request.method, request.target,
                                          request.headers)
        status, content_type, body = await self._respond(request.method, path)
        headers = {"Content-Type": content_type}
        if status == 405:
            headers["Allow"] = "GET, HEAD"
        return status, headers, body

    async def _respond(self, method: str, path: str) -> tuple[int, str, bytes]:
        text = PLAIN_TEXT
        if method not in ("GET", "HEAD"):
            return 405, text, b"GET only\n"
        if path == "/healthz":
            if self.relay.draining:  # alive, finishing its sessions: not to be killed
                return 200, text, b"ok: draining (SIGTERM), the listeners are closed\n"
            if self.relay.serving:
                return 200, text, b"ok: the SMTP listener accepts connections\n"
            return 503, text, b"the SMTP listener is down\n"
        if path == "/readyz":
            if self.relay.draining:
                return 503, text, b"draining: shutting down, no new connections\n"
            ready, detail = await self.readiness.check()
            self.relay.metrics.upstream_up.set(1 if ready else 0)
            queue = self.relay.queue
            if queue is None or self.relay.config.delivery_mode == "sync":
                return 200 if ready else 503, text, (detail + "\n").encode()
            # Queue and fallback modes: ready means "can accept and store"; the
            # upstream's state is the second line, and smtp_relay_upstream_up.
            storing, why = await queue.can_store()
            return (200 if storing else 503, text,
                    f"{why}\n{detail}\n".encode())
        if path == "/metrics":
            return (200, prometheus_client.CONTENT_TYPE_LATEST,
                    prometheus_client.generate_latest(self.relay.metrics.registry))
        return 404, text, b"try /healthz, /readyz or /metrics\n"


PLAIN_TEXT = "text/plain; charset=utf-8"


def http_reason(status: int) -> str:
    """The reason phrase of a status line: "Not Found" for 404."""
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


Serve = Callable[..., Awaitable[int]]

DEMO_ENV = {
    "SMTP_AUTH_USERNAME": "demo",
    "SMTP_AUTH_PASSWORD": "demo-password",
    "ALLOWED_FROM_DOMAINS": "example.com",
    "ALLOWED_TO_DOMAINS": "example.com",
    "LISTEN_HOST": "127.0.0.1",
    "RELAY_USE_TLS": "false",
    "RELAY_USE_SSL": "false",
}


async def run_demo(serve: Serve, env: dict[str, str]) -> int:
    """The relay in front of a local upstream that prints every message it receives."""
    from aiosmtpd.handlers import Debugging

    loop = asyncio.get_running_loop()
    upstream = await loop.create_server(
        lambda: SMTP(Debugging(sys.stdout), hostname="demo-upstream", loop=loop),
        "127.0.0.1", 0)
    env = {**env, "RELAY_HOST": "127.0.0.1",
           "RELAY_PORT": str(listening_port(upstream))}
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
        self.handshake = Handshake(config, upstream_tls_context(config)
                                   if config.relay_use_tls or config.relay_use_ssl
                                   else None)

    def say(self, step: str, ok: bool, detail: str, fix: str = "") -> bool:
        self.out.write(f"{'ok  ' if ok else 'FAIL'} {step:<10} {detail}\n")
        if fix:
            self.out.write(f"     {'':<10} fix: {fix}\n")
        return ok

    def run(self) -> bool:
        if not (self.dns() and self.tcp()):
            return False
        smtp = self.banner()
        if smtp is None:
            return False
        try:
            return self.ehlo(smtp) and self.starttls(smtp) and self.auth(smtp)
        finally:
            try:
                smtp.quit()
            except (smtplib.SMTPException, OSError):
                smtp.close()

    def dns(self) -> bool:
        host, port = self.config.relay_host, self.config.relay_port
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as error:
            return self.say("DNS", False, f"{host}: {error.strerror}",
                            "check RELAY_HOST's spelling and this machine's DNS")
        addresses = sorted({str(info[4][0]) for info in infos})
        return self.say("DNS", True, f"{host} -> {', '.join(addresses)}")

    def tcp(self) -> bool:
        host, port = self.config.relay_host, self.config.relay_port
        try:
            socket.create_connection((host, port), timeout=self.config.timeout).close()
        except OSError as error:
            return self.say("TCP", False, f"{host}:{port}: {describe_error(error)}",
                            "nothing answers there: check RELAY_PORT (587 STARTTLS, "
                            "465 implicit TLS, 25 often blocked by providers) and "
                            "firewalls")
        return self.say("TCP", True, f"connected to {host}:{port}")

    def banner(self) -> smtplib.SMTP | None:
        """The handshake's connect step; the session, or None when it failed."""
        try:
            smtp, code, text = self.handshake.connect()
        except ssl.SSLCertVerificationError as error:
            self.say("TLS", False, describe_error(error), self._certificate_fix(error))
            return None
        except (ssl.SSLError, smtplib.SMTPException, OSError, ValueError) as error:
            fix = ("this port does not speak TLS first: use RELAY_USE_TLS=true and "
                   "RELAY_USE_SSL=false (STARTTLS, usually port 587)"
                   if self.config.relay_use_ssl else
                   "the server said nothing: port 465 expects implicit TLS "
                   "(RELAY_USE_SSL=true, RELAY_USE_TLS=false)")
            self.say("banner", False, describe_error(error), fix)
            return None
        if code != 220:
            self.say("banner", False, f"{code} {text}",
                     "the upstream refuses connections from this address")
            smtp.close()
            return None
        self.say("banner", True, f"{code} {text}")
        return smtp

    def ehlo(self, smtp: smtplib.SMTP) -> bool:
        code, text = self.handshake.ehlo(smtp)
        if code != 250:
            return self.say("EHLO", False, f"{code} {text}",
                            "the upstream refused our EHLO: set SMTP_HOSTNAME to a "
                            "proper host name")
        return self.say("EHLO", True, "extensions: " + " ".join(
            sorted(smtp.esmtp_features)))

    def starttls(self, smtp: smtplib.SMTP) -> bool:
        if not self.config.relay_use_tls:
            detail = ("implicit TLS (RELAY_USE_SSL)" if self.config.relay_use_ssl
                      else "off (RELAY_USE_TLS=false): mail goes in plaintext")
            return self.say("STARTTLS", True, detail)
        try:
            offered = self.handshake.starttls(smtp)
        except ssl.SSLCertVerificationError as error:
            return self.say("STARTTLS", False, describe_error(error),
                            self._certificate_fix(error))
        except (ssl.SSLError, smtplib.SMTPException, OSError, ValueError) as error:
            return self.say("STARTTLS", False, describe_error(error), "")
        if not offered:
            return self.say("STARTTLS", False, "not offered by the upstream",
                            "use the provider's submission port (587), or "
                            "RELAY_USE_SSL=true on 465")
        sock = typing.cast(ssl.SSLSocket, smtp.sock)
        certificate: Any = sock.getpeercert() or {}
        subject = dict(item[0] for item in certificate.get("subject", ()))
        return self.say("STARTTLS", True, f"{sock.version()}, certificate "
                        f"for {subject.get('commonName', '?')}, valid until "
                        f"{certificate.get('notAfter', '?')}")

    def _certificate_fix(self, error: ssl.SSLCertVerificationError) -> str:
        if "hostname" in str(error.verify_message).lower() or "IP address" in str(
                error.verify_message):
            return (f"the certificate is not for RELAY_HOST={self.config.relay_host}: "
                    "use the host name printed on the certificate")
        return ("the certificate's issuer is not trusted: set RELAY_TLS_CA_FILE to "
                "the CA that signed it (RELAY_TLS_VERIFY=false only for testing)")

    def auth(self, smtp: smtplib.SMTP) -> bool:
        if not self.config.relay_username:
            return self.say("AUTH", True, "not configured (RELAY_USERNAME empty)")
        if not smtp.has_extn("auth"):
            return self.say("AUTH", False, "the upstream offers no AUTH here",
                            "AUTH is usually offered only after TLS and on port 587")
        try:
            self.handshake.auth(smtp)
        except smtplib.SMTPAuthenticationError as error:
            text = reply_text(error.smtp_error)
            fix = ("the provider wants an app password (Gmail, Microsoft 365) or "
                   "SMTP credentials (SES), not the account's own password"
                   if error.smtp_code == 534 or "application" in text.lower() else
                   "check RELAY_USERNAME and RELAY_PASSWORD; Gmail and Microsoft 365 "
                   "need an app password")
            return self.say("AUTH", False, f"{error.smtp_code} {text}", fix)
        except (smtplib.SMTPException, OSError) as error:
            return self.say("AUTH", False, describe_error(error), "")
        return self.say("AUTH", True, f"logged in as {self.config.relay_username}")


def check_command(environ: Mapping[str, str], out: Any = sys.stdout) -> int:
    config = load_config(environ)
    load_users(config)  # a broken users file is a configuration error too
    out.write("Configuration (secrets redacted):\n")
    for key, value in config.redacted().items():
        out.write(f"  {key} = {value}\n")
    routes = RouteTable(config)  # ROUTES_FILE and the users' routes, checked too
    ok = True
    for destination in routes.smart_hosts():
        which = "RELAY_HOST" if destination == routes.default else "route"
        answered = []
        for host, port in destination.hosts:
            host_config = destination.host_config(config, host, port)
            out.write(f"\nUpstream {host_label(host, port)} ({which}):\n")
            answered.append(UpstreamCheck(host_config, out).run())
        if len(answered) > 1 and not all(answered):
            out.write(f"\n{sum(answered)} of {len(answered)} hosts of "
                      f"{destination.label} passed (failover uses the others).\n")
        ok = ok and any(answered)
    if routes.routes:
        out.write(f"\nRoutes ({len(routes.routes)}):\n")
        for route in routes.routes:
            match = {"user": f"user:{route.user}", "*": "*"}.get(
                route.kind, f"{route.kind}:{route.domains}")
            out.write(f"  {route.where}: {match} -> {route.destination.label}\n")
    if routes.uses_mx():
        ok = check_mx(config, out) and ok
    out.write("\nAll steps passed.\n" if ok else "\nThe upstream is not usable yet.\n")
    return 0 if ok else 1


def check_mx(config: Config, out: Any) -> bool:
    """`check` for the mx route: the EHLO name and whether DNS answers at all."""
    from relay.mx import DNSFailure, Resolver, hostname_looks_qualified
    out.write(f"\nMX delivery (MX_TLS={config.mx_tls}, MTA-STS "
              f"{'on' if config.mx_mta_sts else 'off'}, port {config.mx_port}):\n")
    qualified = hostname_looks_qualified(config.smtp_hostname)
    out.write(f"{'ok  ' if qualified else 'warn'} {'EHLO':<10} {config.smtp_hostname}"
              + ("" if qualified else ": not fully qualified, receivers may reject it")
              + "\n")
    resolvers = ",".join(f"{h}:{p}" for h, p in config.dns_resolvers) or "the system's"
    try:
        Resolver(config).query(config.smtp_hostname, "MX")
    except DNSFailure as failure:
        if failure.code < 500:
            out.write(f"FAIL {'DNS':<10} {resolvers}: {failure.text}\n")
            out.write(f"     {'':<10} fix: check DNS_RESOLVERS and this machine's DNS\n")
            return False
    out.write(f"ok   {'DNS':<10} {resolvers} answer\n")
    return True

