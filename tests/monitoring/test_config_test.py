"""`POST /api/v1/clinics/{clinicId}/communication/test` and `clinicomm test-config`."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from sqlalchemy import select

from clinicomm.store.models import AuditEntry
from tests.delivery.test_workers import ROOT, worker_env
from tests.monitoring.conftest import Mon, ProviderSink, email_settings, sendgrid

URL = "/api/v1/clinics/clinic-t/communication/test"


async def audit_rows(mon: Mon) -> list[AuditEntry]:
    async with mon.runtime.db.read() as session:
        query = select(AuditEntry).where(AuditEntry.action == "communication.test")
        return list((await session.execute(query.order_by(AuditEntry.id))).scalars())


async def test_success_failure_permissions_and_audit(make_mon: Any) -> None:
    mon = await make_mon()
    async with ProviderSink() as primary, ProviderSink() as fallback, ProviderSink() as globe:
        await mon.create_clinic(
            "clinic-t", {"email": email_settings(sendgrid(primary, "p"), sendgrid(fallback, "f"))}
        )
        admin = mon.auth("ClinicAdmin", "clinic-t")
        body = {"channel": "email", "to": "someone@example.com"}

        ok = await mon.client.post(URL, json=body, headers=admin)
        assert ok.status_code == 200, ok.text
        answer = ok.json()
        assert answer["ok"] is True and answer["provider"] == "sendgrid"
        assert answer["providerMessageId"] == "sg-1" and answer["latencyMs"] >= 0
        assert primary.sends == 1 and fallback.sends == 0

        primary.fail = True  # primary fails, the fallback takes it
        answer = (await mon.client.post(URL, json=body, headers=admin)).json()
        assert answer["ok"] is True
        assert [t["ok"] for t in answer["tried"]] == [False, True]

        fallback.fail = True  # every own provider fails: each reason reported
        failed = await mon.client.post(URL, json=body, headers=admin)
        answer = failed.json()
        assert failed.status_code == 200 and answer["ok"] is False
        assert answer["provider"] == "sendgrid"
        assert [e["class"] for e in answer["error"]["errors"]] == ["transient", "transient"]
        assert all(e["statusCode"] == 500 for e in answer["error"]["errors"])
        assert globe.sends == 0  # never the global provider

        for role in ("ClinicManager", "Doctor", "Patient", "Service"):
            denied = await mon.client.post(URL, json=body, headers=mon.auth(role, "clinic-t"))
            assert denied.status_code == 403, role
        other = await mon.client.post(URL, json=body, headers=mon.auth("ClinicAdmin", "clinic-x"))
        assert other.status_code == 403
        bad = await mon.client.post(
            URL, json={"channel": "email", "to": "not-an-address"}, headers=admin
        )
        assert bad.status_code == 422
        no_sms = await mon.client.post(URL, json={"channel": "sms", "to": "+14155552671"}, headers=admin)
        assert no_sms.status_code == 422  # no own SMS provider: the global one is never tested
        missing = "/api/v1/clinics/nope/communication/test"
        assert (await mon.client.post(missing, json=body, headers=mon.admin)).status_code == 404

        rows = await audit_rows(mon)
        assert [r.diff["ok"] for r in rows] == [True, True, False]
        assert all(r.diff["channel"] == "email" and r.actor == "tester" for r in rows)
        assert all("someone" not in json.dumps(r.diff) for r in rows)
        listed = await mon.client.get("/api/v1/clinics/clinic-t/audit", headers=admin)
        assert [e["action"] for e in listed.json()["items"]][:3] == ["communication.test"] * 3


async def run_cli(mon: Mon, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "clinicomm.cli", "test-config", *args,
        env=worker_env(mon.settings), cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_cli(make_mon: Any) -> None:
    mon = await make_mon()
    async with ProviderSink() as primary:
        await mon.create_clinic("clinic-t", {"email": email_settings(sendgrid(primary, "c"))})
        code, out, _ = await run_cli(mon, "--help")
        assert code == 0 and "CLINIC" in out.upper()
        code, out, err = await run_cli(mon, "clinic-t", "fax", "x@example.com")
        assert code == 2 and "unknown channel" in err and len(err.strip().splitlines()) == 1
        code, _, err = await run_cli(mon, "clinic-t", "email")
        assert code == 2
        code, _, err = await run_cli(mon, "clinic-t", "email", "not-an-address")
        assert code == 2 and "valid email" in err
        code, out, _ = await run_cli(mon, "clinic-t", "email", "someone@example.com")
        assert code == 0 and json.loads(out)["ok"] is True
        primary.fail = True
        code, out, _ = await run_cli(mon, "clinic-t", "email", "someone@example.com")
        assert code == 1 and json.loads(out)["error"]["class"] == "transient"
        rows = await audit_rows(mon)
        assert [(r.actor, r.diff["ok"]) for r in rows] == [("cli", True), ("cli", False)]
