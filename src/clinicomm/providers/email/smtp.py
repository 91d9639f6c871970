"""SMTP (any server: Gmail, Outlook, a clinic's own relay), with a connection pool per adapter.

Transport security (RFC 8314, RFC 3207):

- `secure: true` is implicit TLS: TLS is negotiated before any SMTP command (port 465).
- Otherwise the adapter EHLOs and upgrades with STARTTLS. STARTTLS is *required* unless
  `requireTls` is false: a server that does not advertise it, or whose handshake fails, is
  left with QUIT before AUTH, so no credential and no message data is ever sent in clear.
- Certificates are always validated (system store plus `context.ca_file`); there is no setting
  to turn that off. With `context.environment == "production"`, `requireTls: false` is refused
  for any host that is not loopback.

Pool: an adapter is built per (clinic, config version) and holds at most `maxConnections` open
connections (counting those being opened and closed), puts at most `maxMessagesPerConnection`
messages on one connection and then reconnects, and closes a connection idle for
`idleTimeoutSeconds`.

Reply classification (https://www.rfc-editor.org/rfc/rfc5321#section-4.2, RFC 3463 enhanced
codes):

| reply | class |
|---|---|
| 4yz, 421/454 saying "throttl", "rate" or "too many" | RateLimitedError |
| other 4yz (421, 450, 451, 452, 454, ...) | TransientError |
| 5yz marking a sending quota (`5.4.5`, "quota", "daily ... limit") | ProviderDownError |
| 535, 534, 530 (auth), 5.7.x on MAIL FROM, 5.1.7/5.1.8 (bad sender) | ConfigurationError |
| 5yz with a 5.1.x enhanced code, or any 5yz to RCPT TO | RecipientError |
| other 5yz | ProviderDownError |
| connection refused | ProviderDownError |
| timeout, dropped connection | TransientError |
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
import ssl
import time
from dataclasses import dataclass
from email.header import Header
from email.utils import formatdate, make_msgid
from typing import Any, ClassVar

import aiosmtplib
from pydantic import Field, SecretStr, model_validator

from clinicomm.providers import egress, registry
from clinicomm.providers.base import (
    AdapterContext,
    Channel,
    OutboundMessage,
    ProviderAdapter,
    ProviderCredentials,
    SendResult,
)
from clinicomm.providers.email import mime
from clinicomm.providers.email.sender import Sender, resolve_sender
from clinicomm.providers.email.smtp_session import AddressError, ReplyError, Session, SessionLost
from clinicomm.providers.errors import (
    ConfigurationError,
    ProviderDownError,
    ProviderError,
    RateLimitedError,
    RecipientError,
    TransientError,
)


class SmtpCredentials(ProviderCredentials):
    """An SMTP submission server. `secure` is implicit TLS (465); otherwise STARTTLS is required
    unless `requireTls` is false."""

    host: str = Field(min_length=1)
    endpoint_fields: ClassVar[tuple[str, ...]] = ("host", "port")
    host_fields: ClassVar[tuple[str, ...]] = ("host",)
    port: int | None = Field(default=None, ge=1, le=65535)
    secure: bool = False
    require_tls: bool = True
    user: str | None = None
    password: SecretStr | None = None
    from_: str | None = Field(default=None, alias="from")
    max_connections: int = Field(default=5, ge=1, le=100)
    max_messages_per_connection: int = Field(default=100, ge=1, le=10_000)
    idle_timeout_seconds: float = Field(default=300, gt=0)

    @model_validator(mode="after")
    def _default_port(self) -> SmtpCredentials:
        if self.port is None:
            self.port = 465 if self.secure else 587
        return self


# --- reply classification -------------------------------------------------------------------

_ENHANCED = re.compile(r"\b([245])\.(\d{1,3})\.(\d{1,3})\b")
_RATE_WORDS = re.compile(r"throttl|rate|too many|slow down", re.IGNORECASE)
# e.g. Google "550 5.4.5 Daily user sending quota exceeded", Outlook "554 5.2.0 ... quota".
_QUOTA_WORDS = re.compile(
    r"quota|daily.{0,40}limit|sending limit|limit.{0,20}exceeded", re.IGNORECASE
)


def classify_reply(code: int, text: str, *, stage: str, provider: str = "smtp") -> ProviderError:
    """Turn one SMTP reply into a classified error; `stage` is mail, rcpt, data, auth or
    connect (which command the server refused). See the module docstring for the table."""
    enhanced = _ENHANCED.search(text)
    subject = (int(enhanced.group(2)), int(enhanced.group(3))) if enhanced else None
    kw: dict[str, Any] = {
        "provider": provider,
        "status_code": code,
        "code": enhanced.group(0) if enhanced else None,
        # A real reply's text is the server's documented answer; anything else (aiosmtplib's
        # -1 "Malformed SMTP response line" for a non-SMTP port) would echo a foreign banner.
        "detail": f"{code} {text}" if 200 <= code <= 599 else None,
    }
    if not 200 <= code <= 599:
        return ConfigurationError("not an SMTP server answer", **kw)
    if 400 <= code < 500:
        if code in (421, 454, 450, 451, 452) and _RATE_WORDS.search(text):
            return RateLimitedError("server asked to slow down", **kw)
        return TransientError("temporary SMTP failure", **kw)
    if subject == (4, 5) or _QUOTA_WORDS.search(text):
        return ProviderDownError("sending quota exhausted", **kw)
    if code in (530, 534, 535) or stage == "auth":
        return ConfigurationError("SMTP authentication failed", **kw)
    if subject in ((1, 7), (1, 8)) or (stage == "mail" and subject is not None and subject[0] == 7):
        return ConfigurationError("sender refused", **kw)
    if (subject is not None and subject[0] == 1) or stage == "rcpt":
        return RecipientError("recipient refused", **kw)
    if stage == "mail":
        return ConfigurationError("sender refused", **kw)
    return ProviderDownError("message refused by server", **kw)


def _classify_exception(exc: Exception, provider: str, stage: str) -> ProviderError:
    """Map an aiosmtplib (or socket/TLS) exception to the tree; never returns it unchanged."""
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        first = exc.recipients[0] if exc.recipients else None
        if first is not None:
            return classify_reply(first.code, first.message, stage="rcpt", provider=provider)
        return RecipientError("recipient refused", provider=provider)
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        if isinstance(exc, aiosmtplib.SMTPSenderRefused):
            stage = "mail"
        elif isinstance(exc, aiosmtplib.SMTPDataError):
            stage = "data"
        elif isinstance(exc, aiosmtplib.SMTPAuthenticationError):
            stage = "auth"
        return classify_reply(exc.code, exc.message, stage=stage, provider=provider)
    if isinstance(exc, TimeoutError):  # includes SMTPTimeoutError, SMTPConnectTimeoutError
        return TransientError("SMTP server timed out", provider=provider, detail=type(exc).__name__)
    if isinstance(exc, aiosmtplib.SMTPConnectError | ConnectionRefusedError):
        return ProviderDownError(
            "SMTP server unreachable", provider=provider, detail=type(exc).__name__
        )
    if isinstance(exc, ssl.SSLError):
        return ConfigurationError(
            "TLS handshake failed", provider=provider, detail=type(exc).__name__
        )
    return TransientError("SMTP connection failed", provider=provider, detail=type(exc).__name__)


# --- pool -----------------------------------------------------------------------------------

_local_hostname: str | None = None


async def _hostname_for_ehlo() -> str:
    """This host's FQDN for EHLO, looked up once per process (getfqdn can be slow)."""
    global _local_hostname
    if _local_hostname is None:
        name = await asyncio.get_running_loop().run_in_executor(None, socket.getfqdn)
        _local_hostname = name if name and " " not in name else "localhost"
    return _local_hostname


