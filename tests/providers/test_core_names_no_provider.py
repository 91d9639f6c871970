"""Core code names no provider: every provider specific is declared by its provider module
(aliases, opt-out/bounce/unreachable codes, webhook quirks, sender throughput fields, the
global default) and read from there. This test fails when a module outside `providers/`
names a provider key in a string, or imports one provider's module."""

from __future__ import annotations

import ast
from pathlib import Path

from clinicomm.providers import registry
from clinicomm.providers.base import Channel
from clinicomm.providers.webhooks import HANDLERS

SRC = Path(__file__).resolve().parents[2] / "src" / "clinicomm"
#: Aliases that are also ordinary words in core code: channel names, and `meta` (the message
#: metadata column). The canonical keys are checked without exception.
ORDINARY = {c.value for c in Channel} | {"meta"}


def provider_names() -> set[str]:
    names = {s.key for s in registry.specs()} | set(HANDLERS)
    for channel in Channel:
        names |= set(registry.aliases(channel))
    for handler in HANDLERS.values():
        names |= set(handler.aliases)
    return names - ORDINARY


def core_modules() -> list[Path]:
    skip = (SRC / "providers", SRC / "store" / "migrations")
    return [p for p in SRC.rglob("*.py") if not any(p.is_relative_to(s) for s in skip)]


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                ids.add(id(body[0].value))
    return ids


def test_no_core_module_names_a_provider() -> None:
    names = provider_names()
    assert {"twilio", "meta_business", "smtp", "ses", "aws_ses", "postmark"} <= names
    found = []
    for path in core_modules():
        tree = ast.parse(path.read_text(), str(path))
        docs = _docstrings(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                if id(node) not in docs and node.value in names:
                    found.append(f"{path.relative_to(SRC)}:{node.lineno} {node.value!r}")
            elif isinstance(node, ast.ImportFrom) and node.module:
                parts = node.module.split(".")
                imported = parts + [a.name for a in node.names]
                if parts[:2] == ["clinicomm", "providers"] and names & set(imported[2:]):
                    found.append(f"{path.relative_to(SRC)}:{node.lineno} imports {node.module}")
    assert found == []


def test_the_check_catches_a_hard_coded_key(tmp_path: Path) -> None:
    """The scan itself works: a module comparing with a provider key is found."""
    code = 'def f(key: str) -> bool:\n    """twilio in a docstring is fine."""\n    return key == "twilio"\n'
    tree = ast.parse(code)
    docs = _docstrings(tree)
    hits = [
        n.value
        for n in ast.walk(tree)
        if isinstance(n, ast.Constant) and n.value in provider_names() and id(n) not in docs
    ]
    assert hits == ["twilio"]
