"""Twilio Programmable Messaging for SMS."""

from __future__ import annotations

from clinicomm.providers import registry
from clinicomm.providers.base import Channel
from clinicomm.providers.shared.credentials import TwilioCredentials
from clinicomm.providers.shared.twilio import TwilioAdapterBase


@registry.register
class TwilioSmsAdapter(TwilioAdapterBase):
    """SMS through Twilio: plain E.164 `To`/`From` (or a Messaging Service)."""

    key = "twilio"
    global_default = True
    channel = Channel.SMS
    display_name = "Twilio"
    credentials_model = TwilioCredentials
