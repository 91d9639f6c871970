"""Checks made before any provider is called; a blocked delivery never reaches a provider.

Each check answers a reason (the delivery ends `failed` with it) or None.
"""

from __future__ import annotations

from clinicomm.delivery.sender import Content
from clinicomm.providers.base import Channel
from clinicomm.providers.phone import sms_segments
from clinicomm.settings.models import SmsSettings
from clinicomm.settings.service import ResolvedChannel


def sms_too_long(resolved: ResolvedChannel, content: Content) -> str | None:
    """The clinic caps SMS segments (`sms.maxSegments`) and the body needs more."""
    settings = resolved.effective
    if resolved.channel is not Channel.SMS or not isinstance(settings, SmsSettings):
        return None
    if settings.max_segments is None or content.body is None:
        return None
    encoding, segments = sms_segments(content.body)
    if segments > settings.max_segments:
        return (
            f"SMS body needs {segments} {encoding} segments; "
            f"the clinic allows {settings.max_segments}"
        )
    return None


def blocked(resolved: ResolvedChannel, content: Content) -> str | None:
    """The first reason not to send, or None."""
    return sms_too_long(resolved, content)
