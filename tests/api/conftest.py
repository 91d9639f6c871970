"""Fixtures for the HTTP API: an in-process app on the test runtime, tokens, and the canary scan.

The canary scan: every response (status line, headers, body) of every API test and every log
line of the session (formatted by the production JSON formatter) is recorded; at the end of
the session none may contain a secret value that a test wrote (`tests.conftest.canary`).
`tests/api/test_zz_canary_scan.py` asserts the same as the last test of the package.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from clinicomm.api.app import create_app
from clinicomm.api.auth import Role, TokenVerifier
from clinicomm.config import Settings
from clinicomm.runtime import Runtime
from clinicomm.telemetry.logging import JsonFormatter
from tests.conftest import CANARIES, canary

#: Everything the API answered and everything logged, for the canary scan.
RECORDED: list[str] = []


class _Recorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(JsonFormatter())

    def emit(self, record: logging.LogRecord) -> None:
        try:
            RECORDED.append(self.format(record))
        except Exception:  # a formatting bug must fail loudly, not vanish
            RECORDED.append(f"UNFORMATTABLE {record.name}: {record.msg!r}")
            raise


def leaked() -> list[str]:
    """Recorded lines that contain any canary."""
    return [line for line in RECORDED if any(c in line for c in CANARIES)]


@pytest.fixture(scope="session", autouse=True)
def canary_scan() -> Iterator[None]:
    root = logging.getLogger()
    handler = _Recorder()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    noisy = logging.getLogger("aiosqlite")  # one line per cursor call; carries no values
    noisy_level = noisy.level
    noisy.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        noisy.setLevel(noisy_level)
    bad = leaked()
    assert not bad, f"{len(bad)} responses/log lines carry a secret, e.g. {bad[0][:300]}"


async def record_response(response: httpx.Response) -> None:
    await response.aread()
    RECORDED.append(
        f"{response.status_code} {dict(response.headers)} {response.text}"
    )


@dataclass
class Api:
    """The in-process app, its runtime and a client that records every answer."""

    client: httpx.AsyncClient
    runtime: Runtime
    settings: Settings
    verifier: TokenVerifier

    def token(
        self,
        role: Role | str,
        clinic: str | None = None,
        *,
        sub: str = "tester",
        ttl: int = 600,
        **extra: Any,
    ) -> str:
        return self.verifier.issue(Role(role), sub=sub, clinic_id=clinic, ttl=ttl, extra=extra)

    def auth(self, role: Role | str, clinic: str | None = None, **kw: Any) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(role, clinic, **kw)}"}

    @property
    def admin(self) -> dict[str, str]:
        return self.auth(Role.SUPER_ADMIN, sub="root")

    async def stored(self, clinic_id: str) -> Any:
        """The clinic as stored, secrets decrypted (the config service, not the API)."""
        async with self.runtime.db.sessions() as session:
            return await self.runtime.config.get_clinic(session, clinic_id)


def recording_client(app: Any, base_url: str = "http://api.test") -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url=base_url,
        event_hooks={"response": [record_response]},
    )


@pytest.fixture
async def api(runtime: Runtime, settings: Settings) -> AsyncIterator[Api]:
    app = create_app(settings, runtime)
    async with app.router.lifespan_context(app), recording_client(app) as client:
        yield Api(client, runtime, settings, app.state.verifier)


def clinic_settings(label: str = "a") -> dict[str, Any]:
    """Email (SMTP) and WhatsApp (Meta) settings with fresh canary secrets."""
    return {
        "communicationSettings": {
            "email": {
                "primary": {
                    "provider": "smtp",
                    "credentials": {
                        "host": "smtp.example.org",
                        "port": 587,
                        "user": "mailer",
                        "password": canary(f"smtp-{label}"),
                    },
                },
                "defaultFrom": f"{label}@clinic.example",
            },
            "whatsapp": {
                "primary": {
                    "provider": "meta_business",
                    "credentials": {
                        "apiUrl": "https://graph.facebook.com/v17.0",
                        "apiKey": canary(f"meta-{label}"),
                        "appSecret": canary(f"meta-app-{label}"),
                        "phoneNumberId": "123456789012345",
                        "businessAccountId": "987654321098765",
                    },
                }
            },
        }
    }


async def create_clinic(api: Api, clinic_id: str, settings: dict[str, Any] | None = None) -> Any:
    answer = await api.client.post(
        "/api/v1/clinics",
        json={
            "id": clinic_id,
            "name": clinic_id.title(),
            "settings": copy.deepcopy(settings) if settings is not None else clinic_settings(clinic_id),
        },
        headers=api.admin,
    )
    assert answer.status_code == 201, answer.text
    return answer.json()
