"""`freeze_startup_heap` (serve and worker call it once built): what is alive then leaves the
collector's walks, and what is made afterwards is still collected. In a child process, so this
test process's own heap is never frozen."""

from __future__ import annotations

import subprocess
import sys

CHILD = """
import gc, weakref
from clinicomm.runtime import freeze_startup_heap

class Cycle:
    pass

from clinicomm.runtime import COLLECTOR_THRESHOLDS

freeze_startup_heap()
assert gc.get_freeze_count() > 1000, gc.get_freeze_count()
assert gc.get_threshold() == COLLECTOR_THRESHOLDS == (10_000, 10, 10)
later = Cycle()
later.self = later  # a cycle made after the freeze: only a collection frees it
gone = weakref.ref(later)
del later
gc.collect()
assert gone() is None
print("ok")
"""


def test_the_startup_heap_is_frozen_and_later_garbage_still_collected() -> None:
    """And the young generation is collected per 10,000 new objects (runtime's measure)."""
    out = subprocess.run(
        [sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
