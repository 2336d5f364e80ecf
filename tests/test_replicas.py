"""Issue #12: more than one relay. The PROXY protocol (the client's real address behind
a load balancer), the drain on SIGTERM, and two replicas behind a real HAProxy sharing
one Redis (rate limits, lock-outs) and one PostgreSQL queue.

Everything is real and on loopback: haproxy and redis-server from Debian (see
replica_servers.py; REQUIRE_HAPROXY=1 / REQUIRE_REDIS=1 fail instead of skipping),
PostgreSQL from postgres_server.py. Linux routes all of 127.0.0.0/8 to loopback, so a
test client binds its own source address (127.0.0.5, ...) and the relays must name
that one, not HAProxy's 127.0.0.1.
"""

from __future__ import annotations

import base64
import concurrent.futures
import email
import signal
import smtplib
import socket
import ssl
import struct
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bcrypt
import pytest
from conftest import (
    PASSWORD,
    RECIPIENT,
    SENDER,
    SMTP_RELAY,
    USER,
    RawClient,
    RelayProcess,
    Upstream,
    exit_of_each,
    free_port,
    message,
    relay_env,
    start_module_relay,
    try_message,
)
from postgres_server import postgres_server, skip_or_fail_without_postgres
from replica_servers import Backend, haproxy, redis_server

# ---------------------------------------------------------------------------------------
# Clients that speak PROXY themselves (standing in for the load balancer)
# ---------------------------------------------------------------------------------------


def proxy_v1(source: str, port: int = 40000) -> bytes:
    family = "TCP6" if ":" in source else "TCP4"
    target = "::1" if family == "TCP6" else "127.0.0.1"
    return f"PROXY {family} {source} {target} {port} 25\r\n".encode()


def proxy_v2(source: str, port: int = 40000) -> bytes:
    """A v2 PROXY command for TCP over IPv4."""
    addresses = socket.inet_aton(source) + socket.inet_aton("127.0.0.1") + \
        struct.pack("!HH", port, 25)
    return (b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, 0x11]) +
            struct.pack("!H", len(addresses)) + addresses)


class ProxiedClient(RawClient):
    """RawClient whose connection starts with `header` (and comes from `source`)."""

    def __init__(self, port: int, header: bytes, source: str = "127.0.0.1",
                 timeout: float = 20.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout,
                                             source_address=(source, 0))
        self.sock.sendall(header)
        self.buffer = b""
        self.banner = self.reply()


def auth_plain(user: str, password: str) -> str:
    return "AUTH PLAIN " + base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def send_raw(client: RawClient, subject: str, login: bool = True) -> str:
    """EHLO, AUTH (or not), MAIL, RCPT, DATA; the first refusal or the DATA reply."""
    if login:
        client.login()
    else:
        assert client.command("EHLO raw.test").startswith("250")
    for command in (f"MAIL FROM:<{SENDER}>", f"RCPT TO:<{RECIPIENT}>"):
        reply = client.command(command)
        if not reply.startswith("250"):
            return reply
    assert client.command("DATA").startswith("354")
    return client.command(message(subject) + b".")


def closed_without_a_word(port: int, header: bytes, source: str = "127.0.0.1") -> bool:
    """Sends `header` (nothing: closes its side at once); True when the relay closes
    the connection without sending a byte."""
    with socket.create_connection(("127.0.0.1", port), timeout=20,
                                  source_address=(source, 0)) as sock:
        if header:
            sock.sendall(header)
        else:
            sock.shutdown(socket.SHUT_WR)
        try:
            return sock.recv(100) == b""
        except ConnectionResetError:
            return True


def received_header(content: bytes) -> str:
    return str(email.message_from_bytes(content)["Received"])


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def wait_until(check: Any, timeout: float = 30.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what or check}")


# ---------------------------------------------------------------------------------------
# 1. PROXY protocol on one relay
# ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def proxied(tmp_path_factory, server_cert) -> Iterator[tuple[RelayProcess, Upstream]]:
    cert_file, key_file, _ = server_cert
    upstream = Upstream()
    relay = start_module_relay(
        tmp_path_factory, upstream, "proxied", PROXY_PROTOCOL="true",
        PROXY_TRUSTED_NETWORKS="127.0.0.1/32",
        ALLOWED_CLIENT_NETWORKS="203.0.113.0/24,198.51.100.0/24",
        TRUSTED_NETWORKS="198.51.100.0/24", TRUSTED_NETWORKS_ALLOW_PUBLIC="true",
        MAX_CONNECTIONS_PER_IP="1", AUTH_MAX_FAILURES="2", AUTH_FAILURE_DELAY="0",
        SMTPS_PORT=str(free_port()), TLS_CERT_FILE=str(cert_file),
        TLS_KEY_FILE=str(key_file))
    yield relay, upstream
    relay.stop()
    upstream.stop()
    assert "Traceback" not in relay.stderr, relay.stderr


