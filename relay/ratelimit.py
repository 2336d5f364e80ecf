"""Per-sender quotas: messages per minute (a token bucket whose size is
RATE_LIMIT_BURST), per day, and recipients per minute, counted in a `limits` storage
(memory:// or a Redis shared by replicas), and what happens when a shared storage
cannot be reached (RATE_LIMIT_FAILURE, StorageOutage).

Every check is one atomic step in the storage (limits' hit(), which is a Lua script on
Redis, or the token bucket's incr): two replicas can never both let the last allowed
message through, as a test-then-hit would.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from limits import RateLimitItemPerDay, RateLimitItemPerMinute
from limits.aio.strategies import MovingWindowRateLimiter
from limits.errors import ConfigurationError, StorageError
from limits.storage import storage_from_string

from relay.observability import log_event
from relay.policy import one_line
from relay.settings import ConfigError, redact_url, url_secrets

if TYPE_CHECKING:
    from relay.observability import Metrics
    from relay.protocol import RelaySession
    from relay.settings import Config

T = TypeVar("T")

# A shared storage that does not answer within this many seconds counts as down: a
# client's MAIL must not wait on a black-holed Redis for the OS's TCP timeout.
STORAGE_SECONDS = 2.0


class StorageUnavailable(Exception):
    """The shared rate-limit storage (RATE_LIMIT_STORAGE) cannot be reached now. The
    text says why, without credentials."""


def open_storage(uri: str) -> Any:
    """limits' async storage for RATE_LIMIT_STORAGE (the `async+` prefix added); a
    Redis one through redis-py (the `redis` package), with short socket timeouts, and
    with its errors wrapped as limits.errors.StorageError."""
    name = uri if uri.startswith("async+") else f"async+{uri}"
    options: dict[str, Any] = {}
    if name.startswith(("async+redis", "async+rediss", "async+valkey")):
        options = {"implementation": "redispy", "wrap_exceptions": True,
                   "socket_timeout": STORAGE_SECONDS,
                   "socket_connect_timeout": STORAGE_SECONDS}
    try:
        return storage_from_string(name, **options)
    except (ConfigurationError, ValueError, ImportError) as error:
        detail = one_line(error).replace(uri, redact_url(uri))
        for secret in url_secrets(uri):
            detail = detail.replace(secret, "***")
        raise ConfigError(f"RATE_LIMIT_STORAGE={redact_url(uri)!r}: {detail}: "
                          "expects a `limits` storage URI such as memory:// or "
                          "redis://host:6379") from None


def storage_client(storage: Any) -> Any:
    """The redis.asyncio client behind a limits Redis storage (the master, with
    Sentinel), for what limits has no strategy for (the AUTH lock-out); None for
    storages that are not Redis."""
    bridge = getattr(storage, "bridge", None)
    getter = getattr(bridge, "connection_getter", None)
    return getter(False) if getter is not None else None


def storage_error_text(error: BaseException, uri: str) -> str:
    """What went wrong, as it may be logged: one line, no credentials."""
    cause = error.__cause__ if isinstance(error, StorageError) and error.__cause__ \
        else error
    detail = one_line(cause) or type(cause).__name__
    for secret in url_secrets(uri):
        detail = detail.replace(secret, "***")
    return detail


class StorageOutage:
    """Counts and reports failures of the shared storage: the metric
    smtp_relay_rate_limit_storage_errors_total for each, but one ERROR line per outage
    (the first failure) and one line when it answers again; RATE_LIMIT_FAILURE decides
    what the caller does meanwhile (`closed`)."""

    def __init__(self, config: Config, metrics: Metrics | None = None):
        self.uri = config.rate_limit_storage
        self.closed = config.rate_limit_failure == "closed"  # refuse while down
        self.metrics = metrics
        self.down = False

    async def run(self, step: Callable[[], Awaitable[T]]) -> T:
        """step(), with StorageUnavailable for any failure of the storage."""
        try:
            result = await step()
        except _storage_errors() as error:
            self.failed(storage_error_text(error, self.uri))
            raise StorageUnavailable(storage_error_text(error, self.uri)) from None
        if self.down:
            self.down = False
            log_event(logging.WARNING, "rate-limit-storage-recovered",
                      storage=redact_url(self.uri))
        return result

    def failed(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.rate_limit_storage_errors.inc()
        if not self.down:
            self.down = True
            log_event(logging.ERROR, "rate-limit-storage-unavailable",
                      storage=redact_url(self.uri), reason=reason,
                      then="refuse with 451 4.3.0" if self.closed else
                      "relay without limits and with this replica's own lock-outs")


def _storage_errors() -> tuple[type[Exception], ...]:
    """What a failing storage raises: limits' wrapped errors, and what redis-py's own
    client (the lock-out's scripts) raises."""
    try:
        from redis.exceptions import RedisError
    except ImportError:  # memory:// needs no redis package
        return (StorageError, OSError, TimeoutError)
    return (StorageError, OSError, TimeoutError, RedisError)


class TokenBucket:
    """RATE_LIMIT_BURST messages in a row, then one each 60/RATE_LIMIT_PER_MINUTE s:
    a token bucket of `burst` tokens refilled at the rate, kept as GCRA's theoretical
    arrival time (TAT, in ms) in the rate-limit storage.

    Only the storage's atomic counter operations are used (get and incr, which every
    `limits` storage has), so relays sharing a Redis share the bucket: the new TAT is
    added, not set, and when the sum is not what this relay computed (another relay
    took a token in between) the addition is undone and the check runs again. The TAT
    is at most `burst` intervals ahead, so it lives under a key per period of that
    length: the current period's and the previous one's hold every TAT that matters,
    and older keys expire on their own.
    """

    ATTEMPTS = 5

    def __init__(self, storage: Any, per_minute: int, burst: int,
                 clock: Callable[[], float]):
        self.storage, self.clock = storage, clock
        self.interval = max(1, round(60000 / per_minute))  # ms per token
        self.tolerance = (burst - 1) * self.interval  # how far ahead the TAT may be
        self.period = burst * self.interval
        self.expiry = math.ceil(2 * self.period / 1000) + 1  # s: two periods at least
        self.prefix = f"smtp-relay/bucket/{self.interval}/{burst}/"

    async def take(self, key: str) -> float | None:
        """Take a token: None when taken, else the seconds until there is one."""
        for _ in range(self.ATTEMPTS):
            now = int(self.clock() * 1000)
            window = now // self.period
            current = f"{self.prefix}{key}/{window}"
            stored = await self.storage.get(current)
            tat = max(stored, await self.storage.get(f"{self.prefix}{key}/{window - 1}"),
                      now)
            if tat - now > self.tolerance:
                return (tat - self.tolerance - now) / 1000
            step = tat + self.interval - stored
            if await self.storage.incr(current, self.expiry, step) == tat + self.interval:
                return None
            await self.storage.incr(current, self.expiry, -step)  # raced: undo, again
        return self.interval / 1000  # contended throughout: refuse, for now


class RateLimiter:
    """Per-sender quotas: messages per minute (a token bucket of RATE_LIMIT_BURST
    when that is set), per day, and recipients per minute. The sender is the
    authenticated user, or the client IP for trusted-network clients.

    Built on the `limits` package (moving windows; the token bucket on its storage);
    its storage is a URI, so RATE_LIMIT_STORAGE can point several relays at one
    shared Redis.
    """

    def __init__(self, config: Config, clock: Callable[[], float] = time.time,
                 metrics: Metrics | None = None):
        self.config = config
        self.clock = clock  # the token buckets' (tests move it)
        self._message_limits: dict[int, list[tuple[Any, str]]] = {}
        self.recipient_limit = (RateLimitItemPerMinute(config.recipients_per_minute)
                                if config.recipients_per_minute else None)
        self.storage = open_storage(config.rate_limit_storage)
        self.strategy = MovingWindowRateLimiter(self.storage)
        self.outage = StorageOutage(config, metrics)

    def message_limits(self, per_minute: int | None) -> list[tuple[Any, str]]:
        """The limits for one more message; `per_minute` is a user's own rate (SMTP_
        USERS_FILE), None for RATE_LIMIT_PER_MINUTE."""
        per_minute = self.config.rate_limit_per_minute if per_minute is None else \
            per_minute
        limits = self._message_limits.get(per_minute)
        if limits is not None:
            return limits
        limits, burst = [], self.config.rate_limit_burst
        if per_minute and burst:
            limits.append((TokenBucket(self.storage, per_minute, burst, self.clock),
                           f"{burst} messages in a row, then {per_minute} per minute"))
        elif per_minute:  # no burst: a plain limit, at most this many in any minute
            limits.append((RateLimitItemPerMinute(per_minute),
                           f"{per_minute} messages per minute"))
        if self.config.messages_per_day:
            limits.append((RateLimitItemPerDay(self.config.messages_per_day),
                           f"{self.config.messages_per_day} messages per day"))
        self._message_limits[per_minute] = limits
        return limits

    async def check_message(self, key: str, per_minute: int | None = None
                            ) -> Limited | None:
        """None when one more message is allowed (and counted), else which limit was
        reached and when to retry (the fields of replies.RATE_LIMITED). Raises
        StorageUnavailable when a shared storage cannot be reached.

        Each limit is taken in one atomic step (no test first), the token bucket
        first: a message refused by a later limit has used up its place in the earlier
        ones (a sender at a limit is counted a little more, never allowed more)."""
        limits = self.message_limits(per_minute)
        return await self.outage.run(lambda: self._take(key, limits))

    async def _take(self, key: str, limits: list[tuple[Any, str]]) -> Limited | None:
        for item, text in sorted(limits, key=lambda row: not isinstance(row[0],
                                                                        TokenBucket)):
            if isinstance(item, TokenBucket):
                wait = await item.take(key)
                if wait is not None:
                    return self._reply(text, wait)
            elif not await self.strategy.hit(item, key):
                return await self._refusal(item, key, text)
        return None

    async def check_recipient(self, key: str) -> Limited | None:
        item = self.recipient_limit
        if item is None:
            return None
        return await self.outage.run(lambda: self._take(
            key, [(item, f"{item.amount} recipients per minute")]))

    async def _refusal(self, item: Any, key: str, text: str) -> Limited:
        stats = await self.strategy.get_window_stats(item, key)
        return self._reply(text, stats.reset_time - time.time())

    @staticmethod
    def _reply(text: str, wait: float) -> Limited:
        return {"limit": text, "seconds": max(1, math.ceil(wait))}


Limited = dict[str, Any]  # {"limit": "3 messages per minute", "seconds": 20}


def sender_key(session: RelaySession) -> str:
    """Who quotas are counted for: the user, or the address of a trusted client."""
    return session.user if session.user else f"ip:{session.peer_ip}"

