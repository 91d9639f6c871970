"""Sending and delivery status: `POST /api/v1/communications`, `GET …/{id}`, `GET …`,
`POST …/{id}/cancel`.

A send answers 202 only after the message and its deliveries are committed. The clinic comes
from the body (`metadata.clinicId`), so the route authenticates first and then authorizes
`:send` for that clinic (no clinic: the global providers, a platform-wide permission).
Reading a message needs `:send` or `:view` for its clinic; cancelling it needs `:send`.

`POST …/batch` takes up to 500 messages, each with its own recipients, content, metadata and
`idempotencyKey`. Each item is validated with the single send's schema and authorized for its
own clinic with the same rule; the valid ones are accepted in one transaction (all or none) and
every item gets its own answer: 202 with the message id and deliveries, or its error (422 with
paths from `items.N`, 403, 404, 409). One invalid item refuses only that item. The batch answers
202 when every item was accepted and 207 when some were refused.
"""

from __future__ import annotations

from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Body, Depends, FastAPI, Header, Path, Query, Request
from fastapi.responses import Response
from fastapi.routing import APIRoute
from pydantic import SkipValidation, ValidationError
from starlette.requests import ClientDisconnect

from clinicomm.api.answers import DeliveryPage, MessageStatus
from clinicomm.api.auth import Permission, Principal
from clinicomm.api.deps import authenticated, authorize, bearer_principal, get_runtime
from clinicomm.api.errors import ApiError, forbidden, validation_details
from clinicomm.api.limits import NOT_PARSED, parsed_json
from clinicomm.api.schemas import ERRORS, ErrorAnswer
from clinicomm.delivery.cancel import cancel_message, counted
from clinicomm.delivery.status import GLOBAL, get_message, list_messages, reveal
from clinicomm.messaging.models import (
    BATCH_MAX_ITEMS,
    BatchAccepted,
    BatchSendItem,
    BatchSendRequest,
    DeliveryStatus,
    SendAccepted,
    SendRequest,
)
from clinicomm.messaging.service import (
    BatchItem,
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


#: The longest `Idempotency-Key` (the header's `max_length` below).
_MAX_KEY = 255


async def send_lean(request: Request) -> Response | None:
    """`send` for a request that authenticates and validates (`api.lean.LeanDispatch`): the
    same checks and the same call, without FastAPI's routing, dependency solving and body
    handling; None for anything else, which the route answers (401, 422 with paths)."""
    principal = _json_caller(request)
    if principal is None:
        return None
    key = request.headers.get("idempotency-key")
    if key is not None and len(key) > _MAX_KEY:
        return None
    try:
        # Parsed and validated in one pass by pydantic's JSON mode, which reads what the route's
        # `json.loads` reads (integers beyond 64 bits as integers, the last of duplicate keys)
        # into the same values; what it refuses (a lone surrogate escape, NaN) the route answers.
        body = SendRequest.model_validate_json(await request.body())
    except (ValueError, ValidationError, ClientDisconnect):
        return None
    runtime: Runtime = request.app.state.runtime
    return await send(body, principal, runtime, key)


def _json_caller(request: Request) -> Principal | None:
    """The caller of a lean route's request: its bearer token's principal when the body is
    declared JSON, else None (the route answers)."""
    principal = bearer_principal(request)
    if principal is None or not _is_json(request.headers.get("content-type", "")):
        return None
    return principal


def _is_json(content_type: str) -> bool:
    media = content_type.partition(";")[0].strip().lower()
    return media == "application/json"


async def send(
    request: SendRequest,
    principal: Caller,
    runtime: RuntimeDep,
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            max_length=_MAX_KEY,
            description="Same key and payload within 24 h: the first answer, nothing sent twice",
        ),
    ] = None,
) -> Response:
    clinic_id = request.metadata.clinic_id
    bind_context(clinicId=clinic_id)
    authorize(principal, Permission.SEND, clinic_id)
    try:
        accepted = await runtime.messaging.accept_json(
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
    return _json(accepted, 202)


def add_send_route(app: FastAPI) -> APIRoute:
    """Add `POST /api/v1/communications` to the application itself (not through `router`,
    whose routes FastAPI matches through its per-request included-router machinery) and
    answer the route. Its valid requests are answered by `send_lean` through
    `api.lean.LeanDispatch`; the route answers the rest. The application includes this
    module's `router` after calling this, for the other routes."""
    return _add_post_route(
        app,
        router.prefix,
        send,
        response_model=SendAccepted,
        responses=_SEND_ERRORS,
        summary="Send a message (stored durably before the answer)",
    )


def add_batch_route(app: FastAPI) -> APIRoute:
    """Add `POST /api/v1/communications/batch` to the application itself, as
    `add_send_route` does, and answer the route: its valid requests are answered by
    `send_batch_lean`, the route answers the rest."""
    return _add_post_route(
        app,
        f"{router.prefix}/batch",
        send_batch,
        response_model=BatchAccepted,
        responses={
            **_SEND_ERRORS,
            207: {"model": BatchAccepted, "description": "Some items refused (each says why)"},
            413: {"model": ErrorAnswer, "description": "Body larger than CLINICOMM_MAX_BODY_BYTES"},
        },
        summary="Send up to 500 messages, accepted in one transaction, answered per item",
    )


def _add_post_route(app: FastAPI, path: str, endpoint: Any, **options: Any) -> APIRoute:
    """A `POST` route answering 202, tagged as this module's router, on the application
    itself; the route added."""
    app.router.add_api_route(
        path, endpoint, methods=["POST"], status_code=202, tags=list(router.tags), **options
    )
    route = app.router.routes[-1]
    assert isinstance(route, APIRoute)
    assert route.endpoint is endpoint
    return route


def _json(data: Any, status: int) -> Response:
    """An answer encoded with orjson (the route's answer is built as plain JSON data)."""
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


def _item_error(index: int, status: int, code: str, message: str, details: Any = ()) -> Any:
    return {
        "index": index,
        "status": status,
        "error": {"code": code, "message": message, "details": list(details)},
    }


def _prefixed(index: int, details: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for detail in details:
        path = detail.get("path") or ""
        detail["path"] = f"items.{index}.{path}" if path else f"items.{index}"
    return details


def _exception_answer(index: int, exc: Exception) -> Any:
    if isinstance(exc, SendValidationError):
        details = _prefixed(index, [p.to_dict() for p in exc.problems])
        return _item_error(index, 422, "validation_error", "the item is not valid", details)
    if isinstance(exc, UnknownClinicError):
        return _item_error(index, 404, "not_found", str(exc))
    if isinstance(exc, IdempotencyConflictError):
        return _item_error(index, 409, "idempotency_conflict", str(exc))
    raise exc


async def send_batch(
    body: Annotated[BatchSendRequest, SkipValidation, Body()],
    principal: Caller,
    runtime: RuntimeDep,
) -> Response:
    return await _batch(body, principal, runtime)


async def send_batch_lean(request: Request) -> Response | None:
    """`send_batch` for an authenticated JSON object body (`api.lean.LeanDispatch`): the same
    checks and answers, without FastAPI's dependency solving and its second parse of the body
    (`api.limits.JsonDepthLimit` parsed it already); None for anything else (no or a bad
    token, a body that is not a JSON object), which the route answers."""
    principal = _json_caller(request)
    if principal is None:
        return None
    try:
        body = await request.body()
    except ClientDisconnect:
        return None
    if _may_hold_a_long_integer(body):
        return None  # orjson reads an integer beyond 64 bits as a float; the route does not
    document = parsed_json(request.scope, body)
    if document is NOT_PARSED:
        try:
            document = orjson.loads(body)
        except orjson.JSONDecodeError:
            return None  # the route's parser answers (it reads a few things orjson refuses)
    if not isinstance(document, dict):
        return None
    runtime: Runtime = request.app.state.runtime
    return await _batch(document, principal, runtime)


#: Every digit as "0", every other byte as " ": a run of 19 digits then shows as `_19_DIGITS`.
_DIGITS = bytes(ord("0") if chr(i).isdigit() and i < 128 else ord(" ") for i in range(256))
_19_DIGITS = b"0" * 19


def _may_hold_a_long_integer(body: bytes) -> bool:
    """Whether `body` has a run of 19 digits (in a number or a string): orjson reads an
    integer of more than 64 bits as a float, where the route's `json.loads` reads an integer
    (which validation then refuses, 422), so such a body goes to the route. 2^63 has 19
    digits: a shorter run is an integer orjson reads as the route does. One C pass (~0.07 ms
    for a 500-message batch, against ~1 ms for a regular expression)."""
    return _19_DIGITS in body.translate(_DIGITS)


async def _batch(raw: Any, principal: Principal, runtime: Runtime) -> Response:
    """Check, authorize and accept each item of a batch body (parsed JSON, not validated)."""
    items = raw.get("items") if isinstance(raw, dict) else None
    if not isinstance(items, list) or not 1 <= len(items) <= BATCH_MAX_ITEMS:
        detail = {
            "path": "items",
            "message": f"items must be a list of 1 to {BATCH_MAX_ITEMS} messages",
            "type": "too_long" if isinstance(items, list) and items else "missing",
        }
        raise ApiError(422, "validation_error", "the request is not valid", [detail])
    extra = sorted(k for k in raw if k != "items")
    if extra:
        details = [{"path": k, "message": "extra field", "type": "extra_forbidden"} for k in extra]
        raise ApiError(422, "validation_error", "the request is not valid", details)
    answers: list[Any] = [None] * len(items)
    valid: list[tuple[int, BatchItem]] = []
    for index, item in enumerate(items):
        try:
            parsed = BatchSendItem.model_validate(item)
        except ValidationError as exc:
            details = _prefixed(index, validation_details(exc.errors()))
            answers[index] = _item_error(
                index, 422, "validation_error", "the item is not valid", details
            )
            continue
        clinic_id = parsed.metadata.clinic_id
        if not principal.allows(Permission.SEND, clinic_id):
            scope = f"clinic {clinic_id!r}" if clinic_id is not None else "every clinic"
            message = f"role {principal.role.value} lacks {Permission.SEND.value} for {scope}"
            answers[index] = _item_error(index, 403, "forbidden", message)
            continue
        valid.append((index, BatchItem(parsed, parsed.idempotency_key)))
    try:
        results = await runtime.messaging.accept_many(
            [item for _, item in valid], requested_by=principal.sub
        )
    except IdempotencyConflictError as exc:  # pragma: no cover - answered per item
        raise ApiError(409, "idempotency_conflict", str(exc)) from None
    for (index, _), result in zip(valid, results, strict=True):
        if isinstance(result, dict):
            answers[index] = {
                "index": index,
                "status": 202,
                "id": result["id"],
                "deliveries": result["deliveries"],
            }
        else:
            answers[index] = _exception_answer(index, result)
    accepted = sum(1 for a in answers if a["status"] == 202)
    answer = {"accepted": accepted, "refused": len(answers) - accepted, "items": answers}
    return _json(answer, 202 if accepted == len(answers) else 207)


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
