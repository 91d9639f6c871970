"""MessageBird Conversations API for WhatsApp (see providers.shared.messagebird)."""

from __future__ import annotations

from clinicomm.providers import registry
from clinicomm.providers.base import Channel
from clinicomm.providers.shared.credentials import MessageBirdCredentials
from clinicomm.providers.shared.messagebird import MessageBirdWhatsAppBase


@registry.register
class MessageBirdWhatsAppAdapter(MessageBirdWhatsAppBase):
    """WhatsApp text and hsm templates through MessageBird's `channelId`."""

    key = "messagebird"
    channel = Channel.WHATSAPP
    display_name = "MessageBird"
    credentials_model = MessageBirdCredentials
