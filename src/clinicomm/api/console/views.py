"""The console's pages and actions, under `/console`.

Every handler gets the signed-in user, checks the permission for the clinic with
`web.require` (`Principal.allows`, the API's rule) *before* reading anything, and then calls
the API's own route functions or the services they call. Writes go through the API's
handlers (`replace_clinic`, `create_clinic`, `communication_test`, suppressions), so
validation, `If-Match`, audit and cross-process invalidation are the API's, not a copy.
"""

from __future__ import annotations

import copy
import json
from datetime import datetime
from typing import Any
from urllib.parse import parse_qsl

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import ValidationError
from sqlalchemy import select

from clinicomm.api.auth import Permission
from clinicomm.api.console import charts
from clinicomm.api.console.forms import (
    FormError,
    credentials_from_form,
    posted_values,
    provider_fields,
    provider_schema,
    schema_fields,
    values_from_form,
)
from clinicomm.api.console.sessions import COOKIE, SignInError
from clinicomm.api.console.web import (
    ApiOutcome,
    ConsoleError,
    ConsoleRoute,
    api_error,
    cookie_secure,
    current_user,
    read_form,
    redirect,
    render,
    require,
    same_origin,
    store,
)
from clinicomm.api.errors import ApiError, validation_details
from clinicomm.api.routers import clinics as clinics_api
from clinicomm.api.routers import monitoring as monitoring_api
from clinicomm.api.routers import suppressions as suppressions_api
from clinicomm.api.schemas import ClinicCreate, ClinicReplace
from clinicomm.crypto import CryptoError
from clinicomm.delivery.status import get_message, reveal
from clinicomm.delivery.suppressions import SuppressionReason
from clinicomm.observability.alerts import list_alerts
from clinicomm.providers import registry
from clinicomm.providers.base import Channel
from clinicomm.runtime import Runtime
from clinicomm.settings.keys import PLATFORM
from clinicomm.settings.models import RateLimit
from clinicomm.settings.service import COMM, VersionConflictError
from clinicomm.store.models import (
    AuditEntry,
    Clinic,
    Delivery,
    DeliveryEventRecord,
    aware,
    utcnow,
)

router = APIRouter(prefix="/console", include_in_schema=False, route_class=ConsoleRoute)
CHANNELS = [c.value for c in Channel]
RATE_SCHEMA = RateLimit.model_json_schema(by_alias=True)


def _runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


def _json(response: Response) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(bytes(response.body))
    return body


# ---------------------------------------------------------------- sign-in


@router.get("")
@router.get("/")
async def home(request: Request) -> Response:
    user = await store(request).lookup(request.cookies.get(COOKIE))
    return redirect("/console/clinics" if user else "/console/login")


@router.get("/login")
async def login_page(request: Request) -> Response:
    return render(request, "login.html", None)


@router.post("/login")
async def login(request: Request) -> Response:
    same_origin(request)  # no signing a victim into someone else's session from another site
    body = (await request.body())[:8192].decode("utf-8", "replace")
    token = dict(parse_qsl(body)).get("token", "")
    try:
        cookie, _ = await store(request).sign_in(request.app.state.verifier, token)
    except SignInError as exc:
        return render(request, "login.html", None, status=401, error=str(exc))
    answer = redirect("/console/clinics")
    answer.set_cookie(
        COOKIE,
        cookie,
        httponly=True,
        samesite="strict",
        secure=cookie_secure(request),
        path="/console",
        max_age=store(request).max_seconds,
    )
    return answer


@router.post("/logout")
async def logout(request: Request) -> Response:
    user = await current_user(request)
    await read_form(request, user)
    await store(request).end(user.session_id)
    answer = redirect("/console/login")
    answer.delete_cookie(COOKIE, path="/console")
    return answer


# ---------------------------------------------------------------- clinics


async def _health(request: Request, clinic_id: str, user: Any) -> dict[str, Any]:
    """The API's health answer, each hop with a `band` to draw: its status, or `unknown`
    while fewer than `CLINICOMM_HEALTH_MIN_SAMPLES` calls were seen (and the circuit is closed)."""
    health = await monitoring_api.communication_health(clinic_id, _runtime(request), user.principal)
    least = request.app.state.settings.health_min_samples
    for channel in health["channels"].values():
        for hop in channel["providers"]:
            few = hop["samples"] < least and hop["circuit"] == "closed"
            hop["band"] = "unknown" if few else hop["status"]
    return health


