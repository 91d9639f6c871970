"""Instructions per message: the service's own cost, counted, not timed.

    .venv/bin/python -m bench.instructions [--scenario email-sendgrid|email-smtp|whatsapp-meta]
        [--messages 300] [--accept-only] [--through-api | --batch 500]
        [--database-url URL --redis-url URL] [--repeat 2]

CPU time per message depends on the host: on the shared 2-vCPU bench machine the single-send
SendGrid figure on PostgreSQL was 0.52 ms at 08:48 on Dec 3 and 1.46 ms at 13:30, with code
that had become slightly leaner in between (bench/RESULTS.md). The instruction count of the
same work does not depend on the host: two runs of one commit differ by under 2 %.

This runs the in-process pipeline (no HTTP layer: `MessagingService.accept` for each message,
32 at a time, then the in-process worker sends them all to the sinks; with `--accept-only`,
accept alone; with `--through-api`, each message is a `POST /api/v1/communications` handed to
the ASGI application in the same process, so the application's middleware, lean dispatch and
answer are counted too, without a socket or uvicorn; `--batch N` does the same through
`POST /api/v1/communications/batch`, N messages per request; `--messages` must then be a
multiple of N) under Valgrind's cachegrind twice, for
`--messages` and for 3 x `--messages`, and prints the difference divided by the 2 x
`--messages` extra messages, so start-up, imports and migrations cancel out.

The sinks (nginx, Postfix smtp-sink) and the databases run outside Valgrind and are not
counted. Group commits and claims gather what arrives within a few milliseconds, and under
Valgrind's ~50x slowdown more arrives together than at full speed natively: compare figures
from this tool with each other (two commits, same options), not with the end-to-end bench.
`--repeat` runs each size that many times and prints every figure, so the spread shows.
Needs `valgrind` (Debian's package); each figure takes one to two minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from bench.pipeline_inproc import bench_runtime, running_worker, until_done
from bench.service import REPO_ROOT

_REFS = re.compile(r"I\s+refs:\s+([\d,]+)")
_CLINICS = 10


async def _pipeline(
    scenario_name: str, messages: int, database_url: str | None, redis_url: str | None,
    accept_only: bool, through_api: bool = False, batch: int = 0,
) -> None:
    """The counted work: `messages` accepted, then (unless `accept_only`) all sent; with
    `through_api`, each accepted by a `POST /api/v1/communications` to the ASGI application
    in this process (no socket, no HTTP server: the application's own layers); with `batch`,
    `batch` at a time by `POST /api/v1/communications/batch`, two requests at a time."""
    async with bench_runtime(database_url, redis_url, scenario_name, _CLINICS) as (
        rt, settings, requests
    ):
        todo = iter(range(messages // batch if batch else messages))
        post = _poster(rt, settings, requests, batch) if through_api or batch else None

        async def producer() -> None:
            for i in todo:
                if post is not None:
                    await post(i)
                else:
                    await rt.messaging.accept(requests[i % _CLINICS])

        await asyncio.gather(*(producer() for _ in range(2 if batch else 32)))
        if accept_only:
            return
        async with running_worker(rt, settings) as worker:
            await until_done(worker, messages, 0.01)
        if worker.failed:
            raise SystemExit(f"{worker.failed} of {messages} deliveries failed")


def _poster(
    rt: Any, settings: Any, requests: list[Any], batch: int = 0
) -> Callable[[int], Awaitable[None]]:
    """`post(i)`: message `i` sent through the application, as `clinicomm serve` serves it
    (its lifespan's state set by hand, without the webhook processing it also starts); with
    `batch`, request `i` of `batch` messages of one clinic (`bench.load.batch_body`)."""
    from bench.load import batch_body
    from clinicomm.api.app import create_app
    from clinicomm.api.auth import Role, TokenVerifier

    app = create_app(settings, runtime=rt)
    verifier = TokenVerifier.from_settings(settings)
    app.state.verifier, app.state.runtime = verifier, rt
    token = verifier.issue(Role.SERVICE, sub="bench", ttl=86400).encode()
    bodies = [orjson.dumps(r.model_dump(mode="json", by_alias=True, exclude_none=True))
              for r in requests]

    clinics = [r.metadata.clinic_id for r in requests]
    channel = requests[0].channels[0].value
    path = "/api/v1/communications/batch" if batch else "/api/v1/communications"

    async def post(i: int) -> None:
        if batch:
            body = orjson.dumps(batch_body(channel, clinics[i % len(clinics)], i * batch, batch,
                                           str(os.getpid())))
        else:
            body = bodies[i % len(bodies)]
        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
            "method": "POST", "scheme": "http", "path": path,
            "raw_path": path.encode(), "query_string": b"", "root_path": "",
            "headers": [
                (b"host", b"bench"), (b"authorization", b"Bearer " + token),
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"idempotency-key", f"bench-{os.getpid()}-{i}".encode()),
            ],
            "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80), "state": {},
        }
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await app(scope, receive, send)
        if sent[0].get("status") != 202 or (batch and b'"refused":0' not in sent[1]["body"]):
            raise SystemExit(f"POST answered {sent[0].get('status')}: {sent[1:]}")

    return post


def _count(args: argparse.Namespace, messages: int) -> int:
    """Instructions of one run of `messages` under cachegrind."""
    command = [
        "valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null",
        sys.executable, "-m", "bench.instructions", "--run",
        "--scenario", args.scenario, "--messages", str(messages),
    ]
    if args.accept_only:
        command.append("--accept-only")
    if args.through_api:
        command.append("--through-api")
    if args.batch:
        command += ["--batch", str(args.batch)]
    if args.database_url:
        command += ["--database-url", args.database_url]
    if args.redis_url:
        command += ["--redis-url", args.redis_url]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "src"), str(REPO_ROOT)])}
    done = subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True,
                          check=False)
    found = _REFS.search(done.stderr)
    if done.returncode != 0 or found is None:
        raise SystemExit(f"the counted run failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return int(found.group(1).replace(",", ""))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scenario", choices=("email-sendgrid", "email-smtp", "whatsapp-meta"),
                        default="email-sendgrid")
    parser.add_argument("--messages", type=int, default=300,
                        help="the smaller run's messages; the larger has 3 times as many")
    parser.add_argument("--accept-only", action="store_true", help="count accept alone")
    parser.add_argument("--through-api", action="store_true",
                        help="accept through the ASGI application (its layers counted too)")
    parser.add_argument("--batch", type=int, default=0, metavar="N",
                        help="accept through the API's batch route, N messages per request")
    parser.add_argument("--database-url", help="default: a new SQLite file per run")
    parser.add_argument("--redis-url")
    parser.add_argument("--repeat", type=int, default=1, help="runs per size (default 1)")
    parser.add_argument("--run", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:  # the counted child
        asyncio.run(_pipeline(args.scenario, args.messages, args.database_url, args.redis_url,
                              args.accept_only, args.through_api, args.batch))
        return
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed (Debian: apt-get install valgrind)")
    small, large = args.messages, 3 * args.messages
    what = "accept" if args.accept_only else "accept + send"
    if args.batch:
        what += f", through the API's batch route, {args.batch} per request"
    elif args.through_api:
        what += ", through the API"
    for _ in range(args.repeat):
        low, high = _count(args, small), _count(args, large)
        per = (high - low) / (large - small)
        print(f"{args.scenario} ({what}): {per:,.0f} instructions per message "
              f"({low:,} for {small}, {high:,} for {large})", flush=True)


if __name__ == "__main__":
    main()
