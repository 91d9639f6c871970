"""The config service: clinics' communication settings, validated, encrypted and cached.

Reads: `get_clinic_config(clinic_id, channel)` answers the typed, decrypted config of one
channel, plus the global config behind it, from L1 → L2 (Redis) → database.

Writes take the caller's session and never commit: the HTTP request (or `save_settings` for
Python callers) commits, then calls `committed(change)`, which refreshes Redis and makes every
process drop the old config before it returns (see `settings.cache`).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from pydantic import ValidationError
from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from clinicomm.crypto import FieldDecryptionError
from clinicomm.providers import registry
from clinicomm.providers.base import MASK, Channel, ProviderCredentials
from clinicomm.providers.egress import PERMISSIVE, EgressPolicy
from clinicomm.settings import secrets
from clinicomm.settings.cache import ConfigCache
from clinicomm.settings.flight import SingleFlight
from clinicomm.settings.keys import PLATFORM, KeyStore
from clinicomm.settings.models import (
    CallbackSettings,
    ChannelSettings,
    CommunicationSettings,
    EmailSettings,
    MessagePolicy,
    SmsSettings,
    WhatsAppSettings,
)
from clinicomm.settings.validation import (
    SETTINGS_PREFIX,
    Problem,
    SettingsValidationError,
    plain_document,
    validate_model,
    validate_settings,
)
from clinicomm.store.db import Database
from clinicomm.store.models import (
    Clinic,
    ClinicKey,
    Delivery,
    InboundContact,
    Suppression,
    aware,
    utcnow,
)
from clinicomm.telemetry import metrics

log = logging.getLogger(__name__)

COMM = "communicationSettings"
#: The `communicationSettings` key of the status callbacks (and their L1 cache slot).
CALLBACKS = "callbacks"
#: The `communicationSettings` key of the clinic's per-category message defaults.
MESSAGES = "messages"


@dataclass(frozen=True, slots=True)
class _Boxed:
    """An L1 entry that may hold None (a clinic without callbacks is cached too)."""

    value: Any


CHANNEL_MODELS: dict[Channel, type[ChannelSettings]] = {
    Channel.EMAIL: EmailSettings,
    Channel.WHATSAPP: WhatsAppSettings,
    Channel.SMS: SmsSettings,
}


class ClinicNotFoundError(Exception):
    def __init__(self, clinic_id: str) -> None:
        super().__init__(f"clinic {clinic_id!r} not found")
        self.clinic_id = clinic_id


class ClinicExistsError(Exception):
    def __init__(self, clinic_id: str) -> None:
        super().__init__(f"clinic {clinic_id!r} already exists")
        self.clinic_id = clinic_id


class VersionConflictError(Exception):
    """`If-Match` names a version that is no longer current."""

    def __init__(self, clinic_id: str, expected: int, current: int) -> None:
        super().__init__(
            f"clinic {clinic_id!r} is at version {current}, not {expected}; reload and retry"
        )
        self.current = current


@dataclass(frozen=True, slots=True)
class ResolvedChannel:
    """One channel's config for one clinic: its own settings and the global ones behind them."""

    clinic_id: str | None
    channel: Channel
    version: int
    own: ChannelSettings | None
    global_: ChannelSettings | None

    @property
    def source(self) -> str:
        """`clinic` when the clinic has its own settings for the channel, else `global`/`none`."""
        if self.own is not None:
            return "clinic"
        return "global" if self.global_ is not None else "none"

    @property
    def effective(self) -> ChannelSettings | None:
        return self.own if self.own is not None else self.global_


@dataclass
class ClinicRecord:
    """A clinic with its settings in clear (secrets decrypted). Never answer it unmasked."""

    id: str
    name: str
    version: int
    settings: dict[str, Any]
    created_at: datetime
    updated_at: datetime

    @property
    def communication(self) -> dict[str, Any] | None:
        value = self.settings.get(COMM)
        return value if isinstance(value, dict) else None

    def masked(self) -> dict[str, Any]:
        """The API form: every secret replaced by the mask."""
        settings = copy.deepcopy(self.settings)
        if isinstance(settings.get(COMM), dict):
            settings[COMM] = secrets.mask(settings[COMM])
        return {
            "id": self.id,
            "name": self.name,
            "version": self.version,
            "settings": settings,
            "createdAt": self.created_at.isoformat(),
            "updatedAt": self.updated_at.isoformat(),
        }


