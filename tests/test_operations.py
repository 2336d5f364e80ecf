"""Operations: the HTTP endpoint (/healthz, /readyz, /metrics), JSON logs, log rotation
and the SIGHUP reopen, `python smtp_relay.py check`, SMTP_USERS_FILE and its reload on
SIGHUP under live sessions.

Everything runs for real on 127.0.0.1: relay subprocesses configured by environment
variables, an aiosmtpd upstream in this process (plain, or STARTTLS with trustme
certificates and AUTH), smtplib and the line-level RawClient as clients. /metrics is
fetched over HTTP with urllib and parsed with prometheus_client's own parser; JSON log
lines are parsed with json; `check` runs as a subprocess.

Relays whose settings several tests can share (the defaults, the HTTP endpoint, the
users file) are started once per module; tests that count metrics from zero, rewrite a
relay's files or send it signals start their own. The start-up refusals and the
`check` runs are started side by side, once per module. The pure pieces
(parse_users_file, the JSON formatter, Metrics) are tested directly at the end.

No assertion is about speed: waits poll for an outcome with a generous deadline.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import json
import logging
import re
import signal
import smtplib
import socket
import ssl
import time
import urllib.error
import urllib.request
from pathlib import Path

import bcrypt
import prometheus_client
import pytest
from conftest import (
    PASSWORD,
    UPSTREAM_PASSWORD,
    UPSTREAM_USER,
    USER,
    RawClient,
    RelayProcess,
    Upstream,
    exit_of_each,
    free_port,
    hangup,
    mail,
    message,
    rcpt,
    relay_env,
    start_module_relay,
    try_message,
)
from prometheus_client.parser import text_string_to_metric_families

from relay.observability import JSONFormatter, Metrics
from relay.protocol import Client, RelaySession
from relay.ratelimit import RateLimiter
from relay.settings import ConfigError, load_config
from relay.users import default_policy, parse_users_file

pytestmark = pytest.mark.timeout(60)

SENDER = "app@example.com"
RECIPIENT = "ops@example.com"
ELSEWHERE = "app@elsewhere.test"  # in no allowlist
CONFIG_ERROR = "smtp-relay: configuration error:"
RELAY_ID = re.compile(r" \(smtp-relay id ([0-9a-f]{16})\)$")
JSON_KEYS = ("time", "level", "event", "id", "peer", "user", "from", "to", "size",
             "upstream", "duration_ms")
LOG_TIME = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}")
WRONG_UPSTREAM_PASSWORD = "not-the-Upstream-Pa55"

# Users of SMTP_USERS_FILE, each with its own password.
PASSWORDS = {name: f"{name}-Pa55-word" for name in ("alice", "bob", "carol", "dave",
                                                    "zed")}

# ---------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------

def http_settings() -> dict[str, str]:
    return {"HTTP_HOST": "127.0.0.1", "HTTP_PORT": str(free_port())}


def http_port(relay: RelayProcess) -> int:
    return int(relay.env["HTTP_PORT"])


# The relay is on 127.0.0.1: never through a proxy from the developer's environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http(port: int, path: str, method: str = "GET",
         data: bytes | None = None) -> tuple[int, str, str]:
    """(status, content type, body) of one request to the relay's HTTP endpoint."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data,
                                     method=method)
    try:
        with _OPENER.open(request, timeout=20) as response:
            return (response.status, response.headers.get("Content-Type", ""),
                    response.read().decode())
    except urllib.error.HTTPError as error:
        with error:
            return (error.code, error.headers.get("Content-Type", ""),
                    error.read().decode())


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Samples:
    """GET /metrics, parsed: {(sample name, sorted labels): value}."""
    status, content_type, body = http(port, "/metrics")
    assert status == 200, body
    assert content_type.startswith("text/plain"), content_type
    samples: Samples = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def wait_for_metric(port: int, name: str, expected: float, timeout: float = 10.0,
                    **labels: str) -> Samples:
    """Scrape until `name{labels}` has the expected value (connections close
    asynchronously on the relay's side); the last scrape."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(port)
        if value(samples, name, **labels) == expected or time.monotonic() > deadline:
            assert value(samples, name, **labels) == expected, (name, labels, samples)
            return samples
        time.sleep(0.05)


def send(client: smtplib.SMTP, sender: str = SENDER,
         recipients: tuple[str, ...] = (RECIPIENT,), content: bytes | None = None) -> str:
    """try_message with a default message."""
    return try_message(client, message() if content is None else content, recipients,
                       sender)


def relay_id(reply: str) -> str:
    """The relay's message id at the end of a final 250."""
    match = RELAY_ID.search(reply)
    assert match is not None, reply
    return match.group(1)


def login(relay: RelayProcess, name: str, password: str) -> smtplib.SMTP:
    client = relay.client(login=False)
    client.login(name, password)
    return client


def auth_plain(client: RawClient, user: str, password: str) -> str:
    """EHLO and one AUTH PLAIN (smtplib would retry a refusal with LOGIN)."""
    assert client.command("EHLO raw.test").startswith("250")
    token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
    return client.command(f"AUTH PLAIN {token}")


def log_lines(relay: RelayProcess, event: str, text: str | None = None) -> list[str]:
    """Text-format lines of one event."""
    text = relay.log() if text is None else text
    return [line for line in text.splitlines() if f" {event} " in f"{line} "]


def wait_for_lines(relay: RelayProcess, event: str, count: int,
                   timeout: float = 10.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = log_lines(relay, event)
        if len(lines) >= count:
            return lines
        time.sleep(0.05)
    raise AssertionError(f"fewer than {count} {event!r} lines:\n{relay.log()}")


def names(text: str, variable: str) -> bool:
    """`variable` appears in `text` as a whole name (not as part of a longer one)."""
    return re.search(rf"(?<![A-Z_]){re.escape(variable)}(?![A-Z_])", text) is not None


def listening_ports(pid: int) -> set[int] | None:
    """TCP ports process `pid` listens on (Linux /proc), or None when unknown."""
    fd_dir = Path(f"/proc/{pid}/fd")
    if not fd_dir.is_dir() or not Path("/proc/net/tcp").exists():
        return None
    inodes = set()
    for fd in fd_dir.iterdir():
        try:
            target = fd.readlink().name
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not Path(table).exists():
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def case_values(case) -> tuple:
    """A parametrize case's values, whether a plain tuple or a pytest.param."""
    return tuple(case.values) if hasattr(case, "marks") else tuple(case)


def make_hash(password: str) -> str:
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(4)).decode()


