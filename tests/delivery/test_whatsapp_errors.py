"""Issue 6 end to end: each WhatsApp error code, from a real HTTP answer of a local server
speaking Meta's Cloud API or Twilio's API, and the pipeline's reaction (retry, delay one
recipient, fail without failover, fail over).

Each clinic has a second number of the same provider as fallback and SMS as channel fallback,
so "no failover" and "no channel fallback" are both checked against servers that saw nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import pytest

from clinicomm import SendRequest
from tests.support import pipeline
from tests.support.http_capture import CapturedRequest, CaptureServer, Scripted
from tests.support.pipeline import TERMINAL, open_window, wait_terminal

FAST_RETRY = {"retry_base_seconds": 0.05}
PATIENT = "+14155552671"
OTHER_PATIENT = "+14155552672"
TWILIO_SID = "AC" + "0" * 32

META_OK = Scripted(
    200,
    {
        "messaging_product": "whatsapp",
        "contacts": [{"input": PATIENT, "wa_id": PATIENT[1:]}],
        "messages": [{"id": "wamid.HBgLMTQxNTU1NTI2NzEVAgARGBI"}],
    },
)
TWILIO_OK = Scripted(201, {"sid": "SM" + "1" * 32, "status": "queued", "error_code": None})


async def create_clinic(client: Any, clinic_id: str, comm_settings: dict[str, Any]) -> None:
    """The clinic, with both patients' WhatsApp windows open (they wrote a minute ago), so
    free-form text reaches the provider and the provider's own answer is what is tested."""
    await pipeline.create_clinic(client, clinic_id, comm_settings)
    for phone in (PATIENT, OTHER_PATIENT):
        await open_window(client, clinic_id, phone)


def meta_error(code: int, status: int = 400, message: str = "error") -> Scripted:
    return Scripted(
        status,
        {"error": {"message": message, "type": "OAuthException", "code": code, "fbtrace_id": "A1"}},
    )


def twilio_error(code: int, status: int = 400) -> Scripted:
    return Scripted(
        status,
        {
            "code": code,
            "message": "refused",
            "more_info": f"https://www.twilio.com/docs/errors/{code}",
            "status": status,
        },
    )


def meta_slot(server: CaptureServer) -> dict[str, Any]:
    return {
        "provider": "meta_business",
        "credentials": {"apiUrl": f"{server.url}/v23.0", "apiKey": "EAAx", "phoneNumberId": "1234"},
    }


def twilio_slot(server: CaptureServer, number: str = "+14155550000") -> dict[str, Any]:
    return {
        "provider": "twilio",
        "credentials": {
            "accountSid": TWILIO_SID,
            "authToken": "tok",
            "fromNumber": number,
            "baseUrl": server.url,
        },
    }


def comm(
    primary: dict[str, Any], fallback: dict[str, Any], sms: CaptureServer, retries: int = 1
) -> dict[str, Any]:
    return {
        "whatsapp": {
            "primary": primary,
            "fallback": [fallback],
            "fallbackStrategy": {"fallbackProvider": "sms", "retryAttempts": retries},
        },
        "sms": {"primary": twilio_slot(sms, "+14155550009")},
    }


def wa_request(clinic: str, *phones: str) -> SendRequest:
    return SendRequest.model_validate(
        {
            "category": "APPOINTMENT",
            "body": "Your appointment is at 10:30.",
            "recipients": [{"phone": p} for p in phones or (PATIENT,)],
            "channels": ["whatsapp"],
            "metadata": {"clinicId": clinic},
        }
    )


def attempts(delivery: dict[str, Any]) -> list[tuple[str, str, str | None, str | None]]:
    return [
        (a["provider"], a["outcome"], a["errorClass"], a["errorCode"])
        for a in delivery["attempts"]
    ]


class Servers:
    """Primary and fallback provider servers plus the SMS server of the channel fallback."""

    def __init__(self, ok: Scripted) -> None:
        self.primary = CaptureServer(ok)
        self.fallback = CaptureServer(ok)
        self.sms = CaptureServer(TWILIO_OK)

    async def __aenter__(self) -> Servers:
        for server in (self.primary, self.fallback, self.sms):
            await server.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        for server in (self.primary, self.fallback, self.sms):
            await server.__aexit__(*exc)


