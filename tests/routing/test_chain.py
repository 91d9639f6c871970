"""Chain order, fallback strategy, and adapters built once per config version."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from clinicomm.providers.base import AdapterContext, Channel
from clinicomm.routing.backoff import full_jitter, retry_delay
from clinicomm.routing.chain import ChainBuilder
from clinicomm.settings.models import CommunicationSettings
from clinicomm.settings.service import ResolvedChannel

SG = {"provider": "sendgrid", "credentials": {"apiKey": "SG.x"}}
PM = {"provider": "postmark", "credentials": {"serverToken": "t"}}
SMTP = {"provider": "smtp", "credentials": {"host": "h.example"}}


def resolved(
    own: dict[str, Any] | None, glob: dict[str, Any] | None, version: int = 1
) -> ResolvedChannel:
    o = CommunicationSettings.model_validate({"email": own}).email if own else None
    g = CommunicationSettings.model_validate({"email": glob}).email if glob else None
    return ResolvedChannel("c1", Channel.EMAIL, version, o, g)


@pytest.fixture
async def builder() -> Any:
    async with aiohttp.ClientSession() as http:
        chains = ChainBuilder(AdapterContext(http=http))
        yield chains
        await chains.close()


async def test_order_primary_fallbacks_then_global(builder: ChainBuilder) -> None:
    chain = builder.chain(
        resolved({"primary": SG, "fallback": [PM, {**SMTP, "enabled": False}]}, {"primary": SMTP})
    )
    assert str(chain) == "failover(clinic:sendgrid clinic:postmark global:smtp)"


async def test_global_fallback_disabled(builder: ChainBuilder) -> None:
    chain = builder.chain(
        resolved({"primary": SG, "fallbackStrategy": {"enabled": False}}, {"primary": SMTP})
    )
    assert str(chain) == "failover(clinic:sendgrid)"


async def test_fallback_provider_key_filters_the_global_chain(builder: ChainBuilder) -> None:
    chain = builder.chain(
        resolved(
            {"primary": SG, "fallbackStrategy": {"fallbackProvider": "postmark"}},
            {"primary": SMTP, "fallback": [PM]},
        )
    )
    assert str(chain) == "failover(clinic:sendgrid global:postmark)"


async def test_channel_fallback_is_recorded(builder: ChainBuilder) -> None:
    chain = builder.chain(
        resolved(
            {"primary": SG, "fallbackStrategy": {"fallbackProvider": "sms"}}, {"primary": SMTP}
        )
    )
    assert str(chain) == "failover(clinic:sendgrid)"
    assert chain.channel_fallback is Channel.SMS


async def test_no_own_config_uses_global_and_disabled_channel_is_empty(
    builder: ChainBuilder,
) -> None:
    assert str(builder.chain(resolved(None, {"primary": SMTP}))) == "failover(global:smtp)"
    off = builder.chain(resolved({"enabled": False, "primary": SG}, {"primary": SMTP}, version=2))
    assert off.hops == ()
    assert off.empty_reason == "email is disabled for this clinic"


async def test_adapters_are_reused_per_version_and_rebuilt_on_change(builder: ChainBuilder) -> None:
    first = builder.chain(resolved({"primary": SG}, None, version=1))
    again = builder.chain(resolved({"primary": SG}, None, version=1))
    assert again.hops[0].adapter is first.hops[0].adapter
    changed = builder.chain(resolved({"primary": SG}, None, version=2))
    assert changed.hops[0].adapter is not first.hops[0].adapter


def test_full_jitter_bounds() -> None:
    samples = [full_jitter(3, base=1.0, cap=5.0) for _ in range(1000)]
    assert all(0 <= s <= 5.0 for s in samples)
    assert len(set(samples)) > 1
    assert all(0 <= full_jitter(1, base=1.0, cap=100) <= 2.0 for _ in range(200))
    assert all(retry_delay(0, 3.0) >= 3.0 for _ in range(200))
