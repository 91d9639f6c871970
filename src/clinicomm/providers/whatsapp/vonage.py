"""Vonage Messages API for WhatsApp."""

from __future__ import annotations

from clinicomm.providers import registry
from clinicomm.providers._pending import PendingAdapter
from clinicomm.providers.base import Channel
from clinicomm.providers.shared.credentials import VonageCredentials


@registry.register
class VonageWhatsAppAdapter(PendingAdapter):
    key = "vonage"
    channel = Channel.WHATSAPP
    display_name = "Vonage"
    credentials_model = VonageCredentials
