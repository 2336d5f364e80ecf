"""relay/store.py against real databases: SQLite files in tmp_path and a PostgreSQL
server started for the session (tests/postgres_server.py). Every test that is not about
one backend runs on both, through the `open_store` fixture.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from postgres_server import PostgresServer, free_port, skip_or_fail_without_postgres
from postgres_server import postgres_server as start_postgres

from relay.store import (
    FINAL,
    STATUSES,
    Attempt,
    GroupCommit,
    NewMessage,
    Result,
    SQLiteStore,
    Store,
    StoreError,
)

pytestmark = pytest.mark.timeout(120)

PROJECT = Path(__file__).resolve().parent.parent
T0 = 1_700_000_000.0            # a fixed "now" for tests that pass times themselves
LEASE = 30.0
_ids = itertools.count(1)


def new_message(*, recipients: tuple[str, ...] = ("a@example.com", "b@example.com"),
                received: float = T0, sender: str = "app@example.com",
                user: str | None = "relayuser", body: bytes | None = None,
                message_id: str | None = None,
                outcomes: dict[str, tuple[str, str]] | None = None) -> NewMessage:
    message_id = message_id or f"{next(_ids):016x}"
    if body is None:
        body = f"Subject: {message_id}\r\n\r\nHello.\r\n".encode()
    return NewMessage(id=message_id, received=received, user=user, peer="192.0.2.7",
                      sender=sender, body=body, recipients=list(recipients),
                      trace_id=f"trace-{message_id}", outcomes=outcomes or {})


def result(address: str, status: str, now: float, *, next_attempt: float | None = None,
           reply: str | None = None, tls: bool = True) -> Result:
    reply = reply or {"delivered": "250 2.0.0 Ok", "deferred": "451 4.3.0 try later",
                      "failed": "550 5.1.1 no such user"}[status]
    return Result(address=address, status=status, reply=reply, next_attempt=next_attempt,
                  attempt=Attempt(time=now, recipient=address, upstream="127.0.0.1:2525",
                                  reply=reply, duration=0.25, tls=tls))


def deliver_all(store: Store, message_id: str, now: float, status: str = "delivered",
                worker: str = "w") -> None:
    """Claims what is due and records `status` for every recipient of `message_id`."""
    for claim in store.claim(worker, now, LEASE, 1000):
        if claim.id == message_id:
            store.record(worker, claim.id,
                         [result(r.address, status, now) for r in claim.recipients], now)
        else:
            store.release_claims(worker)


# ---------------------------------------------------------------------------------------
# Fixtures: a Store on each backend
# ---------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    skip_or_fail_without_postgres()
    with start_postgres() as server:
        yield server


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A URL of an empty database of the backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/spool/queue.db"
    server: PostgresServer = request.getfixturevalue("postgres_server")
    return server.create_database()


@pytest.fixture
def open_store(store_url: str) -> Iterator[Callable[..., Store]]:
    """Opens Stores on the test's database (each call: another connection, as another
    process or relay would have); all are closed at the end."""
    opened: list[Store] = []

    def open_one(archive: str = "off") -> Store:
        store = Store.open(store_url, archive=archive)
        opened.append(store)
        return store

    yield open_one
    for store in opened:
        store.close()


@pytest.fixture
def store(open_store: Callable[..., Store]) -> Store:
    return open_store()


# ---------------------------------------------------------------------------------------
# add, durability, group commit
# ---------------------------------------------------------------------------------------

def test_add_of_more_messages_than_one_insert_statement_holds(store: Store) -> None:
    # insert_all_in writes ROWS_PER_INSERT rows per statement: the rest go in more.
    messages = [new_message() for _ in range(Store.ROWS_PER_INSERT * 2 + 7)]
    store.add(messages)
    page, _ = store.list(limit=1000)
    assert {record.id for record in page} == {message.id for message in messages}
    shown = store.show(messages[-1].id)
    assert shown is not None
    assert [r.address for r in shown.recipients] == ["a@example.com", "b@example.com"]


def test_add_is_durable_across_reopen(open_store: Callable[..., Store]) -> None:
    first = open_store()
    message = new_message()
    first.add([message])
    first.close()

    record = open_store().show(message.id)
    assert record is not None
    assert (record.received, record.user, record.peer, record.sender, record.trace_id) == (
        T0, "relayuser", "192.0.2.7", "app@example.com", message.trace_id)
    assert record.size == len(message.body) and record.has_body
    assert [(r.address, r.status, r.attempts, r.next_attempt) for r in record.recipients] == [
        ("a@example.com", "queued", 0, T0), ("b@example.com", "queued", 0, T0)]
    assert open_store().raw(message.id) == message.body


def test_add_is_one_transaction(store: Store) -> None:
    """A batch with a duplicate id stores nothing of the batch."""
    existing = new_message()
    store.add([existing])
    fresh = new_message()
    with pytest.raises(StoreError):
        store.add([fresh, new_message(message_id=existing.id)])
    assert store.show(fresh.id) is None
    assert store.stats(T0)["messages"] == 1


def test_add_keeps_bytes_and_repeated_recipients_once(store: Store) -> None:
    body = bytes(range(256)) * 40 + b"\r\n.\r\n"  # binary, and a dot line not stuffed
    message = new_message(body=body, recipients=("a@example.com", "a@example.com"),
                          sender="", user=None)
    store.add([message])
    assert store.raw(message.id) == body
    record = store.show(message.id)
    assert record is not None and record.sender == "" and record.user is None
    assert [r.address for r in record.recipients] == ["a@example.com"]


def test_add_with_outcomes(open_store: Callable[..., Store]) -> None:
    """Sync mode's outcomes: final recipients are stored as such; the rest queued."""
    store = open_store("full")
    partial = new_message(outcomes={"a@example.com": ("delivered", "250 2.0.0 Ok")})
    store.add([partial])
    record = store.show(partial.id)
    assert record is not None
    states = {r.address: (r.status, r.last_reply, r.next_attempt) for r in record.recipients}
    assert states == {"a@example.com": ("delivered", "250 2.0.0 Ok", None),
                      "b@example.com": ("queued", None, T0)}
    claims = store.claim("w", T0, LEASE, 10)
    assert [[r.address for r in c.recipients] for c in claims] == [["b@example.com"]]

    with pytest.raises(ValueError):
        store.add([new_message(outcomes={"a@example.com": ("bogus", "x")})])


