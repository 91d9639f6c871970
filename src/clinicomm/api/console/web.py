"""The console's plumbing: templates, the signed-in user, CSRF, security headers, and turning
the API's exceptions into pages.

Errors are classified where the API classifies them: `api_error` runs the app's own
exception handler (`api.errors.install`) and reads its JSON answer, so a console page shows
the same status, code, message and per-path details the API would answer.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources
from typing import Any
from urllib.parse import parse_qsl

from fastapi import Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.routing import APIRoute
from jinja2 import Environment, FileSystemLoader, select_autoescape

from clinicomm.api.auth import Permission
from clinicomm.api.console.sessions import COOKIE, ConsoleUser, SessionStore, check_csrf
from clinicomm.store.models import aware

_ROOT = resources.files("clinicomm.api.console")
STATIC_DIR = str(_ROOT / "static")
templates = Environment(
    loader=FileSystemLoader(str(_ROOT / "templates")),
    autoescape=select_autoescape(["html"]),
    trim_blocks=True,
    lstrip_blocks=True,
)


def _masked(address: object) -> str:
    """An address shown in lists: enough to tell two apart, not enough to read it."""
    text = str(address or "")
    if "@" in text:
        local, _, domain = text.partition("@")
        return f"{local[:1]}•••@{domain}"
    return f"{text[:3]}•••{text[-2:]}" if len(text) > 6 else "•••"


def _when(value: object) -> str:
    """A timestamp (datetime or ISO text) as `2026-12-01 22:26:40.426 UTC`."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            return str(value)
    if isinstance(value, datetime):
        moment = aware(value).astimezone(UTC)
        return moment.strftime("%Y-%m-%d %H:%M:%S.") + f"{moment.microsecond // 1000:03d} UTC"
    return ""


templates.filters["masked"] = _masked
templates.filters["when"] = _when

#: No inline script or style, nothing from another origin.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}
#: A posted console form is small; anything larger is refused before parsing.
MAX_FORM_BYTES = 256 * 1024


class ConsoleError(Exception):
    """Answer this request with an error page (status, title, message, optional details)."""

    def __init__(
        self, status: int, title: str, message: str, details: list[dict[str, Any]] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.title = title
        self.message = message
        self.details = details or []


@dataclass
class ApiOutcome:
    """An API exception as the API would answer it."""

    status: int
    code: str
    message: str
    details: list[dict[str, Any]] = field(default_factory=list)

    def field_errors(self) -> dict[str, str]:
        """JSON path → message, for showing each problem beside its field."""
        return {str(d["path"]): str(d.get("message", "")) for d in self.details if "path" in d}


async def api_error(request: Request, exc: Exception) -> ApiOutcome | None:
    """The API's answer to `exc` (through the app's handler table), or None if it has none."""
    handlers = request.app.exception_handlers
    for cls in type(exc).__mro__:
        handler = handlers.get(cls)
        if handler is not None and cls not in (Exception, BaseException):
            answer = await handler(request, exc)
            body = json.loads(bytes(answer.body))["error"]
            return ApiOutcome(answer.status_code, body["code"], body["message"], body["details"])
    return None


class ConsoleRoute(APIRoute):
    """A console route: an exception the API has an answer for becomes an error page with
    that answer's status and message (a 404 page, not the API's JSON)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except ConsoleError:
                raise
            except Exception as exc:
                found = await api_error(request, exc)
                if found is None or found.status == 500:
                    raise
                title = "Not found" if found.status == 404 else "Not possible"
                raise ConsoleError(found.status, title, found.message, found.details) from None

        return route


def store(request: Request) -> SessionStore:
    """The app's session store (built on first use, over the runtime's database)."""
    found: SessionStore | None = getattr(request.app.state, "console_sessions", None)
    if found is None:
        settings = request.app.state.settings
        found = SessionStore(
            request.app.state.runtime.db,
            idle_seconds=settings.console_idle_seconds,
            max_seconds=settings.console_session_max_seconds,
        )
        request.app.state.console_sessions = found
    return found


async def current_user(request: Request) -> ConsoleUser:
    """The signed-in user; ConsoleError 401 (the sign-in page) when there is none."""
    user = await store(request).lookup(request.cookies.get(COOKIE))
    if user is None:
        raise ConsoleError(401, "Signed out", "Your session has ended. Open a new sign-in link.")
    return user


async def read_form(request: Request, user: ConsoleUser) -> dict[str, str]:
    """A posted urlencoded form, after the CSRF and same-origin checks (403 otherwise)."""
    same_origin(request)
    body = await request.body()
    if len(body) > MAX_FORM_BYTES:
        raise ConsoleError(413, "Too large", "The form is too large.")
    form: dict[str, str] = {}
    for key, value in parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True):
        form.setdefault(key, value)
    if not check_csrf(user, form.get("csrf")):
        raise ConsoleError(403, "Refused", "The form's security token is missing or stale.")
    return form


def same_origin(request: Request) -> None:
    """403 when the browser says the request comes from another origin."""
    origin = request.headers.get("origin")
    if origin is not None and origin != "null":
        expected = f"{request.url.scheme}://{request.url.netloc}"
        if origin != expected:
            raise ConsoleError(403, "Refused", "This request did not come from the console.")


def require(user: ConsoleUser, permission: Permission, clinic_id: str | None) -> None:
    """403 unless the user holds `permission` for the clinic: `Principal.allows`, as the API."""
    if not user.principal.allows(permission, clinic_id):
        raise ConsoleError(403, "Not allowed", "You do not have access to this page or action.")


def render(
    request: Request,
    name: str,
    user: ConsoleUser | None,
    status: int = 200,
    **context: Any,
) -> HTMLResponse:
    """A page, with the console's security headers."""
    principal = user.principal if user else None
    html = templates.get_template(name).render(
        request=request, user=user, principal=principal, P=Permission, **context
    )
    answer = HTMLResponse(html, status_code=status)
    secure(answer)
    return answer


def secure(response: Response) -> Response:
    for key, value in SECURITY_HEADERS.items():
        response.headers.setdefault(key, value)
    return response


def redirect(url: str) -> Response:
    return secure(RedirectResponse(url, status_code=303))


def cookie_secure(request: Request) -> bool:
    """`Secure` on the cookie when the console is served over TLS (directly or, with
    `CLINICOMM_TRUST_FORWARDED_HEADERS`, behind a proxy that says so)."""
    if request.url.scheme == "https":
        return True
    trusted = bool(getattr(request.app.state.settings, "trust_forwarded_headers", False))
    return trusted and request.headers.get("x-forwarded-proto") == "https"
