"""`store.unnest.Unnest`: rows as one array per column store what `Table.insert()` stores
(PostgreSQL: the accept's one statement is built from it)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import Table, select, text
from sqlalchemy.exc import DataError

from clinicomm.store import fast
from clinicomm.store.db import Database
from clinicomm.store.models import CallbackEvent, Delivery, Message
from clinicomm.store.unnest import Unnest
from tests.conftest import BACKEND

pytestmark = pytest.mark.skipif(BACKEND != "postgres", reason="arrays are PostgreSQL's")

MESSAGES: Table = Message.__table__  # type: ignore[assignment]
DELIVERIES: Table = Delivery.__table__  # type: ignore[assignment]
CALLBACKS: Table = CallbackEvent.__table__  # type: ignore[assignment]
_M = Unnest(MESSAGES, "m")
_INSERT_M = text(_M.insert())


def _message(id_: str, **extra: Any) -> dict[str, Any]:
    # meta, callback_url, callback_opts and created_at left to the model's defaults
    return {"id": id_, "clinic_id": None, "category": "reminder", "content": b"\x00\xff", **extra}


async def _stored(db: Database, table: Table, ids: list[str]) -> list[dict[str, Any]]:
    key = table.c.id if "id" in table.c else table.c.event_id
    async with db.read() as session:
        rows = (await session.execute(select(table).where(key.in_(ids)))).mappings().all()
    found = {row[key.name]: dict(row) for row in rows}
    return [found[i] for i in ids]


async def test_rows_are_stored_as_table_insert_stores_them(db: Database) -> None:
    at = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)
    rows = [
        _message("by-insert", created_at=at, requested_by=None),
        _message("by-insert-2", created_at=at, meta={"a": [1, "é"], 2: None}, callback_opts=None),
    ]
    twins = [{**row, "id": row["id"].replace("by-insert", "by-unnest")} for row in rows]
    async with db.session() as session:
        for row in rows:  # one by one: an executemany wants the same keys in every row
            await session.execute(MESSAGES.insert(), row)
    await fast.rows(db, _INSERT_M, _M.params(twins, db.engine.dialect), writes=True)
    expected = await _stored(db, MESSAGES, [r["id"] for r in rows])
    got = await _stored(db, MESSAGES, [r["id"] for r in twins])
    for one, other in zip(expected, got, strict=True):
        assert {**one, "id": None} == {**other, "id": None}
    async with db.read() as session:
        # As Table.insert() stores them: a JSON None given is JSON null, one left out SQL NULL.
        nulls = await session.execute(
            text("SELECT id, callback_opts IS NULL, CAST(callback_opts AS TEXT) FROM messages")
        )
        assert sorted(nulls.all()) == [
            ("by-insert", True, None),
            ("by-insert-2", False, "null"),
            ("by-unnest", True, None),
            ("by-unnest-2", False, "null"),
        ]


async def test_defaults_are_the_models(db: Database) -> None:
    params = _M.params([_message("m-1")], db.engine.dialect)
    assert params["m_meta"] == ["{}"]  # default=dict, encoded
    assert params["m_callback_url"] == [None]
    assert abs((params["m_created_at"][0] - datetime.now(UTC)).total_seconds()) < 60
    events = Unnest(CALLBACKS, "e")
    assert "e_id" not in events.params([], db.engine.dialect)  # the autoincrement key is left out
    assert events.params([{"event_id": "x"}], db.engine.dialect)["e_state"] == ["pending"]


async def test_a_value_too_long_is_refused_not_truncated(db: Database) -> None:
    with pytest.raises(DataError):
        await fast.rows(
            db,
            _INSERT_M,
            _M.params([_message("m-long", category="x" * 61)], db.engine.dialect),
            writes=True,
        )
    async with db.read() as session:
        assert (await session.execute(text("SELECT count(*) FROM messages"))).scalar() == 0


async def test_one_statement_text_for_any_number_of_rows(db: Database) -> None:
    sql = _M.insert()
    assert "unnest(" in sql and "VARCHAR(" not in sql  # no length cast: it would truncate
    for n in (1, 2, 50):
        rows = [_message(f"n{n}-{i}") for i in range(n)]
        await fast.rows(db, _INSERT_M, _M.params(rows, db.engine.dialect), writes=True)
    async with db.read() as session:
        assert (await session.execute(text("SELECT count(*) FROM messages"))).scalar() == 53


async def test_given_columns_store_what_table_insert_stores(db: Database) -> None:
    """`given`: only the columns the rows carry are unnested; a column with a default is bound
    once (the same for every row), one without is left out (SQL NULL). The rows stored are
    those `Table.insert()` stores from the same dicts."""
    from clinicomm.delivery.records import DeliveryStatus, NewDelivery

    at = datetime(2026, 12, 6, 1, 0, tzinfo=UTC)
    given = Unnest(DELIVERIES, "d", given=NewDelivery.ROW_COLUMNS)
    assert {c.name for c in given.columns} == set(NewDelivery.ROW_COLUMNS)
    assert {c.name for c in given.constants} == {
        "chain_position",
        "provider_attempts",
        "attempts",
        "requeues",
    }
    sql = given.insert()
    assert "lease_owner" not in sql and "CAST(:d_attempts AS INTEGER)" in sql
    await fast.rows(
        db, text(_M.insert()), _M.params([_message("m")], db.engine.dialect), writes=True
    )

    def delivery(id_: str, **kw: Any) -> NewDelivery:
        return NewDelivery(
            id=id_,
            message_id="m",
            clinic_id=None,
            channel="email",
            recipient="enc",
            status=DeliveryStatus.QUEUED,
            fair_at=at,
            created_at=at,
            **kw,
        )

    rows = [
        delivery("by-insert"),
        delivery("by-insert-2", error={"reason": "x", "errors": []}, not_before=at, priority=2),
    ]
    # A key `row()` gave beyond `ROW_COLUMNS` would be dropped without a word: the two agree.
    assert tuple(rows[0].row()) == NewDelivery.ROW_COLUMNS
    twins = [
        delivery(
            r.id.replace("insert", "unnest"),
            error=r.error,
            not_before=r.not_before,
            priority=r.priority,
        )
        for r in rows
    ]
    async with db.session() as session:
        await session.execute(DELIVERIES.insert(), [r.row() for r in rows])
    params = given.params([r.row() for r in twins], db.engine.dialect)
    assert params["d_attempts"] == 0 and "d_lease_owner" not in params
    assert len(params["d_id"]) == 2
    await fast.rows(db, text(sql), params, writes=True)
    expected = await _stored(db, DELIVERIES, [r.id for r in rows])
    got = await _stored(db, DELIVERIES, [r.id for r in twins])
    for one, other in zip(expected, got, strict=True):
        assert {**one, "id": None} == {**other, "id": None}
    with pytest.raises(KeyError):
        given.params([{"id": "no-other-column"}], db.engine.dialect)
    with pytest.raises(ValueError, match="no column"):
        Unnest(DELIVERIES, "d", given=("id", "nope"))
