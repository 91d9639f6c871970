"""Where the secrets are in a `communicationSettings` document, and what to do with them.

All functions work on the JSON (dict) form, so the same walk serves encryption at rest,
decryption, masking in answers, keeping a masked secret on PUT, and redacting audit diffs.
The secret fields of a slot are those its provider's credentials model declares `SecretStr`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any

from clinicomm.crypto import FieldCipher
from clinicomm.providers import registry
from clinicomm.providers.base import MASK, Channel

Path = tuple[str | int, ...]
CHANNEL_KEYS = tuple(c.value for c in Channel)


def _slots(doc: dict[str, Any]) -> Iterator[tuple[Channel, Path, dict[str, Any]]]:
    for channel in Channel:
        section = doc.get(channel.value)
        if not isinstance(section, dict):
            continue
        primary = section.get("primary")
        if isinstance(primary, dict):
            yield channel, (channel.value, "primary"), primary
        fallback = section.get("fallback")
        if isinstance(fallback, list):
            for index, slot in enumerate(fallback):
                if isinstance(slot, dict):
                    yield channel, (channel.value, "fallback", index), slot


def secret_paths(doc: dict[str, Any]) -> Iterator[tuple[Path, str]]:
    """Yield (path of the credentials dict, secret field name) for every secret present:
    the credentials' `SecretStr` fields and the status callbacks' `secret`."""
    callbacks = doc.get("callbacks")
    if isinstance(callbacks, dict) and callbacks.get("secret") is not None:
        yield ("callbacks",), "secret"
    for channel, path, slot in _slots(doc):
        provider = slot.get("provider")
        credentials = slot.get("credentials")
        if not isinstance(provider, str) or not isinstance(credentials, dict):
            continue
        try:
            spec = registry.get(channel, provider)
        except KeyError:
            continue
        for name in spec.credentials_model.secret_fields():
            if credentials.get(name) is not None:
                yield (*path, "credentials"), name


def dotted(path: Path, name: str | None = None) -> str:
    parts = [str(p) for p in path]
    if name is not None:
        parts.append(name)
    return ".".join(parts)


def map_secrets(doc: dict[str, Any], fn: Callable[[str, Any], Any]) -> dict[str, Any]:
    """A deep copy of `doc` with every secret value replaced by `fn(dotted path, value)`."""
    out = copy.deepcopy(doc)
    for path, name in list(secret_paths(out)):
        holder = _get(out, path)
        holder[name] = fn(dotted(path, name), holder[name])
    return out


def encrypt(doc: dict[str, Any], cipher: FieldCipher) -> dict[str, Any]:
    """The stored form: every secret encrypted, bound to the clinic and its field path."""
    return map_secrets(doc, lambda field, value: cipher.encrypt(str(value), field))


def decrypt(doc: dict[str, Any], cipher: FieldCipher) -> dict[str, Any]:
    """Plain form of a stored document (raises FieldDecryptionError naming the field)."""
    return map_secrets(doc, lambda field, value: cipher.decrypt(str(value), field))


def mask(doc: dict[str, Any]) -> dict[str, Any]:
    """Every secret replaced by the mask; safe to answer and to log."""
    return map_secrets(doc, lambda _field, _value: MASK)


def masked_paths(doc: dict[str, Any]) -> list[tuple[Path, str]]:
    """Secrets given as the mask (the client wants to keep the stored value)."""
    return [(p, n) for p, n in secret_paths(doc) if _get(doc, p).get(n) == MASK]


def _get(doc: dict[str, Any], path: Path) -> dict[str, Any]:
    node: Any = doc
    for part in path:
        node = node[part]
    assert isinstance(node, dict)
    return node


def lookup(doc: dict[str, Any], path: Path) -> dict[str, Any] | None:
    """The dict at `path`, or None when the path does not exist."""
    node: Any = doc
    for part in path:
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return None
    return node if isinstance(node, dict) else None


def provider_at(doc: dict[str, Any], credentials_path: Path) -> str | None:
    """The provider key of the slot owning a credentials path."""
    slot = lookup(doc, credentials_path[:-1])
    value = slot.get("provider") if slot else None
    return value if isinstance(value, str) else None
