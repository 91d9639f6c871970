"""Sliding-window rate limiters: per clinic and channel, per WhatsApp sender, per anything keyed.

Contract of `acquire(key_parts, limits)`: `limits` is a list of `(count, window_seconds)`. The
event is admitted only if, for every limit, fewer than `count` events were admitted for that key
in the last `window_seconds`; an admitted event is counted in all of them at once and 0.0 is
returned. Otherwise nothing is counted and the result is the number of seconds after which the
event would be admitted if nothing else were admitted meanwhile. Guarantee: no interval
`[t, t + window_seconds)` ever holds more than `count` admitted events for one key.

Why a sliding-window *log* and not GCRA or a sliding-window counter: GCRA with a burst of
`count` lets `count` events through at t=0 and one more at t=window/count, so a window can hold
more than `count`; the counter approximation can overshoot too. The log is exact; its cost is
one entry per admitted event inside the largest window (a clinic's maxPerDay at most).

Two implementations behind `RateLimiter`:

- `InProcessLimiter`: this process only (the embedded default); an injectable clock.
- `RedisLimiter`: shared by every process, one sorted set per key, admission decided by one Lua
  script that reads the Redis server's `TIME`, so client clocks never matter. A Redis failure
  falls back to an in-process limiter (warning at most once a minute), never to an error.

Keys always start with the clinic id (`"global"` for the platform's own providers), so one
clinic's traffic never consumes another clinic's budget (PROVIDER-FACTS §8 item 2).
"""

from __future__ import annotations

import asyncio
import bisect
import math
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from redis.asyncio import Redis

from clinicomm.routing.redis_fallback import RedisFallback
from clinicomm.settings.models import RateLimit

#: `(count, window_seconds)`: at most `count` admitted events in any `window_seconds`.
Limit = tuple[int, float]
#: The parts of a limiter key; the first is the clinic id (None means the platform, "global").
KeyParts = Sequence[str | None]
#: One key's limits: the calls that share a script call (`RedisLimiter`).
_Group = tuple[str, tuple[Limit, ...]]

_ESCAPES = str.maketrans({"%": "%25", ":": "%3A", "{": "%7B", "}": "%7D"})


def _escape(part: str) -> str:
    return part.translate(_ESCAPES)


def limit_key(key_parts: KeyParts) -> str:
    """The one place limiter keys are built: `ratelimit:{<clinicId>}:<part>:<part>…`.

    `key_parts[0]` is the clinic id (None → "global"); every other part must be a string.
    Parts are escaped so `("a:b", "c")` and `("a", "b:c")` never share a key; the clinic id is a
    Redis Cluster hash tag. Raises ValueError for an empty key or a None after the first part.
    """
    if not key_parts:
        raise ValueError("a limiter key needs at least the clinic id")
    clinic = key_parts[0] or "global"
    rest: list[str] = []
    for part in key_parts[1:]:
        if part is None:
            raise ValueError("only the clinic id part of a limiter key may be None")
        rest.append(_escape(part))
    return ":".join(["ratelimit", "{" + _escape(clinic) + "}", *rest])


def clinic_channel_key(clinic_id: str | None, channel: str) -> tuple[str | None, ...]:
    """Key parts of a clinic's own per-channel send limit."""
    return (clinic_id, "channel", channel)


def sender_key(clinic_id: str | None, provider: str, sender_id: str) -> tuple[str | None, ...]:
    """Key parts of one sender's throughput (e.g. a WhatsApp phone number id) of one clinic."""
    return (clinic_id, "sender", provider, sender_id)


def clinic_channel_limits(rate_limit: RateLimit | None) -> list[Limit]:
    """The `(count, seconds)` limits of a clinic's `rateLimit` block.

    maxPerMinute → 60 s, maxPerHour → 3,600 s, maxPerDay → 86,400 s; a limit left out is not
    enforced, and a disabled (or missing) block gives no limits at all.
    """
    if rate_limit is None or not rate_limit.enabled:
        return []
    limits: list[Limit] = []
    for count, window in (
        (rate_limit.max_per_minute, 60.0),
        (rate_limit.max_per_hour, 3600.0),
        (rate_limit.max_per_day, 86400.0),
    ):
        if count is not None:
            limits.append((count, window))
    return limits


