"""Across worker processes: one circuit, one clinic rate limit; fairness under a 3,000-message
burst of another clinic (it was 10,000: the claim's fair order is an index scan, so the
burst's size does not enter the other clinic's wait)."""

from __future__ import annotations

import asyncio
import sys
import time
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import func, select

from clinicomm import Client
from clinicomm.config import Settings
from clinicomm.store.models import Delivery, aware
from tests.delivery.test_workers import ROOT, stop, worker_env
from tests.monitoring.conftest import ProviderSink, email_request, email_settings, sendgrid
from tests.support.pipeline import create_clinic

BURST = 3000  # 40 concurrent bursts of 75


async def start(settings: Settings, **env: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "clinicomm.cli", "worker",
        env={**worker_env(settings), **env}, cwd=ROOT, stdout=asyncio.subprocess.DEVNULL,
    )


async def statuses(client: Client) -> dict[str, int]:
    async with client._rt().db.read() as session:
        rows = (
            await session.execute(select(Delivery.status, func.count()).group_by(Delivery.status))
        ).all()
    return {str(s): int(n) for s, n in rows}


async def until(check: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


@pytest.mark.redis
async def test_two_worker_processes_share_one_circuit(settings: Settings) -> None:
    async with ProviderSink() as primary, ProviderSink() as fallback:
        primary.fail = True
        client = Client(settings, run_worker=False, env={})
        await client.start()
        try:
            await create_clinic(
                client,
                "clinic-a",
                {"email": email_settings(sendgrid(primary, "p"), sendgrid(fallback, "f"))},
            )
            first = await start(settings, CLINICOMM_HEALTH_MIN_SAMPLES="3")
            try:
                for _ in range(3):
                    await client.send(email_request("clinic-a"))

                async def three_sent() -> bool:
                    return (await statuses(client)).get("sent", 0) == 3

                await until(three_sent, 20)
            finally:
                await stop(first)
            assert primary.sends == 3  # process 1 saw the primary fail three times
            second = await start(settings, CLINICOMM_HEALTH_MIN_SAMPLES="3")
            try:
                await client.send(email_request("clinic-a"))

                async def four_sent() -> bool:
                    return (await statuses(client)).get("sent", 0) == 4

                await until(four_sent, 20)
            finally:
                await stop(second)
            # Process 2 knew the circuit was open: straight to the fallback.
            assert primary.sends == 3
            assert fallback.sends == 4
        finally:
            await client.close()


@pytest.mark.redis
async def test_clinic_limit_holds_across_two_processes(settings: Settings) -> None:
    async with ProviderSink() as sink:
        client = Client(settings, run_worker=False, env={})
        await client.start()
        try:
            limited = {"enabled": True, "maxPerMinute": 60}
            await create_clinic(
                client, "clinic-l", {"email": email_settings(sendgrid(sink, "l"), rateLimit=limited)}
            )
            request = email_request("clinic-l")
            await asyncio.gather(*(client.send(request) for _ in range(200)))
            workers = [await start(settings) for _ in range(2)]
            try:
                await until(lambda: _true(sink.sends >= 60), 15)
                await asyncio.sleep(3)  # two processes had every chance to overshoot
                first_send = min(sink.send_times)
                assert sink.sends == 60
                async with client._rt().db.read() as session:
                    rows = (
                        await session.execute(
                            select(Delivery.status, Delivery.next_attempt_at, Delivery.sent_at)
                        )
                    ).all()
            finally:
                for proc in workers:
                    await stop(proc)
        finally:
            await client.close()
    sent = [aware(r.sent_at) for r in rows if r.status == "sent"]
    waiting = [aware(r.next_attempt_at) for r in rows if r.status == "queued"]
    assert len(sent) == 60 and len(waiting) == 140
    window_end = min(sent) + timedelta(seconds=60)
    # the limiter (Redis server time) admits the 61st only once the first leaves the window
    assert min(waiting) >= window_end - timedelta(seconds=1)
    assert max(sink.send_times) - first_send < 60


async def _true(value: bool) -> bool:
    return value


async def test_fairness_single_message_behind_3000(make_mon: Any) -> None:
    mon = await make_mon(worker_batch_size=100, worker_concurrency=256)
    async with ProviderSink() as sink_a, ProviderSink() as sink_b:
        await mon.create_clinic("clinic-big", {"email": email_settings(sendgrid(sink_a, "big"))})
        await mon.create_clinic("clinic-one", {"email": email_settings(sendgrid(sink_b, "one"))})
        burst = email_request("clinic-big")
        started = time.monotonic()

        async def some(n: int) -> None:
            for _ in range(n):
                await mon.runtime.messaging.accept(burst)

        await asyncio.gather(*(some(BURST // 40) for _ in range(40)))
        accepted_in = time.monotonic() - started
        backlog = BURST - sink_a.sends
        t0 = time.monotonic()
        await mon.runtime.messaging.accept(email_request("clinic-one"))
        await until(lambda: _true(sink_b.sends == 1), 30)
        latency = sink_b.send_times[0] - t0
    backend = "PostgreSQL" if "postgresql" in mon.settings.database_url else "SQLite"
    print(
        f"\nfairness ({backend}): {BURST} accepted in {accepted_in:.2f}s; clinic B's message "
        f"reached its provider {latency * 1000:.0f} ms after acceptance, "
        f"with {backlog} of clinic A's still queued at that moment"
    )
    assert latency < 1.0
