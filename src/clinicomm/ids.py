"""Identifiers: time-ordered UUIDs (version 7 layout), so new rows land at the end of indexes."""

from __future__ import annotations

import os
import time

_MS = (1 << 48) - 1


def new_id() -> str:
    """A UUIDv7 string: 48-bit Unix milliseconds, then random bits."""
    return new_ids(1)[0]


def new_ids(n: int) -> list[str]:
    """`n` UUIDv7 strings of this millisecond: one clock read and one read of random bytes
    for all of them (a message's id and its deliveries' ids are made together). Each is the
    6 bytes of the milliseconds, then 10 random bytes whose first holds the version (7) in
    its high nibble and whose third holds the RFC 4122 variant (0b10) in its top bits."""
    ms = ((time.time_ns() // 1_000_000) & _MS).to_bytes(6, "big")
    pool = os.urandom(10 * n)
    ids = []
    for i in range(0, 10 * n, 10):
        rand = pool[i : i + 10]
        marked = bytes((0x70 | (rand[0] & 0x0F), rand[1], 0x80 | (rand[2] & 0x3F)))
        h = (ms + marked + rand[3:]).hex()
        ids.append(f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}")
    return ids
