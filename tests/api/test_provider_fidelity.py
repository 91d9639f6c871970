"""Provider fidelity through the HTTP app, with stand-in providers on 127.0.0.1.

* a message sent through the *global* SendGrid provider becomes `bounced` from a webhook on
  `POST /api/v1/webhooks/sendgrid/global`, in the clinic that sent it;
* an inbound STOP on the global Twilio number suppresses the patient for the clinic that
  messaged them (and for no other clinic); every Twilio send carries `StatusCallback` at the
  right webhook route when `CLINICOMM_PUBLIC_URL` is set (valid against Twilio's spec);
* answers that used to mislead: a signed Mailgun legacy form → 400 "unsupported"; an SNS
  certificate that cannot be fetched → 503 "SNS signing certificate unavailable"; SES's
  topic validation notice → 200;
* SNS signatures verified for real: a certificate of the test's own served on 127.0.0.1 and
  trusted through `CLINICOMM_SNS_CERT_URL_PREFIXES`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import secrets
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID
from sqlalchemy import select

from clinicomm.api.app import create_app
from clinicomm.config import Settings
from clinicomm.delivery.webhooks import webhook_service
from clinicomm.delivery.worker import Worker, WorkerOptions
from clinicomm.providers.webhooks import ses
from clinicomm.runtime import Runtime
from clinicomm.store.models import Delivery
from tests.api.conftest import Api, create_clinic, recording_client
from tests.conftest import canary
from tests.support.http_capture import CaptureServer, Scripted
from tests.support.specs import assert_valid
from tests.support.webhooks import is_suppressed

PUBLIC = "https://comms.example.test"
PATIENT = "+14155552671"
GLOBAL_FROM = "+14155550000"
SG_KEY = ec.generate_private_key(ec.SECP256R1())
SNS_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
TOPIC = "arn:aws:sns:us-east-1:123456789012:clinic-ses"


def _sg_public() -> str:
    der = SG_KEY.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(der).decode()


def _sns_cert() -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sns.test")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(SNS_KEY.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1)).not_valid_after(now + timedelta(days=1))
        .sign(SNS_KEY, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


AppFactory = Callable[..., Awaitable[Api]]


@pytest.fixture
async def make_api(settings: Settings) -> AsyncIterator[AppFactory]:
    """An app on a runtime of its own: extra settings and global provider variables."""
    stack = contextlib.AsyncExitStack()

    async def factory(env: dict[str, str] | None = None, **update: Any) -> Api:
        s = settings.model_copy(update=update)
        rt = await Runtime.create(s, env=env or {})
        stack.push_async_callback(rt.close)
        app = create_app(s, rt)
        await stack.enter_async_context(app.router.lifespan_context(app))
        client = await stack.enter_async_context(recording_client(app))
        return Api(client, rt, s, app.state.verifier)

    async with stack:
        yield factory


@contextlib.asynccontextmanager
async def running_worker(api: Api) -> AsyncIterator[Worker]:
    stop = asyncio.Event()
    w = Worker.for_runtime(api.runtime, WorkerOptions(poll_seconds=0.05))
    task = asyncio.create_task(w.run(stop))
    try:
        yield w
    finally:
        stop.set()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def send(api: Api, clinic: str, channel: str, recipient: dict[str, str]) -> str:
    body = {"category": "APPOINTMENT", "title": "Reminder", "body": "Your appointment is at 10:30.",
            "recipients": [recipient], "channels": [channel], "metadata": {"clinicId": clinic}}
    answer = await api.client.post("/api/v1/communications", json=body, headers=api.admin)
    assert answer.status_code == 202, answer.text
    return str(answer.json()["id"])


async def delivery(api: Api, message_id: str, until: set[str], timeout: float = 10) -> Delivery:
    deadline = time.monotonic() + timeout
    while True:
        async with api.runtime.db.read() as session:
            row = await session.scalar(select(Delivery).where(Delivery.message_id == message_id))
        if row is not None and row.status in until:
            return row
        assert time.monotonic() < deadline, row.status if row else None
        await asyncio.sleep(0.05)


def sign_twilio(body: bytes, url: str, token: str) -> dict[str, str]:
    params = sorted(urllib.parse.parse_qsl(body.decode(), keep_blank_values=True))
    mac = hmac.new(token.encode(), (url + "".join(k + v for k, v in params)).encode(),
                   hashlib.sha1).digest()
    return {"Content-Type": "application/x-www-form-urlencoded",
            "X-Twilio-Signature": base64.b64encode(mac).decode()}


def sign_sendgrid(body: bytes) -> dict[str, str]:
    ts = str(int(time.time()))
    sig = SG_KEY.sign(ts.encode() + body, ec.ECDSA(hashes.SHA256()))
    return {"Content-Type": "application/json",
            "X-Twilio-Email-Event-Webhook-Signature": base64.b64encode(sig).decode(),
            "X-Twilio-Email-Event-Webhook-Timestamp": ts}


def twilio_slot(server: CaptureServer, token: str, sender: str = "+14155559999") -> dict[str, Any]:
    return {"provider": "twilio", "credentials": {
        "accountSid": "AC" + "0" * 32, "authToken": token, "fromNumber": sender,
        "baseUrl": server.url}}


def twilio_created(sid: str) -> Scripted:
    return Scripted(201, {"sid": sid, "status": "queued"})


# ---- global SendGrid: sent globally, bounced from the global webhook ------------------------
async def test_global_sendgrid_bounce_reaches_the_clinics_delivery(make_api: AppFactory) -> None:
    async with CaptureServer() as server:
        server.default = Scripted(202, None, {"X-Message-Id": "GlobalXid0123456789abc"})
        env = {"EMAIL_PROVIDER": "sendgrid", "EMAIL_API_KEY": canary("global-sg"),
               "EMAIL_BASE_URL": server.url, "EMAIL_WEBHOOK_PUBLIC_KEY": _sg_public(),
               "EMAIL_FROM": "noreply@platform.example"}
        api = await make_api(env, public_url=PUBLIC)
        await create_clinic(api, "clinic-g", {"communicationSettings": {}})
        await create_clinic(api, "clinic-h", {"communicationSettings": {}})
        async with running_worker(api):
            message_id = await send(api, "clinic-g", "email", {"email": "pat@example.com"})
            row = await delivery(api, message_id, {"sent"})
        assert row.provider == "global:sendgrid"
        assert row.provider_message_id == "GlobalXid0123456789abc"
        events = [{"email": "pat@example.com", "timestamp": int(time.time()), "event": "bounce",
                   "type": "bounce", "status": "5.1.1", "reason": "550 5.1.1 no such user",
                   "sg_event_id": "evt-global-1",
                   "sg_message_id": "GlobalXid0123456789abc.filter0001.16648.5515E0B88.0"}]
        body = json.dumps(events).encode()
        # The clinic route does not take the platform's signature (the clinic has no slot).
        refused = await api.client.post("/api/v1/webhooks/sendgrid/clinic-g", content=body,
                                        headers=sign_sendgrid(body))
        assert refused.status_code == 404
        unsigned = await api.client.post("/api/v1/webhooks/sendgrid/global", content=body,
                                         headers={"Content-Type": "application/json"})
        assert unsigned.status_code == 401
        answer = await api.client.post("/api/v1/webhooks/sendgrid/global", content=body,
                                       headers=sign_sendgrid(body))
        assert answer.status_code == 200, answer.text
        await webhook_service(api.runtime).drain()
        row = await delivery(api, message_id, {"bounced"})
        assert row.error is not None and "550 5.1.1" in row.error["reason"]
        async with api.runtime.db.read() as session:
            # The opt-out is the sending clinic's, keyed by its blind index.
            cipher_g = await api.runtime.keys.cipher_for(api.runtime.db, "clinic-g")
            cipher_h = await api.runtime.keys.cipher_for(api.runtime.db, "clinic-h")
            assert await is_suppressed(session, "clinic-g", "email",
                                       cipher_g.index("pat@example.com"))
            assert not await is_suppressed(session, "clinic-h", "email",
                                           cipher_h.index("pat@example.com"))


async def test_global_event_before_the_delivery_is_known_is_applied_by_the_sweep(
    make_api: AppFactory,
) -> None:
    """The webhook can beat the worker: the event waits (no address kept) and applies once
    a global hop's delivery has that provider message id."""
    env = {"EMAIL_PROVIDER": "sendgrid", "EMAIL_API_KEY": canary("global-sg2"),
           "EMAIL_BASE_URL": "http://127.0.0.1:9", "EMAIL_WEBHOOK_PUBLIC_KEY": _sg_public()}
    api = await make_api(env)
    await create_clinic(api, "clinic-s", {"communicationSettings": {}})
    events = [{"email": "late@example.com", "timestamp": int(time.time()), "event": "delivered",
               "sg_event_id": "evt-early", "sg_message_id": "EarlyXid.filter0001.1.2.0"}]
    body = json.dumps(events).encode()
    answer = await api.client.post("/api/v1/webhooks/sendgrid/global", content=body,
                                   headers=sign_sendgrid(body))
    assert answer.status_code == 200
    await webhook_service(api.runtime).drain()
    from clinicomm.delivery.ingest import GLOBAL_SCOPE, apply_stored
    from clinicomm.store.models import DeliveryEventRecord, Message

    async with api.runtime.db.read() as session:
        (stored,) = (await session.scalars(select(DeliveryEventRecord))).all()
    assert stored.clinic_id == GLOBAL_SCOPE and stored.recipient is None and stored.payload == {}
    async with api.runtime.db.session() as session:
        session.add(Message(id="m-early", clinic_id="clinic-s", category="X", content=b"x"))
        await session.flush()
        session.add(Delivery(id="d-early", message_id="m-early", clinic_id="clinic-s",
                             channel="email", recipient="sealed", status="sent",
                             provider="global:sendgrid", provider_message_id="EarlyXid"))
    async with api.runtime.db.session() as session:
        result = await apply_stored(session)
    assert result.status_changes == 1
    async with api.runtime.db.read() as session:
        d = await session.get(Delivery, "d-early")
        assert d is not None and d.status == "delivered"


