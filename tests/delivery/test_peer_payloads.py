"""Every real webhook payload other projects captured from providers → what it must change.

The payloads are in `tests/fixtures/webhooks/peer/` (sources and licences in
`tests/fixtures/webhooks/README.md`): django-anymail's SendGrid, Mailgun, Postmark and SES test
payloads, pywa's Meta WhatsApp updates, Vonage's .NET SDK WhatsApp inbound messages. Each row
of `CASES` is one payload: the deliveries it refers to (each starts `sent`), the status each
must end in, the exact set of suppressions the clinic has afterwards (and those it had
before), and whose WhatsApp window it opened. The comment of each row is the meaning the
provider's documentation gives the event. The rows run through the real `parse` of the
provider module, `ingest.store_events` and `ingest.apply_stored`, on SQLite and PostgreSQL.

Not usable: anymail's `MailgunLegacyTestCase` entries (12) are placeholders
(`<unevaluable name 'mailgun_sign_legacy_payload' …>`): the bodies are built at run time by
anymail's signing helper. A legacy form body is tested through the endpoint instead
(`tests/api/test_provider_fidelity.py`: a signed one is a 400 "unsupported").
Rows marked `derived` change one documented field of a captured payload to cover a meaning
the captures lack (Postmark `Transient`, Meta `stop`, SES topic validation), each cited.
"""

from __future__ import annotations

import copy
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from clinicomm.delivery.ingest import apply_stored, store_events
from clinicomm.delivery.suppressions import MARKETING_SCOPE, SuppressionReason, suppress
from clinicomm.providers.webhooks import (
    HANDLERS,
    WebhookEvent,
    WebhookRequest,
)
from clinicomm.store.db import Database
from clinicomm.store.models import Delivery, InboundContact, Message, Suppression

PEER = Path(__file__).resolve().parent.parent / "fixtures" / "webhooks" / "peer"
ANYMAIL: dict[str, Any] = json.loads((PEER / "anymail-esp-webhooks.json").read_text())
CLINIC = "clinic-peer"
T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
URL = "https://clinicomm.test/api/v1/webhooks/x/clinic-peer"


def anymail(file: str, test: str, name: str) -> Any:
    return copy.deepcopy(ANYMAIL[f"test_{file}_webhooks.py"][test][name])


def pywa(file: str, key: str) -> Any:
    return json.loads((PEER / "pywa" / f"{file}.json").read_text())[key]


def vonage(name: str) -> Any:
    return json.loads((PEER / "vonage" / f"{name}.json").read_text())


def as_json(data: Any) -> Callable[[], WebhookRequest]:
    body = json.dumps(data).encode()
    return lambda: WebhookRequest.build(URL, "POST", {"Content-Type": "application/json"}, body)


def sns(note: Any) -> Callable[[], WebhookRequest]:
    """An SES event in the SNS envelope SES publishes it in (text `Message`)."""
    message = note if isinstance(note, str) else json.dumps(note)
    return as_json({"Type": "Notification", "MessageId": "19ba9823-d7f2-53c1-860e-cb10e0d13dfc",
                    "TopicArn": "arn:aws:sns:us-east-1:1234567890:SES_Events",
                    "Message": message, "Timestamp": "2018-03-26T17:58:59.675Z"})


SUP = tuple[str, str, str]  # (channel, address, reason)


@dataclass
class Case:
    id: str
    provider: str
    request: Callable[[], WebhookRequest]
    #: (provider message id, channel, address) of each delivery the payload refers to.
    deliveries: list[tuple[str, str, str]] = field(default_factory=list)
    #: address → status it must end in (every other delivery stays `sent`).
    statuses: dict[str, str] = field(default_factory=dict)
    #: The clinic's suppressions afterwards, exactly.
    suppressed: set[SUP] = field(default_factory=set)
    #: Suppressions that exist before the payload arrives.
    before: set[SUP] = field(default_factory=set)
    #: Addresses whose WhatsApp window the payload opened.
    window: set[str] = field(default_factory=set)
    #: A substring the delivery's error reason must keep.
    reason: str | None = None


