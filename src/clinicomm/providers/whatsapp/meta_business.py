"""Meta WhatsApp Cloud API."""

from __future__ import annotations

from pydantic import Field, SecretStr

from clinicomm.providers import registry
from clinicomm.providers._pending import PendingAdapter
from clinicomm.providers.base import Channel, ProviderCredentials


class MetaBusinessCredentials(ProviderCredentials):
    """A WhatsApp Business phone number on the Cloud API, with the clinic's template names."""

    api_url: str = "https://graph.facebook.com/v23.0"
    api_key: SecretStr
    phone_number_id: str = Field(min_length=1)
    business_account_id: str | None = None
    #: Logical name (otp, appointmentReminder, …) → the approved template's name at Meta.
    templates: dict[str, str] = Field(default_factory=dict)
    app_secret: SecretStr | None = None
    #: Messages per second this number may send (80 default, 20 coexistence, up to 1,000).
    max_per_second: int = Field(default=80, ge=1, le=1000)


@registry.register
class MetaBusinessAdapter(PendingAdapter):
    key = "meta_business"
    channel = Channel.WHATSAPP
    display_name = "Meta WhatsApp Cloud API"
    credentials_model = MetaBusinessCredentials
