"""`store.fast.rows`: one statement on its own, through asyncpg on PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import select, text

from clinicomm.store import fast
from clinicomm.store.db import Database
from clinicomm.store.models import Clinic
from tests.conftest import BACKEND

_BY_ID = select(Clinic.id, Clinic.name, Clinic.settings).where(
    Clinic.id != "c-3", Clinic.name != ""
)


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    database = Database(database_url)
    async with database.session() as session:
        session.add_all([Clinic(id="c-1", name="One", settings={"a": [1, "é"]}),
                         Clinic(id="c-2", name="Two", settings={}),
                         Clinic(id="c-3", name="Three", settings={})])
    yield database
    await database.dispose()


async def test_rows_answers_mappings_by_column_name(db: Database) -> None:
    for _ in range(3):  # compiled once, then from the cache
        found = sorted(await fast.rows(db, _BY_ID, {}, writes=False), key=lambda r: r["id"])
        assert [(r["id"], r["name"], fast.json_value(r["settings"])) for r in found] == [
            ("c-1", "One", {"a": [1, "é"]}), ("c-2", "Two", {})]


async def test_a_read_does_not_wait_for_the_write_turn(db: Database) -> None:
    async with db.writing():
        found = await asyncio.wait_for(fast.rows(db, _BY_ID, {}, writes=False), 5)
    assert len(found) == 2


@pytest.mark.skipif(BACKEND != "postgres", reason="asyncpg's path: PostgreSQL only")
async def test_a_cancelled_statement_does_not_poison_the_pool(db: Database) -> None:
    """Cancelled mid-statement (asyncpg cancels it on the server), the pool still serves
    every later statement."""
    slow = text("SELECT pg_sleep(5) AS slept")
    task = asyncio.create_task(fast.rows(db, slow, {}, writes=False))
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(15):  # more than the pool holds
        assert len(await fast.rows(db, _BY_ID, {}, writes=False)) == 2


@pytest.mark.skipif(BACKEND != "postgres", reason="asyncpg's path: PostgreSQL only")
async def test_the_fast_pool_plans_every_statement_for_its_values(db: Database) -> None:
    found = await fast.rows(db, text("SELECT current_setting('plan_cache_mode') AS mode"), {},
                            writes=False)
    assert found[0]["mode"] == "force_custom_plan"
    # Statements whose plan cannot depend on their values have one generic plan, with
    # sequential scans priced out; the engine's own connections keep the default.
    mode = text(
        "SELECT current_setting('plan_cache_mode') AS mode,"
        " current_setting('enable_seqscan') AS seqscan"
    )
    found = await fast.rows(db, mode, {}, writes=True, custom_plans=False)
    assert (found[0]["mode"], found[0]["seqscan"]) == ("force_generic_plan", "off")
    async with db.read() as session:
        assert await session.scalar(text("SHOW plan_cache_mode")) == "auto"
    await db.dispose()  # both pools closed
    assert db._fast_pools == {}


def test_a_statement_whose_text_depends_on_its_values_is_refused() -> None:
    """An expanding IN is rendered per call; compiled once it would be wrong."""
    with pytest.raises(ValueError, match="expanding"):
        fast._compile(select(Clinic.id).where(Clinic.id.in_(["c-1", "c-2"])))


@pytest.mark.skipif(BACKEND != "postgres", reason="asyncpg's path: PostgreSQL only")
async def test_errors_are_sqlalchemy_errors_without_parameters(db: Database) -> None:
    from sqlalchemy.exc import IntegrityError, OperationalError

    insert = text("INSERT INTO clinics (id, name, settings) VALUES (:id, 'x', '{}')")
    with pytest.raises(IntegrityError) as duplicate:
        await fast.rows(db, insert, {"id": "c-1"}, writes=True)
    # Parameters may be patient data: never rendered into the error (SQLAlchemy's "hidden").
    assert "[parameters:" not in str(duplicate.value)
    unreachable = Database("postgresql+asyncpg://postgres@127.0.0.1:1/test")
    try:
        with pytest.raises(OperationalError):
            await fast.rows(unreachable, _BY_ID, {}, writes=False)
    finally:
        await unreachable.dispose()
