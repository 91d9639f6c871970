"""A stand-in for ``clinicomm`` that exercises the bench's service path before the real one exists.

NOT the service: an in-memory aiohttp app with just enough of API.md (``serve``, ``migrate``,
``token``; ``POST /api/v1/clinics``, ``POST/GET /api/v1/communications``, ``/healthz``) and a
naive worker that calls the sinks (SendGrid, Meta, SMTP) so the harness can be checked end to
end::

    python -m bench.run --service-cmd "python -m bench.fakeserve" --messages 2000

Its figures mean nothing about clinicomm. Auth is not checked.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import sys
import uuid
from datetime import UTC, datetime
from email.message import EmailMessage
from typing import Any

import aiohttp
import aiosmtplib
from aiohttp import web

_clinics: dict[str, dict[str, Any]] = {}
_messages: dict[str, dict[str, Any]] = {}
_queue: asyncio.Queue[tuple[str, int]] = asyncio.Queue()


def _now() -> str:
    return datetime.now(UTC).isoformat()


async def _healthz(_: web.Request) -> web.Response:
    return web.json_response({"ok": True})


async def _create_clinic(req: web.Request) -> web.Response:
    body = await req.json()
    _clinics[body["id"]] = body["settings"]["communicationSettings"]
    return web.json_response({"id": body["id"]}, status=201)


async def _send(req: web.Request) -> web.Response:
    body = await req.json()
    mid = str(uuid.uuid4())
    deliveries = [{"id": f"{mid}-{n}", "channel": ch, "status": "queued", "attempts": []}
                  for n, ch in enumerate(body["channels"])]
    _messages[mid] = {"id": mid, "status": "queued", "createdAt": _now(), "body": body,
                      "deliveries": deliveries}
    for n in range(len(deliveries)):
        _queue.put_nowait((mid, n))
    return web.json_response({"id": mid, "status": "queued", "deliveries": deliveries},
                             status=202)


def _public(m: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in m.items() if k != "body"}


async def _get(req: web.Request) -> web.Response:
    m = _messages.get(req.match_info["id"])
    if m is None:
        return web.json_response({"error": {"code": "not_found"}}, status=404)
    return web.json_response(_public(m))


async def _list(req: web.Request) -> web.Response:
    clinic, status = req.query.get("clinicId"), req.query.get("status")
    limit = int(req.query.get("limit", "50"))
    items = (m for m in _messages.values()
             if (clinic is None or m["body"]["metadata"].get("clinicId") == clinic)
             and (status is None or any(d["status"] == status for d in m["deliveries"])))
    return web.json_response({"items": [_public(m) for m in itertools.islice(items, limit)]})


async def _worker(http: aiohttp.ClientSession, smtp_pools: dict[tuple[str, int],
                  asyncio.Queue[aiosmtplib.SMTP]]) -> None:
    while True:
        mid, n = await _queue.get()
        msg = _messages[mid]
        d = msg["deliveries"][n]
        d["status"] = "sending"
        primary = _clinics[msg["body"]["metadata"]["clinicId"]][d["channel"]]["primary"]
        creds = primary["credentials"]
        try:
            if primary["provider"] == "sendgrid":
                async with http.post(creds["baseUrl"] + "/v3/mail/send", json=msg["body"]) as r:
                    r.raise_for_status()
                    d["providerMessageId"] = r.headers.get("X-Message-Id")
            elif primary["provider"] == "meta_business":
                url = f"{creds['apiUrl']}/{creds['phoneNumberId']}/messages"
                async with http.post(url, json=msg["body"]) as r:
                    r.raise_for_status()
                    d["providerMessageId"] = (await r.json())["messages"][0]["id"]
            else:
                key = (creds["host"], int(creds["port"]))
                pool = smtp_pools.setdefault(key, asyncio.Queue())
                if pool.empty() and len(smtp_pools) and pool.qsize() == 0 and \
                        getattr(pool, "made", 0) < int(creds.get("maxConnections", 5)):
                    pool.made = getattr(pool, "made", 0) + 1  # type: ignore[attr-defined]
                    c = aiosmtplib.SMTP(hostname=key[0], port=key[1], start_tls=False)
                    await c.connect()
                    pool.put_nowait(c)
                client = await pool.get()
                try:
                    em = EmailMessage()
                    em["From"], em["To"] = creds["from"], msg["body"]["recipients"][0]["email"]
                    em["Subject"] = msg["body"]["title"]
                    em.set_content(msg["body"]["body"])
                    await client.send_message(em)
                finally:
                    pool.put_nowait(client)
            d["status"], d["sentAt"] = "sent", _now()
            d["attempts"].append({"provider": primary["provider"], "outcome": "sent",
                                  "time": d["sentAt"]})
        except Exception as exc:
            d["status"], d["error"] = "failed", type(exc).__name__


async def _serve() -> None:
    app = web.Application()
    app.router.add_get("/healthz", _healthz)
    app.router.add_post("/api/v1/clinics", _create_clinic)
    app.router.add_post("/api/v1/communications", _send)
    app.router.add_get("/api/v1/communications", _list)
    app.router.add_get("/api/v1/communications/{id}", _get)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = int(os.environ.get("CLINICOMM_PORT", "8000"))
    await web.TCPSite(runner, os.environ.get("CLINICOMM_HOST", "127.0.0.1"), port).start()
    pools: dict[tuple[str, int], asyncio.Queue[aiosmtplib.SMTP]] = {}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as http:
        await asyncio.gather(*(_worker(http, pools) for _ in range(64)))


def main() -> int:
    """``serve`` | ``migrate`` | ``token ...`` (with ``--help``), like the real CLI's subset."""
    args = sys.argv[1:]
    if not args or "--help" in args:
        print("fakeserve: serve | migrate | token --role ROLE")
        return 0
    if args[0] == "serve":
        asyncio.run(_serve())
    elif args[0] == "token":
        print("fake-token")
    return 0


if __name__ == "__main__":
    sys.exit(main())
