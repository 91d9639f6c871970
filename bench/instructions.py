"""Instructions per message: the service's own cost, counted, not timed.

    .venv/bin/python -m bench.instructions [--scenario email-sendgrid|email-smtp|whatsapp-meta]
        [--messages 300] [--accept-only] [--database-url URL --redis-url URL] [--repeat 2]

CPU time per message depends on the host: on the shared 2-vCPU bench machine the single-send
SendGrid figure on PostgreSQL was 0.52 ms at 08:48 on Dec 3 and 1.46 ms at 13:30, with code
that had become slightly leaner in between (bench/RESULTS.md). The instruction count of the
same work does not depend on the host: two runs of one commit differ by under 2 %.

This runs the in-process pipeline (no HTTP layer: `MessagingService.accept` for each message,
32 at a time, then the in-process worker sends them all to the sinks; with `--accept-only`,
accept alone) under Valgrind's cachegrind twice, for `--messages` and for 3 x `--messages`,
and prints the difference divided by the 2 x `--messages` extra messages, so start-up,
imports and migrations cancel out.

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

from bench.pipeline_inproc import bench_runtime, running_worker, until_done
from bench.service import REPO_ROOT

_REFS = re.compile(r"I\s+refs:\s+([\d,]+)")
_CLINICS = 10


async def _pipeline(
    scenario_name: str, messages: int, database_url: str | None, redis_url: str | None,
    accept_only: bool,
) -> None:
    """The counted work: `messages` accepted, then (unless `accept_only`) all sent."""
    async with bench_runtime(database_url, redis_url, scenario_name, _CLINICS) as (
        rt, settings, requests
    ):
        todo = iter(range(messages))

        async def producer() -> None:
            for i in todo:
                await rt.messaging.accept(requests[i % _CLINICS])

        await asyncio.gather(*(producer() for _ in range(32)))
        if accept_only:
            return
        async with running_worker(rt, settings) as worker:
            await until_done(worker, messages, 0.01)
        if worker.failed:
            raise SystemExit(f"{worker.failed} of {messages} deliveries failed")


def _count(args: argparse.Namespace, messages: int) -> int:
    """Instructions of one run of `messages` under cachegrind."""
    command = [
        "valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null",
        sys.executable, "-m", "bench.instructions", "--run",
        "--scenario", args.scenario, "--messages", str(messages),
    ]
    if args.accept_only:
        command.append("--accept-only")
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
    parser.add_argument("--database-url", help="default: a new SQLite file per run")
    parser.add_argument("--redis-url")
    parser.add_argument("--repeat", type=int, default=1, help="runs per size (default 1)")
    parser.add_argument("--run", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:  # the counted child
        asyncio.run(_pipeline(args.scenario, args.messages, args.database_url, args.redis_url,
                              args.accept_only))
        return
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed (Debian: apt-get install valgrind)")
    small, large = args.messages, 3 * args.messages
    what = "accept" if args.accept_only else "accept + send"
    for _ in range(args.repeat):
        low, high = _count(args, small), _count(args, large)
        per = (high - low) / (large - small)
        print(f"{args.scenario} ({what}): {per:,.0f} instructions per message "
              f"({low:,} for {small}, {high:,} for {large})", flush=True)


if __name__ == "__main__":
    main()
