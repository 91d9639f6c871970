"""Load generators, CPU accounting and delivery figures of the service bench.

- `offer_wrk`: full-speed single sends from `wrk` (a C load generator, Debian's package,
  installed when missing) with `bench/wrk_post.lua`: every request has its own body and
  `Idempotency-Key`. The generator then costs the service little CPU, unlike a Python client.
- `offer_batches`: batch sends (`POST /api/v1/communications/batch`, 500 messages per
  request) from a few aiohttp loops: the generator's cost per delivery is negligible.
- The fixed-rate scenarios use the same wrk and script with a schedule (`delay()` in the
  script: requests leave at the rate whatever the answers' latency, an open loop given free
  connections), since Debian packages no constant-rate `wrk2`; `--no-wrk` falls back to the
  Python constant-rate generator of bench/service.py, which costs the shared cores far more.
- `CpuMeter`: user+system CPU seconds from /proc of the service's process tree (serve, its API
  processes and workers) and, apart, of PostgreSQL's and Redis's processes; per delivered
  message that figure is far steadier than a rate on a shared machine.
- `delivery_figures`: counts and times read from the `deliveries` table the service wrote
  (created_at = acceptance, sent_at = the provider answered), instead of one GET per message.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from bench.sinks import _run_root

WRK = "wrk"
LUA = Path(__file__).resolve().parent / "wrk_post.lua"
TICK = os.sysconf("SC_CLK_TCK")


def ensure_wrk(install: bool) -> str | None:
    """The path of `wrk`, installed with apt-get when missing and allowed; None if absent."""
    found = shutil.which(WRK)
    if found or not install:
        return found
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    with contextlib.suppress(Exception):
        _run_root(["apt-get", "install", "-y", "--no-install-recommends", "wrk"], env=env)
    if shutil.which(WRK) is None:
        with contextlib.suppress(Exception):
            _run_root(["apt-get", "update"], env=env)
            _run_root(["apt-get", "install", "-y", "--no-install-recommends", "wrk"], env=env)
    return shutil.which(WRK)


# --------------------------------------------------------------------------- load


@dataclass
class Load:
    """What a load generator offered and how the API answered."""

    generator: str
    accepted: int  # messages accepted (202 items)
    rejected: dict[int, int]
    started_at: float  # wall clock of the first request
    requests: int = 0
    post_p50_ms: float | None = None
    post_p99_ms: float | None = None
    post_ms: list[float] = field(default_factory=list)


async def offer_wrk(base: str, token: str, channel: str, clinics: list[str], *, seconds: float,
                    connections: int, threads: int, run: str, rate: float | None = None) -> Load:
    """Run wrk for `seconds` against POST /api/v1/communications; parse its summary line.

    `rate` None: flat out on `connections`. A rate: requests leave on a schedule at `rate`
    per second in all (`bench/wrk_post.lua`), `connections` being how many may be waiting
    for an answer at once."""
    argv = [WRK, "-t", str(threads), "-c", str(max(connections, threads)), "-d",
            f"{max(1, round(seconds))}s", "--timeout", "30s", "-s", str(LUA), base, "--",
            run, channel, token, str(threads), repr(float(rate or 0)), *clinics]
    started = time.time()
    proc = await asyncio.create_subprocess_exec(*argv, stdout=subprocess.PIPE,
                                                stderr=subprocess.STDOUT)
    out, _ = await proc.communicate()
    text = out.decode(errors="replace")
    line = next((ln for ln in text.splitlines() if ln.startswith("CLINICOMM_WRK ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"wrk exited {proc.returncode}: {text[-1500:]}")
    data = json.loads(line.split(" ", 1)[1])
    statuses = {int(k): int(v) for k, v in data["statuses"].items()}
    accepted = statuses.pop(202, 0)
    errors = sum(data["errors"].values())
    if errors:
        statuses[0] = errors  # 0: connection errors and timeouts
    generator = "wrk (constant rate)" if rate else "wrk"
    return Load(generator, accepted, statuses, started, data["requests"],
                data["p50_us"] / 1000, data["p99_us"] / 1000)


def batch_body(channel: str, clinic: str, start: int, size: int, run: str) -> dict[str, Any]:
    """A batch of `size` reminders of one clinic, each with its own variables and key."""
    items = []
    for i in range(start, start + size):
        items.append({
            "category": "REMINDER",
            "title": "Appointment reminder",
            "body": "Your appointment is tomorrow at 10:30.",
            "recipients": [{"email": f"patient{i}@example.com"}],
            "channels": [channel],
            "metadata": {"clinicId": clinic, "appointmentId": f"appt-{i}"},
            "idempotencyKey": f"batch-{run}-{i}",
        })
    return {"items": items}


async def offer_batches(session: aiohttp.ClientSession, base: str, clinics: list[str], *,
                        batches: int, size: int, concurrency: int, run: str) -> Load:
    """POST `batches` batches of `size` messages, `concurrency` in flight. The bodies are
    encoded before the clock starts and the answers parsed with orjson: the generator shares
    the service's cores, and its own JSON work is not the service's."""
    bodies = [orjson.dumps(batch_body("email", clinics[b % len(clinics)], b * size, size, run))
              for b in range(batches)]
    headers = {"Content-Type": "application/json"}
    load = Load("aiohttp (batch)", 0, {}, time.time())
    todo = iter(range(batches))

    async def loop() -> None:
        for b in todo:
            t0 = time.perf_counter()
            async with session.post(base + "/api/v1/communications/batch",
                                    data=bodies[b], headers=headers) as resp:
                data = orjson.loads(await resp.read())
                load.post_ms.append((time.perf_counter() - t0) * 1000)
                load.requests += 1
                if resp.status not in (202, 207):
                    load.rejected[resp.status] = load.rejected.get(resp.status, 0) + size
                    continue
                for item in data["items"]:
                    if item["status"] == 202:
                        load.accepted += 1
                    else:
                        load.rejected[item["status"]] = load.rejected.get(item["status"], 0) + 1

    load.started_at = time.time()
    await asyncio.gather(*(loop() for _ in range(concurrency)))
    return load


# --------------------------------------------------------------------------- CPU


def _stat(pid: int) -> tuple[str, int, float] | None:
    """(comm, parent pid, user+system CPU seconds) of a process, None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    comm = text[text.index("(") + 1:text.rindex(")")]
    fields = text[text.rindex(")") + 2:].split()
    return comm, int(fields[1]), (int(fields[11]) + int(fields[12])) / TICK