@dataclass(eq=False)
class _Connection:
    session: Session
    sent: int = 0
    idle_timer: asyncio.TimerHandle | None = None


class _Pool:
    """At most `size` connections open (in use, idle, opening or closing) at any moment."""

    def __init__(self, adapter: SmtpAdapter, size: int, per_connection: int, idle: float) -> None:
        self._adapter = adapter
        self._size = size
        self._per_connection = per_connection
        self._idle_timeout = idle
        self._idle: list[_Connection] = []
        self._open = 0
        self._cond = asyncio.Condition()
        self._closers: set[asyncio.Task[None]] = set()

    @property
    def open_connections(self) -> int:
        """Connections counted against the limit right now (for tests and metrics)."""
        return self._open

    async def acquire(self, *, fresh: bool = False) -> _Connection:
        """An idle connection (unless `fresh`), or a new one when fewer than `size` are open;
        else wait for one to come back."""
        replaced: _Connection | None = None
        async with self._cond:
            while True:
                while self._idle and not fresh:
                    conn = self._idle.pop()
                    if conn.idle_timer is not None:
                        conn.idle_timer.cancel()
                        conn.idle_timer = None
                    if conn.session.is_connected:
                        return conn
                    conn.session.close()  # the server dropped it while idle
                    self._open -= 1
                if self._open < self._size:
                    self._open += 1
                    break
                if fresh and self._idle:
                    # Full of idle connections: close one and take over its slot.
                    replaced = self._idle.pop(0)
                    if replaced.idle_timer is not None:
                        replaced.idle_timer.cancel()
                    break
                await self._cond.wait()
        if replaced is not None:
            await replaced.session.quit()
        try:
            return _Connection(await self._adapter.open_connection())
        except BaseException:
            await self._free_slot()
            raise

    async def release(self, conn: _Connection, *, reusable: bool) -> None:
        """Give a connection back: kept idle if reusable and under the per-connection limit,
        else closed (QUIT) before its slot is freed."""
        if reusable and conn.sent < self._per_connection and conn.session.is_connected:
            loop = asyncio.get_running_loop()
            conn.idle_timer = loop.call_later(self._idle_timeout, self._expire, conn)
            async with self._cond:
                self._idle.append(conn)
                self._cond.notify()
            return
        await conn.session.quit()
        await self._free_slot()

    async def _free_slot(self) -> None:
        async with self._cond:
            self._open -= 1
            self._cond.notify()

    def _expire(self, conn: _Connection) -> None:
        if conn in self._idle:
            self._idle.remove(conn)
            conn.idle_timer = None
            task = asyncio.get_running_loop().create_task(self._close(conn))
            self._closers.add(task)
            task.add_done_callback(self._closers.discard)

    async def _close(self, conn: _Connection) -> None:
        await conn.session.quit()
        await self._free_slot()

    async def close(self) -> None:
        """QUIT every idle connection and wait for closings in flight."""
        idle, self._idle = self._idle, []
        for conn in idle:
            if conn.idle_timer is not None:
                conn.idle_timer.cancel()
        await asyncio.gather(*(self._close(conn) for conn in idle))
        if self._closers:
            await asyncio.gather(*self._closers, return_exceptions=True)


