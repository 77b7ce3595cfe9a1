"""What one caller may hold or try at once: open event streams per key, and requests with
an invalid key per client address. Both are counted in Redis when the events Redis is
configured, so every API process sees the same numbers; in this process otherwise (the
embedded stack runs one API process), and also while Redis is unreachable: a Redis
outage loosens the limits to per-process ones, it never refuses a request.

Redis keys are namespaced by QUEUE_NAME, which already tells deployments sharing one
Redis apart.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
import weakref
from dataclasses import dataclass
from functools import lru_cache

import redis
import redis.asyncio

from jobs.access import Caller, key_digest, revocations_key
from jobs.settings import settings

log = logging.getLogger(__name__)

STREAM_LEASE_S = 60.0  # a stream's slot lapses this long after its last renewal (a crashed API process)
STREAM_RENEW_S = 20.0  # renewed this often while the stream runs (it sends something every 15 s)
STREAM_RETRY_AFTER_S = 10  # what a refused stream is told: streams end when their job does


class Refused(Exception):
    """Over a limit: answer 429 with Retry-After."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = max(1, round(retry_after_s))


@lru_cache(maxsize=1)
def _redis() -> redis.Redis | None:
    if not settings.events_url:
        return None
    # Short timeouts: these calls sit in front of requests.
    return redis.Redis.from_url(settings.events_url, socket_connect_timeout=1, socket_timeout=1)


# The check made at every request runs on the event loop: an asyncio client, one per loop
# (uvicorn runs one per process; each test client runs its own).
_async_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, redis.asyncio.Redis] = weakref.WeakKeyDictionary()


def _async_redis() -> redis.asyncio.Redis | None:
    if not settings.events_url:
        return None
    loop = asyncio.get_running_loop()
    client = _async_clients.get(loop)
    if client is None:
        client = _async_clients[loop] = redis.asyncio.Redis.from_url(
            settings.events_url, socket_connect_timeout=1, socket_timeout=1
        )
    return client


def _redis_key(*parts: str) -> str:
    return ":".join(("descent", settings.queue_name, *parts))


# --------------------------------------------------------------------------- event streams

# KEYS[1]: the key's sorted set of open streams (member: stream token, score: lease end, ms).
# ARGV: now_ms, lease_ms, cap, token. Lapsed leases are dropped first, so a crashed API
# process's streams stop counting after one lease.
_ACQUIRE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[1] + ARGV[2], ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

_local_lock = threading.Lock()
_local_streams: dict[str, dict[str, float]] = {}  # key -> {token: lease end (monotonic)}


def _holder(caller: Caller) -> str:
    """Who a stream counts against: the key (the bootstrap key by a digest prefix, never itself)."""
    if caller.key_id is not None:
        return str(caller.key_id)
    bootstrap = settings.bootstrap_key.get_secret_value() if settings.bootstrap_key else ""
    return "bootstrap-" + key_digest(bootstrap)[:16]


@dataclass
class StreamSlot:
    """One open stream's place under its key's cap. `renew` while it runs, `release` at its end."""

    holder: str
    token: str
    in_redis: bool
    renewed_at: float = 0.0

    def renew_if_due(self) -> None:
        now = time.monotonic()
        if now - self.renewed_at < STREAM_RENEW_S:
            return
        self.renewed_at = now
        if self.in_redis:
            try:
                client = _redis()
                key = _redis_key("streams", self.holder)
                client.zadd(key, {self.token: time.time() * 1000 + STREAM_LEASE_S * 1000})
                client.pexpire(key, int(STREAM_LEASE_S * 1000))
            except redis.RedisError as exc:
                log.warning("could not renew a stream slot (%s)", type(exc).__name__)
        else:
            with _local_lock:
                _local_streams.setdefault(self.holder, {})[self.token] = now + STREAM_LEASE_S

    def release(self) -> None:
        if self.in_redis:
            try:
                _redis().zrem(_redis_key("streams", self.holder), self.token)
            except redis.RedisError as exc:  # the lease lapses by itself
                log.warning("could not release a stream slot (%s)", type(exc).__name__)
        else:
            with _local_lock:
                _local_streams.get(self.holder, {}).pop(self.token, None)


