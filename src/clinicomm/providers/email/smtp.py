"""SMTP (any server: Gmail, Outlook, a clinic's own relay)."""

from __future__ import annotations

from pydantic import Field, SecretStr, model_validator

from clinicomm.providers import registry
from clinicomm.providers._pending import PendingAdapter
from clinicomm.providers.base import Channel, ProviderCredentials


class SmtpCredentials(ProviderCredentials):
    """An SMTP submission server. `secure` is implicit TLS (465); otherwise STARTTLS is required
    unless `requireTls` is false."""

    host: str = Field(min_length=1)
    port: int | None = Field(default=None, ge=1, le=65535)
    secure: bool = False
    require_tls: bool = True
    user: str | None = None
    password: SecretStr | None = None
    from_: str | None = Field(default=None, alias="from")
    max_connections: int = Field(default=5, ge=1, le=100)
    max_messages_per_connection: int = Field(default=100, ge=1, le=10_000)
    idle_timeout_seconds: float = Field(default=300, gt=0)

    @model_validator(mode="after")
    def _default_port(self) -> SmtpCredentials:
        if self.port is None:
            self.port = 465 if self.secure else 587
        return self


@registry.register
class SmtpAdapter(PendingAdapter):
    key = "smtp"
    channel = Channel.EMAIL
    display_name = "SMTP"
    credentials_model = SmtpCredentials
