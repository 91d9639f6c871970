"""Meta WhatsApp Cloud API: `POST {apiUrl}/{phoneNumberId}/messages` with a bearer token.

Text messages go out as `type: text`; templates as `type: template` with the body parameters
in variable order ("1", "2", …), a `header` component (text, or image/document/video by link
or media id) and `button` components: `url` (the URL suffix), `quick_reply` (payload) and an
authentication template's copy-code / one-tap button, which Meta takes as a `url` button at
index 0 whose text is the code
(https://developers.facebook.com/docs/whatsapp/business-management-api/authentication-templates/copy-code-button-authentication-templates).
A template named in `copyCodeTemplates` (the seed's `otp` by default) gets that button from
its first variable when the request names no button, so `{"name": "otp", "variables":
{"1": "123456"}}` is a complete authentication message.

`to` is sent in canonical E.164 *with* `+`: Meta accepts the number with or without it and
recommends the `+` and country code
(https://developers.facebook.com/docs/whatsapp/cloud-api/reference/messages); its answer echoes
`wa_id` without `+`, which `providers.phone.from_wa_id` maps back to the same number.

Errors are classified from the Graph error body `{"error": {"code", "error_subcode", "message",
"error_data": {"details"}}}` by `code`, as Meta advises, never by title:
https://developers.facebook.com/documentation/business-messaging/whatsapp/support/error-codes/
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, ClassVar

from pydantic import Field, SecretStr

from clinicomm.providers import registry
from clinicomm.providers.base import (
    Channel,
    OutboundMessage,
    ProviderCredentials,
    SendResult,
    TemplateButton,
    TemplateRef,
)
from clinicomm.providers.errors import (
    ComplianceError,
    ConfigurationError,
    ProviderDownError,
    ProviderError,
    RateLimitedError,
    RecipientError,
    RecipientRateLimitedError,
    TransientError,
)
from clinicomm.providers.shared.http import Answer, HttpAdapter, classify_status, error_fields
from clinicomm.providers.shared.messaging import (
    check_param_count,
    ordered_variables,
    recipient_e164,
    require_text,
    template_name,
)

#: The pair rate limit allows about one message per 6 s to one user (PROVIDER-FACTS §1.3).
PAIR_RATE_DELAY = 6.0
#: A throughput upgrade makes the number unusable for up to a minute (131057).
UPGRADE_DELAY = 60.0


class MetaBusinessCredentials(ProviderCredentials):
    """A WhatsApp Business phone number on the Cloud API, with the clinic's template names."""

    api_url: str = "https://graph.facebook.com/v23.0"
    endpoint_fields: ClassVar[tuple[str, ...]] = ("api_url",)
    api_key: SecretStr
    phone_number_id: str = Field(min_length=1)
    business_account_id: str | None = None
    #: Logical name (otp, appointmentReminder, …) → the approved template's name at Meta.
    templates: dict[str, str] = Field(default_factory=dict)
    #: Template name (logical or Meta's) → number of body parameters it takes; checked locally.
    template_params: dict[str, int] = Field(default_factory=dict)
    #: Authentication templates (logical or Meta's names) with a copy-code / one-tap button:
    #: the code (variable "1") is also sent as that button's parameter.
    copy_code_templates: list[str] = Field(default_factory=lambda: ["otp"])
    #: App Secret: webhooks carry `X-Hub-Signature-256: sha256=HMAC-SHA256(appSecret, body)`.
    app_secret: SecretStr | None = None
    #: The token we gave Meta for the `GET ?hub.verify_token=` subscription handshake.
    verify_token: SecretStr | None = None
    #: Messages per second this number may send (80 default, 20 coexistence, up to 1,000).
    max_per_second: int = Field(default=80, ge=1, le=1000)


# Graph error code → what the worker does. Codes not listed fall back to the HTTP status.
_CONFIG_CODES = frozenset({100, 190, 33, 132001, 131030, 131031, 368})
_TRANSIENT_CODES = frozenset({1, 2, 131057})


