"""Shared test fixtures: a real upstream, a real relay process, real clients.

Everything talks over real sockets on 127.0.0.1:

- `upstream`: an aiosmtpd server started in this test process (a thread), whose
  behaviour each test sets: refuse MAIL, refuse or temp-fail one recipient, temp-fail
  DATA, stall, drop the connection at a step, require STARTTLS + AUTH, implicit TLS.
  It records every message it accepted.
- `relay`: a factory that starts `python smtp_relay.py` as a subprocess, configured
  only through environment variables, in a fresh working directory.
- `ca`: a trustme certificate authority made at test time; nothing is committed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

PROJECT = Path(__file__).resolve().parent.parent
SMTP_RELAY = PROJECT / "smtp_relay.py"

# Every variable the relay reads: stripped from the inherited environment so that a
# developer's own settings never leak into a test.
RELAY_VARIABLES = (
    "SMTP_AUTH_USERNAME", "SMTP_AUTH_PASSWORD", "ALLOWED_FROM_DOMAINS",
    "ALLOWED_TO_DOMAINS", "LISTEN_HOST", "LISTEN_PORT", "USE_TLS", "TLS_CERT_FILE",
    "TLS_KEY_FILE", "RELAY_HOST", "RELAY_PORT", "RELAY_USE_TLS", "RELAY_USE_SSL",
    "RELAY_USERNAME", "RELAY_PASSWORD", "RELAY_TLS_VERIFY", "RELAY_TLS_CA_FILE",
    "RELAY_POOL_IDLE_SECONDS", "RELAY_POOL_MAX_MESSAGES", "MAX_CONNECTIONS", "TIMEOUT",
    "LOG_FILE", "LOG_LEVEL", "MAX_MESSAGE_SIZE", "MAX_RECIPIENTS", "SMTP_HOSTNAME",
    "SMTP_AUTH_PASSWORD_FILE", "SMTP_AUTH_PASSWORD_HASH", "SMTP_AUTH_PASSWORD_HASH_FILE",
    "RELAY_PASSWORD_FILE", "AUTH_MECHANISMS", "AUTH_MAX_FAILURES", "AUTH_FAILURE_WINDOW",
    "AUTH_FAILURE_DELAY", "RATE_LIMIT_PER_MINUTE", "RATE_LIMIT_BURST", "MESSAGES_PER_DAY",
    "RECIPIENTS_PER_MINUTE", "RATE_LIMIT_STORAGE", "ALLOWED_CLIENT_NETWORKS",
    "TRUSTED_NETWORKS", "TRUSTED_NETWORKS_ALLOW_PUBLIC", "SMTPS_PORT", "TLS_MIN_VERSION",
    "MAX_HOPS", "CHECK_HEADER_FROM", "LOG_FORMAT", "LOG_MAX_BYTES", "LOG_BACKUP_COUNT",
    "HTTP_HOST", "HTTP_PORT", "READY_PROBE_SECONDS", "SMTP_USERS_FILE",
    "MAX_CONNECTIONS_PER_IP",
    "DELIVERY_MODE", "QUEUE_URL", "QUEUE_WORKERS", "QUEUE_LEASE_SECONDS",
    "QUEUE_RETRY_MIN", "QUEUE_RETRY_MAX", "QUEUE_MAX_AGE", "QUEUE_MAX_MESSAGES",
    "QUEUE_MAX_BYTES", "QUEUE_MIN_FREE_BYTES", "BOUNCE_TO", "ARCHIVE", "ARCHIVE_MAX_AGE",
    "ARCHIVE_MAX_MESSAGES", "ARCHIVE_MAX_BYTES", "API_TOKEN", "API_READ_TOKEN",
    "API_TOKEN_FILE", "API_READ_TOKEN_FILE",
    "ROUTES_FILE", "DNS_RESOLVERS", "MX_PORT", "MX_ALLOW_PRIVATE", "MX_TLS", "MX_MTA_STS",
    "PROXY_PROTOCOL", "PROXY_TRUSTED_NETWORKS", "RATE_LIMIT_FAILURE",
)

SENDER = "app@example.com"
RECIPIENT = "ops@example.com"
USER = "relayuser"
PASSWORD = "s3cret-Pa55"
UPSTREAM_USER = "upstream-user"
UPSTREAM_PASSWORD = "upstream-Pa55"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------------------------------
# The upstream
# ---------------------------------------------------------------------------------------

@dataclasses.dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    content: bytes
    mail_options: list[str]
    session_id: int


class UpstreamHandler:
    """aiosmtpd handler whose answers the test chooses.

    - mail_reply: reply to every MAIL instead of 250.
    - rcpt_replies: {address: reply} for particular recipients.
    - data_reply: reply after DATA instead of 250.
    - stall: {"MAIL"|"RCPT"|"DATA": seconds} to wait before answering.
    - drop: a set of steps ("MAIL", "RCPT", "DATA") at which the connection is cut.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.mail_reply: str | None = None
        self.rcpt_replies: dict[str, str] = {}
        self.data_reply: str | None = None
        self.stall: dict[str, float] = {}
        self.drop: set[str] = set()
        self.messages: list[Received] = []
        self.sessions: dict[int, object] = {}  # id -> session, kept alive: ids unique
        self.mail_commands: list[tuple[str, list[str]]] = []
        self.rcpt_commands: list[str] = []
        self.rset_count = 0

    async def _misbehave(self, server, step: str) -> bool:
        if step in self.stall:
            await asyncio.sleep(self.stall[step])
        if step in self.drop:
            server.transport.close()
            return True
        return False

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        self.sessions[id(session)] = session
        self.mail_commands.append((address, list(mail_options)))
        if await self._misbehave(server, "MAIL"):
            return None
        if self.mail_reply:
            return self.mail_reply
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Sender OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        self.rcpt_commands.append(address)
        if await self._misbehave(server, "RCPT"):
            return None
        if address in self.rcpt_replies:
            return self.rcpt_replies[address]
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Recipient OK"

    async def handle_RSET(self, server, session, envelope):
        self.rset_count += 1
        return "250 2.0.0 OK"

    async def handle_DATA(self, server, session, envelope):
        if await self._misbehave(server, "DATA"):
            return None
        if self.data_reply:
            return self.data_reply
        self.messages.append(Received(envelope.mail_from, list(envelope.rcpt_tos),
                                      envelope.original_content,
                                      list(envelope.mail_options), id(session)))
        return f"250 2.0.0 Ok: queued as UP{len(self.messages)}"


