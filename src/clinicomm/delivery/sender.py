"""Walking one admitted delivery through its provider chain: the adapter calls.

For each hop from the delivery's position: `admission.hop` (circuit, sender throughput), the
adapter call (an attempt row, health and metrics recorded), then `decision.after_call` says
what happens next; `outcome_of` turns the final step into the delivery's new state. The rules
themselves live in `delivery.decision`; this module does the I/O around them.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from clinicomm.delivery import admission, decision
from clinicomm.delivery.admission import Guards
from clinicomm.delivery.batching import COALESCER
from clinicomm.delivery.records import (
    Attempt,
    Claimed,
    Content,
    Handled,
    NewDelivery,
    Suppression,
)
from clinicomm.providers.base import Channel, OutboundMessage, SendResult, webhook_callback_url
from clinicomm.providers.errors import ContentError, ProviderDownError, ProviderError
from clinicomm.routing.backoff import BASE_SECONDS, retry_delay
from clinicomm.routing.chain import Chain, Hop
from clinicomm.routing.health import outcome_for
from clinicomm.telemetry import metrics

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

#: A provider call's labelled series, per (channel, clinic label, provider key): latency
#: (every call), sent and total sent (successful calls). `labels()` looks its child up under a
#: lock each time; a send took three of them. Clinics and providers are bounded, and so is
#: this (as the series are). Failures keep `labels()`: their error class is a label too.
_CALL_SERIES: dict[tuple[Channel, str, str], tuple[Any, Any, Any]] = {}


def _call_series(channel: Channel, clinic: str, provider: str) -> tuple[Any, Any, Any]:
    key = (channel, clinic, provider)
    series = _CALL_SERIES.get(key)
    if series is None:
        series = _CALL_SERIES[key] = (
            _LATENCY[channel].labels(clinic, provider),
            _SENT[channel].labels(clinic, provider),
            metrics.TOTAL_SENT.labels(channel.value),
        )
    return series


@dataclass(slots=True)
class Walk:
    """The running state of one delivery along its chain."""

    position: int
    provider_attempts: int
    attempts: int
    errors: list[dict[str, Any]]
    rows: list[Attempt] = field(default_factory=list)


def position_of(
    claimed: Claimed, chain: Chain, walk: Walk, deadline: datetime
) -> decision.Position:
    """The decision core's view of where `claimed` stands."""
    hop = chain.hops[walk.position] if walk.position < len(chain.hops) else None
    return decision.Position(
        channel=chain.channel,
        index=walk.position,
        hops=len(chain.hops),
        provider_attempts=walk.provider_attempts,
        retry_attempts=hop.retry_attempts if hop is not None else 0,
        deadline=deadline,
        fallback=chain.channel_fallback if claimed.parent_id is None else None,
        fallback_address=claimed.fallback_address is not None,
        expires_at=claimed.expires_at,
    )


def facts_of(hop: Hop) -> decision.ProviderFacts:
    """What the hop's provider module declares about its error codes."""
    adapter = type(hop.adapter)
    return decision.ProviderFacts(
        opt_out_codes=adapter.opt_out_codes,
        bounce_codes=adapter.bounce_codes,
        unreachable_codes=adapter.unreachable_codes,
    )


async def send_through_chain(
    claimed: Claimed,
    chain: Chain,
    content: Content,
    *,
    now_fn: Callable[[], datetime],
    max_age: timedelta,
    guards: Guards | None = None,
    retry_base: float = BASE_SECONDS,
) -> Handled:
    """Try the chain from the delivery's position; returns its next state. Never raises for a
    provider failure (an unexpected adapter exception counts as that provider being down)."""
    if not chain.hops:
        return Handled(claimed.fail(chain.empty_reason or "no provider"))
    deadline = claimed.created_at + max_age
    walk = Walk(
        claimed.chain_position, claimed.provider_attempts, claimed.attempts, list(claimed.errors)
    )

    def backoff(attempt: int, retry_after: float | None) -> float:
        return retry_delay(attempt, retry_after, base=retry_base)

    while True:
        if claimed.is_expired(now_fn()):  # e.g. after a hop that timed out: no further call
            return outcome_of(claimed, decision.Expire(), walk, None, now_fn())
        if walk.position >= len(chain.hops):  # a stored position past a shortened chain
            step: decision.Step = decision.exhausted(position_of(claimed, chain, walk, deadline))
            return outcome_of(claimed, step, walk, None, now_fn())
        hop = chain.hops[walk.position]
        last = walk.position == len(chain.hops) - 1
        verdict = await admission.hop(guards, claimed, hop, last)
        if isinstance(verdict, admission.Skip):
            # Circuit open: no traffic while another provider in the chain can take it.
            walk.errors.append(
                {"provider": hop.label, "class": "circuit_open", "message": "circuit open"}
            )
            step = decision.skip(position_of(claimed, chain, walk, deadline))
        elif isinstance(verdict, admission.Busy):
            at = claimed.clamp(now_fn() + timedelta(seconds=verdict.seconds))
            outcome = claimed.requeue(
                at,
                "sender throughput",
                errors=walk.errors,
                attempts=walk.attempts,
                position=walk.position,
                provider_attempts=walk.provider_attempts,
                quiet=True,
            )
            return Handled(outcome, walk.rows)
        else:
            error, result = await _call(claimed, chain.channel, hop, content, walk, guards, now_fn)
            step = decision.after_call(
                position_of(claimed, chain, walk, deadline), facts_of(hop), error, now_fn(), backoff
            )
            if isinstance(step, decision.Sent):
                assert result is not None
                sent = claimed.sent(
                    provider=hop.label,
                    provider_message_id=result.provider_message_id,
                    at=walk.rows[-1].at,
                    attempts=walk.attempts,
                    position=walk.position,
                    errors=walk.errors,
                )
                return Handled(sent, walk.rows)
        if isinstance(step, decision.NextHop):
            walk.position += 1
            walk.provider_attempts = 0
            continue
        return outcome_of(claimed, step, walk, hop, now_fn())


