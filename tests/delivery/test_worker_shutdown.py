"""A worker stopped while its flusher is committing writes every result exactly once.

The flusher used to be cancelled at shutdown; a flush cancelled after its COMMIT had reached
the database kept its results and the final flush wrote them again: a second attempt row per
delivery and `outcome_lease_lost` warnings (and channel-fallback deliveries twice)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from sqlalchemy import func, select, text

from clinicomm.delivery.worker import Worker, WorkerOptions
from clinicomm.messaging.models import SendRequest
from clinicomm.runtime import Runtime
from clinicomm.store.models import Delivery, DeliveryAttempt
from tests.api.test_communications import sendgrid_settings
from tests.support.http_capture import CaptureServer, Scripted


def email(address: str, clinic_id: str) -> SendRequest:
    return SendRequest.model_validate(
        {
            "title": "Hi",
            "body": "See you.",
            "recipients": [{"email": address}],
            "channels": ["email"],
            "metadata": {"clinicId": clinic_id},
        }
    )


async def test_stopping_during_a_commit_writes_each_result_once(
    runtime: Runtime, log_records: Any
) -> None:
    async with CaptureServer(Scripted(202, None, {"X-Message-Id": "sg-1"})) as server:
        async with runtime.db.session() as session:
            change = await runtime.config.create_clinic(
                session, "clinic-stop", "Stop", sendgrid_settings(server.url)
            )
        await runtime.config.committed(change)
        for i in range(5):
            await runtime.messaging.accept(email(f"p{i}@example.com", "clinic-stop"))
        worker = Worker.for_runtime(runtime, WorkerOptions(poll_seconds=0.05))
        committing = asyncio.Event()
        session_of = runtime.db.session

        @asynccontextmanager
        async def slow_after_commit() -> AsyncIterator[Any]:
            async with session_of() as session:
                yield session
            if worker.sent == 5:  # the flush of the results: committed, not yet returned
                committing.set()
                await asyncio.sleep(0.3)

        runtime.db.session = slow_after_commit  # type: ignore[method-assign]
        stop = asyncio.Event()
        task = asyncio.create_task(worker.run(stop))
        await asyncio.wait_for(committing.wait(), 30)
        stop.set()
        await asyncio.wait_for(task, 30)
        runtime.db.session = session_of  # type: ignore[method-assign]

    async with runtime.db.read() as session:
        attempts = await session.scalar(select(func.count()).select_from(DeliveryAttempt))
        statuses = (await session.scalars(select(Delivery.status))).all()
    assert statuses == ["sent"] * 5
    assert attempts == 5
    assert not [r for r in log_records.records if getattr(r, "event", "") == "outcome_lease_lost"]


async def test_an_idle_worker_sleeps_and_still_flushes_what_comes(runtime: Runtime) -> None:
    """With nothing to write, the flusher sleeps until a result comes (it woke every
    `flush_interval`, 100 times a second, for nothing); a delivery sent later is still
    recorded, and the worker stops at once."""
    worker = Worker.for_runtime(runtime, WorkerOptions(poll_seconds=0.05, flush_interval=0.01))
    wakes = 0
    flush = worker._flush

    async def counting() -> None:
        nonlocal wakes
        wakes += 1
        await flush()

    worker._flush = counting  # type: ignore[method-assign]
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    await asyncio.sleep(0.5)
    assert wakes == 0
    async with CaptureServer(Scripted(202, None, {"X-Message-Id": "sg-idle"})) as server:
        async with runtime.db.session() as session:
            change = await runtime.config.create_clinic(
                session, "clinic-idle", "Idle", sendgrid_settings(server.url)
            )
        await runtime.config.committed(change)
        await runtime.messaging.accept(email("idle@example.com", "clinic-idle"))
        for _ in range(200):
            async with runtime.db.read() as session:
                status = await session.scalar(select(Delivery.status))
            if status == "sent":
                break
            await asyncio.sleep(0.02)
    assert status == "sent" and 1 <= wakes <= 3
    stop.set()
    await asyncio.wait_for(task, 5)


@pytest.mark.postgres
async def test_a_worker_on_a_server_without_autovacuum_warns(
    runtime: Runtime, log_records: Any
) -> None:
    """Claims slow down as dead delivery rows pile up when nothing vacuums them (migration
    i20_0003): the worker says so at start, and only when the server's autovacuum is off."""
    async with runtime.db.read() as session:
        autovacuum = await session.scalar(text("SELECT current_setting('autovacuum')"))
    worker = Worker.for_runtime(runtime, WorkerOptions(poll_seconds=0.05))
    listener = await worker._listen()
    assert listener is not None
    await listener.close()
    warned = [r for r in log_records.records if getattr(r, "event", "") == "autovacuum_off"]
    assert len(warned) == (1 if autovacuum == "off" else 0)
