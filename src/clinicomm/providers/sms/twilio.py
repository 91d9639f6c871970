"""Twilio Programmable Messaging for Sms."""

from __future__ import annotations

from clinicomm.providers import registry
from clinicomm.providers._pending import PendingAdapter
from clinicomm.providers.base import Channel
from clinicomm.providers.shared.credentials import TwilioCredentials


@registry.register
class TwilioSmsAdapter(PendingAdapter):
    key = "twilio"
    channel = Channel.SMS
    display_name = "Twilio"
    credentials_model = TwilioCredentials
