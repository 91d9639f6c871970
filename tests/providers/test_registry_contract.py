"""Every registered adapter declares its key, channel, name and a credentials model."""

from __future__ import annotations

import typing
from datetime import datetime
from typing import Any, Literal

import pytest
from pydantic import SecretStr

from clinicomm.providers import registry
from clinicomm.providers.base import (
    AdapterContext,
    Channel,
    ProviderAdapter,
    ProviderCredentials,
)

EXPECTED = {
    Channel.EMAIL: {"smtp", "ses", "sendgrid", "mailgun", "postmark"},
    Channel.WHATSAPP: {"meta_business", "twilio", "messagebird", "vonage", "bird"},
    Channel.SMS: {"twilio", "aws_sns", "messagebird", "vonage", "bird"},
}


@pytest.mark.parametrize("channel", list(Channel))
def test_every_provider_of_the_contract_is_registered(channel: Channel) -> None:
    assert set(registry.keys(channel)) == EXPECTED[channel]


@pytest.mark.parametrize("spec", registry.specs(), ids=lambda s: f"{s.channel}:{s.key}")
def test_spec_declares_everything(spec: registry.ProviderSpec) -> None:
    assert spec.display_name
    assert issubclass(spec.credentials_model, ProviderCredentials)
    assert spec.credentials_model.secret_fields(), "every provider has at least one secret"


_ENDPOINT_NAMES = ("url", "host", "port", "endpoint")


@pytest.mark.parametrize("spec", registry.specs(), ids=lambda s: f"{s.channel}:{s.key}")
def test_every_destination_field_is_an_endpoint_field(spec: registry.ProviderSpec) -> None:
    """A field naming where the adapter connects is declared in `endpoint_fields`, so the
    save-time egress check and "a masked secret cannot follow a changed endpoint" (#13) cover
    it; a provider added later cannot forget it."""
    model = spec.credentials_model
    destinations = {
        name
        for name in model.model_fields
        if any(name == part or name.endswith(f"_{part}") for part in _ENDPOINT_NAMES)
    }
    assert destinations <= set(model.endpoint_fields), (model.__name__, destinations)


# --- secrets never leak through repr/str/model_dump ------------------------------------------

CANARY = "canary-SECRET-7d41b0"


def _sample_value(name: str, annotation: Any) -> Any:
    """A plausible value for one credentials field; secrets get a canary containing the name."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if annotation is SecretStr or SecretStr in args:
        return f"{CANARY}-{name}"
    if typing.get_origin(annotation) is Literal:
        return args[0]
    if typing.get_origin(annotation) is list:
        return [_sample_value(name, args[0])]
    if args and typing.get_origin(annotation) is not dict:
        return _sample_value(name, args[0])
    if annotation is bool:
        return False
    if annotation in (int, float):
        return 1
    if annotation is datetime:
        return None
    if annotation is dict or typing.get_origin(annotation) is dict:
        return {}
    return f"sample-{name}@example.com" if "email" in name else f"sample-{name}"


def sample_credentials(model: type[ProviderCredentials]) -> ProviderCredentials:
    """Every field filled (optional ones too, so "one of" validators pass)."""
    data = {
        name: _sample_value(name, info.annotation)
        for name, info in model.model_fields.items()
        if name != "expires_at"
    }
    return model.model_validate(data)


@pytest.mark.parametrize("spec", registry.specs(), ids=lambda s: f"{s.channel}:{s.key}")
def test_adapter_declares_its_identity(spec: registry.ProviderSpec) -> None:
    adapter = spec.adapter
    assert issubclass(adapter, ProviderAdapter)
    assert adapter.key == spec.key
    assert isinstance(adapter.channel, Channel)
    assert adapter.display_name
    assert adapter.credentials_model is spec.credentials_model


@pytest.mark.parametrize("spec", registry.specs(), ids=lambda s: f"{s.channel}:{s.key}")
def test_no_secret_in_repr_str_or_default_dump(spec: registry.ProviderSpec) -> None:
    creds = sample_credentials(spec.credentials_model)
    secrets = list(spec.credentials_model.secret_fields())
    assert secrets
    # The canary really is inside (so the checks below are meaningful).
    assert CANARY in str(creds.secret_dict())
    adapter = spec.adapter(creds, AdapterContext())
    views = [
        repr(creds),
        str(creds),
        repr(creds.model_dump()),
        str(creds.model_dump(mode="json")),
        str(creds.model_dump(mode="json", by_alias=True)),
        str(creds.public_dict()),
        repr(adapter),
        str(adapter),
        repr(vars(adapter)) if hasattr(adapter, "__dict__") else "",
        " ".join(adapter.describe()),
    ]
    for view in views:
        assert CANARY not in view, view


@pytest.mark.parametrize(
    "spec",
    registry.specs(Channel.EMAIL),
    ids=lambda s: s.key,
)
def test_email_adapters_are_implemented(spec: registry.ProviderSpec) -> None:
    from clinicomm.providers._pending import PendingAdapter

    assert not issubclass(spec.adapter, PendingAdapter)
