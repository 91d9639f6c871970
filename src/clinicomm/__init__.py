"""clinicomm: email, WhatsApp and SMS for many clinics, each through its own providers.

Public Python API:

- `Client`: send messages and read their status (same request model as the HTTP API).
- `SendRequest`, `Recipient`, `TemplateSpec`: the request; `SendAccepted`: the answer.
- `DeliveryStatus`, `Channel`: vocabularies.
- `Settings`: process settings from `CLINICOMM_*` variables.
- `Runtime`: the process's shared objects, including the config service
  (`runtime.config.get_clinic_config(clinic_id, channel)`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from clinicomm.client import Client
    from clinicomm.config import Settings
    from clinicomm.messaging.models import (
        DeliveryStatus,
        Recipient,
        SendAccepted,
        SendRequest,
        TemplateSpec,
    )
    from clinicomm.providers.base import Channel
    from clinicomm.runtime import Runtime

#: Where each public name lives. Imported on first use (PEP 562), so `import clinicomm.cli`
#: (every `clinicomm …` command, `--help` included) does not load the whole service first.
_EXPORTS = {
    "Client": "clinicomm.client",
    "Settings": "clinicomm.config",
    "DeliveryStatus": "clinicomm.messaging.models",
    "Recipient": "clinicomm.messaging.models",
    "SendAccepted": "clinicomm.messaging.models",
    "SendRequest": "clinicomm.messaging.models",
    "TemplateSpec": "clinicomm.messaging.models",
    "Channel": "clinicomm.providers.base",
    "Runtime": "clinicomm.runtime",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'clinicomm' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__version__ = "0.1.0"

__all__ = [
    "Channel",
    "Client",
    "DeliveryStatus",
    "Recipient",
    "Runtime",
    "SendAccepted",
    "SendRequest",
    "Settings",
    "TemplateSpec",
    "__version__",
]
