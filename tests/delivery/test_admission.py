"""Admission's checks, one verdict each, without any server (in-process health and limiter,
settings models built in memory, facts given as the batch loader would return them)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from clinicomm.delivery import admission
from clinicomm.delivery.admission import (
    Admitted,
    Busy,
    Facts,
    Go,
    Guards,
    Refused,
    Skip,
    Suppressed,
    Wait,
)
from clinicomm.delivery.records import Claimed, Content
from clinicomm.providers.base import Channel, TemplateRef
from clinicomm.routing.chain import Hop
from clinicomm.routing.health import HealthConfig, InProcessHealth, Outcome
from clinicomm.routing.limits import InProcessLimiter
from clinicomm.settings.models import SmsSettings, WhatsAppSettings
from clinicomm.settings.service import ResolvedChannel

NOW = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
TEXT = Content(
    title=None,
    body="Your appointment is at 10:30.",
    html=None,
    template=None,
    category="APPOINTMENT",
)


def claimed(channel: str = "whatsapp", delivery_id: str = "d1") -> Claimed:
    return Claimed(delivery_id, "m1", "c1", channel, "+14155552671", 0, 0, 0, NOW, [], None)


def whatsapp(**settings: Any) -> ResolvedChannel:
    own = WhatsAppSettings.model_validate(settings)
    return ResolvedChannel("c1", Channel.WHATSAPP, 1, own, None)


def sms(**settings: Any) -> ResolvedChannel:
    own = SmsSettings.model_validate(settings)
    return ResolvedChannel("c1", Channel.SMS, 1, own, None)


def guards(clock: list[float] | None = None) -> Guards:
    t = clock if clock is not None else [1000.0]
    return Guards(
        InProcessHealth(HealthConfig(min_samples=2), clock=lambda: t[0]),
        InProcessLimiter(clock=lambda: t[0]),
        max_sender_wait=0.0,
    )


async def test_segment_cap_refuses_a_long_sms() -> None:
    long = Content(None, "x" * 161, None, None)
    verdict = await admission.admit(claimed("sms"), sms(maxSegments=1), long, Facts(), None, NOW)
    assert verdict == Refused("SMS body needs 2 GSM-7 segments; the clinic allows 1")


async def test_segment_cap_admits_what_fits() -> None:
    short = Content(None, "x" * 160, None, None)
    verdict = await admission.admit(claimed("sms"), sms(maxSegments=1), short, Facts(), None, NOW)
    assert verdict == Admitted(short)


async def test_suppressed_recipient() -> None:
    facts = Facts(suppressed={"d1"}, last_inbound={"d1": NOW})
    verdict = await admission.admit(claimed(), whatsapp(), TEXT, facts, None, NOW)
    assert verdict == Suppressed()


async def test_another_delivery_of_the_batch_is_not_suppressed() -> None:
    facts = Facts(suppressed={"d2"}, last_inbound={"d1": NOW - timedelta(hours=1)})
    verdict = await admission.admit(claimed(), whatsapp(), TEXT, facts, None, NOW)
    assert verdict == Admitted(TEXT)


@pytest.mark.parametrize(
    ("name", "last_inbound"),
    [("never_wrote", None), ("wrote_25_hours_ago", NOW - timedelta(hours=25))],
)
async def test_window_closed_without_template_is_refused_with_fallback_allowed(
    name: str, last_inbound: datetime | None
) -> None:
    facts = Facts(last_inbound={"d1": last_inbound} if last_inbound else {})
    verdict = await admission.admit(claimed(), whatsapp(), TEXT, facts, None, NOW)
    assert verdict == Refused("template required", fallback="template_required")


async def test_window_closed_with_a_mapped_template_converts_the_text() -> None:
    resolved = whatsapp(windowTemplates={"APPOINTMENT": {"name": "appt", "language": "es"}})
    verdict = await admission.admit(claimed(), resolved, TEXT, Facts(), None, NOW)
    assert isinstance(verdict, Admitted)
    assert verdict.content.template == TemplateRef("appt", "es", {"1": TEXT.body or ""})


async def test_window_open_sends_free_text() -> None:
    facts = Facts(last_inbound={"d1": NOW - timedelta(hours=23, minutes=59)})
    assert await admission.admit(claimed(), whatsapp(), TEXT, facts, None, NOW) == Admitted(TEXT)


async def test_templates_pass_a_closed_window() -> None:
    template = Content(None, None, None, TemplateRef("appt", "en", {}))
    assert await admission.admit(claimed(), whatsapp(), template, Facts(), None, NOW) == (
        Admitted(template)
    )


async def test_clinic_rate_limit_waits_then_fails_on_day_limit() -> None:
    g = guards()
    per_minute = sms(rateLimit={"enabled": True, "maxPerMinute": 1})
    first = await admission.admit(claimed("sms"), per_minute, TEXT, Facts(), g, NOW)
    assert first == Admitted(TEXT)
    second = await admission.admit(claimed("sms", "d2"), per_minute, TEXT, Facts(), g, NOW)
    assert isinstance(second, Wait) and second.reason == "waiting for the clinic's rate limit"
    assert NOW < second.at <= NOW + timedelta(seconds=60)

    daily = sms(rateLimit={"enabled": True, "maxPerDay": 1, "onDayLimit": "fail"})
    g2 = guards()
    assert await admission.admit(claimed("sms"), daily, TEXT, Facts(), g2, NOW) == Admitted(TEXT)
    assert await admission.admit(claimed("sms", "d2"), daily, TEXT, Facts(), g2, NOW) == Refused(
        "the clinic's daily limit is reached"
    )


async def test_checks_run_in_order_policy_first() -> None:
    long = Content(None, "x" * 161, None, None)
    facts = Facts(suppressed={"d1"})
    verdict = await admission.admit(claimed("sms"), sms(maxSegments=1), long, facts, None, NOW)
    assert isinstance(verdict, Refused)  # the segment cap answers before the suppression


class _Adapter:
    pass


def hop(scope: str = "clinic", throughput: tuple[str, int] | None = None) -> Hop:
    return Hop(
        f"{scope}:meta_business",
        scope,
        "meta_business",
        _Adapter(),
        0,  # type: ignore[arg-type]
        throughput=throughput,
    )


async def test_hop_circuit_open_skips_unless_last() -> None:
    g = guards()
    for _ in range(3):
        await g.health.record("c1", "clinic:meta_business", Outcome.FAILURE)
    assert await admission.hop(g, claimed(), hop(), last=False) == Skip()
    assert await admission.hop(g, claimed(), hop(), last=True) == Go()
    # A global hop's health is the platform's: the clinic's failures do not open it.
    assert await admission.hop(g, claimed(), hop("global"), last=False) == Go()


async def test_hop_sender_throughput_busy() -> None:
    g = guards()
    capped = hop(throughput=("1234", 1))
    assert await admission.hop(g, claimed(), capped, last=True) == Go()
    verdict = await admission.hop(g, claimed(), capped, last=True)
    assert isinstance(verdict, Busy) and verdict.seconds > 0


async def test_no_guards_no_hop_checks() -> None:
    assert await admission.hop(None, claimed(), hop(throughput=("1", 1)), last=False) == Go()


async def test_marketing_only_opt_out_stops_marketing_not_care_messages() -> None:
    """Meta's "Stop promotions" (`wa_marketing`): a MARKETING message is suppressed, an
    appointment reminder to the same patient still goes."""
    import dataclasses

    facts = Facts(marketing_stopped={"d1"}, last_inbound={"d1": NOW})
    promo = dataclasses.replace(TEXT, category="MARKETING")
    care = dataclasses.replace(TEXT, category="APPOINTMENT")
    assert isinstance(await admission.admit(claimed(), whatsapp(), promo, facts, None, NOW),
                      Suppressed)
    assert await admission.admit(claimed(), whatsapp(), care, facts, None, NOW) == Admitted(care)


class SlowFirstAnswer(InProcessLimiter):
    """Admits like the in-process limiter, but the first answer comes back late, as from a
    worker that stalled while the Redis call was in flight."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay
        self.asked = 0

    async def try_acquire(self, key_parts: Any, limits: Any) -> Any:
        self.asked += 1
        answer = self.admit(key_parts, limits)
        if self.asked == 1:
            await asyncio.sleep(self.delay)
        return answer


async def test_a_sender_slot_that_came_back_late_is_not_used() -> None:
    limiter = SlowFirstAnswer(delay=admission.FRESH_ADMISSION + 0.05)
    g = Guards(InProcessHealth(HealthConfig()), limiter, max_sender_wait=2.0)
    assert await admission.hop(g, claimed(), hop(throughput=("1234", 80)), last=True) == Go()
    # The late slot stayed counted; the call went out on a second, fresh one.
    assert limiter.asked == 2
    assert limiter.used((None, "sender", "meta_business", "1234"), [(80, 1.2)]) == 2 / 80


async def test_a_late_slot_past_the_sender_wait_requeues() -> None:
    limiter = SlowFirstAnswer(delay=admission.FRESH_ADMISSION + 0.05)
    g = Guards(InProcessHealth(HealthConfig()), limiter, max_sender_wait=0.0)
    verdict = await admission.hop(g, claimed(), hop(throughput=("1234", 80)), last=True)
    assert isinstance(verdict, Busy) and verdict.seconds > 0
    assert limiter.asked == 1
