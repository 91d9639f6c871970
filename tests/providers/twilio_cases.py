"""Cases shared by the Twilio WhatsApp and SMS test modules (same API, same error codes)."""

from __future__ import annotations

from typing import Any

from clinicomm.providers.errors import (
    ComplianceError,
    ConfigurationError,
    ProviderDownError,
    ProviderError,
    RateLimitedError,
    RecipientError,
    TransientError,
)
from tests.support.messaging import CANARY

SID = "AC" + "0" * 32
MESSAGE_SID = "SM" + "a" * 32
CONTENT_SID = "HX" + "b" * 32


def created(status: str = "queued") -> dict[str, Any]:
    return {"sid": MESSAGE_SID, "status": status, "account_sid": SID, "error_code": None}


def twilio_error(code: int, status: int, message: str = "boom") -> dict[str, Any]:
    return {"code": code, "message": message, "more_info": f"https://www.twilio.com/docs/errors/{code}",
            "status": status}


def creds(url: str, from_number: str, **extra: Any) -> dict[str, Any]:
    return {"accountSid": SID, "authToken": CANARY, "fromNumber": from_number,
            "baseUrl": url, **extra}


ERROR_CASES: list[tuple[int, int | None, type[ProviderError]]] = [
    (429, 20429, RateLimitedError),
    (429, None, RateLimitedError),
    (400, 21211, RecipientError),
    (400, 21612, RecipientError),
    (400, 21614, RecipientError),
    (400, 21635, RecipientError),
    (400, 21608, RecipientError),
    (400, 21610, ComplianceError),
    (400, 63016, ComplianceError),
    (400, 63014, ComplianceError),
    (400, 63038, ProviderDownError),
    (401, 20003, ConfigurationError),
    (401, None, ConfigurationError),
    (500, None, TransientError),
    (503, 20500, TransientError),
]
ERROR_IDS = [f"{s}-{c}" for s, c, _ in ERROR_CASES]