def _upstream_authenticator(server, session, envelope, mechanism, auth_data):
    ok = (isinstance(auth_data, LoginPassword)
          and auth_data.login == UPSTREAM_USER.encode()
          and auth_data.password == UPSTREAM_PASSWORD.encode())
    return AuthResult(success=ok, handled=ok)  # handled=False: aiosmtpd answers 535


class Upstream:
    """A running upstream SMTP server on 127.0.0.1 (see UpstreamHandler)."""

    def __init__(self, *, starttls_context: ssl.SSLContext | None = None,
                 implicit_tls_context: ssl.SSLContext | None = None,
                 require_auth: bool = False, smtputf8: bool = True,
                 port: int | None = None, handler: UpstreamHandler | None = None,
                 host: str = "127.0.0.1", name: str = "localhost"):
        self.handler = handler or UpstreamHandler()
        self.host = host  # 127.0.0.2-4 too: Linux routes all of 127/8 to loopback
        self.port = port or free_port(host)  # a given port: an upstream that comes back
        options = {"enable_SMTPUTF8": smtputf8}
        if starttls_context is not None:
            options.update(tls_context=starttls_context, require_starttls=True)
        if require_auth:
            # aiosmtpd counts only its own STARTTLS as TLS, so with implicit TLS it
            # would never offer AUTH unless told TLS is not required.
            options.update(auth_required=True, authenticator=_upstream_authenticator,
                           auth_require_tls=starttls_context is not None)
        self.controller = Controller(self.handler, hostname=host, port=self.port,
                                     ssl_context=implicit_tls_context,
                                     server_hostname=name, ready_timeout=10,
                                     **options)
        self.controller.start()

    @property
    def messages(self) -> list[Received]:
        return self.handler.messages

    def stop(self) -> None:
        self.controller.stop()


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def server_cert(ca, tmp_path_factory):
    """(cert file, key file, CA file) for 'localhost' and 127.0.0.1."""
    directory = tmp_path_factory.mktemp("certs")
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert_file, key_file, ca_file = (directory / "server.crt", directory / "server.key",
                                    directory / "ca.pem")
    cert.private_key_and_cert_chain_pem.write_to_path(str(key_file))
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    for extra in cert.cert_chain_pems[1:]:
        extra.write_to_path(str(cert_file), append=True)
    ca.cert_pem.write_to_path(str(ca_file))
    return cert_file, key_file, ca_file


@pytest.fixture
def server_tls_context(server_cert) -> ssl.SSLContext:
    cert_file, key_file, _ = server_cert
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    return context


@pytest.fixture
def upstream():
    server = Upstream()
    yield server
    server.stop()


@pytest.fixture
def make_upstream():
    started: list[Upstream] = []

    def make(**options) -> Upstream:
        server = Upstream(**options)
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


# ---------------------------------------------------------------------------------------
# The relay
# ---------------------------------------------------------------------------------------

