"""Postmark single email API (`/email`, `/email/withTemplate`).

https://postmarkapp.com/developer/api/email-api and
https://postmarkapp.com/developer/api/overview#error-codes

Failures, by what Postmark answers (HTTP status, then the body's `ErrorCode`):

| answer | class |
|---|---|
| 200 with ErrorCode 0 | success; the id is `MessageID` |
| 401, or ErrorCode 10 (bad server token) | ConfigurationError |
| ErrorCode 406 (inactive recipient) | RecipientError |
| ErrorCode 300 about the To address | RecipientError |
| ErrorCode 300 otherwise, 400 (sender signature), 412, 413, other 422s | ConfigurationError |
| 429 | RateLimitedError |
| 5xx | TransientError |

Batches (`send_batch`, up to 500 messages): `/email/batch` (a JSON array of the single
requests) or `/email/batchWithTemplates` (`{"Messages": [...]}`). Postmark answers 200 with one
entry per message, in order; each entry is classified like a single answer, so a batch that
fails partly fails only the messages whose `ErrorCode` is not 0. A non-200 answer applies to the
whole batch.
https://postmarkapp.com/developer/api/email-api#send-batch-emails and
https://postmarkapp.com/developer/api/templates-api#send-batch-with-templates
"""

from __future__ import annotations

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

#: Postmark API error codes we classify; https://postmarkapp.com/developer/api/overview#error-codes
BAD_SERVER_TOKEN = 10
INVALID_EMAIL_REQUEST = 300
INACTIVE_RECIPIENT = 406


class PostmarkCredentials(ProviderCredentials):
    """A Postmark server token and message stream."""

    server_token: SecretStr
    from_email: str | None = None
    from_name: str | None = None
    message_stream: str = "outbound"
    #: HTTP Basic credentials put in the webhook URL (Postmark webhooks are not signed).
    webhook_user: SecretStr | None = None
    webhook_password: SecretStr | None = None
    base_url: str = "https://api.postmarkapp.com"
    endpoint_fields: ClassVar[tuple[str, ...]] = ("base_url",)


