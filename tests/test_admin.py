"""The queue's operator side (relay/admin.py): `queue` CLI and the /api/v1 JSON API.

Everything is real: a SQLite store file in tmp_path (relay.store), filled and moved
through its states by the store's own calls (add, claim, record, hold); the CLI is
queue_command writing to a StringIO; the API is served by relay.operations.HTTPEndpoint
(the relay's own HTTP listener, given a small stand-in for the relay it reports on)
on 127.0.0.1 in an event loop thread, and asked over real sockets with http.client.

No assertion is about speed.
"""

from __future__ import annotations

import asyncio
import http.client
import io
import json
import logging
import socket
import threading
import time
import types
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import prometheus_client
import pytest

from relay.admin import QueueAPI, queue_command
from relay.operations import HTTPEndpoint
from relay.store import Attempt, NewMessage, Result, Store

pytestmark = pytest.mark.timeout(60)

ADMIN_TOKEN = "admin-T0ken-for-tests"
READ_TOKEN = "read-T0ken-for-tests"
BODY = b"From: app@example.com\r\nSubject: queued\r\n\r\nHello.\r\n"
UPSTREAM = "127.0.0.1:2525"
T0 = time.time()

# The queue every test starts from, oldest first:
MIXED = "a1b2c3d4e5f60001"   # one recipient delivered, one deferred -> "deferred"
BOUNCE = "a1b2c3d4e5f60002"  # from the null sender <>, one queued recipient
HELD = "a1b2c3d4e5f60003"    # three recipients, held by the operator
UNKNOWN = "ffffffffffffffff"
DEFER_REPLY = "451 4.4.1 connection refused"
DELIVERED_REPLY = "250 2.0.0 Ok: queued as 4XyZ"


# ---------------------------------------------------------------------------------------
# The store and its contents
# ---------------------------------------------------------------------------------------

def new_message(message_id: str, recipients: list[str], *, received: float,
                sender: str = "app@example.com", user: str | None = "alice",
                outcomes: dict[str, tuple[str, str]] | None = None) -> NewMessage:
    return NewMessage(id=message_id, received=received, user=user, peer="192.0.2.7",
                      sender=sender, body=BODY, recipients=recipients,
                      trace_id=f"trace-{message_id}", outcomes=outcomes or {})


def deliver(store: Store, outcomes: dict[str, tuple[str, str]], now: float) -> None:
    """One worker's round: claim what is due, record `outcomes` (address -> (status,
    reply)) for the recipients named there, hand the others back."""
    for claim in store.claim("test-worker", now, 30.0, 100):
        results = [Result(address=recipient.address, status=outcomes[recipient.address][0],
                          reply=outcomes[recipient.address][1],
                          next_attempt=now + 600 if outcomes[recipient.address][0]
                          == "deferred" else None,
                          attempt=Attempt(time=now, recipient=recipient.address,
                                          upstream=UPSTREAM,
                                          reply=outcomes[recipient.address][1],
                                          duration=0.25, tls=True))
                   for recipient in claim.recipients if recipient.address in outcomes]
        store.record("test-worker", claim.id, results, now)
    store.release_claims("test-worker")


def open_store(path: Path, archive: str = "full") -> Store:
    return Store.open(f"sqlite:///{path}", archive=archive)  # path is absolute: ////


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    store = open_store(tmp_path / "spool" / "queue.db")
    store.add([new_message(MIXED, ["a@example.com", "b@example.com"], received=T0 - 300)])
    deliver(store, {"a@example.com": ("delivered", DELIVERED_REPLY),
                    "b@example.com": ("deferred", DEFER_REPLY)}, T0 - 250)
    store.add([new_message(BOUNCE, ["c@example.com"], received=T0 - 200, sender="",
                           user=None)])
    store.add([new_message(HELD, ["d@example.com", "e@example.com", "f@example.com"],
                           received=T0 - 100, user="bob")])
    assert store.hold(HELD) == 3
    yield store
    store.close()


