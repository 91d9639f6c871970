"""`client.worker_options`: a worker process gets more slots than the worker inside `serve`,
unless `CLINICOMM_WORKER_CONCURRENCY` says otherwise (docs/architecture.md, "A worker's
slots")."""

from __future__ import annotations

import pytest

from clinicomm.client import worker_options
from clinicomm.config import Settings
from clinicomm.delivery.worker import WORKER_PROCESS_CONCURRENCY, WorkerOptions


def test_a_worker_process_has_512_slots_and_the_one_inside_serve_256(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("CLINICOMM_WORKER_CONCURRENCY", raising=False)
    settings = Settings()
    assert worker_options(settings).concurrency == WorkerOptions.concurrency == 256
    assert worker_options(settings, own_process=True).concurrency == 512
    assert WORKER_PROCESS_CONCURRENCY == 512
    # Half of either is the bulk cap in flight.
    assert worker_options(settings).bulk_concurrency_share == 0.5


def test_the_setting_wins_in_both(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLINICOMM_WORKER_CONCURRENCY", "64")
    settings = Settings()
    assert worker_options(settings).concurrency == 64
    assert worker_options(settings, own_process=True).concurrency == 64


def test_the_worker_command_uses_the_process_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """`clinicomm worker` (also what `serve --processes N` starts) asks for a process's
    options; `serve`'s own worker does not."""
    import inspect

    from clinicomm import cli

    source = inspect.getsource(cli.worker)
    assert "worker_options(settings, own_process=True)" in source
    assert "worker_options(settings))" in inspect.getsource(cli.serve)
