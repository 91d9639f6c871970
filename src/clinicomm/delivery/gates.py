"""Checks that need the database before any provider call: opt-outs and the WhatsApp window.

The worker loads both facts for a whole claimed batch in one read (`load`), then asks per
delivery, right after `policy.blocked`:

* `suppressed`: the clinic must not send to this address on this channel (STOP, manual
  opt-out, hard bounce, complaint, Twilio 21610). The delivery ends `suppressed`, no provider
  is called, nothing falls back (PROVIDER-FACTS §8 items 17-19). The check is made when the
  delivery is claimed, so a STOP that arrives after the message was accepted still stops it.
* `window`: WhatsApp allows free-form text only within 24 hours of the patient's last
  inbound message (PROVIDER-FACTS §1.2, §8 item 10). Outside it, and for a patient who never
  wrote (no inbound message recorded: the window is closed), a text without a template is
  sent as the clinic's `whatsapp.windowTemplates[category]` with the text as its one body
  parameter, or fails `template required` before any provider call. Templates are always
  allowed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import datetime

from clinicomm.delivery.events import WINDOW, last_inbound_among, suppressed_among
from clinicomm.delivery.queue import Claimed
from clinicomm.delivery.sender import Content
from clinicomm.providers.base import Channel, TemplateRef
from clinicomm.settings.models import WhatsAppSettings
from clinicomm.settings.service import ResolvedChannel
from clinicomm.store.db import Database

TEMPLATE_REQUIRED = "template required"


@dataclass(slots=True)
class Gates:
    """The facts loaded for one claimed batch."""

    #: Delivery ids whose (clinic, channel, address) is suppressed.
    suppressed: set[str] = field(default_factory=set)
    #: Delivery id → the patient's last inbound WhatsApp message (absent: never wrote).
    last_inbound: dict[str, datetime] = field(default_factory=dict)


async def load(db: Database, batch: list[Claimed]) -> Gates:
    """Suppressions and window facts for every delivery of `batch` (two queries at most)."""
    gates = Gates()
    scoped = [c for c in batch if c.clinic_id is not None]
    if not scoped:
        return gates
    async with db.read() as session:
        hit = await suppressed_among(
            session, [(c.clinic_id or "", c.channel, _key(c)) for c in scoped]
        )
        gates.suppressed = {c.id for c in scoped if (c.clinic_id or "", c.channel, _key(c)) in hit}
        wa = [c for c in scoped if c.channel == Channel.WHATSAPP.value]
        if wa:
            last = await last_inbound_among(session, [(c.clinic_id or "", _key(c)) for c in wa])
            for c in wa:
                at = last.get((c.clinic_id or "", _key(c)))
                if at is not None:
                    gates.last_inbound[c.id] = at
    return gates


def _key(claimed: Claimed) -> str:
    """What suppressions and the window are looked up by: the address's blind index (the
    stored address itself only for a row written before addresses were encrypted)."""
    return claimed.recipient_index or claimed.recipient


def window(
    resolved: ResolvedChannel,
    content: Content,
    last_inbound: datetime | None,
    now: datetime,
) -> Content | str:
    """The content to send on WhatsApp given the 24-hour window, or `TEMPLATE_REQUIRED`."""
    if resolved.channel is not Channel.WHATSAPP or content.template is not None:
        return content
    if last_inbound is not None and last_inbound > now - WINDOW:
        return content
    settings = resolved.effective
    mapped = (
        settings.window_templates.get(content.category or "GENERAL")
        if isinstance(settings, WhatsAppSettings)
        else None
    )
    if mapped is None or not content.body:
        return TEMPLATE_REQUIRED
    return dataclasses.replace(
        content,
        template=TemplateRef(
            name=mapped.name, language=mapped.language, variables={"1": content.body}
        ),
    )
