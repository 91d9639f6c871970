"""A local HTTP server that records every request and answers what a test scripts.

Use it as a stand-in for a provider's API: point the adapter's `baseUrl`/`apiUrl` at
`server.url`, script answers with `server.respond(...)`, then assert on `server.requests`.

    async with CaptureServer() as server:
        server.respond(202, {"id": "x"}, headers={"X-Message-Id": "abc"})
        ...
        assert server.requests[0].json()["personalizations"]
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from multidict import MultiDict


@dataclass
class CapturedRequest:
    """One request as the server received it: raw bytes and decoded views."""

    method: str
    path: str
    query: MultiDict[str]
    headers: dict[str, str]
    body: bytes
    content_type: str

    def json(self) -> Any:
        return json.loads(self.body)

    def form(self) -> MultiDict[str]:
        """Form fields, from a url-encoded or a multipart/form-data body (text parts only)."""
        if self.content_type == "multipart/form-data":
            return self.multipart()
        from urllib.parse import parse_qsl

        return MultiDict(parse_qsl(self.body.decode(), keep_blank_values=True))

    def multipart(self) -> MultiDict[str]:
        """The text fields of a multipart/form-data body, in order (repeated names kept)."""
        from email.parser import BytesParser
        from email.policy import HTTP

        header = self.headers.get("Content-Type", self.content_type)
        parsed = BytesParser(policy=HTTP).parsebytes(
            f"Content-Type: {header}\r\n\r\n".encode() + self.body
        )
        fields: MultiDict[str] = MultiDict()
        for part in parsed.iter_parts():  # type: ignore[attr-defined]
            name = part.get_param("name", header="content-disposition")
            payload = part.get_payload(decode=True) or b""
            fields.add(str(name), payload.decode(part.get_content_charset() or "utf-8"))
        return fields


@dataclass
class Scripted:
    """A scripted answer: status, JSON (or text) body, headers and an optional delay."""

    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


Handler = Callable[[CapturedRequest], Awaitable[Scripted] | Scripted]


class CaptureServer:
    """An aiohttp server on 127.0.0.1 with a random port; records requests in order."""

    def __init__(self, default: Scripted | None = None) -> None:
        self.requests: list[CapturedRequest] = []
        self._queue: deque[Scripted] = deque()
        self.default = default or Scripted(200, {})
        self.handler: Handler | None = None
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def respond(
        self,
        status: int = 200,
        body: Any = None,
        *,
        headers: dict[str, str] | None = None,
        delay: float = 0.0,
        times: int = 1,
    ) -> None:
        """Queue an answer for the next `times` requests; later ones get `default`."""
        for _ in range(times):
            self._queue.append(Scripted(status, body, headers or {}, delay))

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        captured = CapturedRequest(
            method=request.method,
            path=request.path,
            query=MultiDict(request.query),
            headers=dict(request.headers),
            body=body,
            content_type=request.content_type,
        )
        self.requests.append(captured)
        if self.handler is not None:
            result = self.handler(captured)
            answer = await result if asyncio.iscoroutine(result) else result
        else:
            answer = self._queue.popleft() if self._queue else self.default
        assert isinstance(answer, Scripted)
        if answer.delay:
            await asyncio.sleep(answer.delay)
        if isinstance(answer.body, (dict, list)):
            return web.json_response(answer.body, status=answer.status, headers=answer.headers)
        text = "" if answer.body is None else str(answer.body)
        return web.Response(text=text, status=answer.status, headers=answer.headers)

    async def __aenter__(self) -> CaptureServer:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
