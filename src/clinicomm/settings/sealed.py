"""JSON objects stored encrypted in a JSON column: `{"sealed": "cc1:…"}`.

Used for what may identify a patient but is not message content: a message's `metadata`, the
stored first answer of an idempotent send (it lists the recipients). The associated data binds
the ciphertext to its row, so it cannot be moved to another one. `open_json` reads a legacy
plain object (a row written before this) as it is.
"""

from __future__ import annotations

from typing import Any

import orjson

from clinicomm.crypto import FieldCipher, is_ciphertext

SEALED = "sealed"


def seal_json(cipher: FieldCipher, value: dict[str, Any], context: str) -> dict[str, Any]:
    """`value` encrypted with the clinic's data key, bound to `context`."""
    return {SEALED: cipher.encrypt(orjson.dumps(value).decode(), context)}


def is_sealed(stored: dict[str, Any] | None) -> bool:
    return isinstance(stored, dict) and len(stored) == 1 and is_ciphertext(stored.get(SEALED))


def open_json(cipher: FieldCipher, stored: dict[str, Any] | None, context: str) -> dict[str, Any]:
    """The object of `seal_json`; `{}` for an erased value, a legacy plain object as it is."""
    if not stored:
        return {}
    if not is_sealed(stored):
        return stored
    value = orjson.loads(cipher.decrypt(stored[SEALED], context))
    return value if isinstance(value, dict) else {}
