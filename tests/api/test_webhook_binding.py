"""Issue 13, findings 3 and 4 on the webhook endpoint: replays refused, events bound to the
clinic's own account, one answer for every unserved (provider, clinic), failed signatures
rate-limited. Each replay is first shown accepted when fresh, then refused when replayed."""

from __future__ import annotations

import asyncio
import base64
import copy
import hashlib
import hmac
import json
import secrets
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding
from prometheus_client import REGISTRY
from pydantic import SecretStr
from sqlalchemy import func, select

from clinicomm.api.app import create_app
from clinicomm.config import Settings
from clinicomm.delivery.webhooks import webhook_service
from clinicomm.providers.webhooks import ses
from clinicomm.runtime import Runtime
from clinicomm.store.models import DeliveryEventRecord, InboundContact, Suppression
from tests.api.conftest import Api, create_clinic, recording_client
from tests.api.test_webhooks import (
    _SG_KEYS,
    _SNS_KEY,
    CERT_URL,
    TOPIC,
    Signed,
    all_providers,
    fetch_cert,
    post,
    secrets_for,
    sign_meta,
    sign_twilio,
)
from tests.conftest import canary
from tests.support.webhooks import load, raw

PAD = "-padded-to-32-bytes"


async def count(api: Api, model: Any) -> int:
    async with api.runtime.db.read() as session:
        return int(await session.scalar(select(func.count()).select_from(model)) or 0)


async def nothing_stored(api: Api) -> bool:
    return (
        await count(api, DeliveryEventRecord) == 0
        and await count(api, Suppression) == 0
        and await count(api, InboundContact) == 0
    )


@pytest.fixture
async def clinic(api: Api) -> dict[str, str]:
    webhook_service(api.runtime).context.fetch_certificate = fetch_cert
    s = secrets_for("a")
    await create_clinic(api, "clinic-a", all_providers("a", s))
    return s


def vonage_jwt(body: bytes, s: dict[str, str], **claims: Any) -> dict[str, str]:
    base: dict[str, Any] = {"iat": int(time.time()), "jti": secrets.token_hex(8), "iss": "Vonage"}
    base.update(claims)
    token = jwt.encode(base, s["vonage"] + PAD, algorithm="HS256")
    return {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}


async def test_vonage_replayed_and_forged_stop_are_refused(api: Api, clinic: dict[str, str]) -> None:
    stop = load("vonage", "inbound_text.json")
    stop.update({"channel": "sms", "text": "STOP", "message_uuid": "aaaaaaaa-0000-4ccc-8ddd-000000000001"})
    body = json.dumps(stop).encode()
    digest = hashlib.sha256(body).hexdigest()
    # The finding: iat from 2001 and no payload_hash, for an arbitrary body.
    replay = vonage_jwt(body, clinic, iat=978307200)
    answer = await post(api, "vonage", "clinic-a", Signed(body, replay))
    assert answer.status_code == 401, answer.text
    # Fresh, but without payload_hash: the JWT would fit any body.
    answer = await post(api, "vonage", "clinic-a", Signed(body, vonage_jwt(body, clinic)))
    assert answer.status_code == 401
    # Stale with a correct hash, and dated ahead: refused too.
    for iat in (int(time.time()) - 301, int(time.time()) + 120):
        signed = vonage_jwt(body, clinic, iat=iat, payload_hash=digest)
        assert (await post(api, "vonage", "clinic-a", Signed(body, signed))).status_code == 401
    assert await nothing_stored(api)
    # A fresh JWT covering the body: accepted (the path works; the STOP is applied).
    ok = vonage_jwt(body, clinic, payload_hash=digest, api_key="abcd1234")
    assert (await post(api, "vonage", "clinic-a", Signed(body, ok))).status_code == 200
    # Another account's api_key, signed with the same secret: acknowledged, not applied.
    other = dict(stop, message_uuid="aaaaaaaa-0000-4ccc-8ddd-000000000002")
    other_body = json.dumps(other).encode()
    foreign = vonage_jwt(other_body, clinic, payload_hash=hashlib.sha256(other_body).hexdigest(), api_key="zzzz9999")
    assert (await post(api, "vonage", "clinic-a", Signed(other_body, foreign))).status_code == 200
    async with api.runtime.db.read() as session:
        ids = set((await session.scalars(select(DeliveryEventRecord.event_id))).all())
    assert ids == {"aaaaaaaa-0000-4ccc-8ddd-000000000001"}


def mailgun_signed(data: dict[str, Any], key: str, ts: int, token: str) -> bytes:
    sig = hmac.new(key.encode(), f"{ts}{token}".encode(), hashlib.sha256).hexdigest()
    return json.dumps({**data, "signature": {"timestamp": str(ts), "token": token, "signature": sig}}).encode()


