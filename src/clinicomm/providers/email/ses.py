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
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import Field

from clinicomm.providers import registry
from clinicomm.providers.base import AdapterContext, Channel, OutboundMessage, SendResult
from clinicomm.providers.email.sender import require_body, resolve_sender
from clinicomm.providers.errors import (
    ConfigurationError,
    ProviderDownError,
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
