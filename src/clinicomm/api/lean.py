"""Lean routes: a hot route's valid request skips FastAPI's per-request machinery.

FastAPI solves a route's dependencies, parses and validates its body and serializes its answer
on every request; on `POST /api/v1/communications` that was about half of the service's own
CPU per request (bench/RESULTS.md). `lean(fast)` is an `APIRoute` class whose handler first
calls `fast(request)`:

- `fast` answers a `Response`: that is the answer. It must do everything the route's
  dependencies do (authenticate, authorize, validate) for the requests it answers.
- `fast` answers `None` (anything it does not handle: no or an invalid token, a body that is
  not valid JSON or not valid for the model, a header out of bounds): the route's full FastAPI
  handler runs on the same request (its body is read once and kept), so every error answer,
  401, 422 with paths, is exactly FastAPI's.

Exceptions `fast` raises go to the application's exception handlers, as a route's would. The
route keeps its signature, so the OpenAPI document is unchanged.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response

FastHandler = Callable[[Request], Awaitable[Response | None]]


def lean(fast: FastHandler) -> type[APIRoute]:
    """An `APIRoute` subclass answering through `fast` first (see the module docstring)."""

    class LeanRoute(APIRoute):
        def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
            full = super().get_route_handler()

            async def handler(request: Request) -> Response:
                answer = await fast(request)
                return answer if answer is not None else await full(request)

            return handler

    LeanRoute.__name__ = f"LeanRoute[{getattr(fast, '__name__', 'fast')}]"
    return LeanRoute