E = "email"
WA = "whatsapp"
WRF = "wrfRRvF7Q0GgwUo2CvDmEA"
SES_BOUNCE_ID = "00000138111222aa-33322211-cccc-cccc-cccc-ddddaaaa0680-000000"
SES_EVT_ID = "7c191be45-e9aedb9a-02f9-4d12-a87d-dd0099a07f8a-000000"
THREE = ["jane@example.com", "mary@example.com", "richard@example.com"]
PATIENT_WA = "+972987654321"
WAMID = "wamid.xyzxyz"


def _sg(test: str) -> Callable[[], WebhookRequest]:
    return as_json(anymail("sendgrid", f"SendGridDeliveryTestCase.{test}", "raw_events"))


def _mg(test: str) -> Callable[[], WebhookRequest]:
    return as_json(anymail("mailgun", f"MailgunTestCase.{test}", "raw_event"))


def _pm(test: str) -> Callable[[], WebhookRequest]:
    return as_json(anymail("postmark", f"PostmarkDeliveryTestCase.{test}", "raw_event"))


def _ses(test: str, name: str) -> Callable[[], WebhookRequest]:
    item = anymail("amazon_ses", f"AmazonSESNotificationsTests.{test}", name)
    return as_json(item) if name == "raw_sns_message" else sns(item)


def _meta(file: str, key: str, change: Callable[[Any], None] | None = None) -> Callable[[], WebhookRequest]:
    data = pywa(file, key)
    if change is not None:
        change(data)
    return as_json(data)


