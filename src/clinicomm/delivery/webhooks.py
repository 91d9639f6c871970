"""The server side of provider webhooks: whose credentials verify, and applying after the answer.

`POST /api/v1/webhooks/{provider}/{clinicId}` (api/routers/webhooks.py) verifies with the
clinic's own credentials (`WebhookService.credentials`), stores the parsed events in one
transaction (`delivery.ingest.store_events`) and answers; `WebhookService.submit` then applies
them in a task of this process (`delivery.ingest.apply_stored`), so the answer never waits
for status updates (PROVIDER-FACTS §8 item 16). If the process stops before that task ran,
the rows stay unprocessed in `delivery_events` and the sweep (every `sweep_seconds`, and at
start) applies them; the sweep also applies status events that arrived before the worker
recorded the delivery's provider message id.

Global providers (`POST /api/v1/webhooks/{provider}/global`) verify with the global slots'
credentials (`global_credentials`); `route_global` then gives each event its clinic:
a status event the clinic of the delivery a global hop sent with that provider message id
(not found yet: `ingest.GLOBAL_SCOPE`, without the address, for the sweep); an inbound
message (STOP, the WhatsApp window) the clinic that last messaged that patient through
that global provider on that channel, found by each candidate clinic's blind index of the
sender (no address is ever stored or compared in clear). An inbound message no clinic
sent to is dropped (counted): there is no clinic whose opt-out it could be.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Awaitable, Callable, Iterable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from redis.asyncio import Redis
from redis.exceptions import RedisError
from sqlalchemy import Select, select, tuple_

from clinicomm.delivery.ingest import GLOBAL_SCOPE, apply_stored, global_label_prefix
from clinicomm.delivery.suppressions import canonical_key
from clinicomm.providers import registry
from clinicomm.providers.webhooks import handler_key, webhook_context
from clinicomm.providers.webhooks.base import (
    DeliveryEvent,
    InboundMessage,
    MemorySeenTokenStore,
    WebhookEvent,
)
from clinicomm.store.models import Delivery, aware, utcnow

if TYPE_CHECKING:
    from clinicomm.runtime import Runtime

log = logging.getLogger(__name__)

#: Clinics whose (clinic, blind index) pairs one inbound-owner query matches.
OWNER_CHUNK = 500


class RedisSeenTokenStore:
    """Mailgun one-time tokens shared by every process (`SET NX PX`); in memory if Redis fails."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self.fallback = MemorySeenTokenStore()

    async def add_if_new(self, key: str, ttl: float) -> bool:
        try:
            added = await self.redis.set(
                f"clinicomm:webhook:seen:{key}", 1, nx=True, px=max(1, int(ttl * 1000))
            )
            return bool(added)
        except (RedisError, OSError):
            return await self.fallback.add_if_new(key, ttl)


def owner_query(
    pairs: list[tuple[str, str]], prefix: str, channel: str, since: datetime
) -> Select[datetime, str, str | None]:
    """The newest delivery since `since` on `channel` by a provider labelled `prefix`… whose
    (clinic id, recipient index) is one of `pairs`: (created_at, id, clinic_id). The plain
    IN on the index column is what lets both databases read `ix_deliveries_recipient_index`."""
    return (
        select(Delivery.created_at, Delivery.id, Delivery.clinic_id)
        .where(
            Delivery.recipient_index.in_([index for _, index in pairs]),
            tuple_(Delivery.clinic_id, Delivery.recipient_index).in_(pairs),
            Delivery.provider.like(prefix),
            Delivery.channel == channel,
            Delivery.created_at >= since,
        )
        .order_by(Delivery.created_at.desc(), Delivery.id.desc())
        .limit(1)
    )


