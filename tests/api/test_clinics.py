"""Clinics endpoints: masking round trip, 422 paths, ETag/If-Match, merge patch, 404/409."""

from __future__ import annotations

import copy
import re

import pytest

from clinicomm.providers.base import MASK
from tests.api.conftest import Api, clinic_settings, create_clinic
from tests.conftest import canary

C = "/api/v1/clinics"


async def test_get_edit_put_back_keeps_secrets(api: Api) -> None:
    await create_clinic(api, "clinic-a")
    before = await api.stored("clinic-a")
    got = await api.client.get(f"{C}/clinic-a", headers=api.admin)
    assert got.status_code == 200 and got.headers["etag"] == '"1"'
    body = got.json()
    comm = body["settings"]["communicationSettings"]
    assert comm["email"]["primary"]["credentials"]["password"] == MASK
    assert comm["whatsapp"]["primary"]["credentials"]["apiKey"] == MASK
    assert comm["whatsapp"]["primary"]["credentials"]["appSecret"] == MASK
    # One non-secret field that is not an endpoint (a changed host/port needs the secret again).
    comm["email"]["primary"]["credentials"]["maxConnections"] = 3
    put = await api.client.put(
        f"{C}/clinic-a",
        json={"settings": body["settings"]},
        headers={**api.admin, "If-Match": got.headers["etag"]},
    )
    assert put.status_code == 200, put.text
    assert put.headers["etag"] == '"2"' and put.json()["version"] == 2
    assert put.json()["settings"]["communicationSettings"]["email"]["primary"]["credentials"][
        "password"
    ] == MASK
    after = await api.stored("clinic-a")
    b, a = before.communication, after.communication
    assert a["email"]["primary"]["credentials"]["maxConnections"] == 3
    for channel, field in (("email", "password"), ("whatsapp", "apiKey"), ("whatsapp", "appSecret")):
        old = b[channel]["primary"]["credentials"][field]
        assert old.startswith("CANARY-")
        assert a[channel]["primary"]["credentials"][field] == old


async def test_put_with_new_secret_replaces_it(api: Api) -> None:
    await create_clinic(api, "clinic-a")
    settings = clinic_settings("a")
    new = canary("smtp-new")
    settings["communicationSettings"]["email"]["primary"]["credentials"]["password"] = new
    put = await api.client.put(f"{C}/clinic-a", json={"settings": settings}, headers=api.admin)
    assert put.status_code == 200
    stored = await api.stored("clinic-a")
    assert stored.communication["email"]["primary"]["credentials"]["password"] == new


async def test_invalid_put_lists_every_problem_and_changes_nothing(api: Api) -> None:
    await create_clinic(api, "clinic-a")
    before = await api.stored("clinic-a")
    settings = copy.deepcopy(before.settings)
    email = settings["communicationSettings"]["email"]
    email["primary"]["credentials"]["port"] = "not-a-port"
    del email["primary"]["credentials"]["host"]
    settings["communicationSettings"]["whatsapp"]["primary"]["provider"] = "carrier-pigeon"
    settings["communicationSettings"]["sms"] = {"maxSegments": 99}
    answer = await api.client.put(f"{C}/clinic-a", json={"settings": settings}, headers=api.admin)
    assert answer.status_code == 422
    error = answer.json()["error"]
    assert error["code"] == "validation_error"
    paths = {d["path"] for d in error["details"]}
    prefix = "settings.communicationSettings"
    assert paths == {
        f"{prefix}.email.primary.credentials.port",
        f"{prefix}.email.primary.credentials.host",
        f"{prefix}.whatsapp.primary.provider",
        f"{prefix}.sms.maxSegments",
    }, error["details"]
    assert all(set(d) == {"path", "message", "type"} for d in error["details"])
    after = await api.stored("clinic-a")
    assert after.version == before.version == 1
    assert after.settings == before.settings


@pytest.mark.parametrize(
    ("body", "paths"),
    [
        ({"settings": {}, "bogus": 1}, {"bogus"}),
        ({}, {"settings"}),
        ({"settings": {}, "name": ""}, {"name"}),
        ({"settings": "nope"}, {"settings"}),
        (
            {"settings": {"communicationSettings": {"email": {"primary": {"provider": "smtp",
             "credentials": {"host": "h", "port": 70000}}}}}},
            {"settings.communicationSettings.email.primary.credentials.port"},
        ),
    ],
)
async def test_request_validation_paths(api: Api, body: dict[str, object], paths: set[str]) -> None:
    await create_clinic(api, "clinic-a")
    answer = await api.client.put(f"{C}/clinic-a", json=body, headers=api.admin)
    assert answer.status_code == 422, answer.text
    assert {d["path"] for d in answer.json()["error"]["details"]} == paths
    assert (await api.stored("clinic-a")).version == 1


async def test_create_validation_and_conflicts(api: Api) -> None:
    bad_id = await api.client.post(
        C, json={"id": "-bad id", "name": "X", "settings": {}}, headers=api.admin
    )
    assert bad_id.status_code == 422
    assert [d["path"] for d in bad_id.json()["error"]["details"]] == ["id"]
    malformed = await api.client.post(
        C, content=b"{not json", headers={**api.admin, "Content-Type": "application/json"}
    )
    assert malformed.status_code == 422 and malformed.json()["error"]["code"] == "validation_error"
    generated = await api.client.post(C, json={"name": "No Id"}, headers=api.admin)
    assert generated.status_code == 201
    new_id = generated.json()["id"]
    assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}", new_id)
    assert generated.headers["location"] == f"{C}/{new_id}"
    again = await api.client.post(C, json={"id": new_id, "name": "Dup"}, headers=api.admin)
    assert again.status_code == 409 and again.json()["error"]["code"] == "conflict"


