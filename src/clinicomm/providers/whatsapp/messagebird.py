"""MessageBird for WhatsApp."""

from __future__ import annotations

from clinicomm.providers import registry
from clinicomm.providers._pending import PendingAdapter
from clinicomm.providers.base import Channel
from clinicomm.providers.shared.credentials import MessageBirdCredentials


@registry.register
class MessageBirdWhatsAppAdapter(PendingAdapter):
    key = "messagebird"
    channel = Channel.WHATSAPP
    display_name = "MessageBird"
    credentials_model = MessageBirdCredentials
