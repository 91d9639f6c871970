"""What is configured: each clinic's own provider keys per channel, read from `clinics.settings`
without decrypting anything (provider keys are stored in clear, only secrets are encrypted).

Feeds the computed gauges (`communication_active_clinics`, `communication_providers_in_use`),
the periodic probes and the alert rules.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from sqlalchemy import select

from clinicomm.providers import registry
from clinicomm.providers.base import Channel
from clinicomm.settings.models import CommunicationSettings
from clinicomm.store.db import Database
from clinicomm.store.models import Clinic
from clinicomm.telemetry import metrics

COMM = "communicationSettings"

#: clinic id → channel → active provider keys, primary first.
Inventory = dict[str, dict[Channel, list[str]]]


def _keys(channel_doc: Any) -> list[str]:
    if not isinstance(channel_doc, dict) or channel_doc.get("enabled", True) is False:
        return []
    slots: list[Any] = [channel_doc.get("primary")]
    fallback = channel_doc.get("fallback")
    if isinstance(fallback, list):
        slots.extend(fallback)
    keys = []
    for slot in slots:
        if not isinstance(slot, dict) or slot.get("enabled", True) is False:
            continue
        key = slot.get("provider")
        if isinstance(key, str) and key != registry.DISABLED:
            keys.append(key)
    return keys


async def clinic_inventory(db: Database) -> Inventory:
    """Every clinic with its own settings for at least one channel (active slots only)."""
    async with db.read() as session:
        rows = (await session.execute(select(Clinic.id, Clinic.settings))).all()
    result: Inventory = {}
    for clinic_id, settings in rows:
        comm = settings.get(COMM) if isinstance(settings, dict) else None
        if not isinstance(comm, dict):
            continue
        channels: dict[Channel, list[str]] = {}
        for channel in Channel:
            if channel.value in comm and isinstance(comm[channel.value], dict):
                channels[channel] = _keys(comm[channel.value])
        if channels:
            result[str(clinic_id)] = channels
    return result


def global_keys(global_settings: CommunicationSettings) -> dict[Channel, list[str]]:
    """The global providers' keys per channel."""
    result: dict[Channel, list[str]] = {}
    for channel in Channel:
        settings = global_settings.channel(channel)
        if settings is not None and settings.enabled:
            result[channel] = [slot.provider for slot in settings.own_providers()]
    return result


def set_gauges(inventory: Inventory, global_providers: dict[Channel, list[str]]) -> None:
    """`communication_active_clinics` (clinics with their own settings) and
    `communication_providers_in_use{provider}` (configured slots by provider key, the global
    providers included once)."""
    metrics.ACTIVE_CLINICS.set(len(inventory))
    slots: Counter[str] = Counter()
    for channels in inventory.values():
        for keys in channels.values():
            slots.update(keys)
    for keys in global_providers.values():
        slots.update(keys)
    metrics.PROVIDERS_IN_USE.clear()
    for key, count in slots.items():
        metrics.PROVIDERS_IN_USE.labels(key).set(count)


class GaugeRefresher:
    """Recomputes the gauges from the database, at most once per `min_interval` seconds
    (called on each `/metrics` scrape)."""

    def __init__(
        self, db: Database, global_settings: CommunicationSettings, min_interval: float = 1.0
    ) -> None:
        self.db = db
        self.global_settings = global_settings
        self.min_interval = min_interval
        self._last = 0.0

    async def refresh(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < self.min_interval:
            return
        self._last = now
        set_gauges(await clinic_inventory(self.db), global_keys(self.global_settings))
