"""The `communicationSettings` document (the seed's schema), as pydantic models.

One document per clinic (and one for the global providers). Each channel has a primary
provider, fallbacks, a fallback strategy and a rate limit. The provider slot is a tagged union
over the registered providers of that channel, so `credentials` is validated by that
provider's own credentials model and every problem is reported with its JSON path.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    create_model,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from clinicomm.providers import registry
from clinicomm.providers.base import Channel, ProviderCredentials, SingleLine

CHANNELS: tuple[Channel, ...] = (Channel.EMAIL, Channel.WHATSAPP, Channel.SMS)


class CamelModel(BaseModel):
    """Base for settings models: camelCase JSON, snake_case Python, unknown fields rejected."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        hide_input_in_errors=True,
    )


class ProviderConfig(CamelModel):
    """One provider slot: which provider, whether it is on, and its credentials."""

    provider: str
    enabled: bool = True
    credentials: ProviderCredentials | None = None

    @property
    def active(self) -> bool:
        return self.enabled and self.provider != registry.DISABLED


class FallbackStrategy(CamelModel):
    """What happens when the clinic's own providers fail.

    `fallbackProvider` is `global` (the platform's provider for the channel), a provider key
    (only that provider of the global chain), or another channel (`sms`: re-send by SMS).
    `enabled: false` means the clinic's own providers only.
    """

    enabled: bool = True
    fallback_provider: str = "global"
    retry_attempts: int = Field(default=3, ge=0, le=10)


class RateLimit(CamelModel):
    """The clinic's own send limits for one channel; a limit left out is not enforced."""

    enabled: bool = False
    max_per_minute: int | None = Field(default=None, ge=1)
    max_per_hour: int | None = Field(default=None, ge=1)
    max_per_day: int | None = Field(default=None, ge=1)
    #: Over the day limit: wait for the next window, or fail the delivery.
    on_day_limit: Literal["wait", "fail"] = "wait"


def _provider_union(channel: Channel) -> Any:
    """A discriminated union of one config model per provider of `channel`, tagged by `provider`."""
    members: list[Any] = []
    for spec in registry.specs(channel):
        tags = [spec.key, *(a for a, k in registry.aliases(channel).items() if k == spec.key)]
        model = create_model(
            f"{channel.value.capitalize()}{_pascal(spec.key)}Config",
            __base__=ProviderConfig,
            provider=_literal(tags),
            credentials=(spec.credentials_model, ...),
            __validators__={"_canonical": field_validator("provider")(_canonicalize(channel))},
        )
        members.append(model)
    disabled = create_model(
        f"{channel.value.capitalize()}DisabledConfig",
        __base__=ProviderConfig,
        provider=_literal([registry.DISABLED]),
        enabled=(bool, False),
        # A disabled slot takes no credentials: a free-form object here would be stored,
        # answered and audited in clear, since no credentials model marks its secrets.
        credentials=(None, None),
    )
    members.append(disabled)
    return Annotated[Union[tuple(members)], Field(discriminator="provider")]  # noqa: UP007


def _literal(values: list[str]) -> Any:
    """A required field whose type is `Literal[*values]` (built at run time)."""
    return (Literal.__getitem__(tuple(values)), ...)


def _canonicalize(channel: Channel) -> Any:
    def canonical(cls: type, value: str) -> str:
        return registry.canonical_key(channel, value)

    return classmethod(canonical)


def _pascal(key: str) -> str:
    return "".join(part.capitalize() for part in key.split("_"))


if TYPE_CHECKING:
    EmailProviderConfig = ProviderConfig
    WhatsAppProviderConfig = ProviderConfig
    SmsProviderConfig = ProviderConfig
else:
    EmailProviderConfig = _provider_union(Channel.EMAIL)
    WhatsAppProviderConfig = _provider_union(Channel.WHATSAPP)
    SmsProviderConfig = _provider_union(Channel.SMS)


class ChannelSettings(CamelModel):
    """Common shape of a channel's settings."""

    enabled: bool = True
    primary: ProviderConfig | None = None
    fallback: list[ProviderConfig] = Field(default_factory=list)
    fallback_strategy: FallbackStrategy = Field(default_factory=FallbackStrategy)
    rate_limit: RateLimit | None = None

    def slots(self) -> Iterator[tuple[str, ProviderConfig]]:
        """(JSON path inside the channel, slot) for the primary and every fallback."""
        if self.primary is not None:
            yield "primary", self.primary
        for index, slot in enumerate(self.fallback):
            yield f"fallback.{index}", slot

    def own_providers(self) -> list[ProviderConfig]:
        """The clinic's active providers, primary first."""
        return [slot for _, slot in self.slots() if slot.active]


class EmailSettings(ChannelSettings):
    """Email: adds the clinic's default sender."""

    primary: EmailProviderConfig | None = None
    fallback: list[EmailProviderConfig] = Field(default_factory=list)
    default_from: SingleLine | None = Field(default=None, max_length=320)
    default_from_name: SingleLine | None = Field(default=None, max_length=200)


_HHMM = re.compile(r"^([01][0-9]|2[0-3]):[0-5][0-9]$")


