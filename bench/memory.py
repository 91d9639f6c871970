"""Memory of `clinicomm serve` over 100,000 messages: RSS sampled every second.

    .venv/bin/python -m bench.memory [--messages 100000] [--database-url URL] [--redis-url URL]

Starts the nginx sink and `clinicomm serve` (its in-process worker sending through SendGrid's
API shape to the sink), posts messages through the HTTP API at full speed, and samples the
serve process's RSS every second until every delivery is sent. Prints the curve (per 10,000
messages) and writes it to bench/out/memory-<backend>.csv; the verdict compares the RSS after
the first quarter with the RSS at the end (levels off = grows by less than 15 %).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import tempfile
import time
from pathlib import Path

import aiohttp

from bench.service import (
    API,
    ServeProcess,
    _base_env,
    _cli,
    default_command,
)
from bench.sinks import HttpSink, free_port

OUT = Path(__file__).parent / "out"


async def main(messages: int, database_url: str | None, redis_url: str | None) -> None:
    OUT.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-mem-") as tmp, HttpSink() as sink:
        url = database_url or f"sqlite+aiosqlite:///{Path(tmp) / 'mem.db'}"
        env = _base_env(free_port(), url, redis_url)
        env["CLINICOMM_LOG_LEVEL"] = "WARNING"
        command = default_command()
        _cli(command, env, "migrate")
        token = _cli(command, env, "token", "--role", "SuperAdmin").strip().splitlines()[-1]
        serve = ServeProcess(command, env, Path(tmp))
        await serve.start(60)
        samples: list[tuple[float, int, float]] = []
        done = 0
        try:
            headers = {"Authorization": f"Bearer {token}"}
            async with aiohttp.ClientSession(headers=headers) as http:
                clinics = [f"mem-{i}" for i in range(10)]
                for cid in clinics:
                    body = {
                        "id": cid,
                        "name": cid,
                        "settings": {
                            "communicationSettings": {
                                "email": {
                                    "primary": {
                                        "provider": "sendgrid",
                                        "credentials": {"apiKey": "SG.k", "baseUrl": sink.url,
                                                        "fromEmail": "a@clinic.example"},
                                    }
                                }
                            }
                        },
                    }
                    async with http.post(serve.url + API + "/clinics", json=body) as r:
                        assert r.status == 201, await r.text()
                counter = itertools.count()
                start = time.monotonic()

                async def sampler() -> None:
                    while True:
                        samples.append((time.monotonic() - start, done, serve.memory()[1]))
                        await asyncio.sleep(1.0)

                sampling = asyncio.create_task(sampler())

                async def poster() -> None:
                    nonlocal done
                    while (i := next(counter)) < messages:
                        body = {
                            "title": "Reminder",
                            "body": "Your appointment is tomorrow at 10:30.",
                            "recipients": [{"email": f"p{i}@example.com"}],
                            "channels": ["email"],
                            "metadata": {"clinicId": clinics[i % 10]},
                        }
                        async with http.post(serve.url + API + "/communications", json=body) as r:
                            assert r.status == 202, await r.text()
                        done += 1

                await asyncio.gather(*(poster() for _ in range(32)))
                while True:  # until the worker has sent everything
                    q = f"{serve.url}{API}/communications?status=queued&limit=1"
                    s = f"{serve.url}{API}/communications?status=sending&limit=1"
                    async with http.get(q) as a, http.get(s) as b:
                        if not (await a.json())["items"] and not (await b.json())["items"]:
                            break
                    await asyncio.sleep(1.0)
                samples.append((time.monotonic() - start, done, serve.memory()[1]))
                sampling.cancel()
        finally:
            peak = serve.memory()[0]
            serve.stop()
    backend = "postgres" if url.startswith("postgresql") else "sqlite"
    csv = OUT / f"memory-{backend}.csv"
    csv.write_text(
        "seconds,messages_accepted,rss_mb\n"
        + "".join(f"{t:.1f},{n},{r:.1f}\n" for t, n, r in samples)
    )
    print(f"memory of serve over {messages:,} messages ({backend}); peak RSS {peak:.0f} MB")
    print("| messages accepted | RSS MB |")
    print("|---|---|")
    step = max(messages // 10, 1)
    marks = {}
    for _t, n, rss in samples:
        marks.setdefault(min(n // step * step, messages), rss)
    for n in sorted(marks):
        print(f"| {n:,} | {marks[n]:.0f} |")
    quarter = next((r for _t, n, r in samples if n >= messages // 4), samples[0][2])
    end = samples[-1][2]
    verdict = "levels off" if end <= quarter * 1.15 else "GROWS"
    print(f"RSS at 25 %: {quarter:.0f} MB, at the end: {end:.0f} MB -> {verdict}; curve in {csv}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--database-url")
    parser.add_argument("--redis-url")
    args = parser.parse_args()
    asyncio.run(main(args.messages, args.database_url, args.redis_url))
