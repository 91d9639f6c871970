"""Amazon SES (API v2 SendEmail), signed with SigV4 and sent over the shared aiohttp session.

https://docs.aws.amazon.com/ses/latest/APIReference-V2/API_SendEmail.html

`providers.shared.aws.SigV4Signer` signs the request (botocore's signer; nothing else of boto is
used), so sends share the process's one aiohttp session instead of a botocore connection pool
per clinic.

Failures, by the error type SES answers (`x-amzn-ErrorType` header or `__type`/`Code` in the
body) and its message:

| answer | class |
|---|---|
| "Daily message quota exceeded" | ProviderDownError (quota exhausted: fail over) |
| 429, TooManyRequests/Throttling, "Maximum sending rate exceeded" | RateLimitedError |
| SendingPaused, AccountSuspended | ProviderDownError |
| 401/403, AccessDenied, bad signature or token, MailFromDomainNotVerified | ConfigurationError |
| NotFound (e.g. the configuration set) | ConfigurationError |
| MessageRejected / BadRequest about an unverified identity | ConfigurationError |
| BadRequest / InvalidParameterValue about the recipient's address | RecipientError |
| other 4xx | ConfigurationError |
| 5xx | TransientError |

Batches (`send_batch`, template messages only, up to 50 destinations: SES's limit per call):
one `SendBulkEmail` (POST /v2/email/outbound-bulk-emails) with the template as
`DefaultContent`, one `BulkEmailEntry` per delivery (its address, its variables as
`ReplacementTemplateData`, its `ref` tag). SES answers one `BulkEmailEntryResult` per entry, in
order: `SUCCESS` with its own `MessageId`, or a status classified per entry (throttled and
transient failures retry, quota and paused accounts fail over, rejections and bad parameters
are the recipient's, the rest configuration). Free-text messages go through `SendEmail`.
https://docs.aws.amazon.com/ses/latest/APIReference-V2/API_SendBulkEmail.html
"""

from __future__ import annotations

import json
from collections.abc import Hashable, Sequence
from typing import Any

from pydantic import Field

from clinicomm.providers import registry
from clinicomm.providers.base import AdapterContext, Channel, OutboundMessage, SendResult
from clinicomm.providers.email.sender import require_body, resolve_sender
from clinicomm.providers.errors import (
    ConfigurationError,
    ProviderDownError,
    ProviderError,
    RateLimitedError,
    RecipientError,
    TransientError,
)
from clinicomm.providers.shared.aws import SigV4Signer, xml_error
from clinicomm.providers.shared.credentials import AwsCredentials
from clinicomm.providers.shared.http import Answer, HttpAdapter, error_fields

#: SigV4 signing name of SES (v1 and v2 share it).
SIGNING_NAME = "ses"

_THROTTLE_CODES = {"TooManyRequestsException", "ThrottlingException", "Throttling"}
_DOWN_CODES = {"SendingPausedException", "AccountSuspendedException"}
_CONFIG_CODES = {
    "AccessDenied",
    "AccessDeniedException",
    "UnrecognizedClientException",
    "InvalidClientTokenId",
    "InvalidSignatureException",
    "SignatureDoesNotMatch",
    "IncompleteSignature",
    "MissingAuthenticationToken",
    "ExpiredToken",
    "ExpiredTokenException",
    "MailFromDomainNotVerifiedException",
    "NotFoundException",
    "ConfigurationSetDoesNotExist",
}


#: `BulkEmailStatus` of an entry that failed → the error class it is.
_BULK_STATUS: dict[str, type[ProviderError]] = {
    "ACCOUNT_THROTTLED": RateLimitedError,
    "TRANSIENT_FAILURE": TransientError,
    "ACCOUNT_DAILY_QUOTA_EXCEEDED": ProviderDownError,
    "ACCOUNT_SUSPENDED": ProviderDownError,
    "ACCOUNT_SENDING_PAUSED": ProviderDownError,
    "CONFIGURATION_SET_SENDING_PAUSED": ProviderDownError,
    "MESSAGE_REJECTED": RecipientError,
    "INVALID_PARAMETER": RecipientError,
}


