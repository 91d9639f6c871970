"""The `clinicomm` command line. Every command has `--help`; bad arguments exit 2 with one line;
an operational error (wrong master key, database down) exits 1 with one clear line, no traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from clinicomm.config import Settings
from clinicomm.crypto import CryptoError, MasterKeyring

if TYPE_CHECKING:
    from clinicomm.api.auth import Role

T = TypeVar("T")

app = typer.Typer(
    name="clinicomm",
    help="Email, WhatsApp and SMS for many clinics, each through its own providers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
keys_app = typer.Typer(help="Master and data key operations.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


def _print_version(value: bool) -> None:
    if value:
        from clinicomm import __version__

        typer.echo(f"clinicomm {__version__}")
        raise typer.Exit(0)


@app.callback()
def _main(
    version: bool = typer.Option(
        False,
        "--version",
        callback=_print_version,
        is_eager=True,
        help="Print the version and exit.",
    ),
) -> None:
    """Email, WhatsApp and SMS for many clinics, each through its own providers."""


def fail(message: str, code: int = 1) -> NoReturn:
    typer.echo(f"clinicomm: {message}", err=True)
    raise typer.Exit(code)


def run(coro_fn: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine, turning known operational errors into one line and exit code 1."""
    from sqlalchemy.exc import DBAPIError, OperationalError

    try:
        return asyncio.run(coro_fn())
    except CryptoError as exc:
        fail(str(exc))
    except (OperationalError, DBAPIError, ConnectionError, OSError) as exc:
        fail(f"database or service unreachable: {type(exc).__name__}: {str(exc).splitlines()[0]}")


def load_settings() -> Settings:
    from pydantic import ValidationError

    try:
        return Settings()
    except ValidationError as exc:
        first = exc.errors()[0]
        fail(f"bad environment: CLINICOMM_{str(first['loc'][0]).upper()}: {first['msg']}", 2)


@app.command()
def migrate() -> None:
    """Create or upgrade the database schema (CLINICOMM_DATABASE_URL)."""
    from clinicomm.store.db import upgrade

    settings = load_settings()
    try:
        upgrade(settings.database_url)
    except Exception as exc:  # alembic wraps driver errors in many ways
        fail(f"migration failed: {type(exc).__name__}: {str(exc).splitlines()[0]}")
    run(lambda: _reseal_all(settings, "encrypting stored addresses"))
    typer.echo("database is up to date")


def _keyring(settings: Settings) -> MasterKeyring:
    try:
        return MasterKeyring.from_environment(
            settings.master_keys, data_dir=settings.data_dir, production=settings.production
        )
    except CryptoError as exc:
        fail(str(exc))


def _progress(label: str) -> Progress:
    return Progress(
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rows]} rows"),
        TimeElapsedColumn(),
        transient=not sys.stderr.isatty(),
    )


async def _reseal_all(settings: Settings, label: str) -> None:
    """Rows written before addresses were encrypted (clear addresses, plain metadata,
    unversioned blobs) rewritten for every clinic, batched and resumable (`settings.reseal`)."""
    from clinicomm.settings import reseal
    from clinicomm.settings.keys import KeyStore
    from clinicomm.settings.rotation import clinic_ids
    from clinicomm.store.db import Database

    db = Database(settings.database_url)
    try:
        clinics = await clinic_ids(db)
        if not clinics:
            return
        keys = KeyStore(_keyring(settings))
        rows = 0
        with _progress(label) as progress:
            task = progress.add_task("reseal", total=len(clinics), rows=0)

            def tick(_: str, count: int) -> None:
                nonlocal rows
                rows += count
                progress.update(task, rows=rows)

            for clinic_id in clinics:
                cipher = await keys.cipher_for(db, clinic_id)
                await reseal.reseal_clinic(db, cipher, progress=tick)
                progress.advance(task)
        if rows:
            typer.echo(f"{rows} stored rows encrypted or re-encrypted")
    finally:
        await db.dispose()


