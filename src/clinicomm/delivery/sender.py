"""Sending one claimed delivery through its provider chain, and deciding what happens next.

The decision depends only on the class of the error the adapter raised (CONVENTIONS item 3):

- success → `sent`, with the provider and its message id;
- `RecipientRateLimitedError` (WhatsApp pair limit) → this delivery alone waits for the same
  provider (not counted against `retryAttempts`, within the maximum age);
- `TransientError` (incl. rate limits) → the same provider again after a backoff with full
  jitter (never earlier than Retry-After), at most `retryAttempts` times and within the
  delivery's maximum age; after that, the next provider;
- `ProviderDownError`, `ConfigurationError` → the next provider at once;
- `RecipientError`, `ComplianceError` → `failed`, no failover;
- every provider failed → `failed` with each provider's reason.

Every call is an attempt record (provider, outcome, error class, status code, duration).
"""

from __future__ import annotations

import asyncio
import logging
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from clinicomm.delivery.queue import Claimed, Outcome
from clinicomm.messaging.models import DeliveryStatus
from clinicomm.observability import metrics
from clinicomm.providers.base import Channel, OutboundMessage, TemplateRef
from clinicomm.providers.errors import (
    ComplianceError,
    ContentError,
    ProviderDownError,
    ProviderError,
    RecipientError,
    RecipientRateLimitedError,
    TransientError,
)
from clinicomm.routing.backoff import BASE_SECONDS, retry_delay
from clinicomm.routing.chain import Chain, Hop
from clinicomm.routing.health import HealthTracker, outcome_for
from clinicomm.routing.limits import RateLimiter, sender_key, sender_limits

log = logging.getLogger(__name__)

_SENT = {
    Channel.EMAIL: metrics.EMAIL_SENT,
    Channel.WHATSAPP: metrics.WHATSAPP_SENT,
    Channel.SMS: metrics.SMS_SENT,
}
_FAILED = {
    Channel.EMAIL: metrics.EMAIL_FAILED,
    Channel.WHATSAPP: metrics.WHATSAPP_FAILED,
    Channel.SMS: metrics.SMS_FAILED,
}
_LATENCY = {
    Channel.EMAIL: metrics.EMAIL_LATENCY,
    Channel.WHATSAPP: metrics.WHATSAPP_LATENCY,
    Channel.SMS: metrics.SMS_LATENCY,
}


@dataclass(frozen=True, slots=True)
class Content:
    """A message's decrypted content (kept in memory only while it is being sent)."""

    title: str | None
    body: str | None
    html: str | None
    template: TemplateRef | None
    #: The message's category (`GENERAL`, …): picks the WhatsApp window template.
    category: str | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any], category: str | None = None) -> Content:
        template = data.get("template")
        return cls(
            category=category,
            title=data.get("title"),
            body=data.get("body"),
            html=data.get("html"),
            template=TemplateRef(
                name=template["name"],
                language=template.get("language", "en"),
                variables=dict(template.get("variables") or {}),
            )
            if template
            else None,
        )


@dataclass(slots=True)
class Handled:
    """What sending one delivery produced: its new state and the attempt rows."""

    outcome: Outcome
    attempts: list[dict[str, Any]] = field(default_factory=list)
    #: A delivery on another channel that replaces this one (channel fallback).
    fallback: dict[str, Any] | None = None
    #: (clinic id, channel, blind index, reason value, source, encrypted address): an
    #: opt-out learnt on send (Twilio 21610, a permanent bounce), recorded with the results.
    suppress: tuple[str, str, str, str, str, str] | None = None


def suppression_on_send(
    claimed: Claimed, hop: Hop, error: ProviderError
) -> tuple[str, str, str, str, str, str] | None:
    """The opt-out a send error proves: Twilio 21610 (the number opted out at Twilio) or a
    permanent bounce (RecipientError with an SMTP 5.1.x code or a provider's permanent
    recipient code). PROVIDER-FACTS §8 items 18 and 20."""
    if claimed.clinic_id is None:
        return None
    source = f"send:{hop.key}"
    if isinstance(error, ComplianceError) and error.code == "21610":
        reason = "provider_21610"
        return (claimed.clinic_id, claimed.channel, _index(claimed), reason, source, claimed.sealed)
    if (
        isinstance(error, RecipientError)
        and claimed.channel == Channel.EMAIL.value
        and ((error.code or "").startswith("5.1.") or (hop.key, error.code) == ("postmark", "406"))
    ):
        reason = "bounce"
        return (claimed.clinic_id, claimed.channel, _index(claimed), reason, source, claimed.sealed)
    return None


