"""A real SMTP server (aiosmtpd) that records what it receives, for pipeline tests."""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass, field
from email import message_from_bytes
from email.message import Message
from typing import Any

from aiosmtpd.controller import Controller


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    message: Message


@dataclass
class RecordingHandler:
    """Accepts every message, or answers `reply` (e.g. "451 4.3.0 try later") when set."""

    received: list[Received] = field(default_factory=list)
    reply: str | None = None
    delay: float = 0.0

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.delay:
            await asyncio.sleep(self.delay)
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


class SmtpServer:
    """`with SmtpServer() as smtp:` a plain SMTP server on 127.0.0.1 (no TLS, no AUTH)."""

    def __init__(self) -> None:
        self.handler = RecordingHandler()
        self.port = free_port()
        self.controller = Controller(self.handler, hostname="127.0.0.1", port=self.port)

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