class StoppableUpstreams:
    """Upstreams a test may stop itself (conftest's fixtures stop theirs at teardown,
    and aiosmtpd refuses to stop one twice)."""

    def __init__(self) -> None:
        self.running: list[Upstream] = []

    def start(self, **options) -> Upstream:
        server = Upstream(**options)
        self.running.append(server)
        return server

    def stop(self, server: Upstream) -> None:
        self.running.remove(server)
        server.stop()


# ---------------------------------------------------------------------------------------
# Shared fixtures
# ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hashes() -> dict[str, str]:
    return {name: make_hash(password) for name, password in PASSWORDS.items()}


@pytest.fixture(scope="module")
def default_relay(tmp_path_factory, module_upstream_server):
    """conftest's default settings: no HTTP_PORT."""
    relay = start_module_relay(tmp_path_factory, module_upstream_server, "default-relay")
    yield relay
    relay.stop(signal.SIGKILL)


@pytest.fixture(scope="module")
def http_relay(tmp_path_factory, module_upstream_server):
    """The defaults plus the HTTP endpoint."""
    relay = start_module_relay(tmp_path_factory, module_upstream_server, "http-relay",
                               **http_settings())
    yield relay
    relay.stop(signal.SIGKILL)


@pytest.fixture
def upstreams():
    started = StoppableUpstreams()
    yield started
    for server in list(started.running):
        started.stop(server)


# ---------------------------------------------------------------------------------------
# 1. HTTP: /healthz, /readyz, /metrics
# ---------------------------------------------------------------------------------------

def test_healthz_is_200_while_the_listener_accepts(http_relay):
    status, content_type, body = http(http_port(http_relay), "/healthz")
    assert status == 200, body
    assert content_type.startswith("text/plain")
    assert body.startswith("ok")
    with http_relay.client():  # and the listener does accept
        pass


@pytest.mark.parametrize("path", ["/", "/health", "/metrics/extra", "/readyz.json"])
def test_other_paths_are_404(http_relay, path):
    status, _, body = http(http_port(http_relay), path)
    assert status == 404, body


@pytest.mark.parametrize(("method", "data"), [("POST", b"x" * 100), ("POST", None),
                                              ("PUT", b"{}"), ("DELETE", None)])
def test_methods_other_than_get_are_405(http_relay, method, data):
    for path in ("/healthz", "/metrics"):
        status, _, body = http(http_port(http_relay), path, method, data)
        assert status == 405, (path, body)


def test_readyz_is_200_with_a_working_upstream(http_relay):
    status, _, body = http(http_port(http_relay), "/readyz")
    assert status == 200, body
    assert "connect" in body and "EHLO" in body


def test_readyz_is_503_naming_connect_with_the_upstream_down(start_relay):
    relay = start_relay(None, **http_settings())  # RELAY_PORT: nothing listens there
    status, _, body = http(http_port(relay), "/readyz")
    assert status == 503, body
    assert "not ready" in body and "connect" in body, body


def test_readyz_is_503_naming_starttls_without_it_upstream(start_relay, module_upstream):
    relay = start_relay(module_upstream, RELAY_USE_TLS="true", **http_settings())
    status, _, body = http(http_port(relay), "/readyz")
    assert status == 503, body
    assert "STARTTLS" in body, body


@pytest.mark.parametrize(("probe_seconds", "after_stop"), [("60", 200), ("1", 503)],
                         ids=["cached-60s", "expired-1s"])
def test_readyz_caches_its_probe_for_ready_probe_seconds(start_relay, upstreams,
                                                         probe_seconds, after_stop):
    upstream = upstreams.start()
    relay = start_relay(upstream, READY_PROBE_SECONDS=probe_seconds, **http_settings())
    status, _, body = http(http_port(relay), "/readyz")
    assert status == 200, body
    upstreams.stop(upstream)
    time.sleep(1.2)  # READY_PROBE_SECONDS is at least 1
    status, _, body = http(http_port(relay), "/readyz")
    assert status == after_stop, body


def test_started_line_and_listeners_with_http_port(http_relay):
    [started] = log_lines(http_relay, "started")
    assert f" http={http_port(http_relay)} " in started
    ports = listening_ports(http_relay.process.pid)
    if ports is not None:
        assert ports == {http_relay.port, http_port(http_relay)}


def test_without_http_port_nothing_else_listens(default_relay):
    [started] = log_lines(default_relay, "started")
    assert " http=" not in started and "http_port" not in started
    ports = listening_ports(default_relay.process.pid)
    if ports is not None:
        assert ports == {default_relay.port}


def test_http_port_in_use_stops_the_relay_naming_it(start_relay, upstream):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        relay = start_relay(upstream, wait=False, HTTP_HOST="127.0.0.1",
                            HTTP_PORT=str(taken.getsockname()[1]))
        assert relay.process.wait(20) == 2, relay.stderr
    lines = relay.stderr.strip().splitlines()
    assert len(lines) == 1, relay.stderr
    assert lines[0].startswith(CONFIG_ERROR) and names(lines[0], "HTTP_PORT"), lines[0]


