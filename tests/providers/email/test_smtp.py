"""SMTP adapter against real aiosmtpd servers: implicit TLS and STARTTLS with a trustme CA,
TLS required before AUTH, pool limits counted on the server side, replies classified."""

from __future__ import annotations

import asyncio
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email import message_from_bytes
from typing import Any

import pytest
import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, Session

from clinicomm.providers.base import AdapterContext
from clinicomm.providers.email.smtp import SmtpAdapter, SmtpCredentials, classify_reply
from clinicomm.providers.errors import (
    ConfigurationError,
    ProviderDownError,
    RateLimitedError,
    RecipientError,
    TransientError,
)
from tests.providers.email.conftest import CANARY, html_message, text_message

USER = "clinic-a"


@dataclass
class ServerLog:
    """What the server saw, counted on its own loop (thread)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    open_now: int = 0
    max_open: int = 0
    connections: int = 0
    max_per_connection: int = 0
    auth_commands: list[str] = field(default_factory=list)
    logins: list[tuple[str, str]] = field(default_factory=list)
    messages: list[Envelope] = field(default_factory=list)
    #: Scripted replies by stage ("mail", "rcpt", "data"); None means accept.
    replies: dict[str, str] = field(default_factory=dict)
    #: Offer PIPELINING in EHLO (aiosmtpd reads pipelined commands in order either way).
    pipelining: bool = False
    #: Every command line the server read, in order (the envelope's only).
    commands: list[str] = field(default_factory=list)


class RecordingSMTP(SMTP):
    """aiosmtpd's server, counting connections and AUTH commands."""

    def __init__(self, handler: Any, log: ServerLog, **kw: Any) -> None:
        super().__init__(handler, **kw)
        self.log = log

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # aiosmtpd calls this again with the TLS transport after STARTTLS: same connection.
        upgraded = self._original_transport is not None
        super().connection_made(transport)
        if upgraded:
            return
        with self.log.lock:
            self.log.open_now += 1
            self.log.connections += 1
            self.log.max_open = max(self.log.max_open, self.log.open_now)

    def connection_lost(self, error: Exception | None) -> None:
        with self.log.lock:
            self.log.open_now -= 1
        super().connection_lost(error)

    async def smtp_AUTH(self, arg: str) -> None:
        self.log.auth_commands.append(arg.split(" ")[0] if arg else "")
        await super().smtp_AUTH(arg)


class Handler:
    def __init__(self, log: ServerLog) -> None:
        self.log = log

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        if self.log.pipelining:
            return [*responses[:-1], "250-PIPELINING", responses[-1]]
        return responses

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if reply := self.log.replies.get("mail"):
            return reply
        envelope.mail_from = address
        return "250 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if reply := self.log.replies.get("rcpt"):
            return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if reply := self.log.replies.get("data"):
            return reply
        count = getattr(session, "clinicomm_count", 0) + 1
        session.clinicomm_count = count  # type: ignore[attr-defined]
        with self.log.lock:
            self.log.messages.append(envelope)
            self.log.max_per_connection = max(self.log.max_per_connection, count)
        return "250 2.0.0 Ok: queued"


class FreePortController(Controller):
    """Controller on port 0: reads the bound port before its start-up self-check."""

    def __init__(self, log: ServerLog, **kw: Any) -> None:
        self.log = log
        super().__init__(Handler(log), hostname="127.0.0.1", port=0, **kw)

    def factory(self) -> SMTP:
        return RecordingSMTP(self.handler, self.log, **self.SMTP_kwargs)

    def _trigger_server(self) -> None:
        assert self.server is not None
        self.port = self.server.sockets[0].getsockname()[1]
        super()._trigger_server()


@dataclass
class Pki:
    ca: trustme.CA
    ca_file: str
    server_context: ssl.SSLContext


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_context)
    ca_file = tmp_path_factory.mktemp("pki") / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    return Pki(ca, str(ca_file), server_context)


