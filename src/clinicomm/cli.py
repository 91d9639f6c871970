"""The `clinicomm` command line. Every command has `--help`; bad arguments exit 2 with one line;
an operational error (wrong master key, database down) exits 1 with one clear line, no traceback.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Coroutine
from typing import Any, NoReturn, TypeVar

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from clinicomm.config import Settings
from clinicomm.crypto import CryptoError, MasterKeyring

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
    typer.echo("database is up to date")


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
def worker(
    batch_size: int | None = typer.Option(None, min=1, help="Deliveries claimed per batch."),
    concurrency: int | None = typer.Option(None, min=1, help="Sends in flight at once."),
) -> None:
    """Run a delivery worker (no HTTP). Run several on PostgreSQL; SIGTERM stops it gently."""
    import signal

    from clinicomm.client import worker_options
    from clinicomm.delivery.worker import Worker
    from clinicomm.observability.logging import configure_logging
    from clinicomm.runtime import Runtime

    settings = load_settings()
    configure_logging(settings.log_level)
    options = worker_options(settings)
    if batch_size:
        options.batch_size = batch_size
    if concurrency:
        options.concurrency = concurrency

    async def go() -> None:
        rt = await Runtime.create(settings, migrate=settings.is_sqlite)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await Worker.for_runtime(rt, options).run(stop)
        finally:
            await rt.close()

    run(go)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
