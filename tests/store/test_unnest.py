"""`store.unnest.Unnest`: rows as one JSON parameter store what `Table.insert()` stores
(PostgreSQL: the accept's one statement is built from it)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from sqlalchemy import Table, select, text
from sqlalchemy.exc import DataError

from clinicomm.store import fast
from clinicomm.store.db import Database
from clinicomm.store.models import CallbackEvent, Delivery, Message
from clinicomm.store.unnest import Unnest
from tests.conftest import BACKEND

pytestmark = pytest.mark.skipif(BACKEND != "postgres", reason="json_to_recordset is PostgreSQL's")

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
    (row,) = orjson.loads(_M.params([_message("m-1")], db.engine.dialect)["m_rows"])
    assert row["meta"] == "{}"  # default=dict, encoded by the engine's encoder
    assert row["callback_url"] is None
    assert row["content"] == "AP8="  # b"\x00\xff" as base64
    created = datetime.fromisoformat(row["created_at"])
    assert abs((created - datetime.now(UTC)).total_seconds()) < 60
    events = Unnest(CALLBACKS, "e")
    (event,) = orjson.loads(events.params([{"event_id": "x"}], db.engine.dialect)["e_rows"])
    assert "id" not in event  # the autoincrement key is left out
    assert event["state"] == "pending"


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
    assert "json_to_recordset(" in sql and "VARCHAR(" not in sql  # a length cast truncates
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
    assert params["d_attempts"] == 0 and set(params) == {
        "d_rows",
        *(f"d_{c.name}" for c in given.constants),
    }
    assert [set(r) for r in orjson.loads(params["d_rows"])] == [set(NewDelivery.ROW_COLUMNS)] * 2
    await fast.rows(db, text(sql), params, writes=True)
    expected = await _stored(db, DELIVERIES, [r.id for r in rows])
    got = await _stored(db, DELIVERIES, [r.id for r in twins])
    for one, other in zip(expected, got, strict=True):
        assert {**one, "id": None} == {**other, "id": None}
    with pytest.raises(KeyError):
        given.params([{"id": "no-other-column"}], db.engine.dialect)
    # A row with a key beyond the given columns travels without it (it is copied, not sent).
    extra = given.params([{**twins[0].row(), "lease_owner": "x"}], db.engine.dialect)
    assert set(orjson.loads(extra["d_rows"])[0]) == set(NewDelivery.ROW_COLUMNS)
    with pytest.raises(ValueError, match="no column"):
        Unnest(DELIVERIES, "d", given=("id", "nope"))


async def test_naive_timestamps_are_utc_and_a_nul_is_refused(db: Database) -> None:
    """The recordset's edges: a naive timestamp travels as UTC (the project's convention,
    whatever the server's TimeZone), and a string with a NUL is a `DataError` (the writer's
    per-group retry relies on it), with nothing written."""
    naive = datetime(2026, 12, 6, 12, 0)
    params = _M.params([_message("naive", created_at=naive)], db.engine.dialect)
    assert orjson.loads(params["m_rows"])[0]["created_at"] == "2026-12-06T12:00:00+00:00"
    await fast.rows(db, _INSERT_M, params, writes=True)
    (stored,) = await _stored(db, MESSAGES, ["naive"])
    assert stored["created_at"] == naive.replace(tzinfo=UTC)
    nul = _M.params([_message("nul", category="a\x00b")], db.engine.dialect)
    with pytest.raises(DataError):
        await fast.rows(db, _INSERT_M, nul, writes=True)
    async with db.read() as session:
        assert (await session.execute(text("SELECT count(*) FROM messages"))).scalar() == 1
