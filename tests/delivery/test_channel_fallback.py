"""Channel fallback (seed example 4): WhatsApp fails for provider reasons → the same number by SMS."""

from __future__ import annotations

from typing import Any

from clinicomm import SendRequest
from tests.support.http_capture import CaptureServer, Scripted
from tests.support.pipeline import create_clinic, open_window, wait_terminal
from tests.support.smtp_server import free_port


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


def fallback_clinic(meta: CaptureServer, twilio: CaptureServer, **whatsapp: Any) -> dict[str, Any]:
    return {
        "whatsapp": {
            "primary": meta_slot(meta),
            "fallbackStrategy": {"fallbackProvider": "sms", "retryAttempts": 0},
            **whatsapp,
        },
        "sms": {"primary": twilio_sms(twilio)},
    }


def twilio_wa(server: CaptureServer) -> dict[str, Any]:
    return {**twilio_sms(server), "provider": "twilio"}


async def test_every_whatsapp_provider_down_falls_back_to_sms(make_client) -> None:
    async with CaptureServer() as twilio:
        twilio.default = Scripted(201, {"sid": "SM" + "5" * 32, "status": "queued"})
        client = await make_client()
        dead = [
            {
                "provider": "meta_business",
                "credentials": {
                    "apiUrl": f"http://127.0.0.1:{free_port()}/v23.0",
                    "apiKey": "EAAx",
                    "phoneNumberId": str(n),
                },
            }
            for n in (1, 2)
        ]
        comm = {
            "whatsapp": {
                "primary": dead[0],
                "fallback": [dead[1]],
                "fallbackStrategy": {"fallbackProvider": "sms", "retryAttempts": 0},
            },
            "sms": {"primary": twilio_sms(twilio)},
        }
        await create_clinic(client, "clinic-dn", comm)
        await open_window(client, "clinic-dn", "+14155552671")
        status = await wait_terminal(client, (await client.send(wa_request("clinic-dn"))).id)
        wa, sms = sorted(status["deliveries"], key=lambda d: d["channel"] != "whatsapp")
        assert [a["errorClass"] for a in wa["attempts"]] == ["provider_down", "provider_down"]
        assert wa["error"]["fallbackReason"] == "providers_failed"
        assert sms["status"] == "sent" and sms["parentId"] == wa["id"]


async def test_not_on_whatsapp_131026_falls_back_to_sms(make_client) -> None:
    """Item 8 of issue 15: this used to fail `recipient` with no SMS (the patient got nothing
    though the clinic asked for SMS); now the number gets the SMS."""
    async with CaptureServer() as meta, CaptureServer() as twilio:
        meta.default = Scripted(
            400, {"error": {"code": 131026, "message": "Message undeliverable"}}
        )
        twilio.default = Scripted(201, {"sid": "SM" + "2" * 32, "status": "queued"})
        client = await make_client()
        await create_clinic(client, "clinic-wr", fallback_clinic(meta, twilio))
        await open_window(client, "clinic-wr", "+14155552671")
        accepted = await client.send(wa_request("clinic-wr"))
        status = await wait_terminal(client, accepted.id)
        wa, sms = sorted(status["deliveries"], key=lambda d: d["channel"] != "whatsapp")
        assert wa["status"] == "failed" and wa["provider"] == "clinic:meta_business"
        assert wa["error"]["reason"] == (
            "the recipient cannot be reached on this channel; falling back to sms"
        )
        assert wa["error"]["fallbackReason"] == "not_on_channel"
        assert [e["code"] for e in wa["error"]["errors"]] == ["131026"]
        assert sms["status"] == "sent" and sms["parentId"] == wa["id"]
        assert wa["error"]["fallbackId"] == sms["id"]
        (request,) = twilio.requests
        assert request.form()["To"] == "+14155552671"
        assert len(meta.requests) == 1


async def test_twilio_whatsapp_63003_falls_back_to_sms(make_client) -> None:
    async with CaptureServer() as twilio_wa_server, CaptureServer() as twilio:
        twilio_wa_server.default = Scripted(
            400, {"code": 63003, "message": "Channel could not find To address", "status": 400}
        )
        twilio.default = Scripted(201, {"sid": "SM" + "3" * 32, "status": "queued"})
        client = await make_client()
        comm = {
            "whatsapp": {
                "primary": twilio_wa(twilio_wa_server),
                "fallbackStrategy": {"fallbackProvider": "sms", "retryAttempts": 0},
            },
            "sms": {"primary": twilio_sms(twilio)},
        }
        await create_clinic(client, "clinic-tw", comm)
        await open_window(client, "clinic-tw", "+14155552671")
        status = await wait_terminal(client, (await client.send(wa_request("clinic-tw"))).id)
        wa, sms = sorted(status["deliveries"], key=lambda d: d["channel"] != "whatsapp")
        assert wa["error"]["fallbackReason"] == "not_on_channel"
        assert sms["status"] == "sent" and sms["parentId"] == wa["id"]


