"""Amazon SNS SMS adapter: SigV4-signed Publish over aiohttp, against moto's server."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from moto.core import DEFAULT_ACCOUNT_ID
from moto.server import ThreadedMotoServer
from moto.sns.models import sns_backends

from clinicomm.providers import registry
from clinicomm.providers.base import AdapterContext, Channel
from clinicomm.providers.errors import (
    ComplianceError,
    ConfigurationError,
    ProviderError,
    RateLimitedError,
    RecipientError,
    TransientError,
)
from clinicomm.providers.sms.aws_sns import SnsAdapter
from tests.support.http_capture import CaptureServer
from tests.support.messaging import (
    CANARY,
    PATIENT,
    assert_no_secret,
    build,
    template_message,
    text_message,
)

SMS = Channel.SMS
REGION = "us-east-1"


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def creds(url: str, **extra: Any) -> dict[str, Any]:
    return {"region": REGION, "accessKeyId": "AKIAEXAMPLE", "secretAccessKey": CANARY,
            "endpointUrl": url, **extra}


def adapter(url: str, http: aiohttp.ClientSession, **extra: Any) -> SnsAdapter:
    made = build(SnsAdapter, creds(url, **extra), http)
    assert isinstance(made, SnsAdapter)
    return made


def test_registered_and_default_endpoint() -> None:
    assert registry.get(SMS, "aws_sns").adapter is SnsAdapter
    assert registry.get(SMS, "sns").adapter is SnsAdapter  # alias
    model = SnsAdapter.credentials_model.model_validate(
        {"region": "eu-west-1", "accessKeyId": "A", "secretAccessKey": CANARY}
    )
    assert SnsAdapter(model, AdapterContext())._endpoint() == "https://sns.eu-west-1.amazonaws.com/"


async def test_sms_reaches_moto_to_the_e164_number(
    moto_url: str, http: aiohttp.ClientSession
) -> None:
    backend = sns_backends[DEFAULT_ACCOUNT_ID][REGION]
    a = adapter(moto_url, http, senderId="CLINIC")
    result = await a.send(text_message(SMS, to="+1 (415) 555-2671", text="Reminder: 10:30 €"))
    assert result.provider_message_id
    assert backend.sms_messages[result.provider_message_id] == (PATIENT, "Reminder: 10:30 €")
    await a.probe()  # GetSMSAttributes: signed, accepted, nothing sent
    assert len([m for m in backend.sms_messages.values() if m[0] == PATIENT]) >= 1


async def test_publish_form_and_signature(http: aiohttp.ClientSession) -> None:
    async with CaptureServer() as server:
        server.respond(200, "<PublishResponse><PublishResult><MessageId>mid-1</MessageId>"
                            "</PublishResult></PublishResponse>")
        result = await adapter(server.url, http, senderId="CLINIC").send(text_message(SMS))
    assert result.provider_message_id == "mid-1"
    (request,) = server.requests
    form = dict(request.form())
    assert form == {
        "Action": "Publish", "Version": "2010-03-31", "PhoneNumber": PATIENT,
        "Message": "Your appointment is at 10:30",
        "MessageAttributes.entry.1.Name": "AWS.SNS.SMS.SMSType",
        "MessageAttributes.entry.1.Value.DataType": "String",
        "MessageAttributes.entry.1.Value.StringValue": "Transactional",
        "MessageAttributes.entry.2.Name": "AWS.SNS.SMS.SenderID",
        "MessageAttributes.entry.2.Value.DataType": "String",
        "MessageAttributes.entry.2.Value.StringValue": "CLINIC",
    }
    # Re-sign what the server received: the bytes and headers sent are the ones signed.
    authorization = request.headers["Authorization"]
    assert authorization.startswith("AWS4-HMAC-SHA256 Credential=AKIAEXAMPLE/")
    assert f"/{REGION}/sns/aws4_request" in authorization
    sent = {k: request.headers[k] for k in ("Content-Type", "X-Amz-Date")}
    again = AWSRequest(method="POST", url=server.url + "/", data=request.body, headers=sent)
    again.context["timestamp"] = request.headers["X-Amz-Date"]
    signer = SigV4Auth(Credentials("AKIAEXAMPLE", CANARY), "sns", REGION)
    signature = signer.signature(signer.string_to_sign(again, signer.canonical_request(again)),
                                 again)
    match = re.search(r"Signature=([0-9a-f]+)", authorization)
    assert match is not None
    assert match.group(1) == signature
    assert CANARY not in authorization


def sns_error(code: str, message: str, kind: str = "Sender") -> str:
    return (f"<ErrorResponse xmlns=\"http://sns.amazonaws.com/doc/2010-03-31/\"><Error>"
            f"<Type>{kind}</Type><Code>{code}</Code><Message>{message}</Message></Error>"
            f"<RequestId>r-1</RequestId></ErrorResponse>")


ERROR_CASES: list[tuple[int, str, type[ProviderError]]] = [
    (400, sns_error("Throttling", "Rate exceeded"), RateLimitedError),
    (400, sns_error("InvalidParameter",
                    "Invalid parameter: PhoneNumber Reason: +1415 is not valid to publish to"),
     RecipientError),
    (400, sns_error("InvalidParameter", "Invalid parameter: MessageAttributes"),
     ConfigurationError),
    (403, sns_error("AuthorizationError", "User is not authorized"), ConfigurationError),
    (403, sns_error("InvalidClientTokenId", "The security token is invalid"), ConfigurationError),
    (403, sns_error("SignatureDoesNotMatch", "The signature does not match"), ConfigurationError),
    (400, sns_error("OptedOut", "Phone number is opted out"), ComplianceError),
    (500, sns_error("InternalError", "internal", "Receiver"), TransientError),
    (503, "Service Unavailable", TransientError),
]


@pytest.mark.parametrize(("status", "body", "expected"), ERROR_CASES,
                         ids=[f"{c[0]}-{c[2].__name__}-{i}" for i, c in enumerate(ERROR_CASES)])
async def test_error_classification(
    http: aiohttp.ClientSession, status: int, body: str, expected: type[ProviderError]
) -> None:
    async with CaptureServer() as server:
        server.respond(status, body, headers={"Content-Type": "text/xml", "Retry-After": "2"})
        with pytest.raises(expected) as info:
            await adapter(server.url, http).send(text_message(SMS))
    assert type(info.value) is expected
    assert len(server.requests) == 1
    assert_no_secret(info.value, info.value.to_dict())


async def test_local_refusals_make_no_call(
    moto_url: str, http: aiohttp.ClientSession
) -> None:
    a = adapter(moto_url, http)
    with pytest.raises(RecipientError):
        await a.send(text_message(SMS, to="+0123456"))  # refused locally
    with pytest.raises(ConfigurationError):
        await a.send(template_message(SMS))  # SNS has no templates: send rendered text


async def test_probe_calls_get_sms_attributes(http: aiohttp.ClientSession) -> None:
    async with CaptureServer() as server:
        server.respond(200, "<GetSMSAttributesResponse/>")
        await adapter(server.url, http).probe()
    assert dict(server.requests[0].form())["Action"] == "GetSMSAttributes"


def test_repr_never_shows_secrets() -> None:
    model = SnsAdapter.credentials_model.model_validate(creds("http://x"))
    assert_no_secret(SnsAdapter(model, AdapterContext()), model, model.public_dict())
