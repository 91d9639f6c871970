"""`SendMetadata`'s size bound: the check that skips serializing (`_surely_small`) never lets
through metadata whose JSON is over `METADATA_MAX_BYTES`."""

from __future__ import annotations

import orjson
import pytest
from pydantic import ValidationError

from clinicomm.messaging.models import METADATA_MAX_BYTES, SendMetadata, _surely_small


def _size(data: dict[str, object]) -> int:
    return len(orjson.dumps(data))


@pytest.mark.parametrize("char", ["n", "é", "\u2603", "\U0001f600", "\x01", '"', "\\"])
@pytest.mark.parametrize("length", [10, 1300, 1365, 2000, 4000, 8180, 8200])
def test_the_shortcut_only_says_small_when_it_is(char: str, length: int) -> None:
    extra = {"note": char * length, "appointmentId": "appt-1"}
    document = {"clinicId": "clinic-a", **extra}
    if _surely_small("clinic-a", extra):
        assert _size(document) <= METADATA_MAX_BYTES
    fits = _size(document) <= METADATA_MAX_BYTES
    if fits:
        SendMetadata.model_validate(document)
    else:
        with pytest.raises(ValidationError, match="larger than"):
            SendMetadata.model_validate(document)


def test_values_not_strings_are_serialized_and_checked() -> None:
    assert not _surely_small(None, {"n": 1})
    with pytest.raises(ValidationError, match="64 bits"):
        SendMetadata.model_validate({"n": 2**70})
    with pytest.raises(ValidationError, match="larger than"):
        SendMetadata.model_validate({"n": ["x" * 100] * 100})
    assert _surely_small("clinic-a", {"appointmentId": "appt-1"})
