"""Helpers for the WhatsApp and SMS adapter tests: sessions, adapters, canary secrets."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest_asyncio

from clinicomm.providers.base import (
    AdapterContext,
    Channel,
    OutboundMessage,
    ProviderAdapter,
    TemplateRef,
)

#: Secret values planted in credentials; no repr, str or error may ever show them.
CANARY = "CANARY-s3cr3t-9f8e7d"
PATIENT = "+14155552671"


@pytest_asyncio.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """The shared session an adapter gets from its context, as in production."""
    async with aiohttp.ClientSession() as session:
        yield session


def build(
    adapter_cls: type[ProviderAdapter], creds: dict[str, Any], http: aiohttp.ClientSession
) -> ProviderAdapter:
    """An adapter from JSON credentials (camelCase), validated by its credentials model."""
    credentials = adapter_cls.credentials_model.model_validate(creds)
    return adapter_cls(credentials, AdapterContext(http=http, timeout=5.0))


def text_message(channel: Channel, text: str = "Your appointment is at 10:30",
                 to: str = PATIENT) -> OutboundMessage:
    return OutboundMessage(channel=channel, to=to, reference="dlv-123", text=text)


def template_message(
    channel: Channel, name: str = "appointmentReminder", variables: dict[str, str] | None = None,
    language: str = "en_US",
) -> OutboundMessage:
    variables = {"2": "10:30", "1": "Ana", "10": "last"} if variables is None else variables
    return OutboundMessage(
        channel=channel, to=PATIENT, reference="dlv-123",
        template=TemplateRef(name=name, language=language, variables=variables),
    )


def assert_no_secret(*objects: object) -> None:
    """No repr/str of the objects contains the canary."""
    for obj in objects:
        assert CANARY not in repr(obj)
        assert CANARY not in str(obj)


def same_shape(actual: Any, expected: Any, path: str = "$") -> None:
    """`actual` has exactly the keys of `expected` (recursively) and values of the same types."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict), path
        assert set(actual) == set(expected), f"{path}: {sorted(actual)} != {sorted(expected)}"
        for key in expected:
            same_shape(actual[key], expected[key], f"{path}.{key}")
    elif isinstance(expected, list):
        assert isinstance(actual, list), path
        for item in actual:  # each item has the shape of one of the fixture's items
            errors = []
            for candidate in expected:
                try:
                    same_shape(item, candidate, f"{path}[]")
                    break
                except AssertionError as exc:
                    errors.append(str(exc))
            else:
                raise AssertionError("; ".join(errors))
    else:
        assert type(actual) is type(expected), f"{path}: {type(actual)} != {type(expected)}"
