"""`clinicomm.http.HttpClient` against a real `clinicomm serve` (uvicorn subprocess): send, get,
list, typed errors, callback verification; and retries on 503/429 honouring `Retry-After` with
the same `Idempotency-Key`, through a proxy that loses the server's first answer."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from clinicomm.api.auth import Role, TokenVerifier
from clinicomm.callbacks.signing import sign
from clinicomm.config import Settings
from clinicomm.http import ApiError, HttpClient, MessageStatus, retry_after, verify_callback
from clinicomm.messaging.models import SendAccepted
from tests.api.serve_proc import ServeProcess
from tests.support.smtp_server import SmtpServer

MESSAGE = {
    "title": "Appointment Confirmed",
    "body": "See you at 10:30.",
    "recipients": [{"email": "patient@example.com"}],
    "channels": ["email"],
}


class LosingProxy:
    """Forwards to the server; answers `lose` first requests with 503 (Retry-After: 1) after
    forwarding them (the server stored the message, the caller never heard)."""

    def __init__(self, target: str, lose: int, status: int = 503) -> None:
        self.target = target
        self.lose = lose
        self.status = status
        self.keys: list[str | None] = []
        self.times: list[float] = []
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.keys.append(request.headers.get("Idempotency-Key"))
        self.times.append(time.monotonic())
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        async with aiohttp.ClientSession() as http, http.request(
            request.method, self.target + request.path_qs, data=body, headers=headers
        ) as answer:
            data = await answer.read()
            status, ctype = answer.status, answer.headers.get("Content-Type")
        if self.lose > 0:
            self.lose -= 1
            return web.json_response(
                {"error": {"code": "unavailable", "message": "try later", "details": []}},
                status=self.status, headers={"Retry-After": "1"})
        return web.Response(body=data, status=status, headers={"Content-Type": ctype or "application/json"})

    async def __aenter__(self) -> LosingProxy:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        assert site._server is not None
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[attr-defined]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()


@pytest.fixture
def token(settings: Settings) -> str:
    return TokenVerifier.from_settings(settings).issue(Role.SUPER_ADMIN, sub="http-client", ttl=600)


async def test_http_client_against_a_live_server(settings: Settings, tmp_path: Path, token: str) -> None:
    with SmtpServer() as smtp:
        server = ServeProcess(settings, tmp_path / "serve.log", {
            "CLINICOMM_WORKER": "true", "CLINICOMM_WORKER_POLL_SECONDS": "0.05",
            "EMAIL_HOST": "127.0.0.1", "EMAIL_PORT": str(smtp.port),
            "EMAIL_REQUIRE_TLS": "false", "EMAIL_FROM": "ops@platform.example"})
        try:
            await asyncio.to_thread(server.wait_ready)
            async with HttpClient(server.url, token) as api:
                accepted = await api.send(MESSAGE, idempotency_key="appt-1-confirm")
                assert isinstance(accepted, SendAccepted) and accepted.deliveries[0].status == "queued"
                again = await api.send(MESSAGE, idempotency_key="appt-1-confirm")
                assert again.id == accepted.id
                deadline = time.monotonic() + 15
                while True:
                    status = await api.get(accepted.id)
                    assert isinstance(status, MessageStatus)
                    if status.deliveries[0].status == "sent":
                        break
                    assert time.monotonic() < deadline, status
                    await asyncio.sleep(0.05)
                assert status.deliveries[0].attempts[0].provider == "global:smtp"
                page = await api.list(clinic_id="global", limit=10)
                assert [i.messageId for i in page.items] == [accepted.id]
                with pytest.raises(ApiError) as missing:
                    await api.get("no-such-message")
                assert missing.value.status == 404 and missing.value.code == "not_found"
                assert missing.value.request_id
                with pytest.raises(ApiError) as conflict:
                    await api.send({**MESSAGE, "body": "another"}, idempotency_key="appt-1-confirm")
                assert conflict.value.status == 409
                with pytest.raises(ApiError) as invalid:
                    await api.send({**MESSAGE, "metadata": {"clinicId": "nope"}, "callbackUrl": "https://x.example/cb"})
                assert invalid.value.status in (404, 422)
            async with HttpClient(server.url, "not-a-token") as bad:
                with pytest.raises(ApiError) as denied:
                    await bad.get(accepted.id)
                assert denied.value.status == 401

            # The first answer is lost (503, Retry-After: 1): the retry carries the same key and
            # gets the stored answer; the server has the message once.
            async with LosingProxy(server.url, lose=1) as proxy, HttpClient(proxy.url, token) as api:
                first = await api.send({**MESSAGE, "body": "retried"})
                assert len(proxy.keys) == 2 and proxy.keys[0] == proxy.keys[1] and proxy.keys[0]
                assert proxy.times[1] - proxy.times[0] >= 0.95
                async with HttpClient(server.url, token) as direct:
                    listed = await direct.list(clinic_id="global", limit=10)
                assert [i.messageId for i in listed.items].count(first.id) == 1
                assert len(listed.items) == 2
            async with LosingProxy(server.url, lose=5, status=429) as proxy, HttpClient(
                proxy.url, token, retries=1
            ) as api:
                with pytest.raises(ApiError) as limited:
                    await api.get(accepted.id)
                assert limited.value.status == 429 and len(proxy.keys) == 2
        finally:
            server.stop()


def test_verify_callback_and_retry_after() -> None:
    body = b'{"id":"e1","status":"delivered"}'
    header = sign("a-callback-secret-123", body)
    assert verify_callback("a-callback-secret-123", body, header)
    assert not verify_callback("another-secret-12345", body, header)
    assert not verify_callback("a-callback-secret-123", body + b" ", header)
    assert not verify_callback("a-callback-secret-123", body, None)
    assert retry_after("3") == 3.0
    assert retry_after(None) is None and retry_after("soon") is None
    assert retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0
