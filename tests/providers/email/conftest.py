"""Fixtures shared by the email adapter tests: an HTTP session, a capture server, messages."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest

from clinicomm.providers.base import AdapterContext, Channel, OutboundMessage, TemplateRef
from tests.support import messaging
from tests.support.http_capture import CaptureServer

#: The shared aiohttp session fixture, the same as the WhatsApp/SMS tests'.
http = messaging.http

#: Canary secrets: a test fails if one of these appears where it must not.
CANARY = "canary-SECRET-3f9a1c"


@pytest.fixture
def context(http: aiohttp.ClientSession) -> AdapterContext:
    return AdapterContext(http=http, timeout=5.0)


@pytest.fixture
async def server() -> AsyncIterator[CaptureServer]:
    async with CaptureServer() as capture:
        yield capture


def text_message(**kw: object) -> OutboundMessage:
    base: dict[str, object] = {
        "channel": Channel.EMAIL,
        "to": "patient@example.com",
        "reference": "dlv_0001",
        "subject": "Appointment confirmed",
        "text": "See you at 10:30.",
        "from_email": "clinic@clinic-a.example",
        "from_name": "Clinic A",
    }
    base.update(kw)
    return OutboundMessage(**base)  # type: ignore[arg-type]


def html_message(**kw: object) -> OutboundMessage:
    return text_message(html="<p>See you at <b>10:30</b>.</p>", **kw)


def template_message(name: str = "appointment-confirmed", **kw: object) -> OutboundMessage:
    return text_message(
        text=None,
        template=TemplateRef(name=name, variables={"time": "10:30", "clinic": "Clinic A"}),
        **kw,
    )
