"""Amazon SES notifications delivered by an SNS HTTPS subscription.

* SNS signs each message: `SignatureVersion` 1 = RSA SHA1, 2 = RSA SHA256, over the canonical
  string of `Message, MessageId, Subject (if present), Timestamp, TopicArn, Type` for a
  Notification and `Message, MessageId, SubscribeURL, Timestamp, Token, TopicArn, Type` for
  (Un)SubscriptionConfirmation, each as `Name\\nvalue\\n`. The certificate comes from
  `SigningCertURL`, which must be HTTPS on `sns.<region>.amazonaws.com`; the `TopicArn` must
  be one of the clinic's `snsTopicArns`.
  https://docs.aws.amazon.com/sns/latest/dg/sns-verify-signature-of-message.html
* The SES notification is the JSON string in `Message`: `notificationType` (or `eventType`
  with event publishing) Bounce/Complaint/Delivery/…, `mail.messageId`, and per-recipient
  lists. One notification can name several recipients: one event each. `Reject` keeps
  `reject.reason` and `Rendering Failure` `failure.errorMessage` as the error reason.
  https://docs.aws.amazon.com/ses/latest/dg/notification-contents.html
* When a configuration set's SNS destination is added, SES publishes a Notification whose
  `Message` is the plain text "Successfully validated SNS topic for Amazon SES event
  publishing.": it is acknowledged (200) and changes nothing.
* Certificates: besides `https://sns.<region>.amazonaws.com/…pem`, the prefixes of
  `WebhookContext.sns_cert_url_prefixes` (`CLINICOMM_SNS_CERT_URL_PREFIXES`: LocalStack,
  tests) are trusted. A certificate that cannot be fetched raises
  `CertificateUnavailableError` (answer 503, SNS retries).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from clinicomm.providers.base import Channel
from clinicomm.providers.email.ses import SesCredentials
from clinicomm.providers.webhooks.base import (
    CertificateFetcher,
    CertificateUnavailableError,
    DeliveryEvent,
    EventType,
    WebhookAuthError,
    WebhookContext,
    WebhookEvent,
    WebhookNotConfiguredError,
    WebhookPayloadError,
    WebhookRequest,
    check_fresh,
    email_or_none,
    error_of,
    from_iso,
)

PROVIDER = "ses"
ALIASES = ("aws_ses",)
CREDENTIALS = SesCredentials
_CERT_HOST = re.compile(r"^sns\.[a-z0-9-]+\.amazonaws\.com(\.cn)?$")
_NOTIFICATION_KEYS = ("Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type")
_CONFIRMATION_KEYS = (
    "Message",
    "MessageId",
    "SubscribeURL",
    "Timestamp",
    "Token",
    "TopicArn",
    "Type",
)
_TYPES = ("Notification", "SubscriptionConfirmation", "UnsubscribeConfirmation")
#: The detail object of an event type whose key is not its name in camel case.
_DETAIL_KEYS = {"Rendering Failure": "failure", "DeliveryDelay": "deliveryDelay"}

EVENT_MAP = {
    "Send": EventType.ACCEPTED,
    "Delivery": EventType.DELIVERED,
    "DeliveryDelay": EventType.DEFERRED,
    "Bounce": EventType.BOUNCED,
    "Complaint": EventType.COMPLAINED,
    "Reject": EventType.FAILED,
    "Rendering Failure": EventType.FAILED,
    "Open": EventType.OPENED,
    "Click": EventType.CLICKED,
    "Subscription": EventType.UNSUBSCRIBED,
}


def string_to_sign(message: dict[str, Any]) -> bytes:
    """SNS's canonical string for a message (keys depend on its `Type`)."""
    keys = _NOTIFICATION_KEYS if message.get("Type") == "Notification" else _CONFIRMATION_KEYS
    return "".join(
        f"{key}\n{message[key]}\n" for key in keys if message.get(key) is not None
    ).encode()


def check_cert_url(url: str, prefixes: tuple[str, ...] = ()) -> None:
    """`WebhookAuthError` unless `url` is HTTPS on an SNS host (or starts with one of the
    trusted `prefixes`) and names a `.pem` file."""
    parts = urlsplit(url)
    trusted = any(p and url.startswith(p) and ".." not in url for p in prefixes)
    sns = parts.scheme == "https" and _CERT_HOST.match(parts.hostname or "") and not parts.port
    if not (sns or trusted):
        raise WebhookAuthError("SigningCertURL is not https on sns.<region>.amazonaws.com")
    if not parts.path.endswith(".pem"):
        raise WebhookAuthError("SigningCertURL does not name a .pem certificate")


def http_certificate_fetcher(
    session: aiohttp.ClientSession, timeout_seconds: float = 10.0
) -> CertificateFetcher:
    """A `CertificateFetcher` over the process's aiohttp session, caching each URL's PEM.

    Any failure to get the certificate (unreachable host, timeout, non-200 answer) raises
    `CertificateUnavailableError`: the message cannot be verified now, SNS retries."""
    cache: dict[str, bytes] = {}

    async def fetch(url: str) -> bytes:
        if url not in cache:
            timeout = aiohttp.ClientTimeout(total=timeout_seconds)
            try:
                async with session.get(url, timeout=timeout, allow_redirects=False) as resp:
                    if resp.status != 200:
                        raise CertificateUnavailableError(
                            f"certificate fetch answered {resp.status}"
                        )
                    cache[url] = await resp.read()
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                raise CertificateUnavailableError(
                    f"certificate fetch failed: {type(exc).__name__}"
                ) from exc
        return cache[url]

    return fetch


