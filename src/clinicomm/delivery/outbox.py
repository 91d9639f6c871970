"""The outbox: the deliveries table as a queue. Enqueue, claim with a lease, reap, write results.

- `enqueue` inserts `NewDelivery` rows (accept's deliveries and channel fallbacks) and, with
  `Notifier`, wakes workers (PostgreSQL NOTIFY at commit, an in-process event after it).
- `claim` is one `WITH … UPDATE … WHERE id IN (SELECT … LIMIT n) RETURNING …`; on PostgreSQL
  the inner selects take `FOR UPDATE SKIP LOCKED`, so any number of worker processes claim
  disjoint batches. SQLite serialises writers, so the same statement is atomic there too.
  Order: urgent, then normal, then bulk (`deliveries.priority`), each class in fair order
  (`fair_at`, the per-clinic virtual clock); `bulk_reserve` of the `limit` slots go to bulk
  first when bulk is due (its minimum share, see `claim`). Only due rows: `next_attempt_at`
  (a retry, `sendAt`, quiet hours) at or before `now`.
- `reap_expired` puts back in the queue a lease that expired (its worker died).
- `write_results` records outcomes, attempt rows, new deliveries and suppressions in the
  caller's transaction. Only outcomes whose lease this worker still holds are written (the
  rows are locked first); the others are counted (`communication_outcome_lease_lost`) and
  logged with ids, never dropped silently. On PostgreSQL `write_flat` records the common
  flush (only outcomes and attempts, `flat`) as one statement. Every status change the
  worker makes goes through `_apply_outcomes` or `write_flat`'s `_FLAT`: the two places a
  status-change hook belongs.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import partial
from typing import Any

from sqlalchemy import Integer, Table, bindparam, case, func, literal, select, text, union_all
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from clinicomm.callbacks import queue as callbacks
from clinicomm.delivery.records import (
    Attempt,
    Claimed,
    DeliveryStatus,
    NewDelivery,
    Outcome,
    Priority,
    Suppression,
)
from clinicomm.delivery.suppressions import suppress
from clinicomm.store import fast, sqlite_raw
from clinicomm.store.db import Database, json_dumps
from clinicomm.store.models import Delivery, DeliveryAttempt, aware
from clinicomm.store.unnest import Unnest, records_json
from clinicomm.telemetry import metrics

log = logging.getLogger(__name__)

_T: Table = Delivery.__table__  # type: ignore[assignment]
_ATTEMPTS: Table = DeliveryAttempt.__table__  # type: ignore[assignment]
_RETURNING = (
    _T.c.id,
    _T.c.message_id,
    _T.c.clinic_id,
    _T.c.channel,
    _T.c.recipient,
    _T.c.recipient_index,
    _T.c.chain_position,
    _T.c.provider_attempts,
    _T.c.attempts,
    _T.c.created_at,
    _T.c.error,
    _T.c.parent_id,
    _T.c.fallback_address,
    _T.c.priority,
    _T.c.expires_at,
    _T.c.fair_at,
)
_BULK = Priority.BULK.rank


class Notifier:
    """Wakes workers when deliveries are due: an in-process event, plus PostgreSQL NOTIFY."""

    CHANNEL = "clinicomm_deliveries"

    def __init__(self) -> None:
        self.event = asyncio.Event()

    async def in_transaction(self, conn: AsyncConnection) -> None:
        """Queue a NOTIFY that PostgreSQL delivers at commit (no-op on SQLite)."""
        if conn.dialect.name == "postgresql":
            await conn.execute(text(f"NOTIFY {self.CHANNEL}"))

    def after_commit(self) -> None:
        self.event.set()


async def enqueue(conn: AsyncConnection | AsyncSession, deliveries: Sequence[NewDelivery]) -> None:
    """Insert delivery rows in the caller's transaction (the caller notifies after commit)."""
    if deliveries:
        await conn.execute(_T.insert(), [d.row() for d in deliveries])


