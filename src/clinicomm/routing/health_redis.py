"""`RedisHealth`: the health tracker every process shares (contract in `routing.health`).

One hash per (clinic, provider) at `health_key(clinic, provider)`: bucket counters `s:<index>` /
`f:<index>` (successes/failures per `bucket_seconds`) and the circuit fields (`circuit`, `band`,
`opened_at`, `half_at`, `issued`, `probe_ok`, `last_failure_at`, `last_check_*`). A set at
`health_key(clinic)` lists the clinic's provider labels for `snapshot`. Every read-modify-write
is one Lua script using the Redis server's TIME, so two processes never see two circuits and
never both take the last half-open probe slot. Same transitions as `InProcessHealth`, line by
line; the shared behaviour tests run against both.

**The healthy fast path.** Two script calls per provider call (`allow`, then `record`) were
most of the worker's Redis time. So a process that has just seen a circuit *closed* and the
provider *healthy* (from any answer of the script) holds a lease on that view for
`local_seconds` (0.25 s): while it holds it, `allow` answers True without Redis (and calls
that come while one is asking wait for its answer), and successes
are counted locally and sent as one `record` with a count when the lease ends (or before any
other operation on that provider: a failure, a probe, `state`, `snapshot`). A failure and
an ignored outcome always go to Redis at once, and the lease lasts only while the script
answers closed and healthy: the failure that opens the circuit (or makes it degraded) ends it.
So another process sees this one's successes at most `local_seconds` late, and this one sees a
circuit another opened at most `local_seconds` late (the calls it makes meanwhile fail over
as usual); the transitions themselves stay in the script. `local_seconds=0` turns it off.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar

from redis.asyncio import Redis

from clinicomm.providers.errors import redact
from clinicomm.routing.health import (
    CircuitState,
    HealthConfig,
    HealthState,
    HealthTracker,
    InProcessHealth,
    Outcome,
    ProviderHealth,
    as_datetime,
    health_key,
)
from clinicomm.routing.redis_fallback import RedisFallback, text

_T = TypeVar("_T")

# KEYS: the (clinic, provider) hash, the clinic's provider set.
# ARGV: op (record|allow|probe|state), arg (outcome | probe ok 1/0), detail, provider label,
#       window, bucket, min_samples, healthy_above, degraded_from, cool_down, probes, ttl,
#       count (successes recorded at once; 1 by default).
# Returns {before, circuit, band, successes, failures, allowed, last_failure_at,
#          last_check_at, last_check_ok, last_check_detail, opened_at} (times as strings).
_SCRIPT = """
local key, index = KEYS[1], KEYS[2]
local op, arg, detail, provider = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local window, bucket = tonumber(ARGV[5]), tonumber(ARGV[6])
local min_samples = tonumber(ARGV[7])
local healthy_above, degraded_from = tonumber(ARGV[8]), tonumber(ARGV[9])
local cool, probes, ttl = tonumber(ARGV[10]), tonumber(ARGV[11]), tonumber(ARGV[12])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local current = math.floor(now / bucket)
local first = current - math.ceil(window / bucket) + 1
local raw = redis.call('HGETALL', key)
local h, stale, buckets = {}, {}, {}
local ok, bad = 0, 0
for i = 1, #raw, 2 do
  local k, v = raw[i], raw[i + 1]
  local kind, idx = string.match(k, '^([sf]):(%-?%d+)$')
  if kind then
    table.insert(buckets, k)
    if tonumber(idx) < first then
      table.insert(stale, k)
    elseif kind == 's' then
      ok = ok + tonumber(v)
    else
      bad = bad + tonumber(v)
    end
  else
    h[k] = v
  end
