"""Fixtures for monitoring tests: a runtime with a worker and the HTTP app on it, and a
provider sink that answers like SendGrid, Meta WhatsApp and Twilio."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from clinicomm.api.app import create_app
from clinicomm.api.auth import Role, TokenVerifier
from clinicomm.config import Settings
from clinicomm.delivery.worker import Worker
from clinicomm.messaging.models import SendRequest
from clinicomm.runtime import Runtime
from tests.api.conftest import recording_client
from tests.conftest import canary
from tests.support.http_capture import CapturedRequest, CaptureServer, Scripted
from tests.support.pipeline import TERMINAL, fast


class ProviderSink(CaptureServer):
    """Answers SendGrid (`/v3/mail/send`, `/v3/scopes`), Meta (`/…/messages`) and Twilio
    (`/2010-04-01/…/Messages.json`) calls; `fail` makes sends answer 500 (probes too), and
    `fail_every=n` fails every n-th send."""

    def __init__(self) -> None:
        super().__init__()
        self.fail = False
        self.fail_every = 0
        self.sends = 0
        self.send_times: list[float] = []
        self.handler = self._answer

    async def _answer(self, request: CapturedRequest) -> Scripted:
        if request.method == "GET":
            if self.fail:
                return Scripted(500, {"errors": [{"message": "down"}]})
            return Scripted(200, {"scopes": ["mail.send"]})
        # A SendGrid request may carry several deliveries (personalizations, issue 20):
        # each counts as a send.
        body = request.json() if request.path.endswith("/mail/send") else None
        count = len(body.get("personalizations") or [1]) if isinstance(body, dict) else 1
        self.sends += count
        self.send_times.extend([time.monotonic()] * count)
        if self.fail or (self.fail_every and self.sends % self.fail_every == 0):
            return Scripted(500, {"errors": [{"message": "internal error"}]})
        if request.path.endswith("/messages"):
            return Scripted(200, {"messages": [{"id": f"wamid.{self.sends}"}]})
        if request.path.endswith("Messages.json"):
            return Scripted(201, {"sid": f"SM{self.sends:032d}", "status": "queued"})
        return Scripted(202, None, {"X-Message-Id": f"sg-{self.sends}"})


def sendgrid(sink: CaptureServer, label: str, **extra: Any) -> dict[str, Any]:
    return {
        "provider": "sendgrid",
        "credentials": {
            "apiKey": canary(f"sg-{label}"),
            "fromEmail": "clinic@clinic.example",
            "baseUrl": sink.url,
            **extra,
        },
    }


def email_settings(*slots: dict[str, Any], **extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "primary": slots[0],
        "fallback": list(slots[1:]),
        "fallbackStrategy": {"retryAttempts": 0},
    }
    doc.update(extra)
    return doc


def email_request(clinic_id: str, to: str = "patient@example.com") -> SendRequest:
    return SendRequest.model_validate(
        {
            "title": "Reminder",
            "body": "See you soon.",
            "recipients": [{"email": to}],
            "channels": ["email"],
            "metadata": {"clinicId": clinic_id},
        }
    )


@dataclass
class Mon:
    """A runtime with an in-process worker and the HTTP app on it."""

    runtime: Runtime
    client: httpx.AsyncClient
    verifier: TokenVerifier
    settings: Settings
    extras: dict[str, Any] = field(default_factory=dict)

    def auth(self, role: Role | str, clinic: str | None = None) -> dict[str, str]:
        token = self.verifier.issue(Role(role), sub="tester", clinic_id=clinic, ttl=600)
        return {"Authorization": f"Bearer {token}"}

    @property
    def admin(self) -> dict[str, str]:
        return self.auth(Role.SUPER_ADMIN)

    async def create_clinic(self, clinic_id: str, comm: dict[str, Any]) -> None:
        rt = self.runtime
        async with rt.db.session() as session:
            change = await rt.config.create_clinic(
                session, clinic_id, clinic_id, {"communicationSettings": comm}
            )
        await rt.config.committed(change)

    async def replace(self, clinic_id: str, comm: dict[str, Any]) -> None:
        rt = self.runtime
        async with rt.db.session() as session:
            change = await rt.config.replace_settings(
                session, clinic_id, {"communicationSettings": comm}
            )
        await rt.config.committed(change)

    async def send_and_wait(self, request: SendRequest, count: int = 1) -> list[str]:
        """Accept `count` copies one after another (each sent before the next), so the
        outcomes reach health in order; returns the final statuses."""
        statuses = []
        for _ in range(count):
            accepted = await self.runtime.messaging.accept(request)
            statuses.append(await self.wait(accepted.id))
        return statuses

    async def wait(self, message_id: str, timeout: float = 10) -> str:
        from clinicomm.delivery.status import get_message

        deadline = time.monotonic() + timeout
        while True:
            async with self.runtime.db.read() as session:
                status = await get_message(session, message_id, None)
            assert status is not None
            states = [d["status"] for d in status["deliveries"]]
            if all(s in TERMINAL for s in states):
                return str(states[0])
            assert time.monotonic() < deadline, f"not terminal: {status}"
            await asyncio.sleep(0.02)


@pytest.fixture
async def make_mon(settings: Settings) -> AsyncIterator[Callable[..., Any]]:
    made: list[tuple[Runtime, asyncio.Event, asyncio.Task[None], httpx.AsyncClient, Any]] = []

    async def factory(**extra: Any) -> Mon:
        from clinicomm.client import worker_options

        mon_settings = fast(settings, **extra)
        runtime = await Runtime.create(mon_settings, env={})
        stop = asyncio.Event()
        task = asyncio.create_task(
            Worker.for_runtime(runtime, worker_options(mon_settings)).run(stop)
        )
        app = create_app(mon_settings, runtime)
        lifespan = app.router.lifespan_context(app)
        await lifespan.__aenter__()
        client = recording_client(app)
        made.append((runtime, stop, task, client, lifespan))
        return Mon(runtime, client, app.state.verifier, mon_settings)

    yield factory
    for runtime, stop, task, client, lifespan in made:
        stop.set()
        await task
        await client.aclose()
        await lifespan.__aexit__(None, None, None)
        await runtime.close()