class WebhookService:
    """Credentials lookup, the verification context, and the apply-after-answer tasks."""

    def __init__(self, runtime: Runtime, *, sweep_seconds: float = 5.0) -> None:
        self.runtime = runtime
        self.sweep_seconds = sweep_seconds
        #: How far back `route_global` looks for the clinic that messaged an inbound sender.
        self.owner_days = 365
        self.context = webhook_context(
            runtime.http,
            RedisSeenTokenStore(runtime.redis)
            if runtime.redis is not None
            else MemorySeenTokenStore(),
            max_age=runtime.settings.webhook_max_age_seconds,
            sns_cert_url_prefixes=runtime.settings.sns_prefixes,
        )
        #: Awaited before each application of stored events (tests slow processing with it).
        self.delay: Callable[[], Awaitable[None]] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.Task[None] | None = None

    @staticmethod
    def provider_key(name: str) -> str | None:
        """The canonical provider key of a URL segment, or None when no handler has it."""
        return handler_key(name)

    async def clinic_exists(self, clinic_id: str) -> bool:
        from clinicomm.store.models import Clinic

        async with self.runtime.db.read() as session:
            return await session.get(Clinic, clinic_id) is not None

    async def credentials(self, clinic_id: str, key: str) -> list[Any]:
        """Every credentials object of the clinic's own slots (primary, fallbacks, enabled or
        not: a disabled slot still gets reports for what it sent) of provider `key`, on any
        channel. Global providers are not a clinic's: their webhooks are not served here."""
        found: list[Any] = []
        for spec in registry.specs():
            if spec.key != key:
                continue
            resolved = await self.runtime.config.get_clinic_config(clinic_id, spec.channel)
            if resolved.own is None:
                continue
            for _, slot in resolved.own.slots():
                fresh = all(slot.credentials is not c for c in found)
                if slot.provider == key and slot.credentials is not None and fresh:
                    found.append(slot.credentials)
        return found

    # ---- global providers -----------------------------------------------------------------
    def global_credentials(self, key: str) -> list[Any]:
        """Every credentials object of the global settings' slots of provider `key`, on any
        channel (the platform's own accounts: `EMAIL_*`/`SMS_*`/`WHATSAPP_*` variables or
        `CLINICOMM_GLOBAL_SETTINGS_FILE`)."""
        found: list[Any] = []
        for spec in registry.specs():
            if spec.key != key:
                continue
            settings = self.runtime.config.global_settings.channel(spec.channel)
            if settings is None:
                continue
            for _, slot in settings.slots():
                fresh = all(slot.credentials is not c for c in found)
                if slot.provider == key and slot.credentials is not None and fresh:
                    found.append(slot.credentials)
        return found

    async def route_global(
        self, key: str, events: Iterable[WebhookEvent]
    ) -> tuple[dict[str, list[WebhookEvent]], int]:
        """Each event of a global provider's webhook under the clinic it belongs to (see the
        module docstring); also the number of inbound messages no clinic sent to."""
        routed: dict[str, list[WebhookEvent]] = {}
        dropped = 0
        prefix = global_label_prefix(key) + "%"
        async with self.runtime.db.read() as session:
            for event in events:
                owner: str | None
                if isinstance(event, DeliveryEvent):
                    owner = None
                    if event.provider_message_id:
                        owner = await session.scalar(
                            select(Delivery.clinic_id)
                            .where(
                                Delivery.provider_message_id == event.provider_message_id,
                                Delivery.provider.like(prefix),
                            )
                            .limit(1)
                        )
                    if owner is None:
                        owner, event = GLOBAL_SCOPE, dataclasses.replace(event, recipient=None)
                else:
                    owner = await self._inbound_owner(session, prefix, event)
                    if owner is None:
                        dropped += 1
                        continue
                routed.setdefault(owner, []).append(event)
        return routed, dropped

    async def _inbound_owner(self, session: Any, prefix: str, event: InboundMessage) -> str | None:
        """The clinic that last messaged `event.sender` through this global provider on the
        event's channel, within `owner_days`.

        Each clinic's blind index of the sender (`KeyStore.indexes_of`) is looked up on
        `ix_deliveries_recipient_index`, `OWNER_CHUNK` clinics per query, so the cost grows
        with the number of clinics and the patient's deliveries, not with the table. The
        (clinic, index) pair must match: an index is only meaningful in its own clinic."""
        channel = event.channel.value
        since = utcnow() - timedelta(days=self.owner_days)
        address = canonical_key(channel, event.sender)
        indexes = await self.runtime.keys.indexes_of(self.runtime.db, address)
        pairs = list(indexes.items())
        best: tuple[Any, str, str] | None = None
        for start in range(0, len(pairs), OWNER_CHUNK):
            chunk = pairs[start : start + OWNER_CHUNK]
            row = (await session.execute(owner_query(chunk, prefix, channel, since))).first()
            if row is not None:
                found = (aware(row.created_at), row.id, row.clinic_id)
                if best is None or found[:2] > best[:2]:
                    best = found
        return None if best is None else best[2]

    # ---- applying stored events -----------------------------------------------------------
    def submit(self, ids: Iterable[int]) -> None:
        """Apply these stored rows in the background (after the answer is sent)."""
        wanted = list(ids)
        if not wanted:
            return
        task = asyncio.create_task(self._apply(wanted), name="webhook-apply")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _apply(self, ids: list[int] | None) -> None:
        try:
            if self.delay is not None:
                await self.delay()
            async with self.runtime.db.session() as session:
                since = None if ids is not None else utcnow() - timedelta(days=1)
                result = await apply_stored(session, ids=ids, since=since)
            if result.status_changes or result.suppressions_added or result.inbound:
                log.info(
                    "webhook events applied",
                    extra={
                        "event": "webhook_applied",
                        "statusChanges": result.status_changes,
                        "suppressionsAdded": result.suppressions_added,
                        "suppressionsLifted": result.suppressions_lifted,
                        "inbound": result.inbound,
                        "unmatched": result.unmatched,
                    },
                )
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the rows stay unprocessed; the sweep tries again
            log.warning(
                "could not apply webhook events",
                extra={"event": "webhook_apply_failed", "error": type(exc).__name__},
            )

    async def drain(self) -> None:
        """Wait for the submitted applications (tests; graceful shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def start(self) -> None:
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep(), name="webhook-sweep")

    async def stop(self) -> None:
        tasks = [t for t in [self._sweeper, *self._tasks] if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._sweeper = None
        self._tasks.clear()

    async def _sweep(self) -> None:
        while True:
            await self._apply(None)
            await asyncio.sleep(self.sweep_seconds)


def webhook_service(runtime: Runtime) -> WebhookService:
    """The runtime's one `WebhookService` (created on first use)."""
    service = runtime.extras.get("webhooks")
    if service is None:
        service = WebhookService(runtime)
        runtime.extras["webhooks"] = service
    assert isinstance(service, WebhookService)
    return service