def test_the_proxy_header_names_the_client_for_every_check(proxied):
    relay, upstream = proxied
    upstream.handler.reset()
    # v1: the client's address drives ALLOWED_CLIENT_NETWORKS, Received: and the log.
    client = ProxiedClient(relay.port, proxy_v1("203.0.113.7"))
    assert client.banner.startswith("220")
    assert send_raw(client, "via v1").startswith("250")
    client.close()
    assert "from raw.test ([203.0.113.7])" in received_header(upstream.messages[-1].content)
    assert "peer=203.0.113.7" in relay.wait_for_log("delivered")
    # v2 from a TRUSTED_NETWORKS address: sends without AUTH.
    client = ProxiedClient(relay.port, proxy_v2("198.51.100.9"))
    assert send_raw(client, "via v2", login=False).startswith("250")
    client.close()
    assert "([198.51.100.9])" in received_header(upstream.messages[-1].content)
    # Outside ALLOWED_CLIENT_NETWORKS (the proxy itself, 127.0.0.1, is not checked).
    client = ProxiedClient(relay.port, proxy_v1("192.0.2.1"))
    assert client.banner.startswith("554 5.7.1")
    client.close()
    # MAX_CONNECTIONS_PER_IP counts clients, not the proxy: one each.
    first = ProxiedClient(relay.port, proxy_v1("203.0.113.8"))
    second = ProxiedClient(relay.port, proxy_v1("203.0.113.8"))
    other = ProxiedClient(relay.port, proxy_v1("203.0.113.9"))
    assert first.banner.startswith("220") and other.banner.startswith("220")
    assert second.banner.startswith("421 4.7.0 Too many connections from your address")
    for each in (first, second, other):
        each.close()
    # The AUTH lock-out is the client's: 203.0.113.20 locked, 203.0.113.21 not.
    for _ in range(2):
        client = ProxiedClient(relay.port, proxy_v1("203.0.113.20"))
        client.command("EHLO raw.test")
        client.command(auth_plain(USER, "wrong"))
        client.close()
    assert ProxiedClient(relay.port, proxy_v1("203.0.113.20")).banner.startswith("421")
    assert ProxiedClient(relay.port, proxy_v1("203.0.113.21")).banner.startswith("220")


def test_smtps_reads_the_proxy_header_before_tls(proxied, server_cert):
    relay, upstream = proxied
    upstream.handler.reset()
    smtps_port = int(relay.env["SMTPS_PORT"])
    context = ssl.create_default_context(cafile=str(server_cert[2]))
    raw = socket.create_connection(("127.0.0.1", smtps_port), timeout=20)
    raw.sendall(proxy_v2("203.0.113.30"))
    with context.wrap_socket(raw, server_hostname="localhost") as tls:
        client = smtplib.SMTP(timeout=20)
        client.sock = tls
        client.file = None
        code, _ = client.getreply()
        assert code == 220
        client.ehlo("tls.test")
        client.login(USER, PASSWORD)
        assert try_message(client, message("over smtps")).startswith("250")
        client.quit()
    assert "([203.0.113.30])" in received_header(upstream.messages[-1].content)


def test_untrusted_proxies_and_bad_headers_are_dropped(proxied):
    relay, _ = proxied
    # 127.0.0.2 is not in PROXY_TRUSTED_NETWORKS: whatever it claims, no greeting.
    assert closed_without_a_word(relay.port, proxy_v1("203.0.113.7"), "127.0.0.2")
    assert "proxy-untrusted" in relay.wait_for_log("peer=127.0.0.2")
    # From the trusted proxy: no header (SMTP at once), a broken one, none at all.
    for header in (b"EHLO client.test\r\n", b"PROXY TCP4 nonsense\r\n", b""):
        assert closed_without_a_word(relay.port, header)
    log = relay.wait_for_log("closed before a whole PROXY header")
    assert log.count("proxy-header-invalid") == 3
    smtps_port = int(relay.env["SMTPS_PORT"])
    assert closed_without_a_word(smtps_port, b"\x16\x03\x01\x00\xa5garbage\r\n")
    wait_until(lambda: relay.log().count("proxy-header-invalid") == 4, timeout=10,
               what="one line for each bad header")  # one line each, no more
    assert relay.log().count("proxy-untrusted") == 1
    assert "Traceback" not in relay.stderr


