"""E.164 normalisation, wa_id mapping and SMS segment counting (providers.phone)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clinicomm.providers.phone import (
    GSM7_BASIC,
    GSM7_EXTENSION,
    from_wa_id,
    normalize_e164,
    sms_segments,
)

#: Same examples on every run (a deterministic suite); 300 cases per property.
DETERMINISTIC = settings(derandomize=True, max_examples=300, database=None)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("+14155552671", "+14155552671"),
        ("+442071838750", "+442071838750"),
        ("+1 (415) 555-2671", "+14155552671"),
        ("  +44 20 7183 8750 ", "+442071838750"),
        ("+1.415.555.2671", "+14155552671"),
    ],
)
def test_accepts_e164_and_returns_canonical(raw: str, expected: str) -> None:
    assert normalize_e164(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        "4155552671",  # no country code, no default region
        "+0123456",  # country codes never start with 0
        "+1234567890123456",  # 16 digits: longer than E.164 allows
        "+1 415 555 2671a",  # trailing letter (phonenumbers alone would drop it)
        "+1-800-FLOWERS",
        "",
        "   ",
        "+",
        "+14155552671; DROP",
        "++14155552671",
        "+1415555267",  # too short for the US
    ],
)
def test_rejects_with_value_error(raw: str) -> None:
    with pytest.raises(ValueError, match=r"phone|number|E\.164"):
        normalize_e164(raw)


def test_national_number_only_with_explicit_default_region() -> None:
    with pytest.raises(ValueError, match="country code"):
        normalize_e164("4155552671")
    assert normalize_e164("4155552671", default_region="US") == "+14155552671"
    assert normalize_e164("020 7183 8750", default_region="GB") == "+442071838750"
    # An explicit + wins over the default region.
    assert normalize_e164("+442071838750", default_region="US") == "+442071838750"


def test_non_string_is_rejected() -> None:
    with pytest.raises(ValueError, match="string"):
        normalize_e164(14155552671)  # type: ignore[arg-type]


def test_wa_id_maps_to_the_same_canonical_number() -> None:
    assert from_wa_id("14155552671") == "+14155552671" == normalize_e164("+1 415 555 2671")
    assert from_wa_id("442071838750") == normalize_e164("+442071838750")
    for bad in ("+14155552671", "0123456", "1415555267a", "", "1" * 16):
        with pytest.raises(ValueError, match=r"wa_id|phone|number"):
            from_wa_id(bad)


@given(st.sampled_from(["+14155552671", "+442071838750", "+4915123456789", "+5511912345678"]))
@DETERMINISTIC
def test_normalisation_is_idempotent_and_round_trips_wa_id(number: str) -> None:
    canonical = normalize_e164(number)
    assert normalize_e164(canonical) == canonical
    assert from_wa_id(canonical[1:]) == canonical


@given(st.text(max_size=25))
@DETERMINISTIC
def test_any_text_either_normalises_to_e164_or_raises_value_error(raw: str) -> None:
    try:
        result = normalize_e164(raw)
    except ValueError:
        return
    assert result.startswith("+")
    assert result[1:].isdigit()
    assert 8 <= len(result) <= 16


# --- SMS segments -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", ("GSM-7", 1)),
        ("a" * 160, ("GSM-7", 1)),
        ("a" * 161, ("GSM-7", 2)),
        ("a" * 306, ("GSM-7", 2)),
        ("a" * 307, ("GSM-7", 3)),
        ("€" * 80, ("GSM-7", 1)),  # 160 septets
        ("€" * 81, ("GSM-7", 2)),
        ("a" * 159 + "€", ("GSM-7", 2)),  # 161 septets
        ("a" * 152 + "[" + "a" * 10, ("GSM-7", 2)),  # ESC pair not split: 152 | 2+10
        ("a" * 70 + "é", ("GSM-7", 1)),  # é is in the basic table
        ("ü" * 70, ("GSM-7", 1)),
        ("ç" * 70, ("UCS-2", 1)),  # lower-case ç is not (only Ç)
        ("ç" * 71, ("UCS-2", 2)),
        ("ç" * 134, ("UCS-2", 2)),
        ("ç" * 135, ("UCS-2", 3)),
        ("😀" * 35, ("UCS-2", 1)),  # 70 UTF-16 code units
        ("😀" * 36, ("UCS-2", 2)),
        ("a" * 66 + "😀", ("UCS-2", 1)),  # 68 units fit one SMS
        ("a" * 66 + "😀" + "a" * 10, ("UCS-2", 2)),  # pair not split: 66 | 2+10
        ("Ваш визит завтра", ("UCS-2", 1)),
    ],
)
def test_segments(text: str, expected: tuple[str, int]) -> None:
    assert sms_segments(text) == expected


GSM_CHARS = sorted(GSM7_BASIC | GSM7_EXTENSION)


@given(st.text(alphabet=st.sampled_from(GSM_CHARS), max_size=700))
@DETERMINISTIC
def test_gsm7_bounds(text: str) -> None:
    encoding, parts = sms_segments(text)
    assert encoding == "GSM-7"
    septets = sum(2 if ch in GSM7_EXTENSION else 1 for ch in text)
    if septets <= 160:
        assert parts == 1
    else:
        # Never fewer than the ideal packing; at most one part more (ESC pairs not split).
        assert math.ceil(septets / 153) <= parts <= math.ceil(septets / 152)


@given(st.text(min_size=1, max_size=300).filter(
    lambda t: any(ch not in GSM7_BASIC and ch not in GSM7_EXTENSION for ch in t)
))
@DETERMINISTIC
def test_ucs2_bounds(text: str) -> None:
    encoding, parts = sms_segments(text)
    assert encoding == "UCS-2"
    units = len(text.encode("utf-16-le")) // 2
    if units <= 70:
        assert parts == 1
    else:
        assert math.ceil(units / 67) <= parts <= math.ceil(units / 66)


@given(st.text(alphabet=st.sampled_from(GSM_CHARS), max_size=400), st.sampled_from("ç😀Ж"))
@DETERMINISTIC
def test_one_non_gsm_character_switches_to_ucs2(text: str, odd: str) -> None:
    assert sms_segments(text + odd)[0] == "UCS-2"
    assert sms_segments(text + odd)[1] >= sms_segments(text)[1]
