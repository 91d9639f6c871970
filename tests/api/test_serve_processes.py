"""`clinicomm serve --processes 2` on PostgreSQL: two API processes on one port and a worker
process deliver every message exactly once (issue 20).

A real `serve` supervisor is started; the test sends through its port with many connections
(the kernel spreads them over both API processes: SO_REUSEPORT), checks from /proc that both
API processes did work, and that the provider stand-in received each delivery once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from clinicomm.api.auth import Role
from clinicomm.config import Settings
from clinicomm.store.models import Delivery, DeliveryAttempt
from tests.api.conftest import Api, create_clinic
from tests.api.serve_proc import ServeProcess
from tests.api.test_communications import body, sendgrid_settings
from tests.support.http_capture import CaptureServer, Scripted

MESSAGES = 600


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry))
    return found


def comm(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


def listening(pid: int, port: int) -> bool:
    """Whether process `pid` holds a socket listening on TCP `port` (its fds' socket inodes
    against /proc/net/tcp and tcp6: state 0A is LISTEN)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                local_port = int(fields[1].rsplit(":", 1)[1], 16)
                if local_port == port and fields[3] == "0A" and fields[9] in inodes:
                    return True
    return False


def proc_kb(pid: int, key: str, file: str = "status") -> int:
    """A kB field of /proc/<pid>/<file>: `VmRSS` of status, `Pss` of smaps_rollup."""
    for line in Path(f"/proc/{pid}/{file}").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {key} in /proc/{pid}/{file}")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.postgres
@pytest.mark.redis
async def test_two_api_processes_and_a_worker_deliver_each_message_once(
    api: Api, settings: Settings, tmp_path: Path
) -> None:
    async with CaptureServer(Scripted(202, None, {"X-Message-Id": "sg-p"})) as sink:
        await create_clinic(api, "clinic-a", sendgrid_settings(sink.url))
        server = ServeProcess(
            settings,
            tmp_path / "serve.log",
            {
                "CLINICOMM_PROCESSES": "2",
                "CLINICOMM_WORKER": "true",
                "CLINICOMM_WORKER_POLL_SECONDS": "0.2",
            },
        )
        try:
            server.wait_ready()
            deadline = time.monotonic() + 20
            while len(kids := children(server.proc.pid)) < 3 and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            apis = [p for p in kids if comm(p) == "clinicomm-api"]
            workers = [p for p in kids if comm(p) == "clinicomm-work"]
            assert len(apis) == 2 and len(workers) == 1, [comm(p) for p in kids]
            # Ready means one API process answers; the other may still be starting, but it
            # joins the port's SO_REUSEPORT group first thing (the test below), so the
            # connections below, kept alive for the whole test, are spread over both.
            while not all(listening(p, server.port) for p in apis) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert all(listening(p, server.port) for p in apis), "an API process is not listening"
            # Forked from the supervisor after it imported the service: most of an API
            # process's pages are the supervisor's, shared (PSS well under RSS).
            assert proc_kb(apis[0], "Pss", "smaps_rollup") < proc_kb(apis[0], "VmRSS") * 0.8
            before = {p: cpu_seconds(p) for p in apis}
            headers = api.auth(Role.SERVICE)
            limits = httpx.Limits(max_connections=32, max_keepalive_connections=32)
            async with httpx.AsyncClient(base_url=server.url, timeout=20, limits=limits) as peer:
                gate = asyncio.Semaphore(32)

                async def send(i: int) -> str:
                    async with gate:
                        answer = await peer.post(
                            "/api/v1/communications",
                            json=body(recipients=[{"email": f"p{i}@example.com"}]),
                            headers={**headers, "Idempotency-Key": f"proc-{i}"},
                        )
                    assert answer.status_code == 202, answer.text
                    delivery_id: str = answer.json()["deliveries"][0]["id"]
                    return delivery_id

                ids = await asyncio.gather(*(send(i) for i in range(MESSAGES)))
            used = {p: cpu_seconds(p) - before[p] for p in apis}
            assert all(seconds > 0.05 for seconds in used.values()), used
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                async with api.runtime.db.read() as session:
                    sent = await session.scalar(
                        select(func.count()).select_from(Delivery).where(Delivery.status == "sent")
                    )
                if sent == MESSAGES:
                    break
                await asyncio.sleep(0.2)
            assert sent == MESSAGES, server.output()[-3000:]
        finally:
            server.stop()
    refs = Counter(
        p["custom_args"]["ref"] for r in sink.requests for p in r.json()["personalizations"]
    )
    assert set(refs) == set(ids) and len(ids) == MESSAGES
    assert max(refs.values()) == 1  # nothing sent twice
    async with api.runtime.db.read() as session:
        attempts = await session.scalar(select(func.count()).select_from(DeliveryAttempt))
    assert attempts == MESSAGES
    assert server.proc.returncode == 0, server.output()[-3000:]