class RelayProcess:
    """`python smtp_relay.py` in its own working directory, configured by env vars."""

    def __init__(self, workdir: Path, env: dict[str, str], args: tuple[str, ...] = ()):
        self.workdir = workdir
        self.env = env
        self.port = int(env["LISTEN_PORT"])
        self.log_file = Path(env["LOG_FILE"])
        self.stderr_file = workdir / "stderr.txt"
        with open(self.stderr_file, "wb") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, str(SMTP_RELAY), *args], cwd=workdir, env=env,
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr)

    def wait_ready(self, timeout: float = 15.0) -> RelayProcess:
        deadline = time.monotonic() + timeout
        proxied = self.env.get("PROXY_PROTOCOL", "").lower() in ("true", "1", "yes", "on")
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"relay exited with {self.process.returncode}:\n"
                                     + self.stderr)
            if proxied:  # no greeting before a PROXY header: its start line instead
                if " INFO started " in self.log():
                    return self
                time.sleep(0.05)
                continue
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    # Our banner, from our process: another test run may hold the port.
                    if (b"smtp-relay" in s.recv(200)
                            and self.process.poll() is None):
                        return self
            except OSError:
                time.sleep(0.05)
        raise AssertionError("relay did not start:\n" + self.stderr)

    @property
    def stderr(self) -> str:
        return self.stderr_file.read_text(errors="replace")

    def log(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def wait_for_log(self, text: str, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            log = self.log()
            if text in log:
                return log
            time.sleep(0.05)
        raise AssertionError(f"{text!r} not in the relay's log:\n{self.log()}")

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signum)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def client(self, *, login: bool = True, timeout: float = 20.0) -> smtplib.SMTP:
        client = smtplib.SMTP("127.0.0.1", self.port, timeout=timeout)
        client.ehlo("client.test")
        if login:
            client.login(USER, PASSWORD)
        return client


def relay_env(tmp_path: Path, upstream: Upstream | None, **overrides: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in RELAY_VARIABLES}
    env.update({
        "LISTEN_HOST": "127.0.0.1",
        "LISTEN_PORT": str(free_port()),
        "SMTP_AUTH_USERNAME": USER,
        "SMTP_AUTH_PASSWORD": PASSWORD,
        "ALLOWED_FROM_DOMAINS": "example.com",
        "ALLOWED_TO_DOMAINS": "example.com,*.example.org",
        "RELAY_HOST": "127.0.0.1",
        "RELAY_PORT": str(upstream.port if upstream else free_port()),
        "RELAY_USE_TLS": "false",
        "LOG_FILE": str(tmp_path / "logs" / "smtp-relay.log"),
        "TIMEOUT": "10",
        "SMTP_HOSTNAME": "relay.test",
    })
    env.update({k: str(v) for k, v in overrides.items()})
    return env


@pytest.fixture
def start_relay(tmp_path):
    """start_relay(upstream, VAR=value, ...) -> a running RelayProcess."""
    started: list[RelayProcess] = []

    def start(upstream: Upstream | None = None, *, wait: bool = True,
              args: tuple[str, ...] = (), **overrides: str) -> RelayProcess:
        workdir = tmp_path / f"relay{len(started)}"
        workdir.mkdir()
        relay = RelayProcess(workdir, relay_env(workdir, upstream, **overrides), args)
        started.append(relay)
        return relay.wait_ready() if wait else relay

    yield start
    for relay in started:
        relay.stop(signal.SIGKILL)


@pytest.fixture(scope="module")
def module_upstream_server():
    """One upstream for a whole test module (see module_upstream)."""
    server = Upstream()
    yield server
    server.stop()


@pytest.fixture
def module_upstream(module_upstream_server) -> Upstream:
    """The module's upstream, emptied for this test."""
    module_upstream_server.handler.reset()
    return module_upstream_server


def start_module_relay(tmp_path_factory, upstream: Upstream | None, name: str,
                       **overrides: str) -> RelayProcess:
    """A relay for a module-scoped fixture (the caller stops it)."""
    workdir = tmp_path_factory.mktemp(name)
    relay = RelayProcess(workdir, relay_env(workdir, upstream, **overrides))
    try:
        relay.wait_ready()
    except AssertionError:
        relay.stop(signal.SIGKILL)
        raise
    return relay


def exit_of_each(runs: dict[str, tuple[Path, dict]], args: tuple[str, ...] = (),
                 timeout: float = 20) -> dict[str, tuple[int | None, str, str]]:
    """Run `python smtp_relay.py *args` once per case ({id: (workdir, env)}), all side
    by side, and return {id: (exit status, stdout, stderr)}; the status is None when it
    was still running after `timeout` (a relay that accepted its settings)."""
    processes = {
        case_id: subprocess.Popen(
            [sys.executable, str(SMTP_RELAY), *args], cwd=workdir, env=env,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True)
        for case_id, (workdir, env) in runs.items()}
    results = {}
    for case_id, process in processes.items():
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, stderr = process.communicate()
            results[case_id] = (None, stdout, stderr)
            continue
        results[case_id] = (process.returncode, stdout, stderr)
    return results


@pytest.fixture
def relay(start_relay, upstream) -> RelayProcess:
    """The relay with the default test settings, in front of `upstream`."""
    return start_relay(upstream)


def message(subject: str = "test", body: str = "Hello.\r\n") -> bytes:
    return (f"From: app@example.com\r\nTo: ops@example.com\r\nSubject: {subject}\r\n"
            f"\r\n{body}").encode()


class RawClient:
    """A line-level SMTP client for what smtplib will not send."""

    def __init__(self, port: int, timeout: float = 20.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buffer = b""
        self.banner = self.reply()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed; buffered {self.buffer!r}")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line

    def reply(self) -> str:
        """One whole (possibly multi-line) reply, lines joined by newlines."""
        lines = [self.line()]
        while lines[-1][3:4] == b"-":
            lines.append(self.line())
        return "\n".join(line.decode("utf-8", "replace") for line in lines)

    def command(self, line: str | bytes) -> str:
        self.send((line.encode() if isinstance(line, str) else line) + b"\r\n")
        return self.reply()

    def login(self, user: str = USER, password: str = PASSWORD) -> None:
        import base64
        assert self.command("EHLO raw.test").startswith("250")
        token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        reply = self.command(f"AUTH PLAIN {token}")
        assert reply.startswith("235"), reply

    def closed(self, timeout: float = 5.0) -> bool:
        """True when the server has closed the connection (reads to EOF)."""
        self.sock.settimeout(timeout)
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
                self.buffer += chunk
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def raw_client():
    opened: list[RawClient] = []

    def connect(port: int, timeout: float = 20.0) -> RawClient:
        client = RawClient(port, timeout)
        opened.append(client)
        return client

    yield connect
    for client in opened:
        client.close()


def swaks_path() -> str | None:
    path = shutil.which("swaks")
    if path is None and os.environ.get("REQUIRE_SWAKS"):
        pytest.fail("swaks is required (REQUIRE_SWAKS is set) but not installed")
    return path


# ---------------------------------------------------------------------------------------
# Shared client steps and relay checks
# ---------------------------------------------------------------------------------------

def mail(client: smtplib.SMTP, sender: str = SENDER, options: tuple[str, ...] = ()) -> str:
    code, text = client.mail(sender, list(options))
    return f"{code} {text.decode()}"


def rcpt(client: smtplib.SMTP, recipient: str) -> str:
    code, text = client.rcpt(recipient)
    return f"{code} {text.decode()}"


def try_message(client: smtplib.SMTP, content: bytes,
                recipients: tuple[str, ...] = (RECIPIENT,), sender: str = SENDER) -> str:
    """MAIL, RCPT*, DATA on an open client; the first refusal, or the DATA reply. After
    a refused RCPT the transaction is still open (RSET before the next MAIL)."""
    reply = mail(client, sender)
    if not reply.startswith("250"):
        return reply
    for recipient in recipients:
        reply = rcpt(client, recipient)
        if not reply.startswith("250"):
            return reply
    code, text = client.data(content)
    return f"{code} {text.decode()}"


def hangup(relay: RelayProcess, timeout: float = 10.0) -> None:
    """SIGHUP, once the relay catches it: it installs the handler just after it starts
    listening, and before that a HUP would end it (the default action)."""
    status = Path(f"/proc/{relay.process.pid}/status")
    deadline = time.monotonic() + timeout
    if status.exists():
        while time.monotonic() < deadline:
            caught = next((line.split()[1] for line in status.read_text().splitlines()
                           if line.startswith("SigCgt:")), "0")
            if int(caught, 16) & (1 << (signal.SIGHUP - 1)):
                break
            time.sleep(0.02)
        else:
            raise AssertionError("the relay never installed its SIGHUP handler")
    else:  # no /proc: the handler follows the start-up lines closely
        relay.wait_for_log("RELAY_USE_TLS and RELAY_USE_SSL are off")
        time.sleep(0.5)
    relay.process.send_signal(signal.SIGHUP)


@pytest.fixture
def start(start_relay):
    """`start_relay`, then at the end: no relay printed a traceback."""
    relays = []

    def start_checked(upstream=None, **overrides):
        relay = start_relay(upstream, **overrides)
        relays.append(relay)
        return relay

    yield start_checked
    for relay in relays:
        assert "Traceback" not in relay.stderr, relay.stderr
