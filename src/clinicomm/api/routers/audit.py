"""`GET /api/v1/clinics/{clinicId}/audit`: the clinic's audit log, newest first (read only).

There is deliberately no endpoint that changes or deletes audit entries.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query
from sqlalchemy import select

from clinicomm.api.auth import Permission, Principal
from clinicomm.api.deps import get_runtime, require
from clinicomm.api.routers.clinics import ClinicId
from clinicomm.api.schemas import ERRORS, AuditItem, AuditPage
from clinicomm.runtime import Runtime
from clinicomm.settings.audit import list_entries
from clinicomm.settings.service import ClinicNotFoundError
from clinicomm.store.models import AuditEntry, Clinic

router = APIRouter(prefix="/api/v1/clinics", tags=["audit"])


def _item(entry: AuditEntry) -> AuditItem:
    return AuditItem(
        id=entry.id,
        at=entry.at,
        clinicId=entry.clinic_id,
        actor=entry.actor,
        role=entry.role,
        action=entry.action,
        requestId=entry.request_id,
        diff=entry.diff or {},
        note=entry.note,
    )


@router.get(
    "/{clinicId}/audit",
    response_model=AuditPage,
    responses=ERRORS,
    summary="Config changes, test sends and key operations, newest first",
)
async def clinic_audit(
    clinicId: ClinicId,
    runtime: Annotated[Runtime, Depends(get_runtime)],
    _: Annotated[Principal, Depends(require(Permission.MANAGE))],
    limit: Annotated[int, Query(ge=1, le=500, description="Entries per page")] = 50,
    cursor: Annotated[
        str | None,
        Query(pattern=r"^[0-9]{1,18}$", description="`nextCursor` of the previous page"),
    ] = None,
) -> AuditPage:
    async with runtime.db.sessions() as session:
        exists = await session.scalar(select(Clinic.id).where(Clinic.id == clinicId))
        if exists is None:
            raise ClinicNotFoundError(clinicId)
        entries, next_id = await list_entries(
            session, clinicId, limit=limit, before_id=int(cursor) if cursor else None
        )
    return AuditPage(
        items=[_item(e) for e in entries],
        nextCursor=str(next_id) if next_id is not None else None,
    )
