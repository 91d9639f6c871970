"""Helpers for the webhook tests: fixtures on disk and request building."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from clinicomm.providers.webhooks import WebhookContext, WebhookRequest
from clinicomm.providers.webhooks.base import MemorySeenTokenStore

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "webhooks"


def raw(provider: str, name: str) -> bytes:
    return (FIXTURES / provider / name).read_bytes()


def load(provider: str, name: str) -> Any:
    return json.loads(raw(provider, name))


def json_request(url: str, body: bytes, headers: dict[str, str] | None = None,
                 method: str = "POST") -> WebhookRequest:
    return WebhookRequest.build(
        url, method, {"Content-Type": "application/json", **(headers or {})}, body
    )


def form_request(url: str, body: bytes, headers: dict[str, str] | None = None) -> WebhookRequest:
    return WebhookRequest.build(
        url, "POST", {"Content-Type": "application/x-www-form-urlencoded", **(headers or {})}, body
    )


def flip_byte(body: bytes, index: int | None = None) -> bytes:
    """The body with one byte changed (in the middle by default)."""
    i = len(body) // 2 if index is None else index
    return body[:i] + bytes([body[i] ^ 0x01]) + body[i + 1 :]


def context(**kwargs: Any) -> WebhookContext:
    """A context with its own seen-token store (tests do not share replay state)."""
    kwargs.setdefault("seen_tokens", MemorySeenTokenStore())
    return WebhookContext(**kwargs)


async def is_suppressed(session: Any, clinic_id: str, channel: str, address: str) -> bool:
    """Whether the address is suppressed, asked the way admission asks (one batch of one)."""
    from clinicomm.delivery.suppressions import suppressed_among

    key = (clinic_id, channel, address)
    return key in await suppressed_among(session, [key])
