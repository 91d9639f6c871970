"""Every error answer is `{"error": {"code", "message", "details": [...]}}`.

The exception → status table lives here and only here:

| exception | status | code |
|---|---|---|
| `ApiError` | its own | its own |
| FastAPI `RequestValidationError`, `SettingsValidationError` | 422 | `validation_error` |
| `ClinicNotFoundError` | 404 | `clinic_not_found` |
| `ClinicExistsError`, `IntegrityError` | 409 | `conflict` |
| SQLAlchemy `DataError` (a value the database refuses) | 422 | `validation_error` |
| `VersionConflictError` | 412 | `version_conflict` |
| SQLAlchemy `OperationalError`/`DBAPIError`, `OSError`, Redis errors | 503 | `unavailable` |
| `CryptoError` (master key cannot unwrap a clinic's key) | 503 | `crypto_unavailable` |
| anything else | 500 | `internal_error` (a bug; answered by `middleware.RequestContext`) |

Validation details carry `path` (dotted JSON path without FastAPI's leading `body`),
`message` and `type`; never the rejected input (it may be a secret).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from clinicomm.crypto import CryptoError
from clinicomm.settings.service import (
    ClinicExistsError,
    ClinicNotFoundError,
    VersionConflictError,
)
from clinicomm.settings.validation import SettingsValidationError, clean_error_path

log = logging.getLogger(__name__)

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    412: "precondition_failed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    428: "precondition_required",
    429: "rate_limited",
    503: "unavailable",
}


class ApiError(Exception):
    """An error answer with its status, code, message and details."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: Sequence[dict[str, Any]] = (),
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = list(details)
        self.headers = headers or {}


def unauthorized(message: str) -> ApiError:
    return ApiError(401, "unauthorized", message, headers={"WWW-Authenticate": "Bearer"})


def forbidden(message: str) -> ApiError:
    return ApiError(403, "forbidden", message)


def error_response(
    status: int,
    code: str,
    message: str,
    details: Sequence[dict[str, Any]] = (),
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = {"error": {"code": code, "message": message, "details": list(details)}}
    return JSONResponse(body, status_code=status, headers=headers)


def validation_details(errors: Sequence[Any]) -> list[dict[str, Any]]:
    """FastAPI/pydantic errors as `{path, message, type}`, without the leading `body`."""
    details: list[dict[str, Any]] = []
    for error in errors:
        loc = list(error.get("loc", ()))
        if loc and loc[0] == "body":
            loc = loc[1:]
        details.append(
            {
                "path": clean_error_path(loc, error.get("type", "")),
                "message": str(error.get("msg", "invalid")),
                "type": str(error.get("type", "invalid")),
            }
        )
    return details


async def _api_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.code, exc.message, exc.details, exc.headers)


async def _request_validation(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    details = validation_details(exc.errors())
    return error_response(422, "validation_error", "the request is not valid", details)


async def _settings_validation(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, SettingsValidationError)
    details = [p.to_dict() for p in exc.problems]
    return error_response(422, "validation_error", "the settings are not valid", details)


async def _not_found(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ClinicNotFoundError)
    return error_response(404, "clinic_not_found", f"clinic {exc.clinic_id!r} not found")


async def _exists(_: Request, exc: Exception) -> JSONResponse:
    if isinstance(exc, ClinicExistsError):
        return error_response(409, "conflict", f"clinic {exc.clinic_id!r} already exists")
    return error_response(409, "conflict", "the change conflicts with another one; retry")


async def _version(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, VersionConflictError)
    return error_response(
        412,
        "version_conflict",
        str(exc),
        [{"currentVersion": exc.current}],
        headers={"ETag": f'"{exc.current}"'},
    )


async def _unavailable(request: Request, exc: Exception) -> JSONResponse:
    log.error(
        "database or cache unreachable",
        extra={"event": "dependency_unavailable", "error": type(exc).__name__},
    )
    return error_response(
        503,
        "unavailable",
        "the database or cache is unreachable; retry later",
        headers={"Retry-After": "5"},
    )


async def _data(_: Request, exc: Exception) -> JSONResponse:
    # The database refused a value (e.g. a NUL character on PostgreSQL): the input's fault.
    return error_response(422, "validation_error", "a value cannot be stored as given")


async def _crypto(_: Request, exc: Exception) -> JSONResponse:
    # CryptoError messages name key ids, clinics and fields, never values (crypto.py).
    log.error("secrets cannot be decrypted", extra={"event": "crypto_error", "detail": str(exc)})
    return error_response(503, "crypto_unavailable", str(exc))


async def _http(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = _HTTP_CODES.get(exc.status_code, "error")
    message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
    return error_response(exc.status_code, code, message, headers=dict(exc.headers or {}))


def install(app: FastAPI) -> None:
    """Register the handlers of the table above."""
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _request_validation)
    app.add_exception_handler(SettingsValidationError, _settings_validation)
    app.add_exception_handler(ClinicNotFoundError, _not_found)
    app.add_exception_handler(ClinicExistsError, _exists)
    app.add_exception_handler(IntegrityError, _exists)
    app.add_exception_handler(VersionConflictError, _version)
    app.add_exception_handler(DataError, _data)
    app.add_exception_handler(OperationalError, _unavailable)
    app.add_exception_handler(DBAPIError, _unavailable)
    app.add_exception_handler(OSError, _unavailable)
    app.add_exception_handler(RedisError, _unavailable)
    app.add_exception_handler(CryptoError, _crypto)
    app.add_exception_handler(StarletteHTTPException, _http)