@pytest.mark.parametrize("archive", ["off", "metadata", "full"])
def test_add_all_final_is_archived_at_once(open_store: Callable[..., Store],
                                           archive: str) -> None:
    store = open_store(archive)
    message = new_message(outcomes={"a@example.com": ("delivered", "250 2.0.0 Ok"),
                                    "b@example.com": ("failed", "550 5.1.1 no")})
    store.add([message])
    assert store.usage().messages == 0
    record = store.show(message.id)
    if archive == "off":
        assert record is None
        return
    assert record is not None and record.size == len(message.body)
    assert record.has_body == (archive == "full")
    assert store.raw(message.id) == (message.body if archive == "full" else None)


def test_group_commit_many_concurrent_adds(store: Store) -> None:
    per_transaction: dict[int, int] = {}
    insert = store.insert_all_in

    def counting_insert(tx: Any, messages: list[NewMessage], now: float) -> None:
        per_transaction[id(tx)] = per_transaction.get(id(tx), 0) + len(messages)
        insert(tx, messages, now)

    store.insert_all_in = counting_insert  # type: ignore[method-assign]
    messages = [new_message() for _ in range(300)]

    async def main() -> None:
        group = GroupCommit(store)
        try:
            await asyncio.wait_for(asyncio.gather(*(group.add(m) for m in messages)), 90)
        finally:
            group.close()

    asyncio.run(main())
    batches = list(per_transaction.values())
    assert sum(batches) == 300
    assert max(batches) > 1  # they shared transactions
    page, _ = store.list(limit=1000)
    assert {record.id for record in page} == {message.id for message in messages}


def test_group_commit_failed_batch_fails_every_caller(store: Store) -> None:
    existing = new_message()
    store.add([existing])
    entered, gate = threading.Event(), threading.Event()
    insert = store.insert_all_in
    first = new_message()

    def gated_insert(tx: Any, messages: list[NewMessage], now: float) -> None:
        if any(message.id == first.id for message in messages):
            entered.set()
            gate.wait(60)  # the first batch waits, so everything else makes the second
        insert(tx, messages, now)

    store.insert_all_in = gated_insert  # type: ignore[method-assign]
    rest = [new_message() for _ in range(5)] + [new_message(message_id=existing.id)]

    async def main() -> list[BaseException | None]:
        group = GroupCommit(store)
        try:
            first_task = asyncio.ensure_future(group.add(first))
            assert await asyncio.to_thread(entered.wait, 60)  # the writer took `first` alone
            tasks = [asyncio.ensure_future(group.add(m)) for m in rest]
            await asyncio.sleep(0)  # each has queued its message
            gate.set()
            await asyncio.wait_for(first_task, 60)
            return await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)
        finally:
            group.close()

    outcomes = asyncio.run(main())
    assert store.show(first.id) is not None
    assert all(isinstance(outcome, StoreError) for outcome in outcomes), outcomes
    assert all(store.show(m.id) is None for m in rest[:-1])


def test_group_commit_close_commits_what_waits_then_refuses(store: Store) -> None:
    async def main() -> None:
        group = GroupCommit(store)
        task = asyncio.ensure_future(group.add(new_message()))
        await asyncio.sleep(0)
        await asyncio.to_thread(group.close)
        await asyncio.wait_for(task, 30)
        with pytest.raises(StoreError):
            await group.add(new_message())

    asyncio.run(main())
    assert store.usage().messages == 1


def test_group_commit_alone_outcome_rides_with_the_next_message(store: Store) -> None:
    """record(alone=True) (SQLite): committed in the next add's transaction, or by the
    writer after RECORD_LINGER when no message comes; stored either way on return."""
    first, second = new_message(), new_message()
    store.add([first, second])
    claims = store.claim("worker-1", time.time(), 30, 2)
    per_transaction: list[tuple[int, int]] = []  # (adds, records) per transaction
    write_batch = GroupCommit._write_batch

    def counting(group: GroupCommit, messages: list[NewMessage], records: list) -> Any:
        per_transaction.append((len(messages), len(records)))
        return write_batch(group, messages, records)

    def delivered(claim: Any) -> list[Result]:
        now = time.time()
        return [Result(recipient.address, "delivered", "250 ok", None,
                       Attempt(now, recipient.address, "up:25", "250 ok", 0.01, False))
                for recipient in claim.recipients]

    async def main() -> None:
        group = GroupCommit(store)
        group._write_batch = functools.partial(counting, group)  # type: ignore[method-assign]
        try:
            riding = asyncio.ensure_future(group.record(
                "worker-1", claims[0].id, delivered(claims[0]), time.time(), alone=True))
            await asyncio.sleep(0)
            assert not riding.done()
            await group.add(new_message(), alone=True)
            await asyncio.sleep(0)  # the record() coroutine returns on the next turn
            assert riding.done() and riding.exception() is None
            # No message comes: the writer takes it after the linger.
            await asyncio.wait_for(group.record("worker-1", claims[1].id,
                                                delivered(claims[1]), time.time(),
                                                alone=True), 30)
        finally:
            group.close()

    asyncio.run(main())
    assert store.show(first.id) is None and store.show(second.id) is None
    if store.commits_on_callers_thread:
        assert per_transaction == [(1, 1), (0, 1)]


