"""`clinicomm.http`: an async HTTP client for services that call a clinicomm server.

    from clinicomm.http import HttpClient, verify_callback

    async with HttpClient("https://clinicomm.internal", token=TOKEN) as api:
        accepted = await api.send(
            {"body": "See you at 10:30.", "recipients": [{"email": "p@example.com"}],
             "channels": ["email"], "metadata": {"clinicId": "clinic-a"}},
            idempotency_key="appt-456-confirm",
        )
        status = await api.get(accepted.id)          # MessageStatus
        page = await api.list(clinic_id="clinic-a")  # DeliveryPage

    # in the caller's callback endpoint, with the raw body as received:
    if not verify_callback(SECRET, body, request.headers["Clinicomm-Signature"]):
        return 400

Answers are the server's own pydantic models (`SendAccepted`, `MessageStatus`,
`DeliveryPage`). A 503 or 429 is retried (at most `retries` times) after its `Retry-After`
(capped at `max_retry_wait`) or an exponential backoff; a send is retried with the same
`Idempotency-Key` (one is generated when the caller gives none), so a retry never sends twice.
A connection error is retried the same way. Other errors raise `ApiError` with the server's
`code`, `message`, `details` and request id. There is no batch send and no cancel endpoint yet.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from email.utils import parsedate_to_datetime
from typing import Any, TypeVar

import aiohttp
from pydantic import BaseModel

from clinicomm.api.answers import DeliveryPage, MessageStatus
from clinicomm.callbacks.signing import DEFAULT_TOLERANCE, HEADER, verify_signature
from clinicomm.messaging.models import DeliveryStatus, SendAccepted, SendRequest

M = TypeVar("M", bound=BaseModel)

__all__ = [
    "HEADER",
    "ApiError",
    "DeliveryPage",
    "HttpClient",
    "MessageStatus",
    "SendAccepted",
    "SendRequest",
    "verify_callback",
]

RETRIED = frozenset({429, 503})


class ApiError(Exception):
    """An error answer: HTTP status, the server's error code, message, details, request id."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: list[dict[str, Any]] | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.details = details or []
        self.request_id = request_id


def verify_callback(
    secret: str, body: bytes, header: str | None, *, tolerance: float = DEFAULT_TOLERANCE
) -> bool:
    """True when `header` (`Clinicomm-Signature: t=…,v1=…`) signs the raw `body` with `secret`
    within `tolerance` seconds of now. Use the body bytes exactly as received."""
    return verify_signature(secret, body, header, tolerance=tolerance)


def retry_after(value: str | None) -> float | None:
    """Seconds from a `Retry-After` header (seconds or an HTTP date), or None."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    import time

    return max(0.0, when.timestamp() - time.time())


class HttpClient:
    """Calls one clinicomm server with a bearer token."""

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        timeout: float = 10.0,
        retries: int = 3,
        backoff: float = 0.5,
        max_retry_wait: float = 30.0,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.retries = retries
        self.backoff = backoff
        self.max_retry_wait = max_retry_wait
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session = session
        self._own_session = session is None

    async def __aenter__(self) -> HttpClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None and self._own_session:
            await self._session.close()
        self._session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
            self._own_session = True
        return self._session

    # ---- the API ----------------------------------------------------------------------------
    async def send(
        self, request: SendRequest | dict[str, Any], *, idempotency_key: str | None = None
    ) -> SendAccepted:
        """`POST /api/v1/communications` (202 once stored). The idempotency key (generated
        when not given) is sent on every retry."""
        if not isinstance(request, SendRequest):
            request = SendRequest.model_validate(request)
        body = request.model_dump(mode="json", by_alias=True, exclude_none=True)
        key = idempotency_key or f"http-client-{uuid.uuid4()}"
        return await self._call(
            "POST",
            "/api/v1/communications",
            SendAccepted,
            json=body,
            headers={"Idempotency-Key": key},
        )

    async def get(self, message_id: str) -> MessageStatus:
        """`GET /api/v1/communications/{id}`: the message, its deliveries and callbacks."""
        return await self._call("GET", f"/api/v1/communications/{message_id}", MessageStatus)

    async def cancel(self, message_id: str) -> MessageStatus:
        """`POST /api/v1/communications/{id}/cancel`: its queued deliveries end `cancelled`;
        the answer is the message (deliveries already sent keep their status)."""
        return await self._call(
            "POST", f"/api/v1/communications/{message_id}/cancel", MessageStatus
        )

    async def list(
        self,
        *,
        clinic_id: str | None = None,
        status: DeliveryStatus | str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> DeliveryPage:
        """`GET /api/v1/communications`: deliveries newest first; page on with `nextCursor`."""
        params: dict[str, str] = {"limit": str(limit)}
        if clinic_id is not None:
            params["clinicId"] = clinic_id
        if status is not None:
            params["status"] = str(status)
        if cursor is not None:
            params["cursor"] = cursor
        return await self._call("GET", "/api/v1/communications", DeliveryPage, params=params)

    # ---- transport ----------------------------------------------------------------------------
    async def _call(
        self,
        method: str,
        path: str,
        model: type[M],
        *,
        json: Any = None,
        params: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
    ) -> M:
        all_headers = {"Authorization": f"Bearer {self.token}", **(headers or {})}
        attempt = 0
        while True:
            try:
                async with self._http().request(
                    method, self.base_url + path, json=json, params=params, headers=all_headers
                ) as answer:
                    data = await answer.read()
                    status = answer.status
                    wait = retry_after(answer.headers.get("Retry-After"))
                    request_id = answer.headers.get("X-Request-ID")
            except (aiohttp.ClientConnectionError, TimeoutError):
                if attempt >= self.retries:
                    raise
                await asyncio.sleep(self._delay(attempt, None))
                attempt += 1
                continue
            if 200 <= status < 300:
                return model.model_validate_json(data)
            if status in RETRIED and attempt < self.retries:
                await asyncio.sleep(self._delay(attempt, wait))
                attempt += 1
                continue
            raise _error(status, data, request_id)

    def _delay(self, attempt: int, retry_after_seconds: float | None) -> float:
        if retry_after_seconds is not None:
            return min(retry_after_seconds, self.max_retry_wait)
        return min(self.max_retry_wait, random.uniform(0, self.backoff * 2**attempt))


def _error(status: int, data: bytes, request_id: str | None) -> ApiError:
    import json

    try:
        body = json.loads(data)
        error = body["error"]
        return ApiError(
            status, str(error["code"]), str(error["message"]), error.get("details"), request_id
        )
    except (ValueError, KeyError, TypeError):
        return ApiError(status, "http_error", data[:200].decode(errors="replace"), None, request_id)