def _claim_statement() -> Any:
    """`claim`'s one statement, built once (building it per claim was ~7 % of a WhatsApp
    send's CPU); its values are the `c_*` bind parameters `claim` passes."""
    due = (_T.c.status == DeliveryStatus.QUEUED.value, _T.c.next_attempt_at <= bindparam("c_now"))

    def head(priority: Priority, n: str) -> Any:
        # One class: equality on (status, priority), so the index gives fair order and the
        # scan stops after `n` rows (a range over classes made PostgreSQL sort them all).
        return (
            select(_T.c.id, _T.c.priority, _T.c.fair_at)
            .where(*due, _T.c.priority == priority.rank)
            .order_by(_T.c.fair_at)
            .limit(bindparam(n, type_=Integer))
            .with_for_update(skip_locked=True)
            .cte(f"claim_{priority.value}")
        )

    urgent, normal, bulk = (
        head(Priority.URGENT, "c_limit"),
        head(Priority.NORMAL, "c_limit"),
        head(Priority.BULK, "c_bulk_cap"),
    )
    first = union_all(
        select(urgent.c.id, urgent.c.priority, urgent.c.fair_at),
        select(normal.c.id, normal.c.priority, normal.c.fair_at),
    ).subquery("claim_first")
    first_n = func.row_number().over(order_by=(first.c.priority, first.c.fair_at))
    bulk_n = func.row_number().over(order_by=bulk.c.fair_at)
    # Tier 0: the first `limit - reserve` urgent/normal rows and the first `reserve` bulk
    # rows (at most `limit` together); tier 1: whatever is left, urgent/normal before bulk.
    ranked = union_all(
        select(
            first.c.id,
            case((first_n <= bindparam("c_first", type_=Integer), 0), else_=1).label("tier"),
            first.c.priority.label("klass"),
            first_n.label("n"),
        ),
        select(
            bulk.c.id,
            case((bulk_n <= bindparam("c_reserve", type_=Integer), 0), else_=1).label("tier"),
            literal(_BULK).label("klass"),
            bulk_n.label("n"),
        ),
    ).subquery("ranked")
    chosen = (
        select(ranked.c.id)
        .order_by(ranked.c.tier, ranked.c.klass, ranked.c.n)
        .limit(bindparam("c_limit", type_=Integer))
    )
    return (
        _T.update()
        .where(_T.c.id.in_(chosen.scalar_subquery()))
        .values(
            status=DeliveryStatus.SENDING.value,
            lease_until=bindparam("c_lease_until", type_=_T.c.lease_until.type),
            lease_owner=bindparam("c_owner", type_=_T.c.lease_owner.type),
            updated_at=bindparam("c_now", type_=_T.c.updated_at.type),
        )
        .returning(*_RETURNING)
    )


_CLAIM = _claim_statement()


async def claim(
    source: AsyncSession | Database,
    *,
    owner: str,
    limit: int,
    now: datetime,
    lease: timedelta,
    bulk_reserve: int = 0,
    bulk_limit: int | None = None,
) -> list[Claimed]:
    """Lease up to `limit` due deliveries to `owner`: urgent first, then normal, then bulk,
    each class in fair order (see `FairClock`). One statement: in the caller's session, or,
    given the `Database` (as the worker does), on its own (`store.fast.rows`: on PostgreSQL
    through asyncpg, outside a transaction).

    `bulk_reserve` (≤ `limit`) slots go to the oldest due bulk deliveries before the other
    classes fill the rest, so a steady stream of urgent and normal messages cannot starve
    bulk forever (the worker reserves its minimum share, `WorkerOptions.bulk_share`); with
    `bulk_reserve=0` bulk only gets what the other classes leave. When a class has fewer due
    rows than its slots, the other takes them: the claim is never short while rows are due.
    `bulk_limit` caps the bulk rows of this claim (the worker's free bulk slots).
    """
    params = _claim_params(owner, limit, now, lease, bulk_reserve, bulk_limit)
    if isinstance(source, Database):
        # One generic plan (index scans of ix_deliveries_claim, then the primary key): the
        # claim runs once per wake-up, and planning it every time cost more than running it.
        found = await fast.rows(source, _CLAIM, params, writes=True, custom_plans=False)
        return _claimed(found)
    return _claimed((await source.execute(_CLAIM, params)).mappings().all())


