"""What the WhatsApp and SMS adapters share beyond the HTTP seam (`shared.http.HttpAdapter`).

The recipient in canonical E.164, the text of a message, and what every template send needs:
resolve the logical name, order the variables, check the declared parameter count before any
call.
"""

from __future__ import annotations

from collections.abc import Mapping

from clinicomm.providers.base import OutboundMessage, TemplateRef
from clinicomm.providers.errors import ConfigurationError, RecipientError
from clinicomm.providers.phone import normalize_e164


def recipient_e164(message: OutboundMessage, provider: str) -> str:
    """The message's recipient in canonical E.164; RecipientError (no call) if it is not."""
    try:
        return normalize_e164(message.to)
    except ValueError as exc:
        raise RecipientError(f"invalid phone number: {exc}", provider=provider) from None


def template_name(template: TemplateRef, mapping: Mapping[str, str]) -> str:
    """The provider's name for a template: the credentials' mapping of a logical name, or as is."""
    return mapping.get(template.name, template.name)


def ordered_variables(variables: Mapping[str, str]) -> list[str]:
    """Positional parameters from `variables`: keys "1", "2", … in numeric order.

    Non-numeric keys sort after the numeric ones, by name, so the order is deterministic.
    """

    def order(key: str) -> tuple[int, int, str]:
        return (0, int(key), "") if key.isdigit() else (1, 0, key)

    return [str(variables[k]) for k in sorted(variables, key=order)]


def check_param_count(
    declared: Mapping[str, int],
    template: TemplateRef,
    provider_name: str,
    count: int,
    *,
    provider: str,
) -> None:
    """Raise ConfigurationError (before any call) when a declared parameter count differs.

    `declared` maps a template name (logical or the provider's) to its body parameter count;
    a template without a declaration is not checked.
    """
    expected = declared.get(template.name, declared.get(provider_name))
    if expected is not None and expected != count:
        raise ConfigurationError(
            f"template {template.name!r} takes {expected} parameters, got {count}",
            provider=provider,
            code="template_params",
        )


def require_text(message: OutboundMessage, provider: str) -> str:
    """The message's text; ConfigurationError when it has none (nothing to send)."""
    if not message.text:
        raise ConfigurationError("message has no text and no usable template", provider=provider)
    return message.text
