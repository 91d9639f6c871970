"""Bird (formerly MessageBird) Channels API, shared by the WhatsApp and SMS adapters.

`POST {baseUrl}/workspaces/{workspaceId}/channels/{channelId}/messages` with
`Authorization: AccessKey <key>` and `{"receiver": {"contacts": [{"identifierValue":
"+E164"}]}, "body": {"type": "text", "text": {"text": …}}, "reference": <delivery id>}`, or
`"template": {"projectId", "version", "locale", "parameters": [{"type": "string", "key",
"value"}]}` instead of `body`; answered 202 with the message (`id`, `status: accepted`).
Shapes from Bird's public docs (docs.bird.com: Channels API "Send a message", message types
"Template"); Bird publishes no OpenAPI file, so there is no spec test (tests/provider_specs
README). Bird reports statuses through workspace webhook subscriptions, not per message:
`status_callback` is not sent. The legacy MessageBird APIs stay provider `messagebird`.

Errors: `{"code", "message", "details"}`; classified by HTTP status (401/403 credentials,
402 balance, 404 unknown workspace or channel, 422 a bad receiver, 429 rate, 5xx).
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
from clinicomm.providers.shared.credentials import BirdCredentials
from clinicomm.providers.shared.http import Answer, HttpAdapter, classify_status, error_fields
from clinicomm.providers.shared.messaging import recipient_e164, require_text


def classify_bird_error(answer: Answer, provider: str = "bird") -> ProviderError:
    """Turn a Bird error answer into the exception the worker acts on."""
    body = answer.json()
    code = str(body.get("code")) if isinstance(body, dict) and body.get("code") else None
    detail = str(body.get("message")) if isinstance(body, dict) and body.get("message") else None
    kw = error_fields(answer, provider=provider, code=code, detail=detail or answer.text)
    text = f"{code or ''} {detail or ''}".lower()
    if answer.status == 429:
        return RateLimitedError("rate limited", retry_after=answer.retry_after, **kw)
    if answer.status in (401, 403, 404):
        return ConfigurationError("access key, workspace or channel refused", **kw)
    if answer.status == 402:
        return ProviderDownError("account balance exhausted", **kw)
    if answer.status == 422 and ("receiver" in text or "identifier" in text):
        return RecipientError("recipient refused", **kw)
    return classify_status(answer, provider=provider, code=kw["code"], detail=kw["detail"])


class BirdAdapterBase(HttpAdapter):
    """Send and probe through one Bird channel (its channel decides WhatsApp or SMS)."""

    @property
    def creds(self) -> BirdCredentials:
        assert isinstance(self.credentials, BirdCredentials)
        return self.credentials

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"AccessKey {self.creds.access_key.get_secret_value()}"}

    def _channel_url(self) -> str:
        c = self.creds
        return f"{c.base_url.rstrip('/')}/workspaces/{c.workspace_id}/channels/{c.channel_id}"

    def build_payload(self, message: OutboundMessage) -> dict[str, Any]:
        """The JSON body for one message; raises ConfigurationError/RecipientError locally."""
        to = recipient_e164(message, self.key)
        payload: dict[str, Any] = {
            "receiver": {"contacts": [{"identifierValue": to}]},
            # Our opaque delivery id; Bird echoes it in webhooks.
            "reference": message.reference,
        }
        if message.template is not None:
            template = message.template
            project = self.creds.templates.get(template.name)
            if project is None:
                raise ConfigurationError(
                    f"template {template.name!r} has no Bird projectId in credentials.templates",
                    provider=self.key,
                    code="template_unmapped",
                )
            payload["template"] = {
                "projectId": project,
                "version": self.creds.template_version,
                "locale": template.language,
                "parameters": [
                    {"type": "string", "key": k, "value": v}
                    for k, v in sorted(template.variables.items())
                ],
            }
        else:
            payload["body"] = {"type": "text", "text": {"text": require_text(message, self.key)}}
        return payload

    async def send(self, message: OutboundMessage) -> SendResult:
        """POST the message; returns Bird's message `id`."""
        payload = self.build_payload(message)
        answer = await self._request(
            "POST", f"{self._channel_url()}/messages", json_body=payload, headers=self._headers()
        )
        if answer.status >= 300:
            raise classify_bird_error(answer, self.key)
        body = answer.json()
        if not isinstance(body, dict) or not body.get("id"):
            raise TransientError(
                "answer without a message id", provider=self.key, status_code=answer.status
            )
        status = body.get("status")
        return SendResult(str(body["id"]), str(status) if isinstance(status, str) else None)

    async def probe(self) -> None:
        """GET the channel: checks the access key, workspace and channel; sends nothing."""
        answer = await self._request("GET", self._channel_url(), headers=self._headers())
        if answer.status >= 300:
            raise classify_bird_error(answer, self.key)