SG = "sendgrid"
CASES: list[Case] = [
    # ---- SendGrid Event Webhook (twilio.com/docs/sendgrid/for-developers/tracking-events/event)
    # processed: "Message has been received and is ready to be delivered": no status change.
    Case("sg-processed", SG, _sg("test_processed_event"), [(WRF, E, "recipient@example.com")]),
    # delivered: "accepted by the receiving server".
    Case("sg-delivered", SG, _sg("test_delivered_event"), [(WRF, E, "recipient@example.com")],
         {"recipient@example.com": "delivered"}),
    # dropped "Invalid": SendGrid will not send it (invalid address): failed, no opt-out.
    Case("sg-dropped-invalid", SG, _sg("test_dropped_invalid_event"),
         [(WRF, E, "invalid@invalid")], {"invalid@invalid": "failed"}),
    # dropped "Bounced Address": on SendGrid's bounce list: failed, and the address bounces.
    Case("sg-dropped-bounced", SG, _sg("test_dropped_bounced"),
         [("14c5d75ce93.dfd.64b469", E, "example@example.com")], {"example@example.com": "failed"},
         {(E, "example@example.com", "bounce")}),
    # dropped "Unsubscribed Address": on the unsubscribe list: failed + unsubscribe.
    Case("sg-dropped-unsubscribed", SG, _sg("test_dropped_unsubscribed_event"),
         [(WRF, E, "unsubscribe@example.com")], {"unsubscribe@example.com": "failed"},
         {(E, "unsubscribe@example.com", "unsubscribe")}),
    # bounce type=bounce: "Receiving server could not or would not accept mail" (hard).
    Case("sg-bounce", SG, _sg("test_bounce_event"),
         [("Lli-03HcQ5-JLybO9fXsJg", E, "noreply@example.com")],
         {"noreply@example.com": "bounced"}, {(E, "noreply@example.com", "bounce")},
         reason="550 5.1.1"),
    # deferred: "temporarily rejected"; SendGrid retries: no change.
    Case("sg-deferred", SG, _sg("test_deferred_event"),
         [("u9Gvi3mzT6iC2poAb58_qQ", E, "recipient@example.com")]),
    # open / click: the recipient opened / clicked (implies delivered).
    Case("sg-open", SG, _sg("test_open_event"), [(WRF, E, "recipient@example.com")],
         {"recipient@example.com": "read"}),
    Case("sg-click", SG, _sg("test_click_event"),
         [("_fjPjuJfRW-IPs5SuvYotg", E, "recipient@example.com")],
         {"recipient@example.com": "read"}),
    # delivered with a custom Message-ID in smtp-id: the sg_message_id prefix is the id.
    Case("sg-delivered-custom-smtp-id", SG, _sg("test_compatibility_message_id_from_smtp_id"),
         [(WRF, E, "recipient@example.com")], {"recipient@example.com": "delivered"}),
    # ---- Mailgun webhooks (documentation.mailgun.com … /webhooks, /events)
    # delivered: accepted by the recipient's server.
    Case("mg-delivered", "mailgun", _mg("test_delivered_event"),
         [("<20180812211713.1.DF5966851B4BAA99@example.org>", E, "recipient@example.com")],
         {"recipient@example.com": "delivered"}),
    # failed, severity permanent, reason bounce: a hard bounce, Mailgun suppresses it.
    Case("mg-failed-permanent", "mailgun", _mg("test_failed_permanent_event"),
         [("<20180812214658.1.0DF563D0B3597700@example.org>", E, "invalid@example.com")],
         {"invalid@example.com": "bounced"}, {(E, "invalid@example.com", "bounce")},
         reason="5.1.1"),
    # failed, severity temporary: Mailgun retries ("No MX" / greylisted): no change.
    Case("mg-failed-temporary", "mailgun", _mg("test_failed_temporary_event"),
         [("<20180812214638.1.4A7D468E9BC18C5D@example.org>", E, "undeliverable@nomx.example.com")]),
    Case("mg-failed-greylisted", "mailgun", _mg("test_failed_greylisted_event"),
         [("<20180812214638.1.4A7D468E9BC18C5D@example.org>", E, "undeliverable@mx.example.com")]),
    # rejected: "Mailgun rejected the request to send/forward the message": failed.
    Case("mg-rejected", "mailgun", _mg("test_rejected_event"),
         [("<20180622220256.1.B31A451A2E5422BB@sandbox55887.mailgun.org>", E,
           "recipient@example.org")],
         {"recipient@example.org": "failed"}, reason="Sandbox subdomains"),
    # complained: the recipient reported spam: complaint (delivery status unchanged).
    Case("mg-complained", "mailgun", _mg("test_complained_event"),
         [("<20130718032413.263EE2E0926@example.org>", E, "recipient@example.com")],
         suppressed={(E, "recipient@example.com", "complaint")}),
    # unsubscribed: the recipient clicked the unsubscribe link.
    Case("mg-unsubscribed", "mailgun", _mg("test_unsubscribed_event"),
         [("<20130822232216.13966.79700@samples.mailgun.org>", E, "recipient@example.com")],
         suppressed={(E, "recipient@example.com", "unsubscribe")}),
    # opened: the recipient opened it.
    Case("mg-opened", "mailgun", _mg("test_opened_event"),
         [("<20180812213139.1.BC6694A917BB7E6A@example.org>", E, "recipient@example.com")],
         {"recipient@example.com": "read"}),
    # clicked without message headers: no message id to match: nothing changes.
    Case("mg-clicked-no-message", "mailgun", _mg("test_clicked_event")),
    # accepted with delivery-status null: Mailgun queued it: nothing changes.
    Case("mg-accepted-null-status", "mailgun", _mg("test_delivery_status_is_none_event")),
    # ---- Postmark (postmarkapp.com/developer/webhooks/*, /api/bounce-api#bounce-types)
    # Bounce HardBounce (1), Inactive: the address is deactivated: bounced + bounce.
    Case("pm-hard-bounce", "postmark", _pm("test_bounce_event"),
         [("2706ee8a-737c-4285-b032-ccd317af53ed", E, "bounce@example.com")],
         {"bounce@example.com": "bounced"}, {(E, "bounce@example.com", "bounce")},
         reason="550 5.1.1"),
    Case("pm-delivered", "postmark", _pm("test_delivered_event"),
         [("883953f4-6105-42a2-a16a-77a8eac79483", E, "recipient@example.com")],
         {"recipient@example.com": "delivered"}),
    Case("pm-open", "postmark", _pm("test_open_event"),
         [("f4830d10-9c35-4f0c-bca3-3d9b459821f8", E, "recipient@example.com")],
         {"recipient@example.com": "read"}),
    Case("pm-click", "postmark", _pm("test_click_event"),
         [("f4830d10-9c35-4f0c-bca3-3d9b459821f8", E, "recipient@example.com")],
         {"recipient@example.com": "read"}),
    # SpamComplaint: the recipient marked it as spam: complaint.
    Case("pm-spam", "postmark", _pm("test_spam_event"),
         [("2706ee8a-737c-4285-b032-ccd317af53ed", E, "spam@example.com")],
         suppressed={(E, "spam@example.com", "complaint")}),
    # SubscriptionChange SuppressSending true, ManualSuppression: unsubscribed.
    Case("pm-unsubscribe", "postmark", _pm("test_unsubscribe"),
         [("a4909a96-73d7-4c49-b148-a54522d3f7ac", E, "john@example.com")],
         suppressed={(E, "john@example.com", "unsubscribe")}),
    # SubscriptionChange SuppressSending false: reactivated: the unsubscribe is lifted.
    Case("pm-resubscribe", "postmark", _pm("test_resubscribe"),
         [("a4909a96-73d7-4c49-b148-a54522d3f7ac", E, "john@example.com")],
         before={(E, "john@example.com", "unsubscribe")}),
    # SubscriptionChange SuppressionReason HardBounce: a bounce, not an unsubscribe.
    Case("pm-subscription-hard-bounce", "postmark", _pm("test_subscription_change_bounce"),
         [("b4cb783d-78ed-43f2-983b-63f55c712dc8", E, "john@example.com")],
         suppressed={(E, "john@example.com", "bounce")}),
    # Bounce Type Unsubscribe (16) "Unsubscribe or Remove request": an unsubscribe (the
    # payload names no address: the delivery's is used); not a bounce.
    Case("pm-bounce-unsubscribe", "postmark", _pm("test_bounce_unsubscribe_variant"),
         [("5555555-5555555-5555-5555555", E, "patient@example.com")],
         suppressed={(E, "patient@example.com", "unsubscribe")}),
    # ---- Amazon SES via SNS (docs.aws.amazon.com/ses/latest/dg/notification-contents.html)
    *[
        c
        for name in ("raw_ses_event", "raw_sns_message")
        for c in (
            # Bounce Permanent: jane bounced (hard); mary and richard are not named.
            Case(f"ses-bounce-{name}", "ses", _ses("test_bounce_event", name),
                 [(SES_BOUNCE_ID, E, a) for a in THREE], {"jane@example.com": "bounced"},
                 {(E, "jane@example.com", "bounce")}, reason="5.1.1"),
            Case(f"ses-multiple-bounce-{name}", "ses", _ses("test_multiple_bounce_event", name),
                 [("00000137860315fd-34208509-5b74-41f3-95c5-22c1edc3c924-000000", E, a)
                  for a in THREE],
                 {"jane@example.com": "bounced", "richard@example.com": "bounced"},
                 {(E, "jane@example.com", "bounce"), (E, "richard@example.com", "bounce")}),
            # Complaint: richard complained (abuse).
            Case(f"ses-complaint-{name}", "ses", _ses("test_complaint_event", name),
                 [("000001378603177f-7a5433e7-8edb-42ae-af10-f0181f34d6ee-000000", E, a)
                  for a in THREE],
                 suppressed={(E, "richard@example.com", "complaint")}),
            # Delivery: to jane only.
            Case(f"ses-delivery-{name}", "ses", _ses("test_delivery_event", name),
                 [("0000014644fe5ef6-9a483358-9170-4cb4-a269-f5dcdf415321-000000", E, a)
                  for a in THREE], {"jane@example.com": "delivered"}),
            # Send: SES accepted the request: no change.
            Case(f"ses-send-{name}", "ses", _ses("test_send_event", name),
                 [(SES_EVT_ID, E, "recipient@example.com")]),
            # Reject: "SES accepted the email but determined that it contained a virus":
            # failed, with SES's reason.
            Case(f"ses-reject-{name}", "ses", _ses("test_reject_event", name),
                 [(SES_EVT_ID, E, "recipient@example.com")], {"recipient@example.com": "failed"},
                 reason="Bad content"),
            Case(f"ses-open-{name}", "ses", _ses("test_open_event", name),
                 [(SES_EVT_ID, E, "recipient@example.com")], {"recipient@example.com": "read"}),
            Case(f"ses-click-{name}", "ses", _ses("test_click_event", name),
                 [(SES_EVT_ID, E, "recipient@example.com")], {"recipient@example.com": "read"}),
            # Rendering Failure: the template could not be rendered: failed, with the message.
            Case(f"ses-rendering-failure-{name}", "ses", _ses("test_rendering_failure_event", name),
                 [("c191be45-e9aedb9a-02f9-4d12-a87d-dd0099a07f8a-000000", E,
                   "recipient@example.com")],
                 {"recipient@example.com": "failed"}, reason="attributeName"),
        )
    ],
    # A receipt notification (inbound mail) on the wrong topic: nothing to apply.
    Case("ses-received-wrong-topic", "ses",
         _ses("test_incorrect_received_event", "raw_sns_message")),
    # derived: SES's topic validation message (plain text Message, AWS "Set up an Amazon SNS
    # event destination"): acknowledged, nothing changes.
    Case("ses-topic-validated", "ses",
         sns("Successfully validated SNS topic for Amazon SES event publishing.")),
    # derived: Postmark Transient (2, "message delayed"): not final.
    Case("pm-transient", "postmark",
         as_json({**anymail("postmark", "PostmarkDeliveryTestCase.test_bounce_event", "raw_event"),
                  "Type": "Transient", "TypeCode": 2, "Inactive": False}),
         [("2706ee8a-737c-4285-b032-ccd317af53ed", E, "bounce@example.com")]),
    # ---- Meta WhatsApp Cloud API (developers.facebook.com … webhooks/reference/messages)
    Case("wa-status-sent", "meta_business", _meta("message_status", "sent"),
         [(WAMID, WA, PATIENT_WA)]),
    Case("wa-status-delivered", "meta_business", _meta("message_status", "delivered"),
         [(WAMID, WA, PATIENT_WA)], {PATIENT_WA: "delivered"}),
    Case("wa-status-read", "meta_business", _meta("message_status", "read"),
         [(WAMID, WA, PATIENT_WA)], {PATIENT_WA: "read"}),
    # played: a voice message was played (implies read).
    Case("wa-status-played", "meta_business", _meta("message_status", "played"),
         [(WAMID, WA, PATIENT_WA)], {PATIENT_WA: "read"}),
    # failed 130472 "User's number is part of an experiment": failed, the number is fine.
    Case("wa-status-failed-130472", "meta_business", _meta("message_status", "failed"),
         [(WAMID, WA, PATIENT_WA)], {PATIENT_WA: "failed"}, reason="experiment"),
    Case("wa-status-with-tracker", "meta_business", _meta("message_status", "with_tracker"),
         [(WAMID, WA, PATIENT_WA)]),
    # A group message read: matched by id; the group id is no phone number.
    Case("wa-status-group", "meta_business", _meta("message_status", "group"),
         [("<WHATSAPP_MESSAGE_ID>", WA, "+15550001111")], {"+15550001111": "read"}),
    # Every inbound message ("When a WhatsApp user messages you … a customer service window
    # starts") opens the window; none of these says STOP.
    *[
        Case(f"wa-inbound-{key}", "meta_business", _meta("message", key), window={PATIENT_WA})
        for key in json.loads((PEER / "pywa" / "message.json").read_text())
    ],
    *[
        Case(f"wa-inbound-{file}-{key}", "meta_business", _meta(file, key), window={PATIENT_WA})
        for file in ("callback_button", "callback_selection")
        for key in json.loads((PEER / "pywa" / f"{file}.json").read_text())
    ],
    # user_preferences marketing "resume" / "signup": marketing allowed again; not a
    # message, so no window.
    *[
        Case(f"wa-marketing-{key}", "meta_business", _meta("user_marketing_preferences", key),
             before={(MARKETING_SCOPE, "+16505551234", "marketing")})
        for key in ("resume", "signup")
    ],
    # derived: value "stop" (the "Stop promotions" button): marketing messages only.
    Case("wa-marketing-stop", "meta_business",
         _meta("user_marketing_preferences", "resume",
               lambda d: d["entry"][0]["changes"][0]["value"]["user_preferences"][0].update(
                   value="stop", detail="User requested to stop marketing messages")),
         suppressed={(MARKETING_SCOPE, "+16505551234", "marketing")}),
    # ---- Vonage Messages API inbound WhatsApp (developer.vonage.com … messages webhooks)
    Case("vonage-wa-text", "vonage", as_json(vonage("vg_wa_text")), window={"+447700900001"}),
    Case("vonage-wa-reply", "vonage", as_json(vonage("vg_wa_reply")), window={"+447700900001"}),
]