def test_group_commit_after_close_fails_a_riding_outcome_instead_of_losing_it(
        store: Store) -> None:
    message = new_message()
    store.add([message])
    (claim,) = store.claim("worker-1", time.time(), 30, 1)

    async def main() -> None:
        group = GroupCommit(store)
        await asyncio.to_thread(group.close)
        now = time.time()
        riding = asyncio.ensure_future(group.record("worker-1", claim.id, [Result(
            recipient.address, "delivered", "250 ok", None,
            Attempt(now, recipient.address, "up:25", "250 ok", 0.01, False))
            for recipient in claim.recipients], now, alone=True))
        await asyncio.sleep(0)
        with pytest.raises(StoreError):
            await group.add(new_message(), alone=True)
        with pytest.raises(StoreError):
            await asyncio.wait_for(riding, 10)

    asyncio.run(main())


def test_group_commit_alone_writes_on_the_callers_thread_when_the_writer_is_idle(
        store: Store) -> None:
    """A lone client's commit skips the hop to the writer thread (SQLite); with the
    writer busy it waits its turn there as usual. Either way it is stored on return."""
    threads: list[str] = []
    insert = store.insert_all_in
    entered, gate = threading.Event(), threading.Event()
    held = new_message()

    def noting_insert(tx: Any, messages: list[NewMessage], now: float) -> None:
        threads.append(threading.current_thread().name)
        if any(message.id == held.id for message in messages):
            entered.set()
            gate.wait(60)
        insert(tx, messages, now)

    store.insert_all_in = noting_insert  # type: ignore[method-assign]
    alone, behind = new_message(), new_message()

    async def main() -> None:
        group = GroupCommit(store)
        try:
            await group.add(alone, alone=True)
            assert store.show(alone.id) is not None
            busy = asyncio.ensure_future(group.add(held))
            assert await asyncio.to_thread(entered.wait, 60)
            waiting = asyncio.ensure_future(group.add(behind, alone=True))
            await asyncio.sleep(0.05)
            assert not waiting.done()  # behind the writer's batch, not beside it
            gate.set()
            await asyncio.wait_for(asyncio.gather(busy, waiting), 60)
        finally:
            group.close()

    asyncio.run(main())
    inline = store.commits_on_callers_thread
    assert threads[0] == ("MainThread" if inline else "queue-group-commit")
    assert threads[1:] == ["queue-group-commit"] * 2
    assert store.show(behind.id) is not None


# ---------------------------------------------------------------------------------------
# claim, renew, record, release_claims
# ---------------------------------------------------------------------------------------

def test_claim_marks_delivering_until_the_lease_expires(open_store: Callable[..., Store]
                                                        ) -> None:
    store, other_relay = open_store(), open_store()
    messages = [new_message(received=T0 + i) for i in range(3)]
    store.add(messages)

    claims = store.claim("w1", T0 + 10, LEASE, 10)
    assert [c.id for c in claims] == [m.id for m in messages]  # oldest next_attempt first
    assert claims[0].body == messages[0].body and claims[0].sender == "app@example.com"
    assert all(r.status == "delivering" for c in claims for r in c.recipients)
    record = store.show(messages[0].id)
    assert record is not None and {r.status for r in record.recipients} == {"delivering"}

    assert other_relay.claim("w2", T0 + 10, LEASE, 10) == []
    assert other_relay.claim("w2", T0 + 10 + LEASE - 1, LEASE, 10) == []
    taken = other_relay.claim("w2", T0 + 10 + LEASE + 1, LEASE, 10)
    assert sorted(c.id for c in taken) == sorted(m.id for m in messages)


def test_claim_takes_only_what_is_due_up_to_the_limit(store: Store) -> None:
    later = new_message(received=T0 + 100)
    earlier = [new_message(received=T0 + i) for i in range(5)]
    store.add([later, *earlier])
    assert store.claim("w", T0 - 1, LEASE, 10) == []
    claims = store.claim("w", T0 + 50, LEASE, 3)
    assert [c.id for c in claims] == [m.id for m in earlier[:3]]
    assert [c.id for c in store.claim("w", T0 + 50, LEASE, 10)] == [
        m.id for m in earlier[3:]]
    assert store.claim("w", T0 + 0, LEASE, 0) == []


