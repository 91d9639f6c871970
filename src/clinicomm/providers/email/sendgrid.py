"""SendGrid v3 Mail Send.

https://www.twilio.com/docs/sendgrid/api-reference/mail-send/mail-send

Failures, by what SendGrid answers:

| answer | class |
|---|---|
| 202 | success; the id is the `X-Message-Id` header |
| 429 | RateLimitedError (`Retry-After`, else the epoch in `X-RateLimit-Reset`) |
| 401, 403 | ConfigurationError (bad key or no mail.send scope) |
| 400 naming a recipient address | RecipientError |
| other 400, 404, 413 | ConfigurationError |
| 5xx | TransientError |

Batches (`send_batch`, up to 1,000 deliveries of one content): one Mail Send request with one
personalization per delivery (its `to`, its `custom_args.ref`, its template variables as
`dynamic_template_data`); every delivery gets the request's `X-Message-Id` (the event webhook
tells recipients apart by address and `ref`). A 400 whose `errors` name
`personalizations.N.to…` fails those deliveries with RecipientError and sends the others again
in one request; any other failure applies to the whole batch.
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Sequence
from typing import Any, ClassVar

from pydantic import SecretStr

from clinicomm.providers import registry
from clinicomm.providers.base import Channel, OutboundMessage, ProviderCredentials, SendResult
from clinicomm.providers.email.sender import require_body, resolve_sender
from clinicomm.providers.errors import ConfigurationError, ProviderError, RecipientError
from clinicomm.providers.shared.http import (
    Answer,
    HttpAdapter,
    error_fields,
    rate_limit_or_server_error,
)


class SendGridCredentials(ProviderCredentials):
    """A SendGrid API key with Mail Send scope."""

    api_key: SecretStr
    from_email: str | None = None
    from_name: str | None = None
    template_id: str | None = None
    #: Signed Event Webhook verification key: the ECDSA P-256 public key, base64 DER as the
    #: SendGrid console shows it, or PEM. Public, but kept secret as the settings API asks.
    webhook_public_key: SecretStr | None = None
    base_url: str = "https://api.sendgrid.com"
    endpoint_fields: ClassVar[tuple[str, ...]] = ("base_url",)


#: `personalizations.12.to.0.email`: the index of the personalization an error is about.
_PERSONALIZATION = re.compile(r"^personalizations\.(\d+)\.")


def _is_recipient_error(error: dict[str, Any]) -> bool:
    """Whether one entry of SendGrid's `errors` list is about the recipient's address."""
    field = str(error.get("field") or "")
    text = str(error.get("message") or "").lower()
    return (".to" in field or field.startswith("to")) and "email" in (field + text)


@registry.register
class SendGridAdapter(HttpAdapter):
    """Sends one email per call through SendGrid's v3 Mail Send API."""

    key = "sendgrid"
    channel = Channel.EMAIL
    display_name = "SendGrid"
    credentials_model = SendGridCredentials
    credentials: SendGridCredentials
    # https://www.twilio.com/docs/sendgrid/api-reference/how-to-use-the-sendgrid-v3-api/rate-limits
    rate_limit_reset_header = "X-RateLimit-Reset"
    #: https://www.twilio.com/docs/sendgrid/api-reference/mail-send/limitations
    max_batch = 1000

    def _url(self, path: str) -> str:
        return self.credentials.base_url.rstrip("/") + path

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.credentials.api_key.get_secret_value()}"}

    def build_payload(self, message: OutboundMessage) -> dict[str, Any]:
        """The Mail Send JSON for one message (public so tests can inspect edge cases).

        A message with a template is sent as a dynamic template: its id is the template's own
        name when that is a SendGrid id (`d-…`), else the credentials' `templateId`. Only the
        opaque `reference` goes into `custom_args`.
        """
        creds = self.credentials
        require_body(self.key, message)
        sender = resolve_sender(self.key, message, email=creds.from_email, name=creds.from_name)
        # custom_args sit on the personalization: SendGrid merges them with (and lets them
        # override) the top-level ones, and the official OpenAPI file types the top-level
        # `custom_args` as a string although the API takes an object there too.
        # https://www.twilio.com/docs/sendgrid/for-developers/sending-email/custom-arguments
        personalization: dict[str, Any] = {
            "to": [{"email": message.to}],
            "custom_args": {"ref": message.reference},
        }
        payload: dict[str, Any] = {
            "personalizations": [personalization],
            "from": {"email": sender.email, **({"name": sender.name} if sender.name else {})},
        }
        if message.subject:
            payload["subject"] = message.subject
        if message.template is not None:
            name = message.template.name
            template_id = name if name.startswith("d-") else creds.template_id
            if not template_id:
                raise ConfigurationError(
                    "template message but no SendGrid templateId configured", provider=self.key
                )
            payload["template_id"] = template_id
            personalization["dynamic_template_data"] = dict(message.template.variables)
        else:
            # text/plain must come before text/html, or SendGrid answers 400.
            # https://www.twilio.com/docs/sendgrid/api-reference/mail-send/mail-send#request-body
            content = []
            if message.text:
                content.append({"type": "text/plain", "value": message.text})
            if message.html:
                content.append({"type": "text/html", "value": message.html})
            payload["content"] = content
        return payload

    async def send(self, message: OutboundMessage) -> SendResult:
        """POST /v3/mail/send; see the module docstring for how failures are classified."""
        payload = self.build_payload(message)
        answer = await self._request(
            "POST", self._url("/v3/mail/send"), headers=self._headers(), json_body=payload
        )
        if answer.status in (200, 202):
            return SendResult(answer.headers.get("X-Message-Id"), str(answer.status))
        raise self._classify(answer)

    def batch_key(self, message: OutboundMessage) -> Hashable | None:
        """Same sender, subject and body (or template): one request, one personalization each;
        template variables may differ (they are per personalization)."""
        template = message.template
        return (
            message.from_email,
            message.from_name,
            message.subject,
            message.text,
            message.html,
            (template.name, template.language) if template is not None else None,
        )

    def build_batch_payload(self, messages: Sequence[OutboundMessage]) -> dict[str, Any]:
        """The Mail Send JSON for messages of one `batch_key`: the first message's content and
        one personalization per message, in order."""
        payload = self.build_payload(messages[0])
        personalizations = []
        for message in messages:
            personalization: dict[str, Any] = {
                "to": [{"email": message.to}],
                "custom_args": {"ref": message.reference},
            }
            if "template_id" in payload and message.template is not None:
                personalization["dynamic_template_data"] = dict(message.template.variables)
            personalizations.append(personalization)
        payload["personalizations"] = personalizations
        return payload

    async def send_batch(
        self, messages: Sequence[OutboundMessage]
    ) -> list[SendResult | ProviderError]:
        """One POST /v3/mail/send for all `messages`; see the module docstring."""
        return await self._send_batch(list(messages), split=True)

    async def _send_batch(
        self, messages: list[OutboundMessage], *, split: bool
    ) -> list[SendResult | ProviderError]:
        payload = self.build_batch_payload(messages)
        answer = await self._request(
            "POST", self._url("/v3/mail/send"), headers=self._headers(), json_body=payload
        )
        if answer.status in (200, 202):
            result = SendResult(answer.headers.get("X-Message-Id"), str(answer.status))
            return [result] * len(messages)
        error = self._classify(answer)
        rejected = self._rejected_indexes(answer) if answer.status == 400 else set()
        rejected = {i for i in rejected if i < len(messages)}
        if not split or not rejected:
            raise error
        results: list[SendResult | ProviderError | None] = [None] * len(messages)
        for index in rejected:
            results[index] = RecipientError(
                "recipient address rejected", **error_fields(answer, provider=self.key)
            )
        rest = [i for i in range(len(messages)) if i not in rejected]
        if rest:
            try:
                again = await self._send_batch([messages[i] for i in rest], split=False)
            except ProviderError as exc:
                again = [exc] * len(rest)
            for index, outcome in zip(rest, again, strict=True):
                results[index] = outcome
        return [r for r in results if r is not None]

    @staticmethod
    def _rejected_indexes(answer: Answer) -> set[int]:
        """Personalizations SendGrid's 400 names as bad recipient addresses."""
        body = answer.json()
        errors = body.get("errors", []) if isinstance(body, dict) else []
        indexes = set()
        for entry in errors:
            if not isinstance(entry, dict) or not _is_recipient_error(entry):
                continue
            match = _PERSONALIZATION.match(str(entry.get("field") or ""))
            if match:
                indexes.add(int(match.group(1)))
        return indexes

    async def probe(self) -> None:
        """GET /v3/scopes: the key works and holds `mail.send`. Sends nothing."""
        answer = await self._request("GET", self._url("/v3/scopes"), headers=self._headers())
        if answer.status != 200:
            raise self._classify(answer)
        body = answer.json()
        scopes = body.get("scopes", []) if isinstance(body, dict) else []
        if "mail.send" not in scopes:
            raise ConfigurationError(
                "API key lacks the mail.send scope", provider=self.key, status_code=200
            )

    def _classify(self, answer: Answer) -> Exception:
        status = answer.status
        kw = error_fields(answer, provider=self.key)
        if (transient := rate_limit_or_server_error(answer, kw)) is not None:
            return transient
        if status in (401, 403):
            return ConfigurationError("API key rejected", **kw)
        if status == 400:
            body = answer.json()
            errors = body.get("errors", []) if isinstance(body, dict) else []
            if any(isinstance(e, dict) and _is_recipient_error(e) for e in errors):
                return RecipientError("recipient address rejected", **kw)
        return ConfigurationError("request rejected", **kw)
