"""Meta template components (header, body, buttons) against the official v23.0 spec, with
both patches of `tests/provider_specs/README.md` (allOf, button index 0-9).

Shapes from Meta's docs: media headers
(https://developers.facebook.com/docs/whatsapp/cloud-api/guides/send-message-templates),
authentication templates with a copy-code button: body `{{1}}` = the code and a `url` button
at index 0 whose text parameter is the code
(https://developers.facebook.com/docs/whatsapp/business-management-api/authentication-templates/copy-code-button-authentication-templates).
"""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest
from openapi_core.exceptions import OpenAPIError
from pydantic import ValidationError

from clinicomm.delivery.records import Content
from clinicomm.messaging.models import SendRequest
from clinicomm.providers.base import (
    Channel,
    OutboundMessage,
    TemplateButton,
    TemplateHeader,
    TemplateRef,
)
from tests.providers.whatsapp.test_meta_business import OK, adapter
from tests.support.http_capture import CapturedRequest, CaptureServer
from tests.support.messaging import PATIENT
from tests.support.specs import assert_valid

WA = Channel.WHATSAPP
GRAPH = "https://graph.facebook.com"


def message(template: TemplateRef) -> OutboundMessage:
    return OutboundMessage(channel=WA, to=PATIENT, reference="dlv-1", template=template)


async def sent(http: aiohttp.ClientSession, template: TemplateRef, **creds: Any) -> CapturedRequest:
    async with CaptureServer() as server:
        server.respond(200, OK)
        await adapter(server, http, **creds).send(message(template))
    (request,) = server.requests
    return request


async def test_seed_otp_template_is_a_complete_authentication_message(
    http: aiohttp.ClientSession,
) -> None:
    """The seed's `otp` with only its code: body {{1}} and the copy-code button (index 0)."""
    request = await sent(http, TemplateRef(name="otp", language="en_US",
                                           variables={"1": "482913"}))
    assert request.json()["template"] == {
        "name": "clinic_otp",
        "language": {"policy": "deterministic", "code": "en_US"},
        "components": [
            {"type": "body", "parameters": [{"type": "text", "text": "482913"}]},
            {"type": "button", "sub_type": "url", "index": "0",
             "parameters": [{"type": "text", "text": "482913"}]},
        ],
    }
    assert_valid("meta", request, host_url=GRAPH)


async def test_explicit_copy_code_button(http: aiohttp.ClientSession) -> None:
    template = TemplateRef(name="login_code", variables={"1": "777111"},
                           buttons=(TemplateButton("copy_code", 0, text="777111"),))
    request = await sent(http, template)
    components = request.json()["template"]["components"]
    assert components[-1] == {"type": "button", "sub_type": "url", "index": "0",
                              "parameters": [{"type": "text", "text": "777111"}]}
    assert_valid("meta", request, host_url=GRAPH)


async def test_image_header_body_and_url_and_quick_reply_buttons(
    http: aiohttp.ClientSession,
) -> None:
    template = TemplateRef(
        name="appointmentReminder", language="es",
        variables={"1": "Ana", "2": "10:30"},
        header=TemplateHeader("image", link="https://cdn.clinic.example/map.jpg"),
        buttons=(TemplateButton("quick_reply", 1, payload="CANCEL"),
                 TemplateButton("url", 0, text="appt/123")),
    )
    request = await sent(http, template)
    assert request.json()["template"]["components"] == [
        {"type": "header",
         "parameters": [{"type": "image", "image": {"link": "https://cdn.clinic.example/map.jpg"}}]},
        {"type": "body", "parameters": [{"type": "text", "text": "Ana"},
                                        {"type": "text", "text": "10:30"}]},
        {"type": "button", "sub_type": "url", "index": "0",
         "parameters": [{"type": "text", "text": "appt/123"}]},
        {"type": "button", "sub_type": "quick_reply", "index": "1",
         "parameters": [{"type": "payload", "payload": "CANCEL"}]},
    ]
    assert_valid("meta", request, host_url=GRAPH)


@pytest.mark.parametrize("header", [
    TemplateHeader("text", text="Dr. Ruiz"),
    TemplateHeader("document", link="https://cdn.clinic.example/prep.pdf", filename="prep.pdf"),
    TemplateHeader("video", media_id="1234567890"),
], ids=["text", "document", "video-id"])
async def test_other_headers_are_valid(http: aiohttp.ClientSession, header: TemplateHeader) -> None:
    request = await sent(http, TemplateRef(name="t", variables={"1": "x"}, header=header))
    assert request.json()["template"]["components"][0]["type"] == "header"
    assert_valid("meta", request, host_url=GRAPH)


def test_the_spec_check_is_real() -> None:
    """A button without parameters is refused by the patched spec."""
    import json

    body = {"messaging_product": "whatsapp", "recipient_type": "individual", "to": PATIENT,
            "type": "template", "template": {
                "name": "t", "language": {"policy": "deterministic", "code": "en"},
                "components": [{"type": "button", "sub_type": "url", "index": "0",
                                "parameters": []}]}}
    request = CapturedRequest("POST", "/v23.0/1234567890/messages", {}, {"Content-Type":
                              "application/json"}, json.dumps(body).encode(), "application/json")
    with pytest.raises(OpenAPIError):
        assert_valid("meta", request, host_url=GRAPH)


def _send(template: dict[str, Any]) -> SendRequest:
    return SendRequest.model_validate({"recipients": [{"phone": PATIENT}],
                                       "channels": ["whatsapp"], "template": template})


def test_send_api_components_reach_the_adapter_as_stored() -> None:
    request = _send({"name": "appointmentReminder", "variables": {"1": "Ana"}, "components": {
        "header": {"type": "document", "link": "https://x.example/a.pdf", "filename": "a.pdf"},
        "buttons": [{"type": "copy_code", "index": 0, "text": "123456"},
                    {"type": "quick_reply", "index": 1, "payload": "NO"}]}})
    template = Content.from_json(request.content()).template
    assert template is not None
    assert template.header == TemplateHeader("document", link="https://x.example/a.pdf",
                                             filename="a.pdf")
    assert template.buttons == (TemplateButton("copy_code", 0, text="123456"),
                                TemplateButton("quick_reply", 1, payload="NO"))


@pytest.mark.parametrize("components", [
    {"header": {"type": "image", "link": "http://insecure.example/a.jpg"}},
    {"header": {"type": "image"}},
    {"header": {"type": "text", "link": "https://x.example/a.jpg"}},
    {"header": {"type": "audio", "link": "https://x.example/a.mp3"}},
    {"buttons": [{"type": "url", "index": 10, "text": "x"}]},
    {"buttons": [{"type": "quick_reply", "index": 0, "text": "x"}]},
    {"buttons": [{"type": "url", "index": 0, "text": "a"}, {"type": "url", "index": 0, "text": "b"}]},
])
def test_bad_components_are_refused(components: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        _send({"name": "t", "components": components})
