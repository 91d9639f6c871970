"""Opt-outs a clinic records or lifts: `GET`/`POST`/`DELETE …/clinics/{clinicId}/suppressions`.

All three need `clinic:communication:manage` for the clinic. Addresses are stored canonical:
email addresses normalized and lower-cased whole, phone numbers E.164 (`providers/phone.py`;
a number without `+` is refused, there is no region to read it in). A send to a suppressed
(clinic, channel, address) ends `suppressed` without any provider call (`delivery.admission`).
Each change writes an audit entry (`suppression.add`, `suppression.remove`) in its transaction.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Path, Query
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from clinicomm.api.answers import SuppressionItem, SuppressionList
from clinicomm.api.auth import Permission, Principal
from clinicomm.api.deps import get_runtime, require
from clinicomm.api.errors import ApiError
from clinicomm.api.schemas import CLINIC_ID_PATTERN, ERRORS
from clinicomm.crypto import FieldCipher
from clinicomm.delivery.suppressions import SuppressionReason, canonical_key, suppress, unsuppress
from clinicomm.providers.base import Channel
from clinicomm.providers.email_address import EmailNotValidError, normalize_email
from clinicomm.providers.phone import normalize_e164
from clinicomm.runtime import Runtime
from clinicomm.settings.service import ClinicNotFoundError
from clinicomm.store.models import AuditEntry, Clinic, Suppression
from clinicomm.telemetry.logging import request_id

router = APIRouter(prefix="/api/v1/clinics", tags=["suppressions"])

RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
ClinicId = Annotated[str, Path(pattern=CLINIC_ID_PATTERN, description="The clinic's id")]
Manager = Annotated[Principal, Depends(require(Permission.MANAGE))]


class SuppressionIn(BaseModel):
    """An opt-out to record (the patient phoned, wrote, asked in person)."""

    model_config = ConfigDict(extra="forbid")

    channel: Channel
    address: str = Field(min_length=1, max_length=320)
    reason: SuppressionReason = SuppressionReason.MANUAL


class SuppressionKey(BaseModel):
    """Which opt-out to lift (body form of DELETE)."""

    model_config = ConfigDict(extra="forbid")

    channel: Channel
    address: str = Field(min_length=1, max_length=320)


def canonical_address(channel: Channel, address: str) -> str:
    """The stored form of `address` on `channel`; 422 when it is not an address there."""
    try:
        if channel is Channel.EMAIL:
            normalized = normalize_email(address.strip())
            return canonical_key(channel, normalized)
        return normalize_e164(address)
    except (EmailNotValidError, ValueError) as exc:
        kind = "email address" if channel is Channel.EMAIL else "E.164 phone number"
        raise ApiError(
            422,
            "validation_error",
            "the request is not valid",
            [{"path": "address", "message": f"not an {kind}: {exc}"[:200], "type": "address"}],
        ) from None


async def _clinic(session: AsyncSession, clinic_id: str) -> None:
    if await session.get(Clinic, clinic_id) is None:
        raise ClinicNotFoundError(clinic_id)


def _audit(
    session: AsyncSession, clinic_id: str, principal: Principal, action: str, diff: dict[str, Any]
) -> None:
    session.add(
        AuditEntry(
            clinic_id=clinic_id,
            actor=principal.sub,
            role=principal.role.value,
            action=action,
            request_id=request_id(),
            diff=diff,
        )
    )


def _item(row: Suppression, cipher: FieldCipher) -> dict[str, Any]:
    """An opt-out as answered: the address decrypted (stored as a blind index beside its
    ciphertext); an opt-out recorded without a ciphertext shows its index."""
    address = cipher.decrypt_address(row.address_enc) if row.address_enc else row.address
    return {
        "channel": row.channel,
        "address": address,
        "reason": row.reason,
        "source": row.source,
        "createdAt": row.created_at.isoformat(),
    }


@router.get(
    "/{clinicId}/suppressions",
    response_model=SuppressionList,
    responses=ERRORS,
    summary="The clinic's opt-outs, newest first (manage)",
)
async def list_suppressions(
    clinicId: ClinicId,
    runtime: RuntimeDep,
    _: Manager,
    channel: Annotated[Channel | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> dict[str, Any]:
    async with runtime.db.read() as session:
        await _clinic(session, clinicId)
        query = select(Suppression).where(Suppression.clinic_id == clinicId)
        if channel is not None:
            query = query.where(Suppression.channel == channel.value)
        rows = (
            await session.scalars(
                query.order_by(Suppression.created_at.desc(), Suppression.address).limit(limit)
            )
        ).all()
    cipher = await runtime.keys.cipher_for(runtime.db, clinicId)
    return {"items": [_item(r, cipher) for r in rows]}


@router.post(
    "/{clinicId}/suppressions",
    status_code=201,
    response_model=SuppressionItem,
    responses={**ERRORS, 200: {"model": SuppressionItem, "description": "Already recorded"}},
    summary="Record an opt-out: no message reaches this address on this channel (manage)",
)
async def add_suppression(
    clinicId: ClinicId, body: SuppressionIn, runtime: RuntimeDep, principal: Manager
) -> JSONResponse:
    address = canonical_address(body.channel, body.address)
    async with runtime.db.session() as session:
        await _clinic(session, clinicId)
        cipher = await runtime.keys.cipher(session, clinicId)
        index = cipher.index(address)
        created = await suppress(
            session,
            clinicId,
            body.channel,
            index,
            body.reason,
            f"api:{principal.sub}",
            address_enc=cipher.encrypt_address(address),
        )
        if created:
            _audit(  # the audit log outlives the opt-out: the blind index, never the address
                session,
                clinicId,
                principal,
                "suppression.add",
                {"channel": body.channel.value, "address": index, "reason": body.reason.value},
            )
        row = await session.get(Suppression, (clinicId, body.channel.value, index))
        assert row is not None
        item = _item(row, cipher)
    return JSONResponse(item, status_code=201 if created else 200)


@router.delete(
    "/{clinicId}/suppressions",
    status_code=204,
    responses=ERRORS,
    summary="Lift an opt-out (channel and address in the query or the body) (manage)",
)
async def remove_suppression(
    clinicId: ClinicId,
    runtime: RuntimeDep,
    principal: Manager,
    channel: Annotated[Channel | None, Query()] = None,
    address: Annotated[str | None, Query(max_length=320)] = None,
    body: Annotated[SuppressionKey | None, Body()] = None,
) -> Response:
    if body is not None:
        channel, address = body.channel, body.address
    if channel is None or not address:
        raise ApiError(
            422,
            "validation_error",
            "the request is not valid",
            [{"path": "channel", "message": "channel and address are required", "type": "missing"}],
        )
    canonical = canonical_address(channel, address)
    async with runtime.db.session() as session:
        await _clinic(session, clinicId)
        index = (await runtime.keys.cipher(session, clinicId)).index(canonical)
        removed = await unsuppress(session, clinicId, channel, index)
        if not removed:
            raise ApiError(404, "not_found", "no such opt-out")
        _audit(
            session,
            clinicId,
            principal,
            "suppression.remove",
            {"channel": channel.value, "address": index},
        )
    return Response(status_code=204)