def classify_meta_error(answer: Answer, provider: str = "meta_business") -> ProviderError:
    """Turn a Graph API error answer into the exception the worker acts on."""
    body = answer.json()
    error: dict[str, Any] = body.get("error", {}) if isinstance(body, dict) else {}
    raw_code = error.get("code")
    code = int(raw_code) if isinstance(raw_code, int | str) and str(raw_code).isdigit() else None
    details = (error.get("error_data") or {}).get("details") if isinstance(error, dict) else None
    text = " ".join(str(p) for p in (error.get("message"), details) if p) or None
    kw = error_fields(
        answer, provider=provider, code=str(code) if code is not None else None, detail=text
    )
    retry_after = answer.retry_after
    if code == 130429:  # throughput of this sender number exceeded: slow the number down
        return RateLimitedError("sender throughput exceeded", retry_after=retry_after, **kw)
    if code == 80007:  # WABA API-call rate limit
        return RateLimitedError("account rate limit", retry_after=retry_after, **kw)
    if code == 131056:  # pair rate limit: only this recipient waits
        wait = max(PAIR_RATE_DELAY, retry_after or 0.0)
        return RecipientRateLimitedError("recipient rate limited", retry_after=wait, **kw)
    if code == 131047:  # more than 24 h since the user last wrote: a template is required
        return ComplianceError("outside the 24-hour window", **kw)
    if code == 131026:
        return RecipientError("recipient cannot receive WhatsApp messages", **kw)
    if code == 131048:  # spam rate limit (quality): stop using this sender, fail over
        return ProviderDownError("sender restricted for quality", **kw)
    if code == 131057:
        wait = max(UPGRADE_DELAY, retry_after or 0.0)
        return TransientError("throughput upgrade in progress", retry_after=wait, **kw)
    if code in _TRANSIENT_CODES:
        return TransientError("provider temporarily failing", retry_after=retry_after, **kw)
    if answer.status == 401 or code in _CONFIG_CODES:
        return ConfigurationError("account or template setup refused", **kw)
    return classify_status(answer, provider=provider, code=kw["code"], detail=text)


