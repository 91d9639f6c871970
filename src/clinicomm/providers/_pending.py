"""Placeholder behaviour for adapters whose provider module has its credentials but no client yet.

Sending through one fails as a configuration error (the clinic's config names a provider this
build cannot call), so the worker fails over instead of crashing. Removed once every adapter is
implemented.
"""

from __future__ import annotations

from clinicomm.providers.base import OutboundMessage, ProviderAdapter, SendResult
from clinicomm.providers.errors import ConfigurationError


class PendingAdapter(ProviderAdapter):
    """An adapter that is declared but cannot send yet."""

    async def send(self, message: OutboundMessage) -> SendResult:
        raise ConfigurationError("adapter not implemented in this build", provider=self.key)

    async def probe(self) -> None:
        raise ConfigurationError("adapter not implemented in this build", provider=self.key)
