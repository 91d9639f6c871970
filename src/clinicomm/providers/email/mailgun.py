"""Mailgun Messages API (US and EU regions).

https://documentation.mailgun.com/docs/mailgun/api-reference/send/mailgun/messages

The message goes as `multipart/form-data` (the only request body the official OpenAPI file
declares; Mailgun also takes url-encoded forms). Failures, by what Mailgun answers:

| answer | class |
|---|---|
| 200 | success; the id is `id` (`<…@domain>`) |
| 429 | RateLimitedError (`Retry-After` when given) |
| 401, 403, 404 (unknown domain) | ConfigurationError |
| 400 about the `to` address | RecipientError |
| other 400, 413 | ConfigurationError |
| 5xx | TransientError |

Batches (`send_batch`, up to 1,000 deliveries of one content, Mailgun's batch sending): one
request with one `to` field per recipient and `recipient-variables` mapping each address to
its delivery's `ref`, which `v:ref=%recipient.ref%` puts in that recipient's custom variables.
Mailgun answers one `id` for the batch: every delivery gets it (the webhook events tell
recipients apart by address). A failure applies to the whole batch. An address that appears
twice in one batch goes out in its own call (recipient variables are keyed by address).
https://documentation.mailgun.com/docs/mailgun/user-manual/sending-messages/batch-sending
"""

from __future__ import annotations

import base64
import json
from collections.abc import Hashable, Sequence
from typing import ClassVar, Literal
from urllib.parse import quote

import aiohttp
from pydantic import Field, SecretStr

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

#: API host per region. https://documentation.mailgun.com/docs/mailgun/api-reference/api-overview
REGION_URLS = {"us": "https://api.mailgun.net", "eu": "https://api.eu.mailgun.net"}


class MailgunCredentials(ProviderCredentials):
    """A Mailgun API key and sending domain; `region` picks the US or EU API host."""

    api_key: SecretStr
    domain: str = Field(min_length=1)
    region: Literal["us", "eu"] = "us"
    from_email: str | None = None
    from_name: str | None = None
    base_url: str | None = None
    endpoint_fields: ClassVar[tuple[str, ...]] = ("base_url",)
    #: HTTP webhook signing key: `signature.signature` = HMAC-SHA256(key, timestamp + token).
    webhook_signing_key: SecretStr | None = None


