"""Sliding-window limiters: exactness under a simulated clock, clinic isolation, the clinic
rateLimit mapping, Redis with real time, two processes sharing one WhatsApp sender cap, and a
dead Redis degrading to in-process limits."""

from __future__ import annotations

import asyncio
import random
import uuid

import pytest
from redis.asyncio import Redis

from clinicomm.routing.limits import (
    InProcessLimiter,
    RedisLimiter,
    clinic_channel_key,
    clinic_channel_limits,
    limit_key,
    make_limiter,
    sender_key,
    sender_limits,
)
from clinicomm.settings.models import RateLimit
from tests.routing.conftest import FakeClock, max_in_window, peer


# ---- keys and limits -------------------------------------------------------------------------
def test_limit_key_starts_with_the_clinic_and_escapes_parts() -> None:
    assert limit_key(clinic_channel_key("c1", "email")) == "ratelimit:{c1}:channel:email"
    assert limit_key(sender_key(None, "meta", "1065")) == "ratelimit:{global}:sender:meta:1065"
    assert limit_key(("c1", "a:b", "c")) != limit_key(("c1", "a", "b:c"))
    with pytest.raises(ValueError):
        limit_key(())
    with pytest.raises(ValueError):
        limit_key(("c1", None))


def test_clinic_channel_limits_from_rate_limit() -> None:
    rl = RateLimit.model_validate({"enabled": True, "maxPerMinute": 10, "maxPerDay": 500})
    assert clinic_channel_limits(rl) == [(10, 60.0), (500, 86400.0)]
    full = RateLimit.model_validate(
        {"enabled": True, "maxPerMinute": 1, "maxPerHour": 2, "maxPerDay": 3}
    )
    assert clinic_channel_limits(full) == [(1, 60.0), (2, 3600.0), (3, 86400.0)]
    assert clinic_channel_limits(RateLimit.model_validate({"maxPerMinute": 10})) == []  # disabled
    assert clinic_channel_limits(None) == []
    assert sender_limits(20) == [(20, 1.2), (2, 0.1)]
    assert sender_limits(5) == [(5, 1.2)]


async def test_invalid_limits_are_rejected() -> None:
    limiter = InProcessLimiter(clock=FakeClock())
    with pytest.raises(ValueError):
        await limiter.acquire(("c1", "x"), [(0, 1.0)])
    with pytest.raises(ValueError):
        await limiter.acquire(("c1", "x"), [(1, 0.0)])


def test_factory_without_redis_is_in_process() -> None:
    assert isinstance(make_limiter(None), InProcessLimiter)


# ---- in process, simulated clock -------------------------------------------------------------
async def test_200_attempts_over_70_simulated_seconds_never_exceed_any_window() -> None:
    clock = FakeClock()
    limiter = InProcessLimiter(clock=clock)
    limits = [(5, 1.0), (20, 10.0), (60, 60.0)]
    rng = random.Random(7)
    admitted: list[float] = []
    for _ in range(200):
        wait = await limiter.acquire(("c1", "email"), limits)
        if wait == 0.0:
            admitted.append(clock())
        else:
            assert wait > 0
        clock.advance(rng.expovariate(1 / 0.35))
    assert 60 <= clock() - 1_700_000_000.0 <= 80
    for count, window in limits:
        assert max_in_window(admitted, window) <= count
    assert max_in_window(admitted, 60.0) == 60  # the limiter is not over-conservative


async def test_the_returned_wait_is_exact() -> None:
    clock = FakeClock(1000.0)
    limiter = InProcessLimiter(clock=clock)
    limits = [(3, 1.0), (4, 10.0)]
    for _ in range(3):
        assert await limiter.acquire(("c1", "x"), limits) == 0.0
        clock.advance(0.1)
    wait = await limiter.acquire(("c1", "x"), limits)
    assert wait == pytest.approx(0.7)  # events at 0, .1, .2: the first leaves at t=1.0
    clock.advance(wait - 1e-6)
    assert await limiter.acquire(("c1", "x"), limits) > 0
    clock.advance(1e-6)
    assert await limiter.acquire(("c1", "x"), limits) == 0.0
    # Now the 10 s limit (4) is full: wait until the first event is 10 s old.
    assert await limiter.acquire(("c1", "x"), limits) == pytest.approx(9.0)
    assert await limiter.usage(("c1", "x"), limits) == 1.0