@dataclass
class Change:
    """A committed-to-be change; `committed()` publishes it once the transaction is durable."""

    clinic_id: str
    version: int
    action: str
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    record: ClinicRecord | None = None
    channels: list[str] = field(default_factory=list)



async def _stored_section(session: Any, clinic_id: str, section: str) -> tuple[int, Any]:
    """The clinic's version and its stored `communicationSettings.<section>` (None when the
    clinic or the section is absent; version 0 for an unknown clinic)."""
    row = await session.get(Clinic, clinic_id)
    if row is None:
        return 0, None
    comm = row.settings.get(COMM) if isinstance(row.settings, dict) else None
    return row.version, comm.get(section) if isinstance(comm, dict) else None

class ConfigService:
    """Clinic settings: validate, encrypt, store, cache, invalidate across processes."""

    def __init__(
        self,
        db: Database,
        keys: KeyStore,
        cache: ConfigCache[ResolvedChannel],
        global_settings: CommunicationSettings,
        *,
        poll_seconds: float = 0.5,
        egress: EgressPolicy = PERMISSIVE,
    ) -> None:
        self.db = db
        #: Judges endpoint fields at save time (the same policy refuses them at connect time).
        self.egress = egress
        self.keys = keys
        self.cache = cache
        cache.on_drop = keys.forget
        self.global_settings = global_settings
        self.poll_seconds = poll_seconds
        self._poller: asyncio.Task[None] | None = None
        self._hit: dict[tuple[str, str], Any] = {}
        self._loads: SingleFlight[ResolvedChannel] = SingleFlight()
        #: The callbacks and messages sections (their loads answer different types).
        self._sections: SingleFlight[Any] = SingleFlight()

    # ---- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        await self.cache.start()
        if self._poller is None:
            self._poller = asyncio.create_task(self._poll(), name="config-poll")

    async def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
            self._poller = None
        await self.cache.stop()

    async def _poll(self) -> None:
        """Safety net: notice changes made by other processes even without Redis."""
        since = utcnow() - timedelta(seconds=2)
        while True:
            await asyncio.sleep(self.poll_seconds)
            try:
                async with self.db.sessions() as session:
                    rows = (
                        await session.execute(
                            select(Clinic.id, Clinic.version, Clinic.updated_at).where(
                                Clinic.updated_at > since
                            )
                        )
                    ).all()
                for clinic_id, version, updated_at in rows:
                    if version > self.cache.known_version(clinic_id):
                        self.cache.drop(clinic_id, version)
                    stamp = aware(updated_at) - timedelta(seconds=2)
                    since = max(since, stamp)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the poller must outlive a database hiccup
                log.warning(
                    "config poll failed",
                    extra={"event": "config_poll_failed", "error": type(exc).__name__},
                )

    # ---- reads ----------------------------------------------------------------------------
    async def get_clinic_config(self, clinic_id: str | None, channel: Channel) -> ResolvedChannel:
        """The clinic's config for a channel (or the global one when it has none).

        Raises CryptoError when the stored secrets cannot be decrypted with the configured
        master keys; never fails because Redis is down.
        """
        start = time.perf_counter()
        label = clinic_id or "global"
        if clinic_id is None:
            resolved = self._global_only(channel)
        else:
            cached = self.cache.l1_get(channel.value, clinic_id)
            if cached is not None:
                self._count(label, channel, "l1", start)
                return cached
            # Concurrent misses share one load, unless the clinic was dropped since it started.
            key = (clinic_id, channel, self.cache.generation(clinic_id))
            resolved = await self._loads.run(key, lambda: self._load(clinic_id, channel, label))
            if resolved.version == 0:  # unknown clinic: no series (see `_load`)
                return resolved
        metrics.CONFIG_FETCH_LATENCY.labels(label, channel.value).observe(
            time.perf_counter() - start
        )
        return resolved

    async def get_callbacks(self, clinic_id: str) -> CallbackSettings | None:
        """The clinic's status-callback settings (secret in clear), or None.

        Cached in L1 with the channels (dropped with them on every change of the clinic);
        a miss reads the database.
        """
        result: CallbackSettings | None = await self._section(
            clinic_id, CALLBACKS, lambda: self._load_callbacks(clinic_id)
        )
        return result

    async def _load_callbacks(self, clinic_id: str) -> CallbackSettings | None:
        async with self.db.sessions() as session:
            version, stored = await _stored_section(session, clinic_id, CALLBACKS)
            settings: CallbackSettings | None = None
            if isinstance(stored, dict):
                cipher = await self.keys.cipher(session, clinic_id)
                plain = secrets.decrypt({CALLBACKS: stored}, cipher)[CALLBACKS]
                settings = validate_model(CallbackSettings, plain, (COMM, CALLBACKS))
        self.cache.l1_put(CALLBACKS, clinic_id, version, _Boxed(settings))  # type: ignore[arg-type]
        return settings

    async def get_message_policy(self, clinic_id: str) -> MessagePolicy | None:
        """The clinic's `communicationSettings.messages` (category → priority and default
        time-to-live), or None. Cached in L1 like the callbacks (no secrets in it)."""
        result: MessagePolicy | None = await self._section(
            clinic_id, MESSAGES, lambda: self._load_message_policy(clinic_id)
        )
        return result

    async def _section(
        self, clinic_id: str, section: str, load: Callable[[], Awaitable[Any]]
    ) -> Any:
        """A clinic's section (callbacks, messages) from L1, else `load()` (which caches it):
        one load for the concurrent misses, unless the clinic was dropped since it started."""
        cached: Any = self.cache.l1_get(section, clinic_id)
        if cached is not None:
            return cached.value
        key = (clinic_id, section, self.cache.generation(clinic_id))
        return await self._sections.run(key, load)

    async def _load_message_policy(self, clinic_id: str) -> MessagePolicy | None:
        async with self.db.sessions() as session:
            version, stored = await _stored_section(session, clinic_id, MESSAGES)
            policy = (
                validate_model(MessagePolicy, stored, (COMM, MESSAGES))
                if isinstance(stored, dict)
                else None
            )
        self.cache.l1_put(MESSAGES, clinic_id, version, _Boxed(policy))  # type: ignore[arg-type]
        return policy

    def _count(self, label: str, channel: Channel, level: str, start: float) -> None:
        key = (label, channel.value)
        children = self._hit.get(key)
        if children is None:
            children = (
                metrics.CONFIG_CACHE_HIT.labels(label, channel.value, level),
                metrics.CONFIG_FETCH_LATENCY.labels(label, channel.value),
            )
            self._hit[key] = children
        children[0].inc()
        children[1].observe(time.perf_counter() - start)

    async def _load(self, clinic_id: str, channel: Channel, label: str) -> ResolvedChannel:
        l2 = await self.cache.l2_get(channel.value, clinic_id)
        if l2 is not None:
            version, stored = l2
            if version >= self.cache.known_version(clinic_id):
                try:
                    async with self.db.sessions() as session:
                        resolved = await self._resolve(session, clinic_id, channel, version, stored)
                except FieldDecryptionError:
                    # A stale entry under a data-key version destroyed since (a rotation run
                    # by a process without Redis): the database has the current form.
                    resolved = None
                if resolved is not None:
                    metrics.CONFIG_CACHE_HIT.labels(label, channel.value, "l2").inc()
                    self.cache.l1_put(channel.value, clinic_id, version, resolved)
                    return resolved
        async with self.db.sessions() as session:
            row = await session.get(Clinic, clinic_id)
            if row is None:
                version, stored = 0, None
            else:
                version = row.version
                comm = row.settings.get(COMM) if isinstance(row.settings, dict) else None
                stored = comm.get(channel.value) if isinstance(comm, dict) else None
            resolved = await self._resolve(session, clinic_id, channel, version, stored)
        if row is None:
            # An unknown clinic (version 0): no per-clinic metric series and no cache entry,
            # so requests naming made-up clinics cannot grow /metrics or the caches.
            return resolved
        metrics.CONFIG_CACHE_MISS.labels(label, channel.value).inc()
        await self.cache.l2_put(channel.value, clinic_id, version, stored)
        self.cache.l1_put(channel.value, clinic_id, version, resolved)
        return resolved

    async def _resolve(
        self,
        session: AsyncSession,
        clinic_id: str,
        channel: Channel,
        version: int,
        stored: Any,
    ) -> ResolvedChannel:
        own: ChannelSettings | None = None
        if isinstance(stored, dict):
            cipher = await self.keys.cipher(session, clinic_id)
            plain = secrets.decrypt({channel.value: stored}, cipher)[channel.value]
            own = validate_model(CHANNEL_MODELS[channel], plain, (COMM, channel.value))
        return ResolvedChannel(
            clinic_id=clinic_id,
            channel=channel,
            version=version,
            own=own,
            global_=self.global_settings.channel(channel),
        )

    def _global_only(self, channel: Channel) -> ResolvedChannel:
        return ResolvedChannel(None, channel, 0, None, self.global_settings.channel(channel))

    async def get_clinic(self, session: AsyncSession, clinic_id: str) -> ClinicRecord:
        """The clinic with secrets decrypted. Raises ClinicNotFoundError."""
        row = await session.get(Clinic, clinic_id)
        if row is None:
            raise ClinicNotFoundError(clinic_id)
        return await self._record(session, row)

    async def _record(self, session: AsyncSession, row: Clinic) -> ClinicRecord:
        settings = copy.deepcopy(row.settings or {})
        comm = settings.get(COMM)
        if isinstance(comm, dict):
            cipher = await self.keys.cipher(session, row.id)
            settings[COMM] = secrets.decrypt(comm, cipher)
        return ClinicRecord(
            id=row.id,
            name=row.name,
            version=row.version,
            settings=settings,
            created_at=aware(row.created_at),
            updated_at=aware(row.updated_at),
        )

    # ---- writes (caller commits, then awaits committed()) ---------------------------------
    async def create_clinic(
        self, session: AsyncSession, clinic_id: str, name: str, settings: dict[str, Any]
    ) -> Change:
        """Validate and store a new clinic with its own data key."""
        plain = self._prepare(settings, stored_plain=None)
        if await session.get(Clinic, clinic_id) is not None:
            raise ClinicExistsError(clinic_id)
        now = utcnow()
        row = Clinic(
            id=clinic_id, name=name, settings={}, version=1, created_at=now, updated_at=now
        )
        session.add(row)
        await session.flush()
        cipher = await self.keys.create(session, clinic_id)
        row.settings = _encrypt_settings(plain, cipher)
        await session.flush()
        record = ClinicRecord(clinic_id, name, 1, plain, now, now)
        return Change(clinic_id, 1, "clinic.create", None, plain.get(COMM), record)

    async def replace_settings(
        self,
        session: AsyncSession,
        clinic_id: str,
        settings: dict[str, Any],
        *,
        expected_version: int | None = None,
        name: str | None = None,
        action: str = "settings.update",
    ) -> Change:
        """Replace the clinic's settings. A secret given as the mask keeps the stored value
        (SettingsValidationError if none is stored). Raises ClinicNotFoundError,
        VersionConflictError (stale `expected_version`)."""
        row = await self._locked(session, clinic_id, expected_version)
        current = await self._record(session, row)
        plain = self._prepare(settings, stored_plain=current.communication)
        return await self._write(session, row, current, plain, action, name)

    async def delete_settings(
        self,
        session: AsyncSession,
        clinic_id: str,
        channel: Channel | None,
        *,
        expected_version: int | None = None,
    ) -> Change:
        """Remove the clinic's settings for one channel (or all): it falls back to global."""
        row = await self._locked(session, clinic_id, expected_version)
        current = await self._record(session, row)
        plain = copy.deepcopy(current.settings)
        comm = plain.get(COMM)
        if channel is None:
            plain.pop(COMM, None)
        elif isinstance(comm, dict):
            comm.pop(channel.value, None)
        action = "settings.delete" if channel is None else f"settings.delete.{channel.value}"
        return await self._write(session, row, current, plain, action, None)

    async def delete_clinic(
        self, session: AsyncSession, clinic_id: str, *, expected_version: int | None = None
    ) -> Change:
        """Delete the clinic: its settings and its data keys (a crypto-shred: every message
        and secret encrypted under the clinic's key becomes unreadable), its suppressions and
        inbound contacts; its queued deliveries end `failed` ("clinic deleted"). Messages,
        deliveries, attempts and the audit log stay as records."""
        row = await self._locked(session, clinic_id, expected_version)
        current = await self._record(session, row)
        await session.execute(delete(ClinicKey).where(ClinicKey.clinic_id == clinic_id))
        await session.execute(delete(Suppression).where(Suppression.clinic_id == clinic_id))
        await session.execute(delete(InboundContact).where(InboundContact.clinic_id == clinic_id))
        await session.execute(
            update(Delivery)
            .where(Delivery.clinic_id == clinic_id, Delivery.status == "queued")
            .values(
                status="failed",
                error={"reason": "clinic deleted", "errors": []},
                updated_at=utcnow(),
            )
            .execution_options(synchronize_session=False)
        )
        await session.delete(row)
        await session.flush()
        self.keys.forget(clinic_id)
        return Change(clinic_id, current.version + 1, "clinic.delete", current.communication, None)

    async def list_clinics(
        self, session: AsyncSession, *, limit: int, after: str | None
    ) -> tuple[list[Clinic], str | None]:
        """Clinics by id (the platform's own key holder excluded), and the id to continue
        after (None at the end). Rows only: names and versions, no settings are decrypted."""
        query = select(Clinic).where(Clinic.id != PLATFORM)
        if after is not None:
            query = query.where(Clinic.id > after)
        rows = list((await session.scalars(query.order_by(Clinic.id).limit(limit + 1))).all())
        more = len(rows) > limit
        rows = rows[:limit]
        return rows, (rows[-1].id if more and rows else None)

    async def _locked(
        self, session: AsyncSession, clinic_id: str, expected_version: int | None
    ) -> Clinic:
        row = (
            await session.execute(select(Clinic).where(Clinic.id == clinic_id).with_for_update())
        ).scalar_one_or_none()
        if row is None:
            raise ClinicNotFoundError(clinic_id)
        if expected_version is not None and expected_version != row.version:
            raise VersionConflictError(clinic_id, expected_version, row.version)
        return row

    async def _write(
        self,
        session: AsyncSession,
        row: Clinic,
        current: ClinicRecord,
        plain: dict[str, Any],
        action: str,
        name: str | None,
    ) -> Change:
        cipher = await self.keys.cipher(session, row.id)
        row.settings = _encrypt_settings(plain, cipher)
        row.version = current.version + 1
        if name:
            row.name = name
        row.updated_at = utcnow()
        await session.flush()
        record = ClinicRecord(
            row.id, row.name, row.version, plain, current.created_at, aware(row.updated_at)
        )
        return Change(row.id, row.version, action, current.communication, plain.get(COMM), record)

    async def reencrypt(self, session: AsyncSession, clinic_id: str) -> Change:
        """Write the clinic's settings again, secrets encrypted under its current data key
        version (a data-key rotation); the settings themselves do not change (not validated
        again). The caller commits, then awaits `committed()` (the caches hold ciphertexts)."""
        row = await self._locked(session, clinic_id, None)
        current = await self._record(session, row)
        return await self._write(
            session, row, current, copy.deepcopy(current.settings), "key.rotate_data", None
        )

    def _prepare(
        self, settings: dict[str, Any], stored_plain: dict[str, Any] | None
    ) -> dict[str, Any]:
        """Validate a clinic `settings` object; returns it with communicationSettings canonical
        and in clear (masks resolved against `stored_plain`)."""
        if not isinstance(settings, dict):
            raise SettingsValidationError(
                [Problem("settings", "settings must be an object", "dict_type")]
            )
        result = copy.deepcopy(settings)
        comm = result.get(COMM)
        if comm is None:
            result.pop(COMM, None)
            return result
        if isinstance(comm, dict):
            comm = _resolve_masks(comm, stored_plain)
        model = validate_settings(comm)
        problems = endpoint_problems(model, self.egress)
        if problems:
            raise SettingsValidationError(problems)
        result[COMM] = plain_document(model)
        return result

    async def committed(self, change: Change) -> None:
        """After the commit: refresh Redis and make every process drop the old config."""
        stored_comm: dict[str, Any] | None = None
        async with self.db.sessions() as session:
            row = await session.get(Clinic, change.clinic_id)
            if row is not None and isinstance(row.settings, dict):
                value = row.settings.get(COMM)
                stored_comm = value if isinstance(value, dict) else None
                change.version = row.version
        for channel in Channel:
            section = stored_comm.get(channel.value) if stored_comm else None
            await self.cache.l2_put(channel.value, change.clinic_id, change.version, section)
        await self.cache.publish(change.clinic_id, change.version)

    # ---- convenience for Python callers ---------------------------------------------------
    async def save_settings(
        self, clinic_id: str, settings: dict[str, Any], *, expected_version: int | None = None
    ) -> ClinicRecord:
        """Replace a clinic's settings in its own transaction and publish the change."""
        async with self.db.session() as session:
            change = await self.replace_settings(
                session, clinic_id, settings, expected_version=expected_version
            )
        await self.committed(change)
        assert change.record is not None
        return change.record


