"""Twilio Programmable Messaging for WhatsApp."""

from __future__ import annotations

from clinicomm.providers import registry
from clinicomm.providers._pending import PendingAdapter
from clinicomm.providers.base import Channel
from clinicomm.providers.shared.credentials import TwilioCredentials


@registry.register
class TwilioWhatsAppAdapter(PendingAdapter):
    key = "twilio"
    channel = Channel.WHATSAPP
    display_name = "Twilio"
    credentials_model = TwilioCredentials
