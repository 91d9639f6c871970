"""Typed records of the delivery path: what is claimed, what is decided, what is written.

Nothing here does I/O. `Claimed` is a leased delivery; its helpers (`requeue`, `fail`,
`refuse`, `suppressed`, `sent`) build the `Outcome` the outbox writes, so no caller assembles
an outcome by hand. `Attempt` is one provider call (a `delivery_attempts` row), `Suppression`
an opt-out learnt on send, `NewDelivery` a delivery row to insert (accept and channel
fallback use the same constructor), `Handled` everything one delivery produced.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, ClassVar

from clinicomm.delivery.suppressions import SuppressionReason
from clinicomm.ids import new_id
from clinicomm.providers.base import Channel, TemplateButton, TemplateHeader, TemplateRef
from clinicomm.providers.errors import ProviderError


class DeliveryStatus(StrEnum):
    """Where one delivery is. Every delivery ends in one of the last eight."""

    QUEUED = "queued"  # stored, waiting for a worker (first try or a scheduled retry)
    SENDING = "sending"  # claimed by a worker (leased)
    SENT = "sent"  # a provider took it (its message id is recorded)
    DELIVERED = "delivered"  # the provider reported delivery to the device or mailbox
    READ = "read"  # the recipient opened or read it
    FAILED = "failed"  # no provider could take it; `error` says why, per provider
    BOUNCED = "bounced"  # the provider reported a bounce after `sent`
    SUPPRESSED = "suppressed"  # not sent: the recipient opted out of this channel
    EXPIRED = "expired"  # not handed to a provider before its `expiresAt`
    CANCELLED = "cancelled"  # cancelled by the caller before it was handed to a provider


class Priority(StrEnum):
    """A message's claim class: urgent first, then normal, then bulk (see `priorities`)."""

    URGENT = "urgent"
    NORMAL = "normal"
    BULK = "bulk"

    @property
    def rank(self) -> int:
        """The stored value (`deliveries.priority`): claims order by it, lowest first."""
        return _PRIORITY_RANK[self]

    @classmethod
    def of_rank(cls, rank: int) -> Priority:
        return _RANK_PRIORITY.get(rank, cls.NORMAL)


_PRIORITY_RANK = {Priority.URGENT: 0, Priority.NORMAL: 1, Priority.BULK: 2}
_RANK_PRIORITY = {v: k for k, v in _PRIORITY_RANK.items()}


@dataclass(frozen=True, slots=True)
class Content:
    """A message's decrypted content (kept in memory only while it is being sent)."""

    title: str | None
    body: str | None
    html: str | None
    template: TemplateRef | None
    #: The message's category (`GENERAL`, …): picks the WhatsApp window template.
    category: str | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any], category: str | None = None) -> Content:
        template = data.get("template")
        return cls(
            category=category,
            title=data.get("title"),
            body=data.get("body"),
            html=data.get("html"),
            template=_template(template) if template else None,
        )


def _template(data: dict[str, Any]) -> TemplateRef:
    """A stored `template` (the send request's `TemplateSpec`, camelCase JSON)."""
    components = data.get("components") or {}
    header = components.get("header")
    return TemplateRef(
        name=data["name"],
        language=data.get("language", "en"),
        variables=dict(data.get("variables") or {}),
        header=TemplateHeader(
            format=header["type"],
            text=header.get("text"),
            link=header.get("link"),
            media_id=header.get("mediaId"),
            filename=header.get("filename"),
        )
        if header
        else None,
        buttons=tuple(
            TemplateButton(
                kind=b["type"], index=int(b["index"]), text=b.get("text"), payload=b.get("payload")
            )
            for b in components.get("buttons") or []
        ),
    )


@dataclass(slots=True)
class Outcome:
    """The new state of one delivery after this worker handled it (built by `Claimed`)."""

    delivery_id: str
    status: DeliveryStatus
    attempts: int
    chain_position: int = 0
    provider_attempts: int = 0
    next_attempt_at: datetime | None = None
    provider: str | None = None
    provider_message_id: str | None = None
    error: dict[str, Any] | None = None
    sent_at: datetime | None = None


