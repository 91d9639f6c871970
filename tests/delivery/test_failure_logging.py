"""A failure on the delivery path is logged by its class, never by its content; a malformed
message is a `content` error that never counts against the provider's health."""

from __future__ import annotations

import logging

import pytest

from clinicomm.delivery.sender import unclassified
from clinicomm.providers.errors import ContentError, ErrorClass, ProviderDownError
from clinicomm.routing.health import Outcome, outcome_for
from clinicomm.telemetry.logging import JsonFormatter

SECRET = "Your HIV test result for Jane Roe <jane.roe@patient.example>"


def _raise(exc: Exception) -> Exception:
    try:
        raise exc
    except Exception as caught:
        return caught


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (ValueError(f"Header values may not contain linefeed: {SECRET!r}"), ContentError),
        (UnicodeEncodeError("ascii", SECRET, 0, 1, "no"), ContentError),
        (RuntimeError(f"bug while sending {SECRET}"), ProviderDownError),
    ],
)
def test_unclassified_exception_is_logged_by_class_only(
    caplog: pytest.LogCaptureFixture, exc: Exception, kind: type
) -> None:
    caplog.set_level(logging.DEBUG)
    error = unclassified(_raise(exc), "smtp", "clinic:smtp", "delivery-1")
    assert isinstance(error, kind)
    assert SECRET not in str(error) and "Jane" not in str(error.to_dict())
    lines = [JsonFormatter().format(r) for r in caplog.records]
    assert lines and all("Jane" not in line and "patient.example" not in line for line in lines)
    assert all(r.exc_info is None for r in caplog.records)  # no traceback with the text
    record = caplog.records[-1]
    assert record.__dict__["deliveryId"] == "delivery-1"
    assert record.__dict__["error"] == type(exc).__name__
    assert str(record.__dict__["where"]).startswith("test_failure_logging.py:")


def test_content_error_fails_without_counting_for_health() -> None:
    error = ContentError("the message cannot be built: ValueError", provider="smtp")
    assert error.error_class is ErrorClass.CONTENT
    assert outcome_for(error) is Outcome.IGNORED
