"""Amazon SNS Publish (SMS) over the shared aiohttp session, signed with SigV4.

The Query API (`POST /` form `Action=Publish&PhoneNumber=…&Message=…&Version=2010-03-31`,
https://docs.aws.amazon.com/sns/latest/api/API_Publish.html) is called directly rather than
through boto3, whose blocking client would need a thread per call. `providers.shared.aws`
signs (botocore's SigV4 signer only); the bytes it signed are the bytes sent. Each SMS is
`Transactional` (better routing; clinic reminders are not marketing) and carries the
`AWS.SNS.SMS.SenderID` attribute when `senderId` is set.

Errors are XML `<ErrorResponse><Error><Code>…</Code><Message>…</Message></Error>`; the code is
read by `shared.aws.xml_error` (regular expressions, no XML parser on untrusted input).
"""

from __future__ import annotations

import re
from urllib.parse import urlencode

from clinicomm.providers import registry
from clinicomm.providers.base import AdapterContext, Channel, OutboundMessage, SendResult
from clinicomm.providers.errors import (
    ComplianceError,
    ConfigurationError,
    ProviderError,
    RateLimitedError,
    RecipientError,
    TransientError,
)
from clinicomm.providers.shared.aws import SigV4Signer, xml_error
from clinicomm.providers.shared.credentials import AwsCredentials
from clinicomm.providers.shared.http import Answer, HttpAdapter, classify_status, error_fields
from clinicomm.providers.shared.messaging import recipient_e164, require_text

API_VERSION = "2010-03-31"

_MESSAGE_ID_RE = re.compile(r"<MessageId>([^<]{1,200})</MessageId>")

_RATE_CODES = frozenset(
    {"Throttling", "ThrottlingException", "ThrottledException", "KMSThrottling"}
)
_CONFIG_CODES = frozenset(
    {
        "AuthorizationError",
        "InvalidClientTokenId",
        "SignatureDoesNotMatch",
        "AccessDenied",
        "AccessDeniedException",
        "IncompleteSignature",
        "MissingAuthenticationToken",
        "ExpiredToken",
        "InvalidSecurity",
        "OptInRequired",
    }
)
_COMPLIANCE_CODES = frozenset({"OptedOut", "OptedOutException"})
_TRANSIENT_CODES = frozenset({"InternalError", "InternalFailure", "ServiceUnavailable"})


class SnsCredentials(AwsCredentials):
    """SNS in one region; `senderId` where the destination country supports it."""

    sender_id: str | None = None


def classify_sns_error(answer: Answer, provider: str = "aws_sns") -> ProviderError:
    """Turn an SNS Query API error answer into the exception the worker acts on."""
    code, message = xml_error(answer.text)
    text = message
    kw = error_fields(answer, provider=provider, code=code, detail=text)
    if code in _RATE_CODES or answer.status == 429:
        return RateLimitedError("rate limited", retry_after=answer.retry_after, **kw)
    if code in _COMPLIANCE_CODES:
        return ComplianceError("recipient opted out of SMS", **kw)
    if code in _CONFIG_CODES:
        return ConfigurationError("credentials or account refused", **kw)
    if code in ("InvalidParameter", "InvalidParameterValue"):
        if "phone" in (text or "").lower():
            return RecipientError("invalid phone number", **kw)
        return ConfigurationError("invalid parameter", **kw)
    if code in _TRANSIENT_CODES or answer.status >= 500:
        return TransientError("provider error", retry_after=answer.retry_after, **kw)
    return classify_status(answer, provider=provider, code=code, detail=text)


@registry.register
class SnsAdapter(HttpAdapter):
    """SMS through Amazon SNS `Publish` to a phone number."""

    key = "aws_sns"
    aliases = ("sns",)
    channel = Channel.SMS
    display_name = "Amazon SNS"
    credentials_model = SnsCredentials

    def __init__(self, credentials: SnsCredentials, context: AdapterContext) -> None:
        super().__init__(credentials, context)
        self._signer = SigV4Signer(credentials, "sns")

    @property
    def creds(self) -> SnsCredentials:
        assert isinstance(self.credentials, SnsCredentials)
        return self.credentials

    def _endpoint(self) -> str:
        if self.creds.endpoint_url:
            return self.creds.endpoint_url.rstrip("/") + "/"
        return f"https://sns.{self.creds.region}.amazonaws.com/"

    def build_form(self, message: OutboundMessage) -> dict[str, str]:
        """The Publish form fields for one SMS; raises RecipientError/ConfigurationError locally."""
        form = {
            "Action": "Publish",
            "Version": API_VERSION,
            "PhoneNumber": recipient_e164(message, self.key),
            "Message": require_text(message, self.key),
        }
        attributes = [("AWS.SNS.SMS.SMSType", "Transactional")]
        if self.creds.sender_id:
            attributes.append(("AWS.SNS.SMS.SenderID", self.creds.sender_id))
        for index, (name, value) in enumerate(attributes, start=1):
            prefix = f"MessageAttributes.entry.{index}"
            form[f"{prefix}.Name"] = name
            form[f"{prefix}.Value.DataType"] = "String"
            form[f"{prefix}.Value.StringValue"] = value
        return form

    def _signed(self, form: dict[str, str]) -> tuple[bytes, dict[str, str]]:
        body = urlencode(form).encode()
        content_type = {"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"}
        return body, self._signer.headers("POST", self._endpoint(), body, content_type)

    async def _call(self, form: dict[str, str]) -> Answer:
        body, headers = self._signed(form)
        answer = await self._request("POST", self._endpoint(), data=body, headers=headers)
        if answer.status >= 300:
            raise classify_sns_error(answer, self.key)
        return answer

    async def send(self, message: OutboundMessage) -> SendResult:
        """Publish one SMS; returns the SNS `MessageId`."""
        answer = await self._call(self.build_form(message))
        match = _MESSAGE_ID_RE.search(answer.text)
        if match is None:
            raise TransientError(
                "answer without a MessageId", provider=self.key, status_code=answer.status
            )
        return SendResult(match.group(1))

    async def probe(self) -> None:
        """`GetSMSAttributes`: a signed read that checks the key, sends nothing."""
        await self._call({"Action": "GetSMSAttributes", "Version": API_VERSION})