end
local function num(x) if x then return tonumber(x) end return nil end
local circuit = h['circuit'] or 'closed'
local before = circuit
local band = h['band'] or 'healthy'
local opened_at, half_at = num(h['opened_at']), num(h['half_at'])
local issued, probe_ok = num(h['issued']) or 0, num(h['probe_ok']) or 0
local last_failure_at = h['last_failure_at']
local allowed, closing = 1, false
local function band_of()
  local n = ok + bad
  if n < min_samples then return band end
  local rate = ok / n
  if rate > healthy_above then return 'healthy' end
  if rate >= degraded_from then return 'degraded' end
  return 'down'
end
local function open()
  circuit, opened_at, issued, probe_ok, band = 'open', now, 0, 0, 'down'
end
local function evaluate()
  if circuit == 'closed' then
    band = band_of()
    if band == 'down' then open() end
  end
end
if op == 'record' then
  if arg == 'success' then
    local n = tonumber(ARGV[13]) or 1
    redis.call('HINCRBY', key, 's:' .. current, n)
    ok = ok + n
    -- Successes held by a process (`count` > 1) were calls made while it saw the circuit
    -- closed: counted in the window, never as half-open probes.
    if circuit == 'half_open' and n == 1 then
      probe_ok = probe_ok + 1
      if probe_ok >= probes then
        closing, ok, bad = true, 0, 0
        circuit, band, opened_at, half_at, issued, probe_ok = 'closed', 'healthy', nil, nil, 0, 0
      end
    end
  elseif arg == 'failure' then
    redis.call('HINCRBY', key, 'f:' .. current, 1)
    bad = bad + 1
    last_failure_at = tostring(now)
    if circuit == 'half_open' then open() end
  elseif circuit == 'half_open' and issued > probe_ok then
    issued = issued - 1
  end
  evaluate()
elseif op == 'allow' then
  if circuit == 'closed' then
    evaluate()
    if circuit ~= 'closed' then allowed = 0 end
  elseif circuit == 'open' then
    if now >= opened_at + cool then
      circuit, half_at, issued, probe_ok = 'half_open', now, 1, 0
    else
      allowed = 0
    end
  elseif issued < probes then
    issued = issued + 1
  elseif half_at and now >= half_at + cool then
    issued, half_at = probe_ok + 1, now
  else
    allowed = 0
  end
elseif op == 'probe' then
  h['last_check_at'], h['last_check_ok'], h['last_check_detail'] = tostring(now), arg, detail
end
if op ~= 'state' then
  if #stale > 0 then redis.call('HDEL', key, unpack(stale)) end
  if closing then redis.call('HDEL', key, 's:' .. current, 'f:' .. current, unpack(buckets)) end
  redis.call('HSET', key, 'circuit', circuit, 'band', band, 'issued', issued,
             'probe_ok', probe_ok)
  -- A nil cannot live in a Lua table, so walk the names by position.
  local names = {'opened_at', 'half_at', 'last_failure_at'}
  local values = {opened_at, half_at, last_failure_at}
  for i = 1, 3 do
    if values[i] then redis.call('HSET', key, names[i], tostring(values[i]))
    else redis.call('HDEL', key, names[i]) end
  end
  if op == 'probe' then
    redis.call('HSET', key, 'last_check_at', h['last_check_at'], 'last_check_ok', arg,
               'last_check_detail', detail)
  end
  redis.call('EXPIRE', key, ttl)
  redis.call('SADD', index, provider)
  redis.call('EXPIRE', index, ttl)
end
local shown = band_of()
if circuit ~= 'closed' then shown = 'down' end
return {before, circuit, shown, ok, bad, allowed, last_failure_at or '',
        h['last_check_at'] or '', h['last_check_ok'] or '', h['last_check_detail'] or '',
        opened_at and tostring(opened_at) or ''}
"""


def _float(value: Any) -> float | None:
    raw = text(value)
    return float(raw) if raw else None


#: How long a process answers from its own view of a closed, healthy circuit (module docstring).
LOCAL_SECONDS = 0.25

_Key = tuple[str | None, str]


@dataclass(slots=True)
class _Lease:
    """This process's view of a closed, healthy circuit, and the successes not yet sent."""

    until: float  # time.monotonic()
    health: ProviderHealth
    pending: int = 0