def _all() -> dict[int, tuple[str, int, float]]:
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := _stat(int(entry))) is not None:
            found[int(entry)] = stat
    return found


@dataclass
class CpuSample:
    service: float  # serve, its API processes and workers
    postgres: float
    redis: float


class CpuMeter:
    """CPU seconds of the service's tree, PostgreSQL and Redis, between two samples.

    Processes are found anew at every sample (API processes and workers start after serve);
    a process that exited between samples loses its time (none do during a scenario).
    """

    def __init__(self, roots: list[int]) -> None:
        self.roots = roots

    def sample(self) -> CpuSample:
        procs = _all()
        children: dict[int, list[int]] = {}
        for pid, (_, ppid, _) in procs.items():
            children.setdefault(ppid, []).append(pid)
        tree: set[int] = set()
        todo = [r for r in self.roots if r in procs]
        while todo:
            pid = todo.pop()
            if pid not in tree:
                tree.add(pid)
                todo.extend(children.get(pid, []))
        service = sum(procs[p][2] for p in tree)
        postgres = sum(s[2] for s in procs.values() if s[0] == "postgres")
        redis = sum(s[2] for s in procs.values() if s[0].startswith("redis-server"))
        return CpuSample(service, postgres, redis)


# --------------------------------------------------------------------------- deliveries


