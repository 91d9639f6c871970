"""`clinicomm keys rotate`: re-wraps every data key; interrupted runs resume; old key retired."""

from __future__ import annotations

import base64
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import select

from clinicomm.config import Settings
from clinicomm.crypto import MasterKeyring
from clinicomm.providers.base import Channel
from clinicomm.runtime import Runtime
from clinicomm.settings.keys import rotate
from clinicomm.store.models import AuditEntry, ClinicKey
from tests.conftest import MASTER_KEYS
from tests.settings.test_service import create, smtp_settings

ROOT = Path(__file__).parents[2]
NEW_KEY = f"new:{base64.b64encode(secrets.token_bytes(32)).decode()}"


def cli(settings: Settings, *args: str, master_keys: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "CLINICOMM_DATABASE_URL": settings.database_url,
        "CLINICOMM_MASTER_KEYS": master_keys,
        "CLINICOMM_DATA_DIR": str(settings.data_dir),
        "PYTHONPATH": str(ROOT / "src"),
    }
    return subprocess.run(
        [sys.executable, "-m", "clinicomm.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_rotate_then_read_with_only_the_new_key(runtime: Runtime, settings: Settings) -> None:
    for n in range(5):
        await create(runtime, f"clinic-{n}", smtp_settings(f"pw-{n}"))
    result = cli(
        settings, "keys", "rotate", "--batch-size", "2", master_keys=f"{NEW_KEY},{MASTER_KEYS}"
    )
    assert result.returncode == 0, result.stderr
    assert "5 data keys re-wrapped with master key 'new'" in result.stdout
    again = cli(settings, "keys", "rotate", master_keys=f"{NEW_KEY},{MASTER_KEYS}")
    assert "0 data keys re-wrapped" in again.stdout and "5 already current" in again.stdout

    only_new = settings.model_copy(update={"master_keys": NEW_KEY})
    rt = await Runtime.create(only_new, env={})
    try:
        for n in range(5):
            resolved = await rt.config.get_clinic_config(f"clinic-{n}", Channel.EMAIL)
            assert resolved.own is not None and resolved.own.primary is not None
            assert resolved.own.primary.credentials.password.get_secret_value() == f"pw-{n}"  # type: ignore[union-attr]
        async with rt.db.session() as session:
            actions = (await session.execute(select(AuditEntry.action))).scalars().all()
        assert actions.count("key.rotate") == 5
    finally:
        await rt.close()


async def test_interrupted_rotation_resumes(runtime: Runtime) -> None:
    for n in range(6):
        await create(runtime, f"clinic-{n}", smtp_settings(f"pw-{n}"))
    ring = MasterKeyring.parse(f"{NEW_KEY},{MASTER_KEYS}")
    seen = 0

    def crash_after_first_batch(done: int, total: int) -> None:
        nonlocal seen
        seen += 1
        if done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        await rotate(runtime.db, ring, batch_size=2, progress=crash_after_first_batch)
    async with runtime.db.session() as session:
        kids = (await session.execute(select(ClinicKey.master_kid))).scalars().all()
    # The first batch (2 keys) committed; the interrupted batch rolled back whole.
    assert sorted(kids).count("new") == 2
    report = await rotate(runtime.db, ring, batch_size=2)
    assert report.rotated == 4 and report.total == 6


def test_wrong_master_key_exits_cleanly(tmp_path: Path, settings: Settings) -> None:
    result = cli(settings, "keys", "rotate", master_keys="bad-entry")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "not 'kid:base64key'" in result.stderr


async def test_rotate_with_missing_old_key_names_it(runtime: Runtime, settings: Settings) -> None:
    await create(runtime, "clinic-a", smtp_settings("x"))
    result = cli(settings, "keys", "rotate", master_keys=NEW_KEY)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "master key 'test1'" in result.stderr


def test_help_on_every_command(settings: Settings) -> None:
    for args in (
        ["--help"],
        ["keys", "--help"],
        ["keys", "rotate", "--help"],
        ["migrate", "--help"],
    ):
        result = cli(settings, *args, master_keys=MASTER_KEYS)
        assert result.returncode == 0 and "Usage" in result.stdout


def test_bad_argument_exits_2(settings: Settings) -> None:
    result = cli(settings, "keys", "rotate", "--batch-size", "zero", master_keys=MASTER_KEYS)
    assert result.returncode == 2


async def test_rotate_data_cli_then_master_rotate_keeps_the_index_key(
    runtime: Runtime, settings: Settings
) -> None:
    await create(runtime, "clinic-d", smtp_settings("pw-d"))
    index = await runtime.keys.index_for(runtime.db, "clinic-d", "p@example.com")
    bad = cli(settings, "keys", "rotate-data", master_keys=MASTER_KEYS)
    assert bad.returncode == 2 and "--clinic ID or --all" in bad.stderr
    result = cli(
        settings, "keys", "rotate-data", "--clinic", "clinic-d", "--settle-seconds", "0",
        master_keys=MASTER_KEYS,
    )
    assert result.returncode == 0, result.stderr
    assert "clinic-d: data key v2 (destroyed v1)" in result.stdout
    # A master-key rotation afterwards re-wraps the stored index key too.
    moved = cli(settings, "keys", "rotate", master_keys=f"{NEW_KEY},{MASTER_KEYS}")
    assert moved.returncode == 0, moved.stderr
    only_new = settings.model_copy(update={"master_keys": NEW_KEY})
    rt = await Runtime.create(only_new, env={})
    try:
        cipher = await rt.keys.cipher_for(rt.db, "clinic-d")
        assert cipher.key_version == 2
        assert cipher.index("P@example.com") == index  # the blind index did not change
        resolved = await rt.config.get_clinic_config("clinic-d", Channel.EMAIL)
        assert resolved.own is not None and resolved.own.primary is not None
        assert resolved.own.primary.credentials.password.get_secret_value() == "pw-d"  # type: ignore[union-attr]
    finally:
        await rt.close()
