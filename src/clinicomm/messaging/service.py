"""Accepting a send: validate, apply idempotency, write the message and its deliveries in one
transaction. The caller gets its answer only after the commit: an accepted message is durable.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import orjson
from sqlalchemy import delete, select

from clinicomm.callbacks.queue import event_row
from clinicomm.callbacks.targets import CallbackTarget, CallbackTargets, CallbackUrlRefusedError
from clinicomm.delivery.contents import Contents
from clinicomm.delivery.outbox import Notifier
from clinicomm.delivery.quiet import release_at
from clinicomm.delivery.records import NewDelivery, Priority
from clinicomm.ids import new_ids
from clinicomm.messaging import timing
from clinicomm.messaging.models import (
    TIMING_FIELDS,
    DeliveryStatus,
    SendAccepted,
    SendRequest,
)
from clinicomm.messaging.writer import BatchWriter, PendingWrite
from clinicomm.providers.base import Channel
from clinicomm.providers.email_address import EmailNotValidError, normalize_email
from clinicomm.providers.phone import normalize_e164
from clinicomm.settings.keys import PLATFORM
from clinicomm.settings.models import ChannelSettings, MessagePolicy, QuietHours
from clinicomm.settings.sealed import open_json, seal_json
from clinicomm.settings.service import ConfigService
from clinicomm.settings.validation import Problem
from clinicomm.store.db import Database
from clinicomm.store.models import IdempotencyKey, aware, utcnow

log = logging.getLogger(__name__)

IDEMPOTENCY_TTL = timedelta(hours=24)
_CHANNEL_NAMES = frozenset(c.value for c in Channel)
PLATFORM_KEY_OWNER = PLATFORM


class SendValidationError(Exception):
    """The request is invalid; `problems` name each JSON path."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("; ".join(f"{p.path}: {p.message}" for p in problems))
        self.problems = problems


class UnknownClinicError(Exception):
    def __init__(self, clinic_id: str) -> None:
        super().__init__(f"clinic {clinic_id!r} not found")
        self.clinic_id = clinic_id


class IdempotencyConflictError(Exception):
    """The key was used within 24 hours for a different payload."""


@dataclass(frozen=True, slots=True)
class PlannedDelivery:
    channel: Channel
    recipient: str
    #: Set when the delivery cannot be attempted at all (no address for the channel).
    failure: str | None = None
    #: The recipient's address on the clinic's channel fallback, when of another kind.
    fallback_address: str | None = None


class FairClock:
    """Per-clinic virtual time for claim order (start-time fair queuing).

    Each delivery of a clinic gets `fair_at = max(now, that clinic's clock)`, and the clock then
    advances by `cost` (50 ms: a fair share of 20 deliveries/s per clinic when clinics compete):
    a clinic that enqueues 10,000 deliveries at once spreads them over 10,000 * cost of virtual
    time, so another clinic's message enqueued a moment later is claimed after only the first
    few of them, not after all. Alone, a clinic is not slowed: claims take every due delivery.
    Per process; approximate across several API processes, which is all fairness needs.

    One clock per (clinic, priority class): claims order by class first, so a clinic's bulk
    run advances only its bulk clock and its urgent messages compete fairly with other
    clinics' urgent ones. A scheduled message (`at` later than `now`) is stamped from `at`
    without moving the clock, so scheduling for tomorrow does not push back today's sends.
    """

    def __init__(self, cost_seconds: float = 0.05, max_clinics: int = 100_000) -> None:
        self.cost = timedelta(seconds=cost_seconds)
        self.max_clinics = max_clinics
        self._clock: dict[tuple[str | None, int], datetime] = {}

    def stamps(
        self,
        clinic_id: str | None,
        count: int,
        now: datetime,
        *,
        priority: int = Priority.NORMAL.rank,
        at: datetime | None = None,
    ) -> list[datetime]:
        if at is not None and at > now:
            return [at + self.cost * i for i in range(count)]
        key = (clinic_id, priority)
        start = max(now, self._clock.get(key, now))
        stamps = [start + self.cost * i for i in range(count)]
        self._clock[key] = start + self.cost * count
        if len(self._clock) > self.max_clinics:
            self._clock = {k: v for k, v in self._clock.items() if v > now}
        return stamps


