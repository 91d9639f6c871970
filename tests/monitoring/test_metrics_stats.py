"""A scrape of /metrics after a mixed run holds every seed metric with the right counts and
no address as a label value; `GET …/communication/stats` counts and percentiles."""

from __future__ import annotations

import re
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from clinicomm.messaging.models import SendRequest
from tests.conftest import canary
from tests.monitoring.conftest import ProviderSink, email_settings, sendgrid

SEED_METRICS = {
    "communication_email_sent_total": "counter",
    "communication_email_failed_total": "counter",
    "communication_email_latency": "histogram",
    "communication_whatsapp_sent_total": "counter",
    "communication_whatsapp_failed_total": "counter",
    "communication_whatsapp_latency": "histogram",
    "communication_sms_sent_total": "counter",
    "communication_sms_failed_total": "counter",
    "communication_sms_latency": "histogram",
    "communication_config_fetch_latency": "histogram",
    "communication_config_cache_hit_total": "counter",
    "communication_total_sent_total": "counter",
    "communication_total_failed_total": "counter",
    "communication_active_clinics": "gauge",
    "communication_providers_in_use": "gauge",
}
EMAIL_RE = re.compile(r"[^@\s]+@[^@\s]+\.[a-z]{2,}", re.I)
PHONE_RE = re.compile(r"^\+?\d{7,15}$")


def mixed_settings(sink: ProviderSink, bad: ProviderSink, label: str) -> dict[str, Any]:
    return {
        "email": email_settings(sendgrid(bad, f"{label}-bad"), sendgrid(sink, label)),
        "whatsapp": {
            "primary": {
                "provider": "meta_business",
                "credentials": {
                    "apiUrl": f"{sink.url}/v17.0",
                    "apiKey": canary(f"meta-{label}"),
                    "appSecret": canary(f"meta-app-{label}"),
                    "phoneNumberId": "123456789012345",
                    "businessAccountId": "987654321098765",
                },
            },
            "fallbackStrategy": {"retryAttempts": 0},
        },
        "sms": {
            "primary": {
                "provider": "twilio",
                "credentials": {
                    "accountSid": "AC" + "0" * 32,
                    "authToken": canary(f"tw-{label}"),
                    "fromNumber": "+14155550000",
                    "baseUrl": sink.url,
                },
            },
            "fallbackStrategy": {"retryAttempts": 0},
        },
    }


def requests(clinic_id: str, n: int) -> list[SendRequest]:
    """Email and SMS as text, WhatsApp as a template (outside the 24-hour window)."""
    recipient = {"email": f"patient{n}@example.com", "phone": f"+1415555{n:04d}"}
    base = {"title": "Appointment", "body": "Your appointment is confirmed."}
    return [
        SendRequest.model_validate(
            {
                **base,
                "recipients": [recipient],
                "channels": ["email", "sms"],
                "metadata": {"clinicId": clinic_id},
            }
        ),
        SendRequest.model_validate(
            {
                **base,
                "recipients": [recipient],
                "channels": ["whatsapp"],
                "template": {"name": "appointment_confirmation", "language": "en"},
                "metadata": {"clinicId": clinic_id},
            }
        ),
    ]


def samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    found: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            found.setdefault(s.name, []).append((dict(s.labels), s.value))
    return found


def value(found: dict[str, Any], name: str, **labels: str) -> float:
    return sum(v for lab, v in found.get(name, []) if all(lab.get(k) == x for k, x in labels.items()))


