"""Retry delays: capped exponential backoff with full jitter (AWS Architecture Blog)."""

from __future__ import annotations

import random

BASE_SECONDS = 2.0
CAP_SECONDS = 300.0


def full_jitter(attempt: int, *, base: float = BASE_SECONDS, cap: float = CAP_SECONDS) -> float:
    """A delay in [0, min(cap, base·2^attempt)] for the given 0-based attempt number."""
    ceiling = min(cap, base * (2 ** max(attempt, 0)))
    return random.uniform(0.0, ceiling)


def retry_delay(
    attempt: int,
    retry_after: float | None,
    *,
    base: float = BASE_SECONDS,
    cap: float = CAP_SECONDS,
) -> float:
    """The wait before the next attempt: the provider's Retry-After when it gave one (never
    shorter), otherwise full jitter. `base` is `CLINICOMM_RETRY_BASE_SECONDS` (tests shrink it)."""
    jitter = full_jitter(attempt, base=base, cap=cap)
    if retry_after is not None:
        return max(retry_after, min(jitter, 1.0))
    return jitter
