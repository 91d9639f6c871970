"""Where a message's status callbacks go, decided once when it is accepted.

A clinic's `communicationSettings.callbacks` wins; without one, the platform-wide
`CLINICOMM_STATUS_CALLBACK_URL` (signed with `CLINICOMM_STATUS_CALLBACK_SECRET`). A send request
may name `callbackUrl` only when it is the clinic's `url` or on its `allowedUrls`.

`check_destination` judges a callback destination before a connection and `session_factory`
builds their HTTP session; both apply the platform's one egress policy (`providers.egress`),
to clinic and platform targets alike (an internal platform receiver goes on
`CLINICOMM_EGRESS_ALLOW`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import aiohttp

from clinicomm.config import Settings
from clinicomm.crypto import CryptoError
from clinicomm.providers.egress import EgressPolicy, http_session
from clinicomm.settings.keys import PLATFORM
from clinicomm.settings.models import CallbackStatus
from clinicomm.settings.sealed import open_json
from clinicomm.settings.service import ConfigService

Source = Literal["clinic", "platform"]


@dataclass(frozen=True, slots=True)
class CallbackTarget:
    url: str
    #: Whose secret signs: the clinic's `callbacks.secret` or the platform's.
    source: Source
    #: Statuses sent; None: all.
    events: list[str] | None

    def opts(self) -> dict[str, object]:
        return {"source": self.source, "events": self.events}


class CallbackUrlRefusedError(Exception):
    """The request's `callbackUrl` is not allowed for this clinic."""


class DestinationRefusedError(Exception):
    """The destination may not be called (egress policy)."""


class CallbackTargets:
    """Resolves targets (at accept) and secrets (at send time, so a rotation applies)."""

    def __init__(self, config: ConfigService, settings: Settings) -> None:
        self.config = config
        self.settings = settings

    def _platform(self) -> tuple[str, str] | None:
        url, secret = self.settings.status_callback_url, self.settings.status_callback_secret
        if url and secret is not None:
            return url, secret.get_secret_value()
        return None

    async def resolve(self, clinic_id: str | None, requested: str | None) -> CallbackTarget | None:
        """The target of a new message, or None. Raises CallbackUrlRefusedError."""
        own = await self.config.get_callbacks(clinic_id) if clinic_id else None
        if own is not None:
            if requested is None:
                return CallbackTarget(own.url, "clinic", _events(own.events))
            if requested == own.url or requested in own.allowed_urls:
                return CallbackTarget(requested, "clinic", _events(own.events))
            raise CallbackUrlRefusedError("callbackUrl is not on the clinic's allowedUrls")
        if requested is not None:
            raise CallbackUrlRefusedError("the clinic has no callbacks configured")
        platform = self._platform()
        return CallbackTarget(platform[0], "platform", None) if platform else None

    async def metadata(
        self, clinic_id: str | None, message_id: str, stored: dict[str, Any] | None
    ) -> dict[str, Any]:
        """The caller's metadata of a message, opened at send time: the queued event keeps it
        sealed as the message row does, so no callback row holds it in clear. `{}` when it was
        erased (retention) or its key cannot be unwrapped here."""
        try:
            cipher = await self.config.keys.cipher_for(self.config.db, clinic_id or PLATFORM)
            return open_json(cipher, stored, f"meta:{message_id}")
        except CryptoError:
            return {}

    async def secret(self, clinic_id: str | None, source: str) -> str | None:
        """The secret that signs now for a target's source (None: no longer configured)."""
        if source == "clinic" and clinic_id:
            own = await self.config.get_callbacks(clinic_id)
            return own.secret.get_secret_value() if own is not None else None
        platform = self._platform()
        return platform[1] if platform else None


def _events(events: list[CallbackStatus] | None) -> list[str] | None:
    return None if events is None else [str(e) for e in events]


def check_destination(url: str, policy: EgressPolicy) -> None:
    """Raise DestinationRefusedError unless `url` may be called under the egress policy
    (`providers.egress`): http(s) with a host and no credentials, https only in production,
    no literal private address while private destinations are refused. Names are checked
    again, after resolution, when the session connects."""
    problem = policy.check_endpoint(url, url=True)
    if problem is not None:
        raise DestinationRefusedError(problem)


def session_factory(timeout: float, policy: EgressPolicy) -> aiohttp.ClientSession:
    """The HTTP session callbacks are sent with: through the egress policy's connector (no
    redirects are followed by the sender)."""
    return http_session(
        policy,
        timeout=aiohttp.ClientTimeout(total=timeout),
        connector_args={"limit": 64, "limit_per_host": 8},
    )
