"""`clinicomm send`: accept one message from the command line (and deliver it with --deliver)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from clinicomm.config import Settings
from tests.support.smtp_server import SmtpServer

ROOT = Path(__file__).parents[1]


def cli(
    settings: Settings, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    full = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("CLINICOMM_", "EMAIL_"))},
        "CLINICOMM_DATABASE_URL": settings.database_url,
        "CLINICOMM_MASTER_KEYS": settings.master_keys or "",
        "CLINICOMM_DATA_DIR": str(settings.data_dir),
        "CLINICOMM_WORKER_POLL_SECONDS": "0.05",
        "CLINICOMM_LOG_LEVEL": "WARNING",
        "PYTHONPATH": str(ROOT / "src"),
        **(env or {}),
    }
    return subprocess.run(
        [sys.executable, "-m", "clinicomm.cli", "send", *args],
        env=full,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_send_help_and_bad_arguments(settings: Settings) -> None:
    assert cli(settings, "--help").returncode == 0
    bad = cli(settings, "--to", "p@example.com", "--channel", "pigeon", "--body", "x")
    assert bad.returncode == 2
    assert "channels.0" in bad.stderr
    assert "Traceback" not in bad.stderr
    invalid = cli(settings, "--to", "not-an-email@", "--channel", "email", "--body", "x")
    assert invalid.returncode == 2
    assert "recipients.0.email" in invalid.stderr


def test_send_and_deliver_through_the_global_provider(settings: Settings) -> None:
    with SmtpServer() as smtp:
        env = {
            "EMAIL_HOST": "127.0.0.1",
            "EMAIL_PORT": str(smtp.port),
            "EMAIL_REQUIRE_TLS": "false",
            "EMAIL_FROM": "ops@platform.example",
        }
        accepted = cli(
            settings, "--to", "p@example.com", "--channel", "email", "--body", "hi", env=env
        )
        assert accepted.returncode == 0, accepted.stderr
        assert json.loads(accepted.stdout)["status"] == "queued"
        done = cli(
            settings,
            "--to",
            "q@example.com",
            "--channel",
            "email",
            "--title",
            "Test",
            "--body",
            "hi",
            "--deliver",
            env=env,
        )
        assert done.returncode == 0, done.stderr
        result = json.loads(done.stdout)
        statuses = {d["recipient"]: d["status"] for d in result["deliveries"]}
        assert statuses["q@example.com"] == "sent"
        assert ["q@example.com"] in [r.rcpt_tos for r in smtp.received]
