"""Raw-client ceilings, measured against the same sinks in the same run as the service bench.

Each function sends a fixed number of messages as fast as the client allows and returns
messages per second. They are the denominators of the end-to-end ratios in PERFORMANCE.md:
what aiohttp / aiosmtplib alone can do here, with no storage, queue or routing around them.

Every message is checked (HTTP 2xx, SMTP 250); a failure raises :class:`RawBenchError` so a
broken sink never produces a flattering figure.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable
from email.message import EmailMessage

import aiohttp
import aiosmtplib
import orjson

# SendGrid-shaped body, about the size an adapter sends for a short appointment email.
_HTTP_BODY = orjson.dumps(
    {
        "personalizations": [{"to": [{"email": "patient@example.com"}]}],
        "from": {"email": "appointments@clinic.example", "name": "Clinic A"},
        "subject": "Appointment Confirmed",
        "content": [
            {"type": "text/plain", "value": "Your appointment is confirmed for 10:30. " * 4}
        ],
        "custom_args": {"reference": "bench-0000000000"},
    }
)
SENDGRID_PATH = "/v3/mail/send"


class RawBenchError(RuntimeError):
    """A raw bench request was not accepted by the sink."""


def _email(i: int) -> EmailMessage:
    """A small plain-text email like the service sends (built per message, as it would be)."""
    msg = EmailMessage()
    msg["From"] = "Clinic A <appointments@clinic.example>"
    msg["To"] = f"patient{i}@example.com"
    msg["Subject"] = "Appointment Confirmed"
    msg.set_content("Your appointment is confirmed for 10:30. " * 4)
    return msg


async def _drive(count: int, workers: int, one: Callable[[int], Awaitable[None]]) -> float:
    """Run ``one(i)`` for i in range(count) on ``workers`` concurrent loops; return msgs/s."""
    counter = itertools.count()

    async def worker() -> None:
        while (i := next(counter)) < count:
            await one(i)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(workers)))
    return count / (time.perf_counter() - start)


async def http_post_rate(
    base_url: str, *, count: int = 20_000, concurrency: int = 64, path: str = SENDGRID_PATH
) -> float:
    """aiohttp ``POST`` of a SendGrid-shaped JSON body, ``concurrency`` in flight, keep-alive.

    One ``ClientSession`` with a connector limited to ``concurrency`` connections, as the
    service's shared session would be. Returns messages (accepted POSTs) per second.
    """
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency)
    headers = {"Authorization": "Bearer SG.bench", "Content-Type": "application/json"}
    url = base_url.rstrip("/") + path
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:

        async def one(_: int) -> None:
            async with session.post(url, data=_HTTP_BODY) as resp:
                await resp.read()
                if resp.status >= 300:
                    raise RawBenchError(f"POST {path} answered {resp.status}")

        # Warm the pool so connection set-up is not part of the figure.
        await _drive(concurrency, concurrency, one)
        return await _drive(count, concurrency, one)


async def _smtp_client(host: str, port: int) -> aiosmtplib.SMTP:
    client = aiosmtplib.SMTP(hostname=host, port=port, use_tls=False, start_tls=False,
                             timeout=30)
    await client.connect()
    return client


async def _smtp_send(client: aiosmtplib.SMTP, i: int) -> None:
    errors, reply = await client.send_message(_email(i))
    if errors or not reply.startswith("2"):
        raise RawBenchError(f"SMTP send refused: {reply} {errors}")


async def smtp_pooled_rate(
    host: str, port: int, *, count: int = 5_000, connections: int = 5
) -> float:
    """aiosmtplib over ``connections`` connections opened once and reused for every message.

    Each connection sends its share one message at a time (SMTP is sequential per session).
    Returns messages per second; connection set-up is not counted.
    """
    clients = [await _smtp_client(host, port) for _ in range(connections)]
    try:
        counter = itertools.count()

        async def worker(client: aiosmtplib.SMTP) -> None:
            while (i := next(counter)) < count:
                await _smtp_send(client, i)

        start = time.perf_counter()
        await asyncio.gather(*(worker(c) for c in clients))
        return count / (time.perf_counter() - start)
    finally:
        for c in clients:
            try:
                await c.quit()
            except aiosmtplib.SMTPException:
                c.close()


async def smtp_new_connection_rate(
    host: str, port: int, *, count: int = 5_000, concurrency: int = 1
) -> float:
    """aiosmtplib with a new connection per message (connect, EHLO, send, QUIT).

    ``concurrency`` such sends run at once (default 1: one after the other). Messages per second.
    """

    async def one(i: int) -> None:
        client = await _smtp_client(host, port)
        try:
            await _smtp_send(client, i)
        finally:
            await client.quit()

    return await _drive(count, concurrency, one)
