"""Structured logs: one JSON object (or one text line) per record on stderr, with the request id
on every line. `CLINICOMM_LOG_FORMAT=json|text`; unset, text on a terminal and JSON otherwise.

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

import orjson

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


def _dumps(data: dict[str, Any]) -> str:
    """One JSON line: orjson (a log line per request made stdlib json a visible share of the
    service's CPU), values it does not know as `str(value)`, as `json.dumps(default=str)`
    wrote them; stdlib json for what orjson refuses (an integer beyond 64 bits)."""
    try:
        return orjson.dumps(data, default=str, option=_ORJSON_OPTIONS).decode()
    except TypeError:
        return json.dumps(data, default=str, ensure_ascii=False)


_ORJSON_OPTIONS = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS | (
    orjson.OPT_NON_STR_KEYS
)


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
        return _dumps(data)


class TextFormatter(logging.Formatter):
    """One readable line: `time LEVEL logger: message key=value …` (ids only, like JSON)."""

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.fromtimestamp(record.created, UTC).strftime("%H:%M:%S.%f")[:-3]
        fields: dict[str, Any] = dict(current_context())
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_") and value is not None:
                fields[key] = value
        tail = " ".join(f"{k}={v}" for k, v in fields.items())
        line = f"{when} {record.levelname:<7} {record.name}: {record.getMessage()}"
        if tail:
            line = f"{line}  {tail}"
        if record.exc_info and record.exc_info[0] is not None:
            line += "\n" + "".join(traceback.format_exception(*record.exc_info)).rstrip()
        return line


class _QuietLibraries(logging.Filter):
    """Alembic's INFO lines (plugin setup, "will assume transactional DDL", …) become DEBUG:
    they say nothing an operator needs on every start."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("alembic") and record.levelno == logging.INFO:
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger().getEffectiveLevel() <= logging.DEBUG
        return True


_HANDLER_FLAG = "_clinicomm_json_handler"


def resolve_format(value: str | None, stream: IO[str]) -> str:
    """`json` or `text`: the configured one, else text on a terminal and JSON otherwise."""
    if value in ("json", "text"):
        return value
    isatty = getattr(stream, "isatty", None)
    return "text" if callable(isatty) and isatty() else "json"


def configure_logging(
    level: str | int = "INFO", stream: IO[str] | None = None, fmt: str | None = None
) -> logging.Handler:
    """Send every log line (ours, uvicorn's, SQLAlchemy's) to `stream` (stderr), as JSON or
    text (`fmt`, `CLINICOMM_LOG_FORMAT`; by default text on a terminal, JSON otherwise).

    Idempotent: a handler installed by an earlier call is replaced, never doubled.
    """
    root = logging.getLogger()
    for existing in list(root.handlers):
        if getattr(existing, _HANDLER_FLAG, False):
            root.removeHandler(existing)
    out = stream or sys.stderr
    handler = logging.StreamHandler(out)
    handler.setFormatter(TextFormatter() if resolve_format(fmt, out) == "text" else JsonFormatter())
    handler.addFilter(_QuietLibraries())
    setattr(handler, _HANDLER_FLAG, True)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    # uvicorn's own loggers propagate to the root; its access log is replaced by ours.
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").disabled = True
    return handler
