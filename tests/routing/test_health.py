"""Health bands, rolling window and circuit breaker: in process (fake clock) and on Redis
(real time, small windows), the same behaviour tests for both; two processes share a circuit;
a dead Redis degrades to in-process health."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest
from redis.asyncio import Redis

from clinicomm.providers.errors import (
    ComplianceError,
    ConfigurationError,
    ProviderDownError,
    RateLimitedError,
    RecipientError,
    RecipientRateLimitedError,
    TransientError,
)
from clinicomm.routing.health import (
    CircuitState,
    HealthConfig,
    HealthState,
    HealthTracker,
    InProcessHealth,
    Outcome,
    health_key,
    outcome_for,
)
from clinicomm.routing.health_redis import RedisHealth
from clinicomm.runtime import make_health
from tests.routing.conftest import FakeClock, peer

# Small numbers so the Redis variant runs in real time: 2 s window in 0.1 s buckets.
FAST = HealthConfig(window_seconds=2.0, bucket_seconds=0.1, cool_down_seconds=0.3)
P = "clinic:sendgrid"


@dataclass
class Kit:
    health: HealthTracker
    advance: Callable[[float], Awaitable[None]]
    clinic: str


def _in_process(config: HealthConfig) -> Kit:
    clock = FakeClock()

    async def advance(seconds: float) -> None:
        clock.advance(seconds)

    return Kit(InProcessHealth(config, clock=clock), advance, f"c-{uuid.uuid4().hex[:8]}")


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def kit(request: pytest.FixtureRequest) -> AsyncIterator[Kit]:
    if request.param == "memory":
        yield _in_process(FAST)
        return
    url: str = request.getfixturevalue("redis_url")
    redis = Redis.from_url(url)
    try:
        yield Kit(make_health(redis, FAST), asyncio.sleep, f"c-{uuid.uuid4().hex[:8]}")
    finally:
        await redis.aclose()


async def feed(kit: Kit, ok: int, bad: int, provider: str = P) -> None:
    for _ in range(ok):
        await kit.health.record(kit.clinic, provider, Outcome.SUCCESS)
    for _ in range(bad):
        await kit.health.record(kit.clinic, provider, Outcome.FAILURE)


# ---- classification and keys -----------------------------------------------------------------
@pytest.mark.parametrize(
    ("error", "outcome"),
    [
        (None, Outcome.SUCCESS),
        (RateLimitedError("429"), Outcome.IGNORED),
        (RecipientRateLimitedError("131056"), Outcome.IGNORED),
        (RecipientError("bad address"), Outcome.IGNORED),
        (ComplianceError("opt-out"), Outcome.IGNORED),
        (TransientError("503"), Outcome.FAILURE),
        (TransientError("timeout"), Outcome.FAILURE),
        (ProviderDownError("refused"), Outcome.FAILURE),
        (ConfigurationError("401"), Outcome.FAILURE),
        (RuntimeError("adapter bug"), Outcome.FAILURE),
    ],
)
def test_outcome_for(error: BaseException | None, outcome: Outcome) -> None:
    assert outcome_for(error) is outcome


def test_health_key_always_has_the_clinic() -> None:
    assert health_key("c1", "clinic:sendgrid") == "health:{c1}:clinic:sendgrid"
    assert health_key(None, "global:smtp") == "health:{global}:global:smtp"
    assert health_key("c1") == "health:{c1}"
    assert health_key("a}b") == "health:{a%7Db}"


def test_factory_without_redis_is_in_process() -> None:
    assert isinstance(make_health(None), InProcessHealth)


def test_config_is_validated() -> None:
    with pytest.raises(ValueError):
        HealthConfig(window_seconds=1, bucket_seconds=2)
    with pytest.raises(ValueError):
        HealthConfig(half_open_probes=0)


# ---- bands (both implementations) ------------------------------------------------------------
@pytest.mark.parametrize(
    ("ok", "bad", "state"),
    [
        (20, 0, HealthState.HEALTHY),
        (24, 1, HealthState.HEALTHY),  # 96 %
        (19, 1, HealthState.DEGRADED),  # exactly 95 % is not > 95 %
        (16, 4, HealthState.DEGRADED),  # exactly 80 %
        (79, 21, HealthState.DOWN),  # 79 %
    ],
)
async def test_bands_with_minimum_volume(kit: Kit, ok: int, bad: int, state: HealthState) -> None:
    await feed(kit, ok, bad)
    health = await kit.health.state(kit.clinic, P)
    assert health.state is state
    assert health.samples == ok + bad
    assert health.success_rate == pytest.approx(ok / (ok + bad))
    assert health.circuit is (CircuitState.OPEN if state is HealthState.DOWN else CircuitState.CLOSED)


async def test_fewer_than_20_outcomes_leave_the_state_unchanged(kit: Kit) -> None:
    await feed(kit, 0, 19)
    health = await kit.health.state(kit.clinic, P)
    assert (health.state, health.circuit, health.samples) == (HealthState.HEALTHY, "closed", 19)
    assert await kit.health.allow(kit.clinic, P)


async def test_a_band_sticks_when_the_window_thins_out(kit: Kit) -> None:
    await feed(kit, 17, 3)  # 85 % over 20: degraded
    assert (await kit.health.state(kit.clinic, P)).state is HealthState.DEGRADED
    await kit.advance(2.2)  # the whole window ages out
    await feed(kit, 5, 0)  # 5 < 20 outcomes: unchanged
    health = await kit.health.state(kit.clinic, P)
    assert (health.state, health.samples) == (HealthState.DEGRADED, 5)


async def test_rate_limits_and_recipient_errors_are_not_failures(kit: Kit) -> None:
    for error in [RateLimitedError("429"), RecipientError("x"), ComplianceError("y")] * 20:
        await kit.health.record(kit.clinic, P, outcome_for(error))
    await feed(kit, 20, 0)
    health = await kit.health.state(kit.clinic, P)
    assert (health.state, health.samples, health.success_rate) == (HealthState.HEALTHY, 20, 1.0)


async def test_old_failures_leave_the_window(kit: Kit) -> None:
    await feed(kit, 15, 5)  # 75 %: down, circuit open
    await kit.advance(2.2)
    assert (await kit.health.state(kit.clinic, P)).samples == 0


async def test_clinics_and_providers_are_isolated(kit: Kit) -> None:
    await feed(kit, 0, 20)
    other = "c-other-" + uuid.uuid4().hex[:6]
    assert not await kit.health.allow(kit.clinic, P)
    assert await kit.health.allow(other, P)
    assert await kit.health.allow(kit.clinic, "clinic:smtp")
    assert (await kit.health.state(other, P)).samples == 0


# ---- circuit (both implementations) ----------------------------------------------------------
async def test_down_opens_then_half_open_allows_n_probes_then_closes(kit: Kit) -> None:
    await feed(kit, 3, 17)
    health = await kit.health.state(kit.clinic, P)
    assert (health.state, health.circuit) == (HealthState.DOWN, CircuitState.OPEN)
    assert health.opened_at is not None and health.last_failure_at is not None
    assert not await kit.health.allow(kit.clinic, P)
    await kit.advance(0.35)
    allowed = [await kit.health.allow(kit.clinic, P) for _ in range(5)]
    assert allowed == [True, True, True, False, False]
    assert (await kit.health.state(kit.clinic, P)).circuit is CircuitState.HALF_OPEN
    for _ in range(3):
        await kit.health.record(kit.clinic, P, Outcome.SUCCESS)
    health = await kit.health.state(kit.clinic, P)
    # Closed with a fresh window: the 17 old failures cannot reopen it.
    assert (health.state, health.circuit, health.samples) == ("healthy", "closed", 0)
    assert health.opened_at is None
    await feed(kit, 0, 1)
    assert await kit.health.allow(kit.clinic, P)


async def test_one_probe_failure_reopens_with_a_new_cool_down(kit: Kit) -> None:
    await feed(kit, 0, 20)
    first_open = (await kit.health.state(kit.clinic, P)).opened_at
    await kit.advance(0.35)
    assert await kit.health.allow(kit.clinic, P)
    await kit.health.record(kit.clinic, P, Outcome.SUCCESS)
    await kit.health.record(kit.clinic, P, Outcome.FAILURE)
    health = await kit.health.state(kit.clinic, P)
    assert health.circuit is CircuitState.OPEN
    assert health.opened_at is not None and first_open is not None and health.opened_at > first_open
    assert not await kit.health.allow(kit.clinic, P)
    await kit.advance(0.35)
    assert await kit.health.allow(kit.clinic, P)


async def test_ignored_probe_answer_frees_its_slot(kit: Kit) -> None:
    await feed(kit, 0, 20)
    await kit.advance(0.35)
    assert [await kit.health.allow(kit.clinic, P) for _ in range(3)] == [True] * 3
    assert not await kit.health.allow(kit.clinic, P)
    await kit.health.record(kit.clinic, P, Outcome.IGNORED)  # a 429 proves nothing
    assert await kit.health.allow(kit.clinic, P)


async def test_probes_that_never_report_do_not_wedge_half_open(kit: Kit) -> None:
    await feed(kit, 0, 20)
    await kit.advance(0.35)
    assert [await kit.health.allow(kit.clinic, P) for _ in range(4)] == [True] * 3 + [False]
    await kit.advance(0.35)  # one cool-down after the round started
    assert await kit.health.allow(kit.clinic, P)


async def test_probe_results_are_stored_and_redacted(kit: Kit) -> None:
    await kit.health.record_probe(kit.clinic, P, False, "535 auth failed for ops@clinic-a.example")
    health = await kit.health.state(kit.clinic, P)
    assert health.last_check_at is not None and health.last_check_ok is False
    assert health.last_check_detail is not None and "@" not in health.last_check_detail
    assert (health.state, health.circuit) == (HealthState.HEALTHY, CircuitState.CLOSED)
    await kit.health.record_probe(kit.clinic, P, True)
    assert (await kit.health.state(kit.clinic, P)).last_check_ok is True


async def test_snapshot_lists_this_clinics_providers(kit: Kit) -> None:
    await feed(kit, 1, 0, "clinic:sendgrid")
    await feed(kit, 0, 1, "global:smtp")
    await kit.health.record("c-someone-else", "clinic:postmark", Outcome.SUCCESS)
    snap = await kit.health.snapshot(kit.clinic)
    assert list(snap) == ["clinic:sendgrid", "global:smtp"]
    assert snap["global:smtp"].last_failure_at is not None
    assert snap["clinic:sendgrid"].clinic_id == kit.clinic


# ---- in process only ------------------------------------------------------------------------
async def test_default_config_5_minutes_30_seconds() -> None:
    clock = FakeClock()
    health = InProcessHealth(clock=clock)
    for _ in range(20):
        await health.record(None, "global:smtp", Outcome.FAILURE)
    assert (await health.state(None, "global:smtp")).clinic_id == "global"
    clock.advance(29.9)
    assert not await health.allow(None, "global:smtp")
    clock.advance(0.2)
    assert await health.allow(None, "global:smtp")
    health2 = InProcessHealth(clock=clock)
    await health2.record("c1", P, Outcome.FAILURE)
    clock.advance(299)
    assert (await health2.state("c1", P)).samples == 1
    clock.advance(11)
    assert (await health2.state("c1", P)).samples == 0


async def test_circuit_transitions_are_logged_without_patient_data(
    log_records: pytest.LogCaptureFixture,
) -> None:
    kit = _in_process(FAST)
    await feed(kit, 0, 20)
    opened = [r for r in log_records.records if getattr(r, "event", "") == "circuit_open"]
    assert len(opened) == 1
    assert opened[0].clinicId == kit.clinic and opened[0].provider == P  # type: ignore[attr-defined]


# ---- Redis degradation (runs without a Redis server) -----------------------------------------
async def test_dead_redis_degrades_to_in_process_with_one_warning(
    log_records: pytest.LogCaptureFixture,
) -> None:
    redis = Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    try:
        health = RedisHealth(redis, FAST)
        for _ in range(20):
            await health.record("c1", P, Outcome.FAILURE)
        assert not await health.allow("c1", P)
        assert (await health.state("c1", P)).circuit is CircuitState.OPEN
        assert list(await health.snapshot("c1")) == [P]
        await health.record_probe("c1", P, True)
        warnings = [r for r in log_records.records if getattr(r, "event", "") == "redis_unavailable"]
        assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
        assert health.fallback.failures == 24
    finally:
        await redis.aclose()


# ---- two processes, one circuit --------------------------------------------------------------
@pytest.mark.redis
async def test_two_processes_share_one_circuit(redis_url: str) -> None:
    clinic = f"c-{uuid.uuid4().hex[:8]}"
    config = {"window_seconds": 2.0, "bucket_seconds": 0.1, "cool_down_seconds": 0.5}
    redis = Redis.from_url(redis_url)
    here = RedisHealth(redis, HealthConfig(**config))
    cmd = {"clinic": clinic, "provider": P, "config": config}
    try:
        async with peer(redis_url) as other:
            for _ in range(20):
                await here.record(clinic, P, Outcome.FAILURE)
            assert (await other.ask(op="state", **cmd))["answer"] == "open"
            assert (await other.ask(op="allow", **cmd))["answer"] is False
            await asyncio.sleep(0.55)

            async def there() -> list[bool]:
                return [(await other.ask(op="allow", **cmd))["answer"] for _ in range(4)]

            async def mine() -> list[bool]:
                return [await here.allow(clinic, P) for _ in range(4)]

            theirs, ours = await asyncio.gather(there(), mine())
            assert sum(theirs) + sum(ours) == 3  # N probes in total, not per process
            for _ in range(3):
                await other.ask(op="record", outcome="success", **cmd)
            assert (await here.state(clinic, P)).circuit is CircuitState.CLOSED
            await here.record(clinic, P, Outcome.SUCCESS)
            assert (await other.ask(op="state", **cmd))["answer"] == "closed"
    finally:
        await redis.aclose()
