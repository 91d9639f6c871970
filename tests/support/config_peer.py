"""A second clinicomm process for cross-process tests.

Reads the environment (CLINICOMM_*), builds a Runtime, then answers one command per stdin line:
`read <clinicId> <channel>` prints `{"version": N, "source": "..."}` (from its own caches).
"""

from __future__ import annotations

import asyncio
import json
import sys

from clinicomm.config import Settings
from clinicomm.providers.base import Channel
from clinicomm.runtime import Runtime


async def main() -> None:
    rt = await Runtime.create(Settings(), env={})
    loop = asyncio.get_running_loop()
    print(json.dumps({"ready": True}), flush=True)
    try:
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                break
            parts = line.split()
            if parts[:1] == ["read"]:
                resolved = await rt.config.get_clinic_config(parts[1], Channel(parts[2]))
                print(
                    json.dumps({"version": resolved.version, "source": resolved.source}), flush=True
                )
    finally:
        await rt.close()


if __name__ == "__main__":
    asyncio.run(main())
