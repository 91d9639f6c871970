"""Credentials models shared by a provider's adapters on several channels.

Twilio, MessageBird and Vonage use one account for WhatsApp and SMS, so their credentials
models live here and both channel modules import them.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic.alias_generators import to_camel

from clinicomm.providers.base import ProviderCredentials


class TwilioContentTemplate(BaseModel):
    """A Twilio Content template: its `contentSid` (HX…) and, optionally, which of the
    request's template variables fills each of its `contentVariables` ("1" → "code",
    "2" → "time"); without that map the request's variables are sent as they are.
    https://www.twilio.com/docs/content/send-templates-created-with-the-content-template-builder
    """

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", str_strip_whitespace=True
    )

    content_sid: str = Field(pattern=r"^HX[0-9a-fA-F]{32}$")
    content_variables: dict[str, str] = Field(default_factory=dict)


class TwilioCredentials(ProviderCredentials):
    """Twilio account credentials; a sender is `fromNumber` or `messagingServiceSid`."""

    account_sid: str = Field(min_length=2)
    auth_token: SecretStr
    from_number: str | None = None
    messaging_service_sid: str | None = None
    base_url: str = "https://api.twilio.com"
    endpoint_fields: ClassVar[tuple[str, ...]] = ("base_url",)
    #: Logical template name (otp, appointmentReminder, …) → Content API `ContentSid` (HX…),
    #: or `{"contentSid": "HX…", "contentVariables": {"1": "<request variable>"}}`.
    templates: dict[str, str | TwilioContentTemplate] = Field(default_factory=dict)
    #: Template name (logical or ContentSid) → number of variables it takes; checked locally.
    template_params: dict[str, int] = Field(default_factory=dict)
    #: Shared key of a Twilio Webhook Rule: such callbacks are signed with HMAC-SHA256 and
    #: this key instead of HMAC-SHA1 and the auth token (`X-Twilio-Webhooks-Signature-Settings`).
    webhook_shared_key: SecretStr | None = None

    @model_validator(mode="after")
    def _sender(self) -> TwilioCredentials:
        if not self.from_number and not self.messaging_service_sid:
            raise ValueError("fromNumber or messagingServiceSid is required")
        return self


class MessageBirdCredentials(ProviderCredentials):
    """MessageBird access key; `channelId` for WhatsApp, `originator` for SMS."""

    access_key: SecretStr
    channel_id: str | None = None
    originator: str | None = None
    #: Signs webhooks: `MessageBird-Signature-JWT` (HMAC JWT with url_hash and payload_hash).
    signing_key: SecretStr | None = None
    base_url: str | None = None
    endpoint_fields: ClassVar[tuple[str, ...]] = ("base_url",)
    #: WhatsApp template namespace (the WABA's), needed for `hsm` template sends.
    template_namespace: str | None = None
    #: Logical template name → the approved WhatsApp template's name.
    templates: dict[str, str] = Field(default_factory=dict)
    #: Template name (logical or provider's) → number of parameters; checked locally.
    template_params: dict[str, int] = Field(default_factory=dict)


class BirdCredentials(ProviderCredentials):
    """A Bird (formerly MessageBird) workspace channel on the Channels API: one channel is
    one WhatsApp number or one SMS sender (`channelId`), in a workspace (`workspaceId`)."""

    access_key: SecretStr
    workspace_id: str = Field(min_length=1)
    channel_id: str = Field(min_length=1)
    base_url: str = "https://api.bird.com"
    endpoint_fields: ClassVar[tuple[str, ...]] = ("base_url",)
    #: Logical template name (otp, appointmentReminder, …) → the Studio template's
    #: `projectId`; request variables are sent as its named parameters.
    templates: dict[str, str] = Field(default_factory=dict)
    #: The template version sent (`latest`, or a version id).
    template_version: str = "latest"
    #: Signing key of the workspace's webhook subscription (`messagebird-signature`).
    signing_key: SecretStr | None = None


class VonageCredentials(ProviderCredentials):
    """Vonage API key and secret (basic auth) or application id and private key (JWT)."""

    api_key: str | None = None
    api_secret: SecretStr | None = None
    application_id: str | None = None
    private_key: SecretStr | None = None
    #: Signature secret: Messages API webhooks carry `Authorization: Bearer <JWT HS256>`.
    signature_secret: SecretStr | None = None
    from_number: str = Field(min_length=1)
    base_url: str = "https://api.nexmo.com"
    endpoint_fields: ClassVar[tuple[str, ...]] = ("base_url",)
    #: Logical template name → WhatsApp template name (`namespace:name` for older accounts).
    templates: dict[str, str] = Field(default_factory=dict)
    #: Template name (logical or provider's) → number of parameters; checked locally.
    template_params: dict[str, int] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _auth(self) -> VonageCredentials:
        if not (self.api_key and self.api_secret) and not (
            self.application_id and self.private_key
        ):
            raise ValueError("apiKey and apiSecret, or applicationId and privateKey, are required")
        return self


class AwsCredentials(ProviderCredentials):
    """An AWS access key for one region (SES, SNS)."""

    region: str = Field(min_length=1)
    access_key_id: str = Field(min_length=1)
    secret_access_key: SecretStr
    endpoint_url: str | None = None
    endpoint_fields: ClassVar[tuple[str, ...]] = ("endpoint_url",)
