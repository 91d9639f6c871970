"""Audit diffs of settings documents, with secrets shown as changed, never as values."""

from __future__ import annotations

from typing import Any

from clinicomm.providers.base import MASK
from clinicomm.settings import secrets


def settings_diff(
    before: dict[str, Any] | None, after: dict[str, Any] | None
) -> list[dict[str, Any]]:
    """Changes from `before` to `after` (plain documents) as `{path, op, from?, to?}` items.

    A secret that changed appears as `{"path": …, "op": "replace", "secret": true}`: the audit
    log says *that* it changed, never what it was or became.
    """
    before = before or {}
    after = after or {}
    secret = {secrets.dotted(p, n) for p, n in secrets.secret_paths(before)}
    secret |= {secrets.dotted(p, n) for p, n in secrets.secret_paths(after)}
    changes: list[dict[str, Any]] = []
    _walk(before, after, "", secret, changes)
    return changes


def _walk(a: Any, b: Any, path: str, secret: set[str], out: list[dict[str, Any]]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            child = f"{path}.{key}" if path else str(key)
            if key not in a:
                out.append(_item(child, "add", None, b[key], secret))
            elif key not in b:
                out.append(_item(child, "remove", a[key], None, secret))
            else:
                _walk(a[key], b[key], child, secret, out)
        return
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for index, (x, y) in enumerate(zip(a, b, strict=True)):
            _walk(x, y, f"{path}.{index}", secret, out)
        return
    if a != b:
        out.append(_item(path, "replace", a, b, secret))


def _item(path: str, op: str, old: Any, new: Any, secret: set[str]) -> dict[str, Any]:
    if path in secret:
        return {"path": path, "op": op, "secret": True}
    item: dict[str, Any] = {"path": path, "op": op}
    if op != "add":
        item["from"] = _redact_nested(path, old, secret)
    if op != "remove":
        item["to"] = _redact_nested(path, new, secret)
    return item


def _redact_nested(path: str, value: Any, secret: set[str]) -> Any:
    """Mask secrets inside a whole sub-document that was added or removed."""
    if isinstance(value, dict):
        return {
            k: (MASK if f"{path}.{k}" in secret else _redact_nested(f"{path}.{k}", v, secret))
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_redact_nested(f"{path}.{i}", v, secret) for i, v in enumerate(value)]
    return value
