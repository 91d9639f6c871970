"""Test fixtures: the database backend and Redis come from the environment.

- `CLINICOMM_TEST_DB=sqlite` (default): a fresh SQLite file per test, no Redis (the embedded
  default). Tests marked `redis` or `postgres` are deselected in this leg, not skipped.
- `CLINICOMM_TEST_DB=postgres`: one fresh PostgreSQL database per test session (created from
  `CLINICOMM_TEST_PG_ADMIN_URL`), tables truncated between tests; Redis from
  `CLINICOMM_TEST_REDIS_URL` on a database number of its own.

With `CI=true` a configured service that does not answer fails the run; it is never skipped.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import secrets
import shutil
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from clinicomm.config import Settings
from clinicomm.runtime import Runtime
from clinicomm.store.db import Database, upgrade

BACKEND = os.environ.get("CLINICOMM_TEST_DB", "sqlite")
PG_ADMIN_URL = os.environ.get(
    "CLINICOMM_TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
REDIS_BASE_URL = os.environ.get("CLINICOMM_TEST_REDIS_URL", "redis://127.0.0.1:6379")
USE_REDIS = BACKEND == "postgres" or os.environ.get("CLINICOMM_TEST_WITH_REDIS") == "1"

#: Secrets written by tests; the canary scans look for these everywhere.
CANARIES: set[str] = set()


def canary(label: str) -> str:
    """A unique secret value that must never appear in clear outside the process."""
    value = f"CANARY-{label}-{secrets.token_hex(8)}"
    CANARIES.add(value)
    return value


#: Modules whose tests measure time or throughput across processes (latency bounds, per-second
#: caps, crash and restart timings): `scripts/test` runs them in a pass of their own, one at a
#: time, after the rest has run on two xdist workers, so no other test competes for the cores.
SERIAL_MODULES = frozenset(
    {
        "tests/api/test_cross_process.py",
        "tests/api/test_serve_processes.py",
        "tests/delivery/test_fairness.py",
        "tests/delivery/test_priority.py",
        "tests/delivery/test_whatsapp_throughput.py",
        "tests/delivery/test_workers.py",
        "tests/faults/test_provider_faults.py",
        "tests/faults/test_service_faults.py",
        "tests/monitoring/test_processes.py",
        "tests/routing/test_limits.py",
        "tests/settings/test_cross_process.py",
    }
)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "redis: needs Redis (runs in the PostgreSQL + Redis leg)")
    config.addinivalue_line("markers", "postgres: needs PostgreSQL")
    config.addinivalue_line("markers", "serial: timing-sensitive; run alone (scripts/test)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.nodeid.split("::", 1)[0] in SERIAL_MODULES:
            item.add_marker(pytest.mark.serial)
    if BACKEND == "postgres":
        return
    keep, drop = [], []
    for item in items:
        needs_pg = item.get_closest_marker("postgres") is not None
        needs_redis = item.get_closest_marker("redis") is not None and not USE_REDIS
        (drop if needs_pg or needs_redis else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def _master_keys() -> str:
    return f"test1:{base64.b64encode(secrets.token_bytes(32)).decode()}"


MASTER_KEYS = _master_keys()


# ---- PostgreSQL ------------------------------------------------------------------------------
async def _pg_admin(sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(PG_ADMIN_URL, timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh, migrated PostgreSQL database for this session (postgres leg only)."""
    name = f"cc_test_{uuid.uuid4().hex[:10]}"
    try:
        asyncio.run(_pg_admin(f'CREATE DATABASE "{name}"'))
    except (OSError, Exception) as exc:
        pytest.fail(f"PostgreSQL at {PG_ADMIN_URL} is not answering: {exc}", pytrace=False)
    base = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
    url = f"{base}/{name}"
    upgrade(url)
    yield url
    asyncio.run(_pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str | None]:
    if not USE_REDIS:
        yield None
        return
    import redis

    # Reserve a database number of our own (a key in db 0), so test sessions running at the
    # same time on this machine never flush each other's data.
    base = REDIS_BASE_URL.rstrip("/")
    admin = redis.Redis.from_url(f"{base}/0", socket_connect_timeout=2)
    try:
        admin.ping()
    except redis.exceptions.RedisError as exc:
        pytest.fail(f"Redis at {base} is not answering: {exc}", pytrace=False)
    token = uuid.uuid4().hex
    for db in range(1, 16):
        if admin.set(f"clinicomm:test:db:{db}", token, nx=True, ex=3600):
            break
    else:
        pytest.fail("every Redis database 1-15 is reserved by other test sessions", pytrace=False)
    url = f"{base}/{db}"
    client = redis.Redis.from_url(url, socket_connect_timeout=2)
    client.flushdb()
    yield url
    client.flushdb()
    client.close()
    if admin.get(f"clinicomm:test:db:{db}") == token.encode():
        admin.delete(f"clinicomm:test:db:{db}")
    admin.close()


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated SQLite file, copied for each test (migrating once is much faster)."""
    path = tmp_path_factory.mktemp("template") / "template.db"
    upgrade(f"sqlite+aiosqlite:///{path}")
    return path


@pytest.fixture
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A migrated, empty database for one test."""
    if BACKEND == "postgres":
        url: str = request.getfixturevalue("pg_url")
        yield url
        asyncio.run(_truncate(url))
    else:
        template: Path = request.getfixturevalue("sqlite_template")
        path = tmp_path / "clinicomm.db"
        shutil.copy(template, path)
        yield f"sqlite+aiosqlite:///{path}"


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    """A `Database` on `database_url`, disposed after the test."""
    database = Database(database_url)
    yield database
    await database.dispose()


