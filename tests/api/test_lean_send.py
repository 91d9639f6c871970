"""`POST /api/v1/communications` is a lean route (api/lean.py): a valid request is answered
without FastAPI's dependency solving, and anything else falls back to the full handler, so the
error answers are FastAPI's own. The rest of tests/api checks the answers themselves."""

from __future__ import annotations

from typing import Any

import fastapi.routing
import pytest

from clinicomm.api.auth import Role
from tests.api.conftest import Api, create_clinic
from tests.api.test_communications import body, sendgrid_settings

URL = "/api/v1/communications"


@pytest.fixture
def solved(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts FastAPI's dependency solving (its full handler calls it once per request)."""
    calls: list[int] = []
    original = fastapi.routing.solve_dependencies

    async def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return await original(*args, **kwargs)

    monkeypatch.setattr(fastapi.routing, "solve_dependencies", counting)
    return calls


async def test_a_valid_send_skips_the_dependency_machinery(api: Api, solved: list[int]) -> None:
    await create_clinic(api, "clinic-a", sendgrid_settings("http://127.0.0.1:9"))
    solved.clear()
    headers = {**api.auth(Role.SERVICE), "Idempotency-Key": "lean-1"}
    first = await api.client.post(URL, json=body(), headers=headers)
    assert first.status_code == 202, first.text
    again = await api.client.post(URL, json=body(), headers=headers)
    assert again.json() == first.json()  # idempotency, through the lean path too
    other = await api.client.post(URL, json=body(title="Other"), headers=headers)
    assert other.status_code == 409
    assert solved == []
    assert first.headers["cache-control"] == "no-store" and first.headers["x-request-id"]


# `solved`: the full handler solved dependencies (it answers a body that is not JSON before
# solving them); `recipients.0.email` is `accept`'s own check, the same on both paths.
@pytest.mark.parametrize(
    ("change", "status", "path", "full"),
    [
        ({"headers": {}}, 401, None, True),
        ({"headers": {"Authorization": "Bearer not-a-token"}}, 401, None, True),
        ({"json": {**body(), "channels": []}}, 422, "channels", True),
        ({"json": {**body(), "priority": "asap"}}, 422, "priority", True),
        ({"json": {**body(), "recipients": [{"email": "nope"}]}}, 422, "recipients.0.email", False),
        ({"content": b"{not json", "content_type": "application/json"}, 422, None, False),
        ({"content": b"{}", "content_type": "text/plain"}, 422, None, True),
        ({"idempotency_key": "k" * 256}, 422, None, True),
    ],
)
async def test_anything_else_is_answered_by_the_full_handler(
    api: Api,
    solved: list[int],
    change: dict[str, Any],
    status: int,
    path: str | None,
    full: bool,
) -> None:
    await create_clinic(api, "clinic-a", sendgrid_settings("http://127.0.0.1:9"))
    solved.clear()
    headers: dict[str, str] = change.get("headers", api.auth(Role.SERVICE))
    if "idempotency_key" in change:
        headers = {**headers, "Idempotency-Key": change["idempotency_key"]}
    kwargs: dict[str, Any] = {"headers": headers}
    if "content" in change:
        kwargs["content"] = change["content"]
        kwargs["headers"] = {**headers, "Content-Type": change["content_type"]}
    else:
        kwargs["json"] = change.get("json", body())
    answer = await api.client.post(URL, **kwargs)
    assert answer.status_code == status, answer.text
    assert bool(solved) is full
    error = answer.json()["error"]
    if path is not None:
        assert path in [d["path"] for d in error["details"]]


async def test_a_token_without_the_permission_is_refused_on_the_lean_path(
    api: Api, solved: list[int]
) -> None:
    await create_clinic(api, "clinic-a", sendgrid_settings("http://127.0.0.1:9"))
    await create_clinic(api, "clinic-b", sendgrid_settings("http://127.0.0.1:9"))
    answer = await api.client.post(
        URL, json=body("clinic-b"), headers=api.auth(Role.SERVICE, "clinic-a")
    )
    assert answer.status_code == 403
    doctor = await api.client.post(URL, json=body(), headers=api.auth(Role.DOCTOR))
    assert doctor.status_code == 403


async def test_the_lean_answer_is_logged_and_counted_under_the_route_template(
    api: Api, log_records: Any
) -> None:
    from clinicomm.telemetry import metrics

    await create_clinic(api, "clinic-a", sendgrid_settings("http://127.0.0.1:9"))

    def count() -> float:
        return metrics.HTTP_REQUESTS.labels("POST", URL, "202")._value.get()

    before = count()
    answer = await api.client.post(URL, json=body(), headers=api.auth(Role.SERVICE))
    assert answer.status_code == 202
    assert count() == before + 1
    (line,) = [
        r
        for r in log_records.records
        if getattr(r, "event", "") == "http_request" and getattr(r, "status", 0) == 202
    ]
    assert line.route == URL  # type: ignore[attr-defined]


async def test_an_error_raised_on_the_lean_path_gets_the_applications_answer(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The exception table of api.errors applies: a database that is down is a 503."""
    from sqlalchemy.exc import OperationalError

    await create_clinic(api, "clinic-a", sendgrid_settings("http://127.0.0.1:9"))

    async def down(*args: Any, **kwargs: Any) -> Any:
        raise OperationalError("INSERT", {}, Exception("connection refused"))

    monkeypatch.setattr(api.runtime.messaging, "accept_json", down)
    answer = await api.client.post(URL, json=body(), headers=api.auth(Role.SERVICE))
    assert answer.status_code == 503
    assert answer.json()["error"]["code"] == "unavailable"
    assert answer.headers["retry-after"] == "5"


async def test_an_unhandled_error_on_the_lean_path_is_counted_under_the_route_template(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exception without a handler is the request context's 500, and its metric and log
    line name the route template, not "unmatched"."""
    from clinicomm.telemetry import metrics

    await create_clinic(api, "clinic-a", sendgrid_settings("http://127.0.0.1:9"))

    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug")

    def count(route: str) -> float:
        return metrics.HTTP_REQUESTS.labels("POST", route, "500")._value.get()

    before = count(URL), count("unmatched")
    monkeypatch.setattr(api.runtime.messaging, "accept_json", broken)
    answer = await api.client.post(URL, json=body(), headers=api.auth(Role.SERVICE))
    assert answer.status_code == 500
    assert answer.json()["error"]["code"] == "internal_error"
    assert (count(URL), count("unmatched")) == (before[0] + 1, before[1])


async def test_the_lean_path_reads_json_as_the_full_handler_does(
    api: Api, solved: list[int]
) -> None:
    """The lean path parses with pydantic's JSON mode, the full handler with `json.loads`: a
    duplicate key keeps its last value on both (the same request, so the same idempotency
    hash), escapes decode alike, and an integer beyond 64 bits in metadata is refused alike."""
    await create_clinic(api, "clinic-a", sendgrid_settings("http://127.0.0.1:9"))
    headers = {**api.auth(Role.SERVICE), "Idempotency-Key": "dup-1"}
    raw = (
        b'{"category":"APPOINTMENT","title":"First","title":"Caf\\u00e9 \\ud83d\\ude00",'
        b'"body":"Your appointment is confirmed.","channels":["email"],'
        b'"recipients":[{"email":"patient@example.com"}],"metadata":{"clinicId":"clinic-a"}}'
    )
    solved.clear()
    lean = await api.client.post(
        URL, content=raw, headers={**headers, "Content-Type": "application/json"}
    )
    assert lean.status_code == 202, lean.text
    assert solved == []
    same = {
        "category": "APPOINTMENT",
        "title": "Café 😀",
        "body": "Your appointment is confirmed.",
        "channels": ["email"],
        "recipients": [{"email": "patient@example.com"}],
        "metadata": {"clinicId": "clinic-a"},
    }
    again = await api.client.post(URL, json=same, headers=headers)
    assert again.status_code == 202 and again.json() == lean.json()  # not a 409
    big = (
        b'{"body":"x","channels":["email"],"recipients":[{"email":"p@example.com"}],'
        b'"metadata":{"clinicId":"clinic-a","n":123456789012345678901234567890}}'
    )
    refused = await api.client.post(
        URL, content=big, headers={**api.auth(Role.SERVICE), "Content-Type": "application/json"}
    )
    assert refused.status_code == 422
    assert [d["path"] for d in refused.json()["error"]["details"]] == ["metadata"]


BATCH_URL = "/api/v1/communications/batch"


async def test_a_batch_skips_the_dependency_machinery_and_the_second_parse(
    api: Api, solved: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`POST …/batch` is lean too: a valid batch is answered without FastAPI's dependency
    solving, and a batch the depth check parsed (more brackets than its limit) is not parsed
    again (the depth check's document is used)."""
    import orjson

    from clinicomm.api.routers import communications

    await create_clinic(api, "clinic-a", sendgrid_settings("http://127.0.0.1:9"))
    solved.clear()
    parses: list[int] = []

    def counting(data: Any) -> Any:
        parses.append(1)
        return orjson.loads(data)

    monkeypatch.setattr(
        communications,
        "orjson",
        type(
            "O",
            (),
            {
                "loads": staticmethod(counting),
                "dumps": staticmethod(orjson.dumps),
                "JSONDecodeError": orjson.JSONDecodeError,
            },
        ),
    )
    items = [{**body(), "idempotencyKey": f"b-{i}"} for i in range(40)]
    first = await api.client.post(BATCH_URL, json={"items": items}, headers=api.admin)
    assert first.status_code == 202, first.text
    assert [i["status"] for i in first.json()["items"]] == [202] * 40
    assert solved == [] and parses == []
    again = await api.client.post(BATCH_URL, json={"items": items}, headers=api.admin)
    assert again.json()["items"] == first.json()["items"]  # idempotency per item, lean too
    small = await api.client.post(BATCH_URL, json={"items": [body()]}, headers=api.admin)
    assert small.status_code == 202 and parses == [1]  # too few brackets to parse for depth
    assert solved == []


@pytest.mark.parametrize(
    ("change", "status", "full"),
    [
        ({"headers": {}}, 401, True),
        ({"json": [body()]}, 422, True),
        ({"json": {"items": []}}, 422, False),
        ({"json": {"items": [body()], "extra": 1}}, 422, False),
        ({"content": b"{not json", "content_type": "application/json"}, 422, False),
        (
            {
                "content": b'{"items": [{"n": 12345678901234567890123}]}',
                "content_type": "application/json",
            },
            207,
            True,
        ),
    ],
)
async def test_a_batch_the_lean_path_does_not_take_gets_the_routes_answer(
    api: Api, solved: list[int], change: dict[str, Any], status: int, full: bool
) -> None:
    """No token, a body that is not a JSON object, or one with an integer orjson would read
    as a float: the full handler answers, as it always did. A batch the lean path takes but
    refuses answers the same error as the route."""
    await create_clinic(api, "clinic-a", sendgrid_settings("http://127.0.0.1:9"))
    solved.clear()
    kwargs: dict[str, Any] = {"headers": change.get("headers", api.admin)}
    if "content" in change:
        kwargs["content"] = change["content"]
        kwargs["headers"] = {**kwargs["headers"], "Content-Type": change["content_type"]}
    else:
        kwargs["json"] = change.get("json", {"items": [body()]})
    answer = await api.client.post(BATCH_URL, **kwargs)
    assert answer.status_code == status, answer.text
    assert bool(solved) is full


async def test_the_lean_routes_enter_at_the_request_context(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A send skips Starlette's and FastAPI's outer layers (api.app.App) and still gets every
    answer of the stack from the request context in: its id, headers, 413, depth 422, 500;
    other routes take the whole stack."""
    from starlette.middleware.errors import ServerErrorMiddleware

    entered: list[str] = []
    original = ServerErrorMiddleware.__call__

    async def counting(self: Any, scope: Any, receive: Any, send: Any) -> None:
        entered.append(scope["path"])
        await original(self, scope, receive, send)

    monkeypatch.setattr(ServerErrorMiddleware, "__call__", counting)
    await create_clinic(api, "clinic-a", sendgrid_settings("http://127.0.0.1:9"))
    entered.clear()
    auth = api.auth(Role.SERVICE)
    sent = await api.client.post(URL, json=body(), headers={**auth, "X-Request-ID": "lean-id-1"})
    assert sent.status_code == 202, sent.text
    assert sent.headers["x-request-id"] == "lean-id-1"
    assert sent.headers["cache-control"] == "no-store"
    batch = await api.client.post(f"{URL}/batch", json={"items": [body()]}, headers=auth)
    assert batch.status_code == 202, batch.text
    deep: Any = "x"
    for _ in range(40):
        deep = [deep]
    too_deep = await api.client.post(URL, json={**body(), "metadata": {"d": deep}}, headers=auth)
    assert too_deep.status_code == 422
    assert too_deep.json()["error"]["details"][0]["type"] == "too_deep"
    large = await api.client.post(
        URL,
        content=b"{" + b" " * (2 * 1024 * 1024) + b"}",
        headers={**auth, "Content-Type": "application/json"},
    )
    assert large.status_code == 413
    assert large.json()["error"]["code"] == "payload_too_large"
    invalid = await api.client.post(URL, json={**body(), "channels": []}, headers=auth)
    assert invalid.status_code == 422  # FastAPI's own answer, behind the lean dispatch
    assert entered == []
    read = await api.client.get(f"{URL}/{sent.json()['id']}", headers=auth)
    assert read.status_code == 200
    assert entered == [f"{URL}/{sent.json()['id']}"]
