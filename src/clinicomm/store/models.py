"""SQLAlchemy 2 models. Portable types only (`String`, `JSON`, `Uuid`, timezone-aware
timestamps, string enums) so SQLite and PostgreSQL run the same Alembic migrations."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects import sqlite
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Stable constraint names so Alembic migrations are identical on both databases.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# BIGINT on PostgreSQL, INTEGER on SQLite (so it is SQLite's auto-incrementing rowid).
BigIntPK = BigInteger().with_variant(Integer(), "sqlite")

#: SQLite's DATETIME storage format (the dialect's default, which every stored timestamp has).
_SQLITE_TIMESTAMP = "%04d-%02d-%02d %02d:%02d:%02d.%06d"


class SqliteTimestamp(sqlite.DATETIME):
    """SQLite's DATETIME with the same text written from a tuple instead of a dict (1.3
    against 2.9 µs a value; a message's accept and send bind about 12 of them). Dates and
    other values go to the dialect's own processor."""

    cache_ok = True

    def bind_processor(self, dialect: Dialect) -> Callable[[Any], Any] | None:
        fallback = super().bind_processor(dialect)

        def process(value: Any) -> Any:
            if type(value) is datetime:
                return _SQLITE_TIMESTAMP % (
                    value.year,
                    value.month,
                    value.day,
                    value.hour,
                    value.minute,
                    value.second,
                    value.microsecond,
                )
            return fallback(value) if fallback is not None else value

        return process


#: Timestamps: with their zone on PostgreSQL; on SQLite the dialect's text (naive UTC).
Timestamp = DateTime(timezone=True).with_variant(
    SqliteTimestamp(),  # type: ignore[no-untyped-call]  # the dialect type is not annotated
    "sqlite",
)


def utcnow() -> datetime:
    return datetime.now(UTC)