async def test_a_refused_event_counts_in_no_window() -> None:
    clock = FakeClock()
    limiter = InProcessLimiter(clock=clock)
    limits = [(2, 1.0), (100, 3600.0)]
    results = [await limiter.acquire(("c1", "sms"), limits) for _ in range(10)]
    assert results[:2] == [0.0, 0.0] and all(r > 0 for r in results[2:])
    assert await limiter.usage(("c1", "sms"), [(100, 3600.0)]) == pytest.approx(0.02)
    assert await limiter.usage(("c1", "sms"), limits) == 1.0
    assert await limiter.usage(("c1", "sms"), []) == 0.0
    assert await limiter.acquire(("c1", "sms"), []) == 0.0


async def test_one_clinic_at_its_limit_does_not_slow_another() -> None:
    clock = FakeClock()
    limiter = InProcessLimiter(clock=clock)
    limits = [(5, 60.0)]
    for _ in range(5):
        assert await limiter.acquire(clinic_channel_key("A", "email"), limits) == 0.0
    assert await limiter.acquire(clinic_channel_key("A", "email"), limits) > 0
    assert await limiter.acquire(clinic_channel_key("B", "email"), limits) == 0.0
    assert await limiter.acquire(clinic_channel_key("A", "sms"), limits) == 0.0


async def test_whatsapp_500_messages_at_80_per_second_simulated() -> None:
    clock = FakeClock()
    limiter = InProcessLimiter(clock=clock)
    key, limits = sender_key("c1", "meta", "106540352242922"), sender_limits(80)
    admitted: list[float] = []
    while len(admitted) < 500:
        wait = await limiter.acquire(key, limits)
        if wait == 0.0:
            admitted.append(clock())
            clock.advance(0.0005)
        else:
            clock.advance(wait)
    assert max_in_window(admitted, 1.0) == 80


async def test_idle_keys_are_swept() -> None:
    clock = FakeClock()
    limiter = InProcessLimiter(clock=clock)
    for i in range(limiter._SWEEP_EVERY - 1):
        await limiter.acquire((f"c{i}", "x"), [(1, 1.0)])
        clock.advance(0.0001)
    assert len(limiter._logs) == limiter._SWEEP_EVERY - 1
    clock.advance(2)
    await limiter.acquire(("c-last", "x"), [(1, 1.0)])  # every 10,000th call sweeps
    assert list(limiter._logs) == ["ratelimit:{c-last}:x"]


# ---- Redis, real time ------------------------------------------------------------------------
@pytest.mark.redis
async def test_redis_10_per_second_with_concurrent_tasks(redis_url: str) -> None:
    redis = Redis.from_url(redis_url)
    try:
        limiter = make_limiter(redis)
        assert isinstance(limiter, RedisLimiter)
        key = (f"c-{uuid.uuid4().hex[:8]}", "email")
        limits = [(10, 1.0)]
        admitted: list[float] = []

        async def worker() -> None:
            for _ in range(10):
                while True:
                    admission = await limiter.try_acquire(key, limits)
                    if admission.admitted:
                        admitted.append(admission.at)
                        break
                    assert 0 < admission.wait <= 1.0
                    await asyncio.sleep(admission.wait)

        await asyncio.gather(*(worker() for _ in range(3)))
        assert len(admitted) == 30
        assert max_in_window(admitted, 1.0) == 10
        assert await limiter.usage(key, limits) > 0
        other = (f"c-{uuid.uuid4().hex[:8]}", "email")
        assert await limiter.acquire(other, limits) == 0.0  # tenant isolation
        assert await redis.pttl(limit_key(key)) <= 2000
    finally:
        await redis.aclose()


