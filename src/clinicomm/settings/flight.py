"""Single flight: concurrent loads of one key share one call.

A cold cache (a restart, a config change that invalidated a clinic) meets a burst of requests
for the same clinic: without this, each of them read the database, decrypted and validated
the same settings at once (the first half second of a 300 requests/s run answered in up to
0.5 s on SQLite). With it the first caller loads and the others wait for its answer.

Nothing is cached here: a key is in flight only while its load runs. The caller chooses the
key, so a load that must not be shared with one started before some event (a config change)
puts that event's version in the key.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

V = TypeVar("V")


class SingleFlight(Generic[V]):
    """`run(key, load)`: the result of the `load` in flight for `key`, or of this one."""

    def __init__(self) -> None:
        self._flights: dict[Hashable, asyncio.Future[V]] = {}

    async def run(self, key: Hashable, load: Callable[[], Awaitable[V]]) -> V:
        """`load()`'s result (or its exception), shared with every call for `key` that comes
        while it runs. If the caller that runs it is cancelled, the others load themselves."""
        flight = self._flights.get(key)
        if flight is not None:
            try:
                return await asyncio.shield(flight)
            except asyncio.CancelledError:
                if not flight.cancelled():
                    raise  # this caller was cancelled, not the load
            return await self.run(key, load)
        flight = asyncio.get_running_loop().create_future()
        # An exception nobody else waited for is not "never retrieved".
        flight.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._flights[key] = flight
        try:
            value = await load()
        except asyncio.CancelledError:
            flight.cancel()
            raise
        except BaseException as exc:
            flight.set_exception(exc)
            raise
        finally:
            if self._flights.get(key) is flight:
                del self._flights[key]
        flight.set_result(value)
        return value
