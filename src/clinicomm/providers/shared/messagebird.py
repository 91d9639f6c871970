"""MessageBird: WhatsApp through the Conversations API, SMS through the REST SMS API.

* WhatsApp: `POST https://conversations.messagebird.com/v1/send`, `Authorization: AccessKey
  <key>`, body `{"to", "from": channelId, "type": "text"|"hsm", "content": {...}}`, answered
  `{"id", "status": "accepted"}`. The `content` shapes (`text`; `hsm` with namespace,
  templateName, language {policy, code} and params [{default}]) are those of the official Go
  SDK's fixtures (messagebird/go-rest-api `conversation/testdata`); `/v1/send` names the
  channel `from` where `/v1/conversations/start` names it `channelId`.
* SMS: `POST https://rest.messagebird.com/messages` with `{originator, recipients, body,
  reference}`, answered with the message object (`id`).

Errors are `{"errors": [{"code", "description", "parameter"}]}`. `baseUrl` replaces both hosts
(a regional proxy or a test server).
"""

from __future__ import annotations

from typing import Any

from clinicomm.providers.base import OutboundMessage, SendResult
from clinicomm.providers.errors import (
    ConfigurationError,
    ProviderDownError,
    ProviderError,
    RateLimitedError,
    RecipientError,
    TransientError,
)
from clinicomm.providers.phone import digits
from clinicomm.providers.shared.credentials import MessageBirdCredentials
from clinicomm.providers.shared.http import Answer, HttpAdapter, classify_status, error_fields
from clinicomm.providers.shared.messaging import (
    check_param_count,
    ordered_variables,
    recipient_e164,
    require_text,
    template_name,
)

CONVERSATIONS_URL = "https://conversations.messagebird.com"
REST_URL = "https://rest.messagebird.com"

# Parameters whose error means the recipient, not our setup, is wrong.
_RECIPIENT_PARAMS = frozenset({"to", "recipients", "recipient"})
# https://developers.messagebird.com/api/#errors : 25 = not enough balance.
_BALANCE_CODES = frozenset({25})


def classify_messagebird_error(answer: Answer, provider: str = "messagebird") -> ProviderError:
    """Turn a MessageBird error answer into the exception the worker acts on."""
    body = answer.json()
    errors = body.get("errors") if isinstance(body, dict) else None
    items: list[dict[str, Any]] = [e for e in errors or [] if isinstance(e, dict)]
    first = items[0] if items else {}
    code = str(first["code"]) if first.get("code") is not None else None
    detail = "; ".join(str(e.get("description", "")) for e in items) or None
    kw = error_fields(answer, provider=provider, code=code, detail=detail)
    if answer.status == 429:
        return RateLimitedError("rate limited", retry_after=answer.retry_after, **kw)
    if answer.status == 401:
        return ConfigurationError("access key refused", **kw)
    if answer.status == 402 or any(e.get("code") in _BALANCE_CODES for e in items):
        return ProviderDownError("account balance exhausted", **kw)
    if answer.status == 422 and any(
        str(e.get("parameter") or "").lower() in _RECIPIENT_PARAMS for e in items
    ):
        return RecipientError("recipient refused", **kw)
    # Anything else (5xx included) by its status alone.
    return classify_status(answer, provider=provider, code=code, detail=detail)


class MessageBirdAdapterBase(HttpAdapter):
    """Shared MessageBird plumbing: credentials, auth header, answer handling."""

    @property
    def creds(self) -> MessageBirdCredentials:
        assert isinstance(self.credentials, MessageBirdCredentials)
        return self.credentials

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"AccessKey {self.creds.access_key.get_secret_value()}"}

    def _url(self, default_host: str, path: str) -> str:
        return f"{(self.creds.base_url or default_host).rstrip('/')}{path}"

    async def _post(self, url: str, payload: dict[str, Any]) -> SendResult:
        answer = await self._request("POST", url, json_body=payload, headers=self._headers())
        if answer.status >= 300:
            raise classify_messagebird_error(answer, self.key)
        body = answer.json()
        if not isinstance(body, dict) or not body.get("id"):
            raise TransientError(
                "answer without a message id", provider=self.key, status_code=answer.status
            )
        status = body.get("status")
        return SendResult(str(body["id"]), str(status) if isinstance(status, str) else None)

    async def _probe(self, url: str) -> None:
        answer = await self._request("GET", url, headers=self._headers())
        if answer.status >= 300:
            raise classify_messagebird_error(answer, self.key)


class MessageBirdWhatsAppBase(MessageBirdAdapterBase):
    """WhatsApp text and `hsm` template messages through the Conversations API."""

    def build_payload(self, message: OutboundMessage) -> dict[str, Any]:
        """The JSON body for one message; raises ConfigurationError/RecipientError locally."""
        if not self.creds.channel_id:
            raise ConfigurationError("channelId is required for WhatsApp", provider=self.key)
        to = digits(recipient_e164(message, self.key))
        payload: dict[str, Any] = {"to": to, "from": self.creds.channel_id}
        if message.template is not None:
            template = message.template
            name = template_name(template, self.creds.templates)
            params = ordered_variables(template.variables)
            check_param_count(
                self.creds.template_params, template, name, len(params), provider=self.key
            )
            if not self.creds.template_namespace:
                raise ConfigurationError(
                    "templateNamespace is required for template messages", provider=self.key
                )
            payload["type"] = "hsm"
            payload["content"] = {
                "hsm": {
                    "namespace": self.creds.template_namespace,
                    "templateName": name,
                    "language": {"policy": "deterministic", "code": template.language},
                    "params": [{"default": p} for p in params],
                }
            }
        else:
            payload["type"] = "text"
            payload["content"] = {"text": require_text(message, self.key)}
        if message.status_callback:
            payload["reportUrl"] = message.status_callback
        return payload

    async def send(self, message: OutboundMessage) -> SendResult:
        """POST /v1/send; returns the message id (status `accepted`)."""
        payload = self.build_payload(message)
        return await self._post(self._url(CONVERSATIONS_URL, "/v1/send"), payload)

    async def probe(self) -> None:
        """List at most one conversation: checks the access key, sends nothing."""
        await self._probe(self._url(CONVERSATIONS_URL, "/v1/conversations?limit=1"))


class MessageBirdSmsBase(MessageBirdAdapterBase):
    """SMS through the REST SMS API."""

    def build_payload(self, message: OutboundMessage) -> dict[str, Any]:
        """The JSON body for one SMS; raises ConfigurationError/RecipientError locally."""
        if not self.creds.originator:
            raise ConfigurationError("originator is required for SMS", provider=self.key)
        to = digits(recipient_e164(message, self.key))
        payload: dict[str, Any] = {
            "originator": self.creds.originator,
            "recipients": [to],
            "body": require_text(message, self.key),
            # Our opaque delivery id; MessageBird echoes it in status reports.
            "reference": message.reference,
        }
        if message.status_callback:
            payload["reportUrl"] = message.status_callback
        return payload

    async def send(self, message: OutboundMessage) -> SendResult:
        """POST /messages; returns the message object's id."""
        payload = self.build_payload(message)
        return await self._post(self._url(REST_URL, "/messages"), payload)

    async def probe(self) -> None:
        """GET the balance: checks the access key, sends nothing."""
        await self._probe(self._url(REST_URL, "/balance"))
