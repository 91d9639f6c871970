"""The callback sender: claims queued status callbacks and POSTs them, signed, at least once.

One loop per process (started with the monitors by `clinicomm serve` and `clinicomm worker`);
several processes share the queue through leases. A 2xx answer marks the event `sent`. Any
other answer, a timeout or a refused connection schedules a retry after full-jitter
exponential backoff (`CLINICOMM_CALLBACK_RETRY_BASE_SECONDS` * 2^attempt, at most one hour)
until `CLINICOMM_CALLBACK_MAX_AGE_SECONDS` (24 h) after the status change; then `expired`.
A delivery's later events wait behind a failing one (`queue.claim`), so order holds.

Headers: `Content-Type: application/json`, `Clinicomm-Signature`, `Clinicomm-Event-Id` (the
stable event id, the same on every retry: receivers drop duplicates by it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import uuid
from datetime import datetime, timedelta

import aiohttp
import orjson

from clinicomm.callbacks import queue
from clinicomm.callbacks.signing import HEADER, sign
from clinicomm.callbacks.targets import (
    CallbackTargets,
    DestinationRefusedError,
    check_destination,
    session_factory,
)
from clinicomm.providers.egress import NOT_ALLOWED, EgressPolicy, refused
from clinicomm.store.db import Database
from clinicomm.store.models import utcnow
from clinicomm.telemetry import metrics

log = logging.getLogger(__name__)

MAX_BACKOFF_SECONDS = 3600.0


def backoff(attempt: int, base: float, rng: random.Random | None = None) -> float:
    """Seconds before retry `attempt` (0-based): full jitter over base·2^attempt, capped."""
    ceiling = min(MAX_BACKOFF_SECONDS, base * (2 ** min(attempt, 30)))
    return max(base / 2, (rng or random).uniform(0, ceiling))


class CallbackSender:
    """`run(stop)` until `stop` is set; `run_once()` sends one round (tests)."""

    def __init__(
        self,
        db: Database,
        targets: CallbackTargets,
        *,
        production: bool = False,
        egress: EgressPolicy | None = None,
        retry_base: float = 5.0,
        max_age: float = 86400.0,
        timeout: float = 10.0,
        poll: float = 1.0,
        batch: int = 50,
        lease: float = 60.0,
    ) -> None:
        self.db = db
        self.targets = targets
        self.production = production
        self.egress = egress or EgressPolicy(production=production)
        self.retry_base = retry_base
        self.max_age = timedelta(seconds=max_age)
        self.timeout = timeout
        self.poll = poll
        self.batch = batch
        self.lease = timedelta(seconds=max(lease, timeout * 2))
        self.owner = f"cb-{uuid.uuid4().hex[:12]}"
        self._http: aiohttp.ClientSession | None = None

    async def run(self, stop: asyncio.Event) -> None:
        try:
            while not stop.is_set():
                try:
                    busy = await self.run_once()
                except Exception as exc:  # the loop outlives a database hiccup
                    log.warning(
                        "callback round failed",
                        extra={"event": "callback_round_failed", "error": type(exc).__name__},
                    )
                    busy = 0
                if busy < self.batch:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), self.poll)
        finally:
            await self.close()

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def run_once(self) -> int:
        """Claim and send one batch; how many were claimed."""
        async with self.db.session() as session:
            claimed = await queue.claim(
                session, owner=self.owner, now=utcnow(), lease=self.lease, limit=self.batch
            )
        if claimed:
            await asyncio.gather(*(self._send(item) for item in claimed))
        return len(claimed)

    async def _send(self, item: queue.ClaimedCallback) -> None:
        async with self.db.read() as session:
            if await queue.superseded(session, item):
                await self._finish(item, "superseded")
                return
        now = utcnow()
        if now - item.created_at > self.max_age:
            await self._finish(item, "expired", "gave up after the maximum age")
            return
        error = await self._post(item)
        if error is None:
            await self._finish(item, "sent")
            return
        delay = backoff(item.attempts, self.retry_base)
        retry_at = utcnow() + timedelta(seconds=delay)
        if retry_at - item.created_at > self.max_age:
            await self._finish(item, "expired", error)
            return
        await self._finish(item, "retry", error, retry_at)

    async def _post(self, item: queue.ClaimedCallback) -> str | None:
        """POST the event; None on a 2xx answer, else why it failed (status or error class)."""
        try:
            check_destination(item.url, self.egress)
        except DestinationRefusedError as exc:
            return f"refused: {exc}"
        secret = await self.targets.secret(item.clinic_id, item.source)
        if secret is None:
            return "no callback secret configured"
        payload = dict(item.payload)
        payload["metadata"] = await self.targets.metadata(
            item.clinic_id, str(payload.get("messageId", "")), payload.get("metadata")
        )
        body = orjson.dumps(payload)
        headers = {
            "Content-Type": "application/json",
            HEADER: sign(secret, body),
            "Clinicomm-Event-Id": item.event_id,
            "User-Agent": "clinicomm-callbacks",
        }
        if self._http is None:
            self._http = session_factory(self.timeout, self.egress)
        try:
            async with self._http.post(
                item.url, data=body, headers=headers, allow_redirects=False
            ) as answer:
                await answer.read()
                if 200 <= answer.status < 300:
                    return None
                return f"HTTP {answer.status}"
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            if refused(exc):
                return f"refused: {NOT_ALLOWED}"
            return type(exc).__name__

    async def _finish(
        self,
        item: queue.ClaimedCallback,
        state: str,
        error: str | None = None,
        next_attempt_at: datetime | None = None,
    ) -> None:
        async with self.db.session() as session:
            await queue.finish(
                session,
                item,
                owner=self.owner,
                state=state,
                now=utcnow(),
                error=error,
                next_attempt_at=next_attempt_at,
            )
        metrics.CALLBACKS.labels(state).inc()
        if state in ("retry", "expired"):
            log.log(
                logging.WARNING if state == "expired" else logging.INFO,
                "status callback not delivered",
                extra={
                    "event": f"callback_{state}",
                    "eventId": item.event_id,
                    "deliveryId": item.delivery_id,
                    "clinicId": item.clinic_id,
                    "attempts": item.attempts + 1,
                    "error": error,
                },
            )
