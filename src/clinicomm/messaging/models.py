"""The send request (HTTP and Python share it), its answer, and the delivery vocabulary."""

from __future__ import annotations

from typing import Any, Literal

import orjson
from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from clinicomm.delivery.records import DeliveryStatus as DeliveryStatus
from clinicomm.delivery.records import Priority as Priority
from clinicomm.providers.base import Channel, SingleLine

#: `metadata` holds routing and correlation ids: at most this many keys and this many bytes
#: serialized (a larger object is either a mistake or patient data that has no place there).
METADATA_MAX_KEYS = 50
METADATA_MAX_BYTES = 8 * 1024

TERMINAL = frozenset(
    {
        DeliveryStatus.SENT,
        DeliveryStatus.DELIVERED,
        DeliveryStatus.READ,
        DeliveryStatus.FAILED,
        DeliveryStatus.BOUNCED,
        DeliveryStatus.SUPPRESSED,
        DeliveryStatus.EXPIRED,
        DeliveryStatus.CANCELLED,
    }
)
#: The fields about time (`messaging.timing`); left out of the idempotency hash when unset,
#: so a key stored before they existed still matches its request.
TIMING_FIELDS = frozenset({"priority", "send_at", "expires_at", "ttl_seconds"})


class _Camel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class Recipient(_Camel):
    """One patient's addresses; each requested channel uses the matching one."""

    email: SingleLine | None = Field(default=None, max_length=320)
    #: E.164 (`+14155552671`); used for SMS, and for WhatsApp unless `whatsapp` is given.
    phone: SingleLine | None = Field(default=None, max_length=32)
    #: A different number for WhatsApp, if the patient has one.
    whatsapp: SingleLine | None = Field(default=None, max_length=32)


class TemplateHeaderSpec(_Camel):
    """The header's parameter: `text`, or an `image`/`document`/`video` by https `link` (or
    the provider's `mediaId`); a document may name its `filename`."""

    type: Literal["text", "image", "document", "video"]
    text: str | None = Field(default=None, min_length=1, max_length=60)
    link: SingleLine | None = Field(default=None, max_length=2000)
    media_id: SingleLine | None = Field(default=None, max_length=200)
    filename: SingleLine | None = Field(default=None, max_length=240)

    @model_validator(mode="after")
    def _one_source(self) -> TemplateHeaderSpec:
        if self.type == "text":
            if self.text is None or self.link or self.media_id:
                raise ValueError("a text header takes `text` only")
            return self
        if self.text is not None:
            raise ValueError(f"an {self.type} header takes `link` or `mediaId`, not `text`")
        if (self.link is None) == (self.media_id is None):
            raise ValueError(f"an {self.type} header takes exactly one of `link` and `mediaId`")
        if self.link is not None and not self.link.startswith("https://"):
            raise ValueError("the header's `link` must be an https:// URL")
        if self.filename is not None and self.type != "document":
            raise ValueError("only a document header takes `filename`")
        return self


class TemplateButtonSpec(_Camel):
    """A button's parameter, by its `index` (0-9) in the approved template: `url` (`text`:
    the dynamic suffix of the button's URL), `copy_code` (an authentication template's
    copy-code or one-tap button; `text`: the code) or `quick_reply` (`payload`)."""

    type: Literal["url", "copy_code", "quick_reply"]
    index: int = Field(ge=0, le=9)
    text: SingleLine | None = Field(default=None, min_length=1, max_length=2000)
    payload: SingleLine | None = Field(default=None, min_length=1, max_length=256)

    @model_validator(mode="after")
    def _parameter(self) -> TemplateButtonSpec:
        if self.type == "quick_reply":
            if self.payload is None or self.text is not None:
                raise ValueError("a quick_reply button takes `payload` only")
        elif self.text is None or self.payload is not None:
            raise ValueError(f"a {self.type} button takes `text` only")
        return self


class TemplateComponentsSpec(_Camel):
    """Template components beyond the body (whose parameters are `variables`)."""

    header: TemplateHeaderSpec | None = None
    buttons: list[TemplateButtonSpec] = Field(default_factory=list, max_length=10)

    @field_validator("buttons")
    @classmethod
    def _distinct(cls, value: list[TemplateButtonSpec]) -> list[TemplateButtonSpec]:
        if len({b.index for b in value}) != len(value):
            raise ValueError("two buttons with the same index")
        return value


class TemplateSpec(_Camel):
    """A provider template: the clinic's logical name (`appointmentConfirmation`) or the
    provider's own name, with language and positional or named variables (the body's
    parameters), and optionally the header and button parameters (`components`)."""

    name: SingleLine = Field(min_length=1, max_length=200)
    language: SingleLine = Field(default="en", min_length=2, max_length=15)
    variables: dict[str, str] = Field(default_factory=dict)
    components: TemplateComponentsSpec | None = None


