"""Routes and failover (issue #11) through the relay itself: RELAY_HOST lists, routes by
user, sender domain and recipient domain (ROUTES_FILE and the users file), a message
split across two upstreams in fallback and queue mode, /readyz, /metrics and `check`
per host, SIGHUP, and the start-up errors. Real upstreams on loopback throughout.
"""

from __future__ import annotations

import urllib.request
from pathlib import Path

import bcrypt
import pytest
from conftest import (
    PASSWORD,
    RECIPIENT,
    SENDER,
    Upstream,
    exit_of_each,
    free_port,
    hangup,
    message,
    relay_env,
    try_message,
)

from relay.routes import MX, RouteTable, SmartHost, parse_destination, parse_routes
from relay.settings import ConfigError, load_config

PARTNER = "bob@partner.example"
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_get(port: int, path: str) -> tuple[int, str]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    try:
        with _OPENER.open(request, timeout=20) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.read().decode()


def send(relay, recipients=(RECIPIENT,), sender=SENDER, user=None, password=PASSWORD):
    client = relay.client(login=user is None)
    try:
        if user is not None:
            client.login(user, password)
        return try_message(client, message(), tuple(recipients), sender)
    finally:
        client.quit()


@pytest.fixture
def two(make_upstream) -> tuple[Upstream, Upstream]:
    return make_upstream(), make_upstream()


# --- parsing ---------------------------------------------------------------------------

def test_route_lines_parse_with_the_allowlists_rules(monkeypatch):
    monkeypatch.setenv("MG_PASSWORD", "mg-secret")
    routes = parse_routes(
        "# match  upstream\n"
        "user:billing  smtp://billing-user@smtp.mailgun.org:587?tls=starttls"
        "&password_env=MG_PASSWORD\n"
        "from:*.shop.example   smtps://email-smtp.eu-west-1.amazonaws.com  # SES\n"
        "to:partner.example    smtp://mx.partner.example:25?tls=none\n\n"
        "*  mx\n")
    assert [route.kind for route in routes] == ["user", "from", "to", "*"]
    billing = routes[0].destination
    assert isinstance(billing, SmartHost)
    assert billing.hosts == (("smtp.mailgun.org", 587),) and billing.tls == "starttls"
    assert billing.username == "billing-user" and billing.password == "mg-secret"
    assert "mg-secret" not in repr(billing)
    ses = routes[1].destination
    assert isinstance(ses, SmartHost) and ses.tls == "smtps" and ses.hosts[0][1] == 465
    assert routes[1].domains is not None and routes[1].domains.allows("eu.shop.example")
    assert not routes[1].domains.allows("shop.example")  # `*.`: subdomains only
    assert routes[3].destination is MX
    failover = parse_destination("smtp://a.example,b.example:2525?tls=none&verify=false",
                                 "test")
    assert isinstance(failover, SmartHost)
    assert failover.hosts == (("a.example", 25), ("b.example", 2525))


def test_the_readmes_routes_example_parses(monkeypatch):
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    example = readme.split("**Routes.**", 1)[1].split("```\n", 2)[1]
    monkeypatch.setenv("GMAIL_APP_PASSWORD", "gmail-app-password")
    monkeypatch.setenv("SES_SMTP_PASSWORD", "ses-password")
    routes = parse_routes(example)
    assert [route.kind for route in routes] == ["user", "from", "from", "to", "user"]
    gmail = routes[0].destination
    assert isinstance(gmail, SmartHost) and gmail.username == "billing@example.com"
    assert routes[3].destination is MX