def test_start_up_errors_name_the_variable(tmp_path):
    runs = {}
    for case, overrides in {
        "no-networks": {"PROXY_PROTOCOL": "true"},
        "bad-network": {"PROXY_PROTOCOL": "true", "PROXY_TRUSTED_NETWORKS": "10.0.0/33"},
        "bad-failure": {"RATE_LIMIT_FAILURE": "sometimes"},
    }.items():
        workdir = tmp_path / case
        workdir.mkdir()
        runs[case] = (workdir, relay_env(workdir, None, **overrides))
    results = exit_of_each(runs)
    for case, variable in (("no-networks", "PROXY_TRUSTED_NETWORKS"),
                           ("bad-network", "PROXY_TRUSTED_NETWORKS"),
                           ("bad-failure", "RATE_LIMIT_FAILURE")):
        status, _, stderr = results[case]
        assert status == 2, (case, stderr)
        assert len(stderr.strip().splitlines()) == 1 and variable in stderr, stderr


# ---------------------------------------------------------------------------------------
# 2. The drain
# ---------------------------------------------------------------------------------------

def test_sigterm_drains_readyz_first_then_the_sessions(start_relay, upstream):
    http_port = free_port()
    relay = start_relay(upstream, HTTP_PORT=str(http_port), HTTP_HOST="127.0.0.1")
    assert http_get(http_port, "/readyz")[0] == 200
    busy = relay.client()  # a message begun: it may finish
    assert busy.mail(SENDER)[0] == 250 and busy.rcpt(RECIPIENT)[0] == 250
    idle = RawClient(relay.port)  # between messages: told and let go
    assert idle.command("EHLO idle.test").startswith("250")
    relay.process.send_signal(signal.SIGTERM)
    wait_until(lambda: http_get(http_port, "/readyz")[0] == 503, timeout=10,
               what="/readyz 503")
    assert "draining" in http_get(http_port, "/readyz")[1]
    assert http_get(http_port, "/healthz")[0] == 200  # alive: not to be restarted
    with pytest.raises(OSError):  # the listener is closed: the balancer goes elsewhere
        socket.create_connection(("127.0.0.1", relay.port), timeout=5).close()
    assert idle.reply().startswith("421 4.3.2")
    code, _ = busy.data(message("finished during the drain"))
    assert code == 250
    busy.close()
    assert relay.process.wait(30) == 0
    assert [m for m in upstream.messages
            if b"finished during the drain" in m.content]
    assert "Traceback" not in relay.stderr


# ---------------------------------------------------------------------------------------
# 3. Two replicas behind HAProxy, one Redis, one PostgreSQL queue
# ---------------------------------------------------------------------------------------

LIMITED_USER, LIMITED_PASSWORD, LIMIT = "limited", "limited-Pa55", 10


class Cluster:
    def __init__(self, relays: list[RelayProcess], http_ports: list[int], proxy: Any,
                 redis: Any, upstream: Upstream):
        self.relays, self.http_ports = relays, http_ports
        self.proxy, self.redis, self.upstream = proxy, redis, upstream

    def smtp(self, source: str, timeout: float = 30) -> smtplib.SMTP:
        """A client through HAProxy, from `source`."""
        client = smtplib.SMTP("127.0.0.1", self.proxy.port, timeout=timeout,
                              source_address=(source, 0))
        client.ehlo("client.test")
        return client

    def logs(self) -> list[str]:
        return [relay.log() for relay in self.relays]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[Cluster]:
    skip_or_fail_without_postgres()
    directory = tmp_path_factory.mktemp("cluster")
    users = directory / "users"
    hashed = bcrypt.hashpw(LIMITED_PASSWORD.encode(), bcrypt.gensalt(4)).decode()
    users.write_text(f"{LIMITED_USER}:{hashed}:::{LIMIT}\n")
    upstream = Upstream()
    with redis_server() as redis, postgres_server() as postgres:
        queue_url = postgres.create_database()
        http_ports = [free_port(), free_port()]
        relays: list[RelayProcess] = []
        try:
            for number, failure in enumerate(("open", "closed")):
                relays.append(start_module_relay(
                    tmp_path_factory, upstream, f"replica{number}",
                    PROXY_PROTOCOL="true", PROXY_TRUSTED_NETWORKS="127.0.0.1/32",
                    RATE_LIMIT_STORAGE=redis.url, RATE_LIMIT_FAILURE=failure,
                    RATE_LIMIT_PER_MINUTE="1000", SMTP_USERS_FILE=str(users),
                    TRUSTED_NETWORKS="127.0.0.64/26", AUTH_MAX_FAILURES="4",
                    AUTH_FAILURE_DELAY="0", DELIVERY_MODE="fallback",
                    QUEUE_URL=queue_url, QUEUE_WORKERS="4", QUEUE_LEASE_SECONDS="5",
                    QUEUE_RETRY_MIN="0.5", QUEUE_RETRY_MAX="1",
                    HTTP_HOST="127.0.0.1", HTTP_PORT=str(http_ports[number]),
                    LOG_LEVEL="INFO", SMTP_HOSTNAME=f"replica{number}.test"))
            backends = [Backend(f"r{n}", relay.port, http_ports[n])
                        for n, relay in enumerate(relays)]
            with haproxy(backends) as proxy:
                def both_up() -> bool:
                    status, csv = http_get(proxy.stats_port, "/stats;csv")
                    rows = [line.split(",") for line in csv.splitlines()]
                    return status == 200 and sum(
                        1 for row in rows if row[:1] == ["relays"]
                        and row[1] in ("r0", "r1") and row[17] == "UP") == 2
                wait_until(both_up, timeout=30, what="HAProxy to see both replicas up")
                yield Cluster(relays, http_ports, proxy, redis, upstream)
        finally:
            for relay in relays:
                relay.stop(signal.SIGKILL)
            upstream.stop()
    for relay in relays:
        assert "Traceback" not in relay.stderr, relay.stderr


