"""`clinicomm.Client`: the Python way to send, with the same request model as the HTTP API.

    async with Client() as client:                      # settings from CLINICOMM_* variables
        accepted = await client.send(SendRequest(...))  # durable when it returns
        status = await client.get(accepted.id)

By default the client also runs a delivery worker and the status-callback sender in its
process, like `clinicomm serve`; pass `run_worker=False` when separate `clinicomm worker`
processes do the sending.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from clinicomm.config import Settings
from clinicomm.delivery.cancel import cancel_message, counted
from clinicomm.delivery.status import get_message, reveal
from clinicomm.delivery.worker import WORKER_PROCESS_CONCURRENCY, Worker, WorkerOptions
from clinicomm.messaging.models import SendAccepted, SendRequest
from clinicomm.runtime import Runtime
from clinicomm.store.models import utcnow


def worker_options(settings: Settings, *, own_process: bool = False) -> WorkerOptions:
    """The worker's options from `settings`; `own_process`: a worker process with no API in
    it, whose default concurrency is `WORKER_PROCESS_CONCURRENCY` (256 otherwise)."""
    concurrency = settings.worker_concurrency
    if concurrency is None:
        concurrency = WORKER_PROCESS_CONCURRENCY if own_process else WorkerOptions.concurrency
    return WorkerOptions(
        batch_size=settings.worker_batch_size,
        concurrency=concurrency,
        lease_seconds=settings.worker_lease_seconds,
        poll_seconds=settings.worker_poll_seconds,
        max_age_seconds=settings.delivery_max_age_seconds,
        retry_base_seconds=settings.retry_base_seconds,
        reap_interval=min(5.0, settings.worker_lease_seconds / 2),
        retention_seconds=settings.message_retention_days * 86400,
        audit_retention_seconds=settings.audit_retention_days * 86400,
    )


class Client:
    """Send messages and read their status from Python."""

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        run_worker: bool = True,
        env: dict[str, str] | None = None,
    ) -> None:
        self.settings = settings or Settings()
        self.run_worker = run_worker
        self._env = env
        self.runtime: Runtime | None = None
        self.worker: Worker | None = None
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._callbacks: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Client:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Build the runtime (migrating an embedded SQLite file) and start the worker."""
        self.runtime = await Runtime.create(
            self.settings, migrate=self.settings.is_sqlite, env=self._env
        )
        if self.run_worker:
            from clinicomm.observability.monitors import callback_sender

            self.worker = Worker.for_runtime(self.runtime, worker_options(self.settings))
            self._task = asyncio.create_task(self.worker.run(self._stop), name="client-worker")
            self._callbacks = asyncio.create_task(
                callback_sender(self.runtime).run(self._stop), name="client-callbacks"
            )

    def _rt(self) -> Runtime:
        if self.runtime is None:
            raise RuntimeError("Client is not started; use `async with Client() as client`")
        return self.runtime

    async def send(
        self, request: SendRequest | dict[str, Any], *, idempotency_key: str | None = None
    ) -> SendAccepted:
        """Accept a message: validated, stored with its deliveries, then sent by a worker."""
        if not isinstance(request, SendRequest):
            request = SendRequest.model_validate(request)
        return await self._rt().messaging.accept(request, idempotency_key=idempotency_key)

    async def get(self, message_id: str) -> dict[str, Any] | None:
        """The message with each delivery, its attempts and its status."""
        rt = self._rt()
        async with rt.db.read() as session:
            found = await get_message(session, message_id, None)
        return None if found is None else await reveal(found, rt.keys, rt.db)

    async def cancel(self, message_id: str) -> dict[str, Any] | None:
        """Cancel the message's deliveries still queued (they end `cancelled`); the message
        as `get` answers it afterwards, or None when there is no such message."""
        rt = self._rt()
        async with rt.db.session() as session:
            cancelled = await cancel_message(session, message_id, now=utcnow())
        counted(message_id, cancelled)
        return await self.get(message_id)

    async def close(self) -> None:
        self._stop.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._callbacks is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._callbacks
            self._callbacks = None
        if self.runtime is not None:
            await self.runtime.close()
            self.runtime = None