async def test_mailgun_replay_and_stale_timestamp(api: Api, clinic: dict[str, str]) -> None:
    data = load("mailgun", "delivered.json")
    data.pop("signature", None)
    headers = {"Content-Type": "application/json"}
    body = mailgun_signed(data, clinic["mailgun"], int(time.time()), secrets.token_hex(25))
    assert (await post(api, "mailgun", "clinic-a", Signed(body, headers))).status_code == 200
    # The same request again (its token is single-use): refused.
    answer = await post(api, "mailgun", "clinic-a", Signed(body, headers))
    assert answer.status_code == 401
    old = mailgun_signed(data, clinic["mailgun"], int(time.time()) - 3600, secrets.token_hex(25))
    assert (await post(api, "mailgun", "clinic-a", Signed(old, headers))).status_code == 401
    assert await count(api, DeliveryEventRecord) == 1


def sendgrid_headers(body: bytes, ts: int) -> dict[str, str]:
    sig = _SG_KEYS["a"].sign(str(ts).encode() + body, ec.ECDSA(hashes.SHA256()))
    return {
        "Content-Type": "application/json",
        "X-Twilio-Email-Event-Webhook-Signature": base64.b64encode(sig).decode(),
        "X-Twilio-Email-Event-Webhook-Timestamp": str(ts),
    }


async def test_sendgrid_replayed_event_is_refused(api: Api, clinic: dict[str, str]) -> None:
    body = json.dumps(load("sendgrid", "events.json")[:1]).encode()
    stale = sendgrid_headers(body, int(time.time()) - 3600)
    assert (await post(api, "sendgrid", "clinic-a", Signed(body, stale))).status_code == 401
    assert await nothing_stored(api)
    fresh = sendgrid_headers(body, int(time.time()))
    assert (await post(api, "sendgrid", "clinic-a", Signed(body, fresh))).status_code == 200


def sns_signed(when: datetime) -> bytes:
    msg = load("ses", "sns_envelope.json")
    msg["Message"] = raw("ses", "delivery.json").decode()
    msg.update(
        {
            "TopicArn": TOPIC["a"],
            "SignatureVersion": "2",
            "SigningCertURL": CERT_URL,
            "Timestamp": when.strftime("%Y-%m-%dT%H:%M:%S.000Z"),
            "MessageId": secrets.token_hex(8),
        }
    )
    sig = _SNS_KEY.sign(ses.string_to_sign(msg), padding.PKCS1v15(), hashes.SHA256())
    msg["Signature"] = base64.b64encode(sig).decode()
    return json.dumps(msg).encode()


async def test_ses_replayed_event_is_refused(api: Api, clinic: dict[str, str]) -> None:
    headers = {"Content-Type": "application/json"}
    old = sns_signed(datetime.now(UTC) - timedelta(hours=1))
    assert (await post(api, "ses", "clinic-a", Signed(old, headers))).status_code == 401
    assert await nothing_stored(api)
    fresh = sns_signed(datetime.now(UTC))
    assert (await post(api, "ses", "clinic-a", Signed(fresh, headers))).status_code == 200


def _foreign_total(provider: str, clinic_id: str) -> float:
    value = REGISTRY.get_sample_value(
        "communication_webhook_foreign_total", {"clinicId": clinic_id, "provider": provider}
    )
    return value or 0.0


async def test_meta_event_for_another_clinics_number(api: Api) -> None:
    """Two clinics sharing one Meta app secret: each clinic's URL takes only its own number's
    events; the other's are answered 200 (Meta must not retry), not applied, and counted."""
    shared = canary("shared-app-secret")
    for label, number in (("a", "106540352242922"), ("b", "999999999999999")):
        settings = all_providers(label, secrets_for(label))
        creds = settings["communicationSettings"]["whatsapp"]["primary"]["credentials"]
        creds.update({"appSecret": shared, "phoneNumberId": number})
        await create_clinic(api, f"clinic-{label}", settings)
    body = raw("meta", "inbound_text.json")  # phone_number_id 106540352242922: clinic-a's
    headers = sign_meta(body, "", "a", {"meta": shared})
    before = _foreign_total("meta_business", "clinic-b")
    answer = await post(api, "meta_business", "clinic-b", Signed(body, headers))
    assert answer.status_code == 200, answer.text
    assert await nothing_stored(api)
    assert _foreign_total("meta_business", "clinic-b") == before + 1
    # The same event on its own clinic's URL is stored.
    assert (await post(api, "meta_business", "clinic-a", Signed(body, headers))).status_code == 200
    assert await count(api, DeliveryEventRecord) == 1


async def test_twilio_event_for_another_account(api: Api, clinic: dict[str, str]) -> None:
    form = raw("twilio", "status_delivered.form").decode().replace(
        "AccountSid=AC" + "X" * 32, "AccountSid=AC" + "Y" * 32
    )
    url = "http://api.test/api/v1/webhooks/twilio/clinic-a"
    signed = Signed(form.encode(), sign_twilio(form.encode(), url, "a", clinic))
    answer = await post(api, "twilio", "clinic-a", signed)
    assert answer.status_code == 200 and "<Response>" in answer.text
    assert await nothing_stored(api)