def test_every_captured_payload_has_a_row() -> None:
    """No payload of the fixtures is left out (except the 12 legacy Mailgun placeholders)."""
    ids = {c.id for c in CASES}
    assert len(ids) == len(CASES)
    captured = sum(len(v) for tests in ANYMAIL.values() for v in tests.values())
    legacy = len(ANYMAIL["test_mailgun_webhooks.py"]) and sum(
        1 for t in ANYMAIL["test_mailgun_webhooks.py"] if t.startswith("MailgunLegacyTestCase")
    )
    pywa_count = sum(len(json.loads(p.read_text())) for p in (PEER / "pywa").glob("*.json"))
    derived = sum(1 for c in CASES if c.id in {"ses-topic-validated", "pm-transient",
                                                "wa-marketing-stop"})
    assert len(CASES) - derived == captured - legacy + pywa_count + 2


async def _setup(db: Database, case: Case) -> dict[str, str]:
    ids: dict[str, str] = {}
    async with db.session() as s:
        for pmid, channel, address in case.deliveries:
            message_id, delivery_id = str(uuid.uuid4()), str(uuid.uuid4())
            s.add(Message(id=message_id, clinic_id=CLINIC, category="APPOINTMENT", content=b"x"))
            await s.flush()
            s.add(Delivery(id=delivery_id, message_id=message_id, clinic_id=CLINIC,
                           channel=channel, recipient=address, status="sent",
                           provider=f"clinic:{case.provider}", provider_message_id=pmid))
            ids[address] = delivery_id
        for channel, address, reason in case.before:
            await suppress(s, CLINIC, channel, address, SuppressionReason(reason), "test", now=T0)
    return ids


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
async def test_payload_means_what_the_provider_says(db: Database, case: Case) -> None:
    ids = await _setup(db, case)
    events: list[WebhookEvent] = HANDLERS[case.provider].parse(case.request())
    async with db.session() as s:
        stored, _ = await store_events(s, CLINIC, events, now=T0)
        await apply_stored(s, ids=stored, now=T0)
    async with db.read() as s:
        for address, delivery_id in ids.items():
            d = await s.get(Delivery, delivery_id)
            assert d is not None
            assert d.status == case.statuses.get(address, "sent"), address
            if case.reason and d.status in ("failed", "bounced"):
                assert case.reason in str((d.error or {}).get("reason")), d.error
        rows = (await s.scalars(select(Suppression).where(Suppression.clinic_id == CLINIC))).all()
        assert {(r.channel, r.address, r.reason) for r in rows} == case.suppressed
        contacts = (
            await s.scalars(select(InboundContact).where(InboundContact.clinic_id == CLINIC))
        ).all()
        assert {c.address for c in contacts} == case.window


