"""The durable queue's storage (issue #10): one schema, two backends.

`SQLiteStore` keeps the queue in one file (WAL, synchronous=FULL: a message is on disk
when add() returns); `PostgresStore` keeps it in a PostgreSQL database that several
relay replicas share. The SMTP handlers commit accepted messages through
`GroupCommit`; the delivery workers claim, deliver and record; the queue CLI and the
HTTP API list, show and act on messages.

The API is synchronous and thread-safe: asyncio callers run it in a thread. Every
database failure surfaces as `StoreError`, whose message never holds a password;
arguments that cannot be right (an unknown status, a cursor this store did not make)
raise ValueError.

The SQL is written once, with `?` placeholders; the PostgreSQL backend turns them into
psycopg's `%s`. What differs between the backends is the DDL's types, the row locks
(PostgreSQL only; SQLite's BEGIN IMMEDIATE already makes one writer at a time) and how
connections are held.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import builtins
import functools
import json
import queue
import shutil
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import ConnectionPool

from relay.settings import redact_url, url_secrets

STATUSES = ("queued", "deferred", "delivering", "delivered", "failed", "held")
FINAL = ("delivered", "failed")
ARCHIVE_MODES = ("off", "metadata", "full")
# What a delivery attempt can make of a recipient (Result.status).
RESULT_STATUSES = ("delivered", "deferred", "failed")
# What NewMessage.outcomes may say: sync mode's final outcomes, or fallback mode's
# temporary failure (the recipient is queued as deferred, due at once).
OUTCOME_STATUSES = ("queued", "deferred", "delivered", "failed")


class StoreError(Exception):
    """The store cannot do what was asked: the message names the problem (and the
    store by its redacted URL), never a password."""


# ---------------------------------------------------------------------------------------
# What goes in and comes out
# ---------------------------------------------------------------------------------------

@dataclass
class NewMessage:
    id: str
    received: float
    user: str | None          # authenticated user, None for a trusted-network client
    peer: str                 # client IP
    sender: str               # envelope sender, "" for the null sender <>
    body: bytes               # the message as it goes upstream: CRLF lines, NOT dot-stuffed
    recipients: list[str]
    trace_id: str | None = None
    # For the archive of sync-mode deliveries: recipients already final.
    # address -> (status, reply); absent = "queued".
    outcomes: dict[str, tuple[str, str]] = field(default_factory=dict)
    # Claimed as it is stored: a worker of this relay delivers it next, with no
    # claim transaction (and no reading the body back). Its lease as for claim().
    claimed_by: str | None = None
    locked_until: float | None = None


@dataclass
class Attempt:
    time: float
    recipient: str
    upstream: str             # "host:port"
    reply: str                # e.g. "250 2.0.0 Ok" or "451 4.4.1 connection refused"
    duration: float
    tls: bool


@dataclass
class RecipientState:
    address: str
    status: str
    attempts: int
    next_attempt: float | None
    last_reply: str | None
    updated: float


@dataclass
class MessageRecord:                  # what list/show return (no body)
    id: str
    received: float
    user: str | None
    peer: str
    sender: str
    size: int                         # len(body), kept even when the body is dropped
    trace_id: str | None
    has_body: bool
    recipients: list[RecipientState]
    attempts: list[Attempt]           # filled by show(); [] from list()


@dataclass
class Claim:                          # a message with the recipients a worker now holds
    id: str
    received: float
    sender: str
    body: bytes
    recipients: list[RecipientState]  # only the claimed ones (status now "delivering")
    user: str | None = None           # who sent it: `user:` routes (issue #11)


@dataclass
class Result:                         # one recipient's outcome of a delivery attempt
    address: str
    status: str                       # "delivered" | "deferred" | "failed"
    reply: str
    next_attempt: float | None        # for "deferred"
    attempt: Attempt


@dataclass
class Usage:
    messages: int                     # messages with at least one non-final recipient
    bytes: int                        # their total size
    free_bytes: int | None            # free space where the store lives (SQLite), else None


# ---------------------------------------------------------------------------------------
# The schema
# ---------------------------------------------------------------------------------------

# Each entry brings the schema from version N to N+1 (entry 0 creates version 1). The
# DDL's types are filled in per backend: {real} a float, {blob} bytes, {bool} a flag,
# {serial} an auto-numbered primary key. "user" is quoted everywhere: PostgreSQL
# reserves the word.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE messages (
            id TEXT PRIMARY KEY,
            received {real} NOT NULL,
            "user" TEXT,
            peer TEXT NOT NULL,
            sender TEXT NOT NULL,
            size BIGINT NOT NULL,
            body {blob},
            trace_id TEXT,
            done_at {real})""",
        # Newest-first listing and keyset paging.
        "CREATE INDEX messages_received ON messages (received, id)",
        # Retention of the archive.
        "CREATE INDEX messages_done ON messages (done_at)",
        # ON DELETE CASCADE: deleting a message (operator, archive=off, purge) takes its
        # recipients and attempts with it, in the same statement.
        """CREATE TABLE recipients (
            message_id TEXT NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
            address TEXT NOT NULL,
            status TEXT NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            next_attempt {real},
            last_reply TEXT,
            locked_by TEXT,
            locked_until {real},
            prior_status TEXT,
            updated {real} NOT NULL,
            PRIMARY KEY (message_id, address))""",
        # The workers' question: what is due?
        "CREATE INDEX recipients_due ON recipients (status, next_attempt)",
        # release_claims at shutdown.
        "CREATE INDEX recipients_locked_by ON recipients (locked_by)",
        """CREATE TABLE attempts (
            id {serial},
            message_id TEXT NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
            recipient TEXT NOT NULL,
            time {real} NOT NULL,
            upstream TEXT NOT NULL,
            reply TEXT NOT NULL,
            duration {real} NOT NULL,
            tls {bool} NOT NULL)""",
        "CREATE INDEX attempts_message ON attempts (message_id)",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)  # recorded in schema_version

# A recipient a worker may take: due, or held by a worker whose lease ran out (it died
# or hung). Parameters: now, now.
DUE = ("((status IN ('queued', 'deferred') AND next_attempt <= ?)"
       " OR (status = 'delivering' AND locked_until < ?))")
NOT_FINAL = "status NOT IN ('delivered', 'failed')"
# The SELECT list that makes a MessageRecord (with `m` the messages table).
RECORD_COLUMNS = ('m.id, m.received, m."user", m.peer, m.sender, m.size, m.trace_id,'
                  ' m.body IS NOT NULL')
RECIPIENT_COLUMNS = "address, status, attempts, next_attempt, last_reply, updated"
# Big IN (...) lists go in pieces: SQLite caps the number of parameters.
CHUNK = 500


def check_results(results: Sequence[Result]) -> None:
    """ValueError for a result no worker can mean (before any transaction)."""
    for result in results:
        if result.status not in RESULT_STATUSES:
            raise ValueError(f"result {result.status!r} for {result.address!r} is not"
                             f" one of {', '.join(RESULT_STATUSES)}")