@pytest.mark.redis
async def test_two_processes_500_whatsapp_sends_at_80_per_second(redis_url: str) -> None:
    key = sender_key(f"c-{uuid.uuid4().hex[:8]}", "meta", "106540352242922")
    cmd = {"op": "acquire_all", "key": list(key), "limits": [[80, 1.0]], "count": 250}
    async with peer(redis_url) as one, peer(redis_url) as two:
        first, second = await asyncio.gather(one.ask(**cmd), two.ask(**cmd))
    times = first["times"] + second["times"]
    assert len(times) == 500
    assert max_in_window(times, 1.0) <= 80
    assert max_in_window(times, 1.0) >= 79  # bursts reach the cap: not over-conservative
    assert max(times) - min(times) < 8  # 500 at 80/s is about 6 s


@pytest.mark.redis
async def test_concurrent_calls_for_one_key_share_a_script_call_in_their_order(
    redis_url: str,
) -> None:
    """60 calls made together: one script call, the first 10 callers admitted at one instant,
    the other 50 told the exact wait; nothing refused is counted."""
    redis = Redis.from_url(redis_url)
    try:
        limiter = RedisLimiter(redis)
        calls: list[int] = []
        script = limiter._acquire

        async def counting(*, keys: list[str], args: list[str | int]) -> object:
            calls.append(int(args[1]))
            return await script(keys=keys, args=args)

        limiter._acquire = counting  # type: ignore[assignment]
        key = (f"c-{uuid.uuid4().hex[:8]}", "sender", "meta", "1")
        answers = await asyncio.gather(*(limiter.try_acquire(key, [(10, 1.0)]) for _ in range(60)))
        assert calls == [60]
        assert [a.admitted for a in answers] == [True] * 10 + [False] * 50
        assert len({a.at for a in answers}) == 1
        assert all(0.99 <= a.wait <= 1.0 for a in answers[10:])
        assert await redis.zcard(limit_key(key)) == 10
        # The paced sender limits: the tenth of a second is the smaller room.
        paced = (key[0], "sender", "meta", "2")
        answers = await asyncio.gather(
            *(limiter.try_acquire(paced, sender_limits(80)) for _ in range(20))
        )
        assert sum(a.admitted for a in answers) == 8
        assert all(0 < a.wait <= 0.1 for a in answers if not a.admitted)
    finally:
        await redis.aclose()


@pytest.mark.redis
async def test_calls_made_while_a_script_call_is_in_flight_form_the_next_batch(
    redis_url: str,
) -> None:
    redis = Redis.from_url(redis_url)
    try:
        limiter = RedisLimiter(redis)
        calls: list[int] = []
        script = limiter._acquire
        release = asyncio.Event()

        async def slow(*, keys: list[str], args: list[str | int]) -> object:
            calls.append(int(args[1]))
            await release.wait()
            return await script(keys=keys, args=args)

        limiter._acquire = slow  # type: ignore[assignment]
        key = (f"c-{uuid.uuid4().hex[:8]}", "email")
        first = asyncio.ensure_future(limiter.acquire(key, [(100, 60.0)]))
        await asyncio.sleep(0.01)
        later = [asyncio.ensure_future(limiter.acquire(key, [(100, 60.0)])) for _ in range(30)]
        later[0].cancel()  # a caller that gives up is not asked for
        await asyncio.sleep(0.01)
        release.set()
        assert await first == 0.0
        assert await asyncio.gather(*later[1:]) == [0.0] * 29
        assert calls == [1, 29]
        assert await redis.zcard(limit_key(key)) == 30
        assert limiter._waiting == {}
    finally:
        await redis.aclose()


# ---- Redis degradation (runs without a Redis server) -----------------------------------------
async def test_dead_redis_degrades_to_in_process_limits(
    log_records: pytest.LogCaptureFixture,
) -> None:
    redis = Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    try:
        limiter = RedisLimiter(redis)
        results = [await limiter.acquire(("c1", "email"), [(3, 60.0)]) for _ in range(5)]
        assert results[:3] == [0.0] * 3 and all(r > 0 for r in results[3:])
        together = await asyncio.gather(*(limiter.acquire(("c2", "email"), [(3, 60.0)]) for _ in range(5)))
        assert together[:3] == [0.0] * 3 and all(r > 0 for r in together[3:])
        assert await limiter.usage(("c1", "email"), [(3, 60.0)]) == 1.0
        warnings = [r for r in log_records.records if getattr(r, "event", "") == "redis_unavailable"]
        assert len(warnings) == 1
    finally:
        await redis.aclose()
