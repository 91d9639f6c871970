"""The seed's `testEmailConfig` / `testWhatsAppConfig` (and SMS): one short test message
through the clinic's OWN providers, never the global one.

Primary first, then each fallback, until one accepts the message; the answer names the
provider that worked (with its latency and message id) or, when none did, each provider's
classified, redacted error. Every test is audited (`communication.test`: channel, provider
keys and outcomes only; never the address, the body or a secret).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select

from clinicomm.ids import new_id
from clinicomm.providers.base import Channel, OutboundMessage
from clinicomm.providers.email_address import EmailNotValidError, normalize_email
from clinicomm.providers.errors import ProviderDownError, ProviderError
from clinicomm.providers.phone import normalize_e164
from clinicomm.routing.chain import ChainBuilder
from clinicomm.settings.service import ClinicNotFoundError, ConfigService
from clinicomm.store.db import Database
from clinicomm.store.models import AuditEntry, Clinic

ACTION = "communication.test"
SUBJECT = "clinicomm test message"
TEXT = "This is a test message: the clinic's communication settings work."


class BadTestRequest(ValueError):
    """The address does not suit the channel, or the clinic has no own provider for it."""


@dataclass(slots=True)
class ConfigTestOutcome:
    """The answer of one configuration test (the API's JSON via `to_json`)."""

    ok: bool
    provider: str | None
    latency_ms: int | None = None
    provider_message_id: str | None = None
    error: dict[str, Any] | None = None
    tried: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        answer: dict[str, Any] = {"ok": self.ok, "provider": self.provider, "tried": self.tried}
        if self.ok:
            answer["latencyMs"] = self.latency_ms
            answer["providerMessageId"] = self.provider_message_id
        else:
            answer["error"] = self.error
        return answer


def recipient_for(channel: Channel, to: str, default_region: str | None = None) -> str:
    """The normalised address for `channel`; BadTestRequest when it is not one."""
    try:
        if channel is Channel.EMAIL:
            return normalize_email(to)
        return normalize_e164(to, default_region)
    except (EmailNotValidError, ValueError) as exc:
        raise BadTestRequest(f"'to' is not a valid {channel.value} address: {exc}") from None


async def run_config_test(
    db: Database,
    config: ConfigService,
    chains: ChainBuilder,
    clinic_id: str,
    channel: Channel,
    to: str,
    *,
    actor: str,
    role: str,
    request_id: str | None = None,
) -> ConfigTestOutcome:
    """Send one test message through the clinic's own providers and audit it.

    Raises ClinicNotFoundError, or BadTestRequest (bad address; no own provider for the
    channel: the test never uses the global provider).
    """
    async with db.read() as session:
        if await session.scalar(select(Clinic.id).where(Clinic.id == clinic_id)) is None:
            raise ClinicNotFoundError(clinic_id)
    resolved = await config.get_clinic_config(clinic_id, channel)
    region = getattr(resolved.own, "default_region", None) if resolved.own else None
    address = recipient_for(channel, to, region if isinstance(region, str) else None)
    own_hops = [h for h in config_chain_hops(chains, resolved) if h.scope == "clinic"]
    if not own_hops:
        raise BadTestRequest(f"the clinic has no {channel.value} provider of its own to test")
    reference = "test-" + new_id()
    outcome = ConfigTestOutcome(ok=False, provider=None)
    for hop in own_hops:
        message = OutboundMessage(
            channel=channel,
            to=address,
            reference=reference,
            subject=SUBJECT,
            text=TEXT,
            from_email=hop.from_email,
            from_name=hop.from_name,
        )
        started = time.perf_counter()
        try:
            result = await hop.adapter.send(message)
        except ProviderError as exc:
            error: dict[str, Any] = dict(exc.to_dict())
        except Exception as exc:  # an adapter bug: reported like a provider that is down
            error = dict(
                ProviderDownError(
                    f"unexpected adapter error: {type(exc).__name__}", provider=hop.key
                ).to_dict()
            )
        else:
            latency = int((time.perf_counter() - started) * 1000)
            outcome = ConfigTestOutcome(
                ok=True,
                provider=hop.key,
                latency_ms=latency,
                provider_message_id=result.provider_message_id,
                tried=outcome.tried,
            )
            outcome.tried.append({"provider": hop.key, "label": hop.label, "ok": True})
            break
        outcome.tried.append({"provider": hop.key, "label": hop.label, "ok": False, "error": error})
        outcome.provider = outcome.provider or hop.key
        outcome.error = outcome.error or error
    else:
        if len(outcome.tried) > 1:
            outcome.error = {
                "class": "all_failed",
                "message": "every own provider failed",
                "errors": [t["error"] for t in outcome.tried],
            }
    tried = [{"provider": t["provider"], "ok": t["ok"]} for t in outcome.tried]
    async with db.session() as session:
        session.add(
            AuditEntry(
                clinic_id=clinic_id,
                actor=actor,
                role=role,
                action=ACTION,
                request_id=request_id,
                diff={
                    "channel": channel.value,
                    "provider": outcome.provider,
                    "ok": outcome.ok,
                    "tried": tried,
                },
            )
        )
    return outcome


def config_chain_hops(chains: ChainBuilder, resolved: Any) -> tuple[Any, ...]:
    """The hops of the clinic's chain (adapters shared with the worker's cache)."""
    return chains.chain(resolved).hops