def test_both_replicas_see_the_client_address_through_haproxy(cluster):
    cluster.upstream.handler.reset()
    for number in range(6):
        with cluster.smtp("127.0.0.5") as client:
            client.login(USER, PASSWORD)
            assert try_message(client, message(f"address {number}")).startswith("250")
    received = [received_header(m.content) for m in cluster.upstream.messages]
    assert len(received) == 6 and all("([127.0.0.5])" in r for r in received), received
    # leastconn spreads idle clients over both; each names the client, not HAProxy.
    assert {r.split("by ")[1].split()[0] for r in received} == {"replica0.test",
                                                                "replica1.test"}
    for log in cluster.logs():
        assert "delivered" in log and "peer=127.0.0.5" in log
        assert not [line for line in log.splitlines()
                    if "delivered" in line and "peer=127.0.0.1 " in line]


def test_a_lock_out_counts_failures_on_every_replica(cluster):
    replies = []
    for _ in range(4):  # AUTH_MAX_FAILURES, each on a new connection
        client = ProxiedClient(cluster.proxy.port, b"", "127.0.0.6")  # HAProxy adds it
        client.command("EHLO raw.test")
        replies.append(client.command(auth_plain(USER, "wrong")))
        client.close()
    assert [r[:3] for r in replies] == ["535", "535", "535", "421"], replies
    failures = [log.count("auth-failed") for log in cluster.logs()]
    assert all(count >= 1 for count in failures), failures  # spread over both
    for _ in range(2):  # locked out, whichever replica answers
        with pytest.raises(smtplib.SMTPConnectError) as refused:
            cluster.smtp("127.0.0.6")
        assert refused.value.smtp_code == 421
    with cluster.smtp("127.0.0.7") as client:  # another address is not
        client.login(USER, PASSWORD)


def test_a_rate_limit_holds_across_both_replicas_under_concurrent_load(cluster):
    start = threading.Barrier(30)

    def one(number: int) -> str:
        with cluster.smtp("127.0.0.8", timeout=60) as client:
            client.login(LIMITED_USER, LIMITED_PASSWORD)
            start.wait(30)  # every MAIL at once, on both replicas
            return try_message(client, message(f"rate {number}"))

    with concurrent.futures.ThreadPoolExecutor(30) as pool:
        replies = list(pool.map(one, range(30)))
    accepted = [r for r in replies if r.startswith("250")]
    refused = [r for r in replies if r.startswith("451 4.7.1")]
    assert len(accepted) == LIMIT and len(refused) == 30 - LIMIT, replies
    served = [sum(1 for line in log.splitlines() if "user=limited" in line)
              for log in cluster.logs()]
    assert all(served), served  # both replicas took part


