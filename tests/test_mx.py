"""Direct MX delivery (issue #11, relay/mx.py) against real servers: a DNS server of our
own on loopback (tests/dns_server.py), MX hosts on 127.0.0.2-127.0.0.4 (Linux routes
all of 127/8 to loopback) with STARTTLS certificates from trustme, and an MTA-STS
policy served over HTTPS on 127.0.0.5:443.

Most cases drive relay.mx.MXDeliverer in this process (real sockets, real DNS); one
runs the relay itself in queue mode with `* mx`.
"""

from __future__ import annotations

import http.server
import socket
import ssl
import threading
import time
import warnings
from typing import ClassVar

import pytest
from aiosmtpd.controller import Controller
from conftest import (
    RECIPIENT,
    SENDER,
    Upstream,
    UpstreamHandler,
    free_port,
    message,
    try_message,
)
from dns_server import DNSServer

from relay.mx import MXDeliverer, parse_sts_policy
from relay.settings import load_config
from relay.store import Store

MX_NAMES = ("mx1.dest.test", "mx2.dest.test", "mx1.sts.test", "mx2.sts.test",
            "plain.test")


def common_port(*hosts: str) -> int:
    """A port free on every one of `hosts` (MX_PORT is one port for all MX hosts)."""
    for _ in range(50):
        port = free_port(hosts[0])
        try:
            for host in hosts[1:]:
                with socket.socket() as sock:
                    sock.bind((host, port))
        except OSError:
            continue
        return port
    raise AssertionError("no common free port")


@pytest.fixture(scope="module")
def dns_server():
    server = DNSServer()
    yield server
    server.close()


@pytest.fixture
def dns(dns_server) -> DNSServer:
    dns_server.clear()
    return dns_server


@pytest.fixture(scope="module")
def mx_port() -> int:
    return common_port("127.0.0.2", "127.0.0.3", "127.0.0.4")


@pytest.fixture(scope="module")
def mx_tls(ca, tmp_path_factory):
    """(context for the MX names, context for a name nobody asks for, CA file, and
    (certificate file, key file) for the MX names)."""
    directory = tmp_path_factory.mktemp("mx-certs")
    contexts = []
    for names in (MX_NAMES, ("wrong.test",)):
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert(*names).configure_cert(context)
        contexts.append(context)
    ca_file = directory / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    pair = ca.issue_cert(*MX_NAMES)
    cert_file, key_file = directory / "mx.crt", directory / "mx.key"
    pair.cert_chain_pems[0].write_to_path(str(cert_file))
    pair.private_key_pem.write_to_path(str(key_file))
    return contexts[0], contexts[1], str(ca_file), (str(cert_file), str(key_file))


@pytest.fixture
def mx_servers(mx_port):
    started: list[Upstream] = []

    def start(host: str, context: ssl.SSLContext | None) -> Upstream:
        server = Upstream(host=host, port=mx_port, starttls_context=context, name=host)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def deliverer(dns: DNSServer, mx_port: int, ca_file: str, **overrides: str
              ) -> MXDeliverer:
    env = {"DNS_RESOLVERS": dns.address, "MX_PORT": str(mx_port),
           "MX_ALLOW_PRIVATE": "true", "RELAY_TLS_CA_FILE": ca_file,
           "SMTP_HOSTNAME": "relay.example.net", "TIMEOUT": "5", **overrides}
    return MXDeliverer(load_config(env), executor=None)  # type: ignore[arg-type]


BODY = b"From: app@example.com\r\nSubject: mx\r\n\r\nHello.\r\n"


def test_mx_hosts_in_preference_order_a_dead_first_host_and_verified_tls(
        dns, mx_port, mx_tls, mx_servers):
    dns.add("dest.test", "MX", "10 mx1.dest.test.", "20 mx2.dest.test.")
    dns.add("mx1.dest.test", "A", "127.0.0.2")  # nothing listens there
    dns.add("mx2.dest.test", "A", "127.0.0.3")
    second = mx_servers("127.0.0.3", mx_tls[0])
    outcomes, info = deliverer(dns, mx_port, mx_tls[2]).deliver_blocking(
        "dest.test", SENDER, ["a@dest.test", "b@dest.test"], BODY)
    assert all(code == 250 for code, _ in outcomes.values()), outcomes
    assert info["a@dest.test"].upstream == f"mx2.dest.test[127.0.0.3]:{mx_port}"
    assert info["a@dest.test"].tls == "verified"
    assert [m.rcpt_tos for m in second.messages] == [["a@dest.test", "b@dest.test"]]


