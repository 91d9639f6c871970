"""A real SMTP server (aiosmtpd) that records what it receives, for pipeline tests."""

from __future__ import annotations

import asyncio
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from email import message_from_bytes
from email.message import Message
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    message: Message


@dataclass
class RecordingHandler:
    """Accepts every message, or answers `reply` (e.g. "451 4.3.0 try later") when set.

    `replies` answers the next DATA commands in order (then `reply`/accept); `rcpt_reply`
    refuses every RCPT TO with that reply. `data_times` records when each DATA arrived
    (monotonic), `rcpt_count` how many RCPT TO came in.
    """

    received: list[Received] = field(default_factory=list)
    reply: str | None = None
    delay: float = 0.0
    replies: deque[str] = field(default_factory=deque)
    rcpt_reply: str | None = None
    data_times: list[float] = field(default_factory=list)
    rcpt_count: int = 0

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        self.rcpt_count += 1
        if self.rcpt_reply:
            return self.rcpt_reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.data_times.append(time.monotonic())
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.replies:
            return self.replies.popleft()
        if self.reply:
            return self.reply
        self.received.append(
            Received(
                envelope.mail_from, list(envelope.rcpt_tos), message_from_bytes(envelope.content)
            )
        )
        return "250 2.0.0 OK"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _refuse_every_login(*_: Any) -> AuthResult:
    # handled=False: aiosmtpd itself answers "535 5.7.8 Authentication credentials invalid".
    return AuthResult(success=False, handled=False)


class SmtpServer:
    """`with SmtpServer() as smtp:` a plain SMTP server on 127.0.0.1 (no TLS, no AUTH).

    With `refuse_auth=True` it offers AUTH over plain text and refuses every login (535).
    """

    def __init__(self, *, refuse_auth: bool = False) -> None:
        self.handler = RecordingHandler()
        self.port = free_port()
        kw: dict[str, Any] = {}
        if refuse_auth:
            kw = {"authenticator": _refuse_every_login, "auth_require_tls": False}
        self.controller = Controller(self.handler, hostname="127.0.0.1", port=self.port, **kw)

    @property
    def received(self) -> list[Received]:
        return self.handler.received

    def credentials(self, sender: str) -> dict[str, Any]:
        """Clinic SMTP credentials pointing at this server (loopback, no TLS)."""
        return {"host": "127.0.0.1", "port": self.port, "requireTls": False, "from": sender}

    def __enter__(self) -> SmtpServer:
        self.controller.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.controller.stop()
