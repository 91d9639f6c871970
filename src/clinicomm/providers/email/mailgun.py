"""Mailgun Messages API (US and EU regions)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr

from clinicomm.providers import registry
from clinicomm.providers._pending import PendingAdapter
from clinicomm.providers.base import Channel, ProviderCredentials


class MailgunCredentials(ProviderCredentials):
    """A Mailgun API key and sending domain; `region` picks the US or EU API host."""

    api_key: SecretStr
    domain: str = Field(min_length=1)
    region: Literal["us", "eu"] = "us"
    from_email: str | None = None
    from_name: str | None = None
    base_url: str | None = None


@registry.register
class MailgunAdapter(PendingAdapter):
    key = "mailgun"
    channel = Channel.EMAIL
    display_name = "Mailgun"
    credentials_model = MailgunCredentials