def _claim_params(
    owner: str,
    limit: int,
    now: datetime,
    lease: timedelta,
    bulk_reserve: int,
    bulk_limit: int | None,
) -> dict[str, Any]:
    limit = max(limit, 0)
    bulk_cap = limit if bulk_limit is None else min(max(bulk_limit, 0), limit)
    reserve = min(max(bulk_reserve, 0), bulk_cap)
    return {
        "c_now": now,
        "c_limit": limit,
        "c_bulk_cap": bulk_cap,
        "c_reserve": reserve,
        "c_first": limit - reserve,
        "c_lease_until": now + lease,
        "c_owner": owner,
    }


def _claimed(found: Sequence[Mapping[Any, Any]]) -> list[Claimed]:
    """The claimed rows in claim order: RETURNING gives none, so by class, then fair order
    (the worker starts urgent deliveries first and each class in the order chosen)."""
    rows = sorted(found, key=lambda r: (r["priority"], aware(r["fair_at"])))
    claimed = []
    for row in rows:
        error = fast.json_value(row["error"]) or {}
        claimed.append(
            Claimed(
                id=row["id"],
                message_id=row["message_id"],
                clinic_id=row["clinic_id"],
                channel=row["channel"],
                recipient=row["recipient"],
                recipient_index=row["recipient_index"],
                sealed=row["recipient"],
                fallback_sealed=row["fallback_address"],
                chain_position=row["chain_position"],
                provider_attempts=row["provider_attempts"],
                attempts=row["attempts"],
                created_at=aware(row["created_at"]),
                errors=list(error.get("errors", [])),
                parent_id=row["parent_id"],
                fallback_address=row["fallback_address"],
                priority=row["priority"],
                expires_at=aware(row["expires_at"]) if row["expires_at"] is not None else None,
            )
        )
    return claimed


async def reap_expired(session: AsyncSession, now: datetime) -> int:
    """Put deliveries whose lease expired (their worker died) back in the queue."""
    result = await session.execute(
        _T.update()
        .where(_T.c.status == DeliveryStatus.SENDING.value, _T.c.lease_until < now)
        .values(status=DeliveryStatus.QUEUED.value, lease_owner=None, lease_until=None)
    )
    return int(getattr(result, "rowcount", 0) or 0)


_APPLY = (
    _T.update()
    .where(_T.c.id == bindparam("b_id"), _T.c.lease_owner == bindparam("b_owner"))
    .values(
        status=bindparam("b_status"),
        attempts=bindparam("b_attempts"),
        chain_position=bindparam("b_position"),
        provider_attempts=bindparam("b_provider_attempts"),
        next_attempt_at=bindparam("b_next"),
        fair_at=bindparam("b_next"),
        provider=bindparam("b_provider"),
        provider_message_id=bindparam("b_pmid"),
        error=bindparam("b_error"),
        sent_at=bindparam("b_sent_at"),
        lease_owner=None,
        lease_until=None,
        updated_at=bindparam("b_now"),
    )
)


@dataclass(slots=True)
class Written:
    """What `write_results` recorded."""

    outcomes: int = 0
    #: Delivery ids whose outcome was not written: this worker no longer held the lease.
    lease_lost: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, outcomes: Sequence[Outcome], held: AbstractSet[str]) -> Written:
        """The outcomes written where the lease was `held`, and the others."""
        lost = [o.delivery_id for o in outcomes if o.delivery_id not in held]
        return cls(outcomes=len(outcomes) - len(lost), lease_lost=lost)


