"""The admin console at `/console`: server-rendered pages over the API's own services.

`mount(app)` adds its routes, its static assets (shipped in the package; no CDN) and the
handler that turns a `ConsoleError` into a page. Permissions are the API's (`Principal.allows`),
checked on the server for every page and action; sessions live in the database
(`console.sessions`). See docs/console.md.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import Response
from fastapi.staticfiles import StaticFiles

from clinicomm.api.console import views
from clinicomm.api.console.web import STATIC_DIR, ConsoleError, render


async def _error_page(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ConsoleError)
    if exc.status == 401:
        return render(request, "login.html", None, status=401, error=exc.message)
    user = None
    try:
        from clinicomm.api.console.web import current_user

        user = await current_user(request)
    except ConsoleError:
        pass
    return render(
        request,
        "error.html",
        user,
        status=exc.status,
        title=exc.title,
        message=exc.message,
        details=exc.details,
    )


def mount(app: FastAPI) -> None:
    """Serve the console under `/console` of `app`."""
    app.include_router(views.router)
    app.mount("/console/static", StaticFiles(directory=STATIC_DIR), name="console-static")
    app.add_exception_handler(ConsoleError, _error_page)


__all__ = ["mount"]