def statuses(store: Store, message_id: str) -> dict[str, str]:
    record = store.show(message_id)
    assert record is not None
    return {recipient.address: recipient.status for recipient in record.recipients}


# ---------------------------------------------------------------------------------------
# The CLI
# ---------------------------------------------------------------------------------------

def cli(store: Store, *argv: str) -> tuple[int, str]:
    out = io.StringIO()
    return queue_command(list(argv), store, out), out.getvalue()


def test_list_prints_a_table_newest_first(store: Store) -> None:
    code, out = cli(store, "list")
    assert code == 0, out
    header, *rows = out.splitlines()
    assert header.split() == ["ID", "RECEIVED", "(UTC)", "STATUS", "SENDER",
                              "RECIPIENTS", "LAST", "REPLY"]
    assert [row.split()[0] for row in rows] == [HELD, BOUNCE, MIXED]
    held, bounce, mixed = rows
    assert held.split()[3:7] == ["held", "app@example.com", "d@example.com", "+2"]
    assert bounce.split()[3:6] == ["queued", "<>", "c@example.com"]
    assert mixed.split()[3:7] == ["deferred", "app@example.com", "a@example.com", "+1"]
    # the most recent reply, and the received time in UTC
    assert mixed.endswith((DEFER_REPLY, DELIVERED_REPLY))  # both replied at T0 - 250
    received = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(T0 - 300))
    assert received in mixed


def test_list_truncates_a_long_reply(store: Store) -> None:
    long_reply = "451 4.3.0 " + "the upstream explains at length " * 10
    store.add([new_message("a1b2c3d4e5f60004", ["g@example.com"], received=T0)])
    deliver(store, {"g@example.com": ("deferred", long_reply)}, T0)
    code, out = cli(store, "list", "--rcpt", "g@example.com")
    assert code == 0
    [row] = out.splitlines()[1:]
    assert long_reply not in row and row.endswith("…")
    assert len(row) < 200


def test_list_filters_and_limit(store: Store) -> None:
    def ids(*args: str) -> list[str]:
        code, out = cli(store, "list", "--json", *args)
        assert code == 0, out
        return [json.loads(line)["id"] for line in out.splitlines()]

    assert ids("--status", "deferred") == [MIXED]
    assert ids("--status", "delivered") == [MIXED]  # any recipient matches
    assert ids("--status", "held") == [HELD]
    assert ids("--rcpt", "c@example.com") == [BOUNCE]
    assert ids("--from", "<>") == [BOUNCE]
    assert ids("--user", "bob") == [HELD]
    assert ids("--since", str(T0 - 150)) == [HELD]
    until = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(T0 - 150))  # ISO 8601, UTC
    assert ids("--until", until) == [BOUNCE, MIXED]
    assert ids("--limit", "2") == [HELD, BOUNCE]
    code, out = cli(store, "list", "--limit", "2")
    assert code == 0 and "more match" in out.splitlines()[-1]
    code, out = cli(store, "list", "--rcpt", "nobody@example.com")
    assert (code, out) == (0, "no messages\n")


def test_list_pages_through_more_than_one_store_page(store: Store) -> None:
    many = [new_message(f"b{n:015x}", ["h@example.com"], received=T0 + n)
            for n in range(1, 1101)]
    store.add(many)
    code, out = cli(store, "list", "--json", "--rcpt", "h@example.com", "--limit", "1050")
    assert code == 0
    ids = [json.loads(line)["id"] for line in out.splitlines()]
    assert ids == [message.id for message in reversed(many)][:1050]


