"""Provider webhooks: verify (raises) and parse (pure), one module per provider.

Modules live here, beside each other, rather than next to the adapters: one provider key can
have adapters on two channels (Twilio, MessageBird, Vonage) but has one webhook format, and the
endpoint `POST /api/v1/webhooks/{provider}/{clinicId}` looks handlers up by that key in
`HANDLERS`. See `base.py` for the contract.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from clinicomm.providers.base import ProviderCredentials
from clinicomm.providers.webhooks import (
    mailgun,
    messagebird,
    meta,
    postmark,
    sendgrid,
    ses,
    twilio,
    vonage,
)
from clinicomm.providers.webhooks.base import (
    DeliveryEvent,
    EventType,
    InboundMessage,
    MemorySeenTokenStore,
    SeenTokenStore,
    WebhookAuthError,
    WebhookContext,
    WebhookEvent,
    WebhookNotConfiguredError,
    WebhookPayloadError,
    WebhookRequest,
)
from clinicomm.providers.webhooks.keywords import classify_keyword


@dataclass(frozen=True, slots=True)
class WebhookHandler:
    """A provider's webhook functions and the credentials model they take."""

    provider: str
    verify: Callable[[WebhookRequest, Any, WebhookContext | None], Awaitable[None]]
    parse: Callable[[WebhookRequest], list[WebhookEvent]]
    credentials_model: type[ProviderCredentials]


def _handler(module: Any) -> WebhookHandler:
    return WebhookHandler(module.PROVIDER, module.verify, module.parse, module.CREDENTIALS)


#: Provider key (the adapters' `key`) → its webhook handler.
HANDLERS: dict[str, WebhookHandler] = {
    h.provider: h
    for h in (
        _handler(meta),
        _handler(twilio),
        _handler(sendgrid),
        _handler(mailgun),
        _handler(postmark),
        _handler(ses),
        _handler(vonage),
        _handler(messagebird),
    )
}

__all__ = [
    "HANDLERS",
    "DeliveryEvent",
    "EventType",
    "InboundMessage",
    "MemorySeenTokenStore",
    "SeenTokenStore",
    "WebhookAuthError",
    "WebhookContext",
    "WebhookEvent",
    "WebhookHandler",
    "WebhookNotConfiguredError",
    "WebhookPayloadError",
    "WebhookRequest",
    "classify_keyword",
]