def test_equal_preferences_are_shuffled(dns, mx_port, mx_tls, mx_servers):
    dns.add("dest.test", "MX", "10 mx1.dest.test.", "10 mx2.dest.test.")
    dns.add("mx1.dest.test", "A", "127.0.0.2")
    dns.add("mx2.dest.test", "A", "127.0.0.3")
    first, second = mx_servers("127.0.0.2", None), mx_servers("127.0.0.3", None)
    relay = deliverer(dns, mx_port, mx_tls[2])
    for _ in range(16):  # both stay unused with a chance of 2 in 65536
        outcomes, _ = relay.deliver_blocking("dest.test", SENDER, ["a@dest.test"], BODY)
        assert outcomes["a@dest.test"][0] == 250
    assert first.messages and second.messages


def test_no_mx_means_the_domains_own_address_and_tls_is_recorded_unverified(
        dns, mx_port, mx_tls, mx_servers):
    dns.add("plain.test", "A", "127.0.0.4")
    server = mx_servers("127.0.0.4", mx_tls[1])  # a certificate for another name
    outcomes, info = deliverer(dns, mx_port, mx_tls[2]).deliver_blocking(
        "plain.test", SENDER, ["a@plain.test"], BODY)
    assert outcomes["a@plain.test"][0] == 250
    assert info["a@plain.test"].tls == "unverified"  # MX_TLS=may: delivered anyway
    assert len(server.messages) == 1


def test_null_mx_nxdomain_and_servfail(dns, mx_port, mx_tls):
    dns.add("null.test", "MX", "0 .")
    dns.add("known.test", "A", "127.0.0.9")
    dns.servfail.add("broken.test")
    relay = deliverer(dns, mx_port, mx_tls[2])
    null, _ = relay.deliver_blocking("null.test", SENDER, ["a@null.test"], BODY)
    assert null["a@null.test"][0] == 556 and null["a@null.test"][1].startswith("5.1.10")
    missing, _ = relay.deliver_blocking("nx.known.test", SENDER, ["a@nx.known.test"],
                                        BODY)
    assert missing["a@nx.known.test"][0] == 550, missing
    broken, _ = relay.deliver_blocking("broken.test", SENDER, ["a@broken.test"], BODY)
    assert broken["a@broken.test"][0] == 451, broken  # temporary: retried later
    assert "SERVFAIL" in broken["a@broken.test"][1]


def test_private_and_loopback_addresses_are_refused_by_default(
        dns, mx_port, mx_tls, mx_servers):
    dns.add("dest.test", "MX", "10 mx1.dest.test.")
    dns.add("mx1.dest.test", "A", "127.0.0.2")
    server = mx_servers("127.0.0.2", None)
    outcomes, _ = deliverer(dns, mx_port, mx_tls[2], MX_ALLOW_PRIVATE="false") \
        .deliver_blocking("dest.test", SENDER, ["a@dest.test"], BODY)
    code, text = outcomes["a@dest.test"]
    assert code == 550 and "MX_ALLOW_PRIVATE" in text
    assert not server.handler.mail_commands  # never even connected to MAIL


def test_mx_tls_verify_and_encrypt(dns, mx_port, mx_tls, mx_servers):
    dns.add("dest.test", "MX", "10 mx1.dest.test.", "20 mx2.dest.test.")
    dns.add("mx1.dest.test", "A", "127.0.0.2")
    dns.add("mx2.dest.test", "A", "127.0.0.3")
    wrong_name = mx_servers("127.0.0.2", mx_tls[1])
    no_tls = mx_servers("127.0.0.3", None)
    verify = deliverer(dns, mx_port, mx_tls[2], MX_TLS="verify")
    outcomes, _ = verify.deliver_blocking("dest.test", SENDER, ["a@dest.test"], BODY)
    code, text = outcomes["a@dest.test"]
    assert code == 451, outcomes  # both hosts tried, neither good enough: deferred
    assert "not verified" in text and "STARTTLS not offered" in text
    outcomes, info = deliverer(dns, mx_port, mx_tls[2], MX_TLS="encrypt") \
        .deliver_blocking("dest.test", SENDER, ["a@dest.test"], BODY)
    assert outcomes["a@dest.test"][0] == 250 and info["a@dest.test"].tls == "unverified"
    assert len(wrong_name.messages) == 1 and not no_tls.messages


