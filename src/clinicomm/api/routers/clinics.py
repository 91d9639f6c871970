"""Clinics and their communication settings: create, read (masked), replace, patch, delete.

Every write runs in one transaction with its audit entry, then awaits `config.committed()`
(every process has dropped the old config) before answering. Answers carry the masked clinic
and its version as the `ETag`; writes honour `If-Match` (stale: 412).
"""

from __future__ import annotations

import copy
import logging
import secrets
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import JSONResponse
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from clinicomm.api.auth import Permission, Principal
from clinicomm.api.deps import get_runtime, if_match, require
from clinicomm.api.errors import ApiError
from clinicomm.api.schemas import (
    CLINIC_ID_PATTERN,
    ERRORS,
    Clinic,
    ClinicCreate,
    ClinicPatch,
    ClinicReplace,
    ErrorAnswer,
)
from clinicomm.providers.base import Channel
from clinicomm.runtime import Runtime
from clinicomm.settings.audit import record_change
from clinicomm.settings.service import COMM, Change, ClinicNotFoundError, ClinicRecord
from clinicomm.store.models import Clinic as ClinicRow
from clinicomm.telemetry.logging import request_id

log = logging.getLogger(__name__)

router = APIRouter(prefix="/api/v1/clinics", tags=["clinics"])

ClinicId = Annotated[str, Path(pattern=CLINIC_ID_PATTERN, description="The clinic's id")]
IfMatch = Annotated[int | None, Depends(if_match)]
RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
_412: dict[int | str, dict[str, Any]] = {
    412: {"model": ErrorAnswer, "description": "If-Match names an older version"}
}
_409: dict[int | str, dict[str, Any]] = {
    409: {"model": ErrorAnswer, "description": "A clinic with that id exists"}
}
_IF_MATCH_DOC = {
    "parameters": [
        {
            "name": "If-Match",
            "in": "header",
            "required": False,
            "schema": {"type": "string"},
            "description": 'The ETag of a GET ("3"); the write fails with 412 if it is stale.',
        }
    ]
}


def clinic_answer(record: ClinicRecord, status: int = 200) -> JSONResponse:
    """The masked clinic with its version as a quoted ETag."""
    return JSONResponse(
        record.masked(), status_code=status, headers={"ETag": f'"{record.version}"'}
    )


def _audit(
    session: AsyncSession, change: Change, principal: Principal, name_before: str | None
) -> None:
    """The audit entry of `change`, in the same transaction."""
    record_change(
        session,
        change,
        actor=principal.sub,
        role=principal.role.value,
        request_id=request_id(),
        name_before=name_before,
    )


async def _publish(runtime: Runtime, change: Change) -> ClinicRecord:
    """After the commit: every process drops the old config before we answer."""
    await runtime.config.committed(change)
    log.info(
        "clinic changed",
        extra={"event": change.action, "clinicId": change.clinic_id, "version": change.version},
    )
    assert change.record is not None
    return change.record


@router.post(
    "",
    status_code=201,
    response_model=Clinic,
    responses={**ERRORS, **_409},
    summary="Create a clinic (SuperAdmin)",
)
async def create_clinic(
    body: ClinicCreate,
    runtime: RuntimeDep,
    principal: Annotated[Principal, Depends(require(Permission.MANAGE, platform=True))],
) -> JSONResponse:
    clinic_id = body.id or f"clinic-{secrets.token_hex(8)}"
    settings: Any = body.settings
    async with runtime.db.session() as session:
        change = await runtime.config.create_clinic(session, clinic_id, body.name, settings)
        _audit(session, change, principal, None)
    record = await _publish(runtime, change)
    answer = clinic_answer(record, 201)
    answer.headers["Location"] = f"/api/v1/clinics/{record.id}"
    return answer


@router.get(
    "/{clinicId}",
    response_model=Clinic,
    responses=ERRORS,
    summary="A clinic with its settings; secrets masked",
)
async def get_clinic(
    clinicId: ClinicId,
    runtime: RuntimeDep,
    _: Annotated[Principal, Depends(require(Permission.VIEW))],
) -> JSONResponse:
    async with runtime.db.sessions() as session:
        record = await runtime.config.get_clinic(session, clinicId)
    return clinic_answer(record)


