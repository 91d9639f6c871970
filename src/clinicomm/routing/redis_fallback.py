"""Running Redis calls for the routing libraries (health, limits) with an in-process fallback.

Contract: a Redis failure (connection refused, timeout, script error, …) never reaches the
caller. The operation is answered by the in-process implementation instead, a warning is
logged at most once per `warn_every` seconds per component, and
`communication_routing_redis_fallback{component, op}` is incremented.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from redis.exceptions import RedisError

from clinicomm.telemetry import metrics

log = logging.getLogger(__name__)

T = TypeVar("T")


class RedisFallback:
    """Runs a Redis operation; on failure runs the in-process one and warns (rate-limited)."""

    def __init__(self, component: str, *, warn_every: float = 60.0) -> None:
        self.component = component
        self.warn_every = warn_every
        self.failures = 0
        self._last_warning: float | None = None

    async def run(
        self,
        op: str,
        remote: Callable[[], Awaitable[T]],
        local: Callable[[], Awaitable[T]],
    ) -> T:
        """`remote()`, or `local()` when it raised a Redis/network error."""
        try:
            return await remote()
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed(op, exc)
        return await local()

    def _failed(self, op: str, exc: BaseException) -> None:
        self.failures += 1
        metrics.ROUTING_REDIS_FALLBACK.labels(self.component, op).inc()
        now = time.monotonic()
        if self._last_warning is None or now - self._last_warning >= self.warn_every:
            self._last_warning = now
            log.warning(
                "redis unavailable; %s answered in process",
                self.component,
                extra={
                    "event": "redis_unavailable",
                    "component": self.component,
                    "op": op,
                    "error": type(exc).__name__,
                },
            )


def text(value: bytes | str | None) -> str | None:
    """A Redis reply as text, whether or not the client decodes responses."""
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else value
