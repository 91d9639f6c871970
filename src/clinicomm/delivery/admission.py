"""Admission: every check made before a provider is called. Each returns a typed verdict.

Per delivery, in this order (`admit`):

0. **expiry**: past the message's `expiresAt` → `Expired` (no provider call, no fallback);
1. **policy** (`segment_cap`): the clinic caps SMS segments (`sms.maxSegments`) and the body
   needs more → `Refused`;
2. **suppression** (`Facts.suppressed`): the clinic must not send to this address on this
   channel (STOP, manual opt-out, hard bounce, complaint, a provider's opt-out code) →
   `Suppressed` (no provider call, nothing falls back: PROVIDER-FACTS §8 items 17-19). Checked
   at claim time, so a STOP that arrives while the message is queued still stops it;
3. **WhatsApp window** (`window`): free text outside the 24-hour window (or to a patient who
   never wrote) is sent as the clinic's `whatsapp.windowTemplates[category]` with the text as
   body parameter `{{1}}`, or → `Refused("template required", fallback=…)`;
4. **quiet hours** (`quiet_hours`): a non-urgent SMS or WhatsApp delivery inside the
   channel's `quietHours` → `Wait` until they end (plus its spread offset, `delivery.quiet`);
   urgent messages pass;
5. **clinic rate limit** (`clinic_rate`): the clinic's own `rateLimit` for the channel, shared
   by every process: over the minute or hour limit → `Wait`; over the day limit → `Wait` or
   `Refused`, as the clinic set `onDayLimit`.

Then per hop, right before its call (`hop`): **circuit** (open and a later hop can take the
delivery → `Skip`) and **sender throughput** (a WhatsApp number's `maxPerSecond`: a short
wait is slept through, a longer one → `Busy`).

The database facts (suppressions, last inbound messages) are read for a whole claimed batch
in one read (`load`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from clinicomm.delivery.quiet import release_at
from clinicomm.delivery.records import Claimed, Content
from clinicomm.delivery.suppressions import (
    MARKETING_CATEGORIES,
    MARKETING_SCOPE,
    suppressed_in,
)
from clinicomm.delivery.window import is_open, last_inbound_among
from clinicomm.providers.base import Channel, TemplateRef
from clinicomm.providers.phone import sms_segments
from clinicomm.routing.chain import Hop
from clinicomm.routing.health import HealthTracker
from clinicomm.routing.limits import (
    FRESH_ADMISSION,
    RateLimiter,
    clinic_channel_key,
    clinic_channel_limits,
    sender_key,
    sender_limits,
)
from clinicomm.settings.models import SmsSettings, WhatsAppSettings
from clinicomm.settings.service import ResolvedChannel
from clinicomm.store.db import Database
from clinicomm.telemetry import metrics

TEMPLATE_REQUIRED = "template required"


# ---- verdicts --------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Admitted:
    """Go on to the providers with `content` (possibly converted to a window template)."""

    content: Content


@dataclass(frozen=True, slots=True)
class Refused:
    """The delivery ends `failed` with `reason`, before any provider call. `fallback`: the
    reason allows the clinic's channel fallback (a `decision.FALLBACK_*` code)."""

    reason: str
    fallback: str | None = None


@dataclass(frozen=True, slots=True)
class Suppressed:
    """The recipient opted out of this channel: the delivery ends `suppressed`."""


@dataclass(frozen=True, slots=True)
class Wait:
    """Not now: back to the queue until `at`."""

    at: datetime
    reason: str


@dataclass(frozen=True, slots=True)
class Expired:
    """The message's expiry has passed: the delivery ends `expired`, no provider call."""


Verdict = Admitted | Refused | Suppressed | Wait | Expired


@dataclass(frozen=True, slots=True)
class Go:
    """Call this hop."""


@dataclass(frozen=True, slots=True)
class Skip:
    """The hop's circuit is open and a later hop can take the delivery."""


@dataclass(frozen=True, slots=True)
class Busy:
    """The hop's sender is at its throughput cap for longer than we may wait."""

    seconds: float