class MessagingService:
    """`accept(request)`: the durable half of sending."""

    def __init__(
        self,
        db: Database,
        config: ConfigService,
        notifier: Notifier,
        targets: CallbackTargets | None = None,
    ) -> None:
        self.db = db
        self.config = config
        self.notifier = notifier
        #: Resolves where status callbacks go; None: no callbacks from this process's sends.
        self.targets = targets
        self.fair = FairClock()
        self.writer = BatchWriter(db, notifier=notifier, committed=self._committed)
        #: The content caches of the workers running in this process (`share_contents`).
        self._caches: list[Contents] = []

    async def accept(
        self,
        request: SendRequest,
        *,
        idempotency_key: str | None = None,
        requested_by: str | None = None,
    ) -> SendAccepted:
        """Store the message and one delivery per (recipient, channel); return the 202 answer.

        Raises SendValidationError (422), UnknownClinicError (404), IdempotencyConflictError (409).
        With the same `idempotency_key` and payload within 24 h, answers the first answer again.
        """
        return SendAccepted.model_validate(
            await self.accept_json(
                request, idempotency_key=idempotency_key, requested_by=requested_by
            )
        )

    async def accept_json(
        self,
        request: SendRequest,
        *,
        idempotency_key: str | None = None,
        requested_by: str | None = None,
    ) -> dict[str, Any]:
        """`accept`, answering the 202 answer as JSON data (`SendAccepted`'s fields by their
        JSON names, what `model_dump(mode="json", by_alias=True)` gives): the route encodes it
        as it is, without building and dumping the model."""
        clinic_id = request.metadata.clinic_id
        scope = clinic_id or PLATFORM_KEY_OWNER
        digest = request_hash(request) if idempotency_key else ""
        regions, fallbacks, quiet = await self._regions(clinic_id, request.channels)
        target = await self._callback_target(clinic_id, request.callback_url)
        planned = plan(request, regions, fallbacks)
        policy = await self.config.get_message_policy(clinic_id) if clinic_id else None
        try:
            when = _timing(request, policy, utcnow())
        except timing.TimingError as exc:
            # A retry of an accepted request whose `sendAt` has passed since: its first answer.
            if idempotency_key is not None:
                previous = await self._previous(scope, idempotency_key, digest)
                if previous is not None:
                    return previous
            raise SendValidationError(exc.problems) from None
        for _ in range(3):
            pending, answer = await self._pending(
                request,
                planned,
                clinic_id,
                scope,
                idempotency_key,
                digest,
                requested_by,
                target,
                when,
                quiet,
            )
            if await self.writer.write(pending):
                _log_accepted(pending)
                return answer
            # The key is taken: answer as the first request did (or 409). An expired key is
            # deleted by _previous and the write is tried again.
            assert idempotency_key is not None
            previous = await self._previous(scope, idempotency_key, digest)
            if previous is not None:
                return previous
        raise RuntimeError("idempotency key kept changing under this request")

    async def _pending(
        self,
        request: SendRequest,
        planned: list[PlannedDelivery],
        clinic_id: str | None,
        scope: str,
        idempotency_key: str | None,
        digest: str,
        requested_by: str | None,
        target: CallbackTarget | None = None,
        when: timing.Timing | None = None,
        quiet: dict[Channel, QuietHours] | None = None,
    ) -> tuple[PendingWrite, dict[str, Any]]:
        """The rows of one message (encrypted) and the answer its commit will give, as JSON
        data (`accept_json`; tests/messaging check it against `SendAccepted`)."""
        message_id, *delivery_ids = new_ids(1 + len(planned))
        now = utcnow()
        when = when or timing.Timing(Priority.NORMAL, None, None)
        rank = when.priority.rank
        rows: list[NewDelivery] = []
        summaries: list[dict[str, Any]] = []
        stamps = self.fair.stamps(clinic_id, len(planned), now, priority=rank, at=when.send_at)
        cipher = await self.config.keys.cipher_for(self.db, scope)
        for item, fair_at, delivery_id in zip(planned, stamps, delivery_ids, strict=True):
            status = DeliveryStatus.FAILED if item.failure else DeliveryStatus.QUEUED
            error = {"reason": item.failure, "errors": []} if item.failure else None
            not_before = when.send_at
            held = None
            if when.priority is not Priority.URGENT and not item.failure:
                held = release_at((quiet or {}).get(item.channel), not_before or now, delivery_id)
            if held is not None:
                not_before = held
            if not_before is not None:
                fair_at = max(fair_at, not_before)
            rows.append(
                NewDelivery(
                    id=delivery_id,
                    message_id=message_id,
                    clinic_id=clinic_id,
                    channel=item.channel.value,
                    # The addresses encrypted with the clinic's data key, and the blind index
                    # suppressions and the WhatsApp window look the recipient up by.
                    recipient=cipher.encrypt_address(item.recipient) if item.recipient else "",
                    recipient_index=cipher.index(item.recipient) if item.recipient else None,
                    status=status,
                    fair_at=fair_at,
                    created_at=now,
                    error=error,
                    fallback_address=cipher.encrypt_address(item.fallback_address)
                    if item.fallback_address
                    else None,
                    priority=rank,
                    not_before=not_before,
                    expires_at=when.expires_at,
                )
            )
            summaries.append(
                {
                    "id": delivery_id,
                    "channel": item.channel.value,
                    "recipient": item.recipient,
                    "status": status.value,
                    "error": {"reason": item.failure, "errors": []} if item.failure else None,
                    "notBefore": not_before.isoformat()
                    if not_before and not item.failure
                    else None,
                }
            )
        answer = {
            "id": message_id,
            "status": "queued",
            "deliveries": summaries,
            "priority": when.priority.value,
            "sendAt": when.send_at.isoformat() if when.send_at else None,
            "expiresAt": when.expires_at.isoformat() if when.expires_at else None,
        }
        plain = orjson.dumps(request.content())
        content = cipher.encrypt_bytes(plain, f"message:{message_id}")
        meta = request.metadata.model_dump(mode="json", by_alias=True, exclude_none=True)
        pending = PendingWrite(
            message={
                "id": message_id,
                "clinic_id": clinic_id,
                "category": request.category,
                "content": content,
                "meta": seal_json(cipher, meta, f"meta:{message_id}"),
                "requested_by": requested_by,
                "callback_url": target.url if target else None,
                "callback_opts": target.opts() if target else None,
                "created_at": now,
            },
            deliveries=rows,
            idempotency={
                "scope": scope,
                "key": idempotency_key,
                "request_hash": digest,
                "message_id": message_id,
                # The first answer names the recipients: stored encrypted like them.
                "response": seal_json(cipher, answer, f"idempotency:{scope}:{idempotency_key}"),
                "created_at": now,
                "expires_at": now + IDEMPOTENCY_TTL,
            }
            if idempotency_key
            else None,
            plain=plain if self._caches else None,
        )
        if target is not None:
            pending.callbacks = _failed_at_accept(rows, target, pending.message, now)
        return pending, answer

    def share_contents(self, contents: Contents) -> None:
        """Hand the content of every message this service commits to `contents`, the cache
        of a worker running in this process, before the worker is woken: it then claims the
        deliveries without reading the message back and decrypting it (one statement less
        per claim). Only contents committed: a refused or repeated send primes nothing."""
        self._caches.append(contents)

    def _committed(self, written: list[PendingWrite]) -> None:
        for item in written:
            if item.plain is None:
                continue
            message = item.message
            for cache in self._caches:
                cache.prime(
                    message["id"],
                    item.plain,
                    message["category"],
                    has_target=message["callback_url"] is not None,
                )

    async def accept_many(
        self, items: list[BatchItem], *, requested_by: str | None = None
    ) -> list[dict[str, Any] | Exception]:
        """Accept several messages in one transaction; one answer per item, in order: the
        202 answer as JSON data (as `accept_json`) or the item's exception.

        Each item is checked as `accept` checks one message; an item that fails its checks
        answers its own exception (SendValidationError, UnknownClinicError,
        IdempotencyConflictError) and is not written, the others are. Every written item is
        committed in the same transaction (all or none: a database error fails the whole
        batch, raised). An item whose idempotency key is stored answers the first answer.
        """
        answers: list[dict[str, Any] | Exception | None] = [None] * len(items)
        prepared: list[tuple[int, BatchItem, str, str, PendingWrite, dict[str, Any]]] = []
        # Items of one clinic share its regions and callback target: read once per batch.
        regions_of: dict[
            Any, tuple[dict[Channel, str], dict[Channel, Channel], dict[Channel, QuietHours]]
        ] = {}
        targets_of: dict[tuple[str | None, str | None], CallbackTarget | None] = {}
        policies: dict[str, Any] = {}
        now = utcnow()
        for index, item in enumerate(items):
            request = item.request
            clinic_id = request.metadata.clinic_id
            try:
                key = (clinic_id, tuple(request.channels))
                if key not in regions_of:
                    regions_of[key] = await self._regions(clinic_id, request.channels)
                regions, fallbacks, quiet = regions_of[key]
                where = (clinic_id, request.callback_url)
                if where not in targets_of:
                    targets_of[where] = await self._callback_target(*where)
                target = targets_of[where]
                planned = plan(request, regions, fallbacks)
                if clinic_id and clinic_id not in policies:
                    policies[clinic_id] = await self.config.get_message_policy(clinic_id)
                when = _timing(request, policies.get(clinic_id) if clinic_id else None, now)
            except timing.TimingError as exc:
                # As `accept`: a retry of an accepted item whose `sendAt` has passed since
                # answers its first answer.
                answer_or_error: dict[str, Any] | Exception | None = None
                if item.idempotency_key is not None:
                    try:
                        answer_or_error = await self._previous(
                            clinic_id or PLATFORM_KEY_OWNER,
                            item.idempotency_key,
                            request_hash(request),
                        )
                    except IdempotencyConflictError as conflict:
                        answer_or_error = conflict
                answers[index] = answer_or_error or SendValidationError(exc.problems)
                continue
            except (SendValidationError, UnknownClinicError) as exc:
                answers[index] = exc
                continue
            scope = clinic_id or PLATFORM_KEY_OWNER
            digest = request_hash(request) if item.idempotency_key else ""
            pending, answer = await self._pending(
                request,
                planned,
                clinic_id,
                scope,
                item.idempotency_key,
                digest,
                requested_by,
                target,
                when,
                quiet,
            )
            prepared.append((index, item, scope, digest, pending, answer))
        written = await self.writer.write_group([p[4] for p in prepared])
        for (index, item, scope, digest, pending, answer), done in zip(
            prepared, written, strict=True
        ):
            if done:
                _log_accepted(pending)
                answers[index] = answer
                continue
            assert item.idempotency_key is not None
            try:
                previous = await self._previous(scope, item.idempotency_key, digest)
                # An expired key was just deleted: this item alone, in its own transaction.
                answers[index] = previous or await self.accept_json(
                    item.request, idempotency_key=item.idempotency_key, requested_by=requested_by
                )
            except IdempotencyConflictError as exc:
                answers[index] = exc
        return [a for a in answers if a is not None]

    async def _callback_target(
        self, clinic_id: str | None, requested: str | None
    ) -> CallbackTarget | None:
        if self.targets is None:
            if requested is not None:
                raise SendValidationError(
                    [Problem("callbackUrl", "status callbacks are not configured", "value_error")]
                )
            return None
        try:
            return await self.targets.resolve(clinic_id, requested)
        except CallbackUrlRefusedError as exc:
            raise SendValidationError([Problem("callbackUrl", str(exc), "value_error")]) from None

    async def _regions(
        self, clinic_id: str | None, channels: list[Channel]
    ) -> tuple[dict[Channel, str], dict[Channel, Channel], dict[Channel, QuietHours]]:
        """Default phone regions of the clinic's channels, the channel fallbacks that need
        another kind of address (email → SMS) and the channels' quiet hours; checks that the
        clinic exists."""
        regions: dict[Channel, str] = {}
        fallbacks: dict[Channel, Channel] = {}
        quiet: dict[Channel, QuietHours] = {}
        wanted = list(channels)
        for channel in wanted:
            resolved = await self.config.get_clinic_config(clinic_id, channel)
            if clinic_id is not None and resolved.version == 0:
                raise UnknownClinicError(clinic_id)
            region = getattr(resolved.effective, "default_region", None)
            if isinstance(region, str):
                regions[channel] = region
            hours = getattr(resolved.effective, "quiet_hours", None)
            if isinstance(hours, QuietHours):
                quiet[channel] = hours
            target = _other_kind_fallback(resolved.own, channel)
            if channel in channels and target is not None:
                fallbacks[channel] = target
                if target not in wanted:
                    wanted.append(target)  # its default region reads the fallback number
        return regions, fallbacks, quiet

    async def _previous(self, scope: str, key: str, digest: str) -> dict[str, Any] | None:
        """The first answer stored under `key` (JSON data, as `accept_json`), None when none is
        (an expired one is deleted); IdempotencyConflictError when `digest` differs."""
        async with self.db.read() as session:
            row = (
                await session.execute(
                    select(IdempotencyKey).where(
                        IdempotencyKey.scope == scope, IdempotencyKey.key == key
                    )
                )
            ).scalar_one_or_none()
        if row is None:
            return None
        if aware(row.expires_at) <= utcnow():
            async with self.db.session() as session:
                await session.execute(
                    delete(IdempotencyKey).where(
                        IdempotencyKey.scope == scope,
                        IdempotencyKey.key == key,
                        IdempotencyKey.expires_at == row.expires_at,
                    )
                )
            return None
        if row.request_hash != digest:
            raise IdempotencyConflictError(
                "Idempotency-Key was already used with a different payload"
            )
        cipher = await self.config.keys.cipher_for(self.db, scope)
        return open_json(cipher, row.response, f"idempotency:{scope}:{key}")


