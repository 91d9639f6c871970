"""The SMTP session's transactions against scripted servers (plain TCP on loopback, TLS not
required): pipelined commands leave together, replies stay paired with their commands whatever
the server refuses, a server out of turn is dropped, and addresses cannot inject commands.
The aiosmtpd tests (test_smtp.py) run every adapter test over both the pipelined and the
sequential path."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from email import message_from_bytes

import pytest

from clinicomm.providers.base import AdapterContext
from clinicomm.providers.email.smtp import SmtpAdapter, SmtpCredentials
from clinicomm.providers.errors import (
    ConfigurationError,
    ProviderDownError,
    RateLimitedError,
    RecipientError,
    TransientError,
)
from tests.providers.email.conftest import text_message

#: The fixture `server`: starts a scripted server, gives an adapter for it (plain TCP).
Start = Callable[..., Awaitable[SmtpAdapter]]

EHLO = b"250-sink.example\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250 8BITMIME\r\n"


@dataclass
class Script:
    """A scripted server. `answer(command)` gives the reply to a command line (None: what a
    server keeping RFC 5321's order would answer; b"": no answer at all). Every connection's
    lines, as read, and every message's data (still dot-stuffed) are kept."""

    ehlo: bytes = EHLO
    answer: Callable[[bytes], bytes | None] = lambda line: None
    #: Read MAIL, RCPT and DATA all before answering any (a sequential client would hang).
    wait_for_pipeline: bool = False
    #: Answer DATA with 354 even when no recipient was accepted (RFC 2920 §3.1 allows it).
    data_without_recipients: bool = False
    #: Written after the reply to the end of each message's data.
    after_message: bytes = b""
    connections: list[list[bytes]] = field(default_factory=list)
    messages: list[bytes] = field(default_factory=list)


class _Envelope:
    def __init__(self, script: Script) -> None:
        self.script = script
        self.mail = False
        self.rcpt = False

    def reply(self, line: bytes) -> bytes:
        scripted = self.script.answer(line)
        verb = line.split(b" ", 1)[0].split(b":", 1)[0].upper()
        if verb == b"MAIL":
            default = b"250 ok\r\n"
        elif verb == b"RCPT":
            default = b"250 ok\r\n" if self.mail else b"503 5.5.1 need MAIL\r\n"
        elif verb == b"DATA":
            ready = self.rcpt or (self.mail and self.script.data_without_recipients)
            default = b"354 go ahead\r\n" if ready else b"554 5.5.1 no valid recipients\r\n"
        elif verb == b"QUIT":
            default = b"221 bye\r\n"
        else:
            default = b"250 ok\r\n"
        reply = default if scripted is None else scripted
        ok = reply.startswith((b"250", b"354"))
        if verb == b"MAIL":
            self.mail = ok
        elif verb == b"RCPT":
            self.rcpt = self.rcpt or ok
        elif verb == b"RSET":
            self.mail = self.rcpt = False
        return reply


async def _serve(
    script: Script, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    lines: list[bytes] = []
    script.connections.append(lines)
    envelope = _Envelope(script)
    writer.write(b"220 sink.example ESMTP\r\n")
    try:
        while line := await reader.readline():
            lines.append(line)
            commands = [line]
            if script.wait_for_pipeline and line.upper().startswith(b"MAIL"):
                commands += [await reader.readline(), await reader.readline()]
                lines += commands[1:]
            replies = []
            for command in commands:
                command = command.rstrip(b"\r\n")
                if command.upper().startswith(b"EHLO"):
                    replies.append(script.ehlo)
                else:
                    replies.append(envelope.reply(command))
            writer.write(b"".join(replies))
            last = commands[-1].rstrip(b"\r\n").upper()
            if last == b"DATA" and replies[-1].startswith(b"354"):
                data = bytearray()
                while (chunk := await reader.readline()) not in (b".\r\n", b""):
                    data += chunk
                script.messages.append(bytes(data))
                writer.write(envelope.reply(b"."))
                envelope.mail = envelope.rcpt = False
                writer.write(script.after_message)
            if last == b"QUIT":
                break
            await writer.drain()
    finally:
        writer.close()


@pytest.fixture
async def server() -> AsyncIterator[Start]:
    servers: list[asyncio.Server] = []
    adapters: list[SmtpAdapter] = []

    async def start(script: Script, timeout: float = 2.0) -> SmtpAdapter:
        srv = await asyncio.start_server(lambda r, w: _serve(script, r, w), "127.0.0.1", 0)
        servers.append(srv)
        port = srv.sockets[0].getsockname()[1]
        adapter = SmtpAdapter(
            SmtpCredentials(host="127.0.0.1", port=port, require_tls=False),
            AdapterContext(timeout=timeout),
        )
        adapters.append(adapter)
        return adapter

    yield start
    for adapter in adapters:
        await adapter.close()
    for srv in servers:
        srv.close()


async def test_pipelined_commands_leave_in_one_round_trip(server: Start) -> None:
    script = Script(wait_for_pipeline=True)
    smtp = await server(script)
    result = await smtp.send(text_message())
    await smtp.send(text_message(to="other@example.com"))
    [lines] = script.connections
    envelope = [line for line in lines if not line.upper().startswith(b"EHLO")]
    assert envelope[:3] == [
        b"MAIL FROM:<clinic@clinic-a.example> SIZE=%d\r\n" % len(script.messages[0]),
        b"RCPT TO:<patient@example.com>\r\n",
        b"DATA\r\n",
    ]
    assert envelope[3:6] == [
        b"MAIL FROM:<clinic@clinic-a.example> SIZE=%d\r\n" % len(script.messages[1]),
        b"RCPT TO:<other@example.com>\r\n",
        b"DATA\r\n",
    ]
    parsed = message_from_bytes(script.messages[0])
    assert parsed["Message-ID"] == result.provider_message_id


async def test_without_pipelining_one_command_per_round_trip(server: Start) -> None:
    script = Script(ehlo=b"250-sink.example\r\n250 8BITMIME\r\n")
    smtp = await server(script)
    await smtp.send(text_message())
    [lines] = script.connections
    assert [line.split(b":")[0] for line in lines[1:4]] == [b"MAIL FROM", b"RCPT TO", b"DATA\r\n"]
    assert b"SIZE=" not in lines[1]  # not offered, not sent
    assert len(script.messages) == 1


async def test_lines_are_crlf_and_a_leading_dot_is_doubled(server: Start) -> None:
    script = Script()
    smtp = await server(script)
    text = ".hidden\n..two\nplain line\n."
    await smtp.send(text_message(text=text))
    [data] = script.messages
    assert all(line.endswith(b"\r\n") for line in data.splitlines(keepends=True))
    body = data.split(b"\r\n\r\n", 1)[1]
    assert body.startswith(b"..hidden\r\n...two\r\n")
    # What the server stores after removing the stuffing (RFC 5321 §4.5.2) is the text.
    unstuffed = b"".join(
        line[1:] if line.startswith(b".") else line for line in data.splitlines(keepends=True)
    )
    payload = message_from_bytes(unstuffed).get_payload(decode=True)
    assert isinstance(payload, bytes)
    assert payload.decode().replace("\r\n", "\n").rstrip("\n") == text


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "sequential"])
@pytest.mark.parametrize(
    ("verb", "reply", "expected"),
    [
        (b"MAIL", b"553 5.1.8 Sender address domain does not exist\r\n", ConfigurationError),
        (b"RCPT", b"550 5.1.1 No such user\r\n", RecipientError),
        (b"DATA", b"554 5.3.4 Message too big for system\r\n", ProviderDownError),
    ],
)
async def test_a_refusal_leaves_the_session_in_step(
    server: Start, pipelining: bool, verb: bytes, reply: bytes, expected: type[Exception]
) -> None:
    refuse = [True]

    def answer(line: bytes) -> bytes | None:
        if line.upper().startswith(verb) and refuse[0]:
            return reply
        return None

    ehlo = EHLO if pipelining else b"250 sink.example\r\n"
    script = Script(ehlo=ehlo, answer=answer)
    smtp = await server(script)
    with pytest.raises(expected) as info:
        await smtp.send(text_message())
    assert type(info.value) is expected
    refuse[0] = False
    await smtp.send(text_message())
    assert len(script.connections) == 1  # the same connection, after RSET
    [lines] = script.connections
    assert b"RSET\r\n" in lines
    assert len(script.messages) == 1


