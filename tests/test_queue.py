"""Issue #10 end to end: DELIVERY_MODE=queue and fallback, against a real relay
process, a real upstream (aiosmtpd, started and stopped by the test to play an outage)
and the real SQLite store file. PostgreSQL with two relays: test_queue_postgres.py."""

from __future__ import annotations

import contextlib
import email
import email.policy
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
from conftest import (
    RECIPIENT,
    SENDER,
    SMTP_RELAY,
    Upstream,
    UpstreamHandler,
    free_port,
    message,
    relay_env,
    try_message,
)

QUEUED = re.compile(r"^250 2\.0\.0 Queued as ([0-9a-f]{16})$")
FAST_RETRIES = {"QUEUE_RETRY_MIN": "0.3", "QUEUE_RETRY_MAX": "0.6"}


def wait_until(condition, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def subjects(upstream: Upstream) -> list[str]:
    return [email.message_from_bytes(m.content).get("Subject", "")
            for m in upstream.messages]


def send(relay, subject: str, recipients: tuple[str, ...] = (RECIPIENT,)) -> str:
    with relay.client() as client:
        return try_message(client, message(subject), recipients)


@pytest.fixture
def down_upstream():
    """A port where an upstream will come up later: `start()` starts it there."""
    port = free_port()
    started: list[Upstream] = []
    handler = UpstreamHandler()

    class Later:
        def __init__(self) -> None:
            self.port = port
            self.handler = handler

        def start(self) -> Upstream:
            upstream = Upstream(port=port, handler=handler)
            started.append(upstream)
            return upstream

        @property
        def messages(self):
            return handler.messages

    yield Later()
    for upstream in started:
        upstream.stop()


# --- queue mode ---------------------------------------------------------------------------

def test_queue_mode_answers_once_stored_then_delivers(start, upstream, tmp_path):
    relay = start(upstream, DELIVERY_MODE="queue")
    reply = send(relay, "queued one")
    match = QUEUED.match(reply)
    assert match, reply
    queue_id = match.group(1)
    wait_until(lambda: subjects(upstream) == ["queued one"], what="delivery")
    log = relay.wait_for_log(f"delivered id={queue_id}")
    assert f"queued id={queue_id}" in log
    # The store is the SQLite file the default QUEUE_URL names, in WAL mode.
    database = relay.workdir / "spool" / "queue.db"
    assert database.exists()
    with sqlite3.connect(database) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_queue_mode_rides_out_an_upstream_outage(start, down_upstream):
    relay = start(down_upstream, DELIVERY_MODE="queue", **FAST_RETRIES)
    ids = [QUEUED.match(send(relay, f"outage {n}")).group(1) for n in range(5)]
    relay.wait_for_log("deferred id=")
    down_upstream.start()
    wait_until(lambda: len(down_upstream.messages) >= 5, what="all five delivered")
    time.sleep(1.0)  # nothing arrives twice
    assert sorted(subjects(down_upstream)) == sorted(f"outage {n}" for n in range(5))
    log = relay.log()
    for queue_id in ids:
        assert log.count(f"delivered id={queue_id}") == 1
    assert "next_attempt_s=" in log


def test_queue_mode_bounces_a_permanent_failure_to_the_sender(start, upstream):
    upstream.handler.rcpt_replies[RECIPIENT] = "550 5.1.1 No such user here"
    relay = start(upstream, DELIVERY_MODE="queue")
    queue_id = QUEUED.match(send(relay, "doomed")).group(1)
    wait_until(lambda: len(upstream.messages) == 1, what="the bounce")
    time.sleep(0.5)
    assert len(upstream.messages) == 1  # one bounce, no more
    bounce = upstream.messages[0]
    assert bounce.mail_from in ("", "<>") and bounce.rcpt_tos == [SENDER]
    report = email.message_from_bytes(bounce.content, policy=email.policy.default)
    assert report.get_content_type() == "multipart/report"
    assert "550 5.1.1" in bounce.content.decode()
    assert "Subject: doomed" in bounce.content.decode()  # the original's headers
    log = relay.wait_for_log("bounced id=")
    assert f"delivery-failed id={queue_id}" in log


def test_queue_mode_never_bounces_a_bounce(start, upstream):
    # The original fails, and so does its bounce to the sender: that is the end of it.
    upstream.handler.rcpt_replies[RECIPIENT] = "550 5.1.1 No such user here"
    upstream.handler.rcpt_replies[SENDER] = "550 5.1.1 No such sender either"
    relay = start(upstream, DELIVERY_MODE="queue")
    send(relay, "doomed twice")
    log = relay.wait_for_log("not-bounced id=")
    time.sleep(1.0)
    assert relay.log().count("bounced id=") - relay.log().count("not-bounced id=") == 1
    assert upstream.messages == []
    assert log.count("delivery-failed id=") == 2


def test_queue_mode_gives_up_after_max_age_and_bounces(start, upstream):
    upstream.handler.rcpt_replies[RECIPIENT] = "451 4.3.0 Try again later"
    relay = start(upstream, DELIVERY_MODE="queue", QUEUE_MAX_AGE="2", **FAST_RETRIES)
    queue_id = QUEUED.match(send(relay, "too late")).group(1)
    relay.wait_for_log(f"expired id={queue_id}", timeout=20)
    wait_until(lambda: len(upstream.messages) == 1, what="the bounce")
    bounce = email.message_from_bytes(upstream.messages[0].content,
                                      policy=email.policy.default)
    status = bounce.get_payload()[1].get_payload()[1]  # the recipient's fields
    assert status["Action"] == "failed"
    assert "451 4.3.0" in status["Diagnostic-Code"]


def test_queue_full_is_452_and_nothing_is_lost(start, down_upstream):
    relay = start(down_upstream, DELIVERY_MODE="queue", QUEUE_MAX_MESSAGES="2",
                  **FAST_RETRIES)
    assert QUEUED.match(send(relay, "first"))
    assert QUEUED.match(send(relay, "second"))
    with relay.client() as client:
        reply = try_message(client, message("third"))
    assert reply.startswith("452 4.3.1"), reply
    down_upstream.start()
    wait_until(lambda: len(down_upstream.messages) == 2, what="both delivered")
    assert sorted(subjects(down_upstream)) == ["first", "second"]


def test_queue_mode_refuses_what_policy_refuses(start, upstream):
    relay = start(upstream, DELIVERY_MODE="queue")
    with relay.client() as client:
        code, _ = client.mail("x@elsewhere.test")
        assert code == 553
    with relay.client(login=False) as client:
        code, _ = client.mail(SENDER)
        assert code == 530
    with relay.client() as client:
        client.mail(SENDER)
        code, _ = client.rcpt("someone@elsewhere.test")
        assert code == 550


def test_store_that_cannot_be_opened_stops_start_up(tmp_path):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    env = relay_env(tmp_path, None, DELIVERY_MODE="queue",
                    QUEUE_URL=f"sqlite:///{blocker}/queue.db")
    result = subprocess.run([sys.executable, str(SMTP_RELAY)], env=env, cwd=tmp_path,
                            check=False,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "QUEUE_URL" in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_bad_durations_stop_start_up(tmp_path):
    env = relay_env(tmp_path, None, QUEUE_RETRY_MIN="soon")
    result = subprocess.run([sys.executable, str(SMTP_RELAY)], env=env, cwd=tmp_path,
                            check=False,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "QUEUE_RETRY_MIN" in result.stderr and "duration" in result.stderr


# --- fallback mode --------------------------------------------------------------------------

def test_fallback_is_sync_while_the_upstream_answers(start, upstream):
    relay = start(upstream, DELIVERY_MODE="fallback")
    reply = send(relay, "direct")
    assert reply.startswith("250 2.0.0 Ok: queued as UP1"), reply
    assert " (smtp-relay id " in reply
    upstream.handler.rcpt_replies[RECIPIENT] = "550 5.1.1 No such user here"
    with relay.client() as client:
        assert try_message(client, message("refused")).startswith("550 5.1.1")
    assert "queued id=" not in relay.log()


def test_fallback_queues_when_the_upstream_is_down(start, down_upstream):
    relay = start(down_upstream, DELIVERY_MODE="fallback", **FAST_RETRIES)
    reply = send(relay, "while down")
    assert QUEUED.match(reply), reply
    relay.wait_for_log("upstream-unavailable")
    down_upstream.start()
    wait_until(lambda: subjects(down_upstream) == ["while down"], what="delivery")


def test_fallback_queues_only_the_recipients_the_upstream_defers(start, upstream):
    other = "dev@example.com"
    upstream.handler.rcpt_replies[other] = "450 4.2.0 Mailbox busy, try later"
    relay = start(upstream, DELIVERY_MODE="fallback", **FAST_RETRIES)
    reply = send(relay, "split", (RECIPIENT, other))
    assert reply.startswith("250 2.0.0 Ok: queued as UP1"), reply
    assert re.search(r"; queued as [0-9a-f]{16} for 1 recipient", reply), reply
    assert upstream.messages[0].rcpt_tos == [RECIPIENT]
    del upstream.handler.rcpt_replies[other]
    wait_until(lambda: len(upstream.messages) == 2, what="the deferred recipient")
    assert upstream.messages[1].rcpt_tos == [other]


def test_fallback_queues_when_the_upstream_defers_the_data(start, upstream):
    upstream.handler.data_reply = "451 4.3.0 Temporary local problem"
    relay = start(upstream, DELIVERY_MODE="fallback", **FAST_RETRIES)
    reply = send(relay, "data deferred")
    assert QUEUED.match(reply), reply
    upstream.handler.data_reply = None
    wait_until(lambda: subjects(upstream) == ["data deferred"], what="delivery")


def test_fallback_passes_an_upstream_5xx_to_the_data_on(start, upstream):
    upstream.handler.data_reply = "554 5.7.1 Message rejected as spam"
    relay = start(upstream, DELIVERY_MODE="fallback")
    with relay.client() as client:
        assert try_message(client, message("spam")).startswith("554 5.7.1")
    assert "queued id=" not in relay.log()


# --- crash safety ---------------------------------------------------------------------------

def _load(relay, acknowledged: list[str], stop: threading.Event) -> None:
    """Send messages until told to stop or the relay dies; remember each 250."""
    number = 0
    while not stop.is_set():
        number += 1
        subject = f"load {number}"
        try:
            with relay.client(timeout=5) as client:
                if try_message(client, message(subject)).startswith("250"):
                    acknowledged.append(subject)
        except OSError:
            return  # killed


@pytest.mark.parametrize("mode", ["queue", "fallback", "sync"])
def test_kill_9_loses_no_acknowledged_message(start_relay, tmp_path, mode):
    handler = UpstreamHandler()
    handler.stall["DATA"] = 0.05  # deliveries in flight when the kill comes
    upstream = Upstream(handler=handler)
    try:
        queue_url = f"sqlite:///{tmp_path / 'shared-spool' / 'queue.db'}"
        settings = {"DELIVERY_MODE": mode, "QUEUE_URL": queue_url, **FAST_RETRIES}
        # QUEUE_LEASE_SECONDS is left at 30: the restarted relay takes back the
        # claims its killed predecessor held at once, not when their lease ends.
        if mode == "fallback":  # half the load finds the upstream deferring
            handler.rcpt_replies[RECIPIENT] = "451 4.3.0 Later"
        relay = start_relay(upstream, **settings)
        acknowledged: list[str] = []
        stop = threading.Event()
        threads = [threading.Thread(target=_load, args=(relay, acknowledged, stop))
                   for _ in range(4)]
        for thread in threads:
            thread.start()
        wait_until(lambda: len(acknowledged) >= 20, what="some load")
        relay.process.send_signal(signal.SIGKILL)
        relay.process.wait()
        stop.set()
        for thread in threads:
            thread.join(10)
        handler.rcpt_replies.clear()
        handler.stall.clear()
        start_relay(upstream, **settings)  # the same store: picks up where it stopped
        wanted = set(acknowledged)
        wait_until(lambda: wanted <= set(subjects(upstream)), timeout=30,
                   what=f"every acknowledged message ({len(wanted)})")
    finally:
        upstream.stop()


# --- operating it -----------------------------------------------------------------------------

def test_readyz_in_queue_mode_means_can_store(start, down_upstream):
    port = free_port()
    relay = start(down_upstream, DELIVERY_MODE="queue", HTTP_PORT=str(port),
                  HTTP_HOST="127.0.0.1")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=10) as answer:
        text = answer.read().decode()
        assert answer.status == 200
    assert "upstream" in text and "not ready" in text  # its state, on its own line
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        metrics = answer.read().decode()
    assert "smtp_relay_upstream_up 0.0" in metrics
    assert relay.process.poll() is None


def test_queue_cli_lists_and_retries(start, down_upstream):
    relay = start(down_upstream, DELIVERY_MODE="queue", QUEUE_RETRY_MIN="1h",
                  QUEUE_RETRY_MAX="1h")
    queue_id = QUEUED.match(send(relay, "via the cli")).group(1)
    relay.wait_for_log(f"deferred id={queue_id}")

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(SMTP_RELAY), "queue", *args], check=False,
                              env=relay.env, cwd=relay.workdir, capture_output=True,
                              text=True, timeout=30)

    listing = cli("list", "--status", "deferred")
    assert listing.returncode == 0, listing.stderr
    # Recorded just after its log line (the outcome may ride with the next commit).
    wait_until(lambda: queue_id in cli("list", "--status", "deferred").stdout,
               what="the deferral in the list")
    down_upstream.start()
    assert cli("retry", queue_id).returncode == 0
    wait_until(lambda: subjects(down_upstream) == ["via the cli"], what="the retry")
    assert cli("show", "0123456789abcdef").returncode == 1


