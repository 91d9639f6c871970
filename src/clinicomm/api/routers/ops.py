"""Operations: `/healthz` (the process answers), `/readyz` (database and Redis answer),
`/metrics` (Prometheus text). The probes need no authentication (they carry no clinic data);
`/metrics` lists clinic ids in its labels, so with `CLINICOMM_METRICS_TOKEN` set it requires
`Authorization: Bearer <token>` (401 otherwise, compared in constant time)."""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.exceptions import RedisError

from clinicomm.api.deps import get_runtime
from clinicomm.api.errors import error_response
from clinicomm.api.schemas import ErrorAnswer, Health
from clinicomm.observability.metrics_server import metrics_token_ok
from clinicomm.runtime import Runtime

log = logging.getLogger(__name__)

router = APIRouter(tags=["operations"])

PING_TIMEOUT = 2.0


@router.get("/healthz", response_model=Health, summary="The process is up")
async def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Health,
    responses={503: {"model": ErrorAnswer, "description": "Database or Redis down"}},
    summary="The database (and Redis, when configured) answer",
)
async def readyz(runtime: Annotated[Runtime, Depends(get_runtime)]) -> Response:
    checks = {"database": "ok" if await _database(runtime) else "down"}
    if runtime.redis is not None:
        checks["redis"] = "ok" if await _redis(runtime) else "down"
    down = [name for name, state in checks.items() if state != "ok"]
    if down:
        log.warning("not ready", extra={"event": "not_ready", "down": down})
        return error_response(
            503,
            "not_ready",
            f"{' and '.join(down)} unreachable",
            [{"component": name, "status": state} for name, state in checks.items()],
        )
    return JSONResponse({"status": "ok", "checks": checks})


async def _database(runtime: Runtime) -> bool:
    try:
        return await asyncio.wait_for(runtime.db.ping(), PING_TIMEOUT)
    except TimeoutError:
        return False


async def _redis(runtime: Runtime) -> bool:
    assert runtime.redis is not None
    try:
        await asyncio.wait_for(runtime.redis.ping(), PING_TIMEOUT)
    except (RedisError, OSError, TimeoutError):
        return False
    return True


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=PlainTextResponse,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
)
async def metrics(request: Request, runtime: Annotated[Runtime, Depends(get_runtime)]) -> Response:
    if not metrics_token_ok(runtime.settings.metrics_token, request.headers.get("authorization")):
        return error_response(
            401,
            "unauthorized",
            "a bearer token is required for /metrics",
            headers={"WWW-Authenticate": "Bearer"},
        )
    await refresh_gauges(runtime)
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


async def refresh_gauges(runtime: Runtime) -> None:
    """Recompute the gauges (active clinics, providers in use) from the database; a scrape
    still answers when the database does not."""
    from clinicomm.observability.inventory import GaugeRefresher

    refresher = runtime.extras.get("gauges")
    if refresher is None:
        refresher = GaugeRefresher(runtime.db, runtime.config.global_settings, 0.25)
        runtime.extras["gauges"] = refresher
    try:
        await asyncio.wait_for(refresher.refresh(), PING_TIMEOUT)
    except Exception as exc:
        extra = {"event": "gauges_failed", "error": type(exc).__name__}
        log.warning("gauges not refreshed", extra=extra)
