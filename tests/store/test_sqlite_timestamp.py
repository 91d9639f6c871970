"""`store.models.SqliteTimestamp` writes the text SQLite's DATETIME writes, for every value."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy.dialects import sqlite

from clinicomm.store.models import SqliteTimestamp

DIALECT = sqlite.dialect()
OURS = SqliteTimestamp().bind_processor(DIALECT)
THEIRS = sqlite.DATETIME().bind_processor(DIALECT)


@pytest.mark.parametrize(
    "value",
    [
        datetime(2026, 12, 3, 14, 14, 4, 583005, tzinfo=UTC),
        datetime(999, 1, 2, 3, 4, 5),
        datetime(2026, 1, 1, tzinfo=timezone(timedelta(hours=5))),
        date(2026, 5, 6),
        None,
    ],
)
def test_the_same_text_as_the_dialect(value: object) -> None:
    assert OURS is not None and THEIRS is not None
    assert OURS(value) == THEIRS(value)


@given(st.datetimes(timezones=st.none() | st.just(UTC)))
def test_the_same_text_for_any_datetime(value: datetime) -> None:
    assert OURS is not None and THEIRS is not None
    assert OURS(value) == THEIRS(value)


def test_what_the_dialect_refuses_is_refused() -> None:
    assert OURS is not None
    with pytest.raises(TypeError):
        OURS("2026-12-03")
