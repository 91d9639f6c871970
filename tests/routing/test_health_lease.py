"""`RedisHealth`'s healthy fast path: a process that saw a circuit closed and healthy answers
`allow` itself and sends its successes as one count, for `local_seconds`; failures, probes and
reads go to Redis at once (routing/health_redis.py docstring). And the runtime's Redis pool
waits for a connection rather than failing over to unshared in-process health."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis

from clinicomm.routing.health import CircuitState, HealthConfig, Outcome
from clinicomm.routing.health_redis import RedisHealth

pytestmark = pytest.mark.redis

CONFIG = HealthConfig(window_seconds=10.0, bucket_seconds=1.0, min_samples=20)
P = "clinic:sendgrid"


class Counting:
    """Wraps a registered script and counts its calls (one call = one Redis round trip)."""

    def __init__(self, script: Any) -> None:
        self.script = script
        self.calls = 0

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return await self.script(*args, **kwargs)


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


def tracker(redis: Redis, local_seconds: float = 0.25) -> tuple[RedisHealth, Counting]:
    health = RedisHealth(redis, CONFIG, local_seconds=local_seconds)
    counting = Counting(health._script)
    health._script = counting  # type: ignore[assignment]
    return health, counting


def clinic() -> str:
    return f"c-{uuid.uuid4().hex[:8]}"


async def hold(health: RedisHealth, c: str, successes: int) -> None:
    """Take the lease (one allow) and count `successes` under it."""
    assert await health.allow(c, P)
    for _ in range(successes):
        await health.record(c, P, Outcome.SUCCESS)


async def test_healthy_calls_cost_a_few_round_trips_and_every_success_is_counted(
    redis: Redis,
) -> None:
    health, script = tracker(redis, local_seconds=5.0)
    c = clinic()
    for _ in range(200):
        assert await health.allow(c, P)
        await health.record(c, P, Outcome.SUCCESS)
    assert script.calls == 1  # the first allow; the rest answered from the lease
    state = await health.state(c, P)  # a read sends what is held first
    assert state.samples == 200 and state.success_rate == 1.0
    assert state.circuit is CircuitState.CLOSED
    await health.aclose()


async def test_a_burst_of_allows_asks_redis_once(redis: Redis) -> None:
    health, script = tracker(redis, local_seconds=5.0)
    c = clinic()
    answers = await asyncio.gather(*(health.allow(c, P) for _ in range(64)))
    assert all(answers) and script.calls == 1


async def test_a_burst_of_successes_after_the_lease_ended_asks_redis_once(
    redis: Redis,
) -> None:
    """Deliveries that finish together after the lease ended (their allow came under it):
    the first success asks Redis, its answer takes the lease again, and the others count
    under it; none is lost."""
    health, script = tracker(redis, local_seconds=5.0)
    c = clinic()
    await asyncio.gather(*(health.record(c, P, Outcome.SUCCESS) for _ in range(64)))
    assert script.calls == 1
    state = await health.state(c, P)
    assert state.samples == 64 and state.success_rate == 1.0
    await health.aclose()


async def test_a_burst_on_a_half_open_circuit_takes_the_probe_slots_one_by_one(
    redis: Redis,
) -> None:
    config = HealthConfig(window_seconds=10.0, bucket_seconds=1.0, cool_down_seconds=0.2)
    health = RedisHealth(redis, config, local_seconds=5.0)
    c = clinic()
    for _ in range(20):
        await health.record(c, P, Outcome.FAILURE)
    await asyncio.sleep(0.25)  # cool-down over: half-open, `half_open_probes` (3) slots
    answers = await asyncio.gather(*(health.allow(c, P) for _ in range(10)))
    assert sum(answers) == config.half_open_probes


async def test_without_the_lease_every_call_goes_to_redis(redis: Redis) -> None:
    health, script = tracker(redis, local_seconds=0)
    c = clinic()
    for _ in range(10):
        assert await health.allow(c, P)
        await health.record(c, P, Outcome.SUCCESS)
    assert script.calls == 20


async def test_held_successes_reach_redis_when_the_lease_ends(redis: Redis) -> None:
    health, _ = tracker(redis, local_seconds=0.1)
    other, _ = tracker(redis, local_seconds=0)
    c = clinic()
    await hold(health, c, 30)
    for _ in range(50):  # the flusher sends them within about two lease lengths
        if (await other.state(c, P)).samples == 30:
            break
        await asyncio.sleep(0.02)
    assert (await other.state(c, P)).samples == 30
    await health.aclose()


async def test_a_failure_goes_to_redis_at_once(redis: Redis) -> None:
    health, script = tracker(redis, local_seconds=5.0)
    other, _ = tracker(redis, local_seconds=0)
    c = clinic()
    await hold(health, c, 5)
    calls = script.calls
    await health.record(c, P, Outcome.FAILURE)
    # The held successes, then the failure: both in Redis before `record` returns.
    assert script.calls == calls + 2
    seen = await other.state(c, P)
    assert seen.samples == 6 and seen.last_failure_at is not None
    # Failures that open the circuit end the lease: this process stops calling at once.
    for _ in range(20):
        await health.record(c, P, Outcome.FAILURE)
    assert not await health.allow(c, P)
    assert (await other.state(c, P)).circuit is CircuitState.OPEN


async def test_a_circuit_another_process_opened_is_seen_within_the_lease(redis: Redis) -> None:
    here, _ = tracker(redis, local_seconds=0.2)
    there, _ = tracker(redis, local_seconds=0)
    c = clinic()
    assert await here.allow(c, P)
    for _ in range(20):
        await there.record(c, P, Outcome.FAILURE)
    assert (await there.state(c, P)).circuit is CircuitState.OPEN
    await asyncio.sleep(0.25)
    assert not await here.allow(c, P)
    await here.aclose()


async def test_a_closing_process_sends_what_it_holds(redis: Redis) -> None:
    health, _ = tracker(redis, local_seconds=60.0)
    other, _ = tracker(redis, local_seconds=0)
    c = clinic()
    await hold(health, c, 7)
    await health.aclose()
    assert (await other.state(c, P)).samples == 7


async def test_a_busy_worker_does_not_exhaust_the_runtime_pool(redis_url: str, tmp_path: Any) -> None:
    """More concurrent health calls than the pool has connections wait for one: none falls
    back to in-process health (the default redis-py pool raised MaxConnectionsError at 100)."""
    import base64
    import os

    from clinicomm.config import Settings
    from clinicomm.runtime import REDIS_MAX_CONNECTIONS, Runtime

    settings = Settings(
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'pool.db'}",
        redis_url=redis_url,
        master_keys="t:" + base64.b64encode(os.urandom(32)).decode(),
        data_dir=tmp_path,
    )
    runtime = await Runtime.create(settings, migrate=True, env={})
    try:
        health = runtime.health
        assert isinstance(health, RedisHealth)
        health.local_seconds = 0  # every call a round trip
        # The property is that a caller waits for a connection rather than failing: the
        # timeouts are raised so that a loaded CI machine (slow connects, a starved event
        # loop) does not turn waiting into falling back.
        assert runtime.redis is not None
        pool = runtime.redis.connection_pool
        pool.timeout = 60.0
        pool.connection_kwargs.update(socket_connect_timeout=30.0, socket_timeout=30.0)
        errors: list[str] = []
        failed = health.fallback._failed

        def seen(op: str, exc: BaseException) -> None:
            errors.append(f"{op}: {type(exc).__name__}: {exc}")
            failed(op, exc)

        health.fallback._failed = seen  # type: ignore[method-assign]
        c = clinic()
        await asyncio.gather(
            *(health.record(c, P, Outcome.SUCCESS) for _ in range(REDIS_MAX_CONNECTIONS * 4))
        )
        assert health.fallback.failures == 0, sorted(set(errors))
        assert (await health.state(c, P)).samples == REDIS_MAX_CONNECTIONS * 4
    finally:
        await runtime.close()
