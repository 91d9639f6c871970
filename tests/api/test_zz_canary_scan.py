"""Runs last in tests/api (file order): no answer and no log line of the whole run so far
carries a secret that any test wrote. The session fixture `canary_scan` checks again at the
very end (answers and log lines of later packages included)."""

from __future__ import annotations

import json
import logging

from tests.api.conftest import RECORDED, Api, clinic_settings, create_clinic, leaked
from tests.conftest import CANARIES, canary


async def test_no_secret_in_any_answer_or_log_line(api: Api) -> None:
    # Make sure this module alone still exercises the paths that handle secrets.
    await create_clinic(api, "clinic-z")
    await api.client.get("/api/v1/clinics/clinic-z", headers=api.admin)
    bad = clinic_settings("z")
    bad["communicationSettings"]["email"]["primary"]["credentials"]["port"] = canary("as-port")
    bad["communicationSettings"]["sms"] = {"primary": {"provider": "twilio", "credentials": {"authToken": canary("tw")}}}
    answer = await api.client.put("/api/v1/clinics/clinic-z", json={"settings": bad}, headers=api.admin)
    assert answer.status_code == 422
    await api.client.patch(
        "/api/v1/clinics/clinic-z",
        json={"settings": {"communicationSettings": {"email": {"primary": {"credentials": {"password": canary("p")}}}}}},
        headers=api.admin,
    )
    await api.client.get("/api/v1/clinics/clinic-z/audit", headers=api.admin)
    assert CANARIES and RECORDED
    assert any(_event(line) == "http_request" for line in RECORDED)  # logs are recorded
    # Negative control: the recorder does catch a secret in a log line.
    probe = canary("probe")
    logging.getLogger("clinicomm.test").warning("probe %s", probe)
    assert any(probe in line for line in leaked())
    RECORDED[:] = [line for line in RECORDED if probe not in line]
    found = leaked()
    assert not found, found[:3]


def _event(line: str) -> object:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record.get("event") if isinstance(record, dict) else None
