"""The one exception tree for provider failures.

Every adapter translates what its provider answers (HTTP status, provider error code, SMTP
reply, network failure) into exactly one of these classes, at one boundary: the adapter. The
delivery worker decides what to do from the class alone:

    ProviderError
    ├── TransientError          retry later on the *same* provider (backoff, Retry-After)
    │   └── RateLimitedError    provider said "slow down"; not a health failure
    │       └── RecipientRateLimitedError   only this recipient must wait (WA 131056)
    ├── ProviderDownError       try the next provider now (5xx storm, quota exhausted, unreachable)
    ├── ConfigurationError      credentials/sender wrong: trip the breaker, alert, fail over
    ├── RecipientError          this address can't receive on this channel: fail, no failover
    ├── ContentError            the message itself cannot be built or sent: fail, no failover
    └── ComplianceError         opt-out, 24-hour window, template required: never routed around

Each error carries the provider key, the HTTP/SMTP status, the provider's own error code and a
truncated, redacted excerpt of the response (`detail`); never a credential, never a body we sent.
"""

from __future__ import annotations

import ipaddress
import re
from enum import StrEnum

_MAX_DETAIL = 200
# Things that look like an email address or a phone number are masked in error details:
# a provider may echo the recipient back, and details end up in logs and API answers.
_EMAIL_RE = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")
_PHONE_RE = re.compile(r"\+?\d[\d\s().-]{6,}\d")
# URLs and IP addresses (v4 and v6) in a detail would tell a caller about hosts it cannot see.
_URL_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://\S+")
_IPV4_RE = re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}\b")
_IPV6_RE = re.compile(r"[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}")


def _mask_ipv6(match: re.Match[str]) -> str:
    try:
        ipaddress.IPv6Address(match.group(0))
    except ValueError:
        return match.group(0)  # "12:30:45" is a time, not an address
    return "<address>"


#: An SMTP reply code and enhanced status code ("550 5.1.1", "5.7.1", "421-4.7.0"): never a
#: phone number, and the most useful part of a bounce reason.
_SMTP_RE = re.compile(r"\b[245]\d\d[ -][245]\.\d{1,3}\.\d{1,3}\b|\b[245]\.\d{1,3}\.\d{1,3}\b")
#: A phone number has at least this many digits (E.164 national numbers are 7 to 15).
_PHONE_MIN_DIGITS = 7


def _mask_phone(match: re.Match[str]) -> str:
    text = match.group(0)
    if sum(ch.isdigit() for ch in text) < _PHONE_MIN_DIGITS:
        return text
    return "<phone>"


def _mask_phones(text: str) -> str:
    """Mask phone-like runs, leaving SMTP codes ("550 5.1.1") as they are."""
    out: list[str] = []
    last = 0
    for code in _SMTP_RE.finditer(text):
        out.append(_PHONE_RE.sub(_mask_phone, text[last : code.start()]))
        out.append(code.group(0))
        last = code.end()
    out.append(_PHONE_RE.sub(_mask_phone, text[last:]))
    return "".join(out)


class ErrorClass(StrEnum):
    """What the worker does about a failure; stored on every delivery attempt."""

    TRANSIENT = "transient"  # retry the same provider after a backoff
    RATE_LIMITED = "rate_limited"  # retry the same provider after Retry-After; not a health failure
    RECIPIENT_RATE_LIMITED = "recipient_rate_limited"  # delay only this recipient
    PROVIDER_DOWN = "provider_down"  # fail over to the next provider now
    CONFIGURATION = "configuration"  # bad credentials or sender: fail over and alert
    RECIPIENT = "recipient"  # permanent for this address: fail, no failover
    CONTENT = "content"  # the message is malformed (a header it cannot carry): fail, no failover
    COMPLIANCE = "compliance"  # opt-out / window: fail, never routed around


def redact(text: str | None, limit: int = _MAX_DETAIL) -> str | None:
    """Cut a provider's error text to `limit` (200) characters and mask anything that looks
    like an email address, a phone number, a URL or an IP address; control characters
    become spaces (a detail is one line)."""
    if text is None:
        return None
    text = _URL_RE.sub("<url>", text)
    text = _EMAIL_RE.sub("<email>", text)
    text = _IPV4_RE.sub("<address>", text)
    text = _IPV6_RE.sub(_mask_ipv6, text)
    text = _mask_phones(text)
    text = "".join(" " if (ord(c) < 32 or 127 <= ord(c) < 160) else c for c in text)
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text


class ProviderError(Exception):
    """Base of every classified provider failure."""

    error_class: ErrorClass = ErrorClass.TRANSIENT
    #: Whether this failure lowers the provider's health (rate limits do not).
    counts_for_health: bool = True

    def __init__(
        self,
        message: str,
        *,
        provider: str = "",
        status_code: int | None = None,
        code: str | None = None,
        detail: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.provider = provider
        self.status_code = status_code
        self.code = code
        self.detail = redact(detail)

    def to_dict(self) -> dict[str, object]:
        """A JSON-safe summary for attempt rows and API answers (already redacted)."""
        return {
            "class": self.error_class.value,
            "provider": self.provider,
            "message": self.message,
            "statusCode": self.status_code,
            "code": self.code,
            "detail": self.detail,
        }

    def __str__(self) -> str:
        parts = [self.message]
        if self.provider:
            parts.append(f"provider={self.provider}")
        if self.status_code is not None:
            parts.append(f"status={self.status_code}")
        if self.code:
            parts.append(f"code={self.code}")
        return " ".join(parts)


class TransientError(ProviderError):
    """Retry later on the same provider; `retry_after` (seconds) when the provider said so."""

    error_class = ErrorClass.TRANSIENT

    def __init__(self, message: str, *, retry_after: float | None = None, **kw: object) -> None:
        super().__init__(message, **kw)  # type: ignore[arg-type]
        self.retry_after = retry_after


class RateLimitedError(TransientError):
    """The provider asked us to slow down (429, 20429, 130429, Throttling, SMTP 454)."""

    error_class = ErrorClass.RATE_LIMITED
    counts_for_health = False


class RecipientRateLimitedError(RateLimitedError):
    """Only this recipient must wait (WhatsApp pair rate limit 131056); others keep flowing."""

    error_class = ErrorClass.RECIPIENT_RATE_LIMITED


class ProviderDownError(ProviderError):
    """Provider unreachable, failing or out of quota: try the next provider in the chain now."""

    error_class = ErrorClass.PROVIDER_DOWN


class ConfigurationError(ProviderError):
    """Credentials, sender or template setup is wrong for this clinic: fail over and alert."""

    error_class = ErrorClass.CONFIGURATION


class RecipientError(ProviderError):
    """This address cannot receive on this channel: fail the delivery, no failover."""

    error_class = ErrorClass.RECIPIENT
    counts_for_health = False


class ContentError(ProviderError):
    """The message cannot be built or sent as given (a header value the email package
    refuses, text that cannot be encoded): fail the delivery, no failover, no health count.
    Another provider would refuse it too, and it says nothing about the provider."""

    error_class = ErrorClass.CONTENT
    counts_for_health = False


class ComplianceError(ProviderError):
    """Opt-out, 24-hour window or missing template: fail, never retried or routed around."""

    error_class = ErrorClass.COMPLIANCE
    counts_for_health = False


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a `Retry-After` header (delay-seconds or HTTP-date, RFC 9110)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    import time
    from email.utils import parsedate_to_datetime

    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)
