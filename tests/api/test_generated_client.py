"""The contract as a caller sees it: a client generated from `/openapi.json` with
openapi-python-client builds without warnings and a small program type-checks against it with
`mypy --strict`, so an untyped answer (a `dict` or an `additionalProperties` object where a
model belongs) fails the suite. Also: operation ids, one error schema, declared headers, and
docs pages that load nothing from a CDN."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from clinicomm.api.app import create_app
from clinicomm.config import Settings
from tests.api.conftest import Api

PROGRAM = '''
from clinicomm_generated import AuthenticatedClient
from clinicomm_generated.api.clinics import get_clinic, list_clinics
from clinicomm_generated.api.communications import (
    get_communication, list_communications, send_communication,
)
from clinicomm_generated.api.monitoring import (
    get_communication_health, get_communication_stats, list_alerts, test_communication_config,
)
from clinicomm_generated.api.suppressions import list_suppressions
from clinicomm_generated.models import (
    AlertList, ClinicHealth, ClinicList, ClinicStats, ConfigTestRequest, ConfigTestResult,
    DeliveryPage, ErrorAnswer, MessageStatus, SendAccepted, SendRequest, SuppressionList,
)


def use(client: AuthenticatedClient) -> list[object]:
    seen: list[object] = []
    message = get_communication.sync("m-1", client=client)
    if isinstance(message, MessageStatus):
        delivery = message.deliveries[0]
        seen += [message.status, delivery.status, delivery.channel, delivery.attempts[0].provider]
        seen += [c.event_id for c in delivery.callbacks]
    elif isinstance(message, ErrorAnswer):
        seen.append(message.error.code)
    page = list_communications.sync(client=client)
    if isinstance(page, DeliveryPage):
        seen += [page.items[0].message_id, page.next_cursor]
    health = get_communication_health.sync("clinic-a", client=client)
    if isinstance(health, ClinicHealth):
        seen += [h.providers[0].circuit for h in health.channels.additional_properties.values()]
    stats = get_communication_stats.sync("clinic-a", client=client)
    if isinstance(stats, ClinicStats):
        seen += [stats.total, stats.latency[0].p_95_ms, stats.counts[0].count]
    test = test_communication_config.sync(
        "clinic-a", client=client, body=ConfigTestRequest.from_dict({"channel": "email", "to": "a@b.c"})
    )
    if isinstance(test, ConfigTestResult):
        seen += [test.ok, test.tried[0].label]
    alerts = list_alerts.sync(client=client)
    if isinstance(alerts, AlertList):
        seen += [alerts.items[0].rule]
    suppressions = list_suppressions.sync("clinic-a", client=client)
    if isinstance(suppressions, SuppressionList):
        seen += [suppressions.items[0].reason]
    clinics = list_clinics.sync(client=client)
    if isinstance(clinics, ClinicList):
        seen += [clinics.items[0].version]
    clinic = get_clinic.sync("clinic-a", client=client)
    seen.append(clinic)
    accepted = send_communication.sync(
        client=client, body=SendRequest.from_dict({"recipients": [{"email": "a@b.c"}], "channels": ["email"], "body": "x"})
    )
    if isinstance(accepted, SendAccepted):
        seen += [accepted.id, accepted.deliveries[0].status]
    return seen
'''


@pytest.fixture(scope="module")
def spec(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    settings = Settings(jwt_secret="x" * 40, env="test", data_dir=tmp_path_factory.mktemp("d"))
    document: dict[str, Any] = create_app(settings).openapi()
    return document


def test_a_generated_client_builds_and_type_checks(
    spec: dict[str, Any], tmp_path: Path
) -> None:
    generator = shutil.which("openapi-python-client", path=str(Path(sys.executable).parent))
    assert generator, "openapi-python-client (dev extra) is not installed"
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    (tmp_path / "cfg.yaml").write_text("post_hooks: []\npackage_name_override: clinicomm_generated\n")
    out = tmp_path / "pkg" / "clinicomm_generated"
    built = subprocess.run(
        [generator, "generate", "--path", str(tmp_path / "spec.json"), "--meta", "none",
         "--output-path", str(out), "--config", str(tmp_path / "cfg.yaml"), "--fail-on-warning"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    models = sorted(p.stem for p in (out / "models").glob("*.py"))
    assert not [m for m in models if "response" in m or "api_v_1" in m or "_get" in m], models
    (tmp_path / "program.py").write_text(PROGRAM)
    checked = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--follow-imports=silent",
         "--no-incremental", "--cache-dir", os.devnull, str(tmp_path / "program.py")],
        capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "MYPYPATH": str(tmp_path / "pkg")}, cwd=tmp_path,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_spec_has_operation_ids_one_error_schema_and_headers(spec: dict[str, Any]) -> None:
    ops = {op["operationId"]: (path, method, op)
           for path, item in spec["paths"].items() for method, op in item.items()}
    for name in ("sendCommunication", "getCommunication", "listCommunications", "getClinic",
                 "createClinic", "listClinics", "deleteClinic", "receiveWebhook"):
        assert name in ops, sorted(ops)
    assert all("_" not in name for name in ops), sorted(ops)
    schemas = spec["components"]["schemas"]
    assert "HTTPValidationError" not in schemas and "ValidationError" not in schemas
    for name, (_, _, op) in ops.items():
        for code, answer in op["responses"].items():
            assert "X-Request-ID" in answer["headers"], (name, code)
            if code.startswith(("4", "5")):
                assert answer["content"]["application/json"]["schema"] == {
                    "$ref": "#/components/schemas/ErrorAnswer"}, (name, code)
            elif code.startswith("2") and "application/json" in answer.get("content", {}):
                schema = answer["content"]["application/json"]["schema"]
                assert "$ref" in schema or schema.get("type") == "array", (name, code, schema)
    assert "ETag" in ops["getClinic"][2]["responses"]["200"]["headers"]
    assert "Location" in ops["createClinic"][2]["responses"]["201"]["headers"]
    assert "Retry-After" in ops["getCommunication"][2]["responses"]["503"]["headers"]


async def test_docs_pages_load_only_local_assets(api: Api) -> None:
    for page in ("/docs", "/redoc"):
        answer = await api.client.get(page)
        assert answer.status_code == 200, page
        assert "cdn" not in answer.text.lower() and "https://" not in answer.text, page
        for asset in ("swagger-ui-bundle.js", "redoc.standalone.js"):
            if asset in answer.text:
                got = await api.client.get(f"/docs-assets/{asset}")
                assert got.status_code == 200 and len(got.content) > 100_000
    assert isinstance(httpx, object)
