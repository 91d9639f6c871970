"""Metrics from every process: a separate `clinicomm worker --metrics-port` is scraped during a
run and shows its sends, the queue gauges and the callback backlog; the one log line of a
failed delivery; HTTP metrics by route template."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import sys
import time

import httpx

from clinicomm import Client
from clinicomm.config import Settings
from clinicomm.telemetry.logging import JsonFormatter, TextFormatter, configure_logging
from tests.api.serve_proc import free_port
from tests.delivery.test_workers import ROOT, stop, worker_env
from tests.monitoring.conftest import ProviderSink, email_request, email_settings, sendgrid
from tests.support.pipeline import create_clinic


def _value(text: str, name: str, **labels: str) -> float | None:
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


async def test_a_separate_worker_serves_metrics_with_its_sends(settings: Settings) -> None:
    port = free_port()
    async with ProviderSink() as sink:
        client = Client(settings, run_worker=False, env={})
        await client.start()
        proc = None
        try:
            await create_clinic(client, "clinic-w", {"email": email_settings(sendgrid(sink, "w"))})
            for _ in range(3):
                await client.send(email_request("clinic-w"))
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "clinicomm.cli", "worker", "--metrics-port", str(port),
                env=worker_env(settings), cwd=ROOT, stdout=asyncio.subprocess.DEVNULL,
            )
            deadline = time.monotonic() + 30
            sent = None
            async with httpx.AsyncClient() as http:
                while time.monotonic() < deadline:
                    try:
                        answer = await http.get(f"http://127.0.0.1:{port}/metrics", timeout=2)
                    except httpx.TransportError:
                        await asyncio.sleep(0.1)
                        continue
                    text = answer.text
                    sent = _value(text, "communication_email_sent_total",
                                  clinicId="clinic-w", provider="sendgrid")
                    depth = _value(text, "communication_queue_depth", channel="email")
                    if sent == 3 and depth == 0:  # sent, and the results recorded
                        break
                    await asyncio.sleep(0.1)
            assert sent == 3, text[-2000:]
            assert _value(text, "communication_queue_depth", channel="email") == 0
            assert _value(text, "communication_queue_oldest_age_seconds", channel="email") == 0
            assert _value(text, "communication_callback_backlog") == 0
            assert _value(text, "communication_active_clinics") == 1
        finally:
            if proc is not None:
                await stop(proc)
            await client.close()


async def test_a_failed_delivery_logs_exactly_one_line_without_the_address(
    settings: Settings, caplog: object
) -> None:
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep(logging.DEBUG)
    logging.getLogger().addHandler(handler)
    old = logging.getLogger().level
    logging.getLogger().setLevel(logging.INFO)
    address = "failing.patient@example.com"
    async with ProviderSink() as sink:
        sink.fail = True
        client = Client(settings.model_copy(update={"worker_poll_seconds": 0.05}), env={})
        await client.start()
        try:
            await create_clinic(client, "clinic-f", {"email": email_settings(
                sendgrid(sink, "f"), fallbackStrategy={"enabled": False, "retryAttempts": 0})})
            accepted = await client.send(email_request("clinic-f", to=address))
            deadline = time.monotonic() + 15
            while True:
                status = await client.get(accepted.id)
                assert status is not None
                if status["deliveries"][0]["status"] == "failed":
                    break
                assert time.monotonic() < deadline, status
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.1)
        finally:
            await client.close()
            logging.getLogger().removeHandler(handler)
            logging.getLogger().setLevel(old)
    ended = [r for r in records if getattr(r, "event", None) == "delivery_failed"]
    assert len(ended) == 1, [getattr(r, "event", None) for r in records]
    line = JsonFormatter().format(ended[0])
    data = json.loads(line)
    assert data["deliveryId"] == status["deliveries"][0]["id"]
    assert data["messageId"] == accepted.id and data["clinicId"] == "clinic-f"
    assert data["channel"] == "email" and data["provider"] == "clinic:sendgrid"
    assert data["errorClass"] == "transient" and data["statusCode"] == 500
    assert data["level"] == "WARNING"
    for record in records:  # no line of the whole run carries the address
        assert address not in JsonFormatter().format(record)
        assert address not in TextFormatter().format(record)


def test_log_format_text_or_json_and_alembic_info_is_debug() -> None:
    text, js = io.StringIO(), io.StringIO()
    root = logging.getLogger()
    old = root.level
    try:
        configure_logging("INFO", stream=text, fmt="text")
        logging.getLogger("alembic.runtime.migration").info("Will assume transactional DDL.")
        logging.getLogger("clinicomm.x").info("hello", extra={"event": "e1", "clinicId": "c1"})
        configure_logging("INFO", stream=js)  # not a terminal: JSON
        logging.getLogger("clinicomm.x").info("hello", extra={"event": "e2"})
    finally:
        for h in list(root.handlers):
            if getattr(h, "_clinicomm_json_handler", False):
                root.removeHandler(h)
        root.setLevel(old)
    assert "transactional DDL" not in text.getvalue()
    assert re.search(r"INFO\s+clinicomm.x: hello\s+event=e1 clinicId=c1", text.getvalue())
    assert json.loads(js.getvalue().splitlines()[0])["event"] == "e2"
