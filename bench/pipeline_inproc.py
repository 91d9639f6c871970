"""In-process pipeline profile: accept rate and worker send rate, separately, no HTTP layer.

    .venv/bin/python -m bench.pipeline_inproc [--messages 5000] [--database-url URL]
        [--redis-url URL] [--scenario email-sendgrid|whatsapp-meta] [--clinics 10]
        [--category REMINDER] [--rate 300 [--cold-contents]]

Prints each stage's rate and its CPU time per message (this process, every thread: user+sys).
Nothing else of the service runs beside it, so the CPU figure is the service's own cost
without the load generator, sinks and databases competing for the same cores (on the 2-vCPU
bench machine a busy second vCPU makes the same work cost ~1.5x the CPU time). Useful to see
where time goes; the end-to-end figures come from `python -m bench.run`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import os
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

from bench.service import SCENARIOS, clinic_settings, message_payload
from bench.sinks import HttpSink, SmtpSink
from clinicomm.client import worker_options
from clinicomm.config import Settings
from clinicomm.delivery.worker import Worker
from clinicomm.messaging.models import SendRequest
from clinicomm.runtime import Runtime, freeze_startup_heap

#: The scenarios of `bench.service` this runs (HTTP providers: the sink is nginx).
INPROC_SCENARIOS = ("email-sendgrid", "whatsapp-meta")


async def main(
    messages: int,
    database_url: str | None,
    redis_url: str | None,
    scenario_name: str = "email-sendgrid",
    clinics: int = 10,
    category: str | None = None,
    rate: float | None = None,
    cold_contents: bool = False,
) -> None:
    async with bench_runtime(
        database_url, redis_url, scenario_name, clinics, category=category
    ) as (rt, settings, requests):
        if rate is not None:
            await _together(rt, settings, requests, messages, rate, cold_contents)
            return

        async def producer(n: int, request: SendRequest) -> None:
            for _ in range(n):
                await rt.messaging.accept(request)

        start, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(
            *(producer(messages // 32, requests[i % clinics]) for i in range(32))
        )
        accept_s = time.perf_counter() - start
        total = (messages // 32) * 32
        per = (time.process_time() - cpu) / total * 1000
        commits = rt.messaging.writer.batches
        print(f"accept: {total} messages in {accept_s:.2f}s = {total / accept_s:,.0f}/s, "
              f"CPU {per:.3f} ms/message, {total / max(commits, 1):.1f} messages per commit")

        async with running_worker(rt, settings) as worker:
            start, cpu = time.perf_counter(), time.process_time()
            await until_done(worker, total, 0.01)
            send_s = time.perf_counter() - start
            per = (time.process_time() - cpu) / total * 1000
        rate = total / send_s
        print(f"worker: {worker.sent} sent, {worker.failed} failed, {send_s:.2f}s = {rate:,.0f}/s, "
              f"CPU {per:.3f} ms/message")


@contextlib.asynccontextmanager
async def bench_runtime(
    database_url: str | None,
    redis_url: str | None,
    scenario_name: str,
    clinics: int,
    *,
    category: str | None = None,
) -> AsyncIterator[tuple[Runtime, Settings, list[SendRequest]]]:
    """A runtime on a new SQLite file (or `database_url`) with `clinics` clinics whose
    scenario channel goes to local sinks (Postfix smtp-sink for SMTP, nginx otherwise), and
    one send request per clinic (`category`: the messages' category); its start-up heap
    frozen as serve's is. Closed, and the sinks stopped, when the block ends."""
    scenario = SCENARIOS[scenario_name]
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        http = stack.enter_context(HttpSink())
        smtp = stack.enter_context(SmtpSink()) if scenario.provider == "smtp" else None
        settings = Settings(
            database_url=database_url or f"sqlite+aiosqlite:///{tmp / 'b.db'}",
            redis_url=redis_url,
            master_keys="b:" + base64.b64encode(os.urandom(32)).decode(),
            data_dir=tmp,
            log_level="WARNING",
        )
        rt = await Runtime.create(settings, migrate=True, env={})
        try:
            requests = []
            for index in range(clinics):
                # Each clinic with its own WhatsApp number, as in the end-to-end bench (one
                # number alone is capped at 1,000/s by its throughput tier).
                clinic = f"bench-{os.getpid()}-{index}"
                async with rt.db.session() as session:
                    change = await rt.config.create_clinic(
                        session, clinic, "Bench",
                        clinic_settings(scenario, http, smtp, index),  # type: ignore[arg-type]
                    )
                await rt.config.committed(change)
                payload = message_payload(scenario, clinic, 0)
                if category:
                    payload["category"] = category
                requests.append(SendRequest.model_validate(payload))
            freeze_startup_heap()  # as serve and worker do once built
            yield rt, settings, requests
        finally:
            await rt.close()


@contextlib.asynccontextmanager
async def running_worker(
    rt: Runtime, settings: Settings, *, cold_contents: bool = False
) -> AsyncIterator[Worker]:
    """The runtime's worker running in this process until the block ends; `cold_contents`:
    it reads every content back, as a worker in another process does."""
    stop = asyncio.Event()
    worker = Worker.for_runtime(rt, worker_options(settings))
    if cold_contents:
        rt.messaging._caches.clear()
    task = asyncio.create_task(worker.run(stop))
    try:
        yield worker
    finally:
        stop.set()
        await task


async def until_done(worker: Worker, total: int, poll: float) -> None:
    while worker.sent + worker.failed < total:
        await asyncio.sleep(poll)


async def _together(
    rt: Runtime,
    settings: Settings,
    requests: list[SendRequest],
    messages: int,
    rate: float,
    cold_contents: bool,
) -> None:
    """Accept at `rate` messages/s with the worker running in this process (as `serve` on
    one process does); the CPU time of both per message."""
    async with running_worker(rt, settings, cold_contents=cold_contents) as worker:
        start, cpu = time.perf_counter(), time.process_time()
        for i in range(messages):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            await rt.messaging.accept(requests[i % len(requests)])
        await until_done(worker, messages, 0.005)
        wall = time.perf_counter() - start
        per = (time.process_time() - cpu) / messages * 1000
    print(f"together at {rate:,.0f}/s{' (contents read back)' if cold_contents else ''}: "
          f"{worker.sent} sent, {worker.failed} failed in {wall:.2f}s, "
          f"CPU {per:.3f} ms/message (accept and worker)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--database-url")
    parser.add_argument("--redis-url")
    parser.add_argument("--scenario", choices=INPROC_SCENARIOS, default="email-sendgrid")
    parser.add_argument("--clinics", type=int, default=10, help="clinics sending (default 10)")
    parser.add_argument(
        "--category", help="the messages' category (REMINDER: bulk priority, as reminder runs)"
    )
    parser.add_argument(
        "--rate", type=float,
        help="accept at this rate with the worker running beside (one figure for both)",
    )
    parser.add_argument(
        "--cold-contents", action="store_true",
        help="with --rate: the worker reads every content back, as in another process",
    )
    args = parser.parse_args()
    asyncio.run(main(
        args.messages, args.database_url, args.redis_url, args.scenario, args.clinics,
        args.category, args.rate, args.cold_contents,
    ))
