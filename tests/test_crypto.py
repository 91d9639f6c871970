"""Envelope encryption: binding to clinic and field, master key errors, dev keys."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets

import pytest

from clinicomm.crypto import (
    FieldCipher,
    FieldDecryptionError,
    MasterKeyConfigError,
    MasterKeyMismatchError,
    MasterKeyMissingError,
    MasterKeyring,
    new_data_key,
)


def key(kid: str) -> str:
    return f"{kid}:{base64.b64encode(secrets.token_bytes(32)).decode()}"


def test_field_ciphertext_is_bound_to_clinic_and_field() -> None:
    data_key = new_data_key()
    a = FieldCipher("clinic-a", data_key)
    stored = a.encrypt("s3cret", "email.primary.credentials.password")
    assert "s3cret" not in stored and stored.startswith("cc1:1:")
    assert a.decrypt(stored, "email.primary.credentials.password") == "s3cret"
    with pytest.raises(FieldDecryptionError, match="'email.fallback.0.credentials.password'"):
        a.decrypt(stored, "email.fallback.0.credentials.password")
    # Same key material, other clinic: the associated data differs, so it fails too.
    b = FieldCipher("clinic-b", data_key)
    with pytest.raises(FieldDecryptionError, match="clinic 'clinic-b'"):
        b.decrypt(stored, "email.primary.credentials.password")


def test_tampered_ciphertext_fails_clearly() -> None:
    cipher = FieldCipher("c", new_data_key())
    stored = cipher.encrypt("value", "f")
    raw = bytearray(base64.b64decode(stored.split(":", 2)[2]))
    raw[-1] ^= 1
    tampered = "cc1:1:" + base64.b64encode(bytes(raw)).decode()
    with pytest.raises(FieldDecryptionError, match="authentication failed"):
        cipher.decrypt(tampered, "f")
    with pytest.raises(FieldDecryptionError, match="not a clinicomm ciphertext"):
        cipher.decrypt("plain", "f")


def test_wrapped_data_key_errors_name_the_key_id() -> None:
    ring = MasterKeyring.parse(key("k1"))
    kid, wrapped = ring.wrap(b"\x01" * 32, "clinic-a")
    assert kid == "k1"
    assert ring.unwrap(kid, wrapped, "clinic-a") == b"\x01" * 32
    with pytest.raises(MasterKeyMismatchError, match="'k1'"):
        MasterKeyring.parse(key("k1")).unwrap(kid, wrapped, "clinic-a")
    with pytest.raises(MasterKeyMissingError, match="'k1'.*not in CLINICOMM_MASTER_KEYS"):
        MasterKeyring.parse(key("k2")).unwrap(kid, wrapped, "clinic-a")
    with pytest.raises(MasterKeyMismatchError):
        ring.unwrap(kid, wrapped, "clinic-b")


def test_first_key_encrypts_all_decrypt() -> None:
    old = key("old")
    new = key("new")
    _, wrapped = MasterKeyring.parse(old).wrap(b"k" * 32, "c")
    both = MasterKeyring.parse(f"{new},{old}")
    assert both.current.kid == "new"
    assert both.unwrap("old", wrapped, "c") == b"k" * 32


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("nokid", "not 'kid:base64key'"),
        ("k1:!!!", "not valid base64"),
        (f"k1:{base64.b64encode(b'short').decode()}", "5 bytes"),
        (f"{key('a')},{key('a')}", "twice"),
    ],
    # Stable ids (the values hold random keys): xdist workers must collect the same names.
    ids=["no-kid", "bad-base64", "short-key", "kid-twice"],
)
def test_bad_master_key_config(value: str, message: str) -> None:
    with pytest.raises(MasterKeyConfigError, match=message):
        MasterKeyring.parse(value)


def test_dev_key_is_generated_once_with_0600_and_refused_in_production(tmp_path, caplog) -> None:
    ring = MasterKeyring.from_environment(None, data_dir=tmp_path, production=False)
    assert ring.generated
    path = tmp_path / "master.key"
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    again = MasterKeyring.from_environment(None, data_dir=tmp_path, production=False)
    assert again.current.key == ring.current.key
    assert "DEVELOPMENT master key" in caplog.text
    with pytest.raises(MasterKeyConfigError, match="production"):
        MasterKeyring.from_environment(None, data_dir=tmp_path, production=True)


def test_blind_index_is_hmac_sha256_of_the_canonical_address() -> None:
    """Stored indexes are compared across releases: the value must never change (known answer:
    HMAC-SHA256 under the clinic's index key of the trimmed, lower-cased address)."""
    data_key = bytes(range(32))
    cipher = FieldCipher("clinic-a", data_key)
    expected = hmac.new(cipher.index_key, b"patient@example.com", hashlib.sha256).hexdigest()
    assert cipher.index(" Patient@Example.com ") == "bi1:" + expected
    assert cipher.index("patient@example.com") == cipher.index("PATIENT@example.com")
    assert cipher.index("+14155552671") != cipher.index("+14155552672")
    other = FieldCipher("clinic-b", data_key)
    assert other.index("patient@example.com") != cipher.index("patient@example.com")
