"""The FastAPI application: `create_app(settings, runtime)`.

With no `runtime`, the app's lifespan builds one from `settings` (migrating an empty SQLite
file on first start) and closes it on shutdown; a `runtime` passed in belongs to the caller.
Either way the token verifier is built at startup, so a missing production JWT secret stops
the process before it serves anything.

`uvicorn --factory clinicomm.api.app:create_app` works too; `clinicomm serve` is the usual way.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Collection
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from clinicomm import __version__
from clinicomm.api import console, errors, openapi
from clinicomm.api.auth import TokenVerifier
from clinicomm.api.lean import LeanDispatch
from clinicomm.api.limits import BodySizeLimit, JsonDepthLimit
from clinicomm.api.middleware import RequestContext
from clinicomm.api.routers import (
    audit,
    clinics,
    communications,
    monitoring,
    ops,
    suppressions,
    webhooks,
)
from clinicomm.config import Settings
from clinicomm.delivery.webhooks import webhook_service
from clinicomm.runtime import Runtime

DESCRIPTION = """\
Email, WhatsApp and SMS for many clinics, each through its own providers.

Authenticate with `Authorization: Bearer <JWT>` (`clinicomm token --role SuperAdmin`).
Every error is `{"error": {"code", "message", "details"}}`; secrets are answered as `"********"`.
"""


class App(FastAPI):
    """FastAPI, whose lean routes' requests enter at our own middleware (`RequestContext`).

    Starlette wraps our middleware in ServerErrorMiddleware, and FastAPI adds its exception
    telemetry and application body limit: with FastAPI's and Starlette's own `__call__`, five
    coroutines per request and two `send` wrappers per message, none of which does anything
    for our routes (`RequestContext` answers the 500 itself, telemetry is off, the body
    limit is ours, `api.limits`). A request for one of
    `lean_routes` (method, path) skips them; every other request, and every request when our
    stack is not where `build_middleware_stack` expects it, takes the whole stack.
    """

    #: (method, path) of the routes answered by `api.lean.LeanDispatch`.
    lean_routes: Collection[tuple[str, str]] = frozenset()
    #: The stack from `RequestContext` in (None: not found, the lean routes take it whole).
    _ours: ASGIApp | None = None

    def build_middleware_stack(self) -> ASGIApp:
        stack = super().build_middleware_stack()
        self._ours = _find(stack, RequestContext)
        return stack

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and not self.root_path
            and (scope["method"], scope["path"]) in self.lean_routes
        ):
            if self.middleware_stack is None:
                self.middleware_stack = self.build_middleware_stack()
            if self._ours is not None:
                scope["app"] = self  # as Starlette sets it (handlers, `request.app`)
                await self._ours(scope, receive, send)
                return
        await super().__call__(scope, receive, send)


def _find(stack: ASGIApp, kind: type) -> ASGIApp | None:
    """The first middleware of type `kind` in `stack`, following each layer's `app`."""
    layer: object = stack
    for _ in range(16):
        if isinstance(layer, kind):
            return layer  # type: ignore[return-value]
        layer = getattr(layer, "app", None)
        if layer is None:
            return None
    return None


def create_app(settings: Settings | None = None, runtime: Runtime | None = None) -> App:
    """The HTTP API. `settings` default to the environment; `runtime` to one built at startup."""
    if settings is None:
        settings = runtime.settings if runtime is not None else Settings()
    resolved: Settings = settings

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if getattr(app.state, "verifier", None) is None:  # `serve` checked it already
            app.state.verifier = TokenVerifier.from_settings(resolved)
        if runtime is not None:
            app.state.runtime = runtime
            async with _webhook_processing(runtime):
                yield
            return
        own = await Runtime.create(resolved, migrate=resolved.is_sqlite)
        app.state.runtime = own
        try:
            async with _webhook_processing(own):
                yield
        finally:
            await own.close()

    app = App(
        title="clinicomm",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,  # `api.openapi.install` serves /docs and /redoc from local assets
        openapi_url="/openapi.json",
        redoc_url=None,
        generate_unique_id_function=openapi.operation_id,
        # Our metrics are Prometheus (/metrics) and our logs are JSON lines; FastAPI's native
        # OpenTelemetry layer would add spans and histograms to every request for nothing.
        telemetry={"tracing": False, "metrics": False, "logs": False, "operation_spans": False},
    )
    app.state.settings = resolved
    errors.install(app)
    openapi.install(app)
    # Sending first: routes are matched in order, and they are the hot ones (on the
    # application itself, not through an included router; their valid requests are answered
    # by the lean dispatch before FastAPI, `api.lean`).
    send_route = communications.add_send_route(app)
    batch_route = communications.add_batch_route(app)
    # Innermost first: the lean dispatch reads a body the limits already checked, the depth
    # check reads a body the size limit already bounds, and the request context (outermost)
    # logs and ids every answer, 413 and 422 included.
    lean = {
        ("POST", send_route.path): (send_route, communications.send_lean),
        ("POST", batch_route.path): (batch_route, communications.send_batch_lean),
    }
    app.lean_routes = frozenset(lean)
    app.add_middleware(LeanDispatch, routes=lean)
    app.add_middleware(JsonDepthLimit)
    app.add_middleware(BodySizeLimit, max_bytes=resolved.max_body_bytes)
    app.add_middleware(RequestContext)
    app.include_router(communications.router)
    app.include_router(clinics.router)
    app.include_router(audit.router)
    app.include_router(monitoring.router)
    app.include_router(ops.router)
    app.include_router(webhooks.router)
    app.include_router(suppressions.router)
    console.mount(app)
    return app


@asynccontextmanager
async def _webhook_processing(runtime: Runtime) -> AsyncIterator[None]:
    """Applies stored webhook events after the answers, and sweeps leftovers, while serving."""
    service = webhook_service(runtime)
    await service.start()
    try:
        yield
    finally:
        await service.stop()
