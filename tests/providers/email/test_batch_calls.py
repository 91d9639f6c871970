"""Batch calls of the email adapters: one request for many messages, checked against the
official specs, and split by the provider's per-recipient answer."""

from __future__ import annotations

import json
from typing import Any

from clinicomm.providers.base import AdapterContext, OutboundMessage, SendResult, TemplateRef
from clinicomm.providers.email.mailgun import MailgunAdapter, MailgunCredentials
from clinicomm.providers.email.postmark import PostmarkAdapter, PostmarkCredentials
from clinicomm.providers.email.sendgrid import SendGridAdapter, SendGridCredentials
from clinicomm.providers.email.ses import SesAdapter, SesCredentials
from clinicomm.providers.errors import ConfigurationError, RecipientError
from tests.providers.email.conftest import CANARY, template_message, text_message
from tests.support.http_capture import CaptureServer
from tests.support.specs import assert_valid, assert_valid_aws


def sendgrid(server: CaptureServer, context: AdapterContext) -> SendGridAdapter:
    creds = SendGridCredentials.model_validate({"apiKey": CANARY, "baseUrl": server.url})
    return SendGridAdapter(creds, context)


def postmark(server: CaptureServer, context: AdapterContext) -> PostmarkAdapter:
    creds = PostmarkCredentials.model_validate(
        {"serverToken": CANARY, "baseUrl": server.url, "messageStream": "reminders"}
    )
    return PostmarkAdapter(creds, context)


def reminders(count: int) -> list[OutboundMessage]:
    """`count` messages of one template, each with its own recipient and variables."""
    return [
        text_message(
            to=f"patient{i}@example.com",
            reference=f"dlv_{i:04d}",
            text=None,
            template=TemplateRef(name="d-0123456789abcdef", variables={"time": f"10:{i % 60:02d}"}),
        )
        for i in range(count)
    ]


async def test_sendgrid_500_messages_one_request_valid_against_the_spec(
    server: CaptureServer, context: AdapterContext
) -> None:
    server.respond(202, None, headers={"X-Message-Id": "sg-batch"})
    messages = reminders(500)
    sg = sendgrid(server, context)
    assert len({sg.batch_key(m) for m in messages}) == 1
    results = await sg.send_batch(messages)
    assert len(server.requests) == 1
    request = server.requests[0]
    assert_valid("sendgrid", request, host_url="https://api.sendgrid.com")
    body = request.json()
    assert body["template_id"] == "d-0123456789abcdef"
    assert len(body["personalizations"]) == 500
    for i, item in enumerate(body["personalizations"]):
        assert item["to"] == [{"email": f"patient{i}@example.com"}]
        assert item["custom_args"] == {"ref": f"dlv_{i:04d}"}
        assert item["dynamic_template_data"] == {"time": f"10:{i % 60:02d}"}
    assert results == [SendResult("sg-batch", "202")] * 500


async def test_sendgrid_keys_separate_other_content(
    server: CaptureServer, context: AdapterContext
) -> None:
    sg = sendgrid(server, context)
    assert sg.batch_key(text_message()) == sg.batch_key(text_message(to="b@example.com"))
    assert sg.batch_key(text_message()) != sg.batch_key(text_message(text="Other text"))
    assert sg.batch_key(text_message()) != sg.batch_key(template_message("d-1"))


async def test_sendgrid_400_naming_two_personalizations_fails_those_and_resends_the_rest(
    server: CaptureServer, context: AdapterContext
) -> None:
    errors = [
        {"field": f"personalizations.{i}.to.0.email", "message": "Does not contain a valid address."}
        for i in (1, 3)
    ]
    server.respond(400, {"errors": errors})
    server.respond(202, None, headers={"X-Message-Id": "sg-rest"})
    messages = [text_message(to=f"p{i}@example.com", reference=f"dlv_{i}") for i in range(5)]
    results = await sendgrid(server, context).send_batch(messages)
    assert [type(r).__name__ for r in results] == [
        "SendResult",
        "RecipientError",
        "SendResult",
        "RecipientError",
        "SendResult",
    ]
    assert [r.provider_message_id for r in results if isinstance(r, SendResult)] == ["sg-rest"] * 3
    resent = server.requests[1].json()["personalizations"]
    assert [p["custom_args"]["ref"] for p in resent] == ["dlv_0", "dlv_2", "dlv_4"]
    for request in server.requests:
        assert_valid("sendgrid", request, host_url="https://api.sendgrid.com")


async def test_sendgrid_batch_401_applies_to_all(
    server: CaptureServer, context: AdapterContext
) -> None:
    server.respond(401, {"errors": [{"message": "bad key"}]})
    try:
        await sendgrid(server, context).send_batch([text_message(), text_message(to="b@x.example")])
    except ConfigurationError:
        pass
    else:
        raise AssertionError("a rejected key fails the whole batch")


def _ok(i: int) -> dict[str, Any]:
    return {
        "To": f"p{i}@example.com",
        "SubmittedAt": "2024-01-01T10:00:00Z",
        "MessageID": f"pm-{i}",
        "ErrorCode": 0,
        "Message": "OK",
    }


