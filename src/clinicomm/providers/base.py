"""What every provider adapter is: its credentials model, its message, its contract.

An adapter module (`providers/<channel>/<provider>.py`) declares a credentials model (a
`ProviderCredentials` subclass whose secret fields are `SecretStr`) and a `ProviderAdapter`
subclass, and registers the adapter with one line (`registry.register(MyAdapter)`). This package
imports nothing from the rest of clinicomm, so an adapter can be read, tested and reused alone.
"""

from __future__ import annotations

import abc
import re
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, ClassVar

import aiohttp
from pydantic import AfterValidator, BaseModel, ConfigDict, SecretStr, field_validator
from pydantic.alias_generators import to_camel

from clinicomm.providers.egress import PERMISSIVE, EgressPolicy
from clinicomm.providers.errors import ProviderError

MASK = "********"

#: CR, LF, tab and every other C0/C1 control character, DEL, and the Unicode line and paragraph
#: separators: none may appear in a header value, a sender name or an address.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def single_line(value: str) -> str:
    """`value` unchanged, or ValueError when it holds a line break or a control character
    (the error never repeats the value: it may be a patient's data)."""
    if _CONTROL.search(value):
        raise ValueError("must not contain line breaks or control characters")
    return value


#: A string that goes into a header or an address: one line, no control characters.
SingleLine = Annotated[str, AfterValidator(single_line)]


class Channel(StrEnum):
    """A way of reaching a patient."""

    EMAIL = "email"  # an email address, through SMTP or an email API
    WHATSAPP = "whatsapp"  # an E.164 number on WhatsApp
    SMS = "sms"  # an E.164 number by text message


class ProviderCredentials(BaseModel):
    """Base of every provider's credentials model.

    Field names are snake_case in Python and camelCase in JSON (`accessKeyId`). Secret fields
    are typed `SecretStr` (or `SecretStr | None`): that one declaration drives encryption at
    rest, masking in answers and redaction in logs. Unknown fields are rejected.
    """

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        str_strip_whitespace=True,
        hide_input_in_errors=True,
    )

    #: When the credentials stop working (token expiry); drives the expiry alert.
    expires_at: datetime | None = None

    #: Fields (Python names) that choose where the adapter connects: a URL or a host/port.
    #: Changing one while keeping a secret as the mask is refused at save time, and each is
    #: checked against the egress policy (`providers.egress.EgressPolicy.check_endpoint`).
    endpoint_fields: ClassVar[tuple[str, ...]] = ()
    #: Of `endpoint_fields`, those holding a bare host name (not a URL).
    host_fields: ClassVar[tuple[str, ...]] = ()

    @field_validator("*", mode="after")
    @classmethod
    def _one_line(cls, value: Any) -> Any:
        """Every plain string of credentials (hosts, senders, ids) is one line; secrets are
        not checked (they are never put in a header as given)."""
        return single_line(value) if isinstance(value, str) else value

    @classmethod
    def secret_fields(cls) -> tuple[str, ...]:
        """The JSON (alias) names of the secret fields, in declaration order."""
        return tuple(
            (info.alias or name)
            for name, info in cls.model_fields.items()
            if _is_secret(info.annotation)
        )

    def public_dict(self) -> dict[str, Any]:
        """JSON form with every secret replaced by the mask; safe to answer and to log."""
        data = self.model_dump(mode="json", by_alias=True, exclude_none=True)
        for key in self.secret_fields():
            if key in data:
                data[key] = MASK
        return data

    def secret_dict(self) -> dict[str, Any]:
        """JSON form with secrets in clear. Only for the encrypted store; never log it."""
        data = self.model_dump(mode="json", by_alias=True, exclude_none=True)
        for name, info in type(self).model_fields.items():
            value = getattr(self, name)
            if isinstance(value, SecretStr):
                data[info.alias or name] = value.get_secret_value()
        return data


def _is_secret(annotation: Any) -> bool:
    if annotation is SecretStr:
        return True
    args = getattr(annotation, "__args__", ())
    return any(a is SecretStr for a in args)


