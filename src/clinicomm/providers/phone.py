"""Phone numbers: one canonical E.164 form, WhatsApp ids, and SMS segment counting.

Every phone number clinicomm stores or sends is the canonical E.164 string `+<digits>`
produced by `normalize_e164`. WhatsApp's `wa_id` (the same digits without `+`, as Meta echoes
it in `contacts[].wa_id` and status webhooks) maps back to that form with `from_wa_id`, so a
patient is one number whatever channel it came from.

`sms_segments` tells how many billed SMS parts a text needs (GSM 03.38 7-bit or UCS-2).
"""

from __future__ import annotations

import re
from functools import lru_cache

import phonenumbers

# Characters a human may write inside a number. Letters are refused: `phonenumbers` drops a
# trailing letter silently ("+1 415 555 2671a" parses as a valid number), and vanity numbers
# ("1-800-FLOWERS") are not something a clinic should store for a patient.
_ALLOWED = re.compile(r"^\+?[0-9][0-9 ().\-]*$")
_WA_ID = re.compile(r"^[1-9][0-9]{6,14}$")


def normalize_e164(raw: str, default_region: str | None = None) -> str:
    """Return `raw` as canonical E.164 (`+14155552671`); raise ValueError when it is not one.

    Answers are kept for the last 4,096 numbers (in this process only; libphonenumber's parse
    and validation were ~5 % of a WhatsApp send): the function is pure, and a ValueError is
    never kept, so a refused number is checked again each time.

    The number must start with `+` and a country code, unless `default_region` (ISO 3166
    alpha-2, e.g. "US") is given: then a national number is read as that region's. Spaces,
    dots, dashes and parentheses are allowed; letters and other symbols are not. The number
    must be valid for its region (libphonenumber metadata), not only possible.
    """
    if not isinstance(raw, str):
        raise ValueError("phone number must be a string")
    return _normalize(raw, default_region)


@lru_cache(maxsize=4096)
def _normalize(raw: str, default_region: str | None) -> str:
    """`normalize_e164` of a string, kept (see there)."""
    text = raw.strip()
    if not text:
        raise ValueError("phone number is empty")
    if not _ALLOWED.match(text):
        raise ValueError("phone number may contain only digits, '+', spaces and . - ( )")
    if not text.startswith("+") and default_region is None:
        raise ValueError("phone number must be in E.164 form: '+' and a country code")
    try:
        parsed = phonenumbers.parse(text, None if text.startswith("+") else default_region)
    except phonenumbers.NumberParseException as exc:
        raise ValueError(f"not a phone number: {exc._msg}") from None
    if not phonenumbers.is_valid_number(parsed):
        raise ValueError("not a valid phone number for its country code")
    result: str = phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)
    return result


def from_wa_id(wa_id: str) -> str:
    """Map a WhatsApp `wa_id` (country code and number, no `+`) to the canonical E.164 form."""
    text = wa_id.strip() if isinstance(wa_id, str) else ""
    if not _WA_ID.match(text):
        raise ValueError("wa_id must be 7 to 15 digits without '+'")
    return normalize_e164("+" + text)


def digits(e164: str) -> str:
    """The E.164 number without its `+` (the form Vonage, MessageBird and wa_id use)."""
    return e164[1:] if e164.startswith("+") else e164


# GSM 03.38 default alphabet (without ESC) and its extension table. Extension characters are
# sent as ESC + char, so they cost two septets. https://en.wikipedia.org/wiki/GSM_03.38
GSM7_BASIC = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
GSM7_EXTENSION = frozenset("\f^{}\\[~]|€")

GSM7_SINGLE, GSM7_PART = 160, 153  # septets: one SMS, one part of a concatenated SMS
UCS2_SINGLE, UCS2_PART = 70, 67  # UTF-16 code units: the same for UCS-2


def _pack(costs: list[int], single: int, part: int) -> int:
    """Parts needed for units of `costs`, never splitting one unit across two parts."""
    total = sum(costs)
    if total <= single:
        return 1
    parts, used = 1, 0
    for cost in costs:
        if used + cost > part:
            parts += 1
            used = 0
        used += cost
    return parts


def sms_segments(text: str) -> tuple[str, int]:
    """Return (encoding, parts) for an SMS body: ("GSM-7" | "UCS-2", number of segments).

    GSM-7 when every character is in the GSM 03.38 basic or extension table (extension
    characters count 2 septets and are never split across parts): 160 septets fit in one
    SMS, 153 per part beyond that. Otherwise UCS-2: 70 UTF-16 code units in one SMS, 67 per
    part, and a surrogate pair (emoji) is never split. An empty text is one segment.
    """
    if all(ch in GSM7_BASIC or ch in GSM7_EXTENSION for ch in text):
        costs = [2 if ch in GSM7_EXTENSION else 1 for ch in text]
        return "GSM-7", _pack(costs, GSM7_SINGLE, GSM7_PART)
    costs = [2 if ord(ch) > 0xFFFF else 1 for ch in text]
    return "UCS-2", _pack(costs, UCS2_SINGLE, UCS2_PART)
