"""Meta `token_expiry` (Graph API debug_token) against a stand-in on 127.0.0.1."""

from __future__ import annotations

import time

import aiohttp
import pytest

from clinicomm.providers.errors import ConfigurationError
from tests.monitoring.test_token_expiry import graph
from tests.providers.whatsapp.test_meta_business import adapter
from tests.support.http_capture import CaptureServer


async def test_adapter_reads_debug_token(http: aiohttp.ClientSession) -> None:
    soon = int(time.time()) + 3 * 86400
    async with CaptureServer() as server:
        server.handler = graph(soon)
        expires = await adapter(server, http).token_expiry()
        server.handler = graph(0)
        never = await adapter(server, http).token_expiry()
        server.handler = graph(0, valid=False)
        with pytest.raises(ConfigurationError):
            await adapter(server, http).token_expiry()
    assert expires is not None and int(expires.timestamp()) == soon
    assert never is None
    request = server.requests[0]
    assert request.path == "/v23.0/debug_token"
    assert request.headers["Authorization"].startswith("Bearer ")
