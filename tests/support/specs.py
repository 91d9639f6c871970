"""Load the providers' official API descriptions (tests/provider_specs) for request checks.

`spec(name)` returns an `openapi_core.OpenAPI` for one provider file, with the JSON patches of
the specs' README applied and the quirks it lists worked around; `assert_valid(name, request)`
validates a request captured by `tests.support.http_capture` against it.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import jsonpatch
import yaml
from openapi_core import Config, OpenAPI
from openapi_core.testing import MockRequest

from tests.support.http_capture import CapturedRequest

#: The copies kept in the repository (unchanged; sources and licences in its README.md).
SPECS_DIR = Path(__file__).resolve().parent.parent / "provider_specs"


def specs_dir() -> Path:
    """The repository's own copy of the providers' specs: nothing outside the checkout is read."""
    return SPECS_DIR


def _stringify_keys(node: Any) -> Any:
    if isinstance(node, dict):
        return {str(k): _stringify_keys(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_stringify_keys(v) for v in node]
    return node


def load_document(relative: str, patch: str | tuple[str, ...] | None = None) -> dict[str, Any]:
    """Read a spec file (JSON or YAML, dict keys as strings) and apply RFC 6902 patch files
    (one, or several in order)."""
    path = specs_dir() / relative
    text = path.read_text(encoding="utf-8")
    doc = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
    doc = _stringify_keys(doc)
    for name in (patch,) if isinstance(patch, str) else patch or ():
        operations = json.loads((specs_dir() / name).read_text(encoding="utf-8"))
        doc = jsonpatch.apply_patch(doc, operations)
    return doc


@functools.cache
def spec(name: str) -> OpenAPI:
    """The OpenAPI object for a provider, by short name; cached per process."""
    docs = {
        "sendgrid": ("sendgrid/tsg_mail_v3.json", None),
        "mailgun": ("mailgun/mailgun-openapi.yaml", None),
        "postmark": ("postmark/postmark-server.openapi3.json", None),
        "twilio": ("twilio/twilio_api_v2010.json", None),
        "meta": (
            "meta-whatsapp/business-messaging-api_v23.0.yaml",
            (
                "meta-whatsapp/business-messaging-api_v23.0.allOf-fix.json-patch.json",
                # README: button `index` "0" (an authentication template's copy-code button).
                "meta-whatsapp/business-messaging-api_v23.0.button-index-fix.json-patch.json",
            ),
        ),
        "vonage-messages": (
            "vonage/messages-olympus.v1.4.0.json",
            "vonage/messages-olympus.v1.4.0.required-fix.json-patch.json",
        ),
        "vonage-sms": ("vonage/sms.v1.2.0.json", None),
    }
    relative, patch = docs[name]
    doc = load_document(relative, patch)
    if name == "postmark":
        # README quirk 3: scheme-relative server URL.
        doc["servers"] = [{"url": "https://api.postmarkapp.com"}]
        # README quirk 3: the API takes TemplateId *or* TemplateAlias, but the old Swagger file
        # requires both. Drop both from `required`; tests assert "exactly one" themselves.
        template = doc["components"]["schemas"]["EmailWithTemplateRequest"]
        template["required"] = [
            r for r in template["required"] if r not in ("TemplateId", "TemplateAlias")
        ]
    # README quirk 2 (Meta): the file itself does not pass spec validation; turn it off.
    return OpenAPI.from_dict(doc, config=Config(spec_validator_cls=None))


def assert_valid(
    name: str,
    request: CapturedRequest,
    *,
    host_url: str,
    path: str | None = None,
) -> None:
    """Validate a captured request against provider `name`'s spec, as if sent to `host_url`.

    `path` overrides the captured path (for specs whose server URL carries a path prefix).
    Raises openapi-core's validation error with every problem when the request is invalid.
    """
    headers = dict(request.headers)
    # The full Content-Type (with a multipart boundary), not only the media type.
    content_type = headers.get("Content-Type", request.content_type)
    mock = MockRequest(
        host_url,
        request.method.lower(),
        path or request.path,
        args=dict(request.query),
        headers=headers,
        data=request.body,
        content_type=content_type,
    )
    spec(name).validate_request(mock)


@functools.cache
def botocore_model(relative: str) -> Any:
    """A botocore `ServiceModel` from a service-2 JSON file of the specs (AWS has no
    OpenAPI; this is the model boto3 itself validates against)."""
    from botocore.model import ServiceModel

    return ServiceModel(load_document(relative))


def assert_valid_aws(relative: str, operation: str, request: CapturedRequest) -> None:
    """Validate a captured REST-JSON AWS request: method, path and body against the operation.

    `relative` is a botocore service-2 file, e.g.
    `aws-ses-sns/botocore-sesv2-2019-09-27.service-2.json`.
    Raises AssertionError listing every problem botocore's own validator finds.
    """
    from botocore.validate import ParamValidator

    model = botocore_model(relative).operation_model(operation)
    assert request.method == model.http["method"], (request.method, model.http)
    assert request.path == model.http["requestUri"].split("?")[0], (request.path, model.http)
    report = ParamValidator().validate(request.json(), model.input_shape)
    assert not report.has_errors(), report.generate_report()