async def test_postmark_batch_answer_with_two_failed_items_fails_those_two_only(
    server: CaptureServer, context: AdapterContext
) -> None:
    answer = [_ok(i) for i in range(6)]
    answer[2] = {"ErrorCode": 406, "Message": "You tried to send to a recipient that has been "
                 "marked as inactive."}
    answer[4] = {"ErrorCode": 300, "Message": "Error parsing 'To': Illegal email address 'x'."}
    server.respond(200, answer)
    messages = [text_message(to=f"p{i}@example.com", reference=f"dlv_{i}") for i in range(6)]
    results = await postmark(server, context).send_batch(messages)
    assert len(server.requests) == 1
    request = server.requests[0]
    assert request.path == "/email/batch"
    assert_valid("postmark", request, host_url="https://api.postmarkapp.com")
    body = request.json()
    assert [item["To"] for item in body] == [f"p{i}@example.com" for i in range(6)]
    assert [item["Metadata"] for item in body] == [{"ref": f"dlv_{i}"} for i in range(6)]
    ok = [r for r in results if isinstance(r, SendResult)]
    assert [r.provider_message_id for r in ok] == ["pm-0", "pm-1", "pm-3", "pm-5"]
    assert isinstance(results[2], RecipientError) and results[2].code == "406"
    assert isinstance(results[4], RecipientError) and results[4].code == "300"


async def test_postmark_template_batch_valid_against_the_spec(
    server: CaptureServer, context: AdapterContext
) -> None:
    server.respond(200, [_ok(0), _ok(1)])
    messages = [
        template_message(to="p0@example.com", reference="dlv_0"),
        template_message(to="p1@example.com", reference="dlv_1"),
    ]
    results = await postmark(server, context).send_batch(messages)
    request = server.requests[0]
    assert request.path == "/email/batchWithTemplates"
    assert_valid("postmark", request, host_url="https://api.postmarkapp.com")
    assert [m["TemplateAlias"] for m in request.json()["Messages"]] == ["appointment-confirmed"] * 2
    assert all(isinstance(r, SendResult) for r in results)


def mailgun(server: CaptureServer, context: AdapterContext) -> MailgunAdapter:
    creds = MailgunCredentials.model_validate(
        {"apiKey": CANARY, "domain": "mg.clinic-a.example", "baseUrl": server.url}
    )
    return MailgunAdapter(creds, context)


async def test_mailgun_batch_is_one_request_with_recipient_variables(
    server: CaptureServer, context: AdapterContext
) -> None:
    server.respond(200, {"id": "<batch@mg.clinic-a.example>", "message": "Queued."}, times=2)
    messages = [text_message(to=f"p{i}@example.com", reference=f"dlv_{i}") for i in range(4)]
    messages.append(text_message(to="P1@example.com", reference="dlv_again"))  # same address
    mg = mailgun(server, context)
    assert len({mg.batch_key(m) for m in messages}) == 1
    assert mg.batch_key(template_message()) != mg.batch_key(
        text_message(text=None, template=TemplateRef("appointment-confirmed", variables={}))
    )
    results = await mg.send_batch(messages)
    assert len(server.requests) == 2  # the repeated address went alone
    batch = server.requests[0]
    assert_valid("mailgun", batch, host_url="https://api.mailgun.net")
    form = batch.form()
    assert form.getall("to") == [f"p{i}@example.com" for i in range(4)]
    assert json.loads(form["recipient-variables"]) == {
        f"p{i}@example.com": {"ref": f"dlv_{i}"} for i in range(4)
    }
    assert form["v:ref"] == "%recipient.ref%"
    assert server.requests[1].form()["v:ref"] == "dlv_again"
    assert all(isinstance(r, SendResult) for r in results)
    assert {r.provider_message_id for r in results if isinstance(r, SendResult)} == {
        "<batch@mg.clinic-a.example>"
    }


def ses(server: CaptureServer, context: AdapterContext) -> SesAdapter:
    creds = SesCredentials.model_validate(
        {
            "region": "eu-west-1",
            "accessKeyId": "AKIDCLINICA",
            "secretAccessKey": CANARY,
            "endpointUrl": server.url,
            "fromEmail": "appointments@clinic-a.example",
            "configurationSet": "clinic-a-events",
        }
    )
    return SesAdapter(creds, context)


async def test_ses_send_bulk_email_valid_and_split_per_entry(
    server: CaptureServer, context: AdapterContext
) -> None:
    entries = [{"Status": "SUCCESS", "MessageId": f"ses-{i}"} for i in range(5)]
    entries[1] = {"Status": "MESSAGE_REJECTED", "Error": "Email address is not verified."}
    entries[3] = {"Status": "ACCOUNT_THROTTLED", "Error": "Maximum sending rate exceeded."}
    server.respond(200, {"BulkEmailEntryResults": entries})
    messages = [
        template_message(to=f"p{i}@example.com", reference=f"dlv_{i}") for i in range(5)
    ]
    adapter = ses(server, context)
    assert adapter.batch_key(text_message()) is None  # SendBulkEmail takes templates only
    results = await adapter.send_batch(messages)
    request = server.requests[0]
    assert_valid_aws(
        "aws-ses-sns/botocore-sesv2-2019-09-27.service-2.json", "SendBulkEmail", request
    )
    body = request.json()
    assert body["DefaultContent"]["Template"]["TemplateName"] == "appointment-confirmed"
    assert body["ConfigurationSetName"] == "clinic-a-events"
    assert [e["ReplacementTags"] for e in body["BulkEmailEntries"]] == [
        [{"Name": "ref", "Value": f"dlv_{i}"}] for i in range(5)
    ]
    data = json.loads(
        body["BulkEmailEntries"][0]["ReplacementEmailContent"]["ReplacementTemplate"][
            "ReplacementTemplateData"
        ]
    )
    assert data == {"time": "10:30", "clinic": "Clinic A"}
    assert [type(r).__name__ for r in results] == [
        "SendResult", "RecipientError", "SendResult", "RateLimitedError", "SendResult"
    ]
    assert [r.provider_message_id for r in results if isinstance(r, SendResult)] == [
        "ses-0", "ses-2", "ses-4"
    ]
