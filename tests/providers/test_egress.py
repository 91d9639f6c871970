"""The egress policy (`providers/egress.py`): address classes, allow lists, the save-time check,
and the connect-time contract with aiohttp and SMTP (no connection to a refused address)."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import aiohttp
import pytest

from clinicomm.providers.base import AdapterContext, Channel, OutboundMessage
from clinicomm.providers.egress import (
    NOT_ALLOWED,
    DestinationNotAllowedError,
    EgressPolicy,
    http_session,
    refused,
)
from clinicomm.providers.email.sendgrid import SendGridAdapter, SendGridCredentials
from clinicomm.providers.email.smtp import SmtpAdapter, SmtpCredentials
from clinicomm.providers.errors import ConfigurationError

STRICT = EgressPolicy.from_strings(allow_private=False)

REFUSED = [
    "127.0.0.1", "127.8.9.10", "10.0.0.1", "172.16.5.4", "192.168.1.1", "169.254.169.254",
    "100.64.0.1", "0.0.0.0", "224.0.0.1", "240.0.0.1", "255.255.255.255", "192.0.2.1",
    "::1", "::", "fe80::1", "fd00::1", "fc00::1", "ff02::1", "::ffff:127.0.0.1", "::ffff:169.254.169.254",
]
ALLOWED = ["8.8.8.8", "151.101.1.1", "2606:4700:4700::1111"]


@pytest.mark.parametrize("address", REFUSED)
def test_private_and_reserved_addresses_are_refused(address: str) -> None:
    assert not STRICT.address_allowed(address)
    assert EgressPolicy().address_allowed(address)  # development default: allowed


@pytest.mark.parametrize("address", ALLOWED)
def test_public_addresses_are_allowed(address: str) -> None:
    assert STRICT.address_allowed(address)


def test_allow_list_hosts_and_networks() -> None:
    policy = EgressPolicy.from_strings(
        allow_private=False, allow=["smtp.internal", "10.1.2.0/24", "192.168.7.7"]
    )
    assert policy.host_allowed("SMTP.internal.") and not policy.host_allowed("other.internal")
    assert policy.address_allowed("10.1.2.200") and not policy.address_allowed("10.1.3.1")
    assert policy.address_allowed("192.168.7.7") and not policy.address_allowed("192.168.7.8")
    assert policy.filter("smtp.internal", ["10.9.9.9"]) == ["10.9.9.9"]
    assert policy.filter("x.example", ["10.9.9.9", "8.8.8.8"]) == ["8.8.8.8"]
    with pytest.raises(ValueError, match="neither"):
        EgressPolicy.from_strings(allow_private=False, allow=["bad entry/"])


def test_save_time_check() -> None:
    prod = EgressPolicy.from_strings(allow_private=False, production=True)
    assert prod.check_endpoint("http://api.sendgrid.com", url=True) == "must be an https URL in production"
    assert prod.check_endpoint("https://api.sendgrid.com/v3", url=True) is None
    assert NOT_ALLOWED in str(prod.check_endpoint("https://169.254.169.254/latest", url=True))
    assert NOT_ALLOWED in str(prod.check_endpoint("https://[::1]:8443/", url=True))
    assert NOT_ALLOWED in str(prod.check_endpoint("https://localhost/", url=True))
    assert prod.check_endpoint("https://u:p@api.example.com/", url=True) == "must not carry credentials"
    assert prod.check_endpoint("ftp://api.example.com/", url=True) is not None
    assert NOT_ALLOWED in str(prod.check_endpoint("10.0.0.5", url=False))
    assert prod.check_endpoint("smtp.gmail.com", url=False) is None  # names: at connect time
    assert EgressPolicy().check_endpoint("http://127.0.0.1:8025", url=True) is None


class _Listener:
    """Counts TCP connections on 127.0.0.1."""

    def __init__(self) -> None:
        self.connections = 0

    async def __aenter__(self) -> _Listener:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            writer.write(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
            await writer.drain()
            writer.close()

        self.server = await asyncio.start_server(handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        await self.server.wait_closed()


class _Resolver(aiohttp.abc.AbstractResolver):
    """A resolver answering every name with 127.0.0.1 (a hostile DNS record)."""

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list[Any]:
        return [{"hostname": host, "host": "127.0.0.1", "port": port, "family": socket.AF_INET,
                 "proto": 0, "flags": 0}]

    async def close(self) -> None:
        return None


async def test_connector_refuses_literal_and_resolved_addresses() -> None:
    """The contract `EgressConnector` relies on: aiohttp connects only to what
    `_resolve_host` answers, for literal addresses and resolved names alike."""
    async with _Listener() as listener:
        async with http_session(STRICT, connector_args={"resolver": _Resolver()}) as session:
            for url in (f"http://127.0.0.1:{listener.port}/", f"http://internal.example:{listener.port}/"):
                with pytest.raises(aiohttp.ClientConnectorError) as caught:
                    async with session.get(url):
                        pass
                assert refused(caught.value)
        allowed = EgressPolicy.from_strings(allow_private=False, allow=["internal.example"])
        session = http_session(allowed, connector_args={"resolver": _Resolver()})
        async with session, session.get(f"http://internal.example:{listener.port}/") as answer:
            assert answer.status == 204
        assert listener.connections == 1


async def test_http_adapter_maps_refusal_to_configuration_error() -> None:
    async with _Listener() as listener:
        creds = SendGridCredentials.model_validate(
            {"apiKey": "SG.x", "fromEmail": "a@clinic.example", "baseUrl": f"http://127.0.0.1:{listener.port}"}
        )
        adapter = SendGridAdapter(creds, AdapterContext(egress=STRICT))
        message = OutboundMessage(Channel.EMAIL, "p@example.com", "d-1", subject="s", text="t")
        try:
            with pytest.raises(ConfigurationError, match=NOT_ALLOWED):
                await adapter.send(message)
            with pytest.raises(ConfigurationError, match=NOT_ALLOWED):
                await adapter.probe()
        finally:
            await adapter.close()
        assert listener.connections == 0


async def test_smtp_refusal_makes_no_connection() -> None:
    async with _Listener() as listener:
        creds = SmtpCredentials.model_validate({"host": "127.0.0.1", "port": listener.port, "requireTls": False})
        adapter = SmtpAdapter(creds, AdapterContext(egress=STRICT, timeout=2))
        try:
            with pytest.raises(ConfigurationError, match=NOT_ALLOWED):
                await adapter.probe()
        finally:
            await adapter.close()
        assert listener.connections == 0
        with pytest.raises(DestinationNotAllowedError):
            await STRICT.resolve("localhost", 25)


async def test_callbacks_use_the_same_policy() -> None:
    """`callbacks/targets.py` had its own destination check; it is now this policy."""
    from clinicomm.callbacks.targets import (
        DestinationRefusedError,
        check_destination,
        session_factory,
    )
    from clinicomm.providers.egress import EgressConnector

    for url in ("http://127.0.0.1:9000/hook", "https://169.254.169.254/", "https://[fd00::5]/"):
        with pytest.raises(DestinationRefusedError):
            check_destination(url, STRICT)
    check_destination("https://hooks.example.com/cb", STRICT)
    with pytest.raises(DestinationRefusedError, match="https"):
        check_destination("http://hooks.example.com/cb", EgressPolicy(production=True))
    session = session_factory(5.0, STRICT)
    try:
        assert isinstance(session.connector, EgressConnector) and session.connector.egress is STRICT
    finally:
        await session.close()


async def test_sessions_keep_no_cookies_between_requests() -> None:
    """One session carries every clinic's calls: a cookie set in answer to one request must
    not go out with the next one (another clinic's, to the same host). A host name, not an
    IP address: aiohttp's default jar already refuses cookies from IP addresses."""
    from aiohttp import web

    seen: list[str | None] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Cookie"))
        response = web.json_response({"ok": True})
        response.set_cookie("session", "clinic-a-secret", path="/")
        return response

    app = web.Application()
    app.router.add_post("/v1/send", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    session = http_session(EgressPolicy())
    try:
        for _ in range(2):
            async with session.post(f"http://localhost:{port}/v1/send", data=b"{}") as answer:
                assert answer.status == 200
                assert "session" in answer.cookies  # the host did set one
        assert seen == [None, None]
        assert len(session.cookie_jar) == 0
    finally:
        await session.close()
        await runner.cleanup()


def test_settings_defaults_and_bad_allow_entries() -> None:
    from pydantic import ValidationError

    from clinicomm.config import Settings
    from clinicomm.runtime import egress_policy

    assert Settings(env="development").egress_private_allowed
    assert not Settings(env="production").egress_private_allowed
    assert Settings(env="production", egress_allow_private=True).egress_private_allowed
    policy = egress_policy(Settings(env="production", egress_allow="relay.internal, 10.2.0.0/16"))
    assert not policy.allow_private and policy.production
    assert policy.host_allowed("relay.internal") and policy.address_allowed("10.2.3.4")
    with pytest.raises(ValidationError, match="neither a host nor a CIDR"):
        Settings(egress_allow="relay.internal,not a host")