class SendMetadata(BaseModel):
    """Routing and correlation ids. `clinicId` picks the clinic's providers; other keys are
    kept as opaque ids (they must not carry patient data)."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    clinic_id: SingleLine | None = Field(default=None, alias="clinicId", max_length=64)

    @model_validator(mode="after")
    def _bounded(self) -> SendMetadata:
        extra = self.model_extra or {}
        if len(extra) + (self.clinic_id is not None) > METADATA_MAX_KEYS:
            raise ValueError(f"metadata has more than {METADATA_MAX_KEYS} keys")
        if _surely_small(self.clinic_id, extra):
            return self
        try:
            size = len(
                orjson.dumps(self.model_dump(mode="json", by_alias=True, exclude_none=True))
            )
        except TypeError:  # an integer beyond 64 bits: refused (422), never a 500
            raise ValueError("metadata numbers must fit in 64 bits") from None
        if size > METADATA_MAX_BYTES:
            raise ValueError(f"metadata is larger than {METADATA_MAX_BYTES} bytes serialized")
        return self


def _surely_small(clinic_id: str | None, extra: dict[str, Any]) -> bool:
    """Whether metadata of string values is within `METADATA_MAX_BYTES` serialized, without
    serializing it (on every send's path): a character is at most 6 bytes of JSON (orjson's
    longest escape, `\\u00XX`; UTF-8 takes at most 4), and a pair adds 6 (quotes, colon,
    comma). False: not sure (a value of another type, or near the limit), serialize it."""
    total = 2  # the braces
    if clinic_id is not None:
        total += 6 * (len("clinicId") + len(clinic_id)) + 6
    for key, value in extra.items():
        if type(value) is not str:
            return False
        total += 6 * (len(key) + len(value)) + 6
    return total <= METADATA_MAX_BYTES


class SendRequest(_Camel):
    """What a business service asks: one message, to recipients, on channels."""

    category: SingleLine = Field(default="GENERAL", min_length=1, max_length=60)
    #: The email subject: one line (a line break would be a header injection).
    title: SingleLine | None = Field(default=None, max_length=998)
    body: str | None = Field(default=None, max_length=100_000)
    html: str | None = Field(default=None, max_length=1_000_000)
    recipients: list[Recipient] = Field(min_length=1, max_length=1000)
    channels: list[Channel] = Field(min_length=1, max_length=3)
    template: TemplateSpec | None = None
    metadata: SendMetadata = Field(default_factory=SendMetadata)
    #: Where this message's status callbacks go instead of the clinic's `callbacks.url`; must
    #: be on the clinic's `callbacks.allowedUrls`.
    callback_url: str | None = Field(default=None, max_length=2000)
    #: Claim class; default from `category` (`messaging.timing`): OTP/AUTH urgent,
    #: MARKETING/NEWSLETTER/REMINDER bulk, the rest normal.
    priority: Priority | None = None
    #: When the deliveries become due (ISO 8601 with an offset; at most 90 days ahead).
    send_at: AwareDatetime | None = None
    #: After this instant a delivery not yet handed to a provider ends `expired`.
    expires_at: AwareDatetime | None = None
    #: Or: the time-to-live in seconds, from `sendAt` (or acceptance). OTP defaults to 600.
    ttl_seconds: int | None = Field(default=None, ge=1, le=90 * 86400)

    @field_validator("channels")
    @classmethod
    def _unique(cls, value: list[Channel]) -> list[Channel]:
        return list(dict.fromkeys(value))

    def content(self) -> dict[str, Any]:
        """The part stored encrypted: title, body, html, template (as
        `model_dump(mode="json", by_alias=True, include=…)` answers it, built directly: it is
        on every send's path)."""
        template = self.template
        return {
            "title": self.title,
            "body": self.body,
            "html": self.html,
            "template": None if template is None else template.model_dump(
                mode="json", by_alias=True
            ),
        }


class DeliverySummary(_Camel):
    id: str
    channel: Channel
    recipient: str
    status: DeliveryStatus
    error: dict[str, Any] | None = None
    #: Held until then (`sendAt`, quiet hours); absent when due now.
    not_before: str | None = None


class SendAccepted(_Camel):
    """The 202 answer: the message and its deliveries, as stored."""

    id: str
    status: str = "queued"
    deliveries: list[DeliverySummary]
    priority: Priority | None = None
    send_at: str | None = None
    expires_at: str | None = None


#: Messages one batch send may carry.
BATCH_MAX_ITEMS = 500


class BatchSendItem(SendRequest):
    """One message of a batch: a send request with its own `idempotencyKey`."""

    idempotency_key: str | None = Field(
        default=None,
        min_length=1,
        max_length=255,
        description="As the `Idempotency-Key` header of a single send, for this item alone",
    )


class BatchSendRequest(_Camel):
    """`POST /api/v1/communications/batch`: up to 500 messages, each checked on its own."""

    items: list[BatchSendItem] = Field(min_length=1, max_length=BATCH_MAX_ITEMS)


class BatchItemError(BaseModel):
    """Why one item was refused (the error shape of a single send, paths from the batch)."""

    code: str
    message: str
    details: list[dict[str, Any]] = Field(default_factory=list)


class BatchItemAnswer(_Camel):
    """One item's answer: its status (202 accepted, else the single send's error status),
    the message id and deliveries when accepted, or the error."""

    index: int
    status: int
    id: str | None = None
    deliveries: list[DeliverySummary] | None = None
    error: BatchItemError | None = None


class BatchAccepted(_Camel):
    """The batch answer: one entry per item, in order."""

    accepted: int
    refused: int
    items: list[BatchItemAnswer]
