"""The published contract: explicit operation ids, one error schema everywhere, declared
response headers, and the API docs pages served from assets installed with the package.

- Operation ids are camelCase names (`sendCommunication`, `getCommunication`, `getClinic`),
  from `OPERATION_IDS` or the route function's name, so generated clients get short names.
- Every 4xx/5xx answer is `ErrorAnswer`: FastAPI's own `HTTPValidationError` (which our 422s
  never use) is replaced, webhook routes included.
- Headers: `X-Request-ID` on every answer; `ETag` on clinic answers and 412s; `Location` on a
  created clinic; `Retry-After` on 503 and 429.
- `/docs` (Swagger UI) and `/redoc` (ReDoc) load their scripts from `/docs-assets/`, the files
  of the `fastapi-offline` package (MIT), so they work on a network without Internet access.
"""

from __future__ import annotations

import re
from importlib import resources
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles

ASSETS = "/docs-assets"

#: Route function name → operationId, where the camelCase of the name is not the right word.
OPERATION_IDS = {
    "send": "sendCommunication",
    "send_batch": "sendCommunicationBatch",
    "replace_clinic": "replaceClinic",
    "patch_clinic": "patchClinic",
    "delete_all_settings": "deleteCommunicationSettings",
    "delete_channel_settings": "deleteChannelCommunicationSettings",
    "clinic_audit": "listClinicAudit",
    "communication_health": "getCommunicationHealth",
    "communication_stats": "getCommunicationStats",
    "communication_test": "testCommunicationConfig",
    "alerts": "listAlerts",
    "clinic_alerts": "listClinicAlerts",
    "healthz": "getLiveness",
    "readyz": "getReadiness",
    "metrics": "getMetrics",
    "receive": "receiveWebhook",
    "handshake": "webhookHandshake",
}


def operation_id(route: APIRoute) -> str:
    """`generate_unique_id_function` of the app."""
    name = route.name
    if name in OPERATION_IDS:
        return OPERATION_IDS[name]
    head, *rest = name.split("_")
    return head + "".join(part.capitalize() for part in rest)


_ERROR_REF = {"$ref": "#/components/schemas/ErrorAnswer"}


def _header(description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"description": description, "schema": schema or {"type": "string"}}


_REQUEST_ID = _header("The request's id (the caller's `X-Request-ID` when valid); quote it")
_ETAG = _header('The clinic\'s version, quoted ("3"); send it back as `If-Match`')
_LOCATION = _header("Where the created clinic is")
_RETRY_AFTER = _header("Seconds to wait before retrying", {"type": "integer"})
_CLINIC_REF = re.compile(r"#/components/schemas/Clinic$")


def refine(spec: dict[str, Any]) -> dict[str, Any]:
    """Apply the error schema and the headers to a generated document (in place)."""
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    for ops in spec.get("paths", {}).values():
        for op in ops.values():
            for code, answer in op.get("responses", {}).items():
                _refine_answer(op, str(code), answer)
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    return spec


def _refine_answer(op: dict[str, Any], code: str, answer: dict[str, Any]) -> None:
    headers = answer.setdefault("headers", {})
    headers["X-Request-ID"] = _REQUEST_ID
    if code[0] in "45":
        answer["content"] = {"application/json": {"schema": _ERROR_REF}}
    if code in ("503", "429"):
        headers["Retry-After"] = _RETRY_AFTER
    schema = answer.get("content", {}).get("application/json", {}).get("schema", {})
    if code == "412" or (code[0] == "2" and _CLINIC_REF.search(str(schema.get("$ref", "")))):
        headers["ETag"] = _ETAG
    if code == "201" and op.get("operationId") == "createClinic":
        headers["Location"] = _LOCATION


def install(app: FastAPI) -> None:
    """Use the refined document for `/openapi.json` and serve `/docs`, `/redoc` offline."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = refine(
                get_openapi(
                    title=app.title,
                    version=app.version,
                    description=app.description,
                    routes=app.routes,
                )
            )
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    static = resources.files("fastapi_offline") / "static"
    app.mount(ASSETS, StaticFiles(directory=str(static)), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def swagger() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title=f"{app.title} API",
            swagger_js_url=f"{ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{ASSETS}/favicon.png",
        )

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        return get_redoc_html(
            openapi_url="/openapi.json",
            title=f"{app.title} API",
            redoc_js_url=f"{ASSETS}/redoc.standalone.js",
            redoc_favicon_url=f"{ASSETS}/favicon.png",
            with_google_fonts=False,
        )
