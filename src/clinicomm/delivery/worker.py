"""The delivery worker: claim due deliveries, send them through their chains, record results.

One worker runs inside `clinicomm serve` (unless `CLINICOMM_WORKER=false`); `clinicomm worker`
runs it alone, as many processes as wanted on PostgreSQL. The loop:

1. claim up to `batch_size` due deliveries with a lease (`delivery.queue.claim`), as long as
   fewer than `concurrency` are in flight;
2. send each one concurrently (`delivery.sender`), collecting outcomes and attempt rows;
3. a flusher writes outcomes and attempts in one transaction every `flush_interval` (batched);
   a failed write is retried, never dropped;
4. when there is nothing due, wait for a wake-up: PostgreSQL `LISTEN` or the in-process event
   set after each accepted send, with a poll every `poll_seconds` as a safety net (retries
   scheduled for later are found by that poll).

A reaper returns expired leases (a crashed worker's) to the queue. On stop (SIGTERM), the
worker claims nothing more, lets in-flight sends finish for up to `shutdown_grace` seconds,
releases what is left (back to `queued`) and flushes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections import OrderedDict
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import orjson
from sqlalchemy import select
from sqlalchemy.engine import make_url

from clinicomm.delivery import gates, policy
from clinicomm.delivery.events import SuppressionReason, suppress
from clinicomm.delivery.queue import (
    Claimed,
    Outcome,
    claim,
    purge_audit,
    purge_contents,
    purge_events,
    purge_idempotency_keys,
    reap_expired,
    write_results,
)
from clinicomm.delivery.sender import Content, Guards, Handled, send_through_chain
from clinicomm.messaging.models import DeliveryStatus
from clinicomm.messaging.service import PLATFORM_KEY_OWNER, Notifier
from clinicomm.observability import metrics
from clinicomm.providers.base import Channel
from clinicomm.routing.chain import ChainBuilder
from clinicomm.routing.limits import clinic_channel_key, clinic_channel_limits
from clinicomm.runtime import Runtime
from clinicomm.settings.service import ConfigService, ResolvedChannel
from clinicomm.store.db import Database
from clinicomm.store.models import Message, utcnow

log = logging.getLogger(__name__)


@dataclass
class WorkerOptions:
    """Tuning knobs; the defaults suit one 2-core machine."""

    batch_size: int = 100
    concurrency: int = 256
    lease_seconds: float = 60.0
    poll_seconds: float = 1.0
    max_age_seconds: float = 6 * 3600.0
    flush_interval: float = 0.01
    reap_interval: float = 5.0
    shutdown_grace: float = 10.0
    #: Requeue delay when a delivery cannot be prepared (config unreadable, database hiccup).
    prepare_retry_seconds: float = 30.0
    #: Message contents are erased this long after acceptance (see `purge_contents`).
    retention_seconds: float = 30 * 86400.0
    #: Audit entries are deleted this long after they were written (six years).
    audit_retention_seconds: float = 2192 * 86400.0
    #: Base of the full-jitter backoff between retries on one provider.
    retry_base_seconds: float = 2.0


class Worker:
    """Claims and sends deliveries until `stop` is set."""

    def __init__(
        self,
        db: Database,
        config: ConfigService,
        chains: ChainBuilder,
        notifier: Notifier,
        options: WorkerOptions | None = None,
        *,
        guards: Guards | None = None,
        worker_id: str | None = None,
    ) -> None:
        self.guards = guards
        self.db = db
        self.config = config
        self.chains = chains
        self.notifier = notifier
        self.options = options or WorkerOptions()
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{id(self) % 10_000}"
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._claimed: dict[str, Claimed] = {}
        self._results: list[Handled] = []
        self._flushing = 0
        self._flush_now = asyncio.Event()
        self._contents: OrderedDict[str, Content] = OrderedDict()
        self._erased: set[str] = set()
        self._gates: dict[str, gates.Gates] = {}
        self.sent = 0
        self.failed = 0

    @classmethod
    def for_runtime(cls, runtime: Runtime, options: WorkerOptions | None = None) -> Worker:
        """A worker using the runtime's database, config, chains, wake-ups, health and limits."""
        return cls(
            runtime.db,
            runtime.config,
            runtime.chains,
            runtime.notifier,
            options,
            # A delivery waiting for a busy sender must be requeued well within its lease,
            # or the reaper hands it to another worker while this one may still send it.
            guards=Guards(
                runtime.health,
                runtime.limiter,
                max_sender_wait=min(2.0, (options or WorkerOptions()).lease_seconds / 4),
            ),
        )

    # ---- main loop ------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        """Work until `stop` is set, then shut down gracefully."""
        helpers = [
            asyncio.create_task(self._flusher(stop), name="worker-flush"),
            asyncio.create_task(self._reaper(stop), name="worker-reap"),
        ]
        listener = await self._listen()
        log.info("worker started", extra={"event": "worker_started", "workerId": self.worker_id})
        try:
            while not stop.is_set():
                # Sent-but-unrecorded deliveries count as in flight: a crash may resend exactly
                # these, so their number stays within `concurrency`.
                free = self.options.concurrency - len(self._inflight) - self._unrecorded()
                if free <= 0:
                    if self._inflight:
                        await asyncio.wait(
                            list(self._inflight.values()), return_when=asyncio.FIRST_COMPLETED
                        )
                    else:
                        self._flush_now.set()
                        await asyncio.sleep(self.options.flush_interval)
                    continue
                self.notifier.event.clear()
                want = min(self.options.batch_size, free)
                try:
                    batch = await self._claim(want)
                except Exception as exc:  # database down: wait and try again
                    log.warning(
                        "claim failed", extra={"event": "claim_failed", "error": type(exc).__name__}
                    )
                    await _wait_any(stop, None, self.options.poll_seconds)
                    continue
                if batch:
                    await self._start(batch)
                if len(batch) < want:
                    await _wait_any(stop, self.notifier.event, self.options.poll_seconds)
        finally:
            await self._shutdown()
            if listener is not None:
                with contextlib.suppress(Exception):
                    await listener.close()
            stop.set()
            for task in helpers:
                task.cancel()
            for task in helpers:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await self._flush()
            log.info(
                "worker stopped",
                extra={"event": "worker_stopped", "workerId": self.worker_id, "sent": self.sent},
            )

    async def _claim(self, limit: int) -> list[Claimed]:
        async with self.db.session() as session:
            return await claim(
                session,
                owner=self.worker_id,
                limit=limit,
                now=utcnow(),
                lease=timedelta(seconds=self.options.lease_seconds),
            )

    async def _start(self, batch: list[Claimed]) -> None:
        try:
            await self._load_contents({c.message_id: c.clinic_id for c in batch})
        except Exception as exc:
            log.warning(
                "could not load message contents",
                extra={"event": "content_load_failed", "error": type(exc).__name__},
            )
        try:
            facts = await gates.load(self.db, batch)
        except Exception as exc:  # no facts: each delivery is retried later (_process)
            log.warning(
                "could not load suppressions",
                extra={"event": "gates_failed", "error": type(exc).__name__},
            )
        else:
            for claimed in batch:
                self._gates[claimed.id] = facts
        for claimed in batch:
            self._claimed[claimed.id] = claimed
            task = asyncio.create_task(self._process(claimed), name=claimed.id)
            self._inflight[claimed.id] = task
            task.add_done_callback(self._done)

    def _unrecorded(self) -> int:
        return len(self._results) + self._flushing

    def _done(self, task: asyncio.Task[None]) -> None:
        delivery_id = task.get_name()
        self._inflight.pop(delivery_id, None)
        self._claimed.pop(delivery_id, None)
        self._gates.pop(delivery_id, None)

    async def _process(self, claimed: Claimed) -> None:
        try:
            handled = await self._handle(claimed)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            handled = self._not_prepared(claimed, exc)
        if handled.outcome.status is DeliveryStatus.SENT:
            self.sent += 1
        elif handled.outcome.status is DeliveryStatus.FAILED:
            self.failed += 1
        self._results.append(handled)
        if len(self._results) >= self.options.batch_size:
            self._flush_now.set()

    async def _handle(self, claimed: Claimed) -> Handled:
        """Check what must stop the delivery before any provider call, then send it."""
        if claimed.recipient == claimed.sealed and claimed.sealed:
            # The address in clear, for the adapter only (never logged or stored).
            cipher = await self.config.keys.cipher_for(
                self.db, claimed.clinic_id or PLATFORM_KEY_OWNER
            )
            claimed.recipient = cipher.decrypt_address(claimed.sealed)
        content = self._contents.get(claimed.message_id)
        if content is None and claimed.message_id in self._erased:
            return _refused(claimed, "message content erased after the retention period")
        if content is None:
            raise LookupError("message content unavailable")
        resolved = await self.config.get_clinic_config(claimed.clinic_id, Channel(claimed.channel))
        reason = policy.blocked(resolved, content)
        if reason is not None:
            return _refused(claimed, reason)
        gated = self._gate(claimed, resolved, content)
        if isinstance(gated, Handled):
            return gated
        limited = await self._clinic_limit(claimed, resolved)
        if limited is not None:
            return limited
        return await send_through_chain(
            claimed,
            self.chains.chain(resolved),
            gated,
            now_fn=utcnow,
            max_age=timedelta(seconds=self.options.max_age_seconds),
            guards=self.guards,
            retry_base=self.options.retry_base_seconds,
        )

    def _gate(
        self, claimed: Claimed, resolved: ResolvedChannel, content: Content
    ) -> Handled | Content:
        """Opt-outs and the WhatsApp window (`delivery.gates`), before any provider call."""
        facts = self._gates.get(claimed.id)
        if facts is None:
            raise LookupError("suppressions could not be read")
        if claimed.id in facts.suppressed:
            return Handled(
                Outcome(
                    claimed.id,
                    DeliveryStatus.SUPPRESSED,
                    claimed.attempts,
                    error={"reason": "the recipient opted out of this channel", "errors": []},
                )
            )
        decided = gates.window(resolved, content, facts.last_inbound.get(claimed.id), utcnow())
        if isinstance(decided, str):
            return _refused(claimed, decided)
        return decided

    async def _clinic_limit(self, claimed: Claimed, resolved: ResolvedChannel) -> Handled | None:
        """The clinic's own `rateLimit` for the channel, shared by every process: over the
        minute or hour limit the delivery waits; over the day limit it waits for the next
        window or fails, as the clinic set `onDayLimit`."""
        own = resolved.own
        if self.guards is None or own is None or own.rate_limit is None:
            return None
        limits = clinic_channel_limits(own.rate_limit)
        if not limits:
            return None
        key = clinic_channel_key(claimed.clinic_id, claimed.channel)
        wait = await self.guards.limiter.acquire(key, limits)
        if wait <= 0:
            return None
        day = own.rate_limit.max_per_day
        day_full = day is not None and await self.guards.limiter.usage(key, [(day, 86400.0)]) >= 1
        metrics.RATE_LIMITED.labels(claimed.clinic_id or "global", claimed.channel).inc()
        if day_full and own.rate_limit.on_day_limit == "fail":
            return _refused(claimed, "the clinic's daily limit is reached")
        return Handled(
            Outcome(
                claimed.id,
                DeliveryStatus.QUEUED,
                claimed.attempts,
                chain_position=claimed.chain_position,
                provider_attempts=claimed.provider_attempts,
                next_attempt_at=utcnow() + timedelta(seconds=wait),
                error={"reason": "waiting for the clinic's rate limit", "errors": claimed.errors},
            )
        )

    def _not_prepared(self, claimed: Claimed, exc: Exception) -> Handled:
        """A delivery that could not even be tried: retry later, fail once too old."""
        log.warning(
            "delivery could not be prepared",
            extra={
                "event": "delivery_prepare_failed",
                "deliveryId": claimed.id,
                "clinicId": claimed.clinic_id,
                # The type only: an exception's text may quote a patient's address or content.
                "error": type(exc).__name__,
            },
        )
        now = utcnow()
        reason = {"provider": None, "class": "internal", "message": type(exc).__name__}
        errors = [*claimed.errors, reason]
        retry_at = now + timedelta(seconds=self.options.prepare_retry_seconds)
        deadline = claimed.created_at + timedelta(seconds=self.options.max_age_seconds)
        if retry_at >= deadline:
            outcome = Outcome(
                claimed.id,
                DeliveryStatus.FAILED,
                claimed.attempts,
                chain_position=claimed.chain_position,
                error={"reason": "could not be prepared before its maximum age", "errors": errors},
            )
        else:
            outcome = Outcome(
                claimed.id,
                DeliveryStatus.QUEUED,
                claimed.attempts,
                chain_position=claimed.chain_position,
                provider_attempts=claimed.provider_attempts,
                next_attempt_at=retry_at,
                error={"reason": "retrying", "errors": errors},
            )
        return Handled(outcome)

    # ---- message contents -----------------------------------------------------------------
    async def _load_contents(self, wanted: dict[str, str | None]) -> None:
        missing = [m for m in wanted if m not in self._contents]
        if not missing:
            return
        async with self.db.read() as session:
            rows = (
                await session.execute(
                    select(Message.id, Message.clinic_id, Message.content, Message.category).where(
                        Message.id.in_(missing)
                    )
                )
            ).all()
            categories = {row[0]: row[3] for row in rows}
            for message_id, clinic_id, blob, _ in rows:
                if not blob:  # erased after the retention period
                    self._erased.add(message_id)
                    continue
                cipher = await self.config.keys.cipher_for(self.db, clinic_id or PLATFORM_KEY_OWNER)
                data = orjson.loads(cipher.decrypt_bytes(blob, f"message:{message_id}"))
                self._contents[message_id] = Content.from_json(data, categories[message_id])
        while len(self._contents) > 10_000:
            self._contents.popitem(last=False)

    # ---- results --------------------------------------------------------------------------
    async def _flusher(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._flush_now.wait(), self.options.flush_interval)
            self._flush_now.clear()
            await self._flush()

    async def _flush(self) -> None:
        """Write pending results; on a database error keep them and try again later."""
        if not self._results:
            return
        pending, self._results = self._results, []
        self._flushing = len(pending)
        delay = 0.1
        while True:
            try:
                async with self.db.session() as session:
                    await write_results(
                        session,
                        owner=self.worker_id,
                        now=utcnow(),
                        outcomes=[h.outcome for h in pending],
                        attempts=[a for h in pending for a in h.attempts],
                        new_deliveries=[h.fallback for h in pending if h.fallback],
                    )
                    for h in pending:
                        if h.suppress is not None:
                            clinic, channel, index, reason, source, sealed = h.suppress
                            await suppress(
                                session,
                                clinic,
                                channel,
                                index,
                                SuppressionReason(reason),
                                source,
                                address_enc=sealed or None,
                            )
                    if any(h.fallback for h in pending):
                        await self.notifier.in_transaction(await session.connection())
                if any(h.fallback for h in pending):
                    self.notifier.after_commit()
                self._flushing = 0
                return
            except asyncio.CancelledError:
                self._results = pending + self._results
                self._flushing = 0
                raise
            except Exception as exc:
                log.warning(
                    "could not record delivery results; retrying",
                    extra={"event": "flush_failed", "error": type(exc).__name__, "n": len(pending)},
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _reaper(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await _wait_any(stop, None, self.options.reap_interval)
            try:
                async with self.db.session() as session:
                    taken = await reap_expired(session, utcnow())
                    await purge_idempotency_keys(session, utcnow())
                    before = utcnow() - timedelta(seconds=self.options.retention_seconds)
                    erased = await purge_contents(session, before)
                    await purge_events(session, before)
                    await purge_audit(
                        session, utcnow() - timedelta(seconds=self.options.audit_retention_seconds)
                    )
                if erased:
                    log.info(
                        "message contents erased after the retention period",
                        extra={"event": "contents_purged", "count": erased},
                    )
                if taken:
                    log.warning(
                        "expired leases returned to the queue",
                        extra={"event": "leases_reaped", "count": taken},
                    )
                    self.notifier.event.set()
            except Exception as exc:
                log.warning(
                    "reaper failed", extra={"event": "reap_failed", "error": type(exc).__name__}
                )

    async def _shutdown(self) -> None:
        """Let in-flight sends finish (bounded), then release what is left."""
        if self._inflight:
            _, pending = await asyncio.wait(
                list(self._inflight.values()), timeout=self.options.shutdown_grace
            )
            for task in pending:
                task.cancel()
            for task in pending:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        now = utcnow()
        for claimed in list(self._claimed.values()):
            self._results.append(
                Handled(
                    Outcome(
                        claimed.id,
                        DeliveryStatus.QUEUED,
                        claimed.attempts,
                        chain_position=claimed.chain_position,
                        provider_attempts=claimed.provider_attempts,
                        next_attempt_at=now,
                        error={"reason": "released", "errors": claimed.errors}
                        if claimed.errors
                        else None,
                    )
                )
            )
        self._claimed.clear()

    # ---- wake-ups ---------------------------------------------------------------------------
    async def _listen(self) -> Any:
        """LISTEN for new deliveries on PostgreSQL; None on SQLite (in-process event)."""
        if self.db.is_sqlite:
            return None
        try:
            import asyncpg

            url = make_url(self.db.url).set(drivername="postgresql")
            conn = await asyncpg.connect(url.render_as_string(hide_password=False), timeout=5)
            await conn.add_listener(Notifier.CHANNEL, lambda *_: self.notifier.event.set())
            return conn
        except Exception as exc:
            log.warning(
                "LISTEN unavailable; polling only",
                extra={"event": "listen_failed", "error": type(exc).__name__},
            )
            return None


async def _wait_any(stop: asyncio.Event, event: asyncio.Event | None, seconds: float) -> None:
    waiters = [asyncio.create_task(stop.wait())]
    if event is not None:
        waiters.append(asyncio.create_task(event.wait()))
    try:
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


def _refused(claimed: Claimed, reason: str) -> Handled:
    """The delivery ends `failed` with `reason`, before any provider was called."""
    return Handled(
        Outcome(
            claimed.id,
            DeliveryStatus.FAILED,
            claimed.attempts,
            error={"reason": reason, "errors": claimed.errors},
        )
    )
