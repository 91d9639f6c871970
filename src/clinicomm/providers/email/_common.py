"""What the email adapters share: the sender address, the body check, and HTTP calls whose
network failures are already classified.

Private to `providers/email` (the leading underscore keeps `registry.load_all` from importing it
as a provider module). HTTP adapters subclass `HttpEmailAdapter`, build a request, call `_call`
and classify the `HttpAnswer` they get back; transport failures never reach them raw.
"""

from __future__ import annotations

import json
import ssl
import time
from dataclasses import dataclass
from email.utils import formataddr, parseaddr
from typing import Any

import aiohttp
from multidict import CIMultiDictProxy

from clinicomm.providers.base import (
    AdapterContext,
    OutboundMessage,
    ProviderAdapter,
    ProviderCredentials,
)
from clinicomm.providers.errors import (
    ConfigurationError,
    ProviderDownError,
    TransientError,
    parse_retry_after,
)


@dataclass(frozen=True, slots=True)
class Sender:
    """The From of a message: a bare address and an optional display name."""

    email: str
    name: str | None = None

    def header(self) -> str:
        """`Name <addr>` (RFC 5322 quoted when needed), or the bare address without a name."""
        return formataddr((self.name, self.email)) if self.name else self.email


def resolve_sender(
    provider: str,
    message: OutboundMessage,
    *,
    email: str | None,
    name: str | None = None,
) -> Sender:
    """The provider's own sender when configured, else the clinic's defaultFrom/defaultFromName.

    `email` may itself be `Name <addr>` (SMTP's `from`); a name inside it wins over `name`.
    Raises ConfigurationError when neither the credentials nor the message carry an address.
    """
    if email:
        parsed_name, address = parseaddr(email)
        name = parsed_name or name or message.from_name
    else:
        parsed_name, address = parseaddr(message.from_email or "")
        name = parsed_name or message.from_name
    if not address or "@" not in address:
        raise ConfigurationError("no sender address configured", provider=provider)
    return Sender(address, name or None)


def require_body(provider: str, message: OutboundMessage) -> None:
    """Raise ConfigurationError when a message has neither text, HTML nor a template."""
    if not (message.text or message.html or message.template):
        raise ConfigurationError("message has no text, html or template", provider=provider)


@dataclass(frozen=True, slots=True)
class HttpAnswer:
    """A provider's HTTP answer, read in full."""

    status: int
    headers: CIMultiDictProxy[str]
    text: str

    def json(self) -> Any:
        """The body as JSON, or None when it is not JSON."""
        try:
            return json.loads(self.text) if self.text else None
        except ValueError:
            return None


def retry_after(headers: CIMultiDictProxy[str], *, now: float | None = None) -> float | None:
    """Seconds to wait from `Retry-After`, else from an epoch `X-RateLimit-Reset` (SendGrid)."""
    # https://www.twilio.com/docs/sendgrid/api-reference/how-to-use-the-sendgrid-v3-api/rate-limits
    delay = parse_retry_after(headers.get("Retry-After"), now=now)
    if delay is not None:
        return delay
    reset = headers.get("X-RateLimit-Reset")
    if reset:
        try:
            epoch = float(reset)
        except ValueError:
            return None
        current = time.time() if now is None else now
        return max(0.0, epoch - current)
    return None


class HttpEmailAdapter(ProviderAdapter):
    """Base of the HTTP email adapters: one shared aiohttp session, classified transport errors.

    Uses `context.http` when the process gives one; otherwise creates one session lazily and
    closes it in `close()`. Never a session per message.
    """

    def __init__(self, credentials: ProviderCredentials, context: AdapterContext) -> None:
        super().__init__(credentials, context)
        self._own_session: aiohttp.ClientSession | None = None
        self._ssl: ssl.SSLContext | bool = True
        if context.ca_file:
            self._ssl = ssl.create_default_context()
            self._ssl.load_verify_locations(cafile=context.ca_file)

    def _session(self) -> aiohttp.ClientSession:
        if self.context.http is not None:
            return self.context.http
        if self._own_session is None or self._own_session.closed:
            self._own_session = aiohttp.ClientSession()
        return self._own_session

    async def _call(
        self,
        method: str,
        url: str,
        *,
        headers: dict[str, str] | None = None,
        json_body: Any = None,
        data: Any = None,
    ) -> HttpAnswer:
        """Make one request and read the answer.

        Raises TransientError on a timeout or a dropped connection, ProviderDownError when the
        host cannot be reached; never an aiohttp exception.
        """
        timeout = aiohttp.ClientTimeout(total=self.context.timeout)
        try:
            async with self._session().request(
                method,
                url,
                headers=headers,
                json=json_body,
                data=data,
                timeout=timeout,
                ssl=self._ssl,
            ) as response:
                text = await response.text(errors="replace")
                return HttpAnswer(response.status, response.headers, text)
        except TimeoutError as exc:
            raise TransientError("provider timed out", provider=self.key) from exc
        except aiohttp.ClientConnectorError as exc:
            raise ProviderDownError(
                "provider unreachable", provider=self.key, detail=type(exc).__name__
            ) from exc
        except aiohttp.ClientError as exc:
            raise TransientError(
                "connection to provider failed", provider=self.key, detail=type(exc).__name__
            ) from exc

    async def close(self) -> None:
        """Close the session this adapter created (never the shared one). Safe to call twice."""
        if self._own_session is not None:
            await self._own_session.close()
            self._own_session = None
