"""Message contents (PHI) are erased after the retention period; the records stay."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select, update

from clinicomm.delivery.retention import purge_contents
from clinicomm.store.models import Delivery, Message, utcnow
from tests.support.pipeline import create_clinic, wait_terminal


async def test_contents_are_erased_after_retention_and_records_kept(make_client) -> None:
    client = await make_client()
    await create_clinic(client, "clinic-ret", {})
    from tests.delivery.test_pipeline import email_request

    old = await client.send(email_request("clinic-ret"))
    new = await client.send(email_request("clinic-ret", to="other@example.com"))
    await wait_terminal(client, old.id)
    rt = client._rt()
    async with rt.db.session() as session:
        await session.execute(
            update(Message)
            .where(Message.id == old.id)
            .values(created_at=utcnow() - timedelta(days=31))
        )
    async with rt.db.session() as session:
        erased = await purge_contents(session, utcnow() - timedelta(days=30))
    assert erased == 1
    async with rt.db.read() as session:
        contents = dict((await session.execute(select(Message.id, Message.content))).all())
        deliveries = (
            await session.execute(select(Delivery.id).where(Delivery.message_id == old.id))
        ).all()
    assert contents[old.id] == b""
    assert contents[new.id] != b""
    assert len(deliveries) == 1  # the record of what was sent stays
    status = await client.get(old.id)
    assert status is not None and status["deliveries"][0]["status"] == "failed"  # no provider