# ---- global Twilio: StatusCallback, inbound STOP for the clinic that messaged ---------------
async def test_global_twilio_stop_suppresses_for_the_clinic_that_messaged(
    make_api: AppFactory,
) -> None:
    token = canary("global-twilio")
    own_token = canary("own-twilio")
    async with CaptureServer() as server:
        sids = iter(f"SM{n:032d}" for n in range(1, 100))
        server.handler = lambda req: twilio_created(next(sids))
        env = {"SMS_PROVIDER": "twilio", "SMS_ACCOUNT_SID": "AC" + "1" * 32,
               "SMS_AUTH_TOKEN": token, "SMS_FROM_NUMBER": GLOBAL_FROM,
               "SMS_BASE_URL": server.url}
        api = await make_api(env, public_url=PUBLIC + "/")
        await create_clinic(api, "clinic-t", {"communicationSettings": {}})
        await create_clinic(api, "clinic-u", {"communicationSettings": {}})
        await create_clinic(api, "clinic-own", {"communicationSettings": {"sms": {
            "primary": twilio_slot(server, own_token),
            "fallbackStrategy": {"enabled": False}}}})
        async with running_worker(api):
            first = await send(api, "clinic-u", "sms", {"phone": PATIENT})
            await delivery(api, first, {"sent"})
            last = await send(api, "clinic-t", "sms", {"phone": PATIENT})
            await delivery(api, last, {"sent"})
            own = await send(api, "clinic-own", "sms", {"phone": PATIENT})
            await delivery(api, own, {"sent"})
        # Every Twilio send asked for per-message status reports at the right route.
        callbacks = [dict(r.form())["StatusCallback"] for r in server.requests]
        assert callbacks == [f"{PUBLIC}/api/v1/webhooks/twilio/global"] * 2 + [
            f"{PUBLIC}/api/v1/webhooks/twilio/clinic-own"
        ]
        for request in server.requests:
            assert_valid("twilio", request, host_url="https://api.twilio.com")
        # The patient answers STOP to the shared number.
        form = {"MessageSid": "SM" + "f" * 32, "SmsSid": "SM" + "f" * 32,
                "AccountSid": "AC" + "1" * 32, "From": PATIENT, "To": GLOBAL_FROM,
                "Body": "STOP", "SmsStatus": "received"}
        body = urllib.parse.urlencode(form).encode()
        url = "http://api.test/api/v1/webhooks/twilio/global"
        bad = await api.client.post("/api/v1/webhooks/twilio/global", content=body,
                                    headers=sign_twilio(body, url, own_token))
        assert bad.status_code == 401  # a clinic's token does not sign for the platform
        answer = await api.client.post("/api/v1/webhooks/twilio/global", content=body,
                                       headers=sign_twilio(body, url, token))
        assert answer.status_code == 200, answer.text
        await webhook_service(api.runtime).drain()
        async with api.runtime.db.read() as session:
            for clinic, expected in (("clinic-t", True), ("clinic-u", False),
                                     ("clinic-own", False)):
                cipher = await api.runtime.keys.cipher_for(api.runtime.db, clinic)
                assert await is_suppressed(session, clinic, "sms", cipher.index(PATIENT)) \
                    is expected, clinic


