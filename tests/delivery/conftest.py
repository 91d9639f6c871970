"""Fixtures for delivery tests: in-process clients (runtime + worker) on the test database."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from clinicomm import Client
from clinicomm.config import Settings
from tests.support.pipeline import fast


@pytest.fixture
async def make_client(settings: Settings) -> AsyncIterator[Callable[..., Any]]:
    clients: list[Client] = []

    async def factory(env: dict[str, str] | None = None, **extra: Any) -> Client:
        client = Client(fast(settings, **extra), env=env or {})
        await client.start()
        clients.append(client)
        return client

    yield factory
    for client in clients:
        await client.close()