def test_metrics_count_what_happened(start_relay, upstream, raw_client):
    """2 delivered, refusals for each of sender domain, recipient domain, upstream 5xx
    at DATA and rate, 1 failed AUTH: every counter moves by exactly that."""
    relay = start_relay(upstream, RATE_LIMIT_PER_MINUTE="4", AUTH_FAILURE_DELAY="0",
                        **http_settings())
    port = http_port(relay)
    before = scrape(port)

    failing = raw_client(relay.port)
    assert auth_plain(failing, USER, "not-the-password").startswith("535")
    failing.close()

    first = message("first")
    second = message("second", "Two recipients.\r\n" * 20)
    with relay.client() as client:
        assert send(client, content=first).startswith("250")  # opens the upstream
        assert send(client, recipients=(RECIPIENT, "dev@team.example.org"),
                    content=second).startswith("250")  # reuses it
        assert send(client, sender=ELSEWHERE).startswith("553")
        upstream.handler.data_reply = "554 5.7.1 Refused by the upstream"
        assert send(client).startswith("554 5.7.1")
        upstream.handler.data_reply = None
        assert send(client, recipients=("ops@elsewhere.test",)).startswith("550")
        client.rset()
        assert send(client).startswith("451 4.7.1")  # the 5th MAIL this minute
        after = wait_for_metric(port, "smtp_relay_connections_open", 1)
    closed = wait_for_metric(port, "smtp_relay_connections_open", 0)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("smtp_relay_messages_accepted_total", user=USER) == 2
    rejected = {labels: count - before.get((name, labels), 0.0)
                for (name, labels), count in after.items()
                if name == "smtp_relay_messages_rejected_total"}
    assert {dict(labels)["reason"]: count for labels, count in rejected.items()
            if count} == {"sender_domain": 1, "recipient_domain": 1, "upstream_5xx": 1,
                          "rate": 1}
    assert all(dict(labels)["user"] == USER for labels in rejected)
    assert delta("smtp_relay_auth_total", result="failure") == 1
    assert delta("smtp_relay_auth_total", result="success") == 1
    assert delta("smtp_relay_recipients_total", user=USER) == 3
    assert delta("smtp_relay_bytes_total", user=USER) == len(first) + len(second)
    # Every DATA that reached the upstream: the two delivered and the refused one.
    assert delta("smtp_relay_upstream_delivery_seconds_count") == 3
    assert delta("smtp_relay_upstream_delivery_seconds_bucket", le="+Inf") == 3
    assert delta("smtp_relay_upstream_delivery_seconds_sum") > 0
    assert delta("smtp_relay_connections_total") == 2
    assert value(after, "smtp_relay_connections_open") == 1
    assert value(closed, "smtp_relay_connections_open") == 0
    assert delta("smtp_relay_upstream_sessions_opened_total") == 1
    assert delta("smtp_relay_upstream_sessions_reused_total") == 3
    assert value(after, "smtp_relay_upstream_sessions_open") == 1
    assert len(upstream.messages) == 2


def test_max_connections_refusals_are_counted(start_relay, upstream, raw_client):
    relay = start_relay(upstream, MAX_CONNECTIONS="1", **http_settings())
    port = http_port(relay)
    wait_for_metric(port, "smtp_relay_connections_open", 0)  # wait_ready's is gone
    with relay.client(login=False):
        wait_for_metric(port, "smtp_relay_connections_open", 1)
        refused = raw_client(relay.port)
        assert refused.banner.startswith("421 4.7.0"), refused.banner
        assert refused.closed()
        samples = scrape(port)
    assert value(samples, "smtp_relay_connections_refused_total",
                 reason="max_connections") == 1
    assert value(samples, "smtp_relay_connections_open") == 1
    relay.wait_for_log("connection-refused")


# ---------------------------------------------------------------------------------------
# 2. Logs: JSON, rotation, SIGHUP reopen, the id in the final 250
# ---------------------------------------------------------------------------------------

def test_json_log_lines_have_the_fixed_keys(start_relay, upstream, raw_client):
    relay = start_relay(upstream, LOG_FORMAT="json", AUTH_FAILURE_DELAY="0")
    failing = raw_client(relay.port)
    assert auth_plain(failing, USER, "not-the-password").startswith("535")
    failing.close()
    content = message("json")
    with relay.client() as client:
        assert send(client, sender=ELSEWHERE).startswith("553")
        reply = send(client, content=content)
    message_id = relay_id(reply)
    relay.wait_for_log('"event": "delivered"')

    entries = [json.loads(line) for line in relay.log().splitlines()]
    for entry in entries:
        assert isinstance(entry, dict), entry
        assert set(JSON_KEYS) <= entry.keys(), entry
        assert LOG_TIME.fullmatch(entry["time"]), entry
    by_event: dict[str, list[dict]] = {}
    for entry in entries:
        by_event.setdefault(entry["event"], []).append(entry)
    assert {"started", "message", "auth-failed", "auth-ok", "sender-refused",
            "delivered"} <= by_event.keys()

    [started] = by_event["started"]
    assert all(started[key] is None for key in JSON_KEYS[3:]), started
    assert started["level"] == "INFO"
    for warning in by_event["message"]:  # the start-up notes: no event of their own
        assert warning["level"] == "WARNING" and warning["message"], warning
    [failed] = by_event["auth-failed"]
    assert failed["level"] == "WARNING" and failed["peer"] == "127.0.0.1"
    assert failed["attempted_user"] == USER
    assert all(failed[key] is None for key in ("id", "user", "from", "to", "size",
                                               "upstream", "duration_ms")), failed
    [refused] = by_event["sender-refused"]
    assert refused["user"] == USER and refused["domain"] == "elsewhere.test"

    [delivered] = by_event["delivered"]
    assert {key: delivered[key] for key in JSON_KEYS[1:-1]} == {
        "level": "INFO", "event": "delivered", "id": message_id, "peer": "127.0.0.1",
        "user": USER, "from": SENDER, "to": [RECIPIENT], "size": len(content),
        "upstream": "250 2.0.0 Ok: queued as UP1"}
    assert isinstance(delivered["size"], int)
    assert isinstance(delivered["duration_ms"], (int, float))
    assert delivered["duration_ms"] >= 0


def test_log_file_rotates_at_log_max_bytes(start_relay, upstream):
    relay = start_relay(upstream, LOG_MAX_BYTES="2000", LOG_BACKUP_COUNT="2")
    ids = []
    with relay.client() as client:
        for number in range(40):
            ids.append(relay_id(send(client, content=message(f"rotation {number}"))))
    relay.wait_for_log(f"delivered id={ids[-1]} ")
    path = relay.log_file
    oldest, older = (path.with_name(f"{path.name}.{n}") for n in (2, 1))
    files = [oldest, older, path]
    assert all(file.exists() for file in files), list(path.parent.iterdir())
    assert not path.with_name(f"{path.name}.3").exists()
    for file in files:
        data = file.read_bytes()
        # Rotation comes before a line that would cross the limit; only a single line
        # longer than the limit (the start-up line can be) may stand alone above it.
        assert len(data) <= 2000 or data.count(b"\n") == 1, (file, len(data))
    logged = [found for file in files for found in
              re.findall(r" delivered id=([0-9a-f]{16}) ", file.read_text())]
    assert logged, "no delivered line kept"
    assert logged == ids[-len(logged):]  # oldest file first, none lost in between
    assert len(logged) < len(ids)  # the oldest lines went with the dropped file