@registry.register
class PostmarkAdapter(HttpAdapter):
    """Sends one email per call through Postmark's `/email` or `/email/withTemplate`."""

    key = "postmark"
    #: 406: the address is inactive (hard bounce, complaint or manual suppression).
    bounce_codes = frozenset({"406"})
    channel = Channel.EMAIL
    display_name = "Postmark"
    credentials_model = PostmarkCredentials
    credentials: PostmarkCredentials
    # Read as an epoch second when `Retry-After` is absent, as the first version's shared email
    # base did for every email provider (SendGrid documents it; kept so behaviour is unchanged).
    rate_limit_reset_header = "X-RateLimit-Reset"
    #: https://postmarkapp.com/developer/api/email-api#send-batch-emails
    max_batch = 500

    def _url(self, path: str) -> str:
        return self.credentials.base_url.rstrip("/") + path

    def _headers(self) -> dict[str, str]:
        return {
            "X-Postmark-Server-Token": self.credentials.server_token.get_secret_value(),
            "Accept": "application/json",
            "Content-Type": "application/json",
        }

    def build_request(self, message: OutboundMessage) -> tuple[str, dict[str, Any]]:
        """The path and JSON body for one message.

        A template goes to `/email/withTemplate` by `TemplateId` when its name is numeric, else
        by `TemplateAlias`, with the variables as `TemplateModel`. Only the opaque `reference`
        goes into `Metadata`.
        """
        creds = self.credentials
        require_body(self.key, message)
        sender = resolve_sender(self.key, message, email=creds.from_email, name=creds.from_name)
        body: dict[str, Any] = {
            "From": sender.header(),
            "To": message.to,
            "MessageStream": creds.message_stream,
            "Metadata": {"ref": message.reference},
        }
        if message.template is not None:
            name = message.template.name
            if name.isdigit():
                body["TemplateId"] = int(name)
            else:
                body["TemplateAlias"] = name
            body["TemplateModel"] = dict(message.template.variables)
            return "/email/withTemplate", body
        body["Subject"] = message.subject or ""
        if message.text:
            body["TextBody"] = message.text
        if message.html:
            body["HtmlBody"] = message.html
        return "/email", body

    async def send(self, message: OutboundMessage) -> SendResult:
        """POST /email or /email/withTemplate; see the module docstring for the classification."""
        path, body = self.build_request(message)
        answer = await self._request(
            "POST", self._url(path), headers=self._headers(), json_body=body
        )
        data = answer.json()
        code = data.get("ErrorCode") if isinstance(data, dict) else None
        if answer.status == 200 and code in (0, None) and isinstance(data, dict):
            return SendResult(data.get("MessageID"), str(data.get("Message") or "OK"))
        raise self._classify(answer, data)

    def batch_key(self, message: OutboundMessage) -> Hashable | None:
        """Every message is complete in a Postmark batch: only the endpoint must match."""
        return "template" if message.template is not None else "email"

    def build_batch_request(self, messages: Sequence[OutboundMessage]) -> tuple[str, Any]:
        """The path and JSON body for messages of one `batch_key`."""
        built = [self.build_request(m) for m in messages]
        bodies = [body for _, body in built]
        if built[0][0] == "/email/withTemplate":
            return "/email/batchWithTemplates", {"Messages": bodies}
        return "/email/batch", bodies

    async def send_batch(
        self, messages: Sequence[OutboundMessage]
    ) -> list[SendResult | ProviderError]:
        """One POST for all `messages`; each gets its own entry of Postmark's answer."""
        path, body = self.build_batch_request(messages)
        answer = await self._request(
            "POST", self._url(path), headers=self._headers(), json_body=body
        )
        data = answer.json()
        if answer.status != 200 or not isinstance(data, list) or len(data) != len(messages):
            raise self._classify(answer, data if answer.status != 200 else None)
        results: list[SendResult | ProviderError] = []
        for item in data:
            code = item.get("ErrorCode") if isinstance(item, dict) else -1
            if code in (0, None) and isinstance(item, dict):
                results.append(SendResult(item.get("MessageID"), str(item.get("Message") or "OK")))
            else:
                results.append(self._classify(answer, item, status=422))
        return results

    async def probe(self) -> None:
        """GET /server: the server token is valid. Sends nothing."""
        answer = await self._request("GET", self._url("/server"), headers=self._headers())
        if answer.status != 200:
            raise self._classify(answer, answer.json())

    def _classify(self, answer: Answer, data: Any, *, status: int | None = None) -> ProviderError:
        """The error for an answer (or, with `status`, for one entry of a batch answer)."""
        error_code = data.get("ErrorCode") if isinstance(data, dict) else None
        text = str(data.get("Message", "")) if isinstance(data, dict) else answer.text
        code = None if error_code is None else str(error_code)
        if status is None:
            status = answer.status
            kw = error_fields(answer, provider=self.key, code=code)
            if (transient := rate_limit_or_server_error(answer, kw)) is not None:
                return transient
        else:  # one entry: its own message, not the whole answer's body
            kw = error_fields(answer, provider=self.key, code=code, detail=text)
            kw["status_code"] = status
        if status == 401 or error_code == BAD_SERVER_TOKEN:
            return ConfigurationError("server token rejected", **kw)
        if error_code == INACTIVE_RECIPIENT:
            return RecipientError("recipient inactive (bounced or unsubscribed)", **kw)
        if error_code == INVALID_EMAIL_REQUEST and "'to'" in text.lower():
            # e.g. "Error parsing 'To': Illegal email address 'x'. It must contain the '@' symbol."
            return RecipientError("recipient address rejected", **kw)
        return ConfigurationError("request rejected", **kw)