async def test_metrics_after_mixed_run_and_stats(make_mon: Any) -> None:
    mon = await make_mon()
    async with ProviderSink() as sink, ProviderSink() as bad:
        bad.fail = True  # every email first fails on the primary, then goes to the fallback
        await mon.create_clinic("clinic-m", mixed_settings(sink, bad, "m"))
        before = samples((await mon.client.get("/metrics")).text)
        for n in range(4):
            for one in requests("clinic-m", n):
                await mon.wait((await mon.runtime.messaging.accept(one)).id)
        sink.fail = True  # now WhatsApp and SMS fail too (no fallback): failed deliveries
        for one in requests("clinic-m", 9):
            await mon.wait((await mon.runtime.messaging.accept(one)).id)
        scrape = await mon.client.get("/metrics")
    assert scrape.status_code == 200
    after = samples(scrape.text)
    for name, kind in SEED_METRICS.items():
        probe = name + ("_count" if kind == "histogram" else "")
        assert probe in after, f"{name} missing from /metrics"

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    c = {"clinicId": "clinic-m"}
    assert delta("communication_email_sent_total", provider="sendgrid", **c) == 4
    assert delta("communication_email_failed_total", provider="sendgrid", errorType="transient", **c) == 6
    assert delta("communication_email_latency_count", **c) == 10
    assert delta("communication_whatsapp_sent_total", provider="meta_business", **c) == 4
    assert delta("communication_whatsapp_failed_total", provider="meta_business", **c) == 1
    assert delta("communication_whatsapp_latency_count", **c) == 5
    assert delta("communication_sms_sent_total", provider="twilio", **c) == 4
    assert delta("communication_sms_failed_total", provider="twilio", errorType="transient", **c) == 1
    assert delta("communication_sms_latency_count", **c) == 5
    assert delta("communication_total_sent_total", channel="email") == 4
    assert delta("communication_total_failed_total", channel="email") == 1
    assert delta("communication_total_failed_total", channel="sms") == 1
    assert value(after, "communication_config_cache_hit_total", clinicId="clinic-m") > 0
    assert value(after, "communication_config_fetch_latency_count", clinicId="clinic-m") > 0
    assert value(after, "communication_active_clinics") == 1
    assert value(after, "communication_providers_in_use", provider="sendgrid") == 2
    assert value(after, "communication_providers_in_use", provider="twilio") == 1
    for entries in after.values():
        for labels, _ in entries:
            for label_value in labels.values():
                assert not EMAIL_RE.search(label_value), label_value
                assert not PHONE_RE.match(label_value), label_value

    stats = await mon.client.get(
        "/api/v1/clinics/clinic-m/communication/stats", headers=mon.auth("ClinicManager", "clinic-m")
    )
    assert stats.status_code == 200, stats.text
    body = stats.json()
    assert body["total"] == 15
    assert body["byChannel"] == {
        "email": {"sent": 4, "failed": 1},
        "sms": {"sent": 4, "failed": 1},
        "whatsapp": {"sent": 4, "failed": 1},
    }
    counts = {(i["channel"], i["provider"], i["status"]): i["count"] for i in body["counts"]}
    assert counts[("email", "clinic:sendgrid#2", "sent")] == 4
    latency = {(i["channel"], i["provider"]): i for i in body["latency"]}
    assert latency[("email", "clinic:sendgrid")]["attempts"] == 5
    assert latency[("email", "clinic:sendgrid#2")]["attempts"] == 5
    item = latency[("sms", "clinic:twilio")]
    assert 0 <= item["p50Ms"] <= item["p90Ms"] <= item["p95Ms"] <= item["p99Ms"]
    empty = await mon.client.get(
        "/api/v1/clinics/clinic-m/communication/stats?from=2020-01-01T00:00:00Z&to=2020-01-02T00:00:00Z",
        headers=mon.admin,
    )
    assert empty.json()["total"] == 0 and empty.json()["latency"] == []
    assert (
        await mon.client.get(
            "/api/v1/clinics/clinic-m/communication/stats", headers=mon.auth("Doctor", "clinic-m")
        )
    ).status_code == 403
    swapped = await mon.client.get(
        "/api/v1/clinics/clinic-m/communication/stats?from=2021-01-02T00:00:00Z&to=2021-01-01T00:00:00Z",
        headers=mon.admin,
    )
    assert swapped.status_code == 422
