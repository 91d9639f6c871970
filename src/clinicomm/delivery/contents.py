"""Message contents for the worker: read and decrypted per claimed batch, one row at a time.

`Contents.load(message ids)` reads the batch's messages in one query and decrypts each with
its clinic's data key (the platform key for messages without a clinic). A row that cannot be
decrypted here (written under a master key this process does not hold, a damaged blob) is
remembered as unreadable and fails only its own deliveries (`configuration`); an erased row
(retention) is remembered as erased. `lookup` answers one of the three.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

import orjson
from sqlalchemy import select
from sqlalchemy.sql import Select

from clinicomm.delivery.records import Content
from clinicomm.settings.keys import PLATFORM, KeyStore
from clinicomm.store import fast
from clinicomm.store.among import among_param
from clinicomm.store.db import Database
from clinicomm.store.models import Message

log = logging.getLogger(__name__)

def _load_statement(postgresql: bool) -> Select[str, str | None, bytes, str, bool]:
    return select(
        Message.id,
        Message.clinic_id,
        Message.content,
        Message.category,
        Message.callback_url.is_(None).label("no_target"),
    ).where(among_param(Message.id, "ids", postgresql=postgresql))


#: `Contents.load`'s query by "is PostgreSQL" (built once: `store.fast`).
_LOAD = {postgresql: _load_statement(postgresql) for postgresql in (True, False)}

#: Entries kept per kind (a bounded cache: contents are re-read when evicted).
MAX_ENTRIES = 10_000
#: Contents handed over at accept and not claimed yet (`Contents.prime`), oldest dropped
#: first: two seconds of slack at 1,000 messages/s. Apart from the cache above, so a worker
#: far behind (a burst of batches) loses only primes it would not reach in time, never the
#: contents of what it has claimed.
PRIMED_ENTRIES = 2_000


@dataclass(frozen=True, slots=True)
class Erased:
    """Erased after the retention period."""


@dataclass(frozen=True, slots=True)
class Unreadable:
    """Cannot be decrypted by this process; `error` is the exception's class name."""

    error: str


class Contents:
    """The decrypted contents of recently claimed messages (in memory only)."""

    def __init__(self, db: Database, keys: KeyStore) -> None:
        self.db = db
        self.keys = keys
        self._contents: OrderedDict[str, Content] = OrderedDict()
        #: message id → (content, has a callback target): primed, not loaded yet.
        self._primed: OrderedDict[str, tuple[Content, bool]] = OrderedDict()
        self._erased: set[str] = set()
        self._unreadable: dict[str, str] = {}
        #: Messages read without a callback target (`callback_url` is only ever set at
        #: accept, and only ever cleared later), so their outcomes need no callback lookup.
        self._no_target: set[str] = set()

    def lookup(self, message_id: str) -> Content | Erased | Unreadable | None:
        """The content, why there is none, or None when it was never loaded."""
        content = self._contents.get(message_id)
        if content is not None:
            return content
        if message_id in self._erased:
            return Erased()
        error = self._unreadable.get(message_id)
        return Unreadable(error) if error is not None else None

    def may_call_back(self, message_id: str) -> bool:
        """False only for a message this process read without a callback target."""
        return message_id not in self._no_target

    def prime(self, message_id: str, data: bytes, category: str, *, has_target: bool) -> None:
        """A message this process has just committed: its content's JSON as it was encrypted
        into the row (`MessagingService.share_contents`), so the worker need not read it back
        and decrypt it (`load` takes it from here). The same `Content` as `load` would make."""
        self._primed[message_id] = (Content.from_json(orjson.loads(data), category), has_target)
        while len(self._primed) > PRIMED_ENTRIES:
            self._primed.popitem(last=False)

    async def load(self, message_ids: list[str]) -> None:
        """Read and decrypt the messages not loaded yet. Raises only for a database error."""
        missing = []
        for m in dict.fromkeys(message_ids):
            if m in self._contents:
                continue
            primed = self._primed.pop(m, None)
            if primed is None:
                missing.append(m)
                continue
            self._contents[m] = primed[0]
            if not primed[1]:
                self._no_target.add(m)
        if not missing:
            self._bound()
            return
        rows = await fast.rows(
            self.db, _LOAD[not self.db.is_sqlite], {"ids": missing}, writes=False
        )
        for row in rows:
            message_id, clinic_id, blob = row["id"], row["clinic_id"], row["content"]
            category, no_target = row["category"], row["no_target"]
            if no_target:
                self._no_target.add(message_id)
            if not blob:
                self._erased.add(message_id)
                continue
            try:
                cipher = await self.keys.cipher_for(self.db, clinic_id or PLATFORM)
                data = orjson.loads(cipher.decrypt_bytes(blob, f"message:{message_id}"))
            except Exception as exc:
                self._unreadable[message_id] = type(exc).__name__
                log.warning(
                    "message content cannot be decrypted here",
                    extra={
                        "event": "content_undecryptable",
                        "messageId": message_id,
                        "clinicId": clinic_id,
                        "error": type(exc).__name__,
                    },
                )
                continue
            self._unreadable.pop(message_id, None)
            self._contents[message_id] = Content.from_json(data, category)
        self._bound()

    def _bound(self) -> None:
        while len(self._contents) > MAX_ENTRIES:
            self._contents.popitem(last=False)
        if len(self._unreadable) > MAX_ENTRIES:
            self._unreadable.clear()
        if len(self._erased) > MAX_ENTRIES:
            self._erased.clear()
        if len(self._no_target) > MAX_ENTRIES:
            self._no_target.clear()  # forgetting only costs a callback lookup