def test_sighup_reopens_the_log_file_after_logrotate_moved_it(start_relay, upstream):
    relay = start_relay(upstream)
    with relay.client() as client:
        first = relay_id(send(client))
    relay.wait_for_log(f"delivered id={first} ")
    rotated = relay.log_file.with_name(relay.log_file.name + ".rotated")
    relay.log_file.rename(rotated)  # what logrotate does before its postrotate HUP
    hangup(relay)
    relay.wait_for_log(" reloaded ")  # in a new file at LOG_FILE
    with relay.client() as client:
        second = relay_id(send(client))
    new_log = relay.wait_for_log(f"delivered id={second} ")
    old_log = rotated.read_text()
    assert f"delivered id={first} " in old_log
    assert f"id={second}" not in old_log and " reloaded " not in old_log
    assert f"id={first}" not in new_log
    assert "Traceback" not in relay.stderr


def test_failed_log_reopen_keeps_logging(start_relay, upstream):
    relay = start_relay(upstream)
    log_dir = relay.log_file.parent
    moved = log_dir.with_name(log_dir.name + "-moved")
    log_dir.rename(moved)  # LOG_FILE's directory is gone: the reopen cannot succeed
    hangup(relay)
    deadline = time.monotonic() + 10
    while "log-reopen-failed" not in relay.stderr and time.monotonic() < deadline:
        time.sleep(0.05)
    with relay.client() as client:
        message_id = relay_id(send(client))
    deadline = time.monotonic() + 10
    while f"id={message_id}" not in relay.stderr and time.monotonic() < deadline:
        time.sleep(0.05)
    stderr = relay.stderr
    assert "log-reopen-failed" in stderr
    assert "Logging error" not in stderr and "Traceback" not in stderr, stderr
    # The still-open old file goes on receiving lines.
    assert f"delivered id={message_id} " in (moved / relay.log_file.name).read_text()


def test_final_reply_names_the_relay_id_logged_with_the_upstream_reply(
        default_relay, module_upstream):
    with default_relay.client() as client:
        reply = send(client)
    assert reply.startswith("250 2.0.0 Ok: queued as UP1 (smtp-relay id "), reply
    message_id = relay_id(reply)
    log = default_relay.wait_for_log(f"delivered id={message_id} ")
    [line] = [line for line in log_lines(default_relay, "delivered", log)
              if f" id={message_id} " in line]
    assert 'upstream="250 2.0.0 Ok: queued as UP1"' in line
    # The same id in the Received: header the upstream got.
    assert f" id {message_id}".encode() in module_upstream.messages[0].content


# ---------------------------------------------------------------------------------------
# 3. `python smtp_relay.py check`
# ---------------------------------------------------------------------------------------

CHECK_STEPS = ("DNS", "TCP", "banner", "EHLO", "STARTTLS", "AUTH")
CHECK_LINE = re.compile(r"^(ok  |FAIL) (\S+) +(.*)$")
FIX_LINE = re.compile(r"^ +fix: (.*)$")


@pytest.fixture(scope="module")
def check_runs(tmp_path_factory, ca, server_cert, hashes):
    """Every `check` case run side by side: {case: (exit status, stdout, stderr)}."""
    directory = tmp_path_factory.mktemp("check")
    cert_file, key_file, ca_file = server_cert
    localhost_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    localhost_context.load_cert_chain(cert_file, key_file)
    other_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("other.test").configure_cert(other_context)  # same CA, other name
    broken_users = directory / "users"
    broken_users.write_text(f"zed:{hashes['zed']}:example.com:example.com:fast\n")

    plain = Upstream()
    starttls = Upstream(starttls_context=localhost_context, require_auth=True)
    mismatched = Upstream(starttls_context=other_context)
    tls = {"RELAY_USE_TLS": "true", "RELAY_HOST": "localhost",
           "RELAY_TLS_CA_FILE": str(ca_file), "RELAY_USERNAME": UPSTREAM_USER,
           "RELAY_PASSWORD": UPSTREAM_PASSWORD}
    cases = {
        "plain-ok": (plain, {}),
        "starttls-auth-ok": (starttls, tls),
        "nothing-listening": (None, {}),
        "unknown-host": (plain, {"RELAY_HOST": "nonexistent.invalid"}),
        "no-starttls": (plain, {"RELAY_USE_TLS": "true"}),
        "untrusted-certificate": (starttls, {**tls, "RELAY_TLS_CA_FILE": ""}),
        "name-mismatch": (mismatched, {**tls, "RELAY_USERNAME": "",
                                       "RELAY_PASSWORD": ""}),
        "wrong-password": (starttls, {**tls, "RELAY_PASSWORD": WRONG_UPSTREAM_PASSWORD}),
        "ssl-on-starttls-port": (starttls, {**tls, "RELAY_USE_TLS": "false",
                                            "RELAY_USE_SSL": "true"}),
        "bad-configuration": (plain, {"RELAY_PORT": "smtp"}),
        "broken-users-file": (plain, {"SMTP_USERS_FILE": str(broken_users)}),
    }
    try:
        runs = {}
        for case, (upstream, settings) in cases.items():
            workdir = directory / case
            workdir.mkdir()
            runs[case] = (workdir, relay_env(workdir, upstream, **settings))
        results = exit_of_each(runs, args=("check",), timeout=40)
    finally:
        for server in (plain, starttls, mismatched):
            server.stop()
    return results


def check_steps(stdout: str) -> list[tuple[str, str, str, str]]:
    """[(ok|FAIL, step, detail, fix)] from check's output."""
    steps: list[tuple[str, str, str, str]] = []
    for line in stdout.splitlines():
        if match := CHECK_LINE.match(line):
            steps.append((match.group(1).strip(), match.group(2), match.group(3), ""))
        elif (match := FIX_LINE.match(line)) and steps:
            status, step, detail, _ = steps[-1]
            steps[-1] = (status, step, detail, match.group(1))
    return steps


@pytest.mark.parametrize("case", ["plain-ok",
                                  "starttls-auth-ok"])
