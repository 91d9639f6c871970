"""Database engine and sessions (SQLite by default, PostgreSQL through asyncpg), migrations.

Services take an `AsyncSession` and never commit; the request or the worker's batch does.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, DisconnectionError, OperationalError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from clinicomm.store.sqlite_inline import BUSY_TIMEOUT_MS, inline_connect
from clinicomm.store.sqlite_raw import RawSqlite

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).parent / "migrations"


class DatabaseUnavailableError(Exception):
    """The database cannot be reached; the API answers 503."""


class Database:
    """One engine and session factory per process."""

    def __init__(self, url: str, *, echo: bool = False) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        kwargs: dict[str, Any] = {"echo": echo, **_JSON}
        if self.is_sqlite:
            # Statements run on the loop's thread, and a wait for another process's write
            # lock on the connection's own (store/sqlite_inline.py). Each aiosqlite connection
            # still has its thread: keep enough pooled that bursts do not open and close them.
            kwargs.update(
                connect_args={"async_creator_fn": inline_connect}, pool_size=20, max_overflow=20
            )
        else:
            kwargs.update(pool_size=10, max_overflow=10)
        self.engine: AsyncEngine = create_async_engine(url, **kwargs)
        if self.is_sqlite:
            event.listen(self.engine.sync_engine, "connect", _sqlite_pragmas)
        else:
            _ping_when_idle(self.engine)
        self.sessions = async_sessionmaker(self.engine, expire_on_commit=False)
        # PostgreSQL reads run without a transaction: under READ COMMITTED each statement sees
        # its own snapshot inside one too, so BEGIN and ROLLBACK were two round trips for
        # nothing (SQLite's reads stay as they are: its transactions are in process).
        readers = (
            self.engine
            if self.is_sqlite
            else self.engine.execution_options(isolation_level="AUTOCOMMIT")
        )
        self._readers = async_sessionmaker(readers, expire_on_commit=False)
        self._write_lock: asyncio.Lock | None = asyncio.Lock() if self.is_sqlite else None
        #: SQLite file databases: the hot statements' own connections (`store.sqlite_raw`).
        self.raw: RawSqlite | None = None
        path = make_url(url).database if self.is_sqlite else None
        if path not in (None, "", ":memory:") and not str(path).startswith("file:"):
            self.raw = RawSqlite(str(path), self.engine.dialect, _pragmas)
        #: `report`'s engine on a SQLite file (made on first use).
        self._reports: AsyncEngine | None = None
        self._report_sessions: async_sessionmaker[AsyncSession] | None = None
        #: `fast_pool`'s pools, by "custom plans only".
        self._fast_pools: dict[bool, Any] = {}
        self._fast_opening = asyncio.Lock()

    @asynccontextmanager
    async def writing(self) -> AsyncIterator[None]:
        """Hold this process's write turn (SQLite only; PostgreSQL needs none).

        SQLite lets one writer at a time hold the file; a second connection that finds it locked
        sleeps in its busy handler (milliseconds, growing), which ruins throughput. Taking turns
        in process first means connections never contend; only other processes can.
        """
        if self._write_lock is None:
            yield
            return
        async with self._write_lock:
            yield

    @asynccontextmanager
    async def session(self) -> AsyncIterator[AsyncSession]:
        """A write transaction: commits on success, rolls back on error. Do not nest."""
        async with self.writing(), self.sessions() as session, session.begin():
            yield session

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncSession]:
        """A read-only session (no write turn; WAL readers never block the writer). On
        PostgreSQL its statements run outside a transaction (autocommit): never write in it."""
        async with self._readers() as session:
            yield session

    @asynccontextmanager
    async def report(self) -> AsyncIterator[AsyncSession]:
        """A read-only session for reads that scan many rows (statistics, the alert engine's
        counts), as `read` gives otherwise.

        On a SQLite file its statements run on their connection's thread (aiosqlite as it
        is, not `store.sqlite_inline`): the engine of `read` runs each statement on the
        event loop's thread, which is right for the service's short statements, but while a
        scan of a large table runs there every request of the process waits for it. The
        sqlite3 module lets go of the GIL while SQLite works, so the loop keeps serving. On
        PostgreSQL (and an in-memory SQLite database) it is `read`."""
        if self.raw is None:
            async with self.read() as session:
                yield session
            return
        if self._report_sessions is None:
            self._reports = create_async_engine(self.url, **_JSON, pool_size=2, max_overflow=2)
            event.listen(self._reports.sync_engine, "connect", _report_pragmas)
            self._report_sessions = async_sessionmaker(self._reports, expire_on_commit=False)
        async with self._report_sessions() as session:
            yield session

    async def ping(self) -> bool:
        try:
            async with self.engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
            return True
        except (OSError, DBAPIError, OperationalError):
            return False

    async def fast_pool(self, *, custom_plans: bool = True) -> Any:
        """PostgreSQL only: an asyncpg pool of `store.fast` (made on first use, closed by
        `dispose`).

        `custom_plans` (the default): its connections plan every statement for its values
        (`plan_cache_mode=force_custom_plan`). They run a few statements prepared once, with
        lists as array parameters, and a generic plan made while a table was new and small
        (never analyzed) chose sequential scans and kept them as the table grew (measured:
        150-200 ms per content read at 60,000 messages).

        `custom_plans=False`: one generic plan per statement and connection
        (`force_generic_plan`), made once, with sequential scans priced out
        (`enable_seqscan=off`), so the plan cannot turn into a scan of a table that has
        grown since it was made. Only for statements that reach every table through an
        index and whose best plan does not depend on their values: the accept's inserts from
        arrays, the claim (by `ix_deliveries_claim`, then the primary key), the flat flush
        (by primary key). Re-planning those at every execution cost PostgreSQL 0.3 ms per
        claim and +0.34 ms per message of the accept at 300 messages/s (measured); PostgreSQL's
        own `auto` mode kept custom plans for the claim, whose generic estimate of a
        `LIMIT $n` (a tenth of the rows) is far above its custom ones. The engine's own
        connections keep the default (`auto`), which their many one-off statements are
        better off with."""
        assert not self.is_sqlite
        pool = self._fast_pools.get(custom_plans)
        if pool is None:
            async with self._fast_opening:
                pool = self._fast_pools.get(custom_plans)
                if pool is None:
                    import asyncpg

                    url = make_url(self.url).set(drivername="postgresql")
                    plans = (
                        {"plan_cache_mode": "force_custom_plan"}
                        if custom_plans
                        else {"plan_cache_mode": "force_generic_plan", "enable_seqscan": "off"}
                    )
                    pool = await asyncpg.create_pool(
                        url.render_as_string(hide_password=False),
                        min_size=1,
                        max_size=FAST_POOL_SIZE,
                        server_settings=plans,
                        reset=_keep_session,
                    )
                    self._fast_pools[custom_plans] = pool
        return pool

    async def dispose(self) -> None:
        pools, self._fast_pools = self._fast_pools, {}
        for pool in pools.values():
            try:
                await asyncio.wait_for(pool.close(), 5.0)
            except Exception:  # a connection stuck: do not hang the shutdown
                pool.terminate()
        if self.raw is not None:
            self.raw.close()
        if self._reports is not None:
            await self._reports.dispose()
            self._reports = self._report_sessions = None
        await self.engine.dispose()


async def _keep_session(_connection: Any) -> None:
    """`fast_pool`'s reset on release: nothing beyond asyncpg's own (a ROLLBACK when a
    transaction was left open, a cancelled statement awaited). Its default also runs
    `SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL` at every release: a
    second round trip per statement, for session state `store.fast`'s single statements
    never make (no SET, cursor, LISTEN or advisory lock)."""


def json_dumps(value: Any) -> str:
    """JSON columns' encoder: orjson (8 times the standard library's speed on the rows accept
    and the worker write), with non-string keys turned into strings as `json.dumps` does."""
    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()


#: Connections of `Database.fast_pool` (the worker runs its fast statements one or two at a
#: time).
FAST_POOL_SIZE = 4

#: A pooled PostgreSQL connection idle for longer than this is pinged before it is used.
IDLE_PING_SECONDS = 1.0


def _ping_when_idle(engine: AsyncEngine) -> None:
    """Ping a pooled connection at checkout only when it sat idle over `IDLE_PING_SECONDS`.

    `pool_pre_ping` pinged at every checkout, and asyncpg's ping is three round trips (BEGIN,
    `;`, ROLLBACK): ~6 % of the service's CPU under load (bench.profile). A connection in
    steady use needs none. After a database restart, the first statement on a connection used
    within the last second fails (the caller's error path: a 503, a claim or flush retried),
    and SQLAlchemy then invalidates every connection of the pool checked out before; an idle
    one is pinged and replaced at checkout (`DisconnectionError`: the pool connects anew).
    """
    pool = engine.sync_engine.pool
    dialect = engine.sync_engine.dialect

    def checkin(_dbapi_connection: Any, record: Any) -> None:
        if record is not None:
            record.info["idle_since"] = time.monotonic()

    def checkout(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        since = record.info.get("idle_since")
        if since is None or time.monotonic() - since <= IDLE_PING_SECONDS:
            return
        try:
            dialect.do_ping(dbapi_connection)
        except Exception as exc:
            raise DisconnectionError("pooled connection failed its ping") from exc

    event.listen(pool, "checkin", checkin)
    event.listen(pool, "checkout", checkout)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    _pragmas(dbapi_connection)


#: WAL pages after which a commit checkpoints (`_pragmas`), if the writing process's
#: checkpointer thread has not (`store.sqlite_checkpoint`).
WAL_AUTOCHECKPOINT_PAGES = 10_000


def _pragmas(dbapi_connection: Any) -> None:
    """Every SQLite connection's settings: the engine's and `store.sqlite_raw`'s."""
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    # A checkpoint runs inside the commit that passes this many WAL pages, on the committing
    # connection's thread (the loop's, for `store.sqlite_raw`). The writing process
    # checkpoints from a thread every 0.25 s (`store.sqlite_checkpoint`); this is the floor
    # behind it, 10,000 pages (40 MB of WAL) instead of SQLite's 1,000.
    cursor.execute(f"PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT_PAGES}")
    cursor.execute("PRAGMA foreign_keys=ON")
    # No busy timeout here: `sqlite_inline.inline_connect` opens every connection with 0 and
    # a locked database is waited for on the connection's thread (store/sqlite_inline.py).
    # Deleted and overwritten content is zeroed in the file, so what retention erases is gone
    # from the database file (older page images can stay in the WAL until it is overwritten).
    cursor.execute("PRAGMA secure_delete=ON")
    cursor.close()


#: How both engines store and read JSON columns.
_JSON: dict[str, Any] = {"json_serializer": json_dumps, "json_deserializer": orjson.loads}


def _report_pragmas(dbapi_connection: Any, _record: Any) -> None:
    """`Database.report`'s connections: the service's settings, and a busy timeout (they
    wait on their own threads, never on the loop's)."""
    _pragmas(dbapi_connection)
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    cursor.close()


def alembic_config(url: str) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    cfg.attributes["configure_logger"] = False
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    """Run Alembic migrations up to `revision` (blocking; call from a thread in async code)."""
    from alembic import command

    _ensure_sqlite_dir(url)
    command.upgrade(alembic_config(url), revision)


async def upgrade_async(url: str) -> None:
    await asyncio.to_thread(upgrade, url)


def _ensure_sqlite_dir(url: str) -> None:
    parsed = make_url(url)
    if parsed.drivername.startswith("sqlite") and parsed.database not in (None, "", ":memory:"):
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