@dataclass(slots=True)
class Claimed:
    """A delivery this worker holds a lease on, and the outcomes it can end in."""

    id: str
    message_id: str
    clinic_id: str | None
    channel: str
    recipient: str
    chain_position: int
    provider_attempts: int
    attempts: int
    created_at: datetime
    errors: list[dict[str, Any]]
    parent_id: str | None
    #: The patient's address on the channel-fallback channel, when of another kind.
    fallback_address: str | None = None
    #: Blind index of `recipient`: suppressions and the WhatsApp window are looked up by it.
    recipient_index: str | None = None
    #: The addresses as stored (encrypted), copied into a channel fallback and an opt-out;
    #: `recipient` and `fallback_address` are in clear once the worker revealed them.
    sealed: str = ""
    fallback_sealed: str | None = None
    #: Blind index of `fallback_address` (set by the worker with the clear address).
    fallback_index: str | None = None
    #: `Priority.rank` of the message (0 urgent, 1 normal, 2 bulk).
    priority: int = 1
    #: After this instant the delivery is never handed to a provider: it ends `expired`.
    expires_at: datetime | None = None

    @property
    def urgent(self) -> bool:
        return self.priority == Priority.URGENT.rank

    def is_expired(self, now: datetime) -> bool:
        return self.expires_at is not None and now >= self.expires_at

    def clamp(self, at: datetime) -> datetime:
        """A requeue time no later than the expiry (claimed then, the delivery expires)."""
        return min(at, self.expires_at) if self.expires_at is not None else at

    @property
    def lookup_key(self) -> str:
        """What opt-outs and the window are keyed by: the blind index (the stored address
        itself only for a row written before addresses were encrypted)."""
        return self.recipient_index or self.recipient

    def requeue(
        self,
        at: datetime,
        reason: str,
        *,
        errors: list[dict[str, Any]] | None = None,
        attempts: int | None = None,
        position: int | None = None,
        provider_attempts: int | None = None,
        quiet: bool = False,
    ) -> Outcome:
        """Back to `queued` until `at`. `quiet`: no error recorded when there is none yet."""
        errs = self.errors if errors is None else errors
        return Outcome(
            self.id,
            DeliveryStatus.QUEUED,
            self.attempts if attempts is None else attempts,
            chain_position=self.chain_position if position is None else position,
            provider_attempts=self.provider_attempts
            if provider_attempts is None
            else provider_attempts,
            next_attempt_at=at,
            error=None if quiet and not errs else {"reason": reason, "errors": errs},
        )

    def fail(
        self,
        reason: str,
        *,
        errors: list[dict[str, Any]] | None = None,
        attempts: int | None = None,
        position: int | None = None,
        provider: str | None = None,
        **extra: Any,
    ) -> Outcome:
        """`failed` with `reason` (and every provider's reason in `errors`)."""
        return Outcome(
            self.id,
            DeliveryStatus.FAILED,
            self.attempts if attempts is None else attempts,
            chain_position=self.chain_position if position is None else position,
            provider=provider,
            error={
                "reason": reason,
                "errors": self.errors if errors is None else errors,
                **extra,
            },
        )

    def refuse(self, reason: str) -> Outcome:
        """`failed` before any provider was called (admission said no)."""
        return self.fail(reason)

    def expired(
        self,
        *,
        errors: list[dict[str, Any]] | None = None,
        attempts: int | None = None,
        position: int | None = None,
    ) -> Outcome:
        """`expired`: not handed to a provider before `expires_at`; no provider call and no
        channel fallback from here. The reason names the expiry."""
        when = self.expires_at.isoformat() if self.expires_at is not None else "?"
        return Outcome(
            self.id,
            DeliveryStatus.EXPIRED,
            self.attempts if attempts is None else attempts,
            chain_position=self.chain_position if position is None else position,
            error={
                "reason": f"expired: not handed to a provider before {when}",
                "errors": self.errors if errors is None else errors,
                "expiresAt": when,
            },
        )

    def suppressed(self) -> Outcome:
        """`suppressed`: the recipient opted out of this channel; no provider call."""
        return Outcome(
            self.id,
            DeliveryStatus.SUPPRESSED,
            self.attempts,
            chain_position=self.chain_position,
            error={"reason": "the recipient opted out of this channel", "errors": []},
        )

    def sent(
        self,
        *,
        provider: str,
        provider_message_id: str | None,
        at: datetime,
        attempts: int,
        position: int,
        errors: list[dict[str, Any]],
    ) -> Outcome:
        """`sent` by `provider` (earlier providers' reasons kept in `errors`)."""
        return Outcome(
            self.id,
            DeliveryStatus.SENT,
            attempts,
            chain_position=position,
            provider=provider,
            provider_message_id=provider_message_id,
            error={"reason": None, "errors": errors} if errors else None,
            sent_at=at,
        )


