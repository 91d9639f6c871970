"""Group commit for accepted messages: many concurrent sends, one transaction.

`accept()` callers hand their rows to the writer and wait; a single writer task takes whatever
is waiting (up to `max_batch` messages), writes it in one transaction, and only then wakes each
caller. A batch send hands a group of messages (`write_group`): a group is committed whole in
one transaction or not at all, never split across transactions. Durability is unchanged (an
answer still means "committed"), but the database does one commit for a burst instead of one
per request. Idempotency keys are inserted first with `ON CONFLICT DO NOTHING`: a message whose
key is already stored is not written, and its caller is told so (it then answers the stored
first answer, or 409). If a batch still fails on a constraint, each group of the batch is
retried alone so only the offending one sees it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Table
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from clinicomm.callbacks.queue import CALLBACKS
from clinicomm.delivery.outbox import enqueue
from clinicomm.delivery.records import NewDelivery
from clinicomm.store.db import Database
from clinicomm.store.models import IdempotencyKey, Message

log = logging.getLogger(__name__)

MESSAGES: Table = Message.__table__  # type: ignore[assignment]
IDEMPOTENCY: Table = IdempotencyKey.__table__  # type: ignore[assignment]
#: Insert idempotency keys where free, answering those inserted; by "is PostgreSQL".
_CLAIM_KEYS = {
    dialect: insert(IDEMPOTENCY)
    .on_conflict_do_nothing()
    .returning(IDEMPOTENCY.c.scope, IDEMPOTENCY.c.key)
    for dialect, insert in ((True, pg_insert), (False, sqlite_insert))
}


@dataclass
class PendingWrite:
    """One accepted message's rows."""

    message: dict[str, Any]
    deliveries: list[NewDelivery]
    idempotency: dict[str, Any] | None = None
    #: `callback_events` rows (deliveries recorded `failed` at accept, with a callback target).
    callbacks: list[dict[str, Any]] = field(default_factory=list)
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
        self._queue: asyncio.Queue[list[PendingWrite]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self.batches = 0

    async def write(self, item: PendingWrite) -> bool:
        """Queue the rows and wait for their commit (re-raising its error). False: the
        idempotency key is already stored, and nothing was written."""
        (written,) = await self.write_group([item])
        return written

    async def write_group(self, items: list[PendingWrite]) -> list[bool]:
        """Queue several messages to be committed in one transaction, all or none; wait for
        the commit (re-raising its error). One flag per item, False where its idempotency key
        was already stored (that item alone was not written)."""
        if not items:
            return []
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="accept-writer")
        self._queue.put_nowait(items)
        return list(await asyncio.shield(asyncio.gather(*(item.done for item in items))))

    async def _run(self) -> None:
        while True:
            groups = [await self._queue.get()]
            size = len(groups[0])
            while size < self.max_batch and not self._queue.empty():
                groups.append(self._queue.get_nowait())
                size += len(groups[-1])
            batch = [item for group in groups for item in group]
            try:
                await self._commit(batch)
            except IntegrityError as exc:
                if len(groups) == 1:
                    _fail(batch, exc)
                else:
                    for group in groups:
                        try:
                            await self._commit(group)
                        except Exception as exc:
                            _fail(group, exc)
            except Exception as exc:
                _fail(batch, exc)

    async def _commit(self, batch: list[PendingWrite]) -> None:
        async with self.db.writing(), self.db.engine.begin() as conn:
            taken = await self._claim_keys(conn, batch)
            writes = [i for i in batch if id(i) not in taken]
            if writes:
                await conn.execute(MESSAGES.insert(), [i.message for i in writes])
                await enqueue(conn, [d for i in writes for d in i.deliveries])
                events = [e for i in writes for e in i.callbacks]
                if events:
                    await conn.execute(CALLBACKS.insert(), events)
                if self.before_commit is not None:
                    await self.before_commit(conn)
        self.batches += 1
        if self.after_commit is not None and writes:
            self.after_commit()
        if writes:
            log.info(
                "messages accepted",
                extra={
                    "event": "messages_accepted",
                    "messages": len(writes),
                    "deliveries": sum(len(i.deliveries) for i in writes),
                },
            )
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
        # An executemany of one cached statement (SQLAlchemy's insertmanyvalues batches it),
        # not a multi-row VALUES: that one is compiled anew for every batch size.
        statement = _CLAIM_KEYS[conn.dialect.name == "postgresql"]
        keys = [i.idempotency for i in first.values() if i.idempotency is not None]
        rows = await conn.execute(statement, keys)
        stored = {(row.scope, row.key) for row in rows}
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