def authenticator(log: ServerLog) -> Callable[..., AuthResult]:
    def check(
        server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        login = data.login.decode() if isinstance(data.login, bytes) else str(data.login)
        raw = data.password
        password = raw.decode() if isinstance(raw, bytes) else str(raw)
        log.logins.append((login, password))
        # handled=False: aiosmtpd itself answers 535 on failure.
        return AuthResult(success=(login, password) == (USER, CANARY), handled=False)

    return check


@dataclass
class Running:
    log: ServerLog
    port: int


def start(mode: str, pki: Pki, pipelining: bool = False) -> tuple[FreePortController, ServerLog]:
    """mode: starttls (STARTTLS offered, required), implicit (TLS on connect), plain (no TLS).
    `pipelining`: the server offers PIPELINING."""
    log = ServerLog(pipelining=pipelining)
    kw: dict[str, Any] = {"authenticator": authenticator(log)}
    if mode == "starttls":
        kw |= {"tls_context": pki.server_context, "require_starttls": True}
    elif mode == "implicit":
        kw |= {"ssl_context": pki.server_context, "auth_require_tls": False}
    else:
        # Offers AUTH over plain text: the client must refuse on its own.
        kw |= {"auth_require_tls": False}
    controller = FreePortController(log, **kw)
    controller.start()
    # Forget the controller's own start-up check connection.
    deadline = time.monotonic() + 2
    while log.open_now and time.monotonic() < deadline:
        time.sleep(0.005)
    log.connections = 0
    log.max_open = 0
    return controller, log


#: Every server fixture runs each test twice: the session's transactions one command per round
#: trip, and pipelined (RFC 2920).
PIPELINING = {"params": [False, True], "ids": ["sequential", "pipelined"]}


@pytest.fixture(**PIPELINING)
def starttls_server(pki: Pki, request: pytest.FixtureRequest) -> Iterator[Running]:
    controller, log = start("starttls", pki, request.param)
    yield Running(log, controller.port)
    controller.stop()


@pytest.fixture(**PIPELINING)
def implicit_server(pki: Pki, request: pytest.FixtureRequest) -> Iterator[Running]:
    controller, log = start("implicit", pki, request.param)
    yield Running(log, controller.port)
    controller.stop()


@pytest.fixture(**PIPELINING)
def plain_server(pki: Pki, request: pytest.FixtureRequest) -> Iterator[Running]:
    controller, log = start("plain", pki, request.param)
    yield Running(log, controller.port)
    controller.stop()


def make(port: int, pki: Pki | None, *, environment: str = "development", **kw: Any) -> SmtpAdapter:
    data: dict[str, Any] = {"host": "127.0.0.1", "port": port, "user": USER, "password": CANARY}
    data.update(kw)
    context = AdapterContext(
        timeout=5.0, environment=environment, ca_file=pki.ca_file if pki else None
    )
    return SmtpAdapter(SmtpCredentials.model_validate(data), context)


async def wait_for(condition: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


# --- transport security ----------------------------------------------------------------------


async def test_starttls_send(starttls_server: Running, pki: Pki) -> None:
    smtp = make(starttls_server.port, pki)
    result = await smtp.send(html_message())
    await smtp.close()
    log = starttls_server.log
    assert log.logins == [(USER, CANARY)]
    [envelope] = log.messages
    assert envelope.mail_from == "clinic@clinic-a.example"
    assert envelope.rcpt_tos == ["patient@example.com"]
    parsed = message_from_bytes(envelope.original_content or b"")
    assert parsed["Message-ID"] == result.provider_message_id
    assert str(result.provider_message_id).endswith("@clinic-a.example>")
    assert parsed["From"] == "Clinic A <clinic@clinic-a.example>"
    assert parsed.get_content_type() == "multipart/alternative"
    parts = parsed.get_payload()
    assert isinstance(parts, list)
    assert [p.get_content_type() for p in parts] == ["text/plain", "text/html"]


async def test_implicit_tls_send(implicit_server: Running, pki: Pki) -> None:
    sender = {"from": "Reminders <r@clinic-a.example>"}
    smtp = make(implicit_server.port, pki, secure=True, **sender)
    await smtp.send(text_message())
    await smtp.close()
    [envelope] = implicit_server.log.messages
    assert envelope.mail_from == "r@clinic-a.example"
    parsed = message_from_bytes(envelope.original_content or b"")
    assert parsed["From"] == "Reminders <r@clinic-a.example>"
    assert parsed.get_content_type() == "text/plain"
    assert implicit_server.log.logins == [(USER, CANARY)]


async def test_no_starttls_means_no_auth_and_no_mail(plain_server: Running) -> None:
    smtp = make(plain_server.port, None)
    with pytest.raises(ConfigurationError, match="STARTTLS"):
        await smtp.send(text_message())
    with pytest.raises(ConfigurationError):
        await smtp.probe()
    await smtp.close()
    assert plain_server.log.auth_commands == []
    assert plain_server.log.logins == []
    assert plain_server.log.messages == []


async def test_untrusted_certificate_fails_before_auth(starttls_server: Running) -> None:
    """Without the test CA the handshake fails: no AUTH, no mail (validation cannot be off)."""
    smtp = make(starttls_server.port, None)
    with pytest.raises(ConfigurationError):
        await smtp.send(text_message())
    assert starttls_server.log.auth_commands == []
    assert starttls_server.log.messages == []


async def test_require_tls_false_allows_plain_in_development(plain_server: Running) -> None:
    smtp = make(plain_server.port, None, requireTls=False, user=None, password=None)
    await smtp.send(text_message())
    await smtp.close()
    assert len(plain_server.log.messages) == 1


async def test_require_tls_false_refused_in_production_for_remote_host() -> None:
    smtp = SmtpAdapter(
        SmtpCredentials(host="smtp.clinic-a.example", require_tls=False),
        AdapterContext(environment="production"),
    )
    with pytest.raises(ConfigurationError, match="production"):
        await smtp.send(text_message())
    with pytest.raises(ConfigurationError, match="production"):
        await smtp.probe()


async def test_require_tls_false_allowed_in_production_on_loopback(plain_server: Running) -> None:
    smtp = make(
        plain_server.port,
        None,
        environment="production",
        requireTls=False,
        user=None,
        password=None,
    )
    await smtp.send(text_message())
    await smtp.close()
    assert len(plain_server.log.messages) == 1


def test_credentials_offer_no_switch_to_disable_certificate_checks() -> None:
    names = {n.lower() for n in SmtpCredentials.model_fields}
    assert not any("verify" in n or "validate" in n or "insecure" in n for n in names)


# --- sender ----------------------------------------------------------------------------------


async def test_no_sender_is_configuration_error(starttls_server: Running, pki: Pki) -> None:
    smtp = make(starttls_server.port, pki)
    with pytest.raises(ConfigurationError):
        await smtp.send(text_message(from_email=None, from_name=None))
    assert starttls_server.log.connections == 0


# --- pool ------------------------------------------------------------------------------------


async def test_pool_limits_counted_on_the_server(starttls_server: Running, pki: Pki) -> None:
    smtp = make(starttls_server.port, pki, maxConnections=5, maxMessagesPerConnection=100)
    messages = [text_message(to=f"p{i}@example.com", reference=f"dlv_{i}") for i in range(250)]
    results = await asyncio.gather(*(smtp.send(m) for m in messages))
    assert smtp.open_connections <= 5
    await smtp.close()
    log = starttls_server.log
    assert len(log.messages) == 250
    assert len({r.provider_message_id for r in results}) == 250
    assert log.max_open <= 5
    assert log.max_per_connection <= 100
    assert log.connections >= 3  # 250 messages need at least 3 connections of 100
    await wait_for(lambda: log.open_now == 0)


async def test_reconnects_after_max_messages(starttls_server: Running, pki: Pki) -> None:
    smtp = make(starttls_server.port, pki, maxConnections=1, maxMessagesPerConnection=3)
    for i in range(7):
        await smtp.send(text_message(reference=f"dlv_{i}"))
    await smtp.close()
    assert starttls_server.log.connections == 3
    assert starttls_server.log.max_per_connection == 3
    assert len(starttls_server.log.messages) == 7


async def test_idle_connection_closed_after_timeout(starttls_server: Running, pki: Pki) -> None:
    smtp = make(starttls_server.port, pki, idleTimeoutSeconds=0.2)
    await smtp.send(text_message())
    assert starttls_server.log.open_now == 1
    await wait_for(lambda: starttls_server.log.open_now == 0)
    assert smtp.open_connections == 0
    await smtp.send(text_message())  # a new connection after the idle close
    await smtp.close()
    assert starttls_server.log.connections == 2


async def test_probe_authenticates_and_sends_nothing(starttls_server: Running, pki: Pki) -> None:
    smtp = make(starttls_server.port, pki)
    await smtp.probe()
    assert starttls_server.log.logins == [(USER, CANARY)]
    assert starttls_server.log.messages == []
    await wait_for(lambda: starttls_server.log.open_now == 0)


# --- replies ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stage", "reply", "expected"),
    [
        ("data", "454 4.7.0 Throttling failure: Maximum sending rate exceeded", RateLimitedError),
        ("mail", "421 4.7.0 Try again later, too many connections", RateLimitedError),
        ("rcpt", "450 4.2.1 Mailbox temporarily unavailable", TransientError),
        ("data", "451 4.3.0 Temporary local problem", TransientError),
        ("rcpt", "452 4.5.3 Too many recipients", RateLimitedError),
        ("rcpt", "550 5.1.1 The email account you tried to reach does not exist", RecipientError),
        ("data", "550 5.4.5 Daily user sending quota exceeded", ProviderDownError),
        ("mail", "553 5.1.8 Sender address domain does not exist", ConfigurationError),
        ("mail", "550 5.7.1 Sender not authorized", ConfigurationError),
        ("data", "554 5.6.0 Message content rejected", ProviderDownError),
    ],
)
async def test_server_replies_are_classified(
    starttls_server: Running, pki: Pki, stage: str, reply: str, expected: type[Exception]
) -> None:
    starttls_server.log.replies[stage] = reply
    smtp = make(starttls_server.port, pki)
    with pytest.raises(expected) as info:
        await smtp.send(text_message())
    await smtp.close()
    error = info.value
    assert type(error) is expected
    assert error.status_code == int(reply[:3])  # type: ignore[attr-defined]
    assert "patient@example.com" not in str(error.to_dict())  # type: ignore[attr-defined]
    assert starttls_server.log.messages == []


async def test_connection_reused_after_a_refused_recipient(
    starttls_server: Running, pki: Pki
) -> None:
    smtp = make(starttls_server.port, pki)
    starttls_server.log.replies["rcpt"] = "550 5.1.1 No such user"
    with pytest.raises(RecipientError):
        await smtp.send(text_message())
    del starttls_server.log.replies["rcpt"]
    await smtp.send(text_message())
    await smtp.close()
    assert starttls_server.log.connections == 1


async def test_bad_password_is_configuration_error(starttls_server: Running, pki: Pki) -> None:
    smtp = make(starttls_server.port, pki, password="wrong")
    with pytest.raises(ConfigurationError) as info:
        await smtp.send(text_message())
    assert info.value.status_code == 535
    assert starttls_server.log.messages == []
    with pytest.raises(ConfigurationError):
        await smtp.probe()


async def test_connection_refused_is_provider_down() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        smtp = make(port, None)
        with pytest.raises(ProviderDownError):
            await smtp.send(text_message())
        with pytest.raises(ProviderDownError):
            await smtp.probe()
    assert smtp.open_connections == 0


async def test_silent_server_times_out_as_transient() -> None:
    async def accept_and_say_nothing(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await asyncio.sleep(2)
        writer.close()

    server = await asyncio.start_server(accept_and_say_nothing, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    smtp = SmtpAdapter(SmtpCredentials(host="127.0.0.1", port=port), AdapterContext(timeout=0.2))
    try:
        with pytest.raises(TransientError):
            await smtp.send(text_message())
    finally:
        server.close()
    assert smtp.open_connections == 0


def test_classification_table_without_a_server() -> None:
    auth = classify_reply(535, "5.7.8 Authentication credentials invalid", stage="auth")
    assert isinstance(auth, ConfigurationError)
    assert isinstance(classify_reply(550, "No such user here", stage="rcpt"), RecipientError)
    assert isinstance(classify_reply(552, "5.2.2 Mailbox full", stage="data"), ProviderDownError)