@router.get("/clinics")
async def clinics_page(request: Request) -> Response:
    return await _clinics(request)


async def _clinics(
    request: Request,
    status: int = 200,
    create_error: ApiOutcome | None = None,
    create_form: dict[str, str] | None = None,
) -> Response:
    user = await current_user(request)
    principal = user.principal
    runtime = _runtime(request)
    async with runtime.db.read() as session:
        query = select(Clinic.id, Clinic.name).order_by(Clinic.id).limit(500)
        if not principal.allows(Permission.VIEW, None):
            ids = [principal.clinic_id] if principal.clinic_id else []
            query = query.where(Clinic.id.in_(ids))
        rows = (await session.execute(query)).all()
    items = []
    for clinic_id, name in rows:
        if not principal.allows(Permission.VIEW, clinic_id):
            continue
        health = await _health(request, clinic_id, user)
        stats = None
        if principal.allows(Permission.STATS, clinic_id):
            stats = await monitoring_api.communication_stats(
                clinic_id, runtime, principal, from_=None, to=None
            )
        items.append({"id": clinic_id, "name": name, "health": health, "stats": stats})
    return render(
        request,
        "clinics.html",
        user,
        status=status,
        clinics=items,
        channels=CHANNELS,
        create_error=create_error,
        create_form=create_form,
    )


@router.post("/clinics")
async def create_clinic(request: Request) -> Response:
    user = await current_user(request)
    require(user, Permission.MANAGE, None)
    form = await read_form(request, user)
    try:
        body = ClinicCreate.model_validate(
            {"id": form.get("id") or None, "name": form.get("name", ""), "settings": {}}
        )
        await clinics_api.create_clinic(body, _runtime(request), user.principal)
    except ValidationError as exc:
        outcome = ApiOutcome(422, "validation_error", "not valid", validation_details(exc.errors()))
        return await _clinics(request, outcome.status, outcome, form)
    except Exception as exc:
        found = await api_error(request, exc)
        if found is None:
            raise
        return await _clinics(request, found.status, found, form)
    return redirect(f"/console/clinics/{body.id}" if body.id else "/console/clinics")


# ---------------------------------------------------------------- one clinic's channels


def _slot_path(slot: str) -> list[str | int]:
    if slot == "primary":
        return ["primary"]
    if slot.startswith("fallback.") and slot[9:].isdigit():
        return ["fallback", int(slot[9:])]
    raise ConsoleError(422, "Not valid", "Unknown provider slot.")


def _get_slot(channel_doc: dict[str, Any], slot: str) -> dict[str, Any] | None:
    path = _slot_path(slot)
    if path[0] == "primary":
        found = channel_doc.get("primary")
        return found if isinstance(found, dict) else None
    fallbacks = channel_doc.get("fallback") or []
    index = int(path[1])
    return (
        fallbacks[index] if index < len(fallbacks) and isinstance(fallbacks[index], dict) else None
    )


