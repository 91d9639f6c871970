"""Envelope encryption: per-clinic AES-256-GCM data keys wrapped by master keys.

- Master keys come from `CLINICOMM_MASTER_KEYS` (`kid:base64(32 bytes)`, comma-separated). The
  first key wraps new and rotated data keys; every listed key can unwrap.
- Each clinic has its own random 256-bit data key, stored only wrapped (`clinic_keys`); the
  wrap's associated data is the clinic id, so a wrapped key copied to another clinic fails.
- Each secret field is encrypted with the clinic's data key. Its associated data is
  `clinic id | field path`, so a ciphertext copied to another clinic or another field fails to
  decrypt. The stored form is versioned: `cc1:<data key version>:<base64(nonce || ct+tag)>`.

Errors are `CryptoError` subclasses with messages that name the key id, the clinic and the
field, never a value.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

log = logging.getLogger(__name__)

CIPHERTEXT_PREFIX = "cc1:"
_NONCE = 12
_KEY_BYTES = 32


class CryptoError(Exception):
    """Base of every encryption failure; the message is safe to show an operator."""


class MasterKeyConfigError(CryptoError):
    """`CLINICOMM_MASTER_KEYS` is malformed, missing, or a dev key is refused."""


class MasterKeyMissingError(CryptoError):
    """A data key is wrapped with a master key id that is not configured."""

    def __init__(self, kid: str, clinic_id: str) -> None:
        super().__init__(
            f"clinic {clinic_id!r}: its data key is wrapped with master key {kid!r}, which is not "
            f"in CLINICOMM_MASTER_KEYS; add that key (any position) to read this clinic"
        )
        self.kid = kid
        self.clinic_id = clinic_id


class MasterKeyMismatchError(CryptoError):
    """The configured master key with that id is not the one that wrapped the data key."""

    def __init__(self, kid: str, clinic_id: str) -> None:
        super().__init__(
            f"clinic {clinic_id!r}: master key {kid!r} cannot unwrap its data key "
            f"(wrong key material for that id, or the wrapped key was tampered with)"
        )
        self.kid = kid
        self.clinic_id = clinic_id


class FieldDecryptionError(CryptoError):
    """A secret field's ciphertext does not belong to this clinic and field, or was altered."""

    def __init__(self, clinic_id: str, field: str, reason: str) -> None:
        super().__init__(f"clinic {clinic_id!r}: secret {field!r} cannot be decrypted: {reason}")
        self.clinic_id = clinic_id
        self.field = field


@dataclass(frozen=True, slots=True)
class MasterKey:
    kid: str
    key: bytes


class MasterKeyring:
    """The configured master keys; the first one is the current key."""

    def __init__(self, keys: list[MasterKey], *, generated: bool = False) -> None:
        if not keys:
            raise MasterKeyConfigError("no master key configured")
        kids = [k.kid for k in keys]
        if len(set(kids)) != len(kids):
            raise MasterKeyConfigError("CLINICOMM_MASTER_KEYS lists a key id twice")
        self._keys = {k.kid: k for k in keys}
        self.current = keys[0]
        self.generated = generated

    @property
    def kids(self) -> list[str]:
        return list(self._keys)

    @classmethod
    def parse(cls, value: str) -> MasterKeyring:
        """Parse `kid:base64key,…`; raises MasterKeyConfigError naming the bad entry."""
        keys: list[MasterKey] = []
        for position, item in enumerate(p.strip() for p in value.split(",")):
            if not item:
                continue
            kid, sep, b64 = item.partition(":")
            kid = kid.strip()
            if not sep or not kid:
                raise MasterKeyConfigError(
                    f"CLINICOMM_MASTER_KEYS entry {position + 1} is not 'kid:base64key'"
                )
            try:
                raw = base64.b64decode(b64.strip(), validate=True)
            except (binascii.Error, ValueError) as exc:
                raise MasterKeyConfigError(f"master key {kid!r} is not valid base64") from exc
            if len(raw) != _KEY_BYTES:
                raise MasterKeyConfigError(
                    f"master key {kid!r} is {len(raw)} bytes; AES-256 needs {_KEY_BYTES}"
                )
            keys.append(MasterKey(kid, raw))
        return cls(keys)

    @classmethod
    def from_environment(
        cls, value: str | None, *, data_dir: Path, production: bool
    ) -> MasterKeyring:
        """The keyring from `CLINICOMM_MASTER_KEYS`, or a dev key kept in `data_dir/master.key`.

        In production a missing value is an error, never a generated key.
        """
        if value:
            return cls.parse(value)
        if production:
            raise MasterKeyConfigError(
                "CLINICOMM_MASTER_KEYS is not set; CLINICOMM_ENV=production refuses a dev key"
            )
        path = data_dir / "master.key"
        if not path.exists():
            data_dir.mkdir(parents=True, exist_ok=True)
            encoded = base64.b64encode(secrets.token_bytes(_KEY_BYTES)).decode()
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(f"dev:{encoded}\n")
        log.warning(
            "using a DEVELOPMENT master key; set CLINICOMM_MASTER_KEYS for real data",
            extra={"event": "dev_master_key", "path": str(path)},
        )
        ring = cls.parse(path.read_text().strip())
        ring.generated = True
        return ring

    def wrap(self, data_key: bytes, clinic_id: str) -> tuple[str, bytes]:
        """Wrap a data key with the current master key; returns (kid, nonce || ciphertext)."""
        nonce = os.urandom(_NONCE)
        blob = AESGCM(self.current.key).encrypt(nonce, data_key, _wrap_aad(clinic_id))
        return self.current.kid, nonce + blob

    def unwrap(self, kid: str, wrapped: bytes, clinic_id: str) -> bytes:
        """Unwrap a clinic's data key. Raises MasterKeyMissingError / MasterKeyMismatchError."""
        master = self._keys.get(kid)
        if master is None:
            raise MasterKeyMissingError(kid, clinic_id)
        try:
            return AESGCM(master.key).decrypt(
                wrapped[:_NONCE], wrapped[_NONCE:], _wrap_aad(clinic_id)
            )
        except InvalidTag as exc:
            raise MasterKeyMismatchError(kid, clinic_id) from exc


