"""A `/metrics` listener for processes without the HTTP API (`clinicomm worker`).

`clinicomm worker --metrics-port N` (or `CLINICOMM_METRICS_PORT`) serves the process's
Prometheus registry on `CLINICOMM_METRICS_HOST:N` (127.0.0.1 by default), refreshing the
database gauges (queue depth and age, callback backlog, clinics, providers) on each scrape,
exactly like `serve`'s `/metrics`. `/healthz` answers too.
"""

from __future__ import annotations

import asyncio
import hmac
import logging

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import SecretStr

from clinicomm.observability.inventory import GaugeRefresher

log = logging.getLogger(__name__)

#: Seconds a scrape waits for the database gauges before answering with the last values.
REFRESH_TIMEOUT = 2.0


def metrics_token_ok(expected: SecretStr | None, authorization: str | None) -> bool:
    """Whether a `/metrics` request may be answered: no token configured, or the bearer
    token given equals it (constant time)."""
    if expected is None or not expected.get_secret_value():
        return True
    scheme, _, given = (authorization or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        given.strip().encode(), expected.get_secret_value().encode()
    )


class MetricsServer:
    """`async with MetricsServer(refresher, host, port):` serves until the block ends."""

    def __init__(
        self,
        refresher: GaugeRefresher,
        host: str,
        port: int,
        *,
        token: SecretStr | None = None,
    ) -> None:
        self.refresher = refresher
        #: `CLINICOMM_METRICS_TOKEN`: required as a bearer token when set.
        self.token = token
        self.host = host
        self.port = port
        self._runner: web.AppRunner | None = None

    async def _metrics(self, request: web.Request) -> web.Response:
        if not metrics_token_ok(self.token, request.headers.get("Authorization")):
            return web.json_response(
                {"error": {"code": "unauthorized", "message": "a bearer token is required"}},
                status=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
        try:
            await asyncio.wait_for(self.refresher.refresh(), REFRESH_TIMEOUT)
        except Exception as exc:
            log.warning(
                "gauges not refreshed",
                extra={"event": "gauges_failed", "error": type(exc).__name__},
            )
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._health)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        server = site._server
        if server is not None and self.port == 0:
            self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        log.info(
            "metrics listening",
            extra={"event": "metrics_listening", "host": self.host, "port": self.port},
        )

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> MetricsServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