#: The window a sender's per-second cap is enforced over: a little longer than the second the
#: provider counts in, because a call reaches the provider some time after its admission and
#: that delay varies (event loop, connection pool). Calls admitted in any 1.2 s window stay
#: within the cap in every 1 s window of arrivals as long as that delay varies by < 200 ms
#: (measured: up to ~150 ms with two worker processes; 1.1 s still let 86 through at 80).
SENDER_WINDOW = 1.2

#: An admission older than this when its caller gets it back is not used: the 200 ms margin
#: above holds only while admission-to-arrival delays vary by less, and a process that stalled
#: between asking and hearing back (a CPU-starved worker, a GC pause, a slow Redis reply) would
#: send a slot that was counted long ago, together with the fresh ones of the other workers.
#: The stale slot stays counted (the budget only shrinks) and the caller asks again.
FRESH_ADMISSION = 0.1


def sender_limits(max_per_second: int) -> list[Limit]:
    """A sender throughput cap: WhatsApp numbers get 80/s by default, 20 in coexistence and
    1,000 after the upgrade (https://developers.facebook.com/documentation/business-messaging/
    whatsapp/throughput).

    The second is paced in tenths (at most ⌈cap/10⌉ per 100 ms): with the one-second limit
    alone, every waiter is admitted together the moment the window slides, so a whole second's
    budget leaves in one burst; the burst's calls then reach the provider spread over a few
    hundred ms and the provider, counting arrivals, sees more than `cap` in one second (the
    two-worker test measured 130 at a cap of 80). Paced, admission-to-arrival jitter stays small.
    """
    limits: list[Limit] = [(max_per_second, SENDER_WINDOW)]
    if max_per_second >= 10:
        limits.append((math.ceil(max_per_second / 10), 0.1))
    return limits


def _check(limits: Sequence[Limit]) -> None:
    for count, window in limits:
        if count < 1 or not (window > 0 and math.isfinite(window)):
            raise ValueError(f"invalid limit ({count}, {window})")


@dataclass(frozen=True, slots=True)
class Admission:
    """One `try_acquire` answer: `wait` 0.0 when admitted; `at` the limiter's clock reading
    (seconds; the Redis server's epoch time for `RedisLimiter`)."""

    wait: float
    at: float

    @property
    def admitted(self) -> bool:
        return self.wait == 0.0


class RateLimiter(ABC):
    """Admits events under `(count, window)` limits per key (see the module docstring)."""

    async def acquire(self, key_parts: KeyParts, limits: Sequence[Limit]) -> float:
        """0.0 if admitted (counted in every limit), else seconds to wait (nothing counted).

        Raises ValueError for an invalid key or limit; never raises for a Redis failure.
        """
        return (await self.try_acquire(key_parts, limits)).wait

    @abstractmethod
    async def try_acquire(self, key_parts: KeyParts, limits: Sequence[Limit]) -> Admission:
        """Like `acquire`, also telling when the decision was taken."""

    @abstractmethod
    async def usage(self, key_parts: KeyParts, limits: Sequence[Limit]) -> float:
        """The largest fraction used over `limits` right now (0.0 … 1.0; 0.0 without limits)."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources (the Redis client belongs to the caller and stays open)."""


