"""Vonage Messages API for Sms."""

from __future__ import annotations

from clinicomm.providers import registry
from clinicomm.providers._pending import PendingAdapter
from clinicomm.providers.base import Channel
from clinicomm.providers.shared.credentials import VonageCredentials


@registry.register
class VonageSmsAdapter(PendingAdapter):
    key = "vonage"
    channel = Channel.SMS
    display_name = "Vonage"
    credentials_model = VonageCredentials
