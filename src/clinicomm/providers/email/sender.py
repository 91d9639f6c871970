"""What the email adapters share besides the HTTP seam: the sender address and the body check.

HTTP email adapters subclass `providers.shared.http.HttpAdapter` like every HTTP adapter; this
module holds only the email rules: the From is the provider's configured sender, else the
clinic's `defaultFrom`/`defaultFromName`, as `Name <addr>` or a bare address. SMTP uses it too.
"""

from __future__ import annotations

from dataclasses import dataclass
from email.utils import formataddr, parseaddr
from functools import lru_cache

from clinicomm.providers.base import OutboundMessage
from clinicomm.providers.errors import ConfigurationError


@dataclass(frozen=True, slots=True)
class Sender:
    """The From of a message: a bare address and an optional display name."""

    email: str
    name: str | None = None

    def header(self) -> str:
        """`Name <addr>` (RFC 5322 quoted when needed), or the bare address without a name."""
        return _formatted(self.name, self.email) if self.name else self.email


# Senders are the clinics' configured From addresses (never patients'), few per process and
# the same on every message: parsed and formatted once each (parseaddr alone was ~20 µs, a
# tenth of an SMTP send's CPU).
@lru_cache(maxsize=4096)
def _parsed(value: str) -> tuple[str, str]:
    return parseaddr(value)


@lru_cache(maxsize=4096)
def _formatted(name: str, email: str) -> str:
    return formataddr((name, email))


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
        parsed_name, address = _parsed(email)
        name = parsed_name or name or message.from_name
    else:
        parsed_name, address = _parsed(message.from_email or "")
        name = parsed_name or message.from_name
    if not address or "@" not in address:
        raise ConfigurationError("no sender address configured", provider=provider)
    return Sender(address, name or None)


def require_body(provider: str, message: OutboundMessage) -> None:
    """Raise ConfigurationError when a message has neither text, HTML nor a template."""
    if not (message.text or message.html or message.template):
        raise ConfigurationError("message has no text, html or template", provider=provider)