def test_list_json_lines_carry_the_api_fields(store: Store) -> None:
    code, out = cli(store, "list", "--json", "--status", "deferred")
    assert code == 0
    [line] = out.splitlines()
    message = json.loads(line)
    assert message["id"] == MIXED and message["status"] == "deferred"
    assert message["received_ts"] == pytest.approx(T0 - 300)
    assert message["received"].endswith("Z")
    assert (message["user"], message["peer"], message["sender"]) == (
        "alice", "192.0.2.7", "app@example.com")
    assert message["size"] == len(BODY) and message["has_body"] is True
    assert message["trace_id"] == f"trace-{MIXED}"
    assert "attempts" not in message  # only the single-message view has them
    by_address = {r["address"]: r for r in message["recipients"]}
    assert by_address["a@example.com"]["status"] == "delivered"
    assert by_address["a@example.com"]["last_reply"] == DELIVERED_REPLY
    deferred = by_address["b@example.com"]
    assert (deferred["status"], deferred["attempts"], deferred["last_reply"]) == (
        "deferred", 1, DEFER_REPLY)
    assert deferred["next_attempt_ts"] == pytest.approx(T0 - 250 + 600)
    assert deferred["next_attempt"].endswith("Z")


def test_show_prints_every_field_recipient_and_attempt(store: Store) -> None:
    code, out = cli(store, "show", MIXED)
    assert code == 0, out
    for text in (MIXED, "deferred", "app@example.com", "alice", "192.0.2.7",
                 f"{len(BODY)} bytes", "kept", f"trace-{MIXED}", "recipients (2)",
                 "a@example.com", "b@example.com", DEFER_REPLY, DELIVERED_REPLY,
                 "attempts (2)", UPSTREAM, "(TLS)", "0.250 s",
                 time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(T0 - 300))):
        assert text in out, (text, out)
    code, out = cli(store, "show", BOUNCE)
    assert code == 0 and "<>" in out and "attempts (0)" in out


def test_show_json_is_the_api_view(store: Store) -> None:
    code, out = cli(store, "show", "--json", MIXED)
    assert code == 0
    message = json.loads(out)
    assert [(a["recipient"], a["reply"], a["upstream"], a["tls"]) for a in
            sorted(message["attempts"], key=lambda a: a["recipient"])] == [
        ("a@example.com", DELIVERED_REPLY, UPSTREAM, True),
        ("b@example.com", DEFER_REPLY, UPSTREAM, True)]
    assert message["attempts"][0]["time_ts"] == pytest.approx(T0 - 250)


@pytest.mark.parametrize("command", ["show", "hold", "release", "delete", "retry"])
@pytest.mark.parametrize("message_id", [UNKNOWN, "not/an/id", "x" * 65])
def test_unknown_ids_exit_1(store: Store, capsys: pytest.CaptureFixture[str],
                            command: str, message_id: str) -> None:
    assert cli(store, command, message_id) == (1, "")
    assert "no message" in capsys.readouterr().err


def test_retry_hold_release_delete_say_what_changed(store: Store) -> None:
    assert cli(store, "retry", MIXED) == (0, f"{MIXED}: 1 recipient due now\n")
    record = store.show(MIXED)
    assert record is not None
    [retried] = [r for r in record.recipients if r.address == "b@example.com"]
    assert retried.status in ("queued", "deferred")
    assert retried.next_attempt is not None and retried.next_attempt <= time.time()

    assert cli(store, "hold", BOUNCE) == (0, f"{BOUNCE}: 1 recipient held\n")
    assert statuses(store, BOUNCE) == {"c@example.com": "held"}
    assert cli(store, "release", HELD) == (0, f"{HELD}: 3 recipients released, due now\n")
    assert set(statuses(store, HELD).values()) == {"queued"}
    assert cli(store, "hold", HELD) == (0, f"{HELD}: 3 recipients held\n")
    # nothing left to move is not an error for a message that exists
    assert cli(store, "hold", HELD) == (0, f"{HELD}: 0 recipients held\n")

    assert cli(store, "delete", MIXED) == (0, f"{MIXED}: deleted\n")
    assert store.show(MIXED) is None
    assert cli(store, "delete", MIXED)[0] == 1


def test_retry_all(store: Store) -> None:
    deliver(store, {"c@example.com": ("deferred", DEFER_REPLY)}, T0)
    code, out = cli(store, "retry", "--all")
    assert (code, out) == (0, "2 recipients due now\n")  # MIXED's b and BOUNCE's c