def test_archive_in_sync_mode_records_deliveries(start, upstream):
    relay = start(upstream, ARCHIVE="metadata")
    reply = send(relay, "archived")
    queue_id = re.search(r"smtp-relay id ([0-9a-f]{16})", reply).group(1)
    result = subprocess.run([sys.executable, str(SMTP_RELAY), "queue", "show", queue_id],
                            check=False,
                            env=relay.env, cwd=relay.workdir, capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "delivered" in result.stdout


def test_unreachable_postgresql_stops_start_up_without_its_password(tmp_path):
    env = relay_env(tmp_path, None, DELIVERY_MODE="queue",
                    QUEUE_URL=f"postgresql://relay:hunter2secret@127.0.0.1:{free_port()}/q")
    result = subprocess.run([sys.executable, str(SMTP_RELAY)], env=env, cwd=tmp_path,
                            check=False,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "QUEUE_URL" in result.stderr and "hunter2secret" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_sigterm_lets_a_queued_delivery_finish(start, upstream):
    upstream.handler.stall["DATA"] = 1.5
    relay = start(upstream, DELIVERY_MODE="queue")
    queue_id = QUEUED.match(send(relay, "finish me")).group(1)
    wait_until(lambda: upstream.handler.sessions, what="the delivery to begin")
    time.sleep(0.3)
    assert relay.stop(signal.SIGTERM) == 0
    assert f"delivered id={queue_id}" in relay.log()
    assert subjects(upstream) == ["finish me"]


def test_sigterm_with_nothing_to_deliver_exits_at_once(start, upstream):
    # Most workers are parked (a fast upstream wants few): stop() must release them
    # too, not leave them waiting for work until TIMEOUT (docker stop kills at 10 s).
    relay = start(upstream, DELIVERY_MODE="queue", TIMEOUT="60")
    send(relay, "one")
    wait_until(lambda: subjects(upstream) == ["one"], what="the delivery")
    assert relay.stop(signal.SIGTERM, timeout=30) == 0
    assert relay.log().rstrip().endswith("stopped")


def test_the_relay_serves_the_queue_api_with_its_tokens(start, down_upstream):
    import json
    import urllib.error

    port = free_port()
    relay = start(down_upstream, DELIVERY_MODE="queue", HTTP_HOST="127.0.0.1",
                  HTTP_PORT=str(port), API_TOKEN="admin-token-123",
                  API_READ_TOKEN="read-token-456", QUEUE_RETRY_MIN="1h",
                  QUEUE_RETRY_MAX="1h")
    queue_id = QUEUED.match(send(relay, "over the api")).group(1)
    relay.wait_for_log(f"deferred id={queue_id}")
    base = f"http://127.0.0.1:{port}/api/v1"

    def call(path: str, token: str | None, method: str = "GET"):
        request = urllib.request.Request(base + path, method=method)
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=10) as answer:
                return answer.status, answer.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    assert call("/messages", None)[0] == 401
    assert call("/messages", "wrong")[0] == 401
    status, _ = call("/messages?status=deferred", "read-token-456")
    assert status == 200
    # The outcome is recorded just after its log line (it may ride with the next commit).
    wait_until(lambda: [m["id"] for m in json.loads(
        call("/messages?status=deferred", "read-token-456")[1])["messages"]] == [queue_id],
        what="the deferral in the store")
    assert call(f"/messages/{queue_id}/raw", "read-token-456")[0] == 403
    status, raw = call(f"/messages/{queue_id}/raw", "admin-token-123")
    assert status == 200 and b"Subject: over the api" in raw
    down_upstream.start()
    assert call(f"/messages/{queue_id}/retry", "admin-token-123", "POST")[0] == 200
    wait_until(lambda: subjects(down_upstream) == ["over the api"], what="the retry")
    assert "admin-token-123" not in relay.log() and "read-token-456" not in relay.log()


class CountingHandler(UpstreamHandler):
    """Counts the deliveries in DATA at the same time (each stalls there)."""

    def reset(self) -> None:
        super().reset()
        self.in_data = 0
        self.most_in_data = 0

    async def handle_DATA(self, server, session, envelope):
        self.in_data += 1
        self.most_in_data = max(self.most_in_data, self.in_data)
        try:
            return await super().handle_DATA(server, session, envelope)
        finally:
            self.in_data -= 1


def most_deliveries_at_once(start, down_upstream, *, workers: int, stall: float,
                            messages: int) -> int:
    """Queue `messages` while the upstream is down, bring it up with DATA stalling
    `stall` seconds, and count the most deliveries that were in DATA at once."""
    handler = CountingHandler()
    handler.stall["DATA"] = stall
    relay = start(down_upstream, DELIVERY_MODE="queue", QUEUE_WORKERS=str(workers),
                  QUEUE_RETRY_MIN="0.2", QUEUE_RETRY_MAX="0.2")
    for number in range(messages):
        assert QUEUED.match(send(relay, f"message {number}"))
    upstream = Upstream(port=down_upstream.port, handler=handler)
    try:
        wait_until(lambda: len(handler.messages) == messages, timeout=60,
                   what=f"all {messages}")
    finally:
        upstream.stop()
    return handler.most_in_data


def test_a_slow_upstream_gets_more_deliveries_at_once(start, down_upstream):
    # 0.4 s a message: sixteen at a time (the least) would drain slowly; the workers
    # follow the upstream's pace up to QUEUE_WORKERS (never more).
    most = most_deliveries_at_once(start, down_upstream, workers=30, stall=0.4,
                                   messages=50)
    assert 20 <= most <= 30, most


def test_a_fast_upstream_wakes_no_parked_worker(start, upstream):
    # With a fast upstream sixteen workers are active and the rest of QUEUE_WORKERS
    # parked; they are woken only when a slower upstream wants more. (A count that
    # missed the workers handed a message but not yet running woke all of them at
    # nearly every delivery: some 10 % of the event loop at one client.)
    relay = start(upstream, DELIVERY_MODE="queue", QUEUE_WORKERS="50", LOG_LEVEL="DEBUG")

    def client(number: int) -> None:
        with relay.client() as session:
            for sequence in range(15):
                assert QUEUED.match(try_message(session, message(f"{number}-{sequence}"),
                                                (RECIPIENT,)))

    def clients_at_once() -> None:
        threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)

    # The first deliveries (the delivery process starting, its first session) make
    # the upstream look slow for a while: more workers, rightly. Then it is fast.
    clients_at_once()
    wait_until(lambda: len(upstream.messages) == 60, what="the first deliveries")
    warmed_up = len(relay.log())
    clients_at_once()
    wait_until(lambda: len(upstream.messages) == 120, what="every delivery")
    assert "queue-workers-wanted" not in relay.log()[warmed_up:], relay.log()[warmed_up:]


