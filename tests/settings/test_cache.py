"""Cache levels, metrics and the defined behaviour when Redis is unreachable."""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

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


def count_calls(
    monkeypatch: pytest.MonkeyPatch, owner: object, name: str, calls: list[str], label: str
) -> None:
    """Wrap the coroutine method `owner.name` so each call appends `label` to `calls`."""
    original = getattr(owner, name)

    async def counting(*args: Any) -> Any:
        calls.append(label)
        return await original(*args)

    monkeypatch.setattr(owner, name, counting)


async def test_a_burst_on_a_cold_cache_loads_a_clinic_once(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """100 concurrent reads of one clinic after its cache was dropped (a restart, a change):
    one load from the database or Redis, the same answer for all; and the data key too."""
    await create(runtime, "clinic-burst", smtp_settings("x"))
    runtime.config.cache.clear()
    runtime.keys.forget()
    loads: list[str] = []
    count_calls(monkeypatch, runtime.config, "_load", loads, "config")
    count_calls(monkeypatch, runtime.keys, "_cipher_from", loads, "key")
    answers = await asyncio.gather(
        *(runtime.config.get_clinic_config("clinic-burst", Channel.EMAIL) for _ in range(100))
    )
    ciphers = await asyncio.gather(
        *(runtime.keys.cipher_for(runtime.db, "clinic-burst") for _ in range(100))
    )
    assert loads.count("config") == 1
    assert len({id(a) for a in answers}) == 1 and answers[0].version == 1
    assert len({id(c) for c in ciphers}) == 1
    assert loads.count("key") <= 1  # none when the config load already cached the key


async def test_a_burst_on_a_cold_cache_reads_the_policy_and_callbacks_once(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every accept reads the clinic's message policy and callback settings: a cold burst made
    one database read each per request (100 accepts on a cold cache took 305 ms in process
    instead of ~20 ms); concurrent misses now share one."""
    await create(runtime, "clinic-cold", smtp_settings("x"))
    runtime.config.cache.clear()
    loads: list[str] = []
    count_calls(monkeypatch, runtime.config, "_load_message_policy", loads, "policy")
    count_calls(monkeypatch, runtime.config, "_load_callbacks", loads, "callbacks")
    policies = await asyncio.gather(
        *(runtime.config.get_message_policy("clinic-cold") for _ in range(100))
    )
    targets = await asyncio.gather(
        *(runtime.config.get_callbacks("clinic-cold") for _ in range(100))
    )
    assert loads == ["policy", "callbacks"]
    assert policies == [None] * 100 and targets == [None] * 100


async def test_a_call_after_a_change_does_not_join_a_load_from_before_it(
    runtime: Runtime,
) -> None:
    """A load in flight when the clinic's entries are dropped (a change committed) may have
    read the old settings: a call made after the drop loads again."""
    await create(runtime, "clinic-change", smtp_settings("x"))
    runtime.config.cache.clear()
    loads: list[int] = []
    gate = asyncio.Event()
    policy = runtime.config._load_message_policy

    async def slow_first(clinic_id: str) -> object:
        loads.append(len(loads))
        if len(loads) == 1:
            await gate.wait()
        return await policy(clinic_id)

    runtime.config._load_message_policy = slow_first  # type: ignore[assignment,method-assign]
    before = asyncio.ensure_future(runtime.config.get_message_policy("clinic-change"))
    joined = asyncio.ensure_future(runtime.config.get_message_policy("clinic-change"))
    await asyncio.sleep(0)
    runtime.config.cache.drop("clinic-change", 2)  # what an invalidation does
    after = asyncio.ensure_future(runtime.config.get_message_policy("clinic-change"))
    await asyncio.sleep(0)
    gate.set()
    await asyncio.gather(before, joined, after)
    assert loads == [0, 1]  # `joined` shared the first load; `after` made its own
