"""The answer to a PUT is sent only once every process sees the new config: a second, real
`clinicomm serve` process sharing PostgreSQL and Redis answers the new version right after, and
a third process reading through its config cache (L1, as the worker does) has dropped the old
version before the PUT's answer arrives. Both have the database poll at 30 s, so only the
invalidation the PUT waited for can explain it."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from clinicomm.config import Settings
from clinicomm.providers.base import MASK
from tests.api.conftest import RECORDED, Api, create_clinic
from tests.api.serve_proc import ServeProcess
from tests.settings.test_cross_process import start_peer


@pytest.mark.redis
async def test_put_is_visible_to_another_serve_process(
    api: Api, settings: Settings, tmp_path: Path
) -> None:
    await create_clinic(api, "clinic-x")
    server = ServeProcess(settings, tmp_path / "serve.log")
    peer_cache = await start_peer(settings.model_copy(update={"config_poll_seconds": 30.0}))
    try:
        server.wait_ready()
        assert (await peer_cache.read("clinic-x"))["version"] == 1  # now in its L1
        assert (await peer_cache.read("clinic-x"))["version"] == 1
        headers = api.admin
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as peer:
            first = await peer.get("/api/v1/clinics/clinic-x", headers=headers)
            assert first.status_code == 200 and first.headers["etag"] == '"1"'
            body = first.json()
            body["settings"]["communicationSettings"]["email"]["defaultFrom"] = "two@clinic.example"
            put = await api.client.put(
                "/api/v1/clinics/clinic-x",
                json={"settings": body["settings"]},
                headers={**headers, "If-Match": first.headers["etag"]},
            )
            assert put.status_code == 200 and put.headers["etag"] == '"2"'
            assert (await peer_cache.read("clinic-x"))["version"] == 2
            # Immediately, with the database poll at 30 s: only the acked invalidation helps.
            after = await peer.get("/api/v1/clinics/clinic-x", headers=headers)
            assert after.headers["etag"] == '"2"'
            email = after.json()["settings"]["communicationSettings"]["email"]
            assert email["defaultFrom"] == "two@clinic.example"
            assert email["primary"]["credentials"]["password"] == MASK
            RECORDED.extend([first.text, after.text])
    finally:
        assert peer_cache.proc.stdin
        peer_cache.proc.stdin.close()
        await peer_cache.proc.wait()
        server.stop()
        RECORDED.extend(server.output().splitlines())
    lines = [json.loads(line) for line in server.output().splitlines() if line.startswith("{")]
    access = [e for e in lines if e.get("event") == "http_request"]
    assert access and all(e["requestId"] for e in access)