def aware(value: datetime) -> datetime:
    """A timestamp with its zone (SQLite returns naive UTC datetimes)."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {dict[str, Any]: JSON, datetime: Timestamp}


class Clinic(Base):
    """A clinic and its settings; secret credential fields are stored as ciphertext."""

    __tablename__ = "clinics"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    #: The clinic's `settings` object; `communicationSettings` inside has secrets encrypted.
    settings: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    #: Bumped on every change of settings; the ETag of the clinic.
    version: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)


class ClinicKey(Base):
    """A clinic's AES-256-GCM data key, wrapped by the master key `master_kid`."""

    __tablename__ = "clinic_keys"

    clinic_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("clinics.id", ondelete="CASCADE"), primary_key=True
    )
    version: Mapped[int] = mapped_column(Integer, primary_key=True, default=1)
    master_kid: Mapped[str] = mapped_column(String(64), index=True)
    wrapped_key: Mapped[bytes] = mapped_column(LargeBinary)
    #: The clinic's blind-index key wrapped by the same master key, set from the first data
    #: key rotation on (before, it is derived from the version-1 data key), so every index
    #: stays valid when data keys rotate.
    index_key: Mapped[bytes | None] = mapped_column(LargeBinary, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    rotated_at: Mapped[datetime | None] = mapped_column(default=None)


class AuditEntry(Base):
    """Append-only record of a change: who, what, when, and a diff with secrets redacted."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    clinic_id: Mapped[str | None] = mapped_column(String(64), index=True)
    actor: Mapped[str] = mapped_column(String(200))
    role: Mapped[str] = mapped_column(String(40))
    action: Mapped[str] = mapped_column(String(60))
    request_id: Mapped[str | None] = mapped_column(String(64))
    diff: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    note: Mapped[str | None] = mapped_column(Text, default=None)

    __table_args__ = (Index("ix_audit_log_clinic_at", "clinic_id", "at"),)


class Message(Base):
    """One send request: who asked, for which clinic, and its content (encrypted)."""

    __tablename__ = "messages"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    #: None: no clinic given, the global providers are used.
    clinic_id: Mapped[str | None] = mapped_column(String(64), index=True)
    category: Mapped[str] = mapped_column(String(60))
    #: title, body, html and template (variables may be PHI), AES-GCM with the clinic's data
    #: key, associated data `message:{id}`.
    content: Mapped[bytes] = mapped_column(LargeBinary)
    #: The caller's metadata (opaque ids such as appointmentId), never content.
    meta: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    requested_by: Mapped[str | None] = mapped_column(String(200))
    #: Where status callbacks of this message go (fixed at accept), or None for none.
    callback_url: Mapped[str | None] = mapped_column(String(2000), default=None)
    #: `{"source": "clinic"|"platform", "events": [status, …] | null}`: whose secret signs
    #: the callbacks and which statuses are sent (null: all).
    callback_opts: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    #: Indexed for the retention purge of contents.
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)


class Delivery(Base):
    """One (recipient, channel) of a message; the deliveries table is the outbox queue."""

    __tablename__ = "deliveries"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    message_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("messages.id", ondelete="CASCADE"), index=True
    )
    clinic_id: Mapped[str | None] = mapped_column(String(64))
    channel: Mapped[str] = mapped_column(String(16))
    #: The canonical address (an email address or an E.164 number) encrypted with the clinic's
    #: data key (`FieldCipher.encrypt_address`, context: the delivery id); "" when there is
    #: none, or once erased by retention.
    recipient: Mapped[str] = mapped_column(Text)
    #: Blind index of the address (`FieldCipher.index`): kept after retention for statistics.
    recipient_index: Mapped[str | None] = mapped_column(String(80), default=None)
    #: DeliveryStatus value.
    status: Mapped[str] = mapped_column(String(16))
    #: When a queued delivery may next be claimed.
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    #: Claim order among due deliveries: a per-clinic virtual clock (start-time fair
    #: queuing), so one clinic's burst does not hold back another clinic's messages.
    fair_at: Mapped[datetime] = mapped_column(default=utcnow)
    lease_until: Mapped[datetime | None] = mapped_column(default=None)
    lease_owner: Mapped[str | None] = mapped_column(String(64), default=None)
    #: Position in the provider chain the next attempt starts from.
    chain_position: Mapped[int] = mapped_column(Integer, default=0)
    #: Transient attempts made on the provider at `chain_position`.
    provider_attempts: Mapped[int] = mapped_column(Integer, default=0)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    provider: Mapped[str | None] = mapped_column(String(80), default=None)
    provider_message_id: Mapped[str | None] = mapped_column(String(200), default=None, index=True)
    #: Why it failed: {"reason", "errors": [one per provider tried]}.
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    #: The delivery this one replaces on another channel (channel fallback).
    parent_id: Mapped[str | None] = mapped_column(String(36), default=None)
    #: The patient's address for the clinic's channel fallback when it is another kind than
    #: `recipient` (the phone number of an email delivery whose fallback is SMS); stored only
    #: when the clinic configured such a fallback at acceptance. Encrypted like `recipient`;
    #: erased by retention.
    fallback_address: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    sent_at: Mapped[datetime | None] = mapped_column(default=None)
    #: First report of delivery (set also by a `read` that came without a `delivered`).
    delivered_at: Mapped[datetime | None] = mapped_column(default=None)
    read_at: Mapped[datetime | None] = mapped_column(default=None)
    #: How many times an operator re-queued it (`clinicomm requeue`): the generation its
    #: status callbacks are ordered in.
    requeues: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    #: Claim class: 0 urgent, 1 normal, 2 bulk (`records.Priority`); claims take lower first.
    priority: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    #: Never handed to a provider after this instant: the delivery ends `expired`.
    expires_at: Mapped[datetime | None] = mapped_column(default=None)

    __table_args__ = (
        # The claim (`outbox.claim`): queued rows of one class in fair order.
        Index("ix_deliveries_claim", "status", "priority", "fair_at"),
        # Webhooks find a delivery by `provider_message_id` (its own index, on the column),
        # with the clinic as a filter on those few rows (migration i20_0002).
        # The status API lists a clinic's deliveries newest first (ids are time-ordered).
        Index("ix_deliveries_clinic_list", "clinic_id", "id"),
        Index("ix_deliveries_clinic_status_list", "clinic_id", "status", "id"),
        # Whose patient wrote to a global provider (`WebhookService._inbound_owner`).
        Index("ix_deliveries_recipient_index", "recipient_index"),
        # Deliveries handed to a provider in a period, by clinic and provider, with their
        # status: the bounce-rate alert's and the stats API's counts read this index alone
        # (migration i20_0004), not the whole table.
        Index(
            "ix_deliveries_sent",
            "sent_at",
            "clinic_id",
            "provider",
            "status",
            postgresql_where=text("sent_at IS NOT NULL"),
            sqlite_where=text("sent_at IS NOT NULL"),
        ),
    )


class DeliveryAttempt(Base):
    """One call to one provider for one delivery, and how it ended."""

    __tablename__ = "delivery_attempts"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    delivery_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("deliveries.id", ondelete="CASCADE"), index=True
    )
    #: `clinic:sendgrid` or `global:smtp`.
    provider: Mapped[str] = mapped_column(String(80))
    #: `sent` or `failed`.
    outcome: Mapped[str] = mapped_column(String(16))
    error_class: Mapped[str | None] = mapped_column(String(32), default=None)
    status_code: Mapped[int | None] = mapped_column(Integer, default=None)
    error_code: Mapped[str | None] = mapped_column(String(64), default=None)
    detail: Mapped[str | None] = mapped_column(Text, default=None)
    duration_ms: Mapped[int] = mapped_column(Integer, default=0)
    at: Mapped[datetime] = mapped_column(default=utcnow)


class IdempotencyKey(Base):
    """The first answer to a send with an `Idempotency-Key`, kept 24 hours."""

    __tablename__ = "idempotency_keys"

    scope: Mapped[str] = mapped_column(String(80), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    request_hash: Mapped[str] = mapped_column(String(64))
    message_id: Mapped[str] = mapped_column(String(36))
    response: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(index=True)


class DeliveryEventRecord(Base):
    """One provider webhook event as received (status report or inbound message).

    The unique (provider, clinic_id, event_id) makes a redelivered event a no-op. `delivery_id`
    and `processed_at` stay NULL while no delivery matches `provider_message_id` yet (the
    webhook can beat the worker's commit); the sweep (`delivery.ingest.apply_stored`) finishes
    those.
    """

    __tablename__ = "delivery_events"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    clinic_id: Mapped[str] = mapped_column(String(64))
    provider: Mapped[str] = mapped_column(String(40))
    event_id: Mapped[str] = mapped_column(String(255))
    delivery_id: Mapped[str | None] = mapped_column(String(36), default=None, index=True)
    provider_message_id: Mapped[str | None] = mapped_column(String(200), default=None)
    #: EventType value, or `inbound` for a message from the patient.
    event_type: Mapped[str] = mapped_column(String(24))
    occurred_at: Mapped[datetime | None] = mapped_column(default=None)
    channel: Mapped[str | None] = mapped_column(String(16), default=None)
    #: Blind index of the address the event names (bounced email, inbound sender).
    recipient: Mapped[str | None] = mapped_column(String(320), default=None)
    #: That address encrypted (context `event:<id>`), for the suppression it may record;
    #: erased by retention.
    recipient_enc: Mapped[str | None] = mapped_column(Text, default=None)
    bounce_permanent: Mapped[bool | None] = mapped_column(Boolean, default=None)
    #: `{"code", "reason"}`, redacted.
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    #: The provider's item (for inbound messages: without the text body).
    payload: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    processed_at: Mapped[datetime | None] = mapped_column(default=None)
    received_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (
        UniqueConstraint("provider", "clinic_id", "event_id", name="uq_delivery_events_dedupe"),
        Index("ix_delivery_events_pending", "clinic_id", "provider_message_id"),
        # The events the webhook sweep still has to apply (`ingest.apply_stored`, every 5 s):
        # an event leaves it once applied (i20_0004).
        Index(
            "ix_delivery_events_unprocessed",
            "received_at",
            "id",
            postgresql_where=text("processed_at IS NULL"),
            sqlite_where=text("processed_at IS NULL"),
        ),
        # The events whose address retention has still to erase (`purge_events`, every
        # reaper pass): an entry leaves the index when the address is erased (i20_0004).
        Index(
            "ix_delivery_events_retained",
            "received_at",
            postgresql_where=text("recipient_enc IS NOT NULL"),
            sqlite_where=text("recipient_enc IS NOT NULL"),
        ),
    )


class Suppression(Base):
    """An address the clinic must not send to on a channel (opt-out, hard bounce, complaint)."""

    __tablename__ = "suppressions"

    clinic_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    channel: Mapped[str] = mapped_column(String(16), primary_key=True)
    #: Blind index of the address (`FieldCipher.index`): what every lookup uses.
    address: Mapped[str] = mapped_column(String(320), primary_key=True)
    #: The address encrypted (context `suppression:<channel>:<index>`): an opt-out is kept,
    #: and readable by those allowed, for as long as it stands.
    address_enc: Mapped[str | None] = mapped_column(Text, default=None)
    #: SuppressionReason value.
    reason: Mapped[str] = mapped_column(String(24))
    #: Who recorded it: `webhook:<provider>`, `send:<provider>`, `api:<actor>`.
    source: Mapped[str] = mapped_column(String(120))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class InboundContact(Base):
    """When a patient last wrote to the clinic on a channel (the WhatsApp 24-hour window)."""

    __tablename__ = "inbound_contacts"

    clinic_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    channel: Mapped[str] = mapped_column(String(16), primary_key=True)
    #: Blind index of the patient's address (never the address itself).
    address: Mapped[str] = mapped_column(String(320), primary_key=True)
    last_inbound_at: Mapped[datetime] = mapped_column()


class AlertRecord(Base):
    """An alert from `observability.alerts`: fired once, listed while it lasts, then resolved.

    `active_key` holds the alert's key while it is active and NULL once resolved; its unique
    index makes "fire once" hold across processes (NULLs never collide on either database).
    Ids, rule names and numbers only: never a recipient, a name or a secret.
    """

    __tablename__ = "alerts"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    key: Mapped[str] = mapped_column(String(300), index=True)
    active_key: Mapped[str | None] = mapped_column(String(300), unique=True, default=None)
    rule: Mapped[str] = mapped_column(String(60))
    severity: Mapped[str] = mapped_column(String(16))
    clinic_id: Mapped[str | None] = mapped_column(String(64), index=True, default=None)
    provider: Mapped[str | None] = mapped_column(String(80), default=None)
    channel: Mapped[str | None] = mapped_column(String(16), default=None)
    status: Mapped[str] = mapped_column(String(16))
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    fired_at: Mapped[datetime] = mapped_column(default=utcnow)
    resolved_at: Mapped[datetime | None] = mapped_column(default=None)


class AlertSample(Base):
    """One process's counts of a process-local metric (config cache hits and misses, config
    fetch latency buckets) since its previous alert evaluation. The cache-hit and fetch-p95
    rules sum every process's samples of the last window, so one healthy process cannot
    resolve what a struggling one fired (migration i19_0001). Counts only."""

    __tablename__ = "alert_samples"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    #: `host:pid:random` of the process that counted (for operators; not used to aggregate).
    process: Mapped[str] = mapped_column(String(120))
    #: `config_cache` ({"hits", "misses"}) or `config_fetch` ({upper bound: count}).
    metric: Mapped[str] = mapped_column(String(40))
    sampled_at: Mapped[datetime] = mapped_column(default=utcnow)
    data: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)

    __table_args__ = (Index("ix_alert_samples_metric_time", "metric", "sampled_at"),)


class CallbackEvent(Base):
    """One status change of a delivery, to be POSTed to the caller (at least once, in order).

    `seq` orders the events of one delivery (re-queue generation * 10 + status rank): only the
    pending event with the lowest `seq` of a delivery can be claimed, and an event whose `seq`
    is not above the highest already sent is dropped (`superseded`), so a later status is never
    followed by an earlier one. `state`: pending, sent, expired (gave up after the maximum
    age), superseded, skipped (status not in the target's `events`).
    """

    __tablename__ = "callback_events"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    event_id: Mapped[str] = mapped_column(String(36), unique=True)
    delivery_id: Mapped[str] = mapped_column(String(36))
    message_id: Mapped[str] = mapped_column(String(36))
    clinic_id: Mapped[str | None] = mapped_column(String(64), default=None)
    seq: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16))
    url: Mapped[str] = mapped_column(String(2000))
    source: Mapped[str] = mapped_column(String(16))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    state: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    lease_until: Mapped[datetime | None] = mapped_column(default=None)
    lease_owner: Mapped[str | None] = mapped_column(String(64), default=None)
    #: Why the last attempt failed: an HTTP status or an exception class, never a body.
    last_error: Mapped[str | None] = mapped_column(String(300), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    sent_at: Mapped[datetime | None] = mapped_column(default=None)

    __table_args__ = (
        Index("ix_callback_events_due", "state", "next_attempt_at"),
        Index("ix_callback_events_delivery", "delivery_id", "state", "seq"),
    )


class ConsoleSession(Base):
    """A signed-in console user (`clinicomm.api.console.sessions`). The cookie holds a random
    token; only its SHA-256 is stored, so a database read does not yield a usable session."""

    __tablename__ = "console_sessions"

    #: hex SHA-256 of the cookie's token.
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    #: The `jti` of the sign-in link it was opened with: unique, so a link works once.
    link_jti: Mapped[str] = mapped_column(String(128), unique=True)
    #: The link's verified claims (`sub`, `role`, `clinic_id`, `clinic_ids`): the principal.
    claims: Mapped[dict[str, Any]] = mapped_column(JSON)
    #: The CSRF token every state-changing request must carry.
    csrf: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(default=utcnow)
    #: Absolute end, whatever the activity.
    expires_at: Mapped[datetime]
    #: Set by sign-out (or an expiry noticed); an ended session is never accepted again.
    ended_at: Mapped[datetime | None] = mapped_column(default=None)
