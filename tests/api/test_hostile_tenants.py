"""Issue 13, finding 1: a clinic administrator pointing the service at the platform's network.

Each case is first reproduced where it is allowed (development settings: private stand-ins
reachable) and then refused with production-like settings (`egress_allow_private=False`),
against a local server that counts TCP connections: a refused destination opens none.
A "name that resolves to 127.0.0.1" is emulated by answering the event loop's `getaddrinfo`
for `*.evil.test` with 127.0.0.1 (no DNS here), which is what aiohttp and the SMTP path call.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from clinicomm.api.app import create_app
from clinicomm.config import Settings
from clinicomm.observability.monitors import probe_runner
from clinicomm.providers.base import MASK
from clinicomm.runtime import Runtime
from tests.api.conftest import RECORDED, Api, create_clinic, recording_client
from tests.conftest import canary

C = "/api/v1/clinics"
METADATA_PATH = "/latest/meta-data/iam/security-credentials/role?x="


class Counting:
    """A TCP server on 127.0.0.1 that counts connections and answers one HTTP response."""

    def __init__(self, status: int = 200, body: bytes = b"{}", headers: str = "") -> None:
        self.status, self.body, self.headers = status, body, headers
        self.connections = 0
        self.requests: list[bytes] = []
        self._server: asyncio.Server | None = None
        self.port = 0

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            self.requests.append(head)
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            if length:
                await asyncio.wait_for(reader.readexactly(length), 5)
            writer.write(
                f"HTTP/1.1 {self.status} X\r\nContent-Length: {len(self.body)}\r\n"
                f"Content-Type: application/json\r\nConnection: close\r\n{self.headers}\r\n".encode()
                + self.body
            )
            await writer.drain()
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    async def __aenter__(self) -> Counting:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()


@pytest.fixture
async def evil_dns(monkeypatch: pytest.MonkeyPatch) -> None:
    """`*.evil.test` and `allowed.test` resolve to 127.0.0.1 (as a hostile DNS record would)."""
    loop = asyncio.get_running_loop()
    real = loop.getaddrinfo

    async def fake(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else str(host)
        if name.endswith(".evil.test") or name == "allowed.test":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", int(port or 0)))]
        return await real(host, port, *args, **kwargs)

    monkeypatch.setattr(loop, "getaddrinfo", fake)


@asynccontextmanager
async def strict_api(settings: Settings, **update: Any) -> AsyncIterator[Api]:
    """The same database, served by a process with production-like egress settings."""
    strict = settings.model_copy(update={"egress_allow_private": False, **update})
    runtime = await Runtime.create(strict, env={})
    app = create_app(strict, runtime)
    try:
        async with app.router.lifespan_context(app), recording_client(app) as client:
            yield Api(client, runtime, strict, app.state.verifier)
    finally:
        await runtime.close()


def sendgrid_settings(base_url: str, api_key: str | None = None) -> dict[str, Any]:
    return {
        "communicationSettings": {
            "email": {
                "primary": {
                    "provider": "sendgrid",
                    "credentials": {
                        "apiKey": api_key or canary("sg-key"),
                        "baseUrl": base_url,
                        "fromEmail": "clinic@clinic.example",
                    },
                },
                "fallbackStrategy": {"enabled": False},
            }
        }
    }


def smtp_settings(host: str, port: int) -> dict[str, Any]:
    return {
        "communicationSettings": {
            "email": {
                "primary": {
                    "provider": "smtp",
                    "credentials": {
                        "host": host,
                        "port": port,
                        "user": "u",
                        "password": canary("smtp-pass"),
                        "requireTls": False,
                    },
                },
                "defaultFrom": "clinic@clinic.example",
                "fallbackStrategy": {"enabled": False},
            }
        }
    }


async def config_test(api: Api, clinic: str) -> dict[str, Any]:
    answer = await api.client.post(
        f"{C}/{clinic}/communication/test",
        json={"channel": "email", "to": "patient@example.com"},
        headers=api.admin,
    )
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


def refused(result: dict[str, Any]) -> bool:
    error = result["error"]
    return error["class"] == "configuration" and error["message"] == "destination not allowed"


def patch_email(api: Api, clinic: str, credentials: dict[str, Any]) -> Any:
    body = {"settings": {"communicationSettings": {"email": {"primary": {"credentials": credentials}}}}}
    return api.client.patch(f"{C}/{clinic}", json=body, headers=api.admin)


async def test_literal_address_reproduced_then_refused(api: Api, settings: Settings) -> None:
    async with Counting(status=200, body=b'{"Code":"Success","Token":"' + canary("iam").encode() + b'"}') as metadata:
        url = f"http://127.0.0.1:{metadata.port}{METADATA_PATH}"
        # Reproduced: with private destinations allowed (development) the saved URL is called.
        await create_clinic(api, "clinic-a", sendgrid_settings(url))
        result = await config_test(api, "clinic-a")
        assert metadata.connections >= 1
        text = str(result)
        assert "Token" not in text and "Success" not in text  # the answer is never echoed
        metadata.connections = 0
        async with strict_api(settings) as strict:
            # Connect time: a config saved before the policy changed is refused, 0 connections.
            result = await config_test(strict, "clinic-a")
            assert refused(result), result
            # The 5-minute probe: same refusal in the health answer.
            await probe_runner(strict.runtime).run_once()
            health = await strict.client.get(f"{C}/clinic-a/communication/health", headers=strict.admin)
            assert health.status_code == 200
            assert "destination not allowed" in health.text, health.text
            # Save time: the literal private address is a 422 at the field's path.
            answer = await patch_email(strict, "clinic-a", {"baseUrl": url, "apiKey": canary("k2")})
            assert answer.status_code == 422, answer.text
            paths = [d["path"] for d in answer.json()["error"]["details"]]
            assert paths == ["settings.communicationSettings.email.primary.credentials.baseUrl"]
            # Link-local (cloud metadata), IPv6 loopback and unique-local: refused too.
            for bad in ("http://169.254.169.254/latest", "http://[::1]:8080/", "http://[fd00::1]/"):
                answer = await patch_email(strict, "clinic-a", {"baseUrl": bad, "apiKey": canary("k3")})
                assert answer.status_code == 422, (bad, answer.text)
        assert metadata.connections == 0


async def test_masked_secret_cannot_follow_a_new_endpoint(api: Api) -> None:
    """The finding's first step: baseUrl changed, apiKey left as the mask → 200 and the stored
    key sent to the new host. Now 422 naming the secret, and nothing changes."""
    await create_clinic(api, "clinic-a", sendgrid_settings("https://api.sendgrid.com"))
    before = await api.stored("clinic-a")
    answer = await patch_email(
        api, "clinic-a", {"baseUrl": "https://attacker.example" + METADATA_PATH, "apiKey": MASK}
    )
    assert answer.status_code == 422, answer.text
    assert [d["path"] for d in answer.json()["error"]["details"]] == [
        "settings.communicationSettings.email.primary.credentials.apiKey"
    ]
    assert (await api.stored("clinic-a")).version == before.version
    # SMTP host/port are endpoint fields too.
    await create_clinic(api, "clinic-s", smtp_settings("smtp.example.org", 587))
    answer = await patch_email(api, "clinic-s", {"port": 3306, "password": MASK})
    assert answer.status_code == 422
    assert answer.json()["error"]["details"][0]["path"].endswith("credentials.password")


async def test_name_resolving_to_loopback_is_refused_at_connect(
    api: Api, settings: Settings, evil_dns: None
) -> None:
    async with Counting() as internal:
        url = f"http://metadata.evil.test:{internal.port}/"
        await create_clinic(api, "clinic-a", sendgrid_settings(url))
        await config_test(api, "clinic-a")  # reproduced: development reaches it
        assert internal.connections >= 1
        internal.connections = 0
        async with strict_api(settings) as strict:
            # A name passes the save-time check (no DNS at save time) ...
            answer = await patch_email(strict, "clinic-a", {"baseUrl": url, "apiKey": canary("k")})
            assert answer.status_code == 200, answer.text
            # ... and is refused once resolved, before any connection.
            assert refused(await config_test(strict, "clinic-a"))
        assert internal.connections == 0


async def test_redirect_is_not_followed(api: Api, settings: Settings, evil_dns: None) -> None:
    async with Counting() as target, Counting(status=302) as redirector:
        redirector.headers = f"Location: http://allowed.test:{target.port}{METADATA_PATH}\r\n"
        # `allowed.test` is on CLINICOMM_EGRESS_ALLOW (an operator's internal relay), so the
        # first hop is reached; the redirect (to an allowed host, even) is never followed.
        async with strict_api(settings, egress_allow="allowed.test") as strict:
            await create_clinic(
                strict, "clinic-r", sendgrid_settings(f"http://allowed.test:{redirector.port}/")
            )
            result = await config_test(strict, "clinic-r")
            assert result["ok"] is False
        assert redirector.connections >= 1
        assert target.connections == 0


async def test_smtp_port_scan_is_refused(api: Api, settings: Settings, evil_dns: None) -> None:
    banner = b"d\x00\x00\x00\n" + canary("mysql-banner").encode() + b"\n"
    connections = 0

    async def fake_mysql(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        writer.write(banner)
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.close()

    server = await asyncio.start_server(fake_mysql, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        # Reproduced in development: connects, and the banner is not in the answer any more.
        await create_clinic(api, "clinic-m", smtp_settings("127.0.0.1", port))
        result = await config_test(api, "clinic-m")
        assert connections >= 1 and result["ok"] is False
        assert "mysql-banner" not in str(result) and "Malformed" not in str(result)
        connections = 0
        async with strict_api(settings) as strict:
            assert refused(await config_test(strict, "clinic-m"))  # literal, saved earlier
            answer = await patch_email(strict, "clinic-m", {"host": "127.0.0.1", "password": canary("p")})
            assert answer.status_code == 422
            assert answer.json()["error"]["details"][0]["path"].endswith("credentials.host")
            answer = await patch_email(
                strict, "clinic-m", {"host": "db.evil.test", "port": port, "password": canary("p2")}
            )
            assert answer.status_code == 200, answer.text
            assert refused(await config_test(strict, "clinic-m"))  # a name → 127.0.0.1
        assert connections == 0
    finally:
        server.close()
        await server.wait_closed()


async def test_provider_error_body_is_never_echoed(api: Api) -> None:
    """A canary in a stub provider's error body: in no API answer and no log line (the
    session-end canary scan of tests/api/conftest.py checks every answer and log line too)."""
    secret = canary("provider-error-body")
    cases: list[tuple[int, bytes]] = [
        (400, b'{"not_documented": "' + secret.encode() + b'"}'),
        (500, b"<html><body>internal admin " + secret.encode() + b"</body></html>"),
        (401, b'{"errors": [{"message": "bad key for http://10.0.0.7/admin a@b.example"}], "x": "'
         + secret.encode() + b'"}'),
    ]
    for index, (status, body) in enumerate(cases):
        async with Counting(status=status, body=body) as stub:
            clinic = f"clinic-c{index}"
            await create_clinic(api, clinic, sendgrid_settings(f"http://127.0.0.1:{stub.port}/"))
            result = await config_test(api, clinic)
            assert result["ok"] is False
            assert secret not in str(result)
            await probe_runner(api.runtime).run_once()
            health = await api.client.get(f"{C}/{clinic}/communication/health", headers=api.admin)
            assert secret not in health.text
            detail = str(result["error"].get("detail"))
            assert len(detail) <= 200
            assert "10.0.0.7" not in detail and "a@b.example" not in detail
    assert not [line for line in RECORDED if secret in line]


async def test_delivery_to_a_refused_destination(api: Api, settings: Settings, evil_dns: None) -> None:
    """The worker's path: the delivery fails `configuration` "destination not allowed" (no
    fallback configured), its attempt says so, and the internal server sees no connection."""
    from clinicomm.delivery.worker import Worker, WorkerOptions

    async with Counting(status=202) as internal:
        await create_clinic(api, "clinic-d", sendgrid_settings(f"http://mail.evil.test:{internal.port}/"))
        async with strict_api(settings) as strict:
            send = {
                "category": "APPOINTMENT",
                "title": "t",
                "body": "b",
                "recipients": [{"email": "patient@example.com"}],
                "channels": ["email"],
                "metadata": {"clinicId": "clinic-d"},
            }
            accepted = await strict.client.post("/api/v1/communications", json=send, headers=strict.admin)
            assert accepted.status_code == 202, accepted.text
            message_id = accepted.json()["id"]
            stop = asyncio.Event()
            worker = Worker.for_runtime(strict.runtime, WorkerOptions(poll_seconds=0.05))
            task = asyncio.create_task(worker.run(stop))
            try:
                for _ in range(200):
                    status = await strict.client.get(f"/api/v1/communications/{message_id}", headers=strict.admin)
                    if status.json()["deliveries"][0]["status"] in ("failed", "sent"):
                        break
                    await asyncio.sleep(0.05)
            finally:
                stop.set()
                await task
            (delivery,) = status.json()["deliveries"]
            assert delivery["status"] == "failed", delivery
            assert "destination not allowed" in str(delivery["attempts"]), delivery
        assert internal.connections == 0
