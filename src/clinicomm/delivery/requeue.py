"""Re-queue failed deliveries after an outage (`clinicomm requeue`).

`find` selects a clinic's deliveries in `status` (failed) whose last change falls in
[since, until), optionally of one provider (key `sendgrid` or label `clinic:sendgrid`), that
were never re-queued before. `requeue` puts a batch back in the queue in one transaction, with
one audit entry (`delivery.requeue`, the delivery ids): status `queued`, chain from the start,
`requeues` + 1 (the new generation its status callbacks are ordered in), and its age restarted
(so the delivery's maximum age counts from the re-queue). The update only takes rows still in
`status` and never re-queued, so two concurrent runs re-queue each delivery once.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import or_, select, update

from clinicomm.store.db import Database
from clinicomm.store.models import AuditEntry, Delivery, utcnow


async def find(
    db: Database,
    *,
    clinic_id: str,
    status: str,
    since: datetime,
    until: datetime,
    provider: str | None = None,
) -> list[str]:
    """Ids of the deliveries a re-queue would take, oldest first."""
    query = select(Delivery.id).where(
        Delivery.clinic_id == clinic_id,
        Delivery.status == status,
        Delivery.updated_at >= since,
        Delivery.updated_at < until,
        Delivery.requeues == 0,
    )
    if provider:
        query = query.where(
            or_(Delivery.provider == provider, Delivery.provider.like(f"%:{provider}"))
        )
    async with db.read() as session:
        return list((await session.scalars(query.order_by(Delivery.id))).all())


async def requeue(
    db: Database,
    ids: list[str],
    *,
    clinic_id: str,
    status: str,
    actor: str,
    role: str = "operator",
    note: str | None = None,
) -> int:
    """Re-queue `ids` (still in `status`, never re-queued); how many were. Audited."""
    if not ids:
        return 0
    now = utcnow()
    async with db.session() as session:
        result = await session.execute(
            update(Delivery)
            .where(
                Delivery.id.in_(ids),
                Delivery.clinic_id == clinic_id,
                Delivery.status == status,
                Delivery.requeues == 0,
            )
            .values(
                status="queued",
                requeues=Delivery.requeues + 1,
                chain_position=0,
                provider_attempts=0,
                next_attempt_at=now,
                fair_at=now,
                lease_owner=None,
                lease_until=None,
                error=None,
                created_at=now,
                updated_at=now,
            )
            .returning(Delivery.id)
            .execution_options(synchronize_session=False)
        )
        done = [row[0] for row in result.all()]
        if done:
            session.add(
                AuditEntry(
                    clinic_id=clinic_id,
                    actor=actor,
                    role=role,
                    action="delivery.requeue",
                    diff={"deliveries": done, "from": status},
                    note=note,
                )
            )
    return len(done)