async def run_one(
    make_client: Callable[..., Any], clinic: str, settings: dict[str, Any]
) -> dict[str, Any]:
    client = await make_client(**FAST_RETRY)
    await create_clinic(client, clinic, settings)
    accepted = await client.send(wa_request(clinic))
    return await wait_terminal(client, accepted.id)


def assert_failed_alone(status: dict[str, Any], servers: Servers, reason: str) -> None:
    """One failed WhatsApp delivery, one call; no failover, no channel fallback."""
    (delivery,) = status["deliveries"]
    assert delivery["status"] == "failed" and delivery["error"]["reason"] == reason
    assert len(servers.primary.requests) == 1
    assert servers.fallback.requests == [] and servers.sms.requests == []


# --- Meta ------------------------------------------------------------------------------------


def meta_comm(s: Servers, retries: int = 1) -> dict[str, Any]:
    return comm(meta_slot(s.primary), meta_slot(s.fallback), s.sms, retries)


async def test_meta_130429_is_retried_on_the_same_number(make_client: Callable[..., Any]) -> None:
    async with Servers(META_OK) as s:
        s.primary.respond(400, meta_error(130429, message="Rate limit hit").body)
        status = await run_one(make_client, "clinic-m130429", meta_comm(s))
        (delivery,) = status["deliveries"]
        assert delivery["status"] == "sent" and delivery["provider"] == "clinic:meta_business"
        assert attempts(delivery) == [
            ("clinic:meta_business", "failed", "rate_limited", "130429"),
            ("clinic:meta_business", "sent", None, None),
        ]
        assert len(s.primary.requests) == 2 and s.fallback.requests == []


# With no retries left the pair limit must still only wait: the number is fine, so failing
# over (or failing) would be wrong (PROVIDER-FACTS §8 item 9).
@pytest.mark.parametrize("retries", [0, 1])
async def test_meta_131056_delays_only_that_recipient(
    make_client: Callable[..., Any], retries: int
) -> None:
    async with Servers(META_OK) as s:

        def answer(request: CapturedRequest) -> Scripted:
            if request.json()["to"].endswith(PATIENT[1:]):
                return meta_error(131056, message="pair rate limit hit")
            return META_OK

        s.primary.handler = answer
        client = await make_client(**FAST_RETRY)
        await create_clinic(client, "clinic-m131056", meta_comm(s, retries))
        accepted = await client.send(wa_request("clinic-m131056", PATIENT, OTHER_PATIENT))
        deadline = datetime.now().astimezone() + timedelta(seconds=10)
        while True:
            status = await client.get(accepted.id)
            assert status is not None
            by_phone = {d["recipient"]: d for d in status["deliveries"]}
            limited, other = by_phone[PATIENT], by_phone[OTHER_PATIENT]
            if other["status"] in TERMINAL and limited["attempts"]:
                break
            assert datetime.now().astimezone() < deadline, status
            await asyncio.sleep(0.05)
        assert other["status"] == "sent" and other["provider"] == "clinic:meta_business"
        assert limited["status"] == "queued"
        assert attempts(limited) == [
            ("clinic:meta_business", "failed", "recipient_rate_limited", "131056")
        ]
        tried = datetime.fromisoformat(limited["attempts"][0]["time"])
        next_at = datetime.fromisoformat(limited["nextAttemptAt"])
        assert next_at - tried >= timedelta(seconds=6)  # about one message per 6 s to one user
        # The other patient was not held back behind the limited one.
        assert datetime.fromisoformat(other["sentAt"]) < next_at - timedelta(seconds=5)
        assert s.fallback.requests == [] and s.sms.requests == []


async def test_meta_131047_outside_window_fails_without_any_fallback(
    make_client: Callable[..., Any],
) -> None:
    async with Servers(META_OK) as s:
        s.primary.default = meta_error(131047, message="Re-engagement message")
        status = await run_one(make_client, "clinic-m131047", meta_comm(s))
        assert_failed_alone(status, s, "compliance")
        assert attempts(status["deliveries"][0]) == [
            ("clinic:meta_business", "failed", "compliance", "131047")
        ]