async def _clinic_page(
    request: Request,
    clinic_id: str,
    *,
    status: int = 200,
    errors: ApiOutcome | None = None,
    conflict: dict[str, Any] | None = None,
    test_result: dict[str, Any] | None = None,
    notice: str | None = None,
    posted: tuple[str, dict[str, str]] | None = None,
) -> Response:
    """The channels page; `posted` = (channel, form) of a refused save, drawn as it was sent."""
    user = await current_user(request)
    require(user, Permission.VIEW, clinic_id)
    runtime = _runtime(request)
    async with runtime.db.sessions() as session:
        record = await runtime.config.get_clinic(session, clinic_id)
    masked = record.masked()
    comm = masked["settings"].get(COMM) or {}
    health = await _health(request, clinic_id, user)
    editing = request.query_params.get("edit")
    chosen = request.query_params.get("provider")
    channels = []
    for channel in Channel:
        doc = comm.get(channel.value) or {}
        slots = []
        names = ["primary"] + [f"fallback.{i}" for i in range(len(doc.get("fallback") or []))]
        names.append(f"fallback.{len(doc.get('fallback') or [])}")
        for name in names:
            current = _get_slot(doc, name)
            key = (current or {}).get("provider")
            if editing == f"{channel.value}.{name}" and chosen in registry.keys(channel):
                key = chosen
            refused = _refused_slot(posted, channel, name)
            if refused is not None:
                key = refused.get("provider")
            fields = None
            if key in registry.keys(channel):
                creds = (
                    (current or {}).get("credentials")
                    if (current or {}).get("provider") == key
                    else None
                )
                if refused is not None:
                    creds = posted_values(provider_schema(channel, key), refused, creds)
                fields = provider_fields(channel, key, creds)
            slots.append(
                {
                    "name": name,
                    "current": current,
                    "provider": key,
                    "fields": fields,
                    "new": current is None,
                }
            )
        rate = doc.get("rateLimit") if isinstance(doc.get("rateLimit"), dict) else None
        if posted is not None and posted[0] == channel.value and posted[1].get("form") == "rate":
            rate = posted_values(RATE_SCHEMA, posted[1], None)
        structured = ("primary", "fallback", "rateLimit")
        options = {k: v for k, v in doc.items() if k not in structured}
        options_text = json.dumps(options, indent=2, ensure_ascii=False)
        if posted is not None and posted[0] == channel.value and "options" in posted[1]:
            options_text = posted[1]["options"]
        channels.append(
            {
                "channel": channel.value,
                "doc": doc,
                "slots": slots,
                "options": options_text,
                "rate_fields": schema_fields(RATE_SCHEMA, rate),
                "providers": registry.keys(channel),
                "chain": health["channels"][channel.value],
            }
        )
    return render(
        request,
        "clinic.html",
        user,
        status=status,
        clinic=masked,
        channels=channels,
        errors=errors.field_errors() if errors else {},
        error=errors,
        conflict=conflict,
        test_result=test_result,
        notice=notice,
    )


def _refused_slot(
    posted: tuple[str, dict[str, str]] | None, channel: Channel, slot: str
) -> dict[str, str] | None:
    if posted is None or posted[0] != channel.value or posted[1].get("slot") != slot:
        return None
    return posted[1] if posted[1].get("remove") != "1" else None


@router.get("/clinics/{clinic_id}")
async def clinic_page(request: Request, clinic_id: str) -> Response:
    saved = request.query_params.get("saved") == "1"
    return await _clinic_page(request, clinic_id, notice="Saved." if saved else None)


async def _save(
    request: Request, clinic_id: str, channel: Channel, form: dict[str, str], build: Any
) -> Response:
    """Apply `build(communicationSettings)` to the masked settings and PUT them with the
    version the user loaded as `If-Match`; conflicts and problems are shown on the page."""
    user = await current_user(request)
    runtime = _runtime(request)
    if not form.get("version", "").isdigit() or len(form["version"]) > 12:
        # Always a conditional write: without the version a stale form would overwrite.
        raise ConsoleError(422, "Not valid", "The form does not say which version it edits.")
    version = int(form["version"])
    async with runtime.db.sessions() as session:
        record = await runtime.config.get_clinic(session, clinic_id)
    settings = copy.deepcopy(record.masked()["settings"])
    comm = settings.setdefault(COMM, {}) or {}
    settings[COMM] = comm
    try:
        build(comm)
        body = ClinicReplace.model_validate({"settings": settings})
        await clinics_api.replace_clinic(clinic_id, body, runtime, user.principal, version)
    except FormError as exc:
        outcome = ApiOutcome(
            422, "validation_error", str(exc), [{"path": exc.path, "message": str(exc)}]
        )
        return await _clinic_page(
            request, clinic_id, status=422, errors=outcome, posted=(channel.value, form)
        )
    except VersionConflictError as exc:
        return await _clinic_page(
            request,
            clinic_id,
            status=409,
            conflict=await _changes_since(runtime, clinic_id, version, exc.current),
        )
    except Exception as exc:
        found = await api_error(request, exc)
        if found is None:
            raise
        return await _clinic_page(
            request, clinic_id, status=found.status, errors=found, posted=(channel.value, form)
        )
    return redirect(f"/console/clinics/{clinic_id}?saved=1#h-{channel.value}")


