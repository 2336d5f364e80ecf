"""Per-sender quotas: messages per minute (a token bucket whose size is
RATE_LIMIT_BURST), per day, and recipients per minute, counted in a `limits` storage
(memory:// or a Redis shared by replicas).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from limits import RateLimitItemPerDay, RateLimitItemPerMinute
from limits.aio.strategies import MovingWindowRateLimiter
from limits.errors import ConfigurationError
from limits.storage import storage_from_string

from relay.policy import one_line
from relay.settings import ConfigError, redact_url, url_secrets

if TYPE_CHECKING:
    from relay.protocol import RelaySession
    from relay.settings import Config


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

    def __init__(self, config: Config, clock: Callable[[], float] = time.time):
        self.config = config
        self.clock = clock  # the token buckets' (tests move it)
        self._message_limits: dict[int, list[tuple[Any, str]]] = {}
        self.recipient_limit = (RateLimitItemPerMinute(config.recipients_per_minute)
                                if config.recipients_per_minute else None)
        uri = config.rate_limit_storage
        try:
            storage = storage_from_string(uri if uri.startswith("async+") else
                                          f"async+{uri}")
        except (ConfigurationError, ValueError, ImportError) as error:
            detail = one_line(error).replace(uri, redact_url(uri))
            for secret in url_secrets(uri):
                detail = detail.replace(secret, "***")
            raise ConfigError(f"RATE_LIMIT_STORAGE={redact_url(uri)!r}: {detail}: "
                              "expects a `limits` storage URI such as memory:// or "
                              "redis://host:6379") from None
        self.storage = storage
        self.strategy = MovingWindowRateLimiter(storage)

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
        reached and when to retry (the fields of replies.RATE_LIMITED)."""
        limits = self.message_limits(per_minute)
        windows = [(item, text) for item, text in limits
                   if not isinstance(item, TokenBucket)]
        for item, text in windows:
            if not await self.strategy.test(item, key):
                return await self._refusal(item, key, text)
        for item, text in limits:  # only once every window has room: a token is taken
            if isinstance(item, TokenBucket):
                wait = await item.take(key)
                if wait is not None:
                    return self._reply(text, wait)
        for item, _ in windows:
            await self.strategy.hit(item, key)
        return None

    async def check_recipient(self, key: str) -> Limited | None:
        item = self.recipient_limit
        if item is None or await self.strategy.hit(item, key):
            return None
        return await self._refusal(
            item, key, f"{item.amount} recipients per minute")

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

