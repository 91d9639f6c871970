"""Each alert rule fires once, is listed, reaches the webhook (a local CaptureServer) and
resolves when its condition clears."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import update

from clinicomm.observability.alerts import AlertConfig, AlertEngine
from clinicomm.providers.base import Channel
from clinicomm.routing.limits import clinic_channel_key
from clinicomm.store.models import Delivery, utcnow
from clinicomm.telemetry import metrics
from tests.monitoring.conftest import Mon, ProviderSink, email_request, email_settings, sendgrid
from tests.support.http_capture import CaptureServer


def engine(mon: Mon, hook: CaptureServer, **cfg: Any) -> AlertEngine:
    rt = mon.runtime
    return AlertEngine(
        rt.db, rt.config, rt.chains, rt.health, rt.limiter,
        http=rt.http, webhook_url=hook.url + "/alerts", settings=AlertConfig(**cfg),
    )


def events(hook: CaptureServer, rule: str) -> list[str]:
    return [r.json()["event"] for r in hook.requests if r.json()["alert"]["rule"] == rule]


async def fired_once(mon: Mon, eng: AlertEngine, hook: CaptureServer, rule: str) -> dict[str, Any]:
    """Evaluate twice: the alert fires on the first, not again on the second; listed."""
    first = [t for t in await eng.evaluate() if t.alert["rule"] == rule]
    assert [t.event for t in first] == ["alert_fired"], first
    again = [t for t in await eng.evaluate() if t.alert["rule"] == rule]
    assert again == []
    assert events(hook, rule) == ["alert_fired"]
    listed = (await mon.client.get("/api/v1/alerts?status=active", headers=mon.admin)).json()
    mine = [a for a in listed["items"] if a["rule"] == rule]
    assert len(mine) == 1 and mine[0]["status"] == "active"
    return mine[0]


async def resolved(mon: Mon, eng: AlertEngine, hook: CaptureServer, rule: str) -> None:
    done = [t for t in await eng.evaluate() if t.alert["rule"] == rule]
    assert [t.event for t in done] == ["alert_resolved"]
    assert [t for t in await eng.evaluate() if t.alert["rule"] == rule] == []
    assert events(hook, rule) == ["alert_fired", "alert_resolved"]
    listed = (await mon.client.get("/api/v1/alerts?status=resolved", headers=mon.admin)).json()
    assert [a["rule"] for a in listed["items"]].count(rule) == 1
    active = (await mon.client.get("/api/v1/alerts?status=active", headers=mon.admin)).json()
    assert rule not in [a["rule"] for a in active["items"]]


async def test_provider_down_and_degraded(make_mon: Any, log_records: Any) -> None:
    mon = await make_mon(health_min_samples=10, health_cool_down_seconds=0.3)
    async with ProviderSink() as bad, ProviderSink() as good, CaptureServer() as hook:
        await mon.create_clinic(
            "clinic-a", {"email": email_settings(sendgrid(bad, "a1"), sendgrid(good, "a2"))}
        )
        eng = engine(mon, hook)
        assert await eng.evaluate() == []
        bad.fail_every = 10
        await mon.send_and_wait(email_request("clinic-a"), 10)
        alert = await fired_once(mon, eng, hook, "provider_degraded")
        assert alert["clinicId"] == "clinic-a" and alert["provider"] == "clinic:sendgrid"
        clinic_view = mon.auth("ClinicManager", "clinic-a")
        mine = await mon.client.get("/api/v1/clinics/clinic-a/alerts", headers=clinic_view)
        assert [a["rule"] for a in mine.json()["items"]] == ["provider_degraded"]
        assert (await mon.client.get("/api/v1/alerts", headers=clinic_view)).status_code == 403

        bad.fail, bad.fail_every = True, 0
        await mon.send_and_wait(email_request("clinic-a"), 10)
        await fired_once(mon, eng, hook, "provider_down")
        # degraded cleared (the band is now down): resolved in the same evaluation round
        assert events(hook, "provider_degraded") == ["alert_fired", "alert_resolved"]

        bad.fail = False
        import asyncio

        await asyncio.sleep(0.35)
        await mon.send_and_wait(email_request("clinic-a"), 3)  # half-open probes close it
        await resolved(mon, eng, hook, "provider_down")
    fired = [r for r in log_records.records if getattr(r, "event", None) == "alert_fired"]
    assert fired and all(getattr(r, "alertId", None) for r in fired)


async def test_credential_expiry(make_mon: Any) -> None:
    mon = await make_mon()
    async with ProviderSink() as good, CaptureServer() as hook:
        soon = (utcnow() + timedelta(days=3)).isoformat()
        later = (utcnow() + timedelta(days=60)).isoformat()
        await mon.create_clinic(
            "clinic-e", {"email": email_settings(sendgrid(good, "e", expiresAt=soon))}
        )
        eng = engine(mon, hook)
        alert = await fired_once(mon, eng, hook, "credential_expiry")
        assert alert["clinicId"] == "clinic-e" and alert["details"]["expired"] is False
        await mon.replace("clinic-e", {"email": email_settings(sendgrid(good, "e2", expiresAt=later))})
        await resolved(mon, eng, hook, "credential_expiry")


async def test_rate_limit_high_and_exceeded(make_mon: Any) -> None:
    mon = await make_mon()
    async with ProviderSink() as good, CaptureServer() as hook:
        limited = {"enabled": True, "maxPerMinute": 10}
        await mon.create_clinic(
            "clinic-r", {"email": email_settings(sendgrid(good, "r"), rateLimit=limited)}
        )
        eng = engine(mon, hook)
        for _ in range(8):  # eight real sends take 80 % of the minute
            await mon.send_and_wait(email_request("clinic-r"))
        await fired_once(mon, eng, hook, "rate_limit_high")
        key = clinic_channel_key("clinic-r", Channel.EMAIL.value)
        for _ in range(2):
            assert await mon.runtime.limiter.acquire(key, [(10, 60.0)]) == 0.0
        await fired_once(mon, eng, hook, "rate_limit_exceeded")
        assert events(hook, "rate_limit_high") == ["alert_fired", "alert_resolved"]
        # The clinic raises its limit: it can send again.
        raised = {"enabled": True, "maxPerMinute": 1000}
        await mon.replace("clinic-r", {"email": email_settings(sendgrid(good, "r2"), rateLimit=raised)})
        await resolved(mon, eng, hook, "rate_limit_exceeded")


async def test_bounce_rate(make_mon: Any) -> None:
    mon = await make_mon()
    async with ProviderSink() as good, CaptureServer() as hook:
        await mon.create_clinic("clinic-b", {"email": email_settings(sendgrid(good, "b"))})
        await mon.send_and_wait(email_request("clinic-b"), 10)
        eng = engine(mon, hook, bounce_min_samples=10)
        assert [t for t in await eng.evaluate() if t.alert["rule"] == "bounce_rate"] == []
        async with mon.runtime.db.session() as session:  # as the bounce webhooks would
            ids = (await session.execute(Delivery.__table__.select().limit(2))).all()
            await session.execute(
                update(Delivery).where(Delivery.id.in_([r.id for r in ids])).values(status="bounced")
            )
        alert = await fired_once(mon, eng, hook, "bounce_rate")
        assert alert["details"] == {"bounced": 2, "total": 10, "rate": 0.2}
        eng.now = lambda: utcnow() + timedelta(days=2)  # the window has moved past them
        await resolved(mon, eng, hook, "bounce_rate")


async def test_cache_hit_rate_and_fetch_p95(make_mon: Any) -> None:
    mon = await make_mon()
    async with ProviderSink() as good, CaptureServer() as hook:
        await mon.create_clinic("clinic-c", {"email": email_settings(sendgrid(good, "c"))})
        eng = engine(mon, hook, cache_min_reads=20, fetch_min_samples=20)
        await eng.evaluate()  # baseline of this process's counters
        config = mon.runtime.config
        # Misses: a clinic whose cached entries are always older than its version floor, so
        # every read goes to the database (unknown clinics count nowhere since issue 13).
        await mon.create_clinic("clinic-miss", {"email": email_settings(sendgrid(good, "m"))})
        for _ in range(30):
            config.cache.drop("clinic-miss", version=10**9)
            await config.get_clinic_config("clinic-miss", Channel.EMAIL)
        # 30 synthetic slow fetches (an overloaded database would produce these)
        for _ in range(30):
            metrics.CONFIG_FETCH_LATENCY.labels("synthetic", "email").observe(0.5)
        await fired_once(mon, eng, hook, "cache_hit_rate")
        assert events(hook, "config_fetch_p95") == ["alert_fired"]
        for _ in range(600):  # cached reads: fast hits
            await config.get_clinic_config("clinic-c", Channel.EMAIL)
        await resolved(mon, eng, hook, "cache_hit_rate")
        assert events(hook, "config_fetch_p95") == ["alert_fired", "alert_resolved"]


class _Counts:
    """Stands in for one process's counters: the deltas it reports at each evaluation."""

    def __init__(self, hits: float, misses: float) -> None:
        self.values = {"hits": hits, "misses": misses}

    def delta(self, name: str, value: float) -> float:
        return self.values[name]


