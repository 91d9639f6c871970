"""Identifiers: time-ordered UUIDs (version 7 layout), so new rows land at the end of indexes."""

from __future__ import annotations

import os
import time

_MS = (1 << 48) - 1
_RANDOM = (1 << 80) - 1
#: Version 7 and the RFC 4122 variant, over the random bits they replace.
_CLEAR = ~((0xF << 76) | (0x3 << 62))
_SET = (0x7 << 76) | (0x2 << 62)


def new_id() -> str:
    """A UUIDv7 string: 48-bit Unix milliseconds, then random bits."""
    return new_ids(1)[0]


def new_ids(n: int) -> list[str]:
    """`n` UUIDv7 strings of this millisecond: one clock read and one read of random bytes
    for all of them (a message's id and its deliveries' ids are made together)."""
    ms = (time.time_ns() // 1_000_000) & _MS
    pool = os.urandom(10 * n)
    ids = []
    for i in range(n):
        rand = int.from_bytes(pool[10 * i : 10 * i + 10], "big")
        h = f"{((ms << 80) | (rand & _RANDOM)) & _CLEAR | _SET:032x}"
        ids.append(f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}")
    return ids
