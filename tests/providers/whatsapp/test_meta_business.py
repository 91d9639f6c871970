"""Meta WhatsApp Cloud API adapter against a local server and the official v23.0 spec."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest
from openapi_core.exceptions import OpenAPIError

from clinicomm.providers import registry
from clinicomm.providers.base import AdapterContext, Channel
from clinicomm.providers.errors import (
    ComplianceError,
    ConfigurationError,
    ProviderDownError,
    ProviderError,
    RateLimitedError,
    RecipientError,
    RecipientRateLimitedError,
    TransientError,
)
from clinicomm.providers.phone import from_wa_id
from clinicomm.providers.whatsapp.meta_business import MetaBusinessAdapter
from tests.support.http_capture import CaptureServer
from tests.support.messaging import (
    CANARY,
    PATIENT,
    assert_no_secret,
    build,
    template_message,
    text_message,
)
from tests.support.specs import assert_valid

WA = Channel.WHATSAPP
OK = {
    "messaging_product": "whatsapp",
    "contacts": [{"input": PATIENT, "wa_id": "14155552671"}],
    "messages": [{"id": "wamid.HBgLMTQxNTU1NTI2NzE"}],
}


def creds(url: str, **extra: Any) -> dict[str, Any]:
    return {
        "apiUrl": f"{url}/v23.0",
        "apiKey": CANARY,
        "phoneNumberId": "1234567890",
        "templates": {"appointmentReminder": "appt_reminder_v2", "otp": "clinic_otp"},
        "appSecret": CANARY,
        **extra,
    }


def adapter(
    server: CaptureServer, http: aiohttp.ClientSession, **extra: Any
) -> MetaBusinessAdapter:
    made = build(MetaBusinessAdapter, creds(server.url, **extra), http)
    assert isinstance(made, MetaBusinessAdapter)
    return made


def test_registered_and_max_per_second_exposed() -> None:
    assert registry.get(WA, "meta_business").adapter is MetaBusinessAdapter
    model = MetaBusinessAdapter.credentials_model.model_validate(creds("http://x"))
    assert model.max_per_second == 80  # type: ignore[attr-defined]
    model = MetaBusinessAdapter.credentials_model.model_validate(
        creds("http://x", maxPerSecond=20)
    )
    assert model.max_per_second == 20  # type: ignore[attr-defined]


async def test_text_message_matches_the_official_spec(http: aiohttp.ClientSession) -> None:
    async with CaptureServer() as server:
        server.respond(200, OK)
        result = await adapter(server, http).send(text_message(WA))
    assert result.provider_message_id == "wamid.HBgLMTQxNTU1NTI2NzE"
    (request,) = server.requests
    assert request.method == "POST"
    assert request.path == "/v23.0/1234567890/messages"
    assert request.headers["Authorization"] == f"Bearer {CANARY}"
    body = request.json()
    assert body == {
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        "to": PATIENT,
        "type": "text",
        "text": {"preview_url": False, "body": "Your appointment is at 10:30"},
    }
    assert from_wa_id(OK["contacts"][0]["wa_id"]) == body["to"]  # type: ignore[index]
    assert_valid("meta", request, host_url="https://graph.facebook.com")


async def test_template_message_matches_the_official_spec(http: aiohttp.ClientSession) -> None:
    async with CaptureServer() as server:
        server.respond(200, OK)
        await adapter(server, http).send(template_message(WA))
    (request,) = server.requests
    body = request.json()
    assert body["type"] == "template"
    assert body["template"] == {
        "name": "appt_reminder_v2",  # logical name mapped through credentials.templates
        "language": {"policy": "deterministic", "code": "en_US"},
        "components": [
            {
                "type": "body",
                "parameters": [  # "1", "2", "10": numeric order, not string order
                    {"type": "text", "text": "Ana"},
                    {"type": "text", "text": "10:30"},
                    {"type": "text", "text": "last"},
                ],
            }
        ],
    }
    assert_valid("meta", request, host_url="https://graph.facebook.com")


async def test_provider_template_name_passes_through(http: aiohttp.ClientSession) -> None:
    async with CaptureServer() as server:
        server.respond(200, OK)
        await adapter(server, http).send(template_message(WA, name="hello_world", variables={}))
    body = server.requests[0].json()
    assert body["template"]["name"] == "hello_world"
    assert "components" not in body["template"]
    assert_valid("meta", server.requests[0], host_url="https://graph.facebook.com")


def test_spec_rejects_a_malformed_request() -> None:
    """The validator really validates: a body without `messaging_product` fails."""
    from tests.support.http_capture import CapturedRequest

    bad = CapturedRequest(
        method="POST", path="/v23.0/1/messages", query={},  # type: ignore[arg-type]
        headers={"Content-Type": "application/json", "Authorization": "Bearer x"},
        body=b'{"to": "1", "type": "text", "text": {"body": "x"}}',
        content_type="application/json",
    )
    with pytest.raises(OpenAPIError):
        assert_valid("meta", bad, host_url="https://graph.facebook.com")


@pytest.mark.parametrize("declared", [{"appointmentReminder": 2}, {"appt_reminder_v2": 4}])
async def test_template_param_mismatch_is_local(
    http: aiohttp.ClientSession, declared: dict[str, int]
) -> None:
    async with CaptureServer() as server:
        with pytest.raises(ConfigurationError, match="takes"):
            await adapter(server, http, templateParams=declared).send(template_message(WA))
    assert server.requests == []


async def test_template_param_match_sends(http: aiohttp.ClientSession) -> None:
    async with CaptureServer() as server:
        server.respond(200, OK)
        a = adapter(server, http, templateParams={"appointmentReminder": 3})
        await a.send(template_message(WA))
    assert len(server.requests) == 1


async def test_invalid_recipient_is_local(http: aiohttp.ClientSession) -> None:
    async with CaptureServer() as server:
        with pytest.raises(RecipientError):
            await adapter(server, http).send(text_message(WA, to="4155552671"))
    assert server.requests == []


def graph_error(code: int, message: str = "boom", subcode: int | None = None) -> dict[str, Any]:
    error: dict[str, Any] = {
        "message": message, "type": "OAuthException", "code": code,
        "error_data": {"messaging_product": "whatsapp", "details": f"details {code}"},
        "fbtrace_id": "A1b2",
    }
    if subcode is not None:
        error["error_subcode"] = subcode
    return {"error": error}


ERROR_CASES: list[tuple[int, int, type[ProviderError]]] = [
    (429, 130429, RateLimitedError),
    (400, 131047, ComplianceError),
    (400, 131026, RecipientError),
    (401, 190, ConfigurationError),
    (404, 132001, ConfigurationError),
    (400, 131030, ConfigurationError),
    (403, 131031, ConfigurationError),
    (403, 368, ConfigurationError),
    (503, 131057, TransientError),
    (500, 1, TransientError),
    (503, 2, TransientError),
    (429, 80007, RateLimitedError),
    (400, 131048, ProviderDownError),
    (400, 100, ConfigurationError),
]


@pytest.mark.parametrize(("status", "code", "expected"), ERROR_CASES,
                         ids=[str(c[1]) for c in ERROR_CASES])
async def test_error_classification(
    http: aiohttp.ClientSession, status: int, code: int, expected: type[ProviderError]
) -> None:
    async with CaptureServer() as server:
        server.respond(status, graph_error(code))
        with pytest.raises(expected) as info:
            await adapter(server, http).send(text_message(WA))
    assert type(info.value) is expected
    assert info.value.code == str(code)
    assert info.value.status_code == status
    assert len(server.requests) == 1  # no retry inside the adapter
    assert_no_secret(info.value, info.value.to_dict())


async def test_131056_delays_only_the_recipient_at_least_six_seconds(
    http: aiohttp.ClientSession,
) -> None:
    async with CaptureServer() as server:
        server.respond(400, graph_error(131056, "(#131056) pair rate limit hit"))
        server.respond(429, graph_error(131056), headers={"Retry-After": "30"})
        a = adapter(server, http)
        with pytest.raises(RecipientRateLimitedError) as first:
            await a.send(text_message(WA))
        with pytest.raises(RecipientRateLimitedError) as second:
            await a.send(text_message(WA))
    assert first.value.retry_after is not None
    assert first.value.retry_after >= 6
    assert second.value.retry_after == 30
    assert len(server.requests) == 2


async def test_130429_honours_retry_after(http: aiohttp.ClientSession) -> None:
    async with CaptureServer() as server:
        server.respond(429, graph_error(130429), headers={"Retry-After": "3"})
        with pytest.raises(RateLimitedError) as info:
            await adapter(server, http).send(text_message(WA))
    assert type(info.value) is RateLimitedError  # the sender waits, not one recipient
    assert info.value.retry_after == 3
    assert not info.value.counts_for_health


async def test_131047_carries_its_code(http: aiohttp.ClientSession) -> None:
    async with CaptureServer() as server:
        server.respond(400, graph_error(131047, "Re-engagement message"))
        with pytest.raises(ComplianceError) as info:
            await adapter(server, http).send(text_message(WA))
    assert info.value.code == "131047"


async def test_http_401_without_graph_body_is_configuration(http: aiohttp.ClientSession) -> None:
    async with CaptureServer() as server:
        server.respond(401, "Unauthorized")
        with pytest.raises(ConfigurationError):
            await adapter(server, http).send(text_message(WA))


async def test_plain_5xx_is_transient(http: aiohttp.ClientSession) -> None:
    async with CaptureServer() as server:
        server.respond(502, "<html>bad gateway</html>", headers={"Retry-After": "7"})
        with pytest.raises(TransientError) as info:
            await adapter(server, http).send(text_message(WA))
    assert type(info.value) is TransientError
    assert info.value.retry_after == 7


async def test_error_detail_is_redacted(http: aiohttp.ClientSession) -> None:
    async with CaptureServer() as server:
        server.respond(400, graph_error(131026, f"Message to {PATIENT} failed"))
        with pytest.raises(RecipientError) as info:
            await adapter(server, http).send(text_message(WA))
    assert PATIENT not in (info.value.detail or "")


async def test_probe_reads_the_number_and_sends_nothing(http: aiohttp.ClientSession) -> None:
    async with CaptureServer() as server:
        server.respond(200, {"id": "1234567890"})
        server.respond(401, graph_error(190, "Error validating access token"))
        a = adapter(server, http)
        await a.probe()
        with pytest.raises(ConfigurationError):
            await a.probe()
    first = server.requests[0]
    assert first.method == "GET"
    assert first.path == "/v23.0/1234567890"
    assert first.query["fields"] == "id"
    assert first.headers["Authorization"] == f"Bearer {CANARY}"


async def test_timeout_is_transient_and_refused_is_down(http: aiohttp.ClientSession) -> None:
    async with CaptureServer() as server:
        server.respond(200, OK, delay=1.0)
        a = adapter(server, http)
        a.context.timeout = 0.2
        with pytest.raises(TransientError):
            await a.send(text_message(WA))
        url = server.url
    gone = build(MetaBusinessAdapter, creds(url), http)  # the server is closed now
    with pytest.raises(ProviderDownError):
        await gone.send(text_message(WA))


async def test_without_shared_session_creates_and_closes_its_own() -> None:
    async with CaptureServer() as server:
        server.respond(200, OK)
        model = MetaBusinessAdapter.credentials_model.model_validate(creds(server.url))
        a = MetaBusinessAdapter(model, AdapterContext(http=None))
        await a.send(text_message(WA))
        await a.close()
        await a.close()  # safe twice


def test_repr_never_shows_secrets() -> None:
    model = MetaBusinessAdapter.credentials_model.model_validate(creds("http://x"))
    a = MetaBusinessAdapter(model, AdapterContext())
    assert_no_secret(a, model, model.public_dict(), list(a.describe()))
    assert CANARY not in model.model_dump_json()
