"""Response models of the status, monitoring and suppression routes: every answer is typed in
`/openapi.json`, so a generated client returns classes, not dicts.

The routes build these answers as JSON-ready dicts (`delivery.status`, `delivery.stats`, …);
the models document them and FastAPI checks each answer against them. Times are ISO 8601
strings (`format: date-time`) exactly as stored. Nested provider error documents are open
objects: their fields depend on the provider (`class`, `code`, `statusCode`, `message`, …).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from clinicomm.messaging.models import DeliveryStatus
from clinicomm.providers.base import Channel

DateTime = Annotated[str, Field(json_schema_extra={"format": "date-time"})]


class _Answer(BaseModel):
    model_config = ConfigDict(populate_by_name=True)


class Attempt(_Answer):
    """One provider call of a delivery."""

    provider: str = Field(description="The chain hop: `clinic:sendgrid`, `global:smtp`")
    outcome: str = Field(description="`sent` or `failed`")
    errorClass: str | None
    statusCode: int | None
    errorCode: str | None
    detail: str | None
    durationMs: int
    time: DateTime | None


class DeliveryError(_Answer):
    """Why a delivery failed (or what failed before it succeeded): one item per provider."""

    model_config = ConfigDict(extra="allow")

    reason: str | None = None
    errors: list[dict[str, Any]] = Field(default_factory=list)


class CallbackState(_Answer):
    """One status callback of a delivery and how its delivery to the caller went."""

    eventId: str = Field(description="Stable across retries: drop duplicates by it")
    status: str
    state: Literal["pending", "sent", "expired", "superseded"]
    attempts: int
    lastError: str | None
    nextAttemptAt: DateTime | None
    sentAt: DateTime | None


class _DeliveryFields(_Answer):
    id: str
    channel: Channel
    recipient: str | None = Field(
        description="The address; null once erased by retention or when its key is not held"
    )
    status: DeliveryStatus
    provider: str | None
    providerMessageId: str | None
    parentId: str | None = Field(description="The delivery this one replaces (channel fallback)")
    attempts: list[Attempt]
    error: DeliveryError | None
    createdAt: DateTime | None
    updatedAt: DateTime | None
    sentAt: DateTime | None
    nextAttemptAt: DateTime | None
    notBefore: DateTime | None = Field(
        default=None,
        description="Queued but held until then (sendAt, quiet hours, a retry); null when due",
    )
    priority: Literal["urgent", "normal", "bulk"] = "normal"
    expiresAt: DateTime | None = Field(
        default=None, description="Not handed to a provider after this: it ends `expired`"
    )


class DeliveryState(_DeliveryFields):
    """One (recipient, channel) of a message: status, provider, attempts, callbacks."""

    callbacks: list[CallbackState]


class MessageStatus(_Answer):
    """A message and each of its deliveries."""

    id: str
    clinicId: str | None
    category: str
    metadata: dict[str, Any]
    status: Literal["pending", "sent", "partial", "failed", "expired", "cancelled"] = Field(
        description="pending while a delivery is queued or sending; failed when none reached "
        "a provider (cancelled or expired when all were)"
    )
    createdAt: DateTime
    deliveries: list[DeliveryState]


class DeliveryListItem(_DeliveryFields):
    """A delivery in the list, with its message id (attempts are not listed)."""

    messageId: str
    clinicId: str | None


class DeliveryPage(_Answer):
    """Deliveries newest first; pass `nextCursor` as `cursor` for the next page."""

    items: list[DeliveryListItem]
    nextCursor: str | None


# ---- monitoring ------------------------------------------------------------------------------
class LastCheck(_Answer):
    at: DateTime
    ok: bool | None
    detail: str | None


class ProviderHealthItem(_Answer):
    provider: str
    label: str
    scope: str = Field(description="`clinic` or `global`")
    position: int
    status: Literal["healthy", "degraded", "down"]
    circuit: Literal["closed", "open", "half_open"]
    successRate: float | None
    samples: int
    lastFailureAt: DateTime | None
    lastCheck: LastCheck | None


class ChannelHealth(_Answer):
    source: str = Field(description="`clinic`, `global` or `none`")
    providers: list[ProviderHealthItem]
    emptyReason: str | None


class ClinicHealth(_Answer):
    clinicId: str
    channels: dict[str, ChannelHealth]


class StatusCount(_Answer):
    channel: str
    provider: str | None
    status: str
    count: int


class LatencyStats(_Answer):
    channel: str
    provider: str
    attempts: int
    p50Ms: int | None = None
    p90Ms: int | None = None
    p95Ms: int | None = None
    p99Ms: int | None = None


class ClinicStats(_Answer):
    clinicId: str
    from_: DateTime = Field(alias="from")
    to: DateTime
    total: int
    byChannel: dict[str, dict[str, int]]
    counts: list[StatusCount]
    latency: list[LatencyStats]
    bounceRate: dict[str, float] = Field(
        description="Per provider: share of the deliveries it took that bounced"
    )


class TriedProvider(_Answer):
    model_config = ConfigDict(extra="allow")

    provider: str
    label: str
    ok: bool
    error: dict[str, Any] | None = None


class ConfigTestResult(_Answer):
    ok: bool
    provider: str | None = None
    tried: list[TriedProvider]
    latencyMs: float | None = None
    providerMessageId: str | None = None
    error: dict[str, Any] | None = None


class Alert(_Answer):
    id: str
    rule: str
    severity: str
    status: Literal["active", "resolved"]
    clinicId: str | None
    channel: str | None
    provider: str | None
    details: dict[str, Any]
    firedAt: DateTime
    resolvedAt: DateTime | None


class AlertList(_Answer):
    items: list[Alert]


class SuppressionItem(_Answer):
    channel: str
    address: str
    reason: str
    source: str
    createdAt: DateTime


class SuppressionList(_Answer):
    items: list[SuppressionItem]


class WebhookAck(_Answer):
    """The answer to a provider's webhook."""

    model_config = ConfigDict(extra="allow")