@pytest.mark.parametrize(("line", "expected"), [
    ("user:x smtp://u:inline-pw@host", "never written in the URL"),
    ("user:x http://host", "expects smtp://"),
    ("user:x smtp://host?tls=maybe", "tls='maybe'"),
    ("user:x smtp://u@host?tls=none&password_env=SET_PW", "never sent in clear"),
    ("user:x smtp://u@host?password_env=UNSET_PW", "UNSET_PW"),
    ("user:x smtp://host?colour=red", "unknown option"),
    ("mail:x mx", "expects user:NAME"),
    ("to:partner.example", "separated by spaces"),
])
def test_bad_route_lines_name_the_line_and_never_the_password(monkeypatch, line, expected):
    monkeypatch.setenv("SET_PW", "set-secret")
    monkeypatch.delenv("UNSET_PW", raising=False)
    with pytest.raises(ConfigError) as raised:
        parse_routes("# first\n" + line + "\n")
    assert "ROUTES_FILE line 2" in str(raised.value)
    assert expected in str(raised.value)
    assert "inline-pw" not in str(raised.value) and "set-secret" not in str(raised.value)


def test_first_match_wins_and_mail_time_routes_are_known_at_mail(tmp_path):
    routes = tmp_path / "routes"
    routes.write_text("from:shop.example smtp://a.example?tls=none\n"
                      "to:partner.example smtp://b.example?tls=none\n"
                      "user:alice smtp://c.example?tls=none\n")
    table = RouteTable(load_config({"ROUTES_FILE": str(routes),
                                    "DELIVERY_MODE": "fallback"}))
    a, b = table.routes[0].destination, table.routes[1].destination
    assert table.at_mail(None, "x@shop.example") == a  # before any to: line: known
    assert table.for_recipient(None, "x@shop.example", PARTNER) == a
    assert table.at_mail("alice", "x@example.com") is None  # the to: line comes first
    assert table.for_recipient("alice", "x@example.com", PARTNER) == b
    assert table.for_recipient("alice", "x@example.com", RECIPIENT) == \
        table.routes[2].destination
    assert table.for_recipient(None, "x@example.com", RECIPIENT) == table.default
    assert table.needs_split()


# --- failover --------------------------------------------------------------------------

def test_relay_host_list_fails_over_and_readyz_and_metrics_show_each_host(
        start, upstream):
    dead = free_port()
    http = free_port()
    relay = start(upstream, RELAY_HOST=f"127.0.0.1:{dead},127.0.0.1:{upstream.port}",
                  HTTP_HOST="127.0.0.1", HTTP_PORT=str(http))
    for _ in range(2):  # the second skips the dead host (tried last for a while)
        assert send(relay).startswith("250"), relay.log()
    assert len(upstream.messages) == 2
    status, body = http_get(http, "/readyz")
    assert status == 200, body
    assert f"host 127.0.0.1:{dead}: upstream not ready" in body
    assert f"host 127.0.0.1:{upstream.port}: upstream answered" in body
    _, metrics = http_get(http, "/metrics")
    assert f'smtp_relay_upstream_host_up{{host="127.0.0.1:{dead}"}} 0.0' in metrics
    assert f'smtp_relay_upstream_host_up{{host="127.0.0.1:{upstream.port}"}} 1.0' \
        in metrics


def test_failover_on_a_421_greeting(start, make_upstream, raw_client):
    closing, good = make_upstream(), make_upstream()
    closing.handler.mail_reply = "421 4.3.2 shutting down"
    relay = start(closing, RELAY_HOST=f"127.0.0.1:{closing.port},127.0.0.1:{good.port}")
    assert send(relay).startswith("250"), relay.log()
    assert len(good.messages) == 1 and not closing.messages


def test_every_host_down_is_one_451_naming_each(start):
    first, second = free_port(), free_port()
    relay = start(None, RELAY_HOST=f"127.0.0.1:{first},127.0.0.1:{second}")
    reply = send(relay)
    assert reply.startswith("451"), reply
    assert f"127.0.0.1:{first}" in reply and f"127.0.0.1:{second}" in reply


# --- routes in sync mode (known at MAIL) -----------------------------------------------

