"""SES adapter: sends through moto's SES server and is found in moto's record of sent mail;
requests checked against botocore's SESv2 model; errors classified from scripted answers."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator

import boto3
import pytest
from moto.core import DEFAULT_ACCOUNT_ID
from moto.server import ThreadedMotoServer
from moto.ses.models import ses_backends

from clinicomm.providers.base import AdapterContext, OutboundMessage
from clinicomm.providers.email.ses import SesAdapter, SesCredentials
from clinicomm.providers.errors import (
    ConfigurationError,
    ProviderDownError,
    RateLimitedError,
    RecipientError,
    TransientError,
)
from tests.providers.email.conftest import CANARY, html_message, template_message, text_message
from tests.support.http_capture import CaptureServer
from tests.support.specs import assert_valid_aws

REGION = "eu-west-1"
MODEL = "aws-ses-sns/botocore-sesv2-2019-09-27.service-2.json"
CONFIG_SET = "clinic-a-events"


@pytest.fixture(scope="module")
def moto_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """moto's server on a free port, with the clinic's domain verified and its configuration set
    created; moto's request recorder on (it keeps the SendEmail bodies, and so the
    ConfigurationSetName that moto's record of sent mail does not keep)."""
    import moto.moto_api

    # The recorder writes where MOTO_RECORDER_FILEPATH pointed at import; point it at tmp.
    moto.moto_api.recorder._location = str(tmp_path_factory.mktemp("moto") / "recording")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    client = boto3.client(
        "sesv2",
        region_name=REGION,
        endpoint_url=url,
        aws_access_key_id="AKIDCLINICA",
        aws_secret_access_key="test-only",
    )
    client.create_email_identity(EmailIdentity="clinic-a.example")
    client.create_configuration_set(ConfigurationSetName=CONFIG_SET)
    urllib.request.urlopen(
        urllib.request.Request(f"{url}/moto-api/recorder/start-recording", method="POST")
    ).read()
    try:
        yield url
    finally:
        server.stop()


def recorded_requests(url: str) -> list[dict[str, object]]:
    import base64

    text = urllib.request.urlopen(f"{url}/moto-api/recorder/download-recording").read().decode()
    entries = [json.loads(line) for line in text.splitlines() if line.strip()]
    for entry in entries:
        body = entry.get("body") or ""
        if entry.get("body_encoded"):
            body = base64.b64decode(str(body)).decode()
        entry["body"] = body
    return entries


def credentials(endpoint: str, **kw: object) -> SesCredentials:
    return SesCredentials.model_validate(
        {
            "region": REGION,
            "accessKeyId": "AKIDCLINICA",
            "secretAccessKey": CANARY,
            "endpointUrl": endpoint,
            "fromEmail": "appointments@clinic-a.example",
            "fromName": "Clinic A",
            "configurationSet": CONFIG_SET,
            **kw,
        }
    )


def sent_messages() -> list[object]:
    return list(ses_backends[DEFAULT_ACCOUNT_ID][REGION].sent_messages)


@pytest.mark.parametrize(
    "message", [text_message(), html_message()], ids=["text", "html"]
)
async def test_send_through_moto_lands_in_its_record(
    moto_url: str, context: AdapterContext, message: OutboundMessage
) -> None:
    before = len(sent_messages())
    result = await SesAdapter(credentials(moto_url), context).send(message)
    sent = sent_messages()
    assert len(sent) == before + 1
    record = sent[-1]
    assert record.id == result.provider_message_id  # type: ignore[attr-defined]
    assert record.source == "Clinic A <appointments@clinic-a.example>"  # type: ignore[attr-defined]
    assert record.destinations == {"ToAddresses": ["patient@example.com"]}  # type: ignore[attr-defined]
    assert record.subject == "Appointment confirmed"  # type: ignore[attr-defined]
    expected_body = message.html or message.text
    assert record.body == expected_body  # type: ignore[attr-defined]
    # moto's sent-mail record has no configuration set; its request record does.
    sends = [
        json.loads(str(e["body"]))
        for e in recorded_requests(moto_url)
        if str(e["url"]).endswith("/v2/email/outbound-emails")
    ]
    assert sends[-1]["ConfigurationSetName"] == CONFIG_SET
    assert sends[-1]["FromEmailAddress"] == "Clinic A <appointments@clinic-a.example>"


async def test_clinic_default_from_is_used_without_credentials_sender(
    moto_url: str, context: AdapterContext
) -> None:
    creds = credentials(moto_url, fromEmail=None, fromName=None)
    await SesAdapter(creds, context).send(
        text_message(from_email="front-desk@clinic-a.example", from_name="Front Desk")
    )
    assert sent_messages()[-1].source == "Front Desk <front-desk@clinic-a.example>"  # type: ignore[attr-defined]


async def test_moto_rejects_unverified_sender_as_configuration(
    moto_url: str, context: AdapterContext
) -> None:
    creds = credentials(moto_url, fromEmail="someone@not-verified.example")
    with pytest.raises(ConfigurationError) as info:
        await SesAdapter(creds, context).send(text_message())
    assert info.value.code == "MessageRejected"


