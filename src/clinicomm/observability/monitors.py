"""The background monitors of a process: periodic provider probes and alert evaluation,
and the status-callback sender.

`start_monitors(runtime, stop)` is called by `clinicomm serve` and `clinicomm worker`; the
tasks end when `stop` is set. Intervals: `CLINICOMM_PROBE_INTERVAL_SECONDS` (300) and
`CLINICOMM_ALERT_INTERVAL_SECONDS` (60); `CLINICOMM_ALERT_WEBHOOK_URL` receives alerts.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from clinicomm.callbacks.sender import CallbackSender
from clinicomm.observability.alerts import AlertEngine
from clinicomm.observability.probes import ProbeRunner, TokenExpiries

if TYPE_CHECKING:
    from clinicomm.runtime import Runtime


def token_expiries(runtime: Runtime) -> TokenExpiries:
    """The runtime's one book of token expiries (probes write it, alerts read it)."""
    book = runtime.extras.get("token_expiries")
    if book is None:
        book = TokenExpiries()
        runtime.extras["token_expiries"] = book
    assert isinstance(book, TokenExpiries)
    return book


def alert_engine(runtime: Runtime) -> AlertEngine:
    """The alert engine of this runtime (its webhook from the settings)."""
    return AlertEngine(
        runtime.db,
        runtime.config,
        runtime.chains,
        runtime.health,
        runtime.limiter,
        http=runtime.http,
        webhook_url=runtime.settings.alert_webhook_url,
        expiries=token_expiries(runtime),
    )


def probe_runner(runtime: Runtime) -> ProbeRunner:
    return ProbeRunner(
        runtime.db,
        runtime.config,
        runtime.chains,
        runtime.health,
        interval=runtime.settings.probe_interval_seconds,
        timeout=runtime.settings.probe_timeout_seconds,
        expiries=token_expiries(runtime),
    )


def callback_sender(runtime: Runtime) -> CallbackSender:
    """The status-callback sender of this runtime (`clinicomm.callbacks.sender`)."""
    settings = runtime.settings
    assert runtime.messaging.targets is not None
    return CallbackSender(
        runtime.db,
        runtime.messaging.targets,
        production=settings.production,
        egress=runtime.chains.context.egress,
        retry_base=settings.callback_retry_base_seconds,
        max_age=settings.callback_max_age_seconds,
        timeout=settings.callback_timeout_seconds,
        poll=settings.callback_poll_seconds,
    )


def start_monitors(runtime: Runtime, stop: asyncio.Event) -> list[asyncio.Task[None]]:
    """Start the probe, alert and status-callback loops; await the tasks after setting `stop`."""
    probes = probe_runner(runtime)
    alerts = alert_engine(runtime)
    return [
        asyncio.create_task(callback_sender(runtime).run(stop), name="monitor-callbacks"),
        asyncio.create_task(probes.run(stop), name="monitor-probes"),
        asyncio.create_task(
            alerts.run(stop, runtime.settings.alert_interval_seconds), name="monitor-alerts"
        ),
    ]


async def stop_monitors(tasks: list[asyncio.Task[None]], grace: float = 5.0) -> None:
    """Wait for the loops to notice `stop`; cancel what does not end in time."""
    if not tasks:
        return
    _, pending = await asyncio.wait(tasks, timeout=grace)
    for task in pending:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