class InProcessLimiter(RateLimiter):
    """Sliding-window log in this process; `clock` (seconds, non-decreasing) is injectable."""

    _SWEEP_EVERY = 10_000

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._logs: dict[str, list[float]] = {}
        self._horizon: dict[str, float] = {}
        self._calls = 0

    def _trim(self, key: str, now: float, horizon: float) -> list[float]:
        log = self._logs.get(key)
        if log is None:
            log = self._logs[key] = []
        # Entries at or before now - horizon are outside every window of this key.
        cut = bisect.bisect_right(log, now - horizon)
        if cut:
            del log[:cut]
        return log

    def admit(self, key_parts: KeyParts, limits: Sequence[Limit]) -> Admission:
        """The synchronous core of `try_acquire`."""
        _check(limits)
        key = limit_key(key_parts)
        now = self.clock()
        if not limits:
            return Admission(0.0, now)
        self._sweep(now)
        horizon = max(self._horizon.get(key, 0.0), *(w for _, w in limits))
        self._horizon[key] = horizon
        log = self._trim(key, now, horizon)
        wait = 0.0
        for count, window in limits:
            start = bisect.bisect_right(log, now - window)  # first entry inside (now-w, now]
            inside = len(log) - start
            if inside >= count:
                # The (inside - count)-th entry of the window must leave it first.
                wait = max(wait, log[start + inside - count] + window - now)
        if wait > 0:
            return Admission(wait, now)
        log.append(now)
        return Admission(0.0, now)

    async def try_acquire(self, key_parts: KeyParts, limits: Sequence[Limit]) -> Admission:
        return self.admit(key_parts, limits)

    def used(self, key_parts: KeyParts, limits: Sequence[Limit]) -> float:
        """The synchronous core of `usage`."""
        _check(limits)
        key = limit_key(key_parts)
        now = self.clock()
        log = self._logs.get(key, [])
        fraction = 0.0
        for count, window in limits:
            inside = len(log) - bisect.bisect_right(log, now - window)
            fraction = max(fraction, min(1.0, inside / count))
        return fraction

    async def usage(self, key_parts: KeyParts, limits: Sequence[Limit]) -> float:
        return self.used(key_parts, limits)

    def _sweep(self, now: float) -> None:
        # Drop keys nobody used for longer than their largest window (bounded memory).
        self._calls += 1
        if self._calls % self._SWEEP_EVERY:
            return
        for key in list(self._logs):
            log = self._trim(key, now, self._horizon.get(key, 0.0))
            if not log:
                del self._logs[key]
                self._horizon.pop(key, None)


# KEYS[1] the sorted set (score = admission time in µs); ARGV[1] a unique member prefix;
# ARGV[2] how many events are asked for at once (n ≥ 1); ARGV[3..] pairs of (count, window_us).
# Admits the first g ≤ n events that fit every limit, all at this script's TIME (exactly as n
# calls for one event each in a row would), and returns {g, wait_us, now_us}: wait_us is when
# one more event would fit (0 when all n were admitted). Redis TIME makes every process use one
# clock (scripts replicate effects since Redis 5).
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local asked = tonumber(ARGV[2])
local n = (#ARGV - 2) / 2
local horizon = 0
for i = 1, n do
  local w = tonumber(ARGV[2 * i + 2])
  if w > horizon then horizon = w end
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%.0f', now - horizon))
local grant = asked
local inside = {}
for i = 1, n do
  local w = tonumber(ARGV[2 * i + 2])
  inside[i] = redis.call('ZCOUNT', KEYS[1], '(' .. string.format('%.0f', now - w), '+inf')
  local room = tonumber(ARGV[2 * i + 1]) - inside[i]
  if room < grant then grant = room end
end
if grant < 0 then grant = 0 end
if grant > 0 then
  local score = string.format('%.0f', now)
  local members = {}
  for j = 1, grant do
    members[2 * j - 1] = score
    members[2 * j] = ARGV[1] .. ':' .. j
  end
  redis.call('ZADD', KEYS[1], unpack(members))
  redis.call('PEXPIRE', KEYS[1], math.ceil(horizon / 1000) + 1000)
end
if grant == asked then return {grant, 0, now} end
local wait = 0
for i = 1, n do
  local c = tonumber(ARGV[2 * i + 1])
  local w = tonumber(ARGV[2 * i + 2])
  local have = inside[i] + grant
  if have >= c then
    local e = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. string.format('%.0f', now - w),
                         '+inf', 'WITHSCORES', 'LIMIT', have - c, 1)
    local until_us = tonumber(e[2]) + w - now
    if until_us > wait then wait = until_us end
  end
end
return {grant, wait, now}
"""

# KEYS[1] the sorted set; ARGV pairs of (count, window_us). Returns the count in each window.
_USAGE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local out = {}
for i = 1, #ARGV / 2 do
  local w = tonumber(ARGV[2 * i])
  out[i] = redis.call('ZCOUNT', KEYS[1], '(' .. string.format('%.0f', now - w), '+inf')
end
return out
"""


def _us(seconds: float) -> int:
    return max(1, round(seconds * 1_000_000))


