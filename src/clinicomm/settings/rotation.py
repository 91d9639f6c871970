"""Data-key rotation: a clinic gets a new data key version and everything it encrypted moves
to it; then the old version is destroyed.

`rotate_data(...)` for one clinic:

1. If the clinic has a single key version v, store version v+1 (a new random key, wrapped by
   the current master key) beside it, with the clinic's blind-index key wrapped alongside so
   every index stays valid (the index key never changes). An interrupted earlier run left
   several versions: the newest is the target and nothing is created.
2. Wait `settle_seconds` (`KeyStore.REFRESH_SECONDS`): every process re-reads key versions
   that often, so after this nothing new is encrypted under the old version.
3. Re-encrypt the settings' secrets (and publish the change: the caches hold ciphertexts),
   then message contents, metadata, addresses, opt-outs, events and idempotent answers
   (`reseal.reseal_clinic`, batched, each batch one transaction).
4. When no row of the clinic is left under an old version (`reseal.pending`), delete the old
   versions' rows from `clinic_keys`: those keys are gone. Until then they keep decrypting.

Each step is audited (`key.rotate_data.start`, `key.rotate_data`). Running it again after an
interruption continues at step 2 with the same target version.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy import delete, select

from clinicomm.crypto import new_data_key
from clinicomm.settings import reseal
from clinicomm.settings.keys import KeyStore
from clinicomm.settings.service import ConfigService
from clinicomm.store.db import Database
from clinicomm.store.models import AuditEntry, Clinic, ClinicKey


class RotationIncompleteError(Exception):
    """Rows under an old version remain after re-encryption (written meanwhile); run again."""


@dataclass
class DataRotationReport:
    clinic_id: str
    from_versions: list[int]
    to_version: int
    rows: dict[str, int] = field(default_factory=dict)


async def rotate_data(
    db: Database,
    keys: KeyStore,
    config: ConfigService,
    clinic_id: str,
    *,
    batch_size: int = 500,
    settle_seconds: float = KeyStore.REFRESH_SECONDS,
    progress: reseal.Progress | None = None,
    actor: str = "cli",
) -> DataRotationReport:
    """Rotate one clinic's data key (see the module docstring)."""
    target, old = await _target_version(db, keys, clinic_id, actor)
    keys.forget(clinic_id)
    if settle_seconds > 0:
        await asyncio.sleep(settle_seconds)
    async with db.session() as session:
        exists = await session.get(Clinic, clinic_id) is not None
        change = await config.reencrypt(session, clinic_id) if exists else None
    if change is not None:
        await config.committed(change)
    cipher = await keys.cipher_for(db, clinic_id)
    assert cipher.key_version == target
    report = await reseal.reseal_clinic(db, cipher, batch_size=batch_size, progress=progress)
    left = {k: v for k, v in (await reseal.pending(db, cipher)).items() if v}
    if left:
        raise RotationIncompleteError(
            f"clinic {clinic_id!r}: rows still under an old data key ({left}); run again"
        )
    async with db.session() as session:
        await session.execute(
            delete(ClinicKey).where(ClinicKey.clinic_id == clinic_id, ClinicKey.version < target)
        )
        session.add(
            AuditEntry(
                clinic_id=clinic_id if exists else None,
                actor=actor,
                role="Operator",
                action="key.rotate_data",
                diff={"dataKey": {"from": old, "to": target}, "rows": report.rows},
            )
        )
    keys.forget(clinic_id)
    return DataRotationReport(clinic_id, old, target, report.rows)


async def _target_version(
    db: Database, keys: KeyStore, clinic_id: str, actor: str
) -> tuple[int, list[int]]:
    """The version to rotate to (created when the clinic has one version) and the old ones."""
    async with db.session() as session:
        rows = list(
            (
                await session.scalars(
                    select(ClinicKey)
                    .where(ClinicKey.clinic_id == clinic_id)
                    .order_by(ClinicKey.version.desc())
                    .with_for_update()
                )
            ).all()
        )
        if not rows:
            raise KeyError(clinic_id)
        if len(rows) > 1:  # an earlier run was interrupted: finish it
            return rows[0].version, [r.version for r in rows[1:]]
        keys.forget(clinic_id)
        current = await keys.cipher(session, clinic_id)
        version = rows[0].version + 1
        kid, wrapped = keys.keyring.wrap(new_data_key(), clinic_id)
        _, wrapped_index = keys.keyring.wrap(current.index_key, f"{clinic_id}|index")
        session.add(
            ClinicKey(
                clinic_id=clinic_id,
                version=version,
                master_kid=kid,
                wrapped_key=wrapped,
                index_key=wrapped_index,
            )
        )
        exists = await session.get(Clinic, clinic_id) is not None
        session.add(
            AuditEntry(
                clinic_id=clinic_id if exists else None,
                actor=actor,
                role="Operator",
                action="key.rotate_data.start",
                diff={"dataKey": {"from": rows[0].version, "to": version}},
            )
        )
        return version, [rows[0].version]


async def clinic_ids(db: Database) -> list[str]:
    """Every clinic that has a data key (the platform's own included)."""
    async with db.read() as session:
        return sorted(set((await session.scalars(select(ClinicKey.clinic_id))).all()))


ProgressFactory = Callable[[str], reseal.Progress]
