"""The send request (HTTP and Python share it), its answer, and the delivery vocabulary."""

from __future__ import annotations

from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

from clinicomm.delivery.records import DeliveryStatus as DeliveryStatus
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
    }
)


class _Camel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class Recipient(_Camel):
    """One patient's addresses; each requested channel uses the matching one."""

    email: SingleLine | None = Field(default=None, max_length=320)
    #: E.164 (`+14155552671`); used for SMS, and for WhatsApp unless `whatsapp` is given.
    phone: SingleLine | None = Field(default=None, max_length=32)
    #: A different number for WhatsApp, if the patient has one.
    whatsapp: SingleLine | None = Field(default=None, max_length=32)


class TemplateSpec(_Camel):
    """A provider template: the clinic's logical name (`appointmentConfirmation`) or the
    provider's own name, with language and positional or named variables."""

    name: SingleLine = Field(min_length=1, max_length=200)
    language: SingleLine = Field(default="en", min_length=2, max_length=15)
    variables: dict[str, str] = Field(default_factory=dict)


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
        try:
            size = len(
                orjson.dumps(self.model_dump(mode="json", by_alias=True, exclude_none=True))
            )
        except TypeError:  # an integer beyond 64 bits: refused (422), never a 500
            raise ValueError("metadata numbers must fit in 64 bits") from None
        if size > METADATA_MAX_BYTES:
            raise ValueError(f"metadata is larger than {METADATA_MAX_BYTES} bytes serialized")
        return self


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

    @field_validator("channels")
    @classmethod
    def _unique(cls, value: list[Channel]) -> list[Channel]:
        return list(dict.fromkeys(value))

    def content(self) -> dict[str, Any]:
        """The part stored encrypted: title, body, html, template."""
        return self.model_dump(
            mode="json", by_alias=True, include={"title", "body", "html", "template"}
        )


class DeliverySummary(_Camel):
    id: str
    channel: Channel
    recipient: str
    status: DeliveryStatus
    error: dict[str, Any] | None = None


class SendAccepted(_Camel):
    """The 202 answer: the message and its deliveries, as stored."""

    id: str
    status: str = "queued"
    deliveries: list[DeliverySummary]


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
