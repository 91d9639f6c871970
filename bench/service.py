"""End-to-end service bench: ``clinicomm serve`` against the local sinks.

What is measured (PERFORMANCE.md, "end to end": HTTP request in, message stored, worker claims
it, provider called, status recorded). Load (bench/load.py): `wrk` with bench/wrk_post.lua for
the single sends, flat out or on a schedule for the fixed-rate runs (each request its own
body and Idempotency-Key), a few aiohttp loops for the batch sends (500 messages a request);
with ``--no-wrk`` the Python generator below (flat out or at a constant rate) instead.
Counts and times come from the `deliveries` table the service wrote (no GET per message
competes with the service):

- **messages/s**: sent deliveries / (first delivery's ``created_at`` → last ``sent_at``).
- **POST p50/p99**: client-side latency, from wrk's histogram or the Python generator.
- **acceptance → sent p50/p99**: ``sent_at - created_at`` of each delivery: from the accept
  (before its group commit) to the provider's answer being recorded.
- **CPU per delivered message**: user+system CPU seconds of serve, its API processes and its
  workers (from /proc) between the first request and the last delivery terminal, divided by
  the sent deliveries; PostgreSQL's and Redis's processes apart. Far steadier than a rate on
  a shared machine.
- **peak RSS**: ``VmHWM`` of the serve process plus its children, from /proc, read before it
  is stopped; the current RSS (``VmRSS``) is reported beside it, and the current PSS
  (``Pss`` of /proc/<pid>/smaps_rollup: each page shared by k processes counted 1/k in each).
  A sum of RSS counts every shared page (the interpreter, the libraries' code) once per
  process, so with several processes the PSS sum is the memory the service really holds.

The load generator shares the machine with the service (as the sinks do), so rates are a lower
bound of what the service does alone; the CPU figures are not affected by that.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import os
import secrets
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from bench.load import CpuMeter, DeliveryReader, Load, offer_batches, offer_wrk
from bench.sinks import HttpSink, SmtpSink, free_port

REPO_ROOT = Path(__file__).resolve().parent.parent
TERMINAL = frozenset({"sent", "delivered", "read", "failed", "bounced", "suppressed"})
SUCCESS = frozenset({"sent", "delivered", "read"})
API = "/api/v1"
PHONE = "+14155552671"  # a valid NANP number (phonenumbers accepts it); never dialled


class ServiceBenchError(RuntimeError):
    """The service bench could not run (service failed to start, refused requests, ...)."""


class ServiceUnavailable(ServiceBenchError):
    """``clinicomm serve`` is not available (yet): the bench is skipped, not failed."""


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class Scenario:
    """One bench figure: a channel through one provider, at full speed or a fixed rate."""

    name: str
    channel: str  # "email" | "whatsapp"
    provider: str  # "sendgrid" | "smtp" | "meta_business"
    rate: float | None  # offered messages/s; None = as fast as ``concurrency`` allows
    raw_key: str | None  # which raw figure the throughput is compared with
    batch: int = 0  # messages per POST /communications/batch; 0: single sends


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("email-sendgrid", "email", "sendgrid", None, "http"),
        Scenario("email-smtp", "email", "smtp", None, "smtp5"),
        Scenario("whatsapp-meta", "whatsapp", "meta_business", None, "http"),
        Scenario("batch-accept", "email", "sendgrid", None, "http", batch=500),
        Scenario("latency-at-rate", "email", "sendgrid", 1000.0, None),
        Scenario("post-at-rate", "email", "sendgrid", 300.0, None),
    )
}


@dataclass
class ServiceConfig:
    """How to run the service bench. ``command`` is the argv prefix for ``clinicomm``."""

    command: list[str] | None = None
    database_url: str | None = None  # None: a SQLite file in a temp dir
    redis_url: str | None = None
    messages: int = 20_000  # per full-speed scenario
    rate_seconds: float = 10.0  # duration of each fixed-rate scenario
    latency_rate: float = 1000.0
    post_rate: float = 300.0
    concurrency: int = 64
    clinics: int = 10
    scenarios: list[str] = field(default_factory=lambda: list(SCENARIOS))
    timeout: float = 600.0  # per scenario, for every delivery to become terminal
    startup_timeout: float = 60.0
    #: 0: serve runs its in-process worker; N: serve is API only and N `clinicomm worker`
    #: processes send (PostgreSQL).
    workers: int = 0
    #: CLINICOMM_PROCESSES of serve (PostgreSQL): API processes on one port.
    processes: int = 1
    #: `wrk` for full-speed single sends (None: the Python generator, ``messages`` of them).
    wrk: str | None = None
    wrk_seconds: float = 10.0
    wrk_threads: int = 1
    #: Batch scenario: this many requests of ``Scenario.batch`` messages, 4 in flight.
    batches: int = 100


@dataclass
class ScenarioResult:
    """Figures for one scenario; ``None`` where the API gave nothing to compute it from."""

    scenario: Scenario
    offered: int
    accepted: int
    rejected: int
    succeeded: int
    failed: int
    not_terminal: int
    msgs_per_s: float | None
    post_p50_ms: float | None
    post_p99_ms: float | None
    sent_p50_ms: float | None
    sent_p99_ms: float | None
    note: str
    generator: str = ""
    #: CPU milliseconds per sent delivery: the service's processes, PostgreSQL, Redis.
    cpu_ms: float | None = None
    pg_cpu_ms: float | None = None
    redis_cpu_ms: float | None = None


@dataclass
class ServiceResult:
    """All scenarios of one service run, plus the serve process's memory."""

    database: str
    scenarios: list[ScenarioResult] = field(default_factory=list)
    total_messages: int = 0
    peak_rss_mb: float | None = None
    rss_mb: float | None = None
    pss_mb: float | None = None
    skipped: str | None = None
    error: str | None = None
    #: The bench vacuumed PostgreSQL before each scenario (its server's autovacuum is off).
    vacuumed: bool = False


