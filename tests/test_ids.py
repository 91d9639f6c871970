"""`ids.new_id` / `new_ids`: UUIDv7 strings, time-ordered across milliseconds."""

from __future__ import annotations

import time
import uuid

from clinicomm.ids import new_id, new_ids


def test_ids_are_version_7_uuids_of_now() -> None:
    for value in [new_id() for _ in range(500)] + new_ids(500):
        parsed = uuid.UUID(value)
        assert str(parsed) == value
        assert parsed.version == 7 and parsed.variant == uuid.RFC_4122
        assert abs((parsed.int >> 80) - time.time_ns() // 1_000_000) < 5_000


def test_ids_are_distinct_and_ordered_across_milliseconds() -> None:
    batch = new_ids(1000)
    assert len(set(batch)) == 1000
    before = new_id()
    time.sleep(0.002)
    assert new_id() > before