async def _changes_since(
    runtime: Runtime, clinic_id: str, seen: int, current: int
) -> dict[str, Any]:
    """What others changed after version `seen`: their audit entries (secrets redacted)."""
    async with runtime.db.read() as session:
        rows = (
            await session.scalars(
                select(AuditEntry)
                .where(AuditEntry.clinic_id == clinic_id)
                .order_by(AuditEntry.id.desc())
                .limit(50)
            )
        ).all()
    entries = [
        {
            "actor": r.actor,
            "role": r.role,
            "at": aware(r.at).isoformat(timespec="seconds"),
            "action": r.action,
            "changes": (r.diff or {}).get("communicationSettings", []),
        }
        for r in rows
        if isinstance((r.diff or {}).get("version"), int) and r.diff["version"] > seen
    ]
    return {"seen": seen, "current": current, "entries": list(reversed(entries))}


@router.post("/clinics/{clinic_id}/channels/{channel}/slot")
async def save_slot(request: Request, clinic_id: str, channel: Channel) -> Response:
    user = await current_user(request)
    require(user, Permission.MANAGE, clinic_id)
    form = await read_form(request, user)
    slot = form.get("slot", "")
    path = _slot_path(slot)
    key = form.get("provider", "")
    prefix = f"settings.communicationSettings.{channel.value}.{slot}"

    def build(comm: dict[str, Any]) -> None:
        doc = comm.setdefault(channel.value, {})
        if form.get("remove") == "1":
            if path[0] == "primary":
                doc.pop("primary", None)
            else:
                fallbacks = doc.get("fallback") or []
                if int(path[1]) < len(fallbacks):
                    fallbacks.pop(int(path[1]))
            return
        value: dict[str, Any] = {"provider": key, "enabled": form.get("enabled") is not None}
        if key != registry.DISABLED:
            if key not in registry.keys(channel):
                raise FormError(f"{prefix}.provider", "choose a provider")
            value["credentials"] = credentials_from_form(channel, key, form, prefix=prefix)
        if path[0] == "primary":
            doc["primary"] = value
        else:
            fallbacks = doc.setdefault("fallback", [])
            index = int(path[1])
            if index < len(fallbacks):
                fallbacks[index] = value
            else:
                fallbacks.append(value)

    return await _save(request, clinic_id, channel, form, build)


@router.post("/clinics/{clinic_id}/channels/{channel}/options")
async def save_options(request: Request, clinic_id: str, channel: Channel) -> Response:
    """The channel's other members (rate limit, fallback strategy, templates, window
    templates, default sender): edited as the JSON the API takes, validated by it."""
    user = await current_user(request)
    require(user, Permission.MANAGE, clinic_id)
    form = await read_form(request, user)
    prefix = f"settings.communicationSettings.{channel.value}"

    def build(comm: dict[str, Any]) -> None:
        try:
            options = json.loads(form.get("options") or "{}")
        except ValueError:
            raise FormError(f"{prefix}.options", "not valid JSON") from None
        if not isinstance(options, dict):
            raise FormError(f"{prefix}.options", "must be a JSON object")
        doc = comm.setdefault(channel.value, {})
        kept = {k: v for k, v in doc.items() if k in ("primary", "fallback", "rateLimit")}
        for name in kept:
            options.pop(name, None)
        comm[channel.value] = {**options, **kept}

    return await _save(request, clinic_id, channel, form, build)


@router.post("/clinics/{clinic_id}/channels/{channel}/rate-limit")
async def save_rate_limit(request: Request, clinic_id: str, channel: Channel) -> Response:
    """The channel's own send limits, a form generated from `RateLimit`'s schema."""
    user = await current_user(request)
    require(user, Permission.MANAGE, clinic_id)
    form = await read_form(request, user)
    form["form"] = "rate"
    path = f"settings.communicationSettings.{channel.value}.rateLimit"

    def build(comm: dict[str, Any]) -> None:
        comm.setdefault(channel.value, {})["rateLimit"] = values_from_form(
            RATE_SCHEMA, form, path=path
        )

    return await _save(request, clinic_id, channel, form, build)


