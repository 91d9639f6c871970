"""Where the service's time goes at full speed: `py-spy` samples of `serve` under wrk load.

    .venv/bin/pip install py-spy        # not a dependency of clinicomm
    .venv/bin/python -m bench.profile [--scenario email-sendgrid|batch-accept|post-at-rate|…]
        [--seconds 8] [--database-url URL --redis-url URL --processes N] [--per-process]

Starts serve against the sinks, offers the scenario's load with wrk (bench/load.py) and records
every process of serve's tree with `py-spy record --format raw` (collapsed stacks). Prints the
share of samples per layer (HTTP stack, FastAPI glue, accept, the worker, SQLAlchemy, the
database driver, the provider call) and the 25 hottest functions by own time, so a missed
target in RESULTS.md comes with the profile that says why.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path

import aiohttp

from bench.load import ensure_wrk, offer_batches, offer_wrk
from bench.service import (
    SCENARIOS,
    ServeProcess,
    _base_env,
    _cli,
    _create_clinics,
    _descendants,
    default_command,
    message_payload,
    offer_load,
)
from bench.sinks import HttpSink, SmtpSink, free_port

#: (layer, substrings of a frame): the first layer whose substring is in a stack's frames,
#: searched from the innermost frame outwards.
LAYERS = [
    ("database driver (asyncpg/aiosqlite/sqlite3)", ("asyncpg", "aiosqlite", "sqlite3")),
    ("SQLAlchemy (compile, execute, ORM)", ("sqlalchemy",)),
    ("JSON and validation (pydantic, orjson)", ("pydantic", "orjson", "email_validator")),
    ("encryption (cryptography)", ("cryptography", "crypto.py")),
    ("provider call (aiohttp client, adapters)", ("aiohttp/client", "aiohttp/connector",
                                                  "providers/")),
    ("redis client", ("redis/",)),
    ("worker (claim, admission, sender, outbox)", ("delivery/",)),
    ("accept (messaging)", ("messaging/",)),
    ("FastAPI glue (dependencies, routing, auth)", ("fastapi/", "api/")),
    ("HTTP server and ASGI stack (uvicorn, starlette)", ("uvicorn", "starlette", "httptools")),
    ("logging and metrics", ("logging/", "prometheus_client", "telemetry/")),
    ("event loop (uvloop, asyncio)", ("uvloop", "asyncio/")),
]


def classify(frames: list[str]) -> str:
    for frame in reversed(frames):
        for layer, needles in LAYERS:
            if any(n in frame for n in needles):
                return layer
    return "other"


def summarize(raw: str, top: int = 25) -> str:
    layers: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        total += n
        layers[classify(frames)] += n
        own[frames[-1]] += n
    out = [f"{total} samples (all threads of every serve process)", "", "| share | layer |",
           "|---|---|"]
    out += [f"| {100 * n / total:.1f} % | {layer} |" for layer, n in layers.most_common()]
    out += ["", f"hottest {top} frames by own samples:", ""]
    out += [f"{100 * n / total:5.1f} %  {frame}" for frame, n in own.most_common(top)]
    return "\n".join(out)


async def main(args: argparse.Namespace) -> None:
    spy = shutil.which("py-spy") or str(Path(__import__("sys").executable).parent / "py-spy")
    wrk = ensure_wrk(install=True)
    if wrk is None:
        raise SystemExit("wrk is not available")
    scenario = SCENARIOS[args.scenario]
    command = default_command()
    with tempfile.TemporaryDirectory(prefix="bench-prof-") as tmp, HttpSink() as http, \
            SmtpSink() as smtp:
        workdir = Path(tmp)
        url = args.database_url or f"sqlite+aiosqlite:///{workdir / 'p.db'}"
        env = _base_env(free_port(), url, args.redis_url)
        env["CLINICOMM_PROCESSES"] = str(args.processes)
        env["CLINICOMM_LOG_LEVEL"] = "WARNING"
        _cli(command, env, "migrate")
        token = _cli(command, env, "token", "--role", "SuperAdmin").strip().splitlines()[-1]
        serve = ServeProcess(command, env, workdir)
        await serve.start(60)
        try:
            headers = {"Authorization": f"Bearer {token}"}
            async with aiohttp.ClientSession(headers=headers) as session:
                clinics = await _create_clinics(session, serve.url, scenario, 4,
                                                secrets.token_hex(3), http, smtp)
            if scenario.batch:
                # Batches of 500 reminders, 4 in flight, for as long as the profile runs.
                async def batches() -> None:
                    async with aiohttp.ClientSession(headers=headers) as batch_session:
                        await offer_batches(batch_session, serve.url, clinics,
                                            batches=args.batches, size=scenario.batch,
                                            concurrency=4, run=secrets.token_hex(4))
                load = asyncio.create_task(batches())
            elif scenario.rate is not None:
                # Open loop at the scenario's rate (the bench's constant-rate generator).
                rate = scenario.rate

                async def at_rate() -> None:
                    async with aiohttp.ClientSession(headers=headers) as rate_session:
                        await offer_load(
                            rate_session, serve.url, int(rate * (args.seconds + 4)),
                            lambda i: message_payload(scenario, clinics[i % len(clinics)], i),
                            rate=rate, concurrency=64)
                load = asyncio.create_task(at_rate())
            else:
                load = asyncio.create_task(offer_wrk(
                    serve.url, token, scenario.channel, clinics, seconds=args.seconds + 4,
                    connections=64, threads=1, run=secrets.token_hex(4)))
            await asyncio.sleep(2)
            outputs = []
            procs = []
            labels = []
            for pid in _descendants(serve.pid):
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
                labels.append(f"pid {pid}: {cmdline.decode(errors='replace')[-80:]}")
                out = workdir / f"spy-{pid}.txt"
                outputs.append(out)
                procs.append(subprocess.Popen(
                    [spy, "record", "--pid", str(pid), "--duration", str(int(args.seconds)),
                     "--rate", "200", "--format", "raw", "--output", str(out), "--nonblocking",
                     "--threads"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            for proc in procs:
                await asyncio.to_thread(proc.wait)
            await load
        finally:
            serve.stop()
        raw = "\n".join(o.read_text() for o in outputs if o.exists())
        if args.raw:
            Path(args.raw).write_text(raw)
        print(f"profile of {args.scenario} ({url.split(':')[0]}, {args.processes} process(es))")
        print(summarize(raw))
        if args.per_process:
            for out, label in zip(outputs, labels, strict=True):
                if out.exists():
                    print(f"\n## {label}\n")
                    print(summarize(out.read_text(), top=15))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.profile")
    parser.add_argument("--scenario", default="email-sendgrid",
                        choices=list(SCENARIOS))
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--raw", default=None, help="also write the collapsed stacks here")
    parser.add_argument("--database-url", default=None)
    parser.add_argument("--redis-url", default=None)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--batches", type=int, default=100,
                        help="batch-accept: requests of 500 messages to offer")
    parser.add_argument("--per-process", action="store_true",
                        help="also print each process's own summary (API processes, worker)")
    asyncio.run(main(parser.parse_args()))