def outcome_of(
    claimed: Claimed, step: decision.Step, walk: Walk, hop: Hop | None, now: datetime
) -> Handled:
    """The delivery's new state for a final step (anything but `NextHop` and `Sent`)."""
    channel = Channel(claimed.channel)
    if isinstance(step, decision.Retry):
        outcome = claimed.requeue(
            step.at,
            step.reason,
            errors=walk.errors,
            attempts=walk.attempts,
            position=walk.position,
            provider_attempts=walk.provider_attempts + (1 if step.uses_budget else 0),
        )
        return Handled(outcome, walk.rows)
    if isinstance(step, decision.Expire):
        expired = claimed.expired(
            errors=walk.errors, attempts=walk.attempts, position=walk.position
        )
        return Handled(expired, walk.rows)
    metrics.TOTAL_FAILED.labels(channel.value).inc()
    if isinstance(step, decision.Suppress):
        assert hop is not None
        suppression = (
            Suppression(
                claimed.clinic_id,
                claimed.channel,
                claimed.lookup_key,
                step.suppression,
                f"send:{hop.key}",
                address_enc=claimed.sealed or None,
            )
            if claimed.clinic_id is not None
            else None
        )
        failed = claimed.fail(
            step.reason,
            errors=walk.errors,
            attempts=walk.attempts,
            position=walk.position,
            provider=hop.label,
        )
        return Handled(failed, walk.rows, suppress=suppression)
    if isinstance(step, decision.Fail):
        if step.exhausted or hop is None:
            failed = claimed.fail(
                step.reason,
                errors=walk.errors,
                attempts=walk.attempts,
                position=walk.position + 1 if hop is not None else walk.position,
                fallbackId=None,
            )
        else:
            failed = claimed.fail(
                step.reason,
                errors=walk.errors,
                attempts=walk.attempts,
                position=walk.position,
                provider=hop.label,
            )
        return Handled(failed, walk.rows)
    assert isinstance(step, decision.FallbackChannel)
    fallback = NewDelivery.fallback_of(claimed, step.channel, now)
    # Not on this channel: the provider that said so stays recorded. Every provider failed:
    # the position is past the chain. Refused before any call (hop None): unchanged.
    at_provider = hop is not None and step.because == decision.FALLBACK_NOT_ON_CHANNEL
    past_chain = hop is not None and not at_provider
    failed = claimed.fail(
        step.reason,
        errors=walk.errors,
        attempts=walk.attempts,
        position=walk.position + 1 if past_chain else walk.position,
        provider=hop.label if at_provider and hop is not None else None,
        fallbackId=fallback.id,
        fallbackReason=step.because,
    )
    return Handled(failed, walk.rows, fallback)


async def _call(
    claimed: Claimed,
    channel: Channel,
    hop: Hop,
    content: Content,
    walk: Walk,
    guards: Guards | None,
    now_fn: Callable[[], datetime],
) -> tuple[ProviderError | None, SendResult | None]:
    """One adapter call: the attempt row, health, metrics. Never raises for the provider."""
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
        status_callback=webhook_callback_url(
            hop.adapter.context.public_url,
            hop.key,
            claimed.clinic_id if hop.scope == "clinic" else "global",
        ),
    )
    clinic_label = claimed.clinic_id or "global"
    started = time.perf_counter()
    error: ProviderError | None = None
    result = None
    try:
        # One provider call may carry this and other deliveries (delivery.batching).
        result = await COALESCER.send(hop.adapter, message)
    except ProviderError as exc:
        error = exc
    except Exception as exc:  # an adapter bug must not lose the delivery
        error = unclassified(exc, hop.key, hop.label, claimed.id)
    duration = time.perf_counter() - started
    walk.attempts += 1
    if guards is not None:
        await guards.health.record(
            hop.health_owner(claimed.clinic_id), hop.label, outcome_for(error)
        )
    walk.rows.append(Attempt.of(claimed.id, hop.label, duration, now_fn(), error))
    latency, sent, total = _call_series(channel, clinic_label, hop.key)
    latency.observe(duration)
    if error is None:
        sent.inc()
        total.inc()
    else:
        _FAILED[channel].labels(clinic_label, hop.key, error.error_class.value).inc()
        walk.errors.append({**error.to_dict(), "provider": hop.label})
    return error, result


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