def _attempt(
    delivery_id: str, hop: Hop, duration: float, now: datetime, error: ProviderError | None
) -> dict[str, Any]:
    return {
        "delivery_id": delivery_id,
        "provider": hop.label,
        "outcome": "failed" if error else "sent",
        "error_class": error.error_class.value if error else None,
        "status_code": error.status_code if error else None,
        "error_code": error.code if error else None,
        "detail": (error.detail or error.message) if error else None,
        "duration_ms": int(duration * 1000),
        "at": now,
    }


def _reason(hop: Hop, error: ProviderError) -> dict[str, Any]:
    return {**error.to_dict(), "provider": hop.label}


@dataclass(frozen=True, slots=True)
class Guards:
    """Shared health (circuits) and rate limiters consulted around each provider call."""

    health: HealthTracker
    limiter: RateLimiter
    #: A sender throughput wait up to this long is slept through; longer ones requeue.
    max_sender_wait: float = 2.0


async def send_through_chain(
    claimed: Claimed,
    chain: Chain,
    content: Content,
    *,
    now_fn: Any,
    max_age: timedelta,
    guards: Guards | None = None,
    retry_base: float = BASE_SECONDS,
) -> Handled:
    """Try the chain from the delivery's position; returns its next state. Never raises for a
    provider failure (an unexpected adapter exception counts as that provider being down)."""
    channel = Channel(claimed.channel)
    clinic_label = claimed.clinic_id or "global"
    errors = list(claimed.errors)
    attempts_rows: list[dict[str, Any]] = []
    attempts = claimed.attempts
    position = claimed.chain_position
    provider_attempts = claimed.provider_attempts
    deadline = claimed.created_at + max_age

    if not chain.hops:
        return Handled(
            Outcome(
                claimed.id,
                DeliveryStatus.FAILED,
                attempts,
                error={"reason": chain.empty_reason, "errors": errors},
            )
        )
    while position < len(chain.hops):
        hop = chain.hops[position]
        health_clinic = claimed.clinic_id if hop.scope == "clinic" else None
        last = position == len(chain.hops) - 1
        if guards is not None:
            allowed = await guards.health.allow(health_clinic, hop.label)
            if not allowed and not last:
                # Circuit open: no traffic while another provider in the chain can take it.
                errors.append(
                    {"provider": hop.label, "class": "circuit_open", "message": "circuit open"}
                )
                position += 1
                provider_attempts = 0
                continue
            wait = await _sender_slot(guards, hop)
            if wait > 0:
                return Handled(
                    Outcome(
                        claimed.id,
                        DeliveryStatus.QUEUED,
                        attempts,
                        chain_position=position,
                        provider_attempts=provider_attempts,
                        next_attempt_at=now_fn() + timedelta(seconds=wait),
                        error={"reason": "sender throughput", "errors": errors} if errors else None,
                    ),
                    attempts_rows,
                )
        message = OutboundMessage(
            channel=channel,
            to=claimed.recipient,
            reference=claimed.id,
            subject=content.title,
            text=content.body,
            html=content.html,
            template=content.template,
            from_email=hop.from_email,
            from_name=hop.from_name,
        )
        started = time.perf_counter()
        error: ProviderError | None = None
        result = None
        try:
            result = await hop.adapter.send(message)
        except ProviderError as exc:
            error = exc
        except Exception as exc:  # an adapter bug must not lose the delivery
            error = unclassified(exc, hop.key, hop.label, claimed.id)
        duration = time.perf_counter() - started
        now = now_fn()
        attempts += 1
        if guards is not None:
            await guards.health.record(health_clinic, hop.label, outcome_for(error))
        attempts_rows.append(_attempt(claimed.id, hop, duration, now, error))
        _LATENCY[channel].labels(clinic_label, hop.key).observe(duration)
        if error is None:
            assert result is not None
            _SENT[channel].labels(clinic_label, hop.key).inc()
            metrics.TOTAL_SENT.labels(channel.value).inc()
            return Handled(
                Outcome(
                    claimed.id,
                    DeliveryStatus.SENT,
                    attempts,
                    chain_position=position,
                    provider=hop.label,
                    provider_message_id=result.provider_message_id,
                    error={"reason": None, "errors": errors} if errors else None,
                    sent_at=now,
                ),
                attempts_rows,
            )
        _FAILED[channel].labels(clinic_label, hop.key, error.error_class.value).inc()
        errors.append(_reason(hop, error))
        if isinstance(error, (RecipientError, ComplianceError, ContentError)):
            metrics.TOTAL_FAILED.labels(channel.value).inc()
            return Handled(
                Outcome(
                    claimed.id,
                    DeliveryStatus.FAILED,
                    attempts,
                    chain_position=position,
                    provider=hop.label,
                    error={"reason": error.error_class.value, "errors": errors},
                ),
                attempts_rows,
                suppress=suppression_on_send(claimed, hop, error),
            )
        if isinstance(error, RecipientRateLimitedError):
            # Pair rate limit (WhatsApp 131056): only this recipient waits, on the same number;
            # the provider is fine, so this neither uses a retry nor fails over (PROVIDER-FACTS
            # §7.2 and §8 item 9). Bounded by the delivery's maximum age.
            when = now + timedelta(seconds=max(error.retry_after or 0.0, 0.0))
            if when < deadline:
                return Handled(
                    Outcome(
                        claimed.id,
                        DeliveryStatus.QUEUED,
                        attempts,
                        chain_position=position,
                        provider_attempts=provider_attempts,
                        next_attempt_at=when,
                        error={"reason": "recipient rate limited", "errors": errors},
                    ),
                    attempts_rows,
                )
        if isinstance(error, TransientError) and provider_attempts < hop.retry_attempts:
            delay = retry_delay(provider_attempts, error.retry_after, base=retry_base)
            when = now + timedelta(seconds=delay)
            if when < deadline:
                return Handled(
                    Outcome(
                        claimed.id,
                        DeliveryStatus.QUEUED,
                        attempts,
                        chain_position=position,
                        provider_attempts=provider_attempts + 1,
                        next_attempt_at=when,
                        error={"reason": "retrying", "errors": errors},
                    ),
                    attempts_rows,
                )
        position += 1
        provider_attempts = 0
    metrics.TOTAL_FAILED.labels(channel.value).inc()
    reason = "every provider failed"
    fallback = None
    target = chain.channel_fallback
    if target is not None and claimed.parent_id is None:
        if (target is Channel.EMAIL) != (channel is Channel.EMAIL):
            reason += f"; no {target.value} address for the channel fallback"
        else:
            reason += f"; falling back to {target.value}"
            fallback = channel_fallback_row(claimed, target, now_fn())
    return Handled(
        Outcome(
            claimed.id,
            DeliveryStatus.FAILED,
            attempts,
            chain_position=position,
            error={"reason": reason, "errors": errors, "fallbackId": fallback and fallback["id"]},
        ),
        attempts_rows,
        fallback,
    )


