"""Postmark single email API."""

from __future__ import annotations

from pydantic import SecretStr

from clinicomm.providers import registry
from clinicomm.providers._pending import PendingAdapter
from clinicomm.providers.base import Channel, ProviderCredentials


class PostmarkCredentials(ProviderCredentials):
    """A Postmark server token and message stream."""

    server_token: SecretStr
    from_email: str | None = None
    from_name: str | None = None
    message_stream: str = "outbound"
    base_url: str = "https://api.postmarkapp.com"


@registry.register
class PostmarkAdapter(PendingAdapter):
    key = "postmark"
    channel = Channel.EMAIL
    display_name = "Postmark"
    credentials_model = PostmarkCredentials
