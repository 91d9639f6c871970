"""Bird Channels API, SMS channel (see providers.shared.bird)."""

from __future__ import annotations

from clinicomm.providers import registry
from clinicomm.providers.base import Channel
from clinicomm.providers.shared.bird import BirdAdapterBase
from clinicomm.providers.shared.credentials import BirdCredentials


@registry.register
class BirdSmsAdapter(BirdAdapterBase):
    """SMS through a Bird SMS channel (`channelId`)."""

    key = "bird"
    channel = Channel.SMS
    display_name = "Bird (Channels API)"
    credentials_model = BirdCredentials
