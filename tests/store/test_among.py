"""`store.among_param`: a membership test whose SQL does not grow with the number of values."""

from __future__ import annotations

from typing import Any

from sqlalchemy import event, select

from clinicomm.runtime import Runtime
from clinicomm.store.among import among_param
from clinicomm.store.models import Clinic


async def test_among_finds_exactly_the_values_given(runtime: Runtime) -> None:
    async with runtime.db.session() as session:
        session.add_all([Clinic(id=f"c-{n}", name="x") for n in range(5)])
    async with runtime.db.read() as session:
        for wanted in ([], ["c-1"], ["c-0", "c-3", "c-9"], {"c-4", "c-2"}):
            found = set(
                await session.scalars(
                    select(Clinic.id).where(_among(runtime, Clinic.id)), {"ids": list(wanted)}
                )
            )
            assert found == {w for w in wanted if w != "c-9"}


async def test_one_statement_text_for_any_number_of_values(
    runtime: Runtime,
) -> None:
    """On PostgreSQL the values travel as one array parameter, so asyncpg prepares and the
    server plans the statement once; on SQLite they are one JSON array (`json_each`)."""
    texts: list[str] = []

    def record(_conn: object, _cursor: object, statement: str, *_: object) -> None:
        texts.append(statement)

    engine = runtime.db.engine.sync_engine
    event.listen(engine, "before_cursor_execute", record)
    try:
        async with runtime.db.read() as session:
            for n in (1, 2, 50):
                await session.scalars(
                    select(Clinic.id).where(_among(runtime, Clinic.id)),
                    {"ids": [f"c-{i}" for i in range(n)]},
                )
    finally:
        event.remove(engine, "before_cursor_execute", record)
    queries = [t for t in texts if "FROM clinics" in t]
    assert len(queries) == 3
    assert len(set(queries)) == 1
    assert ("json_each" if runtime.db.is_sqlite else "ANY") in queries[0]


def _among(runtime: Runtime, column: Any) -> Any:
    return among_param(column, "ids", postgresql=not runtime.db.is_sqlite)


async def test_the_portable_form_is_the_expanding_in(runtime: Runtime) -> None:
    """`postgresql=None` (a statement for a session on either database) finds the same."""
    async with runtime.db.session() as session:
        session.add_all([Clinic(id=f"c-{n}", name="x") for n in range(3)])
    async with runtime.db.read() as session:
        statement = select(Clinic.id).where(among_param(Clinic.id, "ids", postgresql=None))
        found = set(await session.scalars(statement, {"ids": ["c-0", "c-2", "c-7"]}))
    assert found == {"c-0", "c-2"}
