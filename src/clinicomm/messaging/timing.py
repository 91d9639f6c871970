"""A message's place in time: its priority, when it becomes due (`sendAt`) and when it expires.

Pure: `resolve(request, policy, now)` raises `TimingError` with JSON paths for bad input.

**Priority** (claim class; `delivery.outbox.claim` takes urgent, then normal, then bulk): the
request's `priority`, else the clinic's `communicationSettings.messages.priorities[category]`,
else the built-in mapping of the category (upper-cased):

| category                                                        | priority |
|-----------------------------------------------------------------|----------|
| `OTP`, `AUTH`, `AUTHENTICATION`, `VERIFICATION`, `2FA`, `MFA`,   | `urgent` |
| `PASSWORD_RESET`, `SECURITY`, `SECURITY_ALERT`                  |          |
| `MARKETING`, `NEWSLETTER`, `REMINDER`, `REMINDERS`, `CAMPAIGN`, | `bulk`   |
| `PROMOTION`, `PROMOTIONAL`, `SURVEY`, `BULK`                    |          |
| anything else (`APPOINTMENT`, `APPOINTMENT_REMINDER`, `BILLING`,| `normal` |
| `GENERAL`, `RESULTS`, …)                                        |          |

**Due time**: `sendAt` (ISO 8601 with an offset), at most `MAX_SCHEDULE` (90 days) ahead and
not in the past (a few seconds of clock skew are tolerated: `PAST_TOLERANCE`).

**Expiry**: `expiresAt` (with an offset) or `ttlSeconds` (counted from `sendAt` when given,
else from acceptance), else the clinic's `messages.ttlSeconds[category]`, else the built-in
default (`DEFAULT_TTL`: 600 s for `OTP` and `AUTH`), else none. It must be after the due time.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from clinicomm.delivery.records import Priority
from clinicomm.settings.models import MessagePolicy
from clinicomm.settings.validation import Problem

URGENT_CATEGORIES = frozenset(
    {
        "OTP",
        "AUTH",
        "AUTHENTICATION",
        "VERIFICATION",
        "2FA",
        "MFA",
        "PASSWORD_RESET",
        "SECURITY",
        "SECURITY_ALERT",
    }
)
BULK_CATEGORIES = frozenset(
    {
        "MARKETING",
        "NEWSLETTER",
        "REMINDER",
        "REMINDERS",
        "CAMPAIGN",
        "PROMOTION",
        "PROMOTIONAL",
        "SURVEY",
        "BULK",
    }
)
#: Built-in default time-to-live per category (seconds).
DEFAULT_TTL: dict[str, int] = {"OTP": 600, "AUTH": 600}
MAX_SCHEDULE = timedelta(days=90)
PAST_TOLERANCE = timedelta(seconds=5)


class TimingError(Exception):
    """Bad `priority`/`sendAt`/`expiresAt`/`ttlSeconds`; `problems` name each JSON path."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("; ".join(f"{p.path}: {p.message}" for p in problems))
        self.problems = problems


@dataclass(frozen=True, slots=True)
class Timing:
    """What `resolve` decided for one message."""

    priority: Priority
    #: When its deliveries become due (None: now).
    send_at: datetime | None
    #: After this instant none of its deliveries is handed to a provider (None: never).
    expires_at: datetime | None


def default_priority(category: str, policy: MessagePolicy | None = None) -> Priority:
    """The category's priority: the clinic's override, else the built-in mapping."""
    key = category.upper()
    if policy is not None and key in policy.priorities:
        return Priority(policy.priorities[key])
    if key in URGENT_CATEGORIES:
        return Priority.URGENT
    if key in BULK_CATEGORIES:
        return Priority.BULK
    return Priority.NORMAL


def default_ttl(category: str, policy: MessagePolicy | None = None) -> int | None:
    key = category.upper()
    if policy is not None and key in policy.ttl_seconds:
        return policy.ttl_seconds[key]
    return DEFAULT_TTL.get(key)


def resolve(
    *,
    category: str,
    priority: Priority | None,
    send_at: datetime | None,
    expires_at: datetime | None,
    ttl_seconds: int | None,
    policy: MessagePolicy | None,
    now: datetime,
) -> Timing:
    """The message's priority, due time and expiry; raises TimingError (422)."""
    problems: list[Problem] = []
    if send_at is not None:
        if send_at < now - PAST_TOLERANCE:
            problems.append(Problem("sendAt", "must not be in the past", "value_error"))
        elif send_at > now + MAX_SCHEDULE:
            problems.append(Problem("sendAt", "must be at most 90 days ahead", "value_error"))
        if send_at <= now:
            send_at = None  # due now (within the tolerance)
    if expires_at is not None and ttl_seconds is not None:
        problems.append(
            Problem("ttlSeconds", "give expiresAt or ttlSeconds, not both", "value_error")
        )
    due = send_at or now
    expiry = expires_at
    if expiry is None:
        ttl = ttl_seconds if ttl_seconds is not None else default_ttl(category, policy)
        expiry = due + timedelta(seconds=ttl) if ttl is not None else None
    elif expiry <= due:
        why = "must be after sendAt" if send_at else "must be in the future"
        problems.append(Problem("expiresAt", why, "value_error"))
    if problems:
        raise TimingError(problems)
    return Timing(
        priority=priority or default_priority(category, policy),
        send_at=send_at,
        expires_at=expiry,
    )