async def _sender_slot(guards: Guards, hop: Hop) -> float:
    """Wait for the sender's throughput cap (e.g. a WhatsApp number's 80/s), shared by every
    process and clinic using that number; returns a remaining wait too long to sleep through."""
    if hop.throughput is None:
        return 0.0
    sender, cap = hop.throughput
    key = sender_key(None, hop.key, sender)
    # The total time slept here is bounded, not each sleep: many deliveries waiting for one
    # busy number each lose the race again and again, and a delivery held past its lease is
    # handed to another worker by the reaper and sent twice (seen in the two-worker test).
    give_up = time.monotonic() + guards.max_sender_wait
    while True:
        wait = await guards.limiter.acquire(key, sender_limits(cap))
        if wait <= 0:
            return 0.0
        if time.monotonic() + wait > give_up:
            return wait
        await asyncio.sleep(wait)


def channel_fallback_row(claimed: Claimed, channel: Channel, now: datetime) -> dict[str, Any]:
    """A queued delivery of the same message to the same number on `channel`, linked to the
    failed one by `parent_id`. A fallback delivery never falls back again."""
    from clinicomm.ids import new_id

    return {
        "id": new_id(),
        "message_id": claimed.message_id,
        "clinic_id": claimed.clinic_id,
        "channel": channel.value,
        "recipient": claimed.sealed,
        "recipient_index": claimed.recipient_index,
        "status": DeliveryStatus.QUEUED.value,
        "next_attempt_at": now,
        "fair_at": now,
        "parent_id": claimed.id,
        "created_at": now,
        "updated_at": now,
    }


def _index(claimed: Claimed) -> str:
    """The key an opt-out is recorded under: the blind index (legacy rows: the address)."""
    return claimed.recipient_index or claimed.recipient


def unclassified(exc: Exception, key: str, label: str, delivery_id: str) -> ProviderError:
    """An exception an adapter did not classify, as a provider error, logged by its class.

    The log line carries the exception's type, where it was raised (our file and line), the
    provider and the delivery id: never `str(exc)` or a traceback, which may quote a title,
    an address or a body. A ValueError or UnicodeError comes from building the message (the
    email package refusing a header, text that cannot be encoded): a `ContentError`, which
    fails only this delivery and never counts against the provider. Anything else is a bug
    reported like a provider that is down, so the next provider is tried.
    """
    frames = traceback.extract_tb(exc.__traceback__)
    where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else None
    content = isinstance(exc, (ValueError, UnicodeError))
    log.error(
        "message could not be built" if content else "adapter raised an unclassified exception",
        extra={
            "event": "message_malformed" if content else "adapter_bug",
            "provider": label,
            "deliveryId": delivery_id,
            "error": type(exc).__name__,
            "where": where,
        },
    )
    if content:
        return ContentError(f"the message cannot be built: {type(exc).__name__}", provider=key)
    return ProviderDownError(f"unexpected adapter error: {type(exc).__name__}", provider=key)