@router.post("/clinics/{clinic_id}/test")
async def send_test(request: Request, clinic_id: str) -> Response:
    user = await current_user(request)
    require(user, Permission.TEST, clinic_id)
    form = await read_form(request, user)
    try:
        body = monitoring_api.ConfigTestRequest.model_validate(
            {"channel": form.get("channel", ""), "to": form.get("to", "")}
        )
        result = await monitoring_api.communication_test(
            clinic_id, body, _runtime(request), user.principal
        )
    except ValidationError as exc:
        outcome = ApiOutcome(422, "validation_error", "not valid", validation_details(exc.errors()))
        return await _clinic_page(request, clinic_id, status=422, errors=outcome)
    except Exception as exc:
        found = await api_error(request, exc)
        if found is None:
            raise
        return await _clinic_page(request, clinic_id, status=found.status, errors=found)
    return await _clinic_page(
        request, clinic_id, test_result={"channel": body.channel.value, **result}
    )


# ---------------------------------------------------------------- health and volume


@router.get("/clinics/{clinic_id}/health")
async def health_page(request: Request, clinic_id: str) -> Response:
    user = await current_user(request)
    require(user, Permission.STATS, clinic_id)
    runtime = _runtime(request)
    await monitoring_api._exists(runtime, clinic_id)
    async with runtime.db.read() as session:
        series, truncated = await charts.provider_series(session, clinic_id, utcnow())
    drawn = [
        {
            "series": s,
            "volume": charts.volume_chart(s),
            "latency": charts.latency_chart(s),
            "success": charts.success_chart(s),
            "p50": s.percentile(50),
            "p95": s.percentile(95),
        }
        for s in series
    ]
    alerts = []
    if user.principal.allows(Permission.VIEW, clinic_id):
        alerts = await list_alerts(runtime.db, clinic_id=clinic_id, limit=100)
    return render(
        request,
        "health.html",
        user,
        clinic_id=clinic_id,
        charts=drawn,
        truncated=truncated,
        alerts=alerts,
    )


# ---------------------------------------------------------------- messages


def _parse_time(value: str | None, name: str) -> datetime | None:
    if not value:
        return None
    try:
        return aware(datetime.fromisoformat(value))
    except ValueError:
        raise ConsoleError(422, "Not valid", f"{name}: not a date and time") from None


@router.get("/messages")
async def messages_page(request: Request) -> Response:
    """Search by message id, status, channel, provider and time range (never by address)."""
    user = await current_user(request)
    principal = user.principal
    q = request.query_params
    clinic_id = q.get("clinic") or (principal.clinic_id or "")
    if clinic_id:
        require(user, Permission.VIEW, clinic_id)
    else:
        require(user, Permission.VIEW, None)
    message_id = (q.get("id") or "").strip()
    if message_id:
        return redirect(f"/console/messages/{message_id[:64]}")
    start = _parse_time(q.get("from"), "from")
    end = _parse_time(q.get("to"), "to")
    query = select(Delivery).order_by(Delivery.id.desc()).limit(100)
    if clinic_id:
        query = query.where(Delivery.clinic_id == clinic_id)
    for name, column in (
        ("status", Delivery.status),
        ("channel", Delivery.channel),
        ("provider", Delivery.provider),
    ):
        if q.get(name):
            query = query.where(column == q[name][:80])
    if start:
        query = query.where(Delivery.created_at >= start)
    if end:
        query = query.where(Delivery.created_at < end)
    runtime = _runtime(request)
    async with runtime.db.read() as session:
        rows = (await session.scalars(query)).all()
    addresses = {row.id: await _address(runtime, row.clinic_id, row.recipient) for row in rows}
    return render(
        request,
        "messages.html",
        user,
        rows=rows,
        addresses=addresses,
        q=q,
        clinic_id=clinic_id,
        channels=CHANNELS,
    )


async def _address(runtime: Runtime, clinic_id: str | None, stored: str) -> str | None:
    """A delivery's address (stored encrypted), decrypted only to be shown masked; None once
    erased or under a key this process cannot unwrap."""
    if not stored:
        return None
    try:
        cipher = await runtime.keys.cipher_for(runtime.db, clinic_id or PLATFORM)
        return cipher.decrypt_address(stored)
    except CryptoError:
        return None