@pytest.mark.parametrize("argv", [
    [], ["frobnicate"], ["list", "--status", "lost"], ["list", "--limit", "0"],
    ["list", "--limit", "many"], ["list", "--since", "yesterday"], ["list", "extra"],
    ["show"], ["retry"], ["retry", MIXED, "--all"], ["hold", MIXED, HELD],
])
def test_usage_errors_exit_2_without_a_traceback(
        store: Store, capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    code, out = cli(store, *argv)
    err = capsys.readouterr().err
    assert (code, out) == (2, "")
    assert "usage:" in err and "Traceback" not in err
    assert set(statuses(store, HELD).values()) == {"held"}  # nothing was done


def test_help_goes_to_out_with_exit_0(store: Store) -> None:
    code, out = cli(store, "--help")
    assert code == 0 and "list" in out and "retry" in out
    code, out = cli(store, "list", "--help")
    assert code == 0 and "--status" in out


# ---------------------------------------------------------------------------------------
# The API, served by the relay's HTTP endpoint
# ---------------------------------------------------------------------------------------

def stand_in_relay() -> Any:
    """What HTTPEndpoint reads of the relay: where to listen, whether SMTP is serving,
    the metrics registry (/readyz's upstream probe is not used here)."""
    return types.SimpleNamespace(
        config=types.SimpleNamespace(http_host="127.0.0.1", http_port=0,
                                     ready_probe_seconds=5.0),
        forwarder=types.SimpleNamespace(pool=None),
        serving=True,
        draining=False,  # SIGTERM's drain (issue #12): /healthz and /readyz read it
        metrics=types.SimpleNamespace(registry=prometheus_client.CollectorRegistry()))


class Served:
    """HTTPEndpoint(relay, api) listening on 127.0.0.1 in its own event loop thread."""

    def __init__(self, api: QueueAPI | None):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.endpoint = HTTPEndpoint(cast(Any, stand_in_relay()), api=api)
        asyncio.run_coroutine_threadsafe(self.endpoint.start(), self.loop).result(20)
        self.port = self.endpoint.port

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.endpoint.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(20)
        self.loop.close()


@pytest.fixture
def serve() -> Iterator[Any]:
    started: list[Served] = []

    def start(api: QueueAPI | None) -> Served:
        started.append(Served(api))
        return started[-1]

    yield start
    for served in started:
        served.close()


@pytest.fixture
def api_port(store: Store, serve: Any) -> int:
    return int(serve(QueueAPI(store, ADMIN_TOKEN, READ_TOKEN)).port)


def call(port: int, method: str, path: str, token: str | None = ADMIN_TOKEN,
         body: bytes | None = None, headers: dict[str, str] | None = None
         ) -> tuple[int, http.client.HTTPMessage, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        fields = dict(headers or {})
        if token is not None:
            fields["Authorization"] = f"Bearer {token}"
        connection.request(method, path, body=body, headers=fields)
        response = connection.getresponse()
        return response.status, response.headers, response.read()
    finally:
        connection.close()


def call_json(port: int, method: str, path: str, token: str | None = ADMIN_TOKEN,
              expect: int = 200) -> Any:
    status, headers, body = call(port, method, path, token)
    assert status == expect, (method, path, status, body)
    assert headers["Content-Type"] == "application/json; charset=utf-8"
    return json.loads(body)


def raw_exchange(port: int, request: bytes) -> bytes:
    """Bytes in, everything the server sends until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_list_stats_and_show_over_http(api_port: int) -> None:
    listing = call_json(api_port, "GET", "/api/v1/messages")
    assert [m["id"] for m in listing["messages"]] == [HELD, BOUNCE, MIXED]
    assert listing["next_cursor"] is None
    assert [m["status"] for m in listing["messages"]] == ["held", "queued", "deferred"]
    held, queued, _ = listing["messages"]
    assert {r["next_attempt"] for r in held["recipients"]} == {None}  # none is coming
    assert queued["recipients"][0]["next_attempt_ts"] == pytest.approx(T0 - 200)

    message = call_json(api_port, "GET", f"/api/v1/messages/{MIXED}")
    assert message["status"] == "deferred" and len(message["attempts"]) == 2
    assert {r["address"]: r["status"] for r in message["recipients"]} == {
        "a@example.com": "delivered", "b@example.com": "deferred"}

    stats = call_json(api_port, "GET", "/api/v1/stats")
    assert stats["recipients"]["held"] == 3 and stats["recipients"]["queued"] == 1
    assert stats["recipients"]["deferred"] == 1 and stats["recipients"]["delivered"] == 1
    assert stats["messages"] == 3
    assert stats["oldest_queued_age"] == pytest.approx(time.time() - (T0 - 300), abs=60)


def test_cli_json_and_api_show_messages_alike(store: Store, api_port: int) -> None:
    code, out = cli(store, "list", "--json")
    assert code == 0
    listing = call_json(api_port, "GET", "/api/v1/messages")
    assert [json.loads(line) for line in out.splitlines()] == listing["messages"]
    code, out = cli(store, "show", "--json", MIXED)
    assert json.loads(out) == call_json(api_port, "GET", f"/api/v1/messages/{MIXED}")


def test_list_filters_and_pages_with_the_cursor(store: Store, api_port: int) -> None:
    def ids(query: str) -> list[str]:
        return [m["id"] for m in call_json(
            api_port, "GET", f"/api/v1/messages?{query}")["messages"]]

    assert ids("status=deferred") == [MIXED]
    assert ids("rcpt=c%40example.com") == [BOUNCE]
    assert ids("from=%3C%3E") == [BOUNCE]
    assert ids("user=bob") == [HELD]
    assert ids(f"since={T0 - 150}") == [HELD]
    until = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(T0 - 150))
    assert ids(f"until={until}") == [BOUNCE, MIXED]
    # empty parameters, as a form sends them, filter nothing
    assert ids("status=&rcpt=&from=&user=&since=&until=&limit=&cursor=") == [
        HELD, BOUNCE, MIXED]

    store.add([new_message(f"c{n:015x}", ["p@example.com"], received=T0 + n)
               for n in range(7)])
    seen: list[str] = []
    cursor = None
    while True:
        query = "rcpt=p%40example.com&limit=3" + (
            "&cursor=" + urllib.parse.quote(cursor, safe="") if cursor else "")
        page = call_json(api_port, "GET", f"/api/v1/messages?{query}")
        assert len(page["messages"]) <= 3
        seen += [m["id"] for m in page["messages"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [f"c{n:015x}" for n in reversed(range(7))]


@pytest.mark.parametrize("query", [
    "limit=0", "limit=1001", "limit=ten", "limit=-1", "status=lost", "since=yesterday",
    "until=nan", "colour=blue", "status=queued&status=held", "since=1&&",
    "cursor=not-a-cursor", "x=%ff",
])
def test_bad_list_parameters_are_400(api_port: int, query: str) -> None:
    answer = call_json(api_port, "GET", f"/api/v1/messages?{query}", expect=400)
    assert answer["error"]


def test_raw_is_the_message_and_404_without_a_body(tmp_path: Path, store: Store,
                                                   serve: Any) -> None:
    port = serve(QueueAPI(store, ADMIN_TOKEN, READ_TOKEN)).port
    status, headers, body = call(port, "GET", f"/api/v1/messages/{MIXED}/raw")
    assert (status, headers["Content-Type"], body) == (200, "message/rfc822", BODY)
    assert call(port, "GET", f"/api/v1/messages/{UNKNOWN}/raw")[0] == 404

    # ARCHIVE=metadata: a message final at once (sync mode's archive) keeps no body
    metadata = open_store(tmp_path / "metadata.db", archive="metadata")
    try:
        metadata.add([new_message(MIXED, ["a@example.com"], received=T0, outcomes={
            "a@example.com": ("delivered", DELIVERED_REPLY)})])
        port = serve(QueueAPI(metadata, ADMIN_TOKEN, READ_TOKEN)).port
        message = call_json(port, "GET", f"/api/v1/messages/{MIXED}")
        assert (message["status"], message["has_body"], message["size"]) == (
            "delivered", False, len(BODY))
        answer = call_json(port, "GET", f"/api/v1/messages/{MIXED}/raw", expect=404)
        assert "not kept" in answer["error"]
    finally:
        metadata.close()


def test_actions_answer_id_and_recipients(store: Store, api_port: int) -> None:
    assert call_json(api_port, "POST", f"/api/v1/messages/{MIXED}/retry") == {
        "id": MIXED, "recipients": 1}
    assert call_json(api_port, "POST", f"/api/v1/messages/{BOUNCE}/hold") == {
        "id": BOUNCE, "recipients": 1}
    assert statuses(store, BOUNCE) == {"c@example.com": "held"}
    # a body (curl -d '') is read and ignored
    status, _, body = call(api_port, "POST", f"/api/v1/messages/{HELD}/release",
                           body=b"{}")
    assert status == 200 and json.loads(body) == {"id": HELD, "recipients": 3}
    assert set(statuses(store, HELD).values()) == {"queued"}
    assert call_json(api_port, "DELETE", f"/api/v1/messages/{BOUNCE}") == {
        "id": BOUNCE, "deleted": True}
    assert store.show(BOUNCE) is None
    call_json(api_port, "GET", f"/api/v1/messages/{BOUNCE}", expect=404)
    for action in ("retry", "hold", "release"):
        call_json(api_port, "POST", f"/api/v1/messages/{UNKNOWN}/{action}", expect=404)
    call_json(api_port, "DELETE", f"/api/v1/messages/{UNKNOWN}", expect=404)


def test_actions_log_no_token(api_port: int, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    call_json(api_port, "POST", f"/api/v1/messages/{MIXED}/retry")
    call_json(api_port, "GET", "/api/v1/stats", token="wrong-" + ADMIN_TOKEN, expect=401)
    assert "api_retry" in caplog.text
    logged = caplog.text + "".join(str(vars(record)) for record in caplog.records)
    assert ADMIN_TOKEN not in logged and READ_TOKEN not in logged


@pytest.mark.parametrize("path", [
    "/api/v1/messages/" + "a" * 65, "/api/v1/messages/a_b", "/api/v1/messages/a.b",
    "/api/v1/messages/%2e%2e", "/api/v1/messages/a%2Fb", "/api/v1/messages/",
    "/api/v1/messages/%00", "/api/v1/messages/" + "a" * 65 + "/raw",
])
def test_bad_ids_are_404_without_the_store(tmp_path: Path, serve: Any, path: str) -> None:
    # A closed store fails every call: a 404 here was answered before asking it.
    closed = open_store(tmp_path / "closed.db")
    closed.close()
    port = serve(QueueAPI(closed, ADMIN_TOKEN, READ_TOKEN)).port
    call_json(port, "GET", path, expect=404)
    if not path.endswith("/raw"):
        call_json(port, "DELETE", path, expect=404)
    # ... whereas a well-formed id does reach it (and gets its failure)
    status, _, _ = call(port, "GET", f"/api/v1/messages/{UNKNOWN}")
    assert status in (500, 503)


def test_wrong_methods_are_405_with_allow(api_port: int) -> None:
    for method, path, allowed in [
            ("POST", "/api/v1/messages", "GET"), ("PUT", f"/api/v1/messages/{MIXED}",
                                                  "GET, DELETE"),
            ("GET", f"/api/v1/messages/{MIXED}/retry", "POST"),
            ("DELETE", "/api/v1/stats", "GET"),
            ("POST", f"/api/v1/messages/{MIXED}/raw", "GET")]:
        status, headers, body = call(api_port, method, path)
        assert (status, headers["Allow"]) == (405, allowed), (method, path, body)


def test_unknown_api_paths_are_404(api_port: int) -> None:
    for path in ("/api", "/api/", "/api/v2/messages", "/api/v1/", "/api/v1/queue",
                 f"/api/v1/messages/{MIXED}/bounce", f"/api/v1/messages/{MIXED}/raw/x"):
        call_json(api_port, "GET", path, expect=404)


# -- tokens -----------------------------------------------------------------------------

@pytest.mark.parametrize("token", [None, "", "wrong", ADMIN_TOKEN + "x", ADMIN_TOKEN[:-1],
                                   "Basic " + ADMIN_TOKEN])
def test_missing_or_wrong_token_is_401_with_www_authenticate(api_port: int,
                                                            token: str | None) -> None:
    for method, path in [("GET", "/api/v1/messages"), ("GET", "/api/v1/stats"),
                         ("POST", f"/api/v1/messages/{MIXED}/retry"),
                         ("GET", "/api/v1/nothing/here")]:
        status, headers, body = call(api_port, method, path, token=token)
        assert status == 401, (method, path, body)
        assert headers["WWW-Authenticate"].startswith("Bearer")
        assert ADMIN_TOKEN.encode() not in body


def test_other_authorization_schemes_are_401(api_port: int) -> None:
    status, headers, _ = call(api_port, "GET", "/api/v1/stats", token=None,
                              headers={"Authorization": "Basic YWRtaW46eA=="})
    assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
    # the scheme's name is case-insensitive (RFC 9110)
    status, _, _ = call(api_port, "GET", "/api/v1/stats", token=None,
                        headers={"Authorization": f"bearer {ADMIN_TOKEN}"})
    assert status == 200


def test_read_token_reads_but_changes_nothing(store: Store, api_port: int) -> None:
    for path in ("/api/v1/messages", f"/api/v1/messages/{MIXED}", "/api/v1/stats"):
        call_json(api_port, "GET", path, token=READ_TOKEN)
    for method, path in [("GET", f"/api/v1/messages/{MIXED}/raw"),
                         ("POST", f"/api/v1/messages/{HELD}/release"),
                         ("POST", f"/api/v1/messages/{BOUNCE}/hold"),
                         ("POST", f"/api/v1/messages/{MIXED}/retry"),
                         ("DELETE", f"/api/v1/messages/{BOUNCE}")]:
        call_json(api_port, method, path, token=READ_TOKEN, expect=403)
    assert set(statuses(store, HELD).values()) == {"held"}
    assert statuses(store, BOUNCE) == {"c@example.com": "queued"}


def test_a_non_ascii_token_is_compared_as_utf8_bytes(store: Store, serve: Any) -> None:
    port = serve(QueueAPI(store, "pässwörd-tøken", "")).port
    raw = raw_exchange(port, b"GET /api/v1/stats HTTP/1.1\r\nHost: x\r\nAuthorization: "
                       b"Bearer " + "pässwörd-tøken".encode() + b"\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 200 "), raw
    raw = raw_exchange(port, b"GET /api/v1/stats HTTP/1.1\r\nHost: x\r\nAuthorization: "
                       b"Bearer " + "pässwörd-tøken".encode("latin-1", "replace")
                       + b"\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 401 "), raw


@pytest.mark.parametrize(("admin", "read"), [(ADMIN_TOKEN, ""), ("", READ_TOKEN)])
def test_one_token_alone_and_an_empty_bearer_never_matches_the_unset_one(
        store: Store, serve: Any, admin: str, read: str) -> None:
    port = serve(QueueAPI(store, admin, read)).port
    assert call(port, "GET", "/api/v1/stats", token=admin or read)[0] == 200
    raw = raw_exchange(port, b"GET /api/v1/stats HTTP/1.1\r\nAuthorization: Bearer "
                       b"\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 401 "), raw
    if not admin:
        assert call(port, "POST", f"/api/v1/messages/{MIXED}/retry",
                    token=read)[0] == 403


def test_no_token_configured_turns_the_api_off(store: Store, serve: Any) -> None:
    port = serve(QueueAPI(store, "", "")).port
    for token in (None, "", ADMIN_TOKEN):
        for method, path in [("GET", "/api/v1/messages"), ("GET", "/api/v1/stats"),
                             ("GET", f"/api/v1/messages/{MIXED}/raw"),
                             ("POST", f"/api/v1/messages/{MIXED}/retry"),
                             ("DELETE", f"/api/v1/messages/{MIXED}"), ("GET", "/api/")]:
            assert call(port, method, path, token=token)[0] == 404, (token, path)
    assert call(port, "GET", "/healthz", token=None)[0] == 200
    assert statuses(store, HELD) == dict.fromkeys(
        ["d@example.com", "e@example.com", "f@example.com"], "held")


# -- the endpoint around it -------------------------------------------------------------

def test_healthz_and_metrics_unchanged_beside_the_api(api_port: int, serve: Any) -> None:
    for port in (api_port, serve(None).port):
        status, headers, body = call(port, "GET", "/healthz", token=None)
        assert (status, body) == (200, b"ok: the SMTP listener accepts connections\n")
        assert headers["Content-Type"] == "text/plain; charset=utf-8"
        status, headers, _ = call(port, "GET", "/metrics", token=None)
        assert status == 200 and headers["Content-Type"].startswith("text/plain")
        assert call(port, "POST", "/healthz", token=None)[0] == 405
        assert call(port, "GET", "/nothing", token=None)[0] == 404
    # without an API, /api/ is just another unknown path
    assert call(serve(None).port, "GET", "/api/v1/stats")[0] == 404


def test_head_has_the_headers_and_no_body(api_port: int) -> None:
    raw = raw_exchange(api_port, b"HEAD /api/v1/stats HTTP/1.1\r\nAuthorization: "
                       b"Bearer " + ADMIN_TOKEN.encode() + b"\r\n\r\n")
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and body == b""
    assert b"\r\nContent-Type: application/json; charset=utf-8" in head


def authorized_request(*extra: bytes) -> bytes:
    return (b"GET /api/v1/stats HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"".join(extra)
            + b"Authorization: Bearer " + ADMIN_TOKEN.encode() + b"\r\n\r\n")


def test_request_headers_are_bounded(api_port: int) -> None:
    # 64 fields in all are fine (Host, 62 more, Authorization) ...
    fields = [b"X-Filler-%d: %d\r\n" % (n, n) for n in range(62)]
    assert raw_exchange(api_port, authorized_request(*fields)).startswith(
        b"HTTP/1.1 200 ")
    # ... 65 are not
    answer = raw_exchange(api_port, authorized_request(*fields, b"X-One-More: 1\r\n"))
    assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n"), answer
    # a line of 8 KiB with its CRLF is fine, one byte more is not
    line = b"X-Long: " + b"v" * (8192 - len(b"X-Long: ") - 2) + b"\r\n"
    assert raw_exchange(api_port, authorized_request(line)).startswith(b"HTTP/1.1 200 ")
    line = b"X-Long: " + b"v" * (8192 - len(b"X-Long: ") - 1) + b"\r\n"
    answer = raw_exchange(api_port, authorized_request(line))
    assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n"), answer[:200]
    # the same for the request line, and for the paths that are not the API's
    answer = raw_exchange(api_port, b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
    answer = raw_exchange(api_port, b"GET /healthz HTTP/1.1\r\n" + line + b"\r\n")
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]


@pytest.mark.parametrize("request_bytes", [
    authorized_request(b" folded: continuation\r\n"),
    authorized_request(b"no colon here\r\n"),
    authorized_request(b"Content-Length: ten\r\n"),
    authorized_request(b"Transfer-Encoding: chunked\r\n"),
])
def test_malformed_requests_are_400(api_port: int, request_bytes: bytes) -> None:
    assert raw_exchange(api_port, request_bytes).startswith(b"HTTP/1.1 400 ")


def test_a_large_body_is_413(api_port: int) -> None:
    for length in (b"1000000", b"9" * 5000):
        answer = raw_exchange(api_port, authorized_request(b"Content-Length: " + length
                                                           + b"\r\n"))
        assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