# ---- beyond the captures: sequences and Twilio (no Twilio capture exists) ----------------------
async def _apply(db: Database, provider: str, request: WebhookRequest) -> None:
    events = HANDLERS[provider].parse(request)
    async with db.session() as s:
        stored, _ = await store_events(s, CLINIC, events, now=T0)
        await apply_stored(s, ids=stored, now=T0)


async def _suppressions(db: Database) -> set[SUP]:
    async with db.read() as s:
        rows = (await s.scalars(select(Suppression).where(Suppression.clinic_id == CLINIC))).all()
    return {(r.channel, r.address, r.reason) for r in rows}


async def test_postmark_soft_bounce_then_delivery_is_delivered(db: Database) -> None:
    """Postmark SoftBounce (4096) / Transient (2) are delays: a later Delivery applies."""
    pmid = "2706ee8a-737c-4285-b032-ccd317af53ed"
    case = Case("seq", "postmark", as_json({}), [(pmid, E, "bounce@example.com")])
    ids = await _setup(db, case)
    bounce = anymail("postmark", "PostmarkDeliveryTestCase.test_bounce_event", "raw_event")
    for kind, code in (("SoftBounce", 4096), ("Transient", 2)):
        soft = {**bounce, "Type": kind, "TypeCode": code, "Inactive": False,
                "BouncedAt": f"2016-04-27T16:28:5{code % 10}Z"}
        await _apply(db, "postmark", as_json(soft)())
    delivered = {**anymail("postmark", "PostmarkDeliveryTestCase.test_delivered_event",
                           "raw_event"), "MessageID": pmid, "Recipient": "bounce@example.com"}
    await _apply(db, "postmark", as_json(delivered)())
    async with db.read() as s:
        d = await s.get(Delivery, ids["bounce@example.com"])
        assert d is not None and d.status == "delivered"
    assert await _suppressions(db) == set()


