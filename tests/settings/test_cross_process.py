"""A save in one process is seen by another: before the save returns (Redis), or within one
poll interval of the database (no Redis, the embedded default)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path

from clinicomm.config import Settings
from clinicomm.runtime import Runtime
from tests.settings.test_service import create, smtp_settings

ROOT = Path(__file__).parents[2]


class Peer:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def read(self, clinic: str, channel: str = "email") -> dict[str, object]:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(f"read {clinic} {channel}\n".encode())
        await self.proc.stdin.drain()
        line = await asyncio.wait_for(self.proc.stdout.readline(), 10)
        return json.loads(line)  # type: ignore[no-any-return]


async def start_peer(settings: Settings) -> Peer:
    env = {
        **os.environ,
        "CLINICOMM_DATABASE_URL": settings.database_url,
        "CLINICOMM_MASTER_KEYS": settings.master_keys or "",
        "CLINICOMM_CONFIG_POLL_SECONDS": str(settings.config_poll_seconds),
        "CLINICOMM_DATA_DIR": str(settings.data_dir),
        "PYTHONPATH": f"{ROOT / 'src'}:{ROOT}",
    }
    env.pop("CLINICOMM_REDIS_URL", None)
    if settings.redis_url:
        env["CLINICOMM_REDIS_URL"] = settings.redis_url
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.support.config_peer",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        cwd=ROOT,
        env=env,
    )
    assert proc.stdout
    ready = await asyncio.wait_for(proc.stdout.readline(), 30)
    assert json.loads(ready) == {"ready": True}
    return Peer(proc)


async def test_save_in_one_process_is_seen_by_another(runtime: Runtime, settings: Settings) -> None:
    await create(runtime, "clinic-x", smtp_settings("one"))
    peer = await start_peer(settings)
    try:
        assert (await peer.read("clinic-x"))["version"] == 1  # now cached in the peer's L1
        assert (await peer.read("clinic-x"))["version"] == 1
        await runtime.config.save_settings("clinic-x", smtp_settings("two"))
        saved_at = time.monotonic()
        if runtime.redis is not None:
            # Bound with Redis: the peer acknowledged the invalidation before save returned.
            assert (await peer.read("clinic-x"))["version"] == 2
        else:
            # Bound without Redis: one database poll (0.2 s here; 0.5 s by default).
            while (await peer.read("clinic-x"))["version"] != 2:
                assert time.monotonic() - saved_at < 2.0, "peer never saw the change"
                await asyncio.sleep(0.02)
            elapsed = time.monotonic() - saved_at
            assert elapsed <= settings.config_poll_seconds * 2 + 0.5
        assert (await peer.read("clinic-x", "whatsapp"))["source"] == "none"
    finally:
        assert peer.proc.stdin
        peer.proc.stdin.close()
        await asyncio.wait_for(peer.proc.wait(), 10)
