"""The decision core's table: every error class by chain position by retry budget by max age by
fallback policy, each row named. Pure: no server, no database, no clock."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest

from clinicomm.delivery import decision
from clinicomm.delivery.decision import (
    Fail,
    FallbackChannel,
    NextHop,
    Position,
    ProviderFacts,
    Retry,
    Sent,
    Step,
    Suppress,
)
from clinicomm.delivery.suppressions import SuppressionReason
from clinicomm.providers.base import Channel
from clinicomm.providers.errors import (
    ComplianceError,
    ConfigurationError,
    ContentError,
    ProviderDownError,
    ProviderError,
    RateLimitedError,
    RecipientError,
    RecipientRateLimitedError,
    TransientError,
)

NOW = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
BACKOFF_SECONDS = 10.0
FACTS = ProviderFacts(
    opt_out_codes=frozenset({"21610"}),
    bounce_codes=frozenset({"406"}),
    unreachable_codes=frozenset({"131026"}),
)


def backoff(attempt: int, retry_after: float | None) -> float:
    return max(retry_after or 0.0, BACKOFF_SECONDS)


ERRORS: dict[str, ProviderError | None] = {
    "success": None,
    "transient": TransientError("503"),
    "rate_limited": RateLimitedError("429", retry_after=5.0),
    "recipient_rate_limited": RecipientRateLimitedError("131056", retry_after=6.0),
    "provider_down": ProviderDownError("refused"),
    "configuration": ConfigurationError("401"),
    "recipient": RecipientError("invalid number", code="131009"),
    "recipient_not_on_channel": RecipientError("not on WhatsApp", code="131026"),
    "compliance": ComplianceError("window closed", code="131047"),
    "compliance_opt_out": ComplianceError("opted out", code="21610"),
}
POSITIONS = {"first_of_3": (0, 3), "middle_of_3": (1, 3), "last_of_3": (2, 3), "only": (0, 1)}
BUDGETS = {"budget_left": 0, "budget_spent": 2}
AGES = {"young": timedelta(hours=1), "old": timedelta(seconds=1)}
FALLBACKS: dict[str, Channel | None] = {
    "no_fallback": None,
    "fallback_sms": Channel.SMS,
    "fallback_email": Channel.EMAIL,
}


@dataclass(frozen=True)
class Row:
    error: str
    position: str
    budget: str
    age: str
    fallback: str

    @property
    def name(self) -> str:
        return "-".join((self.error, self.position, self.budget, self.age, self.fallback))


def expected(row: Row) -> Step:
    """The rules, written out independently of the implementation."""
    index, hops = POSITIONS[row.position]
    young = row.age == "young"
    budget_left = row.budget == "budget_left"
    target = FALLBACKS[row.fallback]
    if row.error == "success":
        return Sent()
    if row.error == "compliance_opt_out":
        return Suppress("compliance", SuppressionReason.PROVIDER_OPT_OUT)
    if row.error == "compliance":
        return Fail("compliance")
    if row.error == "recipient_not_on_channel" and target is Channel.SMS:
        return FallbackChannel(
            Channel.SMS,
            "the recipient cannot be reached on this channel; falling back to sms",
            decision.FALLBACK_NOT_ON_CHANNEL,
        )
    if row.error.startswith("recipient") and row.error != "recipient_rate_limited":
        return Fail("recipient")
    if row.error == "recipient_rate_limited" and young:
        return Retry(NOW + timedelta(seconds=6), "recipient rate limited", uses_budget=False)
    retryable = row.error in ("transient", "rate_limited", "recipient_rate_limited")
    if retryable and budget_left and young:
        return Retry(NOW + timedelta(seconds=BACKOFF_SECONDS), "retrying")
    if index + 1 < hops:
        return NextHop()
    if target is Channel.SMS:
        return FallbackChannel(
            Channel.SMS,
            "every provider failed; falling back to sms",
            decision.FALLBACK_PROVIDERS_FAILED,
        )
    if target is Channel.EMAIL:
        return Fail(
            "every provider failed; no email address for the channel fallback", exhausted=True
        )
    return Fail("every provider failed", exhausted=True)


ROWS = [Row(*combo) for combo in itertools.product(ERRORS, POSITIONS, BUDGETS, AGES, FALLBACKS)]


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_whatsapp_after_call(row: Row) -> None:
    index, hops = POSITIONS[row.position]
    at = Position(
        channel=Channel.WHATSAPP,
        index=index,
        hops=hops,
        provider_attempts=BUDGETS[row.budget],
        retry_attempts=2,
        deadline=NOW + AGES[row.age],
        fallback=FALLBACKS[row.fallback],
    )
    assert decision.after_call(at, FACTS, ERRORS[row.error], NOW, backoff) == expected(row)


EMAIL_ROWS = {
    "smtp_5_1_1_bounce_suppresses": (
        RecipientError("no such user", code="5.1.1"),
        Suppress("recipient", SuppressionReason.BOUNCE),
    ),
    "declared_bounce_code_suppresses": (
        RecipientError("inactive", code="406"),
        Suppress("recipient", SuppressionReason.BOUNCE),
    ),
    "other_recipient_error_fails": (
        RecipientError("mailbox full", code="4.2.2"),
        Fail("recipient"),
    ),
    "undeclared_code_on_another_channel_is_not_unreachable": (
        RecipientError("x", code="63003"),
        Fail("recipient"),
    ),
    "complaint_compliance_fails_without_fallback": (
        ComplianceError("complaint"),
        Fail("compliance"),
    ),
    # A message the email package cannot build: no other hop, no channel fallback.
    "malformed_message_fails_as_content": (
        ContentError("the message cannot be built: ValueError"),
        Fail("content"),
    ),
}


@pytest.mark.parametrize("name", list(EMAIL_ROWS))
def test_email_after_call(name: str) -> None:
    error, step = EMAIL_ROWS[name]
    at = Position(Channel.EMAIL, 0, 2, 0, 2, NOW + timedelta(hours=1), Channel.SMS)
    assert decision.after_call(at, FACTS, error, NOW, backoff) == step


def test_bounce_codes_apply_to_email_only() -> None:
    at = Position(Channel.SMS, 0, 1, 0, 0, NOW + timedelta(hours=1), None)
    assert decision.after_call(at, FACTS, RecipientError("x", code="5.1.1"), NOW, backoff) == (
        Fail("recipient")
    )


@pytest.mark.parametrize(
    ("name", "index", "hops", "fallback", "step"),
    [
        ("skip_first_goes_on", 0, 3, None, NextHop()),
        ("skip_last_without_fallback_fails", 2, 3, None, Fail("every provider failed", True)),
        (
            "skip_last_with_sms_fallback_falls_back",
            2,
            3,
            Channel.SMS,
            FallbackChannel(
                Channel.SMS,
                "every provider failed; falling back to sms",
                decision.FALLBACK_PROVIDERS_FAILED,
            ),
        ),
        ("past_a_shortened_chain_fails", 5, 3, None, Fail("every provider failed", True)),
    ],
)
def test_skip(name: str, index: int, hops: int, fallback: Channel | None, step: Step) -> None:
    at = Position(Channel.WHATSAPP, index, hops, 0, 2, NOW + timedelta(hours=1), fallback)
    assert decision.skip(at) == step


@pytest.mark.parametrize(
    ("name", "channel", "fallback", "because", "result"),
    [
        (
            "template_required_whatsapp_to_sms",
            Channel.WHATSAPP,
            Channel.SMS,
            decision.FALLBACK_TEMPLATE_REQUIRED,
            FallbackChannel(
                Channel.SMS,
                "template required; falling back to sms",
                decision.FALLBACK_TEMPLATE_REQUIRED,
            ),
        ),
        ("no_fallback_configured", Channel.WHATSAPP, None, decision.FALLBACK_NOT_ON_CHANNEL, None),
        ("phone_to_email_impossible", Channel.SMS, Channel.EMAIL, "providers_failed", None),
        (
            "sms_to_whatsapp",
            Channel.SMS,
            Channel.WHATSAPP,
            decision.FALLBACK_PROVIDERS_FAILED,
            FallbackChannel(
                Channel.WHATSAPP,
                "every provider failed; falling back to whatsapp",
                decision.FALLBACK_PROVIDERS_FAILED,
            ),
        ),
    ],
)
def test_channel_fallback(
    name: str,
    channel: Channel,
    fallback: Channel | None,
    because: str,
    result: FallbackChannel | None,
) -> None:
    at = Position(channel, 0, 1, 0, 0, NOW + timedelta(hours=1), fallback)
    assert decision.channel_fallback(at, because) == result


def test_the_table_covers_every_combination() -> None:
    assert len(ROWS) == len(ERRORS) * len(POSITIONS) * len(BUDGETS) * len(AGES) * len(FALLBACKS)
    assert len({r.name for r in ROWS}) == len(ROWS)