def _encrypt_settings(plain: dict[str, Any], cipher: Any) -> dict[str, Any]:
    stored = copy.deepcopy(plain)
    comm = stored.get(COMM)
    if isinstance(comm, dict):
        stored[COMM] = secrets.encrypt(comm, cipher)
    return stored


def _resolve_masks(doc: dict[str, Any], stored: dict[str, Any] | None) -> dict[str, Any]:
    """Replace each mask with the stored secret at the same path and provider, if any.

    A stored secret is never sent to a destination its author did not choose: when an
    endpoint field of the slot (`ProviderCredentials.endpoint_fields`: `baseUrl`, `apiUrl`,
    `endpointUrl`, SMTP `host`/`port`) differs from the stored one, keeping a secret as the
    mask is refused (SettingsValidationError naming the secret's path).
    """
    out = copy.deepcopy(doc)
    problems: list[Problem] = []
    for path, name in secrets.masked_paths(out):
        if stored is None:
            continue
        old = secrets.lookup(stored, path)
        same_provider = secrets.provider_at(stored, path) == secrets.provider_at(out, path)
        if old is not None and same_provider and old.get(name) not in (None, MASK):
            holder = secrets.lookup(out, path)
            assert holder is not None
            moved = _moved_endpoint(path, secrets.provider_at(out, path), old, holder)
            if moved is not None:
                problems.append(
                    Problem(
                        ".".join(str(p) for p in (*SETTINGS_PREFIX, *path, name)),
                        f"{moved!r} changed: enter the secret again instead of {MASK!r}",
                        "mask_with_new_endpoint",
                    )
                )
                continue
            holder[name] = old[name]
    if problems:
        raise SettingsValidationError(problems)
    return out