# --------------------------------------------------------------------------- the process


def default_command() -> list[str]:
    """``clinicomm`` from this checkout (``src/`` first on the path), run by this interpreter."""
    return [sys.executable, "-c", "import sys; from clinicomm.cli import main; sys.exit(main())"]


def _base_env(port: int, database_url: str, redis_url: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLINICOMM_", "EMAIL_",
                                                                       "WHATSAPP_", "SMS_"))}
    src = str(REPO_ROOT / "src")
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (src, str(REPO_ROOT), env.get("PYTHONPATH")) if p
    )
    key = base64.b64encode(secrets.token_bytes(32)).decode()
    env.update(
        CLINICOMM_DATABASE_URL=database_url,
        CLINICOMM_MASTER_KEYS=f"bench:{key}",
        CLINICOMM_JWT_SECRET=secrets.token_urlsafe(48),
        CLINICOMM_HOST="127.0.0.1",
        CLINICOMM_PORT=str(port),
        CLINICOMM_WORKER="true",
        CLINICOMM_ENV="development",
    )
    if redis_url:
        env["CLINICOMM_REDIS_URL"] = redis_url
    return env


def check_available(command: list[str], env: dict[str, str]) -> None:
    """Raise :class:`ServiceUnavailable` unless ``<command> serve --help`` succeeds."""
    try:
        proc = subprocess.run([*command, "serve", "--help"], env=env, capture_output=True,
                              text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ServiceUnavailable(f"{shlex.join(command)} serve --help: {exc}") from exc
    if proc.returncode != 0:
        last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ServiceUnavailable(f"`clinicomm serve --help` exited {proc.returncode}: {last[0]}")


def _cli(command: list[str], env: dict[str, str], *args: str) -> str:
    proc = subprocess.run([*command, *args], env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    if proc.returncode != 0:
        raise ServiceBenchError(f"clinicomm {' '.join(args)} exited {proc.returncode}: "
                                f"{(proc.stderr or proc.stdout)[-1500:]}")
    return proc.stdout


def _proc_status(pid: int, key: str, file: str = "status") -> int:
    """A ``kB`` field of /proc/<pid>/<file> in bytes (``VmHWM``, ``VmRSS`` of ``status``;
    ``Pss`` of ``smaps_rollup``: shared pages split between the processes mapping them); 0
    if gone or unreadable."""
    try:
        for line in Path(f"/proc/{pid}/{file}").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def _descendants(pid: int) -> list[int]:
    """``pid`` and all its descendants (from /proc/<pid>/task/*/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                todo.extend(int(c) for c in task.read_text().split())
    return out


def _listeners(port: int) -> int:
    """Listening TCP sockets on `port` (each SO_REUSEPORT socket is a line of its own)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    count += 1
    return count


class ServeProcess:
    """``clinicomm serve`` as a child process with its log in ``workdir/serve.log``."""

    def __init__(self, command: list[str], env: dict[str, str], workdir: Path) -> None:
        self.command, self.env, self.workdir = command, env, workdir
        self.port = int(env["CLINICOMM_PORT"])
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "serve.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise ServiceBenchError("serve is not running")
        return self._proc.pid

    def log_tail(self, n: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-n:] if self.log_path.exists() else ""

    async def start(self, timeout: float) -> None:
        """Start serve and wait for ``GET /healthz`` to answer 200."""
        with self.log_path.open("wb") as log:
            self._proc = subprocess.Popen([*self.command, "serve"], env=self.env,
                                          cwd=self.workdir, stdout=log,
                                          stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                if self._proc.poll() is not None:
                    raise ServiceBenchError(f"serve exited with {self._proc.returncode}:\n"
                                            f"{self.log_tail()}")
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with session.get(self.url + "/healthz",
                                           timeout=aiohttp.ClientTimeout(total=1)) as r:
                        if r.status == 200:
                            break
                await asyncio.sleep(0.1)
            else:
                raise ServiceBenchError(f"serve not healthy after {timeout}s:\n{self.log_tail()}")
        # With --processes N the first API process answers before the others listen; load
        # started then (wrk opens its keep-alive connections once) would all go to the first.
        wanted = int(self.env.get("CLINICOMM_PROCESSES", "1") or "1")
        while _listeners(self.port) < wanted:
            if time.monotonic() > deadline:
                raise ServiceBenchError(
                    f"{_listeners(self.port)} of {wanted} API processes listen after "
                    f"{timeout}s:\n{self.log_tail()}"
                )
            await asyncio.sleep(0.1)

    def memory(self) -> tuple[float, float, float]:
        """(peak RSS, current RSS, current PSS) in MB of serve and its children, each summed
        over the processes."""
        pids = _descendants(self.pid)
        mb = 1024 * 1024
        return (sum(_proc_status(p, "VmHWM") for p in pids) / mb,
                sum(_proc_status(p, "VmRSS") for p in pids) / mb,
                sum(_proc_status(p, "Pss", "smaps_rollup") for p in pids) / mb)

    def stop(self) -> None:
        """SIGINT (graceful shutdown), then SIGTERM, then SIGKILL."""
        if self._proc is None or self._proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGINT, 20.0), (signal.SIGTERM, 10.0)):
            self._proc.send_signal(sig)
            try:
                self._proc.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue
        self._proc.kill()
        self._proc.wait()


# --------------------------------------------------------------------------- clinics


def clinic_settings(
    scenario: Scenario, http: HttpSink, smtp: SmtpSink, index: int = 0
) -> dict[str, Any]:
    """``settings`` for a bench clinic whose ``scenario.channel`` goes to the sinks (API.md).

    Each clinic has its own WhatsApp number, upgraded to 1,000 messages/s (Meta's top
    throughput tier), as real clinics would; the default 80/s cap is enforced per number.
    """
    creds: dict[str, Any]
    if scenario.provider == "sendgrid":
        creds = {"apiKey": "SG.bench-key", "fromEmail": "appointments@clinic.example",
                 "fromName": "Bench Clinic", "baseUrl": http.url}
    elif scenario.provider == "smtp":
        creds = {"host": smtp.host, "port": smtp.port, "secure": False, "requireTls": False,
                 "from": "appointments@clinic.example", "maxConnections": 5}
    elif scenario.provider == "meta_business":
        creds = {"apiUrl": http.url + "/v23.0", "apiKey": "EAAbench",
                 "phoneNumberId": f"1000000000{index:05d}",
                 "businessAccountId": "200000000000002", "maxPerSecond": 1000,
                 "appSecret": "bench-app-secret",
                 "templates": {"appointmentConfirmation": "appointment_confirmation"}}
    else:
        raise ValueError(f"no sink for provider {scenario.provider!r}")
    primary = {"provider": scenario.provider, "enabled": True, "credentials": creds}
    return {"communicationSettings": {scenario.channel: {"primary": primary}}}


def message_payload(scenario: Scenario, clinic_id: str, i: int) -> dict[str, Any]:
    """A ``POST /api/v1/communications`` body for message ``i`` of ``scenario``."""
    body: dict[str, Any] = {
        "category": "APPOINTMENT",
        "title": "Appointment Confirmed",
        "body": "Your appointment is confirmed for 10:30.",
        "recipients": [{"email": f"patient{i}@example.com"} if scenario.channel == "email"
                       else {"phone": PHONE}],
        "channels": [scenario.channel],
        "metadata": {"clinicId": clinic_id, "appointmentId": f"appt-{i}"},
    }
    if scenario.channel == "whatsapp":
        body["template"] = {"name": "appointmentConfirmation", "language": "en",
                            "variables": {"1": "10:30"}}
    return body


# --------------------------------------------------------------------------- load and polling


@dataclass
class Accepted:
    """One accepted message as the load generator saw it."""

    id: str
    post_ms: float
    accepted_at: float  # wall clock (time.time()) when the 202 was read


@dataclass
class Offered:
    accepted: list[Accepted]
    rejected: dict[int, int]  # status -> count
    started_at: float  # wall clock of the first POST


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of ``values``; None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


async def offer_load(session: aiohttp.ClientSession, base: str, count: int,
                     payload: Callable[[int], dict[str, Any]], *, rate: float | None,
                     concurrency: int) -> Offered:
    """POST ``count`` messages: at ``rate`` per second (open loop), or flat out on
    ``concurrency`` closed loops when ``rate`` is None. Each gets a unique Idempotency-Key."""
    accepted: list[Accepted] = []
    rejected: dict[int, int] = {}
    run = secrets.token_hex(4)

    async def post(i: int) -> None:
        headers = {"Idempotency-Key": f"bench-{run}-{i}"}
        t0 = time.perf_counter()
        async with session.post(base + API + "/communications", json=payload(i),
                                headers=headers) as resp:
            data = await resp.read()
            t1 = time.perf_counter()
            if resp.status != 202:
                rejected[resp.status] = rejected.get(resp.status, 0) + 1
                return
        accepted.append(Accepted(str(_json(data)["id"]), (t1 - t0) * 1000, time.time()))

    started_at = time.time()
    if rate is None:
        counter = itertools.count()

        async def loop() -> None:
            while (i := next(counter)) < count:
                await post(i)

        await asyncio.gather(*(loop() for _ in range(concurrency)))
    else:
        start, tasks = time.perf_counter(), []
        for i in range(count):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(post(i)))
        await asyncio.gather(*tasks)
    return Offered(accepted, rejected, started_at)