def test_check_passes_against_a_good_upstream(check_runs, case):
    returncode, stdout, stderr = check_runs[case]
    assert returncode == 0, stdout + stderr
    assert "Traceback" not in stderr
    assert stdout.startswith("Configuration (secrets redacted):\n")
    assert "  auth_password = ***\n" in stdout
    steps = check_steps(stdout)
    assert [(status, step) for status, step, _, _ in steps] == [
        ("ok", step) for step in CHECK_STEPS], stdout
    assert stdout.rstrip().endswith("All steps passed.")
    details = {step: detail for _, step, detail, _ in steps}
    if case == "starttls-auth-ok":
        assert "  relay_password = ***\n" in stdout
        assert "TLSv1." in details["STARTTLS"]
        assert UPSTREAM_USER in details["AUTH"]


FAILING_CHECKS = [
    ("nothing-listening", "TCP", "Connection refused", "RELAY_PORT"),
    ("unknown-host", "DNS", "nonexistent.invalid", "RELAY_HOST"),
    ("no-starttls", "STARTTLS", "not offered", "RELAY_USE_SSL"),
    pytest.param("untrusted-certificate", "STARTTLS", "not trusted",
                 "RELAY_TLS_CA_FILE"),
    pytest.param("name-mismatch", "STARTTLS", "mismatch", "RELAY_HOST=localhost"),
    pytest.param("wrong-password", "AUTH", "535", "app password"),
    pytest.param("ssl-on-starttls-port", "banner", "", "RELAY_USE_TLS"),
]


@pytest.mark.parametrize(("case", "failing_step", "detail", "hint"), FAILING_CHECKS,
                         ids=[case_values(case)[0] for case in FAILING_CHECKS])
def test_check_names_the_failing_step_and_a_fix(check_runs, case, failing_step, detail,
                                                hint):
    returncode, stdout, stderr = check_runs[case]
    assert returncode == 1, stdout + stderr
    assert "Traceback" not in stderr, stderr
    steps = check_steps(stdout)
    assert steps, stdout
    *passed, (status, step, text, fix) = steps
    assert status == "FAIL", stdout
    # A TLS-first handshake failure may be reported as the TLS step of the banner.
    assert step == failing_step or (failing_step == "banner" and step == "TLS"), stdout
    index = CHECK_STEPS.index(failing_step)
    assert [(s, name) for s, name, _, _ in passed] == [
        ("ok", name) for name in CHECK_STEPS[:index]], stdout
    assert detail in text, stdout
    assert hint in fix, stdout
    if case == "name-mismatch":  # not mistaken for an unknown issuer
        assert "RELAY_TLS_CA_FILE" not in fix
    assert stdout.rstrip().endswith("The upstream is not usable yet.")


@pytest.mark.parametrize(("case", "named"), [
    ("bad-configuration", "RELAY_PORT"),
    ("broken-users-file", "SMTP_USERS_FILE line 1"),
])
def test_check_with_a_bad_configuration_exits_2_with_one_line(check_runs, case, named):
    returncode, stdout, stderr = check_runs[case]
    assert returncode == 2, stdout + stderr
    assert stdout == ""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith(CONFIG_ERROR) and named in lines[0], lines[0]


def test_check_never_prints_secrets(check_runs):
    for case, (_, stdout, stderr) in check_runs.items():
        for secret in (PASSWORD, UPSTREAM_PASSWORD, WRONG_UPSTREAM_PASSWORD):
            assert secret not in stdout + stderr, (case, secret)
    for case in ("starttls-auth-ok", "wrong-password", "untrusted-certificate"):
        assert "  relay_password = ***\n" in check_runs[case][1], case


# ---------------------------------------------------------------------------------------
# 4. SMTP_USERS_FILE
# ---------------------------------------------------------------------------------------

def user_line(hashes: dict[str, str], name: str, *fields: str) -> str:
    return ":".join([name, hashes[name], *fields])


@pytest.fixture(scope="module")
def users_relay(tmp_path_factory, module_upstream_server, hashes):
    """alice and bob with their own domains, carol with none (fallbacks), dave with
    only a rate of 1 a minute, and the env user (conftest gives it a password)."""
    directory = tmp_path_factory.mktemp("users")
    users = directory / "users"
    users.write_text("\n".join([
        "# smtp-relay users: name:hash[:senders[:recipients[:per-minute]]]",
        "",
        user_line(hashes, "alice", "alice.example", "alice-dest.example"),
        user_line(hashes, "bob", "bob.example,*.bob.example", "bob-dest.example"),
        "   " + user_line(hashes, "carol"),
        user_line(hashes, "dave", "", "", "1"),
    ]) + "\n")
    relay = start_module_relay(tmp_path_factory, module_upstream_server, "users-relay",
                               SMTP_USERS_FILE=str(users), AUTH_FAILURE_DELAY="0",
                               AUTH_MAX_FAILURES="0", **http_settings())
    yield relay
    relay.stop(signal.SIGKILL)


@pytest.mark.parametrize(("name", "own_sender", "own_recipient", "other_sender",
                          "other_recipient"), [
    ("alice", "app@alice.example", "ops@alice-dest.example", "app@bob.example",
     "ops@bob-dest.example"),
    ("bob", "app@mail.bob.example", "ops@bob-dest.example", "app@alice.example",
     "ops@alice-dest.example"),
])
def test_file_users_are_held_to_their_own_domains(users_relay, module_upstream, name,
                                                  own_sender, own_recipient,
                                                  other_sender, other_recipient):
    with login(users_relay, name, PASSWORDS[name]) as client:
        assert send(client, sender=other_sender).startswith("553 5.7.1")
        assert send(client, sender=SENDER).startswith("553 5.7.1")  # not theirs
        assert send(client, sender=own_sender,
                    recipients=(other_recipient,)).startswith("550 5.7.1")
        client.rset()
        assert send(client, sender=own_sender,
                    recipients=(RECIPIENT,)).startswith("550 5.7.1")
        client.rset()
        assert send(client, sender=own_sender,
                    recipients=(own_recipient,)).startswith("250")
    [received] = module_upstream.messages
    assert (received.mail_from, received.rcpt_tos) == (own_sender, [own_recipient])


def test_missing_fields_fall_back_to_the_allowed_domains(users_relay, module_upstream):
    with login(users_relay, "carol", PASSWORDS["carol"]) as client:
        assert send(client, sender="app@alice.example").startswith("553 5.7.1")
        assert send(client, recipients=("ops@alice-dest.example",)).startswith("550")
        client.rset()
        assert send(client, recipients=("ops@team.example.org",)).startswith("250")
        assert send(client).startswith("250")  # no rate of its own, none globally
    assert len(module_upstream.messages) == 2


