"""The platform's global providers, from the seed's environment variables or a JSON file.

`CLINICOMM_GLOBAL_SETTINGS_FILE` (a whole `communicationSettings` document) wins. Otherwise
each channel is built from `<CHANNEL>_PROVIDER` and `<CHANNEL>_<FIELD>` variables, where FIELD
is a credentials field in upper snake case (`EMAIL_HOST`, `EMAIL_PASSWORD`, `WHATSAPP_API_KEY`,
`WHATSAPP_PHONE_NUMBER_ID`, `SMS_ACCOUNT_SID`, `SMS_AUTH_TOKEN`, `SMS_FROM_NUMBER`, …).
`EMAIL_FROM`/`EMAIL_FROM_NAME` also set the global `defaultFrom`/`defaultFromName`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from clinicomm.providers import registry
from clinicomm.providers.base import Channel
from clinicomm.settings.models import CommunicationSettings

_SIGNAL = {
    Channel.EMAIL: "EMAIL_HOST",
    Channel.WHATSAPP: "WHATSAPP_API_KEY",
    Channel.SMS: "SMS_PROVIDER",
}


def _upper_snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).upper()


def document_from_env(env: Mapping[str, str]) -> dict[str, Any]:
    """The global `communicationSettings` document the variables describe (maybe empty)."""
    doc: dict[str, Any] = {}
    for channel in Channel:
        prefix = channel.value.upper()
        provider = env.get(f"{prefix}_PROVIDER")
        if not provider and not env.get(_SIGNAL[channel]):
            continue
        # Without `<CHANNEL>_PROVIDER`: the provider module that declares `global_default`.
        provider = provider or registry.default_key(channel)
        if provider == registry.DISABLED:
            doc[channel.value] = {"enabled": False}
            continue
        try:
            spec = registry.get(channel, provider)
        except KeyError:
            # Leave it to validation to name the unknown provider.
            doc[channel.value] = {"primary": {"provider": provider, "credentials": {}}}
            continue
        credentials: dict[str, Any] = {}
        for name, info in spec.credentials_model.model_fields.items():
            alias = info.alias or name
            for candidate in {_upper_snake(alias), name.upper().rstrip("_")}:
                value = env.get(f"{prefix}_{candidate}")
                if value is not None and value != "":
                    credentials[alias] = value
        section: dict[str, Any] = {"primary": {"provider": provider, "credentials": credentials}}
        if channel is Channel.EMAIL:
            if env.get("EMAIL_FROM"):
                section["defaultFrom"] = env["EMAIL_FROM"]
            if env.get("EMAIL_FROM_NAME"):
                section["defaultFromName"] = env["EMAIL_FROM_NAME"]
            if "from_email" in spec.credentials_model.model_fields:
                credentials.setdefault("fromEmail", env.get("EMAIL_FROM"))
                credentials.setdefault("fromName", env.get("EMAIL_FROM_NAME"))
                credentials = {k: v for k, v in credentials.items() if v}
                section["primary"]["credentials"] = credentials
        # The global provider has nothing behind it.
        section["fallbackStrategy"] = {"enabled": False}
        doc[channel.value] = section
    return doc


def load_global_settings(
    env: Mapping[str, str], settings_file: Path | None
) -> CommunicationSettings:
    """Validated global settings. Raises pydantic.ValidationError (paths prefixed by source)."""
    if settings_file is not None:
        raw = json.loads(Path(settings_file).read_text(encoding="utf-8"))
        if isinstance(raw, dict) and "communicationSettings" in raw:
            raw = raw["communicationSettings"]
        return CommunicationSettings.model_validate(raw)
    return CommunicationSettings.model_validate(document_from_env(env))
