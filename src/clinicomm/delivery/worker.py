"""The delivery worker: claim due deliveries, send them through their chains, record results.

One worker runs inside `clinicomm serve` (unless `CLINICOMM_WORKER=false`); `clinicomm worker`
runs it alone, as many processes as wanted on PostgreSQL. The loop:

1. claim up to `batch_size` due deliveries with a lease (`delivery.outbox.claim`), as long as
   fewer than `concurrency` are in flight;
2. handle each one concurrently: `delivery.admission` (checks before any provider call),
   then `delivery.sender` (adapter calls, asking `delivery.decision` after each one);
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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncSession

from clinicomm.crypto import CryptoError
from clinicomm.delivery import admission, decision
from clinicomm.delivery.admission import Guards
from clinicomm.delivery.contents import Contents, Erased, Unreadable
from clinicomm.delivery.outbox import (
    Notifier,
    claim,
    flat,
    reap_expired,
    write_flat,
    write_results,
)
from clinicomm.delivery.records import Claimed, DeliveryStatus, Handled, Priority
from clinicomm.delivery.retention import (
    purge_audit,
    purge_contents,
    purge_events,
    purge_idempotency_keys,
)
from clinicomm.delivery.sender import Walk, outcome_of, position_of, send_through_chain
from clinicomm.providers.base import Channel
from clinicomm.routing.chain import ChainBuilder
from clinicomm.settings.keys import PLATFORM
from clinicomm.settings.service import ConfigService, ResolvedChannel
from clinicomm.store.db import Database
from clinicomm.store.models import utcnow
from clinicomm.telemetry import metrics
from clinicomm.telemetry.outcomes import log_delivery_end

if TYPE_CHECKING:
    from clinicomm.runtime import Runtime

log = logging.getLogger(__name__)


#: A worker process's slots (`CLINICOMM_WORKER_CONCURRENCY` unset): results wait for the
#: next flush in their slots, and with 256 a worker process spent its time waiting on them
#: (batch-accept on PostgreSQL, two API processes and a worker: 4,219-4,973 against
#: 5,246-5,861 deliveries/s in five interleaved pairs). Inside `serve` it stays 256: there
#: 512 slots cost SMTP on SQLite a fifth of its rate (bench/RESULTS.md, Dec 6).
WORKER_PROCESS_CONCURRENCY = 512


#: Rows a retention sweep handles in one transaction (`Worker._retention`).
RETENTION_BATCH = 500
#: Transactions of one sweep in one reaper pass: 20,000 rows a sweep every `reap_interval`
#: (5 s), four times the rate of 1,000 messages a second.
RETENTION_BATCHES = 40


@dataclass
class WorkerOptions:
    """Tuning knobs; the defaults suit one 2-core machine."""

    batch_size: int = 100
    #: Sends in flight plus sent-but-unrecorded deliveries (`client.worker_options` gives a
    #: worker process `WORKER_PROCESS_CONCURRENCY`).
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
    #: Bulk's minimum share of the claimed slots while bulk is due (see `outbox.claim`).
    bulk_share: float = 0.1
    #: At most this share of `concurrency` is bulk in flight: the rest stays free for urgent
    #: and normal deliveries, and a bulk run does not crowd this process's event loop.
    bulk_concurrency_share: float = 0.5


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
        contents: Contents | None = None,
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
        #: Set when a result is added: the idle flusher sleeps until then.
        self._results_ready = asyncio.Event()
        #: Decrypted message contents; the runtime's accept primes it (`for_runtime`).
        self._contents = contents or Contents(db, config.keys)
        self._facts: dict[str, admission.Facts] = {}
        self.sent = 0
        self.failed = 0
        self._bulk_credit = 0.0
        self._bulk_inflight: set[str] = set()
        self._bulk_room = asyncio.Event()

    @classmethod
    def for_runtime(cls, runtime: Runtime, options: WorkerOptions | None = None) -> Worker:
        """A worker using the runtime's database, config, chains, wake-ups, health and limits;
        the messages the runtime accepts reach its content cache at commit."""
        contents = Contents(runtime.db, runtime.config.keys)
        runtime.messaging.share_contents(contents)
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
            contents=contents,
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
                # Cleared before the claim: bulk finishing from here on wakes the wait below.
                self._bulk_room.clear()
                want = min(self.options.batch_size, free)
                bulk_free = max(self._bulk_slots() - len(self._bulk_inflight), 0)
                try:
                    batch = await self._claim(want, bulk_free)
                except Exception as exc:  # database down: wait and try again
                    log.warning(
                        "claim failed", extra={"event": "claim_failed", "error": type(exc).__name__}
                    )
                    await _wait_any(stop, None, self.options.poll_seconds)
                    continue
                if batch:
                    await self._start(batch)
                if len(batch) < want:
                    # This claim took all the bulk it was allowed (more may be due).
                    capped = sum(c.priority == Priority.BULK.rank for c in batch) >= bulk_free
                    # A short claim whose bulk share was capped: wake up when half of the bulk
                    # slots are free again (a claim of many rows, not one per freed slot), not
                    # only at the next poll. Whether the slots are full *now* is not the test:
                    # deliveries of the last claim often finish while this one runs, and
                    # waiting for the poll then left due bulk idle (~1 s per claim).
                    await _wait_any(
                        stop,
                        self.notifier.event,
                        self.options.poll_seconds,
                        also=self._bulk_room if capped else None,
                    )
        finally:
            await self._shutdown()
            if listener is not None:
                with contextlib.suppress(Exception):
                    await listener.close()
            stop.set()
            # The flusher is not cancelled: a flush cancelled after its COMMIT reached the
            # database would be written again below (attempt rows and channel-fallback
            # deliveries twice). It sees `stop` within `flush_interval`, after its flush.
            flusher, *others = helpers
            for task in others:
                task.cancel()
            for task in others:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            with contextlib.suppress(Exception):
                await flusher
            await self._flush()
            log.info(
                "worker stopped",
                extra={"event": "worker_stopped", "workerId": self.worker_id, "sent": self.sent},
            )

    async def _claim(self, limit: int, bulk_free: int) -> list[Claimed]:
        # Bulk's minimum share: `bulk_share` of every claimed slot accrues as credit, and
        # each whole slot of it is reserved for bulk in the next claim (used by other classes
        # when no bulk is due), so a claim of 1 slot at a time still gives bulk its share.
        self._bulk_credit = min(self._bulk_credit + limit * self.options.bulk_share, limit)
        reserve = int(self._bulk_credit)
        batch = await claim(
            self.db,
            owner=self.worker_id,
            limit=limit,
            now=utcnow(),
            lease=timedelta(seconds=self.options.lease_seconds),
            bulk_reserve=reserve,
            bulk_limit=bulk_free,
        )
        self._bulk_credit -= reserve
        return batch

    async def _start(self, batch: list[Claimed]) -> None:
        try:
            await self._contents.load([c.message_id for c in batch])
        except Exception as exc:
            log.warning(
                "could not load message contents",
                extra={"event": "content_load_failed", "error": type(exc).__name__},
            )
        try:
            facts = await admission.load(self.db, batch)
        except Exception as exc:  # no facts: each delivery is retried later (_process)
            log.warning(
                "could not load suppressions",
                extra={"event": "gates_failed", "error": type(exc).__name__},
            )
        else:
            for claimed in batch:
                self._facts[claimed.id] = facts
        for claimed in batch:
            self._claimed[claimed.id] = claimed
            if claimed.priority == Priority.BULK.rank:
                self._bulk_inflight.add(claimed.id)
            task = asyncio.create_task(self._process(claimed), name=claimed.id)
            self._inflight[claimed.id] = task
            task.add_done_callback(self._done)

    def _bulk_slots(self) -> int:
        return max(1, int(self.options.concurrency * self.options.bulk_concurrency_share))

    def _unrecorded(self) -> int:
        return len(self._results) + self._flushing

    def _done(self, task: asyncio.Task[None]) -> None:
        delivery_id = task.get_name()
        self._inflight.pop(delivery_id, None)
        if delivery_id in self._bulk_inflight:
            self._bulk_inflight.discard(delivery_id)
            if len(self._bulk_inflight) <= self._bulk_slots() // 2:
                self._bulk_room.set()
        self._claimed.pop(delivery_id, None)
        self._facts.pop(delivery_id, None)

    async def _process(self, claimed: Claimed) -> None:
        try:
            handled = await self._handle(claimed)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            handled = self._not_prepared(claimed, exc)
        outcome = handled.outcome
        if outcome.status is DeliveryStatus.SENT:
            self.sent += 1
        elif outcome.status is DeliveryStatus.FAILED:
            self.failed += 1
        elif outcome.status is DeliveryStatus.EXPIRED:
            metrics.TOTAL_EXPIRED.labels(claimed.channel).inc()
        log_delivery_end(
            delivery_id=claimed.id,
            message_id=claimed.message_id,
            clinic_id=claimed.clinic_id,
            channel=claimed.channel,
            status=outcome.status.value,
            provider=outcome.provider,
            error=outcome.error,
            attempts=outcome.attempts,
        )
        handled.may_call_back = self._contents.may_call_back(claimed.message_id)
        self._results.append(handled)
        self._results_ready.set()
        if len(self._results) >= self.options.batch_size:
            self._flush_now.set()

    async def _handle(self, claimed: Claimed) -> Handled:
        """Admission (every check before a provider call), then the chain."""
        if claimed.is_expired(utcnow()):
            return Handled(claimed.expired())
        content = self._contents.lookup(claimed.message_id)
        if isinstance(content, Erased):
            return Handled(claimed.refuse("message content erased after the retention period"))
        if isinstance(content, Unreadable):
            return Handled(
                claimed.fail("configuration", errors=[*claimed.errors, _config(content.error)])
            )
        if content is None:
            raise LookupError("message content unavailable")
        try:
            await self._reveal(claimed)
        except CryptoError as exc:  # CryptoError messages name keys and clinics, never values
            errors = [*claimed.errors, _config(str(exc))]
            return Handled(claimed.fail("configuration", errors=errors))
        facts = self._facts.get(claimed.id)
        if facts is None:
            raise LookupError("suppressions could not be read")
        resolved = await self.config.get_clinic_config(claimed.clinic_id, Channel(claimed.channel))
        verdict = await admission.admit(claimed, resolved, content, facts, self.guards, utcnow())
        if isinstance(verdict, admission.Expired):
            return Handled(claimed.expired())
        if isinstance(verdict, admission.Suppressed):
            return Handled(claimed.suppressed())
        if isinstance(verdict, admission.Refused):
            return self._refused(claimed, resolved, verdict)
        if isinstance(verdict, admission.Wait):
            return Handled(claimed.requeue(claimed.clamp(verdict.at), verdict.reason))
        return await send_through_chain(
            claimed,
            self.chains.chain(resolved),
            verdict.content,
            now_fn=utcnow,
            max_age=timedelta(seconds=self.options.max_age_seconds),
            guards=self.guards,
            retry_base=self.options.retry_base_seconds,
        )

    async def _reveal(self, claimed: Claimed) -> None:
        """The addresses in clear, for the adapter only (never logged or stored), and the
        fallback address's blind index (for a channel-fallback delivery)."""
        if not claimed.sealed and not claimed.fallback_sealed:
            return
        cipher = await self.config.keys.cipher_for(self.db, claimed.clinic_id or PLATFORM)
        if claimed.sealed and claimed.recipient == claimed.sealed:
            claimed.recipient = cipher.decrypt_address(claimed.sealed)
        if claimed.fallback_sealed and claimed.fallback_address == claimed.fallback_sealed:
            claimed.fallback_address = cipher.decrypt_address(claimed.fallback_sealed)
            claimed.fallback_index = cipher.index(claimed.fallback_address)

    def _refused(
        self, claimed: Claimed, resolved: ResolvedChannel, verdict: admission.Refused
    ) -> Handled:
        """Refused before any provider call; the clinic's channel fallback takes the delivery
        when the reason allows it (a closed window without a template)."""
        if verdict.fallback is not None:
            chain = self.chains.chain(resolved)
            now = utcnow()
            walk = Walk(claimed.chain_position, 0, claimed.attempts, list(claimed.errors))
            deadline = claimed.created_at + timedelta(seconds=self.options.max_age_seconds)
            step = decision.channel_fallback(
                position_of(claimed, chain, walk, deadline), verdict.fallback
            )
            if step is not None:
                return outcome_of(claimed, step, walk, None, now)
        return Handled(claimed.refuse(verdict.reason))

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
            return Handled(
                claimed.fail("could not be prepared before its maximum age", errors=errors)
            )
        return Handled(claimed.requeue(claimed.clamp(retry_at), "retrying", errors=errors))

    # ---- results --------------------------------------------------------------------------
    async def _flusher(self, stop: asyncio.Event) -> None:
        """Flush results every `flush_interval` (at once at `batch_size`) while there are any;
        with none, sleep until one comes or `stop` (an idle worker was waking 100 times a
        second for nothing)."""
        while not stop.is_set():
            self._results_ready.clear()
            if not self._results:
                await _wait_any(stop, self._results_ready, 3600.0)
                continue
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
        outcomes = [h.outcome for h in pending]
        attempts = [a for h in pending for a in h.attempts]
        fallbacks = [h.fallback for h in pending if h.fallback]
        suppressions = [h.suppress for h in pending if h.suppress]
        no_callbacks = {h.outcome.delivery_id for h in pending if not h.may_call_back}
        one = (not self.db.is_sqlite or self.db.raw is not None) and flat(
            outcomes, fallbacks, suppressions, no_callbacks
        )
        while True:
            try:
                # The common case: one statement (PostgreSQL) or one raw transaction (SQLite).
                if one:
                    await write_flat(
                        self.db,
                        owner=self.worker_id,
                        now=utcnow(),
                        outcomes=outcomes,
                        attempts=attempts,
                    )
                    self._flushing = 0
                    return
                async with self.db.session() as session:
                    await write_results(
                        session,
                        owner=self.worker_id,
                        now=utcnow(),
                        outcomes=outcomes,
                        attempts=attempts,
                        new_deliveries=fallbacks,
                        suppressions=suppressions,
                        no_callbacks=no_callbacks,
                    )
                    if fallbacks:
                        await self.notifier.in_transaction(await session.connection())
                if fallbacks:
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
                if taken:
                    log.warning(
                        "expired leases returned to the queue",
                        extra={"event": "leases_reaped", "count": taken},
                    )
                    self.notifier.event.set()
                erased = await self._retention(stop)
                if erased:
                    log.info(
                        "message contents erased after the retention period",
                        extra={"event": "contents_purged", "count": erased},
                    )
            except Exception as exc:
                log.warning(
                    "reaper failed", extra={"event": "reap_failed", "error": type(exc).__name__}
                )

    async def _retention(self, stop: asyncio.Event) -> int:
        """One pass of the retention sweeps (`delivery.retention`), each in transactions of
        `RETENTION_BATCH` rows, at most `RETENTION_BATCHES` of them a sweep and pass; the
        number of messages whose contents were erased.

        One transaction of every sweep held the write lock, and on SQLite the event loop,
        for all of it: once a service has run a day (keys) or the retention period
        (contents) at 1,000 messages a second, each pass has ~5,000 rows of each to handle:
        16-22 ms (keys) and 65-75 ms (contents) in one transaction on SQLite, ~3 and ~7.5 ms
        a batch of 500, with the accept and the flush taking their turns between batches."""
        now = utcnow()
        before = now - timedelta(seconds=self.options.retention_seconds)
        audit_before = now - timedelta(seconds=self.options.audit_retention_seconds)
        await self._in_batches(stop, lambda s: purge_idempotency_keys(s, now, RETENTION_BATCH))
        erased = await self._in_batches(stop, lambda s: purge_contents(s, before, RETENTION_BATCH))
        await self._in_batches(stop, lambda s: purge_events(s, before, RETENTION_BATCH))
        await self._in_batches(stop, lambda s: purge_audit(s, audit_before, RETENTION_BATCH))
        return erased

    async def _in_batches(
        self, stop: asyncio.Event, sweep: Callable[[AsyncSession], Awaitable[int]]
    ) -> int:
        """`sweep` in transactions of its own until it handles fewer than `RETENTION_BATCH`
        rows, `RETENTION_BATCHES` times at most or until `stop`; the rows it handled."""
        total = 0
        for _ in range(RETENTION_BATCHES):
            async with self.db.session() as session:
                done = await sweep(session)
            total += done
            if done < RETENTION_BATCH or stop.is_set():
                break
            await asyncio.sleep(0)  # the other writers' turn
        return total

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
            self._results.append(Handled(claimed.requeue(now, "released", quiet=True)))
            self._results_ready.set()
        self._claimed.clear()

    # ---- wake-ups ---------------------------------------------------------------------------
    async def _listen(self) -> Any:
        """LISTEN for new deliveries on PostgreSQL; None on SQLite (in-process event). Warns
        (event `autovacuum_off`) when the server does not vacuum on its own."""
        if self.db.is_sqlite:
            return None
        try:
            import asyncpg

            url = make_url(self.db.url).set(drivername="postgresql")
            conn = await asyncpg.connect(url.render_as_string(hide_password=False), timeout=5)
            await conn.add_listener(Notifier.CHANNEL, lambda *_: self.notifier.event.set())
        except Exception as exc:
            log.warning(
                "LISTEN unavailable; polling only",
                extra={"event": "listen_failed", "error": type(exc).__name__},
            )
            return None
        with contextlib.suppress(Exception):
            if await conn.fetchval("SELECT current_setting('autovacuum')") == "off":
                # Claims then scan every dead version of every claimed row (migration i20_0003).
                log.warning(
                    "PostgreSQL autovacuum is off: dead delivery rows pile up in the claim "
                    "index and every claim slows; run VACUUM on deliveries regularly",
                    extra={"event": "autovacuum_off"},
                )
        return conn


async def _wait_any(
    stop: asyncio.Event,
    event: asyncio.Event | None,
    seconds: float,
    *,
    also: asyncio.Event | None = None,
) -> None:
    """Until `stop`, `event` or `also` is set, or `seconds` pass."""
    waiters = [asyncio.create_task(stop.wait())]
    for extra in (event, also):
        if extra is not None:
            waiters.append(asyncio.create_task(extra.wait()))
    try:
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


def _config(detail: str) -> dict[str, Any]:
    """The reason recorded for content this worker cannot decrypt."""
    return {
        "provider": None,
        "class": "configuration",
        "message": f"message content or address cannot be decrypted by this worker ({detail})",
    }
