"""Providers that fail for a while, or hang: failover, recovery through the half-open probe,
and other clinics unaffected. Every accepted message ends terminal; none is lost."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from clinicomm import SendRequest
from tests.support.http_capture import CapturedRequest, CaptureServer, Scripted
from tests.support.pipeline import create_clinic, wait_terminal

pytestmark = [pytest.mark.fault]


def sendgrid(server: CaptureServer) -> dict[str, Any]:
    return {
        "provider": "sendgrid",
        "credentials": {"apiKey": "SG.k", "fromEmail": "a@x.example", "baseUrl": server.url},
    }


def request(clinic: str, n: int) -> SendRequest:
    return SendRequest.model_validate(
        {
            "title": "Reminder",
            "body": "See you soon.",
            "recipients": [{"email": f"p{n}@example.com"}],
            "channels": ["email"],
            "metadata": {"clinicId": clinic},
        }
    )


class Switchable(CaptureServer):
    """Answers 500 while `failing`, 202 otherwise."""

    def __init__(self) -> None:
        super().__init__()
        self.failing = True
        self.handler = self._answer

    def _answer(self, _request: CapturedRequest) -> Scripted:
        if self.failing:
            return Scripted(500, {"errors": [{"message": "down"}]})
        return Scripted(202, None, {"X-Message-Id": "ok"})


async def test_outage_fails_over_then_returns_to_the_primary(make_client) -> None:
    async with (
        Switchable() as primary,
        CaptureServer(Scripted(202, None, {"X-Message-Id": "fb"})) as fallback,
    ):
        client = await make_client(
            health_min_samples=5,
            health_window_seconds=30,
            health_bucket_seconds=1,
            health_cool_down_seconds=1.0,
            health_half_open_probes=1,
        )
        await create_clinic(
            client,
            "clinic-o",
            {
                "email": {
                    "primary": sendgrid(primary),
                    "fallback": [sendgrid(fallback)],
                    "fallbackStrategy": {"retryAttempts": 0},
                }
            },
        )
        outage = [await client.send(request("clinic-o", i)) for i in range(20)]
        for accepted in outage:
            status = await wait_terminal(client, accepted.id)
            assert status["deliveries"][0]["status"] == "sent"
            assert status["deliveries"][0]["provider"] == "clinic:sendgrid#2"
        # After 5 failures the circuit opened: the primary stopped getting traffic.
        assert len(primary.requests) < 20
        skipped = len(outage) - len(primary.requests)
        primary.failing = False
        await asyncio.sleep(1.2)  # the cool-down
        providers = []
        # One at a time: a send accepted while the half-open probe is still in flight goes to
        # the fallback, and how many do depends only on how fast the pipeline is.
        for i in range(5):
            accepted = await client.send(request("clinic-o", 100 + i))
            status = await wait_terminal(client, accepted.id)
            providers.append(status["deliveries"][0]["provider"])
        # The half-open probe succeeded: traffic is back on the primary.
        assert providers[-1] == "clinic:sendgrid"
        print(
            f"\noutage: {skipped} of 20 sends skipped the open circuit; after recovery {providers}"
        )


async def test_a_hanging_provider_does_not_slow_other_clinics(make_client) -> None:
    async with (
        CaptureServer(Scripted(202, None, {}, delay=4)) as hanging,
        CaptureServer(Scripted(202, None, {"X-Message-Id": "b"})) as healthy,
    ):
        client = await make_client(provider_timeout_seconds=1.0)
        await create_clinic(
            client,
            "clinic-hang",
            {
                "email": {
                    "primary": sendgrid(hanging),
                    "fallbackStrategy": {"enabled": False, "retryAttempts": 0},
                }
            },
        )
        await create_clinic(client, "clinic-fine", {"email": {"primary": sendgrid(healthy)}})
        stuck = [await client.send(request("clinic-hang", i)) for i in range(50)]
        started = time.monotonic()
        fine = [await client.send(request("clinic-fine", i)) for i in range(50)]
        for accepted in fine:
            status = await wait_terminal(client, accepted.id)
            assert status["deliveries"][0]["status"] == "sent"
        fine_elapsed = time.monotonic() - started
        assert fine_elapsed < 3.0, f"healthy clinic took {fine_elapsed:.2f}s"
        for accepted in stuck:
            status = await wait_terminal(client, accepted.id, timeout=30)
            delivery = status["deliveries"][0]
            assert delivery["status"] == "failed"
            assert delivery["error"]["errors"][0]["class"] == "transient"
        print(
            f"\nhealthy clinic: 50 sent in {fine_elapsed:.2f}s while the other clinic's provider hung"
        )
