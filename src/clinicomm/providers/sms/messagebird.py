"""MessageBird for Sms."""

from __future__ import annotations

from clinicomm.providers import registry
from clinicomm.providers._pending import PendingAdapter
from clinicomm.providers.base import Channel
from clinicomm.providers.shared.credentials import MessageBirdCredentials


@registry.register
class MessageBirdSmsAdapter(PendingAdapter):
    key = "messagebird"
    channel = Channel.SMS
    display_name = "MessageBird"
    credentials_model = MessageBirdCredentials
