"""Vonage Messages API for SMS (see providers.shared.vonage).

The older SMS API (`rest.nexmo.com/sms`) is not used: one API for both channels keeps one
error vocabulary and one authentication path.
"""

from __future__ import annotations

from clinicomm.providers import registry
from clinicomm.providers.base import Channel
from clinicomm.providers.shared.credentials import VonageCredentials
from clinicomm.providers.shared.vonage import VonageAdapterBase


@registry.register
class VonageSmsAdapter(VonageAdapterBase):
    """SMS through the Vonage Messages API (`channel: sms`)."""

    key = "vonage"
    channel = Channel.SMS
    display_name = "Vonage"
    credentials_model = VonageCredentials
    vonage_channel = "sms"
