"""Twilio Programmable Messaging, shared by the WhatsApp and SMS adapters.

`POST {baseUrl}/2010-04-01/Accounts/{AccountSid}/Messages.json`, form-encoded, HTTP Basic with
AccountSid:AuthToken (https://www.twilio.com/docs/messaging/api/message-resource). The sender is
`MessagingServiceSid` when configured (Twilio then picks the number), else `From`. Templates go
as `ContentSid` + `ContentVariables` (JSON): since 1 Apr 2025 a WhatsApp template sent as `Body`
outside the window fails (https://www.twilio.com/docs/api/errors/63016).

Error answers are `{"code", "message", "status", "more_info"}`; codes are classified below.
"""

from __future__ import annotations

import json

from clinicomm.providers.base import OutboundMessage, SendResult
from clinicomm.providers.errors import (
    ComplianceError,
    ConfigurationError,
    ProviderDownError,
    ProviderError,
    RateLimitedError,
    RecipientError,
    TransientError,
)
from clinicomm.providers.shared.credentials import TwilioContentTemplate, TwilioCredentials
from clinicomm.providers.shared.http import (
    Answer,
    HttpAdapter,
    basic_auth,
    classify_status,
    error_fields,
)
from clinicomm.providers.shared.messaging import (
    check_param_count,
    ordered_variables,
    recipient_e164,
    require_text,
)

API_VERSION = "2010-04-01"
WHATSAPP_PREFIX = "whatsapp:"

# https://www.twilio.com/docs/api/errors/<code>
_RECIPIENT_CODES = frozenset({21211, 21612, 21614, 21635, 21608, 63003})
_COMPLIANCE_CODES = frozenset({21610, 63016, 63014})  # opted out, outside window, blocked
_QUOTA_CODES = frozenset({63038})  # account daily cap: fail over until the reset
_RATE_CODES = frozenset({20429, 14107})  # too many requests / SMS send rate limit
_CONFIG_CODES = frozenset({20003, 20404, 21606, 21659, 21602, 63007, 63027})


def classify_twilio_error(answer: Answer, provider: str = "twilio") -> ProviderError:
    """Turn a Twilio error answer into the exception the worker acts on."""
    body = answer.json()
    raw = body.get("code") if isinstance(body, dict) else None
    code = int(raw) if isinstance(raw, int | str) and str(raw).isdigit() else None
    text = str(body.get("message")) if isinstance(body, dict) and body.get("message") else None
    kw = error_fields(
        answer, provider=provider, code=str(code) if code is not None else None, detail=text
    )
    if answer.status == 429 or code in _RATE_CODES:
        return RateLimitedError("rate limited", retry_after=answer.retry_after, **kw)
    if code in _RECIPIENT_CODES:
        return RecipientError("recipient cannot receive", **kw)
    if code == 21610:
        return ComplianceError("recipient opted out", **kw)
    if code in _COMPLIANCE_CODES:
        return ComplianceError("blocked by channel rules (window or user block)", **kw)
    if code in _QUOTA_CODES:
        return ProviderDownError("account daily limit reached", **kw)
    if answer.status == 401 or code in _CONFIG_CODES:
        return ConfigurationError("credentials or sender refused", **kw)
    # Anything else (5xx included) by its status alone.
    return classify_status(answer, provider=provider, code=kw["code"], detail=kw["detail"])


class TwilioAdapterBase(HttpAdapter):
    """Twilio send and probe; subclasses say how a number is addressed on their channel."""

    #: 21610: the number replied STOP to this sender (PROVIDER-FACTS §8 item 18).
    opt_out_codes = frozenset({"21610"})

    #: Prefix of channel addresses (`whatsapp:`); empty for SMS.
    address_prefix: str = ""

    @property
    def creds(self) -> TwilioCredentials:
        assert isinstance(self.credentials, TwilioCredentials)
        return self.credentials

    def _auth(self) -> dict[str, str]:
        return basic_auth(self.creds.account_sid, self.creds.auth_token.get_secret_value())

    def _account_url(self) -> str:
        return f"{self.creds.base_url.rstrip('/')}/{API_VERSION}/Accounts/{self.creds.account_sid}"

    def _address(self, number: str) -> str:
        if number.startswith(WHATSAPP_PREFIX):
            number = number[len(WHATSAPP_PREFIX) :]
        return f"{self.address_prefix}{number}"

    def build_form(self, message: OutboundMessage) -> dict[str, str]:
        """The form fields for one message; raises ConfigurationError/RecipientError locally."""
        form: dict[str, str] = {"To": self._address(recipient_e164(message, self.key))}
        if self.creds.messaging_service_sid:
            form["MessagingServiceSid"] = self.creds.messaging_service_sid
        else:
            assert self.creds.from_number  # the credentials model requires one of the two
            if not self.address_prefix and self.creds.from_number.startswith(WHATSAPP_PREFIX):
                raise ConfigurationError("a whatsapp: sender cannot send SMS", provider=self.key)
            form["From"] = self._address(self.creds.from_number)
        if message.template is not None:
            template = message.template
            entry = self.creds.templates.get(template.name, template.name)
            sid = entry.content_sid if isinstance(entry, TwilioContentTemplate) else entry
            variables = dict(template.variables)
            if isinstance(entry, TwilioContentTemplate) and entry.content_variables:
                missing = [v for v in entry.content_variables.values() if v not in variables]
                if missing:
                    raise ConfigurationError(
                        f"template {template.name!r} needs variables {sorted(missing)}",
                        provider=self.key,
                        code="template_params",
                    )
                variables = {k: variables[v] for k, v in entry.content_variables.items()}
            if not sid.startswith("HX"):
                raise ConfigurationError(
                    f"template {template.name!r} has no ContentSid in credentials.templates",
                    provider=self.key,
                    code="template_unmapped",
                )
            params = ordered_variables(variables)
            check_param_count(
                self.creds.template_params, template, sid, len(params), provider=self.key
            )
            form["ContentSid"] = sid
            if variables:
                form["ContentVariables"] = json.dumps(variables)
        else:
            form["Body"] = require_text(message, self.key)
        if message.status_callback:
            # Per-message status reports, whatever the number's console says.
            form["StatusCallback"] = message.status_callback
        return form

    async def send(self, message: OutboundMessage) -> SendResult:
        """Create the Message resource; returns its `sid` (SM…/MM…) and initial status."""
        form = self.build_form(message)
        answer = await self._request(
            "POST", f"{self._account_url()}/Messages.json", data=form, headers=self._auth()
        )
        if answer.status >= 300:
            raise classify_twilio_error(answer, self.key)
        body = answer.json()
        if not isinstance(body, dict) or not body.get("sid"):
            raise TransientError(
                "answer without a message sid", provider=self.key, status_code=answer.status
            )
        status = body.get("status")
        return SendResult(str(body["sid"]), str(status) if status else None)

    async def probe(self) -> None:
        """GET the account resource: checks the credentials, sends nothing."""
        answer = await self._request("GET", f"{self._account_url()}.json", headers=self._auth())
        if answer.status >= 300:
            raise classify_twilio_error(answer, self.key)