def test_routes_by_user_from_the_users_file_and_by_sender_domain(start, make_upstream,
                                                                 tmp_path):
    default, billing, shop = make_upstream(), make_upstream(), make_upstream()
    users = tmp_path / "users"
    hashed = bcrypt.hashpw(b"billing-pw", bcrypt.gensalt(4)).decode()
    users.write_text(f"billing:{hashed}:::"
                     f":smtp://127.0.0.1:{billing.port}?tls=none\n")
    routes = tmp_path / "routes"
    routes.write_text(f"from:shop.example  smtp://127.0.0.1:{shop.port}?tls=none\n")
    relay = start(default, SMTP_USERS_FILE=str(users), ROUTES_FILE=str(routes),
                  SMTP_AUTH_PASSWORD=PASSWORD + "-own",
                  ALLOWED_FROM_DOMAINS="example.com,shop.example")
    assert send(relay, password=PASSWORD + "-own", user="relayuser").startswith("250")
    assert send(relay, sender="x@shop.example", user="relayuser",
                password=PASSWORD + "-own").startswith("250")
    assert send(relay, user="billing", password="billing-pw").startswith("250")
    assert [m.mail_from for m in default.messages] == [SENDER]
    assert [m.mail_from for m in shop.messages] == ["x@shop.example"]
    assert [m.mail_from for m in billing.messages] == [SENDER]


def test_a_route_refusing_the_sender_is_the_clients_verdict(start, make_upstream,
                                                            tmp_path):
    default, shop = make_upstream(), make_upstream()
    shop.handler.mail_reply = "550 5.7.1 not this sender"
    routes = tmp_path / "routes"
    routes.write_text(f"from:shop.example  smtp://127.0.0.1:{shop.port}?tls=none\n")
    relay = start(default, ROUTES_FILE=str(routes),
                  ALLOWED_FROM_DOMAINS="example.com,shop.example")
    assert send(relay, sender="x@shop.example").startswith("550 5.7.1 not this sender")
    assert not default.handler.mail_commands


# --- routes by recipient: the split ----------------------------------------------------

def split_relay(start, tmp_path, default, partner, mode, **extra):
    routes = tmp_path / f"routes-{mode}"
    routes.write_text(f"to:partner.example  smtp://127.0.0.1:{partner.port}?tls=none\n")
    return start(default, ROUTES_FILE=str(routes), DELIVERY_MODE=mode,
                 ALLOWED_TO_DOMAINS="example.com,partner.example",
                 QUEUE_URL=f"sqlite:///{tmp_path / f'{mode}.db'}", QUEUE_RETRY_MIN="60",
                 BOUNCE_TO="none", **extra)


def test_fallback_splits_a_message_and_forwards_one_route_synchronously(
        start, two, tmp_path):
    default, partner = two
    relay = split_relay(start, tmp_path, default, partner, "fallback")
    # All recipients on one route: forwarded synchronously, the upstream's own 250.
    reply = send(relay, (RECIPIENT,))
    assert reply.startswith("250") and "queued as UP1" in reply, reply
    reply = send(relay, (PARTNER,))
    assert reply.startswith("250") and "queued as UP1" in reply, reply
    # Split: the first recipient's route goes synchronously, the other via the queue.
    reply = send(relay, (RECIPIENT, PARTNER))
    assert reply.startswith("250"), reply
    relay.wait_for_log(f"to={PARTNER} attempts=1")
    assert [m.rcpt_tos for m in default.messages] == [[RECIPIENT], [RECIPIENT]]
    assert [m.rcpt_tos for m in partner.messages] == [[PARTNER], [PARTNER]]


def test_queue_splits_a_message_and_one_destination_defers(start, two, tmp_path):
    default, partner = two
    partner.handler.rcpt_replies[PARTNER] = "451 4.2.0 try later"
    relay = split_relay(start, tmp_path, default, partner, "queue")
    assert send(relay, (RECIPIENT, PARTNER)).startswith("250")
    log = relay.wait_for_log(" deferred id=")
    relay.wait_for_log(" delivered id=")
    assert [m.rcpt_tos for m in default.messages] == [[RECIPIENT]]
    assert not partner.messages
    deferred = next(line for line in log.splitlines() if " deferred id=" in line)
    assert PARTNER in deferred and "451 4.2.0 try later" in deferred
    assert f"host=127.0.0.1:{partner.port}" in deferred


