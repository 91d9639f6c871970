"""Monitoring of a clinic's communication: provider health, delivery statistics, the
configuration test, and alerts (per clinic, and platform-wide for SuperAdmin)."""

from __future__ import annotations

import math
from datetime import datetime, timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select

from clinicomm.api.answers import AlertList, ClinicHealth, ClinicStats, ConfigTestResult
from clinicomm.api.auth import Permission, Principal
from clinicomm.api.deps import get_runtime, require
from clinicomm.api.errors import ApiError
from clinicomm.api.routers.clinics import ClinicId
from clinicomm.api.schemas import ERRORS, ErrorAnswer
from clinicomm.delivery.bounces import bounce_rate
from clinicomm.delivery.stats import clinic_stats
from clinicomm.delivery.testsend import BadTestRequest, run_config_test
from clinicomm.observability.alerts import list_alerts
from clinicomm.providers.base import Channel
from clinicomm.routing.health import ProviderHealth
from clinicomm.runtime import Runtime
from clinicomm.settings.service import ClinicNotFoundError
from clinicomm.store.models import Clinic, aware, utcnow
from clinicomm.telemetry.logging import request_id

router = APIRouter(tags=["monitoring"])
RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


class ConfigTestRequest(BaseModel):
    """`{"channel": "email", "to": "someone@example.com"}`"""

    model_config = ConfigDict(extra="forbid")

    channel: Channel
    to: str = Field(min_length=1, max_length=320)


async def _exists(runtime: Runtime, clinic_id: str) -> None:
    async with runtime.db.read() as session:
        if await session.scalar(select(Clinic.id).where(Clinic.id == clinic_id)) is None:
            raise ClinicNotFoundError(clinic_id)


def _health_item(health: ProviderHealth, scope: str, key: str, position: int) -> dict[str, Any]:
    return {
        "provider": key,
        "label": health.provider,
        "scope": scope,
        "position": position,
        "status": health.state.value,
        "circuit": health.circuit.value,
        "successRate": health.success_rate,
        "samples": health.samples,
        "lastFailureAt": health.last_failure_at.isoformat() if health.last_failure_at else None,
        "lastCheck": {
            "at": health.last_check_at.isoformat(),
            "ok": health.last_check_ok,
            "detail": health.last_check_detail,
        }
        if health.last_check_at
        else None,
    }


@router.get(
    "/api/v1/clinics/{clinicId}/communication/health",
    response_model=ClinicHealth,
    responses=ERRORS,
    summary="Health of each provider of the clinic's chains (own and global)",
)
async def communication_health(
    clinicId: ClinicId,
    runtime: RuntimeDep,
    _: Annotated[Principal, Depends(require(Permission.VIEW))],
) -> dict[str, Any]:
    await _exists(runtime, clinicId)
    channels: dict[str, Any] = {}
    for channel in Channel:
        resolved = await runtime.config.get_clinic_config(clinicId, channel)
        chain = runtime.chains.chain(resolved)
        items = []
        for position, hop in enumerate(chain.hops):
            owner = hop.health_owner(clinicId)
            state = await runtime.health.state(owner, hop.label)
            items.append(_health_item(state, hop.scope, hop.key, position))
        channels[channel.value] = {
            "source": resolved.source,
            "providers": items,
            "emptyReason": chain.empty_reason,
        }
    return {"clinicId": clinicId, "channels": channels}


@router.get(
    "/api/v1/clinics/{clinicId}/communication/stats",
    response_model=ClinicStats,
    responses=ERRORS,
    summary="Counts by channel, provider and status, and latency percentiles",
)
async def communication_stats(
    clinicId: ClinicId,
    runtime: RuntimeDep,
    _: Annotated[Principal, Depends(require(Permission.STATS))],
    from_: Annotated[
        datetime | None, Query(alias="from", description="Start (ISO 8601); default to - 24 h")
    ] = None,
    to: Annotated[datetime | None, Query(description="End (ISO 8601); default now")] = None,
) -> dict[str, Any]:
    end = aware(to) if to is not None else utcnow()
    start = aware(from_) if from_ is not None else end - timedelta(hours=24)
    if start >= end:
        raise ApiError(
            422,
            "validation_error",
            "'from' must be before 'to'",
            [{"path": "from", "message": "must be before 'to'", "type": "range"}],
        )
    await _exists(runtime, clinicId)
    # Scans the clinic's deliveries of the period: off the loop's thread on SQLite.
    async with runtime.db.report() as session:
        stats = await clinic_stats(session, clinicId, start, end)
        stats["bounceRate"] = await bounce_rate(session, clinicId, start, end)
        return stats


@router.post(
    "/api/v1/clinics/{clinicId}/communication/test",
    response_model=ConfigTestResult,
    response_model_exclude_unset=True,
    responses={
        **ERRORS,
        429: {
            "model": ErrorAnswer,
            "description": "More than CLINICOMM_CONFIG_TEST_PER_MINUTE tests (`Retry-After`)",
        },
    },
    summary="Send a test message through the clinic's own providers (audited)",
)
async def communication_test(
    clinicId: ClinicId,
    body: ConfigTestRequest,
    runtime: RuntimeDep,
    principal: Annotated[Principal, Depends(require(Permission.TEST))],
) -> dict[str, Any]:
    # Each call makes one outbound request with the clinic's credentials: bounded per clinic.
    wait = await runtime.limiter.acquire(
        (clinicId, "config-test"), [(runtime.settings.config_test_per_minute, 60.0)]
    )
    if wait > 0:
        raise ApiError(
            429,
            "rate_limited",
            "too many configuration tests for this clinic; retry later",
            headers={"Retry-After": str(max(1, math.ceil(wait)))},
        )
    try:
        outcome = await run_config_test(
            runtime.db,
            runtime.config,
            runtime.chains,
            clinicId,
            body.channel,
            body.to,
            actor=principal.sub,
            role=principal.role.value,
            request_id=request_id(),
        )
    except BadTestRequest as exc:
        detail = {"path": "to", "message": str(exc), "type": "value"}
        raise ApiError(422, "validation_error", str(exc), [detail]) from None
    return outcome.to_json()


StatusFilter = Annotated[
    Literal["active", "resolved"] | None, Query(description="Only alerts in this state")
]


@router.get(
    "/api/v1/alerts",
    response_model=AlertList,
    responses=ERRORS,
    summary="Every alert, newest first (SuperAdmin)",
)
async def alerts(
    runtime: RuntimeDep,
    _: Annotated[Principal, Depends(require(Permission.VIEW, platform=True))],
    status: StatusFilter = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 200,
) -> dict[str, Any]:
    return {"items": await list_alerts(runtime.db, status=status, limit=limit)}


@router.get(
    "/api/v1/clinics/{clinicId}/alerts",
    response_model=AlertList,
    responses=ERRORS,
    summary="The clinic's alerts, newest first",
)
async def clinic_alerts(
    clinicId: ClinicId,
    runtime: RuntimeDep,
    _: Annotated[Principal, Depends(require(Permission.VIEW))],
    status: StatusFilter = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 200,
) -> dict[str, Any]:
    await _exists(runtime, clinicId)
    items = await list_alerts(runtime.db, clinic_id=clinicId, status=status, limit=limit)
    return {"items": items}