@dataclass(frozen=True, slots=True)
class Attempt:
    """One provider call: a `delivery_attempts` row."""

    delivery_id: str
    provider: str
    outcome: str
    error_class: str | None
    status_code: int | None
    error_code: str | None
    detail: str | None
    duration_ms: int
    at: datetime

    @classmethod
    def of(
        cls,
        delivery_id: str,
        provider_label: str,
        duration: float,
        at: datetime,
        error: ProviderError | None,
    ) -> Attempt:
        return cls(
            delivery_id=delivery_id,
            provider=provider_label,
            outcome="failed" if error else "sent",
            error_class=error.error_class.value if error else None,
            status_code=error.status_code if error else None,
            error_code=error.code if error else None,
            detail=(error.detail or error.message) if error else None,
            duration_ms=int(duration * 1000),
            at=at,
        )

    def row(self) -> dict[str, Any]:
        return {
            "delivery_id": self.delivery_id,
            "provider": self.provider,
            "outcome": self.outcome,
            "error_class": self.error_class,
            "status_code": self.status_code,
            "error_code": self.error_code,
            "detail": self.detail,
            "duration_ms": self.duration_ms,
            "at": self.at,
        }


@dataclass(frozen=True, slots=True)
class Suppression:
    """An opt-out to record with the delivery's result (learnt from a send error)."""

    clinic_id: str
    channel: str
    #: The address's blind index, and its ciphertext (kept with the opt-out).
    address: str
    reason: SuppressionReason
    source: str
    address_enc: str | None = None


@dataclass(frozen=True, slots=True)
class NewDelivery:
    """A delivery row to insert: by `accept` (one per recipient and channel) and by channel
    fallback (`parent_id` set: the same message to the same number on another channel)."""

    id: str
    message_id: str
    clinic_id: str | None
    channel: str
    recipient: str
    status: DeliveryStatus
    fair_at: datetime
    created_at: datetime
    error: dict[str, Any] | None = None
    parent_id: str | None = None
    fallback_address: str | None = None
    #: Blind index of `recipient` (both addresses are ciphertexts, `FieldCipher`).
    recipient_index: str | None = None
    #: `Priority.rank` (0 urgent, 1 normal, 2 bulk).
    priority: int = 1
    #: When it may first be claimed (`sendAt`, quiet hours); None: at `created_at`.
    not_before: datetime | None = None
    #: Never handed to a provider after this: it ends `expired`.
    expires_at: datetime | None = None

    @classmethod
    def fallback_of(cls, claimed: Claimed, channel: Channel, now: datetime) -> NewDelivery:
        """The channel fallback of `claimed`: queued now, linked by `parent_id`, to the same
        address, or to `claimed.fallback_address` when `channel` addresses patients another
        way (email → SMS)."""
        same_kind = (channel is Channel.EMAIL) == (claimed.channel == Channel.EMAIL.value)
        recipient = (claimed.sealed or claimed.recipient) if same_kind else claimed.fallback_sealed
        index = claimed.recipient_index if same_kind else claimed.fallback_index
        if recipient is None:
            raise ValueError("no address for the channel fallback")
        return cls(
            id=new_id(),
            message_id=claimed.message_id,
            clinic_id=claimed.clinic_id,
            channel=channel.value,
            recipient=recipient,
            recipient_index=index,
            status=DeliveryStatus.QUEUED,
            fair_at=now,
            created_at=now,
            parent_id=claimed.id,
            # The same message: the same class and the same expiry on the other channel.
            priority=claimed.priority,
            expires_at=claimed.expires_at,
        )

    #: The `deliveries` columns `row()` gives (store.unnest: only these are unnested).
    ROW_COLUMNS: ClassVar[tuple[str, ...]] = (
        "id",
        "message_id",
        "clinic_id",
        "channel",
        "recipient",
        "recipient_index",
        "status",
        "next_attempt_at",
        "fair_at",
        "error",
        "parent_id",
        "fallback_address",
        "priority",
        "expires_at",
        "created_at",
        "updated_at",
    )

    def row(self) -> dict[str, Any]:
        """The row to insert: `ROW_COLUMNS`, the others left to the table's defaults."""
        return {
            "id": self.id,
            "message_id": self.message_id,
            "clinic_id": self.clinic_id,
            "channel": self.channel,
            "recipient": self.recipient,
            "recipient_index": self.recipient_index,
            "status": self.status.value,
            "next_attempt_at": self.not_before or self.created_at,
            "fair_at": self.fair_at,
            "error": self.error,
            "parent_id": self.parent_id,
            "fallback_address": self.fallback_address,
            "priority": self.priority,
            "expires_at": self.expires_at,
            "created_at": self.created_at,
            "updated_at": self.created_at,
        }


#: A delivery queued by channel fallback (the issue's name for it).
FallbackDelivery = NewDelivery


@dataclass(slots=True)
class Handled:
    """What handling one delivery produced: its new state, attempt rows, and what to record
    with them (a channel-fallback delivery, an opt-out learnt on send)."""

    outcome: Outcome
    attempts: list[Attempt] = field(default_factory=list)
    fallback: NewDelivery | None = None
    suppress: Suppression | None = None
    #: False when the delivery's message is known to have no callback target (the worker
    #: read it with the content): the flush then does not look for one.
    may_call_back: bool = True
