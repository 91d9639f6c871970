"""Quiet hours: when a non-urgent SMS or WhatsApp delivery is held, and until when.

Pure: the caller passes `now` (tests inject the clock). A clinic's channel settings carry
`quietHours {start, end, timeZone, spreadMinutes}` (`settings.models.QuietHours`); the hours are
wall-clock times in that IANA zone, so they follow daylight-saving changes: on the night the
clocks go forward 21:00 → 08:00 New York time lasts 10 hours of real time, on the night they go
back 12 hours. A window whose start is after its end spans midnight (21:00 → 08:00); one whose
start is before its end lies within a day (12:00 → 14:00).

US practice (TCPA, 47 CFR 64.1200(c)(1)) keeps marketing and non-urgent texts between 8 a.m.
and 9 p.m. at the recipient's location; the clinic's zone stands in for the recipient's.

A held delivery is released at the window's end plus a stable offset in
`[0, spreadMinutes)` derived from its id (`release_at`), so a night's backlog leaves over the
spread in an order that mixes clinics instead of as one spike at the minute the window ends.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from clinicomm.settings.models import QuietHours


def _clock(value: str) -> time:
    hours, minutes = value.split(":")
    return time(int(hours), int(minutes))


def _at(day: date, clock: time, zone: ZoneInfo) -> datetime:
    """`day` at wall-clock `clock` in `zone` (a time skipped by a spring-forward change maps
    to the instant after the gap; an ambiguous one to its first occurrence)."""
    return datetime.combine(day, clock, tzinfo=zone)


def quiet_end(quiet: QuietHours, now: datetime) -> datetime | None:
    """The instant the quiet hours containing `now` end, or None when `now` is outside them."""
    zone = ZoneInfo(quiet.time_zone)
    local = now.astimezone(zone)
    start, end = _clock(quiet.start), _clock(quiet.end)
    clock = local.time().replace(tzinfo=None)
    today = local.date()
    if start < end:  # within one day
        return _at(today, end, zone) if start <= clock < end else None
    if clock >= start:  # evening part: ends tomorrow morning
        return _at(today + timedelta(days=1), end, zone)
    if clock < end:  # morning part: ends today
        return _at(today, end, zone)
    return None


def spread_offset(quiet: QuietHours, key: str) -> timedelta:
    """A stable offset in `[0, spreadMinutes)` for `key` (a delivery id)."""
    span = quiet.spread_minutes * 60
    if span <= 0:
        return timedelta(0)
    digest = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
    return timedelta(seconds=digest % span)


def release_at(quiet: QuietHours | None, now: datetime, key: str) -> datetime | None:
    """When a non-urgent delivery `key` due at `now` may go out: None when `now` is outside
    the quiet hours (send now), else their end plus the delivery's spread offset."""
    if quiet is None:
        return None
    end = quiet_end(quiet, now)
    if end is None:
        return None
    return end.astimezone(UTC) + spread_offset(quiet, key)