class RedisLimiter(RateLimiter):
    """Sliding-window log in Redis, shared by every process; falls back to `local`.

    Concurrent `acquire` calls of this process for one key and the same limits share one
    script call: the calls made while none is in flight (or while one is) are asked for
    together, at most `MAX_BATCH` at once, and admitted in the order they came, as far as the
    limits allow; the rest get the wait. The result is what the same calls one after another
    at the script's instant would give, so the guarantee of the module docstring holds; a busy
    worker's deliveries to one WhatsApp number make one round trip per batch, not one each.
    """

    MAX_BATCH = 500

    def __init__(self, redis: Redis, *, local: InProcessLimiter | None = None) -> None:
        self.redis = redis
        self.local = local or InProcessLimiter(clock=time.time)
        self.fallback = RedisFallback("limits")
        self._acquire = redis.register_script(_ACQUIRE)
        self._usage = redis.register_script(_USAGE)
        #: (key, limits) → the calls waiting for the next script call of that group.
        self._waiting: dict[_Group, list[asyncio.Future[Admission]]] = {}
        self._askers: set[asyncio.Task[None]] = set()

    async def try_acquire(self, key_parts: KeyParts, limits: Sequence[Limit]) -> Admission:
        _check(limits)
        key = limit_key(key_parts)
        if not limits:
            return Admission(0.0, time.time())
        group = (key, tuple(limits))
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Admission] = loop.create_future()
        waiting = self._waiting.get(group)
        if waiting is not None:
            waiting.append(future)
        else:
            self._waiting[group] = [future]
            task = loop.create_task(self._ask(group, key_parts))
            self._askers.add(task)
            task.add_done_callback(self._askers.discard)
        return await future

    async def _ask(self, group: _Group, key_parts: KeyParts) -> None:
        """Answer the group's waiting calls, a batch per script call, until none is left."""
        waiting = self._waiting[group]
        try:
            while True:
                batch = [f for f in waiting[: self.MAX_BATCH] if not f.done()]
                del waiting[: self.MAX_BATCH]
                if batch:
                    try:
                        answers = await self._admit(group, key_parts, len(batch))
                    except BaseException as exc:
                        for f in batch:
                            if not f.done():
                                f.set_exception(exc)
                        raise
                    for f, answer in zip(batch, answers, strict=True):
                        if not f.done():
                            f.set_result(answer)
                if not waiting:
                    return
        finally:
            del self._waiting[group]
            for f in waiting:  # only left when the ask itself failed or was cancelled
                if not f.done():
                    f.cancel()

    async def _admit(self, group: _Group, key_parts: KeyParts, n: int) -> list[Admission]:
        """`n` events asked for at once: the admitted first, then the refused with the wait."""
        key, limits = group
        args: list[str | int] = [uuid.uuid4().hex, n]
        for count, window in limits:
            args += [count, _us(window)]

        async def remote() -> list[Admission]:
            granted, wait_us, now_us = await self._acquire(keys=[key], args=args)
            at = int(now_us) / 1_000_000
            refused = Admission(max(int(wait_us), 1) / 1_000_000, at)
            return [Admission(0.0, at)] * int(granted) + [refused] * (n - int(granted))

        async def local() -> list[Admission]:
            return [self.local.admit(key_parts, limits) for _ in range(n)]

        return await self.fallback.run("acquire", remote, local)

    async def close(self) -> None:
        for task in list(self._askers):
            task.cancel()

    async def usage(self, key_parts: KeyParts, limits: Sequence[Limit]) -> float:
        _check(limits)
        key = limit_key(key_parts)
        if not limits:
            return 0.0
        args: list[int] = []
        for count, window in limits:
            args += [count, _us(window)]

        async def remote() -> float:
            counts = await self._usage(keys=[key], args=args)
            return max(
                min(1.0, int(n) / count) for n, (count, _) in zip(counts, limits, strict=True)
            )

        async def local() -> float:
            return self.local.used(key_parts, limits)

        return await self.fallback.run("usage", remote, local)


def make_limiter(
    redis: Redis | None, *, clock: Callable[[], float] = time.monotonic
) -> RateLimiter:
    """`RedisLimiter` when a Redis client is given (every process shares the limits), else
    `InProcessLimiter` (this process only; `clock` applies to it)."""
    if redis is None:
        return InProcessLimiter(clock=clock)
    return RedisLimiter(redis)