@pytest.mark.postgres
async def test_api_processes_listen_while_they_start(settings: Settings, tmp_path: Path) -> None:
    """Each API process joins the port before it starts its runtime: with a database that
    accepts the connection and never answers, neither is ever ready, yet both listen (the
    kernel spreads connections over both from the first one on)."""
    held: list[asyncio.StreamWriter] = []

    async def silent(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # keep the connection open, answer nothing

    blackhole = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = blackhole.sockets[0].getsockname()[1]
    stalled = settings.model_copy(
        update={"database_url": f"postgresql+asyncpg://postgres@127.0.0.1:{port}/none"}
    )
    server = ServeProcess(
        stalled, tmp_path / "serve.log", {"CLINICOMM_PROCESSES": "2", "CLINICOMM_WORKER": "false"}
    )
    try:
        deadline = time.monotonic() + 20
        apis: list[int] = []
        while time.monotonic() < deadline:
            apis = [p for p in children(server.proc.pid) if comm(p) == "clinicomm-api"]
            if held and len(apis) == 2 and all(listening(p, server.port) for p in apis):
                break
            await asyncio.sleep(0.1)
        assert held, "the API processes never reached the database"
        # Still starting (the database never answers), and listening.
        assert server.proc.poll() is None, server.output()
        assert len(apis) == 2 and all(listening(p, server.port) for p in apis), server.output()
    finally:
        server.stop()
        for writer in held:
            writer.close()
        blackhole.close()
        await blackhole.wait_closed()


def test_sqlite_refuses_more_than_one_process(tmp_path: Path) -> None:
    import subprocess
    import sys

    env = {
        **os.environ,
        "CLINICOMM_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'x.db'}",
        "CLINICOMM_DATA_DIR": str(tmp_path),
        "CLINICOMM_ENV": "test",
    }
    done = subprocess.run(
        [sys.executable, "-m", "clinicomm.cli", "serve", "--processes", "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "SQLite runs one process" in done.stderr


@pytest.mark.postgres
@pytest.mark.redis
def test_a_process_that_dies_stops_the_others_and_the_supervisor_reports_it(
    settings: Settings, tmp_path: Path
) -> None:
    """An API process killed from outside: the supervisor stops the other processes (none is
    left running) and exits non-zero, so a service manager restarts the whole tree."""
    import signal

    server = ServeProcess(
        settings,
        tmp_path / "serve.log",
        {"CLINICOMM_PROCESSES": "2", "CLINICOMM_WORKER": "true"},
    )
    try:
        server.wait_ready()
        deadline = time.monotonic() + 20
        while len(kids := children(server.proc.pid)) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert sorted(comm(p) for p in kids) == ["clinicomm-api", "clinicomm-api", "clinicomm-work"]
        victim = next(p for p in kids if comm(p) == "clinicomm-api")
        os.kill(victim, signal.SIGKILL)
        code = server.proc.wait(40)
    finally:
        server.stop()
    assert code != 0, server.output()[-2000:]
    alive = [p for p in kids if Path(f"/proc/{p}").exists()]
    assert alive == [], [comm(p) for p in alive]
