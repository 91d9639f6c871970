"""The audit log: one entry per change, written with the change, newest first, secrets redacted."""

from __future__ import annotations

from sqlalchemy import func, select

from clinicomm.providers.base import MASK
from clinicomm.store.models import AuditEntry
from tests.api.conftest import Api, clinic_settings, create_clinic
from tests.conftest import canary

C = "/api/v1/clinics"


async def _count(api: Api) -> int:
    async with api.runtime.db.sessions() as session:
        return int(await session.scalar(select(func.count()).select_from(AuditEntry)) or 0)


async def test_every_change_is_audited_newest_first(api: Api) -> None:
    await create_clinic(api, "clinic-a")
    admin = api.auth("ClinicAdmin", "clinic-a", sub="alice")
    settings = clinic_settings("a")
    settings["communicationSettings"]["email"]["primary"]["credentials"]["password"] = canary("new")
    settings["communicationSettings"]["email"]["defaultFrom"] = "changed@clinic.example"
    put = await api.client.put(
        f"{C}/clinic-a",
        json={"settings": settings, "name": "Clinic A2"},
        headers={**admin, "X-Request-ID": "req-put-1"},
    )
    assert put.status_code == 200 and put.headers["x-request-id"] == "req-put-1"
    patch = await api.client.patch(f"{C}/clinic-a", json={"name": "Clinic A3"}, headers=admin)
    delete_one = await api.client.delete(f"{C}/clinic-a/communication-settings/whatsapp", headers=admin)
    delete_all = await api.client.delete(f"{C}/clinic-a/communication-settings", headers=admin)
    assert {patch.status_code, delete_one.status_code, delete_all.status_code} == {200}

    page = await api.client.get(f"{C}/clinic-a/audit", headers=admin)
    assert page.status_code == 200
    items = page.json()["items"]
    assert [i["action"] for i in items] == [
        "settings.delete",
        "settings.delete.whatsapp",
        "settings.patch",
        "settings.update",
        "clinic.create",
    ]
    assert page.json()["nextCursor"] is None
    update = items[3]
    assert update["actor"] == "alice" and update["role"] == "ClinicAdmin"
    assert update["requestId"] == "req-put-1" and update["clinicId"] == "clinic-a"
    assert update["diff"]["name"] == {"from": "Clinic-A", "to": "Clinic A2"}
    changes = {c["path"]: c for c in update["diff"]["communicationSettings"]}
    assert changes["email.primary.credentials.password"] == {
        "path": "email.primary.credentials.password",
        "op": "replace",
        "secret": True,
    }
    assert changes["email.defaultFrom"]["to"] == "changed@clinic.example"
    assert items[4]["actor"] == "root" and items[4]["role"] == "SuperAdmin"
    # Removed sub-documents show their secrets masked, never in clear.
    removed = {c["path"]: c for c in items[1]["diff"]["communicationSettings"]}
    assert removed["whatsapp"]["op"] == "remove"
    assert removed["whatsapp"]["from"]["primary"]["credentials"]["apiKey"] == MASK
    assert patch.headers["x-request-id"] == items[2]["requestId"]


async def test_pagination(api: Api) -> None:
    await create_clinic(api, "clinic-a")
    for n in range(4):
        answer = await api.client.patch(f"{C}/clinic-a", json={"name": f"N{n}"}, headers=api.admin)
        assert answer.status_code == 200
    seen: list[int] = []
    cursor = None
    pages = 0
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = (await api.client.get(f"{C}/clinic-a/audit", params=params, headers=api.admin)).json()
        seen += [i["id"] for i in page["items"]]
        pages += 1
        cursor = page["nextCursor"]
        if cursor is None:
            break
    assert pages == 3 and len(seen) == 5 and seen == sorted(seen, reverse=True)
    bad = await api.client.get(f"{C}/clinic-a/audit", params={"cursor": "x"}, headers=api.admin)
    assert bad.status_code == 422
    assert [d["path"] for d in bad.json()["error"]["details"]] == ["query.cursor"]


async def test_failed_change_writes_no_audit_and_audit_is_read_only(api: Api) -> None:
    await create_clinic(api, "clinic-a")
    assert await _count(api) == 1
    bad = await api.client.put(
        f"{C}/clinic-a",
        json={"settings": {"communicationSettings": {"email": {"primary": {"provider": "nope"}}}}},
        headers=api.admin,
    )
    assert bad.status_code == 422
    stale = await api.client.put(
        f"{C}/clinic-a", json={"settings": {}}, headers={**api.admin, "If-Match": '"9"'}
    )
    assert stale.status_code == 412
    assert await _count(api) == 1
    for method in ("POST", "PUT", "PATCH", "DELETE"):
        answer = await api.client.request(method, f"{C}/clinic-a/audit", headers=api.admin)
        assert answer.status_code == 405
    assert await _count(api) == 1


async def test_audit_other_clinic_entries_not_shown(api: Api) -> None:
    await create_clinic(api, "clinic-a")
    await create_clinic(api, "clinic-b")
    page = await api.client.get(f"{C}/clinic-b/audit", headers=api.auth("ClinicAdmin", "clinic-b"))
    assert [i["clinicId"] for i in page.json()["items"]] == ["clinic-b"]