def _credentials_model(path: secrets.Path, provider: str | None) -> type[ProviderCredentials]:
    channel = Channel(str(path[0]))
    return registry.get(channel, provider or "").credentials_model


def _moved_endpoint(
    path: secrets.Path, provider: str | None, old: dict[str, Any], new: dict[str, Any]
) -> str | None:
    """The JSON name of the first endpoint field whose effective value differs, or None.

    Values are compared after validation (defaults applied). When the new credentials do not
    validate, None: the save fails on their own problems and nothing is stored."""
    try:
        model = _credentials_model(path, provider)
        before: Any = model.model_validate(old)
        after: Any = model.model_validate(new)
    except (KeyError, ValueError, ValidationError):
        return None
    for name in model.endpoint_fields:
        if getattr(before, name) != getattr(after, name):
            return model.model_fields[name].alias or name
    return None


def endpoint_problems(model: CommunicationSettings, policy: EgressPolicy) -> list[Problem]:
    """Save-time egress check of every slot's endpoint fields (`EgressPolicy.check_endpoint`):
    a literal private address while private destinations are refused, `http://` in production."""
    found: list[Problem] = []
    for section_key, channel_settings in (
        ("email", model.email),
        ("whatsapp", model.whatsapp),
        ("sms", model.sms),
    ):
        if channel_settings is None:
            continue
        for path, slot in channel_settings.slots():
            creds = slot.credentials
            if not isinstance(creds, ProviderCredentials):
                continue
            kind = type(creds)
            for name in kind.endpoint_fields:
                value = getattr(creds, name)
                if not isinstance(value, str) or not value:
                    continue
                message = policy.check_endpoint(value, url=name not in kind.host_fields)
                if message is not None:
                    alias = kind.model_fields[name].alias or name
                    dotted = ".".join((*SETTINGS_PREFIX, section_key, path, "credentials", alias))
                    found.append(Problem(dotted, message, "destination_not_allowed"))
    if model.callbacks is not None:
        message = policy.check_endpoint(model.callbacks.url, url=True)
        if message is not None:
            dotted = ".".join((*SETTINGS_PREFIX, "callbacks", "url"))
            found.append(Problem(dotted, message, "destination_not_allowed"))
    return found


__all__ = [
    "ChannelSettings",
    "ClinicExistsError",
    "ClinicNotFoundError",
    "ClinicRecord",
    "ConfigService",
    "ResolvedChannel",
    "VersionConflictError",
]
