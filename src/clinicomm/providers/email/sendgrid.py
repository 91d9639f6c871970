"""SendGrid v3 Mail Send."""

from __future__ import annotations

from pydantic import SecretStr

from clinicomm.providers import registry
from clinicomm.providers._pending import PendingAdapter
from clinicomm.providers.base import Channel, ProviderCredentials


class SendGridCredentials(ProviderCredentials):
    """A SendGrid API key with Mail Send scope."""

    api_key: SecretStr
    from_email: str | None = None
    from_name: str | None = None
    template_id: str | None = None
    base_url: str = "https://api.sendgrid.com"


@registry.register
class SendGridAdapter(PendingAdapter):
    key = "sendgrid"
    channel = Channel.EMAIL
    display_name = "SendGrid"
    credentials_model = SendGridCredentials
