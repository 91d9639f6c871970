"""Benchmark: a cached config read in process (L1 hit), p50 and p99. Target p99 ≤ 50 µs.

    .venv/bin/python bench/config_read.py [--reads 200000]

Builds a runtime on a temporary SQLite file, stores one clinic, warms the cache, then times
each `get_clinic_config` call separately (metrics included, as in production).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from clinicomm.config import Settings
from clinicomm.providers.base import Channel
from clinicomm.runtime import Runtime


async def main(reads: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(
            database_url=f"sqlite+aiosqlite:///{Path(tmp) / 'bench.db'}",
            master_keys="b:" + base64.b64encode(os.urandom(32)).decode(),
            data_dir=Path(tmp),
        )
        rt = await Runtime.create(settings, migrate=True, env={})
        try:
            async with rt.db.session() as session:
                change = await rt.config.create_clinic(
                    session,
                    "clinic-bench",
                    "Bench",
                    {
                        "communicationSettings": {
                            "email": {
                                "primary": {
                                    "provider": "smtp",
                                    "credentials": {"host": "h", "password": "p"},
                                }
                            }
                        }
                    },
                )
            await rt.config.committed(change)
            get = rt.config.get_clinic_config
            for _ in range(1000):
                await get("clinic-bench", Channel.EMAIL)
            samples: list[int] = []
            clock = time.perf_counter_ns
            for _ in range(reads):
                start = clock()
                await get("clinic-bench", Channel.EMAIL)
                samples.append(clock() - start)
        finally:
            await rt.close()
    samples.sort()
    p50 = samples[len(samples) // 2] / 1000
    p99 = samples[int(len(samples) * 0.99)] / 1000
    mean = statistics.fmean(samples) / 1000
    print(
        f"machine: {platform.machine()} {os.cpu_count()} cpus, Python {platform.python_version()}"
    )
    print(
        f"cached config read (L1 hit), {reads} reads: "
        f"p50 {p50:.2f} µs, p99 {p99:.2f} µs, mean {mean:.2f} µs"
    )
    print(f"target p99 <= 50 µs: {'met' if p99 <= 50 else 'MISSED'}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reads", type=int, default=200_000)
    asyncio.run(main(parser.parse_args().reads))