def test_concurrent_claims_never_share_a_recipient(open_store: Callable[..., Store]
                                                   ) -> None:
    """Two relays (two Stores on one database), two threads each, claiming at once."""
    relays = [open_store(), open_store()]
    messages = [new_message(received=T0 + i % 7) for i in range(120)]
    relays[0].add(messages)
    taken: dict[str, list[tuple[str, str]]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def worker(name: str, relay: Store) -> None:
        mine = taken.setdefault(name, [])
        try:
            start.wait(30)
            while claims := relay.claim(name, T0 + 60, 600.0, 3):
                mine.extend((c.id, r.address) for c in claims for r in c.recipients)
        except Exception as error:  # noqa: BLE001 - the test reports it below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(f"w{i}", relays[i % 2]))
               for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(90)
    assert not errors
    everything = [pair for pairs in taken.values() for pair in pairs]
    assert len(everything) == len(set(everything)) == 240
    assert {message_id for message_id, _ in everything} == {m.id for m in messages}


def test_renew_extends_the_lease(open_store: Callable[..., Store]) -> None:
    store, other = open_store(), open_store()
    message = new_message()
    store.add([message])
    store.claim("w1", T0, 10, 1)
    store.renew("w1", message.id, T0 + 100)
    store.renew("w2", message.id, T0 + 1000)  # not its claim: nothing changes
    assert other.claim("w2", T0 + 50, 10, 1) == []
    assert [c.id for c in other.claim("w2", T0 + 101, 10, 1)] == [message.id]


def test_record_transitions_and_attempts(store: Store) -> None:
    message = new_message(recipients=("a@example.com", "b@example.com", "c@example.com"))
    store.add([message])
    store.claim("w", T0, LEASE, 1)
    store.record("w", message.id, [
        result("a@example.com", "delivered", T0 + 1),
        result("b@example.com", "deferred", T0 + 1, next_attempt=T0 + 300, tls=False),
    ], T0 + 1)

    record = store.show(message.id)
    assert record is not None
    states = {r.address: (r.status, r.attempts, r.next_attempt, r.last_reply)
              for r in record.recipients}
    assert states == {
        "a@example.com": ("delivered", 1, None, "250 2.0.0 Ok"),
        "b@example.com": ("deferred", 1, T0 + 300, "451 4.3.0 try later"),
        "c@example.com": ("delivering", 0, T0, None),  # still this worker's
    }
    assert [(a.recipient, a.reply, a.upstream, a.duration, a.tls) for a in record.attempts] == [
        ("a@example.com", "250 2.0.0 Ok", "127.0.0.1:2525", 0.25, True),
        ("b@example.com", "451 4.3.0 try later", "127.0.0.1:2525", 0.25, False)]

    store.record("w", message.id, [result("c@example.com", "failed", T0 + 2)], T0 + 2)
    assert store.claim("w", T0 + 299, LEASE, 10) == []
    claims = store.claim("w", T0 + 300, LEASE, 10)
    assert [[r.address for r in c.recipients] for c in claims] == [["b@example.com"]]
    assert claims[0].recipients[0].attempts == 1

    with pytest.raises(ValueError):
        store.record("w", message.id, [result("b@example.com", "held", T0, reply="x")], T0)


def test_record_after_a_lost_lease_changes_nothing_but_history(
        open_store: Callable[..., Store]) -> None:
    store = open_store("full")
    message = new_message(recipients=("a@example.com",))
    store.add([message])
    store.claim("slow", T0, LEASE, 1)
    store.claim("fast", T0 + LEASE + 1, LEASE, 1)  # slow's lease ran out
    store.record("slow", message.id, [result("a@example.com", "failed", T0 + 40)], T0 + 40)
    record = store.show(message.id)
    assert record is not None
    assert [(r.status, r.attempts) for r in record.recipients] == [("delivering", 0)]
    assert len(record.attempts) == 1
    store.record("fast", message.id, [result("a@example.com", "delivered", T0 + 41)],
                 T0 + 41)
    record = store.show(message.id)
    assert record is not None and record.recipients[0].status == "delivered"


def test_record_for_a_deleted_message_is_ignored(store: Store) -> None:
    message = new_message()
    store.add([message])
    store.claim("w", T0, LEASE, 1)
    assert store.delete(message.id)
    store.record("w", message.id, [result("a@example.com", "delivered", T0)], T0)
    assert store.show(message.id) is None


@pytest.mark.parametrize("archive", ["off", "metadata", "full"])
def test_done_message_follows_the_archive_rule(open_store: Callable[..., Store],
                                               archive: str) -> None:
    store = open_store(archive)
    message = new_message()
    store.add([message])
    store.claim("w", T0, LEASE, 1)
    store.record("w", message.id, [result("a@example.com", "delivered", T0 + 1),
                                   result("b@example.com", "failed", T0 + 1)], T0 + 1)
    record = store.show(message.id)
    if archive == "off":
        assert record is None
        assert store.stats(T0)["messages"] == 0
        assert sum(store.stats(T0)["recipients"].values()) == 0
        return
    assert record is not None
    assert record.size == len(message.body)
    assert record.has_body == (archive == "full")
    assert store.raw(message.id) == (message.body if archive == "full" else None)
    assert {r.status for r in record.recipients} == {"delivered", "failed"}
    assert len(record.attempts) == 2
    assert store.usage().messages == 0


def test_release_claims_restores_the_prior_state(open_store: Callable[..., Store]) -> None:
    store, other = open_store(), open_store()
    fresh, retried = new_message(recipients=("a@example.com",)), new_message(
        recipients=("b@example.com",))
    store.add([fresh, retried])
    store.claim("w1", T0, LEASE, 2)
    store.record("w1", retried.id,
                 [result("b@example.com", "deferred", T0, next_attempt=T0 + 5)], T0)
    assert len(store.claim("w1", T0 + 10, LEASE, 2)) == 1  # the deferred one, claimed again
    # Let fresh's first lease run out: w2 takes it over, then w1 gives up its own.
    assert [c.id for c in other.claim("w2", T0 + LEASE + 1, LEASE, 2)] == [fresh.id]
    store.release_claims("w1")

    states = {}
    for message in (fresh, retried):
        record = store.show(message.id)
        assert record is not None
        states[message.id] = (record.recipients[0].status, record.recipients[0].next_attempt)
    assert states == {fresh.id: ("delivering", T0), retried.id: ("deferred", T0 + 5)}
    assert [c.id for c in other.claim("w3", T0 + 10, LEASE, 2)] == [retried.id]

    other.release_claims("w2")
    other.release_claims("w3")
    record = store.show(fresh.id)
    assert record is not None and record.recipients[0].status == "queued"
    record = store.show(retried.id)
    assert record is not None and record.recipients[0].status == "deferred"


# ---------------------------------------------------------------------------------------
# The operator's view
# ---------------------------------------------------------------------------------------

def test_list_filters(store: Store) -> None:
    alice = new_message(received=T0 + 1, sender="alice@example.com", user="alice",
                        recipients=("x@example.org",))
    bob = new_message(received=T0 + 2, sender="Bob@Example.com", user=None,
                      recipients=("y@example.org", "z@example.org"))
    carol = new_message(received=T0 + 3, sender="carol@example.com", user="carol",
                        recipients=("x@example.org",))
    store.add([alice, bob, carol])
    store.hold(carol.id)

    def ids(**filters: object) -> list[str]:
        page, cursor = store.list(**filters)  # type: ignore[arg-type]
        assert cursor is None
        assert all(record.attempts == [] for record in page)
        return [record.id for record in page]

    assert ids() == [carol.id, bob.id, alice.id]
    assert ids(status="held") == [carol.id]
    assert ids(status="queued") == [bob.id, alice.id]
    assert ids(status="failed") == []
    assert ids(rcpt="X@example.org") == [carol.id, alice.id]
    assert ids(rcpt="z@example.org") == [bob.id]
    assert ids(sender="bob@example.com") == [bob.id]
    assert ids(user="alice") == [alice.id]
    assert ids(since=T0 + 2) == [carol.id, bob.id]
    assert ids(until=T0 + 2) == [alice.id]
    assert ids(since=T0 + 1, until=T0 + 3, rcpt="x@example.org") == [alice.id]
    page, _ = store.list(rcpt="z@example.org")
    assert [r.address for r in page[0].recipients] == ["y@example.org", "z@example.org"]

    with pytest.raises(ValueError):
        store.list(status="lost")
    with pytest.raises(ValueError):
        store.list(limit=0)
    with pytest.raises(ValueError):
        store.list(cursor="not a cursor")


def test_list_pages_have_no_duplicates_and_no_gaps(store: Store) -> None:
    # Many messages share a received time: the id breaks the tie.
    messages = [new_message(received=T0 + i // 4, recipients=("a@example.com",))
                for i in range(57)]
    store.add(messages)
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        page, cursor = store.list(limit=10, cursor=cursor)
        seen += [record.id for record in page]
        pages += 1
        if pages == 2:
            store.add([new_message(received=T0 + 1000)])  # newer: not in this listing
        if cursor is None:
            break
    assert pages == 6
    expected = sorted(messages, key=lambda m: (m.received, m.id), reverse=True)
    assert seen == [m.id for m in expected]

    held = store.list(status="queued", limit=57)
    assert held[1] is not None  # 58 queued messages now: one more page
    assert len(store.list(status="queued", limit=57, cursor=held[1])[0]) == 1


def test_show_raw_retry_hold_release_delete(store: Store) -> None:
    import time

    message = new_message()
    store.add([message])
    assert store.show("0" * 16) is None and store.raw("0" * 16) is None
    assert store.retry("0" * 16) == 0 and store.hold("0" * 16) == 0
    assert store.release("0" * 16) == 0 and store.delete("0" * 16) is False

    store.claim("w", T0, LEASE, 1)
    store.record("w", message.id, [
        result("a@example.com", "deferred", T0, next_attempt=T0 + 10 ** 9),
        result("b@example.com", "deferred", T0, next_attempt=T0 + 10 ** 9)], T0)
    now = time.time()
    assert store.claim("w", now + 1, LEASE, 1) == []
    assert store.retry(message.id) == 2
    assert [c.id for c in store.claim("w", now + 60, LEASE, 1)] == [message.id]
    store.release_claims("w")

    assert store.hold(message.id) == 2
    record = store.show(message.id)
    assert record is not None and {r.status for r in record.recipients} == {"held"}
    assert store.claim("w", now + 10 ** 10, LEASE, 1) == []
    assert store.retry(None) == 0  # held is not waiting
    assert store.release(message.id) == 2
    record = store.show(message.id)
    assert record is not None and {r.status for r in record.recipients} == {"queued"}
    assert all(r.next_attempt is not None and r.next_attempt <= time.time() + 1
               for r in record.recipients)

    other = new_message(received=T0 + 5)
    store.add([other])
    assert store.retry(None) == 4
    assert store.raw(message.id) == message.body
    assert store.delete(message.id) is True
    assert store.show(message.id) is None and store.raw(message.id) is None
    assert store.delete(message.id) is False
    assert store.show(other.id) is not None


def test_stats(open_store: Callable[..., Store]) -> None:
    store = open_store("full")
    assert store.stats(T0) == {"recipients": dict.fromkeys(STATUSES, 0), "messages": 0,
                               "oldest_queued_age": None}
    oldest = new_message(received=T0 - 500, recipients=("d@example.com", "f@example.com"))
    held = new_message(received=T0 - 900, recipients=("h@example.com",))
    queued = new_message(received=T0 - 100, recipients=("q@example.com", "r@example.com"))
    store.add([oldest, held])
    store.claim("w", T0, LEASE, 10)
    store.record("w", oldest.id, [result("d@example.com", "delivered", T0),
                                  result("f@example.com", "failed", T0)], T0)
    store.release_claims("w")
    store.hold(held.id)
    store.add([queued])
    store.claim("w", T0, LEASE, 1)  # the oldest due: queued's two recipients
    stats = store.stats(T0)
    assert stats["recipients"] == {"queued": 0, "deferred": 0, "delivering": 2,
                                   "delivered": 1, "failed": 1, "held": 1}
    assert stats["messages"] == 3
    assert stats["oldest_queued_age"] == pytest.approx(100)


def test_usage(store: Store) -> None:
    small, large = new_message(body=b"x" * 100), new_message(body=b"y" * 5000)
    store.add([small, large])
    usage = store.usage()
    assert (usage.messages, usage.bytes) == (2, 5100)
    if isinstance(store, SQLiteStore):
        assert usage.free_bytes is not None and usage.free_bytes > 0
    else:
        assert usage.free_bytes is None
    deliver_all(store, small.id, T0)
    assert (store.usage().messages, store.usage().bytes) == (1, 5000)


def test_purge_keeps_what_is_not_final_and_honours_the_limits(
        open_store: Callable[..., Store]) -> None:
    store = open_store("full")
    pending = new_message(received=T0 - 10 ** 6, body=b"p" * 1000)  # very old, not done
    store.add([pending])
    store.hold(pending.id)
    done = []
    for age in (1000, 800, 600, 400, 200):  # done_at = T0 - age
        message = new_message(received=T0 - age - 1, body=b"d" * 100)
        store.add([message])
        deliver_all(store, message.id, T0 - age)
        done.append(message)

    def kept() -> list[str]:
        page, _ = store.list(limit=100)
        return sorted(record.id for record in page)

    everything = sorted(m.id for m in [pending, *done])
    assert store.purge(T0, max_age=0, max_messages=0, max_bytes=0) == 0
    assert kept() == everything
    assert store.purge(T0, max_age=700, max_messages=0, max_bytes=0) == 2  # 1000, 800
    assert kept() == sorted(m.id for m in [pending, *done[2:]])
    assert store.purge(T0, max_age=10 ** 7, max_messages=2, max_bytes=0) == 1  # 600
    assert kept() == sorted(m.id for m in [pending, *done[3:]])
    assert store.purge(T0, max_age=0, max_messages=0, max_bytes=150) == 1  # 400
    assert kept() == sorted(m.id for m in [pending, done[4]])
    assert store.purge(T0 + 10 ** 8, max_age=1, max_messages=1, max_bytes=1) == 1
    assert kept() == [pending.id]
    record = store.show(pending.id)
    assert record is not None and store.raw(pending.id) == pending.body


def test_purge_max_bytes_counts_the_bodies_kept(open_store: Callable[..., Store]) -> None:
    """archive=metadata keeps no bodies: only the message count limits it."""
    store = open_store("metadata")
    for age in (30, 20, 10):
        message = new_message(received=T0 - age - 1, body=b"m" * 10_000)
        store.add([message])
        deliver_all(store, message.id, T0 - age)
    assert store.purge(T0, max_age=0, max_messages=0, max_bytes=1) == 0
    assert store.purge(T0, max_age=0, max_messages=1, max_bytes=1) == 2


# ---------------------------------------------------------------------------------------
# Opening: the schema, errors
# ---------------------------------------------------------------------------------------

def test_schema_version_is_recorded_and_an_existing_store_reopens(
        open_store: Callable[..., Store]) -> None:
    from relay.store import SCHEMA_VERSION

    store = open_store()
    assert store.schema_version() == SCHEMA_VERSION
    message = new_message()
    store.add([message])
    again = open_store()
    assert again.schema_version() == SCHEMA_VERSION
    assert again.show(message.id) is not None
    with again.transaction(write=False) as tx:
        assert tx.rows("SELECT COUNT(*) FROM schema_version")[0][0] == 1


def test_a_newer_schema_is_refused(open_store: Callable[..., Store]) -> None:
    store = open_store()
    with store.transaction(write=True) as tx:
        tx.run("UPDATE schema_version SET version = 99")
    with pytest.raises(StoreError, match="schema version 99"):
        open_store()


def test_sqlite_is_durable_and_shareable(tmp_path: Path) -> None:
    store = Store.open(f"sqlite:///{tmp_path}/q.db")
    try:
        assert isinstance(store, SQLiteStore)
        connection = store._connection
        assert connection is not None
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert connection.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert connection.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        assert connection.execute("PRAGMA busy_timeout").fetchone()[0] >= 10_000
        assert (tmp_path / "q.db").stat().st_mode & 0o077 == 0  # people's mail
    finally:
        store.close()


def test_sqlite_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    relative = Store.open("sqlite:///spool/deep/queue.db")
    relative.close()
    assert (tmp_path / "spool" / "deep" / "queue.db").is_file()
    absolute = Store.open(f"sqlite:///{tmp_path}/abs.db")  # sqlite:////tmp/...
    absolute.close()
    assert (tmp_path / "abs.db").is_file()


def test_sqlite_shared_with_another_process(tmp_path: Path) -> None:
    """The queue CLI opens the file while the relay writes: both go on."""
    url = f"sqlite:///{tmp_path}/shared.db"
    store = Store.open(url)
    try:
        child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
            import sys
            sys.path.insert(0, {str(PROJECT)!r})
            from relay.store import NewMessage, Store
            store = Store.open({url!r})
            for n in range(150):
                store.add([NewMessage(id=f"c{{n:015x}}", received=1.0, user=None,
                                      peer="127.0.0.1", sender="", body=b"x\\r\\n",
                                      recipients=["a@example.com"])])
                store.list(limit=5)
            store.close()
        """)], stderr=subprocess.PIPE)
        for _ in range(150):
            store.add([new_message(recipients=("a@example.com",))])
            store.claim("w", T0, LEASE, 2)
        _, stderr = child.communicate(timeout=90)
        assert child.returncode == 0, stderr.decode()
        assert store.stats(T0)["messages"] == 300
    finally:
        store.close()


def test_closed_store_raises(store: Store) -> None:
    store.close()
    with pytest.raises(StoreError, match="closed"):
        store.add([new_message()])


def test_open_errors_name_the_problem_without_the_password(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(StoreError) as error:
        Store.open(f"sqlite:///{blocker}/queue.db")
    assert "a-file" in str(error.value)
    with pytest.raises(StoreError):
        Store.open("sqlite:///:memory:")
    with pytest.raises(StoreError):
        Store.open("sqlite://relative-without-third-slash.db")
    not_sqlite = tmp_path / "garbage.db"
    not_sqlite.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError):
        Store.open(f"sqlite:///{not_sqlite}")

    for url in ("mysql://relay:hunter2-secret@127.0.0.1/queue", "hunter2-secret",
                "redis://:hunter2-secret@localhost/0"):
        with pytest.raises(StoreError) as error:
            Store.open(url)
        assert "hunter2-secret" not in str(error.value)
    with pytest.raises(StoreError):
        Store.open(f"sqlite:///{tmp_path}/q.db", archive="everything")


def test_constants_and_sqlite_version() -> None:
    assert set(FINAL) < set(STATUSES)
    assert sqlite3.sqlite_version_info >= (3, 35)  # the claim's UPDATE ... RETURNING


# ---------------------------------------------------------------------------------------
# PostgreSQL only
# ---------------------------------------------------------------------------------------

def test_postgresql_errors_never_show_the_password(postgres_server: PostgresServer
                                                   ) -> None:
    password = postgres_server.password
    nobody_listens = f"postgresql://relay:{password}@127.0.0.1:{free_port()}/relay"
    wrong_password = postgres_server.url().replace(password, "wrong-" + password[::-1])
    no_database = postgres_server.url("no_such_database")
    server = f"127.0.0.1:{postgres_server.port}"
    # libpq quotes a malformed connection string back: here the password itself.
    bad_escape = f"postgresql://relay:{password}%zz@{server}/relay"
    in_query = f"postgresql://{server}/relay?user=relay&password={password}&sslmode=bogus"
    for url in (nobody_listens, wrong_password, no_database, bad_escape, in_query):
        with pytest.raises(StoreError) as error:
            Store.open(url)
        text = str(error.value)
        assert "\n" not in text  # one log line
        assert password not in text and password[::-1] not in text, text
        assert "127.0.0.1" in text
    with pytest.raises(StoreError, match="Connection refused|connection failed"):
        Store.open(nobody_listens)


def test_postgresql_claim_skips_a_locked_message(postgres_server: PostgresServer) -> None:
    """While one relay holds a message's row lock (its claim not yet committed),
    another relay's claim passes it by at once instead of waiting."""
    url = postgres_server.create_database()
    holder, other = Store.open(url), Store.open(url)
    try:
        locked, free = new_message(received=T0), new_message(received=T0 + 1)
        holder.add([locked, free])
        claimed: list[list[str]] = []
        with holder.transaction(write=True) as tx:
            tx.rows("SELECT id FROM messages WHERE id = ? FOR UPDATE", (locked.id,))
            thread = threading.Thread(target=lambda: claimed.append(
                [c.id for c in other.claim("w2", T0 + 5, LEASE, 10)]))
            thread.start()
            thread.join(60)
            assert not thread.is_alive()  # it did not wait for the lock
        assert claimed == [[free.id]]
        assert [c.id for c in holder.claim("w1", T0 + 5, LEASE, 10)] == [locked.id]
    finally:
        holder.close()
        other.close()


def test_postgresql_store_survives_dropped_connections(postgres_server: PostgresServer) -> None:
    """A server restart (here: its backends terminated) costs no failed call."""
    import psycopg

    url = postgres_server.create_database()
    store = Store.open(url)
    try:
        store.add([new_message()])
        with psycopg.connect(postgres_server.url(), autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                          " WHERE application_name = 'smtp-relay' AND pid <> pg_backend_pid()")
        assert store.stats(T0)["messages"] == 1
    finally:
        store.close()


def test_without_postgres_binaries_skip_or_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    import postgres_server as helper

    monkeypatch.setattr(helper, "postgres_bin", lambda: None)
    monkeypatch.delenv("REQUIRE_POSTGRES", raising=False)
    with pytest.raises(pytest.skip.Exception, match="not found"):
        skip_or_fail_without_postgres()
    monkeypatch.setenv("REQUIRE_POSTGRES", "1")
    with pytest.raises(pytest.fail.Exception, match="REQUIRE_POSTGRES"):
        skip_or_fail_without_postgres()


def test_group_commit_records_outcomes_in_the_batch_transaction(store: Store) -> None:
    # A worker's outcome goes through the same writer as new messages: it is there
    # when record() returns, and the message it ends is gone (ARCHIVE=off).
    message = new_message()
    store.add([message])
    (claim,) = store.claim("worker-1", time.time(), 30, 1)

    async def main() -> None:
        group = GroupCommit(store)
        try:
            now = time.time()
            await group.record("worker-1", claim.id, [Result(
                recipient.address, "delivered", "250 ok", None,
                Attempt(now, recipient.address, "up:25", "250 ok", 0.01, False))
                for recipient in claim.recipients], now)
        finally:
            group.close()

    asyncio.run(main())
    assert store.show(message.id) is None


def test_a_new_sqlite_file_gets_8_kib_pages_and_an_old_one_keeps_its_own(
        tmp_path: Path) -> None:
    # Fewer writes per large body (see SQLiteStore.PAGE_SIZE); a file made with the
    # old 4 KiB pages opens as it is.
    new = SQLiteStore(f"sqlite:///{tmp_path / 'new.db'}")
    new.add([new_message()])
    new.close()
    old_path = tmp_path / "old.db"
    with sqlite3.connect(old_path) as connection:
        connection.execute("PRAGMA page_size=4096")
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("CREATE TABLE placeholder (x)")
    old = SQLiteStore(f"sqlite:///{old_path}")
    message = new_message()
    old.add([message])
    assert old.raw(message.id) == message.body
    old.close()
    for path, size in ((tmp_path / "new.db", 8192), (old_path, 4096)):
        with sqlite3.connect(path) as connection:
            assert connection.execute("PRAGMA page_size").fetchone()[0] == size, path


def test_a_commit_reaches_the_file_by_the_checkpointer_alone(tmp_path: Path) -> None:
    # Commits leave checkpoints to the store's own thread (SQLiteStore.
    # CHECKPOINT_SECONDS), so none waits for one: the file gets the message soon,
    # with nothing else written. (SQLite's own waits for 1,000 pages in the WAL.)
    path = tmp_path / "queue.db"
    store = SQLiteStore(f"sqlite:///{path}")
    size_before = path.stat().st_size
    store.add([new_message(body=os.urandom(200_000))])
    deadline = time.monotonic() + 10
    while path.stat().st_size < size_before + 200_000 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert path.stat().st_size >= size_before + 200_000
    store.close()


def test_forgetting_a_large_message_does_not_write_its_body_again(tmp_path: Path) -> None:
    # Debian's SQLite zeroes each page a DELETE frees: a delivered 100 KB body went to
    # the WAL a second time, as zeros (see SQLiteStore._connect: secure_delete=FAST).
    path = tmp_path / "queue.db"
    store = SQLiteStore(f"sqlite:///{path}")
    message = new_message(body=os.urandom(200_000))
    store.add([message])
    wal = path.with_name(path.name + "-wal")
    with sqlite3.connect(path) as connection:  # the WAL starts again after this
        # (busy while the store's checkpointer is at work: once more)
        while connection.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] \
                or wal.stat().st_size:
            time.sleep(0.05)
    assert store.delete(message.id)
    wal_size = wal.stat().st_size  # before close(), which checkpoints it
    store.close()
    # The row, its recipients, their indexes and the free list: some ten pages. The
    # body's own 25 pages are not written again.
    assert 0 < wal_size < len(message.body) / 2, wal_size


def test_record_all_in_one_transaction_forgets_the_finished_and_records_the_rest(
        store: Store) -> None:
    # GroupCommit's batch: the finished messages go in a few statements for all of
    # them; a lost lease, a deleted message and a partial result take the long way.
    lost = new_message(recipients=("a@example.com",))
    store.add([lost])
    assert len(store.claim("w", T0, LEASE, 1)) == 1
    done = [new_message(recipients=("a@example.com",)) for _ in range(3)]
    deleted = new_message()
    partial = new_message(recipients=("a@example.com", "b@example.com"))
    store.add([*done, deleted, partial])
    assert len(store.claim("w", T0 + LEASE, LEASE, 10)) == 5
    assert [c.id for c in store.claim("other", T0 + LEASE + 1, LEASE, 10)] == [lost.id]
    assert store.delete(deleted.id)
    now = T0 + LEASE + 2
    records = [("w", m.id, [result(r, "delivered", now) for r in m.recipients], now)
               for m in [*done, lost, deleted]]
    records.append(("w", partial.id, [result("a@example.com", "delivered", now)], now))
    with store.transaction(write=True) as tx:
        store.record_all_in(tx, records)
    for message in done:
        assert store.show(message.id) is None, message.id
    record = store.show(lost.id)  # the other worker's now: only the history
    assert record is not None and record.recipients[0].status == "delivering"
    assert len(record.attempts) == 1
    assert store.show(deleted.id) is None
    record = store.show(partial.id)
    assert record is not None
    assert {r.address: r.status for r in record.recipients} == {
        "a@example.com": "delivered", "b@example.com": "delivering"}