def _twilio(**form: str) -> WebhookRequest:
    import urllib.parse

    return WebhookRequest.build(
        URL, "POST", {"Content-Type": "application/x-www-form-urlencoded"},
        urllib.parse.urlencode(form).encode(),
    )


def _inbound(body: str, sid: str, **extra: str) -> WebhookRequest:
    return _twilio(MessageSid=sid, SmsSid=sid, AccountSid="AC" + "0" * 32, From="+14155552671",
                   To="+14155550000", Body=body, SmsStatus="received", **extra)


async def test_twilio_advanced_opt_out_type_decides(db: Database) -> None:
    """OptOutType (Advanced Opt-Out, twilio.com/docs/messaging/tutorials/advanced-opt-out):
    STOP with a custom keyword ("BAJA") suppresses; HELP changes nothing (even for a body
    that reads like STOP); START lifts the opt-out."""
    patient = "+14155552671"
    await _apply(db, "twilio", _inbound("BAJA", "SM" + "1" * 32, OptOutType="STOP"))
    assert await _suppressions(db) == {("sms", patient, "stop")}
    await _apply(db, "twilio", _inbound("ALTA", "SM" + "2" * 32, OptOutType="START"))
    assert await _suppressions(db) == set()
    await _apply(db, "twilio", _inbound("STOP", "SM" + "3" * 32, OptOutType="HELP"))
    assert await _suppressions(db) == set()