def test_a_user_rate_is_its_own(users_relay, module_upstream):
    """dave:hash:::1 — empty domain fields fall back too; 1 message a minute."""
    with login(users_relay, "dave", PASSWORDS["dave"]) as client:
        assert send(client, sender="app@alice.example").startswith("553 5.7.1")
        assert send(client, recipients=("ops@team.example.org",)).startswith("250")
        assert send(client).startswith("451 4.7.1")
    with login(users_relay, "alice", PASSWORDS["alice"]) as client:
        for _ in range(3):  # RATE_LIMIT_PER_MINUTE is unset: no limit for the others
            assert send(client, sender="app@alice.example",
                        recipients=("ops@alice-dest.example",)).startswith("250")


def test_env_user_coexists_with_the_users_file(users_relay, module_upstream):
    with users_relay.client() as client:  # USER / PASSWORD from the environment
        assert send(client).startswith("250")
        assert send(client, sender="app@alice.example").startswith("553")
    assert module_upstream.messages[0].mail_from == SENDER


@pytest.mark.parametrize(("name", "password"), [
    ("alice", PASSWORDS["bob"]), ("mallory", PASSWORDS["alice"]),
    (USER, PASSWORDS["alice"]), ("alice", ""),
])
def test_wrong_file_user_credentials_are_refused(users_relay, raw_client, name,
                                                 password):
    assert auth_plain(raw_client(users_relay.port), name, password).startswith("535")


def test_log_lines_and_metrics_name_the_user(users_relay, module_upstream):
    port = http_port(users_relay)
    before = scrape(port)
    with login(users_relay, "alice", PASSWORDS["alice"]) as client:
        assert send(client, sender="app@bob.example").startswith("553")
        reply = send(client, sender="app@alice.example",
                     recipients=("ops@alice-dest.example",))
    message_id = relay_id(reply)
    log = users_relay.wait_for_log(f"delivered id={message_id} ")
    [delivered] = [line for line in log_lines(users_relay, "delivered", log)
                   if f" id={message_id} " in line]
    assert " user=alice " in delivered
    refused = log_lines(users_relay, "sender-refused", log)[-1]
    assert " user=alice " in refused and " domain=bob.example " in refused
    assert any(" user=alice " in line for line in log_lines(users_relay, "auth-ok", log))
    after = scrape(port)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("smtp_relay_messages_accepted_total", user="alice") == 1
    assert delta("smtp_relay_recipients_total", user="alice") == 1
    assert delta("smtp_relay_messages_rejected_total", reason="sender_domain",
                 user="alice") == 1
    assert delta("smtp_relay_messages_accepted_total", user=USER) == 0


def test_default_env_password_is_no_way_in_with_a_users_file(start_relay, upstream,
                                                             raw_client, tmp_path,
                                                             hashes):
    users = tmp_path / "users"
    users.write_text(user_line(hashes, "alice") + "\n")
    relay = start_relay(upstream, SMTP_AUTH_USERNAME="user",
                        SMTP_AUTH_PASSWORD="password", SMTP_USERS_FILE=str(users),
                        AUTH_FAILURE_DELAY="0")
    assert auth_plain(raw_client(relay.port), "user", "password").startswith("535")
    assert auth_plain(raw_client(relay.port), "alice",
                      PASSWORDS["alice"]).startswith("235")


# Start-up refusals: (id, users file lines or None, settings, names in the error line).
# Users files start with a comment, a blank line and a good user: the bad line is 4.
STARTUP_REFUSALS = [
    ("log-format-xml", None, {"LOG_FORMAT": "xml"}, ["LOG_FORMAT"]),
    ("name-in-file-and-env", ["alice:{alice}"], {"SMTP_AUTH_USERNAME": "alice"},
     ["SMTP_USERS_FILE", "SMTP_AUTH_USERNAME"]),
    ("bad-hash", ["alice:$2b$04$not-a-bcrypt-hash"], {}, ["SMTP_USERS_FILE line 4"]),
    ("plain-password", ["alice:alice-Pa55-word"], {}, ["SMTP_USERS_FILE line 4"]),
    ("too-many-fields", ["alice:{alice}:example.com:example.com:5:extra"], {},
     ["SMTP_USERS_FILE line 4"]),
    ("bad-sender-domain", ["alice:{alice}:not_a.domain"], {}, ["SMTP_USERS_FILE line 4"]),
    ("bad-recipient-domain", ["alice:{alice}:example.com:example..com"], {},
     ["SMTP_USERS_FILE line 4"]),
    ("non-numeric-rate", ["alice:{alice}:::fast"], {}, ["SMTP_USERS_FILE line 4"]),
    ("negative-rate", ["alice:{alice}:::-1"], {}, ["SMTP_USERS_FILE line 4"]),
    ("duplicate-name", ["zed:{alice}"], {}, ["SMTP_USERS_FILE line 4"]),
    ("name-with-space", ["al ice:{alice}"], {}, ["SMTP_USERS_FILE line 4"]),
    ("missing-file", "missing", {}, ["SMTP_USERS_FILE"]),
    ("superscript-rate", ["alice:{alice}:::\u00b2"], {},
                 ["SMTP_USERS_FILE line 4"]),
]


@pytest.fixture(scope="module")
def startup_refusals(tmp_path_factory, hashes) -> dict[str, tuple[int | None, str]]:
    """Every STARTUP_REFUSALS case started at once: {id: (exit status, stderr)}."""
    directory = tmp_path_factory.mktemp("refusals")
    runs = {}
    for case in STARTUP_REFUSALS:
        case_id, lines, settings, _ = case_values(case)
        workdir = directory / case_id
        workdir.mkdir()
        settings = dict(settings)
        if lines == "missing":
            settings["SMTP_USERS_FILE"] = str(workdir / "no-such-users-file")
        elif lines is not None:
            users = workdir / "users"
            users.write_text("\n".join(["# users", "", user_line(hashes, "zed"),
                                        *(line.format(**hashes) for line in lines)])
                             + "\n")
            settings["SMTP_USERS_FILE"] = str(users)
        runs[case_id] = (workdir, relay_env(workdir, None, **settings))
    return exit_of_each(runs)