class QuietHours(CamelModel):
    """Hours of the day (wall clock in `timeZone`, an IANA name) when the clinic's non-urgent
    SMS or WhatsApp messages are held (`delivery.quiet`): `{"start": "21:00", "end": "08:00",
    "timeZone": "America/New_York"}`. A window whose start is after its end spans midnight.
    Held deliveries are released when it ends, each at a stable offset within
    `spreadMinutes` so the morning is not one spike. Urgent messages are never held.
    """

    start: str = Field(description="HH:MM, 24-hour clock")
    end: str = Field(description="HH:MM, 24-hour clock")
    time_zone: str = Field(min_length=1, max_length=64, description="IANA time zone name")
    spread_minutes: int = Field(default=30, ge=0, le=240)

    @field_validator("start", "end")
    @classmethod
    def _hhmm(cls, value: str) -> str:
        if not _HHMM.match(value):
            raise ValueError("must be HH:MM (00:00 to 23:59)")
        return value

    @field_validator("time_zone")
    @classmethod
    def _zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown IANA time zone {value!r}") from None
        return value

    @model_validator(mode="after")
    def _not_empty(self) -> QuietHours:
        if self.start == self.end:
            raise ValueError("start and end must differ")
        return self


class WindowTemplate(CamelModel):
    """The template a free-form WhatsApp text is sent as outside the 24-hour window.

    `name` is a logical template name (a key of the provider credentials' `templates` map) or
    the provider's own name; the message's text becomes its one body parameter (`{{1}}`).
    """

    name: str = Field(min_length=1, max_length=512)
    language: str = Field(default="en", min_length=2, max_length=15)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value


class WhatsAppSettings(ChannelSettings):
    """WhatsApp: numbers without `+` are read in `defaultRegion` when set.

    `windowTemplates` maps a message category (`APPOINTMENT_REMINDER`, `GENERAL`, …) to the
    template a free-form text of that category is sent as when the patient's 24-hour window
    is closed; a category without one fails `template required` (see `delivery.admission`).
    """

    primary: WhatsAppProviderConfig | None = None
    fallback: list[WhatsAppProviderConfig] = Field(default_factory=list)
    default_region: str | None = Field(default=None, min_length=2, max_length=2)
    window_templates: dict[str, WindowTemplate] = Field(default_factory=dict)
    quiet_hours: QuietHours | None = None


class SmsSettings(ChannelSettings):
    """SMS: optional cap on segments per message and a default region for numbers."""

    primary: SmsProviderConfig | None = None
    fallback: list[SmsProviderConfig] = Field(default_factory=list)
    default_region: str | None = Field(default=None, min_length=2, max_length=2)
    max_segments: int | None = Field(default=None, ge=1, le=20)
    quiet_hours: QuietHours | None = None


#: Delivery statuses a status callback can report.
CallbackStatus = Literal[
    "sent", "delivered", "read", "failed", "bounced", "suppressed", "expired", "cancelled"
]

#: A message's claim class (`delivery.records.Priority`).
PriorityName = Literal["urgent", "normal", "bulk"]
#: The longest time-to-live a clinic may set as a category's default.
MAX_TTL_SECONDS = 90 * 86400


class MessagePolicy(CamelModel):
    """`communicationSettings.messages`: the clinic's defaults per message category.

    `priorities` overrides the built-in category → priority mapping (`messaging.timing`),
    e.g. `{"APPOINTMENT_REMINDER": "bulk"}`; `ttlSeconds` sets the default time-to-live of a
    category's messages (`{"OTP": 300}`; the built-in default is 600 s for OTP and AUTH).
    A send request's own `priority`, `expiresAt` or `ttlSeconds` wins over both.
    """

    priorities: dict[str, PriorityName] = Field(default_factory=dict, max_length=200)
    ttl_seconds: dict[str, Annotated[int, Field(ge=1, le=MAX_TTL_SECONDS)]] = Field(
        default_factory=dict, max_length=200
    )

    @field_validator("priorities", "ttl_seconds")
    @classmethod
    def _upper(cls, value: dict[str, Any]) -> dict[str, Any]:
        return {k.upper(): v for k, v in value.items()}


class CallbackSettings(CamelModel):
    """Where the clinic's delivery status changes are POSTed (see `delivery.callbacks`).

    `secret` signs each callback (`Clinicomm-Signature`); it is encrypted at rest and masked in
    answers like every credential. `events` limits the statuses sent (all when left out).
    `allowedUrls` are the URLs a send request may name in `callbackUrl` instead of `url`.
    """

    url: str = Field(min_length=8, max_length=2000)
    secret: SecretStr = Field(min_length=16, max_length=200)
    events: list[CallbackStatus] | None = None
    allowed_urls: list[str] = Field(default_factory=list, max_length=20)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return check_url(value)

    @field_validator("allowed_urls")
    @classmethod
    def _allowed(cls, value: list[str]) -> list[str]:
        return [check_url(v) for v in value]


def check_url(value: str) -> str:
    """An absolute http(s) URL without credentials in it (the destination policy itself is
    `callbacks.targets.check_destination`, the egress policy, applied when sending)."""
    from urllib.parse import urlsplit

    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an absolute http:// or https:// URL")
    if parts.username or parts.password:
        raise ValueError("must not carry credentials")
    return value


class CommunicationSettings(CamelModel):
    """A clinic's whole `communicationSettings` document."""

    version: str = "1.0.0"
    email: EmailSettings | None = None
    whatsapp: WhatsAppSettings | None = None
    sms: SmsSettings | None = None
    callbacks: CallbackSettings | None = None
    messages: MessagePolicy | None = None

    def channel(self, channel: Channel) -> ChannelSettings | None:
        value: ChannelSettings | None = getattr(self, channel.value)
        return value


#: Which JSON path elements are provider union tags (pydantic puts the tag into error paths).
def union_tags() -> frozenset[str]:
    tags: set[str] = {registry.DISABLED}
    for channel in CHANNELS:
        tags.update(registry.keys(channel))
        tags.update(registry.aliases(channel))
    return frozenset(tags)
