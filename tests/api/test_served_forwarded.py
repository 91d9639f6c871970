"""Through a real `clinicomm serve` (uvicorn): `X-Forwarded-Proto` from a local peer changes
nothing unless `CLINICOMM_TRUST_FORWARDED_HEADERS` says so. uvicorn's own proxy-header
handling (which trusts 127.0.0.1 by default) is off, so the webhook's signed URL is the one
the server was called at."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from clinicomm.config import Settings
from tests.api.conftest import Api
from tests.api.serve_proc import ServeProcess
from tests.api.test_webhooks import clinics, raw, sign_twilio

__all__ = ["clinics"]  # the fixture, imported for this module's tests


async def test_a_forwarded_scheme_is_ignored_unless_trusted(
    api: Api, settings: Settings, clinics: Any, tmp_path: Path
) -> None:
    body = raw("twilio", "status_delivered.form")
    for trusted, expected in (("false", 401), ("true", 200)):
        server = ServeProcess(
            settings,
            tmp_path / f"serve-{trusted}.log",
            {"CLINICOMM_TRUST_FORWARDED_HEADERS": trusted},
        )
        try:
            server.wait_ready()
            path = "/api/v1/webhooks/twilio/clinic-a"
            https = server.url.replace("http://", "https://") + path
            headers = {**sign_twilio(body, https, "a", clinics["a"]), "X-Forwarded-Proto": "https"}
            async with httpx.AsyncClient(base_url=server.url, timeout=20) as peer:
                answer = await peer.post(path, content=body, headers=headers)
            assert answer.status_code == expected, (trusted, answer.text, server.output()[-2000:])
        finally:
            server.stop()
