"""What every webhook module shares: the request, the events, the errors, the context.

A provider module (`providers/webhooks/<provider>.py`) has two functions:

* `async verify(request, credentials, context) -> None` checks that the request comes from the
  provider, with the clinic's credentials; it raises `WebhookAuthError` (the endpoint answers
  401/403 and updates nothing) and never returns anything. It is async because SNS needs its
  signing certificate and Mailgun a shared seen-token store; both come from `context`.
* `parse(request) -> list[WebhookEvent]` is pure: it reads the body (JSON or form) and returns
  `DeliveryEvent`s (status of a message we sent) and `InboundMessage`s (a patient wrote to us).
  It never raises on unknown content: an unknown event type becomes `EventType.UNKNOWN` with
  the provider's item kept in `raw`. A body that is not the provider's format at all raises
  `WebhookPayloadError` (answer 400).

The endpoint `POST /api/v1/webhooks/{provider}/{clinicId}` is then: build a `WebhookRequest`,
load the clinic's credentials for `provider`, `await verify(...)`, `parse(...)`,
`delivery.ingest.store_events(session, clinic_id, events)`, commit, answer 2xx; then
`delivery.ingest.apply_stored`.
"""

from __future__ import annotations

import hmac
import json
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Protocol
from urllib.parse import parse_qsl, urlsplit

from multidict import CIMultiDict, CIMultiDictProxy

from clinicomm.providers.base import Channel
from clinicomm.providers.errors import redact
from clinicomm.providers.phone import normalize_e164

_E164 = re.compile(r"^\+[1-9][0-9]{6,14}$")


class WebhookAuthError(Exception):
    """The request is not proven to come from the provider (bad, missing or stale signature).

    The message says which check failed, never a secret or an expected signature value.
    """


class ForeignEventError(Exception):
    """The signature is valid, but the event belongs to another account than the clinic's own
    (Meta `phone_number_id`/WABA, Twilio `AccountSid`, Vonage `api_key`/application): two
    clinics sharing an app secret must not write each other's statuses and opt-outs. The
    endpoint answers as the provider needs (so it does not retry), applies nothing and counts
    it (`communication_webhook_foreign_total`)."""


class WebhookNotConfiguredError(WebhookAuthError):
    """The clinic has no webhook secret for this provider: every request is refused."""


class WebhookPayloadError(ValueError):
    """The body is not in the provider's webhook format (answer 400)."""


class WebhookUnsupportedError(WebhookPayloadError):
    """The request is the provider's, correctly signed, in a format we do not support
    (Mailgun's legacy form-encoded webhooks): answer 400 saying so, never 401."""


class CertificateUnavailableError(Exception):
    """A signing certificate (SNS `SigningCertURL`) could not be fetched: the answer is 503
    "SNS signing certificate unavailable" (the provider retries), never a 401 or a claim
    that the database is down. The message names no URL query or secret."""


class OptOut(StrEnum):
    """An opt-out (or its end) that a provider states outright in a status report, beyond
    what the event type implies (SendGrid `dropped` "Bounced Address", Postmark
    SubscriptionChange, Twilio 30005/30006...). `delivery.ingest` maps it to a suppression."""

    BOUNCE = "bounce"  # the address is known to bounce: never try it again
    COMPLAINT = "complaint"  # the recipient reported spam
    UNSUBSCRIBE = "unsubscribe"  # the recipient unsubscribed
    RESUBSCRIBE = "resubscribe"  # the recipient (or the provider) lifted an unsubscribe
    MARKETING_STOP = "marketing_stop"  # stop marketing only (Meta "Stop promotions")
    MARKETING_RESUME = "marketing_resume"  # marketing allowed again (Meta resume/signup)


class EventType(StrEnum):
    """What a provider says happened to a message we sent (one vocabulary for all)."""

    ACCEPTED = "accepted"  # the provider queued it (Twilio queued/accepted, SES Send, SG processed)
    SENT = "sent"  # handed to the carrier / network / WhatsApp (Meta sent, Vonage submitted)
    DELIVERED = "delivered"  # reached the handset or the recipient's mail server
    READ = "read"  # the recipient read it (WhatsApp blue ticks, Twilio/Vonage read)
    OPENED = "opened"  # an email open pixel fired (unreliable: privacy proxies prefetch)
    CLICKED = "clicked"  # the recipient clicked a tracked link
    DEFERRED = "deferred"  # temporary delivery problem; the provider retries by itself
    BOUNCED = "bounced"  # the mailbox provider refused it (see `bounce_permanent`)
    COMPLAINED = "complained"  # the recipient marked it as spam (feedback loop)
    UNSUBSCRIBED = "unsubscribed"  # the recipient used the provider's unsubscribe link
    FAILED = "failed"  # the provider could not deliver it (undeliverable, rejected, expired)
    UNKNOWN = "unknown"  # a provider value we do not map; `raw` keeps it for the record