@router.put(
    "/{clinicId}",
    response_model=Clinic,
    responses={**ERRORS, **_412},
    openapi_extra=_IF_MATCH_DOC,
    summary="Replace the settings; '********' keeps a stored secret",
)
async def replace_clinic(
    clinicId: ClinicId,
    body: ClinicReplace,
    runtime: RuntimeDep,
    principal: Annotated[Principal, Depends(require(Permission.MANAGE))],
    expected: IfMatch,
) -> JSONResponse:
    settings: Any = body.settings
    async with runtime.db.session() as session:
        name_before = await _name(session, clinicId) if body.name is not None else None
        change = await runtime.config.replace_settings(
            session, clinicId, settings, expected_version=expected, name=body.name
        )
        _audit(session, change, principal, name_before)
    return clinic_answer(await _publish(runtime, change))


@router.patch(
    "/{clinicId}",
    response_model=Clinic,
    responses={**ERRORS, **_412},
    openapi_extra={
        **_IF_MATCH_DOC,
        "requestBody": {
            "content": {
                "application/merge-patch+json": {
                    "schema": {"$ref": "#/components/schemas/ClinicPatch"}
                },
                "application/json": {"schema": {"$ref": "#/components/schemas/ClinicPatch"}},
            },
            "required": True,
        },
    },
    summary="JSON merge patch (RFC 7396) of the masked clinic",
)
async def patch_clinic(
    clinicId: ClinicId,
    body: ClinicPatch,
    request: Request,
    runtime: RuntimeDep,
    principal: Annotated[Principal, Depends(require(Permission.MANAGE))],
    expected: IfMatch,
) -> JSONResponse:
    patch = await request.json()  # raw: `null` members matter in a merge patch
    if not isinstance(patch, dict):  # pragma: no cover - the model already required an object
        raise ApiError(422, "validation_error", "a merge patch of a clinic is a JSON object")
    if "name" in patch and patch["name"] is None:
        raise ApiError(
            422,
            "validation_error",
            "the request is not valid",
            [{"path": "name", "message": "a clinic's name cannot be removed", "type": "missing"}],
        )
    async with runtime.db.session() as session:
        row = (
            await session.execute(
                select(ClinicRow).where(ClinicRow.id == clinicId).with_for_update()
            )
        ).scalar_one_or_none()
        if row is None:
            raise ClinicNotFoundError(clinicId)
        current = await runtime.config.get_clinic(session, clinicId)
        masked = current.masked()
        doc = merge_patch({"name": masked["name"], "settings": masked["settings"]}, patch)
        settings = doc.get("settings")
        change = await runtime.config.replace_settings(
            session,
            clinicId,
            {} if settings is None else settings,
            expected_version=expected,
            name=body.name,
            action="settings.patch",
        )
        _audit(session, change, principal, current.name)
    return clinic_answer(await _publish(runtime, change))


@router.delete(
    "/{clinicId}/communication-settings",
    response_model=Clinic,
    responses={**ERRORS, **_412},
    openapi_extra=_IF_MATCH_DOC,
    summary="Remove all the clinic's own providers: it falls back to the global ones",
)
async def delete_all_settings(
    clinicId: ClinicId,
    runtime: RuntimeDep,
    principal: Annotated[Principal, Depends(require(Permission.DELETE))],
    expected: IfMatch,
) -> JSONResponse:
    return await _delete(runtime, clinicId, None, principal, expected)


@router.delete(
    "/{clinicId}/communication-settings/{channel}",
    response_model=Clinic,
    responses={**ERRORS, **_412},
    openapi_extra=_IF_MATCH_DOC,
    summary="Remove the clinic's own providers of one channel",
)
async def delete_channel_settings(
    clinicId: ClinicId,
    channel: Channel,
    runtime: RuntimeDep,
    principal: Annotated[Principal, Depends(require(Permission.DELETE))],
    expected: IfMatch,
) -> JSONResponse:
    return await _delete(runtime, clinicId, channel, principal, expected)


async def _delete(
    runtime: Runtime,
    clinic_id: str,
    channel: Channel | None,
    principal: Principal,
    expected: int | None,
) -> JSONResponse:
    async with runtime.db.session() as session:
        change = await runtime.config.delete_settings(
            session, clinic_id, channel, expected_version=expected
        )
        _audit(session, change, principal, None)
    return clinic_answer(await _publish(runtime, change))


async def _name(session: AsyncSession, clinic_id: str) -> str | None:
    # A column select: it does not put the row in the identity map, so the service's
    # `SELECT … FOR UPDATE` still reads the current version.
    name: str | None = await session.scalar(select(ClinicRow.name).where(ClinicRow.id == clinic_id))
    return name


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7396: apply a JSON merge patch to `target` (neither argument is modified)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


__all__ = ["COMM", "merge_patch", "router"]