async def test_no_status_callback_without_a_public_url(make_api: AppFactory) -> None:
    async with CaptureServer() as server:
        server.default = twilio_created("SM" + "2" * 32)
        api = await make_api()
        await create_clinic(api, "clinic-n", {"communicationSettings": {"sms": {
            "primary": twilio_slot(server, canary("tw-n"))}}})
        async with running_worker(api):
            await delivery(api, await send(api, "clinic-n", "sms", {"phone": PATIENT}), {"sent"})
        (request,) = server.requests
        assert "StatusCallback" not in dict(request.form())


async def test_global_route_404_without_a_global_slot(make_api: AppFactory) -> None:
    api = await make_api()
    answer = await api.client.post("/api/v1/webhooks/twilio/global", content=b"x=1",
                                   headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert answer.status_code == 404
    assert (await api.client.post("/api/v1/webhooks/nope/global")).status_code == 404


# ---- answers that used to mislead -----------------------------------------------------------
async def test_signed_mailgun_legacy_form_is_400_unsupported(make_api: AppFactory) -> None:
    key = canary("mg-signing")
    api = await make_api()
    await create_clinic(api, "clinic-m", {"communicationSettings": {"email": {"primary": {
        "provider": "mailgun", "credentials": {"apiKey": canary("mg"), "domain": "mg.example.com",
                                               "webhookSigningKey": key}}}}})
    ts, token = str(int(time.time())), secrets.token_hex(25)
    sig = hmac.new(key.encode(), f"{ts}{token}".encode(), hashlib.sha256).hexdigest()
    # Mailgun's legacy `dropped` webhook fields (documented by django-anymail's tests).
    form = {"event": "dropped", "reason": "hardfail", "code": "605", "recipient": "x@example.com",
            "Message-Id": "<20161014215051.1.7D9C8F3E3A4E6B88@example.org>",
            "timestamp": ts, "token": token, "signature": sig}
    body = urllib.parse.urlencode(form).encode()
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    answer = await api.client.post("/api/v1/webhooks/mailgun/clinic-m", content=body,
                                   headers=headers)
    assert answer.status_code == 400, answer.text
    assert "not supported" in answer.json()["error"]["message"]
    form["signature"] = "0" * 64
    form["token"] = secrets.token_hex(25)
    bad = await api.client.post("/api/v1/webhooks/mailgun/clinic-m",
                                content=urllib.parse.urlencode(form).encode(), headers=headers)
    assert bad.status_code == 401


def _sns_message(note: Any, cert_url: str) -> bytes:
    msg: dict[str, Any] = {
        "Type": "Notification", "MessageId": secrets.token_hex(8), "TopicArn": TOPIC,
        "Subject": "Amazon SES Email Event Notification",
        "Message": note if isinstance(note, str) else json.dumps(note),
        "Timestamp": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z"),
        "SignatureVersion": "1", "SigningCertURL": cert_url,
        "UnsubscribeURL": "https://sns.us-east-1.amazonaws.com/?Action=Unsubscribe",
    }
    sig = SNS_KEY.sign(ses.string_to_sign(msg), padding.PKCS1v15(), hashes.SHA1())
    msg["Signature"] = base64.b64encode(sig).decode()
    return json.dumps(msg).encode()


async def _ses_clinic(api: Api, clinic: str) -> None:
    await create_clinic(api, clinic, {"communicationSettings": {"email": {"primary": {
        "provider": "ses", "credentials": {"region": "us-east-1", "accessKeyId": "AKIAEXAMPLE",
                                           "secretAccessKey": canary("ses"),
                                           "snsTopicArns": [TOPIC]}}}}})


async def test_sns_signed_with_a_test_certificate_on_127_0_0_1(make_api: AppFactory) -> None:
    pem = _sns_cert()
    async with CaptureServer() as certs:
        certs.default = Scripted(200, pem.decode())
        api = await make_api(sns_cert_url_prefixes=f"{certs.url}/certs/")
        await _ses_clinic(api, "clinic-sns")
        cert_url = f"{certs.url}/certs/SimpleNotificationService-test.pem"
        note = {"notificationType": "Bounce",
                "bounce": {"bounceType": "Permanent", "bouncedRecipients": [
                    {"emailAddress": "jane@example.com", "status": "5.1.1"}],
                    "timestamp": "2026-12-01T12:00:00.000Z"},
                "mail": {"messageId": "ses-msg-1", "destination": ["jane@example.com"]}}
        headers = {"Content-Type": "text/plain; charset=UTF-8",
                   "x-amz-sns-message-type": "Notification"}
        ok = await api.client.post("/api/v1/webhooks/ses/clinic-sns",
                                   content=_sns_message(note, cert_url), headers=headers)
        assert ok.status_code == 200, ok.text
        # SES's topic validation notice (plain text Message) is acknowledged.
        notice = _sns_message(
            "Successfully validated SNS topic for Amazon SES event publishing.", cert_url)
        validated = await api.client.post("/api/v1/webhooks/ses/clinic-sns", content=notice,
                                          headers=headers)
        assert validated.status_code == 200, validated.text
        # A tampered message is refused; a prefix that is not trusted too.
        tampered = _sns_message(note, cert_url).replace(b"jane@", b"john@")
        assert (await api.client.post("/api/v1/webhooks/ses/clinic-sns", content=tampered,
                                      headers=headers)).status_code == 401
        elsewhere = _sns_message(note, "http://127.0.0.1:1/other/cert.pem")
        assert (await api.client.post("/api/v1/webhooks/ses/clinic-sns", content=elsewhere,
                                      headers=headers)).status_code == 401
        assert len(certs.requests) == 1  # fetched once, then cached


async def test_sns_certificate_unreachable_is_503_not_database(make_api: AppFactory) -> None:
    api = await make_api(sns_cert_url_prefixes="http://127.0.0.1:1/")
    await _ses_clinic(api, "clinic-503")
    body = _sns_message({"notificationType": "Delivery", "mail": {"messageId": "m"}},
                        "http://127.0.0.1:1/cert.pem")
    answer = await api.client.post("/api/v1/webhooks/ses/clinic-503", content=body,
                                   headers={"Content-Type": "text/plain"})
    assert answer.status_code == 503, answer.text
    assert "SNS signing certificate unavailable" in answer.json()["error"]["message"]
    assert "database" not in answer.text
    assert answer.headers.get("Retry-After") == "60"


def test_plain_http_prefix_refused_in_production() -> None:
    with pytest.raises(ValueError, match="https"):
        _ = Settings(env="production", sns_cert_url_prefixes="http://127.0.0.1:4566/").sns_prefixes
    assert Settings(env="production",
                    sns_cert_url_prefixes="https://localstack.internal/").sns_prefixes == (
        "https://localstack.internal/",)
    assert Settings(env="test").sns_prefixes == ()




async def test_global_whatsapp_inbound_opens_the_window_of_the_clinic_that_wrote(
    make_api: AppFactory,
) -> None:
    """An inbound message to the shared global WhatsApp number refreshes the 24-hour window
    of the clinic whose global delivery last reached that patient, and of no other."""
    from clinicomm.delivery.window import last_inbound_among
    from clinicomm.store.models import Message

    secret = canary("global-app-secret")
    env = {"WHATSAPP_PROVIDER": "meta_business", "WHATSAPP_API_KEY": canary("global-meta"),
           "WHATSAPP_PHONE_NUMBER_ID": "5550001", "WHATSAPP_APP_SECRET": secret}
    api = await make_api(env)
    for clinic in ("clinic-w1", "clinic-w2"):
        await create_clinic(api, clinic, {"communicationSettings": {}})
    cipher = await api.runtime.keys.cipher_for(api.runtime.db, "clinic-w1")
    async with api.runtime.db.session() as session:
        session.add(Message(id="m-w1", clinic_id="clinic-w1", category="X", content=b"x"))
        await session.flush()
        session.add(Delivery(id="d-w1", message_id="m-w1", clinic_id="clinic-w1",
                             channel="whatsapp", recipient=cipher.encrypt_address(PATIENT),
                             recipient_index=cipher.index(PATIENT), status="sent",
                             provider="global:meta_business", provider_message_id="wamid.g1"))
    value = {"messaging_product": "whatsapp",
             "metadata": {"display_phone_number": "15550001", "phone_number_id": "5550001"},
             "messages": [{"from": PATIENT.lstrip("+"), "id": "wamid.in1",
                           "timestamp": str(int(time.time())), "type": "text",
                           "text": {"body": "Can I move my appointment?"}}]}
    body = json.dumps({"object": "whatsapp_business_account",
                       "entry": [{"id": "1", "changes": [{"field": "messages",
                                                          "value": value}]}]}).encode()
    mac = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    answer = await api.client.post(
        "/api/v1/webhooks/meta_business/global", content=body,
        headers={"Content-Type": "application/json", "X-Hub-Signature-256": f"sha256={mac}"})
    assert answer.status_code == 200, answer.text
    await webhook_service(api.runtime).drain()
    other = await api.runtime.keys.cipher_for(api.runtime.db, "clinic-w2")
    async with api.runtime.db.read() as session:
        seen = await last_inbound_among(session, [("clinic-w1", cipher.index(PATIENT)),
                                                  ("clinic-w2", other.index(PATIENT))])
    assert ("clinic-w1", cipher.index(PATIENT)) in seen
    assert ("clinic-w2", other.index(PATIENT)) not in seen


async def test_bad_template_components_are_422_with_paths(make_api: AppFactory) -> None:
    api = await make_api()
    await create_clinic(api, "clinic-422", {"communicationSettings": {}})
    body = {"category": "APPOINTMENT", "recipients": [{"phone": PATIENT}],
            "channels": ["whatsapp"], "metadata": {"clinicId": "clinic-422"},
            "template": {"name": "otp", "variables": {"1": "123456"}, "components": {
                "header": {"type": "image", "link": "http://insecure.example/a.jpg"},
                "buttons": [{"type": "url", "index": 12, "text": "x"}]}}}
    answer = await api.client.post("/api/v1/communications", json=body, headers=api.admin)
    assert answer.status_code == 422, answer.text
    paths = {d["path"] for d in answer.json()["error"]["details"]}
    assert "template.components.header" in paths
    assert "template.components.buttons.0.index" in paths