def acquire_stream_slot(caller: Caller) -> StreamSlot:
    """A slot for one more open stream of this caller's key; Refused at MAX_STREAMS_PER_KEY."""
    holder, token, cap = _holder(caller), uuid.uuid4().hex, settings.max_streams_per_key
    refused = Refused(
        f"this API key already has {cap} event streams open (MAX_STREAMS_PER_KEY); close one or retry later",
        STREAM_RETRY_AFTER_S,
    )
    client = _redis()
    if client is not None:
        try:
            admitted = client.eval(_ACQUIRE, 1, _redis_key("streams", holder), int(time.time() * 1000),
                                   int(STREAM_LEASE_S * 1000), cap, token)  # fmt: skip
        except redis.RedisError as exc:
            log.warning("stream slots: Redis unreachable (%s); counting in this process", type(exc).__name__)
        else:
            if not admitted:
                raise refused
            return StreamSlot(holder, token, in_redis=True, renewed_at=time.monotonic())
    now = time.monotonic()
    with _local_lock:
        held = _local_streams.setdefault(holder, {})
        for lapsed in [t for t, until in held.items() if until <= now]:
            del held[lapsed]
        if len(held) >= cap:
            raise refused
        held[token] = now + STREAM_LEASE_S
    return StreamSlot(holder, token, in_redis=False, renewed_at=now)


# --------------------------------------------------------------------------- invalid keys

# A fixed window per client address: the first failure starts it.
_COUNT_FAILURE = """
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return {n, redis.call('PTTL', KEYS[1])}
"""

_failures: dict[str, tuple[int, float]] = {}  # address -> (failures, window end), without Redis
# Addresses over the limit, until when (monotonic), as this process saw them: refused before
# their key is looked at, so a client guessing keys gets no answer about its guesses.
_blocked: dict[str, float] = {}
# A Redis that failed is not asked again for this long: a Redis outage must not cost every
# request a connect timeout (the limits are per process meanwhile).
REDIS_PAUSE_AFTER_FAILURE_S = 5.0
_redis_paused_until = 0.0


async def check_not_blocked(address: str) -> str | None:
    """Refused while the address is over the invalid-key limit: in this process's memory, and
    (with Redis) in the counter every API process shares, so that a guess that reaches
    another process than the one that blocked the address is refused as well. That costs
    each request one Redis round trip, made on the event loop (no trip to the thread
    pool), which also reads the count of revoked keys: returned, for the keys this process
    verified a moment ago (jobs.access.recently_verified); None without Redis."""
    global _redis_paused_until
    until = _blocked.get(address)
    if until is not None:
        left = until - time.monotonic()
        if left > 0:
            raise Refused(_too_many(), left)
        _blocked.pop(address, None)
    client = _async_redis()
    if client is None or time.monotonic() < _redis_paused_until:
        return None
    key = _redis_key("auth-failures", address)
    try:
        failures, revocations = await client.mget(key, revocations_key())
        failures = int(failures or 0)
        left_ms = await client.pttl(key) if failures > settings.auth_failure_limit else 0
    except (redis.RedisError, OSError) as exc:
        _redis_paused_until = time.monotonic() + REDIS_PAUSE_AFTER_FAILURE_S
        log.warning("invalid-key limit: Redis unreachable (%s); checking in this process for %.0f s",
                    type(exc).__name__, REDIS_PAUSE_AFTER_FAILURE_S)  # fmt: skip
        return None
    if failures > settings.auth_failure_limit and left_ms > 0:
        left_s = left_ms / 1000
        _blocked[address] = time.monotonic() + left_s
        raise Refused(_too_many(), left_s)
    return (revocations or b"0").decode()


def count_failure(address: str) -> None:
    """Count one request with an invalid key from this address; Refused once over the limit."""
    limit, window_s = settings.auth_failure_limit, settings.auth_failure_window_s
    failures, left_s = None, window_s
    client = _redis()
    if client is not None:
        try:
            failures, left_ms = client.eval(_COUNT_FAILURE, 1, _redis_key("auth-failures", address),
                                            int(window_s * 1000))  # fmt: skip
            left_s = max(left_ms, 0) / 1000
        except redis.RedisError as exc:
            log.warning("invalid-key limit: Redis unreachable (%s); counting in this process", type(exc).__name__)
    if failures is None:
        now = time.monotonic()
        with _local_lock:
            count, window_end = _failures.get(address, (0, 0.0))
            if window_end <= now:
                count, window_end = 0, now + window_s
            failures, left_s = count + 1, window_end - now
            if len(_failures) > 10_000:
                for gone in [a for a, (_, end) in _failures.items() if end <= now]:
                    del _failures[gone]
            _failures[address] = (failures, window_end)
    if failures > limit:
        now = time.monotonic()
        if len(_blocked) > 10_000:  # many addresses at once: forget those whose time is up
            for gone in [a for a, until in _blocked.items() if until <= now]:
                del _blocked[gone]
        _blocked[address] = now + left_s
        log.warning("refusing %s for %.0f s: %d requests with an invalid key", address, left_s, failures)
        raise Refused(_too_many(), left_s)


def _too_many() -> str:
    return (f"too many requests with an invalid API key from this address (more than "
            f"{settings.auth_failure_limit} in {settings.auth_failure_window_s:g} s); retry later")  # fmt: skip
