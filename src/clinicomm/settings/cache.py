"""Two-level config cache and cross-process invalidation.

- **L1** is a dict in this process: `(channel, clinicId) → entry` with the decrypted, typed
  config. A read that hits it costs microseconds.
- **L2** is Redis, key `clinic:comm:{channel}:{clinicId}` (the seed's), a hash holding the
  clinic's settings version and the channel section in its **encrypted** stored form. Writes
  are compare-and-set on the version, so a slow reader can never put an older config back.
- **Invalidation**: a save publishes `{clinic, version, ack}` on `clinic:comm:invalidate`; every
  process drops its L1 entries for that clinic, raises a per-clinic version floor (so a read that
  started before the save cannot re-insert the old config), and acknowledges. The saver waits
  for as many acknowledgements as Redis delivered the message to (bounded by
  `invalidation_ack_timeout`): with Redis, every process has dropped the old config before the
  save returns.
- **Safety net**: every process also polls the database (`clinics.updated_at`) every
  `config_poll_seconds`. Without Redis (or while it is unreachable) that is the bound: another
  process sees a change within one poll interval.

Redis failures never fail a read: the cache logs a warning (at most once a minute) and the
read goes to the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

T = TypeVar("T")

INVALIDATE_CHANNEL = "clinic:comm:invalidate"


def invalidation_channel(redis: Redis) -> str:
    """The pub/sub channel for this Redis database. Pub/sub ignores database numbers, so two
    deployments sharing a server on different databases would otherwise hear (and wait for)
    each other's invalidations: database 0 uses the seed's plain name, others a suffix."""
    db = int(redis.connection_pool.connection_kwargs.get("db", 0) or 0)
    return INVALIDATE_CHANNEL if db == 0 else f"{INVALIDATE_CHANNEL}:{db}"


_CAS_SCRIPT = """
local cur = redis.call('HGET', KEYS[1], 'v')
if cur and tonumber(cur) > tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'v', ARGV[1], 'd', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
"""


def _blpop(key: str, timeout: float) -> Callable[[Redis], Awaitable[Any]]:
    async def call(redis: Redis) -> Any:
        return await redis.blpop([key], timeout=timeout)

    return call


def cache_key(channel: str, clinic_id: str) -> str:
    """The one place Redis config keys are built (the seed's `clinic:comm:{channel}:{clinicId}`)."""
    return f"clinic:comm:{channel}:{clinic_id}"


@dataclass(slots=True)
class L1Entry(Generic[T]):
    version: int
    value: T
    expires: float


class RedisGuard:
    """Runs Redis calls, turning failures into None with a rate-limited warning."""

    def __init__(self, redis: Redis | None) -> None:
        self.redis = redis
        self._last_warning = 0.0
        self.failures = 0

    async def call(self, what: str, fn: Callable[[Redis], Awaitable[Any]]) -> Any:
        if self.redis is None:
            return None
        try:
            return await fn(self.redis)
        except (RedisError, OSError) as exc:
            self.failures += 1
            now = time.monotonic()
            if now - self._last_warning > 60:
                self._last_warning = now
                log.warning(
                    "redis unreachable; reading config from the database",
                    extra={"event": "redis_unavailable", "op": what, "error": type(exc).__name__},
                )
            return None


class ConfigCache(Generic[T]):
    """L1 (process) + L2 (Redis, encrypted form) cache for per-clinic, per-channel configs."""

    def __init__(
        self,
        redis: Redis | None,
        *,
        ttl: int = 3600,
        ack_timeout: float = 2.0,
    ) -> None:
        self.guard = RedisGuard(redis)
        self.ttl = ttl
        self.ack_timeout = ack_timeout
        #: clinic id → channel → entry: a clinic's entries are dropped, and its known version
        #: read, without walking every clinic's (both were O(entries) on each call).
        self._l1: dict[str, dict[str, L1Entry[T]]] = {}
        self._floor: dict[str, int] = {}
        #: How often each clinic's entries were dropped (and all of them cleared): see
        #: `generation`.
        self._drops: dict[str, int] = {}
        self._clears = 0
        self._listener: asyncio.Task[None] | None = None
        self.process_id = uuid.uuid4().hex[:12]
        self.invalidations_applied = 0
        #: Called with the clinic id whenever its entries are dropped (the key store forgets
        #: the clinic's unwrapped data key, so a deleted clinic's key leaves memory too).
        self.on_drop: Callable[[str], None] | None = None

    # ---- L1 -------------------------------------------------------------------------------
    def l1_get(self, channel: str, clinic_id: str) -> T | None:
        entries = self._l1.get(clinic_id)
        entry = entries.get(channel) if entries is not None else None
        if entries is None or entry is None:
            return None
        if entry.expires < time.monotonic():
            del entries[channel]
            if not entries:
                del self._l1[clinic_id]
            return None
        return entry.value

    def l1_put(self, channel: str, clinic_id: str, version: int, value: T) -> None:
        """Store unless a newer version is already known for this clinic."""
        if version < self._floor.get(clinic_id, 0):
            return
        entry = L1Entry(version, value, time.monotonic() + self.ttl)
        self._l1.setdefault(clinic_id, {})[channel] = entry

    def drop(self, clinic_id: str, version: int | None = None) -> None:
        """Forget a clinic's entries; `version` raises its floor."""
        if version is not None and version > self._floor.get(clinic_id, 0):
            self._floor[clinic_id] = version
        self._drops[clinic_id] = self._drops.get(clinic_id, 0) + 1
        if self.on_drop is not None:
            self.on_drop(clinic_id)
        self._l1.pop(clinic_id, None)

    def generation(self, clinic_id: str) -> tuple[int, int]:
        """Changes whenever the clinic's entries are dropped or the cache is cleared (O(1)):
        a load started before that must not answer calls made after it (`SingleFlight` keys)."""
        return self._drops.get(clinic_id, 0), self._clears

    def known_version(self, clinic_id: str) -> int:
        """The newest version of the clinic's config this cache has seen or was told of."""
        versions = [e.version for e in self._l1.get(clinic_id, {}).values()]
        return max([*versions, self._floor.get(clinic_id, 0)])

    def clear(self) -> None:
        self._l1.clear()
        self._clears += 1

    # ---- L2 -------------------------------------------------------------------------------
    async def l2_get(self, channel: str, clinic_id: str) -> tuple[int, Any] | None:
        """(version, stored JSON) from Redis, or None on a miss or when Redis is unavailable."""
        raw = await self.guard.call(
            "l2_get", lambda r: r.hmget(cache_key(channel, clinic_id), ["v", "d"])
        )
        if not raw or raw[0] is None or raw[1] is None:
            return None
        return int(raw[0]), orjson.loads(raw[1])

    async def l2_put(self, channel: str, clinic_id: str, version: int, stored: Any) -> None:
        """Compare-and-set the stored (encrypted) form; an older version never wins."""
        payload = orjson.dumps(stored)
        await self.guard.call(
            "l2_put",
            lambda r: r.eval(
                _CAS_SCRIPT, 1, cache_key(channel, clinic_id), str(version), payload, str(self.ttl)
            ),
        )

    # ---- invalidation ---------------------------------------------------------------------
    async def publish(self, clinic_id: str, version: int) -> int:
        """Tell every process (this one included) to drop the clinic; wait for their acks.

        Returns how many processes acknowledged. Without Redis only this process is told.
        """
        self.drop(clinic_id, version)
        redis = self.guard.redis
        if redis is None:
            return 1
        ack_key = f"clinic:comm:ack:{uuid.uuid4().hex}"
        message = orjson.dumps({"clinic": clinic_id, "version": version, "ack": ack_key})
        receivers = await self.guard.call(
            "publish", lambda r: r.publish(invalidation_channel(r), message)
        )
        if not receivers:
            return 1
        acked = 0
        deadline = time.monotonic() + self.ack_timeout
        while acked < int(receivers):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                log.warning(
                    "not every process acknowledged a config invalidation in time",
                    extra={
                        "event": "invalidation_ack_timeout",
                        "clinicId": clinic_id,
                        "acked": acked,
                        "receivers": int(receivers),
                    },
                )
                break
            got = await self.guard.call("ack_wait", _blpop(ack_key, max(remaining, 0.01)))
            if not got:
                if self.guard.redis is None:
                    break
                continue
            acked += 1
        await self.guard.call("ack_cleanup", lambda r: r.delete(ack_key))
        return acked

    async def _apply(self, redis: Redis, data: bytes) -> None:
        try:
            message = orjson.loads(data)
            clinic_id = str(message["clinic"])
            version = int(message["version"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            log.warning(
                "ignoring a malformed invalidation message", extra={"event": "bad_invalidation"}
            )
            return
        self.drop(clinic_id, version)
        self.invalidations_applied += 1
        ack = message.get("ack")
        if isinstance(ack, str):
            pipe = redis.pipeline(transaction=False)
            pipe.rpush(ack, self.process_id)
            pipe.expire(ack, 30)
            await pipe.execute()

    async def start(self) -> None:
        """Start listening for invalidations (no-op without Redis)."""
        if self.guard.redis is None or self._listener is not None:
            return
        ready = asyncio.Event()
        self._listener = asyncio.create_task(self._listen(ready), name="config-invalidation")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ready.wait(), timeout=5)

    async def _listen(self, ready: asyncio.Event) -> None:
        redis = self.guard.redis
        assert redis is not None
        backoff = 0.2
        while True:
            pubsub = redis.pubsub()
            try:
                await pubsub.subscribe(invalidation_channel(redis))
                # A (re)connected listener may have missed messages: start from a clean L1.
                self.clear()
                ready.set()
                backoff = 0.2
                async for item in pubsub.listen():
                    if item.get("type") == "message":
                        await self._apply(redis, item["data"])
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                ready.set()
                log.warning(
                    "config invalidation listener lost Redis; retrying",
                    extra={"event": "invalidation_listener_down", "error": type(exc).__name__},
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]

    async def stop(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
            self._listener = None
