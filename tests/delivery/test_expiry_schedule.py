"""Expiry and scheduled sends end to end (real worker, database, provider stand-ins).

- An OTP with a 2 s TTL behind a WhatsApp provider that is down (503, Retry-After 1) ends
  `expired` at its expiry, with zero successful sends and no SMS fallback although the clinic
  falls back to SMS.
- A message scheduled 3 s ahead is not sent before then, and is sent within 1 s after.
- A cancelled scheduled message is never sent.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import SecretStr
from sqlalchemy import select

from clinicomm import SendRequest
from clinicomm.delivery.cancel import cancel_message
from clinicomm.delivery.stats import clinic_stats
from clinicomm.store.models import CallbackEvent, utcnow
from clinicomm.telemetry import metrics
from tests.delivery.test_channel_fallback import meta_slot, twilio_sms
from tests.delivery.test_workers import CountingSink
from tests.support.http_capture import CaptureServer, Scripted
from tests.support.pipeline import create_clinic, open_window, wait_terminal

PHONE = "+14155552671"
#: A platform callback target: every status change of these tests' deliveries is queued.
CALLBACKS = {
    "status_callback_url": "http://127.0.0.1:9/hook",
    "status_callback_secret": SecretStr("s" * 32),
}


def counter(family: Any, channel: str) -> float:
    return sum(
        s.value
        for f in family.collect()
        for s in f.samples
        if s.name.endswith("_total") and s.labels.get("channel") == channel
    )


async def callback_statuses(client: Any, delivery_ids: list[str]) -> list[str]:
    async with client._rt().db.read() as session:
        rows = await session.execute(
            select(CallbackEvent.status).where(CallbackEvent.delivery_id.in_(delivery_ids))
        )
        return sorted(r[0] for r in rows)


def sendgrid(sink: CaptureServer) -> dict[str, Any]:
    return {
        "email": {
            "primary": {
                "provider": "sendgrid",
                "credentials": {"apiKey": "SG.k", "fromEmail": "a@x.example", "baseUrl": sink.url},
            }
        }
    }


async def test_an_otp_behind_a_down_provider_expires_without_sms_fallback(make_client) -> None:
    async with CaptureServer() as meta, CaptureServer() as twilio:
        meta.default = Scripted(
            503, {"error": {"code": 2, "message": "Service unavailable"}}, {"Retry-After": "1"}
        )
        twilio.default = Scripted(201, {"sid": "SM" + "1" * 32, "status": "queued"})
        client = await make_client(**CALLBACKS)
        expired_before = counter(metrics.TOTAL_EXPIRED, "whatsapp")
        await create_clinic(
            client,
            "clinic-otp",
            {
                "whatsapp": {
                    "primary": meta_slot(meta),
                    "fallbackStrategy": {"fallbackProvider": "sms", "retryAttempts": 10},
                },
                "sms": {"primary": twilio_sms(twilio)},
            },
        )
        await open_window(client, "clinic-otp", PHONE)
        started = time.monotonic()
        accepted = await client.send(
            SendRequest.model_validate(
                {
                    "category": "OTP",
                    "body": "Your code is 482913.",
                    "recipients": [{"phone": PHONE}],
                    "channels": ["whatsapp"],
                    "ttlSeconds": 2,
                    "metadata": {"clinicId": "clinic-otp"},
                }
            )
        )
        assert accepted.priority is not None and accepted.priority.value == "urgent"
        assert accepted.expires_at is not None
        status = await wait_terminal(client, accepted.id, timeout=10)
        took = time.monotonic() - started
        (delivery,) = status["deliveries"]  # no SMS fallback delivery was created
        assert delivery["status"] == "expired"
        assert delivery["error"]["reason"].startswith("expired: not handed to a provider")
        assert delivery["expiresAt"] == accepted.expires_at
        assert delivery["priority"] == "urgent"
        assert delivery["attempts"] and all(a["outcome"] == "failed" for a in delivery["attempts"])
        assert status["status"] == "expired"
        assert twilio.requests == []  # zero sends by SMS
        assert 1.9 < took < 5.0  # it ended at its expiry, not before, not much after
        calls = len(meta.requests)
        await asyncio.sleep(1.5)
        assert len(meta.requests) == calls  # nothing more is tried once expired
        # The normal outcome path: metrics, stats, the status callback.
        assert counter(metrics.TOTAL_EXPIRED, "whatsapp") == expired_before + 1
        async with client._rt().db.read() as session:
            stats = await clinic_stats(
                session, "clinic-otp", utcnow() - timedelta(minutes=5), utcnow()
            )
        assert stats["byChannel"]["whatsapp"] == {"expired": 1}
        assert await callback_statuses(client, [delivery["id"]]) == ["expired"]


async def test_a_message_scheduled_3s_ahead_goes_out_then_and_not_before(make_client) -> None:
    async with CountingSink(delay=0.0) as sink:
        client = await make_client()
        await create_clinic(client, "clinic-s", sendgrid(sink))
        send_at = datetime.now(UTC) + timedelta(seconds=3)
        accepted = await client.send(
            SendRequest.model_validate(
                {
                    "body": "Your appointment is tomorrow at 10:30.",
                    "recipients": [{"email": "p@example.com"}],
                    "channels": ["email"],
                    "sendAt": send_at.isoformat(),
                    "metadata": {"clinicId": "clinic-s"},
                }
            )
        )
        assert accepted.send_at == send_at.isoformat()
        assert accepted.deliveries[0].not_before == send_at.isoformat()
        status = await client.get(accepted.id)
        assert status is not None
        (held,) = status["deliveries"]
        assert held["status"] == "queued" and held["notBefore"] is not None
        while sink.total == 0:
            assert datetime.now(UTC) < send_at + timedelta(seconds=5), "never sent"
            await asyncio.sleep(0.01)
        arrived = datetime.now(UTC)
    late = (arrived - send_at).total_seconds()
    print(f"\nscheduled send: reached its provider {late * 1000:.0f} ms after sendAt")
    assert arrived >= send_at
    assert late < 1.0


async def test_a_cancelled_scheduled_message_is_never_sent(make_client) -> None:
    async with CountingSink(delay=0.0) as sink:
        client = await make_client(**CALLBACKS)
        await create_clinic(client, "clinic-c", sendgrid(sink))
        send_at = datetime.now(UTC) + timedelta(seconds=1)
        accepted = await client.send(
            SendRequest.model_validate(
                {
                    "body": "Reminder.",
                    "recipients": [{"email": "p@example.com"}, {"email": "q@example.com"}],
                    "channels": ["email"],
                    "sendAt": send_at.isoformat(),
                    "metadata": {"clinicId": "clinic-c"},
                }
            )
        )
        rt = client._rt()
        async with rt.db.session() as session:
            cancelled = await cancel_message(session, accepted.id, now=utcnow())
        assert len(cancelled) == 2
        ids = [i for i, _ in cancelled]
        assert await callback_statuses(client, ids) == ["cancelled", "cancelled"]
        await asyncio.sleep(2.0)  # well past sendAt
        status = await client.get(accepted.id)
        assert status is not None
        assert [d["status"] for d in status["deliveries"]] == ["cancelled", "cancelled"]
        assert status["status"] == "cancelled"
        assert sink.total == 0
        again = await client.cancel(accepted.id)  # nothing left to cancel
        assert again is not None and again["status"] == "cancelled"
        assert await client.cancel("no-such-message") is None
