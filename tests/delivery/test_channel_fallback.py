"""Channel fallback (seed example 4): WhatsApp fails for provider reasons → the same number by SMS."""

from __future__ import annotations

from typing import Any

from clinicomm import SendRequest
from tests.support.http_capture import CaptureServer, Scripted
from tests.support.pipeline import create_clinic, open_window, wait_terminal


def meta_slot(server: CaptureServer) -> dict[str, Any]:
    return {
        "provider": "meta_business",
        "credentials": {"apiUrl": f"{server.url}/v23.0", "apiKey": "EAAx", "phoneNumberId": "1234"},
    }


def twilio_sms(server: CaptureServer) -> dict[str, Any]:
    return {
        "provider": "twilio",
        "credentials": {
            "accountSid": "AC" + "0" * 32,
            "authToken": "tok",
            "fromNumber": "+14155550000",
            "baseUrl": server.url,
        },
    }


def wa_request(clinic: str) -> SendRequest:
    return SendRequest.model_validate(
        {
            "category": "APPOINTMENT",
            "body": "Your appointment is at 10:30.",
            "recipients": [{"phone": "+14155552671"}],
            "channels": ["whatsapp"],
            "metadata": {"clinicId": clinic},
        }
    )


async def test_whatsapp_failing_falls_back_to_sms(make_client) -> None:
    async with CaptureServer() as meta_a, CaptureServer() as meta_b, CaptureServer() as twilio:
        meta_a.default = Scripted(500, {"error": {"code": 2, "message": "Service unavailable"}})
        meta_b.default = Scripted(500, {"error": {"code": 2, "message": "Service unavailable"}})
        twilio.default = Scripted(201, {"sid": "SM" + "1" * 32, "status": "queued"})
        client = await make_client()
        await create_clinic(
            client,
            "clinic-wa",
            {
                "whatsapp": {
                    "primary": meta_slot(meta_a),
                    "fallback": [meta_slot(meta_b)],
                    "fallbackStrategy": {
                        "enabled": True,
                        "fallbackProvider": "sms",
                        "retryAttempts": 0,
                    },
                },
                "sms": {"primary": twilio_sms(twilio)},
            },
        )
        await open_window(client, "clinic-wa", "+14155552671")
        accepted = await client.send(wa_request("clinic-wa"))
        status = await wait_terminal(client, accepted.id)
        wa, sms = sorted(status["deliveries"], key=lambda d: d["channel"] != "whatsapp")
        assert wa["channel"] == "whatsapp" and wa["status"] == "failed"
        assert wa["error"]["reason"] == "every provider failed; falling back to sms"
        assert [e["provider"] for e in wa["error"]["errors"]] == [
            "clinic:meta_business",
            "clinic:meta_business#2",
        ]
        assert sms["channel"] == "sms" and sms["status"] == "sent"
        assert sms["parentId"] == wa["id"] and wa["error"]["fallbackId"] == sms["id"]
        assert sms["recipient"] == "+14155552671"
        (request,) = twilio.requests
        assert request.form()["To"] == "+14155552671"
        assert len(meta_a.requests) == 1 and len(meta_b.requests) == 1


async def test_recipient_error_on_whatsapp_does_not_fall_back(make_client) -> None:
    async with CaptureServer() as meta, CaptureServer() as twilio:
        meta.default = Scripted(
            400, {"error": {"code": 131026, "message": "Message undeliverable"}}
        )
        client = await make_client()
        await create_clinic(
            client,
            "clinic-wr",
            {
                "whatsapp": {
                    "primary": meta_slot(meta),
                    "fallbackStrategy": {"fallbackProvider": "sms", "retryAttempts": 0},
                },
                "sms": {"primary": twilio_sms(twilio)},
            },
        )
        await open_window(client, "clinic-wr", "+14155552671")
        accepted = await client.send(wa_request("clinic-wr"))
        status = await wait_terminal(client, accepted.id)
        (wa,) = status["deliveries"]
        assert wa["status"] == "failed" and wa["error"]["reason"] == "recipient"
        assert twilio.requests == []


async def test_sms_over_the_clinic_segment_cap_fails_before_any_call(make_client) -> None:
    async with CaptureServer() as twilio:
        client = await make_client()
        await create_clinic(
            client, "clinic-seg", {"sms": {"primary": twilio_sms(twilio), "maxSegments": 1}}
        )
        request = SendRequest.model_validate(
            {
                "body": "x" * 161,
                "recipients": [{"phone": "+14155552671"}],
                "channels": ["sms"],
                "metadata": {"clinicId": "clinic-seg"},
            }
        )
        accepted = await client.send(request)
        status = await wait_terminal(client, accepted.id)
        (sms,) = status["deliveries"]
        assert sms["status"] == "failed"
        assert sms["error"]["reason"] == "SMS body needs 2 GSM-7 segments; the clinic allows 1"
        assert twilio.requests == []
