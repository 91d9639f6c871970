"""Group commit for accepted messages: many concurrent sends, one transaction.

`accept()` callers hand their rows to the writer and wait; a single writer task takes whatever
is waiting (up to `max_batch` messages), writes it in one transaction, and only then wakes each
caller. Durability is unchanged (an answer still means "committed"), but the database does one
commit for a burst instead of one per request. Idempotency keys are inserted first with
`ON CONFLICT DO NOTHING`: a message whose key is already stored is not written, and its caller
is told so (it then answers the stored first answer, or 409). If a batch still fails on a
constraint, each message of the batch is retried alone so only the offending one sees it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Table
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from clinicomm.delivery.outbox import enqueue
from clinicomm.delivery.records import NewDelivery
from clinicomm.store.db import Database
from clinicomm.store.models import IdempotencyKey, Message

MESSAGES: Table = Message.__table__  # type: ignore[assignment]
IDEMPOTENCY: Table = IdempotencyKey.__table__  # type: ignore[assignment]


@dataclass
class PendingWrite:
    """One accepted message's rows."""

    message: dict[str, Any]
    deliveries: list[NewDelivery]
    idempotency: dict[str, Any] | None = None
    #: Resolves to True once committed, or False when the idempotency key was already taken
    #: (nothing of this message was written).
    done: asyncio.Future[bool] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class BatchWriter:
    """Writes accepted messages in group commits; `write()` returns once committed."""

    def __init__(
        self,
        db: Database,
        *,
        before_commit: Callable[[AsyncConnection], Awaitable[None]] | None = None,
        after_commit: Callable[[], None] | None = None,
        max_batch: int = 256,
    ) -> None:
        self.db = db
        self.before_commit = before_commit
        self.after_commit = after_commit
        self.max_batch = max_batch
        self._queue: asyncio.Queue[PendingWrite] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self.batches = 0

    async def write(self, item: PendingWrite) -> bool:
        """Queue the rows and wait for their commit (re-raising its error). False: the
        idempotency key is already stored, and nothing was written."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="accept-writer")
        self._queue.put_nowait(item)
        return await asyncio.shield(item.done)

    async def _run(self) -> None:
        while True:
            first = await self._queue.get()
            batch = [first]
            while len(batch) < self.max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                await self._commit(batch)
            except IntegrityError as exc:
                if len(batch) == 1:
                    _fail(batch, exc)
                else:
                    for item in batch:
                        try:
                            await self._commit([item])
                        except Exception as exc:
                            _fail([item], exc)
            except Exception as exc:
                _fail(batch, exc)

    async def _commit(self, batch: list[PendingWrite]) -> None:
        async with self.db.writing(), self.db.engine.begin() as conn:
            taken = await self._claim_keys(conn, batch)
            writes = [i for i in batch if id(i) not in taken]
            if writes:
                await conn.execute(MESSAGES.insert(), [i.message for i in writes])
                await enqueue(conn, [d for i in writes for d in i.deliveries])
                if self.before_commit is not None:
                    await self.before_commit(conn)
        self.batches += 1
        if self.after_commit is not None and writes:
            self.after_commit()
        for item in batch:
            if not item.done.done():
                item.done.set_result(id(item) not in taken)

    async def _claim_keys(self, conn: AsyncConnection, batch: list[PendingWrite]) -> set[int]:
        """Insert the batch's idempotency keys where free; the ids of items whose key was
        already taken (stored earlier, or by an earlier item of this batch)."""
        first: dict[tuple[str, str], PendingWrite] = {}
        taken: set[int] = set()
        for item in batch:
            if item.idempotency is None:
                continue
            key = (item.idempotency["scope"], item.idempotency["key"])
            if key in first:
                taken.add(id(item))
            else:
                first[key] = item
        if not first:
            return taken
        insert = pg_insert if conn.dialect.name == "postgresql" else sqlite_insert
        statement = (
            insert(IDEMPOTENCY)
            .values([i.idempotency for i in first.values()])
            .on_conflict_do_nothing()
            .returning(IDEMPOTENCY.c.scope, IDEMPOTENCY.c.key)
        )
        stored = {(row.scope, row.key) for row in await conn.execute(statement)}
        taken.update(id(item) for key, item in first.items() if key not in stored)
        return taken

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


def _fail(batch: list[PendingWrite], exc: Exception) -> None:
    for item in batch:
        if not item.done.done():
            item.done.set_exception(exc)
