"""Redis stopped and PostgreSQL restarted mid-run (private servers, so nothing else is hit).

Each asserts: every accepted message reaches a terminal state, none is lost, and duplicates
(sends recorded twice at the sink) are counted and bounded by the worker's concurrency.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from sqlalchemy import func, select

from clinicomm import Client, SendRequest
from clinicomm.config import Settings
from clinicomm.store.db import upgrade
from clinicomm.store.models import Delivery
from tests.delivery.test_workers import CountingSink
from tests.support.pipeline import create_clinic, fast
from tests.support.servers import PrivatePostgres, PrivateRedis

pytestmark = [pytest.mark.fault, pytest.mark.slow]
CONCURRENCY = 50


def email(n: int) -> SendRequest:
    return SendRequest.model_validate(
        {
            "title": "Reminder",
            "body": "See you soon.",
            "recipients": [{"email": f"p{n}@example.com"}],
            "channels": ["email"],
            "metadata": {"clinicId": "clinic-f"},
        }
    )


def sendgrid(url: str) -> dict[str, Any]:
    return {
        "email": {
            "primary": {
                "provider": "sendgrid",
                "credentials": {"apiKey": "SG.k", "fromEmail": "a@x.example", "baseUrl": url},
            }
        }
    }


async def statuses(client: Client) -> dict[str, int]:
    async with client._rt().db.read() as session:
        rows = (
            await session.execute(select(Delivery.status, func.count()).group_by(Delivery.status))
        ).all()
    return {str(s): int(n) for s, n in rows}


async def wait_sent(client: Client, total: int, timeout: float) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            current = await statuses(client)
            if current.get("sent", 0) == total:
                return current
        except Exception:  # the database may be restarting
            current = {}
        if time.monotonic() > deadline:
            raise AssertionError(f"not all sent in {timeout}s: {current}")
        await asyncio.sleep(0.2)


async def test_redis_stopped_mid_run_sending_goes_on(settings: Settings) -> None:
    with PrivateRedis() as redis:
        async with CountingSink(delay=0.01) as sink:
            client = Client(
                fast(settings, redis_url=redis.url, worker_concurrency=CONCURRENCY), env={}
            )
            await client.start()
            try:
                await create_clinic(client, "clinic-f", sendgrid(sink.url))
                for i in range(200):
                    await client.send(email(i))
                redis.stop()  # mid-run: caches, limits and health fall back to the process
                for i in range(200, 400):
                    await client.send(email(i))
                final = await wait_sent(client, 400, timeout=60)
                redis.start()  # and back: nothing to repair by hand
                for i in range(400, 450):
                    await client.send(email(i))
                final = await wait_sent(client, 450, timeout=60)
            finally:
                await client.close()
    assert final == {"sent": 450}
    assert len(sink.per_delivery) == 450
    assert max(sink.per_delivery.values()) == 1


@pytest.mark.postgres
async def test_postgres_restarted_mid_run_loses_nothing(settings: Settings) -> None:
    with PrivatePostgres() as pg:
        await asyncio.to_thread(upgrade, pg.url)
        async with CountingSink(delay=0.02) as sink:
            client = Client(
                fast(settings, database_url=pg.url, redis_url=None, worker_concurrency=CONCURRENCY),
                env={},
            )
            await client.start()
            # A delivery the crash caught while it was being prepared is requeued after
            # `prepare_retry_seconds` (30 s by default, not a setting): 1 s here, so the run
            # waits for the recovery, not for that constant.
            assert client.worker is not None
            client.worker.options.prepare_retry_seconds = 1.0
            try:
                await create_clinic(client, "clinic-f", sendgrid(sink.url))
                for i in range(1000):
                    await client.send(email(i))
                while sink.total < 200:
                    await asyncio.sleep(0.02)
                await asyncio.to_thread(pg.stop, "immediate")  # a crash, not a clean shutdown
                await asyncio.sleep(1.0)
                await asyncio.to_thread(pg.start)
                final = await wait_sent(client, 1000, timeout=120)
            finally:
                await client.close()
    duplicates = sum(n - 1 for n in sink.per_delivery.values() if n > 1)
    print(
        f"\nPostgreSQL restart: 1000 accepted, all sent, {duplicates} sent twice (bound {CONCURRENCY})"
    )
    assert final == {"sent": 1000}
    assert len(sink.per_delivery) == 1000
    assert duplicates <= CONCURRENCY