async def test_a_354_after_refused_recipients_gets_a_lone_dot(server: Start) -> None:
    """RFC 2920 §3.1: a server that accepts DATA with no valid recipient gets an empty
    message, which it must refuse; nothing of the message is written."""

    def answer(line: bytes) -> bytes | None:
        if line.upper().startswith(b"RCPT"):
            return b"550 5.1.1 No such user\r\n"
        if line == b".":
            return b"554 5.5.1 no valid recipients\r\n"
        return None

    script = Script(answer=answer, data_without_recipients=True)
    smtp = await server(script)
    with pytest.raises(RecipientError):
        await smtp.send(text_message())
    assert script.messages == [b""]
    await smtp.close()


async def test_421_closes_the_session(server: Start) -> None:
    closing = [True]

    def answer(line: bytes) -> bytes | None:
        if line.upper().startswith(b"MAIL") and closing[0]:
            closing[0] = False
            return b"421 4.7.0 Try again later, too many connections\r\n"
        return None

    script = Script(answer=answer)
    smtp = await server(script)
    with pytest.raises(RateLimitedError):
        await smtp.send(text_message())
    await smtp.send(text_message())
    assert len(script.connections) == 2
    assert len(script.messages) == 1


async def test_a_reply_out_of_turn_drops_the_connection(server: Start) -> None:
    script = Script(after_message=b"250 unsolicited\r\n")
    smtp = await server(script)
    await smtp.send(text_message())
    await asyncio.sleep(0.05)  # the stray reply arrives while the connection is idle
    await smtp.send(text_message())
    assert len(script.connections) == 2  # the first one was not reused out of step
    assert len(script.messages) == 2