class RedisHealth(HealthTracker):
    """Health shared by every process through Redis; falls back to `local` on Redis errors."""

    def __init__(
        self,
        redis: Redis,
        config: HealthConfig | None = None,
        *,
        local: InProcessHealth | None = None,
        local_seconds: float = LOCAL_SECONDS,
    ) -> None:
        self.redis = redis
        self.config = config or HealthConfig()
        self.local = local or InProcessHealth(self.config)
        self.fallback = RedisFallback("health")
        self.local_seconds = local_seconds
        self._script = redis.register_script(_SCRIPT)
        self._leases: dict[_Key, _Lease] = {}
        self._flusher: asyncio.Task[None] | None = None
        #: Per provider: the `allow` now asking Redis (done when it answered).
        self._asking: dict[_Key, asyncio.Future[None]] = {}

    # ---- the healthy fast path ---------------------------------------------------------------
    def _held(self, key: _Key) -> _Lease | None:
        lease = self._leases.get(key)
        return lease if lease is not None and time.monotonic() < lease.until else None

    def _seen(self, key: _Key, health: ProviderHealth) -> None:
        """Take (or renew) the lease after a script answer that shows closed and healthy."""
        if (
            self.local_seconds <= 0
            or health.circuit is not CircuitState.CLOSED
            or health.state is not HealthState.HEALTHY
        ):
            return
        lease = self._leases.get(key)
        until = time.monotonic() + self.local_seconds
        if lease is None:
            self._leases[key] = _Lease(until, health)
        else:
            lease.until, lease.health = until, health

    async def _release(self, key: _Key) -> None:
        """End the lease of `key`, sending the successes it held."""
        lease = self._leases.pop(key, None)
        if lease is not None and lease.pending:
            await self._record_remote(key, Outcome.SUCCESS, lease.pending)

    async def flush(self) -> None:
        """Send every held success now (leases end)."""
        for key in list(self._leases):
            await self._release(key)

    def _flush_later(self) -> None:
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush_expired())

    async def _flush_expired(self) -> None:
        while self._leases:
            await asyncio.sleep(self.local_seconds)
            now = time.monotonic()
            for key, lease in list(self._leases.items()):
                if lease.until <= now:
                    await self._release(key)

    async def aclose(self) -> None:
        """Send held successes and stop the flusher (the runtime's shutdown)."""
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        await self.flush()

    async def _record_remote(self, key: _Key, outcome: Outcome, count: int = 1) -> ProviderHealth:
        clinic_id, provider = key

        async def remote() -> ProviderHealth:
            health = (await self._run("record", clinic_id, provider, outcome.value, "", count))[0]
            self._seen(key, health)
            return health

        async def local() -> ProviderHealth:
            health = self.local.record_now(clinic_id, provider, outcome)
            for _ in range(count - 1):
                health = self.local.record_now(clinic_id, provider, outcome)
            return health

        return await self.fallback.run("record", remote, local)

    # ---- the script --------------------------------------------------------------------------
    async def _run(
        self,
        op: str,
        clinic_id: str | None,
        provider: str,
        arg: str = "",
        detail: str = "",
        count: int = 1,
    ) -> tuple[ProviderHealth, bool]:
        cfg = self.config
        reply = await self._script(
            keys=[health_key(clinic_id, provider), health_key(clinic_id)],
            args=[
                op,
                arg,
                detail,
                provider,
                repr(cfg.window_seconds),
                repr(cfg.bucket_seconds),
                cfg.min_samples,
                repr(cfg.healthy_above),
                repr(cfg.degraded_from),
                repr(cfg.cool_down_seconds),
                cfg.half_open_probes,
                cfg.ttl_seconds,
                count,
            ],
        )
        before, circuit = text(reply[0]) or "closed", text(reply[1]) or "closed"
        ok, bad = int(reply[3]), int(reply[4])
        samples = ok + bad
        check_ok = text(reply[8])
        clinic = clinic_id or "global"
        self._transition(clinic, provider, before, circuit)
        health = ProviderHealth(
            clinic_id=clinic,
            provider=provider,
            state=HealthState(text(reply[2]) or HealthState.HEALTHY),
            circuit=CircuitState(circuit),
            success_rate=ok / samples if samples else None,
            samples=samples,
            last_failure_at=as_datetime(_float(reply[6])),
            last_check_at=as_datetime(_float(reply[7])),
            last_check_ok=None if not check_ok else check_ok == "1",
            last_check_detail=text(reply[9]) or None,
            opened_at=as_datetime(_float(reply[10])),
        )
        return health, bool(int(reply[5]))

    async def record(
        self, clinic_id: str | None, provider: str, outcome: Outcome
    ) -> ProviderHealth:
        key = (clinic_id, provider)
        if outcome is not Outcome.SUCCESS:
            await self._release(key)
            return await self._record_remote(key, outcome)
        lease = await self._lease_after_asking(key)
        if lease is not None:
            lease.pending += 1
            self._flush_later()
            return lease.health
        # The lease ended (or none was taken): this success asks Redis, and the successes
        # that finish meanwhile wait for its answer, which may take the lease again.
        return await self._asked(key, self._record_remote(key, outcome))

    async def allow(self, clinic_id: str | None, provider: str) -> bool:
        key = (clinic_id, provider)
        if await self._lease_after_asking(key) is not None:
            return True

        async def remote() -> bool:
            health, allowed = await self._run("allow", clinic_id, provider)
            self._seen(key, health)
            return allowed

        async def local() -> bool:
            return self.local.allow_now(clinic_id, provider)

        return await self._asked(key, self.fallback.run("allow", remote, local))

    async def _lease_after_asking(self, key: _Key) -> _Lease | None:
        """The lease of `key`, after the call now asking Redis about it (if any) answered.

        That answer may take the lease, so a burst of deliveries (their `allow`, their
        successes) makes one round trip, not one each. Without a lease (half-open, degraded),
        each caller asks for itself: probe slots are taken one by one.
        """
        lease = self._held(key)
        asking = self._asking.get(key)
        if lease is None and asking is not None:
            await asyncio.shield(asking)
            lease = self._held(key)
        return lease

    async def _asked(self, key: _Key, call: Awaitable[_T]) -> _T:
        """Await `call`, a question to Redis about `key`, as the one others wait for."""
        done = asyncio.get_running_loop().create_future()
        self._asking[key] = done
        try:
            return await call
        finally:
            done.set_result(None)
            if self._asking.get(key) is done:
                del self._asking[key]

    async def state(self, clinic_id: str | None, provider: str) -> ProviderHealth:
        await self._release((clinic_id, provider))

        async def remote() -> ProviderHealth:
            return (await self._run("state", clinic_id, provider))[0]

        async def local() -> ProviderHealth:
            return self.local.state_now(clinic_id, provider)

        return await self.fallback.run("state", remote, local)

    async def snapshot(self, clinic_id: str | None) -> dict[str, ProviderHealth]:
        for key in [k for k in self._leases if k[0] == clinic_id]:
            await self._release(key)

        async def remote() -> dict[str, ProviderHealth]:
            members = await self.redis.smembers(health_key(clinic_id))
            names = sorted(text(m) or "" for m in members)
            return {name: (await self._run("state", clinic_id, name))[0] for name in names}

        async def local() -> dict[str, ProviderHealth]:
            return self.local.snapshot_now(clinic_id)

        return await self.fallback.run("snapshot", remote, local)

    async def record_probe(
        self, clinic_id: str | None, provider: str, ok: bool, detail: str | None = None
    ) -> None:
        clean = redact(detail) or ""
        await self._release((clinic_id, provider))

        async def remote() -> None:
            await self._run("probe", clinic_id, provider, "1" if ok else "0", clean)

        async def local() -> None:
            self.local.probe_now(clinic_id, provider, ok, detail)

        await self.fallback.run("probe", remote, local)
