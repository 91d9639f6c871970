"""Browser fixtures: one Chromium (Debian's, driven by Playwright), one real `clinicomm serve`
with its worker, and one aiosmtpd server, for the whole module.

Chromium missing: with `CI=true` the tests fail (CI must install it: `.ci/run` does);
otherwise they skip with the reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from email import message_from_bytes
from email.message import Message
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP as SMTPServer
from aiosmtpd.smtp import Envelope, Session

from clinicomm.api.auth import Role, TokenVerifier
from clinicomm.api.console.sessions import issue_link_token
from tests.api.serve_proc import ROOT, free_port
from tests.conftest import BACKEND, MASTER_KEYS

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
JWT_SECRET = "console-test-jwt-secret-" + "y" * 32
SCREENSHOTS = Path(__file__).parent / "screenshots"


@dataclass
class Inbox:
    """Messages the aiosmtpd server accepted."""

    messages: list[tuple[Envelope, Message]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def to(self, address: str) -> list[Message]:
        with self.lock:
            return [m for e, m in self.messages if address in e.rcpt_tos]


class _Handler:
    def __init__(self, inbox: Inbox) -> None:
        self.inbox = inbox

    async def handle_DATA(self, server: SMTPServer, session: Session, envelope: Envelope) -> str:
        with self.inbox.lock:
            self.inbox.messages.append((envelope, message_from_bytes(envelope.content or b"")))
        return "250 OK"


@pytest.fixture(scope="module")
def smtp_server() -> Iterator[tuple[int, Inbox]]:
    inbox = Inbox()
    port = free_port()
    controller = Controller(_Handler(inbox), hostname="127.0.0.1", port=port)
    controller.start()
    yield port, inbox
    controller.stop()


@dataclass
class Console:
    """The running server: its URL, link tokens, bearer tokens for API set-up calls."""

    url: str
    verifier: TokenVerifier

    def link(self, role: Role, clinic_id: str | None = None, sub: str = "tester") -> str:
        token = issue_link_token(self.verifier, role, clinic_id=clinic_id, sub=sub)
        return f"{self.url}/console/login#token={token}"

    def api(self) -> httpx.Client:
        token = self.verifier.issue(Role.SUPER_ADMIN, sub="api-setup")
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {token}"}, timeout=15
        )


@pytest.fixture(scope="module")
def console_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Console]:
    tmp = tmp_path_factory.mktemp("console")
    if BACKEND == "postgres":
        database_url: str = request.getfixturevalue("pg_url")
        redis_url: str | None = request.getfixturevalue("redis_url")
    else:
        template: Path = request.getfixturevalue("sqlite_template")
        shutil.copy(template, tmp / "console.db")
        database_url, redis_url = f"sqlite+aiosqlite:///{tmp / 'console.db'}", None
    port = free_port()
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CLINICOMM_", "EMAIL_", "SMS_", "WHATSAPP_"))
    }
    env.update(
        CLINICOMM_DATABASE_URL=database_url,
        CLINICOMM_MASTER_KEYS=MASTER_KEYS,
        CLINICOMM_JWT_SECRET=JWT_SECRET,
        CLINICOMM_DATA_DIR=str(tmp / ".clinicomm"),
        CLINICOMM_HOST="127.0.0.1",
        CLINICOMM_PORT=str(port),
        CLINICOMM_ENV="test",
        CLINICOMM_WORKER="true",
        CLINICOMM_WORKER_POLL_SECONDS="0.2",
        CLINICOMM_RETRY_BASE_SECONDS="0.05",
        PYTHONPATH=f"{ROOT / 'src'}:{ROOT}",
    )
    if redis_url:
        env["CLINICOMM_REDIS_URL"] = redis_url
    log = (tmp / "serve.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "clinicomm.cli", "serve"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            pytest.fail(f"serve exited: {(tmp / 'serve.log').read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("serve did not become ready")
        time.sleep(0.1)
    yield Console(url, TokenVerifier(JWT_SECRET, None))
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()
    text = (tmp / "serve.log").read_text(errors="replace")
    assert "Traceback" not in text, text[-3000:]


@pytest.fixture(scope="module")
def browser(console_server: Console) -> Iterator[Any]:
    # After the server: Playwright's sync API runs an event loop in this thread, and the
    # server's set-up (migrating a database) needs `asyncio.run`.
    if not Path(CHROMIUM).exists():
        reason = f"{CHROMIUM} is missing (apt-get install chromium)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        found = playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
        )
        yield found
        found.close()


@pytest.fixture
def new_page(
    request: pytest.FixtureRequest, browser: Any, console_server: Console
) -> Iterator[Any]:
    """`new_page(role, clinic)`: a signed-in page in a context of its own."""
    contexts: list[Any] = []

    def make(role: Role, clinic_id: str | None = None, sub: str = "tester") -> Any:
        context = browser.new_context(viewport={"width": 1200, "height": 900})
        contexts.append(context)
        page = context.new_page()
        page.goto(console_server.link(role, clinic_id, sub))
        page.wait_for_url("**/console/clinics")
        return page

    yield make
    failed = getattr(request.node, "rep_call", None)
    for index, context in enumerate(contexts):
        if failed is not None and failed.failed:
            for number, page in enumerate(context.pages):
                shot(page, f"failed-{request.node.name}-{index}-{number}")
        context.close()


def shot(page: Any, name: str) -> None:
    """Save a full-page screenshot under tests/console/screenshots/ (gitignored)."""
    SCREENSHOTS.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.when == "call":
        item.rep_call = report  # type: ignore[attr-defined]
    return report
