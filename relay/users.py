"""Who may send: the users (SMTP_AUTH_USERNAME and SMTP_USERS_FILE), their policies,
password checks (constant-time, or bcrypt on a small pool of its own), and the per-IP
lock-out after repeated failed AUTH: in this process (AuthGuard), or in the Redis of
RATE_LIMIT_STORAGE, shared by replicas (SharedAuthGuard).

SMTPAuthHandler (in smtp_relay.py) makes the AUTH decision with these pieces.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import functools
import hmac
import os
import re
import secrets
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import bcrypt
from aiosmtpd.smtp import LoginPassword

from relay.routes import parse_destination
from relay.settings import (
    BCRYPT_HASH,
    DEFAULT_AUTH_PASSWORD,
    ConfigError,
    parse_domain_list,
    read_text_file,
)

if TYPE_CHECKING:
    from relay.policy import DomainList
    from relay.ratelimit import StorageOutage
    from relay.routes import Destination
    from relay.settings import Config


@dataclasses.dataclass(frozen=True)
class UserPolicy:
    """What one user may do; a session keeps the policy it had at AUTH."""

    name: str
    allowed_from_domains: DomainList
    allowed_to_domains: DomainList
    rate_limit_per_minute: int | None = None  # None: RATE_LIMIT_PER_MINUTE
    route: Destination | None = None  # None: ROUTES_FILE, then RELAY_*


@dataclasses.dataclass(frozen=True)
class User:
    policy: UserPolicy
    password: bytes = b""  # the env user's plain password, or
    password_hash: bytes = b""  # a bcrypt hash


USERS_FILE_FORMAT = ("name:bcrypt-hash[:sender-domains[:recipient-domains"
                     "[:messages-per-minute[:route]]]]")


_USER_NAME = re.compile(r"[^\s:]{1,128}")


def default_policy(config: Config, name: str = "") -> UserPolicy:
    return UserPolicy(name, config.allowed_from_domains, config.allowed_to_domains)


def parse_users_file(text: str, config: Config) -> dict[str, User]:
    """SMTP_USERS_FILE: one user per line, `#` comments and blank lines ignored:

        name:bcrypt-hash[:sender-domains[:recipient-domains[:messages-per-minute[:route]]]]

    Domain fields are comma lists like ALLOWED_FROM_DOMAINS; an empty or missing field
    falls back to ALLOWED_FROM_DOMAINS / ALLOWED_TO_DOMAINS / RATE_LIMIT_PER_MINUTE.
    The route (the rest of the line, so a URL's colons need no escaping) is an upstream
    as in ROUTES_FILE, e.g. smtp://smtp.project.example:2525?tls=none, or mx.
    """
    users: dict[str, User] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"SMTP_USERS_FILE line {number}"
        fields = line.split(":", 5)
        if not 2 <= len(fields) <= 6:
            raise ConfigError(f"{where}: expects {USERS_FILE_FORMAT}")
        name, hashed, senders, recipients, rate, route = (fields + ["", "", "", ""])[:6]
        if not _USER_NAME.fullmatch(name):
            raise ConfigError(f"{where}: expects a user name without spaces or colons")
        if name in users:
            raise ConfigError(f"{where}: user {name!r} is listed twice")
        if not BCRYPT_HASH.fullmatch(hashed):
            raise ConfigError(f"{where}: expects a bcrypt hash ($2b$ or $2y$) after "
                              f"the name (python smtp_relay.py hash-password)")
        rate = rate.strip()
        if rate and not (rate.isascii() and rate.isdigit()):
            raise ConfigError(f"{where}: expects a whole number of messages per minute")
        policy = UserPolicy(
            name,
            parse_domain_list(senders, f"{where} sender domains")
            if senders.strip() else config.allowed_from_domains,
            parse_domain_list(recipients, f"{where} recipient domains")
            if recipients.strip() else config.allowed_to_domains,
            int(rate) if rate else None,
            parse_destination(route.strip(), f"{where} route") if route.strip() else None)
        users[name] = User(policy, password_hash=hashed.encode("ascii"))
    return users


def load_users(config: Config) -> dict[str, User]:
    """The env user (SMTP_AUTH_USERNAME) and SMTP_USERS_FILE's users together."""
    users: dict[str, User] = {}
    # With a users file, the env user exists only when given a password of its own:
    # the built-in default must not stay a way in.
    env_user_set = config.auth_password_hash or config.auth_password != \
        DEFAULT_AUTH_PASSWORD
    if not config.users_file or env_user_set:
        users[config.auth_username] = User(
            default_policy(config, config.auth_username),
            config.auth_password.encode("utf-8"),
            config.auth_password_hash.encode("ascii"))
    if config.users_file:
        text = read_text_file(config.users_file, "SMTP_USERS_FILE",
                              "a readable users file")
        for name, user in parse_users_file(text, config).items():
            if name in users:
                raise ConfigError(f"SMTP_USERS_FILE: user {name!r} is also "
                                  "SMTP_AUTH_USERNAME: expects each name once")
            users[name] = user
    return users


BCRYPT_WORKERS = max(2, min(4, os.cpu_count() or 2))


BCRYPT_CHECKS_PER_ADDRESS = max(1, BCRYPT_WORKERS // 2)


BCRYPT_MAX_PASSWORD = 72  # bytes bcrypt reads; `htpasswd -B` ignores the rest


class Gate:
    """A per-address semaphore, kept only while someone uses it."""

    def __init__(self) -> None:
        self.semaphore = asyncio.Semaphore(BCRYPT_CHECKS_PER_ADDRESS)
        self.users = 0


class AuthGuard:
    """Counts failed AUTH per client IP. AUTH_MAX_FAILURES of them within
    AUTH_FAILURE_WINDOW seconds lock that IP out for AUTH_FAILURE_WINDOW seconds."""

    MAX_TRACKED_ADDRESSES = 100_000  # memory bound under a distributed attack

    def __init__(self, max_failures: int, window: float):
        self.max_failures = max_failures
        self.window = window
        self._failures: dict[str, collections.deque[float]] = {}
        self._locked_until: dict[str, float] = {}

    def locked(self, address: str) -> bool:
        until = self._locked_until.get(address)
        if until is None:
            return False
        if time.monotonic() < until:
            return True
        del self._locked_until[address]
        return False

    def record_failure(self, address: str) -> bool:
        """Count one failure; True when it locks the address out."""
        if self.max_failures <= 0:
            return False
        now = time.monotonic()
        if address not in self._failures and len(self._failures) >= \
                self.MAX_TRACKED_ADDRESSES:
            self._forget_before(now - self.window)
            if len(self._failures) >= self.MAX_TRACKED_ADDRESSES:
                self._failures.pop(next(iter(self._failures)))
        failures = self._failures.setdefault(address, collections.deque())
        while failures and failures[0] < now - self.window:
            failures.popleft()
        failures.append(now)
        if len(failures) < self.max_failures:
            return False
        # The failures stay until they age out: all older than the window when the
        # lock-out ends, so none counts again.
        self._locked_until[address] = now + self.window
        return True

    # The lock-out interface SMTPAuthHandler and the connection checker use (shared
    # with SharedAuthGuard, whose checks are a round trip to Redis).

    async def is_locked(self, address: str) -> bool:
        return self.locked(address)

    async def failed(self, address: str) -> bool:
        """record_failure: True when this failure locks the address out."""
        return self.record_failure(address)

    def _forget_before(self, oldest: float) -> None:
        for address in [a for a, f in self._failures.items() if f[-1] < oldest]:
            del self._failures[address]
        now = time.monotonic()
        for address in [a for a, u in self._locked_until.items() if u <= now]:
            del self._locked_until[address]


class SharedAuthGuard:
    """AuthGuard's lock-out kept in Redis (RATE_LIMIT_STORAGE=redis://...), so that
    failures spread over several replicas add up: AUTH_MAX_FAILURES within
    AUTH_FAILURE_WINDOW from one address lock it out on every replica.

    Each failure is a member of a sorted set scored by Redis's own clock (replicas'
    clocks may differ), and a lock key with the window as its expiry. Counting, the
    expiry of old failures and setting the lock are one Lua script, so two replicas
    counting the last failure at once cannot both miss the lock-out.

    When Redis cannot be reached (StorageOutage reports it), RATE_LIMIT_FAILURE=open
    counts in this process's own AuthGuard meanwhile (a lock-out per replica rather
    than none); closed raises StorageUnavailable, and the caller refuses (451).
    """

    FAIL = """
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local window = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ms - window)
redis.call('ZADD', KEYS[1], ms, ARGV[3])
redis.call('PEXPIRE', KEYS[1], window)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
  redis.call('SET', KEYS[2], '1', 'PX', window)
  return 1
end
return 0
"""
    def __init__(self, client: Any, outage: StorageOutage, max_failures: int,
                 window: float):
        self.client = client  # redis.asyncio.Redis (limits' own, see storage_client)
        self.outage = outage
        self.max_failures = max_failures
        self.window_ms = max(1, int(window * 1000))
        self.local = AuthGuard(max_failures, window)  # while Redis is down (open)
        self._fail = client.register_script(self.FAIL)

    @staticmethod
    def _keys(address: str) -> list[str]:
        # One hash tag: both keys on the same node of a Redis Cluster.
        return [f"smtp-relay/auth-failures/{{{address}}}",
                f"smtp-relay/auth-locked/{{{address}}}"]

    async def _shared(self, step: Callable[[], Any]) -> tuple[bool, Any]:
        """(True, step's result), or (False, None) when Redis is down and
        RATE_LIMIT_FAILURE is open; StorageUnavailable when it is closed."""
        from relay.ratelimit import StorageUnavailable
        try:
            return True, await self.outage.run(step)
        except StorageUnavailable:
            if self.outage.closed:
                raise
            return False, None

    async def is_locked(self, address: str) -> bool:
        if self.max_failures <= 0:
            return False
        shared, count = await self._shared(
            lambda: self.client.exists(self._keys(address)[1]))
        return bool(count) if shared else self.local.locked(address)

    async def failed(self, address: str) -> bool:
        """Count one failure; True when it locks the address out."""
        if self.max_failures <= 0:
            return False
        member = f"{time.time():.6f}/{secrets.token_hex(4)}"  # unique: one per failure
        shared, locked = await self._shared(lambda: self._fail(
            keys=self._keys(address), args=[self.window_ms, self.max_failures, member]))
        return bool(locked) if shared else self.local.record_failure(address)


LockOuts = AuthGuard | SharedAuthGuard


class PasswordChecker:
    """Checks AUTH credentials (PLAIN, LOGIN, CRAM-MD5) against the users: plain
    passwords in constant time, hashes with bcrypt.

    bcrypt runs on its own small pool (never the one that carries deliveries), at most
    BCRYPT_CHECKS_PER_ADDRESS at a time for one client address. A check waits for its
    turn here, not in the pool's queue, so the check of a client that left while
    waiting never runs; a running check keeps its turn until bcrypt returns. Accepted
    (user, password) pairs are cached per users generation (reload starts a new one).
    """

    def __init__(self, config: Config, executor: concurrent.futures.Executor | None = None):
        self.users = load_users(config)
        self._executor = executor or concurrent.futures.ThreadPoolExecutor(
            max_workers=BCRYPT_WORKERS, thread_name_prefix="bcrypt")
        self._workers = asyncio.Semaphore(BCRYPT_WORKERS)
        self._gates: dict[str, Gate] = {}
        # Keyed digests of (user, password) pairs bcrypt already accepted, so a busy
        # client does not cost a bcrypt run per connection. Never the password itself.
        # One set per users generation: reload() starts a new one.
        self._cache_key = secrets.token_bytes(32)
        self._accepted: set[bytes] = set()
        self._dummy_hash = b""  # made on first need (see _hash_for_unknown_names)

    def reload(self, config: Config) -> int:
        """Re-read SMTP_USERS_FILE (SIGHUP). On error keep the old users and raise."""
        users = load_users(config)
        self.users, self._accepted = users, set()
        return len(users)

    async def verify(self, mechanism: str, credentials: Any, address: str = ""
                     ) -> User | None:
        """The user these credentials prove, or None. `address` is the client's, for
        the limit on concurrent checks per address."""
        for _ in range(3):
            generation = self._accepted
            user = await self._verify(mechanism, credentials, address)
            if self._accepted is generation:
                return user
            # SIGHUP reloaded the users during the check: the verdict was about users
            # that are gone. Check against the new ones.
        return None

    async def _verify(self, mechanism: str, credentials: Any, address: str
                      ) -> User | None:
        if mechanism == "CRAM-MD5":
            login, challenge, digest = credentials
            user = self.users.get(login.decode("utf-8", "replace"))
            secret = user.password if user is not None and user.password else \
                secrets.token_bytes(16)  # no plain password: cannot match
            expected = hmac.new(secret, challenge, "md5").hexdigest().encode()
            return user if hmac.compare_digest(digest, expected) else None
        if not isinstance(credentials, LoginPassword):
            return None
        user = self.users.get(credentials.login.decode("utf-8", "replace"))
        if user is not None and user.password:
            ok = hmac.compare_digest(credentials.password, user.password)
            return user if ok else None
        accepted = self._accepted  # this generation's
        cache_key = hmac.new(self._cache_key, credentials.login + b"\0" +
                             credentials.password, "sha256").digest()
        if user is not None and cache_key in accepted:
            return user
        hashed = user.password_hash if user is not None else \
            await self._in_pool(address, self._hash_for_unknown_names)
        if not hashed:
            return None
        # bcrypt reads 72 bytes (bcrypt 5 refuses more): what `htpasswd -B` hashed.
        ok = await self._in_pool(address, bcrypt.checkpw,
                                 credentials.password[:BCRYPT_MAX_PASSWORD], hashed)
        if ok and user is not None:
            accepted.add(cache_key)
            return user
        return None

    async def _in_pool(self, address: str, function: Callable, *args: Any) -> Any:
        """function(*args) on the bcrypt pool, once this address and the pool have a
        free turn. Cancelled while waiting: it never runs."""
        gate = self._gates.get(address)
        if gate is None:
            gate = self._gates[address] = Gate()
        gate.users += 1
        try:
            await gate.semaphore.acquire()
            try:
                await self._workers.acquire()
            except BaseException:
                gate.semaphore.release()
                raise
        except BaseException:
            self._leave(address, gate)
            raise
        try:
            future = asyncio.get_running_loop().run_in_executor(self._executor,
                                                                function, *args)
        except BaseException:  # the pool is shut down: stopping
            self._workers.release()
            gate.semaphore.release()
            self._leave(address, gate)
            raise
        future.add_done_callback(functools.partial(self._check_done, address, gate))
        # Shielded: a client that leaves does not end the check early, so its turn
        # stays taken until bcrypt returns.
        return await asyncio.shield(future)

    def _check_done(self, address: str, gate: Gate, future: asyncio.Future) -> None:
        if not future.cancelled():
            future.exception()  # retrieved, even when its client is gone
        self._workers.release()
        gate.semaphore.release()
        self._leave(address, gate)

    def _leave(self, address: str, gate: Gate) -> None:
        gate.users -= 1
        if gate.users == 0 and self._gates.get(address) is gate:
            del self._gates[address]

    def _hash_for_unknown_names(self) -> bytes:
        """A hash as costly as the users' own, so that an unknown name takes as long
        to refuse as a wrong password (timing must not tell which names exist)."""
        costs = [int(user.password_hash[4:6]) for user in self.users.values()
                 if user.password_hash]
        if costs and not self._dummy_hash:
            self._dummy_hash = bcrypt.hashpw(b"-", bcrypt.gensalt(max(costs)))
        return self._dummy_hash if costs else b""


def attempted_user(mechanism: str, credentials: Any) -> str:
    """The user name an AUTH attempt gave, for the log line."""
    login = credentials[0] if mechanism == "CRAM-MD5" else getattr(
        credentials, "login", b"")
    return login.decode("utf-8", "replace")[:128]