async def test_window_closed_without_template_falls_back_to_sms(make_client) -> None:
    async with CaptureServer() as meta, CaptureServer() as twilio:
        twilio.default = Scripted(201, {"sid": "SM" + "4" * 32, "status": "queued"})
        client = await make_client()
        await create_clinic(client, "clinic-wc", fallback_clinic(meta, twilio))
        # The patient never wrote: the window is closed, and no template is mapped.
        status = await wait_terminal(client, (await client.send(wa_request("clinic-wc"))).id)
        wa, sms = sorted(status["deliveries"], key=lambda d: d["channel"] != "whatsapp")
        assert wa["status"] == "failed"
        assert wa["error"]["reason"] == "template required; falling back to sms"
        assert wa["error"]["fallbackReason"] == "template_required"
        assert sms["status"] == "sent" and sms["parentId"] == wa["id"]
        assert meta.requests == []  # no WhatsApp call at all
        assert twilio.requests[0].form()["Body"] == "Your appointment is at 10:30."


async def test_window_closed_without_fallback_still_fails_template_required(make_client) -> None:
    async with CaptureServer() as meta:
        client = await make_client()
        await create_clinic(client, "clinic-wn", {"whatsapp": {"primary": meta_slot(meta)}})
        status = await wait_terminal(client, (await client.send(wa_request("clinic-wn"))).id)
        (wa,) = status["deliveries"]
        assert wa["status"] == "failed" and wa["error"]["reason"] == "template required"
        assert meta.requests == []


async def test_opted_out_of_whatsapp_is_suppressed_and_gets_no_sms(make_client) -> None:
    async with CaptureServer() as meta, CaptureServer() as twilio:
        client = await make_client()
        await create_clinic(client, "clinic-oo", fallback_clinic(meta, twilio))
        await open_window(client, "clinic-oo", "+14155552671")
        await opt_out(client, "clinic-oo", "whatsapp", "+14155552671")
        status = await wait_terminal(client, (await client.send(wa_request("clinic-oo"))).id)
        (wa,) = status["deliveries"]
        assert wa["status"] == "suppressed"
        assert meta.requests == [] and twilio.requests == []


async def test_sms_opt_out_suppresses_the_fallback_sms_too(make_client) -> None:
    async with CaptureServer() as meta, CaptureServer() as twilio:
        meta.default = Scripted(
            400, {"error": {"code": 131026, "message": "Message undeliverable"}}
        )
        client = await make_client()
        await create_clinic(client, "clinic-so", fallback_clinic(meta, twilio))
        await open_window(client, "clinic-so", "+14155552671")
        await opt_out(client, "clinic-so", "sms", "+14155552671")
        status = await wait_terminal(client, (await client.send(wa_request("clinic-so"))).id)
        wa, sms = sorted(status["deliveries"], key=lambda d: d["channel"] != "whatsapp")
        assert wa["status"] == "failed" and sms["status"] == "suppressed"
        assert twilio.requests == []


async def test_compliance_block_on_whatsapp_does_not_fall_back(make_client) -> None:
    async with CaptureServer() as meta, CaptureServer() as twilio:
        # The provider says the window is closed (our record said open): a compliance block.
        meta.default = Scripted(
            400, {"error": {"code": 131047, "message": "Re-engagement message"}}
        )
        client = await make_client()
        await create_clinic(client, "clinic-cb", fallback_clinic(meta, twilio))
        await open_window(client, "clinic-cb", "+14155552671")
        status = await wait_terminal(client, (await client.send(wa_request("clinic-cb"))).id)
        (wa,) = status["deliveries"]
        assert wa["status"] == "failed" and wa["error"]["reason"] == "compliance"
        assert twilio.requests == []


async def test_other_recipient_error_on_whatsapp_does_not_fall_back(make_client) -> None:
    async with CaptureServer() as twilio_wa_server, CaptureServer() as twilio:
        twilio_wa_server.default = Scripted(
            400, {"code": 21211, "message": "Invalid 'To' Phone Number", "status": 400}
        )
        client = await make_client()
        comm = {
            "whatsapp": {
                "primary": twilio_wa(twilio_wa_server),
                "fallbackStrategy": {"fallbackProvider": "sms", "retryAttempts": 0},
            },
            "sms": {"primary": twilio_sms(twilio)},
        }
        await create_clinic(client, "clinic-re", comm)
        await open_window(client, "clinic-re", "+14155552671")
        status = await wait_terminal(client, (await client.send(wa_request("clinic-re"))).id)
        (wa,) = status["deliveries"]
        assert wa["status"] == "failed" and wa["error"]["reason"] == "recipient"
        assert twilio.requests == []


