"""Every role x every clinics endpoint x own clinic / other clinic, plus no token, an expired
token and a bad signature on every endpoint: each cell's status and (when allowed) its effect,
(when refused) that nothing changed."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import jwt
import pytest

from clinicomm.providers.base import MASK
from tests.api.conftest import Api, clinic_settings, create_clinic

OWN, OTHER = "clinic-own", "clinic-other"
NEW = "clinic-new"

ALL = {"create", "get", "put", "patch", "delete_all", "delete_channel", "audit"}
CLINIC_ADMIN = ALL - {"create"}

#: role -> endpoints allowed on its own clinic / on another clinic (API.md's role table).
ALLOWED: dict[str, tuple[set[str], set[str]]] = {
    "SuperAdmin": (ALL, ALL),
    "ClinicAdmin": (CLINIC_ADMIN, set()),
    "ClinicManager": ({"get"}, set()),
    "Service": (set(), set()),
    "Doctor": (set(), set()),
    "Patient": (set(), set()),
}


@dataclass
class Endpoint:
    method: str
    path: str  # {c} is the target clinic
    body: dict[str, Any] | None
    ok: int
    effect: Callable[[Api, str, Any], Awaitable[None]]
    unchanged: Callable[[Api, str], Awaitable[None]]


async def _version_is_1(api: Api, clinic: str) -> None:
    stored = await api.stored(clinic)
    assert stored.version == 1
    assert stored.communication is not None and set(stored.communication) >= {"email", "whatsapp"}


async def _not_created(api: Api, clinic: str) -> None:
    from clinicomm.settings.service import ClinicNotFoundError

    with pytest.raises(ClinicNotFoundError):
        await api.stored(clinic)


async def _created(api: Api, clinic: str, body: Any) -> None:
    assert body["id"] == clinic and body["version"] == 1
    stored = await api.stored(clinic)
    assert stored.communication["email"]["defaultFrom"] == "new@clinic.example"


async def _got(api: Api, clinic: str, body: Any) -> None:
    creds = body["settings"]["communicationSettings"]["email"]["primary"]["credentials"]
    assert creds["password"] == MASK and creds["host"] == "smtp.example.org"
    assert body["id"] == clinic and body["version"] == 1


async def _replaced(api: Api, clinic: str, body: Any) -> None:
    assert body["version"] == 2
    stored = await api.stored(clinic)
    assert stored.version == 2
    assert stored.communication["email"]["defaultFrom"] == "put@clinic.example"
    assert "whatsapp" not in stored.communication


async def _patched(api: Api, clinic: str, body: Any) -> None:
    assert body["version"] == 2
    stored = await api.stored(clinic)
    assert stored.communication["email"]["defaultFrom"] == "patched@clinic.example"
    assert stored.communication["email"]["primary"]["credentials"]["password"].startswith("CANARY-")


async def _all_deleted(api: Api, clinic: str, body: Any) -> None:
    assert body["version"] == 2 and "communicationSettings" not in body["settings"]
    assert (await api.stored(clinic)).communication is None


async def _channel_deleted(api: Api, clinic: str, body: Any) -> None:
    stored = await api.stored(clinic)
    assert body["version"] == 2
    assert "whatsapp" not in stored.communication and "email" in stored.communication


async def _audited(api: Api, clinic: str, body: Any) -> None:
    assert [item["action"] for item in body["items"]] == ["clinic.create"]
    assert body["items"][0]["clinicId"] == clinic


PUT_BODY = {
    "settings": {
        "communicationSettings": {
            "email": {
                "primary": {
                    "provider": "smtp",
                    "credentials": {"host": "smtp.example.org", "port": 587, "password": MASK},
                },
                "defaultFrom": "put@clinic.example",
            }
        }
    }
}
PATCH_BODY = {"settings": {"communicationSettings": {"email": {"defaultFrom": "patched@clinic.example"}}}}

ENDPOINTS: dict[str, Endpoint] = {
    "create": Endpoint("POST", "/api/v1/clinics", None, 201, _created, _not_created),
    "get": Endpoint("GET", "/api/v1/clinics/{c}", None, 200, _got, _version_is_1),
    "put": Endpoint("PUT", "/api/v1/clinics/{c}", PUT_BODY, 200, _replaced, _version_is_1),
    "patch": Endpoint("PATCH", "/api/v1/clinics/{c}", PATCH_BODY, 200, _patched, _version_is_1),
    "delete_all": Endpoint(
        "DELETE", "/api/v1/clinics/{c}/communication-settings", None, 200, _all_deleted, _version_is_1
    ),
    "delete_channel": Endpoint(
        "DELETE",
        "/api/v1/clinics/{c}/communication-settings/whatsapp",
        None,
        200,
        _channel_deleted,
        _version_is_1,
    ),
    "audit": Endpoint("GET", "/api/v1/clinics/{c}/audit", None, 200, _audited, _version_is_1),
}


async def _call(api: Api, name: str, target: str, headers: dict[str, str]) -> Any:
    endpoint = ENDPOINTS[name]
    if name == "create":
        body: Any = {"id": target, "name": "New", "settings": clinic_settings("new")}
        body["settings"]["communicationSettings"]["email"]["defaultFrom"] = "new@clinic.example"
        return await api.client.post(endpoint.path, json=body, headers=headers)
    return await api.client.request(
        endpoint.method, endpoint.path.format(c=target), json=endpoint.body, headers=headers
    )


@pytest.fixture
async def two_clinics(api: Api) -> Api:
    await create_clinic(api, OWN)
    await create_clinic(api, OTHER)
    return api


CELLS = [
    (role, name, scope)
    for role in ALLOWED
    for name in ENDPOINTS
    for scope in ("own", "other")
]


@pytest.mark.parametrize(("role", "endpoint", "scope"), CELLS)
async def test_role_matrix(two_clinics: Api, role: str, endpoint: str, scope: str) -> None:
    api = two_clinics
    own_allowed, other_allowed = ALLOWED[role]
    allowed = endpoint in (own_allowed if scope == "own" else other_allowed)
    if endpoint == "create":
        # "own": the token names the clinic being created; "other": it names another clinic.
        target, claim = NEW, (NEW if scope == "own" else OWN)
    else:
        target, claim = (OWN if scope == "own" else OTHER), OWN
    answer = await _call(api, endpoint, target, api.auth(role, claim, sub=f"{role}-user"))
    cell = ENDPOINTS[endpoint]
    if allowed:
        assert answer.status_code == cell.ok, answer.text
        if endpoint != "audit":
            assert answer.headers["etag"] == f'"{answer.json()["version"]}"'
        await cell.effect(api, target, answer.json())
    else:
        assert answer.status_code == 403, answer.text
        assert answer.json()["error"]["code"] == "forbidden"
        await cell.unchanged(api, target)


def _expired(api: Api) -> str:
    return api.token("SuperAdmin", ttl=-120)


def _bad_signature(api: Api) -> str:
    now = int(time.time())
    claims = {"sub": "mallory", "role": "SuperAdmin", "exp": now + 600}
    return jwt.encode(claims, "another-secret-" + "y" * 32, algorithm="HS256")


BAD_TOKENS: dict[str, Callable[[Api], str | None]] = {
    "no_token": lambda api: None,
    "expired": _expired,
    "bad_signature": _bad_signature,
}


@pytest.mark.parametrize("endpoint", list(ENDPOINTS))
@pytest.mark.parametrize("kind", list(BAD_TOKENS))
async def test_unauthenticated_matrix(two_clinics: Api, endpoint: str, kind: str) -> None:
    api = two_clinics
    token = BAD_TOKENS[kind](api)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    target = NEW if endpoint == "create" else OWN
    answer = await _call(api, endpoint, target, headers)
    assert answer.status_code == 401, answer.text
    assert answer.headers["www-authenticate"] == "Bearer"
    assert answer.json()["error"]["code"] == "unauthorized"
    await ENDPOINTS[endpoint].unchanged(api, target)


# ---- issue 13: claims that must not widen a scope ------------------------------------------
#: (role, clinic_id claim, extra claims) -> what the token may do on the communications
#: endpoints of OWN and OTHER: send, list (without clinicId: which clinics appear), read one.
#: "401" marks a token refused outright (`clinic_ids` on a role other than Service).
CLAIM_CELLS: list[tuple[str, str | None, dict[str, Any], str | dict[str, Any]]] = [
    ("Doctor", None, {"clinic_ids": [OTHER]}, "401"),
    ("Patient", None, {"clinic_ids": [OTHER]}, "401"),
    ("ClinicAdmin", OWN, {"clinic_ids": [OTHER]}, "401"),
    ("ClinicManager", OWN, {"clinic_ids": [OTHER]}, "401"),
    ("SuperAdmin", None, {"clinic_ids": [OTHER]}, "401"),
    ("Doctor", None, {}, {"send": set(), "list": None, "read": set()}),
    ("Doctor", OTHER, {}, {"send": set(), "list": None, "read": set()}),
    ("ClinicAdmin", OWN, {}, {"send": {OWN}, "list": {OWN}, "read": {OWN}}),
    ("ClinicManager", OWN, {}, {"send": set(), "list": {OWN}, "read": {OWN}}),
    ("Service", OWN, {}, {"send": {OWN}, "list": {OWN}, "read": {OWN}}),
    ("Service", None, {"clinic_ids": [OWN]}, {"send": {OWN}, "list": {OWN}, "read": {OWN}}),
    ("Service", None, {}, {"send": {OWN, OTHER}, "list": {OWN, OTHER}, "read": {OWN, OTHER}}),
    ("SuperAdmin", None, {}, {"send": {OWN, OTHER}, "list": {OWN, OTHER}, "read": {OWN, OTHER}}),
]


def _send_body(clinic: str) -> dict[str, Any]:
    return {
        "category": "APPOINTMENT",
        "title": "t",
        "body": "b",
        "recipients": [{"email": "patient@example.com"}],
        "channels": ["email"],
        "metadata": {"clinicId": clinic},
    }


@pytest.mark.parametrize(("role", "clinic", "extra", "expect"), CLAIM_CELLS)
async def test_claims_cannot_widen_scope(
    two_clinics: Api, role: str, clinic: str | None, extra: dict[str, Any], expect: Any
) -> None:
    api = two_clinics
    # One message per clinic, sent by the platform (so there is something to list and read).
    ids = {}
    for target in (OWN, OTHER):
        sent = await api.client.post("/api/v1/communications", json=_send_body(target), headers=api.admin)
        assert sent.status_code == 202, sent.text
        ids[target] = sent.json()["id"]
    headers = api.auth(role, clinic, **extra)
    if expect == "401":
        for method, path, body in (
            ("GET", "/api/v1/communications", None),
            ("GET", f"/api/v1/communications/{ids[OTHER]}", None),
            ("POST", "/api/v1/communications", _send_body(OTHER)),
            ("GET", f"/api/v1/clinics/{OTHER}", None),
        ):
            answer = await api.client.request(method, path, json=body, headers=headers)
            assert answer.status_code == 401, (method, path, answer.text)
            assert "clinic_ids" in answer.json()["error"]["message"]
        return
    for target in (OWN, OTHER):
        sent = await api.client.post("/api/v1/communications", json=_send_body(target), headers=headers)
        assert sent.status_code == (202 if target in expect["send"] else 403), (target, sent.text)
        read = await api.client.get(f"/api/v1/communications/{ids[target]}", headers=headers)
        assert read.status_code == (200 if target in expect["read"] else 403), (target, read.text)
        listed = await api.client.get(
            "/api/v1/communications", params={"clinicId": target}, headers=headers
        )
        allowed = expect["list"] is not None and target in expect["list"]
        assert listed.status_code == (200 if allowed else 403), (target, listed.text)
    listed = await api.client.get("/api/v1/communications", headers=headers)
    if expect["list"] is None:
        assert listed.status_code == 403, listed.text
    else:
        assert listed.status_code == 200, listed.text
        seen = {item["clinicId"] for item in listed.json()["items"]}
        assert seen <= expect["list"] and seen, (seen, listed.text)
