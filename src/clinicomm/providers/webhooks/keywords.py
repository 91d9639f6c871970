"""Opt-out and opt-in keywords in an inbound SMS or WhatsApp message.

The sets are the union of Twilio's default opt-out handling on long codes
(https://www.twilio.com/docs/messaging/tutorials/advanced-opt-out) and the words the FCC's
2024 order treats as a per se revocation of consent (stop, quit, end, revoke, opt out, cancel,
unsubscribe; https://www.govinfo.gov/content/pkg/FR-2024-03-05/html/2024-04587.htm).
PROVIDER-FACTS §2, §5.3 and §8 item 17.
"""

from __future__ import annotations

from typing import Literal

STOP_WORDS = frozenset(
    {"STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT", "REVOKE", "OPTOUT", "OPT OUT"}
)
START_WORDS = frozenset({"START", "YES", "UNSTOP"})

Keyword = Literal["stop", "start"]


def classify_keyword(body: str | None) -> Keyword | None:
    """ "stop" or "start" when the whole trimmed, case-insensitive body is such a keyword.

    Inner runs of whitespace count as one space ("opt  out"); trailing punctuation such as
    "STOP." or "Stop!" still counts, since people type it. Anything longer ("please stop
    texting me") is None here: natural-language revocations need a human or a wider rule.
    """
    if not body:
        return None
    text = " ".join(body.split()).upper().rstrip(".!")
    if text in STOP_WORDS:
        return "stop"
    if text in START_WORDS:
        return "start"
    return None