@router.get("/messages/{message_id}")
async def message_page(request: Request, message_id: str) -> Response:
    user = await current_user(request)
    async with _runtime(request).db.read() as session:
        found = await get_message(session, message_id[:64], None)
    readable = found is not None and (user.principal.allows(Permission.VIEW, found["clinicId"]))
    if found is None or not readable:  # the same answer: no hint that it exists elsewhere
        raise ConsoleError(404, "Not found", "No message with this id is visible to you.")
    runtime = _runtime(request)
    found = await reveal(found, runtime.keys, runtime.db)
    events = await _events(request, [d["id"] for d in found["deliveries"]])
    return render(request, "message.html", user, message=found, events=events)


async def _events(request: Request, delivery_ids: list[str]) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {i: [] for i in delivery_ids}
    if not delivery_ids:
        return out
    async with _runtime(request).db.read() as session:
        rows = (
            await session.scalars(
                select(DeliveryEventRecord)
                .where(DeliveryEventRecord.delivery_id.in_(delivery_ids))
                .order_by(DeliveryEventRecord.id)
            )
        ).all()
    for row in rows:
        out.setdefault(str(row.delivery_id), []).append(row)
    return out


# ---------------------------------------------------------------- opt-outs and audit


@router.get("/clinics/{clinic_id}/suppressions")
async def suppressions_page(
    request: Request,
    clinic_id: str,
    error: ApiOutcome | None = None,
    status: int = 200,
    posted: dict[str, str] | None = None,
) -> Response:
    user = await current_user(request)
    require(user, Permission.MANAGE, clinic_id)
    items = await suppressions_api.list_suppressions(
        clinic_id, _runtime(request), user.principal, channel=None, limit=500
    )
    return render(
        request,
        "suppressions.html",
        user,
        status=status,
        clinic_id=clinic_id,
        items=items["items"],
        channels=CHANNELS,
        error=error,
        errors=error.field_errors() if error else {},
        posted=posted or {},
        reasons=[r.value for r in SuppressionReason],
    )


@router.post("/clinics/{clinic_id}/suppressions")
async def suppressions_action(request: Request, clinic_id: str) -> Response:
    user = await current_user(request)
    require(user, Permission.MANAGE, clinic_id)
    form = await read_form(request, user)
    runtime = _runtime(request)
    try:
        if form.get("action") == "remove":
            await suppressions_api.remove_suppression(
                clinic_id,
                runtime,
                user.principal,
                channel=Channel(form.get("channel", "")),
                address=form.get("address", ""),
                body=None,
            )
        else:
            body = suppressions_api.SuppressionIn.model_validate(
                {
                    "channel": form.get("channel"),
                    "address": form.get("address", ""),
                    "reason": form.get("reason") or "manual",
                }
            )
            await suppressions_api.add_suppression(clinic_id, body, runtime, user.principal)
    except (ValidationError, ValueError) as exc:
        details = validation_details(exc.errors()) if isinstance(exc, ValidationError) else []
        outcome = ApiOutcome(422, "validation_error", "not valid", details)
        return await suppressions_page(request, clinic_id, outcome, 422, form)
    except ApiError as exc:
        outcome = ApiOutcome(exc.status, exc.code, exc.message, exc.details)
        return await suppressions_page(request, clinic_id, outcome, exc.status, form)
    return redirect(f"/console/clinics/{clinic_id}/suppressions")


@router.get("/clinics/{clinic_id}/audit")
async def audit_page(request: Request, clinic_id: str) -> Response:
    user = await current_user(request)
    require(user, Permission.MANAGE, clinic_id)
    q = request.query_params
    start = _parse_time(q.get("from"), "from")
    end = _parse_time(q.get("to"), "to")
    query = select(AuditEntry).where(AuditEntry.clinic_id == clinic_id)
    if q.get("actor"):
        query = query.where(AuditEntry.actor == q["actor"][:200])
    if start:
        query = query.where(AuditEntry.at >= start)
    if end:
        query = query.where(AuditEntry.at < end)
    async with _runtime(request).db.read() as session:
        exists = await session.scalar(select(Clinic.id).where(Clinic.id == clinic_id))
        if exists is None:
            raise ConsoleError(404, "Not found", "No such clinic.")
        rows = (await session.scalars(query.order_by(AuditEntry.id.desc()).limit(200))).all()
    return render(request, "audit.html", user, clinic_id=clinic_id, rows=rows, q=q)


__all__ = ["router"]
