"""Bird Channels API, WhatsApp channel (see providers.shared.bird)."""

from __future__ import annotations

from clinicomm.providers import registry
from clinicomm.providers.base import Channel
from clinicomm.providers.shared.bird import BirdAdapterBase
from clinicomm.providers.shared.credentials import BirdCredentials


@registry.register
class BirdWhatsAppAdapter(BirdAdapterBase):
    """WhatsApp through a Bird WhatsApp channel (`channelId`); templates by Studio project."""

    key = "bird"
    channel = Channel.WHATSAPP
    display_name = "Bird (Channels API)"
    credentials_model = BirdCredentials