@dataclass(frozen=True, slots=True)
class WebhookRequest:
    """One HTTP request as the endpoint received it.

    `url` is the full URL as the provider called it (scheme, host, port, path, query), which
    Twilio and MessageBird sign: behind a proxy, rebuild it from `X-Forwarded-Proto`/`Host`.
    `body` is the raw bytes, never re-serialized JSON. `form` holds the decoded pairs of an
    `application/x-www-form-urlencoded` body (in order, repeated names kept), `query` those of
    the URL. Build it with `WebhookRequest.build`.
    """

    url: str
    method: str
    headers: CIMultiDictProxy[str]
    body: bytes = b""
    form: tuple[tuple[str, str], ...] = ()
    query: tuple[tuple[str, str], ...] = ()

    @classmethod
    def build(
        cls,
        url: str,
        method: str = "POST",
        headers: Mapping[str, str] | Iterable[tuple[str, str]] = (),
        body: bytes = b"",
    ) -> WebhookRequest:
        """A request from its parts; `form` and `query` are decoded here."""
        items = headers.items() if isinstance(headers, Mapping) else headers
        hdrs: CIMultiDict[str] = CIMultiDict(items)
        form: tuple[tuple[str, str], ...] = ()
        content_type = hdrs.get("Content-Type", "").split(";")[0].strip().lower()
        if content_type == "application/x-www-form-urlencoded":
            form = tuple(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
        query = tuple(parse_qsl(urlsplit(url).query, keep_blank_values=True))
        return cls(url, method.upper(), CIMultiDictProxy(hdrs), body, form, query)

    def header(self, name: str) -> str | None:
        """A header's first value, whatever its case."""
        return self.headers.get(name)

    def json(self) -> Any:
        """The body as JSON; `WebhookPayloadError` when it is not."""
        try:
            return json.loads(self.body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise WebhookPayloadError("body is not JSON") from exc

    def form_dict(self) -> dict[str, str]:
        """Form fields, first value of each name."""
        out: dict[str, str] = {}
        for key, value in self.form:
            out.setdefault(key, value)
        return out


@dataclass(frozen=True, slots=True)
class DeliveryEvent:
    """A status report about one message we sent, to one recipient."""

    provider: str
    #: The provider's dedupe id for this report (stored with a unique constraint).
    event_id: str
    #: The id the provider gave when it took the message, in the form the adapter stored it.
    provider_message_id: str | None
    event_type: EventType
    occurred_at: datetime | None
    #: Canonical address (E.164 number or email address) when the report names it.
    recipient: str | None = None
    channel: Channel | None = None
    #: `{"code": ..., "reason": ...}`, reason truncated and redacted.
    error: dict[str, str] | None = None
    #: For bounces: True hard (never retry this address), False soft, None not said.
    bounce_permanent: bool | None = None
    #: An opt-out the provider states beyond the event type (see `OptOut`).
    opt_out: OptOut | None = None
    #: The provider's item, as received.
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class InboundMessage:
    """A message a patient sent to the clinic's number (STOP/START, the WhatsApp window)."""

    provider: str
    #: The provider's id of the inbound message (dedupe).
    event_id: str
    channel: Channel
    #: The patient's number, canonical E.164.
    sender: str
    #: The clinic's number or channel id, as the provider gave it.
    to: str | None
    text: str | None
    occurred_at: datetime | None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    #: The provider's own keyword decision (Twilio Advanced Opt-Out `OptOutType`), which
    #: wins over reading `text`: "stop", "start", or "none" for a keyword that changes
    #: nothing (HELP). None: decide from `text` (`keywords.classify_keyword`).
    keyword: str | None = None
    #: False for a preference change that is not a message (Meta `user_preferences`):
    #: it does not open the 24-hour window.
    opens_window: bool = True
    #: A marketing-only preference change (Meta `user_preferences`), applied instead of a
    #: keyword.
    opt_out: OptOut | None = None


WebhookEvent = DeliveryEvent | InboundMessage


class SeenTokenStore(Protocol):
    """Remembers one-time tokens (Mailgun's `token`) to refuse a replayed request."""

    async def add_if_new(self, key: str, ttl: float) -> bool:
        """Record `key` for `ttl` seconds; False when it was already recorded."""
        ...


class MemorySeenTokenStore:
    """A `SeenTokenStore` in this process's memory (one process; use Redis for several)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._seen: dict[str, float] = {}
        self._clock = clock

    async def add_if_new(self, key: str, ttl: float) -> bool:
        now = self._clock()
        if len(self._seen) > 10_000:
            self._seen = {k: exp for k, exp in self._seen.items() if exp > now}
        expires = self._seen.get(key)
        if expires is not None and expires > now:
            return False
        self._seen[key] = now + ttl
        return True


#: Fetches a PEM certificate by URL (the URL was checked before the call).
CertificateFetcher = Callable[[str], Awaitable[bytes]]

#: Process-wide default; an endpoint serving several processes passes a shared store.
DEFAULT_SEEN_TOKENS = MemorySeenTokenStore()


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(slots=True)
class WebhookContext:
    """What verification may need besides the credentials: a clock, stores, a fetcher."""

    now: Callable[[], datetime] = _utcnow
    #: Mailgun token reuse; the default lives in this process only.
    seen_tokens: SeenTokenStore = field(default_factory=lambda: DEFAULT_SEEN_TOKENS)
    #: Oldest accepted signed time, in seconds (Mailgun `timestamp`, SendGrid's timestamp
    #: header, Vonage `iat`, SNS `Timestamp`, MessageBird `nbf`):
    #: `CLINICOMM_WEBHOOK_MAX_AGE_SECONDS`.
    max_age: float = 300.0
    #: How far ahead of our clock a signed time may be (clock skew), in seconds.
    max_future: float = 60.0
    #: SendGrid's own window when it should differ from `max_age` (None: `max_age`).
    sendgrid_max_age: float | None = None
    #: Fetches SNS signing certificates; required for SES (see `ses.http_certificate_fetcher`).
    fetch_certificate: CertificateFetcher | None = None
    #: Trusted `SigningCertURL` prefixes beside `https://sns.<region>.amazonaws.com/`
    #: (`CLINICOMM_SNS_CERT_URL_PREFIXES`: LocalStack, an offline test server).
    sns_cert_url_prefixes: tuple[str, ...] = ()


def check_fresh(signed: datetime | None, ctx: WebhookContext, what: str) -> None:
    """Raise `WebhookAuthError` unless the signed time is at most `ctx.max_age` seconds old
    and at most `ctx.max_future` seconds ahead (a replayed or pre-dated request)."""
    if signed is None:
        raise WebhookAuthError(f"{what} is missing or unreadable")
    age = (ctx.now() - signed).total_seconds()
    if age > ctx.max_age:
        raise WebhookAuthError(f"{what} is older than {ctx.max_age:g} s (stale or replayed)")
    if age < -ctx.max_future:
        raise WebhookAuthError(f"{what} is more than {ctx.max_future:g} s in the future")


def constant_time_equal(a: str | bytes, b: str | bytes) -> bool:
    """Compare two secrets or signatures without leaking where they differ."""
    left = a.encode() if isinstance(a, str) else a
    right = b.encode() if isinstance(b, str) else b
    return hmac.compare_digest(left, right)


def from_unix(value: Any) -> datetime | None:
    """A Unix timestamp (int, float or numeric string) as an aware UTC datetime."""
    try:
        return datetime.fromtimestamp(float(value), UTC)
    except (TypeError, ValueError, OverflowError, OSError):
        return None


def from_iso(value: Any) -> datetime | None:
    """An ISO 8601 timestamp (`Z` or offset) as an aware datetime; None when unreadable."""
    if not isinstance(value, str) or not value:
        return None
    text = value.strip().replace("Z", "+00:00")
    # Postmark sends 7 fractional digits ("16:33:54.9070259Z"); Python takes at most 6.
    if "." in text:
        head, _, tail = text.partition(".")
        digits = "".join(ch for ch in tail if ch.isdigit())
        zone = tail[len(digits) :]
        text = f"{head}.{digits[:6]}{zone}"
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def phone_or_none(raw: Any) -> str | None:
    """A provider's phone (`+1…`, `1…`, `whatsapp:+1…`) as canonical E.164, or None."""
    if not isinstance(raw, str) or not raw:
        return None
    text = raw.split(":", 1)[1] if raw.startswith(("whatsapp:", "sms:")) else raw
    text = text.strip()
    if not text.startswith("+"):
        text = "+" + text
    try:
        return normalize_e164(text)
    except ValueError:
        # The provider delivered to (or heard from) this number, so it exists even when our
        # libphonenumber metadata calls it invalid (new ranges, test ranges): keep its digits.
        return text if _E164.match(text) else None


def email_or_none(raw: Any) -> str | None:
    """An email address as we store it (trimmed; domain lower-cased)."""
    if not isinstance(raw, str) or "@" not in raw:
        return None
    local, _, domain = raw.strip().rpartition("@")
    return f"{local}@{domain.lower()}"


def error_of(code: Any, reason: Any) -> dict[str, str] | None:
    """`{"code", "reason"}` with the reason truncated and redacted; None when both are empty."""
    out: dict[str, str] = {}
    if code not in (None, ""):
        out["code"] = str(code)
    if reason not in (None, ""):
        out["reason"] = redact(str(reason), 300) or ""
    return out or None


def require_secret(value: Any, name: str) -> str:
    """The secret's value, or `WebhookNotConfiguredError` naming the missing field."""
    secret = value.get_secret_value() if value is not None else ""
    if not secret:
        raise WebhookNotConfiguredError(f"{name} is not configured for this clinic")
    return str(secret)