async def _truncate(url: str) -> None:
    """`TRUNCATE … RESTART IDENTITY` of the tables the test wrote to.

    A table of zero pages has not been written since it was last truncated, so it is already
    in the state a TRUNCATE would leave; skipping those saves most of the ~150 ms that a
    TRUNCATE of all 14 tables costs, on every test. (Not DELETE: a heap with freed space gives
    rows back in another physical order, and a claim's RETURNING follows that order.) The
    tables are locked first, as a TRUNCATE of all of them would lock them, so a transaction
    the test left running (a worker process still stopping) commits before, never after."""
    import asyncpg

    from clinicomm.store.models import Base

    tables = Base.metadata.sorted_tables
    names = [f'"{t.name}"' for t in tables]
    conn = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"), timeout=5)
    try:
        async with conn.transaction():
            await conn.execute(f"LOCK TABLE {', '.join(names)} IN ACCESS EXCLUSIVE MODE")
            sizes = await conn.fetchrow(
                "SELECT " + ", ".join(f"pg_relation_size('{name}')" for name in names)
            )
            written = [name for name, size in zip(names, sizes, strict=True) if size]
            if written:  # CASCADE adds the tables that reference these
                await conn.execute(f"TRUNCATE {', '.join(written)} RESTART IDENTITY CASCADE")
            # RESTART IDENTITY of the rest (a sequence may move without a row being written).
            sequences = [
                f"setval(pg_get_serial_sequence('{name}', '{t.autoincrement_column.name}'), 1, false)"
                for name, t in zip(names, tables, strict=True)
                if t.autoincrement_column is not None
            ]
            await conn.execute(f"SELECT {', '.join(sequences)}")
    finally:
        await conn.close()


@pytest.fixture
def settings(database_url: str, redis_url: str | None, tmp_path: Path) -> Settings:
    if redis_url:
        # The database is emptied between tests; Redis must not remember older clinics.
        import redis

        client = redis.Redis.from_url(redis_url)
        client.flushdb()
        client.close()
    return Settings(
        database_url=database_url,
        redis_url=redis_url,
        master_keys=MASTER_KEYS,
        jwt_secret="test-jwt-secret-" + "x" * 32,
        env="test",
        data_dir=tmp_path / ".clinicomm",
        config_poll_seconds=0.2,
    )


@pytest.fixture
async def runtime(settings: Settings) -> AsyncIterator[Runtime]:
    rt = await Runtime.create(settings, env={})
    try:
        yield rt
    finally:
        await rt.close()


@pytest.fixture
def log_records(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG)
    return caplog