def _when(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return float(value.timestamp())


@dataclass
class Figures:
    total: int = 0
    sent: int = 0
    failed: int = 0
    pending: int = 0
    first_created: float | None = None
    last_sent: float | None = None
    latencies_ms: list[float] = field(default_factory=list)


class DeliveryReader:
    """Reads the bench clinics' deliveries from the service's database."""

    def __init__(self, database_url: str) -> None:
        from sqlalchemy.ext.asyncio import create_async_engine

        self.engine = create_async_engine(database_url, pool_size=1, max_overflow=0)

    async def _scalar(self, sql: str, clinics: list[str]) -> Any:
        """The one value of `sql`, whose `:clinics` is the list of the bench clinics."""
        from sqlalchemy import bindparam, text

        query = text(sql).bindparams(bindparam("clinics", expanding=True))
        async with self.engine.connect() as conn:
            return (await conn.execute(query, {"clinics": clinics})).scalar()

    async def vacuum(self) -> bool:
        """VACUUM ANALYZE the service's tables when the database is a PostgreSQL server with
        autovacuum off (this machine's: /etc/postgresql/15/main/conf.d/90-ci.conf); True if
        it ran.

        Every claim and flush leaves a dead version of a delivery row and a dead entry in the
        claim index (`status` is indexed, so no update is HOT). Without a vacuum, a run's
        132,000 sent deliveries left 265,000 dead rows, and each of the claim's three index
        scans then read ~190 pages to find nothing: 0.9 ms instead of 0.04 ms, paid per claim,
        which at 300 msg/s is about one claim per message. A production server vacuums
        `deliveries` on its own (migration i20_0003 sets its thresholds); the bench stands in
        for that between scenarios, outside every scenario's measured window."""
        from sqlalchemy import text

        if self.engine.dialect.name != "postgresql":
            return False
        async with self.engine.connect() as conn:
            if (await conn.execute(text("SHOW autovacuum"))).scalar() != "off":
                return False
            await conn.commit()
            auto = await conn.execution_options(isolation_level="AUTOCOMMIT")
            await auto.execute(text("VACUUM ANALYZE"))
        return True

    async def pending(self, clinics: list[str]) -> bool:
        """Whether any delivery of `clinics` is still queued or sending.

        An EXISTS over the claim index's (status, …) prefix: it stops at the first pending row,
        so polling it costs PostgreSQL next to nothing. (A count over every delivery of the
        clinics, polled ten times a second, read ~10 M rows during a 50,000-message run and
        took CPU from the service it measured.)"""
        return bool(await self._scalar(
            "SELECT EXISTS (SELECT 1 FROM deliveries WHERE status IN ('queued', 'sending') "
            "AND clinic_id IN :clinics)", clinics))

    async def total(self, clinics: list[str]) -> int:
        """How many deliveries `clinics` have (queried once the queue has drained)."""
        count = await self._scalar(
            "SELECT count(*) FROM deliveries WHERE clinic_id IN :clinics", clinics)
        return int(count or 0)

    async def wait(self, clinics: list[str], expected: int, timeout: float) -> None:
        """Until `expected` deliveries exist and none is queued or sending, or `timeout`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not await self.pending(clinics) and await self.total(clinics) >= expected:
                return
            await asyncio.sleep(0.1)

    async def figures(self, clinics: list[str]) -> Figures:
        from sqlalchemy import bindparam, text

        query = text(
            "SELECT status, created_at, sent_at FROM deliveries WHERE clinic_id IN :clinics"
        ).bindparams(bindparam("clinics", expanding=True))
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query, {"clinics": clinics})).all()
        out = Figures(total=len(rows))
        for status, created, sent in rows:
            created_at, sent_at = _when(created), _when(sent)
            if created_at is not None and (out.first_created is None
                                           or created_at < out.first_created):
                out.first_created = created_at
            if status in ("sent", "delivered", "read"):
                out.sent += 1
                if sent_at is not None and created_at is not None:
                    out.latencies_ms.append((sent_at - created_at) * 1000)
                    out.last_sent = max(out.last_sent or sent_at, sent_at)
            elif status in ("queued", "sending"):
                out.pending += 1
            else:
                out.failed += 1
        return out

    async def close(self) -> None:
        await self.engine.dispose()
