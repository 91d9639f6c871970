"""Request and answer models of the clinics API (they make the OpenAPI document useful).

`settings.communicationSettings` is documented with the full `CommunicationSettings` schema
but is passed to the config service as raw JSON (`SkipValidation`): the service must see the
mask `"********"` before validation to keep a stored secret, and it reports every problem with
its JSON path (`settings.communicationSettings.email.primary.credentials.port`).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, SkipValidation

from clinicomm.settings.models import CommunicationSettings

CLINIC_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
# Printable text only: control characters (NUL above all) cannot be stored by PostgreSQL.
NAME_PATTERN = r"^[^\x00-\x1f\x7f]+$"

ClinicName = Annotated[str, Field(min_length=1, max_length=200, pattern=NAME_PATTERN)]


class ClinicSettingsDoc(BaseModel):
    """A clinic's `settings` object; `communicationSettings` is what clinicomm reads."""

    model_config = ConfigDict(extra="allow")

    communicationSettings: CommunicationSettings | None = Field(
        default=None,
        description="Email, WhatsApp and SMS providers of the clinic. Secrets given as "
        "'********' keep the stored value.",
    )


#: Documented as `ClinicSettingsDoc`, passed through as the raw JSON object.
RawSettings = Annotated[ClinicSettingsDoc, SkipValidation]


class ClinicCreate(BaseModel):
    """`POST /api/v1/clinics`."""

    model_config = ConfigDict(extra="forbid")

    id: Annotated[str | None, Field(pattern=CLINIC_ID_PATTERN)] = Field(
        default=None, description="Omitted: one is generated."
    )
    name: ClinicName
    settings: RawSettings = Field(default_factory=dict)  # type: ignore[assignment]


class ClinicReplace(BaseModel):
    """`PUT /api/v1/clinics/{clinicId}`: the new settings (and optionally a new name)."""

    model_config = ConfigDict(extra="forbid")

    name: ClinicName | None = None
    settings: RawSettings


class ClinicPatch(BaseModel):
    """`PATCH /api/v1/clinics/{clinicId}`: a JSON merge patch (RFC 7396) of the clinic.

    Applied to the masked clinic (`name`, `settings`); `null` removes a member; masks keep
    the stored secrets.
    """

    model_config = ConfigDict(extra="forbid")

    name: ClinicName | None = None
    settings: Annotated[dict[str, Any] | None, SkipValidation] = None


class Clinic(BaseModel):
    """A clinic as answered: every secret credential value is `"********"`."""

    id: str
    name: str
    version: int = Field(description="Bumped on every change; the ETag is this number, quoted.")
    settings: dict[str, Any]
    createdAt: datetime
    updatedAt: datetime


class ClinicSummary(BaseModel):
    """A clinic in the list: no settings."""

    id: str
    name: str
    version: int
    createdAt: datetime
    updatedAt: datetime


class ClinicList(BaseModel):
    """A page of clinics by id; pass `nextCursor` as `cursor` for the next."""

    items: list[ClinicSummary]
    nextCursor: str | None


class AuditItem(BaseModel):
    """One audit log entry: who changed what, when; secrets appear as `{"secret": true}`."""

    id: int
    at: datetime
    clinicId: str | None
    actor: str
    role: str
    action: str
    requestId: str | None
    diff: dict[str, Any]
    note: str | None = None


class AuditPage(BaseModel):
    """A page of audit entries, newest first; pass `nextCursor` as `cursor` for the next."""

    items: list[AuditItem]
    nextCursor: str | None


class ErrorBody(BaseModel):
    code: str
    message: str
    details: list[dict[str, Any]]


class ErrorAnswer(BaseModel):
    """Every error answer."""

    error: ErrorBody


class Health(BaseModel):
    status: str
    checks: dict[str, str] = Field(default_factory=dict)


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorAnswer, "description": text}
    for code, text in {
        401: "No token, or a bad or expired one",
        403: "The token lacks the permission, or is for another clinic",
        404: "Unknown clinic",
        422: "Invalid request; one detail per problem, with its JSON path",
        503: "Database unreachable",
    }.items()
}
