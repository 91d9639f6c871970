"""The server side of provider webhooks: whose credentials verify, and applying after the answer.

`POST /api/v1/webhooks/{provider}/{clinicId}` (api/routers/webhooks.py) verifies with the
clinic's own credentials (`WebhookService.credentials`), stores the parsed events in one
transaction (`delivery.ingest.store_events`) and answers; `WebhookService.submit` then applies
them in a task of this process (`delivery.ingest.apply_stored`), so the answer never waits
for status updates (PROVIDER-FACTS §8 item 16). If the process stops before that task ran,
the rows stay unprocessed in `delivery_events` and the sweep (every `sweep_seconds`, and at
start) applies them; the sweep also applies status events that arrived before the worker
recorded the delivery's provider message id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from clinicomm.delivery.ingest import apply_stored
from clinicomm.providers import registry
from clinicomm.providers.webhooks import handler_key, webhook_context
from clinicomm.providers.webhooks.base import MemorySeenTokenStore
from clinicomm.store.models import utcnow

if TYPE_CHECKING:
    from clinicomm.runtime import Runtime

log = logging.getLogger(__name__)


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


class WebhookService:
    """Credentials lookup, the verification context, and the apply-after-answer tasks."""

    def __init__(self, runtime: Runtime, *, sweep_seconds: float = 5.0) -> None:
        self.runtime = runtime
        self.sweep_seconds = sweep_seconds
        self.context = webhook_context(
            runtime.http,
            RedisSeenTokenStore(runtime.redis)
            if runtime.redis is not None
            else MemorySeenTokenStore(),
            max_age=runtime.settings.webhook_max_age_seconds,
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
