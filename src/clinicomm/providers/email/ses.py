"""Amazon SES (API v2 SendEmail)."""

from __future__ import annotations

from clinicomm.providers import registry
from clinicomm.providers._pending import PendingAdapter
from clinicomm.providers.base import Channel
from clinicomm.providers.shared.credentials import AwsCredentials


class SesCredentials(AwsCredentials):
    """SES in one region, with the clinic's verified sender and optional configuration set."""

    from_email: str | None = None
    from_name: str | None = None
    configuration_set: str | None = None


@registry.register
class SesAdapter(PendingAdapter):
    key = "ses"
    channel = Channel.EMAIL
    display_name = "Amazon SES"
    credentials_model = SesCredentials
