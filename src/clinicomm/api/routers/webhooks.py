"""Provider webhooks: `POST /api/v1/webhooks/{provider}/{clinicId}` and Meta's `GET` handshake.

No bearer token: the provider proves itself with a signature made with the clinic's own
credentials (its slots of that provider, on any channel). The order of checks:

1. unknown provider key, unknown clinic, or a clinic with no slot of that provider → 404,
   one answer for all three (no enumeration of clinics or of what they use);
2. more than `CLINICOMM_WEBHOOK_SIGNATURE_FAILURES_PER_MINUTE` failed signatures for this
   clinic and provider in the last minute → 429 with `Retry-After`;
3. signature (or basic auth, or SNS certificate and topic) and freshness (signed times within
   `CLINICOMM_WEBHOOK_MAX_AGE_SECONDS`, Mailgun tokens single-use) → 401 when no slot's
   credentials verify it (the failure is counted); nothing is stored. A valid signature for
   another account than the clinic's (`ForeignEventError`: Meta number/WABA, Twilio
   AccountSid, Vonage api_key/application) → the provider's normal answer, nothing stored,
   `communication_webhook_foreign_total{clinicId,provider}` counted;
4. body not in the provider's format → 400;
5. the parsed events are stored in `delivery_events` in one transaction (deduplicated by the
   provider's event id) and the answer is sent; status changes, opt-outs and the WhatsApp
   window are applied afterwards by `delivery.webhooks.WebhookService`.

`POST /api/v1/webhooks/{provider}/global` is the same receive path for the platform's global
providers: verified with the global slots' credentials (404 when no global slot uses the
provider), then each event is stored under its clinic (`WebhookService.route_global`: the
delivery's clinic by provider message id; for an inbound message, the clinic that last
messaged the patient through that provider).

The URL verified (Twilio and MessageBird sign it) is the one this server received, unless
`CLINICOMM_TRUST_FORWARDED_HEADERS=true`: then `X-Forwarded-Proto` and `X-Forwarded-Host`
(first values) replace scheme and host. Only set it behind a proxy that overwrites them.

SES through SNS: a verified `SubscriptionConfirmation` is recorded in the clinic's audit log
(action `webhook.sns_subscription`, with the topic and the `SubscribeURL`) and logged without
the URL; the operator confirms it by opening the URL. With
`CLINICOMM_SNS_AUTO_CONFIRM=true` the server also GETs the URL itself through the shared HTTP
session (the URL was checked to be https on an SNS host).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated, Any
from urllib.parse import urlsplit, urlunsplit

from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import PlainTextResponse, Response

from clinicomm.api.deps import get_runtime
from clinicomm.api.errors import ApiError
from clinicomm.api.limits import WEBHOOK_MAX_BYTES
from clinicomm.api.schemas import CLINIC_ID_PATTERN
from clinicomm.delivery.ingest import GLOBAL_SCOPE, store_events
from clinicomm.delivery.webhooks import webhook_service
from clinicomm.providers.webhooks import (
    HANDLERS,
    CertificateUnavailableError,
    ForeignEventError,
    WebhookAuthError,
    WebhookPayloadError,
    WebhookUnsupportedError,
)
from clinicomm.providers.webhooks.base import WebhookRequest
from clinicomm.runtime import Runtime
from clinicomm.store.models import AuditEntry
from clinicomm.telemetry import metrics
from clinicomm.telemetry.logging import bind_context, request_id

log = logging.getLogger(__name__)

router = APIRouter(prefix="/api/v1/webhooks", tags=["webhooks"])

RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
ClinicId = Annotated[str, Path(pattern=CLINIC_ID_PATTERN, description="The clinic's id")]
Provider = Annotated[
    str,
    Path(
        max_length=40,
        description=", ".join(
            f"{h.provider} (or {', '.join(h.aliases)})" if h.aliases else h.provider
            for h in HANDLERS.values()
        ),
    ),
]
#: Webhook bodies are small (a SendGrid batch is well under this); larger ones are refused.
MAX_BODY = WEBHOOK_MAX_BYTES  # enforced while reading by api.limits.BodySizeLimit
_BACKGROUND: set[asyncio.Task[None]] = set()


def public_url(request: Request, trust_forwarded: bool) -> str:
    """The URL as the provider called it (see the module docstring for the proxy rule)."""
    url = str(request.url)
    if not trust_forwarded:
        return url
    parts = urlsplit(url)
    proto = (request.headers.get("x-forwarded-proto") or "").split(",")[0].strip().lower()
    host = (request.headers.get("x-forwarded-host") or "").split(",")[0].strip()
    scheme = proto if proto in ("http", "https") else parts.scheme
    return urlunsplit((scheme, host or parts.netloc, parts.path, parts.query, parts.fragment))


#: The one answer for an unknown provider, an unknown clinic and a clinic that does not use
#: the provider: which clinics exist and what they use is not told to an unauthenticated caller.
_NOT_SERVED = "no webhook endpoint here for this provider and clinic"


async def _credentials(runtime: Runtime, provider: str, clinic_id: str) -> tuple[str, list[Any]]:
    service = webhook_service(runtime)
    key = service.provider_key(provider)
    found = await service.credentials(clinic_id, key) if key is not None else []
    if key is None or not found:
        raise ApiError(404, "not_found", _NOT_SERVED)
    return key, found


def _failure_key(scope: str, key: str) -> tuple[str, ...]:
    return (scope, "webhook-signature-failures", key)


async def _check_failures(runtime: Runtime, scope: str, key: str) -> None:
    """429 while this clinic (or the global scope) and provider had
    `webhook_signature_failures_per_minute` failed signatures in the last minute (a brute
    force or a misconfigured sender)."""
    limit = [(runtime.settings.webhook_signature_failures_per_minute, 60.0)]
    if await runtime.limiter.usage(_failure_key(scope, key), limit) >= 1.0:
        raise ApiError(
            429,
            "rate_limited",
            "too many failed webhook signatures; retry later",
            headers={"Retry-After": "60"},
        )


async def _count_failure(runtime: Runtime, scope: str, key: str) -> None:
    limit = [(runtime.settings.webhook_signature_failures_per_minute, 60.0)]
    await runtime.limiter.acquire(_failure_key(scope, key), limit)


_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "Stored (Twilio: empty TwiML)",
        "content": {
            "text/plain": {"schema": {"type": "string"}},
            "text/xml": {"schema": {"type": "string"}},
        },
    },
    400: {"description": "Not the provider's webhook format, or a format we do not support"},
    401: {"description": "Signature missing, invalid or stale"},
    404: {"description": "Unknown provider or clinic, or the provider is not used"},
    413: {"description": "Body too large"},
    429: {"description": "Too many failed signatures for this clinic and provider"},
    503: {"description": "A signing certificate (SNS) or the database is unavailable"},
}


@router.post(
    "/{provider}/global",
    summary="A global provider's status reports and inbound messages (signed)",
    response_class=PlainTextResponse,
    responses=_RESPONSES,
)
async def receive_global(provider: Provider, request: Request, runtime: RuntimeDep) -> Response:
    """The platform's own (global) providers: verified with the global credentials; each
    event is then stored under the clinic it belongs to (`WebhookService.route_global`)."""
    service = webhook_service(runtime)
    key = service.provider_key(provider)
    candidates = service.global_credentials(key) if key is not None else []
    if key is None or not candidates:
        raise ApiError(404, "not_found", _NOT_SERVED)
    return await _receive(runtime, key, candidates, request, None)


@router.post(
    "/{provider}/{clinicId}",
    summary="A provider's status reports and inbound messages for one clinic (signed)",
    response_class=PlainTextResponse,
    responses=_RESPONSES,
)
async def receive(
    provider: Provider, clinicId: ClinicId, request: Request, runtime: RuntimeDep
) -> Response:
    bind_context(clinicId=clinicId)
    key, candidates = await _credentials(runtime, provider, clinicId)
    return await _receive(runtime, key, candidates, request, clinicId)


async def _receive(
    runtime: Runtime,
    key: str,
    candidates: list[Any],
    request: Request,
    clinic_id: str | None,
) -> Response:
    """The one receive path of both routes: verify with each candidate's credentials,
    parse, store (under `clinic_id`, or each event's clinic for a global provider), answer,
    apply afterwards. Every verification rule applies to both routes."""
    scope = clinic_id if clinic_id is not None else GLOBAL_SCOPE
    await _check_failures(runtime, scope, key)
    body = await request.body()
    if len(body) > MAX_BODY:
        raise ApiError(413, "payload_too_large", "webhook body too large")
    trust = runtime.settings.trust_forwarded_headers
    webhook = WebhookRequest.build(
        public_url(request, trust), request.method, list(request.headers.items()), body
    )
    handler = HANDLERS[key]
    service = webhook_service(runtime)
    reason = "no credentials"
    foreign = False
    for credentials in candidates:
        try:
            await handler.verify(webhook, credentials, service.context)
            break
        except ForeignEventError as exc:
            foreign, reason = True, str(exc)
        except WebhookAuthError as exc:
            reason = str(exc)
        except WebhookUnsupportedError as exc:  # signed, but a format we do not take
            raise ApiError(400, "unsupported_format", str(exc)) from None
        except CertificateUnavailableError as exc:
            log.warning(
                "SNS signing certificate unavailable",
                extra={"event": "webhook_cert_unavailable", "provider": key,
                       "reason": str(exc)[:200]},
            )
            raise ApiError(
                503,
                "unavailable",
                "SNS signing certificate unavailable; retry later",
                headers={"Retry-After": "60"},
            ) from None
    else:
        if foreign:
            # Signed with the clinic's secret but for another account: acknowledged (the
            # provider must not retry it forever), never applied, counted.
            metrics.WEBHOOK_FOREIGN.labels(scope, key).inc()
            log.warning(
                "webhook for another account ignored",
                extra={"event": "webhook_foreign", "provider": key, "reason": reason[:200]},
            )
            answer, media_type = handler.answer
            return Response(answer, media_type=media_type)
        await _count_failure(runtime, scope, key)
        log.warning(
            "webhook refused",
            extra={"event": "webhook_refused", "provider": key, "reason": reason[:200]},
        )
        raise ApiError(401, "unauthorized", "webhook signature is missing, invalid or stale")
    try:
        events = handler.parse(webhook)
        confirm = handler.subscription_url(webhook) if handler.subscription_url else None
    except (WebhookPayloadError, WebhookAuthError) as exc:
        raise ApiError(400, "bad_request", f"not a {key} webhook: {exc}") from None
    dropped = 0
    if clinic_id is None:
        routed, dropped = await service.route_global(key, events)
    else:
        routed = {clinic_id: list(events)}
    ids: list[int] = []
    duplicates = 0
    async with runtime.db.session() as session:
        for owner, owned in routed.items():
            # Addresses are stored as the clinic's blind index beside their ciphertext.
            cipher = (
                None if owner == GLOBAL_SCOPE
                else await runtime.keys.cipher_for(runtime.db, owner)
            )
            new, dup = await store_events(session, owner, owned, cipher=cipher)
            ids += new
            duplicates += dup
        if confirm is not None:
            _record_subscription(session, key, clinic_id, webhook, confirm)
    service.submit(ids)
    log.info(
        "webhook stored",
        extra={
            "event": "webhook_stored",
            "provider": key,
            "stored": len(ids),
            "duplicates": duplicates,
            "global": clinic_id is None,
            "unowned": dropped,
        },
    )
    if confirm is not None and runtime.settings.sns_auto_confirm:
        task = asyncio.create_task(_confirm_subscription(runtime, confirm))
        _BACKGROUND.add(task)
        task.add_done_callback(_BACKGROUND.discard)
    answer, media_type = handler.answer
    return Response(answer, media_type=media_type)


@router.get(
    "/{provider}/{clinicId}",
    summary="Meta's subscription handshake (hub.verify_token → hub.challenge)",
    response_class=PlainTextResponse,
    responses={
        403: {"description": "hub.verify_token does not match"},
        404: {"description": "No handshake for this provider, unknown clinic, or not used by it"},
    },
)
async def handshake(
    provider: Provider, clinicId: ClinicId, request: Request, runtime: RuntimeDep
) -> PlainTextResponse:
    bind_context(clinicId=clinicId)
    key = webhook_service(runtime).provider_key(provider)
    answer = HANDLERS[key].handshake if key is not None else None
    if answer is None:
        raise ApiError(404, "not_found", "this provider has no subscription handshake")
    _, candidates = await _credentials(runtime, provider, clinicId)
    query = dict(request.query_params)
    for credentials in candidates:
        try:
            return PlainTextResponse(answer(query, credentials))
        except WebhookAuthError:
            continue
    raise ApiError(403, "forbidden", "hub.verify_token does not match")


def _record_subscription(
    session: Any, key: str, clinic_id: str | None, webhook: WebhookRequest, url: str
) -> None:
    message = webhook.json()
    topic = str(message.get("TopicArn") or "")
    session.add(
        AuditEntry(
            clinic_id=clinic_id,
            actor=f"webhook:{key}",
            role="provider",
            action="webhook.sns_subscription",
            request_id=request_id(),
            diff={"topicArn": topic, "subscribeUrl": url},
        )
    )
    log.warning(
        "SNS subscription awaits confirmation: open the SubscribeURL in the clinic's audit log",
        extra={"event": "sns_subscription_confirmation", "topicArn": topic},
    )


async def _confirm_subscription(runtime: Runtime, url: str) -> None:
    try:
        async with runtime.http.get(url, allow_redirects=False) as answer:
            ok = answer.status == 200
    except Exception as exc:
        log.warning(
            "SNS subscription confirmation failed",
            extra={"event": "sns_confirm_failed", "error": type(exc).__name__},
        )
        return
    log.info("SNS subscription confirmed", extra={"event": "sns_confirmed", "ok": ok})
