"""`GET /api/v1/clinics/{clinicId}/communication/health` after real sends: bands, circuit,
success rate, samples and the last connection test."""

from __future__ import annotations

import asyncio
from typing import Any

from clinicomm.observability.monitors import probe_runner
from tests.monitoring.conftest import ProviderSink, email_request, email_settings, sendgrid


def by_label(answer: dict[str, Any], channel: str = "email") -> dict[str, Any]:
    return {p["label"]: p for p in answer["channels"][channel]["providers"]}


async def test_health_bands_circuit_and_last_check(make_mon: Any) -> None:
    mon = await make_mon(health_min_samples=10, health_cool_down_seconds=0.5)
    async with ProviderSink() as bad, ProviderSink() as flaky, ProviderSink() as good:
        flaky.fail_every = 10  # 9 of 10 succeed: 90 %, degraded
        await mon.create_clinic(
            "clinic-h",
            {"email": email_settings(sendgrid(bad, "bad"), sendgrid(good, "good"))},
        )
        await mon.create_clinic(
            "clinic-d",
            {"email": email_settings(sendgrid(flaky, "flaky"), sendgrid(good, "good2"))},
        )
        bad.fail = True
        assert await mon.send_and_wait(email_request("clinic-h"), 10) == ["sent"] * 10
        assert await mon.send_and_wait(email_request("clinic-d"), 10) == ["sent"] * 10

        view = mon.auth("ClinicManager", "clinic-h")
        answer = await mon.client.get("/api/v1/clinics/clinic-h/communication/health", headers=view)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        items = by_label(body)
        assert items["clinic:sendgrid"]["status"] == "down"
        assert items["clinic:sendgrid"]["circuit"] == "open"
        assert items["clinic:sendgrid"]["successRate"] == 0.0
        assert items["clinic:sendgrid"]["samples"] == 10
        assert items["clinic:sendgrid#2"]["status"] == "healthy"
        assert items["clinic:sendgrid#2"]["successRate"] == 1.0
        assert items["clinic:sendgrid"]["lastCheck"] is None  # no probe round yet
        assert body["channels"]["whatsapp"]["providers"] == []

        deg = await mon.client.get("/api/v1/clinics/clinic-d/communication/health", headers=mon.admin)
        flaky_item = by_label(deg.json())["clinic:sendgrid"]
        assert flaky_item["status"] == "degraded"
        assert flaky_item["circuit"] == "closed"
        assert flaky_item["successRate"] == 0.9

        # The connection test records its result as "last check".
        results = await probe_runner(mon.runtime).run_once()
        assert {(r.clinic_id, r.label, r.ok) for r in results} >= {
            ("clinic-h", "clinic:sendgrid", False),
            ("clinic-h", "clinic:sendgrid#2", True),
        }
        items = by_label(
            (await mon.client.get("/api/v1/clinics/clinic-h/communication/health", headers=view)).json()
        )
        assert items["clinic:sendgrid"]["lastCheck"]["ok"] is False
        assert items["clinic:sendgrid#2"]["lastCheck"]["ok"] is True

        # After the cool-down, three good probe calls close the circuit again.
        bad.fail = False
        await asyncio.sleep(0.6)
        assert await mon.send_and_wait(email_request("clinic-h"), 3) == ["sent"] * 3
        items = by_label(
            (await mon.client.get("/api/v1/clinics/clinic-h/communication/health", headers=view)).json()
        )
        assert items["clinic:sendgrid"]["circuit"] == "closed"
        assert items["clinic:sendgrid"]["status"] == "healthy"


async def test_health_needs_view_and_a_known_clinic(make_mon: Any) -> None:
    mon = await make_mon()
    async with ProviderSink() as good:
        await mon.create_clinic("clinic-v", {"email": email_settings(sendgrid(good, "v"))})
        url = "/api/v1/clinics/clinic-v/communication/health"
        assert (await mon.client.get(url)).status_code == 401
        assert (await mon.client.get(url, headers=mon.auth("Doctor", "clinic-v"))).status_code == 403
        other = mon.auth("ClinicAdmin", "clinic-x")
        assert (await mon.client.get(url, headers=other)).status_code == 403
        missing = "/api/v1/clinics/nope/communication/health"
        assert (await mon.client.get(missing, headers=mon.admin)).status_code == 404
