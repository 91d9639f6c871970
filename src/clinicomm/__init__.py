"""clinicomm: email, WhatsApp and SMS for many clinics, each through its own providers.

Public Python API:

- `Client`: send messages and read their status (same request model as the HTTP API).
- `SendRequest`, `Recipient`, `TemplateSpec`: the request; `SendAccepted`: the answer.
- `DeliveryStatus`, `Channel`: vocabularies.
- `Settings`: process settings from `CLINICOMM_*` variables.
- `Runtime`: the process's shared objects, including the config service
  (`runtime.config.get_clinic_config(clinic_id, channel)`).
"""

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