@registry.register
class MetaBusinessAdapter(HttpAdapter):
    """Sends WhatsApp text and template messages through Meta's Cloud API."""

    key = "meta_business"
    global_default = True
    throughput_fields = ("phone_number_id", "max_per_second")
    #: 131026: message undeliverable: not on WhatsApp, an old app, terms not accepted
    #: (PROVIDER-FACTS §1.4). The clinic's channel fallback may reach the patient by SMS.
    unreachable_codes = frozenset({"131026"})
    channel = Channel.WHATSAPP
    display_name = "Meta WhatsApp Cloud API"
    credentials_model = MetaBusinessCredentials

    @property
    def creds(self) -> MetaBusinessCredentials:
        assert isinstance(self.credentials, MetaBusinessCredentials)
        return self.credentials

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.creds.api_key.get_secret_value()}"}

    def _base(self) -> str:
        return f"{self.creds.api_url.rstrip('/')}/{self.creds.phone_number_id}"

    def build_payload(self, message: OutboundMessage) -> dict[str, Any]:
        """The JSON body for one message; raises ConfigurationError/RecipientError locally."""
        to = recipient_e164(message, self.key)
        payload: dict[str, Any] = {
            "messaging_product": "whatsapp",
            "recipient_type": "individual",
            "to": to,
        }
        if message.template is not None:
            template = message.template
            name = template_name(template, self.creds.templates)
            params = ordered_variables(template.variables)
            check_param_count(
                self.creds.template_params, template, name, len(params), provider=self.key
            )
            body: dict[str, Any] = {
                "name": name,
                # The spec requires `policy`; "deterministic" is the only value.
                "language": {"policy": "deterministic", "code": template.language},
            }
            components = self._components(template, name, params)
            if components:
                body["components"] = components
            payload.update(type="template", template=body)
        else:
            text = require_text(message, self.key)
            payload.update(type="text", text={"preview_url": False, "body": text})
        return payload

    def _components(
        self, template: TemplateRef, name: str, params: list[str]
    ) -> list[dict[str, Any]]:
        """Header, body and button components in Meta's shape (the module docstring)."""
        out: list[dict[str, Any]] = []
        header = template.header
        if header is not None:
            if header.format == "text":
                parameter: dict[str, Any] = {"type": "text", "text": header.text or ""}
            else:
                media: dict[str, Any] = (
                    {"id": header.media_id} if header.media_id else {"link": header.link}
                )
                if header.format == "document" and header.filename:
                    media["filename"] = header.filename
                parameter = {"type": header.format, header.format: media}
            out.append({"type": "header", "parameters": [parameter]})
        if params:
            out.append(
                {"type": "body", "parameters": [{"type": "text", "text": p} for p in params]}
            )
        buttons = list(template.buttons)
        copy_code = {template.name, name} & set(self.creds.copy_code_templates)
        if not buttons and copy_code and params:
            buttons = [TemplateButton(kind="copy_code", index=0, text=params[0])]
        for button in sorted(buttons, key=lambda b: b.index):
            if button.kind == "quick_reply":
                sub_type, value = "quick_reply", {"type": "payload", "payload": button.payload}
            else:  # url, and copy_code which Meta takes as a url button with the code
                sub_type, value = "url", {"type": "text", "text": button.text}
            out.append(
                {"type": "button", "sub_type": sub_type, "index": str(button.index),
                 "parameters": [value]}
            )
        return out

    async def send(self, message: OutboundMessage) -> SendResult:
        """POST the message; returns the `wamid` from `messages[0].id`."""
        payload = self.build_payload(message)
        answer = await self._request(
            "POST", f"{self._base()}/messages", json_body=payload, headers=self._headers()
        )
        if answer.status >= 300:
            raise classify_meta_error(answer, self.key)
        body = answer.json()
        try:
            wamid = str(body["messages"][0]["id"])
        except (KeyError, IndexError, TypeError):
            raise TransientError(
                "answer without a message id",
                provider=self.key,
                status_code=answer.status,
            ) from None
        status = body["messages"][0].get("message_status")
        return SendResult(provider_message_id=wamid, provider_status=status)

    reads_token_expiry = True

    async def token_expiry(self) -> datetime | None:
        """`GET {apiUrl}/debug_token?input_token=<token>` (authorised by the token itself, as
        a system user's token may inspect itself): `data.expires_at` (Unix seconds; 0 for a
        token that never expires, such as most system-user tokens), or the earlier
        `data_access_expires_at`. https://developers.facebook.com/docs/graph-api/reference/debug_token/
        """
        token = self.creds.api_key.get_secret_value()
        answer = await self._request(
            "GET",
            f"{self.creds.api_url.rstrip('/')}/debug_token",
            params={"input_token": token},
            headers=self._headers(),
        )
        if answer.status >= 300:
            raise classify_meta_error(answer, self.key)
        body = answer.json()
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, dict):
            raise TransientError("debug_token answer without data", provider=self.key)
        if data.get("is_valid") is False:
            raise ConfigurationError("the access token is not valid", provider=self.key)
        moments = [
            int(v)
            for v in (data.get("expires_at"), data.get("data_access_expires_at"))
            if isinstance(v, int | str) and str(v).isdigit() and int(v) > 0
        ]
        return datetime.fromtimestamp(min(moments), UTC) if moments else None

    async def probe(self) -> None:
        """GET the phone number's id: checks the token and the number, sends nothing."""
        answer = await self._request(
            "GET", self._base(), params={"fields": "id"}, headers=self._headers()
        )
        if answer.status >= 300:
            raise classify_meta_error(answer, self.key)