async def test_cache_hit_rate_is_judged_over_every_process(make_mon: Any) -> None:
    """Two processes: a struggling one (all misses) fires; a healthy one (a few hits) does
    not resolve it while the struggling one's counts are in the window; once they age out,
    it does (`alert_samples`)."""
    mon = await make_mon()
    async with CaptureServer() as hook:
        struggling = engine(mon, hook, cache_min_reads=20)
        healthy = engine(mon, hook, cache_min_reads=20)
        struggling._deltas = _Counts(hits=0, misses=100)  # type: ignore[assignment]
        healthy._deltas = _Counts(hits=30, misses=0)  # type: ignore[assignment]
        fired = [t for t in await struggling.evaluate() if t.alert["rule"] == "cache_hit_rate"]
        assert [t.event for t in fired] == ["alert_fired"]
        for _ in range(3):
            assert [t for t in await healthy.evaluate()
                    if t.alert["rule"] == "cache_hit_rate"] == []
        later = utcnow() + timedelta(minutes=10)
        healthy.now = lambda: later
        done = [t for t in await healthy.evaluate() if t.alert["rule"] == "cache_hit_rate"]
        assert [t.event for t in done] == ["alert_resolved"]
        assert events(hook, "cache_hit_rate") == ["alert_fired", "alert_resolved"]


async def test_webhook_failure_is_logged_not_raised(make_mon: Any, log_records: Any) -> None:
    mon = await make_mon()
    async with ProviderSink() as good, CaptureServer() as hook:
        hook.default.status = 500
        soon = (utcnow() + timedelta(days=1)).isoformat()
        await mon.create_clinic("clinic-w", {"email": email_settings(sendgrid(good, "w", expiresAt=soon))})
        transitions = await engine(mon, hook).evaluate()
        assert [t.event for t in transitions] == ["alert_fired"]
    assert any(getattr(r, "event", None) == "alert_webhook_failed" for r in log_records.records)