async def test_meta_131026_undeliverable_skips_other_numbers_and_falls_back_to_sms(
    make_client: Callable[..., Any],
) -> None:
    """Issue 15 item 8: not on WhatsApp is the same on every WhatsApp number (no failover),
    and the clinic's SMS fallback now reaches the patient (before: failed, nothing sent)."""
    async with Servers(META_OK) as s:
        s.primary.default = meta_error(131026, message="Message undeliverable")
        status = await run_one(make_client, "clinic-m131026", meta_comm(s))
        wa, sms = sorted(status["deliveries"], key=lambda d: d["channel"] != "whatsapp")
        assert wa["status"] == "failed" and wa["error"]["fallbackReason"] == "not_on_channel"
        assert attempts(wa) == [("clinic:meta_business", "failed", "recipient", "131026")]
        assert len(s.primary.requests) == 1 and s.fallback.requests == []
        assert sms["status"] == "sent" and len(s.sms.requests) == 1


async def test_meta_token_error_190_fails_over(make_client: Callable[..., Any]) -> None:
    async with Servers(META_OK) as s:
        s.primary.default = meta_error(190, 401, "Error validating access token")
        status = await run_one(make_client, "clinic-m190", meta_comm(s))
        (delivery,) = status["deliveries"]
        assert delivery["status"] == "sent" and delivery["provider"] == "clinic:meta_business#2"
        assert attempts(delivery) == [
            ("clinic:meta_business", "failed", "configuration", "190"),
            ("clinic:meta_business#2", "sent", None, None),
        ]
        assert len(s.primary.requests) == 1 and s.sms.requests == []


# --- Twilio WhatsApp ---------------------------------------------------------------------------


def twilio_comm(s: Servers) -> dict[str, Any]:
    return comm(twilio_slot(s.primary), twilio_slot(s.fallback, "+14155550001"), s.sms)


@pytest.mark.parametrize(("status_code", "code"), [(429, 20429), (429, None)])
async def test_twilio_429_is_retried_on_the_same_number(
    make_client: Callable[..., Any], status_code: int, code: int | None
) -> None:
    async with Servers(TWILIO_OK) as s:
        if code is None:
            s.primary.respond(429, "Too Many Requests")
        else:
            s.primary.respond(status_code, twilio_error(code, status_code).body)
        status = await run_one(make_client, f"clinic-t429-{code}", twilio_comm(s))
        (delivery,) = status["deliveries"]
        assert delivery["status"] == "sent" and delivery["provider"] == "clinic:twilio"
        assert attempts(delivery) == [
            ("clinic:twilio", "failed", "rate_limited", code and str(code)),
            ("clinic:twilio", "sent", None, None),
        ]
        assert len(s.primary.requests) == 2 and s.fallback.requests == []
        assert s.primary.requests[0].form()["To"] == f"whatsapp:{PATIENT}"


@pytest.mark.parametrize("code", [21211, 21612, 21614])
async def test_twilio_recipient_codes_fail_without_failover(
    make_client: Callable[..., Any], code: int
) -> None:
    async with Servers(TWILIO_OK) as s:
        s.primary.default = twilio_error(code)
        status = await run_one(make_client, f"clinic-t{code}", twilio_comm(s))
        assert_failed_alone(status, s, "recipient")
        assert attempts(status["deliveries"][0]) == [
            ("clinic:twilio", "failed", "recipient", str(code))
        ]


@pytest.mark.parametrize("code", [21610, 63016])
async def test_twilio_opt_out_and_window_fail_without_any_fallback(
    make_client: Callable[..., Any], code: int
) -> None:
    async with Servers(TWILIO_OK) as s:
        s.primary.default = twilio_error(code)
        status = await run_one(make_client, f"clinic-t{code}", twilio_comm(s))
        assert_failed_alone(status, s, "compliance")
        assert attempts(status["deliveries"][0]) == [
            ("clinic:twilio", "failed", "compliance", str(code))
        ]
