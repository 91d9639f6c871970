"""Input is bounded and refused with a path, never a 5xx: control characters in one-line
fields, body size (413 while the body is read, webhooks included), JSON nesting, `metadata`
size, credentials of a disabled slot, unknown credentials fields."""

from __future__ import annotations

import copy
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.api.conftest import Api, clinic_settings, create_clinic
from tests.api.test_communications import body

SEND = "/api/v1/communications"


def paths(answer: Any) -> set[str]:
    return {d["path"] for d in answer.json()["error"]["details"]}


@pytest.fixture
async def clinic(api: Api) -> None:
    await create_clinic(api, "clinic-a")


@pytest.mark.parametrize(
    ("change", "path"),
    [
        ({"title": "Your result for Jane Roe\nBcc: attacker@evil.example"}, "title"),
        ({"title": "Line\rbreak"}, "title"),
        ({"title": "tab\there"}, "title"),
        ({"title": "nul\x00"}, "title"),
        ({"title": "sep\u2028x"}, "title"),
        ({"category": "A\nB"}, "category"),
        ({"recipients": [{"email": "a@example.com\nBcc: x@evil.example"}]}, "recipients.0.email"),
        ({"recipients": [{"phone": "+14155552671\r\n"}]}, "recipients.0.phone"),
        ({"recipients": [{"whatsapp": "+1415\n5552671"}]}, "recipients.0.whatsapp"),
    ],
)
async def test_control_characters_in_one_line_fields_are_422(
    api: Api, clinic: None, change: dict[str, Any], path: str
) -> None:
    answer = await api.client.post(SEND, json=body(**change), headers=api.admin)
    assert answer.status_code == 422, answer.text
    assert path in paths(answer)
    assert "evil" not in answer.text  # the refused value is never echoed


async def test_a_body_may_hold_newlines(api: Api, clinic: None) -> None:
    answer = await api.client.post(SEND, json=body(body="line one\nline two\r\n"), headers=api.admin)
    assert answer.status_code == 202, answer.text


@pytest.mark.parametrize("field", ["defaultFrom", "defaultFromName"])
async def test_sender_with_a_line_break_is_422(api: Api, field: str) -> None:
    settings = clinic_settings("cr")
    settings["communicationSettings"]["email"][field] = "Clinic\r\nBcc: x@evil.example"
    answer = await api.client.post(
        "/api/v1/clinics", json={"id": "clinic-cr", "name": "C", "settings": settings}, headers=api.admin
    )
    assert answer.status_code == 422, answer.text
    assert f"settings.communicationSettings.email.{field}" in paths(answer)


async def test_credentials_from_email_with_a_line_break_is_422(api: Api) -> None:
    settings = {
        "communicationSettings": {
            "email": {
                "primary": {
                    "provider": "sendgrid",
                    "credentials": {"apiKey": "SG.k", "fromEmail": "a@x.example\nBcc: b@evil.example"},
                }
            }
        }
    }
    answer = await api.client.post(
        "/api/v1/clinics", json={"id": "clinic-cr", "name": "C", "settings": settings}, headers=api.admin
    )
    assert answer.status_code == 422, answer.text
    assert "settings.communicationSettings.email.primary.credentials.fromEmail" in paths(answer)


async def test_disabled_slot_takes_no_credentials(api: Api) -> None:
    settings = {
        "communicationSettings": {
            "email": {"primary": {"provider": "disabled", "credentials": {"apiKey": "SG.parked-secret"}}}
        }
    }
    answer = await api.client.post(
        "/api/v1/clinics", json={"id": "clinic-d", "name": "D", "settings": settings}, headers=api.admin
    )
    assert answer.status_code == 422, answer.text
    assert "parked-secret" not in answer.text
    assert any(p.startswith("settings.communicationSettings.email.primary.credentials") for p in paths(answer))
    settings["communicationSettings"]["email"]["primary"] = {"provider": "disabled"}
    answer = await api.client.post(
        "/api/v1/clinics", json={"id": "clinic-d", "name": "D", "settings": settings}, headers=api.admin
    )
    assert answer.status_code == 201, answer.text


async def test_unknown_credentials_field_is_422_with_its_path(api: Api) -> None:
    settings = clinic_settings("u")
    settings["communicationSettings"]["email"]["primary"]["credentials"]["apiKey"] = "hidden"
    answer = await api.client.post(
        "/api/v1/clinics", json={"id": "clinic-u", "name": "U", "settings": settings}, headers=api.admin
    )
    assert answer.status_code == 422, answer.text
    assert "settings.communicationSettings.email.primary.credentials.apiKey" in paths(answer)


async def test_body_over_the_limit_is_413(api: Api, clinic: None) -> None:
    big = body(body="x" * 50, html="<p>" + "y" * (api.settings.max_body_bytes + 10) + "</p>")
    answer = await api.client.post(SEND, json=big, headers=api.admin)
    assert answer.status_code == 413, answer.text[:200]
    assert answer.json()["error"]["code"] == "payload_too_large"


async def _chunks(total: int, size: int = 64 * 1024) -> AsyncIterator[bytes]:
    yield b'{"body": "'
    sent = 0
    while sent < total:
        yield b"z" * size
        sent += size
    yield b'"}'