HopVerdict = Go | Skip | Busy


# ---- the facts of one batch ------------------------------------------------------------------
@dataclass(slots=True)
class Facts:
    """The database facts loaded for one claimed batch."""

    #: Delivery ids whose (clinic, channel, address) is suppressed.
    suppressed: set[str] = field(default_factory=set)
    #: WhatsApp delivery ids whose patient stopped marketing messages only (Meta's
    #: "Stop promotions"): suppressed when the message's category is a marketing one.
    marketing_stopped: set[str] = field(default_factory=set)
    #: Delivery id → the patient's last inbound WhatsApp message (absent: never wrote).
    last_inbound: dict[str, datetime] = field(default_factory=dict)


async def load(db: Database, batch: list[Claimed]) -> Facts:
    """Suppressions and window facts for every delivery of `batch` (two queries at most)."""
    facts = Facts()
    scoped = [c for c in batch if c.clinic_id is not None]
    if not scoped:
        return facts
    wa = [c for c in scoped if c.channel == Channel.WHATSAPP.value]
    hit = await suppressed_in(
        db,
        [(c.clinic_id or "", c.channel, c.lookup_key) for c in scoped]
        + [(c.clinic_id or "", MARKETING_SCOPE, c.lookup_key) for c in wa],
    )
    facts.suppressed = {
        c.id for c in scoped if (c.clinic_id or "", c.channel, c.lookup_key) in hit
    }
    facts.marketing_stopped = {
        c.id for c in wa if (c.clinic_id or "", MARKETING_SCOPE, c.lookup_key) in hit
    }
    if wa:
        async with db.read() as session:
            keys = [(c.clinic_id or "", c.lookup_key) for c in wa]
            last = await last_inbound_among(session, keys)
            for c in wa:
                at = last.get((c.clinic_id or "", c.lookup_key))
                if at is not None:
                    facts.last_inbound[c.id] = at
    return facts


# ---- the checks ------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Guards:
    """Shared health (circuits) and rate limiters consulted before provider calls."""

    health: HealthTracker
    limiter: RateLimiter
    #: A sender throughput wait up to this long is slept through; longer ones requeue.
    max_sender_wait: float = 2.0


def segment_cap(resolved: ResolvedChannel, content: Content) -> Refused | None:
    """The clinic caps SMS segments (`sms.maxSegments`) and the body needs more."""
    settings = resolved.effective
    if resolved.channel is not Channel.SMS or not isinstance(settings, SmsSettings):
        return None
    if settings.max_segments is None or content.body is None:
        return None
    encoding, segments = sms_segments(content.body)
    if segments > settings.max_segments:
        return Refused(
            f"SMS body needs {segments} {encoding} segments; "
            f"the clinic allows {settings.max_segments}"
        )
    return None


def window(
    resolved: ResolvedChannel, content: Content, last_inbound: datetime | None, now: datetime
) -> Admitted | Refused:
    """The content to send on WhatsApp given the 24-hour window (PROVIDER-FACTS §1.2, §8
    item 10); templates are always allowed."""
    if resolved.channel is not Channel.WHATSAPP or content.template is not None:
        return Admitted(content)
    if is_open(last_inbound, now):
        return Admitted(content)
    settings = resolved.effective
    mapped = (
        settings.window_templates.get(content.category or "GENERAL")
        if isinstance(settings, WhatsAppSettings)
        else None
    )
    if mapped is None or not content.body:
        return Refused(TEMPLATE_REQUIRED, fallback="template_required")
    return Admitted(
        dataclasses.replace(
            content,
            template=TemplateRef(
                name=mapped.name, language=mapped.language, variables={"1": content.body}
            ),
        )
    )


