"""Structured logs: one JSON object per line on stderr, with the request id on every line.

Each line has `time`, `level`, `logger`, `message`, `event` and `requestId`, plus the ids bound
to the current context (`bind_context(clinicId=…, sub=…)`) and the `extra={…}` of the call.
The context lives in a `contextvars.ContextVar`, so every line logged while a request is being
handled (by any module, in any task it spawns) carries that request's id.

Logs carry ids, never secrets, emails, phone numbers or message bodies: callers pass ids in
`extra`, and this module never logs request or response bodies.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import sys
import traceback
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import IO, Any

#: The ids of the current request/task; copied into every log line.
_CONTEXT: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar(
    "clinicomm_log_context", default=None
)

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD = frozenset(
    set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__)
    | {"message", "asctime", "taskName", "color_message"}
)


def current_context() -> dict[str, str]:
    """The ids bound to the current context (a copy)."""
    return dict(_CONTEXT.get() or {})


def request_id() -> str | None:
    """The id of the request being handled, if any."""
    return (_CONTEXT.get() or {}).get("requestId")


def bind_context(**ids: str | None) -> contextvars.Token[dict[str, str] | None]:
    """Add ids (e.g. `requestId`, `clinicId`, `sub`) to the current context's log lines.

    Returns a token for `reset_context`; a `None` value is ignored.
    """
    merged = current_context()
    merged.update({k: v for k, v in ids.items() if v is not None})
    return _CONTEXT.set(merged)


def reset_context(token: contextvars.Token[dict[str, str] | None]) -> None:
    _CONTEXT.reset(token)


@contextlib.contextmanager
def log_context(**ids: str | None) -> Iterator[None]:
    """`with log_context(requestId=…):` binds ids for the block."""
    token = bind_context(**ids)
    try:
        yield
    finally:
        reset_context(token)


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object on one line."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "event": getattr(record, "event", None),
            "requestId": None,
        }
        data.update(current_context())
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in data and not key.startswith("_"):
                data[key] = value
        if record.exc_info and record.exc_info[0] is not None:
            data["error"] = record.exc_info[0].__name__
            data["traceback"] = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        return json.dumps(data, default=str, ensure_ascii=False)


_HANDLER_FLAG = "_clinicomm_json_handler"


def configure_logging(level: str | int = "INFO", stream: IO[str] | None = None) -> logging.Handler:
    """Send every log line (ours, uvicorn's, SQLAlchemy's) as JSON to `stream` (stderr).

    Idempotent: a handler installed by an earlier call is replaced, never doubled.
    """
    root = logging.getLogger()
    for existing in list(root.handlers):
        if getattr(existing, _HANDLER_FLAG, False):
            root.removeHandler(existing)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    setattr(handler, _HANDLER_FLAG, True)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    # uvicorn's own loggers propagate to the root; its access log is replaced by ours.
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").disabled = True
    return handler