async def test_a_garbled_reply_is_a_transient_failure(server: Start) -> None:
    def answer(line: bytes) -> bytes | None:
        return b"HTTP/1.1 400 Bad Request\r\n" if line.upper().startswith(b"MAIL") else None

    smtp = await server(Script(answer=answer))
    with pytest.raises(TransientError):
        await smtp.send(text_message())
    assert smtp.open_connections == 0


@pytest.mark.parametrize(
    ("field_name", "address", "expected"),
    [
        ("to", "patient@example.com>\r\nRCPT TO:<other@example.com", RecipientError),
        ("to", "pat\x00ient@example.com", RecipientError),
        # resolve_sender already keeps only the address: sent, and nothing injected.
        ("from_email", "clinic@clinic-a.example>\r\nRSET", None),
        ("to", "patiënt@example.com", RecipientError),  # no SMTPUTF8 offered
    ],
)
async def test_an_address_that_cannot_be_written_is_refused_before_any_command(
    server: Start, field_name: str, address: str, expected: type[Exception] | None
) -> None:
    script = Script()
    smtp = await server(script)
    await smtp.send(text_message())  # the connection is open and in step
    if expected is None:
        await smtp.send(text_message(**{field_name: address}))
    else:
        with pytest.raises(expected):
            await smtp.send(text_message(**{field_name: address}))
    await smtp.send(text_message())
    [lines] = script.connections
    assert not any(b"other@example.com" in line or line == b"RSET\r\n" for line in lines)
    assert len(script.messages) == (3 if expected is None else 2)
    assert len(script.connections) == 1


async def test_a_non_ascii_address_uses_smtputf8_when_offered(server: Start) -> None:
    script = Script(ehlo=b"250-sink.example\r\n250-PIPELINING\r\n250 SMTPUTF8\r\n")
    smtp = await server(script)
    await smtp.send(text_message(to="patiënt@example.com"))
    [lines] = script.connections
    assert lines[1] == b"MAIL FROM:<clinic@clinic-a.example> SMTPUTF8\r\n"
    assert lines[2] == "RCPT TO:<patiënt@example.com>\r\n".encode()


async def test_a_silent_server_mid_transaction_times_out(server: Start) -> None:
    silent = [False]

    def answer(line: bytes) -> bytes | None:
        silent[0] = silent[0] or line.upper().startswith(b"RCPT")
        return b"" if silent[0] else None  # from RCPT on, never a word

    script = Script(answer=answer)
    smtp = await server(script, timeout=0.2)
    with pytest.raises(TransientError):
        await smtp.send(text_message())
    assert smtp.open_connections == 0
