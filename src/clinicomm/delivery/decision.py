"""The delivery decision core: after one provider call (or a skipped hop), what happens next.

Pure: no I/O, no clock (the caller passes `now`), no randomness (the caller passes the
`backoff` function). The worker's shell asks `after_call` once per provider call and `skip`
once per hop whose circuit is open, and turns the step into an outcome.

The rules (CONVENTIONS item 3; PROVIDER-FACTS §7-8):

| error                               | step                                                  |
|-------------------------------------|-------------------------------------------------------|
| none                                | `Sent`                                                |
| `ComplianceError`                   | `Suppress` if the code is one of the provider's       |
|                                     | `opt_out_codes`, else `Fail("compliance")`; never a   |
|                                     | failover, never a channel fallback                    |
| `RecipientError`, email, permanent  | `Suppress(bounce)` (SMTP 5.1.x, provider's            |
| bounce                              | `bounce_codes`)                                       |
| `RecipientError`, not reachable on  | `FallbackChannel` when the clinic configured one      |
| this channel (`unreachable_codes`)  | (and this delivery is not itself a fallback), else    |
|                                     | `Fail("recipient")`                                   |
| other `RecipientError`              | `Fail("recipient")`                                   |
| `ContentError` (malformed message)  | `Fail("content")`; no failover, no health count       |
| `RecipientRateLimitedError`         | `Retry` at Retry-After on the same hop, no budget     |
|                                     | used, while within the maximum age                    |
| `TransientError` with budget left   | `Retry` after `backoff`, within the maximum age       |
| anything else, or budget/age spent  | `NextHop`; after the last hop `FallbackChannel` (when |
|                                     | configured) or `Fail("every provider failed")`        |

Expiry (`Position.expires_at`, the message's `expiresAt`/`ttlSeconds`): once `now` is at or
past it, any failed call ends in `Expire` (no next hop, no channel fallback); a `Retry` is
never scheduled after it (it is clamped to the expiry, when the claim finds the delivery
expired). A channel-fallback delivery carries the same expiry. A success is always `Sent`,
and an error that ends the delivery anyway (content, compliance, recipient) keeps its `Fail`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from clinicomm.delivery.suppressions import SuppressionReason
from clinicomm.providers.base import Channel
from clinicomm.providers.errors import (
    ComplianceError,
    ContentError,
    ProviderError,
    RecipientError,
    RecipientRateLimitedError,
    TransientError,
)

#: (attempt number on this hop, the provider's Retry-After) → seconds to wait.
Backoff = Callable[[int, float | None], float]

EVERY_PROVIDER_FAILED = "every provider failed"
#: Why a channel fallback happened (`error.fallbackReason` in the GET answer).
FALLBACK_PROVIDERS_FAILED = "providers_failed"
FALLBACK_NOT_ON_CHANNEL = "not_on_channel"
FALLBACK_TEMPLATE_REQUIRED = "template_required"


@dataclass(frozen=True, slots=True)
class Sent:
    """The provider took the message."""


@dataclass(frozen=True, slots=True)
class Retry:
    """Try the same hop again at `at`; `uses_budget`: counts against `retryAttempts`."""

    at: datetime
    reason: str
    uses_budget: bool = True


@dataclass(frozen=True, slots=True)
class NextHop:
    """Go on with the next provider of the chain, now."""


@dataclass(frozen=True, slots=True)
class FallbackChannel:
    """This delivery ends `failed`; a new one on `channel` takes its place (`parentId`)."""

    channel: Channel
    reason: str
    #: One of the `FALLBACK_*` codes.
    because: str


@dataclass(frozen=True, slots=True)
class Fail:
    """The delivery ends `failed` with `reason`; `exhausted`: after the whole chain (else at
    the provider that answered, which stays recorded)."""

    reason: str
    exhausted: bool = False


@dataclass(frozen=True, slots=True)
class Suppress:
    """The delivery ends `failed` with `reason`, and the address is suppressed for the
    clinic and channel (`suppression`)."""

    reason: str
    suppression: SuppressionReason


@dataclass(frozen=True, slots=True)
class Expire:
    """The delivery ends `expired`: its expiry passed before a provider took it."""


Step = Sent | Retry | NextHop | FallbackChannel | Fail | Suppress | Expire


@dataclass(frozen=True, slots=True)
class ProviderFacts:
    """What a provider module declares about its error codes (see `ProviderAdapter`)."""

    opt_out_codes: frozenset[str] = frozenset()
    bounce_codes: frozenset[str] = frozenset()
    unreachable_codes: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Position:
    """Where a delivery stands: its channel, the hop just tried, the retry budget, its age
    limit and the clinic's channel fallback (None when none, or this is a fallback)."""

    channel: Channel
    index: int
    hops: int
    provider_attempts: int
    retry_attempts: int
    deadline: datetime
    fallback: Channel | None = None
    #: The patient's address on the fallback channel is known although of another kind
    #: (the phone number of an email delivery).
    fallback_address: bool = False
    #: The message's expiry (None: none).
    expires_at: datetime | None = None

    def clamp(self, when: datetime) -> datetime:
        """A retry time no later than the expiry."""
        return min(when, self.expires_at) if self.expires_at is not None else when