async def write_results(
    session: AsyncSession,
    *,
    owner: str,
    now: datetime,
    outcomes: Sequence[Outcome],
    attempts: Sequence[Attempt] = (),
    new_deliveries: Sequence[NewDelivery] = (),
    suppressions: Sequence[Suppression] = (),
    no_callbacks: AbstractSet[str] = frozenset(),
) -> Written:
    """Record outcomes (only where this worker still holds the lease), attempt rows, channel
    fallback deliveries and opt-outs learnt on send, in the caller's transaction; queue the
    status callbacks of the outcomes, except for `no_callbacks` (deliveries whose messages
    are known to have no callback target: not looked up)."""
    await enqueue(session, new_deliveries)
    if attempts:
        await session.execute(_ATTEMPTS.insert(), [a.row() for a in attempts])
    for s in suppressions:
        await suppress(
            session,
            s.clinic_id,
            s.channel,
            s.address,
            s.reason,
            s.source,
            now=now,
            address_enc=s.address_enc,
        )
    written = Written()
    if outcomes:
        held = await _held(session, owner, [o.delivery_id for o in outcomes])
        written = await _applied(session, owner, now, outcomes, held, no_callbacks)
    _log_lease_lost(owner, written)
    return written


def flat(
    outcomes: Sequence[Outcome],
    new_deliveries: Sequence[NewDelivery],
    suppressions: Sequence[Suppression],
    no_callbacks: AbstractSet[str],
) -> bool:
    """Whether `write_flat` (PostgreSQL, a SQLite file) can record these results: they are
    only outcomes and attempt rows (no channel fallback, opt-out or status callback to
    queue)."""
    return (
        not new_deliveries
        and not suppressions
        and all(
            o.delivery_id in no_callbacks or o.status.value not in callbacks.RANK for o in outcomes
        )
    )


async def write_flat(
    db: Database,
    *,
    owner: str,
    now: datetime,
    outcomes: Sequence[Outcome],
    attempts: Sequence[Attempt] = (),
) -> Written:
    """`write_results` for what `flat` accepts, as ONE statement (PostgreSQL): the
    attempt rows inserted by a data-modifying CTE and the outcomes applied by an UPDATE from
    a JSON recordset (`store.unnest`), only where `owner` still holds the lease (checked and
    written at once: the reaper cannot come between). Atomic by itself, so it runs outside a
    transaction (`store.fast.rows`): one round trip instead of BEGIN, insert, lock, update,
    COMMIT. On a SQLite file, `_flat_raw`'s statements in one transaction on
    `store.sqlite_raw`'s writer."""
    if db.raw is not None:
        async with db.writing():
            held = await db.raw.transaction(partial(_flat_raw, owner, now, outcomes, attempts))
    else:
        assert not db.is_sqlite, "write_flat: PostgreSQL, or a SQLite file (see flat)"
        held = await _flat_statement(db, owner, now, outcomes, attempts)
    written = Written.of(outcomes, held)
    _log_lease_lost(owner, written)
    return written


async def _flat_statement(
    db: Database,
    owner: str,
    now: datetime,
    outcomes: Sequence[Outcome],
    attempts: Sequence[Attempt],
) -> set[str]:
    """`write_flat` on PostgreSQL (`_FLAT`); the ids it was written for."""
    params: dict[str, Any] = {
        "owner": owner,
        "now": now,
        **_ATTEMPT_ROWS.params([a.row() for a in attempts], db.engine.dialect),
        "o_rows": records_json(
            [
                {
                    "id": o.delivery_id,
                    "status": o.status.value,
                    "attempts": o.attempts,
                    "position": o.chain_position,
                    "provider_attempts": o.provider_attempts,
                    "next_at": o.next_attempt_at or now,
                    "provider": o.provider,
                    "pmid": o.provider_message_id,
                    "error": None if o.error is None else json_dumps(o.error),
                    "sent_at": o.sent_at,
                }
                for o in outcomes
            ]
        ),
    }
    found = await fast.rows(db, _FLAT, params, writes=True, custom_plans=False)  # by primary key
    return {row["id"] for row in found}


def _flat_raw(
    owner: str,
    now: datetime,
    outcomes: Sequence[Outcome],
    attempts: Sequence[Attempt],
    tx: sqlite_raw.Transaction,
) -> set[str]:
    """`write_flat` on a SQLite file (`store.sqlite_raw`'s writer, one transaction): what
    `write_results` writes for these, the attempt rows, then each outcome where `owner`
    still holds the lease; the ids it was written for."""
    tx.insert(_INSERT_ATTEMPTS, [a.row() for a in attempts])
    return {o.delivery_id for o in outcomes if tx.rows(_APPLY_ONE, _apply_params(owner, now, o))}