async def test_moto_rejects_bad_recipient_as_recipient_error(
    moto_url: str, context: AdapterContext
) -> None:
    with pytest.raises(RecipientError):
        await SesAdapter(credentials(moto_url), context).send(text_message(to="patient"))


@pytest.mark.parametrize(
    "message",
    [text_message(), html_message(), template_message()],
    ids=["text", "html", "template"],
)
async def test_request_matches_botocore_model_and_is_signed(
    server: CaptureServer, context: AdapterContext, message: OutboundMessage
) -> None:
    server.respond(200, {"MessageId": "0100018c-abc"})
    result = await SesAdapter(credentials(server.url), context).send(message)
    assert result.provider_message_id == "0100018c-abc"
    request = server.requests[0]
    assert_valid_aws(MODEL, "SendEmail", request)
    auth = request.headers["Authorization"]
    assert auth.startswith("AWS4-HMAC-SHA256 Credential=AKIDCLINICA/")
    assert f"/{REGION}/ses/aws4_request" in auth
    assert "X-Amz-Date" in request.headers
    assert CANARY.encode() not in request.body
    assert CANARY not in json.dumps(request.headers)
    body = request.json()
    assert body["EmailTags"] == [{"Name": "ref", "Value": "dlv_0001"}]
    if message.template is not None:
        assert body["Content"]["Template"]["TemplateName"] == "appointment-confirmed"
        assert json.loads(body["Content"]["Template"]["TemplateData"]) == {
            "time": "10:30",
            "clinic": "Clinic A",
        }


Answer = tuple[int, dict[str, str], dict[str, str]]


def aws_error(status: int, error_type: str, message: str) -> Answer:
    """An SES v2 (REST-JSON) error answer: the type in `x-amzn-ErrorType`, `message` in JSON."""
    headers = {"x-amzn-ErrorType": f"{error_type}:http://internal.amazon.com/"}
    return status, {"message": message}, headers


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (
            aws_error(429, "TooManyRequestsException", "Maximum sending rate exceeded."),
            RateLimitedError,
        ),
        (aws_error(400, "ThrottlingException", "Rate exceeded"), RateLimitedError),
        (
            aws_error(400, "LimitExceededException", "Daily message quota exceeded."),
            ProviderDownError,
        ),
        (
            aws_error(400, "SendingPausedException", "Sending is paused for this account."),
            ProviderDownError,
        ),
        (
            aws_error(400, "MessageRejected", "Email address is not verified."),
            ConfigurationError,
        ),
        (
            aws_error(400, "MailFromDomainNotVerifiedException", "MAIL FROM domain not verified"),
            ConfigurationError,
        ),
        (
            aws_error(403, "AccessDeniedException", "not authorized to perform ses:SendEmail"),
            ConfigurationError,
        ),
        (
            aws_error(403, "InvalidSignatureException", "signature does not match"),
            ConfigurationError,
        ),
        (
            aws_error(404, "NotFoundException", "Configuration set does not exist."),
            ConfigurationError,
        ),
        (aws_error(400, "BadRequestException", "Illegal address"), RecipientError),
        (aws_error(500, "InternalFailure", "internal error"), TransientError),
        (aws_error(503, "ServiceUnavailable", "try later"), TransientError),
    ],
    ids=lambda v: v[1] if isinstance(v, tuple) else getattr(v, "__name__", ""),
)
async def test_error_classification(
    server: CaptureServer,
    context: AdapterContext,
    answer: Answer,
    expected: type[Exception],
) -> None:
    status, body, headers = answer
    server.respond(status, body, headers=headers)
    with pytest.raises(expected) as info:
        await SesAdapter(credentials(server.url), context).send(text_message())
    assert type(info.value) is expected
    assert "clinic-a.example" not in str(info.value.to_dict())  # type: ignore[attr-defined]


async def test_probe_is_a_signed_get_of_the_account(
    server: CaptureServer, context: AdapterContext
) -> None:
    ses = SesAdapter(credentials(server.url), context)
    server.respond(200, {"SendingEnabled": True, "ProductionAccessEnabled": True})
    await ses.probe()
    request = server.requests[-1]
    assert (request.method, request.path) == ("GET", "/v2/email/account")
    assert request.headers["Authorization"].startswith("AWS4-HMAC-SHA256 ")
    server.respond(*aws_error(403, "AccessDeniedException", "denied")[0:2],
                   headers=aws_error(403, "AccessDeniedException", "denied")[2])
    with pytest.raises(ConfigurationError):
        await ses.probe()
    assert all(r.method == "GET" for r in server.requests)


def test_default_endpoint(context: AdapterContext) -> None:
    creds = credentials("https://x.example").model_copy(update={"endpoint_url": None})
    assert SesAdapter(creds, context).endpoint == f"https://email.{REGION}.amazonaws.com"

