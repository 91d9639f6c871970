"""Migration 0006_i14 drops the clear `credentials` of `disabled` slots stored by earlier
releases (they are refused from now on, and nothing marked their secrets for encryption)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from clinicomm.store.db import upgrade


def test_disabled_slot_credentials_are_dropped(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    url = f"sqlite+aiosqlite:///{path}"
    upgrade(url, "0005")
    settings = {
        "communicationSettings": {
            "email": {
                "primary": {"provider": "disabled", "credentials": {"apiKey": "SG.parked-secret"}},
                "fallback": [{"provider": "smtp", "credentials": {"host": "h", "port": 25}}],
            }
        }
    }
    with sqlite3.connect(path) as conn:
        conn.execute(
            "INSERT INTO clinics (id, name, settings, version, created_at, updated_at) "
            "VALUES ('c1', 'C', ?, 1, '2026-01-01', '2026-01-01')",
            (json.dumps(settings),),
        )
    upgrade(url)
    with sqlite3.connect(path) as conn:
        (stored,) = conn.execute("SELECT settings FROM clinics WHERE id = 'c1'").fetchone()
    email = json.loads(stored)["communicationSettings"]["email"]
    assert email["primary"] == {"provider": "disabled"}
    assert email["fallback"][0]["credentials"] == {"host": "h", "port": 25}
