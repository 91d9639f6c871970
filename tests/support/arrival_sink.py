"""A Cloud-API-shaped sink in a process of its own that records when each call arrives.

`python -m tests.support.arrival_sink` listens on 127.0.0.1 (a free port, printed as the first
line of stdout), answers every POST like the WhatsApp Cloud API's send endpoint, and records
`(time.monotonic(), to)` per call; `GET /_arrivals` returns them as JSON. CLOCK_MONOTONIC is
one clock for every process of the machine, so the test process can compare the readings.

Why a process of its own: timestamps taken by a handler in the test's own event loop are late
by however long that loop was busy (polling the database, a GC pause), and a late batch of
timestamps looks like a burst the senders never made.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from aiohttp import web


async def _main() -> None:
    arrivals: list[tuple[float, str]] = []

    async def send(request: web.Request) -> web.Response:
        at = time.monotonic()
        to = (await request.json())["to"]
        arrivals.append((at, to))
        return web.json_response(
            {
                "messaging_product": "whatsapp",
                "contacts": [{"input": to, "wa_id": to.lstrip("+")}],
                "messages": [{"id": f"wamid.{len(arrivals)}"}],
            }
        )

    async def report(_: web.Request) -> web.Response:
        return web.json_response(arrivals)

    app = web.Application()
    app.router.add_get("/_arrivals", report)
    app.router.add_post("/{tail:.*}", send)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    assert site._server is not None
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    print(port, flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await runner.cleanup()


@dataclass
class ArrivalSink:
    """The sink process, for `async with`; `url` once entered, `arrivals()` any time."""

    port: int = 0
    _proc: asyncio.subprocess.Process | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def arrivals(self) -> list[tuple[float, str]]:
        async with aiohttp.ClientSession() as session, session.get(
            f"{self.url}/_arrivals"
        ) as answer:
            return [(float(at), str(to)) for at, to in json.loads(await answer.text())]

    async def __aenter__(self) -> ArrivalSink:
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.support.arrival_sink",
            stdout=asyncio.subprocess.PIPE,
            cwd=Path(__file__).resolve().parents[2],
        )
        assert self._proc.stdout is not None
        line = await asyncio.wait_for(self._proc.stdout.readline(), 30)
        self.port = int(line)
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._proc is not None and self._proc.returncode is None:
            self._proc.terminate()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._proc.wait(), 10)
            if self._proc.returncode is None:
                self._proc.kill()
                await self._proc.wait()


if __name__ == "__main__":
    asyncio.run(_main())
