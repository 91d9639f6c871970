"""`store.sqlite_checkpoint`: the writing process checkpoints its SQLite file's WAL from a
thread, so commits on the loop's thread do not; the thread stops with the database, and a
failure is logged once per run of failures. On a SQLite file of their own whatever
`CLINICOMM_TEST_DB` is."""

from __future__ import annotations

import asyncio
import logging
import shutil
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest

from clinicomm.store.db import Database
from clinicomm.store.models import Message
from clinicomm.store.sqlite_checkpoint import Checkpointer
from clinicomm.store.sqlite_raw import Transaction

INSERT = Message.__table__.insert()


def _threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "sqlite-checkpoint"]


def _wal_frames(path: Path) -> tuple[int, int]:
    """(frames in the WAL, frames of it checkpointed), as a passive checkpoint reports."""
    with sqlite3.connect(path) as connection:
        _, log, done = connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    return log, done


async def test_the_writer_checkpoints_from_its_own_thread(
    sqlite_template: Path, tmp_path: Path
) -> None:
    path = tmp_path / "c.db"
    shutil.copy(sqlite_template, path)
    with sqlite3.connect(path) as connection:
        connection.execute("PRAGMA journal_mode=WAL")
    db = Database(f"sqlite+aiosqlite:///{path}")
    raw = db.raw
    assert raw is not None
    raw.checkpointer.interval = 0.05
    before = len(_threads())

    def work(tx: Transaction) -> None:
        tx.insert(INSERT, [_message(i) for i in range(200)])

    try:
        async with db.writing():
            await raw.transaction(work)
        assert len(_threads()) == before + 1  # started with the writer
        for _ in range(100):
            if raw.checkpointer.runs >= 2:
                break
            await asyncio.sleep(0.05)
        assert raw.checkpointer.runs >= 2
        log, done = _wal_frames(path)
        assert log == done  # everything the writer committed is in the file
    finally:
        await db.dispose()
    assert len(_threads()) == before  # stopped with the database


def test_a_failure_is_logged_once_per_run_of_failures(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    checkpointer = Checkpointer(str(tmp_path / "missing" / "x.db"), interval=0.01)
    with caplog.at_level(logging.WARNING, logger="clinicomm.store.sqlite_checkpoint"):
        checkpointer.start()
        threading.Event().wait(0.3)
        checkpointer.stop()
    failures = [r for r in caplog.records if getattr(r, "event", "") == "sqlite_checkpoint_failed"]
    assert len(failures) == 1
    assert getattr(failures[0], "error", None) == "OperationalError"
    assert str(tmp_path) not in caplog.text  # no path in the line


def _message(i: int) -> dict[str, Any]:
    return {
        "id": f"ckpt-{i}",
        "clinic_id": "clinic-a",
        "category": "APPOINTMENT",
        "content": b"ciphertext" * 50,
    }
