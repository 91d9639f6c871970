"""Start a real `clinicomm serve` (uvicorn) subprocess on a free port, for black-box tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from clinicomm.config import Settings

ROOT = Path(__file__).parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class ServeProcess:
    """`python -m clinicomm.cli serve` with the test's database, Redis, keys and JWT secret."""

    def __init__(
        self, settings: Settings, log_path: Path, extra_env: dict[str, str] | None = None
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        env = {
            **os.environ,
            "CLINICOMM_DATABASE_URL": settings.database_url,
            "CLINICOMM_MASTER_KEYS": settings.master_keys or "",
            "CLINICOMM_JWT_SECRET": settings.jwt_secret or "",
            "CLINICOMM_DATA_DIR": str(settings.data_dir),
            "CLINICOMM_CONFIG_POLL_SECONDS": "30",  # only Redis may deliver the change in time
            "CLINICOMM_HOST": "127.0.0.1",
            "CLINICOMM_PORT": str(self.port),
            "CLINICOMM_ENV": "test",
            "CLINICOMM_WORKER": "false",
            "PYTHONPATH": f"{ROOT / 'src'}:{ROOT}",
        }
        env.pop("CLINICOMM_REDIS_URL", None)
        if settings.redis_url:
            env["CLINICOMM_REDIS_URL"] = settings.redis_url
        env.update(extra_env or {})
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "clinicomm.cli", "serve"],
            cwd=ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited {self.proc.returncode}: {self.output()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"serve not ready: {self.output()[-2000:]}")

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self._log.close()