def after_call(
    at: Position,
    facts: ProviderFacts,
    error: ProviderError | None,
    now: datetime,
    backoff: Backoff,
) -> Step:
    """The step after one provider call that answered `error` (None: success)."""
    step = _after_call(at, facts, error, now, backoff)
    if at.expires_at is not None and now >= at.expires_at and _goes_on(step):
        return Expire()
    return step


def _goes_on(step: Step) -> bool:
    """The step would try again (later, elsewhere, on another channel) or end for want of a
    provider: past the expiry, the delivery expires instead."""
    if isinstance(step, Fail):
        return step.exhausted
    return isinstance(step, (Retry, NextHop, FallbackChannel))


def _after_call(
    at: Position,
    facts: ProviderFacts,
    error: ProviderError | None,
    now: datetime,
    backoff: Backoff,
) -> Step:
    if error is None:
        return Sent()
    if isinstance(error, ContentError):  # the message itself: no provider would take it
        return Fail(error.error_class.value)
    if isinstance(error, ComplianceError):
        if error.code is not None and error.code in facts.opt_out_codes:
            return Suppress(error.error_class.value, SuppressionReason.PROVIDER_OPT_OUT)
        return Fail(error.error_class.value)
    if isinstance(error, RecipientError):
        code = error.code or ""
        if at.channel is Channel.EMAIL and (code.startswith("5.1.") or code in facts.bounce_codes):
            return Suppress(error.error_class.value, SuppressionReason.BOUNCE)
        if code in facts.unreachable_codes:
            fallback = channel_fallback(at, FALLBACK_NOT_ON_CHANNEL)
            if fallback is not None:
                return fallback
        return Fail(error.error_class.value)
    if isinstance(error, RecipientRateLimitedError):
        # Pair rate limit (WhatsApp 131056): only this recipient waits, on the same number;
        # the provider is fine, so no retry is used and nothing fails over (PROVIDER-FACTS
        # §7.2 and §8 item 9). Bounded by the delivery's maximum age.
        when = at.clamp(now + timedelta(seconds=max(error.retry_after or 0.0, 0.0)))
        if when < at.deadline:
            return Retry(when, "recipient rate limited", uses_budget=False)
    if isinstance(error, TransientError) and at.provider_attempts < at.retry_attempts:
        when = at.clamp(now + timedelta(seconds=backoff(at.provider_attempts, error.retry_after)))
        if when < at.deadline:
            return Retry(when, "retrying")
    return skip(at)


def skip(at: Position) -> NextHop | FallbackChannel | Fail:
    """Leave the hop at `at.index` (failed for provider reasons, or its circuit is open)."""
    if at.index + 1 < at.hops:
        return NextHop()
    return exhausted(at)


def exhausted(at: Position) -> FallbackChannel | Fail:
    """Every provider of the chain failed for provider reasons."""
    return channel_fallback(at, FALLBACK_PROVIDERS_FAILED) or Fail(
        _no_fallback_reason(at), exhausted=True
    )


def channel_fallback(at: Position, because: str) -> FallbackChannel | None:
    """The clinic's channel fallback for this delivery, when the patient's address there is
    known: the same number between phone channels, or the one stored at acceptance for
    another kind (email → SMS)."""
    target = at.fallback
    if target is None or not (same_address_kind(at.channel, target) or at.fallback_address):
        return None
    head = EVERY_PROVIDER_FAILED if because == FALLBACK_PROVIDERS_FAILED else _WHY[because]
    return FallbackChannel(target, f"{head}; falling back to {target.value}", because)


def same_address_kind(a: Channel, b: Channel) -> bool:
    """True when both channels address a patient the same way (both phone channels)."""
    return (a is Channel.EMAIL) == (b is Channel.EMAIL)


_WHY = {
    FALLBACK_NOT_ON_CHANNEL: "the recipient cannot be reached on this channel",
    FALLBACK_TEMPLATE_REQUIRED: "template required",
}


def _no_fallback_reason(at: Position) -> str:
    if at.fallback is not None and not same_address_kind(at.channel, at.fallback):
        # Only reached without a stored address for it (channel_fallback answered None).
        return f"{EVERY_PROVIDER_FAILED}; no {at.fallback.value} address for the channel fallback"
    return EVERY_PROVIDER_FAILED