# --- message --------------------------------------------------------------------------------

_date: tuple[int, str] = (0, "")


def _date_header() -> str:
    """`formatdate(usegmt=True)` for now, formatted once per second (it has whole seconds)."""
    global _date
    second = int(time.time())
    if _date[0] != second:
        _date = (second, formatdate(second, localtime=False, usegmt=True))
    return _date[1]


def _header(value: str) -> str | Header:
    """ASCII as is; anything else as an RFC 2047 encoded-word (folded by the generator)."""
    return value if value.isascii() else Header(value, "utf-8")


# --- adapter --------------------------------------------------------------------------------


def _is_loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@registry.register
class SmtpAdapter(ProviderAdapter):
    """Sends through an SMTP submission server over a pool of authenticated TLS connections."""

    key = "smtp"
    global_default = True
    channel = Channel.EMAIL
    display_name = "SMTP"
    credentials_model = SmtpCredentials
    credentials: SmtpCredentials

    def __init__(self, credentials: SmtpCredentials, context: AdapterContext) -> None:
        super().__init__(credentials, context)
        self._tls = ssl.create_default_context()
        if context.ca_file:
            self._tls.load_verify_locations(cafile=context.ca_file)
        self._pool = _Pool(
            self,
            credentials.max_connections,
            credentials.max_messages_per_connection,
            credentials.idle_timeout_seconds,
        )

    @property
    def open_connections(self) -> int:
        """How many pooled connections are open now (in use, idle, opening or closing)."""
        return self._pool.open_connections

    def _check_policy(self) -> None:
        creds = self.credentials
        if (
            self.context.environment == "production"
            and not creds.secure
            and not creds.require_tls
            and not _is_loopback(creds.host)
        ):
            raise ConfigurationError(
                "requireTls=false is refused in production for a non-loopback host",
                provider=self.key,
            )

    async def open_connection(self) -> Session:
        """Connect, EHLO, STARTTLS (unless implicit TLS) and AUTH when a user is set, with
        aiosmtplib; then the connection's transactions are a `Session`'s.

        Raises ConfigurationError, and sends no AUTH and no mail, when TLS is required and the
        server does not offer STARTTLS or the handshake fails.
        """
        creds = self.credentials
        assert creds.port is not None  # set by the model's validator
        try:
            async with asyncio.timeout(self.context.timeout):
                sock = await self.context.egress.open_socket(creds.host, creds.port)
        except egress.DestinationNotAllowedError:
            raise ConfigurationError(egress.NOT_ALLOWED, provider=self.key) from None
        except TimeoutError as exc:
            raise _classify_exception(exc, self.key, "connect") from exc
        except OSError as exc:  # refused, unreachable, name not resolved
            raise ProviderDownError(
                "SMTP server unreachable", provider=self.key, detail=type(exc).__name__
            ) from exc
        # The socket is connected to an address the egress policy allowed; `hostname` stays
        # the configured name, for the certificate check (STARTTLS and implicit TLS).
        client = aiosmtplib.SMTP(
            hostname=creds.host,
            sock=sock,
            use_tls=creds.secure,
            start_tls=False,  # we decide below, so a missing STARTTLS cannot pass silently
            validate_certs=True,
            tls_context=self._tls,
            timeout=self.context.timeout,
            local_hostname=await _hostname_for_ehlo(),
        )
        stage = "connect"
        try:
            await client.connect()
            stage = "ehlo"
            await client.ehlo()
            if not creds.secure:
                if client.supports_extension("starttls"):
                    stage = "starttls"
                    try:
                        await client.starttls(tls_context=self._tls)
                    except (ssl.SSLError, aiosmtplib.SMTPException, OSError) as exc:
                        client.close()
                        raise ConfigurationError(
                            "STARTTLS handshake failed; not authenticating",
                            provider=self.key,
                            detail=type(exc).__name__,
                        ) from exc
                    await client.ehlo()
                elif creds.require_tls:
                    await self.quit(client)
                    raise ConfigurationError(
                        "server does not offer STARTTLS and TLS is required",
                        provider=self.key,
                    )
            if creds.user:
                stage = "auth"
                password = creds.password.get_secret_value() if creds.password else ""
                await client.login(creds.user, password)
        except ProviderError:
            raise
        except aiosmtplib.SMTPException as exc:
            client.close()
            if stage == "auth" and not isinstance(
                exc, aiosmtplib.SMTPResponseException | TimeoutError | ConnectionError
            ):
                # e.g. "SMTP AUTH extension not supported by server."
                raise ConfigurationError(
                    "SMTP AUTH not available", provider=self.key, detail=str(exc)
                ) from exc
            raise _classify_exception(exc, self.key, stage) from exc
        except (OSError, ssl.SSLError) as exc:
            client.close()
            raise _classify_exception(exc, self.key, stage) from exc
        try:
            return Session.take_over(client, timeout=self.context.timeout)
        except SessionLost as exc:
            client.close()
            raise _classify_exception(exc, self.key, "ehlo") from exc

    async def quit(self, client: aiosmtplib.SMTP) -> None:
        """QUIT a connection still in aiosmtplib's hands, then drop the socket whatever
        happens. Never raises."""
        try:
            if client.is_connected:
                await client.quit(timeout=self.context.timeout)
        except (aiosmtplib.SMTPException, OSError, TimeoutError):
            pass
        finally:
            client.close()

    def render(self, message: OutboundMessage) -> tuple[bytes, str, Sender]:
        """The message's bytes (text, HTML, or multipart/alternative with both; utf-8 parts in
        quoted-printable), its Message-ID (fresh, in the sender's domain) and the sender.

        Written by `providers.email.mime`, byte for byte what the compat32 `email.mime`
        classes and generator write (not `EmailMessage`, whose policy refolds every header
        through `headerregistry`), without building them: they cost more than the SMTP
        exchange itself. Every header is ASCII (RFC 2047 encoded-words for non-ASCII names
        and subjects) and every part `utf-8`, so the output is 7-bit and needs neither
        SMTPUTF8 nor 8BITMIME.
        """
        sender = resolve_sender(self.key, message, email=self.credentials.from_, name=None)
        if not (message.text or message.html):
            raise ConfigurationError(
                "SMTP sends rendered text or HTML; this message has neither", provider=self.key
            )
        message_id = make_msgid(domain=sender.email.rsplit("@", 1)[-1])
        data = mime.render(
            sender=sender.header(),
            to=message.to,
            subject=_header(message.subject or ""),
            date=_date_header(),
            message_id=message_id,
            text=message.text,
            html=message.html,
        )
        return data, message_id, sender

    async def send(self, message: OutboundMessage) -> SendResult:
        """Send on a pooled connection; `provider_message_id` is the Message-ID header.

        See the module docstring for how replies and network failures are classified.
        """
        self._check_policy()
        data, message_id, sender = self.render(message)
        conn = await self._pool.acquire()
        reusable = False
        try:
            await conn.session.send(sender.email, message.to, data)
            reusable = True
        except ReplyError as exc:
            # The session reset the envelope (RSET) and stays usable, unless the server said
            # it is closing (421): then it is closed, and release() sees that.
            reusable = True
            code, text = exc.reply
            raise classify_reply(code, text, stage=exc.stage, provider=self.key) from exc
        except AddressError as exc:  # nothing was written
            reusable = True
            if exc.stage == "mail":
                raise ConfigurationError(f"sender: {exc}", provider=self.key) from None
            raise RecipientError(f"recipient: {exc}", provider=self.key) from None
        except (aiosmtplib.SMTPException, OSError) as exc:  # SessionLost, TimeoutError
            raise _classify_exception(exc, self.key, "data") from exc
        finally:
            conn.sent += 1
            await self._pool.release(conn, reusable=reusable)
        return SendResult(message_id, "250")

    async def probe(self) -> None:
        """Connect, EHLO, STARTTLS and AUTH (when a user is set), then QUIT. Sends no mail.

        Uses a slot of the pool, so a probe never exceeds `maxConnections`.
        """
        self._check_policy()
        conn = await self._pool.acquire(fresh=True)
        await self._pool.release(conn, reusable=False)

    async def close(self) -> None:
        """QUIT idle pooled connections. Safe to call twice."""
        await self._pool.close()