def test_mx_tls_may_retries_in_clear_after_a_failed_handshake(dns, mx_port, mx_tls):
    """STARTTLS offered, the handshake fails (the server speaks only TLS 1.1, we at
    least 1.2): Postfix's `may` delivers in clear on a new connection."""
    dns.add("old.test", "MX", "10 mx1.dest.test.")
    dns.add("mx1.dest.test", "A", "127.0.0.2")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with warnings.catch_warnings():  # deprecated: which is the point here
        warnings.simplefilter("ignore", DeprecationWarning)
        context.maximum_version = ssl.TLSVersion.TLSv1_1
    context.load_cert_chain(*mx_tls[3])
    handler = UpstreamHandler()
    controller = Controller(handler, hostname="127.0.0.2", port=mx_port,
                            tls_context=context, require_starttls=False,
                            ready_timeout=10)
    controller.start()
    try:
        outcomes, info = deliverer(dns, mx_port, mx_tls[2]).deliver_blocking(
            "old.test", SENDER, ["a@old.test"], BODY)
        assert outcomes["a@old.test"][0] == 250, outcomes
        assert info["a@old.test"].tls == "none"
        assert len(handler.messages) == 1
        outcomes, _ = deliverer(dns, mx_port, mx_tls[2], MX_TLS="encrypt") \
            .deliver_blocking("old.test", SENDER, ["a@old.test"], BODY)
        assert outcomes["a@old.test"][0] == 451 and "TLS handshake failed" in \
            outcomes["a@old.test"][1]
    finally:
        controller.stop()


class PolicyHandler(http.server.BaseHTTPRequestHandler):
    policy: ClassVar[bytes] = b""
    requests: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        PolicyHandler.requests.append(f"{self.headers['Host']}{self.path}")
        if self.path != "/.well-known/mta-sts.txt":
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(self.policy)))
        self.end_headers()
        self.wfile.write(self.policy)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def policy_server(ca):
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("mta-sts.sts.test").configure_cert(context)
    try:
        server = http.server.ThreadingHTTPServer(("127.0.0.5", 443), PolicyHandler)
    except OSError as error:  # not root, or 443 taken on 127.0.0.5
        pytest.skip(f"cannot serve HTTPS on 127.0.0.5:443: {error}")
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    PolicyHandler.requests = []
    yield PolicyHandler
    server.shutdown()
    server.server_close()


def test_mta_sts_enforce_limits_delivery_to_the_listed_mx_and_is_cached(
        dns, mx_port, mx_tls, mx_servers, policy_server):
    policy_server.policy = (b"version: STSv1\r\nmode: enforce\r\nmx: mx2.sts.test\r\n"
                            b"max_age: 86400\r\n")
    dns.add("sts.test", "MX", "10 mx1.sts.test.", "20 mx2.sts.test.")
    dns.add("mx1.sts.test", "A", "127.0.0.2")
    dns.add("mx2.sts.test", "A", "127.0.0.3")
    dns.add("_mta-sts.sts.test", "TXT", '"v=STSv1; id=20260101"')
    dns.add("mta-sts.sts.test", "A", "127.0.0.5")
    preferred, listed = mx_servers("127.0.0.2", mx_tls[0]), mx_servers("127.0.0.3",
                                                                      mx_tls[0])
    relay = deliverer(dns, mx_port, mx_tls[2], MX_MTA_STS="true")
    for _ in range(2):
        outcomes, info = relay.deliver_blocking("sts.test", SENDER, ["a@sts.test"], BODY)
        assert outcomes["a@sts.test"][0] == 250, outcomes
        assert info["a@sts.test"].upstream.startswith("mx2.sts.test")
        assert info["a@sts.test"].tls == "verified"
    assert not preferred.messages and len(listed.messages) == 2
    assert policy_server.requests == ["mta-sts.sts.test/.well-known/mta-sts.txt"]  # cached
    # Without MTA-STS the preferred host takes it.
    outcomes, info = deliverer(dns, mx_port, mx_tls[2]).deliver_blocking(
        "sts.test", SENDER, ["a@sts.test"], BODY)
    assert info["a@sts.test"].upstream.startswith("mx1.sts.test")


def test_sts_policy_parsing_and_mx_patterns():
    policy = parse_sts_policy("version: STSv1\nmode: enforce\nmx: *.example.net\n"
                              "mx: mail.example.org\nmax_age: 600\n", "1", time.time())
    assert policy is not None and policy.mode == "enforce" and policy.max_age == 600
    assert policy.allows("mx1.example.net") and policy.allows("mail.example.org.")
    assert not policy.allows("a.b.example.net") and not policy.allows("example.net")
    assert parse_sts_policy("version: STSv2\nmode: enforce\n", "1", 0) is None
    assert parse_sts_policy("version: STSv1\nmode: strict\n", "1", 0) is None


