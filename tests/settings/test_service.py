"""The config service on a real database (SQLite or PostgreSQL) and, in that leg, real Redis."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, text

from clinicomm.config import Settings
from clinicomm.crypto import FieldDecryptionError, MasterKeyMissingError
from clinicomm.providers.base import MASK, Channel
from clinicomm.runtime import Runtime
from clinicomm.settings.cache import cache_key
from clinicomm.settings.service import VersionConflictError
from clinicomm.settings.validation import SettingsValidationError
from clinicomm.store.models import Base, Clinic
from tests.conftest import canary

SEED = json.loads((Path(__file__).parents[1] / "fixtures" / "seed_examples.json").read_text())


def seed(n: int) -> dict[str, Any]:
    (entry,) = [v for k, v in SEED.items() if k.startswith(f"Example {n}:")]
    return copy.deepcopy(entry["body"]["settings"])


async def create(rt: Runtime, clinic_id: str, settings: dict[str, Any]) -> None:
    async with rt.db.session() as session:
        change = await rt.config.create_clinic(session, clinic_id, clinic_id.title(), settings)
    await rt.config.committed(change)


def smtp_settings(password: str, host: str = "smtp.example.org") -> dict[str, Any]:
    return {
        "communicationSettings": {
            "email": {
                "primary": {
                    "provider": "smtp",
                    "credentials": {"host": host, "port": 587, "password": password},
                },
                "defaultFrom": "a@clinic.example",
            }
        }
    }


async def test_clinic_config_and_global_fallback(settings: Settings) -> None:
    env = {"EMAIL_HOST": "global-smtp.example", "EMAIL_PASSWORD": "g", "EMAIL_FROM": "g@x.example"}
    rt = await Runtime.create(settings, env=env)
    try:
        await create(rt, "clinic-a", seed(1))
        own = await rt.config.get_clinic_config("clinic-a", Channel.EMAIL)
        assert own.source == "clinic" and own.version == 1
        assert own.own is not None and own.own.primary is not None
        assert own.own.primary.credentials.password.get_secret_value() == "app-specific-password"  # type: ignore[union-attr]
        # The clinic has no WhatsApp config: the global one answers (none configured here).
        wa = await rt.config.get_clinic_config("clinic-a", Channel.WHATSAPP)
        assert wa.source == "none"
        # An unknown clinic and no clinic at all both get the global email provider.
        for clinic in ("clinic-z", None):
            resolved = await rt.config.get_clinic_config(clinic, Channel.EMAIL)
            assert resolved.source == "global"
            assert resolved.effective is not None and resolved.effective.primary is not None
            assert resolved.effective.primary.credentials.host == "global-smtp.example"  # type: ignore[union-attr]
    finally:
        await rt.close()


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
async def test_seed_examples_store_and_read_back(runtime: Runtime, n: int) -> None:
    await create(runtime, f"clinic-{n}", seed(n))
    async with runtime.db.session() as session:
        record = await runtime.config.get_clinic(session, f"clinic-{n}")
    comm = seed(n)["communicationSettings"]
    for channel in comm:
        resolved = await runtime.config.get_clinic_config(f"clinic-{n}", Channel(channel))
        assert resolved.source == "clinic"
    assert set(record.communication or {}) - {"version"} == set(comm)


async def test_save_validates_encrypts_bumps_version_and_invalidates(runtime: Runtime) -> None:
    await create(runtime, "clinic-a", smtp_settings("first"))
    before = await runtime.config.get_clinic_config("clinic-a", Channel.EMAIL)
    assert before.version == 1
    record = await runtime.config.save_settings(
        "clinic-a", smtp_settings("second", "smtp2.example")
    )
    assert record.version == 2
    after = await runtime.config.get_clinic_config("clinic-a", Channel.EMAIL)
    assert after.version == 2
    assert after.own is not None and after.own.primary is not None
    assert after.own.primary.credentials.host == "smtp2.example"  # type: ignore[union-attr]


async def test_invalid_save_changes_nothing(runtime: Runtime) -> None:
    await create(runtime, "clinic-a", smtp_settings("first"))
    bad = smtp_settings("x")
    bad["communicationSettings"]["email"]["primary"]["credentials"]["port"] = "nope"
    with pytest.raises(SettingsValidationError) as info:
        await runtime.config.save_settings("clinic-a", bad)
    assert [p.path for p in info.value.problems] == [
        "settings.communicationSettings.email.primary.credentials.port"
    ]
    async with runtime.db.session() as session:
        record = await runtime.config.get_clinic(session, "clinic-a")
    assert record.version == 1
    assert record.settings == (await _plain(runtime, "clinic-a"))


async def _plain(rt: Runtime, clinic_id: str) -> dict[str, Any]:
    async with rt.db.session() as session:
        return (await rt.config.get_clinic(session, clinic_id)).settings


async def test_stale_version_is_refused(runtime: Runtime) -> None:
    await create(runtime, "clinic-a", smtp_settings("first"))
    await runtime.config.save_settings("clinic-a", smtp_settings("second"), expected_version=1)
    with pytest.raises(VersionConflictError):
        await runtime.config.save_settings("clinic-a", smtp_settings("third"), expected_version=1)


async def test_mask_keeps_the_stored_secret(runtime: Runtime) -> None:
    await create(runtime, "clinic-a", smtp_settings("keep-me"))
    async with runtime.db.session() as session:
        masked = (await runtime.config.get_clinic(session, "clinic-a")).masked()
    creds = masked["settings"]["communicationSettings"]["email"]["primary"]["credentials"]
    assert creds["password"] == MASK
    creds["maxConnections"] = 7
    await runtime.config.save_settings("clinic-a", masked["settings"])
    resolved = await runtime.config.get_clinic_config("clinic-a", Channel.EMAIL)
    assert resolved.own is not None and resolved.own.primary is not None
    assert resolved.own.primary.credentials.password.get_secret_value() == "keep-me"  # type: ignore[union-attr]
    assert resolved.own.primary.credentials.max_connections == 7  # type: ignore[union-attr]
    # A changed endpoint with the mask: the stored secret would go to a host its author did
    # not choose, so the save is refused at the secret's path (issue 13).
    creds["host"] = "changed.example"
    with pytest.raises(SettingsValidationError) as refused:
        await runtime.config.save_settings("clinic-a", masked["settings"])
    assert [p.path for p in refused.value.problems] == [
        "settings.communicationSettings.email.primary.credentials.password"
    ]


async def test_delete_channel_falls_back_to_global(runtime: Runtime) -> None:
    await create(
        runtime,
        "clinic-a",
        seed(1)
        | {
            "communicationSettings": {
                **seed(1)["communicationSettings"],
                **seed(4)["communicationSettings"],
            }
        },
    )
    async with runtime.db.session() as session:
        change = await runtime.config.delete_settings(session, "clinic-a", Channel.EMAIL)
    await runtime.config.committed(change)
    assert (await runtime.config.get_clinic_config("clinic-a", Channel.EMAIL)).source == "none"
    assert (await runtime.config.get_clinic_config("clinic-a", Channel.WHATSAPP)).source == "clinic"


async def _raw_database_text(rt: Runtime, settings: Settings) -> str:
    """Every byte a reader of the database could see: the SQLite file (with WAL) or every row."""
    if rt.db.is_sqlite:
        await rt.db.dispose()  # checkpoint-free: read the file and the WAL as they are
        path = Path(settings.database_url.split("///", 1)[1])
        data = b""
        for candidate in (path, path.with_name(path.name + "-wal")):
            if candidate.exists():
                data += candidate.read_bytes()
        return data.decode("latin-1")
    chunks: list[str] = []
    async with rt.db.session() as session:
        for table in Base.metadata.sorted_tables:
            rows = (await session.execute(text(f'SELECT * FROM "{table.name}"'))).all()
            chunks.extend(repr(tuple(row)) for row in rows)
    return "\n".join(chunks)


async def test_no_secret_plaintext_at_rest(runtime: Runtime, settings: Settings) -> None:
    values = {name: canary(name) for name in ("password", "apikey", "token", "secret")}
    doc = {
        "communicationSettings": {
            "email": {
                "primary": {
                    "provider": "smtp",
                    "credentials": {"host": "h.example", "password": values["password"]},
                },
                "fallback": [{"provider": "sendgrid", "credentials": {"apiKey": values["apikey"]}}],
            },
            "whatsapp": {
                "primary": {
                    "provider": "twilio",
                    "credentials": {
                        "accountSid": "AC1",
                        "authToken": values["token"],
                        "fromNumber": "whatsapp:+14155238886",
                    },
                }
            },
            "sms": {
                "primary": {
                    "provider": "aws_sns",
                    "credentials": {
                        "region": "us-east-1",
                        "accessKeyId": "AKIA",
                        "secretAccessKey": values["secret"],
                    },
                }
            },
        }
    }
    await create(runtime, "clinic-canary", doc)
    for channel in Channel:
        await runtime.config.get_clinic_config("clinic-canary", channel)
    # Redis (postgres leg): only the encrypted form is cached.
    if runtime.redis is not None:
        redis_text = ""
        for channel in Channel:
            stored = await runtime.redis.hgetall(cache_key(channel.value, "clinic-canary"))
            assert stored, f"L2 entry for {channel} missing"
            redis_text += repr(stored)
        for value in values.values():
            assert value not in redis_text
    raw = await _raw_database_text(runtime, settings)
    assert "clinic-canary" in raw  # the scan does see the data
    for value in values.values():
        assert value not in raw


async def test_ciphertext_copied_to_other_clinic_or_field_fails(runtime: Runtime) -> None:
    await create(runtime, "clinic-a", smtp_settings("a-secret"))
    await create(runtime, "clinic-b", smtp_settings("b-secret"))
    async with runtime.db.session() as session:
        a = await session.get(Clinic, "clinic-a")
        b = await session.get(Clinic, "clinic-b")
        assert a is not None and b is not None
        stolen = a.settings["communicationSettings"]["email"]["primary"]["credentials"]["password"]
        doc = copy.deepcopy(b.settings)
        doc["communicationSettings"]["email"]["primary"]["credentials"]["password"] = stolen
        b.settings = doc
    with pytest.raises(
        FieldDecryptionError, match="clinic 'clinic-b'.*email.primary.credentials.password"
    ):
        async with runtime.db.session() as session:
            await runtime.config.get_clinic(session, "clinic-b")
    # Another field of the same clinic: moved from password into a fallback's apiKey.
    async with runtime.db.session() as session:
        a = await session.get(Clinic, "clinic-a")
        assert a is not None
        doc = copy.deepcopy(a.settings)
        doc["communicationSettings"]["email"]["fallback"] = [
            {"provider": "sendgrid", "enabled": True, "credentials": {"apiKey": stolen}}
        ]
        a.settings = doc
    with pytest.raises(FieldDecryptionError, match="fallback.0.credentials.apiKey"):
        async with runtime.db.session() as session:
            await runtime.config.get_clinic(session, "clinic-a")


async def test_missing_master_key_names_the_key(settings: Settings, runtime: Runtime) -> None:
    await create(runtime, "clinic-a", smtp_settings("x"))
    other = settings.model_copy(update={"master_keys": "other:" + "A" * 43 + "="})
    rt2 = await Runtime.create(other, env={})
    try:
        with pytest.raises(MasterKeyMissingError, match="'test1'"):
            await rt2.config.get_clinic_config("clinic-a", Channel.EMAIL)
    finally:
        await rt2.close()


async def test_rows_hold_ciphertext_with_version_prefix(runtime: Runtime) -> None:
    await create(runtime, "clinic-a", smtp_settings("x"))
    async with runtime.db.session() as session:
        row = (await session.execute(select(Clinic).where(Clinic.id == "clinic-a"))).scalar_one()
    stored = row.settings["communicationSettings"]["email"]["primary"]["credentials"]["password"]
    assert stored.startswith("cc1:1:")
