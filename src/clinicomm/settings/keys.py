"""Per-clinic data keys: create, unwrap (cached in process), rotate under a new master key."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from clinicomm.crypto import FieldCipher, MasterKeyring, derive_index_key, new_data_key
from clinicomm.settings.flight import SingleFlight
from clinicomm.store.db import Database
from clinicomm.store.models import AuditEntry, Clinic, ClinicKey, utcnow

#: Owner of the data key that encrypts messages sent without a clinic (global providers). Not a
#: valid clinic id (those start with a letter or digit), so it cannot collide with a clinic.
PLATFORM = "_platform"


class KeyStore:
    """Finds a clinic's field cipher. Unwrapped data keys live only in this process's memory."""

    #: How long a process uses a clinic's cached cipher before it re-reads the key versions.
    REFRESH_SECONDS = 10.0
    #: Clinics whose keys `indexes_of` loads in one query.
    LOAD_CHUNK = 500

    def __init__(self, keyring: MasterKeyring, refresh_seconds: float = REFRESH_SECONDS) -> None:
        self.keyring = keyring
        self.refresh_seconds = refresh_seconds
        self._ciphers: dict[str, FieldCipher] = {}
        self._loaded: dict[str, float] = {}
        self._loads: SingleFlight[FieldCipher] = SingleFlight()

    async def create(self, session: AsyncSession, clinic_id: str) -> FieldCipher:
        """Make and store (wrapped) a new data key for a new clinic."""
        data_key = new_data_key()
        kid, wrapped = self.keyring.wrap(data_key, clinic_id)
        session.add(ClinicKey(clinic_id=clinic_id, version=1, master_kid=kid, wrapped_key=wrapped))
        cipher = FieldCipher(clinic_id, data_key, 1)
        self._ciphers[clinic_id] = cipher
        self._loaded[clinic_id] = time.monotonic()
        return cipher

    async def cipher(self, session: AsyncSession, clinic_id: str) -> FieldCipher:
        """The clinic's cipher; raises KeyError if the clinic has no data key, CryptoError if the
        configured master keys cannot unwrap it."""
        cached = self._fresh(clinic_id)
        if cached is not None:
            return cached
        rows = (
            (
                await session.execute(
                    select(ClinicKey)
                    .where(ClinicKey.clinic_id == clinic_id)
                    .order_by(ClinicKey.version.desc())
                )
            )
            .scalars()
            .all()
        )
        if not rows:
            raise KeyError(clinic_id)
        cipher = self._build(clinic_id, list(rows))
        self._ciphers[clinic_id] = cipher
        self._loaded[clinic_id] = time.monotonic()
        return cipher

    def _build(self, clinic_id: str, rows: list[ClinicKey]) -> FieldCipher:
        """The cipher of a clinic's key rows (newest first): the newest encrypts, every other
        version still decrypts (a data-key rotation in progress)."""
        unwrap = self.keyring.unwrap
        keys = {r.version: unwrap(r.master_kid, r.wrapped_key, clinic_id) for r in rows}
        newest = rows[0]
        index_key = (
            self.keyring.unwrap(newest.master_kid, newest.index_key, f"{clinic_id}|index")
            if newest.index_key
            else None
        )
        if index_key is None and len(rows) > 1:
            index_key = derive_index_key(keys[min(keys)], clinic_id)
        return FieldCipher(
            clinic_id, keys[newest.version], newest.version, older=keys, index_key=index_key
        )

    def _fresh(self, clinic_id: str) -> FieldCipher | None:
        """The cached cipher, while younger than `refresh_seconds` (so a data-key version
        added by `rotate_data` in another process is used within that time)."""
        cached = self._ciphers.get(clinic_id)
        if cached is None:
            return None
        if time.monotonic() - self._loaded.get(clinic_id, 0.0) > self.refresh_seconds:
            return None
        return cached

    async def cipher_for(self, db: Database, clinic_id: str) -> FieldCipher:
        """The clinic's cipher, from memory or (first time) the database. The platform's own
        key (`PLATFORM`, for messages sent without a clinic) is created on first use."""
        cached = self._fresh(clinic_id)
        if cached is not None:
            return cached
        return await self._loads.run(clinic_id, lambda: self._cipher_from(db, clinic_id))

    async def _cipher_from(self, db: Database, clinic_id: str) -> FieldCipher:
        """`cipher_for` past the in-memory cache (concurrent misses share one call)."""
        try:
            async with db.read() as session:
                return await self.cipher(session, clinic_id)
        except KeyError:
            if clinic_id != PLATFORM:
                raise
        try:
            async with db.session() as session:
                session.add(Clinic(id=PLATFORM, name="Platform (global providers)"))
                await session.flush()
                await self.create(session, PLATFORM)
        except IntegrityError:
            self.forget(PLATFORM)  # another process created it first
        async with db.read() as session:
            return await self.cipher(session, PLATFORM)

    async def index_for(self, db: Database, clinic_id: str, address: str) -> str:
        """The blind index of `address` in `clinic_id` (what suppressions, the WhatsApp window
        and inbound contacts are keyed by)."""
        return (await self.cipher_for(db, clinic_id)).index(address)

    async def indexes_of(self, db: Database, address: str) -> dict[str, str]:
        """Every clinic's blind index of `address` (clinic id → index; not the platform's).

        A clinic's index key never changes (rotations re-wrap it, see `ClinicKey.index_key`),
        so a cached cipher of any age gives the right index; the clinics not cached are
        loaded together, `LOAD_CHUNK` per query. Raises CryptoError if a clinic's key
        cannot be unwrapped by the configured master keys, as `cipher` does."""
        async with db.read() as session:
            clinic_ids = (await session.scalars(select(Clinic.id))).all()
            missing = [c for c in clinic_ids if c not in self._ciphers and c != PLATFORM]
            for start in range(0, len(missing), self.LOAD_CHUNK):
                chunk = missing[start : start + self.LOAD_CHUNK]
                rows = (
                    await session.scalars(
                        select(ClinicKey)
                        .where(ClinicKey.clinic_id.in_(chunk))
                        .order_by(ClinicKey.clinic_id, ClinicKey.version.desc())
                    )
                ).all()
                by_clinic: dict[str, list[ClinicKey]] = {}
                for row in rows:
                    by_clinic.setdefault(row.clinic_id, []).append(row)
                now = time.monotonic()
                for clinic_id, versions in by_clinic.items():
                    self._ciphers[clinic_id] = self._build(clinic_id, versions)
                    self._loaded[clinic_id] = now
        return {
            clinic_id: self._ciphers[clinic_id].index(address)
            for clinic_id in clinic_ids
            if clinic_id in self._ciphers and clinic_id != PLATFORM
        }

    def forget(self, clinic_id: str | None = None) -> None:
        """Drop cached ciphers (all when clinic_id is None)."""
        if clinic_id is None:
            self._ciphers.clear()
            self._loaded.clear()
        else:
            self._ciphers.pop(clinic_id, None)
            self._loaded.pop(clinic_id, None)


@dataclass
class RotationReport:
    total: int
    rotated: int
    already_current: int


async def rotate(
    db: Database,
    keyring: MasterKeyring,
    *,
    batch_size: int = 100,
    progress: Callable[[int, int], None] | None = None,
    actor: str = "cli",
) -> RotationReport:
    """Re-wrap every data key not yet wrapped by the current master key.

    Works in batches, each its own transaction, so an interrupted run keeps what it finished
    and a second run picks up the rest (keys already under the current key are skipped).
    Each re-wrapped key writes an audit entry. `progress(done, total)` is called per key.
    """
    current = keyring.current.kid
    async with db.session() as session:
        total = (await session.execute(select(func.count()).select_from(ClinicKey))).scalar_one()
        pending = (
            await session.execute(
                select(func.count()).select_from(ClinicKey).where(ClinicKey.master_kid != current)
            )
        ).scalar_one()
    done = total - pending
    if progress:
        progress(done, total)
    rotated = 0
    while True:
        async with db.session() as session:
            rows = (
                (
                    await session.execute(
                        select(ClinicKey)
                        .where(ClinicKey.master_kid != current)
                        .order_by(ClinicKey.clinic_id, ClinicKey.version)
                        .limit(batch_size)
                        .with_for_update()
                    )
                )
                .scalars()
                .all()
            )
            if not rows:
                break
            for row in rows:
                data_key = keyring.unwrap(row.master_kid, row.wrapped_key, row.clinic_id)
                old = row.master_kid
                if row.index_key is not None:
                    index_aad = f"{row.clinic_id}|index"
                    index_key = keyring.unwrap(row.master_kid, row.index_key, index_aad)
                    _, row.index_key = keyring.wrap(index_key, index_aad)
                row.master_kid, row.wrapped_key = keyring.wrap(data_key, row.clinic_id)
                row.rotated_at = utcnow()
                session.add(
                    AuditEntry(
                        clinic_id=row.clinic_id,
                        actor=actor,
                        role="Operator",
                        action="key.rotate",
                        diff={"masterKey": {"from": old, "to": row.master_kid}},
                    )
                )
                rotated += 1
                done += 1
                if progress:
                    progress(done, total)
    return RotationReport(total=total, rotated=rotated, already_current=total - rotated)