@dataclass(frozen=True, slots=True)
class BatchItem:
    """One message of a batch send and its own idempotency key."""

    request: SendRequest
    idempotency_key: str | None = None


def _log_accepted(pending: PendingWrite) -> None:
    """One DEBUG line per accepted message (the writer logs one INFO line per commit: a line
    per message was a measurable share of the accept path's CPU)."""
    if not log.isEnabledFor(logging.DEBUG):
        return
    log.debug(
        "message accepted",
        extra={
            "event": "message_accepted",
            "messageId": pending.message["id"],
            "clinicId": pending.message["clinic_id"],
            "deliveries": len(pending.deliveries),
        },
    )


def _failed_at_accept(
    rows: list[NewDelivery], target: CallbackTarget, message: dict[str, Any], now: datetime
) -> list[dict[str, Any]]:
    """Callback rows for the deliveries recorded `failed` at accept."""
    events = []
    for row in rows:
        if row.status is not DeliveryStatus.FAILED:
            continue
        event = event_row(
            delivery_id=row.id,
            message_id=message["id"],
            clinic_id=row.clinic_id,
            channel=row.channel,
            status=row.status.value,
            provider=None,
            error=row.error,
            requeues=0,
            url=target.url,
            opts=target.opts(),
            metadata=message["meta"],
            now=now,
        )
        if event is not None:
            events.append(event)
    return events


