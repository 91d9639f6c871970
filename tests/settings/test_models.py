"""The communicationSettings schema: the seed's examples as written, and bad input with paths."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from clinicomm.providers.base import MASK
from clinicomm.settings import secrets
from clinicomm.settings.models import CommunicationSettings
from clinicomm.settings.validation import (
    SettingsValidationError,
    plain_document,
    validate_settings,
)

SEED = json.loads((Path(__file__).parents[1] / "fixtures" / "seed_examples.json").read_text())


def seed(n: int) -> dict[str, Any]:
    (entry,) = [v for k, v in SEED.items() if k.startswith(f"Example {n}:")]
    return entry["body"]["settings"]["communicationSettings"]


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_seed_examples_are_accepted_and_round_trip(n: int) -> None:
    doc = seed(n)
    settings = validate_settings(doc)
    plain = plain_document(settings)
    # Round trip: the canonical form validates to the same model, secrets included.
    again = validate_settings(plain)
    assert plain_document(again) == plain
    # Every secret of the input survives in clear in the canonical form.
    for path, name in secrets.secret_paths(doc):
        assert secrets.lookup(plain, path)[name] == secrets.lookup(doc, path)[name]


def test_example_1_coerces_strings() -> None:
    settings = validate_settings(seed(1))
    assert settings.email is not None and settings.email.primary is not None
    creds = settings.email.primary.credentials
    assert creds.port == 587  # type: ignore[union-attr]
    assert creds.secure is False  # type: ignore[union-attr]
    assert creds.max_connections == 5  # type: ignore[union-attr]
    assert settings.email.fallback_strategy.retry_attempts == 2


def test_aws_ses_is_an_alias_of_ses() -> None:
    settings = validate_settings(seed(2))
    assert settings.email is not None and settings.email.primary is not None
    assert settings.email.primary.provider == "ses"
    assert settings.email.fallback_strategy.enabled is False


def test_example_4_templates_and_rate_limit() -> None:
    settings = validate_settings(seed(4))
    wa = settings.whatsapp
    assert wa is not None and wa.primary is not None
    assert wa.primary.credentials.templates["otp"] == "clinic_a_otp_verification"  # type: ignore[union-attr]
    assert wa.fallback_strategy.fallback_provider == "sms"
    assert wa.rate_limit is not None and wa.rate_limit.max_per_minute == 80


def test_secret_fields_are_marked() -> None:
    plain = plain_document(validate_settings(seed(5)))
    found = {secrets.dotted(p, n) for p, n in secrets.secret_paths(plain)}
    assert found == {"whatsapp.primary.credentials.authToken"}
    masked = secrets.mask(plain)
    assert masked["whatsapp"]["primary"]["credentials"]["authToken"] == MASK
    assert masked["whatsapp"]["primary"]["credentials"]["accountSid"].startswith("AC")


def problems(doc: Any) -> dict[str, str]:
    with pytest.raises(SettingsValidationError) as info:
        validate_settings(doc)
    return {p.path: p.type for p in info.value.problems}


P = "settings.communicationSettings"


def test_unknown_provider_is_reported_at_its_path() -> None:
    found = problems({"email": {"primary": {"provider": "pigeon", "credentials": {}}}})
    assert found == {f"{P}.email.primary.provider": "union_tag_invalid"}


def test_missing_required_credential_and_wrong_types_one_problem_each() -> None:
    doc = {
        "email": {
            "primary": {"provider": "smtp", "credentials": {"port": "five", "secure": "maybe"}},
            "fallback": [{"provider": "sendgrid", "credentials": {"fromEmail": "a@b.co"}}],
        },
        "sms": {"primary": {"provider": "twilio", "credentials": {"accountSid": "AC1"}}},
    }
    found = problems(doc)
    assert found == {
        f"{P}.email.primary.credentials.host": "missing",
        f"{P}.email.primary.credentials.port": "int_parsing",
        f"{P}.email.primary.credentials.secure": "bool_parsing",
        f"{P}.email.fallback.0.credentials.apiKey": "missing",
        f"{P}.sms.primary.credentials.authToken": "missing",
    }


def test_provider_of_another_channel_is_unknown_here() -> None:
    found = problems({"sms": {"primary": {"provider": "sendgrid", "credentials": {"apiKey": "x"}}}})
    assert list(found) == [f"{P}.sms.primary.provider"]


def test_unknown_field_is_rejected() -> None:
    found = problems({"email": {"primry": {}}})
    assert found == {f"{P}.email.primry": "extra_forbidden"}


def test_mask_without_stored_secret_is_a_problem() -> None:
    doc = {"email": {"primary": {"provider": "sendgrid", "credentials": {"apiKey": MASK}}}}
    assert problems(doc) == {f"{P}.email.primary.credentials.apiKey": "mask_without_secret"}


def test_disabled_provider_needs_no_credentials() -> None:
    settings = CommunicationSettings.model_validate({"sms": {"primary": {"provider": "disabled"}}})
    assert settings.sms is not None and settings.sms.primary is not None
    assert not settings.sms.primary.active


def test_validation_errors_never_echo_input_values() -> None:
    secret = "CANARY-in-error-message"
    with pytest.raises(SettingsValidationError) as info:
        validate_settings(
            {"email": {"primary": {"provider": "smtp", "credentials": {"port": secret}}}}
        )
    assert secret not in str(info.value)
