"""The suppression repository: who must not get messages from a clinic on a channel.

Entries come from webhooks (hard bounce, complaint, unsubscribe, a provider's opt-out code),
inbound keywords (STOP; START/YES/UNSTOP lifts an opt-out), send errors (a provider's opt-out
code, a permanent bounce: `records.Suppression`) and the API (manual). One row per
(clinic, channel, canonical address); the first reason is kept. Admission asks
`suppressed_in` for a whole claimed batch in one query.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import and_, delete, select
from sqlalchemy.ext.asyncio import AsyncSession

from clinicomm.providers.base import Channel
from clinicomm.store import fast, upsert
from clinicomm.store.among import among_param
from clinicomm.store.db import Database
from clinicomm.store.models import Suppression as SuppressionRow


class SuppressionReason(StrEnum):
    """Why an address is suppressed for a clinic and channel."""

    STOP = "stop"  # the patient texted STOP (or an equivalent keyword)
    BOUNCE = "bounce"  # a hard (permanent) bounce
    COMPLAINT = "complaint"  # the patient marked an email as spam
    UNSUBSCRIBE = "unsubscribe"  # the patient used the email provider's unsubscribe link
    #: A provider refused because the number opted out with it (a provider module's
    #: `OPT_OUT_CODES`, e.g. Twilio 21610). The stored value predates the generic name.
    PROVIDER_OPT_OUT = "provider_21610"
    MANUAL = "manual"  # recorded by the clinic (the patient phoned, wrote, asked in person)
    #: Marketing messages only (Meta "Stop promotions"); stored on `MARKETING_SCOPE`.
    MARKETING = "marketing"


#: The suppression "channel" of a marketing-only opt-out on WhatsApp: admission checks it
#: only for messages of a `MARKETING_CATEGORIES` category, so appointment reminders and
#: other care messages still reach the patient.
MARKETING_SCOPE = "wa_marketing"  # fits suppressions.channel (16)
MARKETING_CATEGORIES = frozenset({"MARKETING", "PROMOTIONAL", "PROMOTION"})
#: Reasons a provider's resubscribe (Postmark `SuppressSending: false`) lifts.
RESUBSCRIBE_LIFTS = frozenset({SuppressionReason.UNSUBSCRIBE})


#: Reasons a START/YES/UNSTOP from the patient lifts; bounces and complaints stay.
OPT_IN_LIFTS = frozenset(
    {SuppressionReason.STOP, SuppressionReason.PROVIDER_OPT_OUT, SuppressionReason.MANUAL}
)


def canonical_key(channel: str, address: str) -> str:
    """The form an address is compared in for suppressions: email addresses lower-cased
    whole (mailbox providers treat the local part case-insensitively in practice, and a
    missed opt-out costs more than a shared one); phone numbers are already E.164."""
    if str(channel) == Channel.EMAIL.value:
        return address.strip().lower()
    return address.strip()


async def suppress(
    session: AsyncSession,
    clinic_id: str,
    channel: str,
    address: str,
    reason: SuppressionReason,
    source: str,
    *,
    now: datetime | None = None,
    address_enc: str | None = None,
) -> bool:
    """Record that `address` must not get messages on `channel`; False if it already was.

    `address` is the blind index of the address (`FieldCipher.index`; a clear address only
    for rows written before addresses were encrypted), `address_enc` its ciphertext, kept for
    as long as the opt-out stands. The first reason is kept (a later complaint does not
    overwrite a STOP). Never commits.
    """
    stmt = (
        upsert.insert(session, SuppressionRow)
        .values(
            clinic_id=clinic_id,
            channel=str(channel),
            address=canonical_key(channel, address),
            address_enc=address_enc,
            reason=reason.value,
            source=source[:120],
            created_at=now or datetime.now(UTC),
        )
        .on_conflict_do_nothing(index_elements=["clinic_id", "channel", "address"])
        .returning(SuppressionRow.address)
    )
    return (await session.execute(stmt)).first() is not None


async def unsuppress(
    session: AsyncSession,
    clinic_id: str,
    channel: str,
    address: str,
    *,
    reasons: Iterable[SuppressionReason] | None = None,
) -> int:
    """Lift the suppression of `address` on `channel` (only for `reasons` when given)."""
    cond = and_(
        SuppressionRow.clinic_id == clinic_id,
        SuppressionRow.channel == str(channel),
        SuppressionRow.address == canonical_key(channel, address),
    )
    if reasons is not None:
        cond = and_(cond, SuppressionRow.reason.in_([r.value for r in reasons]))
    res = await session.execute(delete(SuppressionRow).where(cond))
    return int(getattr(res, "rowcount", 0) or 0)


async def apply_keyword(
    session: AsyncSession,
    clinic_id: str,
    channel: str,
    address: str,
    keyword: str | None,
    source: str,
    now: datetime,
    address_enc: str | None = None,
) -> tuple[int, int]:
    """The STOP/START rule (the one place it is written): `stop` suppresses, `start` lifts
    an opt-out (`OPT_IN_LIFTS`). Returns (suppressions added, suppressions lifted)."""
    if keyword == "stop":
        added = await suppress(
            session,
            clinic_id,
            channel,
            address,
            SuppressionReason.STOP,
            source,
            now=now,
            address_enc=address_enc,
        )
        return int(added), 0
    if keyword == "start":
        return 0, await unsuppress(session, clinic_id, channel, address, reasons=OPT_IN_LIFTS)
    return 0, 0


#: (clinic id, channel, address).
_Key = tuple[str, str, str]


def _among_statement(postgresql: bool | None) -> Any:
    return select(SuppressionRow.clinic_id, SuppressionRow.channel, SuppressionRow.address).where(
        among_param(SuppressionRow.clinic_id, "clinics", postgresql=postgresql),
        among_param(SuppressionRow.address, "addresses", postgresql=postgresql),
    )


#: The suppression query by "is PostgreSQL" (built once: `store.fast`).
_AMONG = {postgresql: _among_statement(postgresql) for postgresql in (True, False)}
#: The same with an expanding IN, which serves a session on either database.
_AMONG_ANY = _among_statement(None)


async def suppressed_in(
    db: Database, keys: Iterable[tuple[str, str, str]]
) -> set[tuple[str, str, str]]:
    """`suppressed_among` as the worker asks it: one statement on its own (`store.fast`)."""
    wanted = _wanted(keys)
    if not wanted:
        return set()
    rows = await fast.rows(db, _AMONG[not db.is_sqlite], _among_params(wanted), writes=False)
    return _hits(wanted, rows)


async def suppressed_among(
    session: AsyncSession, keys: Iterable[tuple[str, str, str]]
) -> set[tuple[str, str, str]]:
    """Which (clinic id, channel, address) triples are suppressed, in one query in `session`.

    Addresses are compared in `canonical_key` form; the answer holds the triples as given.
    """
    wanted = _wanted(keys)
    if not wanted:
        return set()
    # The expanding IN on either database: `= ANY` is for `store.fast`'s connections only.
    rows = (await session.execute(_AMONG_ANY, _among_params(wanted))).mappings().all()
    return _hits(wanted, rows)


def _wanted(keys: Iterable[_Key]) -> dict[_Key, _Key]:
    """Each triple by its `canonical_key` form."""
    return {(c, ch, canonical_key(ch, a)): (c, ch, a) for c, ch, a in keys}


def _among_params(wanted: dict[_Key, _Key]) -> dict[str, Any]:
    return {"clinics": list({k[0] for k in wanted}), "addresses": list({k[2] for k in wanted})}


def _hits(wanted: dict[_Key, _Key], rows: Iterable[Any]) -> set[_Key]:
    """The triples of `wanted` (as given) that `rows` of `_AMONG` found."""
    found = ((r["clinic_id"], r["channel"], r["address"]) for r in rows)
    return {wanted[key] for key in found if key in wanted}
