"""Sending and delivery status: `POST /api/v1/communications`, `GET …/{id}`, `GET …`,
`POST …/{id}/cancel`.

A send answers 202 only after the message and its deliveries are committed. The clinic comes
from the body (`metadata.clinicId`), so the route authenticates first and then authorizes
`:send` for that clinic (no clinic: the global providers, a platform-wide permission).
Reading a message needs `:send` or `:view` for its clinic; cancelling it needs `:send`.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Path, Query
from fastapi.responses import JSONResponse

from clinicomm.api.answers import DeliveryPage, MessageStatus
from clinicomm.api.auth import Permission, Principal
from clinicomm.api.deps import authenticated, authorize, get_runtime
from clinicomm.api.errors import ApiError, forbidden
from clinicomm.api.schemas import ERRORS, ErrorAnswer
from clinicomm.delivery.cancel import cancel_message, counted
from clinicomm.delivery.status import GLOBAL, get_message, list_messages, reveal
from clinicomm.messaging.models import DeliveryStatus, SendAccepted, SendRequest
from clinicomm.messaging.service import (
    IdempotencyConflictError,
    SendValidationError,
    UnknownClinicError,
)
from clinicomm.runtime import Runtime
from clinicomm.store.models import utcnow
from clinicomm.telemetry.logging import bind_context

router = APIRouter(prefix="/api/v1/communications", tags=["communications"])

RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
Caller = Annotated[Principal, Depends(authenticated)]
_SEND_ERRORS: dict[int | str, dict[str, Any]] = {
    **ERRORS,
    409: {"model": ErrorAnswer, "description": "Idempotency-Key reused with another payload"},
}


def _readable(principal: Principal, clinic_id: str | None) -> bool:
    return principal.allows(Permission.SEND, clinic_id) or principal.allows(
        Permission.VIEW, clinic_id
    )


@router.post(
    "",
    status_code=202,
    response_model=SendAccepted,
    responses=_SEND_ERRORS,
    summary="Send a message (stored durably before the answer)",
)
async def send(
    request: SendRequest,
    principal: Caller,
    runtime: RuntimeDep,
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            max_length=255,
            description="Same key and payload within 24 h: the first answer, nothing sent twice",
        ),
    ] = None,
) -> JSONResponse:
    clinic_id = request.metadata.clinic_id
    bind_context(clinicId=clinic_id)
    authorize(principal, Permission.SEND, clinic_id)
    try:
        accepted = await runtime.messaging.accept(
            request, idempotency_key=idempotency_key, requested_by=principal.sub
        )
    except SendValidationError as exc:
        raise ApiError(
            422,
            "validation_error",
            "the request is not valid",
            [p.to_dict() for p in exc.problems],
        ) from None
    except UnknownClinicError as exc:
        raise ApiError(404, "not_found", str(exc)) from None
    except IdempotencyConflictError as exc:
        raise ApiError(409, "idempotency_conflict", str(exc)) from None
    return JSONResponse(accepted.model_dump(mode="json", by_alias=True), status_code=202)


@router.get(
    "/{messageId}",
    response_model=MessageStatus,
    responses={**ERRORS, 404: {"model": ErrorAnswer, "description": "Unknown message"}},
    summary="A message, each delivery's status, provider, attempts and error",
)
async def get_communication(
    message_id: Annotated[str, Path(alias="messageId", max_length=64)],
    principal: Caller,
    runtime: RuntimeDep,
) -> dict[str, Any]:
    async with runtime.db.read() as session:
        found = await get_message(session, message_id, None)
    if found is None:
        raise ApiError(404, "not_found", f"message {message_id!r} not found")
    if not _readable(principal, found["clinicId"]):
        raise forbidden(f"role {principal.role.value} cannot read this message")
    return await reveal(found, runtime.keys, runtime.db)


@router.post(
    "/{messageId}/cancel",
    response_model=MessageStatus,
    responses={**ERRORS, 404: {"model": ErrorAnswer, "description": "Unknown message"}},
    summary="Cancel the deliveries not yet handed to a provider; answers the message",
    description="Queued deliveries (due, scheduled by `sendAt`, held for quiet hours or "
    "waiting for a retry) end `cancelled`; the answer is the message as GET shows it, so "
    "deliveries already sent (or being sent) keep their status. Needs the send permission "
    "for the message's clinic. Cancelling again changes nothing.",
)
async def cancel_communication(
    message_id: Annotated[str, Path(alias="messageId", max_length=64)],
    principal: Caller,
    runtime: RuntimeDep,
) -> dict[str, Any]:
    async with runtime.db.read() as session:
        found = await get_message(session, message_id, None)
    if found is None:
        raise ApiError(404, "not_found", f"message {message_id!r} not found")
    bind_context(clinicId=found["clinicId"])
    authorize(principal, Permission.SEND, found["clinicId"])
    async with runtime.db.session() as session:
        cancelled = await cancel_message(session, message_id, now=utcnow(), actor=principal.sub)
    counted(message_id, cancelled)
    async with runtime.db.read() as session:
        answer = await get_message(session, message_id, None)
    assert answer is not None
    return await reveal(answer, runtime.keys, runtime.db)


@router.get(
    "",
    response_model=DeliveryPage,
    responses=ERRORS,
    summary="Deliveries, newest first, filtered by clinic and status",
)
async def list_communications(
    principal: Caller,
    runtime: RuntimeDep,
    clinic_id: Annotated[
        str | None,
        Query(alias="clinicId", max_length=64, description="A clinic, or `global`"),
    ] = None,
    status: Annotated[DeliveryStatus | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: Annotated[str | None, Query(max_length=64)] = None,
) -> dict[str, Any]:
    scope: list[str] | None
    if clinic_id is not None:
        target = None if clinic_id == GLOBAL else clinic_id
        if not _readable(principal, target):
            raise forbidden(f"role {principal.role.value} cannot read {clinic_id!r}")
        scope = [clinic_id]
    else:
        # Permission first, then scope: `Principal.scope` never grants more than `allows`.
        allowed = principal.scope(Permission.SEND, Permission.VIEW)
        if allowed is not None and not allowed:
            raise forbidden(f"role {principal.role.value} cannot read messages")
        scope = None if allowed is None else sorted(allowed)
    async with runtime.db.read() as session:
        page = await list_messages(
            session,
            scope,
            clinic_id=clinic_id,
            status=status.value if status else None,
            limit=limit,
            cursor=cursor,
        )
    return await reveal(page, runtime.keys, runtime.db)
