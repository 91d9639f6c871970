"""Helpers for end-to-end delivery tests: clinics, waiting for terminal states."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from clinicomm import Client
from clinicomm.config import Settings

TERMINAL = {"sent", "delivered", "read", "failed", "bounced", "suppressed", "expired", "cancelled"}


def fast(settings: Settings, **extra: Any) -> Settings:
    return settings.model_copy(update={"worker_poll_seconds": 0.05, **extra})


async def create_clinic(client: Client, clinic_id: str, comm: dict[str, Any]) -> None:
    rt = client._rt()
    async with rt.db.session() as session:
        change = await rt.config.create_clinic(
            session, clinic_id, clinic_id, {"communicationSettings": comm}
        )
    await rt.config.committed(change)


async def open_window(client: Client, clinic_id: str, phone: str) -> None:
    """The patient wrote on WhatsApp a minute ago: free-form text is allowed (24-hour window)."""
    from datetime import UTC, datetime, timedelta

    from clinicomm.delivery.window import record_inbound

    rt = client._rt()
    async with rt.db.session() as session:
        at = datetime.now(UTC) - timedelta(minutes=1)
        index = await rt.keys.index_for(rt.db, clinic_id, phone)
        await record_inbound(session, clinic_id, "whatsapp", index, at)


async def wait_terminal(client: Client, message_id: str, timeout: float = 15) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        status = await client.get(message_id)
        assert status is not None
        if all(d["status"] in TERMINAL for d in status["deliveries"]):
            return status
        if time.monotonic() > deadline:
            raise AssertionError(f"not terminal in {timeout}s: {status}")
        await asyncio.sleep(0.05)