def test_redis_down_follows_rate_limit_failure(cluster):
    open_relay, closed_relay = cluster.relays
    cluster.redis.stop()
    try:
        for number in range(3):  # open: relayed, one ERROR line for the outage
            client = ProxiedClient(open_relay.port, proxy_v1("127.0.0.70"))
            assert send_raw(client, f"open {number}", login=False).startswith("250")
            client.close()
        client = ProxiedClient(open_relay.port, proxy_v1("127.0.0.71"))
        client.login()  # the lock-out falls back to the replica's own count
        client.close()
        assert open_relay.log().count("rate-limit-storage-unavailable") == 1
        metrics = http_get(cluster.http_ports[0], "/metrics")[1]
        errors = [line for line in metrics.splitlines()
                  if line.startswith("smtp_relay_rate_limit_storage_errors_total")]
        assert errors and float(errors[0].split()[1]) >= 3, errors
        # closed: 451 4.3.0 for what cannot be checked, AUTH and MAIL alike.
        client = ProxiedClient(closed_relay.port, proxy_v1("127.0.0.72"))
        assert send_raw(client, "closed", login=False).startswith("451 4.3.0")
        client.close()
        client = ProxiedClient(closed_relay.port, proxy_v1("127.0.0.73"))
        client.command("EHLO raw.test")
        assert client.command(auth_plain(USER, PASSWORD)).startswith("451 4.3.0")
        client.close()
        assert closed_relay.log().count("rate-limit-storage-unavailable") == 1
    finally:
        cluster.redis.start()

    def sends(relay: RelayProcess) -> bool:
        client = ProxiedClient(relay.port, proxy_v1("127.0.0.74"))
        try:
            return send_raw(client, "after", login=False).startswith("250")
        finally:
            client.close()
    wait_until(lambda: sends(closed_relay), timeout=20, what="Redis back (closed)")
    assert "rate-limit-storage-recovered" in closed_relay.log()


def test_a_replica_killed_under_load_loses_no_acknowledged_message(cluster):
    upstream = cluster.upstream
    upstream.handler.reset()
    upstream.handler.data_reply = "451 4.3.0 try again later"  # fallback: all queued
    acknowledged: list[str] = []
    lock = threading.Lock()
    killed = threading.Event()

    def one(number: int) -> None:
        subject = f"kill {number}"
        try:
            with cluster.smtp("127.0.0.9", timeout=30) as client:
                client.login(USER, PASSWORD)
                reply = try_message(client, message(subject))
        except (smtplib.SMTPException, OSError):
            return  # cut by the kill: not acknowledged, the client would retry
        if reply.startswith("250"):
            with lock:
                acknowledged.append(subject)
                if len(acknowledged) == 12 and not killed.is_set():
                    killed.set()
                    cluster.relays[0].process.send_signal(signal.SIGKILL)

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        list(pool.map(one, range(40)))
    assert killed.is_set() and len(acknowledged) >= 20, acknowledged
    upstream.handler.data_reply = None  # the upstream is back: the queue drains

    def delivered() -> set[str]:
        return {str(email.message_from_bytes(m.content)["Subject"])
                for m in upstream.messages}
    wait_until(lambda: set(acknowledged) <= delivered(), timeout=60,
               what="every acknowledged message at the upstream")
    # The survivor delivered what the killed replica had queued: one shared queue.
    dead, survivor = (relay.log() for relay in cluster.relays)
    queued_by_dead = {line.split("id=")[1].split()[0] for line in dead.splitlines()
                      if " queued " in line and "id=" in line}
    assert queued_by_dead and any(f"delivered id={queue_id}" in survivor
                                  for queue_id in queued_by_dead)


def test_the_scale_compose_file_and_its_haproxy_config_agree():
    """docker-compose.scale.yml: HAProxy (mode tcp, send-proxy-v2, leastconn, /readyz
    checks) trusted by two relays that share Redis and PostgreSQL."""
    import yaml

    from relay.settings import load_config
    project = Path(SMTP_RELAY).parent
    compose = yaml.safe_load((project / "docker-compose.scale.yml").read_text())
    config = (project / "deploy" / "haproxy.cfg").read_text()
    for needed in ("mode tcp", "send-proxy-v2", "balance leastconn",
                   "option httpchk GET /readyz", "http-check expect status 200",
                   "server relay1 relay1:1025", "server relay2 relay2:1025"):
        assert needed in config, needed
    services = compose["services"]
    assert {"haproxy", "relay1", "relay2", "redis", "postgres"} <= set(services)
    balancer = services["haproxy"]["networks"]["relays"]["ipv4_address"]
    assert any("haproxy.cfg" in volume for volume in services["haproxy"]["volumes"])
    for name in ("relay1", "relay2"):
        settings = load_config({k: str(v) for k, v in
                                services[name]["environment"].items()})
        assert settings.proxy_protocol and settings.rate_limit_storage.startswith("redis")
        assert settings.queue_url.startswith("postgresql://")
        assert settings.delivery_mode in ("queue", "fallback")
        assert [str(n) for n in settings.proxy_trusted_networks] == [f"{balancer}/32"]
        assert settings.http_port == 8080  # haproxy.cfg's `check port 8080`