def quiet_hours(resolved: ResolvedChannel, claimed: Claimed, now: datetime) -> Wait | None:
    """Hold a non-urgent SMS or WhatsApp delivery inside the channel's quiet hours."""
    if claimed.urgent or resolved.channel not in (Channel.SMS, Channel.WHATSAPP):
        return None
    quiet = getattr(resolved.effective, "quiet_hours", None)
    until = release_at(quiet, now, claimed.id)
    if until is None or quiet is None:
        return None
    return Wait(until, f"held for quiet hours ({quiet.start}-{quiet.end} {quiet.time_zone})")


async def clinic_rate(
    guards: Guards | None, claimed: Claimed, resolved: ResolvedChannel, now: datetime
) -> Wait | Refused | None:
    """The clinic's own `rateLimit` for the channel (None: within it)."""
    own = resolved.own
    if guards is None or own is None or own.rate_limit is None:
        return None
    limits = clinic_channel_limits(own.rate_limit)
    if not limits:
        return None
    key = clinic_channel_key(claimed.clinic_id, claimed.channel)
    wait = await guards.limiter.acquire(key, limits)
    if wait <= 0:
        return None
    day = own.rate_limit.max_per_day
    day_full = day is not None and await guards.limiter.usage(key, [(day, 86400.0)]) >= 1
    metrics.RATE_LIMITED.labels(claimed.clinic_id or "global", claimed.channel).inc()
    if day_full and own.rate_limit.on_day_limit == "fail":
        return Refused("the clinic's daily limit is reached")
    return Wait(now + timedelta(seconds=wait), "waiting for the clinic's rate limit")


async def admit(
    claimed: Claimed,
    resolved: ResolvedChannel,
    content: Content,
    facts: Facts,
    guards: Guards | None,
    now: datetime,
) -> Verdict:
    """Every per-delivery check, in order; the first that says no decides."""
    if claimed.is_expired(now):
        return Expired()
    capped = segment_cap(resolved, content)
    if capped is not None:
        return capped
    if claimed.id in facts.suppressed:
        return Suppressed()
    marketing = (content.category or "").upper() in MARKETING_CATEGORIES
    if marketing and claimed.id in facts.marketing_stopped:
        return Suppressed()
    windowed = window(resolved, content, facts.last_inbound.get(claimed.id), now)
    if isinstance(windowed, Refused):
        return windowed
    held = quiet_hours(resolved, claimed, now)
    if held is not None:
        return held
    limited = await clinic_rate(guards, claimed, resolved, now)
    if limited is not None:
        return limited
    return windowed


async def hop(guards: Guards | None, claimed: Claimed, hop: Hop, last: bool) -> HopVerdict:
    """Circuit, then sender throughput, right before calling `hop`."""
    if guards is None:
        return Go()
    allowed = await guards.health.allow(hop.health_owner(claimed.clinic_id), hop.label)
    if not allowed and not last:
        return Skip()
    wait = await sender_slot(guards, hop)
    return Busy(wait) if wait > 0 else Go()


async def sender_slot(guards: Guards, hop: Hop) -> float:
    """Wait for the sender's throughput cap (e.g. a WhatsApp number's 80/s), shared by every
    process and clinic using that number; returns a remaining wait too long to sleep through."""
    if hop.throughput is None:
        return 0.0
    sender, cap = hop.throughput
    key = sender_key(None, hop.key, sender)
    # The total time slept here is bounded, not each sleep: many deliveries waiting for one
    # busy number each lose the race again and again, and a delivery held past its lease is
    # handed to another worker by the reaper and sent twice (seen in the two-worker test).
    # An admission that took longer than FRESH_ADMISSION to come back is not used (see there):
    # this process stalled while it was in flight, and its slot may be spent already.
    give_up = time.monotonic() + guards.max_sender_wait
    while True:
        asked = time.monotonic()
        wait = await guards.limiter.acquire(key, sender_limits(cap))
        answered = time.monotonic()
        if wait <= 0:
            if answered - asked <= FRESH_ADMISSION:
                return 0.0
            metrics.SENDER_SLOT_STALE.labels(hop.key).inc()
            if answered > give_up:
                return FRESH_ADMISSION
            continue
        if answered + wait > give_up:
            return wait
        await asyncio.sleep(wait)
