"""The dialect's INSERT that supports ON CONFLICT (SQLite and PostgreSQL alike)."""

from __future__ import annotations

from typing import Any

from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession


def insert(session: AsyncSession, model: Any) -> Any:
    """`INSERT` for `model` with `.on_conflict_do_nothing/_update` on either dialect."""
    if session.get_bind().dialect.name == "postgresql":
        return postgresql.insert(model)
    return sqlite.insert(model)
