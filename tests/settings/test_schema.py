"""The migrations build the schema the models describe (so `clinicomm migrate` on a new or an
upgraded database gives the tables, columns and indexes the code queries)."""

from __future__ import annotations

from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from clinicomm.store.models import Base


async def test_migrations_match_the_models(database_url: str) -> None:
    engine = create_async_engine(database_url)
    try:
        async with engine.connect() as connection:

            def differences(sync: Any) -> list[Any]:
                context = MigrationContext.configure(sync, opts={"compare_type": True})
                found: list[Any] = compare_metadata(context, Base.metadata)
                return [d for d in found if not _alembic_version(d)]

            assert await connection.run_sync(differences) == []
    finally:
        await engine.dispose()


def _alembic_version(difference: Any) -> bool:
    """Alembic's own bookkeeping table is not in the models."""
    return (
        isinstance(difference, tuple)
        and difference[0] == "remove_table"
        and difference[1].name == "alembic_version"
    )


@pytest.mark.postgres
async def test_claimed_tables_are_vacuumed_after_two_percent_dead(database_url: str) -> None:
    """Migration i20_0003: `deliveries` and `callback_events` (rewritten by every claim and
    outcome, their status indexed) carry autovacuum thresholds of 2 % plus 1,000 rows."""
    engine = create_async_engine(database_url)
    try:
        async with engine.connect() as connection:
            rows = await connection.execute(
                text(
                    "SELECT relname, reloptions FROM pg_class "
                    "WHERE relname IN ('deliveries', 'callback_events') AND relkind = 'r'"
                )
            )
            options = {name: set(opts or ()) for name, opts in rows}
    finally:
        await engine.dispose()
    expected = {
        "autovacuum_vacuum_scale_factor=0.02",
        "autovacuum_vacuum_threshold=1000",
        "autovacuum_analyze_scale_factor=0.02",
        "autovacuum_analyze_threshold=1000",
    }
    assert options == {"deliveries": expected, "callback_events": expected}
