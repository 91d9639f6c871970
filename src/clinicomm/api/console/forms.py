"""Provider forms generated from the credentials models' JSON schema.

The schema is the one the API validates with (`ProviderSpec.credentials_model`), so a field
the API accepts is a field the form shows, with the same required/optional, type and secret
marks (`writeOnly` / `format: password` = `SecretStr`). Secrets never reach the browser: the
form shows whether one is stored and offers an empty "replace" input; left empty, the posted
document carries the mask `"********"`, which the settings service resolves to the stored
value (the API's GET → edit → PUT contract).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from clinicomm.providers import registry
from clinicomm.providers.base import MASK, Channel

#: Form field kinds.
TEXT, NUMBER, CHECKBOX, SECRET, JSON_TEXT, CHOICE = (
    "text",
    "number",
    "checkbox",
    "secret",
    "json",
    "choice",
)


@dataclass(frozen=True, slots=True)
class FormField:
    """One input of a provider form."""

    name: str  #: the credentials member (camelCase, as in the API)
    label: str
    kind: str
    required: bool
    description: str
    value: str  #: current value as text ("" for secrets, always)
    checked: bool = False  #: for checkboxes
    is_set: bool = False  #: for secrets: a value is stored
    options: tuple[str, ...] = ()  #: for a choice (`enum`)
    placeholder: str = ""  #: the model's default, shown while the input is empty


class FormError(Exception):
    """A posted value that cannot become JSON (e.g. a malformed JSON field), with its path."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(message)
        self.path = path


def _kind(prop: dict[str, Any]) -> str:
    options = prop.get("anyOf", [prop])
    types = {o.get("type") for o in options if isinstance(o, dict)}
    if any(o.get("writeOnly") or o.get("format") == "password" for o in options):
        return SECRET
    if types & {"object", "array"}:
        return JSON_TEXT
    if "boolean" in types:
        return CHECKBOX
    if any("enum" in o for o in options):
        return CHOICE
    if types & {"integer", "number"}:
        return NUMBER
    return TEXT


def _label(name: str) -> str:
    words: list[str] = []
    current = ""
    for char in name:
        if char.isupper() and current:
            words.append(current)
            current = char.lower()
        else:
            current += char
    words.append(current)
    words = [_ACRONYMS.get(w, w) for w in words]
    return " ".join([words[0][:1].upper() + words[0][1:], *words[1:]])


_ACRONYMS = {"tls": "TLS", "url": "URL", "id": "ID", "sid": "SID", "api": "API", "arns": "ARNs"}


def provider_schema(channel: Channel, key: str) -> dict[str, Any]:
    """The JSON schema of a provider's credentials (by alias, as the API reads them)."""
    return registry.get(channel, key).credentials_model.model_json_schema(by_alias=True)


def provider_fields(channel: Channel, key: str, current: dict[str, Any] | None) -> list[FormField]:
    """The form of provider `key` filled from `current` (the *masked* credentials)."""
    return schema_fields(provider_schema(channel, key), current)


def schema_fields(schema: dict[str, Any], current: dict[str, Any] | None) -> list[FormField]:
    """The inputs of a model's JSON schema, filled from `current` (a masked document)."""
    required = set(schema.get("required", []))
    current = current or {}
    fields: list[FormField] = []
    # `expiresAt` (for the expiry alert) is common to every provider and rarely set: last.
    properties = sorted(schema.get("properties", {}).items(), key=lambda i: i[0] == "expiresAt")
    for name, prop in properties:
        kind = _kind(prop)
        value = current.get(name)
        description = str(prop.get("description", ""))[:300]
        if kind == SECRET:
            fields.append(
                FormField(
                    name,
                    _label(name),
                    kind,
                    name in required,
                    description,
                    "",
                    is_set=value is not None and value != "",
                )
            )
            continue
        if kind == CHECKBOX:
            checked = bool(value) if name in current else bool(prop.get("default", False))
            fields.append(
                FormField(name, _label(name), kind, False, description, "", checked=checked)
            )
            continue
        if kind == JSON_TEXT:
            text = json.dumps(value, indent=1, ensure_ascii=False) if value is not None else ""
        else:
            text = "" if value is None else str(value)
        if kind == CHOICE:
            choices = tuple(str(v) for o in prop.get("anyOf", [prop]) for v in o.get("enum", []))
            text = text or str(prop.get("default", choices[0] if choices else ""))
            fields.append(
                FormField(name, _label(name), kind, True, description, text, options=choices)
            )
            continue
        default = prop.get("default")
        hint = "" if default is None or kind == JSON_TEXT else f"default {default}"
        fields.append(
            FormField(
                name, _label(name), kind, name in required, description, text, placeholder=hint
            )
        )
    return fields


def credentials_from_form(
    channel: Channel, key: str, form: dict[str, str], *, prefix: str
) -> dict[str, Any]:
    """The credentials document of a posted provider form.

    `form` maps input names (`cred.<member>`) to values. Empty inputs are left out (the model
    applies its defaults); an empty secret is sent as the mask (keep the stored value) unless
    `clear.<member>` is checked. Raises FormError for a JSON field that does not parse.
    """
    return values_from_form(provider_schema(channel, key), form, path=f"{prefix}.credentials")


def values_from_form(schema: dict[str, Any], form: dict[str, str], *, path: str) -> dict[str, Any]:
    """The document of a posted form of `schema` (inputs named `cred.<member>`); see
    `credentials_from_form`. `path` is the document's JSON path, for errors."""
    out: dict[str, Any] = {}
    for name, prop in schema.get("properties", {}).items():
        kind = _kind(prop)
        raw = form.get(f"cred.{name}")
        if kind == CHECKBOX:
            out[name] = raw is not None
            continue
        if kind == SECRET:
            if raw:
                out[name] = raw
            elif form.get(f"clear.{name}") is None and form.get(f"isset.{name}") == "1":
                out[name] = MASK
            continue
        if raw is None or raw.strip() == "":
            continue
        if kind == JSON_TEXT:
            try:
                out[name] = json.loads(raw)
            except ValueError:
                raise FormError(f"{path}.{name}", "not valid JSON") from None
            continue
        out[name] = raw.strip()
    return out


def posted_values(
    schema: dict[str, Any], form: dict[str, str], stored: dict[str, Any] | None
) -> dict[str, Any]:
    """What a refused form showed, to draw it again as the user left it: posted text and
    checkboxes, and for secrets only whether one is stored (a typed secret is not echoed)."""
    stored = stored or {}
    values: dict[str, Any] = {}
    for name, prop in schema.get("properties", {}).items():
        kind = _kind(prop)
        if kind == SECRET:
            if name in stored:
                values[name] = stored[name]
        elif kind == CHECKBOX:
            values[name] = f"cred.{name}" in form
        elif form.get(f"cred.{name}"):
            raw = form[f"cred.{name}"]
            values[name] = raw if kind != JSON_TEXT else _loads_or_text(raw)
    return values


def _loads_or_text(raw: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw
