"""The provider chain of one clinic and channel, and the adapters behind it.

Order: the clinic's primary → its enabled fallbacks → the global providers (unless the
clinic's `fallbackStrategy.enabled` is false; when `fallbackProvider` names a provider key,
only the global providers with that key). A clinic without settings for the channel gets the
global chain. `fallbackProvider` naming another channel (`sms`) adds a channel fallback after
every provider of this channel has failed for reasons other than the patient.

Like Symfony's FailoverTransport, a chain prints as a tree: `failover(clinic:sendgrid clinic:smtp
global:smtp)`. Adapters are built once per (clinic, channel, settings version); a new version
builds new adapters and closes the old ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field

from clinicomm.providers import registry
from clinicomm.providers.base import AdapterContext, Channel, ProviderAdapter
from clinicomm.settings.models import ChannelSettings, EmailSettings, ProviderConfig
from clinicomm.settings.service import ResolvedChannel

log = logging.getLogger(__name__)

CHANNEL_NAMES = {c.value for c in Channel}


@dataclass(frozen=True, slots=True)
class Hop:
    """One provider in a chain."""

    #: `clinic:sendgrid`, `global:smtp` (a suffix `#2` when a key repeats).
    label: str
    scope: str
    key: str
    adapter: ProviderAdapter
    #: Transient retries allowed on this provider before moving on.
    retry_attempts: int
    from_email: str | None = None
    from_name: str | None = None
    #: (sender id, messages per second) when the provider caps a sender's throughput
    #: (a WhatsApp phone number: 80/s by default).
    throughput: tuple[str, int] | None = None

    def health_owner(self, clinic_id: str | None) -> str | None:
        """Whose health this hop's outcomes count for: the clinic's, for its own provider, or
        the platform's (None) for a global provider, shared by every clinic that uses it."""
        return clinic_id if self.scope == "clinic" else None


@dataclass(frozen=True, slots=True)
class Chain:
    """The ordered providers for one (clinic, channel, version)."""

    channel: Channel
    hops: tuple[Hop, ...]
    #: Another channel to try when every provider here failed (not for recipient/compliance).
    channel_fallback: Channel | None = None
    #: Why the chain is empty, when it is.
    empty_reason: str | None = None

    def __str__(self) -> str:
        return "failover(" + " ".join(h.label for h in self.hops) + ")"


@dataclass
class _Built:
    version: int
    chain: Chain
    adapters: list[ProviderAdapter] = field(default_factory=list)


class ChainBuilder:
    """Builds and caches chains and their adapters; closes adapters of replaced configs."""

    def __init__(self, context: AdapterContext) -> None:
        self.context = context
        self._clinic: dict[tuple[str | None, Channel], _Built] = {}
        self._global: dict[Channel, list[tuple[ProviderConfig, ProviderAdapter]]] = {}
        self._closing: set[asyncio.Task[None]] = set()

    def chain(self, resolved: ResolvedChannel) -> Chain:
        """The chain for this resolved config (built on first use of each version)."""
        cache_key = (resolved.clinic_id, resolved.channel)
        built = self._clinic.get(cache_key)
        if built is not None and built.version == resolved.version:
            return built.chain
        fresh = self._build(resolved)
        self._clinic[cache_key] = fresh
        if built is not None:
            self._close_later(built.adapters)
        return fresh.chain

    def _build(self, resolved: ResolvedChannel) -> _Built:
        channel = resolved.channel
        hops: list[Hop] = []
        own_adapters: list[ProviderAdapter] = []
        labels: dict[str, int] = {}
        channel_fallback: Channel | None = None
        empty_reason = None
        own = resolved.own
        include_global = True
        only_key: str | None = None
        if own is not None:
            if not own.enabled:
                return _Built(
                    resolved.version,
                    Chain(channel, (), None, f"{channel.value} is disabled for this clinic"),
                )
            for slot in own.own_providers():
                adapter = self._adapter(slot, channel)
                own_adapters.append(adapter)
                hops.append(self._hop("clinic", slot, adapter, own, labels))
            strategy = own.fallback_strategy
            include_global = strategy.enabled
            target = strategy.fallback_provider
            if target in CHANNEL_NAMES and target != channel.value:
                channel_fallback = Channel(target)
                include_global = False
            elif target not in ("global", channel.value):
                only_key = registry.canonical_key(channel, target)
        if include_global and resolved.global_ is not None and resolved.global_.enabled:
            for slot, adapter in self._global_adapters(resolved.global_, channel):
                if only_key is None or slot.provider == only_key:
                    hops.append(self._hop("global", slot, adapter, resolved.global_, labels))
        if not hops:
            empty_reason = f"no {channel.value} provider is configured for this clinic or globally"
        return _Built(
            resolved.version,
            Chain(channel, tuple(hops), channel_fallback, empty_reason),
            own_adapters,
        )

    def _hop(
        self,
        scope: str,
        slot: ProviderConfig,
        adapter: ProviderAdapter,
        settings: ChannelSettings,
        labels: dict[str, int],
    ) -> Hop:
        base = f"{scope}:{slot.provider}"
        labels[base] = labels.get(base, 0) + 1
        label = base if labels[base] == 1 else f"{base}#{labels[base]}"
        from_email = from_name = None
        if isinstance(settings, EmailSettings):
            from_email, from_name = settings.default_from, settings.default_from_name
        throughput = None
        fields = type(adapter).throughput_fields
        if fields is not None:
            sender = getattr(slot.credentials, fields[0], None)
            cap = getattr(slot.credentials, fields[1], None)
            if isinstance(sender, str) and isinstance(cap, int):
                throughput = (sender, cap)
        return Hop(
            label=label,
            scope=scope,
            key=slot.provider,
            adapter=adapter,
            retry_attempts=settings.fallback_strategy.retry_attempts,
            from_email=from_email,
            from_name=from_name,
            throughput=throughput,
        )

    def _global_adapters(
        self, settings: ChannelSettings, channel: Channel
    ) -> list[tuple[ProviderConfig, ProviderAdapter]]:
        built = self._global.get(channel)
        if built is None:
            built = [(slot, self._adapter(slot, channel)) for slot in settings.own_providers()]
            self._global[channel] = built
        return built

    def _adapter(self, slot: ProviderConfig, channel: Channel) -> ProviderAdapter:
        spec = registry.get(channel, slot.provider)
        assert slot.credentials is not None
        return spec.adapter(slot.credentials, self.context)

    def _close_later(self, adapters: list[ProviderAdapter]) -> None:
        if not adapters:
            return
        task = asyncio.get_running_loop().create_task(_close_all(adapters))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        adapters = [a for b in self._clinic.values() for a in b.adapters]
        adapters += [a for items in self._global.values() for _, a in items]
        self._clinic.clear()
        self._global.clear()
        await _close_all(adapters)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)


async def _close_all(adapters: list[ProviderAdapter]) -> None:
    for adapter in adapters:
        with contextlib.suppress(Exception):
            await adapter.close()
