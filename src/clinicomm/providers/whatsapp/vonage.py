"""Vonage Messages API for WhatsApp (see providers.shared.vonage)."""

from __future__ import annotations

from typing import Any

from clinicomm.providers import registry
from clinicomm.providers.base import Channel, OutboundMessage
from clinicomm.providers.shared.credentials import VonageCredentials
from clinicomm.providers.shared.messaging import (
    check_param_count,
    ordered_variables,
    template_name,
)
from clinicomm.providers.shared.vonage import VonageAdapterBase


@registry.register
class VonageWhatsAppAdapter(VonageAdapterBase):
    """WhatsApp text and template messages through Vonage."""

    key = "vonage"
    channel = Channel.WHATSAPP
    display_name = "Vonage"
    credentials_model = VonageCredentials
    vonage_channel = "whatsapp"

    def _template(self, message: OutboundMessage) -> dict[str, Any]:
        # Spec: message_type "template", template {name, parameters[]}, whatsapp {policy, locale}.
        assert message.template is not None
        template = message.template
        name = template_name(template, self.creds.templates)
        params = ordered_variables(template.variables)
        check_param_count(
            self.creds.template_params, template, name, len(params), provider=self.key
        )
        body: dict[str, Any] = {"name": name}
        if params:
            body["parameters"] = params
        return {
            "message_type": "template",
            "template": body,
            "whatsapp": {"policy": "deterministic", "locale": template.language},
        }