async def test_mask_without_stored_secret_is_422(api: Api) -> None:
    await create_clinic(api, "clinic-a", {})
    settings = clinic_settings("a")
    settings["communicationSettings"]["email"]["primary"]["credentials"]["password"] = MASK
    answer = await api.client.put(f"{C}/clinic-a", json={"settings": settings}, headers=api.admin)
    assert answer.status_code == 422
    assert [d["path"] for d in answer.json()["error"]["details"]] == [
        "settings.communicationSettings.email.primary.credentials.password"
    ]


async def test_if_match(api: Api) -> None:
    await create_clinic(api, "clinic-a")
    stale = {**api.admin, "If-Match": '"7"'}
    for method, path, body in (
        ("PUT", f"{C}/clinic-a", {"settings": {}}),
        ("PATCH", f"{C}/clinic-a", {"name": "Renamed"}),
        ("DELETE", f"{C}/clinic-a/communication-settings", None),
        ("DELETE", f"{C}/clinic-a/communication-settings/email", None),
    ):
        answer = await api.client.request(method, path, json=body, headers=stale)
        assert answer.status_code == 412, (method, path, answer.text)
        assert answer.json()["error"]["code"] == "version_conflict"
    garbage = await api.client.put(
        f"{C}/clinic-a", json={"settings": {}}, headers={**api.admin, "If-Match": "xyz"}
    )
    assert garbage.status_code == 412
    assert (await api.stored("clinic-a")).version == 1
    ok = await api.client.patch(
        f"{C}/clinic-a", json={"name": "Renamed"}, headers={**api.admin, "If-Match": 'W/"1"'}
    )
    assert ok.status_code == 200 and ok.json()["name"] == "Renamed" and ok.headers["etag"] == '"2"'


async def test_merge_patch(api: Api) -> None:
    await create_clinic(api, "clinic-a")
    before = await api.stored("clinic-a")
    # null removes a member; masks left in place keep the stored secrets.
    answer = await api.client.patch(
        f"{C}/clinic-a",
        content=b'{"settings": {"communicationSettings": {"whatsapp": null, '
        b'"email": {"primary": {"credentials": {"maxConnections": 3, "secure": true}}}}}}',
        headers={**api.admin, "Content-Type": "application/merge-patch+json"},
    )
    assert answer.status_code == 200, answer.text
    after = await api.stored("clinic-a")
    assert "whatsapp" not in after.communication
    creds = after.communication["email"]["primary"]["credentials"]
    assert creds["maxConnections"] == 3 and creds["secure"] is True
    assert creds["password"] == before.communication["email"]["primary"]["credentials"]["password"]
    # A new secret through a patch is stored.
    new = canary("patched")
    answer = await api.client.patch(
        f"{C}/clinic-a",
        json={"settings": {"communicationSettings": {"email": {"primary": {"credentials": {"password": new}}}}}},
        headers=api.admin,
    )
    assert answer.status_code == 200
    stored = await api.stored("clinic-a")
    assert stored.communication["email"]["primary"]["credentials"]["password"] == new
    # Invalid result: 422 with the path, nothing stored; removing the name is refused.
    bad = await api.client.patch(
        f"{C}/clinic-a",
        json={"settings": {"communicationSettings": {"email": {"primary": {"credentials": {"port": -1}}}}}},
        headers=api.admin,
    )
    assert bad.status_code == 422
    assert [d["path"] for d in bad.json()["error"]["details"]] == [
        "settings.communicationSettings.email.primary.credentials.port"
    ]
    no_name = await api.client.patch(f"{C}/clinic-a", json={"name": None}, headers=api.admin)
    assert no_name.status_code == 422
    assert (await api.stored("clinic-a")).version == stored.version


async def test_unknown_clinic_is_404_everywhere(api: Api) -> None:
    for method, path, body in (
        ("GET", f"{C}/nope", None),
        ("PUT", f"{C}/nope", {"settings": {}}),
        ("PATCH", f"{C}/nope", {"name": "x"}),
        ("DELETE", f"{C}/nope/communication-settings", None),
        ("DELETE", f"{C}/nope/communication-settings/sms", None),
        ("GET", f"{C}/nope/audit", None),
    ):
        answer = await api.client.request(method, path, json=body, headers=api.admin)
        assert answer.status_code == 404, (method, path, answer.text)
        assert answer.json()["error"]["code"] == "clinic_not_found"


async def test_unknown_channel_and_routes(api: Api) -> None:
    await create_clinic(api, "clinic-a")
    answer = await api.client.delete(f"{C}/clinic-a/communication-settings/pigeon", headers=api.admin)
    assert answer.status_code == 422
    assert [d["path"] for d in answer.json()["error"]["details"]] == ["path.channel"]
    missing = await api.client.get("/api/v1/nothing-here")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    wrong = await api.client.post(f"{C}/clinic-a", json={}, headers=api.admin)
    assert wrong.status_code == 405 and wrong.json()["error"]["code"] == "method_not_allowed"
