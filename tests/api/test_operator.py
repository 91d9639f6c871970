"""Operator tools: the clinic list and deletion (crypto-shred), `clinicomm --version`,
`status`, `requeue`, the generated reference pages, HTTP metrics and probe access logs."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from sqlalchemy import func, select

from clinicomm.config import Settings
from clinicomm.crypto import CryptoError
from clinicomm.reference import providers_markdown, variables_markdown
from clinicomm.store.models import AuditEntry, ClinicKey, Delivery, Message
from tests.api.conftest import Api, create_clinic

ROOT = Path(__file__).parents[2]


def cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("CLINICOMM_")},
        "CLINICOMM_DATABASE_URL": settings.database_url,
        "CLINICOMM_MASTER_KEYS": settings.master_keys or "",
        "CLINICOMM_DATA_DIR": str(settings.data_dir),
        "CLINICOMM_LOG_LEVEL": "WARNING",
        "PYTHONPATH": str(ROOT / "src"),
    }
    return subprocess.run(
        [sys.executable, "-m", "clinicomm.cli", *args],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )


class Ran:
    def __init__(self, returncode: int, stdout: str, stderr: str) -> None:
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


async def cli_here(settings: Settings, *args: str) -> Ran:
    """The command in this process (in a thread: it runs its own event loop), for speed."""
    from typer.testing import CliRunner

    from clinicomm.cli import app

    env = {
        "CLINICOMM_DATABASE_URL": settings.database_url,
        "CLINICOMM_MASTER_KEYS": settings.master_keys or "",
        "CLINICOMM_DATA_DIR": str(settings.data_dir),
        "CLINICOMM_LOG_LEVEL": "WARNING",
    }
    result = await asyncio.to_thread(CliRunner().invoke, app, list(args), env=env)
    return Ran(result.exit_code, result.stdout, result.stderr)


async def test_list_clinics_is_paginated_and_super_admin_only(api: Api) -> None:
    for name in ("clinic-l1", "clinic-l2", "clinic-l3"):
        await create_clinic(api, name)
    page = await api.client.get("/api/v1/clinics?limit=2", headers=api.admin)
    assert page.status_code == 200, page.text
    body = page.json()
    assert [c["id"] for c in body["items"]] == ["clinic-l1", "clinic-l2"]
    assert "settings" not in body["items"][0]
    rest = await api.client.get(f"/api/v1/clinics?cursor={body['nextCursor']}", headers=api.admin)
    assert [c["id"] for c in rest.json()["items"]] == ["clinic-l3"]
    assert rest.json()["nextCursor"] is None
    denied = await api.client.get("/api/v1/clinics", headers=api.auth("ClinicAdmin", "clinic-l1"))
    assert denied.status_code == 403
    assert denied.json()["error"]["code"]


async def test_delete_clinic_shreds_its_keys_and_is_audited(api: Api) -> None:
    await create_clinic(api, "clinic-d")
    sent = await api.client.post(
        "/api/v1/communications", headers=api.admin,
        json={"body": "x", "recipients": [{"email": "p@example.com"}], "channels": ["email"],
              "metadata": {"clinicId": "clinic-d"}})
    assert sent.status_code == 202
    refused = await api.client.delete(
        "/api/v1/clinics/clinic-d", headers=api.auth("ClinicAdmin", "clinic-d"))
    assert refused.status_code == 403
    stale = await api.client.delete(
        "/api/v1/clinics/clinic-d", headers={**api.admin, "If-Match": '"99"'})
    assert stale.status_code == 412
    gone = await api.client.delete("/api/v1/clinics/clinic-d", headers=api.admin)
    assert gone.status_code == 204, gone.text
    assert (await api.client.get("/api/v1/clinics/clinic-d", headers=api.admin)).status_code == 404
    assert (await api.client.delete("/api/v1/clinics/clinic-d", headers=api.admin)).status_code == 404
    async with api.runtime.db.read() as session:
        keys = await session.scalar(
            select(func.count()).select_from(ClinicKey).where(ClinicKey.clinic_id == "clinic-d"))
        assert keys == 0
        entry = await session.scalar(select(AuditEntry).where(
            AuditEntry.clinic_id == "clinic-d", AuditEntry.action == "clinic.delete"))
        assert entry is not None and entry.actor == "root"
        delivery = await session.scalar(select(Delivery).where(Delivery.clinic_id == "clinic-d"))
        assert delivery is not None and delivery.status == "failed"
        message = await session.scalar(select(Message).where(Message.clinic_id == "clinic-d"))
        assert message is not None
    # The message content is unreadable now: no data key is left to decrypt it.
    api.runtime.keys.forget()
    with pytest.raises((KeyError, CryptoError)):
        await api.runtime.keys.cipher_for(api.runtime.db, "clinic-d")


async def test_requeue_and_status_commands(api: Api, settings: Settings) -> None:
    await create_clinic(api, "clinic-r")
    sent = await api.client.post(
        "/api/v1/communications", headers=api.admin,
        json={"body": "x", "recipients": [{"email": "p@example.com"}, {"email": "q@example.com"}],
              "channels": ["email"], "metadata": {"clinicId": "clinic-r"}})
    message_id = sent.json()["id"]
    failed_at = datetime(2026, 11, 30, 3, 0, tzinfo=UTC)
    async with api.runtime.db.session() as session:
        for row in (await session.scalars(select(Delivery).where(Delivery.message_id == message_id))).all():
            row.status, row.provider, row.updated_at = "failed", "clinic:smtp", failed_at
            row.error = {"reason": "every provider failed", "errors": []}
    window = ["--clinic", "clinic-r", "--status", "failed",
              "--since", "2026-11-30T02:00:00", "--until", "2026-11-30T04:00:00"]
    dry = await cli_here(settings, "requeue", *window, "--provider", "smtp", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "2 deliveries would be re-queued" in dry.stdout
    other = await cli_here(settings, "requeue", *window, "--provider", "sendgrid", "--dry-run")
    assert "0 deliveries" in other.stdout
    done = await cli_here(settings, "requeue", *window)
    assert done.returncode == 0, done.stderr
    assert "2 deliveries re-queued" in done.stdout
    again = await cli_here(settings, "requeue", *window)
    assert "0 deliveries re-queued" in again.stdout  # each is re-queued once
    async with api.runtime.db.read() as session:
        rows = (await session.scalars(select(Delivery).where(Delivery.message_id == message_id))).all()
        assert {(r.status, r.requeues) for r in rows} == {("queued", 1)}
        audits = (await session.scalars(select(AuditEntry).where(
            AuditEntry.action == "delivery.requeue"))).all()
        assert len(audits) == 1 and sorted(audits[0].diff["deliveries"]) == sorted(r.id for r in rows)
    status = await cli_here(settings, "status", message_id)
    assert status.returncode == 0, status.stderr
    assert '"status": "pending"' in status.stdout
    missing = await cli_here(settings, "status", "no-such-message")
    assert missing.returncode == 1 and "not found" in missing.stderr
    bad = await cli_here(settings, "requeue", "--clinic", "c", "--since", "yesterday", "--until", "today")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def test_version_and_generated_reference_pages_are_current(settings: Settings) -> None:
    from clinicomm import __version__

    version = cli(settings, "--version")
    assert version.returncode == 0 and version.stdout.strip() == f"clinicomm {__version__}"
    assert (ROOT / "docs/providers.md").read_text() == providers_markdown(), (
        "docs/providers.md is stale: run `clinicomm providers > docs/providers.md`")
    assert (ROOT / "docs/configuration.md").read_text() == variables_markdown(), (
        "docs/configuration.md is stale: run `clinicomm variables > docs/configuration.md`")
    from typer.testing import CliRunner

    from clinicomm.cli import app

    one = CliRunner().invoke(app, ["providers", "sendgrid"])
    assert one.exit_code == 0 and "`apiKey` | string | yes | yes" in one.stdout
    assert CliRunner().invoke(app, ["providers", "pigeon"]).exit_code == 2
    assert CliRunner().invoke(app, ["variables"]).stdout == variables_markdown()
    from clinicomm.config import Settings as S

    documented = variables_markdown()
    for name in S.model_fields:
        assert f"`CLINICOMM_{name.upper()}`" in documented


async def test_http_metrics_by_route_template_and_probes_logged_at_debug(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="clinicomm.api.access")
    await create_clinic(api, "clinic-h")
    assert (await api.client.get("/api/v1/clinics/clinic-h", headers=api.admin)).status_code == 200
    assert (await api.client.get("/healthz")).status_code == 200
    text = generate_latest().decode()
    assert 'route="/api/v1/clinics/{clinicId}"' in text
    assert "clinic-h" not in "".join(
        line for line in text.splitlines() if line.startswith("communication_http_"))
    probes = [r for r in caplog.records if getattr(r, "route", None) == "/healthz"]
    assert probes and all(r.levelno == logging.DEBUG for r in probes)
    api_lines = [r for r in caplog.records if getattr(r, "route", None) == "/api/v1/clinics/{clinicId}"]
    assert api_lines and api_lines[0].levelno == logging.INFO
