"""Every registered adapter declares its key, channel, name and a credentials model."""

from __future__ import annotations

import pytest

from clinicomm.providers import registry
from clinicomm.providers.base import Channel, ProviderCredentials

EXPECTED = {
    Channel.EMAIL: {"smtp", "ses", "sendgrid", "mailgun", "postmark"},
    Channel.WHATSAPP: {"meta_business", "twilio", "messagebird", "vonage"},
    Channel.SMS: {"twilio", "aws_sns", "messagebird", "vonage"},
}


@pytest.mark.parametrize("channel", list(Channel))
def test_every_provider_of_the_contract_is_registered(channel: Channel) -> None:
    assert set(registry.keys(channel)) == EXPECTED[channel]


@pytest.mark.parametrize("spec", registry.specs(), ids=lambda s: f"{s.channel}:{s.key}")
def test_spec_declares_everything(spec: registry.ProviderSpec) -> None:
    assert spec.display_name
    assert issubclass(spec.credentials_model, ProviderCredentials)
    assert spec.credentials_model.secret_fields(), "every provider has at least one secret"