async def test_unknown_clinic_and_unused_provider_answer_alike(api: Api) -> None:
    await create_clinic(api, "clinic-a")  # SMTP and Meta only: no Twilio
    answers = [
        await api.client.post(path, content=b"{}", headers={"Content-Type": "application/json"})
        for path in (
            "/api/v1/webhooks/twilio/clinic-a",  # known clinic, provider not used
            "/api/v1/webhooks/twilio/clinic-nobody",  # unknown clinic
            "/api/v1/webhooks/nosuchprovider/clinic-a",  # unknown provider
        )
    ]
    assert {a.status_code for a in answers} == {404}
    assert len({json.dumps(a.json()) for a in answers}) == 1, [a.text for a in answers]
    assert "clinic-nobody" not in answers[1].text and "does not use" not in answers[0].text


async def test_failed_signatures_are_rate_limited(settings: Settings) -> None:
    strict = settings.model_copy(update={"webhook_signature_failures_per_minute": 3})
    runtime = await Runtime.create(strict, env={})
    app = create_app(strict, runtime)
    try:
        async with app.router.lifespan_context(app), recording_client(app) as client:
            api = Api(client, runtime, strict, app.state.verifier)
            s = secrets_for("a")
            await create_clinic(api, "clinic-a", all_providers("a", s))
            body = raw("meta", "statuses.json")
            bad = {"Content-Type": "application/json", "X-Hub-Signature-256": "sha256=" + "0" * 64}
            codes = [
                (await post(api, "meta_business", "clinic-a", Signed(body, bad))).status_code
                for _ in range(4)
            ]
            assert codes == [401, 401, 401, 429]
            limited = await post(api, "meta_business", "clinic-a", Signed(body, sign_meta(body, "", "a", s)))
            assert limited.status_code == 429 and int(limited.headers["retry-after"]) > 0
            # Per clinic and provider: another provider of the clinic is not limited.
            other = await post(api, "sendgrid", "clinic-a", Signed(body, {"Content-Type": "application/json"}))
            assert other.status_code == 401
    finally:
        await runtime.close()


# ---- the rest of the surface ---------------------------------------------------------------


async def test_metrics_token_and_no_series_for_unknown_clinics(settings: Settings) -> None:
    token = canary("metrics-token")
    strict = settings.model_copy(update={"metrics_token": SecretStr(token)})
    runtime = await Runtime.create(strict, env={})
    app = create_app(strict, runtime)
    try:
        async with app.router.lifespan_context(app), recording_client(app) as client:
            api = Api(client, runtime, strict, app.state.verifier)
            assert (await client.get("/metrics")).status_code == 401
            assert (await client.get("/metrics", headers={"Authorization": "Bearer wrong"})).status_code == 401
            send = {
                "category": "APPOINTMENT",
                "title": "t",
                "body": "b",
                "recipients": [{"email": "patient@example.com"}],
                "channels": ["email"],
                "metadata": {"clinicId": "clinic-made-up-404"},
            }
            refused = await client.post("/api/v1/communications", json=send, headers=api.admin)
            assert refused.status_code == 404
            scraped = await client.get("/metrics", headers={"Authorization": f"Bearer {token}"})
            assert scraped.status_code == 200
            assert "clinic-made-up-404" not in scraped.text
    finally:
        await runtime.close()


async def test_config_test_rate_limit_and_security_headers(settings: Settings) -> None:
    strict = settings.model_copy(update={"config_test_per_minute": 2})
    runtime = await Runtime.create(strict, env={})
    app = create_app(strict, runtime)
    try:
        async with app.router.lifespan_context(app), recording_client(app) as client:
            api = Api(client, runtime, strict, app.state.verifier)
            doc = copy.deepcopy(all_providers("a", secrets_for("a")))
            # An unreachable local port: each test costs one (refused) connection attempt.
            doc["communicationSettings"]["email"]["primary"]["credentials"]["baseUrl"] = "http://127.0.0.1:9/"
            await create_clinic(api, "clinic-a", doc)
            codes = []
            for _ in range(3):
                answer = await client.post(
                    "/api/v1/clinics/clinic-a/communication/test",
                    json={"channel": "email", "to": "patient@example.com"},
                    headers=api.admin,
                )
                codes.append(answer.status_code)
            assert codes == [200, 200, 429]
            assert int(answer.headers["retry-after"]) >= 1
            for response in (answer, await client.get("/api/v1/clinics/clinic-a", headers=api.admin)):
                assert response.headers["cache-control"] == "no-store"
                assert response.headers["x-content-type-options"] == "nosniff"
                assert response.headers["referrer-policy"] == "no-referrer"
    finally:
        await runtime.close()
        await asyncio.sleep(0)