@dataclass(frozen=True, slots=True)
class TemplateHeader:
    """A template's header parameter: `text`, or a media `image`/`document`/`video` by
    https `link` (or a provider media `media_id`); a document may carry a `filename`."""

    format: str  # text | image | document | video
    text: str | None = None
    link: str | None = None
    media_id: str | None = None
    filename: str | None = None


@dataclass(frozen=True, slots=True)
class TemplateButton:
    """A template button's parameter, by the button's `index` (0-9) in the template:
    `url` (the dynamic URL suffix in `text`), `copy_code` (an authentication template's
    copy-code / one-tap button: the code in `text`) or `quick_reply` (`payload`)."""

    kind: str  # url | copy_code | quick_reply
    index: int
    text: str | None = None
    payload: str | None = None


@dataclass(frozen=True, slots=True)
class TemplateRef:
    """A provider-side template to send instead of free text.

    `name` is either the clinic's logical name (a key of the credentials' `templates` map) or
    the provider's own template name; `variables` are positional ("1", "2", …) or named and
    fill the body. `header` and `buttons` are the other components' parameters (Meta sends
    them as `header`/`button` components; other providers take what their API has).
    """

    name: str
    language: str = "en"
    variables: dict[str, str] = field(default_factory=dict)
    header: TemplateHeader | None = None
    buttons: tuple[TemplateButton, ...] = ()


@dataclass(frozen=True, slots=True)
class OutboundMessage:
    """One message to one recipient on one channel, as the worker hands it to an adapter.

    `to` is an email address (email) or a canonical E.164 number with `+` (WhatsApp, SMS).
    `reference` is our opaque delivery id: the only thing an adapter may put in provider
    metadata (tags, custom args); never a name, address or body.
    """

    channel: Channel
    to: str
    reference: str
    subject: str | None = None
    text: str | None = None
    html: str | None = None
    template: TemplateRef | None = None
    from_email: str | None = None  # clinic's defaultFrom, when the credentials have none
    from_name: str | None = None
    #: Where the provider should post this message's status reports (the clinic's webhook
    #: route, or the global one), when `CLINICOMM_PUBLIC_URL` is set; adapters whose API
    #: takes a per-message callback send it (Twilio `StatusCallback`, MessageBird
    #: `reportUrl`). Built by `webhook_callback_url`.
    status_callback: str | None = None


def webhook_callback_url(public_url: str | None, provider: str, owner: str | None) -> str | None:
    """`{public_url}/api/v1/webhooks/{provider}/{owner}`: the webhook route of a clinic's own
    provider (`owner` = the clinic id) or of a global one (`owner` = "global"); None without a
    public URL or an owner."""
    if not public_url or not owner:
        return None
    return f"{public_url.rstrip('/')}/api/v1/webhooks/{provider}/{owner}"


@dataclass(frozen=True, slots=True)
class SendResult:
    """What a provider answered when it took the message."""

    provider_message_id: str | None
    #: Provider's own status word, if it gave one ("queued", "accepted", "202").
    provider_status: str | None = None


