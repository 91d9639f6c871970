"""Health, readiness, 503 when the database is down, request ids in logs, lifespan migration."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from clinicomm.api.app import create_app
from clinicomm.api.auth import Role
from clinicomm.config import Settings
from clinicomm.runtime import Runtime
from clinicomm.telemetry.logging import JsonFormatter
from tests.api.conftest import Api, create_clinic, recording_client
from tests.conftest import BACKEND, MASTER_KEYS


async def test_health_ready_docs(api: Api) -> None:
    assert (await api.client.get("/healthz")).json() == {"status": "ok", "checks": {}}
    ready = await api.client.get("/readyz")
    assert ready.status_code == 200
    expected = {"database": "ok", **({"redis": "ok"} if api.runtime.redis else {})}
    assert ready.json() == {"status": "ok", "checks": expected}
    spec = (await api.client.get("/openapi.json")).json()
    assert "/api/v1/clinics/{clinicId}" in spec["paths"]
    assert "CommunicationSettings" in spec["components"]["schemas"]
    assert (await api.client.get("/docs")).status_code == 200
    assert "# HELP" in (await api.client.get("/metrics")).text


def _down_settings(tmp_path: Path) -> Settings:
    return Settings(
        database_url=f"sqlite+aiosqlite:///{tmp_path}/missing-dir/x/../nope/clinicomm.db",
        master_keys=MASTER_KEYS,
        jwt_secret="test-jwt-secret-" + "x" * 32,
        env="test",
        data_dir=tmp_path / ".clinicomm",
        config_poll_seconds=30,
    )


async def test_database_down_is_503(tmp_path: Path) -> None:
    settings = _down_settings(tmp_path)
    runtime = await Runtime.create(settings, env={})
    app = create_app(settings, runtime)
    try:
        async with app.router.lifespan_context(app), recording_client(app) as client:
            token = app.state.verifier.issue(Role.SUPER_ADMIN)
            headers = {"Authorization": f"Bearer {token}"}
            answer = await client.get("/api/v1/clinics/clinic-a", headers=headers)
            assert answer.status_code == 503, answer.text
            assert answer.json()["error"]["code"] == "unavailable"
            created = await client.post(
                "/api/v1/clinics", json={"id": "x", "name": "X"}, headers=headers
            )
            assert created.status_code == 503
            ready = await client.get("/readyz")
            assert ready.status_code == 503
            assert ready.json()["error"]["details"] == [{"component": "database", "status": "down"}]
            assert (await client.get("/healthz")).status_code == 200
    finally:
        await runtime.close()


@pytest.mark.skipif(BACKEND != "sqlite", reason="the embedded default: an empty SQLite file")
async def test_lifespan_builds_runtime_and_migrates_empty_sqlite(tmp_path: Path) -> None:
    settings = Settings(
        database_url=f"sqlite+aiosqlite:///{tmp_path}/fresh/clinicomm.db",
        master_keys=MASTER_KEYS,
        jwt_secret="test-jwt-secret-" + "x" * 32,
        env="test",
        data_dir=tmp_path / ".clinicomm",
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app), recording_client(app) as client:
        token = app.state.verifier.issue(Role.SUPER_ADMIN)
        answer = await client.post(
            "/api/v1/clinics",
            json={"id": "first", "name": "First"},
            headers={"Authorization": f"Bearer {token}"},
        )
        assert answer.status_code == 201, answer.text
    assert (tmp_path / "fresh" / "clinicomm.db").exists()


async def test_request_id_on_every_line_of_a_request(api: Api) -> None:
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    handler = Collect()
    handler.setFormatter(JsonFormatter())
    logging.getLogger().addHandler(handler)
    try:
        await create_clinic(api, "clinic-a")
        lines.clear()
        answer = await api.client.patch(
            "/api/v1/clinics/clinic-a",
            json={"name": "Renamed"},
            headers={**api.admin, "X-Request-ID": "trace-42"},
        )
        generated = await api.client.get("/healthz")
    finally:
        logging.getLogger().removeHandler(handler)
    assert answer.headers["x-request-id"] == "trace-42"
    assert len(generated.headers["x-request-id"]) == 32
    mine = [json.loads(line) for line in lines if "trace-42" in line]
    events = {entry["event"] for entry in mine}
    assert {"settings.patch", "http_request"} <= events
    for entry in mine:
        assert entry["requestId"] == "trace-42"
        assert {"time", "level", "logger", "message", "event"} <= set(entry)
    access = next(e for e in mine if e["event"] == "http_request")
    assert access["clinicId"] == "clinic-a" and access["sub"] == "root" and access["status"] == 200
    # A request id that is not plain is replaced, not echoed.
    odd = await api.client.get("/healthz", headers={"X-Request-ID": "x" * 200})
    assert odd.headers["x-request-id"] != "x" * 200