def test_queue_workers_below_the_least_still_bounds_deliveries(start, down_upstream):
    most = most_deliveries_at_once(start, down_upstream, workers=3, stall=0.3,
                                   messages=10)
    assert most <= 3, most


@contextlib.contextmanager
def stalling_upstream(down_upstream, stall: float):
    """The upstream up on down_upstream's port, each DATA stalling `stall` seconds:
    its CountingHandler."""
    handler = CountingHandler()
    handler.stall["DATA"] = stall
    upstream = Upstream(port=down_upstream.port, handler=handler)
    try:
        yield handler
    finally:
        upstream.stop()


def _holders(relay, queue_id: str) -> list[tuple[str, str | None]]:
    with sqlite3.connect(relay.workdir / "spool" / "queue.db") as connection:
        return connection.execute(
            "SELECT status, locked_by FROM recipients WHERE message_id = ?",
            (queue_id,)).fetchall()


def test_a_message_stored_while_every_worker_is_busy_is_claimed_with_its_commit(
        start, down_upstream):
    # Both workers stall in DATA; the next messages are stored already claimed by
    # this relay and wait in memory for the first free worker (no claim transaction,
    # which would read each body back and hold the store meanwhile).
    with stalling_upstream(down_upstream, 1.0) as handler:
        relay = start(down_upstream, DELIVERY_MODE="queue", QUEUE_WORKERS="2")
        for number in range(2):
            assert QUEUED.match(send(relay, f"busy {number}"))
        wait_until(lambda: handler.in_data == 2, what="both workers in DATA")
        waiting = [QUEUED.match(send(relay, f"waiting {n}")).group(1) for n in range(3)]
        for queue_id in waiting:
            [(status, holder)] = _holders(relay, queue_id)
            assert status == "delivering" and holder, (status, holder)
        assert handler.most_in_data == 2
        wait_until(lambda: len(handler.messages) == 5, timeout=30, what="all five")
        assert sorted(subjects(handler)) == sorted(
            [f"busy {n}" for n in range(2)] + [f"waiting {n}" for n in range(3)])
        assert handler.most_in_data <= 2


def test_a_claim_that_waited_past_half_its_lease_goes_back_to_the_store(
        start, down_upstream):
    # The one worker stalls longer than half the lease: the message claimed at its
    # commit is not delivered from memory (another relay may take it once the lease
    # ends, before a renewal), but claimed again from the store. Delivered once.
    with stalling_upstream(down_upstream, 3.0) as handler:
        relay = start(down_upstream, DELIVERY_MODE="queue", QUEUE_WORKERS="1",
                      QUEUE_LEASE_SECONDS="5", LOG_LEVEL="DEBUG")
        assert QUEUED.match(send(relay, "first"))
        wait_until(lambda: handler.in_data == 1, what="the worker in DATA")
        second = QUEUED.match(send(relay, "second")).group(1)
        wait_until(lambda: len(handler.messages) == 2, timeout=30, what="both")
        time.sleep(1)
        assert sorted(subjects(handler)) == ["first", "second"]
        assert f"claim-aged id={second}" in relay.log()
        assert relay.log().count(f"delivered id={second}") == 1