@pytest.mark.parametrize(("case_id", "lines", "settings", "named"), STARTUP_REFUSALS,
                         ids=[case_values(case)[0] for case in STARTUP_REFUSALS])
def test_program_refuses_users_file_or_log_format(startup_refusals, case_id, lines,
                                                  settings, named):
    returncode, _, stderr = startup_refusals[case_id]
    assert returncode == 2, stderr
    error_lines = stderr.strip().splitlines()
    assert len(error_lines) == 1, stderr
    assert error_lines[0].startswith(CONFIG_ERROR), error_lines[0]
    for text in named:
        assert text in error_lines[0] and names(error_lines[0], text.split()[0]), \
            error_lines[0]


# ---------------------------------------------------------------------------------------
# 5. SIGHUP: users file reload under live sessions, deliveries in flight
# ---------------------------------------------------------------------------------------

def test_users_file_reload_under_a_live_session(start_relay, upstream, raw_client,
                                                tmp_path, hashes):
    users = tmp_path / "users"
    users.write_text(user_line(hashes, "alice", "alice.example",
                               "alice-dest.example") + "\n")
    relay = start_relay(upstream, SMTP_USERS_FILE=str(users), AUTH_FAILURE_DELAY="0",
                        AUTH_MAX_FAILURES="0")
    session = login(relay, "alice", PASSWORDS["alice"])
    try:
        # Mid-transaction when the file changes.
        assert mail(session, "app@alice.example").startswith("250")
        assert rcpt(session, "ops@alice-dest.example").startswith("250")

        # 1. alice's domains change, bob appears.
        users.write_text("\n".join([
            user_line(hashes, "alice", "alice-new.example", "new-dest.example"),
            user_line(hashes, "bob", "bob.example", "bob-dest.example")]) + "\n")
        hangup(relay)
        [reloaded] = wait_for_lines(relay, "reloaded", 1)
        assert " users=3" in reloaded  # the env user, alice, bob
        code, _ = session.data(message("in the open transaction"))
        assert code == 250
        # The open session keeps the policy alice had when it authenticated.
        assert send(session, sender="app@alice.example",
                    recipients=("ops@alice-dest.example",)).startswith("250")
        assert send(session, sender="app@alice-new.example").startswith("553")
        # A new login as alice gets the new one.
        with login(relay, "alice", PASSWORDS["alice"]) as fresh:
            assert send(fresh, sender="app@alice.example").startswith("553")
            assert send(fresh, sender="app@alice-new.example",
                        recipients=("ops@new-dest.example",)).startswith("250")
        with login(relay, "bob", PASSWORDS["bob"]) as bob:
            assert send(bob, sender="app@bob.example",
                        recipients=("ops@bob-dest.example",)).startswith("250")

        # 2. alice is removed.
        users.write_text(user_line(hashes, "bob", "bob.example", "bob-dest.example")
                         + "\n")
        hangup(relay)
        assert " users=2" in wait_for_lines(relay, "reloaded", 2)[1]
        assert auth_plain(raw_client(relay.port), "alice",
                          PASSWORDS["alice"]).startswith("535")
        assert send(session, sender="app@alice.example",
                    recipients=("ops@alice-dest.example",)).startswith("250")
        session.quit()
    finally:
        session.close()
    assert [m.mail_from for m in upstream.messages] == [
        "app@alice.example", "app@alice.example", "app@alice-new.example",
        "app@bob.example", "app@alice.example"]
    assert "Traceback" not in relay.stderr


def test_broken_users_file_on_sighup_keeps_the_old_users(start_relay, upstream,
                                                        raw_client, tmp_path, hashes):
    users = tmp_path / "users"
    users.write_text(user_line(hashes, "alice", "alice.example") + "\n")
    relay = start_relay(upstream, SMTP_USERS_FILE=str(users), AUTH_FAILURE_DELAY="0")
    users.write_text(user_line(hashes, "bob") + "\nalice:not-a-hash\n")
    hangup(relay)
    [failed] = wait_for_lines(relay, "users-reload-failed", 1)
    assert " ERROR users-reload-failed " in failed
    assert "SMTP_USERS_FILE line 2" in failed and " kept=2" in failed
    assert not log_lines(relay, "reloaded")
    with login(relay, "alice", PASSWORDS["alice"]) as client:
        assert send(client, sender="app@alice.example").startswith("250")
    assert auth_plain(raw_client(relay.port), "bob", PASSWORDS["bob"]).startswith("535")
    assert len(upstream.messages) == 1


def test_sighup_does_not_drop_a_delivery_in_flight(start_relay, upstream):
    relay = start_relay(upstream)
    upstream.handler.stall = {"DATA": 1.5}
    with relay.client() as client, concurrent.futures.ThreadPoolExecutor(1) as pool:
        assert mail(client).startswith("250")
        assert rcpt(client, RECIPIENT).startswith("250")
        delivery = pool.submit(client.data, message("in flight"))
        time.sleep(0.3)  # the message is with the upstream, which waits 1.5 s
        hangup(relay)
        relay.wait_for_log(" reloaded ")
        code, text = delivery.result(timeout=30)
    assert code == 250, text
    assert len(upstream.messages) == 1
    log = relay.wait_for_log(" delivered ")
    assert log.index(" reloaded ") < log.index(" delivered ")  # HUP came mid-delivery


# ---------------------------------------------------------------------------------------
# 6. Unit tests: parse_users_file, the JSON formatter, Metrics
# ---------------------------------------------------------------------------------------

def unit_config():
    return load_config({"SMTP_AUTH_USERNAME": USER, "SMTP_AUTH_PASSWORD": PASSWORD,
                        "ALLOWED_FROM_DOMAINS": "example.com",
                        "ALLOWED_TO_DOMAINS": "example.com,*.example.org",
                        "RATE_LIMIT_PER_MINUTE": "7", "RELAY_USE_TLS": "false"})