@pytest.mark.parametrize("code", ["30005", "30006"])
async def test_twilio_unknown_handset_or_landline_suppresses_sms(db: Database, code: str) -> None:
    """30005 "Unknown destination handset", 30006 "Landline or unreachable carrier": the
    number cannot receive texts (twilio.com/docs/api/errors/30005, /30006)."""
    sid = "SM" + code * 6 + "ab"
    case = Case("tw", "twilio", as_json({}), [(sid, "sms", "+14155552671")])
    ids = await _setup(db, case)
    await _apply(db, "twilio", _twilio(MessageSid=sid, MessageStatus="undelivered",
                                       ErrorCode=code, To="+14155552671", From="+14155550000"))
    async with db.read() as s:
        d = await s.get(Delivery, ids["+14155552671"])
        assert d is not None and d.status == "failed"
    assert await _suppressions(db) == {("sms", "+14155552671", "bounce")}


async def test_twilio_other_undelivered_codes_do_not_suppress(db: Database) -> None:
    sid = "SM" + "9" * 32
    case = Case("tw", "twilio", as_json({}), [(sid, "sms", "+14155552671")])
    await _setup(db, case)
    await _apply(db, "twilio", _twilio(MessageSid=sid, MessageStatus="undelivered",
                                       ErrorCode="30003", To="+14155552671"))
    assert await _suppressions(db) == set()


async def test_meta_131050_is_a_marketing_only_opt_out(db: Database) -> None:
    """Meta error 131050: "this recipient has chosen to stop receiving marketing messages on
    WhatsApp from your business" (Cloud API error codes): marketing only, not WhatsApp."""
    case = Case("m", "meta_business", as_json({}), [(WAMID, WA, PATIENT_WA)])
    ids = await _setup(db, case)
    data = pywa("message_status", "failed")
    data["entry"][0]["changes"][0]["value"]["statuses"][0]["errors"][0].update(
        code=131050, title="Unable to deliver the message")
    await _apply(db, "meta_business", as_json(data)())
    async with db.read() as s:
        d = await s.get(Delivery, ids[PATIENT_WA])
        assert d is not None and d.status == "failed"
    assert await _suppressions(db) == {(MARKETING_SCOPE, PATIENT_WA, "marketing")}