def test_the_relay_delivers_by_mx_from_the_queue_one_domain_deferred(
        start, dns, mx_port, mx_tls, mx_servers, tmp_path):
    """End to end: `* mx` in queue mode, two recipient domains, one of whose MX hosts
    are all down: that recipient is deferred, the other delivered, both logged with
    the host and the TLS outcome."""
    dns.add("dest.test", "MX", "10 mx2.dest.test.")
    dns.add("mx2.dest.test", "A", "127.0.0.3")
    dns.add("down.test", "MX", "10 mx1.dest.test.")
    dns.add("mx1.dest.test", "A", "127.0.0.2")  # nothing listens there
    server = mx_servers("127.0.0.3", mx_tls[0])
    routes = tmp_path / "routes"
    routes.write_text("# everything direct\n*   mx\n")
    relay = start(None, DELIVERY_MODE="queue", ROUTES_FILE=str(routes),
                  DNS_RESOLVERS=dns.address, MX_PORT=str(mx_port), MX_ALLOW_PRIVATE="true",
                  RELAY_TLS_CA_FILE=mx_tls[2], ALLOWED_TO_DOMAINS="dest.test,down.test",
                  QUEUE_URL=f"sqlite:///{tmp_path / 'queue.db'}", SMTP_HOSTNAME="relay",
                  BOUNCE_TO="none")
    client = relay.client()
    try:
        reply = try_message(client, message(), ("a@dest.test", "b@down.test"))
    finally:
        client.quit()
    assert reply.startswith("250"), reply
    relay.wait_for_log(" deferred id=")
    log = relay.wait_for_log(" delivered id=")
    assert [m.rcpt_tos for m in server.messages] == [["a@dest.test"]]
    delivered = next(line for line in log.splitlines() if " delivered id=" in line)
    assert "tls=verified" in delivered and "mx2.dest.test[127.0.0.3]" in delivered
    deferred = next(line for line in log.splitlines() if " deferred id=" in line)
    assert "b@down.test" in deferred and "no MX host of down.test" in deferred
    # The queue's record (the API, `queue show`) names the host and the TLS outcome.
    queue_id = reply.split()[-1]
    store = Store.open(f"sqlite:///{tmp_path / 'queue.db'}")
    try:
        deadline = time.monotonic() + 10  # the log line comes just before the record
        while True:
            record = store.show(queue_id)
            assert record is not None
            attempts = {a.recipient: a for a in record.attempts}
            if len(attempts) == 2 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    finally:
        store.close()
    assert attempts["a@dest.test"].upstream == \
        f"mx2.dest.test[127.0.0.3]:{mx_port} (verified)"
    assert attempts["a@dest.test"].tls and not attempts["b@down.test"].tls
    # An unqualified SMTP_HOSTNAME in MX mode is warned about at start.
    assert "does not look fully qualified" in relay.stderr + relay.log()
    assert RECIPIENT not in log


def test_fallback_forwards_one_route_synchronously_and_queues_the_others(
        start, upstream, dns, mx_port, mx_tls, mx_servers, tmp_path):
    """fallback with `to:dest.test mx`: the MAIL waits for the first recipient; its
    route (a domain's MX, or RELAY_HOST) gets the message synchronously, recipients
    on other routes go through the queue. A null-MX domain is refused at RCPT."""
    dns.add("dest.test", "MX", "10 mx2.dest.test.")
    dns.add("mx2.dest.test", "A", "127.0.0.3")
    dns.add("null.test", "MX", "0 .")
    server = mx_servers("127.0.0.3", mx_tls[0])
    routes = tmp_path / "routes"
    routes.write_text("to:dest.test  mx\nto:null.test  mx\n")
    relay = start(upstream, DELIVERY_MODE="fallback", ROUTES_FILE=str(routes),
                  DNS_RESOLVERS=dns.address, MX_PORT=str(mx_port), MX_ALLOW_PRIVATE="true",
                  RELAY_TLS_CA_FILE=mx_tls[2],
                  ALLOWED_TO_DOMAINS="example.com,dest.test,null.test",
                  QUEUE_URL=f"sqlite:///{tmp_path / 'queue.db'}",
                  SMTP_HOSTNAME="relay.example.net", BOUNCE_TO="none")
    client = relay.client()
    try:
        reply = try_message(client, message(), ("a@dest.test",))
        assert reply.startswith("250") and "queued as UP1" in reply, reply  # the MX's
        reply = try_message(client, message(), ("b@dest.test", RECIPIENT))
        assert reply.startswith("250"), reply
        assert try_message(client, message(), (RECIPIENT, "c@dest.test")) \
            .startswith("250")
        client.rset()
        reply = try_message(client, message(), ("a@null.test",))
        assert reply.startswith("556 5.1.10"), reply
    finally:
        client.quit()
    log = relay.wait_for_log(f"to={RECIPIENT} attempts=1")
    relay.wait_for_log("to=c@dest.test attempts=1")
    assert "event=mx-session" in log or " mx-session " in log
    assert "tls=verified" in log.split(" mx-session ", 1)[1].split("\n")[0]
    assert sorted(m.rcpt_tos[0] for m in server.messages) == \
        ["a@dest.test", "b@dest.test", "c@dest.test"]
    assert [m.rcpt_tos for m in upstream.messages] == [[RECIPIENT], [RECIPIENT]]
    assert "does not look fully qualified" not in relay.stderr + relay.log()
