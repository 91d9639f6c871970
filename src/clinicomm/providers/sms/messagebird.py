"""MessageBird REST SMS API (see providers.shared.messagebird)."""

from __future__ import annotations

from clinicomm.providers import registry
from clinicomm.providers.base import Channel
from clinicomm.providers.shared.credentials import MessageBirdCredentials
from clinicomm.providers.shared.messagebird import MessageBirdSmsBase


@registry.register
class MessageBirdSmsAdapter(MessageBirdSmsBase):
    """SMS from the configured `originator`."""

    key = "messagebird"
    channel = Channel.SMS
    display_name = "MessageBird"
    credentials_model = MessageBirdCredentials
