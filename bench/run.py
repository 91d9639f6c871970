"""clinicomm bench: start the sinks, measure raw-client ceilings, run the service end to end.

Run from the repository root::

    python -m bench.run                 # raw ceilings (median of 3) + service bench if available
    python bench/run.py --skip-service  # raw ceilings only
    python -m bench.run --database-url postgresql+asyncpg://... --redis-url redis://...
    python -m bench.run --quick         # smoke run (< 1 minute): small counts, SQLite only
    BENCH_QUICK=1 make bench            # the same through make

`make bench` runs the SQLite column and two PostgreSQL + Redis columns: API and worker in one
process (`--processes 1`), and 2 API processes and a worker (`--processes 2`). The scratch
database `benchpg` is dropped and created anew for each column: each run has new keys.

It prints ONE table: each figure, the raw-client figure from the same run where there is one,
the ratio, and the PERFORMANCE.md target. If ``clinicomm serve`` is not available it prints
``service bench skipped: <reason>`` and the raw rows only. See bench/service.py for exactly
what each service figure measures.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python bench/run.py`: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import raw
from bench.load import ensure_wrk
from bench.service import (
    SCENARIOS,
    ScenarioResult,
    ServiceConfig,
    ServiceResult,
    run_service_bench,
)
from bench.sinks import HttpSink, SmtpSink

__all__ = ["RawFigures", "main", "measure_raw", "render_table", "run_service_bench"]


# --------------------------------------------------------------------------- raw figures


@dataclass
class RawFigures:
    """Raw-client ceilings in messages/s (medians when several runs were made)."""

    http: float  # aiohttp POST, N concurrent, keep-alive, one ClientSession
    smtp5: float  # aiosmtplib, N reused connections
    smtp1: float  # aiosmtplib, 1 reused connection
    smtp_new: float  # aiosmtplib, a new connection per message, one at a time
    runs: int = 1


RAW_LABELS = {
    "http": "raw aiohttp POST, {c} concurrent, keep-alive",
    "smtp5": "raw aiosmtplib, {n} reused connections",
    "smtp1": "raw aiosmtplib, 1 reused connection",
    "smtp_new": "raw aiosmtplib, new connection per message",
}


async def measure_raw(http: HttpSink, smtp: SmtpSink, args: argparse.Namespace) -> RawFigures:
    """One pass of every raw ceiling against the running sinks."""
    return RawFigures(
        http=await raw.http_post_rate(http.url, count=args.http_count,
                                      concurrency=args.http_concurrency),
        smtp5=await raw.smtp_pooled_rate(smtp.host, smtp.port, count=args.smtp_count,
                                         connections=args.smtp_connections),
        smtp1=await raw.smtp_pooled_rate(smtp.host, smtp.port, count=args.smtp_count,
                                         connections=1),
        smtp_new=await raw.smtp_new_connection_rate(smtp.host, smtp.port,
                                                    count=args.smtp_count),
    )


def median_raw(runs: list[RawFigures]) -> RawFigures:
    """Per-figure median of several raw passes."""
    return RawFigures(
        http=statistics.median(r.http for r in runs),
        smtp5=statistics.median(r.smtp5 for r in runs),
        smtp1=statistics.median(r.smtp1 for r in runs),
        smtp_new=statistics.median(r.smtp_new for r in runs),
        runs=len(runs),
    )


# --------------------------------------------------------------------------- table

TARGETS = {
    "email-sendgrid": "≥ 1,000 msg/s (goal ≥ 2,000)",
    "email-smtp": "≥ 0.8× raw aiosmtplib (5 connections)",
    "whatsapp-meta": "≥ 1,000 msg/s (goal ≥ 2,000)",
    "batch-accept": "≥ 5,000 deliveries/s",
    "latency-at-rate": "p50 ≤ 50 ms, p99 ≤ 500 ms",
    "post-at-rate": "p99 ≤ 20 ms",
}
#: Service CPU per delivered message, by scenario kind.
CPU_TARGETS = {"batch-accept": "≤ 0.2 ms"}
CPU_TARGET_SINGLE = "≤ 0.5 ms"


def _n(v: float | None, unit: str = "", digits: int = 0) -> str:
    return "n/a" if v is None else f"{v:,.{digits}f}{unit}"


def render_table(raw_figs: RawFigures | None, services: list[ServiceResult],
                 args: argparse.Namespace) -> str:
    """The single markdown table: figure | raw (same run) | one column per backend | target.

    Service throughput cells carry their ratio to the raw figure of the same run.
    """
    backends = [svc.database for svc in services]
    cells: dict[str, dict[str, str]] = {}  # figure -> column -> text
    order: list[str] = []

    def put(figure: str, column: str, text: str) -> None:
        if figure not in cells:
            cells[figure] = {}
            order.append(figure)
        cells[figure][column] = text

    raw_by_key: dict[str, float] = {}
    if raw_figs is not None:
        for key, label in RAW_LABELS.items():
            value: float = getattr(raw_figs, key)
            raw_by_key[key] = value
            put(label.format(c=args.http_concurrency, n=args.smtp_connections), "raw",
                _n(value, " msg/s") + f" (median of {raw_figs.runs})")
    for svc in services:
        col = svc.database
        if svc.skipped or svc.error:
            put("service bench", col, "skipped" if svc.skipped else "failed (see above)")
            continue
        for r in svc.scenarios:
            sc = r.scenario
            what = f"e2e {sc.channel} via {sc.provider}, " + (
                f"batches of {sc.batch}" if sc.batch else
                "full speed" if sc.rate is None else f"{sc.rate:,.0f} msg/s offered")
            base = raw_by_key.get(sc.raw_key or "")
            ratio = f" ({r.msgs_per_s / base:.2f}× raw)" if base and r.msgs_per_s else ""
            put(f"{what}: throughput", col, _n(r.msgs_per_s, " msg/s") + ratio)
            if base:
                put(f"{what}: throughput", "raw", _n(base, " msg/s"))
            cpu = (f"{_n(r.cpu_ms, ' ms', 3)} / {_n(r.pg_cpu_ms, ' ms', 3)} / "
                   f"{_n(r.redis_cpu_ms, ' ms', 3)}")
            put(f"{what}: CPU per sent message: service / PostgreSQL / Redis", col, cpu)
            if sc.rate is None:
                put(f"{what}: CPU per sent message: service / PostgreSQL / Redis", "target",
                    CPU_TARGETS.get(sc.name, CPU_TARGET_SINGLE) + " (service)")
            put(f"{what}: POST p50 / p99", col,
                f"{_n(r.post_p50_ms, ' ms', 1)} / {_n(r.post_p99_ms, ' ms', 1)}")
            put(f"{what}: acceptance → sent p50 / p99", col,
                f"{_n(r.sent_p50_ms, ' ms', 1)} / {_n(r.sent_p99_ms, ' ms', 1)}")
            outcome = f"{r.accepted} / {r.succeeded} / {r.failed} / {r.not_terminal}"
            put(f"{what}: accepted / sent / failed / not terminal", col,
                outcome + (f" ({r.rejected} rejected)" if r.rejected else ""))
            put(f"{what}: load generator", col, r.generator)
            target = TARGETS.get(sc.name, "")
            key = {"latency-at-rate": "acceptance → sent p50 / p99",
                   "post-at-rate": "POST p50 / p99"}.get(sc.name, "throughput")
            if target:
                put(f"{what}: {key}", "target", target)
        memory = "serve peak RSS (VmHWM, with children) / RSS / PSS at end"
        put(memory, col,
            f"{_n(svc.peak_rss_mb, ' MB')} / {_n(svc.rss_mb, ' MB')} / "
            f"{_n(svc.pss_mb, ' MB')} after {svc.total_messages:,} msgs")
        put(memory, "target", "≤ 300 MB after 100,000, flat (bench.memory for the curve)")

    columns = ["raw", *backends, "target"]
    header = ["figure", "raw (same run)", *backends, "target"]
    rows = [[f, *(cells[f].get(c, "") for c in columns)] for f in order]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(row: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"

    out = [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in rows]
    return "\n".join(out)


def machine_info() -> dict[str, str]:
    """Date, CPU count and model, memory: the header of a RESULTS.md section."""
    model = "unknown"
    mem = "unknown"
    try:
        for ln in Path("/proc/cpuinfo").read_text().splitlines():
            if ln.startswith("model name"):
                model = ln.split(":", 1)[1].strip()
                break
        for ln in Path("/proc/meminfo").read_text().splitlines():
            if ln.startswith("MemTotal:"):
                mem = f"{int(ln.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    date = subprocess.run(["date"], capture_output=True, text=True, check=False).stdout.strip()
    nproc = subprocess.run(["nproc"], capture_output=True, text=True, check=False).stdout.strip()
    return {"date": date, "nproc": nproc, "cpu": model, "memory": mem,
            "python": platform.python_version()}


# --------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.run",
        description="Start local sinks (smtp-sink, nginx), measure raw-client ceilings and, "
                    "when `clinicomm serve` is available, the service end to end; print one "
                    "table.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("raw ceilings")
    g.add_argument("--runs", type=int, default=3, help="raw passes; the table shows medians")
    g.add_argument("--http-count", type=int, default=20_000, help="POSTs per HTTP pass")
    g.add_argument("--http-concurrency", type=int, default=64)
    g.add_argument("--smtp-count", type=int, default=5_000, help="messages per SMTP figure")
    g.add_argument("--smtp-connections", type=int, default=5)
    g.add_argument("--skip-raw", action="store_true")
    g.add_argument("--quick", action="store_true", default=os.environ.get("BENCH_QUICK") == "1",
                   help="smoke run under a minute: 1 raw pass, small counts, SQLite unless "
                        "--database-url is given (also BENCH_QUICK=1)")
    g = p.add_argument_group("service bench")
    g.add_argument("--skip-service", action="store_true")
    g.add_argument("--service-cmd", default=None,
                   help="argv prefix for clinicomm (default: this interpreter importing "
                        "clinicomm.cli from ./src)")
    g.add_argument("--database-url", action="append", default=None, metavar="URL",
                   help="CLINICOMM_DATABASE_URL; repeat for one table column per backend; "
                        "'sqlite' = a SQLite file in a temp dir (default: sqlite)")
    g.add_argument("--redis-url", default=None,
                   help="CLINICOMM_REDIS_URL for the non-SQLite backends (default: unset)")
    g.add_argument("--messages", type=int, default=20_000, help="per full-speed scenario")
    g.add_argument("--workers", type=int, action="append", default=None,
                   help="for PostgreSQL: run serve as API only plus N `clinicomm worker` "
                        "processes (repeatable: --workers 1 --workers 2 gives two columns)")
    g.add_argument("--processes", type=int, action="append", default=None,
                   help="CLINICOMM_PROCESSES of serve on PostgreSQL (API processes on one port; "
                        "with --workers 0 and N > 1, serve also starts one worker process; 1: "
                        "API and worker in one process); repeatable: --processes 1 "
                        "--processes 2 gives two columns")
    g.add_argument("--concurrency", type=int, default=64,
                   help="POSTs in flight at full speed; at most in flight at a fixed rate")
    g.add_argument("--wrk-seconds", type=float, default=10.0,
                   help="duration of each full-speed single-send scenario (wrk)")
    g.add_argument("--wrk-threads", type=int, default=1)
    g.add_argument("--no-wrk", action="store_true",
                   help="the Python generator instead of wrk: --messages at full speed, "
                   "and the fixed rates")
    g.add_argument("--batches", type=int, default=100,
                   help="requests of 500 messages in the batch scenario")
    g.add_argument("--latency-rate", type=float, default=1000.0,
                   help="offered msg/s for acceptance→sent latency")
    g.add_argument("--post-rate", type=float, default=300.0, help="offered msg/s for POST p99")
    g.add_argument("--rate-seconds", type=float, default=10.0,
                   help="duration of each fixed-rate scenario")
    g.add_argument("--clinics", type=int, default=10, help="clinics per scenario (round robin)")
    g.add_argument("--scenarios", default=",".join(SCENARIOS),
                   help=f"comma-separated subset of: {', '.join(SCENARIOS)}")
    g.add_argument("--timeout", type=float, default=600.0,
                   help="seconds per scenario for every delivery to become terminal")
    g = p.add_argument_group("environment")
    g.add_argument("--loop", choices=("auto", "asyncio", "uvloop"), default="auto",
                   help="event loop for the load generator and raw clients (auto: uvloop if "
                        "installed, as uvicorn does)")
    g.add_argument("--nginx-workers", default="1", help="nginx worker_processes")
    g.add_argument("--no-install", action="store_true",
                   help="do not apt-get install postfix/nginx when missing")
    g.add_argument("--json", type=Path, default=None, help="also write all figures as JSON")
    args = p.parse_args(argv)
    if args.quick:
        args.runs = 1
        args.http_count, args.smtp_count = 2_000, 300
        args.messages, args.wrk_seconds, args.rate_seconds = 500, 2.0, 1.5
        args.batches, args.clinics, args.timeout = 2, 2, 60.0
    unknown = set(args.scenarios.split(",")) - set(SCENARIOS)
    if unknown:
        p.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    return args


def _run(coro_fn: Callable[[], Coroutine[Any, Any, Any]], loop: str) -> Any:
    if loop in ("auto", "uvloop"):
        try:
            import uvloop
        except ImportError:
            if loop == "uvloop":
                raise
        else:
            return uvloop.run(coro_fn())
    return asyncio.run(coro_fn())


def _config(args: argparse.Namespace, database_url: str) -> ServiceConfig:
    sqlite = database_url == "sqlite" or database_url.startswith("sqlite")
    return ServiceConfig(
        command=shlex.split(args.service_cmd) if args.service_cmd else None,
        database_url=None if database_url == "sqlite" else database_url,
        redis_url=None if sqlite else args.redis_url,
        messages=args.messages, rate_seconds=args.rate_seconds,
        latency_rate=args.latency_rate, post_rate=args.post_rate,
        concurrency=args.concurrency, clinics=args.clinics,
        scenarios=args.scenarios.split(","), timeout=args.timeout,
        workers=0 if sqlite else getattr(args, "workers_now", 0),
        processes=1 if sqlite else getattr(args, "processes_now", 1),
        wrk=None if args.no_wrk else getattr(args, "wrk_path", None),
        wrk_seconds=args.wrk_seconds, wrk_threads=args.wrk_threads, batches=args.batches,
    )


async def _progress(r: ScenarioResult) -> None:
    print(f"scenario {r.scenario.name}: {r.accepted} accepted, {r.succeeded} sent, "
          f"{r.failed} failed, {_n(r.msgs_per_s)} msg/s, service CPU "
          f"{_n(r.cpu_ms, ' ms', 3)}/msg; {r.note}", flush=True)


def ensure_database(url: str) -> None:
    """Drop and create the PostgreSQL URL's database (asyncpg): each run has fresh master keys,
    so a database of an earlier run cannot be read. Give the bench a scratch database only."""
    import asyncpg
    from sqlalchemy.engine import make_url

    target = make_url(url)
    admin = target.set(drivername="postgresql", database="postgres")

    async def go() -> None:
        conn = await asyncpg.connect(admin.render_as_string(hide_password=False), timeout=10)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{target.database}" WITH (FORCE)')
            await conn.execute(f'CREATE DATABASE "{target.database}"')
        finally:
            await conn.close()

    asyncio.run(go())


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit status (1 if the service bench errored)."""
    args = parse_args(argv)
    info = machine_info()
    print(f"# clinicomm bench — {info['date']}")
    print(f"machine: {info['nproc']} CPU ({info['cpu']}), {info['memory']}, "
          f"Python {info['python']}, loop {args.loop}")

    raw_figs: RawFigures | None = None
    services: list[ServiceResult] = []
    passes: list[RawFigures] = []
    install = not args.no_install
    with HttpSink(worker_processes=args.nginx_workers, install=install) as http, \
            SmtpSink(install=install) as smtp:
        print(f"sinks: http {http.url}, smtp {smtp.host}:{smtp.port}", flush=True)
        args.wrk_path = None if args.no_wrk else ensure_wrk(install)
        if not args.no_wrk and args.wrk_path is None:
            print("wrk unavailable: full-speed load from the Python generator", flush=True)
        if not args.skip_raw:
            for i in range(args.runs):
                t0 = time.perf_counter()
                figs = _run(lambda: measure_raw(http, smtp, args), args.loop)
                passes.append(figs)
                print(f"raw pass {i + 1}/{args.runs} ({time.perf_counter() - t0:.0f}s): "
                      + ", ".join(f"{k} {getattr(figs, k):,.0f}" for k in RAW_LABELS),
                      flush=True)
            raw_figs = median_raw(passes)
        if not args.skip_service:
            runs = [(url, n, p) for url in args.database_url or ["sqlite"]
                    for n in ([0] if url.startswith("sqlite") else (args.workers or [0]))
                    for p in ([1] if url.startswith("sqlite") else (args.processes or [1]))]
            for url, n, p in runs:
                args.workers_now, args.processes_now = n, p
                if url.startswith("postgresql"):
                    ensure_database(url)  # fresh for every column: new master keys each run
                bench = functools.partial(run_service_bench, http, smtp,
                                          _config(args, url), _progress)
                svc = _run(bench, args.loop)
                services.append(svc)
                if svc.skipped:
                    print(f"service bench skipped: {svc.skipped}")
                    break  # same command for every backend: skipped for all
                if svc.vacuumed:
                    print(f"[{svc.database}] the server's autovacuum is off: VACUUM ANALYZE "
                          "ran before each scenario, outside its measured window")
                if svc.error:
                    print(f"service bench failed [{svc.database}]: {svc.error}")
    print()
    print(render_table(raw_figs, services, args))
    if args.json is not None:
        args.json.write_text(json.dumps(
            {"machine": info, "loop": args.loop,
             "raw": asdict(raw_figs) if raw_figs else None,
             "raw_passes": [asdict(f) for f in passes],
             "service": [asdict(svc) for svc in services]}, indent=2, default=str))
    return 1 if any(svc.error for svc in services) else 0


if __name__ == "__main__":
    sys.exit(main())