@keys_app.command("rotate-data")
def keys_rotate_data(
    clinic: str | None = typer.Option(None, "--clinic", help="The clinic whose data key rotates."),
    every: bool = typer.Option(False, "--all", help="Every clinic (and the platform's key)."),
    batch_size: int = typer.Option(500, min=1, help="Rows re-encrypted per transaction."),
    settle_seconds: float = typer.Option(
        10.0, min=0, help="Wait for every process to see the new key version (its key cache)."
    ),
) -> None:
    """Give a clinic a new data key version, re-encrypt its secrets, contents and addresses
    under it, then destroy the old version. Safe to run again after an interruption."""
    from clinicomm.runtime import Runtime
    from clinicomm.settings.rotation import clinic_ids, rotate_data

    if (clinic is None) == (not every):
        fail("give --clinic ID or --all", 2)
    settings = load_settings()
    _keyring(settings)  # a bad key configuration is one line, before anything starts

    async def go() -> None:
        rt = await Runtime.create(settings, migrate=False)
        try:
            targets = [clinic] if clinic is not None else await clinic_ids(rt.db)
            rows = 0
            with _progress("re-encrypting under new data keys") as progress:
                task = progress.add_task("rotate", total=len(targets), rows=0)

                def tick(_: str, count: int) -> None:
                    nonlocal rows
                    rows += count
                    progress.update(task, rows=rows)

                for clinic_id in targets:
                    try:
                        report = await rotate_data(
                            rt.db,
                            rt.keys,
                            rt.config,
                            clinic_id,
                            batch_size=batch_size,
                            settle_seconds=settle_seconds,
                            progress=tick,
                        )
                    except KeyError:
                        fail(f"clinic {clinic_id!r} has no data key")
                    progress.advance(task)
                    typer.echo(
                        f"{clinic_id}: data key v{report.to_version} "
                        f"(destroyed v{', v'.join(map(str, report.from_versions))}); "
                        f"{sum(report.rows.values())} rows re-encrypted"
                    )
        finally:
            await rt.close()

    run(go)


