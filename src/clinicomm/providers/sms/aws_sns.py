"""Amazon SNS Publish (SMS)."""

from __future__ import annotations

from clinicomm.providers import registry
from clinicomm.providers._pending import PendingAdapter
from clinicomm.providers.base import Channel
from clinicomm.providers.shared.credentials import AwsCredentials


class SnsCredentials(AwsCredentials):
    """SNS in one region; `senderId` where the destination country supports it."""

    sender_id: str | None = None


@registry.register
class SnsAdapter(PendingAdapter):
    key = "aws_sns"
    channel = Channel.SMS
    display_name = "Amazon SNS"
    credentials_model = SnsCredentials
