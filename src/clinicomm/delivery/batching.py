"""One provider call for many deliveries: the coalescer between the sender and the adapters.

Every delivery still walks its own chain (`delivery.sender`): admission, one adapter call,
the decision, its own attempt row and status. `Coalescer.send(adapter, message)` is that
adapter call. For an adapter with `max_batch` > 1 and a `batch_key` for the message, the
message waits up to `window` seconds (a few milliseconds: the deliveries of one claimed batch
reach this point within a few loop turns) for others of the same adapter and key; the group
then goes out in one `send_batch` call, at once when it reaches `max_batch`. Each caller gets
its own entry of the answer: its `SendResult`, or raises its own `ProviderError` (a batch that
fails partly fails only the recipients the provider named). A group of one goes through
`send` unchanged.

Adapters are built per (clinic, provider, settings version), so grouping by adapter already
keeps one clinic's and one provider's deliveries together; the key adds the content.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Hashable
from dataclasses import dataclass, field

from clinicomm.providers.base import OutboundMessage, ProviderAdapter, SendResult
from clinicomm.providers.errors import ProviderDownError, ProviderError

log = logging.getLogger(__name__)

#: How long a message waits for companions of its batch key, in seconds.
DEFAULT_WINDOW = 0.003


@dataclass
class _Group:
    messages: list[OutboundMessage] = field(default_factory=list)
    waiters: list[asyncio.Future[SendResult]] = field(default_factory=list)
    timer: asyncio.TimerHandle | None = None


class Coalescer:
    """Groups concurrent `send` calls per (adapter, batch key) into `send_batch` calls."""

    def __init__(self, window: float = DEFAULT_WINDOW) -> None:
        self.window = window
        self._groups: weakref.WeakKeyDictionary[ProviderAdapter, dict[Hashable, _Group]] = (
            weakref.WeakKeyDictionary()
        )
        self._tasks: set[asyncio.Task[None]] = set()
        #: Batch calls made and messages they carried (tests and the bench read them).
        self.batches = 0
        self.batched = 0

    async def send(self, adapter: ProviderAdapter, message: OutboundMessage) -> SendResult:
        """The adapter's answer for `message`; raises its `ProviderError` like `send` does."""
        if adapter.max_batch <= 1:
            return await adapter.send(message)
        key = adapter.batch_key(message)
        if key is None:
            return await adapter.send(message)
        groups = self._groups.setdefault(adapter, {})
        group = groups.get(key)
        if group is None:
            group = groups[key] = _Group()
            loop = asyncio.get_running_loop()
            group.timer = loop.call_later(self.window, self._flush, adapter, key)
        waiter: asyncio.Future[SendResult] = asyncio.get_running_loop().create_future()
        group.messages.append(message)
        group.waiters.append(waiter)
        if len(group.messages) >= adapter.max_batch:
            self._flush(adapter, key)
        return await waiter

    def _flush(self, adapter: ProviderAdapter, key: Hashable) -> None:
        groups = self._groups.get(adapter)
        group = groups.pop(key, None) if groups is not None else None
        if group is None:
            return
        if group.timer is not None:
            group.timer.cancel()
        task = asyncio.get_running_loop().create_task(self._call(adapter, group))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _call(self, adapter: ProviderAdapter, group: _Group) -> None:
        results: list[SendResult | ProviderError]
        try:
            if len(group.messages) == 1:
                results = [await adapter.send(group.messages[0])]
            else:
                self.batches += 1
                self.batched += len(group.messages)
                results = await adapter.send_batch(group.messages)
                if len(results) != len(group.messages):
                    raise ProviderDownError(
                        "batch answer does not match the request", provider=adapter.key
                    )
        except ProviderError as exc:
            results = [exc] * len(group.messages)
        except Exception as exc:  # an adapter bug: every caller sees it, as from `send`
            for waiter in group.waiters:
                if not waiter.done():
                    waiter.set_exception(exc)
            return
        for waiter, result in zip(group.waiters, results, strict=True):
            if waiter.done():  # the caller was cancelled (shutdown)
                continue
            if isinstance(result, ProviderError):
                waiter.set_exception(result)
            else:
                waiter.set_result(result)


#: The process's coalescer (the sender's default).
COALESCER = Coalescer()