@registry.register
class MailgunAdapter(HttpAdapter):
    """Sends one email per call through Mailgun's `/v3/{domain}/messages`."""

    key = "mailgun"
    channel = Channel.EMAIL
    display_name = "Mailgun"
    credentials_model = MailgunCredentials
    credentials: MailgunCredentials
    # Read as an epoch second when `Retry-After` is absent, as the first version's shared email
    # base did for every email provider (SendGrid documents it; kept so behaviour is unchanged).
    rate_limit_reset_header = "X-RateLimit-Reset"
    #: Recipients of one batch-sending request.
    max_batch = 1000

    @property
    def base_url(self) -> str:
        """`baseUrl` when set, else the region's API host."""
        return (self.credentials.base_url or REGION_URLS[self.credentials.region]).rstrip("/")

    def _headers(self) -> dict[str, str]:
        token = base64.b64encode(f"api:{self.credentials.api_key.get_secret_value()}".encode())
        return {"Authorization": f"Basic {token.decode('ascii')}"}

    def build_fields(self, message: OutboundMessage) -> list[tuple[str, str]]:
        """The form fields for one message: from, to, subject always; text/html or template.

        A template is sent by name with its variables as JSON in `t:variables`; only the opaque
        `reference` goes into the custom variable `v:ref`.
        """
        creds = self.credentials
        require_body(self.key, message)
        sender = resolve_sender(self.key, message, email=creds.from_email, name=creds.from_name)
        fields = [
            ("from", sender.header()),
            ("to", message.to),
            # Mailgun requires a subject even for template sends whose template has its own.
            ("subject", message.subject or ""),
        ]
        if message.template is not None:
            fields.append(("template", message.template.name))
            fields.append(("t:variables", json.dumps(message.template.variables)))
        else:
            if message.text:
                fields.append(("text", message.text))
            if message.html:
                fields.append(("html", message.html))
        fields.append(("v:ref", message.reference))
        return fields

    def batch_key(self, message: OutboundMessage) -> Hashable | None:
        """Same sender, subject, body, template and variables: Mailgun's variables are per
        message, so only identical content shares a request."""
        template = message.template
        return (
            message.from_email,
            message.from_name,
            message.subject,
            message.text,
            message.html,
            (template.name, tuple(sorted(template.variables.items())))
            if template is not None
            else None,
        )

    def build_batch_fields(self, messages: Sequence[OutboundMessage]) -> list[tuple[str, str]]:
        """The form fields for messages of one `batch_key` with distinct addresses."""
        fields = [f for f in self.build_fields(messages[0]) if f[0] not in ("to", "v:ref")]
        fields[1:1] = [("to", m.to) for m in messages]
        variables = {m.to: {"ref": m.reference} for m in messages}
        fields.append(("recipient-variables", json.dumps(variables)))
        fields.append(("v:ref", "%recipient.ref%"))
        return fields

    async def send_batch(
        self, messages: Sequence[OutboundMessage]
    ) -> list[SendResult | ProviderError]:
        """One POST /v3/{domain}/messages for the distinct addresses; repeats go alone."""
        seen: set[str] = set()
        first: list[int] = []
        again: list[int] = []
        for index, message in enumerate(messages):
            (again if message.to.lower() in seen else first).append(index)
            seen.add(message.to.lower())
        results: list[SendResult | ProviderError | None] = [None] * len(messages)
        outcome: SendResult | ProviderError
        try:
            if len(first) == 1:
                outcome = await self.send(messages[first[0]])
            else:
                outcome = await self._post(self.build_batch_fields([messages[i] for i in first]))
        except ProviderError as exc:
            outcome = exc
        shared = [outcome] * len(first)
        for index, each in zip(first, shared, strict=True):
            results[index] = each
        for index in again:
            try:
                results[index] = await self.send(messages[index])
            except ProviderError as exc:
                results[index] = exc
        return [r for r in results if r is not None]

    async def send(self, message: OutboundMessage) -> SendResult:
        """POST /v3/{domain}/messages; see the module docstring for how failures are classified."""
        return await self._post(self.build_fields(message))

    async def _post(self, fields: list[tuple[str, str]]) -> SendResult:
        form = aiohttp.FormData(default_to_multipart=True)
        for name, value in fields:
            form.add_field(name, value)
        url = f"{self.base_url}/v3/{quote(self.credentials.domain, safe='')}/messages"
        answer = await self._request("POST", url, data=form, headers=self._headers())
        if answer.status == 200:
            body = answer.json()
            message_id = body.get("id") if isinstance(body, dict) else None
            return SendResult(message_id, "queued")
        raise self._classify(answer)

    async def probe(self) -> None:
        """GET /v4/domains/{domain}: the key works and owns the domain. Sends nothing.

        v4 is the domain endpoint of the official OpenAPI file; the v3 one is deprecated.
        https://documentation.mailgun.com/docs/mailgun/api-reference/send/mailgun/domains
        """
        url = f"{self.base_url}/v4/domains/{quote(self.credentials.domain, safe='')}"
        answer = await self._request("GET", url, headers=self._headers())
        if answer.status != 200:
            raise self._classify(answer)

    def _classify(self, answer: Answer) -> Exception:
        status = answer.status
        kw = error_fields(answer, provider=self.key)
        if (transient := rate_limit_or_server_error(answer, kw)) is not None:
            return transient
        if status in (401, 403):
            return ConfigurationError("API key rejected", **kw)
        if status == 404:
            return ConfigurationError("domain not found for this API key", **kw)
        if status == 400:
            body = answer.json()
            text = str(body.get("message", "")) if isinstance(body, dict) else answer.text
            # "to parameter is not a valid address. please check documentation"
            if "to parameter" in text.lower() or "recipient" in text.lower():
                return RecipientError("recipient address rejected", **kw)
        return ConfigurationError("request rejected", **kw)
