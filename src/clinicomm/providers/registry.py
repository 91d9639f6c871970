"""Which providers exist, per channel, and how to build their adapters.

A provider module registers itself with one line at import:

    registry.register(SendGridAdapter)

`load_all()` imports every provider module once; the settings schema, the chain builder and the
contract tests all read from here, so adding a provider touches nothing else.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass

from clinicomm.providers.base import Channel, ProviderAdapter, ProviderCredentials

#: A provider key that turns a channel (or one slot of it) off.
DISABLED = "disabled"


@dataclass(frozen=True, slots=True)
class ProviderSpec:
    """Everything the rest of clinicomm needs to know about one provider on one channel."""

    key: str
    channel: Channel
    display_name: str
    credentials_model: type[ProviderCredentials]
    adapter: type[ProviderAdapter]
    #: Other spellings accepted in settings documents (the adapter's `aliases`).
    aliases: tuple[str, ...] = ()


_SPECS: dict[tuple[Channel, str], ProviderSpec] = {}
_loaded = False


def register(adapter: type[ProviderAdapter]) -> type[ProviderAdapter]:
    """Register an adapter class (usable as a decorator). A key is registered once per channel."""
    spec = ProviderSpec(
        key=adapter.key,
        channel=adapter.channel,
        display_name=adapter.display_name,
        credentials_model=adapter.credentials_model,
        adapter=adapter,
        aliases=tuple(adapter.aliases),
    )
    existing = _SPECS.get((spec.channel, spec.key))
    if existing is not None and existing.adapter is not adapter:
        raise ValueError(f"provider {spec.channel.value}:{spec.key} is already registered")
    _SPECS[(spec.channel, spec.key)] = spec
    return adapter


def unregister(channel: Channel, key: str) -> None:
    """Remove a provider (tests that register fakes clean up with this)."""
    _SPECS.pop((channel, key), None)


def load_all() -> None:
    """Import every module under providers/email, providers/whatsapp and providers/sms."""
    global _loaded
    if _loaded:
        return
    for sub in ("email", "whatsapp", "sms"):
        package = importlib.import_module(f"clinicomm.providers.{sub}")
        for info in pkgutil.iter_modules(package.__path__):
            if not info.name.startswith("_"):
                importlib.import_module(f"clinicomm.providers.{sub}.{info.name}")
    _loaded = True


def canonical_key(channel: Channel, key: str) -> str:
    """The canonical provider key for a spelling accepted in settings (`aws_ses` → `ses`)."""
    return aliases(channel).get(key, key)


def aliases(channel: Channel) -> dict[str, str]:
    """Other spellings accepted in settings for `channel`, mapped to the canonical key."""
    load_all()
    return {alias: s.key for s in _SPECS.values() if s.channel == channel for alias in s.aliases}


def get(channel: Channel, key: str) -> ProviderSpec:
    """The provider registered under `key` for `channel`; KeyError if there is none."""
    load_all()
    return _SPECS[(channel, canonical_key(channel, key))]


def default_key(channel: Channel) -> str:
    """The provider the seed's variables assume for `channel` when `<CHANNEL>_PROVIDER` is
    unset: the one whose adapter declares `global_default`."""
    for spec in specs(channel):
        if spec.adapter.global_default:
            return spec.key
    raise LookupError(f"no provider declares itself the {channel.value} default")


def specs(channel: Channel | None = None) -> list[ProviderSpec]:
    """Every registered provider, optionally for one channel, sorted by channel then key."""
    load_all()
    found = [s for s in _SPECS.values() if channel is None or s.channel == channel]
    return sorted(found, key=lambda s: (s.channel.value, s.key))


def keys(channel: Channel) -> list[str]:
    """Canonical provider keys for a channel (without `disabled` and aliases)."""
    return [s.key for s in specs(channel)]