class SesCredentials(AwsCredentials):
    """SES in one region, with the clinic's verified sender and optional configuration set."""

    from_email: str | None = None
    from_name: str | None = None
    configuration_set: str | None = None
    #: SNS topics SES publishes this clinic's bounces, complaints and deliveries to; a
    #: notification from any other topic is refused.
    sns_topic_arns: list[str] = Field(default_factory=list)


def _error_code_and_message(answer: Answer) -> tuple[str, str]:
    """The AWS error type and message from a JSON (REST-JSON) or XML (query) error answer."""
    code = (answer.headers.get("x-amzn-ErrorType") or "").split(":")[0]
    data = answer.json()
    message = ""
    if isinstance(data, dict):
        code = code or str(data.get("__type") or data.get("code") or data.get("Code") or "")
        message = str(data.get("message") or data.get("Message") or "")
    else:
        xml_code, xml_message = xml_error(answer.text)
        code = code or xml_code or ""
        message = xml_message or ""
    return code.rsplit("#", 1)[-1], message


@registry.register
class SesAdapter(HttpAdapter):
    """Sends one email per call through SES v2 `SendEmail`."""

    key = "ses"
    aliases = ("aws_ses",)
    channel = Channel.EMAIL
    display_name = "Amazon SES"
    credentials_model = SesCredentials
    credentials: SesCredentials
    # Read as an epoch second when `Retry-After` is absent, as the first version's shared email
    # base did for every email provider (kept so behaviour is unchanged).
    rate_limit_reset_header = "X-RateLimit-Reset"
    #: Destinations of one SendBulkEmail call.
    max_batch = 50

    def __init__(self, credentials: SesCredentials, context: AdapterContext) -> None:
        super().__init__(credentials, context)
        self._signer = SigV4Signer(credentials, SIGNING_NAME)

    @property
    def endpoint(self) -> str:
        """`endpointUrl` when set, else `https://email.{region}.amazonaws.com`."""
        url = (
            self.credentials.endpoint_url
            or f"https://email.{self.credentials.region}.amazonaws.com"
        )
        return url.rstrip("/")

    def build_payload(self, message: OutboundMessage) -> dict[str, Any]:
        """The SendEmail JSON: Simple content (text and/or HTML) or a stored template.

        Only the opaque `reference` goes into `EmailTags`.
        """
        creds = self.credentials
        require_body(self.key, message)
        sender = resolve_sender(self.key, message, email=creds.from_email, name=creds.from_name)
        content: dict[str, Any]
        if message.template is not None:
            content = {
                "Template": {
                    "TemplateName": message.template.name,
                    "TemplateData": json.dumps(message.template.variables),
                }
            }
        else:
            body: dict[str, Any] = {}
            if message.text:
                body["Text"] = {"Data": message.text, "Charset": "UTF-8"}
            if message.html:
                body["Html"] = {"Data": message.html, "Charset": "UTF-8"}
            content = {
                "Simple": {
                    "Subject": {"Data": message.subject or "", "Charset": "UTF-8"},
                    "Body": body,
                }
            }
        payload: dict[str, Any] = {
            "FromEmailAddress": sender.header(),
            "Destination": {"ToAddresses": [message.to]},
            "Content": content,
            # Tag values allow only [A-Za-z0-9_-.@]; our references are ids, which fit.
            # https://docs.aws.amazon.com/ses/latest/APIReference-V2/API_MessageTag.html
            "EmailTags": [{"Name": "ref", "Value": message.reference}],
        }
        if creds.configuration_set:
            payload["ConfigurationSetName"] = creds.configuration_set
        return payload

    async def _signed_call(self, method: str, path: str, body: bytes = b"") -> Answer:
        url = self.endpoint + path
        content_type = {"Content-Type": "application/json"} if body else {}
        headers = self._signer.headers(method, url, body, content_type)
        return await self._request(method, url, headers=headers, data=body or None)

    async def send(self, message: OutboundMessage) -> SendResult:
        """POST /v2/email/outbound-emails; see the module docstring for the classification."""
        body = json.dumps(self.build_payload(message)).encode()
        answer = await self._signed_call("POST", "/v2/email/outbound-emails", body)
        if answer.status == 200:
            data = answer.json()
            message_id = data.get("MessageId") if isinstance(data, dict) else None
            return SendResult(message_id, "accepted")
        raise self._classify(answer)

    def batch_key(self, message: OutboundMessage) -> Hashable | None:
        """Template messages of one template and sender; SendBulkEmail takes no free text."""
        if message.template is None:
            return None
        return (message.from_email, message.from_name, message.template.name)

    def build_bulk_payload(self, messages: Sequence[OutboundMessage]) -> dict[str, Any]:
        """The SendBulkEmail JSON for template messages of one `batch_key`."""
        first = self.build_payload(messages[0])
        payload: dict[str, Any] = {
            "FromEmailAddress": first["FromEmailAddress"],
            "DefaultContent": {
                "Template": {
                    "TemplateName": first["Content"]["Template"]["TemplateName"],
                    "TemplateData": "{}",
                }
            },
            "BulkEmailEntries": [
                {
                    "Destination": {"ToAddresses": [m.to]},
                    "ReplacementEmailContent": {
                        "ReplacementTemplate": {
                            "ReplacementTemplateData": json.dumps(
                                m.template.variables if m.template is not None else {}
                            )
                        }
                    },
                    "ReplacementTags": [{"Name": "ref", "Value": m.reference}],
                }
                for m in messages
            ],
        }
        if "ConfigurationSetName" in first:
            payload["ConfigurationSetName"] = first["ConfigurationSetName"]
        return payload

    async def send_batch(
        self, messages: Sequence[OutboundMessage]
    ) -> list[SendResult | ProviderError]:
        """One SendBulkEmail; each delivery gets its own entry's status and MessageId."""
        body = json.dumps(self.build_bulk_payload(messages)).encode()
        answer = await self._signed_call("POST", "/v2/email/outbound-bulk-emails", body)
        data = answer.json()
        entries = data.get("BulkEmailEntryResults") if isinstance(data, dict) else None
        if answer.status != 200 or not isinstance(entries, list):
            raise self._classify(answer)
        if len(entries) != len(messages):
            raise TransientError("bulk answer does not match the request", provider=self.key)
        results: list[SendResult | ProviderError] = []
        for entry in entries:
            status = str(entry.get("Status") or "") if isinstance(entry, dict) else ""
            if status == "SUCCESS":
                results.append(SendResult(entry.get("MessageId"), "accepted"))
                continue
            detail = str(entry.get("Error") or "") if isinstance(entry, dict) else ""
            kind = _BULK_STATUS.get(status, ConfigurationError)
            results.append(
                kind(f"bulk entry {status.lower() or 'failed'}", provider=self.key,
                     status_code=200, code=status or None, detail=detail or None)
            )
        return results

    async def probe(self) -> None:
        """GET /v2/email/account: the key is valid and may read the SES account. Sends nothing."""
        answer = await self._signed_call("GET", "/v2/email/account")
        if answer.status != 200:
            raise self._classify(answer)

    def _classify(self, answer: Answer) -> Exception:
        status = answer.status
        code, message = _error_code_and_message(answer)
        lowered = message.lower()
        kw = error_fields(answer, provider=self.key, code=code or None, detail=message or None)
        # SES answers both quota errors with the same type; only the text tells them apart.
        # https://docs.aws.amazon.com/ses/latest/dg/manage-sending-quotas-errors.html
        if "daily message quota exceeded" in lowered:
            return ProviderDownError("daily sending quota exhausted", **kw)
        if status == 429 or code in _THROTTLE_CODES or "maximum sending rate exceeded" in lowered:
            return RateLimitedError("rate limited", retry_after=answer.retry_after, **kw)
        if code in _DOWN_CODES:
            return ProviderDownError("sending paused for this account", **kw)
        if status >= 500:
            return TransientError("provider error", retry_after=answer.retry_after, **kw)
        if status in (401, 403) or code in _CONFIG_CODES:
            return ConfigurationError("credentials or sender rejected", **kw)
        if "not verified" in lowered or "did not have authority" in lowered:
            return ConfigurationError("sender identity not verified", **kw)
        if "address" in lowered or "missing domain" in lowered:
            return RecipientError("recipient address rejected", **kw)
        return ConfigurationError("request rejected", **kw)
