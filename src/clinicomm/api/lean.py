"""Lean routes: a hot route's valid request skips FastAPI's per-request machinery.

FastAPI matches routes, solves dependencies, parses and validates the body, wraps the call in
exit stacks and exception wrappers, and serializes the answer on every request; on
`POST /api/v1/communications` that was about half of the service's own CPU per request
(bench/RESULTS.md). `LeanDispatch` is a pure ASGI middleware (inside the request context and
the body limits, outside FastAPI) holding `(method, path) → (route, fast)`:

- `fast(request)` answers a `Response`: that is the answer. `scope["route"]` is set to the
  route before `fast` runs, so the access log and metrics name the route template for every
  answer of the lean path, an exception handler's included. `fast` must do everything
  the route's dependencies do (authenticate, authorize, validate) for the requests it answers.
- `fast` answers `None` (anything it does not handle: no or an invalid token, a body that is
  not valid JSON or not valid for the model, a header out of bounds): the request goes on to
  FastAPI with the body it already read, so every error answer, 401, 422 with paths, is
  exactly FastAPI's.
- `fast` raises: the application's exception handlers answer, as they would for the route
  (the exception → status table of `api.errors`); an exception without a handler propagates
  (the request context answers the 500).

The route stays a normal FastAPI route, so the OpenAPI document is unchanged.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from clinicomm.api.limits import replay

FastHandler = Callable[[Request], Awaitable[Response | None]]


class LeanDispatch:
    """Answers the lean routes' valid requests before FastAPI (module docstring)."""

    def __init__(
        self, app: ASGIApp, routes: Mapping[tuple[str, str], tuple[Any, FastHandler]]
    ) -> None:
        self.app = app
        self.routes = dict(routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        entry = (
            self.routes.get((scope["method"], scope["path"])) if scope["type"] == "http" else None
        )
        if entry is None:
            await self.app(scope, receive, send)
            return
        route, fast = entry
        scope["route"] = route
        request = Request(scope, receive, send)
        try:
            answer = await fast(request)
        except Exception as exc:
            handler = _handler_for(scope, exc)
            if handler is None:
                raise
            answer = await handler(request, exc)
        if answer is None:
            await self.app(scope, _body_replay(request, receive), send)
            return
        await answer(scope, receive, send)


def _handler_for(scope: Scope, exc: Exception) -> Any:
    handlers: Mapping[Any, Any] = getattr(scope.get("app"), "exception_handlers", {})
    for cls in type(exc).__mro__:
        if cls in handlers:
            return handlers[cls]
    return None


def _body_replay(request: Request, receive: Receive) -> Receive:
    """`receive` for the rest of the stack: the body `request` read (if it did), then the real
    `receive` (which reports a disconnect when it comes)."""
    body: bytes | None = getattr(request, "_body", None)
    if body is None:
        return receive
    return replay([{"type": "http.request", "body": body, "more_body": False}], receive)
