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
    bird,
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
    CertificateUnavailableError,
    DeliveryEvent,
    EventType,
    ForeignEventError,
    InboundMessage,
    MemorySeenTokenStore,
    SeenTokenStore,
    WebhookAuthError,
    WebhookContext,
    WebhookEvent,
    WebhookNotConfiguredError,
    WebhookPayloadError,
    WebhookRequest,
    WebhookUnsupportedError,
)
from clinicomm.providers.webhooks.keywords import classify_keyword


@dataclass(frozen=True, slots=True)
class WebhookHandler:
    """A provider's webhook functions and the credentials model they take."""

    provider: str
    verify: Callable[[WebhookRequest, Any, WebhookContext | None], Awaitable[None]]
    parse: Callable[[WebhookRequest], list[WebhookEvent]]
    credentials_model: type[ProviderCredentials]
    #: Other spellings of the key in the webhook URL (`/webhooks/meta/...`).
    aliases: tuple[str, ...] = ()
    #: Error codes in a status report that prove the recipient opted out with the provider.
    opt_out_codes: frozenset[str] = frozenset()
    #: The body and media type of the 200 answer (Twilio wants TwiML).
    answer: tuple[str, str] = ("ok", "text/plain")
    #: A subscription handshake to record for the operator: the URL to confirm, or None
    #: (SNS `SubscriptionConfirmation`).
    subscription_url: Callable[[WebhookRequest], str | None] | None = None
    #: A GET subscription handshake (Meta's `hub.verify_token` → `hub.challenge`): the
    #: answer for (query, credentials); raises WebhookAuthError when the token is wrong.
    handshake: Callable[[dict[str, str], Any], str] | None = None


def _handler(module: Any) -> WebhookHandler:
    """A webhook module's declarations: `PROVIDER`, `CREDENTIALS`, `verify`, `parse`, and
    optionally `ALIASES`, `OPT_OUT_CODES`, `ANSWER`, `subscribe_url`, `handshake`."""
    return WebhookHandler(
        module.PROVIDER,
        module.verify,
        module.parse,
        module.CREDENTIALS,
        aliases=tuple(getattr(module, "ALIASES", ())),
        opt_out_codes=frozenset(getattr(module, "OPT_OUT_CODES", ())),
        answer=getattr(module, "ANSWER", ("ok", "text/plain")),
        subscription_url=getattr(module, "subscribe_url", None),
        handshake=getattr(module, "handshake", None),
    )


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
        _handler(bird),
    )
}


def webhook_context(
    http: Any,
    seen_tokens: SeenTokenStore,
    *,
    max_age: float = 300.0,
    sns_cert_url_prefixes: tuple[str, ...] = (),
) -> WebhookContext:
    """The verification context: the shared one-time-token store, the freshness window
    (`CLINICOMM_WEBHOOK_MAX_AGE_SECONDS`), the HTTP fetcher of signing certificates the
    SNS-based handlers need, and the extra trusted SNS certificate URL prefixes."""
    return WebhookContext(
        seen_tokens=seen_tokens,
        fetch_certificate=ses.http_certificate_fetcher(http),
        max_age=max_age,
        sns_cert_url_prefixes=sns_cert_url_prefixes,
    )


def handler_key(name: str) -> str | None:
    """The provider key a webhook URL segment names (a key or one of its aliases), or None."""
    if name in HANDLERS:
        return name
    for handler in HANDLERS.values():
        if name in handler.aliases:
            return handler.provider
    return None


__all__ = [
    "HANDLERS",
    "CertificateUnavailableError",
    "DeliveryEvent",
    "EventType",
    "ForeignEventError",
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
    "WebhookUnsupportedError",
    "classify_keyword",
    "handler_key",
    "webhook_context",
]