async def verify(
    request: WebhookRequest,
    credentials: SesCredentials,
    context: WebhookContext | None = None,
) -> None:
    """Raise `WebhookAuthError` unless topic, certificate URL and SNS signature all check."""
    if not credentials.sns_topic_arns:
        raise WebhookNotConfiguredError("snsTopicArns is not configured for this clinic")
    ctx = context or WebhookContext()
    if ctx.fetch_certificate is None:
        raise WebhookNotConfiguredError("no certificate fetcher in the webhook context")
    try:
        message = request.json()
    except WebhookPayloadError as exc:
        raise WebhookAuthError("body is not an SNS message") from exc
    if not isinstance(message, dict) or message.get("Type") not in _TYPES:
        raise WebhookAuthError("body is not an SNS message")
    if message.get("TopicArn") not in credentials.sns_topic_arns:
        raise WebhookAuthError("TopicArn is not one of this clinic's topics")
    cert_url = str(message.get("SigningCertURL") or message.get("SigningCertUrl") or "")
    check_cert_url(cert_url, ctx.sns_cert_url_prefixes)
    version = str(message.get("SignatureVersion") or "")
    algorithm: hashes.HashAlgorithm
    if version == "1":
        algorithm = hashes.SHA1()  # noqa: S303 - SNS SignatureVersion 1 is SHA1 by definition
    elif version == "2":
        algorithm = hashes.SHA256()
    else:
        raise WebhookAuthError("unknown SignatureVersion")
    try:
        signature = base64.b64decode(str(message.get("Signature") or ""), validate=True)
        certificate = x509.load_pem_x509_certificate(await ctx.fetch_certificate(cert_url))
    except (binascii.Error, ValueError) as exc:
        raise WebhookAuthError("unreadable signature or certificate") from exc
    key = certificate.public_key()
    if not isinstance(key, rsa.RSAPublicKey):
        raise WebhookAuthError("SNS certificates carry RSA keys")
    try:
        key.verify(signature, string_to_sign(message), padding.PKCS1v15(), algorithm)
    except InvalidSignature as exc:
        raise WebhookAuthError("SNS signature does not match") from exc
    check_fresh(from_iso(message.get("Timestamp")), ctx, "SNS Timestamp")


def subscribe_url(request: WebhookRequest) -> str | None:
    """For a verified `SubscriptionConfirmation`, the URL to GET to confirm; else None."""
    message = request.json()
    if not isinstance(message, dict) or message.get("Type") != "SubscriptionConfirmation":
        return None
    url = str(message.get("SubscribeURL") or "")
    parts = urlsplit(url)
    if parts.scheme != "https" or not _CERT_HOST.match(parts.hostname or ""):
        raise WebhookAuthError("SubscribeURL is not https on an SNS host")
    return url


def parse(request: WebhookRequest) -> list[WebhookEvent]:
    """One event per recipient named in the SES notification; none for confirmations."""
    envelope = request.json()
    if not isinstance(envelope, dict) or envelope.get("Type") not in _TYPES:
        raise WebhookPayloadError("not an SNS message")
    if envelope["Type"] != "Notification":
        return []
    text = envelope.get("Message")
    if isinstance(text, str) and not text.lstrip().startswith(("{", "[")):
        # SES's topic validation ("Successfully validated SNS topic for Amazon SES event
        # publishing.") and other plain-text notices: nothing to apply.
        return []
    try:
        note = json.loads(text or "")
    except ValueError as exc:
        raise WebhookPayloadError("SNS Message is not an SES notification") from exc
    if not isinstance(note, dict):
        raise WebhookPayloadError("SNS Message is not an SES notification")
    return _events(str(envelope.get("MessageId") or ""), note)


def _events(sns_id: str, note: dict[str, Any]) -> list[WebhookEvent]:
    name = str(note.get("notificationType") or note.get("eventType") or "")
    kind = EVENT_MAP.get(name, EventType.UNKNOWN)
    mail = note.get("mail") or {}
    message_id = mail.get("messageId")
    detail = note.get(_DETAIL_KEYS.get(name, name[:1].lower() + name[1:].replace(" ", ""))) or {}
    permanent: bool | None = None
    rows: list[tuple[str | None, dict[str, str] | None]] = []
    when = detail.get("timestamp") or mail.get("timestamp")
    if name == "Bounce":
        bounce_type = detail.get("bounceType")
        permanent = {"Permanent": True, "Transient": False}.get(str(bounce_type))
        for r in detail.get("bouncedRecipients") or []:
            reason = r.get("diagnosticCode") or detail.get("bounceSubType")
            rows.append((r.get("emailAddress"), error_of(r.get("status"), reason)))
    elif name == "Complaint":
        rows = [(r.get("emailAddress"), None) for r in detail.get("complainedRecipients") or []]
    elif name == "Delivery":
        rows = [(r, None) for r in detail.get("recipients") or []]
    failure: dict[str, str] | None = None
    if name == "Reject":
        failure = error_of(None, detail.get("reason"))
    elif name == "Rendering Failure":
        failure = error_of(None, detail.get("errorMessage"))
    if not rows:
        rows = [(r, failure) for r in mail.get("destination") or []] or [(None, failure)]
    events: list[WebhookEvent] = []
    for address, error in rows:
        recipient = email_or_none(address)
        events.append(
            DeliveryEvent(
                provider=PROVIDER,
                # One SNS message can cover several recipients: the id names the recipient.
                event_id=f"{sns_id}:{recipient}" if len(rows) > 1 else sns_id,
                provider_message_id=message_id,
                event_type=kind,
                occurred_at=from_iso(when),
                recipient=recipient,
                channel=Channel.EMAIL,
                error=error,
                bounce_permanent=permanent,
                raw=note,
            )
        )
    return events
