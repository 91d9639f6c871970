"""A message accepted in the process whose worker sends it is not read back: the accept hands
its content to the worker's cache at commit (`MessagingService.share_contents`). The content
sent is the one a worker that reads the row would send."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from clinicomm.delivery import contents as contents_module
from clinicomm.delivery.contents import Contents
from clinicomm.delivery.records import Content
from clinicomm.store import fast
from tests.delivery.test_pipeline import email_request, sendgrid_slot
from tests.support.http_capture import CaptureServer
from tests.support.pipeline import create_clinic, wait_terminal


@pytest.fixture
def content_reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of message ids each content query asked for."""
    reads: list[int] = []
    real = fast.rows

    async def counting(db: Any, statement: Any, params: Any, **kw: Any) -> Any:
        if any(statement is s for s in contents_module._LOAD.values()):
            reads.append(len(params["ids"]))
        return await real(db, statement, params, **kw)

    monkeypatch.setattr(fast, "rows", counting)
    return reads


async def test_the_worker_in_process_sends_without_reading_the_content(
    make_client: Any, content_reads: list[int]
) -> None:
    async with CaptureServer() as sendgrid:
        sendgrid.respond(202, None, headers={"X-Message-Id": "sg-1"})
        client = await make_client()
        await create_clinic(client, "clinic-p", {"email": {"primary": sendgrid_slot(sendgrid)}})
        request = email_request(
            "clinic-p", title="Your visit", body="Tomorrow at 10:30.", html="<p>Tomorrow</p>"
        )
        accepted = await client.send(request)
        status = await wait_terminal(client, accepted.id)
        assert [d["status"] for d in status["deliveries"]] == ["sent"]
        (sent,) = sendgrid.requests
        body = sent.json()
        assert body["subject"] == "Your visit"
        assert [c["value"] for c in body["content"]] == ["Tomorrow at 10:30.", "<p>Tomorrow</p>"]
    assert content_reads == []


async def _sharing(
    make_client: Any, sendgrid: CaptureServer, clinic: str
) -> tuple[Any, Contents]:
    """A client with a clinic sending through `sendgrid`, and a content cache of our own that
    its accept primes (as a worker's in the same process)."""
    client = await make_client()
    await create_clinic(client, clinic, {"email": {"primary": sendgrid_slot(sendgrid)}})
    runtime = client._rt()
    primed = Contents(runtime.db, runtime.config.keys)
    runtime.messaging.share_contents(primed)
    return client, primed


async def test_a_primed_content_is_the_one_read_from_the_row(
    make_client: Any, content_reads: list[int]
) -> None:
    async with CaptureServer() as sendgrid:
        client, primed = await _sharing(make_client, sendgrid, "clinic-q")
        accepted = await client.send(
            email_request(
                "clinic-q",
                template={"name": "reminder", "variables": {"time": "10:30", "name": "Ana"}},
                callbackUrl=None,
            )
        )
        await primed.load([accepted.id])
        assert content_reads == []  # taken from the primed entry
        runtime = client._rt()
        read = Contents(runtime.db, runtime.config.keys)
        await read.load([accepted.id])
        assert content_reads == [1]
        assert primed.lookup(accepted.id) == read.lookup(accepted.id) is not None
        assert primed.may_call_back(accepted.id) == read.may_call_back(accepted.id) is False


async def test_a_repeated_send_primes_nothing(make_client: Any) -> None:
    async with CaptureServer() as sendgrid:
        client, primed = await _sharing(make_client, sendgrid, "clinic-r")
        first = await client.send(email_request("clinic-r"), idempotency_key="k-1")
        again = await client.send(email_request("clinic-r"), idempotency_key="k-1")
        assert again.id == first.id
        assert list(primed._primed) == [first.id]


def test_primes_beyond_the_bound_drop_the_oldest_and_never_a_loaded_content(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(contents_module, "PRIMED_ENTRIES", 2)
    cache = Contents(None, None)  # type: ignore[arg-type]  # no database or keys needed
    loaded = Content.from_json({"body": "claimed"}, "APPOINTMENT")
    cache._contents["m-claimed"] = loaded
    for n in range(3):
        cache.prime(f"m-{n}", orjson.dumps({"body": f"b{n}"}), "APPOINTMENT", has_target=False)
    assert list(cache._primed) == ["m-1", "m-2"]
    assert cache.lookup("m-claimed") is loaded
