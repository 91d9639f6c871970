"""patients' addresses encrypted beside a blind index

Revision ID: 0006_i14
Revises: i15_0001
Create Date: 2026-12-01 22:40:00

`deliveries.recipient`, `deliveries.fallback_address`, `suppressions.address_enc` and `delivery_events.recipient_enc` hold
ciphertexts (`cc1:` form, longer than an address: Text); `deliveries.recipient_index`,
`suppressions.address` and `delivery_events.recipient` hold the blind index (`bi1:` form).
`clinic_keys.index_key` holds the clinic's blind-index key, wrapped like the data key, once the
data key has been rotated (before that it is derived from the data key). Rows written before
this revision keep their clear addresses until `clinicomm migrate`
encrypts them (`clinicomm.store.address_migration`, batched and resumable).
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0006_i14"
down_revision = "i17_0001"
branch_labels = None
depends_on = None


def _drop_disabled_credentials(settings: Any) -> bool:
    """Remove `credentials` from `"provider": "disabled"` slots (no model marks their secrets,
    so they were stored in clear; they are refused from now on). True when changed."""
    comm = settings.get("communicationSettings") if isinstance(settings, dict) else None
    changed = False
    for channel in (comm or {}).values() if isinstance(comm, dict) else ():
        if not isinstance(channel, dict):
            continue
        slots = [channel.get("primary"), *(channel.get("fallback") or [])]
        for slot in slots:
            if (
                isinstance(slot, dict)
                and slot.get("provider") == "disabled"
                and "credentials" in slot
            ):
                del slot["credentials"]
                changed = True
    return changed


def upgrade() -> None:
    clinics = sa.table("clinics", sa.column("id", sa.String), sa.column("settings", sa.JSON))
    bind = op.get_bind()
    for clinic_id, settings in bind.execute(sa.select(clinics.c.id, clinics.c.settings)).all():
        if _drop_disabled_credentials(settings):
            bind.execute(
                clinics.update().where(clinics.c.id == clinic_id).values(settings=settings)
            )
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.alter_column(
            "recipient",
            existing_type=sa.String(length=320),
            type_=sa.Text(),
            existing_nullable=False,
        )
        batch_op.add_column(sa.Column("recipient_index", sa.String(length=80), nullable=True))
        batch_op.alter_column(
            "fallback_address",
            existing_type=sa.String(length=320),
            type_=sa.Text(),
            existing_nullable=True,
        )
    with op.batch_alter_table("suppressions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("address_enc", sa.Text(), nullable=True))
    with op.batch_alter_table("delivery_events", schema=None) as batch_op:
        batch_op.add_column(sa.Column("recipient_enc", sa.Text(), nullable=True))
    with op.batch_alter_table("clinic_keys", schema=None) as batch_op:
        batch_op.add_column(sa.Column("index_key", sa.LargeBinary(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("clinic_keys", schema=None) as batch_op:
        batch_op.drop_column("index_key")
    with op.batch_alter_table("delivery_events", schema=None) as batch_op:
        batch_op.drop_column("recipient_enc")
    with op.batch_alter_table("suppressions", schema=None) as batch_op:
        batch_op.drop_column("address_enc")
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.drop_column("recipient_index")
        batch_op.alter_column(
            "fallback_address",
            existing_type=sa.Text(),
            type_=sa.String(length=320),
            existing_nullable=True,
        )
        batch_op.alter_column(
            "recipient",
            existing_type=sa.Text(),
            type_=sa.String(length=320),
            existing_nullable=False,
        )
