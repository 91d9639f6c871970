"""Twilio Programmable Messaging for WhatsApp (`whatsapp:+…` addresses)."""

from __future__ import annotations

from clinicomm.providers import registry
from clinicomm.providers.base import Channel
from clinicomm.providers.shared.credentials import TwilioCredentials
from clinicomm.providers.shared.twilio import WHATSAPP_PREFIX, TwilioAdapterBase


@registry.register
class TwilioWhatsAppAdapter(TwilioAdapterBase):
    """WhatsApp through Twilio: `To`/`From` carry the `whatsapp:` prefix."""

    key = "twilio"
    channel = Channel.WHATSAPP
    display_name = "Twilio"
    credentials_model = TwilioCredentials
    address_prefix = WHATSAPP_PREFIX
    #: 63003: the channel could not find the `To` address (the number is not on WhatsApp):
    #: https://www.twilio.com/docs/api/errors/63003. The clinic's channel fallback may take it.
    unreachable_codes = frozenset({"63003"})