@dataclass(slots=True)
class AdapterContext:
    """Process-wide things an adapter may use; built once, shared by all adapters."""

    #: The one aiohttp session of the process (connection pool, keep-alive).
    http: aiohttp.ClientSession | None = None
    #: Per-request timeout for provider calls, in seconds.
    timeout: float = 10.0
    #: `production` refuses unsafe settings (plain-text SMTP to remote hosts, no cert checks).
    environment: str = "development"
    #: Extra CA file for TLS (tests use a local CA); None means the system store.
    ca_file: str | None = None
    #: Where adapters may connect (`providers.egress`); the permissive default is for tests
    #: and tools that build a context by hand.
    egress: EgressPolicy = PERMISSIVE
    #: The service's public base URL (`CLINICOMM_PUBLIC_URL`), for per-message status
    #: callbacks; None: adapters request none (the provider console's URL applies).
    public_url: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class ProviderAdapter(abc.ABC):
    """One provider, configured for one clinic (or the global config).

    Subclasses set the class attributes and implement `send` and `probe`. An adapter instance
    is built per (clinic, config version) and reused for every message until the config
    changes; `close` releases what it holds (SMTP connections). `repr` never shows a secret.
    """

    key: ClassVar[str]
    channel: ClassVar[Channel]
    display_name: ClassVar[str]
    credentials_model: ClassVar[type[ProviderCredentials]]
    #: Other spellings of `key` accepted in settings documents (`aws_ses` for `ses`).
    aliases: ClassVar[tuple[str, ...]] = ()
    #: `ComplianceError` codes meaning the recipient opted out with this provider (Twilio
    #: 21610): the worker records a suppression with the failure.
    opt_out_codes: ClassVar[frozenset[str]] = frozenset()
    #: `RecipientError` codes meaning a permanent bounce (besides SMTP 5.1.x): suppressed.
    bounce_codes: ClassVar[frozenset[str]] = frozenset()
    #: `RecipientError` codes meaning the recipient cannot be reached on this channel at all
    #: (not a WhatsApp user): the clinic's channel fallback may reach them elsewhere.
    unreachable_codes: ClassVar[frozenset[str]] = frozenset()
    #: Credentials fields (sender id, messages per second) when the provider caps a sender's
    #: throughput (a WhatsApp phone number: `phone_number_id`, `max_per_second`).
    throughput_fields: ClassVar[tuple[str, str] | None] = None
    #: The provider the seed's global variables assume for this channel when
    #: `<CHANNEL>_PROVIDER` is unset (one per channel: smtp, meta_business, twilio).
    global_default: ClassVar[bool] = False
    #: Messages one `send_batch` call may carry (SendGrid 1,000 personalizations, Postmark
    #: 500); 1: the provider has no batch call and every message goes through `send`.
    max_batch: ClassVar[int] = 1

    def __init__(self, credentials: ProviderCredentials, context: AdapterContext) -> None:
        self.credentials = credentials
        self.context = context

    @abc.abstractmethod
    async def send(self, message: OutboundMessage) -> SendResult:
        """Hand one message to the provider.

        Returns the provider's message id. Raises a `ProviderError` subclass, classified at
        this boundary: `RateLimitedError` (with `retry_after`) when the provider asked us to slow
        down, `TransientError` for timeouts and 5xx worth retrying on the same provider,
        `ProviderDownError` when it is unreachable or out of quota, `ConfigurationError` for
        bad credentials or sender, `RecipientError` for a bad address, `ComplianceError` for an
        opt-out or a closed WhatsApp window. Never raises anything else for a provider answer.
        """

    @abc.abstractmethod
    async def probe(self) -> None:
        """Check connectivity and credentials cheaply, without sending a message.

        Returns None when the provider answers and accepts the credentials; raises the same
        classified errors as `send` otherwise.
        """

    #: True when the provider's API tells when the credentials expire (`token_expiry`).
    reads_token_expiry: ClassVar[bool] = False

    async def token_expiry(self) -> datetime | None:
        """When the credentials stop working, as the provider says (Meta's `debug_token`);
        None when they never expire or the provider exposes no expiry
        (`reads_token_expiry` False: only a typed-in `expiresAt` is known). Raises the same
        classified errors as `probe`."""
        return None

    def batch_key(self, message: OutboundMessage) -> Hashable | None:
        """Messages with equal keys may go out together in one `send_batch` call (same
        content, template or endpoint); None: this message is sent alone. Only consulted when
        `max_batch` > 1."""
        return None

    async def send_batch(
        self, messages: Sequence[OutboundMessage]
    ) -> list[SendResult | ProviderError]:
        """Hand several messages of one `batch_key` to the provider in one call.

        Answers one entry per message, in order: its `SendResult`, or the classified
        `ProviderError` the provider gave for that recipient (a batch that fails partly is split
        by the provider's per-recipient answer). Raises a `ProviderError` when the call as a
        whole failed (it then applies to every message). The default sends them one by one.
        """
        results: list[SendResult | ProviderError] = []
        for message in messages:
            try:
                results.append(await self.send(message))
            except ProviderError as exc:
                results.append(exc)
        return results

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections held by this adapter. Safe to call twice."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} key={self.key} channel={self.channel.value}>"

    def describe(self) -> Iterator[str]:
        """Non-secret facts for logs: provider key and channel."""
        yield f"{self.channel.value}:{self.key}"