@keys_app.command("rotate")
def keys_rotate(
    batch_size: int = typer.Option(100, min=1, help="Data keys re-wrapped per transaction."),
) -> None:
    """Re-wrap every clinic's data key with the first key of CLINICOMM_MASTER_KEYS.

    Safe to run again after an interruption: keys already under the first key are skipped.
    """
    from clinicomm.settings.keys import rotate
    from clinicomm.store.db import Database

    settings = load_settings()
    try:
        keyring = MasterKeyring.from_environment(
            settings.master_keys, data_dir=settings.data_dir, production=settings.production
        )
    except CryptoError as exc:
        fail(str(exc))

    async def go() -> None:
        db = Database(settings.database_url)
        try:
            with Progress(
                TextColumn("re-wrapping data keys"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                transient=not sys.stderr.isatty(),
            ) as progress:
                task = progress.add_task("rotate", total=None)

                def tick(done: int, total: int) -> None:
                    progress.update(task, completed=done, total=total)

                report = await rotate(db, keyring, batch_size=batch_size, progress=tick)
        finally:
            await db.dispose()
        typer.echo(
            f"{report.rotated} data keys re-wrapped with master key {keyring.current.kid!r}; "
            f"{report.already_current} already current; {report.total} in all"
        )

    run(go)


@app.command()
def serve(
    processes: int | None = typer.Option(
        None,
        "--processes",
        min=1,
        max=64,
        help="API processes on one port (PostgreSQL only); default CLINICOMM_PROCESSES (1).",
    ),
    reuse_port: bool = typer.Option(False, "--reuse-port", hidden=True),
) -> None:
    """Run the HTTP API (uvicorn, uvloop, httptools) on CLINICOMM_HOST:CLINICOMM_PORT, with a
    delivery worker in the same process unless CLINICOMM_WORKER=false.

    With `--processes N` (N > 1, PostgreSQL): N API processes share the port (SO_REUSEPORT, the
    kernel spreads connections) and one `clinicomm worker` process sends (unless
    CLINICOMM_WORKER=false); this process supervises them: SIGTERM/SIGINT is passed on, and
    when one of them exits the others are stopped. SQLite stays one process (its writers are
    serialised in process).

    An empty SQLite database is migrated on first start. A wrong master key, a refused dev
    key or secret, or an unreachable database stops it with one line and exit code 1.
    SIGTERM stops accepting requests, then lets the worker finish or release its deliveries.
    """
    from clinicomm.telemetry.logging import configure_logging

    settings = load_settings()
    configure_logging(settings.log_level, fmt=settings.log_format)
    count = processes if processes is not None else settings.processes
    if count > 1 and not reuse_port:
        if settings.is_sqlite:
            fail("SQLite runs one process: --processes needs PostgreSQL", 2)
        raise typer.Exit(_supervise(settings, count))

    import uvicorn
    import uvloop

    from clinicomm.api.app import create_app
    from clinicomm.api.auth import JwtConfigError, TokenVerifier
    from clinicomm.runtime import Runtime, freeze_startup_heap

    try:
        verifier = TokenVerifier.from_settings(settings)
    except JwtConfigError as exc:
        fail(str(exc))

    async def go() -> None:
        from sqlalchemy import text

        # An API process of `--processes N` joins the port's SO_REUSEPORT group before it
        # starts (the N are forked together): the kernel spreads connections over all N from
        # the first one on, and those of a process still starting wait in its backlog. Bound
        # once ready instead, a client's keep-alive connections opened as soon as the first
        # process answered stayed on that one (a pool opened at start used one core).
        sockets = [_reuse_port_socket(settings.host, settings.port)] if reuse_port else None
        runtime = await Runtime.create(settings, migrate=settings.is_sqlite)
        try:
            async with runtime.db.engine.connect() as conn:  # fail now, not on the first request
                await conn.execute(text("SELECT 1"))
            api = create_app(settings, runtime)
            api.state.verifier = verifier
            config = uvicorn.Config(
                api,
                host=settings.host,
                port=settings.port,
                loop="none",  # we already run on uvloop
                http="httptools",
                lifespan="on",
                log_config=None,
                access_log=False,
                server_header=False,
                # uvicorn would take the scheme and client from X-Forwarded-* sent by any
                # local peer; CLINICOMM_TRUST_FORWARDED_HEADERS is the one switch, read where
                # the URL matters (webhook signatures, the console's cookie).
                proxy_headers=False,
            )
            server = uvicorn.Server(config)
            stop = asyncio.Event()
            from clinicomm.observability.monitors import start_monitors, stop_monitors

            # An API process of `--processes N` leaves probes and alerts to the worker process.
            monitors = start_monitors(runtime, stop) if not reuse_port else []
            worker_task = None
            if settings.worker and not reuse_port:
                from clinicomm.client import worker_options
                from clinicomm.delivery.worker import Worker

                worker = Worker.for_runtime(runtime, worker_options(settings))
                worker_task = asyncio.create_task(worker.run(stop), name="serve-worker")
            freeze_startup_heap()
            try:
                await server.serve(sockets=sockets)
            finally:
                stop.set()
                if worker_task is not None:
                    await worker_task
                await stop_monitors(monitors)
            if not server.started:
                fail(f"cannot listen on {settings.host}:{settings.port}")
        finally:
            await runtime.close()

    uvloop.install()
    run(go)


def _reuse_port_socket(host: str, port: int) -> socket.socket:
    """A listening socket on host:port that other processes may bind too (SO_REUSEPORT)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        fail(f"cannot listen on {host}:{port}: {exc.strerror}")
    sock.listen(2048)
    sock.set_inheritable(False)
    return sock


#: Modules an API or worker process needs, imported by the supervisor before it forks.
_SERVICE_MODULES = (
    "uvicorn",
    "uvicorn.lifespan.on",
    "uvicorn.protocols.http.httptools_impl",
    "uvloop",
    "clinicomm.api.app",
    "clinicomm.client",
    "clinicomm.delivery.worker",
    "clinicomm.observability.inventory",
    "clinicomm.observability.metrics_server",
    "clinicomm.observability.monitors",
)


def _preload() -> None:
    """Import the service once in the supervisor (modules, every provider adapter), then move
    it out of the garbage collector's walks, so that the forked API and worker processes share
    those pages copy-on-write instead of each loading its own copy (~100 MB a process). No
    thread, event loop, connection or file is opened here: a fork copies only this heap."""
    import gc
    import importlib

    from clinicomm.providers import registry

    for name in _SERVICE_MODULES:
        importlib.import_module(name)
    registry.load_all()
    gc.collect()
    gc.freeze()


def _name_process(name: str) -> None:
    """Set the process name shown by ps/top (/proc/<pid>/comm, 15 bytes) on Linux."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(15, name.encode()[:15] + b"\0", 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):  # not Linux: the name stays python
        pass


class _Child:
    """A forked process running one clinicomm command (`os.fork`, never exec)."""

    def __init__(self, name: str, args: list[str], env: dict[str, str]) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: run the command, never return into the supervisor's code
            code = 1
            try:
                _name_process(name)
                os.environ.update(env)
                app(args=args, prog_name="clinicomm")
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except BaseException:  # report anything, then leave with 1
                import traceback

                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        """The exit code once the process has ended (negative: killed by that signal)."""
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                self.returncode = 1
                return self.returncode
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)

    def wait(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds; True once it has ended."""
        import time

        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True


def _supervise(settings: Settings, count: int) -> int:
    """Run `count` API processes on one port and one worker process; stop all when one exits
    or on SIGTERM/SIGINT (passed on). Returns the exit code: 0 after a requested stop.

    The processes are forked from this one after `_preload`, so they share the imported
    service's pages; each is named (`ps`, /proc/<pid>/comm) clinicomm-api or clinicomm-work."""
    import signal
    import time

    _preload()
    api_env = {"CLINICOMM_WORKER": "false", "CLINICOMM_PROCESSES": "1"}
    children = [_Child("clinicomm-api", ["serve", "--reuse-port"], api_env) for _ in range(count)]
    if settings.worker:
        children.append(_Child("clinicomm-work", ["worker"], {"CLINICOMM_PROCESSES": "1"}))
    stopping = False

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            child.send_signal(signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    code = 0
    try:
        while all(child.poll() is None for child in children):
            time.sleep(0.2)
        if not stopping:  # one exited on its own: stop the others, report its code
            code = next(c.returncode for c in children if c.poll() is not None) or 1
            stop(signal.SIGTERM, None)
        deadline = time.monotonic() + 30
        for child in children:
            if not child.wait(max(0.1, deadline - time.monotonic())):
                child.send_signal(signal.SIGKILL)
                child.wait(5)
    finally:
        for child in children:
            child.send_signal(signal.SIGKILL)
    return code


def _role(role: str, clinic: str | None) -> Role:
    """The `--role` of `token` and `console-link`; exits 2 for an unknown role, or for a
    clinic-scoped one without `--clinic`."""
    from clinicomm.api.auth import CLINIC_SCOPED, Role

    try:
        parsed = Role(role)
    except ValueError:
        fail(f"unknown role {role!r}; one of {', '.join(r.value for r in Role)}", 2)
    if parsed in CLINIC_SCOPED and not clinic:
        fail(f"role {parsed.value} needs --clinic", 2)
    return parsed


@app.command()
def token(
    role: str = typer.Option(
        ..., "--role", help="SuperAdmin, ClinicAdmin, ClinicManager, Service, Doctor or Patient."
    ),
    clinic: str | None = typer.Option(None, "--clinic", help="The clinic_id claim."),
    ttl: int = typer.Option(3600, "--ttl", min=1, help="Seconds until the token expires."),
    sub: str = typer.Option("cli", "--sub", help="The sub claim (who acts; in the audit log)."),
    clinic_ids: list[str] | None = typer.Option(
        None, "--clinic-ids", help="For Service: a clinic it may send for (repeatable)."
    ),
) -> None:
    """Print a bearer token signed with the configured JWT secret."""
    from clinicomm.api.auth import JwtConfigError, TokenVerifier

    parsed = _role(role, clinic)
    settings = load_settings()
    try:
        verifier = TokenVerifier.from_settings(settings)
        typer.echo(
            verifier.issue(parsed, sub=sub, clinic_id=clinic, clinic_ids=clinic_ids, ttl=ttl)
        )
    except JwtConfigError as exc:
        fail(str(exc))


@app.command("console-link")
def console_link(
    role: str = typer.Option(..., "--role", help="SuperAdmin, ClinicAdmin or ClinicManager."),
    clinic: str | None = typer.Option(None, "--clinic", help="The clinic (clinic-scoped roles)."),
    sub: str = typer.Option("console", "--sub", help="Who signs in (shown in the audit log)."),
    ttl: int = typer.Option(300, "--ttl", min=1, max=900, help="Seconds the link may be opened."),
    base_url: str | None = typer.Option(
        None, "--base-url", help="The console's origin; default http://CLINICOMM_HOST:PORT."
    ),
) -> None:
    """Print a one-time console sign-in link (the token is in the fragment, never logged)."""
    from clinicomm.api.auth import JwtConfigError, TokenVerifier
    from clinicomm.api.console.sessions import issue_link_token

    parsed = _role(role, clinic)
    settings = load_settings()
    try:
        verifier = TokenVerifier.from_settings(settings)
        token = issue_link_token(verifier, parsed, clinic_id=clinic, sub=sub, ttl=ttl)
    except JwtConfigError as exc:
        fail(str(exc))
    origin = (base_url or f"http://{settings.host}:{settings.port}").rstrip("/")
    typer.echo(f"{origin}/console/login#token={token}")


@app.command()
def worker(
    batch_size: int | None = typer.Option(None, min=1, help="Deliveries claimed per batch."),
    concurrency: int | None = typer.Option(
        None, min=1, help="Sends in flight at once (default: CLINICOMM_WORKER_CONCURRENCY or 512)."
    ),
    metrics_port: int | None = typer.Option(
        None,
        "--metrics-port",
        min=0,
        max=65535,
        help="Serve Prometheus /metrics on this port (CLINICOMM_METRICS_HOST, 127.0.0.1); "
        "default CLINICOMM_METRICS_PORT, unset: none.",
    ),
) -> None:
    """Run a delivery worker (no HTTP API) on uvloop. Run several on PostgreSQL; SIGTERM stops
    it gently.

    The worker also sends status callbacks and runs the probes and alert rules."""
    import signal

    from clinicomm.client import worker_options
    from clinicomm.delivery.worker import Worker
    from clinicomm.runtime import Runtime, freeze_startup_heap
    from clinicomm.telemetry.logging import configure_logging

    settings = load_settings()
    configure_logging(settings.log_level, fmt=settings.log_format)
    options = worker_options(settings, own_process=True)
    if batch_size:
        options.batch_size = batch_size
    if concurrency:
        options.concurrency = concurrency
    port = metrics_port if metrics_port is not None else settings.metrics_port

    async def go() -> None:
        rt = await Runtime.create(settings, migrate=settings.is_sqlite)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        from clinicomm.observability.inventory import GaugeRefresher
        from clinicomm.observability.metrics_server import MetricsServer
        from clinicomm.observability.monitors import start_monitors, stop_monitors

        server = None
        if port is not None:
            refresher = GaugeRefresher(rt.db, rt.config.global_settings, 0.25)
            server = MetricsServer(
                refresher, settings.metrics_host, port, token=settings.metrics_token
            )
            try:
                await server.start()
            except OSError as exc:
                await rt.close()
                fail(f"cannot listen on {settings.metrics_host}:{port}: {exc.strerror}")
        monitors = start_monitors(rt, stop)
        worker = Worker.for_runtime(rt, options)
        freeze_startup_heap()
        try:
            await worker.run(stop)
        finally:
            stop.set()
            await stop_monitors(monitors)
            if server is not None:
                await server.stop()
            await rt.close()

    import uvloop

    uvloop.install()  # as `serve`: the stdlib loop's transports were ~12 % of its CPU
    run(go)


@app.command()
def status(message_id: str = typer.Argument(..., help="The message's id.")) -> None:
    """Print a message's status with each delivery, its attempts and its callbacks (JSON).
    Exit 1 when no such message exists."""
    import json

    from clinicomm.delivery.status import get_message
    from clinicomm.store.db import Database

    settings = load_settings()

    async def go() -> dict[str, Any] | None:
        db = Database(settings.database_url)
        try:
            async with db.read() as session:
                return await get_message(session, message_id, None)
        finally:
            await db.dispose()

    result = run(go)
    if result is None:
        fail(f"message {message_id!r} not found")
    typer.echo(json.dumps(result, indent=2))


def _when(value: str, option: str) -> Any:
    from datetime import UTC, datetime

    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        fail(f"{option}: not an ISO 8601 time: {value!r}", 2)
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


@app.command("requeue")
def requeue_command(
    clinic: str = typer.Option(..., "--clinic", help="The clinic whose deliveries to re-queue."),
    status: str = typer.Option("failed", "--status", help="Only `failed` can be re-queued."),
    since: str = typer.Option(..., "--since", help="ISO 8601 start (UTC unless a zone is given)."),
    until: str = typer.Option(..., "--until", help="ISO 8601 end (exclusive)."),
    provider: str | None = typer.Option(
        None, "--provider", help="Only deliveries whose last provider was this (key or label)."
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Count them, change nothing."),
    batch_size: int = typer.Option(500, "--batch-size", min=1, help="Deliveries per transaction."),
) -> None:
    """Re-queue deliveries that failed between --since and --until (after an outage).

    Each delivery is re-queued once (never one that was re-queued before); each batch is one
    transaction with one audit entry `delivery.requeue` naming the delivery ids."""
    from clinicomm.delivery.requeue import find, requeue
    from clinicomm.store.db import Database

    if status != "failed":
        fail("--status: only failed deliveries can be re-queued", 2)
    start, end = _when(since, "--since"), _when(until, "--until")
    if end <= start:
        fail("--until must be after --since", 2)
    settings = load_settings()

    async def go() -> tuple[int, int]:
        db = Database(settings.database_url)
        try:
            ids = await find(
                db, clinic_id=clinic, status=status, since=start, until=end, provider=provider
            )
            if dry_run:
                return len(ids), 0
            done = 0
            with Progress(
                TextColumn("re-queueing deliveries"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                transient=not sys.stderr.isatty(),
            ) as progress:
                task = progress.add_task("requeue", total=len(ids))
                for offset in range(0, len(ids), batch_size):
                    batch = ids[offset : offset + batch_size]
                    done += await requeue(
                        db,
                        batch,
                        clinic_id=clinic,
                        status=status,
                        actor="cli",
                        note=f"since={start.isoformat()} until={end.isoformat()}"
                        + (f" provider={provider}" if provider else ""),
                    )
                    progress.update(task, completed=offset + len(batch))
            return len(ids), done
        finally:
            await db.dispose()

    found, done = run(go)
    if dry_run:
        typer.echo(f"{found} deliveries would be re-queued (dry run: nothing changed)")
    else:
        typer.echo(f"{done} deliveries re-queued ({found} matched)")


@app.command()
def providers(
    key: str | None = typer.Argument(None, help="One provider key (`sendgrid`); all if left out."),
) -> None:
    """Print each provider's credential fields (type, required, secret, default, description)
    as Markdown; `docs/providers.md` is this output."""
    from clinicomm.reference import providers_markdown

    try:
        typer.echo(providers_markdown(key), nl=False)
    except KeyError:
        fail(f"unknown provider {key!r}", 2)


@app.command()
def variables() -> None:
    """Print every CLINICOMM_* variable (type, default, description) as Markdown;
    `docs/configuration.md` is this output."""
    from clinicomm.reference import variables_markdown

    typer.echo(variables_markdown(), nl=False)


@app.command("test-config")
def config_test_command(
    clinic: str = typer.Argument(..., help="The clinic's id."),
    channel: str = typer.Argument(..., help="email, whatsapp or sms."),
    to: str = typer.Argument(..., help="Where the test message goes (address or E.164 number)."),
) -> None:
    """Send one test message through the clinic's own providers (never the global one),
    primary first, then its fallbacks. Prints a JSON result; exit 0 when a provider took it,
    1 when none did, 2 for bad arguments. Audited as `communication.test`."""
    import json

    from clinicomm.delivery.testsend import BadTestRequest, run_config_test
    from clinicomm.providers.base import Channel
    from clinicomm.runtime import Runtime
    from clinicomm.settings.service import ClinicNotFoundError

    try:
        parsed = Channel(channel)
    except ValueError:
        fail(f"unknown channel {channel!r}; one of {', '.join(c.value for c in Channel)}", 2)
    settings = load_settings()

    async def go() -> dict[str, Any]:
        rt = await Runtime.create(settings, migrate=settings.is_sqlite)
        try:
            outcome = await run_config_test(
                rt.db, rt.config, rt.chains, clinic, parsed, to, actor="cli", role="operator"
            )
        except BadTestRequest as exc:
            fail(str(exc), 2)
        except ClinicNotFoundError:
            fail(f"clinic {clinic!r} not found", 2)
        finally:
            await rt.close()
        return outcome.to_json()

    result = run(go)
    typer.echo(json.dumps(result))
    if not result["ok"]:
        raise typer.Exit(1)


@app.command("send")
def send_command(
    to: list[str] = typer.Option(
        ..., "--to", help="A recipient: an email address or an E.164 number (repeatable)."
    ),
    channel: list[str] = typer.Option(
        ..., "--channel", help="email, whatsapp or sms (repeatable)."
    ),
    clinic: str | None = typer.Option(
        None, "--clinic", help="The clinic whose providers send it; none: the global ones."
    ),
    body: str | None = typer.Option(None, "--body", help="The text."),
    title: str | None = typer.Option(None, "--title", help="The subject (email)."),
    template: str | None = typer.Option(None, "--template", help="A template's name."),
    category: str = typer.Option("GENERAL", "--category", help="The message category."),
    idempotency_key: str | None = typer.Option(
        None, "--idempotency-key", help="Same key and payload within 24 h: sent once."
    ),
    deliver: bool = typer.Option(
        False,
        "--deliver",
        help="Also send it from this process and wait until it is done "
        "(when no `serve` or `worker` is running).",
    ),
    wait: float = typer.Option(30.0, "--wait", min=0, help="Seconds --deliver waits at most."),
) -> None:
    """Accept one message (stored before this returns) and print the answer as JSON; with
    --deliver, send it from this process too and print its final status. Exit 0 when accepted
    (and, with --deliver, sent); 1 when it failed; 2 for bad arguments."""
    import json

    from pydantic import ValidationError

    from clinicomm.client import Client
    from clinicomm.messaging.models import TERMINAL, SendRequest
    from clinicomm.messaging.service import (
        IdempotencyConflictError,
        SendValidationError,
        UnknownClinicError,
    )

    recipients = [{"email": t} if "@" in t else {"phone": t} for t in to]
    try:
        request = SendRequest.model_validate(
            {
                "category": category,
                "title": title,
                "body": body,
                "recipients": recipients,
                "channels": channel,
                "template": {"name": template} if template else None,
                "metadata": {"clinicId": clinic},
            }
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        fail(f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}", 2)
    settings = load_settings()

    async def go() -> dict[str, Any]:
        client = Client(settings, run_worker=deliver)
        await client.start()
        try:
            try:
                accepted = await client.send(request, idempotency_key=idempotency_key)
            except SendValidationError as exc:
                fail("; ".join(f"{p.path}: {p.message}" for p in exc.problems), 2)
            except (UnknownClinicError, IdempotencyConflictError) as exc:
                fail(str(exc), 2)
            if not deliver:
                return accepted.model_dump(mode="json", by_alias=True)
            deadline = asyncio.get_running_loop().time() + wait
            while True:
                status = await client.get(accepted.id)
                assert status is not None
                done = all(d["status"] in TERMINAL for d in status["deliveries"])
                if done or asyncio.get_running_loop().time() > deadline:
                    return status
                await asyncio.sleep(0.1)
        finally:
            await client.close()

    result = run(go)
    typer.echo(json.dumps(result))
    failed = [d for d in result.get("deliveries", []) if d["status"] in ("failed", "bounced")]
    if failed:
        raise typer.Exit(1)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
