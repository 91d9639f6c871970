"""The `Clinicomm-Signature` header: `t=<unix>,v1=<hex HMAC-SHA256(secret, t + "." + body)>`.

The scheme Stripe uses. The receiver recomputes the HMAC over the raw body it received with
the timestamp of the header, compares in constant time, and refuses a timestamp further than
`tolerance` seconds from its clock (a replayed old callback). Several `v1=` values may be
present (during a secret rotation); one match is enough.
"""

from __future__ import annotations

import hashlib
import hmac
import time

HEADER = "Clinicomm-Signature"
#: Seconds a signature's timestamp may differ from the receiver's clock.
DEFAULT_TOLERANCE = 300


def sign(secret: str, body: bytes, timestamp: int | None = None) -> str:
    """The header value for `body` signed with `secret` at `timestamp` (now by default)."""
    t = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def verify_signature(
    secret: str,
    body: bytes,
    header: str | None,
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    now: float | None = None,
) -> bool:
    """True when `header` is a valid signature of `body` under `secret`, made within
    `tolerance` seconds of `now`. Never raises on a malformed header (answers False)."""
    if not header:
        return False
    timestamp: int | None = None
    candidates: list[str] = []
    for part in header.split(","):
        key, _, value = part.strip().partition("=")
        if key == "t":
            try:
                timestamp = int(value)
            except ValueError:
                return False
        elif key == "v1":
            candidates.append(value)
    if timestamp is None or not candidates:
        return False
    if abs((time.time() if now is None else now) - timestamp) > tolerance:
        return False
    expected = sign(secret, body, timestamp).partition(",v1=")[2]
    return any(hmac.compare_digest(expected, c) for c in candidates)