def _json(data: bytes) -> Any:
    return orjson.loads(data)


# --------------------------------------------------------------------------- scenarios


async def run_scenario(session: aiohttp.ClientSession, base: str, scenario: Scenario,
                       clinics: list[str], cfg: ServiceConfig, *, token: str,
                       reader: DeliveryReader, meter: CpuMeter) -> ScenarioResult:
    """Offer the scenario's load, wait for every delivery, and compute its figures."""
    run = secrets.token_hex(4)
    before = meter.sample()
    load: Load
    if scenario.batch:
        load = await offer_batches(session, base, clinics, batches=cfg.batches,
                                   size=scenario.batch, concurrency=4, run=run)
    elif scenario.rate is None and cfg.wrk:
        load = await offer_wrk(base, token, scenario.channel, clinics, seconds=cfg.wrk_seconds,
                               connections=cfg.concurrency, threads=cfg.wrk_threads, run=run)
    elif cfg.wrk:
        # One thread keeps the schedule exactly; the connections bound what may be waiting.
        load = await offer_wrk(base, token, scenario.channel, clinics, seconds=cfg.rate_seconds,
                               connections=cfg.concurrency, threads=1, run=run,
                               rate=scenario.rate)
    else:
        count = cfg.messages if scenario.rate is None else int(scenario.rate * cfg.rate_seconds)

        def payload(i: int) -> dict[str, Any]:
            return message_payload(scenario, clinics[i % len(clinics)], i)

        offered = await offer_load(session, base, count, payload, rate=scenario.rate,
                                   concurrency=cfg.concurrency)
        posts = [a.post_ms for a in offered.accepted]
        load = Load("aiohttp" + (" (constant rate)" if scenario.rate else ""),
                    len(offered.accepted), offered.rejected, offered.started_at, count,
                    percentile(posts, 50), percentile(posts, 99), posts)
    await reader.wait(clinics, load.accepted, cfg.timeout)
    after = meter.sample()
    figures = await reader.figures(clinics)
    if load.generator.startswith("wrk"):  # it stops at its deadline, the last answers unread
        load.accepted = max(load.accepted, figures.total)
    notes = [f"load: {load.generator}, {load.requests:,} requests"]
    if load.rejected:
        notes.append("rejected: " + ", ".join(f"{k}×{v}" for k, v in
                                               sorted(load.rejected.items())))
    start = figures.first_created or load.started_at
    duration = (figures.last_sent or time.time()) - start
    sent = figures.sent

    def per(seconds: float) -> float | None:
        return seconds * 1000 / sent if sent else None

    if load.post_ms:
        post_p50, post_p99 = percentile(load.post_ms, 50), percentile(load.post_ms, 99)
    else:
        post_p50, post_p99 = load.post_p50_ms, load.post_p99_ms
    return ScenarioResult(
        scenario=scenario, offered=load.requests, accepted=load.accepted,
        rejected=sum(load.rejected.values()), succeeded=sent, failed=figures.failed,
        not_terminal=figures.pending,
        msgs_per_s=sent / duration if duration > 0 and sent else None,
        post_p50_ms=post_p50, post_p99_ms=post_p99,
        sent_p50_ms=percentile(figures.latencies_ms, 50),
        sent_p99_ms=percentile(figures.latencies_ms, 99),
        note="; ".join(notes), generator=load.generator,
        cpu_ms=per(after.service - before.service),
        pg_cpu_ms=per(after.postgres - before.postgres) if cfg.database_url else None,
        redis_cpu_ms=per(after.redis - before.redis) if cfg.redis_url else None,
    )