def _timing(request: SendRequest, policy: MessagePolicy | None, now: datetime) -> timing.Timing:
    """The request's priority, due time and expiry under the clinic's policy (TimingError:
    a 422 with paths)."""
    return timing.resolve(
        category=request.category,
        priority=request.priority,
        send_at=request.send_at,
        expires_at=request.expires_at,
        ttl_seconds=request.ttl_seconds,
        policy=policy,
        now=now,
    )


def request_hash(request: SendRequest) -> str:
    """The payload's digest. Timing fields left unset and a batch item's own
    `idempotencyKey` are not part of it, so a batch item and a single send of the same message
    under the same key are the same.

    Its form never changes (it is stored with each key; tests/messaging/test_request_hash.py
    pins it): SHA-256 of the sorted-keys JSON of `model_dump(mode="json", by_alias=True,
    exclude=<those fields>)`. Built as the whole dump less those top-level keys (a field
    dumps to null exactly when it is None): the same bytes without pydantic's exclude
    machinery (a batch item: 4.2 → 3.9 µs, best of 30 timeit runs)."""
    data = request.model_dump(mode="json", by_alias=True)
    data.pop("idempotencyKey", None)
    for alias in _TIMING_ALIASES:
        if data.get(alias, 0) is None:
            del data[alias]
    return hashlib.sha256(orjson.dumps(data, option=orjson.OPT_SORT_KEYS)).hexdigest()