async def test_sms_providers_down_fall_back_to_whatsapp(make_client) -> None:
    async with CaptureServer() as meta, CaptureServer() as twilio:
        twilio.default = Scripted(500, {"code": 20500, "message": "Internal error"})
        meta.default = Scripted(200, {"messages": [{"id": "wamid.F"}]})
        client = await make_client()
        comm = {
            "sms": {
                "primary": twilio_sms(twilio),
                "fallbackStrategy": {"fallbackProvider": "whatsapp", "retryAttempts": 0},
            },
            "whatsapp": {"primary": meta_slot(meta)},
        }
        await create_clinic(client, "clinic-sw", comm)
        await open_window(client, "clinic-sw", "+14155552671")
        request = SendRequest.model_validate(
            {
                "body": "Your appointment is at 10:30.",
                "recipients": [{"phone": "+14155552671"}],
                "channels": ["sms"],
                "metadata": {"clinicId": "clinic-sw"},
            }
        )
        status = await wait_terminal(client, (await client.send(request)).id)
        sms, wa = sorted(status["deliveries"], key=lambda d: d["channel"] != "sms")
        assert sms["status"] == "failed"
        assert sms["error"]["reason"] == "every provider failed; falling back to whatsapp"
        assert sms["error"]["fallbackReason"] == "providers_failed"
        assert wa["status"] == "sent" and wa["parentId"] == sms["id"]


async def opt_out(client: Any, clinic: str, channel: str, phone: str) -> None:
    from clinicomm.delivery.suppressions import SuppressionReason, suppress

    rt = client._rt()
    index = await rt.keys.index_for(rt.db, clinic, phone)  # opt-outs are keyed by blind index
    async with rt.db.session() as session:
        await suppress(session, clinic, channel, index, SuppressionReason.STOP, "test")


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


def email_to_sms_clinic(sendgrid: CaptureServer, twilio: CaptureServer) -> dict[str, Any]:
    return {
        "email": {
            "primary": {
                "provider": "sendgrid",
                "credentials": {
                    "apiKey": "SG.test",
                    "fromEmail": "hello@clinic.example",
                    "baseUrl": sendgrid.url,
                },
            },
            "fallbackStrategy": {"fallbackProvider": "sms", "retryAttempts": 0},
        },
        "sms": {"primary": twilio_sms(twilio)},
    }


def email_request(clinic: str, **recipient: str) -> SendRequest:
    return SendRequest.model_validate(
        {
            "title": "Appointment",
            "body": "Your appointment is at 10:30.",
            "recipients": [{"email": "patient@example.com", **recipient}],
            "channels": ["email"],
            "metadata": {"clinicId": clinic},
        }
    )


async def test_email_providers_down_fall_back_to_sms_at_the_recipients_phone(make_client) -> None:
    async with CaptureServer() as sendgrid, CaptureServer() as twilio:
        sendgrid.default = Scripted(503, {"errors": [{"message": "unavailable"}]})
        twilio.default = Scripted(201, {"sid": "SM" + "6" * 32, "status": "queued"})
        client = await make_client()
        await create_clinic(client, "clinic-es", email_to_sms_clinic(sendgrid, twilio))
        accepted = await client.send(email_request("clinic-es", phone="+14155552671"))
        status = await wait_terminal(client, accepted.id)
        email, sms = sorted(status["deliveries"], key=lambda d: d["channel"] != "email")
        assert email["status"] == "failed"
        assert email["error"]["reason"] == "every provider failed; falling back to sms"
        assert email["error"]["fallbackReason"] == "providers_failed"
        assert sms["status"] == "sent" and sms["parentId"] == email["id"]
        assert sms["recipient"] == "+14155552671"
        (request,) = twilio.requests
        assert request.form()["To"] == "+14155552671"


async def test_email_fallback_to_sms_without_a_phone_fails_with_the_reason(make_client) -> None:
    async with CaptureServer() as sendgrid, CaptureServer() as twilio:
        sendgrid.default = Scripted(503, {"errors": [{"message": "unavailable"}]})
        client = await make_client()
        await create_clinic(client, "clinic-en", email_to_sms_clinic(sendgrid, twilio))
        status = await wait_terminal(client, (await client.send(email_request("clinic-en"))).id)
        (email,) = status["deliveries"]
        assert email["status"] == "failed"
        assert email["error"]["reason"] == (
            "every provider failed; no sms address for the channel fallback"
        )
        assert twilio.requests == []
