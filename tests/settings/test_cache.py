"""Cache levels, metrics and the defined behaviour when Redis is unreachable."""

from __future__ import annotations

import logging
import socket

import pytest
from prometheus_client import REGISTRY

from clinicomm.config import Settings
from clinicomm.providers.base import Channel
from clinicomm.runtime import Runtime
from tests.settings.test_service import create, smtp_settings


def sample(name: str, **labels: str) -> float:
    value = REGISTRY.get_sample_value(name, labels)
    return value or 0.0


async def test_hits_misses_and_latency_are_counted(runtime: Runtime) -> None:
    await create(runtime, "clinic-m", smtp_settings("x"))
    runtime.config.cache.clear()
    miss0 = sample("communication_config_cache_miss_total", clinicId="clinic-m", channel="email")
    hit0 = sample(
        "communication_config_cache_hit_total", clinicId="clinic-m", channel="email", level="l1"
    )
    count0 = sample(
        "communication_config_fetch_latency_count", clinicId="clinic-m", channel="email"
    )
    await runtime.config.get_clinic_config("clinic-m", Channel.EMAIL)
    for _ in range(9):
        await runtime.config.get_clinic_config("clinic-m", Channel.EMAIL)
    hits = sample(
        "communication_config_cache_hit_total", clinicId="clinic-m", channel="email", level="l1"
    )
    misses = sample("communication_config_cache_miss_total", clinicId="clinic-m", channel="email")
    l2 = sample(
        "communication_config_cache_hit_total", clinicId="clinic-m", channel="email", level="l2"
    )
    assert hits - hit0 == 9
    assert (misses - miss0) + l2 >= 1
    count = sample("communication_config_fetch_latency_count", clinicId="clinic-m", channel="email")
    assert count - count0 == 10


@pytest.mark.redis
async def test_second_process_reads_from_redis_not_the_database(
    runtime: Runtime, settings: Settings
) -> None:
    await create(runtime, "clinic-l2", smtp_settings("x"))
    await runtime.config.get_clinic_config("clinic-l2", Channel.EMAIL)
    other = await Runtime.create(settings, env={})
    try:
        before = sample(
            "communication_config_cache_miss_total", clinicId="clinic-l2", channel="email"
        )
        resolved = await other.config.get_clinic_config("clinic-l2", Channel.EMAIL)
        after = sample(
            "communication_config_cache_miss_total", clinicId="clinic-l2", channel="email"
        )
        assert resolved.version == 1 and resolved.source == "clinic"
        assert after == before  # answered from L2
    finally:
        await other.close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_unreachable_redis_reads_go_to_the_database(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    dead = settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{closed_port()}/0"})
    rt = await Runtime.create(dead, env={})
    try:
        await create(rt, "clinic-r", smtp_settings("x"))
        resolved = await rt.config.get_clinic_config("clinic-r", Channel.EMAIL)
        assert resolved.source == "clinic"
        record = await rt.config.save_settings("clinic-r", smtp_settings("y", "h2.example"))
        assert record.version == 2
        resolved = await rt.config.get_clinic_config("clinic-r", Channel.EMAIL)
        assert resolved.version == 2
    finally:
        await rt.close()
    assert any(getattr(r, "event", None) == "redis_unavailable" for r in caplog.records)