#: The JSON names of `TIMING_FIELDS` (`request_hash`).
_TIMING_ALIASES = tuple(
    SendRequest.model_fields[name].alias or name for name in sorted(TIMING_FIELDS)
)


def _other_kind_fallback(own: ChannelSettings | None, channel: Channel) -> Channel | None:
    """The channel the clinic falls back to from `channel` when it addresses patients another
    way (email ↔ phone), else None (the chain builder reads the same setting)."""
    if own is None:
        return None
    target = own.fallback_strategy.fallback_provider
    if target not in _CHANNEL_NAMES or target == channel.value:
        return None
    other = Channel(target)
    return other if (other is Channel.EMAIL) != (channel is Channel.EMAIL) else None


def plan(
    request: SendRequest,
    regions: dict[Channel, str],
    fallbacks: dict[Channel, Channel] | None = None,
) -> list[PlannedDelivery]:
    """One delivery per (recipient, channel), with canonical addresses; with `fallbacks`
    (channel → fallback channel of another address kind) each delivery also keeps the
    recipient's address on the fallback channel, when the request gives one.

    A malformed address is a 422 (SendValidationError, every problem with its path); a missing
    address for a requested channel is a delivery recorded `failed` with the reason.
    """
    problems: list[Problem] = []
    planned: list[PlannedDelivery] = []
    if request.body is None and request.html is None and request.template is None:
        problems.append(Problem("body", "body, html or template is required", "missing"))
    for index, recipient in enumerate(request.recipients):
        email = None
        if recipient.email is not None:
            try:
                email = normalize_email(recipient.email)
            except EmailNotValidError as exc:
                problems.append(Problem(f"recipients.{index}.email", str(exc), "email"))
        numbers: dict[str, str | None] = {}
        for field in ("phone", "whatsapp"):
            raw = getattr(recipient, field)
            if raw is None:
                numbers[field] = None
                continue
            channel = Channel.WHATSAPP if field == "whatsapp" else Channel.SMS
            try:
                numbers[field] = normalize_e164(raw, regions.get(channel))
            except ValueError as exc:
                numbers[field] = None
                problems.append(Problem(f"recipients.{index}.{field}", str(exc), "phone"))
        if not any([recipient.email, recipient.phone, recipient.whatsapp]):
            problems.append(
                Problem(f"recipients.{index}", "a recipient needs an email or a phone", "missing")
            )
        for channel in request.channels:
            if channel is Channel.EMAIL:
                address = email
            elif channel is Channel.WHATSAPP:
                address = numbers["whatsapp"] or numbers["phone"]
            else:
                address = numbers["phone"]
            if address is None:
                kind = "email address" if channel is Channel.EMAIL else "phone number"
                planned.append(
                    PlannedDelivery(channel, "", f"recipient has no {kind} for {channel.value}")
                )
            else:
                target = (fallbacks or {}).get(channel)
                other = None
                if target is Channel.EMAIL:
                    other = email
                elif target is Channel.WHATSAPP:
                    other = numbers["whatsapp"] or numbers["phone"]
                elif target is Channel.SMS:
                    other = numbers["phone"]
                planned.append(PlannedDelivery(channel, address, fallback_address=other))
    if problems:
        raise SendValidationError(problems)
    return planned