@contextlib.contextmanager
def _workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as d:
        yield Path(d)


async def _create_clinics(session: aiohttp.ClientSession, base: str, scenario: Scenario,
                          n: int, run: str, http: HttpSink, smtp: SmtpSink) -> list[str]:
    ids = []
    for i in range(n):
        cid = f"bench-{run}-{scenario.name}-{i}"
        body = {"id": cid, "name": f"Bench {scenario.name} {i}",
                "settings": clinic_settings(scenario, http, smtp, i)}
        async with session.post(base + API + "/clinics", json=body) as resp:
            if resp.status != 201:
                raise ServiceBenchError(f"POST /clinics answered {resp.status}: "
                                        f"{(await resp.text())[:500]}")
        ids.append(cid)
    return ids


async def run_service_bench(http: HttpSink, smtp: SmtpSink, cfg: ServiceConfig,
                            on_scenario: Callable[[ScenarioResult], Awaitable[None]] | None
                            = None) -> ServiceResult:
    """Start ``clinicomm serve`` against the sinks, run ``cfg.scenarios``, stop it.

    Never raises for a missing or failing service: the result carries ``skipped`` (service
    not available) or ``error`` (it is there but the bench failed) so the raw table still
    prints.
    """
    command = cfg.command or default_command()
    with _workdir() as workdir:
        database_url = cfg.database_url or f"sqlite+aiosqlite:///{workdir}/bench.db"
        db_label = database_url.split(":", 1)[0].split("+", 1)[0]
        db_label += " + redis" if cfg.redis_url else ""
        if cfg.processes > 1:
            db_label += f", {cfg.processes} API processes"
        elif cfg.redis_url and not cfg.workers:
            db_label += ", 1 process"
        if cfg.workers:
            db_label += f", {cfg.workers} worker{'s' if cfg.workers > 1 else ''}"
        result = ServiceResult(database=db_label)
        env = _base_env(free_port(), database_url, cfg.redis_url)
        env["CLINICOMM_PROCESSES"] = str(cfg.processes)
        if cfg.workers:
            env["CLINICOMM_WORKER"] = "false"
        workers: list[subprocess.Popen[bytes]] = []
        try:
            await asyncio.to_thread(check_available, command, env)
        except ServiceUnavailable as exc:
            result.skipped = str(exc)
            return result
        serve = ServeProcess(command, env, workdir)
        reader = DeliveryReader(database_url)
        try:
            await asyncio.to_thread(_cli, command, env, "migrate")
            token = (await asyncio.to_thread(_cli, command, env, "token", "--role",
                                             "SuperAdmin")).strip().splitlines()[-1]
            await serve.start(cfg.startup_timeout)
            for n in range(cfg.workers):
                log = (workdir / f"worker-{n}.log").open("wb")
                workers.append(subprocess.Popen([*command, "worker"], env=env, cwd=workdir,
                                                stdout=log, stderr=subprocess.STDOUT))
            connector = aiohttp.TCPConnector(limit=max(cfg.concurrency, 256))
            headers = {"Authorization": f"Bearer {token}"}
            run = secrets.token_hex(3)
            async with aiohttp.ClientSession(connector=connector, headers=headers,
                                             timeout=aiohttp.ClientTimeout(total=60)) as s:
                meter = CpuMeter([serve.pid, *(w.pid for w in workers)])
                for name in cfg.scenarios:
                    sc = SCENARIOS[name]
                    if sc.rate is not None:
                        rate = cfg.latency_rate if name == "latency-at-rate" else cfg.post_rate
                        sc = Scenario(sc.name, sc.channel, sc.provider, rate, sc.raw_key)
                    clinics = await _create_clinics(s, serve.url, sc, cfg.clinics, run,
                                                    http, smtp)
                    # Outside the scenario's window, as autovacuum would between runs.
                    result.vacuumed = await reader.vacuum() or result.vacuumed
                    res = await run_scenario(s, serve.url, sc, clinics, cfg, token=token,
                                             reader=reader, meter=meter)
                    result.scenarios.append(res)
                    result.total_messages += res.accepted
                    if on_scenario is not None:
                        await on_scenario(res)
            result.peak_rss_mb, result.rss_mb, result.pss_mb = serve.memory()
        except (ServiceBenchError, aiohttp.ClientError, TimeoutError, OSError,
                KeyError, ValueError) as exc:
            result.error = f"{type(exc).__name__}: {exc}"[:3000]
            tail = serve.log_tail(1500)
            if tail:
                result.error += f"\n--- serve.log tail ---\n{tail}"
        finally:
            await reader.close()
            for proc in workers:
                proc.terminate()
            for proc in workers:
                try:
                    await asyncio.to_thread(proc.wait, 30)
                except subprocess.TimeoutExpired:
                    proc.kill()
            await asyncio.to_thread(serve.stop)
        return result