def test_sighup_rereads_the_routes_file(start, two, tmp_path):
    default, partner = two
    relay = split_relay(start, tmp_path, default, partner, "fallback")
    routes = tmp_path / "routes-fallback"
    routes.write_text("to:partner.example  smtp://u:inline@host\n")  # refused: kept
    hangup(relay)
    relay.wait_for_log("routes-reload-failed")
    assert "inline" not in relay.log().split("routes-reload-failed", 1)[1].split("\n")[0]
    routes.write_text(f"to:example.com  smtp://127.0.0.1:{partner.port}?tls=none\n")
    hangup(relay)
    relay.wait_for_log("routes=1")
    assert send(relay, (RECIPIENT,)).startswith("250")
    assert [m.rcpt_tos for m in partner.messages] == [[RECIPIENT]]


def test_sighup_in_sync_mode_refuses_routes_that_would_split(start, upstream, tmp_path):
    routes = tmp_path / "routes"
    routes.write_text("")
    relay = start(upstream, ROUTES_FILE=str(routes))
    routes.write_text("to:partner.example  mx\n")
    hangup(relay)
    log = relay.wait_for_log("routes-reload-failed")
    assert "DELIVERY_MODE" in log
    assert send(relay).startswith("250")  # the old routes (none) still apply
    assert len(upstream.messages) == 1


# --- check and the start-up errors -----------------------------------------------------

def test_check_tries_each_host_of_each_destination(tmp_path, upstream):
    dead = free_port()
    routes = tmp_path / "routes"
    routes.write_text(f"user:billing  smtp://127.0.0.1:{upstream.port}?tls=none\n")
    env = relay_env(tmp_path, upstream, RELAY_HOST=f"127.0.0.1:{dead},127.0.0.1:"
                    f"{upstream.port}", ROUTES_FILE=str(routes))
    results = exit_of_each({"check": (tmp_path, env)}, args=("check",))
    status, out, err = results["check"]
    assert status == 0, out + err
    assert f"Upstream 127.0.0.1:{dead} (RELAY_HOST)" in out
    assert f"Upstream 127.0.0.1:{upstream.port} (route)" in out
    assert "1 of 2 hosts" in out and "user:billing" in out


START_UP_ERRORS = {
    "sync-to-route": ({"DELIVERY_MODE": "sync"}, "to:partner.example smtp://h?tls=none",
                      "DELIVERY_MODE"),
    "sync-mx": ({}, "* mx", "DELIVERY_MODE"),
    "inline-password": ({"DELIVERY_MODE": "queue"}, "user:a smtp://u:hunter2@h",
                        "password_env"),
    "routes-file-missing": ({"ROUTES_FILE": "/nonexistent/routes"}, None, "ROUTES_FILE"),
    "relay-host-list": ({"RELAY_HOST": "a.example,,b.example"}, None, "RELAY_HOST"),
    "relay-host-port": ({"RELAY_HOST": "a.example:99999"}, None, "RELAY_HOST"),
    "dns-resolvers": ({"DNS_RESOLVERS": "dns.example"}, None, "DNS_RESOLVERS"),
    "mx-tls": ({"MX_TLS": "always"}, None, "MX_TLS"),
    "mx-port": ({"MX_PORT": "0"}, None, "MX_PORT"),
}


def test_start_up_errors_name_the_variable_and_exit_2(tmp_path):
    runs = {}
    for case, (settings, routes_text, _) in START_UP_ERRORS.items():
        workdir = tmp_path / case
        workdir.mkdir()
        overrides = dict(settings)
        if routes_text is not None:
            (workdir / "routes").write_text(routes_text + "\n")
            overrides["ROUTES_FILE"] = str(workdir / "routes")
        runs[case] = (workdir, relay_env(workdir, None, **overrides))
    results = exit_of_each(runs)
    for case, (_, _, named) in START_UP_ERRORS.items():
        status, out, err = results[case]
        assert status == 2, (case, out, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and named in lines[0], (case, err)
        assert "hunter2" not in err
