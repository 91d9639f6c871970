"""The append-only audit log: written in the transaction of the change it records.

Nothing in clinicomm updates or deletes `audit_log` rows. Diffs come from `settings_diff`, so a
secret that changed appears as `{"path": …, "secret": true}`, never with a value.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from clinicomm.settings.diff import settings_diff
from clinicomm.settings.service import Change
from clinicomm.store.models import AuditEntry


def record_change(
    session: AsyncSession,
    change: Change,
    *,
    actor: str,
    role: str,
    request_id: str | None,
    name_before: str | None = None,
) -> AuditEntry:
    """Add the audit entry of `change` to the caller's transaction (the caller commits).

    `name_before` (when the change may rename the clinic) adds a `name` item to the diff.
    """
    diff: dict[str, Any] = {"communicationSettings": settings_diff(change.before, change.after)}
    name_after = change.record.name if change.record is not None else None
    if change.before is None and change.action == "clinic.create":
        diff["name"] = {"to": name_after}
    elif name_before is not None and name_before != name_after:
        diff["name"] = {"from": name_before, "to": name_after}
    diff["version"] = change.version
    entry = AuditEntry(
        clinic_id=change.clinic_id,
        actor=actor,
        role=role,
        action=change.action,
        request_id=request_id,
        diff=diff,
    )
    session.add(entry)
    return entry


async def list_entries(
    session: AsyncSession, clinic_id: str, *, limit: int, before_id: int | None
) -> tuple[list[AuditEntry], int | None]:
    """A clinic's entries, newest first, and the id to continue from (None at the end)."""
    query = select(AuditEntry).where(AuditEntry.clinic_id == clinic_id)
    if before_id is not None:
        query = query.where(AuditEntry.id < before_id)
    query = query.order_by(AuditEntry.id.desc()).limit(limit + 1)
    rows = list((await session.execute(query)).scalars())
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, (rows[-1].id if more and rows else None)
