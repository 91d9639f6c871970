"""Turn settings input into `CommunicationSettings`, with one problem per error and its path."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from clinicomm.providers.base import MASK, ProviderCredentials
from clinicomm.settings import secrets
from clinicomm.settings.models import CommunicationSettings, union_tags

SETTINGS_PREFIX = ("settings", "communicationSettings")


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with the input, at a dotted JSON path."""

    path: str
    message: str
    type: str

    def to_dict(self) -> dict[str, str]:
        return {"path": self.path, "message": self.message, "type": self.type}


class SettingsValidationError(Exception):
    """The settings document is invalid; `problems` lists every problem with its path."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("; ".join(f"{p.path}: {p.message}" for p in problems))
        self.problems = problems


def clean_error_path(loc: list[Any] | tuple[Any, ...], error_type: str) -> str:
    """A pydantic error location as a dotted JSON path; provider union tags are dropped.

    pydantic puts the discriminator's value into the location of a tagged union member
    (`email.primary.smtp.credentials.port`); the document has no such key, so it goes.
    An unknown or missing tag is reported at the slot's `provider` field.
    """
    tags = union_tags()
    loc = list(loc)
    cleaned: list[str | int] = []
    for index, part in enumerate(loc):
        previous = loc[index - 1] if index else None
        if (
            isinstance(part, str)
            and part in tags
            and (previous == "primary" or isinstance(previous, int))
        ):
            continue
        cleaned.append(part)
    if error_type in ("union_tag_invalid", "union_tag_not_found"):
        cleaned.append("provider")
    return ".".join(str(p) for p in cleaned)


def problems_from(exc: ValidationError, prefix: tuple[str | int, ...] = ()) -> list[Problem]:
    """pydantic errors as Problems; provider union tags are dropped from the path."""
    found: list[Problem] = []
    for error in exc.errors(include_url=False, include_input=False):
        if error["type"] in ("union_tag_invalid", "union_tag_not_found"):
            message = error["msg"].replace("Input tag", "unknown provider")
        else:
            message = error["msg"]
        found.append(
            Problem(
                path=clean_error_path((*prefix, *error["loc"]), error["type"]),
                message=message,
                type=error["type"],
            )
        )
    return found


def validate_model(model: type[BaseModel], data: Any, prefix: tuple[str | int, ...]) -> Any:
    """Validate `data` with `model`, raising SettingsValidationError with prefixed paths."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise SettingsValidationError(problems_from(exc, prefix)) from None


def validate_settings(
    doc: Any, prefix: tuple[str | int, ...] = SETTINGS_PREFIX
) -> CommunicationSettings:
    """A validated `CommunicationSettings`; an unresolved mask is reported as a problem."""
    settings: CommunicationSettings = validate_model(CommunicationSettings, doc, prefix)
    unresolved = secrets.masked_paths(plain_document(settings))
    if unresolved:
        raise SettingsValidationError(
            [
                Problem(
                    path=".".join(str(p) for p in (*prefix, *path, name)),
                    message=f"{MASK!r} keeps a stored secret, but none is stored here",
                    type="mask_without_secret",
                )
                for path, name in unresolved
            ]
        )
    return settings


def plain_document(settings: CommunicationSettings) -> dict[str, Any]:
    """The JSON form with secrets in clear (for encryption and comparison only)."""
    doc = settings.model_dump(mode="json", by_alias=True, exclude_none=True)
    for channel_settings, section_key in (
        (settings.email, "email"),
        (settings.whatsapp, "whatsapp"),
        (settings.sms, "sms"),
    ):
        if channel_settings is None:
            continue
        for path, slot in channel_settings.slots():
            if slot.credentials is None:
                continue
            target = doc[section_key]
            for part in path.split("."):
                target = target[int(part)] if part.isdigit() else target[part]
            if isinstance(slot.credentials, ProviderCredentials):
                target["credentials"] = slot.credentials.secret_dict()
    if settings.callbacks is not None:
        doc["callbacks"]["secret"] = settings.callbacks.secret.get_secret_value()
    return doc