#: `_flat_raw`'s statements (SQLite: `_APPLY` for one delivery, answering its id when written).
_INSERT_ATTEMPTS = _ATTEMPTS.insert()
_APPLY_ONE = _APPLY.returning(_T.c.id)

#: `Attempt.row()` gives every column but the key.
_ATTEMPT_ROWS = Unnest(
    _ATTEMPTS, "a", given=tuple(c.name for c in _ATTEMPTS.columns if c.name != "id")
)
#: `write_flat`'s statement (PostgreSQL). An empty attempts list inserts nothing. Built
#: from the models' metadata only: no value is spliced into the text.
_FLAT = text(
    f"WITH attempt_rows AS ({_ATTEMPT_ROWS.insert()})"
    + """
    UPDATE deliveries AS d SET
        status = u.status, attempts = u.attempts, chain_position = u.position,
        provider_attempts = u.provider_attempts, next_attempt_at = u.next_at,
        fair_at = u.next_at, provider = u.provider, provider_message_id = u.pmid,
        error = CAST(u.error AS JSON), sent_at = u.sent_at,
        lease_owner = NULL, lease_until = NULL, updated_at = :now
    FROM json_to_recordset(CAST(:o_rows AS JSON)) AS u(
        id VARCHAR, status VARCHAR, attempts INTEGER, position INTEGER,
        provider_attempts INTEGER, next_at TIMESTAMPTZ, provider VARCHAR, pmid VARCHAR,
        error TEXT, sent_at TIMESTAMPTZ
    )
    WHERE d.id = u.id AND d.lease_owner = :owner
    RETURNING d.id
    """
)


async def _applied(
    session: AsyncSession,
    owner: str,
    now: datetime,
    outcomes: Sequence[Outcome],
    held: set[str],
    no_callbacks: AbstractSet[str],
) -> Written:
    """Apply the outcomes of `held` deliveries and queue their status callbacks."""
    mine = [o for o in outcomes if o.delivery_id in held]
    await _apply_outcomes(session, owner, now, mine)
    await callbacks.enqueue(
        session,
        {
            o.delivery_id: o.status.value
            for o in mine
            if o.status.value in callbacks.RANK and o.delivery_id not in no_callbacks
        },
        now,
    )
    return Written.of(outcomes, held)


def _log_lease_lost(owner: str, written: Written) -> None:
    if written.lease_lost:
        metrics.LEASE_LOST.inc(len(written.lease_lost))
        log.warning(
            "outcomes not written: the lease was lost",
            extra={
                "event": "outcome_lease_lost",
                "workerId": owner,
                "deliveryIds": written.lease_lost[:50],
                "count": len(written.lease_lost),
            },
        )


async def _held(session: AsyncSession, owner: str, ids: list[str]) -> set[str]:
    """The ids among `ids` still leased to `owner`, locked until the transaction ends (so the
    reaper cannot take them between this check and the write)."""
    rows = await session.execute(
        select(_T.c.id).where(_T.c.id.in_(ids), _T.c.lease_owner == owner).with_for_update()
    )
    return {r[0] for r in rows}


async def _apply_outcomes(
    session: AsyncSession, owner: str, now: datetime, outcomes: Sequence[Outcome]
) -> None:
    """The status write of every delivery the worker handled (one statement, batched)."""
    if not outcomes:
        return
    await session.execute(_APPLY, [_apply_params(owner, now, o) for o in outcomes])


def _apply_params(owner: str, now: datetime, o: Outcome) -> dict[str, Any]:
    """`_APPLY`'s values for one outcome."""
    return {
        "b_id": o.delivery_id,
        "b_owner": owner,
        "b_status": o.status.value,
        "b_attempts": o.attempts,
        "b_position": o.chain_position,
        "b_provider_attempts": o.provider_attempts,
        "b_next": o.next_attempt_at or now,
        "b_provider": o.provider,
        "b_pmid": o.provider_message_id,
        "b_error": o.error,
        "b_sent_at": o.sent_at,
        "b_now": now,
    }
