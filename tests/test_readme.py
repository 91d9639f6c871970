"""The README's in-process Python example runs as written (in a fresh SQLite database)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from clinicomm.config import Settings

ROOT = Path(__file__).parents[1]


def test_readme_python_example_runs(settings: Settings, tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Python"):]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None
    script = tmp_path / "example.py"
    script.write_text(code.group(1))
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("CLINICOMM_", "EMAIL_"))},
        "CLINICOMM_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'example.db'}",
        "CLINICOMM_MASTER_KEYS": settings.master_keys or "",
        "CLINICOMM_DATA_DIR": str(tmp_path / "data"),
        "CLINICOMM_LOG_LEVEL": "WARNING",
        "PYTHONPATH": str(ROOT / "src"),
    }
    done = subprocess.run(
        [sys.executable, str(script)], env=env, cwd=tmp_path, capture_output=True, text=True,
        timeout=60, check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    message_id, status, source = done.stdout.split()
    assert len(message_id) >= 32 and status in ("pending", "sent", "failed") and source
