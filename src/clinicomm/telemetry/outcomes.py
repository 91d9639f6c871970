"""The one log line of a delivery that ends `failed`, `bounced`, `suppressed` or `expired`.

Called where that end is decided: the worker (`delivery.worker`, once per handled delivery)
and the webhook status path (`delivery.ingest`). The line carries ids, the channel, the last
provider, the error class and the provider's code: never an address, a name or a body
(error messages are left out: a provider may echo the address in them).
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("clinicomm.delivery.outcome")

ENDS = frozenset({"failed", "bounced", "suppressed", "expired"})


def _last_error(error: dict[str, Any] | None) -> dict[str, Any]:
    if not error:
        return {}
    errors = error.get("errors")
    if isinstance(errors, list) and errors and isinstance(errors[-1], dict):
        last: dict[str, Any] = errors[-1]
        return last
    return error


def log_delivery_end(
    *,
    delivery_id: str,
    message_id: str | None,
    clinic_id: str | None,
    channel: str,
    status: str,
    provider: str | None,
    error: dict[str, Any] | None,
    attempts: int | None = None,
) -> None:
    """Log `delivery_failed` / `delivery_bounced` / `delivery_suppressed` (WARNING for
    failed and bounced, INFO for an opt-out honoured)."""
    if status not in ENDS:
        return
    last = _last_error(error)
    errors = error.get("errors") if error else None
    log.log(
        logging.INFO if status == "suppressed" else logging.WARNING,  # expired: late, warn
        "delivery %s",
        status,
        extra={
            "event": f"delivery_{status}",
            "deliveryId": delivery_id,
            "messageId": message_id,
            "clinicId": clinic_id,
            "channel": channel,
            "status": status,
            "provider": provider or last.get("provider"),
            "errorClass": last.get("class"),
            "errorCode": last.get("code"),
            "statusCode": last.get("statusCode"),
            "providersTried": len(errors) if isinstance(errors, list) else 0,
            "attempts": attempts,
        },
    )