def _wrap_aad(clinic_id: str) -> bytes:
    return f"clinicomm:datakey:{clinic_id}".encode()


def new_data_key() -> bytes:
    """A fresh random AES-256 key."""
    return AESGCM.generate_key(bit_length=256)


_BLOB_MAGIC = b"cc2"


def _blob_version(blob: bytes) -> int:
    """The data key version of a binary ciphertext (1 for one without a header)."""
    if blob.startswith(_BLOB_MAGIC) and len(blob) >= len(_BLOB_MAGIC) + 2:
        return int.from_bytes(blob[len(_BLOB_MAGIC) : len(_BLOB_MAGIC) + 2], "big")
    return 1


#: Prefix of a blind index: `bi1:` + hex HMAC-SHA256 of the canonical address.
INDEX_PREFIX = "bi1:"


def derive_index_key(data_key: bytes, clinic_id: str) -> bytes:
    """The clinic's blind-index key: HMAC-SHA256 of a fixed label under its data key (a
    one-step HKDF-Expand), so it is as secret as the data key but never used to encrypt."""
    label = f"clinicomm:blind-index:v1:{clinic_id}".encode()
    return hmac.new(data_key, label + b"\x01", hashlib.sha256).digest()


class FieldCipher:
    """Encrypts and decrypts one clinic's secret fields with its data key, and computes the
    blind index of its patients' addresses."""

    __slots__ = ("_aead", "_index_key", "_index_mac", "_older", "clinic_id", "key_version")

    def __init__(
        self,
        clinic_id: str,
        data_key: bytes,
        key_version: int = 1,
        *,
        older: dict[int, bytes] | None = None,
        index_key: bytes | None = None,
    ) -> None:
        """`data_key` (version `key_version`) encrypts; `older` versions still decrypt while a
        data-key rotation runs. `index_key` is the clinic's stable blind-index key (derived
        from the data key when not given: a clinic whose data key never rotated)."""
        self.clinic_id = clinic_id
        self.key_version = key_version
        self._aead = AESGCM(data_key)
        self._older = {v: AESGCM(k) for v, k in (older or {}).items() if v != key_version}
        self._index_key = index_key or derive_index_key(data_key, clinic_id)
        # Keyed once; `index` copies it (a copy costs about half of keying a new HMAC).
        self._index_mac = hmac.new(self._index_key, digestmod=hashlib.sha256)

    @property
    def index_key(self) -> bytes:
        return self._index_key

    def _for_version(self, version: int, field: str) -> AESGCM:
        if version == self.key_version:
            return self._aead
        aead = self._older.get(version)
        if aead is None:
            raise FieldDecryptionError(
                self.clinic_id,
                field,
                f"encrypted with data key v{version}, which this clinic no longer has",
            )
        return aead

    def is_current(self, stored: str | bytes) -> bool:
        """Whether a stored value is under the current data key version."""
        if isinstance(stored, bytes):
            return _blob_version(stored) == self.key_version
        return stored.startswith(f"{CIPHERTEXT_PREFIX}{self.key_version}:")

    def index(self, address: str) -> str:
        """The blind index of an address (email addresses compared lower-cased, E.164 as is):
        equal addresses of one clinic give equal indexes; without the clinic's key an index
        reveals nothing and cannot be matched to another clinic's."""
        canonical = address.strip().lower()  # E.164 has no letters; emails compare lower-cased
        mac = self._index_mac.copy()
        mac.update(canonical.encode())
        return INDEX_PREFIX + mac.hexdigest()

    def encrypt_address(self, address: str) -> str:
        """A patient's address as stored (`cc1:` form), bound to this clinic (not to a row, so
        a delivery's ciphertext can be copied into the opt-out it causes)."""
        return self.encrypt(address, "address")

    def decrypt_address(self, stored: str) -> str:
        """The address of `encrypt_address`; a value that is not a ciphertext is returned as it
        is (a row written before addresses were encrypted, not yet migrated)."""
        if not is_ciphertext(stored):
            return stored
        return self.decrypt(stored, "address")

    def __repr__(self) -> str:
        return f"<FieldCipher clinic={self.clinic_id!r} v{self.key_version}>"

    def _aad(self, field: str) -> bytes:
        return f"clinicomm:field:{self.clinic_id}|{field}".encode()

    def encrypt(self, plaintext: str, field: str) -> str:
        """The stored form of a secret at `field` (a dotted JSON path)."""
        nonce = os.urandom(_NONCE)
        ct = self._aead.encrypt(nonce, plaintext.encode(), self._aad(field))
        body = base64.b64encode(nonce + ct).decode()
        return f"{CIPHERTEXT_PREFIX}{self.key_version}:{body}"

    def encrypt_bytes(self, plaintext: bytes, context: str) -> bytes:
        """Binary form (message bodies): `cc2` ‖ key version (2 bytes) ‖ nonce ‖ ciphertext,
        bound to `context`. (Blobs written before versions were recorded are version 1.)"""
        nonce = os.urandom(_NONCE)
        head = _BLOB_MAGIC + self.key_version.to_bytes(2, "big")
        return head + nonce + self._aead.encrypt(nonce, plaintext, self._aad(context))

    def decrypt_bytes(self, blob: bytes, context: str) -> bytes:
        """Plaintext of `encrypt_bytes` under any version this cipher holds."""
        aad = self._aad(context)
        if blob.startswith(_BLOB_MAGIC):
            version = _blob_version(blob)
            aead = self._aead if version == self.key_version else self._older.get(version)
            body = blob[len(_BLOB_MAGIC) + 2 :]
            if aead is not None:
                try:
                    return aead.decrypt(body[:_NONCE], body[_NONCE:], aad)
                except InvalidTag:
                    pass  # maybe a legacy blob whose random nonce begins with the magic
            legacy = self._aead if self.key_version == 1 else self._older.get(1)
            if legacy is not None:
                try:
                    return legacy.decrypt(blob[:_NONCE], blob[_NONCE:], aad)
                except InvalidTag:
                    pass
            reason = "authentication failed" if aead is not None else f"no data key v{version}"
            raise FieldDecryptionError(self.clinic_id, context, reason)
        try:
            return self._for_version(1, context).decrypt(blob[:_NONCE], blob[_NONCE:], aad)
        except InvalidTag as exc:
            raise FieldDecryptionError(self.clinic_id, context, "authentication failed") from exc

    def decrypt(self, stored: str, field: str) -> str:
        """Plaintext of a stored secret. Raises FieldDecryptionError naming clinic and field."""
        if not is_ciphertext(stored):
            raise FieldDecryptionError(self.clinic_id, field, "value is not a clinicomm ciphertext")
        _, version, body = stored.split(":", 2)
        if not version.isdigit():
            raise FieldDecryptionError(self.clinic_id, field, "malformed ciphertext")
        aead = self._for_version(int(version), field)
        try:
            raw = base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise FieldDecryptionError(self.clinic_id, field, "malformed ciphertext") from exc
        try:
            return aead.decrypt(raw[:_NONCE], raw[_NONCE:], self._aad(field)).decode()
        except InvalidTag as exc:
            raise FieldDecryptionError(
                self.clinic_id,
                field,
                "authentication failed (copied from another clinic or field, or altered)",
            ) from exc


def is_ciphertext(value: object) -> bool:
    return isinstance(value, str) and value.startswith(CIPHERTEXT_PREFIX) and value.count(":") >= 2


def is_index(value: object) -> bool:
    return isinstance(value, str) and value.startswith(INDEX_PREFIX)