async def test_body_limit_is_enforced_while_reading_without_content_length(
    api: Api, clinic: None
) -> None:
    headers = {**api.admin, "Content-Type": "application/json"}
    answer = await api.client.post(
        SEND, content=_chunks(api.settings.max_body_bytes + 1), headers=headers
    )
    assert "content-length" not in {k.lower() for k in answer.request.headers}
    assert answer.status_code == 413, answer.text[:200]
    assert answer.json()["error"]["code"] == "payload_too_large"


async def test_webhook_body_over_one_mib_is_413_while_reading(api: Api, clinic: None) -> None:
    url = "/api/v1/webhooks/meta_business/clinic-a"
    answer = await api.client.post(
        url, content=_chunks(1024 * 1024 + 1), headers={"Content-Type": "application/json"}
    )
    assert answer.status_code == 413, answer.text[:200]
    answer = await api.client.post(
        url, content=b"x" * (1024 * 1024 + 1), headers={"Content-Type": "text/plain"}
    )
    assert answer.status_code == 413


def nested(depth: int) -> Any:
    value: Any = "leaf"
    for _ in range(depth):
        value = {"k": value}
    return value


async def test_json_deeper_than_32_levels_is_422_with_path(api: Api, clinic: None) -> None:
    answer = await api.client.post(SEND, json=body(metadata={"clinicId": "clinic-a", "x": nested(900)}), headers=api.admin)
    assert answer.status_code == 422, answer.text[:300]
    path = next(iter(paths(answer)))
    assert path.startswith("metadata.x.k.k"), path
    settings = {"communicationSettings": {"email": nested(600)}}
    answer = await api.client.put("/api/v1/clinics/clinic-a", json={"settings": settings}, headers=api.admin)
    assert answer.status_code == 422, answer.text[:300]
    assert next(iter(paths(answer))).startswith("settings.communicationSettings.email.k")
    # Deeper than the parser itself goes: still a 422, at the root.
    raw = b'{"a":' * 2000 + b"1" + b"}" * 2000
    answer = await api.client.post(SEND, content=raw, headers={**api.admin, "Content-Type": "application/json"})
    assert answer.status_code == 422
    # 32 levels are fine (the document itself is level 1).
    ok = body(metadata={"clinicId": "clinic-a", "x": "y"})
    ok["template"] = None
    answer = await api.client.post(SEND, json=ok, headers=api.admin)
    assert answer.status_code == 202


async def test_metadata_is_limited_in_keys_and_size(api: Api, clinic: None) -> None:
    many = {"clinicId": "clinic-a", **{f"k{i}": "v" for i in range(50)}}
    answer = await api.client.post(SEND, json=body(metadata=many), headers=api.admin)
    assert answer.status_code == 422, answer.text
    assert paths(answer) == {"metadata"}
    large = {"clinicId": "clinic-a", "note": "n" * (8 * 1024)}
    answer = await api.client.post(SEND, json=body(metadata=large), headers=api.admin)
    assert answer.status_code == 422, answer.text
    assert paths(answer) == {"metadata"}
    fits = {"clinicId": "clinic-a", **{f"k{i}": "v" for i in range(49)}}
    answer = await api.client.post(SEND, json=body(metadata=copy.deepcopy(fits)), headers=api.admin)
    assert answer.status_code == 202, answer.text


@pytest.mark.parametrize("depth", [1, 5, 31, 32, 33, 40])
def test_depth_check_without_a_parse_agrees_with_the_walk(depth: int) -> None:
    """`too_deep` skips parsing when the body has too few brackets to be too deep, and walks
    without paths first: the answers are those of the full walk."""
    from clinicomm.api.limits import MAX_JSON_DEPTH, too_deep

    body = json.dumps(nested(depth)).encode()
    found = too_deep(body, MAX_JSON_DEPTH)
    assert (found is None) is (depth <= MAX_JSON_DEPTH)
    # Brackets inside strings are not nesting.
    assert too_deep(json.dumps({"a": "[" * 100}).encode(), MAX_JSON_DEPTH) is None


def _reference_depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max(map(_reference_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(_reference_depth, value), default=0)
    return 0


@pytest.mark.parametrize("deep", [0, 27, 28, 29, 35])
def test_depth_check_of_a_wide_document_finds_its_one_deep_branch(deep: int) -> None:
    """A batch-shaped body (many shallow items in lists and objects, empty ones too) with one
    item `deep` levels further down: refused exactly when the whole is deeper than 32, at that
    item's path."""
    from clinicomm.api.limits import MAX_JSON_DEPTH, too_deep

    items: list[Any] = [
        {"recipients": [{"email": f"p{i}@example.com"}], "channels": ["email"], "m": {}, "e": []}
        for i in range(300)
    ]
    items[217]["metadata"] = {"x": [nested(deep)]}
    document = {"items": items}
    found = too_deep(json.dumps(document).encode(), MAX_JSON_DEPTH)
    if _reference_depth(document) <= MAX_JSON_DEPTH:
        assert found is None
    else:
        assert found is not None and found.startswith("items.217.metadata.x.0.k"), found
