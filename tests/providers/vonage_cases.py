"""Cases shared by the Vonage WhatsApp and SMS test modules (one Messages API)."""

from __future__ import annotations

from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from clinicomm.providers.errors import (
    ConfigurationError,
    ProviderDownError,
    ProviderError,
    RateLimitedError,
    RecipientError,
    TransientError,
)
from tests.support.messaging import CANARY

HOST = "https://api.nexmo.com"
SPEC_PATH = "/v1/messages/"  # README quirk 1: server URL carries /v1/messages, path is "/"
UUID = "aaaaaaaa-bbbb-cccc-dddd-0123456789ab"
APP_ID = "aaaaaaaa-bbbb-cccc-dddd-0123456789ab"

_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
PRIVATE_PEM = _KEY.private_bytes(
    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
).decode()
PUBLIC_PEM = _KEY.public_key().public_bytes(
    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
).decode()


def basic_creds(url: str, **extra: Any) -> dict[str, Any]:
    return {"apiKey": "abcd1234", "apiSecret": CANARY, "fromNumber": "+447700900001",
            "baseUrl": url, **extra}


def jwt_creds(url: str, **extra: Any) -> dict[str, Any]:
    return {"applicationId": APP_ID, "privateKey": PRIVATE_PEM, "fromNumber": "447700900001",
            "baseUrl": url, **extra}


def problem(fragment: str, title: str, detail: str = "x") -> dict[str, Any]:
    return {"type": f"https://developer.nexmo.com/api-errors/messages-olympus#{fragment}",
            "title": title, "detail": detail, "instance": "bf0ca0bf927b3b52e3cb03217e1a1ddf"}


ERROR_CASES: list[tuple[int, Any, type[ProviderError]]] = [
    (401, {"type": "https://developer.nexmo.com/api-errors/#unathorized",
           "title": "You did not provide correct credentials.", "detail": "x",
           "instance": "i"}, ConfigurationError),
    (422, problem("110", "Invalid recipient", "The `to` parameter is invalid"), RecipientError),
    (422, problem("1120", "Invalid sender", "The `from` parameter is invalid"),
     ConfigurationError),
    (422, problem("1150", "Invalid params"), ConfigurationError),
    (402, {"type": "https://developer.nexmo.com/api-errors/#low-balance", "title": "Low balance",
           "detail": "x", "instance": "i"}, ProviderDownError),
    (429, problem("1000", "Rate Limit Hit", "Please wait, then retry your request"),
     RateLimitedError),
    (500, problem("1000", "Internal error"), TransientError),
    (503, "upstream down", TransientError),
]
ERROR_IDS = [f"{c[0]}-{c[2].__name__}" for c in ERROR_CASES]