def marks(count: int) -> str:
    """`?, ?, ?` for an IN list of `count` values."""
    return ", ".join("?" * count)


def encode_cursor(received: float, message_id: str) -> str:
    """The keyset of the last row of a page, opaque to the caller (URL safe)."""
    text = json.dumps([received, message_id])  # repr of a float: it reads back exactly
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[float, str]:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        received, message_id = json.loads(text)
    except (ValueError, TypeError, binascii.Error):
        raise ValueError("invalid cursor") from None
    valid = (isinstance(received, (int, float)) and not isinstance(received, bool)
             and isinstance(message_id, str))
    if not valid:
        raise ValueError("invalid cursor")  # a value the caller gave, not a type
    return float(received), message_id


class Transaction(ABC):
    """One open transaction of a backend, running the shared SQL (`?` placeholders)."""

    @abstractmethod
    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Runs a statement that returns rows (SELECT, or ... RETURNING)."""

    @abstractmethod
    def run(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Runs a statement; returns how many rows it changed."""

    @abstractmethod
    def run_many(self, sql: str, params: Sequence[Sequence[Any]]) -> None:
        """Runs a statement once per parameter row."""


# ---------------------------------------------------------------------------------------
# The store: everything but the connection
# ---------------------------------------------------------------------------------------

class Store(ABC):
    """The queue. Subclasses hold the connection and say how their dialect differs."""

    archive: str                      # "off" | "metadata" | "full"
    url: str                          # redacted, for logs

    # DDL types for MIGRATIONS.
    DDL_TYPES: ClassVar[dict[str, str]]
    # Appended to a SELECT of messages rows that a write transaction goes on to change:
    # PostgreSQL locks them (FOR UPDATE), in id order, before their recipients. With one
    # lock order everywhere, two transactions never wait on each other in a circle.
    LOCK_ROWS = ""
    # The claim's lock: a message another relay is claiming is skipped, not waited for.
    LOCK_ROWS_SKIP = ""
    # GroupCommit may commit on the event loop's thread when nothing else is written
    # (a local file: the loop waits one fsync). Not over a network (PostgreSQL).
    commits_on_callers_thread: ClassVar[bool] = False

    def __init__(self, url: str, archive: str) -> None:
        self.url = redact_url(url)
        if archive not in ARCHIVE_MODES:
            raise StoreError(f"archive mode {archive!r} is not one of"
                             f" {', '.join(ARCHIVE_MODES)}")
        self.archive = archive

    @staticmethod
    def open(url: str, *, archive: str = "off") -> Store:
        """sqlite:///relative/path.db, sqlite:////absolute/path.db (SQLAlchemy style;
        parent dirs created), postgresql://user:pw@host:port/db. Creates or migrates
        the schema (a schema_version table). StoreError if it cannot."""
        scheme, separator, _ = url.partition("://")
        if separator and scheme.lower() == "sqlite":
            return SQLiteStore(url, archive=archive)
        if separator and scheme.lower() in ("postgresql", "postgres"):
            return PostgresStore(url, archive=archive)
        # Without a scheme it may not be a URL at all (a password pasted in the wrong
        # place): then it is not repeated.
        shown = f" {redact_url(url)}" if separator else ""
        raise StoreError(f"queue URL{shown}: not sqlite:///path.db"
                         " or postgresql://user:password@host:port/database")

    @abstractmethod
    def close(self) -> None:
        """Closes the connection(s); the store cannot be used afterwards."""

    @abstractmethod
    def transaction(self, *, write: bool, durable: bool = True
                    ) -> AbstractContextManager[Transaction]:
        """One transaction, committed when the block ends, rolled back if it raises.
        Database errors come out as StoreError. `durable=False`: the commit may be
        lost to a power failure (never to a crash of the relay), which costs no
        fsync: for the workers' bookkeeping (claims, leases, outcomes), where a lost
        commit only means a message delivered once more (at least once). A new
        message is always committed durably."""

    def free_bytes(self) -> int | None:
        """Free space where the store lives, if it is on this machine."""
        return None

    # --- schema -------------------------------------------------------------------

    def migration_lock(self, tx: Transaction) -> None:
        """Keeps two processes from migrating at once (SQLite: BEGIN IMMEDIATE does)."""

    def migrate(self) -> None:
        """Creates the schema, or brings an older one up to SCHEMA_VERSION."""
        with self.transaction(write=True) as tx:
            self.migration_lock(tx)
            tx.run("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            found = tx.rows("SELECT MAX(version) FROM schema_version")[0][0]
            version = 0 if found is None else int(found)
            if version > SCHEMA_VERSION:
                raise StoreError(f"queue {self.url}: schema version {version} is newer than"
                                 f" this relay's ({SCHEMA_VERSION}); upgrade the relay")
            for statements in MIGRATIONS[version:]:
                for statement in statements:
                    tx.run(statement.format(**self.DDL_TYPES))
            if version == 0:
                tx.run("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
            elif version < SCHEMA_VERSION:
                tx.run("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))

    def schema_version(self) -> int:
        with self.transaction(write=False) as tx:
            return int(tx.rows("SELECT MAX(version) FROM schema_version")[0][0])

    # --- the SMTP side ------------------------------------------------------------

    def add(self, messages: Sequence[NewMessage]) -> None:
        """All in ONE transaction, durable when it returns (SQLite: WAL,
        synchronous=FULL; PostgreSQL: committed). Recipients status "queued",
        next_attempt = received (due now), unless given in `outcomes`. A message
        whose recipients are all final is archived at once (see archive rules)."""
        now = time.time()
        with self.transaction(write=True) as tx:
            self.insert_all_in(tx, messages, now)

    def insert_in(self, tx: Transaction, message: NewMessage, now: float) -> None:
        """add()'s work for one message, inside a transaction of the caller's."""
        self.insert_all_in(tx, [message], now)

    # Rows per INSERT statement: one statement for many rows is one step of SQLite's
    # (one release of the GIL, one round trip to PostgreSQL), not one per row. Under
    # load each step's return waited for the event loop's thread to let go of the GIL:
    # a batch of 100 KB messages spent more time there than in its fsync.
    ROWS_PER_INSERT = 50

    def insert_all_in(self, tx: Transaction, messages: Sequence[NewMessage],
                      now: float) -> None:
        """add()'s work for these messages, inside a transaction of the caller's."""
        message_rows: list[tuple[Any, ...]] = []
        recipient_rows: list[tuple[Any, ...]] = []
        for message in messages:
            rows = []
            # A repeated RCPT TO is one recipient (the primary key is message + address).
            for address in dict.fromkeys(message.recipients):
                status, reply = message.outcomes.get(address, ("queued", None))
                if status not in OUTCOME_STATUSES:
                    raise ValueError(f"outcome {status!r} for {address!r} is not one of"
                                     f" {', '.join(OUTCOME_STATUSES)}")
                tried = 0 if status == "queued" else 1
                next_attempt = None if status in FINAL else message.received
                claimed = status == "queued" and message.claimed_by is not None
                rows.append((message.id, address, "delivering" if claimed else status,
                             tried, next_attempt, reply, now,
                             message.claimed_by if claimed else None,
                             message.locked_until if claimed else None,
                             "queued" if claimed else None))
            done = all(row[2] in FINAL for row in rows)
            if done and self.archive == "off":
                continue  # delivered already and nothing is archived: nothing to keep
            body = None if done and self.archive == "metadata" else message.body
            message_rows.append((message.id, message.received, message.user, message.peer,
                                 message.sender, len(message.body), body, message.trace_id,
                                 now if done else None))
            recipient_rows.extend(rows)
        self._insert_rows(tx, 'messages (id, received, "user", peer, sender, size, body,'
                              " trace_id, done_at)", message_rows)
        self._insert_rows(tx, "recipients (message_id, address, status, attempts,"
                              " next_attempt, last_reply, updated, locked_by, locked_until,"
                              " prior_status)", recipient_rows)

    def _chunks(self, items: Sequence[Any]) -> Iterator[Sequence[Any]]:
        """`items` ROWS_PER_INSERT at a time: what one statement carries."""
        for start in range(0, len(items), self.ROWS_PER_INSERT):
            yield items[start:start + self.ROWS_PER_INSERT]

    def _insert_rows(self, tx: Transaction, into: str,
                     rows: Sequence[tuple[Any, ...]]) -> None:
        for chunk in self._chunks(rows):
            placeholders = "(" + ", ".join("?" * len(chunk[0])) + ")"
            tx.run(f"INSERT INTO {into} VALUES " + ", ".join([placeholders] * len(chunk)),
                   [value for row in chunk for value in row])

    def usage(self) -> Usage:
        with self.transaction(write=False) as tx:
            count, size = tx.rows(
                "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM messages m WHERE EXISTS"
                f" (SELECT 1 FROM recipients WHERE message_id = m.id AND {NOT_FINAL})")[0]
        return Usage(messages=int(count), bytes=int(size), free_bytes=self.free_bytes())

    # --- the delivery workers -----------------------------------------------------

    def claim(self, worker: str, now: float, lease: float, limit: int) -> list[Claim]:
        """Up to `limit` messages' due recipients: status queued/deferred with
        next_attempt <= now, or delivering with locked_until < now (a dead worker's
        lease). Marks them delivering, locked_by=worker, locked_until=now+lease.
        PostgreSQL: SELECT ... FOR UPDATE SKIP LOCKED, so two relays never claim the
        same recipient while a lease holds. Oldest next_attempt first."""
        if limit < 1:
            return []
        with self.transaction(write=True, durable=False) as tx:
            candidates = self._due_messages(tx, now, limit)
            if not candidates:
                return []
            # PostgreSQL: the candidates other relays are claiming right now are
            # skipped (locked in id order, as every writer here locks).
            free = {row[0] for row in tx.rows(
                f"SELECT m.id FROM messages m WHERE m.id IN ({marks(len(candidates))})"
                f" ORDER BY m.id{self.LOCK_ROWS_SKIP}", candidates)}
            ids = [message_id for message_id in candidates if message_id in free][:limit]
            if not ids:
                return []
            # The UPDATE asks DUE again: on PostgreSQL it sees what another relay
            # committed after the SELECT above, so a recipient is never claimed twice.
            # prior_status keeps the status before the first claim, for release_claims.
            claimed = tx.rows(
                "UPDATE recipients SET status = 'delivering', locked_by = ?, locked_until = ?,"
                " prior_status = CASE WHEN status = 'delivering' THEN prior_status"
                f" ELSE status END, updated = ? WHERE message_id IN ({marks(len(ids))})"
                f" AND {DUE} RETURNING message_id, {RECIPIENT_COLUMNS}",
                (worker, now + lease, now, *ids, now, now))
            messages = {row[0]: row for row in tx.rows(
                'SELECT id, received, sender, body, "user" FROM messages'
                f" WHERE id IN ({marks(len(ids))})", ids)}
        held: dict[str, list[RecipientState]] = {}
        for row in claimed:
            held.setdefault(row[0], []).append(_recipient(row[1:]))
        claims = []
        for message_id in ids:
            if message_id in held and message_id in messages:
                _, received, sender, body, user = messages[message_id]
                recipients = sorted(held[message_id], key=lambda state: state.address)
                claims.append(Claim(id=message_id, received=received, sender=sender,
                                    body=bytes(body or b""), recipients=recipients,
                                    user=user))
        return claims

    # Candidates per claim beyond `limit`: on PostgreSQL other relays may hold the
    # oldest ones (SKIP LOCKED passes them over).
    CLAIM_CANDIDATES = 16

    def _due_messages(self, tx: Transaction, now: float, limit: int) -> list[str]:
        """Ids of messages with due recipients, oldest due first: up to `limit` plus
        CLAIM_CANDIDATES. Each status is its own range of the (status, next_attempt)
        index, read in order, so a claim costs the same with ten messages queued or a
        hundred thousand."""
        wanted = limit + self.CLAIM_CANDIDATES
        due: list[tuple[float, str]] = []
        for status in ("queued", "deferred"):
            due += tx.rows("SELECT next_attempt, message_id FROM recipients"
                           " WHERE status = ? AND next_attempt <= ?"
                           " ORDER BY next_attempt LIMIT ?", (status, now, wanted))
        # A dead worker's claims (the lease ran out); few: one per worker at most.
        due += tx.rows("SELECT locked_until, message_id FROM recipients"
                       " WHERE status = 'delivering' AND locked_until < ?"
                       " ORDER BY locked_until LIMIT ?", (now, wanted))
        ids: dict[str, None] = {}
        for _, message_id in sorted(due):
            ids.setdefault(message_id)
        return list(ids)[:wanted]

    def renew(self, worker: str, message_id: str, until: float) -> None:
        """Extends this worker's lease on the message's recipients it holds."""
        with self.transaction(write=True, durable=False) as tx:
            self._lock_messages(tx, "id = ?", (message_id,))
            tx.run("UPDATE recipients SET locked_until = ? WHERE message_id = ?"
                   " AND status = 'delivering' AND locked_by = ?", (until, message_id, worker))

    def record(self, worker: str, message_id: str, results: Sequence[Result],
               now: float) -> None:
        """One transaction: each result's recipient (only where still locked_by
        worker) gets status/last_reply/next_attempt, attempts+1, lock cleared; the
        Attempt row is inserted. When every recipient of the message is final, the
        message is done (done_at = now) and the archive rule applies:
        off -> message, recipients, attempts deleted; metadata -> body dropped (size
        kept); full -> kept."""
        check_results(results)
        with self.transaction(write=True, durable=False) as tx:
            self.record_in(tx, worker, message_id, results, now)

    def record_all_in(self, tx: Transaction,
                      records: Sequence[tuple[str, str, Sequence[Result], float]]) -> None:
        """record_in for each (worker, message id, results, now), in a transaction of
        the caller's (GroupCommit's batch). The common case, ARCHIVE off and every
        result final, is a few statements for all of them instead of four each: on
        the writer thread each statement waits for the GIL again, while the event
        loop serves clients."""
        records = sorted(records, key=lambda record: record[1])  # the lock order
        forget = [record for record in records if self.archive == "off" and
                  all(result.status in FINAL for result in record[2])]
        forgotten = self._forget_all_done(tx, records, forget) if len(forget) > 1 \
            else set()
        for record in records:  # the others the long way
            if record[1] not in forgotten:
                self.record_in(tx, *record)

    def _forget_all_done(self, tx: Transaction,
                         records: Sequence[tuple[str, str, Sequence[Result], float]],
                         forget: Sequence[tuple[str, str, Sequence[Result], float]]
                         ) -> set[str]:
        """_forget_if_all_done for each of `forget` at once; the ids deleted. Every
        record's message is locked first, in id order (record_in locks its own again)."""
        present: set[str] = set()
        held: dict[str, list[tuple[str, str, str | None]]] = {}
        for chunk in self._chunks([record[1] for record in records]):
            present.update(self._lock_messages(tx, f"id IN ({marks(len(chunk))})", chunk))
            for message_id, address, status, holder in tx.rows(
                    "SELECT message_id, address, status, locked_by FROM recipients"
                    f" WHERE message_id IN ({marks(len(chunk))})", chunk):
                held.setdefault(message_id, []).append((address, status, holder))
        forgotten = []
        for worker, message_id, results, _ in forget:
            addresses = {result.address for result in results}
            if message_id in present and all(
                    address in addresses and status == "delivering" and holder == worker
                    for address, status, holder in held.get(message_id, ())):
                forgotten.append(message_id)
        for chunk in self._chunks(forgotten):
            tx.run(f"DELETE FROM messages WHERE id IN ({marks(len(chunk))})", chunk)
        return set(forgotten)

    def record_in(self, tx: Transaction, worker: str, message_id: str,
                  results: Sequence[Result], now: float) -> None:
        """record()'s work inside a transaction of the caller's (GroupCommit)."""
        if not self._lock_messages(tx, "id = ?", (message_id,)):
            return  # deleted meanwhile (by an operator): nothing left to record
        if self._forget_if_all_done(tx, worker, message_id, results):
            return
        tx.run_many(
            "UPDATE recipients SET status = ?, last_reply = ?, next_attempt = ?,"
            " attempts = attempts + 1, locked_by = NULL, locked_until = NULL,"
            " prior_status = NULL, updated = ? WHERE message_id = ? AND address = ?"
            " AND status = 'delivering' AND locked_by = ?",
            [(result.status, result.reply,
              (now if result.next_attempt is None else result.next_attempt)
              if result.status == "deferred" else None,
              now, message_id, result.address, worker) for result in results])
        # The attempt is history even when the lease was lost: it happened upstream.
        tx.run_many(
            "INSERT INTO attempts (message_id, recipient, time, upstream, reply,"
            " duration, tls) VALUES (?, ?, ?, ?, ?, ?, ?)",
            [(message_id, result.address, result.attempt.time, result.attempt.upstream,
              result.attempt.reply, result.attempt.duration, result.attempt.tls)
             for result in results])
        self._finish_if_done(tx, message_id, now)

    def _forget_if_all_done(self, tx: Transaction, worker: str, message_id: str,
                            results: Sequence[Result]) -> bool:
        """The common case with ARCHIVE off: these results end the message (every
        recipient is final, and all were this worker's). Nothing is kept, so one
        DELETE does what updating the rows and then deleting them would."""
        if self.archive != "off" or any(r.status not in FINAL for r in results):
            return False
        addresses = {result.address for result in results}
        rows = tx.rows("SELECT address, status, locked_by FROM recipients"
                       " WHERE message_id = ?", (message_id,))
        if not all(address in addresses and status == "delivering" and holder == worker
                   for address, status, holder in rows):
            return False
        tx.run("DELETE FROM messages WHERE id = ?", (message_id,))
        return True

    def _finish_if_done(self, tx: Transaction, message_id: str, now: float) -> None:
        """The archive rule, once no recipient of the message is left to deliver."""
        pending = tx.rows("SELECT COUNT(*) FROM recipients"
                          f" WHERE message_id = ? AND {NOT_FINAL}", (message_id,))[0][0]
        if pending:
            return
        if self.archive == "off":
            tx.run("DELETE FROM messages WHERE id = ?", (message_id,))
        elif self.archive == "metadata":
            tx.run("UPDATE messages SET body = NULL, done_at = ?"
                   " WHERE id = ? AND done_at IS NULL", (now, message_id))
        else:
            tx.run("UPDATE messages SET done_at = ? WHERE id = ? AND done_at IS NULL",
                   (now, message_id))

    def release_claims(self, worker: str) -> None:
        """Shutdown: this worker's delivering recipients go back to their previous
        due state (status queued or deferred, as before claim)."""
        with self.transaction(write=True, durable=False) as tx:
            self._lock_messages(
                tx, "id IN (SELECT message_id FROM recipients WHERE locked_by = ?)", (worker,))
            tx.run("UPDATE recipients SET status = COALESCE(prior_status, 'queued'),"
                   " locked_by = NULL, locked_until = NULL, prior_status = NULL, updated = ?"
                   " WHERE locked_by = ? AND status = 'delivering'", (time.time(), worker))

    def holders(self) -> list[str]:
        """The workers holding claims now (see Queue.release_stale_claims)."""
        with self.transaction(write=False) as tx:
            return [row[0] for row in tx.rows(
                "SELECT DISTINCT locked_by FROM recipients"
                " WHERE status = 'delivering' AND locked_by IS NOT NULL")]

    def _lock_messages(self, tx: Transaction, where: str, params: Sequence[Any]) -> list[str]:
        """The ids of the messages matching `where`, locked for this transaction on
        PostgreSQL (see LOCK_ROWS)."""
        return [row[0] for row in tx.rows(
            f"SELECT id FROM messages WHERE {where} ORDER BY id{self.LOCK_ROWS}", params)]

    # --- the operator's view (CLI and HTTP API) -----------------------------------

    def list(self, *, status: str | None = None, rcpt: str | None = None,
             sender: str | None = None, user: str | None = None,
             since: float | None = None, until: float | None = None,
             limit: int = 100, cursor: str | None = None
             ) -> tuple[builtins.list[MessageRecord], str | None]:
        """Newest first; a message matches `status`/`rcpt` when any recipient does
        (addresses compared without regard to case); `since` <= received < `until`.
        Keyset paging: the returned cursor (opaque str, None at the end) gives the next
        page. ValueError for an unknown status, a limit below 1 or a bad cursor."""
        if status is not None and status not in STATUSES:
            raise ValueError(f"status {status!r} is not one of {', '.join(STATUSES)}")
        if limit < 1:
            raise ValueError("limit must be at least 1")
        where: builtins.list[str] = []
        params: builtins.list[Any] = []
        if status is not None:
            where.append("EXISTS (SELECT 1 FROM recipients r WHERE r.message_id = m.id"
                         " AND r.status = ?)")
            params.append(status)
        if rcpt is not None:
            where.append("EXISTS (SELECT 1 FROM recipients r WHERE r.message_id = m.id"
                         " AND LOWER(r.address) = LOWER(?))")
            params.append(rcpt)
        if sender is not None:
            where.append("LOWER(m.sender) = LOWER(?)")
            params.append(sender)
        if user is not None:
            where.append('m."user" = ?')
            params.append(user)
        if since is not None:
            where.append("m.received >= ?")
            params.append(since)
        if until is not None:
            where.append("m.received < ?")
            params.append(until)
        if cursor is not None:
            # Strictly after the previous page's last row in (received, id) order, so
            # a message that arrives while paging shifts nothing.
            last_received, last_id = decode_cursor(cursor)
            where.append("(m.received < ? OR (m.received = ? AND m.id < ?))")
            params.extend((last_received, last_received, last_id))
        sql = f"SELECT {RECORD_COLUMNS} FROM messages m"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY m.received DESC, m.id DESC LIMIT ?"
        with self.transaction(write=False) as tx:
            rows = tx.rows(sql, (*params, limit + 1))  # one more: is there a next page?
            records = self._records(tx, rows[:limit], with_attempts=False)
        if len(rows) <= limit:
            return records, None
        return records, encode_cursor(records[-1].received, records[-1].id)

    def show(self, message_id: str) -> MessageRecord | None:
        with self.transaction(write=False) as tx:
            rows = tx.rows(f"SELECT {RECORD_COLUMNS} FROM messages m WHERE m.id = ?",
                           (message_id,))
            records = self._records(tx, rows, with_attempts=True)
        return records[0] if records else None

    def _records(self, tx: Transaction, rows: Sequence[tuple[Any, ...]], *,
                 with_attempts: bool) -> builtins.list[MessageRecord]:
        """MessageRecords for RECORD_COLUMNS rows, with their recipients (and attempts)."""
        records = [MessageRecord(id=row[0], received=row[1], user=row[2], peer=row[3],
                                 sender=row[4], size=int(row[5]), trace_id=row[6],
                                 has_body=bool(row[7]), recipients=[], attempts=[])
                   for row in rows]
        by_id = {record.id: record for record in records}
        ids = list(by_id)
        for start in range(0, len(ids), CHUNK):
            chunk = ids[start:start + CHUNK]
            for row in tx.rows(f"SELECT message_id, {RECIPIENT_COLUMNS} FROM recipients"
                               f" WHERE message_id IN ({marks(len(chunk))})"
                               " ORDER BY message_id, address", chunk):
                by_id[row[0]].recipients.append(_recipient(row[1:]))
            if with_attempts:
                for row in tx.rows("SELECT message_id, time, recipient, upstream, reply,"
                                   " duration, tls FROM attempts WHERE message_id IN"
                                   f" ({marks(len(chunk))}) ORDER BY time, id", chunk):
                    by_id[row[0]].attempts.append(Attempt(
                        time=row[1], recipient=row[2], upstream=row[3], reply=row[4],
                        duration=row[5], tls=bool(row[6])))
        return records

    def raw(self, message_id: str) -> bytes | None:
        """The body as stored, None for an unknown message or a dropped body."""
        with self.transaction(write=False) as tx:
            rows = tx.rows("SELECT body FROM messages WHERE id = ?", (message_id,))
        return None if not rows or rows[0][0] is None else bytes(rows[0][0])

    def retry(self, message_id: str | None) -> int:
        """queued/deferred recipients of the message (None: of all messages) due now;
        returns how many recipients."""
        waiting = "status IN ('queued', 'deferred')"
        params: tuple[Any, ...] = ()
        if message_id is not None:
            waiting += " AND message_id = ?"
            params = (message_id,)
        now = time.time()
        with self.transaction(write=True) as tx:
            self._lock_messages(
                tx, f"id IN (SELECT message_id FROM recipients WHERE {waiting})", params)
            return tx.run("UPDATE recipients SET next_attempt = ?, updated = ?"
                          f" WHERE {waiting}", (now, now, *params))

    def hold(self, message_id: str) -> int:
        """queued/deferred -> held: no worker takes them until release(). Returns how
        many recipients."""
        with self.transaction(write=True) as tx:
            self._lock_messages(tx, "id = ?", (message_id,))
            return tx.run("UPDATE recipients SET status = 'held', updated = ?"
                          " WHERE message_id = ? AND status IN ('queued', 'deferred')",
                          (time.time(), message_id))

    def release(self, message_id: str) -> int:
        """held -> queued, due now. Returns how many recipients."""
        now = time.time()
        with self.transaction(write=True) as tx:
            self._lock_messages(tx, "id = ?", (message_id,))
            return tx.run("UPDATE recipients SET status = 'queued', next_attempt = ?,"
                          " updated = ? WHERE message_id = ? AND status = 'held'",
                          (now, now, message_id))

    def delete(self, message_id: str) -> bool:
        """The message, its recipients and attempts, whatever their state. A worker
        delivering it at the time records nothing afterwards."""
        with self.transaction(write=True) as tx:
            self._lock_messages(tx, "id = ?", (message_id,))
            return tx.run("DELETE FROM messages WHERE id = ?", (message_id,)) > 0

    def stats(self, now: float) -> dict[str, Any]:
        """{"recipients": {status: count for every status in STATUSES},
            "messages": n, "oldest_queued_age": seconds or None (oldest received among
            messages with a queued/deferred/delivering recipient)}
        Counts are of everything stored, the archive included."""
        with self.transaction(write=False) as tx:
            recipients = dict.fromkeys(STATUSES, 0)
            for status, count in tx.rows(
                    "SELECT status, COUNT(*) FROM recipients GROUP BY status"):
                recipients[status] = int(count)
            messages = int(tx.rows("SELECT COUNT(*) FROM messages")[0][0])
            oldest = tx.rows(
                "SELECT MIN(m.received) FROM messages m WHERE EXISTS (SELECT 1 FROM"
                " recipients r WHERE r.message_id = m.id"
                " AND r.status IN ('queued', 'deferred', 'delivering'))")[0][0]
        return {"recipients": recipients, "messages": messages,
                "oldest_queued_age": None if oldest is None else max(0.0, now - oldest)}

    def purge(self, now: float, *, max_age: float, max_messages: int, max_bytes: int) -> int:
        """Archive retention: deletes done messages whose done_at is older than
        max_age, then the oldest done ones beyond max_messages / max_bytes (0 = no
        limit, for all three). max_bytes counts the bodies the archive still holds.
        Never a message with a non-final recipient. Returns how many deleted."""
        # done_at is only set once all recipients are final; NOT EXISTS makes sure.
        done = ("done_at IS NOT NULL AND NOT EXISTS (SELECT 1 FROM recipients r"
                f" WHERE r.message_id = messages.id AND r.{NOT_FINAL})")
        with self.transaction(write=True) as tx:
            doomed: builtins.list[str] = []
            if max_age > 0:
                doomed += self._lock_messages(tx, f"{done} AND done_at < ?", (now - max_age,))
            beyond = []
            if max_messages > 0:
                beyond.append(f"kept > {int(max_messages)}")
            if max_bytes > 0:
                beyond.append(f"kept_bytes > {int(max_bytes)}")
            if beyond:
                # Newest first, a running count and size: every message past either
                # limit goes. The age rule's messages are among them or already counted.
                ranked = (
                    "SELECT id FROM (SELECT id, ROW_NUMBER() OVER newest AS kept,"
                    " SUM(CASE WHEN body IS NULL THEN 0 ELSE size END) OVER newest"
                    f" AS kept_bytes FROM messages WHERE {done} WINDOW newest AS"
                    " (ORDER BY done_at DESC, id DESC ROWS UNBOUNDED PRECEDING))"
                    f" ranked WHERE {' OR '.join(beyond)}")
                doomed += self._lock_messages(tx, f"id IN ({ranked})", ())
            deleted = 0
            ids = list(dict.fromkeys(doomed))
            for start in range(0, len(ids), CHUNK):
                chunk = ids[start:start + CHUNK]
                deleted += tx.run(f"DELETE FROM messages WHERE id IN ({marks(len(chunk))})",
                                  chunk)
        return deleted


def _recipient(row: Sequence[Any]) -> RecipientState:
    """A RecipientState from RECIPIENT_COLUMNS."""
    address, status, attempts, next_attempt, last_reply, updated = row
    return RecipientState(address=address, status=status, attempts=int(attempts),
                          next_attempt=next_attempt, last_reply=last_reply, updated=updated)


# ---------------------------------------------------------------------------------------
# SQLite
# ---------------------------------------------------------------------------------------

class SQLiteTransaction(Transaction):
    def __init__(self, cursor: sqlite3.Cursor) -> None:
        self.cursor = cursor

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self.cursor.execute(sql, params).fetchall()

    def run(self, sql: str, params: Sequence[Any] = ()) -> int:
        return self.cursor.execute(sql, params).rowcount

    def run_many(self, sql: str, params: Sequence[Sequence[Any]]) -> None:
        if params:
            self.cursor.executemany(sql, params)


class SQLiteStore(Store):
    """The queue in one SQLite file, for one relay. Its connection is shared by the
    relay's threads (a lock makes them take turns); other processes (the queue CLI)
    may open the same file at the same time: WAL lets them read while the relay
    writes, and busy_timeout makes writers wait for each other instead of failing."""

    DDL_TYPES: ClassVar[dict[str, str]] = {"real": "REAL", "blob": "BLOB", "bool": "INTEGER",
                 "serial": "INTEGER PRIMARY KEY AUTOINCREMENT"}
    BUSY_TIMEOUT = 30.0               # seconds a writer waits for another process
    PAGE_SIZE = 8192                  # bytes, for a new file (see _connect)
    # Checkpoints (the WAL's pages copied back into the file, and synced) run on a
    # thread of their own, at most every CHECKPOINT_SECONDS after a commit: a commit
    # never waits for one. (SQLite's own, every 1,000 pages, ran inside the commit
    # that crossed the mark and held up every client waiting on that commit; without
    # it, 100 KB at 10 clients did some 10 % more.) A commit still checkpoints by
    # itself past CHECKPOINT_BACKSTOP pages, should that thread fall behind.
    CHECKPOINT_SECONDS = 0.2
    CHECKPOINT_BACKSTOP = 16_000      # pages
    commits_on_callers_thread = True

    def __init__(self, url: str, *, archive: str = "off") -> None:
        super().__init__(url, archive)
        self.path = self._path(url)
        self._mutex = threading.Lock()
        self._durable = True  # the connection's synchronous setting: FULL
        self._written = threading.Event()  # committed since the last checkpoint
        self._closed = threading.Event()  # close(): the checkpointer leaves
        self._checkpointer: threading.Thread | None = None  # at the first write
        self._connection: sqlite3.Connection | None = self._connect()
        try:
            self.migrate()
        except BaseException:
            self.close()
            raise

    def _path(self, url: str) -> Path:
        """sqlite:///relative.db -> relative.db, sqlite:////absolute.db -> /absolute.db."""
        prefix = "sqlite:///"
        if url[:len(prefix)].lower() != prefix:
            raise StoreError(f"queue URL {self.url}: write sqlite:///relative/path.db"
                             " or sqlite:////absolute/path.db")
        path = url[len(prefix):].partition("?")[0]
        if not path or path == ":memory:":
            raise StoreError(f"queue URL {self.url}: the queue needs a file name")
        return Path(path)

    def _connect(self) -> sqlite3.Connection:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # The queue holds people's mail: only the relay's user may read the file
            # (SQLite gives the -wal and -shm files the same permissions).
            self.path.touch(mode=0o600, exist_ok=True)
            # isolation_level=None: this module says BEGIN itself.
            connection = sqlite3.connect(self.path, timeout=self.BUSY_TIMEOUT,
                                         isolation_level=None, check_same_thread=False)
        except (OSError, sqlite3.Error) as error:
            raise StoreError(f"cannot open the queue {self.url}: {error}") from None
        try:
            # A new file gets 8 KiB pages (an existing one keeps its own). With 4 KiB a
            # 100 KB body was some 50 writes to the WAL and 50 more at the checkpoint,
            # system calls on the writer thread that every commit waits for: 8 KiB
            # gave 7-12 % more at 100 KB (1 and 10 clients), and nothing less at 2 KB.
            connection.execute(f"PRAGMA page_size={self.PAGE_SIZE}")
            journal = connection.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(journal).lower() != "wal":
                raise StoreError(f"queue {self.url}: SQLite cannot use WAL there"
                                 f" (journal_mode is {journal})")
            # FULL: with WAL, a commit is on disk (fsync) when it returns.
            connection.execute("PRAGMA synchronous=FULL")
            connection.execute("PRAGMA foreign_keys=ON")  # the ON DELETE CASCADEs
            # Debian's SQLite zeroes every page a DELETE frees (SECURE_DELETE): a
            # delivered 100 KB body was written to the WAL a second time, as zeros,
            # and again at the checkpoint. FAST zeroes only what is rewritten anyway
            # (as a spool file's blocks stay on disk after Postfix unlinks it).
            connection.execute("PRAGMA secure_delete=FAST")
            connection.execute(f"PRAGMA busy_timeout={int(self.BUSY_TIMEOUT * 1000)}")
            connection.execute(f"PRAGMA wal_autocheckpoint={self.CHECKPOINT_BACKSTOP}")
        except sqlite3.Error as error:
            connection.close()
            raise StoreError(f"cannot open the queue {self.url}: {error}") from None
        except BaseException:
            connection.close()
            raise
        return connection

    def close(self) -> None:
        self._closed.set()
        self._written.set()
        if self._checkpointer is not None:
            self._checkpointer.join(self.BUSY_TIMEOUT)
        with self._mutex:
            if self._connection is not None:
                self._connection.close()  # the last one to close checkpoints
                self._connection = None

    def _checkpoint_now_and_then(self) -> None:
        """The checkpointer thread (see CHECKPOINT_SECONDS). PASSIVE: it copies what
        no reader still needs and never waits for a writer."""
        try:
            connection = sqlite3.connect(self.path, timeout=self.BUSY_TIMEOUT,
                                         isolation_level=None, check_same_thread=False)
        except sqlite3.Error:
            return  # the commits' own checkpoints (CHECKPOINT_BACKSTOP) remain
        try:
            while self._written.wait() and not self._closed.is_set():
                self._written.clear()
                with suppress(sqlite3.Error):  # busy, or the disk: next time
                    connection.execute("PRAGMA wal_checkpoint(PASSIVE)")
                self._closed.wait(self.CHECKPOINT_SECONDS)
        finally:
            connection.close()

    @contextmanager
    def transaction(self, *, write: bool, durable: bool = True) -> Iterator[Transaction]:
        with self._mutex:
            if self._connection is None:
                raise StoreError(f"queue {self.url} is closed")
            cursor = self._connection.cursor()
            try:
                # WAL: FULL syncs the log at each commit; NORMAL only at checkpoints
                # (the database stays consistent either way, and a later FULL commit
                # syncs what came before it).
                if write and durable != self._durable:
                    cursor.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
                    self._durable = durable
                # IMMEDIATE: take the write lock at BEGIN, so a write transaction never
                # fails half-way because another process wrote first. A read's BEGIN
                # gives its statements one snapshot.
                cursor.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                yield SQLiteTransaction(cursor)
                cursor.execute("COMMIT")
                if write:
                    self._written.set()
                    if self._checkpointer is None:
                        self._checkpointer = threading.Thread(
                            target=self._checkpoint_now_and_then, daemon=True,
                            name="queue-checkpoints")
                        self._checkpointer.start()
            except sqlite3.Error as error:
                self._rollback()
                raise StoreError(f"queue {self.url}: {error}") from None
            except BaseException:
                self._rollback()
                raise
            finally:
                cursor.close()

    def _rollback(self) -> None:
        if self._connection is not None and self._connection.in_transaction:
            try:
                self._connection.execute("ROLLBACK")
            except sqlite3.Error:
                pass  # the connection is broken; the next BEGIN says so

    def free_bytes(self) -> int | None:
        try:
            return shutil.disk_usage(self.path.parent).free
        except OSError:
            return None


# ---------------------------------------------------------------------------------------
# PostgreSQL
# ---------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=512)
def postgres_sql(sql: str) -> str:
    """The shared SQL in psycopg's placeholder style. A literal % would have to be
    written %% there: the shared SQL has none, and must not start to."""
    if "%" in sql:
        raise ValueError(f"shared SQL must not contain %: {sql}")
    return sql.replace("?", "%s")


PostgresConnection = psycopg.Connection[tuple[Any, ...]]


class PostgresTransaction(Transaction):
    def __init__(self, cursor: psycopg.Cursor[tuple[Any, ...]]) -> None:
        self.cursor = cursor

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        self.cursor.execute(postgres_sql(sql), params)
        return self.cursor.fetchall()

    def run(self, sql: str, params: Sequence[Any] = ()) -> int:
        self.cursor.execute(postgres_sql(sql), params)
        return self.cursor.rowcount

    def run_many(self, sql: str, params: Sequence[Sequence[Any]]) -> None:
        if params:
            self.cursor.executemany(postgres_sql(sql), params)


class PostgresStore(Store):
    """The queue in a PostgreSQL database that several relays share. A pool of
    connections serves the relay's threads. Two relays never hold one recipient at
    once: the claim locks the messages it takes (FOR UPDATE SKIP LOCKED: another
    relay's claim passes them by) and its UPDATE asks again whether each recipient is
    due, seeing what the other relay committed meanwhile."""

    DDL_TYPES: ClassVar[dict[str, str]] = {
        "real": "DOUBLE PRECISION", "blob": "BYTEA", "bool": "BOOLEAN",
        "serial": "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY"}
    LOCK_ROWS = " FOR UPDATE"
    LOCK_ROWS_SKIP = " FOR UPDATE OF m SKIP LOCKED"
    POOL_SIZE = 10                    # workers + SMTP commits + API, at once
    CONNECT_TIMEOUT = 10              # seconds, unless the URL says connect_timeout
    POOL_TIMEOUT = 30.0               # seconds a caller waits for a free connection
    MIGRATION_LOCK = 0x736D74702D72   # pg_advisory_xact_lock key: "smtp-r"

    def __init__(self, url: str, *, archive: str = "off") -> None:
        super().__init__(url, archive)
        self._secrets = url_secrets(url)
        try:
            options = conninfo_to_dict(url)
        except psycopg.Error as error:
            raise StoreError(f"queue URL {self.url}: {self._scrub(error)}") from None
        # autocommit: transaction() opens each transaction itself (connection.transaction).
        settings: dict[str, Any] = {"autocommit": True, "application_name": "smtp-relay"}
        if "connect_timeout" not in options:
            settings["connect_timeout"] = self.CONNECT_TIMEOUT
        try:
            # One connection first: the pool would only say that it timed out, this says
            # why (refused, no such database, authentication failed).
            psycopg.connect(url, **settings).close()
        except psycopg.Error as error:
            raise StoreError(f"cannot connect to the queue {self.url}:"
                             f" {self._scrub(error)}") from None
        # check: a connection the server dropped (a restart) is replaced when it is
        # taken from the pool, instead of failing the caller's transaction.
        self._pool: ConnectionPool[PostgresConnection] = ConnectionPool(
            url, kwargs=settings, min_size=1, max_size=self.POOL_SIZE,
            timeout=self.POOL_TIMEOUT, check=ConnectionPool.check_connection,
            name="smtp-relay-queue", open=False)
        try:
            self._pool.open(wait=True, timeout=self.POOL_TIMEOUT)
            self.migrate()
        except psycopg.Error as error:
            self._pool.close()
            raise StoreError(f"cannot open the queue {self.url}:"
                             f" {self._scrub(error)}") from None
        except BaseException:
            self._pool.close()
            raise

    def _scrub(self, error: BaseException) -> str:
        """The error's text on one line (libpq adds hint lines), without the URL's
        password (libpq may quote a malformed connection string back)."""
        text = " ".join(str(error).split())
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def close(self) -> None:
        self._pool.close()

    def migration_lock(self, tx: Transaction) -> None:
        tx.rows(f"SELECT pg_advisory_xact_lock({self.MIGRATION_LOCK})")

    @contextmanager
    def transaction(self, *, write: bool, durable: bool = True) -> Iterator[Transaction]:
        # READ COMMITTED for both kinds: the writes that must not race take row locks.
        try:
            with self._pool.connection() as connection, connection.transaction(), \
                    connection.cursor() as cursor:
                if write and not durable:  # this transaction only: no WAL flush wait
                    cursor.execute("SET LOCAL synchronous_commit = off")
                yield PostgresTransaction(cursor)
        except psycopg.Error as error:
            if self._pool.closed:
                raise StoreError(f"queue {self.url} is closed") from None
            raise StoreError(f"queue {self.url}: {self._scrub(error)}") from None


# ---------------------------------------------------------------------------------------
# Group commit
# ---------------------------------------------------------------------------------------

@dataclass
class _Waiting:
    """One add() or record() call waiting for its commit."""
    message: NewMessage | None  # add()
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[None]
    record: tuple[str, str, Sequence[Result], float] | None = None  # record()'s arguments


def _settle(future: asyncio.Future[None], error: StoreError | None) -> None:
    if future.done():
        return  # the caller was cancelled (its client left); the commit stands
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


class GroupCommit:
    """Many sessions' add() calls, and the workers' record() calls, share one
    transaction: a writer thread takes everything waiting, writes it in one
    transaction, then wakes each caller. No caller returns before its message is
    committed; a failed batch raises StoreError in every caller of that batch.

    One commit costs an fsync (SQLite) or a round trip (PostgreSQL) whatever its size:
    while one batch commits, the next gathers. close() commits what is waiting, then
    stops the thread; it does not close the store."""

    MAX_BATCH = 500
    RECORD_LINGER = 0.05  # seconds an outcome waits for a message to ride with

    def __init__(self, store: Store) -> None:
        self.store = store
        self._waiting: queue.SimpleQueue[_Waiting | None] = queue.SimpleQueue()
        self._closing = threading.Lock()
        self._closed = False
        self._busy = threading.Lock()  # a batch is being written (writer or caller)
        # Outcomes waiting to ride with the next message's commit (record(alone=True)),
        # and the timer that sends them to the writer if no message comes.
        self._riders: list[_Waiting] = []
        self._rider_timer: asyncio.TimerHandle | None = None
        self._writer = threading.Thread(target=self._write, name="queue-group-commit",
                                        daemon=True)
        self._writer.start()

    async def add(self, message: NewMessage, *, alone: bool = False) -> None:
        """`alone`: no other client is sending now (see _commit_here)."""
        riders, self._riders = self._riders, []
        if alone and self._commit_here(message, riders):
            return
        self._send_to_writer(riders)
        await self._submit(message, None)

    async def record(self, worker: str, message_id: str, results: Sequence[Result],
                     now: float, *, alone: bool = False) -> None:
        """Store.record, in the next batch's transaction: a worker's outcome costs
        no transaction of its own (and, beside new messages, no fsync of its own).

        `alone` (SQLite): the outcome rides with the next message's commit on this
        thread, or goes to the writer after RECORD_LINGER. For a lone client its own
        transaction came just as its next message did, and held that message up."""
        check_results(results)
        record = (worker, message_id, results, now)
        if not (alone and self.store.commits_on_callers_thread):
            await self._submit(None, record)
            return
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._riders.append(_Waiting(None, loop, future, record))
        if self._rider_timer is None:
            self._rider_timer = loop.call_later(self.RECORD_LINGER, self._send_riders)
        await future

    def _send_riders(self) -> None:
        self._rider_timer = None
        riders, self._riders = self._riders, []
        self._send_to_writer(riders)

    def _send_to_writer(self, riders: list[_Waiting]) -> None:
        if self._rider_timer is not None and not self._riders:
            self._rider_timer.cancel()
            self._rider_timer = None
        for rider in riders:
            if not self._put(rider):
                _settle(rider.future, self._closed_error())

    async def _submit(self, message: NewMessage | None,
                      record: tuple[str, str, Sequence[Result], float] | None) -> None:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        if not self._put(_Waiting(message, loop, future, record)):
            raise self._closed_error()
        await future

    def _put(self, waiting: _Waiting) -> bool:
        """To the writer; False once closed (nothing is put after the end marker)."""
        with self._closing:
            if self._closed:
                return False
            self._waiting.put(waiting)
            return True

    def _closed_error(self) -> StoreError:
        return StoreError(f"queue {self.store.url} is closed")

    def close(self) -> None:
        riders, self._riders = self._riders, []  # outcomes riding: committed first
        for rider in riders:  # (before the end marker; a late timer finds none)
            self._put(rider)
        with self._closing:
            if self._closed:
                return
            self._closed = True
            self._waiting.put(None)
        self._writer.join()

    def _write(self) -> None:
        """The writer thread: one batch after another until the end marker."""
        while True:
            first = self._waiting.get()
            if first is None:
                return
            batch = [first]
            stopping = False
            while len(batch) < self.MAX_BATCH:
                try:
                    waiting = self._waiting.get_nowait()
                except queue.Empty:
                    break
                if waiting is None:
                    stopping = True
                    break
                batch.append(waiting)
            self._commit(batch)
            if stopping:
                return

    def _commit(self, batch: list[_Waiting]) -> None:
        with self._busy:
            failure = self._write_batch(
                [waiting.message for waiting in batch if waiting.message is not None],
                [waiting.record for waiting in batch if waiting.record is not None])
        for waiting in batch:
            # Each caller raises its own exception object: they run concurrently.
            outcome = None if failure is None else StoreError(failure)
            try:
                waiting.loop.call_soon_threadsafe(_settle, waiting.future, outcome)
            except RuntimeError:
                pass  # that caller's event loop is closed: nobody is waiting

    def _commit_here(self, message: NewMessage, riders: list[_Waiting]) -> bool:
        """Write on the caller's thread (the event loop's, which waits for the commit)
        when the writer has nothing to do, instead of handing over. For a client sending
        alone, the hop to the writer thread and back cost more than the write itself
        (about 100 us, and each side waiting for the GIL); with others sending, their
        commits share the writer's batches instead. The riders' outcomes go in the same
        transaction. False: the writer is busy (nothing written)."""
        if not self.store.commits_on_callers_thread or not self._waiting.empty() or \
                not self._busy.acquire(blocking=False):
            return False
        try:
            # Closed: the riders hear it too (they were taken from the list).
            failure = str(self._closed_error()) if self._closed else self._write_batch(
                [message], [rider.record for rider in riders if rider.record is not None])
        finally:
            self._busy.release()
        for rider in riders:
            _settle(rider.future, None if failure is None else StoreError(failure))
        if failure is not None:
            raise StoreError(failure)
        return True

    def _write_batch(self, messages: list[NewMessage],
                     records: list[tuple[str, str, Sequence[Result], float]]) -> str | None:
        """One transaction for these adds and records; what went wrong, or None."""
        failure: str | None = None
        try:
            # Durable when it holds a new message (an fsync); outcomes alone need not be.
            with self.store.transaction(write=True, durable=bool(messages)) as tx:
                now = time.time()
                self.store.insert_all_in(tx, messages, now)
                self.store.record_all_in(tx, records)  # in message-id order (locks)
        except StoreError as error:
            failure = str(error)
        except Exception as error:  # noqa: BLE001 - every caller must hear of it
            failure = f"queue {self.store.url}: {type(error).__name__}: {error}"
        return failure
