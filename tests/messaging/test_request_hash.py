"""`request_hash`: the digest stored with each idempotency key. It must never change form: a
retry across an upgrade would otherwise be a 409 for the same payload. Pinned here, and
checked against its definition (the model's JSON dump without the unset timing fields and
the batch item's own key, keys sorted, SHA-256) for many shapes of request."""

from __future__ import annotations

import hashlib
import itertools
from typing import Any

import orjson
import pytest

from clinicomm.messaging.models import TIMING_FIELDS, BatchSendItem, SendRequest
from clinicomm.messaging.service import request_hash

BASE: dict[str, Any] = {
    "category": "APPOINTMENT",
    "title": "Appointment Confirmed",
    "body": "Your appointment is confirmed for 10:30.",
    "recipients": [{"email": "patient@example.com"}, {"phone": "+14155552671"}],
    "channels": ["email", "sms"],
    "metadata": {"clinicId": "clinic-a", "appointmentId": "appt-1", "n": 3},
}
TIMED: dict[str, Any] = {
    **BASE,
    "priority": "urgent",
    "sendAt": "2026-12-07T10:00:00+01:00",
    "ttlSeconds": 600,
    "template": {"name": "appointmentConfirmation", "language": "en", "variables": {"1": "10:30"}},
    "callbackUrl": "https://cb.example/x",
}


def _definition(request: SendRequest) -> str:
    unset = {name for name in TIMING_FIELDS if getattr(request, name) is None}
    data = request.model_dump(mode="json", by_alias=True, exclude=unset | {"idempotency_key"})
    return hashlib.sha256(orjson.dumps(data, option=orjson.OPT_SORT_KEYS)).hexdigest()


def test_the_digest_is_pinned() -> None:
    plain = "33efc907589552c4a88a8ff070552c2457035b962c28490bca3e128a85af8d3d"
    assert request_hash(SendRequest.model_validate(BASE)) == plain
    assert request_hash(BatchSendItem.model_validate({**BASE, "idempotencyKey": "k-1"})) == plain
    timed = "fa288d3c856eac462397ed15bbca58de46823f903fd7b36d18b09a01fd8399b9"
    assert request_hash(SendRequest.model_validate(TIMED)) == timed


OPTIONAL = {
    "priority": "bulk",
    "sendAt": "2026-12-24T08:00:00Z",
    "expiresAt": "2026-12-25T08:00:00Z",
    "ttlSeconds": 60,
    "html": "<p>hi</p>",
    "template": {"name": "t", "variables": {"2": "b", "1": "a"}},
    "callbackUrl": "https://cb.example/y",
}


@pytest.mark.parametrize("size", [0, 1, 2, 3])
def test_every_shape_hashes_as_defined(size: int) -> None:
    for names in itertools.combinations(OPTIONAL, size):
        payload = {**BASE, **{name: OPTIONAL[name] for name in names}}
        for model, extra in ((SendRequest, {}), (BatchSendItem, {"idempotencyKey": "k"})):
            request = model.model_validate({**payload, **extra})
            assert request_hash(request) == _definition(request), names
