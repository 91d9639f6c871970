"""Fairness: one clinic's backlog must not hold back another clinic's message.

3,000 of one clinic are queued before the worker starts; the other clinic's message must
reach its provider within 1 s with more than 1,000 of them still waiting. Claims take rows in
per-clinic fair order through an index, so the backlog's size does not enter that wait (it
used to queue 10,000).
"""

from __future__ import annotations

import asyncio
import time

from clinicomm import Client, SendRequest
from clinicomm.client import worker_options
from clinicomm.config import Settings
from clinicomm.delivery.worker import Worker
from tests.delivery.test_workers import CountingSink
from tests.support.pipeline import create_clinic, fast

BACKLOG = 3000  # 40 concurrent bursts of 75


def email(clinic: str, n: int) -> SendRequest:
    return SendRequest.model_validate(
        {
            "body": "See you soon.",
            "recipients": [{"email": f"p{n}@example.com"}],
            "channels": ["email"],
            "metadata": {"clinicId": clinic},
        }
    )


async def test_a_queued_backlog_of_3000_does_not_hold_back_another_clinic(
    settings: Settings,
) -> None:
    async with CountingSink(delay=0.0) as sink_a, CountingSink(delay=0.0) as sink_b:
        client = Client(fast(settings), run_worker=False, env={})
        await client.start()
        stop = asyncio.Event()
        task = None
        try:
            for clinic, sink in (("clinic-big", sink_a), ("clinic-one", sink_b)):
                await create_clinic(
                    client,
                    clinic,
                    {
                        "email": {
                            "primary": {
                                "provider": "sendgrid",
                                "credentials": {
                                    "apiKey": "SG.k",
                                    "fromEmail": "a@x.example",
                                    "baseUrl": sink.url,
                                },
                            }
                        }
                    },
                )

            async def burst(k: int) -> None:
                for i in range(BACKLOG // 40):
                    await client.send(email("clinic-big", k * 1000 + i))

            started = time.monotonic()
            await asyncio.gather(*(burst(k) for k in range(40)))  # BACKLOG queued, no worker yet
            accepted_in = time.monotonic() - started
            task = asyncio.create_task(
                Worker.for_runtime(client._rt(), worker_options(client.settings)).run(stop)
            )
            # The worker is busy with clinic-big's backlog. (A fixed 0.2 s sleep here let a
            # fast worker send 2,000 of the 3,000 before clinic-one's message was accepted.)
            busy_by = time.monotonic() + 10
            while sink_a.total == 0:
                assert time.monotonic() < busy_by, "the worker sent nothing"
                await asyncio.sleep(0.005)
            t0 = time.monotonic()
            await client.send(email("clinic-one", 0))
            while sink_b.total == 0:
                assert time.monotonic() - t0 < 10, "clinic-one's message never went out"
                await asyncio.sleep(0.005)
            latency = time.monotonic() - t0
            backlog = BACKLOG - sink_a.total
        finally:
            stop.set()
            if task is not None:
                await task
            await client.close()
    backend = "PostgreSQL" if settings.database_url.startswith("postgresql") else "SQLite"
    print(
        f"\nfairness ({backend}): {BACKLOG} of clinic-big queued in {accepted_in:.1f}s; clinic-one's "
        f"message reached its provider {latency * 1000:.0f} ms after acceptance, "
        f"{backlog} of clinic-big's still waiting"
    )
    assert backlog > 1000  # the backlog was really there
    assert latency < 1.0
