"""Issue #10: two relay processes sharing one queue in a real PostgreSQL (started by
the test from Debian's binaries, see postgres_server.py). Every message is delivered,
and none by both relays."""

from __future__ import annotations

import collections
import email
import re
import time

import pytest
from conftest import (
    RECIPIENT,
    Upstream,
    UpstreamHandler,
    free_port,
    message,
    try_message,
)
from postgres_server import postgres_server, skip_or_fail_without_postgres

QUEUED = re.compile(r"^250 2\.0\.0 Queued as ([0-9a-f]{16})$")


@pytest.fixture(scope="module")
def postgres():
    skip_or_fail_without_postgres()
    with postgres_server() as server:
        yield server


def test_two_relays_share_one_queue_and_deliver_each_message_once(start, postgres):
    url = postgres.create_database()
    port = free_port()  # the upstream is down while the messages come in
    settings = {"DELIVERY_MODE": "queue", "QUEUE_URL": url, "QUEUE_WORKERS": "3",
                "QUEUE_RETRY_MIN": "0.3", "QUEUE_RETRY_MAX": "0.6"}
    relays = [start(None, RELAY_PORT=str(port), **settings) for _ in range(2)]
    ids = []
    for number in range(30):
        relay = relays[number % 2]
        with relay.client() as client:
            reply = try_message(client, message(f"shared {number}"))
        match = QUEUED.match(reply)
        assert match, reply
        ids.append(match.group(1))
    handler = UpstreamHandler()
    # Slow enough that one relay's three workers cannot drain all 30 before the other
    # relay's dispatcher looks again (it polls once a second).
    handler.stall["DATA"] = 0.15
    upstream = Upstream(port=port, handler=handler)
    try:
        deadline = time.monotonic() + 60
        while len(handler.messages) < 30 and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.5)  # a duplicate would arrive meanwhile
        subjects = collections.Counter(email.message_from_bytes(m.content)["Subject"]
                                       for m in handler.messages)
        assert subjects == collections.Counter(f"shared {n}" for n in range(30))
        assert all(m.rcpt_tos == [RECIPIENT] for m in handler.messages)
        logs = relays[0].log() + relays[1].log()
        for queue_id in ids:
            assert logs.count(f"delivered id={queue_id}") == 1
        # Both relays took part in delivering.
        assert all("delivered id=" in relay.log() for relay in relays)
    finally:
        upstream.stop()


def test_a_relay_killed_mid_delivery_leaves_its_claims_to_the_other(start_relay, postgres):
    url = postgres.create_database()
    handler = UpstreamHandler()
    handler.stall["DATA"] = 30  # the first relay's delivery hangs until it is killed
    upstream = Upstream(handler=handler)
    try:
        settings = {"DELIVERY_MODE": "queue", "QUEUE_URL": url, "QUEUE_LEASE_SECONDS": "5",
                    "TIMEOUT": "60"}
        first = start_relay(upstream, **settings)
        with first.client() as client:
            reply = try_message(client, message("orphaned"))
        queue_id = QUEUED.match(reply).group(1)
        deadline = time.monotonic() + 20
        while not handler.sessions and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # the data is on its way
        first.process.kill()
        first.process.wait()
        handler.stall.clear()
        second = start_relay(upstream, **settings)
        second.wait_for_log(f"delivered id={queue_id}", timeout=40)
    finally:
        upstream.stop()
