"""Durable delivery: committing messages to the queue, and the background workers that
deliver them.

`Queue` is what the SMTP handlers see: `room` (may one more message be stored?) and
`commit` (a 250 may go out once it returns). Its workers claim due recipients from the
store, send them through the same upstream pools and rules as synchronous delivery
(along each recipient's route: relay.routes.Router, one transaction per destination), and
record each outcome: delivered; deferred, with the next try after a full-jitter
exponential backoff; failed (a 5xx) or expired (QUEUE_MAX_AGE passed), each with a
bounce to the sender (itself queued, so it survives a crash too).

Delivery is at least once: a recipient whose upstream 250 arrived but was not recorded
yet (a crash in between) is tried again by whoever claims it next.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import math
import os
import random
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from relay import replies
from relay.bounce import FailedRecipient, bounce_wanted, build_dsn, is_bounce
from relay.mx import MXDeliverer
from relay.observability import log, log_event
from relay.protocol import new_message_id
from relay.routes import AttemptInfo, Outcomes, Router, RouteTable
from relay.settings import ConfigError
from relay.store import (
    Attempt,
    Claim,
    GroupCommit,
    NewMessage,
    RecipientState,
    Result,
    Store,
    StoreError,
)
from relay.upstream import UpstreamPools

if TYPE_CHECKING:
    from relay.observability import Metrics
    from relay.settings import Config
    from relay.upstream import UpstreamPool


def retry_delay(attempts: int, minimum: float, maximum: float,
                rng: random.Random | None = None) -> float:
    """Seconds until the next try after `attempts` failed ones: full jitter over
    [minimum, ceiling], the ceiling doubling from `minimum` up to `maximum`. The first
    retry comes after exactly `minimum`; none ever comes sooner (an upstream that is
    down is not hammered), and a crowd deferred together spreads out. Float seconds
    throughout: rounding to whole units turns a slow doubling into a flat schedule."""
    ceiling = min(maximum, minimum * 2.0 ** max(0, attempts - 1))
    return (rng or random).uniform(minimum, max(minimum, ceiling))


@dataclasses.dataclass
class Delivered:
    """What one try of a claim came to (Deliverer.deliver)."""

    results: list[Result]  # one per recipient, to record
    failed: list[FailedRecipient]  # failed for good: bounced
    finished: float  # when the try ended (epoch seconds)


class DeliveryAgent(Protocol):
    """Who makes the tries for the queue's workers: a Deliverer here, or the delivery
    process (relay.worker) running one."""

    def start(self) -> None: ...

    async def deliver(self, claim: Claim) -> Delivered: ...

    def reload(self) -> None: ...

    async def close(self) -> None: ...


def judge(config: Config, metrics: Metrics, claim: Claim, outcomes: Outcomes,
          started: float, info: dict[str, AttemptInfo] | None = None) -> Delivered:
    """What one try's replies mean for each recipient: delivered; failed for good (a
    5xx, or QUEUE_MAX_AGE passed: bounced); else deferred, with the next try after a
    full-jitter backoff. One log line and one attempts count per recipient. `info`:
    per recipient, the host that answered and the TLS outcome (relay.routes.Router)."""
    now = time.time()
    unknown = AttemptInfo(f"{config.relay_host}:{config.relay_port}", "")
    results, failed = [], []
    for recipient in claim.recipients:
        code, text = outcomes[recipient.address]
        reply = f"{code} {text}" if code else text
        where = (info or {}).get(recipient.address) or unknown
        # The API's attempt: the host that answered, and whether its certificate was
        # verified (tls is then true): "mx.example.net[192.0.2.7]:25 (verified)".
        encrypted = where.tls in ("verified", "unverified")
        attempt = Attempt(now, recipient.address, where.upstream + (
            f" ({where.tls})" if encrypted else ""), reply, now - started, encrypted)
        fields: dict[str, Any] = {"id": claim.id, "from": claim.sender,
                                  "to": recipient.address,
                                  "attempts": recipient.attempts + 1, "upstream": reply,
                                  "host": where.upstream, "tls": where.tls or "none"}
        next_attempt = None
        if 200 <= code < 300:
            status, result, level = "delivered", "delivered", logging.INFO
            fields["queued_s"] = round(now - claim.received, 1)
        elif 500 <= code < 600:
            status, result, level = "failed", "delivery-failed", logging.ERROR
        elif now - claim.received >= config.queue_max_age:
            status, result, level = "failed", "expired", logging.ERROR
            fields["queued_s"] = round(now - claim.received, 1)
        else:
            status, result, level = "deferred", "deferred", logging.WARNING
            delay = retry_delay(recipient.attempts + 1, config.queue_retry_min,
                                config.queue_retry_max)
            next_attempt = now + delay
            fields["next_attempt_s"] = round(delay, 1)
        results.append(Result(recipient.address, status, reply, next_attempt, attempt))
        if status == "failed":
            failed.append(FailedRecipient(recipient.address, reply,
                                          expired=result == "expired"))
        # The metric's result label: delivered, deferred, failed, expired.
        metrics.queue_attempts.labels(
            "failed" if result == "delivery-failed" else result).inc()
        log_event(level, result, **fields)
    return Delivered(results, failed, now)


class DeliveryFailed(Exception):
    """A try that came to no outcome: the delivery process ended, or raised."""


class Deliverer:
    """One try of a claimed message along its recipients' routes (relay.routes.Router:
    RELAY_*, a route's smart host, or MX; one transaction per destination): the
    upstreams' replies, each recipient's new status (delivered, deferred with its next
    try, failed, expired), its log line and the attempts metric. It touches no store:
    the queue records what it returns."""

    def __init__(self, config: Config, pool: UpstreamPool, metrics: Metrics,
                 router: Router | None = None):
        self.config = config
        self.pool = pool
        self.metrics = metrics
        # Without a router of the caller's: ROUTES_FILE and the users' routes read
        # here (the delivery process), the pools around `pool`, MX made when needed.
        self.router = router or Router(
            RouteTable(config), UpstreamPools(config, pool.executor, metrics, pool),
            lambda: MXDeliverer(config, pool.executor, metrics))

    def start(self) -> None:
        """Nothing to start: the pools open sessions as deliveries need them."""

    def reload(self) -> None:
        """SIGHUP: ROUTES_FILE and the users' routes read again. On an error the
        routes in use stay (the relay's own reload logs why)."""
        try:
            self.router.reload()
        except ConfigError:
            pass

    async def close(self) -> None:
        await self.router.pools.close()

    async def deliver(self, claim: Claim) -> Delivered:
        """One try for each of the claim's recipients: what to record, and who failed
        for good (the queue bounces those). Logs each recipient's outcome."""
        addresses = [recipient.address for recipient in claim.recipients]
        started = time.time()
        outcomes, info = await self.router.attempt(claim.user, claim.sender, addresses,
                                                   claim.body)
        return judge(self.config, self.metrics, claim, outcomes, started, info)


class Queue:
    """The queue as the relay uses it: commit, room, and the delivery workers."""

    POLL_SECONDS = 1.0  # how often the dispatcher looks for due recipients (others' too)
    HOUSEKEEPING_SECONDS = 30.0  # archive retention, the depth gauges

    def __init__(self, config: Config, store: Store, deliverer: DeliveryAgent,
                 metrics: Metrics):
        self.config = config
        self.store = store
        self.deliverer = deliverer  # makes the tries: see relay.worker
        self.metrics = metrics
        self.committer = GroupCommit(store)
        # Who we are in the store's locks: unique per process, across replicas.
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.name = f"{self.host}:{self.pid}:{new_message_id()[:8]}"
        # Idle workers, each waiting for a message: a commit hands its own to one of
        # them (no claim transaction), the dispatcher what it claims from the store.
        self._idle: collections.deque[asyncio.Future[Claim | None]] = collections.deque()
        # Due work may wait in the store (a commit found no idle worker): the
        # dispatcher claims as soon as a worker is idle, not at its next poll.
        self._backlog = asyncio.Event()
        self._backlog.set()  # at start: whatever the last run left
        self._dispatcher_wakeup = asyncio.Event()
        self._stored_unhanded = 0  # commits that found no idle worker (see _dispatch)
        # Messages stored already claimed by this relay while every worker was busy,
        # for the next worker that frees up (at most READY_MAX; beyond that a commit
        # leaves its message to the dispatcher): (claim, when its lease ends).
        self._ready: collections.deque[tuple[Claim, float]] = collections.deque()
        self._delivery_seconds = 0.0  # how long a delivery takes, on average
        self._worker_freed = asyncio.Event()  # more workers wanted: parked ones look
        self._parked = 0  # workers waiting in _until_wanted
        self._stopping = False  # stop(): workers finish what they hold, take no more
        self._workers: list[asyncio.Task[None]] = []  # and the dispatcher
        self._housekeeper: asyncio.Task[None] | None = None
        self._deliverer_started = False  # start(deliver=True): stop() closes it
        # One client connected, and only one: its commits may skip the writer thread,
        # and outcomes wait for its next message (see GroupCommit). With none, nothing
        # is coming to ride with: outcomes go straight to the writer. The server sets it.
        self.alone: Callable[[], bool] = lambda: False
        self.usage = store.usage()  # refreshed by housekeeping and each commit

    # --- the SMTP side -----------------------------------------------------------------

    def room(self, size: int) -> str | None:
        """Why a message of `size` bytes cannot be stored now, or None."""
        config, usage = self.config, self.usage
        if usage.messages + 1 > config.queue_max_messages:
            return f"{usage.messages} messages queued, QUEUE_MAX_MESSAGES"
        if usage.bytes + size > config.queue_max_bytes:
            return "QUEUE_MAX_BYTES reached"
        if usage.free_bytes is not None and \
                usage.free_bytes - size < config.queue_min_free_bytes:
            return "disk nearly full, QUEUE_MIN_FREE_BYTES"
        return None

    async def can_store(self) -> tuple[bool, str]:
        """For /readyz: the store answers and has room for a message."""
        try:
            self.usage = await asyncio.to_thread(self.store.usage)
        except StoreError as error:
            return False, f"queue store not ready: {error}"
        full = self.room(0)
        if full is not None:
            return False, f"queue full: {full}"
        return True, f"queue accepts: {self.usage.messages} messages waiting"

    async def commit(self, message: NewMessage) -> None:
        """Durably stored when this returns (StoreError if not): only then a 250.

        With a worker idle, the message is stored already claimed by it (under the
        usual lease) and handed over in memory: no claim transaction, no reading the
        body back. A crash before the delivery leaves a claim that the next start
        (or, on another host, the lease's end) gives back to the queue."""
        waiter = self._idle.popleft() if self._idle and not message.outcomes else None
        # Every worker busy: the message waits in memory for the first one free, when
        # few wait already. The dispatcher's claim would read it back from the store
        # and hold the store meanwhile (at 100 KB and 10 clients nearly every message
        # went that way, and the claims held up the next commits).
        ready = waiter is None and not message.outcomes and self.takes_work() and \
            len(self._ready) < self.READY_MAX
        if waiter is not None or ready:
            message.claimed_by = self.name
            message.locked_until = time.time() + self.config.queue_lease_seconds
        try:
            await self.committer.add(message, alone=self.alone())
        except BaseException:
            if waiter is not None:
                self._idle.appendleft(waiter)  # still idle: nothing was stored
            raise
        self.usage.messages += 1
        self.usage.bytes += len(message.body)
        if self.usage.free_bytes is not None:
            self.usage.free_bytes -= len(message.body)
        self.metrics.queue_committed.inc()
        if waiter is None and not ready:  # the dispatcher takes it from the store
            self._stored_unhanded += 1
            self._backlog.set()
            return
        now = time.time()
        claim = Claim(
            id=message.id, received=message.received, sender=message.sender,
            body=message.body, recipients=[
                RecipientState(address, "delivering", 0, None, None, now)
                for address in dict.fromkeys(message.recipients)],
            user=message.user)
        if waiter is not None:
            waiter.set_result(claim)
        else:
            assert message.locked_until is not None  # set above
            self._ready.append((claim, message.locked_until))

    # Enough to cover a burst while every worker is busy; the rest wait in the store.
    READY_MAX = 64

    def takes_work(self) -> bool:
        """Workers are running and taking work (start(deliver=True), no stop())."""
        return bool(self._workers) and not self._stopping

    def _take_ready(self) -> Claim | None:
        """The oldest message waiting in memory whose claim still has half its lease
        to run (a delivery renews it from then on). An older one is left to its
        lease's end, when the dispatcher claims it again from the store."""
        while self._ready:
            claim, locked_until = self._ready.popleft()
            if locked_until - time.time() >= self.config.queue_lease_seconds / 2:
                return claim
            log_event(logging.DEBUG, "claim-aged", id=claim.id)
        return None

    # --- the workers ---------------------------------------------------------------------

    def start(self, *, deliver: bool = True) -> None:
        """The workers and their dispatcher (`deliver`: not for sync mode, whose
        store is only the archive), and the housekeeping."""
        if deliver:
            self.deliverer.start()
            self._deliverer_started = True
            self.release_stale_claims()
            for _ in range(self.config.queue_workers):
                self._workers.append(asyncio.create_task(self._work()))
            self._workers.append(asyncio.create_task(self._dispatch()))
        self._housekeeper = asyncio.create_task(self._housekeeping())

    def release_stale_claims(self) -> None:
        """Claims an earlier run of this relay left when it was killed: ours to take
        back now, not after their lease. A holder is that when it ran on this host
        and its process is gone, or had our pid (a container restarted: pid 1 again).
        Other hosts' claims wait for their lease (the other relay may be alive)."""
        try:
            holders = self.store.holders()
        except StoreError as error:
            log_event(logging.ERROR, "queue-error", reason=str(error))
            return
        for holder in holders:
            host, _, rest = holder.partition(":")
            pid_text, _, _ = rest.partition(":")
            if host != self.host or not pid_text.isdigit() or holder == self.name:
                continue
            pid = int(pid_text)
            if pid != self.pid and _alive(pid):
                continue
            with contextlib.suppress(StoreError):
                self.store.release_claims(holder)
                log_event(logging.WARNING, "claims-recovered", holder=holder)

    def reload(self) -> None:
        """SIGHUP: the deliverer re-reads what it reads (the delivery process: its
        routes). A queue that delivers nothing (sync mode) has nothing to re-read."""
        if self._deliverer_started:
            self.deliverer.reload()

    def stopping(self) -> bool:
        """stop() has begun (set from another task: a method, so that type checkers
        do not take it for a constant inside the workers' loops)."""
        return self._stopping

    async def stop(self) -> None:
        """Stop taking work; deliveries in progress get TIMEOUT to finish (a cut one
        could be delivered twice), then this process's claims go back to the queue
        for the next start (or replica)."""
        self._stopping = True
        self._backlog.set()  # the dispatcher leaves
        self._worker_freed.set()  # and the parked workers
        while self._idle:  # idle workers leave now
            self._idle.popleft().set_result(None)
        if self._workers:
            await asyncio.wait(self._workers, timeout=self.config.timeout)
        tasks = [*self._workers, *([self._housekeeper] if self._housekeeper else [])]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        with contextlib.suppress(StoreError):
            await asyncio.to_thread(self.store.release_claims, self.name)
        if self._deliverer_started:
            await self.deliverer.close()
        self.committer.close()
        await asyncio.to_thread(self.store.close)

    async def _work(self) -> None:
        """One delivery at a time: a message handed over by a commit or by the
        dispatcher, which hold the claim in this relay's name."""
        while not self.stopping():
            await self._until_wanted()
            if self.stopping():  # unparked by stop(): its idle list is already empty
                return
            claim = self._take_ready()
            if claim is None:
                waiter: asyncio.Future[Claim | None] = \
                    asyncio.get_running_loop().create_future()
                self._idle.append(waiter)
                if self._backlog.is_set():
                    self._dispatcher_wakeup.set()  # work waits in the store
                claim = await waiter
                if claim is None:
                    return
            started = time.monotonic()
            try:
                await self._deliver(claim)
            except StoreError as error:
                log_event(logging.ERROR, "queue-error", id=claim.id, reason=str(error))
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 (a bug must not stop the worker)
                log.exception("unexpected error delivering %s", claim.id)
            finally:
                # The average delivery time, over the last twenty or so.
                self._delivery_seconds += (time.monotonic() - started -
                                           self._delivery_seconds) / 20
                if self._active() < self.workers_wanted() and \
                        not self._worker_freed.is_set():  # a slower upstream
                    log_event(logging.DEBUG, "queue-workers-wanted",
                              active=self._active(), wanted=self.workers_wanted())
                    self._worker_freed.set()  # the parked ones look again

    # Workers wanted: enough to keep the upstream's latency covered, no more. A fast
    # upstream answers in a millisecond or two, and then more deliveries at once only
    # take CPU from the clients being accepted; a slow one (200 ms a message) needs
    # many at once to drain as fast as mail comes in.
    # At least 16: the deliveries run in the delivery process, on the other core, so
    # more of them at once cost the acceptor only their claims and records. With 4, a
    # fast upstream drained 48 clients' 2 KB mail at 600 msg/s end to end (the clients
    # were told 250 at 2,900/s); with 16 at 1,100/s, still accepting at 2,500/s.
    MIN_WORKERS = 16
    SECONDS_PER_WORKER = 0.004  # a delivery this long keeps one more worker busy

    def workers_wanted(self) -> int:
        wanted = math.ceil(self._delivery_seconds / self.SECONDS_PER_WORKER)
        return min(self.config.queue_workers, max(self.MIN_WORKERS, wanted))

    def _active(self) -> int:
        """Workers not parked: idle, handed a message (not yet running), delivering.
        (Counting the idle and the delivering missed the handed ones: each delivery
        that ended meanwhile woke every parked worker for nothing, some 10 % of the
        event loop at one client.)"""
        return self.config.queue_workers - self._parked

    async def _until_wanted(self) -> None:
        """Park while enough other workers are active (see workers_wanted)."""
        while not self.stopping() and self._active() - 1 >= self.workers_wanted():
            self._parked += 1
            self._worker_freed.clear()
            try:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._worker_freed.wait(), self.POLL_SECONDS)
            finally:
                self._parked -= 1

    async def _dispatch(self) -> None:
        """Claims due messages from the store for the idle workers, as many at once
        as there are idle workers: when a commit found none idle (the backlog), and
        every POLL_SECONDS (retries come due; other relays' commits, and the claims
        of relays that died, which nothing here hears of)."""
        while not self.stopping():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._dispatcher_wakeup.wait(), self.POLL_SECONDS)
            self._dispatcher_wakeup.clear()
            while self._idle and not self.stopping():
                # These workers wait for what this claim finds (a commit meanwhile
                # hands its message to another, or finds none idle: the backlog).
                reserved = [self._idle.popleft() for _ in range(len(self._idle))]
                stored_before = self._stored_unhanded
                try:
                    claims = await asyncio.to_thread(
                        self.store.claim, self.name, time.time(),
                        self.config.queue_lease_seconds, len(reserved))
                except StoreError as error:
                    log_event(logging.ERROR, "queue-error", reason=str(error))
                    claims = []
                except Exception:  # noqa: BLE001 (a bug must not stop every delivery)
                    log.exception("unexpected error claiming from the queue")
                    claims = []
                for waiter, claim in zip(reserved, claims, strict=False):
                    waiter.set_result(claim)
                unused = reserved[len(claims):]
                if self.stopping():  # stop() let the other idle workers go already
                    for waiter in unused:
                        waiter.set_result(None)
                    break
                self._idle.extendleft(reversed(unused))  # idle again, first in line
                if unused:
                    if self._stored_unhanded == stored_before:
                        self._backlog.clear()  # nothing more due in the store now
                    break

    async def _deliver(self, claim: Claim) -> None:
        renewing = asyncio.create_task(self._renew(claim.id))
        started = time.time()
        try:
            delivered = await self.deliverer.deliver(claim)
        except DeliveryFailed as error:
            # Whether the upstream got it is unknown: tried again later, as after a
            # lost link (at least once).
            delivered = judge(self.config, self.metrics, claim, {
                recipient.address: (0, replies.UPSTREAM_LOST.format(detail=str(error)))
                for recipient in claim.recipients}, started)
        finally:
            renewing.cancel()
        if delivered.failed:
            await self._bounce(claim, delivered.failed, delivered.finished)
        await self.committer.record(self.name, claim.id, delivered.results,
                                    delivered.finished, alone=self.alone())

    async def _renew(self, message_id: str) -> None:
        """Keep the claim while the delivery runs: another relay takes it over only
        when this one has gone silent for QUEUE_LEASE_SECONDS."""
        lease = self.config.queue_lease_seconds
        while True:
            await asyncio.sleep(lease / 3)
            with contextlib.suppress(StoreError):
                await asyncio.to_thread(self.store.renew, self.name, message_id,
                                        time.time() + lease)

    async def _bounce(self, claim: Claim, failed: list[FailedRecipient], now: float) -> None:
        """Queue a DSN to the sender (or BOUNCE_TO) before the failure is recorded: a
        crash in between can only mean a second bounce, never none."""
        to = bounce_wanted(claim.sender, self.config.bounce_to)
        if to is None or is_bounce(claim.body):  # never bounce a bounce (RFC 3834)
            sender: dict[str, Any] = {"from": claim.sender}
            log_event(logging.INFO, "not-bounced", id=claim.id, **sender,
                      to=[f.address for f in failed])
            return
        bounce = NewMessage(
            id=new_message_id(), received=now, user=None, peer="", sender="",
            body=build_dsn(reporting_mta=self.config.smtp_hostname, message_id=claim.id,
                           original_sender=claim.sender, recipients=failed,
                           original=claim.body, arrival=claim.received, now=now, to=to),
            recipients=[to], trace_id=claim.id)
        await self.commit(bounce)
        self.metrics.queue_bounces.inc()
        log_event(logging.WARNING, "bounced", id=claim.id, bounce_id=bounce.id, to=to,
                  failed=[f.address for f in failed])

    async def _housekeeping(self) -> None:
        config = self.config
        while True:
            try:
                if config.archive != "off":
                    purged = await asyncio.to_thread(
                        self.store.purge, time.time(), max_age=config.archive_max_age,
                        max_messages=config.archive_max_messages,
                        max_bytes=config.archive_max_bytes)
                    if purged:
                        log_event(logging.INFO, "archive-purged", messages=purged)
                self.usage = await asyncio.to_thread(self.store.usage)
                stats = await asyncio.to_thread(self.store.stats, time.time())
                self.metrics.queue_observe(stats)
            except StoreError as error:
                log_event(logging.ERROR, "queue-error", reason=str(error))
            except Exception:  # noqa: BLE001 (retention and gauges go on next time)
                log.exception("unexpected error in the queue's housekeeping")
            await asyncio.sleep(self.HOUSEKEEPING_SECONDS)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def queue_message(message_id: str, user: str | None, peer: str, sender: str,
                  recipients: list[str], body: bytes, **extra: Any) -> NewMessage:
    """A NewMessage for the store, from what the handler holds."""
    return NewMessage(id=message_id, received=time.time(), user=user, peer=peer,
                      sender=sender, body=body, recipients=list(recipients), **extra)
