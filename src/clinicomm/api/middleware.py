"""Request context: a request id on every log line and answer, an access line, HTTP metrics
(`communication_http_requests`, `…_duration_seconds` by route template), the 500, and the
security headers of every `/api/v1` answer (`Cache-Control: no-store`,
`X-Content-Type-Options: nosniff`, `Referrer-Policy: no-referrer`; TLS and HSTS are the
deployment's proxy's, see docs/security.md).

A pure ASGI middleware (no `BaseHTTPMiddleware`), so the context variables it sets are seen by
the route, its dependencies and the exception handlers, all running in the same task.
"""

from __future__ import annotations

import logging
import os
import re
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from clinicomm.api.errors import error_response
from clinicomm.telemetry import metrics
from clinicomm.telemetry.logging import bind_context, reset_context

log = logging.getLogger("clinicomm.api.access")

REQUEST_ID_HEADER = "x-request-id"
#: Probes and scrapes: access-logged at DEBUG (they would drown the INFO log otherwise).
PROBE_ROUTES = frozenset({"/healthz", "/readyz", "/metrics"})
# A client's request id is kept if it is short and plain; anything else is replaced (it goes
# into every log line and the audit log, so it must not be a place to smuggle data).
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
#: Set on every `/api/v1` answer (replacing any the route set).
API_HEADERS = (
    (b"cache-control", b"no-store"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
)
_API_HEADER_NAMES = frozenset(name for name, _ in API_HEADERS)


class RequestContext:
    """Binds `requestId` (from `X-Request-ID` or generated), echoes it, logs one access line,
    and answers a JSON 500 for an exception nobody handled (a bug)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = _header(scope, REQUEST_ID_HEADER)
        rid = incoming if incoming and _VALID_REQUEST_ID.match(incoming) else os.urandom(16).hex()
        token = bind_context(requestId=rid)
        api = str(scope.get("path", "")).startswith("/api/v1")
        start = time.perf_counter()
        status = 500
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                started = True
                status = message["status"]
                headers = [
                    (k, v)
                    for k, v in message.get("headers", [])
                    if k.lower() != REQUEST_ID_HEADER.encode()
                    and not (api and k.lower() in _API_HEADER_NAMES)
                ]
                headers.append((b"x-request-id", rid.encode()))
                if api:
                    headers.extend(API_HEADERS)
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("unhandled error", extra={"event": "unhandled_error"})
            if started:
                raise
            response = error_response(
                500, "internal_error", f"internal error; quote request id {rid}"
            )
            await response(scope, receive, send_with_id)
        finally:
            route = getattr(scope.get("route"), "path", None)
            elapsed = time.perf_counter() - start
            method = str(scope.get("method"))
            label = route or "unmatched"  # the template, never the raw path (ids, tokens)
            metrics.HTTP_REQUESTS.labels(method, label, str(status)).inc()
            metrics.HTTP_LATENCY.labels(method, label).observe(elapsed)
            log.log(
                logging.DEBUG if route in PROBE_ROUTES and status < 500 else logging.INFO,
                "request",
                extra={
                    "event": "http_request",
                    "method": method,
                    # The route template, not the raw path or query (ids only, no values).
                    "route": route,
                    "path": scope.get("path"),
                    "status": status,
                    "durationMs": round(elapsed * 1000, 2),
                },
            )
            reset_context(token)


def _header(scope: Scope, name: str) -> str | None:
    raw = name.encode()
    for key, value in scope.get("headers", []):
        if key.lower() == raw:
            try:
                return str(value.decode("latin-1"))
            except UnicodeDecodeError:
                return None
    return None
