"""The migrations build the schema the models describe (so `clinicomm migrate` on a new or an
upgraded database gives the tables, columns and indexes the code queries)."""

from __future__ import annotations

from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
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
