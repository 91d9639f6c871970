"""Priority, expiry, scheduling and quiet hours, with the clock injected (never slept).

- `delivery.quiet`: held inside, released at the end (plus the spread), both DST transitions;
- `admission.admit`: a non-urgent SMS inside quiet hours waits, an urgent one passes, an
  expired one ends `expired`;
- `decision.after_call`: a retry never goes past the expiry; past it, no next hop or fallback;
- `messaging.timing`: the category → priority mapping, the clinic's overrides, the bounds;
- `outbox.claim`: urgent, then normal, then bulk; per-clinic fair order within a class; bulk's
  reserved share; rows not yet due (sendAt, quiet hours) are not claimed.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from clinicomm.delivery import admission, decision
from clinicomm.delivery.admission import Admitted, Expired, Facts, Wait
from clinicomm.delivery.outbox import claim, enqueue
from clinicomm.delivery.quiet import quiet_end, release_at, spread_offset
from clinicomm.delivery.records import Claimed, Content, DeliveryStatus, NewDelivery, Priority
from clinicomm.messaging.timing import TimingError, default_priority, resolve
from clinicomm.providers.base import Channel
from clinicomm.providers.errors import ProviderDownError, RecipientError, TransientError
from clinicomm.settings.models import MessagePolicy, QuietHours, SmsSettings
from clinicomm.settings.service import ResolvedChannel
from clinicomm.store.db import Database
from clinicomm.store.models import Message

NY = "America/New_York"
QUIET = QuietHours.model_validate({"start": "21:00", "end": "08:00", "timeZone": NY})
TEXT = Content(title=None, body="Flu shots this week.", html=None, template=None)


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


# ---- quiet hours -----------------------------------------------------------------------------
def test_inside_the_window_is_held_until_it_ends_and_outside_is_not() -> None:
    # 5 Jan 2026, New York is UTC-5: 21:00 local = 02:00Z next day, 08:00 local = 13:00Z.
    assert quiet_end(QUIET, utc(2026, 1, 6, 1, 59)) is None  # 20:59 local
    assert quiet_end(QUIET, utc(2026, 1, 6, 2, 0)) == utc(2026, 1, 6, 13, 0)  # 21:00 local
    assert quiet_end(QUIET, utc(2026, 1, 6, 8, 0)) == utc(2026, 1, 6, 13, 0)  # 03:00 local
    assert quiet_end(QUIET, utc(2026, 1, 6, 12, 59)) == utc(2026, 1, 6, 13, 0)  # 07:59
    assert quiet_end(QUIET, utc(2026, 1, 6, 13, 0)) is None  # 08:00: released
    assert quiet_end(QUIET, utc(2026, 1, 6, 18, 0)) is None  # 13:00


def test_a_window_within_one_day() -> None:
    lunch = QuietHours.model_validate({"start": "12:00", "end": "14:00", "timeZone": "UTC"})
    assert quiet_end(lunch, utc(2026, 1, 6, 11, 59)) is None
    assert quiet_end(lunch, utc(2026, 1, 6, 12, 0)) == utc(2026, 1, 6, 14, 0)
    assert quiet_end(lunch, utc(2026, 1, 6, 14, 0)) is None


def test_spring_forward_night_is_ten_hours_of_real_time() -> None:
    # 8 Mar 2026 02:00 EST → 03:00 EDT. 21:00 EST (7 Mar) = 02:00Z; 08:00 EDT (8 Mar) = 12:00Z.
    start = utc(2026, 3, 8, 2, 0)
    assert quiet_end(QUIET, start - timedelta(minutes=1)) is None
    end = quiet_end(QUIET, start)
    assert end == utc(2026, 3, 8, 12, 0)
    assert end is not None and end - start == timedelta(hours=10)
    assert quiet_end(QUIET, utc(2026, 3, 8, 7, 30)) == end  # 03:30 EDT, just after the gap
    assert quiet_end(QUIET, utc(2026, 3, 8, 12, 0)) is None  # 08:00 EDT


def test_fall_back_night_is_twelve_hours_of_real_time() -> None:
    # 1 Nov 2026 02:00 EDT → 01:00 EST. 21:00 EDT (31 Oct) = 01:00Z; 08:00 EST (1 Nov) = 13:00Z.
    start = utc(2026, 11, 1, 1, 0)
    assert quiet_end(QUIET, start - timedelta(minutes=1)) is None
    end = quiet_end(QUIET, start)
    assert end == utc(2026, 11, 1, 13, 0)
    assert end is not None and end - start == timedelta(hours=12)
    # 01:30 occurs twice that night; both are inside and end at the same instant.
    assert quiet_end(QUIET, utc(2026, 11, 1, 5, 30)) == end  # 01:30 EDT
    assert quiet_end(QUIET, utc(2026, 11, 1, 6, 30)) == end  # 01:30 EST
    assert quiet_end(QUIET, utc(2026, 11, 1, 12, 59)) == end  # 07:59 EST
    assert quiet_end(QUIET, utc(2026, 11, 1, 13, 0)) is None


def test_release_spreads_the_morning_stably() -> None:
    night = utc(2026, 1, 6, 4, 0)
    releases = [release_at(QUIET, night, f"d{i}") for i in range(500)]
    offsets = [r - utc(2026, 1, 6, 13, 0) for r in releases if r is not None]
    assert len(offsets) == 500
    assert all(timedelta(0) <= o < timedelta(minutes=30) for o in offsets)
    assert max(offsets) - min(offsets) > timedelta(minutes=25)  # really spread
    assert release_at(QUIET, night, "d7") == releases[7]  # stable for one delivery
    assert spread_offset(QUIET.model_copy(update={"spread_minutes": 0}), "d7") == timedelta(0)
    assert release_at(QUIET, utc(2026, 1, 6, 18, 0), "d7") is None
    assert release_at(None, night, "d7") is None


@pytest.mark.parametrize(
    ("doc", "path"),
    [
        ({"start": "21:00", "end": "08:00", "timeZone": "Mars/Olympus"}, "timeZone"),
        ({"start": "25:00", "end": "08:00", "timeZone": NY}, "start"),
        ({"start": "21:00", "end": "8", "timeZone": NY}, "end"),
        ({"start": "08:00", "end": "08:00", "timeZone": NY}, ""),
    ],
)
def test_bad_quiet_hours_are_refused(doc: dict[str, Any], path: str) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as info:
        QuietHours.model_validate(doc)
    locs = [".".join(str(p) for p in e["loc"]) for e in info.value.errors()]
    assert path in locs


# ---- admission -------------------------------------------------------------------------------
def sms_claimed(priority: Priority = Priority.BULK, **kw: Any) -> Claimed:
    return Claimed(
        id=kw.pop("id", "d1"),
        message_id="m1",
        clinic_id="c1",
        channel="sms",
        recipient="+14155552671",
        chain_position=0,
        provider_attempts=0,
        attempts=0,
        created_at=utc(2026, 1, 5, 12, 0),
        errors=[],
        parent_id=None,
        priority=priority.rank,
        **kw,
    )


def resolved_sms(quiet: QuietHours | None = QUIET) -> ResolvedChannel:
    own = SmsSettings.model_validate({"quietHours": quiet.model_dump(by_alias=True)} if quiet else {})
    return ResolvedChannel("c1", Channel.SMS, 1, own, None)


async def test_admission_holds_non_urgent_sms_inside_quiet_hours_and_lets_urgent_pass() -> None:
    night = utc(2026, 1, 6, 4, 0)  # 23:00 New York
    held = await admission.admit(sms_claimed(), resolved_sms(), TEXT, Facts(), None, night)
    assert isinstance(held, Wait)
    assert utc(2026, 1, 6, 13, 0) <= held.at < utc(2026, 1, 6, 13, 30)
    assert "quiet hours" in held.reason
    normal = await admission.admit(
        sms_claimed(Priority.NORMAL), resolved_sms(), TEXT, Facts(), None, night
    )
    assert isinstance(normal, Wait)
    urgent = await admission.admit(
        sms_claimed(Priority.URGENT), resolved_sms(), TEXT, Facts(), None, night
    )
    assert isinstance(urgent, Admitted)
    # At its release time the same delivery goes (the clock moved, nothing slept).
    released = await admission.admit(sms_claimed(), resolved_sms(), TEXT, Facts(), None, held.at)
    assert isinstance(released, Admitted)
    # No quiet hours configured: sent at night.
    plain = await admission.admit(sms_claimed(), resolved_sms(None), TEXT, Facts(), None, night)
    assert isinstance(plain, Admitted)


async def test_admission_expires_a_delivery_past_its_expiry_before_anything_else() -> None:
    at = utc(2026, 1, 5, 12, 10)
    claimed = sms_claimed(Priority.URGENT, expires_at=at)
    before = await admission.admit(claimed, resolved_sms(None), TEXT, Facts(), None, at - timedelta(seconds=1))
    assert isinstance(before, Admitted)
    after = await admission.admit(claimed, resolved_sms(None), TEXT, Facts(), None, at)
    assert isinstance(after, Expired)
    outcome = claimed.expired()
    assert outcome.status is DeliveryStatus.EXPIRED
    assert outcome.error is not None and "expired" in outcome.error["reason"]


# ---- decision --------------------------------------------------------------------------------
def position(expires_at: datetime | None, **kw: Any) -> decision.Position:
    base: dict[str, Any] = {
        "channel": Channel.WHATSAPP,
        "index": 0,
        "hops": 1,
        "provider_attempts": 0,
        "retry_attempts": 5,
        "deadline": utc(2026, 1, 5, 18, 0),
        "fallback": Channel.SMS,
        "expires_at": expires_at,
    }
    base.update(kw)
    return decision.Position(**base)


NOW = utc(2026, 1, 5, 12, 0)


def test_a_retry_is_clamped_to_the_expiry() -> None:
    expiry = NOW + timedelta(seconds=2)
    step = decision.after_call(
        position(expiry), decision.ProviderFacts(), TransientError("503", retry_after=5), NOW,
        lambda a, r: 5.0,
    )
    assert step == decision.Retry(expiry, "retrying")
    free = decision.after_call(
        position(None), decision.ProviderFacts(), TransientError("503", retry_after=5), NOW,
        lambda a, r: 5.0,
    )
    assert isinstance(free, decision.Retry) and free.at == NOW + timedelta(seconds=5)


def test_past_the_expiry_no_next_hop_no_retry_no_channel_fallback() -> None:
    expired = NOW - timedelta(milliseconds=1)
    facts = decision.ProviderFacts(unreachable_codes=frozenset({"131026"}))
    for error in (
        TransientError("503"),
        ProviderDownError("down"),
        RecipientError("not on WhatsApp", code="131026"),
    ):
        for hops in (1, 2):
            step = decision.after_call(position(expired, hops=hops), facts, error, NOW, lambda a, r: 0.1)
            assert step == decision.Expire(), (error, hops)
    # A plain recipient error still fails (the number is bad, whatever the time).
    bad = decision.after_call(position(expired), facts, RecipientError("bad number"), NOW, lambda a, r: 0.1)
    assert isinstance(bad, decision.Fail)
    # Before the expiry the channel fallback still happens (it carries the expiry).
    soon = NOW + timedelta(seconds=1)
    step = decision.after_call(position(soon), facts, ProviderDownError("down"), NOW, lambda a, r: 0.1)
    assert isinstance(step, decision.FallbackChannel)
    fallback = NewDelivery.fallback_of(
        sms_claimed(Priority.URGENT, expires_at=soon), Channel.WHATSAPP, NOW
    )
    assert fallback.expires_at == soon and fallback.priority == Priority.URGENT.rank


# ---- timing ----------------------------------------------------------------------------------
def test_priority_defaults_from_the_category_and_the_clinic_overrides_it() -> None:
    assert default_priority("OTP") is Priority.URGENT
    assert default_priority("auth") is Priority.URGENT
    assert default_priority("APPOINTMENT") is Priority.NORMAL
    assert default_priority("BILLING") is Priority.NORMAL
    assert default_priority("GENERAL") is Priority.NORMAL
    assert default_priority("MARKETING") is Priority.BULK
    assert default_priority("NEWSLETTER") is Priority.BULK
    assert default_priority("REMINDER") is Priority.BULK
    policy = MessagePolicy.model_validate({"priorities": {"appointment_reminder": "bulk"}})
    assert default_priority("APPOINTMENT_REMINDER", policy) is Priority.BULK


def when(**kw: Any) -> Any:
    args: dict[str, Any] = {
        "category": "GENERAL",
        "priority": None,
        "send_at": None,
        "expires_at": None,
        "ttl_seconds": None,
        "policy": None,
        "now": NOW,
    }
    args.update(kw)
    return resolve(**args)


def test_expiry_defaults_and_bounds() -> None:
    assert when(category="OTP").expires_at == NOW + timedelta(minutes=10)
    policy = MessagePolicy.model_validate({"ttlSeconds": {"OTP": 120}})
    assert when(category="OTP", policy=policy).expires_at == NOW + timedelta(minutes=2)
    assert when(category="GENERAL").expires_at is None
    assert when(ttl_seconds=2).expires_at == NOW + timedelta(seconds=2)
    later = NOW + timedelta(hours=1)
    assert when(send_at=later, ttl_seconds=60).expires_at == later + timedelta(seconds=60)
    assert when(send_at=later).send_at == later
    assert when(priority=Priority.BULK, category="OTP").priority is Priority.BULK


@pytest.mark.parametrize(
    ("kw", "path"),
    [
        ({"send_at": NOW - timedelta(minutes=1)}, "sendAt"),
        ({"send_at": NOW + timedelta(days=91)}, "sendAt"),
        ({"expires_at": NOW - timedelta(seconds=1)}, "expiresAt"),
        ({"expires_at": NOW + timedelta(minutes=1), "ttl_seconds": 5}, "ttlSeconds"),
        (
            {"send_at": NOW + timedelta(hours=2), "expires_at": NOW + timedelta(hours=1)},
            "expiresAt",
        ),
    ],
)
def test_bad_times_name_their_path(kw: dict[str, Any], path: str) -> None:
    with pytest.raises(TimingError) as info:
        when(**kw)
    assert [p.path for p in info.value.problems] == [path]


# ---- the claim -------------------------------------------------------------------------------
T0 = utc(2026, 1, 5, 9, 0)


async def put(
    db: Database,
    clinic: str,
    priority: Priority,
    fair_at: datetime,
    *,
    not_before: datetime | None = None,
) -> str:
    message_id = str(uuid.uuid4())
    delivery = NewDelivery(
        id=str(uuid.uuid4()),
        message_id=message_id,
        clinic_id=clinic,
        channel="email",
        recipient="x",
        status=DeliveryStatus.QUEUED,
        fair_at=fair_at,
        created_at=T0,
        priority=priority.rank,
        not_before=not_before,
    )
    async with db.session() as s:
        s.add(Message(id=message_id, clinic_id=clinic, category="GENERAL", content=b"x"))
        await s.flush()
        await enqueue(s, [delivery])
    return delivery.id


async def take(db: Database, limit: int, reserve: int = 0, now: datetime = T0) -> list[str]:
    async with db.session() as s:
        got = await claim(
            s, owner="w", limit=limit, now=now, lease=timedelta(seconds=60), bulk_reserve=reserve
        )
    return [c.id for c in got]


async def test_claims_take_urgent_then_normal_then_bulk_fair_within_a_class(db: Database) -> None:
    tag = uuid.uuid4().hex[:6]
    big, small = f"big-{tag}", f"small-{tag}"
    bulk = [await put(db, big, Priority.BULK, T0 - timedelta(hours=1) + timedelta(seconds=i)) for i in range(5)]
    normal_big = [await put(db, big, Priority.NORMAL, T0 + timedelta(seconds=i)) for i in range(3)]
    normal_small = await put(db, small, Priority.NORMAL, T0 + timedelta(milliseconds=500))
    urgent = await put(db, big, Priority.URGENT, T0)  # its clinic's bulk is older: no matter
    first = await take(db, 3)
    assert first == [urgent, normal_big[0], normal_small]  # fair order inside "normal"
    second = await take(db, 4)
    assert second[:2] == normal_big[1:] and second[2:] == bulk[:2]
    assert await take(db, 10) == bulk[2:]


async def test_bulk_keeps_its_reserved_share_and_yields_otherwise(db: Database) -> None:
    tag = uuid.uuid4().hex[:6]
    bulk = [await put(db, f"c-{tag}", Priority.BULK, T0 - timedelta(seconds=100 - i)) for i in range(3)]
    urgent = [await put(db, f"c-{tag}", Priority.URGENT, T0 + timedelta(seconds=i)) for i in range(10)]
    got = await take(db, 5, reserve=1)
    assert got.count(bulk[0]) == 1 and len(got) == 5
    assert [g for g in got if g != bulk[0]] == urgent[:4]
    assert await take(db, 5) == urgent[4:9]  # no reserve: urgent only
    rest = await take(db, 10, reserve=2)
    assert sorted(rest) == sorted([urgent[9], *bulk[1:]])


async def test_rows_not_yet_due_are_not_claimed(db: Database) -> None:
    tag = uuid.uuid4().hex[:6]
    later = T0 + timedelta(seconds=3)
    scheduled = await put(db, f"c-{tag}", Priority.URGENT, later, not_before=later)
    assert scheduled not in await take(db, 10)
    assert scheduled in await take(db, 10, now=later)