def test_parse_users_file_skips_comments_and_blank_lines_and_falls_back(hashes):
    config = unit_config()
    text = "\n".join([
        "# comment",
        "",
        "   ",
        "  # indented comment",
        user_line(hashes, "alice", "alice.example,*.alice.example",
                  "alice-dest.example", "12"),
        "  " + user_line(hashes, "carol") + "  ",
        user_line(hashes, "dave", "", "", ""),
        user_line(hashes, "zed", "", "zed-dest.example"),
    ])
    users = parse_users_file(text, config)
    assert list(users) == ["alice", "carol", "dave", "zed"]

    alice = users["alice"].policy
    assert alice.name == "alice"
    assert alice.allowed_from_domains.allows("alice.example")
    assert alice.allowed_from_domains.allows("mail.alice.example")
    assert not alice.allowed_from_domains.allows("example.com")
    assert alice.allowed_to_domains.allows("alice-dest.example")
    assert not alice.allowed_to_domains.allows("example.com")
    assert alice.rate_limit_per_minute == 12
    assert users["alice"].password_hash == hashes["alice"].encode()
    assert users["alice"].password == b""
    assert bcrypt.checkpw(PASSWORDS["alice"].encode(), users["alice"].password_hash)

    for name in ("carol", "dave"):
        policy = users[name].policy
        assert policy.allowed_from_domains == config.allowed_from_domains
        assert policy.allowed_to_domains == config.allowed_to_domains
        assert policy.rate_limit_per_minute is None  # RATE_LIMIT_PER_MINUTE applies
    zed = users["zed"].policy
    assert zed.allowed_from_domains == config.allowed_from_domains
    assert zed.allowed_to_domains.allows("zed-dest.example")
    assert not zed.allowed_to_domains.allows("team.example.org")

    limiter = RateLimiter(config)
    assert [text for _, text in limiter.message_limits(None)] == [
        "7 messages per minute"]
    assert [text for _, text in limiter.message_limits(12)] == [
        "12 messages per minute"]
    assert parse_users_file("# only a comment\n\n", config) == {}


@pytest.mark.parametrize("bad_line", [
    "alice", "alice:$2b$04$short", "alice:{hash}:a.example:b.example:1:extra",
    "alice:{hash}:bad domain", "alice:{hash}::b..example", "alice:{hash}:::ten",
    ":{hash}", "zed:{hash}",
])
def test_parse_users_file_names_the_bad_line(hashes, bad_line):
    text = "# users\n\n" + user_line(hashes, "zed") + "\n" + \
        bad_line.replace("{hash}", hashes["alice"]) + "\n"
    with pytest.raises(ConfigError, match=r"^SMTP_USERS_FILE line 4\b"):
        parse_users_file(text, unit_config())


def test_json_formatter_gives_a_plain_line_its_message():
    record = logging.LogRecord("smtp_relay", logging.WARNING, __file__, 1,
                               "USE_TLS is off: %s", ("plaintext",), None)
    entry = json.loads(JSONFormatter().format(record))
    assert list(entry)[:len(JSON_KEYS)] == list(JSON_KEYS)
    assert entry["event"] == "message" and entry["level"] == "WARNING"
    assert entry["message"] == "USE_TLS is off: plaintext"
    assert LOG_TIME.fullmatch(entry["time"])
    assert all(entry[key] is None for key in JSON_KEYS[3:])


def test_json_formatter_keeps_an_event_line_typed():
    record = logging.LogRecord("smtp_relay", logging.INFO, __file__, 1, "delivered", (),
                               None)
    record.event = "delivered"
    record.fields = {"id": "0123456789ab", "peer": "10.0.0.7", "user": "alice",
                     "from": "a@example.com", "to": ("b@example.com", "c@example.com"),
                     "size": 281, "upstream": "250 ok", "duration_ms": 9.5,
                     "reason": ValueError("odd\nvalue")}
    entry = json.loads(JSONFormatter().format(record))
    assert "message" not in entry
    assert entry["event"] == "delivered"
    assert entry["to"] == ["b@example.com", "c@example.com"]
    assert entry["size"] == 281 and entry["duration_ms"] == 9.5
    assert entry["reason"] == "odd\nvalue"


EXPECTED_FAMILIES = {
    "smtp_relay_connections_open", "smtp_relay_connections",
    "smtp_relay_connections_refused", "smtp_relay_auth", "smtp_relay_messages_accepted",
    "smtp_relay_messages_rejected", "smtp_relay_recipients", "smtp_relay_bytes",
    "smtp_relay_upstream_delivery_seconds", "smtp_relay_upstream_sessions_open",
    "smtp_relay_upstream_sessions_opened", "smtp_relay_upstream_sessions_reused",
    # Issue #10: the queue.
    "smtp_relay_queue_committed", "smtp_relay_queue_attempts", "smtp_relay_queue_bounces",
    "smtp_relay_queue_recipients", "smtp_relay_queue_oldest_age_seconds",
    "smtp_relay_upstream_up",
    # Issue #11: routes and MX delivery.
    "smtp_relay_upstream_host_up", "smtp_relay_mx_attempts",
    # Issue #12: replicas.
    "smtp_relay_rate_limit_storage_errors", "smtp_relay_draining",
}


def test_metrics_registry_names():
    metrics = Metrics()
    assert {family.name for family in metrics.registry.collect()} == EXPECTED_FAMILIES
    # Its own registry: a second instance does not clash, the global one stays clean.
    second = Metrics()
    assert {family.name for family in second.registry.collect()} == EXPECTED_FAMILIES
    assert b"smtp_relay" not in prometheus_client.generate_latest()

    loop = asyncio.new_event_loop()
    try:
        session = RelaySession(loop, Client(peer_ip="10.0.0.7"))
    finally:
        loop.close()
    session.user = "alice"
    metrics.rejected("rate", session)
    session.user = None
    session.client.trusted_policy = default_policy(load_config({}))
    metrics.rejected("rate", session)
    text = prometheus_client.generate_latest(metrics.registry).decode()
    samples = {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
               for family in text_string_to_metric_families(text)
               for sample in family.samples}
    assert value(samples, "smtp_relay_messages_rejected_total", reason="rate",
                 user="alice") == 1
    assert value(samples, "smtp_relay_messages_rejected_total", reason="rate",
                 user="trusted:10.0.0.7") == 1
    sample_names = {name for name, _ in samples}
    assert {"smtp_relay_connections_total", "smtp_relay_connections_open",
            "smtp_relay_upstream_delivery_seconds_count",
            "smtp_relay_upstream_sessions_opened_total",
            "smtp_relay_upstream_sessions_reused_total"} <= sample_names
