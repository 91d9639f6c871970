"""Process settings from the environment (`CLINICOMM_*`), as `API.md` names them.

The global provider variables of the seed (`EMAIL_*`, `WHATSAPP_*`, `SMS_*`) are read by
`settings.globals`, not here, because they form a `communicationSettings` document.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_SQLITE_URL = "sqlite+aiosqlite:///./clinicomm.db"
_HOST = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,62})(?:\.[A-Za-z0-9-]{1,63})*\.?$")


class Settings(BaseSettings):
    """Everything a clinicomm process is configured with; read once per process."""

    model_config = SettingsConfigDict(env_prefix="CLINICOMM_", extra="ignore")

    #: SQLAlchemy URL: `sqlite+aiosqlite:///file.db` or `postgresql+asyncpg://user@host/db`.
    database_url: str = DEFAULT_SQLITE_URL
    #: `redis://host:6379/0`: shared config cache, invalidation, limits and health.
    redis_url: str | None = None
    #: `kid1:base64key,kid2:base64key`; the first encrypts, all decrypt.
    master_keys: str | None = None
    #: HS256 secret for bearer tokens (a dev secret is generated when unset, outside production).
    jwt_secret: str | None = None
    #: PEM public key for RS256/ES256 tokens instead of the HS256 secret.
    jwt_public_key: str | None = None
    #: Interface `clinicomm serve` listens on.
    host: str = "127.0.0.1"
    #: Port `clinicomm serve` listens on.
    port: int = 8000
    #: Run a delivery worker inside `clinicomm serve` (false: API only, separate workers).
    worker: bool = True
    #: API processes of `clinicomm serve`, all on one port (SO_REUSEPORT), beside one worker
    #: process (when `worker` is true). More than 1 needs PostgreSQL: SQLite runs one process.
    processes: int = Field(default=1, ge=1, le=64)
    #: `production` refuses dev keys, dev JWT secrets and unsafe SMTP.
    env: Literal["development", "test", "production"] = "development"
    #: A JSON `communicationSettings` document for the global providers (wins over `EMAIL_*`…).
    global_settings_file: Path | None = None
    #: Where dev keys are generated when none are configured.
    data_dir: Path = Path(".clinicomm")
    #: Seconds a config entry lives in the L1/L2 caches.
    cache_ttl_seconds: int = Field(default=3600, ge=1)
    #: How often each process checks the database for config changes (the safety net when
    #: Redis is absent or unreachable), in seconds.
    config_poll_seconds: float = Field(default=0.5, gt=0)
    #: How long a save waits for every process to acknowledge an invalidation (Redis).
    invalidation_ack_timeout: float = Field(default=2.0, ge=0)
    #: Root log level (DEBUG, INFO, WARNING, ERROR).
    log_level: str = "INFO"
    #: `json` (one object per line) or `text`; unset: text on a terminal, JSON otherwise.
    log_format: Literal["json", "text"] | None = None
    #: `clinicomm worker` serves Prometheus `/metrics` on this port when set (0.0.0.0 is not
    #: implied: it listens on `metrics_host`).
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    #: Interface the worker's metrics listener binds.
    metrics_host: str = "127.0.0.1"
    #: Seconds a provider call may take before it counts as a transient failure.
    provider_timeout_seconds: float = Field(default=10.0, gt=0)
    #: Deliveries a worker claims per batch.
    worker_batch_size: int = Field(default=100, ge=1)
    #: Provider calls a worker has in flight at once, sent but not yet recorded included (a
    #: worker killed re-sends at most this many). Unset: 256 for the worker inside `serve`
    #: (it shares the event loop with the API), 512 for a worker process (`clinicomm worker`,
    #: and the one `serve --processes N` starts).
    worker_concurrency: int | None = Field(default=None, ge=1)
    #: Seconds a claimed delivery stays leased; a crashed worker's deliveries return after it.
    worker_lease_seconds: float = Field(default=60.0, gt=0)
    #: Seconds between claims when no NOTIFY or in-process wake-up came (the safety net).
    worker_poll_seconds: float = Field(default=1.0, gt=0)
    #: Message contents (bodies, template variables: PHI) are erased this many days after the
    #: message was accepted; deliveries, attempts and ids stay for the record.
    message_retention_days: float = Field(default=30.0, gt=0)
    #: Audit entries are deleted after this many days (six years, HIPAA's record keeping).
    audit_retention_days: float = Field(default=2192.0, gt=0)
    #: The largest request body accepted (2 MiB: a send to 1,000 recipients fits); larger
    #: ones are refused with 413 while they are read. Webhooks: at most 1 MiB.
    max_body_bytes: int = Field(default=2 * 1024 * 1024, ge=1024)
    #: A delivery still failing transiently after this long ends `failed`.
    delivery_max_age_seconds: float = Field(default=6 * 3600.0, gt=0)
    #: Provider health: the rolling window, the minimum outcomes before a band changes, and
    #: how long an open circuit waits before its half-open probes (see `routing.health`).
    health_window_seconds: float = Field(default=300.0, gt=0)
    #: Width of one bucket of the rolling health window, in seconds.
    health_bucket_seconds: float = Field(default=10.0, gt=0)
    #: Outcomes needed in the window before a provider's band (healthy/degraded/down) changes.
    health_min_samples: int = Field(default=20, ge=1)
    #: Seconds an open circuit waits before letting probe sends through (half-open).
    health_cool_down_seconds: float = Field(default=30.0, ge=0)
    #: Probe sends allowed through a half-open circuit.
    health_half_open_probes: int = Field(default=3, ge=1)
    #: Webhooks: rebuild the signed URL from `X-Forwarded-Proto`/`X-Forwarded-Host`. Only
    #: behind a proxy that sets (overwrites) them; otherwise a caller could choose the URL.
    #: The one switch: uvicorn's own proxy-header handling is off, so with `false` no
    #: `X-Forwarded-*` header (not even from 127.0.0.1) changes the scheme or client address.
    trust_forwarded_headers: bool = False
    #: Webhooks: GET a verified SNS `SubscribeURL` at once instead of leaving it to the operator.
    sns_auto_confirm: bool = False
    #: Webhooks: comma-separated `SigningCertURL` prefixes trusted beside
    #: `https://sns.<region>.amazonaws.com/` (LocalStack, an offline test server; end each
    #: with `/`). In production only `https://` prefixes are accepted.
    sns_cert_url_prefixes: str = ""
    #: The service's public base URL (`https://comms.example.com`): adapters that support a
    #: per-message status callback (Twilio `StatusCallback`, MessageBird/Bird `reportUrl`)
    #: point it at the clinic's webhook route `/api/v1/webhooks/{provider}/{clinicId}`
    #: (`/global` for a global provider). Unset: no per-message callback is requested.
    public_url: str | None = None
    #: Base of the full-jitter retry backoff (attempt n waits up to base·2^n seconds).
    retry_base_seconds: float = Field(default=2.0, gt=0)
    #: Connection test (`probe()`) of every configured provider, every this many seconds.
    probe_interval_seconds: float = Field(default=300.0, gt=0)
    #: Seconds one probe may take before it counts as failed.
    probe_timeout_seconds: float = Field(default=10.0, gt=0)
    #: Alert rules are evaluated every this many seconds.
    alert_interval_seconds: float = Field(default=60.0, gt=0)
    #: Console sessions end after this long without a request, and this long after sign-in.
    console_idle_seconds: int = Field(default=900, ge=10)
    console_session_max_seconds: int = Field(default=8 * 3600, ge=60)
    #: Fired and resolved alerts are POSTed here as JSON when set.
    alert_webhook_url: str | None = None

    #: Platform-wide status callbacks (for clinics without their own `callbacks`): every
    #: delivery status change is POSTed here, signed with the secret.
    status_callback_url: str | None = None
    #: Signs the platform-wide callbacks (`Clinicomm-Signature`); at least 16 characters.
    status_callback_secret: SecretStr | None = None
    #: Callback retries: full-jitter backoff over base·2^attempt seconds (at most 1 h).
    callback_retry_base_seconds: float = Field(default=5.0, gt=0)
    #: A callback not delivered this many seconds after its status change ends `expired`.
    callback_max_age_seconds: float = Field(default=86400.0, gt=0)
    #: Seconds one callback POST may take.
    callback_timeout_seconds: float = Field(default=10.0, gt=0)
    #: How often an idle callback sender looks for queued callbacks.
    callback_poll_seconds: float = Field(default=1.0, gt=0)

    #: Egress: connect to private, loopback, link-local (cloud metadata) and reserved
    #: addresses. Unset: false when `CLINICOMM_ENV=production`, true otherwise (local stand-ins).
    egress_allow_private: bool | None = None
    #: Egress: comma-separated hosts or CIDRs reachable even though private (an internal SMTP
    #: relay, the platform's callback receiver): `smtp.internal,10.1.2.0/24`.
    egress_allow: str = ""
    #: Tokens must carry this `aud` claim when set; `clinicomm token` writes it.
    jwt_audience: str | None = None
    #: Tokens must carry this `iss` claim when set; `clinicomm token` writes it.
    jwt_issuer: str | None = None
    #: Tokens whose `exp - iat` is longer than this are refused (one day).
    jwt_max_ttl_seconds: int = Field(default=86400, ge=60)
    #: Signed webhook events older than this (or more than 60 s ahead) are refused.
    webhook_max_age_seconds: float = Field(default=300.0, gt=0)
    #: Failed webhook signatures per clinic and provider in a minute before answering 429.
    webhook_signature_failures_per_minute: int = Field(default=20, ge=1)
    #: `POST …/communication/test` calls per clinic in a minute before answering 429.
    config_test_per_minute: int = Field(default=10, ge=1)
    #: When set, `/metrics` (serve and worker) requires `Authorization: Bearer <token>`.
    metrics_token: SecretStr | None = None

    @field_validator("egress_allow")
    @classmethod
    def _egress_entries(cls, value: str) -> str:
        """Each entry is a CIDR, an address or a host name (refused at startup otherwise)."""
        for raw in value.split(","):
            entry = raw.strip()
            if not entry:
                continue
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                if not _HOST.match(entry):
                    raise ValueError(
                        f"CLINICOMM_EGRESS_ALLOW entry {entry!r} is neither a host nor a CIDR"
                    ) from None
        return value

    @property
    def egress_private_allowed(self) -> bool:
        """`egress_allow_private`, or its default for the environment."""
        if self.egress_allow_private is not None:
            return self.egress_allow_private
        return not self.production

    @property
    def egress_allow_list(self) -> list[str]:
        """`egress_allow` split on commas, blanks dropped."""
        return [p.strip() for p in self.egress_allow.split(",") if p.strip()]

    @property
    def production(self) -> bool:
        return self.env == "production"

    @property
    def sns_prefixes(self) -> tuple[str, ...]:
        """The trusted extra SNS certificate URL prefixes; `ValueError` in production for a
        prefix that is not `https://` (a test server's `http://` URL must never be trusted
        in production by accident)."""
        prefixes = tuple(p.strip() for p in self.sns_cert_url_prefixes.split(",") if p.strip())
        if self.production:
            plain = [p for p in prefixes if not p.startswith("https://")]
            if plain:
                raise ValueError(
                    "CLINICOMM_SNS_CERT_URL_PREFIXES: only https:// prefixes in production"
                )
        return prefixes

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")


@functools.cache
def get_settings() -> Settings:
    """The process's settings (cached; tests build their own `Settings` instead)."""
    return Settings()
